"""W_ori<-ft@k%: the merge against a brute-force loop, the k = 0 / 100% ends, the curve's metrics."""

import jax
import numpy as np
import pytest

from shpeft_jax.analysis import sparsity
from shpeft_jax.errors import CheckpointError, ConfigError
from shpeft_jax.utils import flatten_names

from analysis_fixtures import NUM_CLASSES, perturb, write_ckpt, zeros_like_model  # pylint: disable=g-bad-import-order


def _ckpt(params, path="mem", model="test_tiny", image_size=16):
  return sparsity.Checkpoint(params=params, path=path,
                             meta={"model": model, "image_size": image_size,
                                   "num_classes": NUM_CLASSES})


def _logits(model, params, images):
  return np.asarray(model.apply({"params": params}, images))


def _mask_at(pre, ft, k_percent):
  mask, info = sparsity.top_k_mask(sparsity.weight_changes(pre["encoder"], ft["encoder"]),
                                   k_percent)
  return mask, info


def test_k100_reproduces_finetuned_logits_exactly(tiny_model, tiny_pair, tiny_images):
  pre, ft = tiny_pair
  mask, info = _mask_at(pre, ft, 100.0)
  assert info["k"] == info["n"]
  merged = sparsity.merged_params(pre["encoder"], ft, mask)
  for name, v in flatten_names(ft).items():
    np.testing.assert_array_equal(flatten_names(merged)[name], v, err_msg=name)
  np.testing.assert_array_equal(_logits(tiny_model, merged, tiny_images),
                                _logits(tiny_model, ft, tiny_images))


def test_k0_is_pretrained_encoder_with_finetuned_head(tiny_model, tiny_pair, tiny_images):
  pre, ft = tiny_pair
  mask, info = _mask_at(pre, ft, 0.0)
  assert info["k"] == 0
  merged = sparsity.merged_params(pre["encoder"], ft, mask)
  expected = {"encoder": pre["encoder"], "head": ft["head"]}
  got = _logits(tiny_model, merged, tiny_images)
  np.testing.assert_array_equal(got, _logits(tiny_model, expected, tiny_images))
  # The ends differ, so the two checks above are not the same check.
  assert np.abs(got - _logits(tiny_model, ft, tiny_images)).max() > 1e-3


@pytest.mark.parametrize("k_percent", [0.5, 3.7, 50.0])
def test_merge_matches_brute_force_loop(tiny_pair, k_percent):
  pre, ft = tiny_pair
  mask, info = _mask_at(pre, ft, k_percent)
  merged = sparsity.merged_params(pre["encoder"], ft, mask)

  # Brute force: every weight as (change, global index, name, position) in a plain list, sorted by
  # a Python key, the top k copied one element at a time.
  pre_flat, ft_flat = flatten_names(pre["encoder"]), flatten_names(ft["encoder"])
  items = []
  for name in pre_flat:
    a, b = pre_flat[name].reshape(-1), ft_flat[name].reshape(-1)
    for i in range(a.size):
      items.append((abs(float(b[i]) - float(a[i])), len(items), name, i))
  n = len(items)
  k = int(np.floor(k_percent * n / 100 + 0.5))
  assert info["k"] == k and info["n"] == n
  items.sort(key=lambda t: (-t[0], t[1]))
  expected = {name: v.copy().reshape(-1) for name, v in pre_flat.items()}
  for _, _, name, i in items[:k]:
    expected[name][i] = ft_flat[name].reshape(-1)[i]
  got = flatten_names(merged["encoder"])
  for name in pre_flat:
    np.testing.assert_array_equal(got[name].reshape(-1), expected[name], err_msg=name)
  np.testing.assert_array_equal(merged["head"]["kernel"], ft["head"]["kernel"])
  assert sum(int(m.sum()) for m in jax.tree_util.tree_leaves(mask)) == k


