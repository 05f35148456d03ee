"""Hugging Face's self-supervised ViT layouts <-> the converter's canonical (OpenAI-named) layout.

Two transformers classes hold the self-supervised towers medical imaging uses:
  * `Dinov2Model` (RAD-DINO, DINOv2 S/B/L/g) and `Dinov2WithRegistersModel` (DINOv2 with
    registers): `embeddings.{cls_token, mask_token, position_embeddings, register_tokens,
    patch_embeddings.projection}`, `encoder.layer.N.{norm1, attention.attention.{query,key,value},
    attention.output.dense, layer_scale1.lambda1, norm2, mlp.{fc1,fc2} | mlp.{weights_in,
    weights_out} (SwiGLU), layer_scale2.lambda1}`, `layernorm`.
  * `ViTModel` (iBOT / Phikon, MAE and DINO v1 ports): `encoder.layer.N.{layernorm_before,
    attention.*, layernorm_after, intermediate.dense, output.dense}`, `layernorm`, `pooler.dense`
    (a tanh head that is not the tower's feature; ignored).
Both pool the class token after the final `layernorm` (`last_hidden_state[:, 0]`), add the class
token's position, and (with registers) insert the registers after the class token without one.

Each layout is a table of (HF name, canonical name, rule): `copy`, `tok` (the HF tensor has a
leading batch axis: [1, n, D] <-> [n, D] or [D]) and `qkv` (one third of the fused in_proj rows).
The same table gives the expected shapes, the import and the export, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np

from shpeft_jax.models import clip_vit

# Keys of the HF classes that are not part of the tower's computation of the pooled feature.
IGNORED = {"hf_dinov2": {"embeddings.mask_token"},
           "hf_vit": {"embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias"}}
# What export writes for the keys a strict load needs but conversion dropped (never used for
# features: the mask token replaces masked patches only in masked-image-modelling training).
EXPORT_FILL = {"hf_dinov2": {"embeddings.mask_token": lambda cfg: np.zeros((1, cfg.width), np.float32)},
               "hf_vit": {}}


@dataclasses.dataclass(frozen=True)
class Family:
  """An HF ViT family's names: block sub-modules and where its MLP sits."""
  block_prefix: str                  # "encoder.layer.{i}."
  norms: tuple[str, str]             # the two pre-norms (ln_1, ln_2)
  fc: tuple[str, str]                # the MLP's two linears (c_fc, c_proj)
  swiglu_fc: tuple[str, str] | None  # the SwiGLU MLP's (Dinov2SwiGLUFFN)
  layer_scale: tuple[str, str] | None


FAMILIES = {
    "hf_dinov2": Family("encoder.layer.{i}.", ("norm1", "norm2"), ("mlp.fc1", "mlp.fc2"),
                        ("mlp.weights_in", "mlp.weights_out"),
                        ("layer_scale1.lambda1", "layer_scale2.lambda1")),
    "hf_vit": Family("encoder.layer.{i}.", ("layernorm_before", "layernorm_after"),
                     ("intermediate.dense", "output.dense"), None, None),
}
_ATTN = "attention.attention."


# transformers >= 5 names the modules of a live model differently from the files it writes and
# reads (which keep the names above, as every published checkpoint has them): a `state_dict()` of
# a live Dinov2Model / ViTModel is mapped onto the file names first.
_LIVE_TO_FILE = (
    (re.compile(r"^((?:\w+\.)?)layers\.(\d+)\."), r"\1encoder.layer.\2."),  # ViTModel
    (re.compile(r"\.attention\.([qkv])_proj\."), None),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
)
_QKV_FILE = {"q": "query", "k": "key", "v": "value"}


