"""Training from a DINOv2-like tower end to end: a random transformers `Dinov2WithRegistersModel`
(LayerScale, 2 register tokens, exact GELU, eps 1e-6, patch bias, no ln_pre), saved as a model
directory and converted by the CLI, then trained with SH-PEFT and with LoRA.

SH-PEFT scores every parameter, the LayerScale gammas and register tokens included (they are
parameters like LayerNorm scales); the trained model exported as `--format hf_dinov2` and loaded
into transformers' Dinov2WithRegistersModel (behind the paper's L2-norm + linear head) gives the
trainer's own test-split probabilities (<= 1e-5), and so do predict (which builds the model of
the checkpoint through `of_checkpoint`) and the run's peft SHiRA adapter applied by
`peft.PeftModel` on the base exported as a transformers model directory.
"""

import copy
import os

import numpy as np
import pytest

from train_fixtures import make_tiny_config
from test_predict import _image_folder, _trainer_eval
from shpeft_jax import checkpoints, params_io, predict
from shpeft_jax.evaluation import metrics
from shpeft_jax.models import clip_vit
from shpeft_jax.utils import flatten_names

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DINO_TOWER = {"act": "gelu", "ln_eps": 1e-6, "ln_pre": False, "patch_bias": True,
              "layer_scale": True, "registers": 2, "pool": "cls", "final_norm": True,
              "fc_norm": False, "qkv_bias": True, "class_pos": True,
              "pixel_mean": (0.485, 0.456, 0.406), "pixel_std": (0.229, 0.224, 0.225)}


