"""Task adapters: bit-exact round trips, refusal of another base, size at k = 1% on ViT-B/16, export."""

import json
import os

import jax
import numpy as np
import pytest

from shpeft_jax import adapter, checkpoints
from shpeft_jax import export as export_cli
from shpeft_jax.errors import CheckpointError
from shpeft_jax.models.clip_vit import build_model, init_params
from shpeft_jax.utils import flatten_names, unflatten_names

META = {"model": "test_tiny", "image_size": 16, "num_classes": 3}


def _bits(a):
  a = np.ascontiguousarray(a)
  return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _assert_bit_equal(a_tree, b_tree):
  fa, fb = flatten_names(a_tree), flatten_names(b_tree)
  assert sorted(fa) == sorted(fb)
  for name in fa:
    assert fa[name].shape == fb[name].shape and fa[name].dtype == fb[name].dtype, name
    np.testing.assert_array_equal(_bits(fa[name]), _bits(fb[name]), err_msg=name)


def tiny_base_and_tuned(frac=0.02, seed=0):
  """(base encoder params, fine-tuned classifier): `frac` of each encoder tensor moved, ln_1
  frozen, the head new, and the bit-level corner cases -0.0 over +0.0 and a NaN."""
  shapes = jax.eval_shape(lambda: init_params(build_model("test_tiny", 3), jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)  # numpy values: no init to compile.
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  base = {"encoder": params["encoder"]}
  tuned = {}
  for name, x in flatten_names(params).items():
    y = x.copy()
    if name.startswith("head/"):
      y = y + 0.5
    elif "ln_1" not in name:
      sel = rng.random(x.shape) < frac
      y[sel] += rng.normal(size=int(sel.sum())).astype(y.dtype)
    tuned[name] = y
  flatten_names(base)["encoder/resblocks_0/attn/query/kernel"].reshape(-1)[7] = 0.0
  w = tuned["encoder/resblocks_0/attn/query/kernel"]
  w.reshape(-1)[7] = -0.0
  w.reshape(-1)[11] = np.nan
  return base, unflatten_names(tuned)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(base, tuned, base_dir, adapter_dir) written once per module (orbax saves are slow-ish)."""
  root = tmp_path_factory.mktemp("adapter")
  base, tuned = tiny_base_and_tuned()
  base_dir = checkpoints.save_params(str(root / "base"), base, dict(META, num_classes=None))
  stats = adapter.write_adapter(str(root / "adapter"), tuned, base, base_name="tiny-base",
                                method="shpeft", meta=META,
                                mask_stats={"total": {"selected": 5}, "tensors": {"x": 1}})
  return base, tuned, base_dir, str(root / "adapter"), stats


def test_round_trip_is_bit_exact_and_stores_only_changes(saved):
  base, tuned, base_dir, adapter_dir, stats = saved
  assert adapter.is_adapter(adapter_dir) and not adapter.is_adapter(base_dir)
  params, meta = adapter.load_with_base(adapter_dir, base_dir)
  _assert_bit_equal(params, tuned)
  assert {k: meta[k] for k in META} == META
  assert meta["adapter"]["method"] == "shpeft" and meta["adapter"]["base"] == "tiny-base"

  config = json.load(open(os.path.join(adapter_dir, adapter.CONFIG)))
  assert config["mask_stats"] == {"total": {"selected": 5}}  # Summaries only.
  assert not any("ln_1" in k for k in config["tensors"])  # Frozen tensors are not stored.
  assert config["tensors"]["head.weight"]["kind"] == "dense"
  assert config["tensors"]["transformer.resblocks.0.mlp.c_fc.weight"]["kind"] == "sparse"
  # Brute-force count of differing bit patterns (encoder) + the whole head.
  fb, ft = flatten_names(base), flatten_names(tuned)
  expected = sum(int(np.count_nonzero(_bits(ft[n]) != _bits(fb[n]))) for n in fb)
  expected += sum(ft[n].size for n in ft if n.startswith("head/"))
  assert stats["changed"] == config["stats"]["changed"] == expected
  assert stats["bytes"] == sum(os.path.getsize(os.path.join(adapter_dir, f))
                               for f in os.listdir(adapter_dir))


def test_another_base_is_refused_naming_both(saved, tmp_path):
  base, _, base_dir, adapter_dir, _ = saved
  other = jax.tree.map(np.copy, base)
  other["encoder"]["ln_post"]["scale"][0] += 1e-3  # One weight off.
  other_dir = checkpoints.save_params(str(tmp_path / "other"), other, dict(META, num_classes=None))
  with pytest.raises(CheckpointError) as e:
    adapter.load_with_base(adapter_dir, other_dir)
  msg = str(e.value)
  assert "\n" not in msg and "tiny-base" in msg and other_dir in msg
  assert adapter.base_hash(base)[:16] in msg and adapter.base_hash(other)[:16] in msg
  with pytest.raises(CheckpointError, match="pass its base"):
    adapter.load_with_base(adapter_dir)
  with pytest.raises(CheckpointError, match="not a shpeft_jax adapter"):
    adapter.load_with_base(base_dir, base_dir)
  with pytest.raises(CheckpointError, match="not an adapter"):
    adapter.load_model(base_dir, base_dir)
  with pytest.raises(CheckpointError, match="already exists"):
    adapter.write_adapter(adapter_dir, base, base, base_name="x")


def test_export_merges_adapter_into_base_bit_exactly(saved, tmp_path, capsys):
  from safetensors.numpy import load_file
  _, tuned, base_dir, adapter_dir, _ = saved
  out = tmp_path / "merged.safetensors"
  # The module's adapter carries a NaN (a bit-level corner case above): export refuses it.
  assert export_cli.main([adapter_dir, "--base", base_dir, "--format", "hf", "--out", str(out)]) == 2
  assert "NaN" in capsys.readouterr().err and not out.exists()
  base, tuned = tiny_base_and_tuned(seed=1)
  flatten_names(tuned)["encoder/resblocks_0/attn/query/kernel"].reshape(-1)[11] = 0.25
  base_dir = checkpoints.save_params(str(tmp_path / "base"), base, dict(META, num_classes=None))
  adapter_dir = str(tmp_path / "adapter")
  adapter.write_adapter(adapter_dir, tuned, base, base_name="tiny-base", method="shpeft", meta=META,
                        mask_stats={"total": {"selected": 5}, "tensors": {"x": 1}})
  assert export_cli.main([adapter_dir, "--base", base_dir, "--format", "hf", "--out", str(out)]) == 0
  want = export_cli.flax_to_torch_state_dict(tuned, "hf")
  got = load_file(str(out))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(_bits(got[k]), _bits(want[k]), err_msg=k)
  # An adapter without --base is an error that says what to pass.
  assert export_cli.main([adapter_dir, "--format", "openai", "--out", str(tmp_path / "x.pt")]) == 2
  assert "--base" in capsys.readouterr().err


@pytest.mark.slow  # 86M weights through two layout conversions and two hashes: ~40 s here.
def test_vit_b16_adapter_at_k_one_percent_is_under_two_percent(tmp_path):
  """ViT-B/16 shapes with random weights, 1% of every encoder tensor changed, the head new."""
  shapes = flatten_names(jax.eval_shape(
      lambda: init_params(build_model("ViT-B/16", 4), jax.random.PRNGKey(0))))
  rng = np.random.default_rng(0)
  base, tuned = {}, {}
  for name, s in shapes.items():
    x = rng.standard_normal(s.shape, np.float32)
    y = x.copy()
    if name.startswith("head/"):
      y += 1.0
    else:
      base[name] = x
      sel = rng.random(s.shape) < 0.01
      y[sel] += 1.0
    tuned[name] = y
  base, tuned = unflatten_names(base), unflatten_names(tuned)
  stats = adapter.write_adapter(str(tmp_path / "a"), tuned, base, base_name="random ViT-B/16",
                                method="shpeft",
                                meta={"model": "ViT-B/16", "image_size": 224, "num_classes": 4})
  assert stats["ratio"] < 0.02, stats
  # ~6 bytes per changed weight (float32 value + uint16 gap), plus the head and the JSON.
  assert 6 * stats["changed"] < stats["bytes"] < 6 * stats["changed"] + 200_000
  params, _ = adapter.load_with_base(str(tmp_path / "a"), base_params=base)
  _assert_bit_equal(params, tuned)


def test_analysis_reads_an_adapter_on_its_pretrained_base(saved, tmp_path, capsys):
  from shpeft_jax.analysis import __main__ as cli
  from shpeft_jax.analysis import hybridity, sparsity
  base, tuned, base_dir, _, _ = saved
  tuned = jax.tree.map(np.nan_to_num, tuned)  # The study refuses NaN weights.
  adapter_dir = str(tmp_path / "adapter")
  adapter.write_adapter(adapter_dir, tuned, base, base_name="tiny-base", meta=META)
  pre = sparsity.load_checkpoint(base_dir)
  ft = sparsity.load_checkpoint(adapter_dir, base=pre)
  _assert_bit_equal(ft.params, tuned)
  with pytest.raises(CheckpointError, match="--pretrained"):
    sparsity.load_checkpoint(adapter_dir)

  other = jax.tree.map(np.copy, tuned)
  other["encoder"]["ln_pre"]["bias"] += 1.0
  other_dir = checkpoints.save_params(str(tmp_path / "other"), other, META)
  rc = cli.main(["hybridity", "--pretrained", base_dir, "--finetuned", f"a={adapter_dir}",
                 "--finetuned", f"b={other_dir}", "--k", "5", "--out", str(tmp_path / "out")])
  assert rc == 0
  res = json.load(open(tmp_path / "out" / "hybridity_finetuned.json"))
  direct = hybridity.finetuned_study(
      pre, {"a": sparsity.Checkpoint(tuned, META, "a"), "b": sparsity.Checkpoint(other, META, "b")},
      k_percents=(5.0,), log=lambda s: None)
  assert res["per_k"][0]["overlap"]["intersection"] == direct["per_k"][0]["overlap"]["intersection"]
  # The adapter on a pretrained checkpoint that is not its base: refused, naming both.
  rc = cli.main(["hybridity", "--pretrained", other_dir, "--finetuned", f"a={adapter_dir}",
                 "--finetuned", f"b={other_dir}", "--out", str(tmp_path / "out2")])
  err = capsys.readouterr().err
  assert rc == 2 and "Wrong base" in err and "tiny-base" in err and other_dir in err