def file_names(sd: Mapping[str, Any]) -> dict[str, Any]:
  """A live transformers >= 5 Dinov2 / ViT state dict renamed to the checkpoint-file names (other
  state dicts are returned unchanged)."""
  live = any(".attention.q_proj." in k or ".mlp.gate_proj." in k for k in sd)
  if not live or any(".attention.attention." in k for k in sd):
    return dict(sd)
  vit = any(re.match(r"(?:\w+\.)?layers\.0\.layernorm_before\.", k) for k in sd)
  out = {}
  for k, v in sd.items():
    k = _LIVE_TO_FILE[0][0].sub(_LIVE_TO_FILE[0][1], k)
    k = _LIVE_TO_FILE[1][0].sub(lambda m: f".attention.attention.{_QKV_FILE[m.group(1)]}.", k)
    k = _LIVE_TO_FILE[2][0].sub(_LIVE_TO_FILE[2][1], k)
    if vit:
      k = k.replace(".mlp.fc1.", ".intermediate.dense.").replace(".mlp.fc2.", ".output.dense.")
    out[k] = v
  # The SwiGLU MLP: gate_proj / up_proj are the two halves of the file's weights_in.
  for k in [k for k in out if ".mlp.gate_proj." in k]:
    up = k.replace(".gate_proj.", ".up_proj.")
    out[k.replace(".gate_proj.", ".weights_in.")] = np.concatenate(
        [_numpy(out.pop(k)), _numpy(out.pop(up))], axis=0)
  for k in [k for k in out if ".mlp.down_proj." in k]:
    out[k.replace(".down_proj.", ".weights_out.")] = out.pop(k)
  return out


def live_names(sd: Mapping[str, Any], live_keys) -> dict[str, Any]:
  """The inverse of `file_names`: checkpoint-file names -> the names of a live module whose
  state-dict keys are `live_keys` (unchanged where the module uses the file names)."""
  live_keys = set(live_keys)
  if not any(".attention.q_proj." in k or ".mlp.gate_proj." in k for k in live_keys):
    return dict(sd)
  vit = any(re.search(r"(?:^|\.)layers\.0\.layernorm_before\.", k) for k in live_keys)
  out = {}
  for k, v in sd.items():
    k = re.sub(r"\.attention\.attention\.(query|key|value)\.",
               lambda m: f".attention.{m.group(1)[0]}_proj.", k)
    k = k.replace(".attention.output.dense.", ".attention.o_proj.")
    if vit:
      k = re.sub(r"(^|\.)encoder\.layer\.(\d+)\.", r"\1layers.\2.", k)
      k = k.replace(".intermediate.dense.", ".mlp.fc1.").replace(".output.dense.", ".mlp.fc2.")
    if ".mlp.weights_in." in k:
      gate, up = np.split(_numpy(v), 2, axis=0)
      out[k.replace(".weights_in.", ".gate_proj.")] = gate
      k, v = k.replace(".weights_in.", ".up_proj."), up
    out[k.replace(".mlp.weights_out.", ".mlp.down_proj.")] = v
  return out


def _numpy(v) -> np.ndarray:
  return v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v)


def entries(layout: str, cfg: clip_vit.ViTConfig) -> list[tuple[str, str, Any]]:
  """(HF key, canonical key, rule) of every tensor of the tower `cfg` in this layout."""
  fam = FAMILIES[layout]
  lw = lambda h, c: [(f"{h}.weight", f"{c}.weight", "copy"), (f"{h}.bias", f"{c}.bias", "copy")]
  out = [("embeddings.cls_token", "class_embedding", "tok"),
         ("embeddings.position_embeddings", "positional_embedding", "tok")]
  if cfg.registers:
    out.append(("embeddings.register_tokens", "register_tokens", "tok"))
  out += lw("embeddings.patch_embeddings.projection", "conv1")
  fc = fam.swiglu_fc if cfg.act == "swiglu" else fam.fc
  for i in range(cfg.layers):
    h, c = fam.block_prefix.format(i=i), f"transformer.resblocks.{i}."
    out += lw(h + fam.norms[0], c + "ln_1")
    for j, name in enumerate(("query", "key", "value")):
      out.append((f"{h}{_ATTN}{name}.weight", c + "attn.in_proj_weight", ("qkv", j)))
      if cfg.qkv_bias:
        out.append((f"{h}{_ATTN}{name}.bias", c + "attn.in_proj_bias", ("qkv", j)))
    out += lw(h + "attention.output.dense", c + "attn.out_proj")
    out += lw(h + fam.norms[1], c + "ln_2")
    out += lw(h + fc[0], c + "mlp.c_fc") + lw(h + fc[1], c + "mlp.c_proj")
    if cfg.layer_scale:
      out += [(h + fam.layer_scale[0], c + "ls_1", "copy"), (h + fam.layer_scale[1], c + "ls_2", "copy")]
  out += lw("layernorm", "ln_post")
  return out


