"""PyTorch CLIP vision checkpoints <-> Flax params, as small pure-numpy rules over flat names.

These source layouts reach us:
  * OpenAI CLIP (`visual.conv1.weight`, fused `attn.in_proj_weight`), as the TorchScript archive
    OpenAI publishes or as a plain state dict. open_clip's own ViTs use the same names, sometimes
    behind a `module.` prefix (DDP) or inside `{"state_dict": ...}` (training checkpoints).
  * Hugging Face CLIP (`vision_model.embeddings.patch_embedding.weight`, separate q/k/v/out
    projections, `pre_layrnorm` (sic)). Files of `CLIPModel` and of `CLIPVisionModel` written by
    transformers < 5 carry the `vision_model.` prefix; a transformers >= 5 `CLIPVisionModel` state
    dict has the same names without it. Both are accepted.
  * timm ViTs (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.attn.qkv`, `norm`): plain
    timm files, and open_clip towers with a timm trunk (`visual.trunk.*`, e.g. BiomedCLIP).
    timm's DINOv2 (LayerScale `ls1.gamma`, `reg_token`, SwiGLU), UNI-like `init_values` towers and
    MAE-style average-pool trunks (`fc_norm`) are the same class with other arguments.
  * transformers' `Dinov2Model` / `Dinov2WithRegistersModel` (`hf_dinov2`) and `ViTModel`
    (`hf_vit`), bare or behind `dinov2.` / `vit.` (`shpeft_jax/models/hf_ssl_layouts.py`).
  * Our own exports (`flax_to_torch_state_dict`): any of the above, plus `head.weight` / `head.bias`.

The names and shapes say what the weights are, not how the tower computes: the activation
(QuickGELU or exact GELU) and the LayerNorm epsilon come from the checkpoint's config
(`config.json`, `open_clip_config.json`, timm's `architecture`, our export metadata) or from the
caller (`--act`, `--ln_eps`); where nothing says which, conversion stops and says so (see
`tower_evidence`).

Every layout is first validated in its own names (so errors name the key the user has in the
file), then mapped onto one canonical layout (OpenAI names without prefix, fused in_proj, torch
array layouts, plus `conv1.bias` for timm trunks), and from there onto the Flax tree of
`shpeft_jax.models.clip_vit`. Export runs the same two steps backwards; each rule is a transpose,
reshape, split or concatenate, so the round trip Flax -> torch -> Flax is bit-exact.

Reading files needs torch / safetensors (imported lazily); the rules themselves need only numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import zipfile
from typing import Any, Mapping

import numpy as np

from shpeft_jax.errors import CheckpointError, ConfigError
from shpeft_jax.models import clip_vit
from shpeft_jax.models import hf_ssl_layouts
# Name prefixes of the additive / prompt PEFT parameters (see clip_vit.py). They have no place in
# a plain CLIP state dict: merge them into the base weights first.
from shpeft_jax.param_names import ADDITIVE_PREFIXES
from shpeft_jax.utils import flatten_names

FORMATS = ("auto", "openai", "open_clip", "hf", "timm", "hf_dinov2", "hf_vit")
LAYOUTS = ("openai", "open_clip", "hf", "timm", "hf_dinov2", "hf_vit")  # export formats
HF_SSL = ("hf_dinov2", "hf_vit")  # transformers Dinov2Model (+ registers) and ViTModel
# Prefixes of the HF classification models around those towers (their `classifier.*` is dropped).
HF_SSL_PREFIXES = {"dinov2.": "hf_dinov2", "vit.": "hf_vit"}
HF_PREFIX = "vision_model."
OPENAI_PREFIX = "visual."
OPEN_CLIP_TIMM_PREFIX = "visual.trunk."
TIMM_CLASSIFIER_PREFIX = "trunk."  # our timm classifier export: trunk.* + head.*
_QKV = ("query", "key", "value")
_MAX_LISTED = 8
_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "swiglu": "swiglu"}


@dataclasses.dataclass(frozen=True)
class ConversionInfo:
  """What `torch_state_dict_to_flax` found in the source and what it produced."""
  model: str                  # preset name, e.g. 'ViT-B/16'
  image_size: int             # image size of the produced params
  source_image_size: int      # image size the checkpoint's positional embedding was trained at
  source_format: str          # 'openai' | 'open_clip' | 'hf' | 'timm'
  num_classes: int | None     # set when the source carried a `head` (our own exports)
  ignored_keys: tuple[str, ...] = ()  # known non-tower keys dropped (proj, text tower, buffers)
  tower: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # clip_vit.TOWER_FIELDS
  tower_source: str = ""      # where act / ln_eps were read from


@dataclasses.dataclass(frozen=True)
class Evidence:
  """A value of a tower field and the place it was read from (for messages and meta.json)."""
  value: Any
  source: str


# ----------------------------------------------------------------------------------------------
# Expected tensors per layout.


def _ln(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
  return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def openai_shapes(cfg: clip_vit.ViTConfig, num_tokens: int | None = None) -> dict[str, tuple]:
  """{name: shape} of the OpenAI-layout tower (no `visual.` prefix, no `proj`), in file order.
  Our canonical layout; `conv1.bias` only for towers with a patch bias (timm trunks)."""
  d, p, m = cfg.width, cfg.patch_size, cfg.mlp_dim
  shapes = {"conv1.weight": (d, 3, p, p)}
  if cfg.patch_bias:
    shapes["conv1.bias"] = (d,)
  shapes.update({"class_embedding": (d,), "positional_embedding": (num_tokens or cfg.num_tokens, d)})
  if cfg.registers:
    shapes["register_tokens"] = (cfg.registers, d)
  if cfg.ln_pre:
    shapes.update(_ln("ln_pre", d))
  for i in range(cfg.layers):
    b = f"transformer.resblocks.{i}."
    shapes[b + "attn.in_proj_weight"] = (3 * d, d)
    if cfg.qkv_bias:
      shapes[b + "attn.in_proj_bias"] = (3 * d,)
    shapes.update({b + "attn.out_proj.weight": (d, d), b + "attn.out_proj.bias": (d,)})
    shapes.update(_ln(b + "ln_1", d))
    shapes.update({b + "mlp.c_fc.weight": (m, d), b + "mlp.c_fc.bias": (m,),
                   b + "mlp.c_proj.weight": (d, _mlp_hidden(cfg)), b + "mlp.c_proj.bias": (d,)})
    shapes.update(_ln(b + "ln_2", d))
    if cfg.layer_scale:
      shapes.update({b + "ls_1": (d,), b + "ls_2": (d,)})
  if cfg.final_norm:
    shapes.update(_ln("ln_post", d))
  if cfg.fc_norm:
    shapes.update(_ln("fc_norm", d))
  return shapes


def _mlp_hidden(cfg: clip_vit.ViTConfig) -> int:
  """Inputs of the MLP's second linear: half of c_fc's outputs in a SwiGLU MLP."""
  return cfg.mlp_dim // 2 if cfg.act == "swiglu" else cfg.mlp_dim


def hf_shapes(cfg: clip_vit.ViTConfig, num_tokens: int | None = None) -> dict[str, tuple]:
  """{name: shape} of the HF CLIP vision tower without the `vision_model.` prefix."""
  d, p, m = cfg.width, cfg.patch_size, cfg.mlp_dim
  shapes = {"embeddings.class_embedding": (d,), "embeddings.patch_embedding.weight": (d, 3, p, p),
            "embeddings.position_embedding.weight": (num_tokens or cfg.num_tokens, d)}
  shapes.update(_ln("pre_layrnorm", d))
  for i in range(cfg.layers):
    b = f"encoder.layers.{i}."
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      shapes.update({f"{b}self_attn.{proj}.weight": (d, d), f"{b}self_attn.{proj}.bias": (d,)})
    shapes.update(_ln(b + "layer_norm1", d))
    shapes.update({b + "mlp.fc1.weight": (m, d), b + "mlp.fc1.bias": (m,),
                   b + "mlp.fc2.weight": (d, m), b + "mlp.fc2.bias": (d,)})
    shapes.update(_ln(b + "layer_norm2", d))
  shapes.update(_ln("post_layernorm", d))
  return shapes


def timm_shapes(cfg: clip_vit.ViTConfig, num_tokens: int | None = None) -> dict[str, tuple]:
  """{name: shape} of a timm `VisionTransformer(num_classes=0, class_token=True)` state dict."""
  d, p, m = cfg.width, cfg.patch_size, cfg.mlp_dim
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, num_tokens or cfg.num_tokens, d),
            "patch_embed.proj.weight": (d, 3, p, p)}
  if cfg.registers:
    shapes["reg_token"] = (1, cfg.registers, d)
  if cfg.patch_bias:
    shapes["patch_embed.proj.bias"] = (d,)
  if cfg.ln_pre:
    shapes.update(_ln("norm_pre", d))
  for i in range(cfg.layers):
    b = f"blocks.{i}."
    shapes.update(_ln(b + "norm1", d))
    shapes[b + "attn.qkv.weight"] = (3 * d, d)
    if cfg.qkv_bias:
      shapes[b + "attn.qkv.bias"] = (3 * d,)
    shapes.update({b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)})
    if cfg.layer_scale:
      shapes.update({b + "ls1.gamma": (d,), b + "ls2.gamma": (d,)})
    shapes.update(_ln(b + "norm2", d))
    shapes.update({b + "mlp.fc1.weight": (m, d), b + "mlp.fc1.bias": (m,),
                   b + "mlp.fc2.weight": (d, _mlp_hidden(cfg)), b + "mlp.fc2.bias": (d,)})
  if cfg.final_norm:
    shapes.update(_ln("norm", d))
  if cfg.fc_norm:
    shapes.update(_ln("fc_norm", d))
  return shapes


@dataclasses.dataclass(frozen=True)
class _Layout:
  conv: str              # patch projection weight
  conv_bias: str
  pos: str               # positional embedding
  cls: str               # class token
  ln_pre: str            # prefix of the pre-LayerNorm
  mlp: tuple[str, ...]   # first MLP weight of block 0 (gives mlp_dim), by MLP kind
  block: re.Pattern
  shapes: Any


_LAYOUT = {
    "openai": _Layout("conv1.weight", "conv1.bias", "positional_embedding", "class_embedding",
                      "ln_pre", ("transformer.resblocks.0.mlp.c_fc.weight",),
                      re.compile(r"transformer\.resblocks\.(\d+)\."), openai_shapes),
    "hf": _Layout("embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
                  "embeddings.position_embedding.weight", "embeddings.class_embedding",
                  "pre_layrnorm", ("encoder.layers.0.mlp.fc1.weight",),
                  re.compile(r"encoder\.layers\.(\d+)\."), hf_shapes),
    "timm": _Layout("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token",
                    "norm_pre", ("blocks.0.mlp.fc1.weight",), re.compile(r"blocks\.(\d+)\."),
                    timm_shapes),
    **{layout: _Layout("embeddings.patch_embeddings.projection.weight",
                       "embeddings.patch_embeddings.projection.bias",
                       "embeddings.position_embeddings", "embeddings.cls_token", "-",
                       ("encoder.layer.0.mlp.fc1.weight", "encoder.layer.0.mlp.weights_in.weight",
                        "encoder.layer.0.intermediate.dense.weight"),
                       re.compile(r"encoder\.layer\.(\d+)\."),
                       functools.partial(hf_ssl_layouts.shapes, layout, openai_shapes))
       for layout in HF_SSL},
}
# Tower keys that are legitimately present but not part of our model.
_IGNORED_TOWER_KEYS = {"openai": {"proj"}, "hf": {"embeddings.position_ids"}, "timm": set(),
                       **hf_ssl_layouts.IGNORED}

# HF <-> OpenAI names for everything except the q/k/v split.
_HF_TO_OPENAI_STATIC = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias",
}
_HF_TO_OPENAI_BLOCK = {
    "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}
# timm <-> OpenAI names; cls_token / pos_embed also drop / add their leading batch axis.
_TIMM_TO_OPENAI_STATIC = {
    "patch_embed.proj.weight": "conv1.weight", "patch_embed.proj.bias": "conv1.bias",
    "norm_pre.weight": "ln_pre.weight", "norm_pre.bias": "ln_pre.bias",
    "norm.weight": "ln_post.weight", "norm.bias": "ln_post.bias",
    "fc_norm.weight": "fc_norm.weight", "fc_norm.bias": "fc_norm.bias",
}
# Optional entries (qkv bias, LayerScale) are mapped when the tower has them.
_TIMM_TO_OPENAI_BLOCK = {
    "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
    "ls1.gamma": "ls_1", "ls2.gamma": "ls_2",
    **{f"{t}.{s}": f"{o}.{s}" for t, o in (("norm1", "ln_1"), ("attn.proj", "attn.out_proj"),
                                           ("norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                           ("mlp.fc2", "mlp.c_proj")) for s in ("weight", "bias")},
}




# ----------------------------------------------------------------------------------------------
# Small numpy helpers.


def to_numpy(value) -> np.ndarray:
  """A torch tensor / numpy array as numpy; floating point (fp16, bf16) becomes float32."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch.
    t = value.detach().cpu()
    if t.is_floating_point():
      t = t.float()
    return t.numpy()
  arr = np.asarray(value)
  if np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.float32:
    arr = arr.astype(np.float32)
  return arr


