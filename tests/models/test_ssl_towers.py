"""The self-supervised ViT towers medical imaging uses, against the real classes (random weights,
reduced depth, no download): timm `vit_small_patch16_224`, `vit_base_patch14_dinov2` (DINOv2),
`vit_base_patch14_reg4_dinov2` (registers), `vit_large_patch16_224` with `init_values` (UNI), an
MAE-style average-pool trunk (fc_norm), DINOv2 giant's SwiGLU MLP; transformers `Dinov2Model`
(RAD-DINO), `Dinov2WithRegistersModel` and `ViTModel` (Phikon / iBOT). Each is saved as users
have it (weights + the config beside them), converted, and its pooled feature compared with the
library's own forward (max abs <= 1e-4, float32) at its size and at another one (the position grid
resampled as that library does), then exported back to its layout and loaded with strict=True
into the same module, every tensor bit-exact.
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
from shpeft_jax.utils import flatten_names  # noqa: E402

TOL = 1e-4


def _flax_features(params, info, x):
  tower = clip_vit.VisionTransformer(clip_vit.get_model_config(info.model, info.image_size,
                                                               **info.tower))
  return np.asarray(jax.jit(lambda p, im: tower.apply({"params": p}, im))(params["encoder"], x))


def _torch_sd(sd):
  return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


def _reload_strictly(module, sd):
  original = {k: v.clone() for k, v in module.state_dict().items()}
  with torch.no_grad():
    for p in module.parameters():
      p.zero_()
  module.load_state_dict(sd, strict=True)
  for k, v in module.state_dict().items():
    assert torch.equal(v, original[k]), k


def _assert_close(params, info, x, ref):
  err = np.abs(_flax_features(params, info, x) - ref).max()
  assert err <= TOL and np.abs(ref).max() > 0.1, err
  return err


# ------------------------------------------------------------------------------------------------
# timm


def _save_timm(tmp_path, model, config):
  """timm's hub layout: model.safetensors + config.json (architecture, model_args, the
  pretrained_cfg with the model's own pixel mean / std)."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  d = tmp_path / "timm"
  d.mkdir()
  config = {**config, "pretrained_cfg": {"mean": list(model.pretrained_cfg["mean"]),
                                         "std": list(model.pretrained_cfg["std"])}}
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
  (d / "config.json").write_text(json.dumps(config))
  return d


def _timm_at(name, kwargs, model, size):
  """The same timm model at another image size, its positions resampled as timm's own
  checkpoint_filter_fn does when loading a checkpoint at a new size."""
  import timm  # pylint: disable=g-import-not-at-top
  from timm.layers import resample_abs_pos_embed  # pylint: disable=g-import-not-at-top
  other = timm.create_model(name, pretrained=False, num_classes=0, **dict(kwargs, img_size=size))
  sd = dict(model.state_dict())
  grid = size // model.patch_embed.patch_size[0]
  sd["pos_embed"] = resample_abs_pos_embed(
      sd["pos_embed"], (grid, grid), num_prefix_tokens=0 if model.no_embed_class else 1)
  other.load_state_dict(sd, strict=True)
  return other.eval()