def _dinov2_init(tmp):
  from shpeft_jax import convert as convert_cli  # pylint: disable=g-import-not-at-top
  torch.manual_seed(11)
  hf = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=16,
      patch_size=4, num_register_tokens=2))
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.05 * torch.randn_like(p))
  hf.save_pretrained(os.path.join(tmp, "hf"))
  transformers.BitImageProcessor(  # DINOv2's preprocessor_config.json: ImageNet statistics
      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(
          os.path.join(tmp, "hf"))
  out = os.path.join(tmp, "init")
  assert convert_cli.main([os.path.join(tmp, "hf"), "--out", out]) == 0
  return out


@pytest.fixture(scope="module", params=["shpeft", "lora"])
def dino_run(request, tmp_path_factory):
  from shpeft_jax import train  # pylint: disable=g-import-not-at-top
  tmp = str(tmp_path_factory.mktemp(request.param))
  init = _dinov2_init(tmp)
  meta = checkpoints.load_meta(init)
  assert meta["model"] == "test_tiny" and clip_vit.tower_from_meta(meta) == DINO_TOWER
  root = _image_folder(os.path.join(tmp, "images"))
  config = make_tiny_config(request.param, num_steps=3, batch_size=8)
  config.data.name = "image_folder"
  config.data.manual_dir = root
  config.data.data_dir = os.path.join(tmp, "tfds")
  config.train.eval_batch_size = 8
  config.peft.score_batches = 2
  config.model.init_checkpoint = init
  workdir = os.path.join(tmp, "run")
  train.train_and_evaluate(config, workdir)
  # export/model holds LoRA folded into the plain weights (the method merges): the trainer's
  # evaluator runs it as the plain tower.
  plain = copy.deepcopy(config)
  plain.peft.method = "full"
  by_name, _, _ = _trainer_eval(plain, workdir)
  return request.param, root, workdir, by_name


def test_shpeft_scores_and_can_select_layer_scale_and_registers(dino_run):
  method, _, workdir, _ = dino_run
  if method != "shpeft":
    pytest.skip("scores belong to the SH-PEFT run")
  scores = flatten_names(params_io.restore_tree(os.path.join(workdir, "scores")))
  for name in ("encoder/register_tokens", "encoder/resblocks_0/ls_1", "encoder/resblocks_1/ls_2"):
    hit = [k for k in scores if k.endswith(name)]
    assert hit, (name, sorted(scores)[:8])
    assert np.all(np.isfinite(scores[hit[0]])) and np.abs(scores[hit[0]]).max() > 0, name
  # The selection ranks them with the rest: each is a masked (eligible) tensor of the mask file.
  from shpeft_jax.peft import mask_io  # pylint: disable=g-import-not-at-top
  mask = flatten_names(mask_io.load_mask(os.path.join(workdir, "mask.npz")))
  for name in ("encoder/register_tokens", "encoder/resblocks_0/ls_1"):
    assert mask[name] is not None and mask[name].shape == scores[name].shape, name


def test_export_hf_dinov2_gives_the_trainers_probabilities(dino_run, tmp_path):
  from shpeft_jax import export  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import torch_reference as tr  # pylint: disable=g-import-not-at-top
  _, root, workdir, by_name = dino_run
  out = str(tmp_path / "m.safetensors")
  assert export.main([os.path.join(workdir, "export", "model"), "--format", "hf_dinov2",
                      "--out", out]) == 0
  module = tr.load_exported(out).eval()  # strict=True
  assert isinstance(module.dinov2, transformers.Dinov2WithRegistersModel)
  files = [f for f in sorted(by_name) if f.endswith((".png", ".jpg", ".bmp"))][:6]
  # The trainer's uint8 pixels, normalised as the exported / HF models take them (the tower's
  # ImageNet statistics, from its preprocessor_config.json).
  x = np.asarray(clip_vit.normalise_pixels(np.stack([input_pipeline.eval_transform(
      open(os.path.join(root, f), "rb").read(), 16).numpy() for f in files]),
      DINO_TOWER["pixel_mean"], DINO_TOWER["pixel_std"], np.float32))
  with torch.no_grad():
    got = module(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  want = np.stack([by_name[f] for f in files])
  np.testing.assert_allclose(metrics.softmax(got.astype(np.float64)),
                             metrics.softmax(want.astype(np.float64)), atol=1e-5, rtol=0)


def test_predict_gives_the_trainers_probabilities(dino_run):
  _, root, workdir, by_name = dino_run
  files, _ = predict.list_inputs([os.path.join(root, "test")])
  loaded = predict.load_model(workdir)
  done, probs, unreadable = predict.predict_files(loaded, files, batch_size=8, progress=False)
  assert not unreadable and len(done) == len(by_name)
  for f, p in zip(done, probs):
    rel = os.path.relpath(f, root).replace(os.sep, "/")
    np.testing.assert_allclose(p, metrics.softmax(by_name[rel].astype(np.float64)), atol=1e-6,
                               rtol=0, err_msg=rel)


def test_peft_adapter_on_the_hf_dinov2_base_gives_the_trainers_probabilities(dino_run, tmp_path):
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  from shpeft_jax import export  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  peft = pytest.importorskip("peft")
  _, root, workdir, by_name = dino_run
  init = os.path.join(os.path.dirname(workdir), "init")
  base_dir, peft_dir = str(tmp_path / "base"), str(tmp_path / "peft")
  assert export.main([init, "--format", "hf_dinov2", "--out", base_dir]) == 0
  assert export.main([os.path.join(workdir, "export", "model"), "--format", "peft", "--base",
                      init, "--out", peft_dir]) == 0
  base, info = transformers.Dinov2WithRegistersModel.from_pretrained(base_dir,
                                                                     output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  adapted = peft.PeftModel.from_pretrained(base, peft_dir).eval()
  files = [f for f in sorted(by_name) if f.endswith((".png", ".jpg", ".bmp"))][:6]
  # The trainer's uint8 pixels, normalised as the exported / HF models take them (the tower's
  # ImageNet statistics, from its preprocessor_config.json).
  x = np.asarray(clip_vit.normalise_pixels(np.stack([input_pipeline.eval_transform(
      open(os.path.join(root, f), "rb").read(), 16).numpy() for f in files]),
      DINO_TOWER["pixel_mean"], DINO_TOWER["pixel_std"], np.float32))
  head = load_file(os.path.join(peft_dir, "head.safetensors"))
  with torch.no_grad():
    feats = adapted(pixel_values=torch.from_numpy(np.ascontiguousarray(
        x.transpose(0, 3, 1, 2)))).last_hidden_state[:, 0]
    got = (F.normalize(feats, dim=-1) @ head["head.weight"].T + head["head.bias"]).numpy()
  want = np.stack([by_name[f] for f in files])
  np.testing.assert_allclose(metrics.softmax(got.astype(np.float64)),
                             metrics.softmax(want.astype(np.float64)), atol=1e-5, rtol=0)
