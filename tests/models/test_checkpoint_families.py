"""The CLIP checkpoints users bring, against the real classes (random weights, no download).

open_clip `ViT-B-16` (exact GELU, the LAION / DataComp architecture) and `ViT-B-16-quickgelu`,
HF `CLIPVisionModel` with hidden_act gelu / quick_gelu, and open_clip's timm trunk configured as
BiomedCLIP's: each saved as users have it (weights + the config file beside them), converted, its
pooled features compared with the library's own forward (max abs <= 1e-4, float32), exported back
encoder-only and loaded with strict=True into the same class: tiny towers through the CLIs and
run again; ViT-B/16 towers (kept few: they dominate the run time) through the Python API,
checking that every tensor comes back bit-exact.
"""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import reference_libs  # noqa: E402  pylint: disable=g-bad-import-order
from torch_fixtures import images as _images  # noqa: E402
from torch_fixtures import nchw as _nchw  # noqa: E402
from torch_fixtures import perturb as _perturb  # noqa: E402

from shpeft_jax import checkpoints  # noqa: E402
from shpeft_jax import export as export_cli  # noqa: E402
from shpeft_jax.models import clip_vit  # noqa: E402
from shpeft_jax.models import convert  # noqa: E402
from shpeft_jax.models import torch_reference as tr  # noqa: E402

TOL = 1e-4
# BiomedCLIP's open_clip_config.json (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224),
# vision part; the text tower (BiomedBERT) is not needed for the vision weights.
BIOMEDCLIP_VISION_CFG = {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                         "timm_pool": "", "timm_proj": "linear", "image_size": 224}


def _torch_sd(sd):
  return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


@pytest.fixture(scope="module")
def features():
  """features(params, meta-like tower, x): one jitted Flax tower per (model, tower) variant."""
  cache = {}

  def run(params, info, x):
    key = (info.model, info.image_size, tuple(sorted(info.tower.items())))
    if key not in cache:
      tower = clip_vit.VisionTransformer(
          clip_vit.get_model_config(info.model, info.image_size, **info.tower))
      cache[key] = jax.jit(lambda p, im: tower.apply({"params": p}, im))
    return np.asarray(cache[key](params["encoder"], x))
  return run


def _save_open_clip(tmp_path, visual, model_cfg):
  """open_clip's hf-hub layout: open_clip_pytorch_model.bin + open_clip_config.json."""
  d = tmp_path / "open_clip"
  d.mkdir()
  torch.save({"visual." + k: v for k, v in visual.state_dict().items()},
             d / "open_clip_pytorch_model.bin")
  (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                       "preprocess_cfg": {}}))
  return d


def _export_encoder(tmp_path, params, info, fmt):
  """convert's meta + the export CLI -> the encoder-only state dict written for `fmt`."""
  ckpt = tmp_path / f"ckpt_{fmt}"
  checkpoints.save_params(str(ckpt), params, {"model": info.model, "image_size": info.image_size,
                                              "num_classes": None, **info.tower})
  out = tmp_path / f"encoder_{fmt}.safetensors"
  assert export_cli.main([str(ckpt), "--format", fmt, "--out", str(out)]) == 0
  from safetensors.torch import load_file
  return load_file(str(out))


def _reload_strictly(module, sd):
  """Loads `sd` with strict=True into `module` after wiping it, and checks every tensor came
  back bit-exact (so the module now computes exactly what it computed before)."""
  original = {k: v.clone() for k, v in module.state_dict().items()}
  with torch.no_grad():
    for p in module.parameters():
      p.zero_()
  module.load_state_dict(sd, strict=True)
  for k, v in module.state_dict().items():
    assert torch.equal(v, original[k]), k


@pytest.mark.parametrize("name, act", [("ViT-B-16", "gelu"), ("ViT-B-16-quickgelu", "quick_gelu")])
def test_open_clip_vit_b16(tmp_path, features, name, act):
  open_clip, _ = reference_libs.require()
  torch.manual_seed(0)
  visual = _perturb(open_clip.create_model(name, pretrained=None).visual, 1)
  src = _save_open_clip(tmp_path, visual, open_clip.get_model_config(name))
  params, info = convert.convert_file(str(src))
  assert (info.model, info.source_format, info.tower["act"], info.tower["ln_eps"]) == (
      "ViT-B/16", "open_clip", act, 1e-5)
  x = _images(1, 224)
  visual.proj = None  # the pooled feature; SH-PEFT's head replaces the CLIP projection
  with torch.no_grad():
    ref = visual(_nchw(x)).numpy()
  err = np.abs(features(params, info, x) - ref).max()
  assert err <= TOL, err
  assert np.abs(ref).max() > 0.1
  # Encoder-only export: every tensor as in the source, loads strictly into the same class.
  sd = convert.flax_to_torch_state_dict(params, "open_clip", tower=info.tower)
  _reload_strictly(visual, _torch_sd(sd))


