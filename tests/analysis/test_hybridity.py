"""Overlap of key weights: self = 1, disjoint = 0, independent random ~ k, and brute-force checks."""

import math

import jax
import numpy as np
import pytest

from shpeft_jax.analysis import hybridity, sparsity
from shpeft_jax.errors import CheckpointError, ConfigError
from shpeft_jax.peft import mask_io
from shpeft_jax.utils import flatten_names

from analysis_fixtures import perturb  # pylint: disable=g-bad-import-order


def _ckpt(params, path="mem"):
  return sparsity.Checkpoint(params=params, path=path,
                             meta={"model": "test_tiny", "image_size": 16, "num_classes": 3})


def _random_mask(rng, n, count):
  v = np.zeros(n, bool)
  v[rng.choice(n, count, replace=False)] = True
  return v


def test_self_overlap_is_one_and_disjoint_is_zero():
  rng = np.random.default_rng(0)
  n = 10_000
  a = _random_mask(rng, n, 100)
  b = np.zeros(n, bool)
  b[np.flatnonzero(~a)[:100]] = True  # Disjoint from a, same size.
  mat = hybridity.overlap_matrix({"a": a, "a_again": a.copy(), "b": b})
  o = np.asarray(mat["overlap"])
  np.testing.assert_array_equal(o, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
  assert mat["counts"] == [100, 100, 100]
  np.testing.assert_allclose(mat["chance"], np.full((3, 3), 0.01))
  assert mat["shared_by_all"]["count"] == 0


@pytest.mark.parametrize("k_percent", [5.0, 1.0, 0.5])
def test_independent_random_masks_overlap_close_to_k(k_percent):
  """Two independent uniform masks of size m out of N share m^2/N positions on average: overlap
  = k. The intersection is hypergeometric (sd <= sqrt(m k)); we allow 5 sd."""
  rng = np.random.default_rng(int(k_percent * 100))
  n = 4_100_000  # Large enough that 5 sd < k/2 down to k = 0.5% (needs N k^2 > 100).
  m = int(round(n * k_percent / 100))
  vecs = {f"t{i}": _random_mask(rng, n, m) for i in range(3)}
  mat = hybridity.overlap_matrix(vecs)
  k = k_percent / 100
  sd = math.sqrt(m * k * (1 - k)) / m
  o = np.asarray(mat["overlap"])
  off = o[~np.eye(3, dtype=bool)]
  assert np.all(np.abs(off - k) < 5 * sd), (off, k, sd)
  np.testing.assert_allclose(mat["chance"], np.full((3, 3), k))
  # Sanity of the test itself: the tolerance is much tighter than k, so "overlap = 0" or
  # "overlap = 2k" would fail.
  assert 5 * sd < 0.5 * k


def test_overlap_matches_python_sets():
  rng = np.random.default_rng(4)
  n = 5_000
  vecs = {"a": _random_mask(rng, n, 300), "b": _random_mask(rng, n, 300),
          "c": _random_mask(rng, n, 150)}
  vecs["b"][np.flatnonzero(vecs["a"])[:120]] = True  # Planted overlap (b grows a little).
  mat = hybridity.overlap_matrix(vecs)
  sets = {t: set(np.flatnonzero(v).tolist()) for t, v in vecs.items()}
  names = list(vecs)
  for i, x in enumerate(names):
    for j, y in enumerate(names):
      inter = len(sets[x] & sets[y])
      assert mat["intersection"][i][j] == inter
      assert mat["overlap"][i][j] == pytest.approx(inter / len(sets[x]))
      assert mat["chance"][i][j] == pytest.approx(len(sets[y]) / n)
  allset = sets["a"] & sets["b"] & sets["c"]
  assert mat["shared_by_all"]["count"] == len(allset)
  assert mat["shared_by_all"]["fraction"] == pytest.approx(len(allset) / 150)


def _top_k_brute(pre_enc, ft_enc, k_percent):
  """Top-k changed positions as a set of (name, flat index), by a stable sort on a Python list."""
  pre_flat, ft_flat = flatten_names(pre_enc), flatten_names(ft_enc)
  items = []
  for name in pre_flat:
    d = np.abs(ft_flat[name].astype(np.float32) - pre_flat[name].astype(np.float32)).reshape(-1)
    items += [(float(v), len(items) + i, name, i) for i, v in enumerate(d)]
  k = int(np.floor(k_percent * len(items) / 100 + 0.5))
  items.sort(key=lambda t: (-t[0], t[1]))
  return {(name, i) for _, _, name, i in items[:k]}, len(items)


def test_finetuned_study_against_brute_force(tiny_pair):
  pre, ft_a = tiny_pair
  ft_b = perturb(pre, seed=2)
  # Task c shares task a's largest changes: same encoder moves on a planted 1% set.
  ft_c = perturb(pre, seed=3, scale=0.01)
  planted, n = _top_k_brute(pre["encoder"], ft_a["encoder"], 1.0)
  flat_a, flat_c = flatten_names(ft_a["encoder"]), flatten_names(ft_c["encoder"])
  for name, i in planted:
    flat_c[name].reshape(-1)[i] = flat_a[name].reshape(-1)[i]
  tasks = {"a": _ckpt(ft_a), "b": _ckpt(ft_b), "c": _ckpt(ft_c)}
  logs = []
  result = hybridity.finetuned_study(_ckpt(pre), tasks, k_percents=(5.0, 1.0), log=logs.append)
  assert len(logs) == 2
  by_k = {e["k_percent"]: e for e in result["per_k"]}
  for k in (5.0, 1.0):
    sets = {t: _top_k_brute(pre["encoder"], c.params["encoder"], k)[0] for t, c in tasks.items()}
    mat = by_k[k]["overlap"]
    assert mat["tasks"] == ["a", "b", "c"]
    assert mat["n"] == n
    for i, x in enumerate(mat["tasks"]):
      assert mat["counts"][i] == len(sets[x])
      for j, y in enumerate(mat["tasks"]):
        assert mat["intersection"][i][j] == len(sets[x] & sets[y]), (k, x, y)
  # The planted shared set is found at k = 1%: a and c agree almost fully, a and b at chance.
  o1 = np.asarray(by_k[1.0]["overlap"]["overlap"])
  assert o1[0, 2] > 0.9
  assert o1[0, 1] < 0.1
  # Per-layer counts add up to k-count for each task.
  for t in tasks:
    layers = by_k[1.0]["layers"][t]
    assert sum(e["selected"] for e in layers["per_layer"].values()) == by_k[1.0]["overlap"][
        "counts"][0]


def test_task_agnostic_overlap(tiny_pair):
  pre, _ = tiny_pair
  enc = pre["encoder"]
  mags = {n: np.abs(v).reshape(-1) for n, v in flatten_names(enc).items()}
  allv = np.concatenate(list(mags.values()))
  n = allv.size
  count = n // 50
  order = np.argsort(-allv, kind="stable")

  def mask_from(idx):
    v = np.zeros(n, bool)
    v[idx] = True
    out, off = {}, 0
    for name, x in flatten_names(enc).items():
      out[name] = v[off:off + x.size].reshape(x.shape)
      off += x.size
    return {"encoder": _unflat(out), "head": {"bias": None, "kernel": None}}

  top = hybridity.task_agnostic_overlap(mask_from(order[:count]), pre)
  assert top["overlap"] == 1.0 and top["count"] == count and top["n"] == n
  bottom = hybridity.task_agnostic_overlap(mask_from(order[-count:]), pre)
  assert bottom["overlap"] == 0.0
  half = np.concatenate([order[:count // 2], order[-(count - count // 2):]])
  mid = hybridity.task_agnostic_overlap(mask_from(half), pre)
  assert mid["intersection"] == count // 2
  assert mid["chance"] == pytest.approx(count / n)


def _unflat(flat):
  from shpeft_jax.utils import unflatten_names  # pylint: disable=g-import-not-at-top
  return unflatten_names(flat)


def test_mask_study_on_mask_files(tmp_path, tiny_pair):
  """SH-PEFT-style masks (head unmasked) written with mask_io and read back."""
  pre, ft = tiny_pair
  changes = sparsity.weight_changes(pre["encoder"], ft["encoder"])
  m1, _ = sparsity.top_k_mask(changes, 2.0)
  rand = jax.tree_util.tree_map(lambda x: np.random.default_rng(0).random(x.shape), changes)
  m2, _ = sparsity.top_k_mask(rand, 2.0)
  paths = {}
  for name, m in (("task1", m1), ("task2", m2)):
    # As the trainer writes it: the always-trained head is all True in the file.
    tree = {"encoder": m, "head": jax.tree_util.tree_map(lambda x: np.ones(x.shape, bool),
                                                          ft["head"])}
    paths[name] = str(tmp_path / f"{name}_mask.npz")
    mask_io.save_mask(paths[name], tree)
  masks = {t: mask_io.load_mask(p, pre) for t, p in paths.items()}
  result = hybridity.mask_study(masks, _ckpt(pre), log=lambda s: None)
  v1 = hybridity.mask_vector({"encoder": m1})
  v2 = hybridity.mask_vector({"encoder": m2})
  assert result["overlap"]["intersection"][0][1] == int(np.count_nonzero(v1 & v2))
  assert result["overlap"]["n"] == v1.size
  assert set(result["task_agnostic"]) == {"task1", "task2"}
  assert result["layers"]["task1"]["total"]["selected"] == int(v1.sum())
  # Positions both masks share, and which of them are in the top-|M| by |w|, by brute force.
  top_w = np.argsort(-np.concatenate([np.abs(v).reshape(-1) for v in flatten_names(
      pre["encoder"]).values()]), kind="stable")[:int(v1.sum())]
  in_top = np.zeros(v1.size, bool)
  in_top[top_w] = True
  shared = result["shared_task_agnostic"]
  assert shared["shared"] == int(np.count_nonzero(v1 & v2))
  assert shared["shared_in_top_abs_w"] == int(np.count_nonzero(v1 & v2 & in_top))
  assert result["task_agnostic"]["task1"]["intersection"] == int(np.count_nonzero(v1 & in_top))
  # The head is left out unless asked for: with it, both masks share every head weight.
  with_head = hybridity.mask_study(masks, _ckpt(pre), include_head=True, log=lambda s: None)
  n_head = sum(x.size for x in jax.tree_util.tree_leaves(ft["head"]))
  assert with_head["overlap"]["n"] == v1.size + n_head
  assert with_head["overlap"]["intersection"][0][1] == int(np.count_nonzero(v1 & v2)) + n_head
  # A mask over other parameters cannot be compared.
  other = {"encoder": {"ln_post": m1["ln_post"]}}
  with pytest.raises(CheckpointError, match="different parameters"):
    hybridity.mask_study({"a": {"encoder": m1}, "b": other})
  with pytest.raises(ConfigError, match="at least two"):
    hybridity.finetuned_study(_ckpt(pre), {"only": _ckpt(ft)})