TIMM_CASES = {
    # name: (timm kwargs, config.json beyond the architecture, expected tower fields, other size)
    "dinov2": ("vit_base_patch14_dinov2", dict(depth=2, img_size=224), {},
               dict(layer_scale=True, registers=0, class_pos=True, pool="cls", ln_eps=1e-6), 168),
    "dinov2_reg4": ("vit_base_patch14_reg4_dinov2", dict(depth=2, img_size=224), {},
                    dict(layer_scale=True, registers=4, class_pos=False, pool="cls"), 252),
    "uni_large_init_values": ("vit_large_patch16_224", dict(depth=2, init_values=1e-5),
                              {"model_args": {"init_values": 1e-5, "num_classes": 0}},
                              dict(layer_scale=True, registers=0, pool="cls"), 256),
    "mae_avg_pool": ("vit_base_patch16_224", dict(depth=2, global_pool="avg"),
                     {"global_pool": "avg"},
                     dict(pool="mean", fc_norm=True, final_norm=False, layer_scale=False), 160),
    "dinov2_giant_swiglu": ("vit_giant_patch14_dinov2",
                            dict(depth=1, img_size=112, embed_dim=384, num_heads=6),
                            {"model_args": {"embed_dim": 384, "num_heads": 6}},
                            dict(act="swiglu", layer_scale=True), 140),
}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_towers(tmp_path, case):
  reference_libs.require()
  import timm  # pylint: disable=g-import-not-at-top
  name, kwargs, config, expect, other_size = TIMM_CASES[case]
  torch.manual_seed(1)
  model = _perturb(timm.create_model(name, pretrained=False, num_classes=0, **kwargs), 2)
  src = _save_timm(tmp_path, model, {"architecture": name, "num_classes": 0, **config})
  params, info = convert.convert_file(str(src))
  assert (info.tower["pixel_mean"], info.tower["pixel_std"]) == (  # timm's, from pretrained_cfg
      tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"]))
  assert {k: info.tower[k] for k in expect} == expect, info.tower
  size = model.patch_embed.img_size[0]
  x = _images(2, size, seed=3)
  with torch.no_grad():
    _assert_close(params, info, x, model(_nchw(x)).numpy())
  _reload_strictly(model, _torch_sd(convert.flax_to_torch_state_dict(params, "timm",
                                                                      tower=info.tower)))
  small, small_info = convert.convert_file(str(src), image_size=other_size)
  x = _images(1, other_size, seed=4)
  with torch.no_grad():
    _assert_close(small, small_info, x, _timm_at(name, kwargs, model, other_size)(_nchw(x)).numpy())


def test_timm_vit_small_with_its_config_needs_no_heads(tmp_path):
  """timm's config.json names the architecture: the heads of vit_small (6) follow from it."""
  reference_libs.require()
  import timm  # pylint: disable=g-import-not-at-top
  torch.manual_seed(2)
  model = _perturb(timm.create_model("vit_small_patch16_224", pretrained=False, depth=2,
                                     num_classes=0), 3)
  src = _save_timm(tmp_path, model, {"architecture": "vit_small_patch16_224", "num_classes": 0})
  params, info = convert.convert_file(str(src))
  assert info.model == "vit:p16-w384-l2-h6-m1536" and info.tower["pool"] == "cls"
  x = _images(2, 224, seed=5)
  with torch.no_grad():
    _assert_close(params, info, x, model(_nchw(x)).numpy())


# ------------------------------------------------------------------------------------------------
# transformers


HF_CASES = {
    # RAD-DINO is a Dinov2Model (ViT-B/14); Phikon a ViTModel (ViT-B/16); reduced width here.
    "dinov2": ("hf_dinov2", dict(hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                                 image_size=224, patch_size=14), 0, "gelu", 168),
    "dinov2_registers": ("hf_dinov2", dict(hidden_size=384, num_hidden_layers=2,
                                           num_attention_heads=6, image_size=224, patch_size=14),
                         4, "gelu", 196),
    "dinov2_swiglu": ("hf_dinov2", dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                                        image_size=112, patch_size=14, use_swiglu_ffn=True),
                      0, "swiglu", 140),
    "vit": ("hf_vit", dict(hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                           intermediate_size=1536, image_size=224, patch_size=16), 0, "gelu", 160),
}


def _hf_model(layout, kwargs, registers):
  if layout == "hf_vit":
    return transformers.ViTModel(transformers.ViTConfig(**kwargs), add_pooling_layer=True)
  if registers:
    return transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        **kwargs, num_register_tokens=registers))
  return transformers.Dinov2Model(transformers.Dinov2Config(**kwargs))