def test_sparsity_curve_metrics_against_sklearn(tiny_model, tiny_pair):
  """The curve evaluates exactly the merged model: its F1/accuracy equal sklearn's on its logits."""
  from sklearn.metrics import accuracy_score, f1_score  # pylint: disable=g-import-not-at-top
  pre, ft = tiny_pair
  rng = np.random.default_rng(7)
  size = tiny_model.config.image_size
  images = rng.standard_normal((20, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, 20)
  valid = np.ones(20, bool)
  valid[-3:] = False  # Padding must be ignored.
  batches = [{"image": images[i:i + 8], "label": labels[i:i + 8], "valid": valid[i:i + 8]}
             for i in (0, 8, 16)]
  batches[-1] = {k: np.concatenate([v, v[:4]]) for k, v in batches[-1].items()}  # Pad to 8.
  batches[-1]["valid"][4:] = False
  valid_all = np.concatenate([b["valid"] for b in batches])
  labels_all = np.concatenate([b["label"] for b in batches])
  images_all = np.concatenate([b["image"] for b in batches])
  logs = []
  result = sparsity.sparsity_curve(_ckpt(pre), _ckpt(ft), lambda: iter(batches),
                                   k_grid=(100, 1, 10), log=logs.append)
  assert [p["k_percent"] for p in result["points"]] == [1.0, 10.0, 100.0]
  assert any("k=10%" in line for line in logs)

  def sk(params):
    pred = _logits(tiny_model, params, images_all).argmax(-1)[valid_all]
    y = labels_all[valid_all]
    return f1_score(y, pred, average="macro"), accuracy_score(y, pred)

  f1_full, acc_full = sk(ft)
  assert result["reference"]["finetuned"]["f1"] == pytest.approx(f1_full, abs=1e-6)
  assert result["reference"]["finetuned"]["accuracy"] == pytest.approx(acc_full, abs=1e-6)
  f1_zero, _ = sk({"encoder": pre["encoder"], "head": ft["head"]})
  assert result["reference"]["pretrained_encoder_finetuned_head"]["f1"] == pytest.approx(
      f1_zero, abs=1e-6)
  for p in result["points"]:
    mask, _ = _mask_at(pre, ft, p["k_percent"])
    f1_k, acc_k = sk(sparsity.merged_params(pre["encoder"], ft, mask))
    assert p["metrics"]["f1"] == pytest.approx(f1_k, abs=1e-6)
    assert p["metrics"]["accuracy"] == pytest.approx(acc_k, abs=1e-6)
    if f1_full:
      assert p["f1_percent_of_full"] == pytest.approx(100 * f1_k / f1_full, rel=1e-6)
  assert result["points"][-1]["metrics"] == result["reference"]["finetuned"]


def test_checkpoint_errors(tmp_path, tiny_pair):
  pre, ft = tiny_pair
  with pytest.raises(CheckpointError, match="does not exist"):
    sparsity.load_checkpoint(str(tmp_path / "nope"), "pretrained checkpoint")
  other = zeros_like_model("demo_small")
  with pytest.raises(CheckpointError, match="model="):
    sparsity.check_same_encoder(_ckpt(pre), _ckpt(other, model="demo_small"))
  with pytest.raises(CheckpointError, match="different parameters"):
    sparsity.check_same_encoder(_ckpt(pre), _ckpt(other, model=None, image_size=None))
  # Same preset at another image size: only the positional embedding's shape differs.
  big_params = zeros_like_model("test_tiny", image_size=32)
  with pytest.raises(CheckpointError, match="image_size"):
    sparsity.check_same_encoder(_ckpt(pre), _ckpt(big_params, image_size=32))
  with pytest.raises(CheckpointError, match="positional_embedding: .17, 32. vs .65, 32."):
    sparsity.check_same_encoder(_ckpt(pre), _ckpt(big_params, image_size=None))
  extra = perturb(pre, 5)
  extra["encoder"]["lora_query"] = {"a": np.zeros((2, 2), np.float32)}
  with pytest.raises(CheckpointError, match="different parameters"):
    sparsity.check_same_encoder(_ckpt(pre), _ckpt(extra))
  path = write_ckpt(tmp_path / "ft", ft)
  loaded = sparsity.load_checkpoint(path)
  np.testing.assert_array_equal(loaded.params["head"]["kernel"], ft["head"]["kernel"])
  with pytest.raises(ConfigError):
    sparsity.top_k_mask(sparsity.weight_changes(pre["encoder"], ft["encoder"]), 101)
