"""`--format peft`: a SHiRA adapter that Hugging Face peft loads onto transformers' CLIPVisionModel.

The base is a random-weight `transformers.CLIPVisionModel` converted with the project's converter;
the reference is the Flax classifier with the fine-tuned params.
"""

import copy
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest


def _hide_broken_torchvision():
  """transformers imports torchvision when it is installed; a torchvision built for another torch
  fails at import (operator torchvision::nms does not exist) and takes transformers down with it.
  These tests need no torchvision, so a broken one is hidden (find_spec then returns None)."""
  if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
    return
  probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
  if probe.returncode:
    sys.modules["torchvision"] = None


_hide_broken_torchvision()
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from shpeft_jax import adapter  # noqa: E402
from shpeft_jax import export as export_cli  # noqa: E402
from shpeft_jax.errors import CheckpointError  # noqa: E402
from shpeft_jax.models import clip_vit, convert  # noqa: E402
from shpeft_jax.models import torch_reference as tr  # noqa: E402
from shpeft_jax.utils import flatten_names, unflatten_names  # noqa: E402

MODEL = "test_tiny"
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def hf_base():
  """(random transformers CLIPVisionModel, its Flax conversion), built once per module."""
  torch.manual_seed(0)
  hf = transformers.CLIPVisionModel(tr.hf_vision_config(clip_vit.get_model_config(MODEL))).eval()
  with torch.no_grad():  # LayerNorms start at (1, 0): make them non-trivial.
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  params, _ = convert.torch_state_dict_to_flax(hf.state_dict(), fmt="hf", model=MODEL,
                                             act=hf.config.hidden_act)
  return hf, params


def _tuned(base, *, dense_linear=None, skip=()):
  """1-3% of every encoder tensor changed (LayerNorms, embeddings, biases too), a new head."""
  rng = np.random.default_rng(0)
  head = {"kernel": 0.2 * rng.standard_normal((32, NUM_CLASSES), np.float32),
          "bias": 0.1 * rng.standard_normal(NUM_CLASSES, np.float32)}
  out = {}
  for name, x in flatten_names(base).items():
    y = np.array(x, copy=True)
    if not any(s in name for s in skip):
      frac = 1.0 if dense_linear and dense_linear in name else 0.03
      sel = rng.random(y.shape) < frac
      y[sel] += 0.05 * rng.normal(size=int(sel.sum())).astype(np.float32)
    out[name] = y
  out.update({f"head/{k}": v for k, v in head.items()})
  return unflatten_names(out)


_apply = jax.jit(lambda params, images: clip_vit.build_model(MODEL, NUM_CLASSES).apply(
    {"params": params}, images))  # One compile for every call (eager apply compiles op by op).


def _flax_logits(params, images):
  return np.asarray(_apply(params, images))


def _peft_logits(hf_base, out_dir, images):
  model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), str(out_dir)).eval()
  head = load_file(str(out_dir / adapter.PEFT_HEAD))
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    feats = model(pixel_values=x).pooler_output
    logits = F.normalize(feats, dim=-1) @ head["head.weight"].T + head["head.bias"]
  return logits.numpy(), model