def info_heads(info):
  return clip_vit.get_model_config(info.model).heads


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _save_processor(directory, stats):
  """preprocessor_config.json as the hub's DINOv2 / Phikon checkpoints ship it (written by
  transformers' own image processor)."""
  transformers.BitImageProcessor(image_mean=list(stats[0]), image_std=list(stats[1])
                                 ).save_pretrained(directory)


def _reload_as_checkpoint(tmp_path, model, sd, layout):
  """The export as a checkpoint file beside the model's config.json: from_pretrained finds every
  tensor it needs and no other (a strict load), each bit-exact; ViTModel's tanh pooler (not the
  feature) is left out of the export, so the ViT is loaded without it."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  d = tmp_path / f"export_{layout}"
  model.config.save_pretrained(d)
  save_file({k: v.contiguous() for k, v in _torch_sd(sd).items()}, str(d / "model.safetensors"))
  kw = {"add_pooling_layer": False} if layout == "hf_vit" else {}
  back, info = type(model).from_pretrained(d, output_loading_info=True, **kw)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  original = model.state_dict()
  for k, v in back.state_dict().items():
    assert torch.equal(v, original[k]), k


def _hf_features(model, x):
  kw = {"interpolate_pos_encoding": True} if isinstance(model, transformers.ViTModel) else {}
  with torch.no_grad():
    return model(pixel_values=_nchw(x), **kw).last_hidden_state[:, 0].numpy()


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_towers(tmp_path, case):
  layout, kwargs, registers, act, other_size = HF_CASES[case]
  torch.manual_seed(3)
  model = _perturb(_hf_model(layout, kwargs, registers), 4)
  with torch.no_grad():  # registers start at zero: give them values a swap would show
    for name, p in model.named_parameters():
      if "register_tokens" in name or "layer_scale" in name:
        p.copy_(torch.randn(p.shape))
  model.save_pretrained(tmp_path / "hf")
  _save_processor(tmp_path / "hf", IMAGENET)
  params, info = convert.convert_file(str(tmp_path / "hf"))
  assert (info.tower["pixel_mean"], info.tower["pixel_std"]) == IMAGENET
  assert (info.source_format, info.tower["act"], info.tower["registers"]) == (layout, act, registers)
  assert info.tower["layer_scale"] == (layout == "hf_dinov2")
  ignored = ({"pooler.dense.weight", "pooler.dense.bias"} if layout == "hf_vit"
             else {"embeddings.mask_token"})
  assert set(info.ignored_keys) == ignored
  size = kwargs["image_size"]
  x = _images(2, size, seed=6)
  _assert_close(params, info, x, _hf_features(model, x))
  # A live model's state_dict() (transformers >= 5 renames the modules in memory) converts the same.
  live, _ = convert.torch_state_dict_to_flax(model.state_dict(), act=act, heads=info_heads(info))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(live)):
    np.testing.assert_array_equal(a, b)
  sd = convert.flax_to_torch_state_dict(params, layout, tower=info.tower)
  _reload_as_checkpoint(tmp_path, model, sd, layout)
  # Another size: the grid resampled as the class's own interpolate_pos_encoding does.
  small, small_info = convert.convert_file(str(tmp_path / "hf"), image_size=other_size)
  x = _images(1, other_size, seed=7)
  _assert_close(small, small_info, x, _hf_features(model, x))


def test_dinov2_linear_probe_pool_is_cls_and_patch_mean(tmp_path):
  """--pool cls+mean: DINOv2's linear-probe feature, concat(class token, mean of patch tokens)."""
  torch.manual_seed(5)
  model = _perturb(transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
      hidden_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=56, patch_size=14,
      num_register_tokens=2)), 6)
  model.save_pretrained(tmp_path / "hf")
  _save_processor(tmp_path / "hf", IMAGENET)
  params, info = convert.convert_file(str(tmp_path / "hf"), pool="cls+mean")
  x = _images(2, 56, seed=8)
  with torch.no_grad():
    tokens = model(pixel_values=_nchw(x)).last_hidden_state.numpy()
  ref = np.concatenate([tokens[:, 0], tokens[:, 3:].mean(axis=1)], axis=-1)  # 1 cls + 2 registers
  assert _flax_features(params, info, x).shape == (2, 192)
  _assert_close(params, info, x, ref)