def _fmt(shape) -> str:
  return str(tuple(int(s) for s in shape))


def _listing(keys, n: int = _MAX_LISTED, sep: str = ", ") -> str:
  keys = list(keys)
  more = f"{sep}... and {len(keys) - n} more" if len(keys) > n else ""
  return sep.join(keys[:n]) + more


# ----------------------------------------------------------------------------------------------
# Positional embedding resampling (numpy re-implementation of torch's bicubic F.interpolate).


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _bicubic_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D bicubic resampling with align_corners=False.

  antialias=False: aten upsample_bicubic2d (a = -0.75, out-of-range taps clamped to the edge).
  antialias=True: aten's PIL-style separable filter (a = -0.5, support widened by the scale when
  downsampling, taps outside the input dropped and the rest renormalised).
  """
  scale = n_in / n_out
  w = np.zeros((n_out, n_in), np.float64)
  if not antialias:
    for i in range(n_out):
      src = scale * (i + 0.5) - 0.5
      base = math.floor(src)
      t = src - base
      taps = _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
      for k, c in enumerate(taps):
        w[i, min(max(base - 1 + k, 0), n_in - 1)] += c
    return w
  support = 2.0 * scale if scale >= 1 else 2.0
  invscale = 1.0 / scale if scale >= 1 else 1.0
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    js = np.arange(lo, hi)
    taps = _cubic((js - center + 0.5) * invscale, -0.5)
    total = taps.sum()
    w[i, lo:hi] = taps / total if total != 0 else taps
  return w


def resize_positional_embedding(pos: np.ndarray, new_grid: int, *, antialias: bool = True,
                                class_pos: bool = True) -> np.ndarray:
  """[1 + g*g, D] -> [1 + new_grid**2, D] (without the class row when not `class_pos`): bicubic
  on the patch grid, class token kept as is.

  The same operation as open_clip's `resize_pos_embed` and timm's `resample_abs_pos_embed`
  (bicubic, align_corners=False, antialias=True), or with antialias=False transformers' Dinov2 /
  ViT `interpolate_pos_encoding`.
  """
  pos = np.asarray(pos)
  n, d = pos.shape
  lead = int(class_pos)
  old = math.isqrt(n - lead)
  if old * old != n - lead:
    raise CheckpointError(
        f"positional embedding has {n} rows; expected {'1 class token + ' if lead else ''}a "
        f"square grid of patches.")
  if old == new_grid:
    return pos
  grid = pos[lead:].astype(np.float64).reshape(old, old, d)
  m = _bicubic_matrix(old, new_grid, antialias)
  grid = np.einsum("ih,hwd->iwd", m, grid)
  grid = np.einsum("jw,iwd->ijd", m, grid)
  out = np.concatenate([pos[:lead].astype(np.float64), grid.reshape(new_grid * new_grid, d)], axis=0)
  return out.astype(pos.dtype)


# ----------------------------------------------------------------------------------------------
# Layout detection and architecture inference.


def _unwrap(sd: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
  """Unpacks training checkpoints ({'state_dict': ...}) and DDP `module.` prefixes."""
  wrapped = False
  for key in ("state_dict", "model", "module"):
    inner = sd.get(key) if isinstance(sd, Mapping) else None
    if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
      sd, wrapped = inner, True
      break
  if not isinstance(sd, Mapping):
    raise CheckpointError(f"Expected a state dict (name -> tensor), got {type(sd).__name__}.")
  out = {}
  for k, v in sd.items():
    if k.startswith("module."):
      k, wrapped = k[len("module."):], True
    out[k] = v
  return out, wrapped



_SIGLIP_MARKERS = ("attn_pool.latent", "head.probe", "head.attention.in_proj_weight")


def _refuse_siglip(keys: set[str]) -> None:
  hits = sorted(k for k in keys if k.endswith(_SIGLIP_MARKERS))
  if hits:
    raise CheckpointError(
        f"This is a SigLIP vision tower (no class token; attention-pooling head {hits[0]}). "
        f"shpeft_jax fine-tunes CLIP ViTs, which pool the class token; SigLIP is not supported: "
        f"convert an OpenAI / open_clip / Hugging Face CLIP or a BiomedCLIP checkpoint.")


# Towers whose computation the Flax ViT does not implement, refused by a key that only they have
# (never converted approximately).
_UNSUPPORTED = (
    (("relative_position_bias_table", "relative_position_index", "rel_pos_bias"),
     "a relative-position ViT (BEiT / data2vec / Swin-style relative position bias)"),
    (("rel_pos_h", "rel_pos_w"), "a ViT with decomposed relative positions (SAM / MViT)"),
    (("patch_embed.backbone.", "patch_embeddings.backbone."), "a hybrid CNN-stem ViT (R50+ViT)"),
    (("layers.0.blocks.", "downsample.reduction"), "a Swin transformer (windowed attention)"),
    (("attn.q_norm.", "attn.k_norm.", "attention.q_norm."), "a ViT with query/key normalisation"),
    (("dist_token", "distillation_token"), "a DeiT with a distillation token"),
    (("gamma_1", "lambda_1", "attn.q_bias"), "a BEiT-style ViT (gamma_1 layer scale, q/v biases)"),
    (("attn_pool.", "head.attention."), "an attention-pooled ViT (MAP head)"),
)


def _refuse_unsupported(keys: set[str]) -> None:
  for markers, what in _UNSUPPORTED:
    hit = next((k for k in sorted(keys) if any(m in k for m in markers)), None)
    if hit is not None:
      raise CheckpointError(
          f"This is {what} (key {hit}); shpeft_jax's ViT computes absolute learned positions, "
          f"plain multi-head attention and a patch projection, and does not convert other towers "
          f"approximately. Supported: OpenAI / open_clip / HF CLIP, timm vit_* (incl. DINOv2, "
          f"registers, MAE avg-pool), HF Dinov2Model / Dinov2WithRegistersModel / ViTModel.")


def _hf_ssl_of(keys: set[str]) -> tuple[str, str] | None:
  """(layout, prefix) of an HF Dinov2 / ViT tower, bare or inside its classification model."""
  for prefix in ("", *HF_SSL_PREFIXES):
    if prefix + "embeddings.patch_embeddings.projection.weight" not in keys:
      continue
    if prefix:
      return HF_SSL_PREFIXES[prefix], prefix
    vit = any(k.startswith("encoder.layer.0.layernorm_before.") for k in keys)
    return ("hf_vit" if vit else "hf_dinov2"), prefix
  return None


def _detect(keys: set[str], fmt: str) -> tuple[str, str]:
  """(layout, prefix) of the vision tower; raises for other architectures and text-only files."""
  has = lambda prefix: any(k.startswith(prefix) for k in keys)
  _refuse_siglip(keys)
  _refuse_unsupported(keys)
  ssl = _hf_ssl_of(keys)
  if ssl is not None:
    layout, prefix = ssl
  elif has(OPEN_CLIP_TIMM_PREFIX):
    layout, prefix = "timm", OPEN_CLIP_TIMM_PREFIX
  elif has(OPENAI_PREFIX):
    if has("visual.attnpool.") or has("visual.layer1.") or has("visual.bn1."):
      raise CheckpointError(
          "This is a CLIP ModifiedResNet image tower (keys visual.layer1.*, visual.attnpool.*), "
          "not a ViT; convert a ViT checkpoint (ViT-B/16, ViT-B/32 or ViT-L/14).")
    layout, prefix = "openai", OPENAI_PREFIX
  elif has(HF_PREFIX):
    layout, prefix = "hf", HF_PREFIX
  elif has(TIMM_CLASSIFIER_PREFIX + "patch_embed."):
    layout, prefix = "timm", TIMM_CLASSIFIER_PREFIX
  elif "conv1.weight" in keys and "class_embedding" in keys:
    layout, prefix = "openai", ""
  elif "embeddings.patch_embedding.weight" in keys:
    layout, prefix = "hf", ""
  elif "patch_embed.proj.weight" in keys:
    layout, prefix = "timm", ""
  elif has("layer1.") or "bn1.weight" in keys or "fc.weight" in keys or has("features."):
    raise CheckpointError(
        f"This checkpoint is not a CLIP ViT (it has CNN keys such as "
        f"{_listing(sorted(k for k in keys if k.startswith(('layer1.', 'bn1', 'fc.', 'features.'))), 3)}); "
        f"convert an OpenAI / open_clip / Hugging Face CLIP ViT checkpoint.")
  elif (has("text_model.") or "token_embedding.weight" in keys or "text_projection" in keys
        or has("transformer.")):
    raise CheckpointError(
        "This is a text-only file: it has CLIP text-tower keys (token_embedding / text_model.*) but "
        "no vision-tower keys (visual.* or vision_model.*). Convert the full CLIP checkpoint or the "
        "vision model file.")
  else:
    raise CheckpointError(
        f"No CLIP vision-tower keys found (expected visual.conv1.weight, "
        f"vision_model.embeddings.patch_embedding.weight or a timm patch_embed.proj.weight); the "
        f"file has: {_listing(sorted(keys))}.")
  allowed = {"hf": ("hf",), "openai": ("openai", "open_clip"), "timm": ("timm", "open_clip"),
             "hf_dinov2": ("hf_dinov2",), "hf_vit": ("hf_vit",)}[layout]
  if prefix == OPEN_CLIP_TIMM_PREFIX:
    allowed = ("open_clip",)
  if fmt != "auto" and fmt not in allowed:
    raise CheckpointError(f"--format {fmt}, but the file has {layout} keys "
                          f"({prefix}{_LAYOUT[layout].conv}); use --format {allowed[0]} (or auto).")
  return layout, prefix


def _preset_for(patch: int, width: int, layers: int, mlp_dim: int | None,
                heads: int | None = None) -> str | None:
  """The preset of exactly this shape (heads too when known), else None."""
  for name in clip_vit.model_names():
    c = clip_vit.get_model_config(name)
    if ((c.patch_size, c.width, c.layers) == (patch, width, layers)
        and mlp_dim in (None, c.mlp_dim) and heads in (None, c.heads)):
      return name
  return None


def _model_of_shape(shape: Mapping[str, Any], heads: int | None, found: str, where: str) -> str:
  """The preset of the tower's shape, or its shape name (`clip_vit.spec_name`): any size."""
  guess = _preset_for(shape["patch"], shape["width"], shape["layers"], shape["mlp_dim"], heads)
  if guess is not None:
    return guess
  if heads is None:
    raise CheckpointError(
        f"The checkpoint's vision tower ({found}; from {where}) is no preset "
        f"{clip_vit.model_names()} and its number of attention heads is in no config beside it "
        f"(the weights do not say): pass --heads N (width / 64 = {shape['width'] / 64:g} for "
        f"OpenAI-style CLIP, 16 for ViT-H/14 and ViT-g/14).")
  if shape["width"] % heads:
    raise CheckpointError(f"--heads {heads} does not divide the tower's width {shape['width']}.")
  return clip_vit.spec_name(shape["patch"], shape["width"], shape["layers"], heads,
                            shape["mlp_dim"] or 4 * shape["width"])


