"""Numerical agreement with PyTorch: HF transformers' CLIPVisionModel and our OpenAI-layout torch
tower (nn.MultiheadAttention), conversion from every file type, and exported classifiers.
open_clip / timm towers and the GELU variants are in test_checkpoint_families.py."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from shpeft_jax import checkpoints  # noqa: E402
from shpeft_jax import convert as convert_cli  # noqa: E402
from shpeft_jax import export as export_cli  # noqa: E402
from shpeft_jax.models import clip_vit  # noqa: E402
from shpeft_jax.models import convert  # noqa: E402
from shpeft_jax.models import torch_reference as tr  # noqa: E402
from torch_fixtures import images as _images, nchw as _nchw, perturb as _perturb  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def b16_features():
  """One jitted ViT-B/16 feature function shared by the two ViT-B/16 reference tests."""
  tower = clip_vit.VisionTransformer(clip_vit.get_model_config("ViT-B/16"))
  apply = jax.jit(lambda p, x: tower.apply({"params": p}, x))
  return lambda params, x: np.asarray(apply(params["encoder"], x))


def test_hf_clip_vision_model_vit_b16_pooled_features_match(tmp_path, b16_features):
  torch.manual_seed(0)
  hf = _perturb(transformers.CLIPVisionModel(tr.hf_vision_config(clip_vit.get_model_config("ViT-B/16"))), 1)
  hf.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors, as users have them.
  params, info = convert.convert_file(str(tmp_path / "hf"))
  assert (info.model, info.image_size, info.source_format) == ("ViT-B/16", 224, "hf")
  x = _images(2, 224)
  with torch.no_grad():
    ref = hf(pixel_values=_nchw(x)).pooler_output.numpy()
  err = np.abs(b16_features(params, x) - ref).max()
  assert err <= TOL, err
  assert np.abs(ref).max() > 0.1  # the features are not trivially small
  # convert -> export (encoder only) is the identity on every tensor.
  _assert_same_tensors(convert.flax_to_torch_state_dict(params, "hf", tower=info.tower),
                       hf.state_dict())


def test_openai_layout_vit_b16_pooled_features_match(b16_features):
  torch.manual_seed(1)
  tower = _perturb(tr.TorchVisionTransformer.from_config(clip_vit.get_model_config("ViT-B/16"),
                                                         output_dim=512), 2)
  sd = {"visual." + k: v for k, v in tower.state_dict().items()}
  params, info = convert.torch_state_dict_to_flax(sd, model="ViT-B/16", act="quick_gelu")
  assert info.ignored_keys == ("visual.proj",)
  x = _images(2, 224, seed=1)
  with torch.no_grad():
    ref = tower.features(_nchw(x)).numpy()
  err = np.abs(b16_features(params, x) - ref).max()
  assert err <= TOL, err
  exported = convert.flax_to_torch_state_dict(params, "openai", tower=info.tower)
  _assert_same_tensors(exported, {k: v for k, v in tower.state_dict().items() if k != "proj"})


def _assert_same_tensors(exported, source):
  """Bit-exact equality of an exported numpy state dict and a torch state dict (same keys)."""
  assert set(exported) == set(source), set(exported) ^ set(source)
  for k, v in source.items():
    np.testing.assert_array_equal(exported[k], v.detach().numpy(), err_msg=k)


def _tiny_tower(seed=0, name="test_tiny", output_dim=8):
  torch.manual_seed(seed)
  return _perturb(tr.TorchVisionTransformer.from_config(clip_vit.get_model_config(name),
                                                        output_dim=output_dim), seed + 100)


def _flax_features(params, name="test_tiny", image_size=None):
  tower = clip_vit.VisionTransformer(clip_vit.get_model_config(name, image_size))
  return lambda x: np.asarray(tower.apply({"params": params["encoder"]}, x))


class _ClipHolder(torch.nn.Module):
  """Stands in for OpenAI's full CLIP module: `visual` plus text-tower parameters."""

  def __init__(self, visual):
    super().__init__()
    self.visual = visual
    self.token_embedding = torch.nn.Embedding(10, 8)
    self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))

  def forward(self, x):
    return self.visual(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_archive_float16(tmp_path):
  tower = _tiny_tower(3)
  # The trace shares its tensors with the module: trace a copy so `tower` stays float32.
  traced = torch.jit.trace(_ClipHolder(copy.deepcopy(tower)).eval(), torch.zeros(1, 3, 16, 16))
  traced = traced.half()  # OpenAI's released archives hold float16 weights.
  path = tmp_path / "ViT-tiny.pt"
  torch.jit.save(traced, str(path))
  params, info = convert.convert_file(str(path))
  assert info.source_format == "openai" and info.model == "test_tiny"
  assert params["encoder"]["conv1"]["kernel"].dtype == np.float32
  # Reference: the float32 tower carrying the float16-rounded weights.
  with torch.no_grad():
    for p in tower.parameters():
      p.copy_(p.half().float())
  x = _images(3, 16, seed=2)
  with torch.no_grad():
    ref = tower.features(_nchw(x)).numpy()
  err = np.abs(_flax_features(params)(x) - ref).max()
  assert err <= TOL, err


def test_open_clip_training_checkpoint_pt(tmp_path):
  tower = _tiny_tower(4, name="demo_small")
  sd = {"module.visual." + k: v for k, v in tower.state_dict().items()}
  sd["module.token_embedding.weight"] = torch.zeros(10, 8)
  path = tmp_path / "epoch_3.pt"
  torch.save({"epoch": 3, "name": "run", "state_dict": sd}, path)
  out = tmp_path / "ckpt"
  assert convert_cli.main([str(path), "--out", str(out), "--act", "quick_gelu"]) == 0
  params, meta = checkpoints.load_params(str(out))
  assert (meta["model"], meta["source_format"]) == ("demo_small", "open_clip")
  x = _images(2, 16, seed=3)
  with torch.no_grad():
    ref = tower.features(_nchw(x)).numpy()
  err = np.abs(_flax_features(params, "demo_small")(x) - ref).max()
  assert err <= TOL, err


def test_hf_clip_model_bin_with_text_tower(tmp_path):
  cfg = clip_vit.get_model_config("test_tiny")
  vision = tr.hf_vision_config(cfg).to_dict()
  text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              vocab_size=50, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
  torch.manual_seed(5)
  clip = _perturb(transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=vision, text_config=text, projection_dim=8)), 6)
  torch.save(clip.state_dict(), tmp_path / "pytorch_model.bin")
  params, info = convert.convert_file(str(tmp_path / "pytorch_model.bin"), fmt="hf", act="quick_gelu")
  assert info.source_format == "hf"
  assert any(k.startswith("text_model.") for k in info.ignored_keys)
  x = _images(2, 16, seed=4)
  with torch.no_grad():
    ref = clip.vision_model(pixel_values=_nchw(x)).pooler_output.numpy()
  err = np.abs(_flax_features(params)(x) - ref).max()
  assert err <= TOL, err