# ------------------------------------------------------------------------------------------------
# Downstream hooks on the new towers.


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vpt_prompts_go_after_the_registers(pool):
  """Registers and VPT prompts are both position-free tokens between the class token and the
  patches, kept out of the pool: shallow VPT with 3 prompts on a 2-register tower is the same
  network as a 5-register tower whose last 3 registers are the prompts."""
  tower = dict(act="gelu", ln_eps=1e-6, ln_pre=False, patch_bias=True, layer_scale=True,
               registers=2, pool=pool)
  vpt = clip_vit.build_model("test_tiny", 3, tower=tower,
                             additive=clip_vit.AdditiveConfig(vpt_tokens=3))
  rng = np.random.RandomState(2)
  params = jax.tree_util.tree_map(
      lambda v: np.asarray(v) + 0.3 * rng.standard_normal(v.shape).astype(np.float32),
      jax.jit(vpt.init)(jax.random.PRNGKey(1), np.zeros((1, 16, 16, 3), np.float32))["params"])
  plain = clip_vit.build_model("test_tiny", 3, tower=dict(tower, registers=5))
  enc = dict(params["encoder"])
  enc["register_tokens"] = np.concatenate([enc["register_tokens"], enc.pop("vpt_prompts_0")])
  x = _images(2, 16, seed=1)
  want = jax.jit(plain.apply)({"params": {"encoder": enc, "head": params["head"]}}, x)
  got = jax.jit(vpt.apply)({"params": params}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


def test_every_table1_method_attaches_to_a_dinov2_tower():
  """LoRA on q/v (the fused timm qkv is split on conversion), SSF, adapters, VPT and the rule-based
  baselines on a LayerScale + registers + fc_norm tower: each trains what its rule says, FT-LN
  includes fc_norm, SH-PEFT ranks the gammas and registers with every other weight."""
  from shpeft_jax.peft import methods  # pylint: disable=g-import-not-at-top
  tower = dict(act="gelu", ln_eps=1e-6, ln_pre=False, patch_bias=True, layer_scale=True,
               registers=2, pool="mean", final_norm=False, fc_norm=True, class_pos=False)
  for name in methods.method_names():
    cfg = methods.default_peft_config()
    cfg.method = name
    method = methods.resolve(cfg)
    shapes = methods.param_shapes("test_tiny", 3, method.additive, tower=tower)
    names = list(flatten_names(shapes))
    trainable = [n for n, (_, t) in methods.match_rules(method.spec, names).items() if t]
    assert {"head/kernel", "head/bias"} <= set(trainable), name
    if name == "ln":
      assert "encoder/fc_norm/scale" in trainable
    if name in ("shpeft", "full", "random"):
      assert {"encoder/register_tokens", "encoder/resblocks_0/ls_1"} <= set(trainable), name
    if name == "lora":
      assert {"encoder/resblocks_0/attn/lora_query/a", "encoder/resblocks_0/attn/lora_value/b"} <= set(trainable)


# ------------------------------------------------------------------------------------------------
# Refusals and export checks.


def test_unsupported_towers_are_refused_by_name():
  beit = transformers.BeitModel(transformers.BeitConfig(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
      image_size=16, patch_size=4, use_relative_position_bias=True))
  with pytest.raises(convert.CheckpointError, match="relative-position ViT"):
    convert.torch_state_dict_to_flax(beit.state_dict(), act="gelu")
  swin = transformers.SwinModel(transformers.SwinConfig(
      embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32, patch_size=4, window_size=4))
  with pytest.raises(convert.CheckpointError, match="relative-position|Swin"):
    convert.torch_state_dict_to_flax(swin.state_dict(), act="gelu")
  hybrid = {"patch_embed.backbone.stem.conv.weight": np.zeros((4, 3, 3, 3), np.float32),
            "patch_embed.proj.weight": np.zeros((32, 4, 1, 1), np.float32)}
  with pytest.raises(convert.CheckpointError, match="hybrid CNN-stem"):
    convert.torch_state_dict_to_flax(hybrid, act="gelu")


def test_features_a_layout_cannot_compute_are_refused_at_export():
  reg = clip_vit.get_model_config("test_tiny", registers=2, layer_scale=True, ln_pre=False,
                                  patch_bias=True, act="gelu")
  params = clip_vit.init_params(clip_vit.build_model("test_tiny", 2, tower=reg.tower()),
                                jax.random.PRNGKey(0))
  with pytest.raises(convert.CheckpointError, match="no CLIP tower"):
    convert.flax_to_torch_state_dict(params, "open_clip", tower=reg.tower())
  with pytest.raises(convert.CheckpointError, match="hf_dinov2"):
    convert.flax_to_torch_state_dict(params, "timm", tower=reg.tower())  # registers + class pos
  with pytest.raises(convert.CheckpointError, match="cannot be written as hf_vit"):
    convert.flax_to_torch_state_dict(params, "hf_vit", tower=reg.tower())
  assert "embeddings.register_tokens" in convert.flax_to_torch_state_dict(
      {"encoder": params["encoder"]}, "hf_dinov2", tower=reg.tower())


@pytest.mark.parametrize("layout, tower", [
    ("hf_dinov2", dict(act="gelu", ln_eps=1e-6, ln_pre=False, patch_bias=True, layer_scale=True,
                       registers=2, pool="cls+mean")),
    ("hf_vit", dict(act="gelu", ln_eps=1e-12, ln_pre=False, patch_bias=True, qkv_bias=False)),
    ("timm", dict(act="gelu", ln_eps=1e-6, ln_pre=False, patch_bias=True, layer_scale=True,
                  registers=2, class_pos=False, pool="mean", final_norm=False, fc_norm=True)),
])
def test_exported_ssl_classifier_logits_in_torch(tmp_path, layout, tower):
  """A trained classifier on each new tower kind: export -> strict load -> the same logits, and
  back through convert with every tensor bit-exact."""
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
  back, info = convert.convert_file(str(out))
  assert info.tower == clip_vit.get_model_config("test_tiny", **tower).tower()
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_pixel_statistics_come_from_the_files_or_are_asked_for(tmp_path):
  """A DINOv2 tower's mean / std: preprocessor_config.json when it is there (grayscale stats
  repeated), else --pixel_stats; none of them: refused by name; a flag against the file: refused."""
  model = _hf_model("hf_dinov2", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=28, patch_size=14), 0)
  model.save_pretrained(tmp_path / "hf")
  with pytest.raises(convert.ConfigError, match=r"pass --pixel_stats imagenet \(DINOv2"):
    convert.convert_file(str(tmp_path / "hf"))
  _, info = convert.convert_file(str(tmp_path / "hf"), pixel_stats="0.5,0.4,0.3/0.2,0.25,0.3")
  assert (info.tower["pixel_mean"], info.tower["pixel_std"]) == ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
  assert info.tower_source.endswith("pixel statistics from --pixel_stats 0.5,0.4,0.3/0.2,0.25,0.3")
  with pytest.raises(convert.ConfigError, match="--pixel_stats 'nope'"):
    convert.convert_file(str(tmp_path / "hf"), pixel_stats="nope")
  _save_processor(tmp_path / "hf", ((0.5,), (0.25,)))  # RAD-DINO-like grayscale statistics
  _, info = convert.convert_file(str(tmp_path / "hf"))
  assert (info.tower["pixel_mean"], info.tower["pixel_std"]) == ((0.5,) * 3, (0.25,) * 3)
  assert info.tower_source.endswith("pixel statistics from preprocessor_config.json")
  with pytest.raises(convert.ConfigError, match="but preprocessor_config.json says"):
    convert.convert_file(str(tmp_path / "hf"), pixel_stats="imagenet")