def test_peft_loaded_clip_vision_model_matches_flax(tmp_path, hf_base):
  hf, base = hf_base
  tuned = _tuned(base)
  tuned["encoder"]["class_embedding"][0] += 0.1  # Bare parameters: written into the base.
  tuned["encoder"]["resblocks_0"]["attn"]["value"]["bias"][0, 0] += 0.1
  stats = adapter.write_peft(str(tmp_path / "peft"), tuned, base, base_name="random-hf",
                             meta={"model": MODEL, "num_classes": NUM_CLASSES})
  info = json.load(open(tmp_path / "peft" / adapter.PEFT_META))
  assert {"embeddings.class_embedding", "encoder.layers.0.self_attn.v_proj.bias"} <= set(
      info["written_into_base"])
  cfg = json.load(open(tmp_path / "peft" / adapter.PEFT_CONFIG))
  assert cfg["peft_type"] == "SHIRA" and cfg["r"] == stats["r"]
  assert len(cfg["target_modules"]) == 12  # Every linear layer (2 blocks x 6).
  assert {"embeddings.patch_embedding", "embeddings.position_embedding", "pre_layrnorm",
          "encoder.layers.1.layer_norm2"} <= set(cfg["modules_to_save"])

  images = np.random.default_rng(1).normal(size=(4, 16, 16, 3)).astype(np.float32)
  want = _flax_logits(tuned, images)
  got, model = _peft_logits(hf, tmp_path / "peft", images)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(got - _flax_logits({"encoder": base["encoder"], "head": tuned["head"]},
                                   images)).max() > 1e-3  # The adapter is not a no-op.

  # Every tuned weight is reproduced bit for bit after merging (no element lacked an exact delta).
  assert stats["inexact"] == 0
  merged = model.merge_and_unload().state_dict()
  expected = convert.flax_to_torch_state_dict(tuned, "hf")
  for key, value in merged.items():
    if key == "embeddings.position_ids":
      continue
    want_t = expected["vision_model." + key]
    np.testing.assert_array_equal(value.numpy().view(np.uint32), want_t.view(np.uint32),
                                  err_msg=key)


def test_dense_layer_goes_to_modules_to_save_and_nothing_is_dropped(tmp_path, hf_base):
  hf, base = hf_base
  # One linear layer trained in full (more than SHiRA's r*(m+n) can hold), nothing else but biases.
  tuned = _tuned(base, dense_linear="resblocks_1/mlp/c_fc/kernel",
                 skip=("ln_", "conv1", "embedding", "attn", "resblocks_0", "c_proj/kernel"))
  stats = adapter.write_peft(str(tmp_path / "peft"), tuned, base, base_name="random-hf")
  cfg = json.load(open(tmp_path / "peft" / adapter.PEFT_CONFIG))
  assert cfg["modules_to_save"] == ["encoder.layers.1.mlp.fc1"]
  assert stats["into_base"] >= 1  # c_proj's bias changed with its weight frozen.
  images = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
  got, _ = _peft_logits(hf, tmp_path / "peft", images)
  np.testing.assert_allclose(got, _flax_logits(tuned, images), atol=1e-5, rtol=0)


def test_export_cli_peft_from_adapter_and_refusals(tmp_path, capsys, hf_base):
  from shpeft_jax import checkpoints
  hf, base = hf_base
  tuned = _tuned(base)
  base_dir = checkpoints.save_params(str(tmp_path / "base"), base,
                                     {"model": MODEL, "image_size": 16, "num_classes": None})
  meta = {"model": MODEL, "image_size": 16, "num_classes": NUM_CLASSES}
  adapter.write_adapter(str(tmp_path / "adapter"), tuned, base, base_name=base_dir,
                        method="shpeft", meta=meta)
  rc = export_cli.main([str(tmp_path / "adapter"), "--base", base_dir, "--format", "peft",
                        "--out", str(tmp_path / "peft")])
  assert rc == 0, capsys.readouterr().err
  images = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
  got, _ = _peft_logits(hf, tmp_path / "peft", images)
  np.testing.assert_allclose(got, _flax_logits(tuned, images), atol=1e-5, rtol=0)

  # Unmerged additive parameters have no peft representation: refused, not dropped.
  lora = _tuned(base)
  lora["encoder"]["resblocks_0"]["attn"]["lora_query"] = {"a": np.ones((32, 2), np.float32)}
  with pytest.raises(CheckpointError, match="additive PEFT"):
    adapter.write_peft(str(tmp_path / "bad"), lora, base, base_name="x")
  # --format peft needs a base to diff against.
  rc = export_cli.main([str(tmp_path / "adapter"), "--format", "peft", "--out", str(tmp_path / "p2")])
  assert rc == 2 and "--base" in capsys.readouterr().err
