"""Mask file round trip and mismatch errors, mask_stats.json, plots, atomic writes."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from shpeft_jax.errors import CheckpointError
from shpeft_jax.peft import mask_io
from shpeft_jax.peft import selection as sel
from shpeft_jax.utils import flatten_names, unflatten_names


def make(rng):
  shapes = {"encoder/conv1/kernel": (4, 4, 3, 8), "encoder/class_embedding": (8,),
            "encoder/resblocks_0/attn/query/kernel": (8, 2, 4),
            "encoder/resblocks_0/mlp/c_fc/bias": (13,), "encoder/ln_post/scale": (8,),
            "head/kernel": (8, 3), "head/bias": (3,)}
  params = unflatten_names({n: jnp.asarray(rng.normal(size=s), jnp.float32)
                            for n, s in shapes.items()})
  scores = unflatten_names({n: (None if n.startswith("head") else rng.random(s, dtype=np.float32))
                            for n, s in shapes.items()})
  return params, scores


def test_mask_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  params, scores = make(rng)
  mask, info = sel.select_top_k(scores, k_percent=10)
  path = str(tmp_path / "sub" / "mask.npz")
  mask_io.save_mask(path, mask)
  assert os.listdir(tmp_path / "sub") == ["mask.npz"]  # No temporary file left behind.
  loaded = mask_io.load_mask(path, params)
  assert loaded["head"] == {"kernel": None, "bias": None}
  want, got = flatten_names(mask), flatten_names(loaded)  # None leaves drop out of both.
  assert set(want) == set(got) and len(got) == 5
  for name in want:
    assert got[name].dtype == bool and got[name].shape == want[name].shape
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  free = mask_io.load_mask(path)  # Without params: a nested dict from the names.
  assert sum(int(np.sum(v)) for v in [free["encoder"]["conv1"]["kernel"],
                                     free["encoder"]["class_embedding"],
                                     free["encoder"]["resblocks_0"]["attn"]["query"]["kernel"],
                                     free["encoder"]["resblocks_0"]["mlp"]["c_fc"]["bias"],
                                     free["encoder"]["ln_post"]["scale"]]) == info.k


def test_bit_packing_is_compact(tmp_path):
  rng = np.random.default_rng(1)
  mask = {"w": rng.random((1000, 1000)) < 0.01}
  path = str(tmp_path / "m.npz")
  mask_io.save_mask(path, mask)
  assert os.path.getsize(path) < 1_000_000 / 8 + 4096  # At most 1 bit per weight + header.
  np.testing.assert_array_equal(mask_io.load_mask(path)["w"], mask["w"])


def test_mismatches_raise(tmp_path):
  rng = np.random.default_rng(2)
  params, scores = make(rng)
  mask, _ = sel.select_top_k(scores, k_count=5)
  path = str(tmp_path / "mask.npz")
  mask_io.save_mask(path, mask)
  wrong_shape = dict(params, encoder=dict(params["encoder"], class_embedding=jnp.zeros(9)))
  with pytest.raises(CheckpointError, match=r"shape mismatch.*class_embedding.*\[8\].*\[9\]"):
    mask_io.load_mask(path, wrong_shape)
  missing = dict(params, encoder=dict(params["encoder"], extra_param=jnp.zeros(3)))
  with pytest.raises(CheckpointError, match="missing from the file.*extra_param"):
    mask_io.load_mask(path, missing)
  fewer = dict(params, encoder={k: v for k, v in params["encoder"].items() if k != "ln_post"})
  with pytest.raises(CheckpointError, match="not in the model.*ln_post/scale"):
    mask_io.load_mask(path, fewer)
  with pytest.raises(CheckpointError, match="does not exist"):
    mask_io.load_mask(str(tmp_path / "nope.npz"), params)
  (tmp_path / "bad.npz").write_bytes(b"not a zip file")
  with pytest.raises(CheckpointError, match="corrupt"):
    mask_io.load_mask(str(tmp_path / "bad.npz"), params)


def test_stats_json_and_plot(tmp_path):
  rng = np.random.default_rng(3)
  _, scores = make(rng)
  mask, info = sel.select_top_k(scores, k_percent=5)
  path = str(tmp_path / "mask_stats.json")
  written = mask_io.save_mask_stats(path, mask, info, extra={"estimator": "l2", "lam": 1.0})
  loaded = mask_io.load_mask_stats(path)
  assert loaded == json.loads(json.dumps(written))
  assert (loaded["k"], loaded["n"], loaded["selected"]) == (info.k, info.n, info.k)
  assert loaded["threshold"] == pytest.approx(info.threshold)
  assert loaded["total"]["selected"] == info.k and loaded["total"]["size"] == info.n
  assert sum(t["selected"] for t in loaded["tensors"].values()) == info.k
  assert sum(g["size"] for g in loaded["per_layer"].values()) == info.n
  assert sum(g["selected"] for g in loaded["per_type"].values()) == info.k
  assert loaded["unmasked"] == ["head/bias", "head/kernel"]
  assert loaded["config"] == {"estimator": "l2", "lam": 1.0}
  png = str(tmp_path / "mask_fraction.png")
  mask_io.plot_mask_stats(loaded, png)
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(png) > 5000
  assert sorted(os.listdir(tmp_path)) == ["mask_fraction.png", "mask_stats.json"]
  (tmp_path / "broken.json").write_text("{")
  with pytest.raises(CheckpointError, match="JSON"):
    mask_io.load_mask_stats(str(tmp_path / "broken.json"))
