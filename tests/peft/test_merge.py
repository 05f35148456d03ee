"""Merged LoRA / SSF params give the logits of the unmerged additive model, and export to PyTorch."""

import jax
import numpy as np
import pytest

from shpeft_jax import utils
from shpeft_jax.errors import ConfigError
from shpeft_jax.models import clip_vit
from shpeft_jax.peft import merge, methods

NUM_CLASSES = 3


def _randomised(additive, seed=0):
  """Tiny additive model with random non-zero LoRA `b` and SSF scale/shift (not the identity)."""
  model = clip_vit.build_model("test_tiny", NUM_CLASSES, additive=additive)
  params = clip_vit.init_params(model, jax.random.PRNGKey(seed))
  flat = {n: np.asarray(v) for n, v in utils.flatten_names(params).items()}
  gen = np.random.default_rng(seed + 100)
  for n, v in flat.items():
    if "/lora_" in n and n.endswith("/b"):
      flat[n] = (0.3 * gen.standard_normal(v.shape)).astype(np.float32)
    elif "/ssf_" in n:
      base = 1.0 if n.endswith("/scale") else 0.0
      flat[n] = (base + 0.2 * gen.standard_normal(v.shape)).astype(np.float32)
  return model, utils.unflatten_names(flat)


def _forward(model, params, x):
  return model.apply({"params": params}, x, return_features=True)


X = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (4, 16, 16, 3)))
PLAIN = clip_vit.build_model("test_tiny", NUM_CLASSES)


@pytest.mark.parametrize("additive", [
    clip_vit.AdditiveConfig(lora_rank=2, lora_alpha=6.0, lora_targets=clip_vit.LORA_TARGETS,
                            ssf=True),
    clip_vit.AdditiveConfig(lora_rank=3, lora_targets=("q", "v")),  # alpha 0 -> scale 1.
    clip_vit.AdditiveConfig(ssf=True),
], ids=["lora_all+ssf", "lora_qv", "ssf"])
def test_merged_params_give_the_same_logits_in_a_plain_model(additive):
  model, params = _randomised(additive)
  merged = merge.merge_additive(params, additive)
  plain_shapes = jax.eval_shape(lambda: clip_vit.init_params(PLAIN, jax.random.PRNGKey(0)))
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(plain_shapes)
  assert merge.additive_leaves(merged) == []
  y_add, f_add = _forward(model, params, X)
  y_plain, f_plain = _forward(PLAIN, merged, X)
  np.testing.assert_allclose(np.asarray(f_plain), np.asarray(f_add), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y_plain), np.asarray(y_add), rtol=0, atol=1e-5)
  # The additive parts really change the function (otherwise the test could not fail).
  base = {n: v for n, v in utils.flatten_names(params).items() if n in utils.flatten_names(merged)}
  y_base, _ = _forward(PLAIN, utils.unflatten_names(base), X)
  assert np.abs(np.asarray(y_base) - np.asarray(y_add)).max() > 1e-3


def test_lora_merge_by_hand_for_the_out_projection():
  additive = clip_vit.AdditiveConfig(lora_rank=2, lora_alpha=5.0, lora_targets=("o",))
  _, params = _randomised(additive)
  flat = utils.flatten_names(params)
  a = flat["encoder/resblocks_1/attn/lora_out/a"]
  b = flat["encoder/resblocks_1/attn/lora_out/b"]
  w = flat["encoder/resblocks_1/attn/out/kernel"]  # [heads, head_dim, D]
  merged = utils.flatten_names(merge.merge_additive(params, additive))
  h, hd, d = w.shape
  want = np.empty_like(w)
  for i in range(h):  # ctx is flattened head-major: input index i * hd + j.
    for j in range(hd):
      want[i, j] = w[i, j] + (a[i * hd + j] @ b) * (5.0 / 2)
  np.testing.assert_allclose(merged["encoder/resblocks_1/attn/out/kernel"], want, atol=1e-6)