def _describe(patch, width, layers, mlp_dim) -> str:
  return f"patch {patch}, width {width}, {layers} layers, mlp {mlp_dim}"


# ----------------------------------------------------------------------------------------------
# Activation and LayerNorm epsilon: what each kind of checkpoint says about them.


def _act_from_name(value: str, source: str) -> str:
  act = _HF_ACTS.get(str(value))
  if act is None:
    raise CheckpointError(
        f"{source} says the activation is {value!r}; shpeft_jax supports quick_gelu and gelu (exact "
        f"erf). A tanh-approximated GELU tower cannot be represented exactly.")
  return act


def timm_vit_tower(name: str) -> dict[str, Any]:
  """act / ln_eps of a timm ViT model name, by timm's own model definitions: CLIP towers
  (`vit_*_clip_*`) use torch's LayerNorm (eps 1e-5), QuickGELU only in `*quickgelu*` variants;
  the other plain `vit_{size}_patch{p}_{res}` models use exact GELU and eps 1e-6."""
  base = name.split(".")[0].split("/")[-1]  # drop the pretrained tag and an hf-hub: prefix
  if "siglip" in base:
    raise CheckpointError(f"timm model {name!r} is a SigLIP tower (no class token, MAP pooling); "
                          f"SigLIP is not supported.")
  if re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch\d+_clip(_quickgelu)?_\d+", base):
    return {"act": "quick_gelu" if "quickgelu" in base else "gelu", "ln_eps": 1e-5}
  if re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch\d+_\d+", base):
    return {"act": "gelu", "ln_eps": 1e-6}
  # DINOv2 (with registers): timm's defaults, SwiGLU in the giant one.
  m = re.fullmatch(r"vit_(small|base|large|giant)_patch14_(reg\d+_)?dinov2", base)
  if m:
    return {"act": "swiglu" if m.group(1) == "giant" else "gelu", "ln_eps": 1e-6}
  raise CheckpointError(
      f"timm model {name!r}: shpeft_jax does not know its activation and LayerNorm epsilon; pass "
      f"--act quick_gelu|gelu and --ln_eps (as in the model's timm definition).")


def _timm_pool(global_pool: str, where: str) -> str:
  pools = {"token": "cls", "avg": "mean"}
  if global_pool not in pools:
    raise CheckpointError(f"{where}: global_pool {global_pool!r}; supported: 'token' (class "
                          f"token) and 'avg' (mean of the patch tokens).")
  return pools[global_pool]


# Heads of timm's ViT sizes (vit_{size}_patch..., DINOv2 included): width / 64, except huge (80).
_TIMM_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "giant": 24}


def timm_vit_heads(name: str) -> int | None:
  """The attention heads of a timm vit_{size}_... architecture name (None for other names)."""
  m = re.match(r"vit_(tiny|small|base|large|huge|giant)_patch", name.split("/")[-1])
  if m is None or (m.group(1) == "giant" and "dinov2" not in name):
    return None
  return _TIMM_HEADS[m.group(1)]


def _open_clip_evidence(cfg: Mapping[str, Any], source: str) -> dict[str, Evidence]:
  model_cfg = cfg.get("model_cfg", cfg)
  vision = model_cfg.get("vision_cfg") or {}
  timm_name = vision.get("timm_model_name")
  if timm_name:
    pool = vision.get("timm_pool", "avg")  # open_clip's default when the key is absent
    if pool not in ("", "token"):
      raise CheckpointError(f"{source}: the timm trunk pools with {pool!r}; only class-token "
                            f"towers (timm_pool '' as in BiomedCLIP) are supported.")
    tower = timm_vit_tower(timm_name)
    where = f"{source} (timm_model_name {timm_name})"
    return {k: Evidence(v, where) for k, v in tower.items()}
  if "init_logit_bias" in model_cfg:
    raise CheckpointError(f"{source} describes a SigLIP model (init_logit_bias); SigLIP towers have "
                          f"no class token and are not supported.")
  unsupported = {k: vision[k] for k in ("attentional_pool", "final_ln_after_pool", "ls_init_value",
                                        "qk_norm", "scale_attn", "scale_fc", "scale_heads",
                                        "scale_attn_inner", "scaled_cosine_attn") if vision.get(k)}
  if vision.get("pool_type", "tok") != "tok":
    unsupported["pool_type"] = vision["pool_type"]
  if vision.get("pos_embed_type", "learnable") != "learnable":
    unsupported["pos_embed_type"] = vision["pos_embed_type"]
  if unsupported:
    raise CheckpointError(f"{source}: vision_cfg sets {unsupported}; shpeft_jax's tower is the plain "
                          f"CLIP ViT (class-token pooling, learnable positions, no layer scale).")
  if (vision.get("act_kwargs") or {}).get("approximate", "none") != "none":
    raise CheckpointError(f"{source}: act_kwargs {vision['act_kwargs']} (tanh GELU) is not supported.")
  where = f"{source} (quick_gelu: {bool(model_cfg.get('quick_gelu', False))})"
  out = {"act": Evidence("quick_gelu" if model_cfg.get("quick_gelu") else "gelu", where)}
  eps = (vision.get("norm_kwargs") or {}).get("eps")
  out["ln_eps"] = Evidence(float(eps) if eps is not None else clip_vit.LN_EPS,
                           f"{source} (vision_cfg.norm_kwargs)" if eps is not None else where)
  return out