def test_hf_config_heads_decide_the_tower(tmp_path):
  """test_tiny's weights with 4 heads in config.json: the weights are identical, only the config
  tells heads apart. Not the preset (2 heads) but the tower of that shape, and it computes what
  HF's model with 4 heads computes; asking for the preset by name is refused."""
  torch.manual_seed(0)
  cfg = tr.hf_vision_config(clip_vit.get_model_config("test_tiny"))
  cfg.num_attention_heads = 4
  hf = _perturb(transformers.CLIPVisionModel(cfg), 2).eval()
  hf.save_pretrained(tmp_path)
  params, info = convert.convert_file(str(tmp_path))
  assert info.model == "vit:p4-w32-l2-h4-m64"
  x = _images(2, 16, seed=1)
  with torch.no_grad():
    ref = hf(pixel_values=_nchw(x)).pooler_output.numpy()
  tower = clip_vit.VisionTransformer(clip_vit.get_model_config(info.model, 16, **info.tower))
  got = np.asarray(tower.apply({"params": params["encoder"]}, x))
  assert np.abs(got - ref).max() <= 1e-5 and np.abs(ref).max() > 0.1
  with pytest.raises(convert.CheckpointError, match="4 attention heads, but test_tiny has 2"):
    convert.convert_file(str(tmp_path), model="test_tiny")


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("grid", [2, 3, 6, 9])
def test_positional_embedding_resize_matches_torch_interpolate(grid, antialias):
  rng = np.random.RandomState(grid)
  pos = rng.normal(size=(1 + 5 * 5, 7)).astype(np.float32)
  img = torch.from_numpy(pos[1:]).reshape(1, 5, 5, 7).permute(0, 3, 1, 2)
  ref = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False,
                      antialias=antialias).permute(0, 2, 3, 1).reshape(grid * grid, 7).numpy()
  out = convert.resize_positional_embedding(pos, grid, antialias=antialias)
  np.testing.assert_array_equal(out[0], pos[0])
  np.testing.assert_allclose(out[1:], ref, atol=1e-5, rtol=0)