def test_the_wrong_activation_would_be_far_off(features):
  """Why the activation matters: the GELU tower run as QuickGELU (the old behaviour) is ~1e-2 off."""
  torch.manual_seed(3)
  cfg = clip_vit.get_model_config("demo_small", act="gelu")
  ref_tower = _perturb(tr.TorchVisionTransformer.from_config(cfg), 4)
  sd = {"visual." + k: v for k, v in ref_tower.state_dict().items()}
  x = _images(2, 16, seed=3)
  with torch.no_grad():
    ref = ref_tower.features(_nchw(x)).numpy()
  errs = {}
  for act in ("gelu", "quick_gelu"):
    params, info = convert.torch_state_dict_to_flax(sd, act=act)
    errs[act] = np.abs(features(params, info, x) - ref).max()
  assert errs["gelu"] <= TOL and errs["quick_gelu"] > 100 * TOL, errs


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_hf_clip_vision_model(tmp_path, features, hidden_act):
  torch.manual_seed(5)
  cfg = clip_vit.get_model_config("test_tiny", act=hidden_act)
  hf = _perturb(transformers.CLIPVisionModel(tr.hf_vision_config(cfg)), 6)
  assert hf.config.hidden_act == hidden_act
  hf.save_pretrained(tmp_path / "hf")
  params, info = convert.convert_file(str(tmp_path / "hf"))
  assert (info.source_format, info.tower["act"]) == ("hf", hidden_act)
  x = _images(3, 16, seed=5)
  with torch.no_grad():
    ref = hf(pixel_values=_nchw(x)).pooler_output.numpy()
  err = np.abs(features(params, info, x) - ref).max()
  assert err <= TOL, err
  sd = _export_encoder(tmp_path, params, info, "hf")
  fresh = transformers.CLIPVisionModel(transformers.CLIPVisionConfig.from_pretrained(tmp_path / "hf"))
  fresh.load_state_dict(sd, strict=True)
  with torch.no_grad():
    np.testing.assert_array_equal(fresh.eval()(pixel_values=_nchw(x)).pooler_output.numpy(), ref)


def test_biomedclip_timm_trunk_vit_b16(tmp_path, features):
  open_clip, _ = reference_libs.require()
  from open_clip.timm_model import TimmModel
  torch.manual_seed(7)
  # What open_clip builds from BiomedCLIP's config: a timm vit_base_patch16_224 trunk (class-token
  # pooling after the final norm) and a bias-free linear `head.proj` to 512.
  visual = _perturb(TimmModel("vit_base_patch16_224", embed_dim=512, pool="", proj="linear",
                              proj_bias=False), 8)
  trunk = visual.trunk
  assert trunk.blocks[0].mlp.act.approximate == "none" and trunk.norm.eps == 1e-6
  assert trunk.patch_embed.proj.bias is not None and isinstance(trunk.norm_pre, torch.nn.Identity)
  src = _save_open_clip(tmp_path, visual, {"embed_dim": 512, "vision_cfg": BIOMEDCLIP_VISION_CFG})
  params, info = convert.convert_file(str(src))
  assert info.tower == {**clip_vit.TOWER_DEFAULTS, "act": "gelu", "ln_eps": 1e-6, "ln_pre": False, "patch_bias": True}
  assert info.ignored_keys == ("visual.head.proj.weight",)
  x = _images(1, 224, seed=7)
  with torch.no_grad():
    ref = trunk(_nchw(x)).numpy()  # the pooled feature that head.proj maps to 512
  err = np.abs(features(params, info, x) - ref).max()
  assert err <= TOL, err
  sd = convert.flax_to_torch_state_dict(params, "timm", tower=info.tower)
  _reload_strictly(trunk, _torch_sd(sd))  # BiomedCLIP's model.visual.trunk