# transformers' config classes: their defaults (what a key left out of config.json builds).
_HF_CONFIG_DEFAULTS = {
    "clip": ("CLIPVisionConfig", "quick_gelu", clip_vit.LN_EPS),
    "dinov2": ("Dinov2Config", "gelu", 1e-6),
    "dinov2_with_registers": ("Dinov2WithRegistersConfig", "gelu", 1e-6),
    "vit": ("ViTConfig", "gelu", 1e-12),
}


def _hf_evidence(cfg: Mapping[str, Any], source: str) -> dict[str, Evidence]:
  model_type = str(cfg.get("model_type", "clip"))
  model_type = "clip" if model_type.startswith("clip") else model_type
  if model_type not in _HF_CONFIG_DEFAULTS:
    raise CheckpointError(f"{source}: model_type {model_type!r} is not a supported vision tower; "
                          f"supported: {sorted(_HF_CONFIG_DEFAULTS)} (CLIP, Dinov2, ViT).")
  cls, act_default, eps_default = _HF_CONFIG_DEFAULTS[model_type]
  act = cfg.get("hidden_act", act_default)
  eps = cfg.get("layer_norm_eps", eps_default)
  absent = lambda k: "" if k in cfg else f", absent: {cls}'s default"
  out = {"act": Evidence(_act_from_name(act, f"{source} hidden_act"),
                         f"{source} (hidden_act {act}{absent('hidden_act')})"),
         "ln_eps": Evidence(float(eps), f"{source} (layer_norm_eps {eps}{absent('layer_norm_eps')})")}
  if cfg.get("use_swiglu_ffn"):
    out["act"] = Evidence("swiglu", f"{source} (use_swiglu_ffn)")
  return out


def _swiglu_evidence(evidence: Mapping[str, Evidence], swiglu: bool) -> dict[str, Evidence]:
  """The MLP's shapes say whether it is gated (SwiGLU): a config may not say otherwise."""
  said = evidence.get("act")
  if said is not None and (said.value == "swiglu") != swiglu:
    raise CheckpointError(
        f"{said.source} says the activation is {said.value}, but the MLP weights "
        f"{'are' if swiglu else 'are not'} a gated SwiGLU MLP (second linear taking half of the "
        f"first one's outputs); the config does not belong to these weights.")
  if swiglu:
    return {**evidence, "act": Evidence("swiglu", "the MLP shapes (a gated SwiGLU MLP)")}
  return dict(evidence)


def _resolve_tower(layout: str, ln_pre: bool, evidence: Mapping[str, Evidence],
                   act: str | None, ln_eps: float | None) -> tuple[dict[str, Any], str]:
  """(act, ln_eps) from the file's evidence and the caller's flags; a flag may fill in what the
  file does not say, never contradict it; nothing known about the activation is an error."""
  given = {"act": act, "ln_eps": None if ln_eps is None else float(ln_eps)}
  # Class defaults of LayerNorm where the layout fixes it: OpenAI / open_clip / HF CLIP use
  # torch's 1e-5; timm's VisionTransformer 1e-6 (its CLIP-style pre-norm towers override to 1e-5,
  # so a pre-norm timm file without a config has no default); Dinov2Config 1e-6, ViTConfig 1e-12.
  eps_default = {"openai": clip_vit.LN_EPS, "hf": clip_vit.LN_EPS,
                 "timm": None if ln_pre else 1e-6, "hf_dinov2": 1e-6, "hf_vit": 1e-12}[layout]
  out, sources = {}, []
  for field, flag in (("act", "--act"), ("ln_eps", "--ln_eps")):
    ev = evidence.get(field)
    if ev is not None and given[field] is not None and given[field] != ev.value:
      raise CheckpointError(f"{flag} {given[field]} contradicts the checkpoint: {ev.source} says "
                            f"{ev.value}. Drop {flag} (or fix the config file).")
    if ev is not None:
      out[field] = ev.value
      sources.append(f"{field} from {ev.source}")
    elif given[field] is not None:
      out[field] = given[field]
      sources.append(f"{field} from {flag}")
    elif field == "ln_eps" and eps_default is not None:
      out[field] = eps_default
      sources.append(f"ln_eps {eps_default} ({layout} default)")
    elif field == "act":
      raise CheckpointError(
          "The checkpoint does not say which activation its tower uses (QuickGELU in OpenAI CLIP "
          "and open_clip '-quickgelu' models, exact GELU in LAION / DataComp open_clip towers and "
          "timm), and guessing wrong changes every feature. Put the "
          "config beside the weights (open_clip_config.json or config.json) or pass "
          "--act quick_gelu|gelu (Python: act=...).")
    else:
      raise CheckpointError(
          "This timm tower has a pre-norm (norm_pre), as timm's CLIP towers do, and nothing says "
          "its LayerNorm epsilon; pass --ln_eps (1e-5 for timm's vit_*_clip_* models) or put "
          "timm's config.json (with `architecture`) beside the weights.")
  out["act"] = _act_from_name(out["act"], "act")
  return out, "; ".join(sources)


# ----------------------------------------------------------------------------------------------
# torch -> Flax.


def _openai_to_flax(sd: Mapping[str, np.ndarray], cfg: clip_vit.ViTConfig) -> dict:
  """Canonical OpenAI-layout tower (validated, correct shapes) -> Flax `encoder` subtree."""
  d, h = cfg.width, cfg.heads
  hd = d // h
  ln = lambda p: {"scale": sd[f"{p}.weight"], "bias": sd[f"{p}.bias"]}
  enc: dict[str, Any] = {"conv1": {"kernel": sd["conv1.weight"].transpose(2, 3, 1, 0)}}  # OIHW->HWIO
  if cfg.patch_bias:
    enc["conv1"]["bias"] = sd["conv1.bias"]
  enc["class_embedding"] = sd["class_embedding"]
  enc["positional_embedding"] = sd["positional_embedding"]
  if cfg.registers:
    enc["register_tokens"] = sd["register_tokens"]
  if cfg.ln_pre:
    enc["ln_pre"] = ln("ln_pre")
  for i in range(cfg.layers):
    b = f"transformer.resblocks.{i}."
    weights = np.split(sd[b + "attn.in_proj_weight"], 3, axis=0)  # [out, in] each
    attn = {n: {"kernel": w.T.reshape(d, h, hd)} for n, w in zip(_QKV, weights)}
    if cfg.qkv_bias:
      for n, bb in zip(_QKV, np.split(sd[b + "attn.in_proj_bias"], 3, axis=0)):
        attn[n]["bias"] = bb.reshape(h, hd)
    attn["out"] = {"kernel": sd[b + "attn.out_proj.weight"].T.reshape(h, hd, d),
                   "bias": sd[b + "attn.out_proj.bias"]}
    dense = lambda p: {"kernel": sd[f"{p}.weight"].T, "bias": sd[f"{p}.bias"]}
    enc[f"resblocks_{i}"] = {
        "ln_1": ln(b + "ln_1"), "attn": attn, "ln_2": ln(b + "ln_2"),
        "mlp": {"c_fc": dense(b + "mlp.c_fc"), "c_proj": dense(b + "mlp.c_proj")},
    }
    if cfg.layer_scale:
      enc[f"resblocks_{i}"].update(ls_1=sd[b + "ls_1"], ls_2=sd[b + "ls_2"])
  if cfg.final_norm:
    enc["ln_post"] = ln("ln_post")
  if cfg.fc_norm:
    enc["fc_norm"] = ln("fc_norm")
  return _contiguous_f32(enc)


