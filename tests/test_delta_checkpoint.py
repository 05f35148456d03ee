"""Delta checkpoints: bit-exact restore, refusal of a wrong base, atomic writes, size at k = 1%."""

import json
import os

import jax
import numpy as np
import pytest

from shpeft_jax import checkpoints, delta_checkpoint
from shpeft_jax.delta_checkpoint import content_hash, load_delta, save_delta
from shpeft_jax.errors import CheckpointError
from shpeft_jax.models.clip_vit import build_model, init_params
from shpeft_jax.utils import flatten_names, unflatten_names


def _bits(a):
  a = np.ascontiguousarray(a)
  return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _base_and_tuned(frac=0.01, seed=0):
  model = build_model("test_tiny", 3)
  base = jax.tree.map(np.array, init_params(model, jax.random.PRNGKey(0)))  # Writable copies.
  rng = np.random.default_rng(seed)
  tuned = {}
  for name, x in flatten_names(base).items():
    y = x.copy()
    if name.startswith("head/"):
      y = y + 0.5  # The head is trained in full.
    elif "ln_1" not in name:  # ln_1 stays frozen: must not be stored at all.
      sel = rng.random(x.shape) < frac
      y[sel] = y[sel] + rng.normal(size=int(sel.sum())).astype(y.dtype)
    tuned[name] = y
  # Bit-level corner cases: a -0.0 over a +0.0 and a NaN must survive.
  w = tuned["encoder/resblocks_0/attn/query/kernel"]
  base_w = flatten_names(base)["encoder/resblocks_0/attn/query/kernel"]
  base_w.reshape(-1)[7] = 0.0
  w.reshape(-1)[7] = -0.0
  w.reshape(-1)[11] = np.nan
  # A leaf the base does not have (an additive module) is stored whole.
  tuned["encoder/resblocks_1/attn/lora_query/a"] = rng.normal(size=(32, 4)).astype(np.float32)
  return base, unflatten_names(tuned)


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
  """(base, tuned, base_dir): orbax saves are slow-ish, so the base is written once per module."""
  base, tuned = _base_and_tuned()
  base_dir = checkpoints.save_params(str(tmp_path_factory.mktemp("ckpt") / "base"), base,
                                     {"model": "test_tiny"})
  return base, tuned, base_dir


def _assert_bit_equal(a_tree, b_tree):
  fa, fb = flatten_names(a_tree), flatten_names(b_tree)
  assert list(fa) == list(fb)
  for name in fa:
    assert fa[name].shape == fb[name].shape and fa[name].dtype == fb[name].dtype, name
    np.testing.assert_array_equal(_bits(fa[name]), _bits(fb[name]), err_msg=name)


def test_round_trip_is_bit_exact(saved_base, tmp_path):
  base, tuned, base_dir = saved_base
  stats = save_delta(str(tmp_path / "delta"), tuned, base_dir, meta={"step": 3})
  restored, meta = load_delta(str(tmp_path / "delta"))
  assert meta == {"step": 3}
  _assert_bit_equal(restored, tuned)

  # What was stored, checked against a brute-force count of differing bit patterns.
  fb, ft = flatten_names(base), flatten_names(tuned)
  expected_changed = sum(
      int(np.count_nonzero(_bits(ft[n]) != _bits(fb[n]))) if n in fb else ft[n].size for n in ft)
  assert stats["changed"] == expected_changed
  index = json.load(open(tmp_path / "delta" / "delta.json"))
  assert not any("ln_1" in n for n in index["leaves"])  # Unchanged leaves are not stored.
  assert index["leaves"]["head/kernel"]["kind"] == "dense"
  assert index["leaves"]["encoder/resblocks_1/attn/lora_query/a"]["kind"] == "dense"
  assert index["leaves"]["encoder/resblocks_0/mlp/c_fc/kernel"]["kind"] == "sparse"
  assert index["base"]["sha256"] == content_hash(base)


def test_refuses_a_different_base(saved_base, tmp_path):
  base, tuned, base_dir = saved_base
  save_delta(str(tmp_path / "delta"), tuned, base_dir, base_params=base)

  other = jax.tree.map(np.copy, base)
  other["encoder"]["ln_post"]["scale"][0] += 1e-3  # One weight off: the hash differs.
  with pytest.raises(CheckpointError, match="content hash"):
    load_delta(str(tmp_path / "delta"), base_params=other)

  wider = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(
      lambda: init_params(build_model("demo_small", 3), jax.random.PRNGKey(0))))
  with pytest.raises(CheckpointError, match="wrong base model"):
    load_delta(str(tmp_path / "delta"), base_params=wider)
  with pytest.raises(CheckpointError, match="fine-tuned from"):
    save_delta(str(tmp_path / "delta2"), tuned, base_dir, base_params=wider)
  with pytest.raises(CheckpointError, match="not at"):
    load_delta(str(tmp_path / "delta"), base_path=str(tmp_path / "nowhere"))
  with pytest.raises(CheckpointError, match="not a delta"):
    load_delta(base_dir)


def test_writes_are_atomic(saved_base, tmp_path, monkeypatch):
  base, tuned, base_dir = saved_base
  save_delta(str(tmp_path / "delta"), tuned, base_dir, base_params=base, meta={"v": 1})
  with pytest.raises(CheckpointError, match="already exists"):
    save_delta(str(tmp_path / "delta"), tuned, base_dir)

  def boom(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(delta_checkpoint.np, "savez", boom)
  with pytest.raises(OSError):
    save_delta(str(tmp_path / "delta"), tuned, base_dir, base_params=base, meta={"v": 2},
               overwrite=True)
  monkeypatch.undo()
  # The old delta is intact and no temporary directory is left behind.
  assert sorted(os.listdir(tmp_path)) == ["delta"]
  restored, meta = load_delta(str(tmp_path / "delta"), base_params=base)
  assert meta == {"v": 1}
  _assert_bit_equal(restored, tuned)


def test_vit_b16_delta_is_under_two_percent_at_k_one_percent(tmp_path):
  """ViT-B/16 shapes, 1% of the encoder changed at random positions, the head trained in full."""
  shapes = flatten_names(jax.eval_shape(
      lambda: init_params(build_model("ViT-B/16", 4), jax.random.PRNGKey(0))))
  rng = np.random.default_rng(0)
  base, tuned = {}, {}
  for name, s in shapes.items():
    base[name] = rng.standard_normal(s.shape, np.float32)
    y = base[name].copy()
    if name.startswith("head/"):
      y += 1.0
    else:
      idx = rng.choice(y.size, size=round(0.01 * y.size), replace=False)
      y.reshape(-1)[idx] += 1.0
    tuned[name] = y
  full_bytes = 4 * sum(x.size for x in base.values())  # Raw float32; a real checkpoint is larger.
  stats = save_delta(str(tmp_path / "d"), unflatten_names(tuned), str(tmp_path / "unused"),
                     base_params=unflatten_names(base))
  ratio = stats["bytes"] / full_bytes
  assert ratio < 0.02, ratio
  # ~6 bytes per changed weight (float32 value + uint16 gap) + the dense head: check the accounting.
  k = stats["changed"]
  assert 6 * k < stats["bytes"] < 6 * k + 4 * 4 * 769 + 200_000
  restored, _ = load_delta(str(tmp_path / "d"), base_params=unflatten_names(base))
  for name, y in tuned.items():
    np.testing.assert_array_equal(flatten_names(restored)[name], y, err_msg=name)
