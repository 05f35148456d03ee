"""Exact global top-k: count, ties, equality with a stable argsort, validation, statistics."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from shpeft_jax.errors import ConfigError
from shpeft_jax.peft import selection as sel
from shpeft_jax.utils import flatten_names


def flat(tree):
  return np.concatenate([np.asarray(v).reshape(-1) for v in flatten_names(tree).values()])


def random_tree(rng, ties=False):
  shapes = {"encoder": {"a": (7, 13), "b": (5,), "c": (3, 4, 6)}, "z": (31,)}
  def make(shape):
    if ties:  # Few distinct values: most scores are tied with many others.
      return rng.integers(0, 4, size=shape).astype(np.float32) / 2
    return rng.random(shape, dtype=np.float32)
  return {"encoder": {k: make(s) for k, s in shapes["encoder"].items()}, "z": make(shapes["z"])}


def reference_mask(scores_flat, k):
  """Independent reference: stable argsort of -scores (higher first, lower index first on ties)."""
  order = np.argsort(-scores_flat.astype(np.float64), kind="stable")
  m = np.zeros(scores_flat.size, bool)
  m[order[:k]] = True
  return m


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_count_and_argsort(ties, seed):
  rng = np.random.default_rng(seed)
  tree = random_tree(rng, ties)
  scores = flat(tree)
  n = scores.size
  for k_percent in [0.01, 0.5, 1, 2.5, 10, 33.3, 50, 77.7, 99.9, 100]:
    k = max(1, math.floor(k_percent * n / 100 + 0.5)) if k_percent * n / 100 >= 0.5 else None
    if k is None:
      with pytest.raises(ConfigError, match="rounds to 0"):
        sel.select_top_k(tree, k_percent=k_percent)
      continue
    mask, info = sel.select_top_k(tree, k_percent=k_percent)
    m = flat(mask)
    assert m.sum() == k == info.k == info.selected and info.n == n
    np.testing.assert_array_equal(m, reference_mask(scores, k))
    assert info.threshold == np.sort(scores)[::-1][k - 1]
  for k_count in [1, 2, 17, n // 3, n - 1, n]:
    mask, info = sel.select_top_k(tree, k_count=k_count)
    np.testing.assert_array_equal(flat(mask), reference_mask(scores, k_count))


def test_all_equal_scores_take_lowest_indices():
  tree = {"a": np.ones((4, 5), np.float32), "b": np.ones(10, np.float32)}
  mask, info = sel.select_top_k(tree, k_count=23)
  np.testing.assert_array_equal(flat(mask), np.arange(30) < 23)
  assert info.num_above == 0 and info.num_tied == 30 and info.num_tied_selected == 23


def test_zero_and_negative_zero_tie():
  """-0.0 == +0.0, as for np.argsort: the lower index wins."""
  tree = {"a": np.array([0.0, -0.0, 1.0, -0.0, 0.0], np.float32)}
  mask, _ = sel.select_top_k(tree, k_count=3)
  np.testing.assert_array_equal(mask["a"], [True, True, True, False, False])


def test_large_sample_path_and_jax_input():
  """Above the sample size (2^18), with a few hundred thousand tied zeros, jax arrays as input."""
  rng = np.random.default_rng(3)
  a = rng.exponential(size=700_001).astype(np.float32)
  a[rng.random(a.size) < 0.4] = 0.0
  b = np.round(rng.random(300_000), 3).astype(np.float32)  # Heavy ties.
  tree = {"a": jnp.asarray(a), "b": jnp.asarray(b).reshape(300, 1000)}
  scores = np.concatenate([a, b])
  for k_percent in [0.01, 1, 5, 59.0, 70.0]:
    mask, info = sel.select_top_k(tree, k_percent=k_percent)
    k = math.floor(k_percent * scores.size / 100 + 0.5)
    assert info.selected == k
    np.testing.assert_array_equal(flat(mask), reference_mask(scores, k))


def test_none_leaves_and_eligible():
  rng = np.random.default_rng(4)
  tree = {"encoder": {"w": rng.random(20, dtype=np.float32),
                      "v": rng.random(10, dtype=np.float32) + 10},  # The best scores.
          "head": {"kernel": None}}
  mask, info = sel.select_top_k(tree, k_count=5)
  assert mask["head"]["kernel"] is None and info.n == 30
  assert mask["encoder"]["v"].sum() == 5
  # v ineligible: never selected, not counted in N; the 5 best of w are selected.
  mask, info = sel.select_top_k(tree, k_count=5,
                                eligible={"encoder": {"w": True, "v": False}, "head": {
                                    "kernel": True}})
  assert info.n == 20 and mask["encoder"]["v"].dtype == bool and not mask["encoder"]["v"].any()
  np.testing.assert_array_equal(mask["encoder"]["w"],
                                reference_mask(tree["encoder"]["w"], 5))
  with pytest.raises(ConfigError, match="k_count"):
    sel.select_top_k(tree, k_count=21, eligible={"encoder": {"w": True, "v": False},
                                                 "head": {"kernel": True}})


def test_invalid_k_and_nan():
  tree = {"a": np.arange(10, dtype=np.float32)}
  for bad in [0, -1, 100.01, float("nan"), float("inf"), True]:
    with pytest.raises(ConfigError, match="k_percent"):
      sel.select_top_k(tree, k_percent=bad)
  for bad in [0, -3, 11, 2.5]:
    with pytest.raises(ConfigError, match="k_count"):
      sel.select_top_k(tree, k_count=bad)
  with pytest.raises(ConfigError, match="exactly one"):
    sel.select_top_k(tree)
  with pytest.raises(ConfigError, match="exactly one"):
    sel.select_top_k(tree, k_percent=1, k_count=1)
  nan = {"a": np.array([1.0, np.nan, 2.0], np.float32)}
  with pytest.raises(ConfigError, match="'a' contain NaN"):
    sel.select_top_k(nan, k_count=1)
  with pytest.raises(ConfigError, match="N = 0"):
    sel.select_top_k({"a": None}, k_count=1)


def test_k_percent_rounding():
  assert sel.resolve_k(1000, k_percent=1) == 10
  assert sel.resolve_k(85_798_656, k_percent=1) == 857_987  # 857986.56 rounds up.
  assert sel.resolve_k(85_798_656, k_percent=0.01) == 8_580  # 8579.8656.
  assert sel.resolve_k(250, k_percent=1) == 3                 # 2.5 rounds half up.
  assert sel.resolve_k(10, k_count=10) == 10


CLIP_NAMES = {
    "encoder/conv1/kernel": (4, 4, 3, 8), "encoder/class_embedding": (8,),
    "encoder/positional_embedding": (5, 8), "encoder/ln_pre/scale": (8,),
    "encoder/ln_pre/bias": (8,),
    "encoder/resblocks_0/ln_1/scale": (8,), "encoder/resblocks_0/attn/query/kernel": (8, 2, 4),
    "encoder/resblocks_0/attn/key/bias": (2, 4), "encoder/resblocks_0/attn/out/kernel": (2, 4, 8),
    "encoder/resblocks_0/mlp/c_fc/kernel": (8, 16), "encoder/resblocks_0/mlp/c_proj/bias": (8,),
    "encoder/resblocks_10/mlp/c_fc/bias": (16,), "encoder/resblocks_2/ln_2/bias": (8,),
    "encoder/ln_post/scale": (8,), "head/kernel": (8, 3),
}


def test_mask_statistics_by_hand():
  from shpeft_jax.utils import unflatten_names
  rng = np.random.default_rng(5)
  masks = {n: rng.random(s) < 0.3 for n, s in CLIP_NAMES.items()}
  masks["head/kernel"] = None
  stats = sel.mask_statistics(unflatten_names(masks))
  live = {n: m for n, m in masks.items() if m is not None}
  assert stats["unmasked"] == ["head/kernel"]
  assert stats["total"]["size"] == sum(m.size for m in live.values())
  assert stats["total"]["selected"] == sum(int(m.sum()) for m in live.values())
  for n, m in live.items():
    t = stats["tensors"][n]
    assert (t["selected"], t["size"], t["shape"]) == (int(m.sum()), m.size, list(m.shape))
  def group(names):
    return sum(int(live[n].sum()) for n in names), sum(live[n].size for n in names)
  emb = ["encoder/conv1/kernel", "encoder/class_embedding", "encoder/positional_embedding"]
  assert (stats["per_layer"]["embeddings"]["selected"],
          stats["per_layer"]["embeddings"]["size"]) == group(emb)
  block0 = [n for n in live if "/resblocks_0/" in n]
  assert (stats["per_layer"]["resblocks_0"]["selected"],
          stats["per_layer"]["resblocks_0"]["size"]) == group(block0)
  assert list(stats["per_layer"]) == ["embeddings", "ln_pre", "resblocks_0", "resblocks_2",
                                      "resblocks_10", "ln_post"]
  ln = [n for n in live if "/ln_" in n]
  assert (stats["per_type"]["layernorm"]["selected"],
          stats["per_type"]["layernorm"]["size"]) == group(ln)
  biases = [n for n in live if n.endswith("/bias")]
  assert (stats["per_kind"]["bias"]["selected"], stats["per_kind"]["bias"]["size"]) == group(biases)
  assert set(stats["per_type"]) == {"patch_embed", "class_token", "pos_embed", "layernorm",
                                    "attn_qkv", "attn_out", "mlp_fc", "mlp_proj"}
  f = stats["per_type"]["attn_qkv"]
  assert f["fraction"] == pytest.approx(f["selected"] / f["size"])


# ------------------------------------------------------------------------------------------------
# Scopes: per_tensor and per_row against a brute-force argsort per group.

# The input (fan-in) axes of each kernel of CLIP_NAMES, written out by hand from the Flax layouts:
# Conv [kh, kw, in, out], q/k/v DenseGeneral [width, heads, head_dim], out [heads, head_dim, width],
# Dense [in, out]. Every other leaf is one group (per_tensor fallback).
FAN_IN_AXES = {"encoder/conv1/kernel": (0, 1, 2), "encoder/resblocks_0/attn/query/kernel": (0,),
               "encoder/resblocks_0/attn/out/kernel": (0, 1),
               "encoder/resblocks_0/mlp/c_fc/kernel": (0,), "head/kernel": (0,)}


def brute_groups(name, shape, scope):
  """Lists of C-order flat indices, one per group, enumerated element by element."""
  if scope == "per_tensor" or name not in FAN_IN_AXES:
    return [list(range(math.prod(shape)))]
  in_axes = FAN_IN_AXES[name]
  out_axes = [a for a in range(len(shape)) if a not in in_axes]
  groups = {}
  for idx in np.ndindex(*shape):
    key = tuple(idx[a] for a in out_axes)
    groups.setdefault(key, []).append(int(np.ravel_multi_index(idx, shape)))
  return list(groups.values())


def brute_scoped_mask(name, scores, k_percent, scope):
  flat_s = scores.reshape(-1).astype(np.float64)
  m = np.zeros(flat_s.size, bool)
  for group in brute_groups(name, scores.shape, scope):
    k = max(1, math.floor(k_percent * len(group) / 100 + 0.5))
    ranked = sorted(group, key=lambda i: (-flat_s[i], i))  # Higher first, lower index on ties.
    m[ranked[:k]] = True
  return m.reshape(scores.shape)


@pytest.mark.parametrize("scope", ["per_tensor", "per_row"])
@pytest.mark.parametrize("ties", [False, True])
def test_scoped_selection_equals_brute_force(scope, ties):
  from shpeft_jax.utils import unflatten_names
  rng = np.random.default_rng(7 if ties else 8)
  scores = {n: (rng.integers(0, 3, size=s).astype(np.float32) if ties
                else rng.random(s, dtype=np.float32)) for n, s in CLIP_NAMES.items()}
  scores["encoder/resblocks_0/ln_1/scale"][:] = 0.0  # A group made only of ties.
  scores["head/kernel"] = None  # Unscored: stays None.
  shapes = {n: s for n, s in CLIP_NAMES.items() if scores[n] is not None}
  for k_percent in [1.0, 12.5, 30.0, 50.0, 100.0]:
    mask, info = sel.select_top_k(unflatten_names(scores), k_percent=k_percent, scope=scope)
    mask = flatten_names(mask)
    assert "head/kernel" not in mask  # None leaves vanish from flatten_names.
    total = 0
    for n in shapes:
      np.testing.assert_array_equal(mask[n], brute_scoped_mask(n, scores[n], k_percent, scope),
                                    err_msg=f"{n} at {k_percent}%")
      total += int(mask[n].sum())
    assert total == info.k == info.selected == sel.scoped_count(shapes, k_percent=k_percent,
                                                                scope=scope)
    assert info.scope == scope and info.n == sum(math.prod(s) for s in shapes.values())
    assert info.num_groups == sum(len(brute_groups(n, s, scope)) for n, s in shapes.items())
    assert info.num_above + info.num_tied_selected == info.selected


def test_per_row_layout_by_hand():
  """A [3, 2] Dense kernel: each output unit (column) keeps its best of 3 incoming weights;
  q/k/v [2, 1, 2]: per (head, head_dim) over the 2 inputs; a 1-D bias keeps its best of 4."""
  tree = {"encoder": {
      "mlp": {"c_fc": {"kernel": np.array([[0.1, 0.9], [0.5, 0.9], [0.3, 0.2]], np.float32),
                       "bias": np.array([4.0, 1.0, 3.0, 2.0], np.float32)}},
      "attn": {"query": {"kernel": np.array([[[1.0, 0.0]], [[2.0, 0.0]]], np.float32)}}}}
  mask, info = sel.select_top_k(tree, k_percent=30.0, scope="per_row")
  enc = mask["encoder"]
  np.testing.assert_array_equal(enc["mlp"]["c_fc"]["kernel"],
                                [[False, True], [True, False], [False, False]])  # 0.9 tie: row 0.
  np.testing.assert_array_equal(enc["mlp"]["c_fc"]["bias"], [True, False, False, False])
  np.testing.assert_array_equal(enc["attn"]["query"]["kernel"], [[[False, True]], [[True, False]]])
  assert info.k == 2 + 1 + 2 and info.num_groups == 2 + 1 + 2
  # per_tensor: 30% of 6 rounds to 2 (the two tied 0.9s); of 4 -> 1; of 4 -> 1.
  mask, info = sel.select_top_k(tree, k_percent=30.0, scope="per_tensor")
  np.testing.assert_array_equal(mask["encoder"]["mlp"]["c_fc"]["kernel"],
                                [[False, True], [False, True], [False, False]])
  assert info.k == 4 and info.num_groups == 3


def test_scoped_selection_respects_eligible_and_validates():
  tree = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float32)}
  mask, info = sel.select_top_k(tree, k_percent=10.0, scope="per_tensor",
                                eligible={"a": True, "b": False})
  assert not mask["b"].any() and info.n == 12 and mask["a"].sum() == 1 and mask["a"][2, 3]
  with pytest.raises(ConfigError, match="Unknown selection scope 'per_col'"):
    sel.select_top_k(tree, k_percent=10.0, scope="per_col")
  with pytest.raises(ConfigError, match="give k_percent, not k_count"):
    sel.select_top_k(tree, k_count=3, scope="per_row")
  for bad in [0, 101, float("nan")]:
    with pytest.raises(ConfigError, match="k_percent"):
      sel.select_top_k(tree, k_percent=bad, scope="per_row")
  with pytest.raises(ConfigError, match="N = 0"):
    sel.select_top_k({"a": None}, k_percent=1.0, scope="per_tensor")
  # A percentage too small for the global k is fine per group: at least one weight each.
  mask, info = sel.select_top_k(tree, k_percent=0.01, scope="per_tensor")
  assert info.k == 2 and mask["a"][2, 3] and mask["b"][0]