def _contiguous_f32(tree):
  if isinstance(tree, dict):
    return {k: _contiguous_f32(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, dtype=np.float32)


def _hf_to_openai(sd: Mapping[str, np.ndarray], cfg: clip_vit.ViTConfig) -> dict[str, np.ndarray]:
  out = {_HF_TO_OPENAI_STATIC[k]: v for k, v in sd.items() if k in _HF_TO_OPENAI_STATIC}
  for i in range(cfg.layers):
    src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
    for hf, oa in _HF_TO_OPENAI_BLOCK.items():
      for s in ("weight", "bias"):
        out[f"{dst}{oa}.{s}"] = sd[f"{src}{hf}.{s}"]
    for s, fused in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
      out[f"{dst}attn.{fused}"] = np.concatenate(
          [sd[f"{src}self_attn.{p}_proj.{s}"] for p in "qkv"], axis=0)
  return out


def _openai_to_hf(sd: Mapping[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
  out = {hf: sd[oa] for hf, oa in _HF_TO_OPENAI_STATIC.items()}
  for i in range(layers):
    hf_b, oa_b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
    for s, fused in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
      for p, part in zip("qkv", np.split(sd[f"{oa_b}attn.{fused}"], 3, axis=0)):
        out[f"{hf_b}self_attn.{p}_proj.{s}"] = part
    for hf, oa in _HF_TO_OPENAI_BLOCK.items():
      for s in ("weight", "bias"):
        out[f"{hf_b}{hf}.{s}"] = sd[f"{oa_b}{oa}.{s}"]
  return out


def _timm_to_openai(sd: Mapping[str, np.ndarray], cfg: clip_vit.ViTConfig) -> dict[str, np.ndarray]:
  out = {_TIMM_TO_OPENAI_STATIC[k]: v for k, v in sd.items() if k in _TIMM_TO_OPENAI_STATIC}
  out["class_embedding"] = sd["cls_token"].reshape(-1)
  out["positional_embedding"] = sd["pos_embed"][0]
  if "reg_token" in sd:
    out["register_tokens"] = sd["reg_token"][0]
  for i in range(cfg.layers):
    for t, o in _TIMM_TO_OPENAI_BLOCK.items():
      if f"blocks.{i}.{t}" in sd:
        out[f"transformer.resblocks.{i}.{o}"] = sd[f"blocks.{i}.{t}"]
  return out


def _openai_to_timm(sd: Mapping[str, np.ndarray], cfg: clip_vit.ViTConfig) -> dict[str, np.ndarray]:
  out = {"cls_token": sd["class_embedding"].reshape(1, 1, -1),
         "pos_embed": sd["positional_embedding"][None]}
  if "register_tokens" in sd:
    out["reg_token"] = sd["register_tokens"][None]
  out.update({t: sd[o] for t, o in _TIMM_TO_OPENAI_STATIC.items() if o in sd})
  for i in range(cfg.layers):
    for t, o in _TIMM_TO_OPENAI_BLOCK.items():
      if f"transformer.resblocks.{i}.{o}" in sd:
        out[f"blocks.{i}.{t}"] = sd[f"transformer.resblocks.{i}.{o}"]
  return out


_TO_OPENAI = {"openai": lambda sd, cfg: dict(sd), "hf": _hf_to_openai, "timm": _timm_to_openai,
              **{layout: functools.partial(
                  lambda layout, sd, cfg: hf_ssl_layouts.to_canonical(layout, sd, cfg, openai_shapes),
                  layout) for layout in HF_SSL}}


def torch_state_dict_to_flax(sd: Mapping[str, Any], *, fmt: str = "auto", model: str | None = None,
                             image_size: int | None = None, heads: int | None = None,
                             antialias: bool | None = None, act: str | None = None,
                             ln_eps: float | None = None,
                             evidence: Mapping[str, Evidence] | None = None,
                             pool: str | None = None,
                             ) -> tuple[dict, ConversionInfo]:
  """A PyTorch CLIP state dict (any supported layout) -> ({'encoder': ..., ['head': ...]}, info).

  Args:
    sd: name -> torch tensor or numpy array. Text-tower keys, `proj` and buffers are ignored.
    fmt: 'auto' | 'openai' | 'open_clip' | 'hf' | 'timm'; anything but 'auto' is checked against
      the keys.
    model: preset the checkpoint must be (e.g. 'ViT-B/16'); None infers it from the shapes: the
      preset of exactly that shape, else the shape's name ('vit:p14-w1280-l32-h16-m5120').
    image_size: target image size; None keeps the checkpoint's. The positional embedding is
      resampled (bicubic, see `resize_positional_embedding`) when the grid changes.
    heads: number of attention heads, from the config beside the weights or the user (--heads);
      the weights do not determine it. Needed for a tower that is no preset; checked against a
      preset.
    antialias: passed to `resize_positional_embedding`; None: what the source library does when
      it resizes (`antialias_of`: open_clip, timm, HF Dinov2WithRegisters antialias; HF Dinov2
      and ViT do not).
    act, ln_eps: the tower's activation ('quick_gelu' | 'gelu') and LayerNorm epsilon where the
      checkpoint does not say (a state dict alone never says which activation it was trained with).
    evidence: what the checkpoint's config files say (`tower_evidence`); a flag contradicting
      it is an error.
    pool: 'cls' | 'mean' | 'cls+mean' (the pooled feature); None: the config's (timm
      global_pool), else the mean of the patch tokens for towers with an fc_norm, else the class
      token.

  Raises:
    CheckpointError naming the offending key and the expected vs found shape; nothing is written.
  """
  if fmt not in FORMATS:
    raise ConfigError(f"Unknown checkpoint format {fmt!r}; choose from {FORMATS}.")
  sd, wrapped = _unwrap(sd)
  sd = hf_ssl_layouts.file_names(sd)
  layout, prefix = _detect(set(sd), fmt)
  lay = _LAYOUT[layout]
  tower, head_keys = _split_tower(sd, layout, prefix)
  shape = _tower_shape(tower, lay, layout, prefix)
  found = _describe(shape["patch"], shape["width"], shape["layers"], shape["mlp_dim"])
  guess = _preset_for(shape["patch"], shape["width"], shape["layers"], shape["mlp_dim"])
  if model is None:
    model = _model_of_shape(shape, heads, found, f"{prefix}{lay.conv} shape "
                            f"{_fmt(tower[lay.conv].shape)} and {shape['layers']} blocks")
  features = _tower_features(tower, lay, layout, prefix, shape)
  evidence = _swiglu_evidence(evidence or {}, features.pop("swiglu"))
  variant, tower_source = _resolve_tower(layout, features["ln_pre"], evidence, act, ln_eps)
  variant.update(features)
  variant["pool"], pool_source = _resolve_pool(pool, evidence, features["fc_norm"])
  tower_source += f"; pool {variant['pool']} ({pool_source})"
  cfg = clip_vit.get_model_config(model, image_size or shape["src_image_size"], **variant)
  _check_preset(cfg, shape, model, guess, found, heads, tower[lay.conv].shape, prefix + lay.conv)
  expected = lay.shapes(cfg, num_tokens=shape["n_tok"])
  num_classes = _check_keys(sd, tower, expected, head_keys, layout, prefix, model, cfg.feature_dim)

  arrays = {k: to_numpy(tower[k]) for k in expected}
  canonical = _TO_OPENAI[layout](arrays, cfg)
  if antialias is None:
    antialias = antialias_of(layout, cfg.registers)
  canonical["positional_embedding"] = resize_positional_embedding(
      canonical["positional_embedding"], cfg.grid, antialias=antialias, class_pos=cfg.class_pos)
  params: dict[str, Any] = {"encoder": _openai_to_flax(canonical, cfg)}
  if num_classes is not None:
    params["head"] = _contiguous_f32({"kernel": to_numpy(sd["head.weight"]).T,
                                      "bias": to_numpy(sd["head.bias"])})
  used = {prefix + k for k in expected} | head_keys
  info = ConversionInfo(model=model, image_size=cfg.image_size,
                        source_image_size=shape["src_image_size"],
                        source_format=_source_format(fmt, layout, prefix, wrapped),
                        num_classes=num_classes, ignored_keys=tuple(sorted(set(sd) - used)),
                        tower=cfg.tower(), tower_source=tower_source)
  return params, info


def antialias_of(layout: str, registers: int = 0) -> bool:
  """Whether the source library antialiases when it resamples the position grid: open_clip's
  resize_pos_embed and timm's resample_abs_pos_embed do, and so does transformers'
  Dinov2WithRegisters; transformers' Dinov2 and ViT interpolate_pos_encoding do not. HF CLIP
  keeps open_clip's choice (what this converter always did)."""
  if layout == "hf_dinov2":
    return bool(registers)
  return layout != "hf_vit"


def _resolve_pool(pool: str | None, evidence: Mapping[str, Evidence],
                  fc_norm: bool) -> tuple[str, str]:
  """The pooled feature: the caller's choice, else the config's, else what the tower's norms say
  (timm pairs fc_norm with average pooling)."""
  if pool is not None:
    if pool not in clip_vit.POOLS:
      raise ConfigError(f"Unknown --pool {pool!r}; choose from {clip_vit.POOLS}.")
    return pool, "--pool"
  if "pool" in evidence:
    return evidence["pool"].value, evidence["pool"].source
  return ("mean", "fc_norm: timm's avg pool") if fc_norm else ("cls", "class token")


def _split_tower(sd: Mapping[str, Any], layout: str, prefix: str) -> tuple[dict, set[str]]:
  """(the tower's tensors without the prefix, the keys of our own trained head)."""
  tower = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  if prefix == "":  # bare layout: our head (or a plain timm file's own classifier) is not tower
    tower = {k: v for k, v in tower.items() if not k.startswith("head.")}
  if (layout == "timm" and prefix == "") or prefix == OPEN_CLIP_TIMM_PREFIX:
    # timm's own classifier / open_clip's visual.head.proj (its CLIP projection): not ours.
    return tower, set()
  return tower, {k for k in ("head.weight", "head.bias") if k in sd}


def _tower_shape(tower: Mapping[str, Any], lay, layout: str, prefix: str) -> dict[str, Any]:
  """Patch, width, depth, MLP width and the position grid, read from the tensors."""
  if lay.conv not in tower:
    raise CheckpointError(
        f"Missing key {prefix}{lay.conv} (the patch embedding, shape (width, 3, patch, patch)); this "
        f"is not a CLIP ViT tower in the {layout} layout. Its tower keys: "
        f"{_listing(sorted(prefix + k for k in tower))}.")
  conv = tower[lay.conv]
  if len(conv.shape) != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
    raise CheckpointError(f"{prefix}{lay.conv} has shape {_fmt(conv.shape)}; expected "
                          f"(width, 3, patch, patch) of a ViT patch embedding.")
  width, patch = int(conv.shape[0]), int(conv.shape[2])
  layer_ids = {int(m.group(1)) for k in tower if (m := lay.block.match(k))}
  if lay.cls not in tower:
    raise CheckpointError(
        f"Missing key {prefix}{lay.cls}: the tower has no class token. shpeft_jax pools the class "
        f"token as CLIP does; towers pooled otherwise (SigLIP's attention pooling, average "
        f"pooling) are not supported.")
  if lay.pos not in tower:
    raise CheckpointError(f"Missing key {prefix}{lay.pos} (expected shape (1 + grid**2, {width})).")
  pos = tower[lay.pos]
  batched = layout in ("timm", *HF_SSL) and len(pos.shape) == 3 and pos.shape[:1] == (1,)
  pos_shape = tuple(pos.shape[1:]) if batched else tuple(pos.shape)
  n_tok = int(pos_shape[0]) if len(pos_shape) == 2 else -1
  # A square row count: positions of the patches only (timm no_embed_class, DINOv2 with registers).
  class_pos = math.isqrt(max(n_tok, 0)) ** 2 != n_tok
  src_grid = math.isqrt(max(n_tok - int(class_pos), 0))
  if len(pos_shape) != 2 or pos_shape[1] != width or src_grid ** 2 != n_tok - class_pos or not src_grid:
    lead = "1, " if layout != "openai" and layout != "hf" else ""
    raise CheckpointError(f"{prefix}{lay.pos} has shape {_fmt(pos.shape)}; expected "
                          f"({lead}[1 +] grid**2, {width}): a square grid of patch positions, with "
                          f"or without the class token's (positions of register tokens are not "
                          f"supported).")
  mlp = next((tower[k] for k in lay.mlp if k in tower), None)
  return {"patch": patch, "width": width, "layers": max(layer_ids) + 1 if layer_ids else 0,
          "mlp_dim": int(mlp.shape[0]) if mlp is not None else None,
          "n_tok": n_tok, "class_pos": class_pos, "src_image_size": src_grid * patch}


def _tower_features(tower: Mapping[str, Any], lay, layout: str, prefix: str,
                    shape: Mapping[str, Any]) -> dict[str, Any]:
  """The structural tower fields the keys decide (ln_pre, patch_bias, layer_scale, registers,
  final_norm, fc_norm, qkv_bias, class_pos) and `swiglu` (a gated MLP). OpenAI / HF CLIP are
  always the plain CLIP tower; timm ViTs have a patch bias exactly when they have no pre-norm."""
  plain = {f: clip_vit.TOWER_DEFAULTS[f] for f in ("ln_pre", "patch_bias", "layer_scale",
                                                    "registers", "final_norm", "fc_norm",
                                                    "qkv_bias", "class_pos")}
  if layout in HF_SSL:
    return hf_ssl_layouts.features(layout, tower)
  if layout != "timm":
    return {**plain, "swiglu": False}
  ln_pre, patch_bias = f"{lay.ln_pre}.weight" in tower, lay.conv_bias in tower
  if ln_pre == patch_bias:
    raise CheckpointError(
        f"{prefix}: a timm ViT has a patch-projection bias exactly when it has no norm_pre, but "
        f"this one has {'both' if ln_pre else 'neither'} ({prefix}{lay.conv_bias}, "
        f"{prefix}{lay.ln_pre}.weight); the file is incomplete or another architecture.")
  reg = tower.get("reg_token")
  registers = int(reg.shape[1]) if reg is not None and len(reg.shape) == 3 else 0
  if registers and shape["class_pos"]:
    raise CheckpointError(f"{prefix}pos_embed: this timm tower has {registers} register tokens "
                          f"and a class-token position (no_embed_class=False); only towers whose "
                          f"registers have no position (DINOv2 '_reg' models) are supported.")
  fc1, fc2 = tower.get("blocks.0.mlp.fc1.weight"), tower.get("blocks.0.mlp.fc2.weight")
  swiglu = fc1 is not None and fc2 is not None and 2 * fc2.shape[1] == fc1.shape[0]
  return {"ln_pre": ln_pre, "patch_bias": patch_bias, "layer_scale": "blocks.0.ls1.gamma" in tower,
          "registers": registers, "final_norm": "norm.weight" in tower,
          "fc_norm": "fc_norm.weight" in tower, "qkv_bias": "blocks.0.attn.qkv.bias" in tower,
          "class_pos": shape["class_pos"], "swiglu": swiglu}


def _check_preset(cfg, shape, model, guess, found, heads, conv_shape, conv_key) -> None:
  """The preset `model` has the tower's patch, width, depth (and heads when a config says)."""
  if (cfg.patch_size, cfg.width) != (shape["patch"], shape["width"]) or cfg.layers != shape["layers"]:
    looks = f"it looks like {guess}" if guess else f"it has {found}"
    exp = (cfg.width, 3, cfg.patch_size, cfg.patch_size)
    detail = (f"{conv_key}: expected shape {_fmt(exp)}, found {_fmt(conv_shape)}"
              if exp != tuple(conv_shape) else f"expected {cfg.layers} blocks, found {shape['layers']}")
    raise CheckpointError(f"The checkpoint is not a {model} vision tower ({looks}): {detail}. "
                          f"Pass the matching model name or convert the right file.")
  if heads is not None and heads != cfg.heads:
    raise CheckpointError(f"The checkpoint's config says {heads} attention heads, but {model} has "
                          f"{cfg.heads}; this tower cannot be represented by the {model} preset.")


def _check_keys(sd, tower, expected, head_keys, layout, prefix, model, width) -> int | None:
  """Every expected key and shape in the file's own names (all problems in one error); returns
  the number of classes of our head, if the file has one."""
  problems = []
  for k, shape in expected.items():
    if k not in tower:
      problems.append(f"missing key {prefix}{k} (expected shape {_fmt(shape)})")
    elif tuple(tower[k].shape) != shape:
      problems.append(f"{prefix}{k}: expected shape {_fmt(shape)}, found {_fmt(tower[k].shape)}")
  unknown = sorted(set(tower) - set(expected) - _IGNORED_TOWER_KEYS[layout])
  if unknown:
    problems.append(f"unexpected tower keys {_listing(prefix + k for k in unknown)} "
                    f"(another architecture?)")
  num_classes = None
  if head_keys:
    hw, hb = sd.get("head.weight"), sd.get("head.bias")
    if hw is None or hb is None:
      problems.append("head.weight and head.bias must both be present")
    elif len(hw.shape) != 2 or hw.shape[1] != width or tuple(hb.shape) != (hw.shape[0],):
      problems.append(f"head.weight / head.bias: expected shapes (num_classes, {width}) / "
                      f"(num_classes,), found {_fmt(hw.shape)} / {_fmt(hb.shape)}")
    else:
      num_classes = int(hw.shape[0])
  if problems:
    raise CheckpointError(f"Checkpoint does not match {model} ({len(problems)} problem(s)): "
                          + _listing(problems, sep="; "))
  return num_classes


def _source_format(fmt: str, layout: str, prefix: str, wrapped: bool) -> str:
  if fmt != "auto":
    return fmt
  if prefix == OPEN_CLIP_TIMM_PREFIX:
    return "open_clip"
  if layout == "openai":
    return "open_clip" if wrapped else "openai"
  return layout


# ----------------------------------------------------------------------------------------------
# Flax -> torch.


def check_no_additive(params) -> None:
  """Raises if params hold LoRA / adapter / SSF / VPT leaves, which a plain CLIP cannot express."""
  bad = [n for n in flatten_names(params)
         if any(part.startswith(ADDITIVE_PREFIXES) for part in n.split("/"))]
  if bad:
    raise CheckpointError(
        f"The params contain additive PEFT parameters ({_listing(bad, 4)}). Merge them into the base "
        f"weights first (LoRA and SSF can be merged); VPT prompts and AdaptFormer adapters are not "
        f"mergeable and have no place in a plain CLIP state dict, so such models cannot be exported.")


def flax_encoder_config(encoder: Mapping[str, Any], **tower) -> clip_vit.ViTConfig:
  """The tower shape read off a Flax `encoder` subtree (for export without a preset name).
  The structural fields (ln_pre, patch bias, LayerScale, registers, norms, qkv bias, class
  position, a SwiGLU MLP) are read off the tree; act / ln_eps / pool (not visible in weights)
  from `tower`."""
  try:
    k = np.shape(encoder["conv1"]["kernel"])
    layers = len([n for n in encoder if re.fullmatch(r"resblocks_\d+", n)])
    block = encoder["resblocks_0"]
    heads = np.shape(block["attn"]["query"]["kernel"])[1]
    mlp_dim = np.shape(block["mlp"]["c_fc"]["kernel"])[1]
    gated = 2 * np.shape(block["mlp"]["c_proj"]["kernel"])[0] == mlp_dim
    n_tok = np.shape(encoder["positional_embedding"])[0]
  except (KeyError, IndexError, TypeError) as e:
    raise CheckpointError(f"Flax params are not a CLIP ViT encoder tree: missing {e}.") from e
  class_pos = math.isqrt(n_tok) ** 2 != n_tok
  grid = math.isqrt(n_tok - class_pos)
  read = {"ln_pre": "ln_pre" in encoder, "patch_bias": "bias" in encoder["conv1"],
          "layer_scale": "ls_1" in block, "final_norm": "ln_post" in encoder,
          "registers": int(np.shape(encoder["register_tokens"])[0]) if "register_tokens" in encoder else 0,
          "fc_norm": "fc_norm" in encoder, "qkv_bias": "bias" in block["attn"]["query"],
          "class_pos": class_pos}
  if gated:
    read["act"] = "swiglu"
  return clip_vit.ViTConfig(name="from-params", patch_size=int(k[0]), width=int(k[3]),
                            layers=layers, heads=int(heads), mlp_dim=int(mlp_dim),
                            image_size=grid * int(k[0]), **{**tower, **read})


def _flax_to_openai(enc: Mapping[str, Any], cfg: clip_vit.ViTConfig) -> dict[str, np.ndarray]:
  d = cfg.width
  a = lambda x: np.asarray(x, dtype=np.float32)
  ln = lambda p, t: {f"{p}.weight": a(t["scale"]), f"{p}.bias": a(t["bias"])}
  out = {"conv1.weight": a(enc["conv1"]["kernel"]).transpose(3, 2, 0, 1)}
  if cfg.patch_bias:
    out["conv1.bias"] = a(enc["conv1"]["bias"])
  out["class_embedding"] = a(enc["class_embedding"])
  out["positional_embedding"] = a(enc["positional_embedding"])
  if cfg.registers:
    out["register_tokens"] = a(enc["register_tokens"])
  if cfg.ln_pre:
    out.update(ln("ln_pre", enc["ln_pre"]))
  for i in range(cfg.layers):
    blk, b = enc[f"resblocks_{i}"], f"transformer.resblocks.{i}."
    attn = blk["attn"]
    out[b + "attn.in_proj_weight"] = np.concatenate(
        [a(attn[n]["kernel"]).reshape(d, d).T for n in _QKV], axis=0)
    if cfg.qkv_bias:
      out[b + "attn.in_proj_bias"] = np.concatenate([a(attn[n]["bias"]).reshape(d) for n in _QKV])
    out[b + "attn.out_proj.weight"] = a(attn["out"]["kernel"]).reshape(d, d).T
    out[b + "attn.out_proj.bias"] = a(attn["out"]["bias"])
    out.update(ln(b + "ln_1", blk["ln_1"]))
    for name in ("c_fc", "c_proj"):
      out[f"{b}mlp.{name}.weight"] = a(blk["mlp"][name]["kernel"]).T
      out[f"{b}mlp.{name}.bias"] = a(blk["mlp"][name]["bias"])
    out.update(ln(b + "ln_2", blk["ln_2"]))
    if cfg.layer_scale:
      out[b + "ls_1"], out[b + "ls_2"] = a(blk["ls_1"]), a(blk["ls_2"])
  if cfg.final_norm:
    out.update(ln("ln_post", enc["ln_post"]))
  if cfg.fc_norm:
    out.update(ln("fc_norm", enc["fc_norm"]))
  return out


def check_exportable(cfg: clip_vit.ViTConfig, layout: str, act_known: bool = True) -> None:
  """Raises where the target class cannot compute what this tower computes."""
  if layout not in LAYOUTS:
    raise ConfigError(f"Unknown export layout {layout!r}; choose from {LAYOUTS}.")
  if layout in HF_SSL:
    bad = hf_ssl_layouts.exportable(layout, cfg)
    if bad:
      raise CheckpointError(f"This tower ({', '.join(bad)}) cannot be written as {layout}: "
                            f"transformers' {'Dinov2' if layout == 'hf_dinov2' else 'ViT'}Model "
                            f"computes another one. Use --format timm (any timm-style ViT).")
    return
  ssl = [f"{f}={getattr(cfg, f)}" for f in ("layer_scale", "registers", "final_norm", "fc_norm",
                                             "qkv_bias", "class_pos")
         if getattr(cfg, f) != clip_vit.TOWER_DEFAULTS[f]]
  if cfg.act == "swiglu":
    ssl.append("act=swiglu")
  if layout == "timm":
    _check_timm_exportable(cfg)
  elif ssl:
    raise CheckpointError(f"This tower ({', '.join(ssl)}) is no CLIP tower and cannot be written "
                          f"as {layout}; use --format timm (or hf_dinov2 / hf_vit).")
  trunk = not cfg.ln_pre and cfg.patch_bias
  if layout == "timm":
    if cfg.ln_pre == cfg.patch_bias:
      raise CheckpointError("timm's VisionTransformer has a patch bias exactly when it has no "
                            "norm_pre; this tower has both or neither and cannot be exported to timm.")
    return
  if cfg.patch_bias or (layout != "open_clip" and not cfg.ln_pre):
    what = "a timm trunk (patch bias, no ln_pre; e.g. BiomedCLIP)" if trunk else "this tower"
    raise CheckpointError(
        f"{what} cannot be written as {layout}: that class has "
        f"{'no patch-projection bias' if cfg.patch_bias else 'a pre-LayerNorm (ln_pre)'}. Use "
        f"--format timm (BiomedCLIP's trunk is a timm VisionTransformer: load the file into "
        f"model.visual.trunk).")
  if layout == "openai" and act_known and (cfg.act, cfg.ln_eps) != ("quick_gelu", clip_vit.LN_EPS):
    raise CheckpointError(
        f"OpenAI CLIP's VisionTransformer computes QuickGELU with LayerNorm eps 1e-5; this tower "
        f"uses {cfg.act} with eps {cfg.ln_eps}. Use --format open_clip (open_clip's "
        f"VisionTransformer, nn.GELU), hf (hidden_act {cfg.act}) or timm.")


def _check_timm_exportable(cfg: clip_vit.ViTConfig) -> None:
  """timm's VisionTransformer: a final `norm` or an `fc_norm`, not both; registers only without
  a class position (no_embed_class, as its DINOv2 '_reg' models)."""
  if cfg.final_norm and cfg.fc_norm:
    raise CheckpointError("timm's VisionTransformer has a final norm or an fc_norm, not both; this "
                          "tower has both and cannot be exported to timm.")
  if cfg.registers and cfg.class_pos:
    raise CheckpointError(f"This tower's {cfg.registers} registers come with a class-token position "
                          f"(HF Dinov2WithRegisters); timm gives registers positions then. Use "
                          f"--format hf_dinov2.")


def flax_to_torch_state_dict(params: Mapping[str, Any], layout: str, *,
                             tower: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
  """Flax params ({'encoder': ..., optional 'head': ...}) -> torch-layout numpy state dict.

  layout 'openai' / 'open_clip': OpenAI names without the `visual.` prefix (`conv1.weight`,
    `transformer.resblocks.N.attn.in_proj_weight`, ...; no `proj`): OpenAI's and open_clip's
    `VisionTransformer` with `proj = None` (open_clip: also GELU towers and `no_ln_pre`).
  layout 'hf': HF CLIP vision names; without a head they load into transformers >= 5
    `CLIPVisionModel` (no prefix), with a head as `vision_model.*` + `head.*`
    (`torch_reference.TorchHFClipClassifier`).
  layout 'timm': timm `VisionTransformer(num_classes=0)` names (BiomedCLIP's `visual.trunk`);
    with a head as `trunk.*` + `head.*` (`torch_reference.TorchTimmClipClassifier`).
  Plus `head.weight` [C, D] / `head.bias` [C] when params have a head: the classifiers compute
  head(F.normalize(features)). `tower`: act / ln_eps (as in meta.json) to check that the target
  class computes them (without it only the structure is checked).
  Values are C-contiguous float32 numpy arrays (wrap with torch.from_numpy to save/load).
  """
  if layout not in LAYOUTS:
    raise ConfigError(f"Unknown export layout {layout!r}; choose from {LAYOUTS}.")
  check_no_additive(params)
  if "encoder" not in params:
    raise CheckpointError("Flax params have no 'encoder' subtree; expected {'encoder': ..., 'head': ...}.")
  enc = params["encoder"]
  known = {k: v for k, v in (tower or {}).items() if k in ("act", "ln_eps", "pool")}
  cfg = flax_encoder_config(enc, **known)
  # Catch incomplete or mis-shaped trees with the names a user can look up.
  expected = {n: tuple(v.shape) for n, v in flatten_names(_flax_shapes(cfg)).items()}
  have = {n: np.shape(v) for n, v in flatten_names(enc).items()}
  problems = [f"missing encoder/{n} (expected shape {_fmt(s)})" for n, s in expected.items() if n not in have]
  problems += [f"encoder/{n}: expected shape {_fmt(s)}, found {_fmt(have[n])}"
               for n, s in expected.items() if n in have and tuple(have[n]) != tuple(s)]
  problems += [f"unexpected encoder/{n}" for n in have if n not in expected]
  if problems:
    raise CheckpointError("Flax params are not a complete CLIP ViT encoder: "
                          + _listing(problems, sep="; "))
  check_exportable(cfg, layout, act_known="act" in known)
  canonical = _flax_to_openai(enc, cfg)
  with_head = "head" in params
  if layout in ("openai", "open_clip"):
    out = canonical
  elif layout == "hf":
    out = {(HF_PREFIX if with_head else "") + k: v
           for k, v in _openai_to_hf(canonical, cfg.layers).items()}
  elif layout in HF_SSL:
    prefix = next(p for p, lay in HF_SSL_PREFIXES.items() if lay == layout) if with_head else ""
    out = {prefix + k: v for k, v in hf_ssl_layouts.from_canonical(layout, canonical, cfg).items()}
  else:
    out = {(TIMM_CLASSIFIER_PREFIX if with_head else "") + k: v
           for k, v in _openai_to_timm(canonical, cfg).items()}
  if with_head:
    out["head.weight"] = np.asarray(params["head"]["kernel"], np.float32).T
    out["head.bias"] = np.asarray(params["head"]["bias"], np.float32)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _flax_shapes(cfg: clip_vit.ViTConfig) -> dict:
  """ShapeDtypeStructs of the Flax encoder tree, from the model definition itself (no weights allocated)."""
  import jax  # Local: keeps this module importable in torch-only tools.
  import jax.numpy as jnp
  tower = clip_vit.VisionTransformer(cfg)
  dummy = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: tower.init(jax.random.PRNGKey(0), x), dummy)["params"]


# ----------------------------------------------------------------------------------------------
# Files.


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
  return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"Cannot read {path} ({e}); it decides how the tower computes: fix or "
                          f"remove it.") from e
  return cfg if isinstance(cfg, dict) else None


def _hf_vision_config(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
  if cfg is None:
    return None
  model_type = str(cfg.get("model_type", ""))
  if "siglip" in model_type:
    raise CheckpointError(f"config.json says model_type {model_type!r}: a SigLIP tower (no class "
                          f"token, attention pooling); SigLIP is not supported.")
  cfg = cfg.get("vision_config", cfg)
  return cfg if isinstance(cfg, dict) and "num_attention_heads" in cfg else None


def _find_weights_in_dir(directory: str) -> list[str]:
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(directory, s) for s in shards]
  for name in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
               "open_clip_pytorch_model.bin"):
    if os.path.isfile(os.path.join(directory, name)):
      return [os.path.join(directory, name)]
  raise CheckpointError(f"{directory} is a directory without model.safetensors / pytorch_model.bin; "
                        f"point SRC at the checkpoint file.")


def _load_one(path: str) -> tuple[dict[str, Any], str, dict[str, str]]:
  """(state dict, container kind, safetensors metadata) of one file."""
  if path.endswith(".safetensors"):
    try:
      from safetensors.torch import load_file
    except ImportError:  # numpy loader: fine unless the file holds bfloat16.
      from safetensors.numpy import load_file
    from safetensors import safe_open
    try:
      with safe_open(path, framework="numpy") as f:
        metadata = dict(f.metadata() or {})
      return dict(load_file(path)), "safetensors", metadata
    except Exception as e:  # safetensors raises its own error types.
      raise CheckpointError(f"Cannot read {path} as safetensors: {e}") from e
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"Reading {path} needs PyTorch: pip install 'shpeft_jax[torch]'.") from e
  if _is_torchscript(path):
    try:
      return dict(torch.jit.load(path, map_location="cpu").state_dict()), "torchscript", {}
    except RuntimeError as e:
      raise CheckpointError(f"Cannot load TorchScript archive {path}: {e}") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors come in many types.
    raise CheckpointError(
        f"Cannot read {path} as a PyTorch state dict ({type(e).__name__}: {e}). Only tensors and "
        f"plain containers are loaded (weights_only=True); re-save the state dict with torch.save.") from e
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  return dict(obj), "state_dict", {}