def test_open_clip_vit_h14_at_reduced_depth_is_no_preset_and_converts_exactly(tmp_path, features):
  """LAION's ViT-H/14 (width 1280, head width 80: 16 heads, not width / 64) at 2 of its 32 layers:
  no preset has that shape; the heads come from open_clip_config.json, the tower is named by its
  shape, and its pooled features match open_clip's at 224 px and, with resampled positions, 168."""
  open_clip, _ = reference_libs.require()
  from open_clip.model import _build_vision_tower  # pylint: disable=g-import-not-at-top
  torch.manual_seed(3)
  model_cfg = open_clip.get_model_config("ViT-H-14")
  model_cfg["vision_cfg"] = dict(model_cfg["vision_cfg"], layers=2)
  visual = _perturb(_build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"]), 3)
  src = _save_open_clip(tmp_path, visual, model_cfg)
  params, info = convert.convert_file(str(src))
  assert info.model == "vit:p14-w1280-l2-h16-m5120" and info.tower["act"] == "gelu"
  x = _images(1, 224, seed=3)
  visual.proj = None
  with torch.no_grad():
    ref = visual(_nchw(x)).numpy()
  err = np.abs(features(params, info, x) - ref).max()
  assert err <= TOL and np.abs(ref).max() > 0.1, err
  sd = convert.flax_to_torch_state_dict(params, "open_clip", tower=info.tower)
  _reload_strictly(visual, _torch_sd(sd))
  # Another image size: the position grid resampled as open_clip's resize_pos_embed does.
  from open_clip.model import resize_pos_embed  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  visual168 = _build_vision_tower(model_cfg["embed_dim"], dict(model_cfg["vision_cfg"],
                                                               image_size=168))
  sd168 = {"visual." + k: v for k, v in visual.state_dict().items()}
  resize_pos_embed(sd168, types.SimpleNamespace(visual=visual168), "bicubic", antialias=True)
  visual168.proj = None  # as `visual` now: the pooled feature
  visual168.load_state_dict({k[len("visual."):]: v for k, v in sd168.items()}, strict=True)
  small, small_info = convert.convert_file(str(src), image_size=168)
  assert small_info.image_size == 168 and small_info.model == info.model
  x = _images(1, 168, seed=4)
  with torch.no_grad():
    ref = visual168(_nchw(x)).numpy()
  err = np.abs(features(small, small_info, x) - ref).max()
  assert err <= TOL, err


def test_timm_vit_small_needs_heads_and_converts_with_them(tmp_path, features):
  """timm's vit_small_patch16_224 (width 384, 6 heads) at 3 of its 12 layers, as a bare timm state
  dict: the weights do not say the heads, so --heads is asked for; with it, the features match."""
  reference_libs.require()
  import timm  # pylint: disable=g-import-not-at-top
  torch.manual_seed(5)
  trunk = _perturb(timm.create_model("vit_small_patch16_224", pretrained=False, depth=3,
                                     num_classes=0), 5)
  path = tmp_path / "vit_small.safetensors"
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(path))
  with pytest.raises(convert.CheckpointError, match="pass --heads N"):
    convert.convert_file(str(path), act="gelu", ln_eps=1e-6)
  params, info = convert.convert_file(str(path), act="gelu", ln_eps=1e-6, heads=6,
                                      pixel_stats="half")
  assert info.model == "vit:p16-w384-l3-h6-m1536"
  assert (info.tower["pixel_mean"], info.tower["pixel_std"]) == (
      tuple(trunk.pretrained_cfg["mean"]), tuple(trunk.pretrained_cfg["std"]))
  x = _images(1, 224, seed=5)
  with torch.no_grad():
    ref = trunk(_nchw(x)).numpy()
  err = np.abs(features(params, info, x) - ref).max()
  assert err <= TOL and np.abs(ref).max() > 0.1, err
  _reload_strictly(trunk, _torch_sd(convert.flax_to_torch_state_dict(params, "timm",
                                                                      tower=info.tower)))


@pytest.mark.parametrize("layout, tower", [
    ("open_clip", {"act": "gelu"}),
    ("hf", {"act": "gelu", "ln_eps": 1e-6}),
    ("timm", {**clip_vit.TOWER_DEFAULTS, "act": "gelu", "ln_eps": 1e-6, "ln_pre": False, "patch_bias": True}),
    ("timm", {"act": "quick_gelu"}),
])
def test_exported_classifier_logits_in_torch(tmp_path, layout, tower):
  if layout == "timm":
    reference_libs.require()
  model = clip_vit.build_model("test_tiny", 3, tower=tower)
  params = clip_vit.init_params(model, jax.random.PRNGKey(0))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_unflatten(
      treedef, [np.asarray(v) + rng.normal(0, 0.2, np.shape(v)).astype(np.float32) for v in leaves])
  ckpt = tmp_path / "model"
  checkpoints.save_params(str(ckpt), params, {"model": "test_tiny", "image_size": 16,
                                              "num_classes": 3, **tower})
  out = tmp_path / "clf.safetensors"
  assert export_cli.main([str(ckpt), "--format", layout, "--out", str(out)]) == 0
  net = tr.load_exported(str(out))  # strict=True
  x = _images(4, 16, seed=9)
  with torch.no_grad():
    ref = net(_nchw(x)).numpy()
  err = np.abs(np.asarray(model.apply({"params": params}, x)) - ref).max()
  assert err <= TOL, err
  # ... and back: the metadata carries the tower, so no --act is needed.
  back, info = convert.convert_file(str(out))
  assert info.tower == clip_vit.get_model_config("test_tiny", **tower).tower()
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_siglip_vision_model_is_refused_by_name(tmp_path):
  cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=4)
  transformers.SiglipVisionModel(cfg).save_pretrained(tmp_path / "siglip")
  with pytest.raises(convert.CheckpointError, match="SigLIP"):
    convert.convert_file(str(tmp_path / "siglip"))
  from safetensors.torch import load_file
  sd = load_file(str(tmp_path / "siglip" / "model.safetensors"))  # without its config.json
  with pytest.raises(convert.CheckpointError, match="This is a SigLIP vision tower"):
    convert.torch_state_dict_to_flax(sd, act="gelu")
