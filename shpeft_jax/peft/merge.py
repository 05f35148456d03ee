"""Fold LoRA and SSF into the plain weights, so that a LoRA / SSF / SPT-LoRA model is a plain CLIP.

Both are linear reparameterisations of the layer they follow, so merging is exact (up to float
rounding) and the merged params load into `build_model(...)` without additive hooks, export to
PyTorch like any other checkpoint and cost nothing extra at inference:

  LoRA:  y = x W + b + (x a b) * alpha/r            ->  W' = W + reshape(a b * alpha/r)
  SSF:   y = (x W + b) * s + t                      ->  W' = W * s, b' = b * s + t
         after a LayerNorm: (n * g + beta) * s + t  ->  g' = g * s, beta' = beta * s + t
         after conv1 (no bias): the shift t is added to every patch token before the positional
         embedding, so it folds into the patch rows of `positional_embedding` (not the class row).

Where both hook the same linear layer, the model computes SSF(x W + b + LoRA(x)), so LoRA is merged
first. AdaptFormer adapters (a non-linear side branch) and VPT prompts (extra tokens) cannot be
folded into the weights; `merge_additive` refuses them with an error that says so.
"""

from __future__ import annotations

import math

from typing import Any

import jax
import numpy as np

from shpeft_jax import utils
from shpeft_jax.errors import ConfigError
from shpeft_jax.models.clip_vit import AdditiveConfig

from shpeft_jax.param_names import LORA_LEAF_RE as _LORA_RE  # pylint: disable=g-bad-import-order
from shpeft_jax.param_names import SSF_LEAF_RE as _SSF_RE  # pylint: disable=g-bad-import-order
from shpeft_jax.param_names import UNMERGEABLE_RE as _UNMERGEABLE_RE  # pylint: disable=g-bad-import-order


def additive_leaves(params) -> list[str]:
  """Names of the leaves created by additive hooks (lora_, adapter, ssf_, vpt_)."""
  return [n for n in utils.flatten_names(params)
          if _LORA_RE.fullmatch(n) or _SSF_RE.fullmatch(n) or _UNMERGEABLE_RE.fullmatch(n)]


def check_mergeable(params) -> None:
  """Raises ConfigError naming the adapter / VPT leaves, which no plain model can express."""
  bad = [n for n in utils.flatten_names(params) if _UNMERGEABLE_RE.fullmatch(n)]
  if bad:
    kinds = sorted({_UNMERGEABLE_RE.fullmatch(n).group(1).split("_prompts")[0] for n in bad})
    raise ConfigError(
        f"Cannot merge {kinds} parameters ({bad[:3]}{' ...' if len(bad) > 3 else ''}) into a plain "
        "CLIP: an AdaptFormer adapter is a non-linear side branch and VPT adds prompt tokens, so "
        "neither folds into the pretrained weights. Keep such a checkpoint in the Flax format and "
        "evaluate it with the additive model (methods.additive_config_for), or train a mergeable "
        "method (lora, ssf, spt_lora, or any selective method) for PyTorch export.")


def _f32(x) -> np.ndarray:
  return np.asarray(jax.device_get(x), np.float32)


def merge_lora(flat: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
  """W += reshape(a @ b * scale) for every lora_X/{a,b} pair; scale = (alpha or rank) / rank."""
  out = dict(flat)
  targets = sorted({(m.group(1), m.group(2)) for n in flat if (m := _LORA_RE.fullmatch(n))})
  for parent, target in targets:
    prefix = f"{parent}lora_{target}"
    a_name, b_name = f"{parent}lora_{target}/a", f"{parent}lora_{target}/b"
    kernel_name = f"{parent}{target}/kernel"
    if a_name not in flat or b_name not in flat or kernel_name not in flat:
      raise ConfigError(f"LoRA leaves under {prefix!r} are incomplete or have no kernel "
                        f"{kernel_name!r} to merge into; the checkpoint is not a LoRA model.")
    a, b, kernel = _f32(flat[a_name]), _f32(flat[b_name]), _f32(flat[kernel_name])
    rank = a.shape[1]
    scale = (alpha or rank) / rank
    delta = (a @ b) * np.float32(scale)
    if delta.size != kernel.size:
      raise ConfigError(f"LoRA update of {kernel_name!r} has {delta.size} entries, the kernel "
                        f"{kernel.size}; the LoRA factors belong to another model.")
    # a: [d_in, r] and b: [r, d_out] act on the flattened input / output axes: q/k/v kernels are
    # [D, heads, head_dim] (output reshaped), `out` is [heads, head_dim, D] (input flattened).
    out[kernel_name] = kernel + delta.reshape(kernel.shape)
    del out[a_name], out[b_name]
  return out


def merge_ssf(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Folds every ssf_X/{scale,shift} into the op X it follows (see the module docstring)."""
  out = dict(flat)
  for name in list(flat):
    m = _SSF_RE.fullmatch(name)
    if not m or m.group(3) != "scale":
      continue
    parent, target = m.group(1) or "", m.group(2)
    s, t = _f32(flat[name]), _f32(flat[f"{parent}ssf_{target}/shift"])
    del out[name], out[f"{parent}ssf_{target}/shift"]
    weight = next((f"{parent}{target}/{w}" for w in ("kernel", "scale") if
                   f"{parent}{target}/{w}" in flat), None)
    if weight is None:
      raise ConfigError(f"SSF {parent}ssf_{target} follows no known op ({parent}{target}/kernel "
                        "or /scale is missing); the checkpoint is not an SSF model of this CLIP.")
    out[weight] = _f32(out[weight]) * s  # s broadcasts over the op's trailing output axes.
    bias = f"{parent}{target}/bias"
    if bias in flat:
      out[bias] = _f32(out[bias]) * s + t
    elif target == "conv1":
      pos = f"{parent}positional_embedding"
      folded = _f32(out[pos]).copy()
      # A class-token row (then the rows are 1 + grid**2, never a square) never went through conv1.
      first = 0 if math.isqrt(len(folded)) ** 2 == len(folded) else 1
      folded[first:] += t
      out[pos] = folded
    else:
      raise ConfigError(f"SSF after {parent}{target} has a shift but the op has no bias to "
                        "fold it into.")
  return out


def merge_additive(params, additive: AdditiveConfig | None = None):
  """Params with LoRA and SSF folded in and no additive leaves: loadable by a plain model.

  `additive` gives the LoRA alpha (the scale alpha / rank is not stored in the params); None means
  alpha = rank. Refuses adapters and VPT prompts (ConfigError). Returns float32 numpy leaves.
  """
  check_mergeable(params)
  flat = utils.flatten_names(params)
  alpha = additive.lora_alpha if additive is not None else 0.0
  flat = merge_lora(flat, alpha)
  flat = merge_ssf(flat)
  return jax.tree_util.tree_map(_f32, utils.unflatten_names(flat))


def merge_for_method(params, peft_cfg) -> Any:
  """merge_additive with the LoRA alpha of `config.peft` (what the trainer / export calls)."""
  from shpeft_jax.peft import methods  # pylint: disable=g-import-not-at-top
  return merge_additive(params, methods.additive_config_for(peft_cfg))


def export_ready(params, peft_cfg):
  """(params for the trainer's export/model, merged?): LoRA / SSF folded in when present.

  Adapters and VPT prompts stay as they are (the Flax checkpoint keeps them and still evaluates
  with the additive model); `python -m shpeft_jax.export` then refuses them with its own error.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not additive_leaves(params):
    return params, False
  try:
    return merge_for_method(params, peft_cfg), True
  except ConfigError as e:
    logging.warning("Not merging the additive parameters for export: %s", e)
    return params, False