def test_ssf_after_conv1_folds_into_kernel_and_patch_rows_of_the_positional_embedding():
  _, params = _randomised(clip_vit.AdditiveConfig(ssf=True))
  flat = utils.flatten_names(params)
  s, t = flat["encoder/ssf_conv1/scale"], flat["encoder/ssf_conv1/shift"]
  merged = utils.flatten_names(merge.merge_additive(params))
  np.testing.assert_allclose(merged["encoder/conv1/kernel"], flat["encoder/conv1/kernel"] * s,
                             atol=1e-7)
  pos, pos0 = merged["encoder/positional_embedding"], flat["encoder/positional_embedding"]
  np.testing.assert_array_equal(pos[0], pos0[0])  # The class token never went through conv1.
  np.testing.assert_allclose(pos[1:], pos0[1:] + t, atol=1e-7)
  # LayerNorm: gamma * s, beta * s + t.
  s2, t2 = flat["encoder/resblocks_0/ssf_ln_2/scale"], flat["encoder/resblocks_0/ssf_ln_2/shift"]
  np.testing.assert_allclose(merged["encoder/resblocks_0/ln_2/bias"],
                             flat["encoder/resblocks_0/ln_2/bias"] * s2 + t2, atol=1e-7)


@pytest.mark.parametrize("method", ["adapter", "vpt_shallow", "vpt_deep"])
def test_adapters_and_prompts_are_refused_with_a_clear_error(method):
  cfg = methods.default_peft_config()
  cfg.method = method
  model = clip_vit.build_model("test_tiny", NUM_CLASSES, additive=methods.additive_config_for(cfg))
  params = jax.eval_shape(lambda: clip_vit.init_params(model, jax.random.PRNGKey(0)))
  with pytest.raises(ConfigError, match="cannot|Cannot merge.*export"):
    merge.merge_for_method(params, cfg)


def test_merge_for_method_uses_the_configured_alpha():
  cfg = methods.default_peft_config()
  cfg.method = "lora"
  cfg.lora.rank, cfg.lora.alpha = 2, 8.0  # scale 4
  model, params = _randomised(methods.additive_config_for(cfg))
  merged = merge.merge_for_method(params, cfg)
  y_add, _ = _forward(model, params, X)
  y_plain, _ = _forward(PLAIN, merged, X)
  np.testing.assert_allclose(np.asarray(y_plain), np.asarray(y_add), atol=1e-5)
  wrong = merge.merge_additive(params, clip_vit.AdditiveConfig(lora_rank=2))  # scale 1
  y_wrong, _ = _forward(PLAIN, wrong, X)
  assert np.abs(np.asarray(y_wrong) - np.asarray(y_add)).max() > 1e-4


def test_merged_lora_ssf_model_exports_to_pytorch_like_any_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("safetensors")
  from shpeft_jax import export
  from shpeft_jax.models import torch_reference
  additive = clip_vit.AdditiveConfig(lora_rank=2, lora_targets=clip_vit.LORA_TARGETS, ssf=True)
  model, params = _randomised(additive, seed=3)
  meta = {"model": "test_tiny", "image_size": 16, "num_classes": NUM_CLASSES}
  from shpeft_jax.models.convert import flax_to_torch_state_dict
  with pytest.raises(Exception, match="(?i)lora|additive|merge"):
    flax_to_torch_state_dict(params, "openai")  # Unmerged: refused by export.
  out = str(tmp_path / "model.safetensors")
  export.export_params(merge.merge_additive(params, additive), meta, "openai", out)
  net = torch_reference.load_exported(out)
  with torch.no_grad():
    y_torch = net(torch.from_numpy(np.ascontiguousarray(X.transpose(0, 3, 1, 2)))).numpy()
  y_add, _ = _forward(model, params, X)
  np.testing.assert_allclose(y_torch, np.asarray(y_add), rtol=0, atol=1e-5)


def test_export_ready_merges_lora_ssf_and_leaves_adapters_alone():
  cfg = methods.default_peft_config()
  cfg.method = "lora"
  _, params = _randomised(methods.additive_config_for(cfg))
  out, merged = merge.export_ready(params, cfg)
  assert merged and merge.additive_leaves(out) == []
  cfg.method = "adapter"
  _, params = _randomised(methods.additive_config_for(cfg))
  out, merged = merge.export_ready(params, cfg)
  assert not merged and out is params
  cfg.method = "bitfit"
  _, params = _randomised(methods.additive_config_for(cfg))
  assert merge.export_ready(params, cfg) == (params, False)