def test_converted_at_new_image_size_matches_torch_with_resized_embedding():
  """Whole chain at 24 px from a 16 px checkpoint vs the torch tower resized the open_clip way."""
  tower = _tiny_tower(7)
  sd = {"visual." + k: v for k, v in tower.state_dict().items()}
  params, info = convert.torch_state_dict_to_flax(sd, image_size=24, act="quick_gelu")
  assert (info.image_size, info.source_image_size) == (24, 16)
  big = tr.TorchVisionTransformer.from_config(clip_vit.get_model_config("test_tiny", 24), output_dim=8)
  pos = tower.positional_embedding.detach()
  grid = F.interpolate(pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic",
                       align_corners=False, antialias=True).permute(0, 2, 3, 1).reshape(36, -1)
  state = dict(tower.state_dict())
  state["positional_embedding"] = torch.cat([pos[:1], grid])
  big.load_state_dict(state, strict=True)
  x = _images(2, 24, seed=5)
  with torch.no_grad():
    ref = big.eval().features(_nchw(x)).numpy()
  err = np.abs(_flax_features(params, image_size=24)(x) - ref).max()
  assert err <= TOL, err


def _trained_classifier(tmp_path, num_classes=3):
  model = clip_vit.build_model("test_tiny", num_classes)
  params = clip_vit.init_params(model, jax.random.PRNGKey(0))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_unflatten(
      treedef, [np.asarray(x) + rng.normal(0, 0.2, np.shape(x)).astype(np.float32) for x in leaves])
  ckpt = tmp_path / "export_model"
  checkpoints.save_params(str(ckpt), params, {"model": "test_tiny", "image_size": 16,
                                              "num_classes": num_classes, "step": 10})
  return model, params, ckpt


@pytest.mark.parametrize("layout, suffix", [("openai", ".pt"), ("openai", ".safetensors"),
                                            ("hf", ".safetensors"), ("hf", ".bin")])
def test_exported_classifier_gives_the_same_logits_in_torch(tmp_path, layout, suffix):
  model, params, ckpt = _trained_classifier(tmp_path)
  out = tmp_path / f"clf{suffix}"
  assert export_cli.main([str(ckpt), "--format", layout, "--out", str(out)]) == 0
  net = tr.build_torch_classifier("test_tiny", 3, layout=layout)
  if suffix == ".safetensors":
    from safetensors.torch import load_file
    sd = load_file(str(out))
    assert tr.load_exported(str(out)).state_dict().keys() == net.state_dict().keys()
  else:
    sd = torch.load(str(out), weights_only=True)
  net.load_state_dict(sd, strict=True)
  x = _images(4, 16, seed=6)
  with torch.no_grad():
    ref = net.eval()(_nchw(x)).numpy()
  logits = np.asarray(model.apply({"params": params}, x))
  err = np.abs(logits - ref).max()
  assert err <= TOL, err
  assert np.abs(logits).max() > 0.05


def test_export_then_torch_to_flax_is_bit_exact(tmp_path):
  _, params, ckpt = _trained_classifier(tmp_path)
  out = tmp_path / "clf.pt"
  assert export_cli.main([str(ckpt), "--format", "openai", "--out", str(out)]) == 0
  back, info = convert.torch_state_dict_to_flax(torch.load(str(out), weights_only=True), act="quick_gelu")
  assert info.num_classes == 3
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(back)