def load_torch_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads SRC (file or model directory) -> (state dict, extras).

  extras: {'container': 'safetensors'|'torchscript'|'state_dict', 'metadata': safetensors
  metadata, 'hf_config': CLIP vision config or None, 'config': config.json or None,
  'open_clip_config': open_clip_config.json or None}, the JSON files looked up next to the weights.
  """
  if not os.path.exists(path):
    raise CheckpointError(f"Checkpoint {path} does not exist.")
  files = _find_weights_in_dir(path) if os.path.isdir(path) else [path]
  sd: dict[str, Any] = {}
  container, metadata = None, {}
  for f in files:
    part, container, meta = _load_one(f)
    sd.update(part)
    metadata.update(meta)
  directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  config = _read_json(os.path.join(directory, "config.json"))
  return sd, {"container": container, "metadata": metadata, "config": config,
              "hf_config": _hf_vision_config(config),
              "open_clip_config": _read_json(os.path.join(directory, "open_clip_config.json")),
              "preprocessor_config": _read_json(os.path.join(directory,
                                                             "preprocessor_config.json"))}


def tower_evidence(extras: Mapping[str, Any], keys) -> dict[str, Evidence]:
  """What the files around a checkpoint say about its activation and LayerNorm epsilon.

  Our export metadata > open_clip_config.json > HF config.json (CLIP vision config) > timm's
  config.json (`architecture`) > the OpenAI TorchScript release (QuickGELU, eps 1e-5). A plain
  state dict without any of them says nothing.
  """
  keys = set(keys)
  meta = extras.get("metadata") or {}
  if "shpeft_model" in meta:  # ours; exports older than the tower fields were all OpenAI-style
    out = {"act": Evidence(meta.get("shpeft_act", "quick_gelu"), "the export's metadata"),
           "ln_eps": Evidence(float(meta.get("shpeft_ln_eps", clip_vit.LN_EPS)),
                              "the export's metadata")}
    if "shpeft_pool" in meta:
      out["pool"] = Evidence(meta["shpeft_pool"], "the export's metadata")
    return out
  if extras.get("open_clip_config") is not None and any(k.startswith(OPENAI_PREFIX) or
                                                        k.startswith("module.visual.") for k in keys):
    return _open_clip_evidence(extras["open_clip_config"], "open_clip_config.json")
  if extras.get("hf_config") is not None and any(
      k.startswith((HF_PREFIX, "embeddings.", *HF_SSL_PREFIXES)) for k in keys):
    return _hf_evidence(extras["hf_config"], "config.json")
  config = extras.get("config") or {}
  if "architecture" in config and any(k.startswith("patch_embed.") for k in keys):
    where = f"config.json (timm architecture {config['architecture']})"
    out = {k: Evidence(v, where) for k, v in timm_vit_tower(config["architecture"]).items()}
    pool = config.get("global_pool", (config.get("model_args") or {}).get("global_pool"))
    if pool is not None:
      out["pool"] = Evidence(_timm_pool(pool, where), f"{where}, global_pool {pool!r}")
    return out
  if extras.get("container") == "torchscript":
    where = "the OpenAI TorchScript release (QuickGELU)"
    return {"act": Evidence("quick_gelu", where), "ln_eps": Evidence(clip_vit.LN_EPS, where)}
  return {}


def _config_heads(extras: Mapping[str, Any], sd: Mapping[str, Any]) -> int | None:
  """The attention heads the config beside the weights gives: HF num_attention_heads, or open_clip's
  vision_cfg width / head_width (default 64); None when no config says."""
  hf_cfg = extras.get("hf_config")
  if hf_cfg is not None and any(k.startswith(("vision_model.", "embeddings.", *HF_SSL_PREFIXES))
                                for k in sd):
    return int(hf_cfg["num_attention_heads"])
  config = extras.get("config") or {}
  if "architecture" in config and any(k.startswith("patch_embed.") for k in sd):
    args = config.get("model_args") or {}
    return int(args["num_heads"]) if "num_heads" in args else timm_vit_heads(config["architecture"])
  oc = extras.get("open_clip_config")
  if oc is not None:
    vision = (oc.get("model_cfg", oc).get("vision_cfg") or {})
    if not vision.get("timm_model_name") and isinstance(vision.get("width"), int):
      return vision["width"] // int(vision.get("head_width", 64))
  return None


# Named pixel statistics (`--pixel_stats`): mean / std of RGB on the [0, 1] scale.
PIXEL_STATS = {
    "clip": (clip_vit.CLIP_MEAN, clip_vit.CLIP_STD),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # DINOv2, MAE, UNI, Phikon
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),                  # timm's augreg ViTs, Google ViT
}
# Formats whose towers all normalise with CLIP's statistics when no file says otherwise.
CLIP_STAT_FORMATS = ("openai", "open_clip", "hf")


def parse_pixel_stats(value: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """'clip' | 'imagenet' | 'half' | 'm1,m2,m3/s1,s2,s3' -> (mean, std)."""
  if value in PIXEL_STATS:
    return PIXEL_STATS[value]
  try:
    mean, std = (tuple(float(v) for v in part.split(",")) for part in value.split("/"))
  except ValueError:
    mean = std = ()
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ConfigError(f"--pixel_stats {value!r}: give one of {sorted(PIXEL_STATS)} or "
                      f"'m1,m2,m3/s1,s2,s3' (RGB on the 0-1 scale, std > 0).")
  return mean, std


def pixel_stats_evidence(extras: Mapping[str, Any]) -> tuple[tuple, tuple, str] | None:
  """The pixel mean / std the files beside the weights state: our export's metadata, HF's
  preprocessor_config.json (image_mean / image_std), timm's config.json (pretrained_cfg mean /
  std), open_clip_config.json (preprocess_cfg mean / std); None when none does."""
  meta = extras.get("metadata") or {}
  if "shpeft_pixel_mean" in meta and "shpeft_pixel_std" in meta:
    return (tuple(json.loads(meta["shpeft_pixel_mean"])), tuple(json.loads(meta["shpeft_pixel_std"])),
            "the export's metadata")
  found = [(extras.get("preprocessor_config") or {}, "image_mean", "image_std",
            "preprocessor_config.json"),
           ((extras.get("config") or {}).get("pretrained_cfg") or {}, "mean", "std",
            "config.json pretrained_cfg"),
           ((extras.get("open_clip_config") or {}).get("preprocess_cfg") or {}, "mean", "std",
            "open_clip_config.json preprocess_cfg")]
  for cfg, m, sd, where in found:
    if m in cfg and sd in cfg:
      mean, std = tuple(cfg[m]), tuple(cfg[sd])
      if len(mean) == 1:  # Grayscale statistics apply to the three (identical) channels.
        mean, std = mean * 3, std * 3
      return mean, std, where
  return None


def _pixel_stats(path: str, extras: Mapping[str, Any], info: ConversionInfo,
                 given: str | None) -> ConversionInfo:
  """The tower's pixel statistics: the files beside the weights, else `given`, else CLIP's for the
  CLIP formats; a self-supervised tower with none of them is refused (they differ by family)."""
  said = pixel_stats_evidence(extras)
  if given is not None:
    mean, std = parse_pixel_stats(given)
    if said is not None and not np.allclose((mean, std), said[:2], atol=1e-6):
      raise ConfigError(f"--pixel_stats {given} ({mean} / {std}), but {said[2]} says {said[0]} / "
                        f"{said[1]}; drop --pixel_stats.")
    where = f"--pixel_stats {given}"
  elif said is not None:
    mean, std, where = said
  elif info.source_format in CLIP_STAT_FORMATS:
    (mean, std), where = PIXEL_STATS["clip"], f"CLIP's ({info.source_format} tower)"
  else:
    raise ConfigError(
        f"{path}: no preprocessor_config.json / config.json pretrained_cfg beside it says which pixel "
        f"mean / std the {info.source_format} tower was trained with; pass --pixel_stats imagenet "
        f"(DINOv2, MAE, UNI, Phikon), half (timm augreg ViTs, Google ViT), clip, or 'm,m,m/s,s,s'.")
  tower = {**info.tower, "pixel_mean": tuple(float(v) for v in mean),
           "pixel_std": tuple(float(v) for v in std)}
  return dataclasses.replace(info, tower=tower,
                             tower_source=f"{info.tower_source}; pixel statistics from {where}")


def convert_file(path: str, *, fmt: str = "auto", model: str | None = None,
                 image_size: int | None = None, antialias: bool | None = None,
                 act: str | None = None, ln_eps: float | None = None, heads: int | None = None,
                 pool: str | None = None, pixel_stats: str | None = None
                 ) -> tuple[dict, ConversionInfo]:
  """load_torch_checkpoint + torch_state_dict_to_flax, with the activation / eps / head count
  that the configs beside the weights give (see `tower_evidence`); `heads` where none does."""
  sd, extras = load_torch_checkpoint(path)
  said = _config_heads(extras, sd)
  if heads is not None and said is not None and heads != said:
    raise ConfigError(f"--heads {heads}, but the checkpoint's config says {said}; drop --heads.")
  heads = said if said is not None else heads
  _refuse_siglip(set(sd))  # before the config checks, whose messages would be less direct
  evidence = tower_evidence(extras, sd)
  params, info = torch_state_dict_to_flax(sd, fmt=fmt, model=model, image_size=image_size,
                                          heads=heads, antialias=antialias, act=act, ln_eps=ln_eps,
                                          evidence=evidence, pool=pool)
  if fmt == "auto" and any(e.source.startswith("open_clip_config") for e in evidence.values()):
    info = dataclasses.replace(info, source_format="open_clip")  # same names as OpenAI's
  return params, _pixel_stats(path, extras, info, pixel_stats)
