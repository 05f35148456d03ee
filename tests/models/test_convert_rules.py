"""Conversion rules and bad-input handling that need no PyTorch (numpy state dicts, safetensors files).

The PyTorch-reference tests (numerical agreement with torch / transformers) are in
test_torch_reference.py.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shpeft_jax import checkpoints
from shpeft_jax import convert as convert_cli
from shpeft_jax import export as export_cli
from shpeft_jax.errors import CheckpointError
from shpeft_jax.models import clip_vit
from shpeft_jax.models import convert
from shpeft_jax.utils import flatten_names

QUICK = {"act": "quick_gelu"}  # bare state dicts do not say their activation


def _random_params(name="test_tiny", num_classes=3, seed=0, **kw):
  """Classifier params with every leaf random (LayerNorm scales too), so swaps would show."""
  model = clip_vit.build_model(name, num_classes, **kw)
  params = clip_vit.init_params(model, jax.random.PRNGKey(seed))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.RandomState(seed)
  leaves = [rng.normal(0, 0.2, np.shape(x)).astype(np.float32) + np.asarray(x) for x in leaves]
  return model, jax.tree_util.tree_unflatten(treedef, leaves)


def _openai_sd(name="test_tiny", prefix="visual.", seed=0):
  """An OpenAI-layout numpy state dict (with proj and text keys) of a preset, built by hand."""
  cfg = clip_vit.get_model_config(name)
  rng = np.random.RandomState(seed)
  sd = {prefix + k: rng.normal(0, 0.1, s).astype(np.float32)
        for k, s in convert.openai_shapes(cfg).items()}
  sd[prefix + "proj"] = rng.normal(0, 0.1, (cfg.width, 16)).astype(np.float32)
  sd["token_embedding.weight"] = np.zeros((10, 8), np.float32)
  sd["transformer.resblocks.0.attn.in_proj_weight"] = np.zeros((24, 8), np.float32)  # text tower
  sd["logit_scale"] = np.float32(4.6)
  return sd


def _same_tree(a, b):
  fa, fb = flatten_names(a), flatten_names(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


# ------------------------------------------------------------------------------------------------
# Rules.


@pytest.mark.parametrize("layout", ["openai", "hf"])
def test_round_trip_flax_torch_flax_is_bit_exact(layout):
  _, params = _random_params()
  sd = convert.flax_to_torch_state_dict(params, layout)
  back, info = convert.torch_state_dict_to_flax(sd, **QUICK)
  _same_tree(params, back)
  assert info.model == "test_tiny" and info.num_classes == 3
  assert info.source_format == ("hf" if layout == "hf" else "openai")


def test_export_names_and_shapes_follow_each_layout():
  _, params = _random_params()
  cfg = clip_vit.get_model_config("test_tiny")
  oa = convert.flax_to_torch_state_dict(params, "openai")
  hf = convert.flax_to_torch_state_dict(params, "hf")
  assert {k: v.shape for k, v in oa.items()} == {
      **convert.openai_shapes(cfg), "head.weight": (3, 32), "head.bias": (3,)}
  assert {k: v.shape for k, v in hf.items()} == {
      **{"vision_model." + k: s for k, s in convert.hf_shapes(cfg).items()},
      "head.weight": (3, 32), "head.bias": (3,)}
  # The fused in_proj is exactly q, k, v stacked: check one element by hand.
  q = params["encoder"]["resblocks_1"]["attn"]["query"]["kernel"]  # [D, heads, head_dim]
  k = params["encoder"]["resblocks_1"]["attn"]["key"]["kernel"]
  w = oa["transformer.resblocks.1.attn.in_proj_weight"]  # [3D, D], rows = output features
  assert w[1 * 16 + 5, 7] == q[7, 1, 5]            # head 1, dim 5 of the query, input 7
  assert w[32 + 0 * 16 + 3, 2] == k[2, 0, 3]       # key block starts at row D
  np.testing.assert_array_equal(hf["vision_model.encoder.layers.1.self_attn.k_proj.weight"], w[32:64])
  kern = params["encoder"]["conv1"]["kernel"]  # HWIO
  assert oa["conv1.weight"][9, 2, 1, 3] == kern[1, 3, 2, 9]


def test_openai_dict_converts_to_the_model_tree_and_ignores_text_and_proj():
  sd = _openai_sd()
  params, info = convert.torch_state_dict_to_flax(sd, **QUICK)
  assert info.model == "test_tiny" and info.num_classes is None and info.image_size == 16
  assert set(info.ignored_keys) == {"visual.proj", "token_embedding.weight", "logit_scale",
                                    "transformer.resblocks.0.attn.in_proj_weight"}
  model = clip_vit.VisionTransformer(clip_vit.get_model_config("test_tiny"))
  init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  got = {n: v.shape for n, v in flatten_names(params["encoder"]).items()}
  assert got == {n: v.shape for n, v in flatten_names(init).items()}
  # Hand-checked element of each rule.
  enc = params["encoder"]
  assert enc["ln_pre"]["scale"][4] == sd["visual.ln_pre.weight"][4]
  assert enc["resblocks_0"]["mlp"]["c_fc"]["kernel"][3, 50] == sd["visual.transformer.resblocks.0.mlp.c_fc.weight"][50, 3]
  assert enc["resblocks_0"]["attn"]["value"]["bias"][1, 2] == sd["visual.transformer.resblocks.0.attn.in_proj_bias"][64 + 16 + 2]
  assert enc["resblocks_0"]["attn"]["out"]["kernel"][1, 2, 5] == sd["visual.transformer.resblocks.0.attn.out_proj.weight"][5, 16 + 2]


def test_open_clip_module_prefix_and_state_dict_wrapper():
  sd = _openai_sd()
  wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}
  params, info = convert.torch_state_dict_to_flax(wrapped, **QUICK)
  ref, _ = convert.torch_state_dict_to_flax(sd, **QUICK)
  _same_tree(params, ref)
  assert info.source_format == "open_clip"


def test_float16_source_becomes_float32():
  sd = {k: v.astype(np.float16) if v.ndim else v for k, v in _openai_sd().items()}
  params, _ = convert.torch_state_dict_to_flax(sd, **QUICK)
  leaves = jax.tree_util.tree_leaves(params)
  assert all(x.dtype == np.float32 for x in leaves)
  np.testing.assert_array_equal(params["encoder"]["class_embedding"],
                                sd["visual.class_embedding"].astype(np.float32))


def test_positional_embedding_resize_keeps_class_token_and_is_exact_on_same_grid():
  rng = np.random.RandomState(1)
  pos = rng.normal(size=(1 + 16, 6)).astype(np.float32)
  np.testing.assert_array_equal(convert.resize_positional_embedding(pos, 4), pos)
  out = convert.resize_positional_embedding(pos, 6)
  assert out.shape == (37, 6) and out.dtype == np.float32
  np.testing.assert_array_equal(out[0], pos[0])
  # A constant grid stays constant (weights sum to one), for both torch variants.
  const = np.concatenate([pos[:1], np.full((16, 6), 0.7, np.float32)])
  for aa in (True, False):
    for g in (2, 3, 7):
      np.testing.assert_allclose(convert.resize_positional_embedding(const, g, antialias=aa)[1:], 0.7,
                                 atol=1e-6)


def test_bfloat16_compute_with_float32_params_stays_close():
  _, params = _random_params(num_classes=4)
  cfg = clip_vit.get_model_config("test_tiny")
  x = np.random.RandomState(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  f32 = clip_vit.ClipClassifier(cfg, 4, dtype=jnp.float32)
  bf16 = clip_vit.build_model("test_tiny", 4, dtype="bfloat16")
  feat32 = f32.apply({"params": params}, x, return_features=True)[1]
  logits16, feat16 = bf16.apply({"params": params}, x, return_features=True)
  assert feat16.dtype == jnp.float32 and logits16.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))
  err = float(jnp.max(jnp.abs(feat16 - feat32)))
  assert err < 0.05 * float(jnp.max(jnp.abs(feat32))), err
  assert err > 0  # bf16 really ran: it is not bit-identical to float32.


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the key and the expected shape.


def test_missing_key_names_key_and_shape():
  sd = _openai_sd()
  del sd["visual.transformer.resblocks.1.ln_2.weight"]
  with pytest.raises(CheckpointError, match=r"missing key visual\.transformer\.resblocks\.1\.ln_2\.weight "
                                            r"\(expected shape \(32,\)\)"):
    convert.torch_state_dict_to_flax(sd, **QUICK)


def test_wrong_shape_names_key_expected_and_found():
  sd = _openai_sd()
  sd["visual.transformer.resblocks.0.attn.in_proj_weight"] = np.zeros((96, 16), np.float32)
  with pytest.raises(CheckpointError, match=r"visual\.transformer\.resblocks\.0\.attn\.in_proj_weight: "
                                            r"expected shape \(96, 32\), found \(96, 16\)"):
    convert.torch_state_dict_to_flax(sd, **QUICK)


def test_hf_wrong_shape_uses_the_files_own_names():
  _, params = _random_params()
  sd = convert.flax_to_torch_state_dict(params, "hf")
  sd["vision_model.encoder.layers.1.mlp.fc2.weight"] = np.zeros((32, 32), np.float32)
  with pytest.raises(CheckpointError, match=r"vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight: "
                                            r"expected shape \(32, 64\), found \(32, 32\)"):
    convert.torch_state_dict_to_flax(sd, **QUICK)


def test_vit_l_file_when_vit_b_requested():
  # The first tensors of a ViT-L/14 checkpoint are enough to be recognised and refused.
  sd = {"visual.conv1.weight": np.zeros((1024, 3, 14, 14), np.float16),
        "visual.class_embedding": np.zeros((1024,), np.float16),
        "visual.positional_embedding": np.zeros((257, 1024), np.float16)}
  sd.update({f"visual.transformer.resblocks.{i}.ln_1.weight": np.zeros((1024,), np.float16)
             for i in range(24)})
  with pytest.raises(CheckpointError, match=r"not a ViT-B/16 .*looks like ViT-L/14.*visual\.conv1\.weight: "
                                            r"expected shape \(768, 3, 16, 16\), found \(1024, 3, 14, 14\)"):
    convert.torch_state_dict_to_flax(sd, model="ViT-B/16", **QUICK)


def test_a_tower_of_no_preset_shape_is_named_by_its_shape_given_its_heads():
  """Any depth / width: a 1-layer test_tiny is no preset; the weights do not say its heads, so the
  converter asks for them, then names the tower by its shape (what every entry point builds)."""
  sd = _openai_sd()
  sd = {k: v for k, v in sd.items() if ".resblocks.1." not in k or not k.startswith("visual.")}
  with pytest.raises(CheckpointError, match=r"patch 4, width 32, 1 layers.*is no preset.*--heads N"):
    convert.torch_state_dict_to_flax(sd, **QUICK)
  with pytest.raises(CheckpointError, match="--heads 5 does not divide the tower's width 32"):
    convert.torch_state_dict_to_flax(sd, heads=5, **QUICK)
  params, info = convert.torch_state_dict_to_flax(sd, heads=2, **QUICK)
  assert info.model == "vit:p4-w32-l1-h2-m64"
  cfg = clip_vit.get_model_config(info.model, info.image_size)
  assert (cfg.layers, cfg.heads, cfg.mlp_dim) == (1, 2, 64)
  assert np.shape(params["encoder"]["resblocks_0"]["attn"]["query"]["kernel"])[1] == 2


@pytest.mark.parametrize("keys, pattern", [
    ({"visual.conv1.weight": (32, 3, 3, 3), "visual.bn1.weight": (32,),
      "visual.layer1.0.conv1.weight": (64, 32, 1, 1), "visual.attnpool.positional_embedding": (50, 2048)},
     "ModifiedResNet"),
    ({"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3),
      "fc.weight": (1000, 2048)}, "not a CLIP ViT"),
    ({"text_model.embeddings.token_embedding.weight": (100, 32),
      "text_model.final_layer_norm.weight": (32,)}, "text-only file"),
    ({"token_embedding.weight": (100, 32), "positional_embedding": (77, 32),
      "transformer.resblocks.0.attn.in_proj_weight": (96, 32), "ln_final.weight": (32,)},
     "text-only file"),
    ({"foo.weight": (3,)}, "No CLIP vision-tower keys"),
])
def test_other_architectures_and_text_only_files(keys, pattern):
  sd = {k: np.zeros(s, np.float32) for k, s in keys.items()}
  with pytest.raises(CheckpointError, match=pattern):
    convert.torch_state_dict_to_flax(sd, **QUICK)


def test_extra_tower_keys_mean_another_architecture():
  sd = _openai_sd()
  sd["visual.transformer.resblocks.0.ls_1.gamma"] = np.ones((32,), np.float32)  # layer scale
  with pytest.raises(CheckpointError, match=r"unexpected tower keys visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
    convert.torch_state_dict_to_flax(sd, **QUICK)


def test_format_flag_is_checked_against_the_keys():
  with pytest.raises(CheckpointError, match="--format hf"):
    convert.torch_state_dict_to_flax(_openai_sd(), fmt="hf", **QUICK)


def test_export_refuses_additive_leaves():
  _, params = _random_params(additive=clip_vit.AdditiveConfig(lora_rank=2))
  with pytest.raises(CheckpointError, match=r"lora_.*Merge them into the base weights"):
    convert.flax_to_torch_state_dict(params, "openai")


def test_export_refuses_incomplete_tree():
  _, params = _random_params()
  del params["encoder"]["resblocks_1"]["ln_2"]
  with pytest.raises(CheckpointError, match=r"missing encoder/resblocks_1/ln_2/scale \(expected shape \(32,\)\)"):
    convert.flax_to_torch_state_dict(params, "hf")


# ------------------------------------------------------------------------------------------------
# CLIs (safetensors via numpy, no torch needed).


def _write_safetensors(path, sd):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in sd.items()}, str(path))


def test_convert_cli_writes_params_checkpoint_with_meta(tmp_path):
  sd = _openai_sd()
  src = tmp_path / "clip.safetensors"
  _write_safetensors(src, {k: np.atleast_1d(v) if k == "logit_scale" else v for k, v in sd.items()})
  out = tmp_path / "ckpt"
  assert convert_cli.main([str(src), "--out", str(out), "--image_size", "24", "--act", "quick_gelu"]) == 0
  params, meta = checkpoints.load_params(str(out))
  assert meta == {"model": "test_tiny", "image_size": 24, "num_classes": None,
                  "source": str(src), "source_format": "openai", "source_image_size": 16,
                  **json.loads(json.dumps(clip_vit.TOWER_DEFAULTS)),  # as meta.json holds them
                  "tower_source": "act from --act; ln_eps 1e-05 (openai default); pool cls (class token); "
                                  "pixel statistics from CLIP's (openai tower)"}
  assert params["encoder"]["positional_embedding"].shape == (37, 32)
  np.testing.assert_array_equal(params["encoder"]["positional_embedding"],
                                convert.resize_positional_embedding(sd["visual.positional_embedding"], 6))
  assert "head" not in params


@pytest.mark.parametrize("case", ["missing", "shape", "text_only", "other_model", "bad_size", "no_act"])
def test_convert_cli_errors_leave_no_output(tmp_path, capsys, case):
  sd = {k: np.atleast_1d(v) for k, v in _openai_sd().items()}
  extra = ["--act", "quick_gelu"]
  if case == "no_act":
    extra = []
    expect = "does not say which activation its tower uses"
  elif case == "missing":
    del sd["visual.ln_post.bias"]
    expect = "missing key visual.ln_post.bias (expected shape (32,))"
  elif case == "shape":
    sd["visual.class_embedding"] = np.zeros((31,), np.float32)
    expect = "visual.class_embedding: expected shape (32,), found (31,)"
  elif case == "text_only":
    sd = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    expect = "text-only file"
  elif case == "other_model":
    sd = {k: np.atleast_1d(v) for k, v in _openai_sd("demo_small").items()}
    extra += ["--model", "test_tiny"]
    expect = "visual.conv1.weight: expected shape (32, 3, 4, 4), found (64, 3, 4, 4)"
  else:
    extra += ["--image_size", "18"]
    expect = "not a multiple of the patch size"
  src = tmp_path / "src" / "clip.safetensors"
  src.parent.mkdir()
  _write_safetensors(src, sd)
  out = tmp_path / "out" / "ckpt"
  assert convert_cli.main([str(src), "--out", str(out)] + extra) == 2
  assert expect in capsys.readouterr().err
  assert not out.exists()
  assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_export_cli_safetensors_round_trip_and_refusals(tmp_path, capsys):
  _, params = _random_params()
  ckpt = tmp_path / "model"
  checkpoints.save_params(str(ckpt), params, {"model": "test_tiny", "image_size": 16, "num_classes": 3})
  for layout in ("openai", "hf"):
    out = tmp_path / f"{layout}.safetensors"
    assert export_cli.main([str(ckpt), "--format", layout, "--out", str(out)]) == 0
    # ... and back through the convert CLI: bit-exact, head included.
    back_dir = tmp_path / f"back_{layout}"
    assert convert_cli.main([str(out), "--out", str(back_dir)]) == 0
    back, meta = checkpoints.load_params(str(back_dir))
    _same_tree(params, back)
    assert meta["num_classes"] == 3 and meta["source_format"] == ("hf" if layout == "hf" else "openai")
  # Refusals leave nothing behind.
  _, lora = _random_params(additive=clip_vit.AdditiveConfig(lora_rank=2))
  lora_ckpt = tmp_path / "lora"
  checkpoints.save_params(str(lora_ckpt), lora, {"model": "test_tiny", "image_size": 16, "num_classes": 3})
  bad_out = tmp_path / "lora.safetensors"
  assert export_cli.main([str(lora_ckpt), "--format", "openai", "--out", str(bad_out)]) == 2
  assert "Merge them into the base weights" in capsys.readouterr().err
  liar = tmp_path / "liar"  # meta.json promises a head the params do not have
  checkpoints.save_params(str(liar), {"encoder": params["encoder"]},
                          {"model": "test_tiny", "image_size": 16, "num_classes": 3})
  assert export_cli.main([str(liar), "--format", "hf", "--out", str(bad_out)]) == 2
  assert "says num_classes 3 but the params have no head" in capsys.readouterr().err
  gelu = tmp_path / "gelu"  # OpenAI's class cannot compute exact GELU
  checkpoints.save_params(str(gelu), params, {"model": "test_tiny", "image_size": 16,
                                              "num_classes": 3, "act": "gelu"})
  assert export_cli.main([str(gelu), "--format", "openai", "--out", str(bad_out)]) == 2
  assert "OpenAI CLIP's VisionTransformer computes QuickGELU" in capsys.readouterr().err
  assert not bad_out.exists()
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


# ------------------------------------------------------------------------------------------------
# Tower variants: activation / LayerNorm eps from what the checkpoint says, timm trunks,
# encoder-only exports, SigLIP.

TRUNK = {**clip_vit.TOWER_DEFAULTS, "act": "gelu", "ln_eps": 1e-6, "ln_pre": False, "patch_bias": True}  # BiomedCLIP-like


def _encoder_params(tower=None, seed=0):
  _, params = _random_params(seed=seed, tower=tower)
  return {"encoder": params["encoder"]}


@pytest.mark.parametrize("layout", ["openai", "open_clip", "hf", "timm"])
def test_encoder_only_round_trip_is_bit_exact_in_every_format(layout):
  params = _encoder_params()
  sd = convert.flax_to_torch_state_dict(params, layout, tower={"act": "quick_gelu", "ln_eps": 1e-5})
  assert not any(k.startswith(("head.", "vision_model.", "trunk.")) for k in sd)
  back, info = convert.torch_state_dict_to_flax(sd, act="quick_gelu", ln_eps=1e-5)
  _same_tree(params, back)
  assert info.num_classes is None and info.tower["act"] == "quick_gelu"


def test_timm_trunk_round_trip_names_and_switches():
  _, params = _random_params(tower=TRUNK)
  enc = params["encoder"]
  assert "ln_pre" not in enc and enc["conv1"]["bias"].shape == (32,)
  cfg = clip_vit.get_model_config("test_tiny", **TRUNK)
  enc_only = convert.flax_to_torch_state_dict({"encoder": enc}, "timm", tower=TRUNK)
  assert {k: v.shape for k, v in enc_only.items()} == convert.timm_shapes(cfg)
  np.testing.assert_array_equal(enc_only["cls_token"][0, 0], enc["class_embedding"])
  np.testing.assert_array_equal(enc_only["patch_embed.proj.bias"], enc["conv1"]["bias"])
  clf = convert.flax_to_torch_state_dict(params, "timm", tower=TRUNK)
  assert set(clf) == {"trunk." + k for k in enc_only} | {"head.weight", "head.bias"}
  back, info = convert.torch_state_dict_to_flax(clf, act="gelu")
  _same_tree(params, back)
  assert info.tower == TRUNK and info.source_format == "timm" and info.num_classes == 3
  assert "ln_eps 1e-06 (timm default)" in info.tower_source
  # A plain timm file's head is timm's own classifier (not on L2-normalised features): ignored.
  plain = dict(enc_only, **{"head.weight": np.zeros((5, 32), np.float32),
                            "head.bias": np.zeros((5,), np.float32)})
  back, info = convert.torch_state_dict_to_flax(plain, act="gelu")
  assert "head" not in back and set(info.ignored_keys) == {"head.weight", "head.bias"}


def test_timm_trunk_cannot_be_written_as_clip_layouts():
  params = _encoder_params(TRUNK)
  for layout in ("openai", "open_clip", "hf"):
    with pytest.raises(CheckpointError, match=r"timm trunk .*Use --format timm"):
      convert.flax_to_torch_state_dict(params, layout, tower=TRUNK)


def test_openai_format_refuses_gelu_but_open_clip_and_hf_take_it():
  params = _encoder_params()
  gelu = {"act": "gelu", "ln_eps": 1e-5}
  with pytest.raises(CheckpointError, match="computes QuickGELU .*Use --format open_clip"):
    convert.flax_to_torch_state_dict(params, "openai", tower=gelu)
  for layout in ("open_clip", "hf", "timm"):
    convert.flax_to_torch_state_dict(params, layout, tower=gelu)


def test_timm_with_both_or_neither_switch_is_refused():
  cfg = clip_vit.get_model_config("test_tiny", act="gelu", ln_pre=True, patch_bias=True)
  sd = {k: np.zeros(s, np.float32) for k, s in convert.timm_shapes(cfg).items()}
  with pytest.raises(CheckpointError, match="patch-projection bias exactly when it has no norm_pre"):
    convert.torch_state_dict_to_flax(sd, act="gelu", ln_eps=1e-5)


def test_activation_flag_cannot_contradict_the_checkpoint():
  ev = {"act": convert.Evidence("gelu", "open_clip_config.json (quick_gelu: False)")}
  with pytest.raises(CheckpointError, match=r"--act quick_gelu contradicts the checkpoint: "
                                            r"open_clip_config.json \(quick_gelu: False\) says gelu"):
    convert.torch_state_dict_to_flax(_openai_sd(), act="quick_gelu", evidence=ev)
  params, info = convert.torch_state_dict_to_flax(_openai_sd(), evidence=ev)
  assert info.tower["act"] == "gelu" and "open_clip_config.json" in info.tower_source


def test_pre_norm_timm_file_without_config_needs_ln_eps():
  cfg = clip_vit.get_model_config("test_tiny", act="quick_gelu")  # CLIP-style: norm_pre, no bias
  sd = {k: np.zeros(s, np.float32) for k, s in convert.timm_shapes(cfg).items()}
  with pytest.raises(CheckpointError, match="pass --ln_eps"):
    convert.torch_state_dict_to_flax(sd, **QUICK)
  _, info = convert.torch_state_dict_to_flax(sd, act="quick_gelu", ln_eps=1e-5)
  assert info.tower == {**clip_vit.TOWER_DEFAULTS, "act": "quick_gelu", "ln_eps": 1e-5, "ln_pre": True, "patch_bias": False}


@pytest.mark.parametrize("name, tower", [
    ("vit_base_patch16_224", {"act": "gelu", "ln_eps": 1e-6}),
    ("vit_base_patch16_224.augreg2_in21k_ft_in1k", {"act": "gelu", "ln_eps": 1e-6}),
    ("vit_base_patch16_clip_224.openai", {"act": "gelu", "ln_eps": 1e-5}),
    ("vit_base_patch16_clip_quickgelu_224.openai", {"act": "quick_gelu", "ln_eps": 1e-5}),
])
def test_timm_model_names(name, tower):
  assert convert.timm_vit_tower(name) == tower


@pytest.mark.parametrize("name, pattern", [("vit_base_patch16_siglip_224", "SigLIP"),
                                           ("eva02_base_patch14_224", "pass --act")])
def test_timm_model_names_refused(name, pattern):
  with pytest.raises(CheckpointError, match=pattern):
    convert.timm_vit_tower(name)


@pytest.mark.parametrize("keys", [
    # transformers' SiglipVisionModel
    {"vision_model.embeddings.patch_embedding.weight": (32, 3, 4, 4),
     "vision_model.embeddings.position_embedding.weight": (16, 32),
     "vision_model.head.probe": (1, 1, 32),
     "vision_model.head.attention.in_proj_weight": (96, 32)},
    # open_clip SigLIP (timm trunk with MAP pooling)
    {"visual.trunk.patch_embed.proj.weight": (32, 3, 4, 4), "visual.trunk.pos_embed": (1, 16, 32),
     "visual.trunk.attn_pool.latent": (1, 1, 32)},
])
def test_siglip_is_refused_by_name(keys):
  sd = {k: np.zeros(s, np.float32) for k, s in keys.items()}
  with pytest.raises(CheckpointError, match="This is a SigLIP vision tower"):
    convert.torch_state_dict_to_flax(sd, **QUICK)


def test_tower_without_class_token_is_refused():
  cfg = clip_vit.get_model_config("test_tiny", **TRUNK)
  sd = {k: np.zeros(s, np.float32) for k, s in convert.timm_shapes(cfg).items() if k != "cls_token"}
  with pytest.raises(CheckpointError, match="Missing key cls_token: the tower has no class token"):
    convert.torch_state_dict_to_flax(sd, act="gelu")


def _open_clip_dir(tmp_path, sd, config):
  import json
  d = tmp_path / "oc"
  d.mkdir()
  _write_safetensors(d / "open_clip_model.safetensors", sd)
  (d / "open_clip_config.json").write_text(json.dumps(config))
  return d


@pytest.mark.parametrize("model_cfg, act", [({"quick_gelu": True}, "quick_gelu"), ({}, "gelu")])
def test_open_clip_config_decides_the_activation(tmp_path, model_cfg, act):
  sd = {k: v for k, v in _openai_sd().items() if k != "logit_scale"}
  d = _open_clip_dir(tmp_path, sd, {"model_cfg": {"embed_dim": 16, "vision_cfg": {}, **model_cfg},
                                    "preprocess_cfg": {}})
  _, info = convert.convert_file(str(d))
  assert info.tower["act"] == act and "open_clip_config.json" in info.tower_source


def test_open_clip_config_of_biomedclip_reads_the_timm_name(tmp_path):
  enc = convert.flax_to_torch_state_dict(_encoder_params(TRUNK), "timm", tower=TRUNK)
  sd = {"visual.trunk." + k: v for k, v in enc.items()}
  sd["visual.head.proj.weight"] = np.zeros((16, 32), np.float32)
  cfg = {"model_cfg": {"embed_dim": 16, "vision_cfg": {
      "timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
      "timm_proj": "linear", "image_size": 16}}}
  params, info = convert.convert_file(str(_open_clip_dir(tmp_path, sd, cfg)))
  assert info.tower == TRUNK and info.source_format == "open_clip"
  assert info.ignored_keys == ("visual.head.proj.weight",)
  _same_tree(_encoder_params(TRUNK), params)


@pytest.mark.parametrize("vision_cfg, pattern", [
    ({"attentional_pool": True}, "attentional_pool"),
    ({"pool_type": "avg"}, "pool_type"),
    ({"act_kwargs": {"approximate": "tanh"}}, "tanh GELU"),
    ({"timm_model_name": "vit_base_patch16_224"}, "pools with 'avg'"),  # open_clip's default pool
])
def test_open_clip_config_features_we_cannot_compute_are_refused(tmp_path, vision_cfg, pattern):
  sd = {k: v for k, v in _openai_sd().items() if k != "logit_scale"}
  d = _open_clip_dir(tmp_path, sd, {"model_cfg": {"vision_cfg": vision_cfg}})
  with pytest.raises(CheckpointError, match=pattern):
    convert.convert_file(str(d))


@pytest.mark.parametrize("hidden_act, result", [("gelu", "gelu"), ("quick_gelu", "quick_gelu"),
                                                ("gelu_pytorch_tanh", None)])
def test_hf_config_hidden_act(tmp_path, hidden_act, result):
  import json
  _, params = _random_params()
  sd = convert.flax_to_torch_state_dict({"encoder": params["encoder"]}, "hf")
  _write_safetensors(tmp_path / "model.safetensors", sd)
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "clip_vision_model", "num_attention_heads": 2, "hidden_act": hidden_act,
       "layer_norm_eps": 1e-5}))
  if result is None:
    with pytest.raises(CheckpointError, match="tanh-approximated GELU"):
      convert.convert_file(str(tmp_path))
  else:
    _, info = convert.convert_file(str(tmp_path))
    assert info.tower["act"] == result and f"hidden_act {hidden_act}" in info.tower_source


def test_old_meta_without_tower_fields_means_openai_tower():
  assert clip_vit.tower_from_meta({"model": "ViT-B/16"}) == {
      "act": "quick_gelu", "ln_eps": 1e-5, "ln_pre": True, "patch_bias": False,
      "layer_scale": False, "registers": 0, "pool": "cls", "final_norm": True, "fc_norm": False,
      "qkv_bias": True, "class_pos": True,
      "pixel_mean": (0.48145466, 0.4578275, 0.40821073),
      "pixel_std": (0.26862954, 0.26130258, 0.27577711)}
  with pytest.raises(clip_vit.ConfigError, match="Unknown activation 'gelu_tanh'"):
    clip_vit.get_model_config("test_tiny", act="gelu_tanh")


def test_gelu_is_the_exact_erf_form():
  from scipy.special import erf
  x = np.linspace(-4, 4, 101).astype(np.float32)
  ref = 0.5 * x * (1 + erf(x / np.sqrt(2)))
  np.testing.assert_allclose(np.asarray(clip_vit.activation("gelu")(x)), ref, atol=1e-6)