def _hf_shape(rule, canonical_shape: tuple[int, ...]) -> tuple[int, ...]:
  if rule == "tok":
    return (1, int(np.prod(canonical_shape)) // canonical_shape[-1], canonical_shape[-1])
  if rule == "copy":
    return tuple(canonical_shape)
  return (canonical_shape[0] // 3,) + tuple(canonical_shape[1:])


def shapes(layout: str, canonical_shapes: Callable, cfg: clip_vit.ViTConfig,
           num_tokens: int | None = None) -> dict[str, tuple[int, ...]]:
  """{HF key: shape} of the tower `cfg` (canonical_shapes: convert.openai_shapes)."""
  canon = canonical_shapes(cfg, num_tokens)
  return {h: _hf_shape(rule, canon[c]) for h, c, rule in entries(layout, cfg)}


def to_canonical(layout: str, sd: Mapping[str, np.ndarray], cfg: clip_vit.ViTConfig,
                 canonical_shapes: Callable) -> dict[str, np.ndarray]:
  canon_shapes = canonical_shapes(cfg, int(np.shape(sd["embeddings.position_embeddings"])[1]))
  out: dict[str, Any] = {}
  thirds: dict[str, list] = {}
  for h, c, rule in entries(layout, cfg):
    if rule == "copy":
      out[c] = sd[h]
    elif rule == "tok":
      out[c] = np.asarray(sd[h]).reshape(canon_shapes[c])
    else:
      thirds.setdefault(c, [None] * 3)[rule[1]] = sd[h]
  out.update({c: np.concatenate(parts, axis=0) for c, parts in thirds.items()})
  return out


def from_canonical(layout: str, canon: Mapping[str, np.ndarray],
                   cfg: clip_vit.ViTConfig) -> dict[str, np.ndarray]:
  out = {}
  for h, c, rule in entries(layout, cfg):
    if rule == "copy":
      out[h] = canon[c]
    elif rule == "tok":
      out[h] = np.asarray(canon[c]).reshape(_hf_shape("tok", np.shape(canon[c])))
    else:
      out[h] = np.split(canon[c], 3, axis=0)[rule[1]]
  out.update({k: make(cfg) for k, make in EXPORT_FILL[layout].items()})
  return out


def features(layout: str, tower: Mapping[str, Any]) -> dict[str, Any]:
  """The structural tower fields the keys of an HF Dinov2 / ViT state dict decide."""
  fam = FAMILIES[layout]
  b0 = fam.block_prefix.format(i=0)
  regs = tower.get("embeddings.register_tokens")
  return {"ln_pre": False, "patch_bias": "embeddings.patch_embeddings.projection.bias" in tower,
          "layer_scale": fam.layer_scale is not None, "registers": 0 if regs is None else int(regs.shape[1]),
          "final_norm": True, "fc_norm": False, "qkv_bias": f"{b0}{_ATTN}query.bias" in tower,
          "class_pos": True,
          "swiglu": fam.swiglu_fc is not None and f"{b0}{fam.swiglu_fc[0]}.weight" in tower}


def exportable(layout: str, cfg: clip_vit.ViTConfig) -> list[str]:
  """What the HF class cannot compute of `cfg` (empty: exportable)."""
  fam = FAMILIES[layout]
  need = {"ln_pre": False, "final_norm": True, "fc_norm": False, "class_pos": True,
          "layer_scale": fam.layer_scale is not None, "patch_bias": True}
  bad = [f"{f}={getattr(cfg, f)}" for f, v in need.items() if getattr(cfg, f) != v]
  if layout == "hf_vit" and cfg.registers:
    bad.append(f"registers={cfg.registers}")
  if cfg.act == "swiglu" and fam.swiglu_fc is None:
    bad.append("act=swiglu")
  return bad
