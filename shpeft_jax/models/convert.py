"""PyTorch CLIP vision checkpoints <-> Flax params, as small pure-numpy rules over flat names.

Three source layouts reach us:
  * OpenAI CLIP (`visual.conv1.weight`, fused `attn.in_proj_weight`), as the TorchScript archive
    OpenAI publishes or as a plain state dict. open_clip state dicts use the same names, sometimes
    behind a `module.` prefix (DDP) or inside `{"state_dict": ...}` (training checkpoints).
  * Hugging Face CLIP (`vision_model.embeddings.patch_embedding.weight`, separate q/k/v/out
    projections, `pre_layrnorm` (sic)). Files of `CLIPModel` and of `CLIPVisionModel` written by
    transformers < 5 carry the `vision_model.` prefix; a transformers >= 5 `CLIPVisionModel` state
    dict has the same names without it. Both are accepted.
  * Our own exports (`flax_to_torch_state_dict`): OpenAI names without `visual.` or HF names, plus
    `head.weight` / `head.bias`.

Every layout is first validated in its own names (so errors name the key the user has in the
file), then mapped onto one canonical layout (OpenAI names without prefix, fused in_proj, torch
array layouts), and from there onto the Flax tree of `shpeft_jax.models.clip_vit`. Export runs the
same two steps backwards; each rule is a transpose, reshape, split or concatenate, so the round trip
Flax -> torch -> Flax is bit-exact.

Reading files needs torch / safetensors (imported lazily); the rules themselves need only numpy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zipfile
from typing import Any, Mapping

import numpy as np

from shpeft_jax.errors import CheckpointError, ConfigError
from shpeft_jax.models import clip_vit
from shpeft_jax.utils import flatten_names

FORMATS = ("auto", "openai", "open_clip", "hf")
LAYOUTS = ("openai", "hf")
# Name prefixes of the additive / prompt PEFT parameters (see clip_vit.py). They have no place in
# a plain CLIP state dict: merge them into the base weights first.
from shpeft_jax.param_names import ADDITIVE_PREFIXES  # pylint: disable=g-bad-import-order
HF_PREFIX = "vision_model."
OPENAI_PREFIX = "visual."
_QKV = ("query", "key", "value")
_MAX_LISTED = 8


@dataclasses.dataclass(frozen=True)
class ConversionInfo:
  """What `torch_state_dict_to_flax` found in the source and what it produced."""
  model: str                  # preset name, e.g. 'ViT-B/16'
  image_size: int             # image size of the produced params
  source_image_size: int      # image size the checkpoint's positional embedding was trained at
  source_format: str          # 'openai' | 'open_clip' | 'hf'
  num_classes: int | None     # set when the source carried a `head` (our own exports)
  ignored_keys: tuple[str, ...] = ()  # known non-tower keys dropped (proj, text tower, buffers)


# ----------------------------------------------------------------------------------------------
# Expected tensors per layout.


def _ln(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
  return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def openai_shapes(cfg: clip_vit.ViTConfig, num_tokens: int | None = None) -> dict[str, tuple]:
  """{name: shape} of the OpenAI-layout tower (no `visual.` prefix, no `proj`), in file order."""
  d, p, m = cfg.width, cfg.patch_size, cfg.mlp_dim
  shapes = {"conv1.weight": (d, 3, p, p), "class_embedding": (d,),
            "positional_embedding": (num_tokens or cfg.num_tokens, d)}
  shapes.update(_ln("ln_pre", d))
  for i in range(cfg.layers):
    b = f"transformer.resblocks.{i}."
    shapes.update({b + "attn.in_proj_weight": (3 * d, d), b + "attn.in_proj_bias": (3 * d,),
                   b + "attn.out_proj.weight": (d, d), b + "attn.out_proj.bias": (d,)})
    shapes.update(_ln(b + "ln_1", d))
    shapes.update({b + "mlp.c_fc.weight": (m, d), b + "mlp.c_fc.bias": (m,),
                   b + "mlp.c_proj.weight": (d, m), b + "mlp.c_proj.bias": (d,)})
    shapes.update(_ln(b + "ln_2", d))
  shapes.update(_ln("ln_post", d))
  return shapes


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


_LAYOUT = {
    # layout: (conv key, positional key, block regex, shape function)
    "openai": ("conv1.weight", "positional_embedding", re.compile(r"transformer\.resblocks\.(\d+)\."),
               openai_shapes),
    "hf": ("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
           re.compile(r"encoder\.layers\.(\d+)\."), hf_shapes),
}
# Tower keys that are legitimately present but not part of our model.
_IGNORED_TOWER_KEYS = {"openai": {"proj"}, "hf": {"embeddings.position_ids"}}

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


def resize_positional_embedding(pos: np.ndarray, new_grid: int, *,
                                antialias: bool = True) -> np.ndarray:
  """[1 + g*g, D] -> [1 + new_grid**2, D]: bicubic on the patch grid, class token kept as is.

  The same operation as open_clip's `resize_pos_embed` (bicubic, align_corners=False,
  antialias=True), which is what CLIP fine-tuning code applies when the image size changes.
  """
  pos = np.asarray(pos)
  n, d = pos.shape
  old = math.isqrt(n - 1)
  if old * old != n - 1:
    raise CheckpointError(
        f"positional embedding has {n} rows; expected 1 class token + a square grid of patches.")
  if old == new_grid:
    return pos
  grid = pos[1:].astype(np.float64).reshape(old, old, d)
  m = _bicubic_matrix(old, new_grid, antialias)
  grid = np.einsum("ih,hwd->iwd", m, grid)
  grid = np.einsum("jw,iwd->ijd", m, grid)
  out = np.concatenate([pos[:1].astype(np.float64), grid.reshape(new_grid * new_grid, d)], axis=0)
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


def _detect(keys: set[str], fmt: str) -> tuple[str, str]:
  """(layout, prefix) of the vision tower; raises for other architectures and text-only files."""
  has = lambda prefix: any(k.startswith(prefix) for k in keys)
  if has(OPENAI_PREFIX):
    if has("visual.attnpool.") or has("visual.layer1.") or has("visual.bn1."):
      raise CheckpointError(
          "This is a CLIP ModifiedResNet image tower (keys visual.layer1.*, visual.attnpool.*), "
          "not a ViT; convert a ViT checkpoint (ViT-B/16, ViT-B/32 or ViT-L/14).")
    layout, prefix = "openai", OPENAI_PREFIX
  elif has(HF_PREFIX):
    layout, prefix = "hf", HF_PREFIX
  elif "conv1.weight" in keys and "class_embedding" in keys:
    layout, prefix = "openai", ""
  elif "embeddings.patch_embedding.weight" in keys:
    layout, prefix = "hf", ""
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
        f"No CLIP vision-tower keys found (expected visual.conv1.weight or "
        f"vision_model.embeddings.patch_embedding.weight); the file has: {_listing(sorted(keys))}.")
  if fmt == "hf" and layout != "hf":
    raise CheckpointError(f"--format hf, but the file has OpenAI/open_clip keys ({prefix}conv1.weight); "
                          f"use --format openai (or auto).")
  if fmt in ("openai", "open_clip") and layout != "openai":
    raise CheckpointError(f"--format {fmt}, but the file has Hugging Face keys "
                          f"({prefix}embeddings.patch_embedding.weight); use --format hf (or auto).")
  return layout, prefix


def _preset_for(patch: int, width: int, layers: int, mlp_dim: int | None) -> str | None:
  matches = []
  for name in clip_vit.model_names():
    c = clip_vit.get_model_config(name)
    if (c.patch_size, c.width, c.layers) == (patch, width, layers):
      matches.append((c.mlp_dim != mlp_dim, name))
  return min(matches)[1] if matches else None


def _describe(patch, width, layers, mlp_dim) -> str:
  return f"patch {patch}, width {width}, {layers} layers, mlp {mlp_dim}"


# ----------------------------------------------------------------------------------------------
# torch -> Flax.


def _openai_to_flax(sd: Mapping[str, np.ndarray], cfg: clip_vit.ViTConfig) -> dict:
  """Canonical OpenAI-layout tower (validated, correct shapes) -> Flax `encoder` subtree."""
  d, h = cfg.width, cfg.heads
  hd = d // h
  ln = lambda p: {"scale": sd[f"{p}.weight"], "bias": sd[f"{p}.bias"]}
  enc: dict[str, Any] = {
      "conv1": {"kernel": sd["conv1.weight"].transpose(2, 3, 1, 0)},  # OIHW -> HWIO
      "class_embedding": sd["class_embedding"],
      "positional_embedding": sd["positional_embedding"],
      "ln_pre": ln("ln_pre"),
  }
  for i in range(cfg.layers):
    b = f"transformer.resblocks.{i}."
    weights = np.split(sd[b + "attn.in_proj_weight"], 3, axis=0)  # [out, in] each
    biases = np.split(sd[b + "attn.in_proj_bias"], 3, axis=0)
    attn = {n: {"kernel": w.T.reshape(d, h, hd), "bias": bb.reshape(h, hd)}
            for n, w, bb in zip(_QKV, weights, biases)}
    attn["out"] = {"kernel": sd[b + "attn.out_proj.weight"].T.reshape(h, hd, d),
                   "bias": sd[b + "attn.out_proj.bias"]}
    dense = lambda p: {"kernel": sd[f"{p}.weight"].T, "bias": sd[f"{p}.bias"]}
    enc[f"resblocks_{i}"] = {
        "ln_1": ln(b + "ln_1"), "attn": attn, "ln_2": ln(b + "ln_2"),
        "mlp": {"c_fc": dense(b + "mlp.c_fc"), "c_proj": dense(b + "mlp.c_proj")},
    }
  enc["ln_post"] = ln("ln_post")
  return _contiguous_f32(enc)


def _contiguous_f32(tree):
  if isinstance(tree, dict):
    return {k: _contiguous_f32(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, dtype=np.float32)


def _hf_to_openai(sd: Mapping[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
  out = {_HF_TO_OPENAI_STATIC[k]: v for k, v in sd.items() if k in _HF_TO_OPENAI_STATIC}
  for i in range(layers):
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


def torch_state_dict_to_flax(sd: Mapping[str, Any], *, fmt: str = "auto", model: str | None = None,
                             image_size: int | None = None, heads: int | None = None,
                             antialias: bool = True) -> tuple[dict, ConversionInfo]:
  """A PyTorch CLIP state dict (any supported layout) -> ({'encoder': ..., ['head': ...]}, info).

  Args:
    sd: name -> torch tensor or numpy array. Text-tower keys, `proj` and buffers are ignored.
    fmt: 'auto' | 'openai' | 'open_clip' | 'hf'; anything but 'auto' is checked against the keys.
    model: preset the checkpoint must be (e.g. 'ViT-B/16'); None infers it from the shapes.
    image_size: target image size; None keeps the checkpoint's. The positional embedding is
      resampled (bicubic, see `resize_positional_embedding`) when the grid changes.
    heads: number of attention heads if known from a config.json; weights do not determine it,
      so it is only checked against the preset (CLIP uses width // 64).
    antialias: passed to `resize_positional_embedding` (open_clip's choice is True).

  Raises:
    CheckpointError naming the offending key and the expected vs found shape; nothing is written.
  """
  if fmt not in FORMATS:
    raise ConfigError(f"Unknown checkpoint format {fmt!r}; choose from {FORMATS}.")
  sd, wrapped = _unwrap(sd)
  keys = set(sd)
  layout, prefix = _detect(keys, fmt)
  conv_key, pos_key, block_re, shape_fn = _LAYOUT[layout]
  tower = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  if prefix == "":  # bare layout: everything but the head is the tower.
    tower = {k: v for k, v in tower.items() if not k.startswith("head.")}
  head_keys = {k for k in ("head.weight", "head.bias") if k in sd}

  # Architecture from shapes.
  if conv_key not in tower:
    raise CheckpointError(
        f"Missing key {prefix}{conv_key} (the patch embedding, shape (width, 3, patch, patch)); this is "
        f"not a CLIP ViT tower in the {layout} layout. Its tower keys: "
        f"{_listing(sorted(prefix + k for k in tower))}.")
  conv = tower[conv_key]
  if len(conv.shape) != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
    raise CheckpointError(f"{prefix}{conv_key} has shape {_fmt(conv.shape)}; expected "
                          f"(width, 3, patch, patch) of a ViT patch embedding.")
  width, patch = int(conv.shape[0]), int(conv.shape[2])
  layer_ids = {int(m.group(1)) for k in tower if (m := block_re.match(k))}
  layers = max(layer_ids) + 1 if layer_ids else 0
  mlp_key = ("transformer.resblocks.0.mlp.c_fc.weight" if layout == "openai"
             else "encoder.layers.0.mlp.fc1.weight")
  mlp_dim = int(tower[mlp_key].shape[0]) if mlp_key in tower else None
  if pos_key not in tower:
    raise CheckpointError(f"Missing key {prefix}{pos_key} (expected shape (1 + grid**2, {width})).")
  pos = tower[pos_key]
  n_tok = int(pos.shape[0]) if len(pos.shape) == 2 else -1
  src_grid = math.isqrt(max(n_tok - 1, 0))
  if len(pos.shape) != 2 or pos.shape[1] != width or src_grid * src_grid != n_tok - 1 or src_grid == 0:
    raise CheckpointError(f"{prefix}{pos_key} has shape {_fmt(pos.shape)}; expected "
                          f"(1 + grid**2, {width}) for a tower of width {width}.")
  src_image_size = src_grid * patch
  found = _describe(patch, width, layers, mlp_dim)
  guess = _preset_for(patch, width, layers, mlp_dim)
  if model is None:
    if guess is None:
      raise CheckpointError(
          f"The checkpoint's vision tower ({found}; from {prefix}{conv_key} shape {_fmt(conv.shape)} "
          f"and {layers} blocks) matches no model preset {clip_vit.model_names()}.")
    model = guess
  cfg = clip_vit.get_model_config(model, image_size or src_image_size)
  if (cfg.patch_size, cfg.width) != (patch, width) or cfg.layers != layers:
    looks = f"it looks like {guess}" if guess else f"it has {found}"
    exp = (cfg.width, 3, cfg.patch_size, cfg.patch_size)
    detail = (f"{prefix}{conv_key}: expected shape {_fmt(exp)}, found {_fmt(conv.shape)}"
              if exp != tuple(conv.shape) else f"expected {cfg.layers} blocks, found {layers}")
    raise CheckpointError(f"The checkpoint is not a {model} vision tower ({looks}): {detail}. "
                          f"Pass the matching model name or convert the right file.")
  if heads is not None and heads != cfg.heads:
    raise CheckpointError(f"The checkpoint's config says {heads} attention heads, but {model} has "
                          f"{cfg.heads}; this tower cannot be represented by the {model} preset.")

  # Every expected key and shape, in the file's own names.
  expected = shape_fn(cfg, num_tokens=n_tok)
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

  arrays = {k: to_numpy(tower[k]) for k in expected}
  canonical = arrays if layout == "openai" else _hf_to_openai(arrays, cfg.layers)
  canonical["positional_embedding"] = resize_positional_embedding(
      canonical["positional_embedding"], cfg.grid, antialias=antialias)
  params: dict[str, Any] = {"encoder": _openai_to_flax(canonical, cfg)}
  if num_classes is not None:
    params["head"] = _contiguous_f32({"kernel": to_numpy(sd["head.weight"]).T,
                                      "bias": to_numpy(sd["head.bias"])})
  if fmt != "auto":
    source_format = fmt
  else:
    source_format = "hf" if layout == "hf" else ("open_clip" if wrapped else "openai")
  used = {prefix + k for k in expected} | head_keys
  info = ConversionInfo(model=model, image_size=cfg.image_size, source_image_size=src_image_size,
                        source_format=source_format, num_classes=num_classes,
                        ignored_keys=tuple(sorted(keys - used)))
  return params, info


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


def flax_encoder_config(encoder: Mapping[str, Any]) -> clip_vit.ViTConfig:
  """The tower shape read off a Flax `encoder` subtree (for export without a preset name)."""
  try:
    k = np.shape(encoder["conv1"]["kernel"])
    layers = len([n for n in encoder if re.fullmatch(r"resblocks_\d+", n)])
    heads = np.shape(encoder["resblocks_0"]["attn"]["query"]["kernel"])[1]
    mlp_dim = np.shape(encoder["resblocks_0"]["mlp"]["c_fc"]["kernel"])[1]
    n_tok = np.shape(encoder["positional_embedding"])[0]
  except (KeyError, IndexError, TypeError) as e:
    raise CheckpointError(f"Flax params are not a CLIP ViT encoder tree: missing {e}.") from e
  grid = math.isqrt(n_tok - 1)
  return clip_vit.ViTConfig(name="from-params", patch_size=int(k[0]), width=int(k[3]),
                            layers=layers, heads=int(heads), mlp_dim=int(mlp_dim),
                            image_size=grid * int(k[0]))


def _flax_to_openai(enc: Mapping[str, Any], cfg: clip_vit.ViTConfig) -> dict[str, np.ndarray]:
  d = cfg.width
  a = lambda x: np.asarray(x, dtype=np.float32)
  ln = lambda p, t: {f"{p}.weight": a(t["scale"]), f"{p}.bias": a(t["bias"])}
  out = {"conv1.weight": a(enc["conv1"]["kernel"]).transpose(3, 2, 0, 1),
         "class_embedding": a(enc["class_embedding"]),
         "positional_embedding": a(enc["positional_embedding"])}
  out.update(ln("ln_pre", enc["ln_pre"]))
  for i in range(cfg.layers):
    blk, b = enc[f"resblocks_{i}"], f"transformer.resblocks.{i}."
    attn = blk["attn"]
    out[b + "attn.in_proj_weight"] = np.concatenate(
        [a(attn[n]["kernel"]).reshape(d, d).T for n in _QKV], axis=0)
    out[b + "attn.in_proj_bias"] = np.concatenate([a(attn[n]["bias"]).reshape(d) for n in _QKV])
    out[b + "attn.out_proj.weight"] = a(attn["out"]["kernel"]).reshape(d, d).T
    out[b + "attn.out_proj.bias"] = a(attn["out"]["bias"])
    out.update(ln(b + "ln_1", blk["ln_1"]))
    for name in ("c_fc", "c_proj"):
      out[f"{b}mlp.{name}.weight"] = a(blk["mlp"][name]["kernel"]).T
      out[f"{b}mlp.{name}.bias"] = a(blk["mlp"][name]["bias"])
    out.update(ln(b + "ln_2", blk["ln_2"]))
  out.update(ln("ln_post", enc["ln_post"]))
  return out


def flax_to_torch_state_dict(params: Mapping[str, Any], layout: str) -> dict[str, np.ndarray]:
  """Flax params ({'encoder': ..., optional 'head': ...}) -> torch-layout numpy state dict.

  layout 'openai': OpenAI names without the `visual.` prefix (`conv1.weight`,
    `transformer.resblocks.N.attn.in_proj_weight`, ...) - loads with strict=True into
    `torch_reference.TorchClipClassifier` (or, without head keys, `TorchVisionTransformer`).
  layout 'hf': `vision_model.` + HF CLIP vision names - loads with strict=True into
    `torch_reference.TorchHFClipClassifier`.
  Plus `head.weight` [C, D] / `head.bias` [C] when params have a head.
  Values are C-contiguous float32 numpy arrays (wrap with torch.from_numpy to save/load).
  """
  if layout not in LAYOUTS:
    raise ConfigError(f"Unknown export layout {layout!r}; choose from {LAYOUTS}.")
  check_no_additive(params)
  if "encoder" not in params:
    raise CheckpointError("Flax params have no 'encoder' subtree; expected {'encoder': ..., 'head': ...}.")
  enc = params["encoder"]
  cfg = flax_encoder_config(enc)
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
  canonical = _flax_to_openai(enc, cfg)
  if layout == "openai":
    out = canonical
  else:
    out = {HF_PREFIX + k: v for k, v in _openai_to_hf(canonical, cfg.layers).items()}
  if "head" in params:
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


def _read_hf_config(directory: str) -> dict[str, Any] | None:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  cfg = cfg.get("vision_config", cfg) if isinstance(cfg, dict) else None
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


def _load_one(path: str) -> tuple[dict[str, Any], str]:
  """(state dict, container kind) of one file: safetensors, TorchScript archive or torch.save."""
  if path.endswith(".safetensors"):
    try:
      from safetensors.torch import load_file
    except ImportError:  # numpy loader: fine unless the file holds bfloat16.
      from safetensors.numpy import load_file
    try:
      return dict(load_file(path)), "safetensors"
    except Exception as e:  # safetensors raises its own error types.
      raise CheckpointError(f"Cannot read {path} as safetensors: {e}") from e
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"Reading {path} needs PyTorch: pip install 'shpeft_jax[torch]'.") from e
  if _is_torchscript(path):
    try:
      return dict(torch.jit.load(path, map_location="cpu").state_dict()), "torchscript"
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
  return dict(obj), "state_dict"


def load_torch_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads SRC (file or HF model directory) -> (state dict, extras).

  extras: {'container': 'safetensors'|'torchscript'|'state_dict', 'hf_config': dict or None}.
  The HF config.json is looked up next to the weights.
  """
  if not os.path.exists(path):
    raise CheckpointError(f"Checkpoint {path} does not exist.")
  files = _find_weights_in_dir(path) if os.path.isdir(path) else [path]
  sd: dict[str, Any] = {}
  container = None
  for f in files:
    part, container = _load_one(f)
    sd.update(part)
  directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  return sd, {"container": container, "hf_config": _read_hf_config(directory)}


def convert_file(path: str, *, fmt: str = "auto", model: str | None = None,
                 image_size: int | None = None, antialias: bool = True) -> tuple[dict, ConversionInfo]:
  """load_torch_checkpoint + torch_state_dict_to_flax (HF config.json heads checked when present)."""
  sd, extras = load_torch_checkpoint(path)
  heads = None
  hf_cfg = extras["hf_config"]
  if hf_cfg is not None and any(k.startswith(("vision_model.", "embeddings.")) for k in sd):
    heads = int(hf_cfg["num_attention_heads"])
  return torch_state_dict_to_flax(sd, fmt=fmt, model=model, image_size=image_size, heads=heads,
                                  antialias=antialias)
