"""Task adapters: a fine-tuned classifier as the changed encoder elements of one base CLIP + its head.

SH-PEFT trains k = 1% of the encoder, so a task costs ~1% of a model to keep: one base checkpoint
and one adapter per dataset. An adapter directory holds

  DIR/shpeft_adapter.json         {"format", "layout": "openai", "base": {"name", "sha256",
                                   "openai_sha256", "keys", "num_params"}, "method", "model": meta,
                                   "mask_stats", "tensors": {key: {"kind", "shape", "dtype", ...}},
                                   "stats"}
  DIR/shpeft_adapter.safetensors  per changed tensor either KEY.values + KEY.gaps (sparse) or KEY
                                  (dense), plus head.weight / head.bias

Tensors are named and laid out as in the OpenAI CLIP state dict without the `visual.` prefix
(`conv1.weight`, `transformer.resblocks.N.attn.in_proj_weight`, ...; what `python -m
shpeft_jax.export --format openai` writes), so that applying an adapter in PyTorch is twenty lines
(docs/ADAPTERS.md) and the indices mean the same thing in every framework. A sparse tensor stores
the values of the elements whose bits differ from the base and their flat C-order indices as the
first index (in the JSON) plus successive gaps in the smallest unsigned dtype (uint16 for most
tensors at 1%); a tensor more than a third changed is stored whole; an unchanged one not at all
(`sparse_encoding`). The base is identified by `sparse_encoding.content_hash` of its
Flax encoder (checked by `load_with_base`) and by the same hash over the OpenAI-layout tensors
(checked by the PyTorch example); a base with another hash is refused.

`write_peft` turns the same difference into a Hugging Face `peft` SHiRA adapter for
`transformers.CLIPVisionModel` (see docs/ADAPTERS.md for what is and is not representable).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from typing import Any, Mapping

import numpy as np

from shpeft_jax import utils
from shpeft_jax.sparse_encoding import (DENSE_FRACTION, changed_indices, content_hash,
                                        decode_indices, encode_indices)
from shpeft_jax.errors import CheckpointError
from shpeft_jax.utils import flatten_names

FORMAT = "shpeft_jax.adapter/1"
CONFIG = "shpeft_adapter.json"
TENSORS = "shpeft_adapter.safetensors"
LAYOUT = "openai"
HEAD_KEYS = ("head.weight", "head.bias")
# Mask statistics kept in the config: the summaries, not the per-tensor table (that is mask_stats.json).
_MASK_STATS_KEYS = ("total", "per_kind", "per_type", "per_layer", "unmasked")


def is_adapter(path) -> bool:
  """True when `path` is an adapter directory written by `write_adapter`."""
  f = os.path.join(str(path), CONFIG)
  if not os.path.isfile(f):
    return False
  try:
    with open(f) as fh:
      return json.load(fh).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def _encoder_only(params: Mapping[str, Any]) -> dict:
  if not isinstance(params, Mapping) or "encoder" not in params:
    raise CheckpointError("The base params have no 'encoder' subtree; a base is a params checkpoint "
                          "of a CLIP encoder (`python -m shpeft_jax.convert SRC --out DIR`).")
  return {"encoder": params["encoder"]}


def base_hash(base_params) -> str:
  """The identity of a base: `content_hash` of its Flax encoder (a head, if any, is ignored)."""
  return content_hash(_encoder_only(base_params))


def _host_f32(tree) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def _torch_layout(params, layout: str = LAYOUT) -> dict[str, np.ndarray]:
  from shpeft_jax.models.convert import flax_to_torch_state_dict  # pylint: disable=g-import-not-at-top
  return flax_to_torch_state_dict(_host_f32(params), layout)


def _file_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _compact_mask_stats(mask_stats: Mapping[str, Any] | None) -> dict | None:
  if mask_stats is None:
    return None
  out = {k: mask_stats[k] for k in _MASK_STATS_KEYS if k in mask_stats}
  return json.loads(json.dumps(out or dict(mask_stats), default=float))


def _check_openai_tower(meta: Mapping[str, Any]) -> None:
  """Adapters are stored in the OpenAI layout: a timm-trunk tower (patch bias, no ln_pre, e.g.
  BiomedCLIP) has no place there, so it is refused rather than stored wrong."""
  from shpeft_jax.models import clip_vit  # pylint: disable=g-import-not-at-top
  tower = clip_vit.tower_from_meta(meta)
  ssl = any(tower[f] != clip_vit.TOWER_DEFAULTS[f] for f in (
      "layer_scale", "registers", "pool", "final_norm", "fc_norm", "qkv_bias", "class_pos"))
  if tower["patch_bias"] or not tower["ln_pre"] or ssl or tower["act"] == "swiglu":
    raise CheckpointError(
        "Task adapters hold OpenAI-layout towers (ln_pre, no patch bias); this is a timm-trunk "
        "tower (e.g. BiomedCLIP): keep the full export/model instead.")


def write_adapter(out_dir: str, params, base_params, *, base_name: str,
                  mask_stats: Mapping[str, Any] | None = None, method: str = "",
                  meta: Mapping[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Atomically writes the adapter of the classifier `params` against the encoder `base_params`.

  Args:
    out_dir: the adapter directory to create.
    params: the fine-tuned classifier ({'encoder', 'head'}; LoRA / SSF merged: additive leaves are
      refused with the reason).
    base_params: the params it was fine-tuned from (their 'encoder'; a head is ignored).
    base_name: how a user finds the base again (the converted checkpoint's path or model name).
    mask_stats: the selection's statistics (`mask_io.build_mask_stats`), summaries are kept.
    method: the PEFT method name.
    meta: the classifier's meta (model, image_size, num_classes, ...), JSON-serialisable.
    overwrite: replace an existing `out_dir`.

  Returns:
    {"bytes", "full_bytes", "ratio", "changed", "num_params", "sparse_tensors", "dense_tensors"}:
    the adapter's size on disk against the float32 tensors of the full classifier.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise CheckpointError(f"{out_dir} already exists; pass overwrite=True or choose another path.")
  meta = dict(meta or {})
  if "head" not in params:
    raise CheckpointError("The params have no head: an adapter holds a trained classifier "
                          "(the trainer's export/model), not an encoder.")
  _check_openai_tower(meta)
  new = _torch_layout(params)
  base_enc = _encoder_only(base_params)
  base = _torch_layout(base_enc)
  for key, b in base.items():
    a = new.get(key)
    if a is None or a.shape != b.shape or a.dtype != b.dtype:
      got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
      raise CheckpointError(
          f"{key} is {got} in the fine-tuned params but {b.dtype}{list(b.shape)} in the base "
          f"{base_name}: an adapter needs the base the model was fine-tuned from (same model and "
          "image size).")

  arrays: dict[str, np.ndarray] = {}
  tensors: dict[str, dict[str, Any]] = {}
  changed = 0
  for key, a in new.items():
    entry: dict[str, Any] = {"shape": list(a.shape), "dtype": a.dtype.str}
    if key in HEAD_KEYS:
      arrays[key] = a
      changed += a.size
      tensors[key] = dict(entry, kind="dense")
      continue
    idx = changed_indices(a, base[key])
    changed += idx.size
    if idx.size == 0:
      continue  # Bit-identical to the base.
    if idx.size > DENSE_FRACTION * a.size:
      arrays[key] = a
      tensors[key] = dict(entry, kind="dense")
    else:
      first, gaps = encode_indices(idx)
      arrays[key + ".values"] = a.reshape(-1)[idx]
      arrays[key + ".gaps"] = gaps
      tensors[key] = dict(entry, kind="sparse", count=int(idx.size), first=first)

  num_params = int(sum(a.size for a in new.values()))
  config = {
      "format": FORMAT,
      "layout": LAYOUT,
      "base": {"name": str(base_name), "sha256": base_hash(base_enc),
               "openai_sha256": content_hash(base), "keys": sorted(base),
               "num_params": int(sum(b.size for b in base.values()))},
      "method": method,
      "model": meta,
      "mask_stats": _compact_mask_stats(mask_stats),
      "tensors": tensors,
      "stats": {"changed": int(changed), "num_params": num_params,
                "full_bytes": int(sum(a.nbytes for a in new.values())),
                "sparse_tensors": sum(e["kind"] == "sparse" for e in tensors.values()),
                "dense_tensors": sum(e["kind"] == "dense" for e in tensors.values())},
  }
  with utils.atomic_path(out_dir, directory=True) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
              os.path.join(tmp, TENSORS), metadata={"format": FORMAT})
    config["stats"]["bytes"] = os.path.getsize(os.path.join(tmp, TENSORS))
    with open(os.path.join(tmp, CONFIG), "w") as f:
      json.dump(config, f, indent=1)
  stats = dict(config["stats"])
  stats["bytes"] = _file_bytes(out_dir)
  stats["ratio"] = stats["bytes"] / stats["full_bytes"]
  return stats


def load_config(adapter_path: str) -> dict[str, Any]:
  """The adapter's JSON config (base reference, method, model meta, mask statistics, tensors)."""
  f = os.path.join(adapter_path, CONFIG)
  if not os.path.isfile(f) or not os.path.isfile(os.path.join(adapter_path, TENSORS)):
    raise CheckpointError(f"{adapter_path} is not a shpeft_jax adapter (needs {CONFIG} and "
                          f"{TENSORS}); runs write one to WORKDIR/export/adapter.")
  with open(f) as fh:
    config = json.load(fh)
  if config.get("format") != FORMAT:
    raise CheckpointError(f"{adapter_path} has format {config.get('format')!r}; this version "
                          f"reads {FORMAT}.")
  return config


def apply_to_state_dict(base_sd: Mapping[str, np.ndarray], adapter_path: str,
                        config: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
  """OpenAI-layout numpy base tower -> the fine-tuned classifier's state dict (base not checked)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  config = config or load_config(adapter_path)
  stored = load_file(os.path.join(adapter_path, TENSORS))
  out = {k: np.asarray(v) for k, v in base_sd.items()}
  for key, e in config["tensors"].items():
    if e["kind"] == "dense":
      out[key] = stored[key]
      continue
    flat = out[key].reshape(-1).copy()
    flat[decode_indices(e["first"], stored[key + ".gaps"], e["count"])] = stored[key + ".values"]
    out[key] = flat.reshape(e["shape"])
  return out


def _load_base(base_path: str):
  from shpeft_jax import checkpoints  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(str(base_path)):
    raise CheckpointError(f"Base checkpoint {base_path!r} does not exist; pass the params "
                          "checkpoint the adapter was made from (python -m shpeft_jax.convert).")
  return checkpoints.load_params(base_path)


def load_with_base(adapter_path: str, base_path: str | None = None, *,
                   base_params=None) -> tuple[dict, dict[str, Any]]:
  """Rebuilds the fine-tuned classifier (numpy Flax tree) from an adapter and its base.

  Args:
    adapter_path: the adapter directory.
    base_path: the base params checkpoint (ignored when `base_params` is given).
    base_params: the base params if already in memory.

  Returns:
    (params, meta): meta is the classifier's meta (model, image_size, num_classes, ...) plus
    "adapter": {path, method, base}.

  Raises:
    CheckpointError: not an adapter, or a base whose content hash differs from the recorded one.
  """
  from shpeft_jax.models.convert import torch_state_dict_to_flax  # pylint: disable=g-import-not-at-top
  adapter_path = os.path.abspath(adapter_path)
  config = load_config(adapter_path)
  ref = config["base"]
  if base_params is None:
    if base_path is None:
      raise CheckpointError(f"{adapter_path} is an adapter: pass its base too (--base DIR; it "
                            f"was made from {ref['name']}).")
    base_params, _ = _load_base(base_path)
  base_enc = _encoder_only(_host_f32(base_params))
  got = base_hash(base_enc)
  if got != ref["sha256"]:
    raise CheckpointError(
        f"Wrong base: the adapter {adapter_path} was made from {ref['name']} (sha256 "
        f"{ref['sha256'][:16]}), but {base_path or 'the given base'} has sha256 {got[:16]}; pass "
        "the exact base checkpoint it was fine-tuned from.")
  sd = apply_to_state_dict(_torch_layout(base_enc), adapter_path, config)
  model = config["model"]
  from shpeft_jax.models import clip_vit  # pylint: disable=g-import-not-at-top
  tower = clip_vit.tower_from_meta(model)
  params, _ = torch_state_dict_to_flax(sd, fmt="openai", model=model.get("model"),
                                       image_size=model.get("image_size"), act=tower["act"],
                                       ln_eps=tower["ln_eps"])
  meta = dict(model)
  meta["adapter"] = {"path": adapter_path, "method": config.get("method"), "base": ref["name"],
                     "base_sha256": ref["sha256"]}
  return params, meta


def load_model(path: str, base_path: str | None = None) -> tuple[dict, dict[str, Any]]:
  """(params, meta) of a params checkpoint, or of an adapter applied to `base_path`."""
  if is_adapter(path):
    return load_with_base(path, base_path)
  if base_path is not None:
    raise CheckpointError(f"--base was given but {path} is not an adapter (no {CONFIG}); pass an "
                          "adapter directory (WORKDIR/export/adapter) or drop --base.")
  from shpeft_jax import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.load_params(path)


# ----------------------------------------------------------------------------------------------
# Hugging Face peft (SHiRA) export.

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_HEAD = "head.safetensors"
PEFT_META = "shpeft_peft.json"
PEFT_PREFIX = "base_model.model."
PEFT_MASK_TYPE = "shpeft"  # Not 'random': the indices come from the file, none are drawn at load.
_SHIRA_ENTRY_BYTES = 4 + 2 * 4  # float32 value + int32 (row, col).
_LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "self_attn.out_proj", "mlp.fc1", "mlp.fc2",
                    # transformers' Dinov2 / ViT (>= 5 in-memory names, and the file names of 4.x)
                    "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "attention.attention.query",
                    "attention.attention.key", "attention.attention.value", "attention.output.dense",
                    "intermediate.dense", "output.dense", "mlp.weights_in", "mlp.weights_out")
# Parameters written into the base model's own keys when changed (peft passes them through):
# Linear biases, the embeddings' tokens and positions, LayerScale gammas.
_IN_BASE_SUFFIXES = ("bias", "class_embedding", "cls_token", "position_embeddings",
                     "register_tokens", "lambda1")
# Stored whole through modules_to_save when changed. (Not the `embeddings` module itself:
# peft 0.21's merge_and_unload needs a `.weight` on every modules_to_save module.)
_WHOLE_MODULES = ("pre_layrnorm", "post_layernorm", "layer_norm1", "layer_norm2",
                  "embeddings.patch_embedding", "embeddings.position_embedding",
                  "norm1", "norm2", "layernorm_before", "layernorm_after", "layernorm",
                  "embeddings.patch_embeddings.projection")
# peft's base classes: the transformers class of each HF layout (`hf_layout_of`).
_PEFT_BASE = {"hf": ("CLIPVisionModel", "transformers.models.clip.modeling_clip"),
              "hf_dinov2": ("Dinov2Model", "transformers.models.dinov2.modeling_dinov2"),
              "hf_dinov2_registers": ("Dinov2WithRegistersModel",
                                      "transformers.models.dinov2_with_registers."
                                      "modeling_dinov2_with_registers"),
              "hf_vit": ("ViTModel", "transformers.models.vit.modeling_vit")}


def hf_layout_of(meta: Mapping[str, Any]) -> str:
  """The transformers class family a checkpoint's tower is: 'hf' (CLIPVisionModel), 'hf_dinov2'
  (Dinov2Model / Dinov2WithRegistersModel) or 'hf_vit' (ViTModel); CheckpointError for none."""
  from shpeft_jax.models import clip_vit, convert  # pylint: disable=g-import-not-at-top
  cfg = clip_vit.get_model_config(meta["model"], meta.get("image_size"),
                                  **clip_vit.tower_from_meta(meta))
  for layout in ("hf", "hf_dinov2", "hf_vit"):
    try:
      convert.check_exportable(cfg, layout)
      return layout
    except CheckpointError:
      continue
  raise CheckpointError("No transformers class computes this tower (CLIPVisionModel, Dinov2Model, "
                        "ViTModel); a peft adapter needs one. Export --format timm instead.")


def _hf_live_names(sd: Mapping[str, np.ndarray], layout: str, meta) -> dict[str, np.ndarray]:
  """Checkpoint-file names -> the names of the installed transformers' module (peft addresses
  modules by those): only Dinov2 / ViT differ (transformers >= 5)."""
  if layout == "hf":
    return dict(sd)
  import torch  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import clip_vit, hf_ssl_layouts  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import torch_reference  # pylint: disable=g-import-not-at-top
  cfg = clip_vit.get_model_config(meta["model"], meta.get("image_size"),
                                  **clip_vit.tower_from_meta(meta))
  with torch.device("meta"):
    live = torch_reference.hf_ssl_model(cfg, layout).state_dict()
  return hf_ssl_layouts.live_names(sd, live)


def hf_module_prefix(layout: str = "hf") -> str:
  """'' for transformers >= 5 (CLIPVisionModel holds the tower), 'vision_model.' before; '' for
  Dinov2Model / ViTModel, which are the tower."""
  if layout != "hf":
    return ""
  try:
    major = int(importlib.metadata.version("transformers").split(".")[0])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    major = 5
  return "" if major >= 5 else "vision_model."


def exact_deltas(target: np.ndarray, base: np.ndarray) -> np.ndarray:
  """float32 d with base + d == target bit for bit where one exists (SHiRA adds d to the base
  weight), else the nearest: fl(target - base) misses by an ulp in some cases, so its neighbours
  up to two ulps away are tried too. A zero delta is -0.0: x + -0.0 == x for every x, -0.0
  included (x + +0.0 turns -0.0 into +0.0)."""
  t, b = target.astype(np.float32), base.astype(np.float32)
  d0 = (t - b).astype(np.float32)
  d = np.where(d0 == 0, np.float32(-0.0), d0)
  bad = changed_indices(b + d, t)
  up, down = d0[bad], d0[bad]
  for _ in range(2):
    up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
    for cand in (up, down):
      hit = _bits(b[bad] + cand) == _bits(t[bad])
      d[bad[hit]] = cand[hit]
  return d


def _bits(a):
  a = np.ascontiguousarray(a)
  return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _choose_rank(counts: dict[str, tuple[int, int, int]]) -> tuple[int, set[str]]:
  """SHiRA has one r for all layers: each holds exactly r*(out+in) entries (the unused ones are
  written as -0.0 deltas). Returns the r of the smallest file and the layers stored whole instead
  (those with more changes than r*(out+in) or than peft allows, r*(out+in) <= out*in)."""
  best = None
  cap = min((o * i) // (o + i) for _, o, i in counts.values())
  for r in range(1, max(cap, 1) + 1):
    cost, dense = 0, set()
    for name, (n, o, i) in counts.items():
      if n <= r * (o + i):
        cost += _SHIRA_ENTRY_BYTES * r * (o + i)
      else:
        cost += 4 * (o * i + o)
        dense.add(name)
    if best is None or cost < best[0]:
      best = (cost, r, dense)
  return best[1], best[2]


def _shira_module(mod, ps, new, base, changed, r: int, pfx: str):
  """One Linear as SHiRA: (tensors, bias keys written into the base, inexact count, max error).

  Its r * (out + in) indices are the changed elements, padded with unchanged ones (delta -0.0)."""
  w_new, w_base = new[ps["weight"]], base[ps["weight"]]
  o, i = w_new.shape
  n = r * (o + i)
  idx = changed[ps["weight"]]
  if idx.size < n:  # Pad with unchanged positions (their delta is -0.0: no change).
    free = np.setdiff1d(np.arange(min(o * i, idx.size + n), dtype=np.int64), idx,
                        assume_unique=True)[:n - idx.size]
    idx = np.sort(np.concatenate([idx, free]))
  target, b = w_new.reshape(-1)[idx], w_base.reshape(-1)[idx]
  d = exact_deltas(target, b)
  miss = changed_indices(b + d, target)
  err = float(np.max(np.abs((b + d)[miss] - target[miss]))) if miss.size else 0.0
  tensors = {f"{pfx}{mod}.shira_weight": d,
             f"{pfx}{mod}.shira_indices": np.stack([idx // i, idx % i]).astype(np.int32)}
  biases = []
  if changed[ps["bias"]].size:
    tensors[f"{pfx}{mod}.base_layer.bias"] = new[ps["bias"]]
    biases.append(ps["bias"])
  return tensors, biases, int(miss.size), err


def _peft_config(base_name: str, r: int, shira_mods, to_save, base_class: str = "hf"
                 ) -> dict[str, Any]:
  """peft's adapter_config.json of a SHiRA adapter on a transformers CLIPVisionModel /
  Dinov2Model / Dinov2WithRegistersModel / ViTModel (`_PEFT_BASE`)."""
  cls, library = _PEFT_BASE[base_class]
  prefix = hf_module_prefix(base_class)
  return {
      "peft_type": "SHIRA", "task_type": None, "revision": None,
      "auto_mapping": {"base_model_class": cls, "parent_library": library},
      "base_model_name_or_path": str(base_name), "inference_mode": True,
      "r": int(r), "mask_type": PEFT_MASK_TYPE, "random_seed": None,
      "target_modules": sorted(prefix + m for m in shira_mods),
      "fan_in_fan_out": False, "init_weights": True,
      "modules_to_save": sorted(prefix + m for m in to_save) or None,
  }


def write_peft(out_dir: str, params, base_params, *, base_name: str,
               meta: Mapping[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Writes a `peft` SHiRA adapter of `params` for a transformers CLIPVisionModel holding the base.

  Linear weights -> SHiRA (sparse deltas at their indices); LayerNorms and the embeddings ->
  `modules_to_save`; changed Linear biases -> their full bias tensor under the base model's key
  (loaded by peft's state-dict pass-through like LoRA's bias='all'); a Linear with more changes
  than the chosen SHiRA rank holds -> `modules_to_save`; the head -> head.safetensors. Anything
  else (unmerged LoRA / SSF / adapters / VPT) is refused by the conversion, never dropped.

  Returns stats: bytes, r, shira layers, modules_to_save, biases, inexact (elements where no
  float32 delta reproduces the weight bit for bit) and their max abs error.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise CheckpointError(f"{out_dir} already exists; pass --overwrite or choose another --out.")
  if "head" not in params:
    raise CheckpointError("The params have no head: a peft export needs the trained classifier.")
  layout = hf_layout_of(meta) if meta and meta.get("model") else "hf"
  base_class = "hf_dinov2_registers" if layout == "hf_dinov2" and meta.get("registers") else layout
  # The HF layouts put the encoder behind `vision_model.` / `dinov2.` / `vit.` only when a head is
  # there too; peft addresses the modules by the installed transformers' names.
  strip = lambda sd: _hf_live_names(
      {k.split(".", 1)[1] if k.startswith(("vision_model.", "dinov2.", "vit.")) else k: v
       for k, v in sd.items() if not k.startswith("head.")}, layout, meta)
  new_full = _torch_layout(params, layout)
  new, base = strip(new_full), strip(_torch_layout(_encoder_only(base_params), layout))
  pfx = PEFT_PREFIX + hf_module_prefix(layout)

  modules: dict[str, dict[str, str]] = {}  # module -> {param: key}
  for key in new:
    mod, _, p = key.rpartition(".")
    modules.setdefault(mod, {})[p] = key
  changed = {k: changed_indices(new[k], base[k]) for k in new}

  linear_counts = {}
  for mod, ps in modules.items():
    if mod.endswith(_LINEAR_SUFFIXES):
      o, i = new[ps["weight"]].shape
      linear_counts[mod] = (changed[ps["weight"]].size, o, i)
  shira_mods = {m for m, c in linear_counts.items() if c[0] > 0}
  r, dense_linear = (_choose_rank({m: linear_counts[m] for m in shira_mods}) if shira_mods
                     else (1, set()))
  shira_mods -= dense_linear
  placeholder = None
  if not shira_mods:  # peft needs a target: one layer with all-zero deltas changes nothing.
    placeholder = min(set(linear_counts) - dense_linear)
    shira_mods, r = {placeholder}, 1

  tensors: dict[str, np.ndarray] = {}
  to_save: list[str] = sorted(dense_linear)
  in_base: list[str] = []  # Bare parameters written into the base model's own keys.
  inexact, max_err = 0, 0.0
  for mod in sorted(modules):
    ps = modules[mod]
    if mod in shira_mods:
      t, biases, miss, err = _shira_module(mod, ps, new, base, changed, r, pfx)
      tensors.update(t)
      in_base += biases
      inexact, max_err = inexact + miss, max(max_err, err)
      continue
    stray = [k for k in ps.values() if changed[k].size]
    if mod in dense_linear or (mod.endswith(_WHOLE_MODULES) and stray):
      if mod not in to_save:
        to_save.append(mod)
      for p, k in ps.items():
        tensors[f"{pfx}{mod}.{p}"] = new[k]
    elif stray and (mod in linear_counts or mod == "embeddings" or mod.endswith(
        ("layer_scale1", "layer_scale2"))) and all(k.endswith(_IN_BASE_SUFFIXES) for k in stray):
      for k in stray:
        tensors[f"{pfx}{k}"] = new[k]
        in_base.append(k)
    elif stray:  # A tensor no rule above covers: refuse rather than drop it.
      raise CheckpointError(f"{stray} changed but has no representation in a peft SHiRA adapter; "
                            "export --format openai|hf with --base instead.")

  config = _peft_config(base_name, r, shira_mods, to_save, base_class)
  meta = dict(meta or {})
  info = {"format": "shpeft_jax.peft/1", "model": meta, "base": {"name": str(base_name),
          "sha256": base_hash(base_params)}, "shira_r": int(r),
          "placeholder_target": placeholder, "written_into_base": sorted(in_base),
          "head": PEFT_HEAD}
  with utils.atomic_path(out_dir, directory=True) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(tmp, PEFT_WEIGHTS), metadata={"format": "pt"})
    save_file({k: np.ascontiguousarray(new_full[k]) for k in HEAD_KEYS},
              os.path.join(tmp, PEFT_HEAD), metadata={"format": "pt"})
    with open(os.path.join(tmp, PEFT_CONFIG), "w") as f:
      json.dump(config, f, indent=2)
    with open(os.path.join(tmp, PEFT_META), "w") as f:
      json.dump(info, f, indent=1)
  return {"bytes": _file_bytes(out_dir), "r": int(r), "shira_layers": len(shira_mods),
          "modules_to_save": len(to_save), "into_base": len(in_base), "inexact": int(inexact),
          "max_abs_error": max_err, "full_bytes": int(sum(a.nbytes for a in new_full.values()))}


def export_peft(path: str, base_path: str | None, out_dir: str, *, overwrite: bool = False) -> str:
  """`python -m shpeft_jax.export PATH --base BASE --format peft --out DIR`; returns the summary.

  PATH is an adapter or a fine-tuned params checkpoint; BASE is the base it was fine-tuned from
  (for an adapter its hash is checked; SHiRA stores differences to it either way).
  """
  if base_path is None:
    raise CheckpointError("--format peft needs --base BASE_DIR, the params checkpoint the model "
                          "was fine-tuned from: a SHiRA adapter stores the differences to it.")
  if os.path.exists(out_dir) and not overwrite:
    raise CheckpointError(f"{out_dir} already exists; pass --overwrite or choose another --out.")
  base_params, base_meta = _load_base(base_path)
  if is_adapter(path):
    params, meta = load_with_base(path, base_path, base_params=base_params)
  else:
    from shpeft_jax import checkpoints  # pylint: disable=g-import-not-at-top
    params, meta = checkpoints.load_params(path)
  for key in ("model", "image_size"):
    if base_meta.get(key) is not None and meta.get(key) is not None and base_meta[key] != meta[key]:
      raise CheckpointError(f"{path} is {key}={meta[key]!r} but the base {base_path} is "
                            f"{key}={base_meta[key]!r}; pass the base it was fine-tuned from.")
  stats = write_peft(out_dir, params, base_params, base_name=os.path.abspath(base_path),
                     meta={k: v for k, v in meta.items() if k != "adapter"}, overwrite=overwrite)
  exact = ("every weight bit-exact after merging" if not stats["inexact"] else
           f"{stats['inexact']} weights off by at most {stats['max_abs_error']:.2g}")
  return (f"wrote {out_dir}: peft SHiRA r={stats['r']} on {stats['shira_layers']} linear layers, "
          f"{stats['modules_to_save']} modules_to_save, {stats['into_base']} biases / class "
          f"embedding into the base, {exact}; "
          f"{stats['bytes'] / 2**20:.2f} MiB ({100 * stats['bytes'] / stats['full_bytes']:.2f}% of "
          "the full model). Load with peft.PeftModel.from_pretrained(CLIPVisionModel, DIR); the "
          f"head is {PEFT_HEAD} (docs/ADAPTERS.md).")


# ----------------------------------------------------------------------------------------------
# The trainer's hook.

RUN_ADAPTER = os.path.join("export", "adapter")
# Full fine-tuning changes every weight: its "adapter" would be a second full copy.
NO_ADAPTER_METHODS = ("full",)


def write_run_adapter(workdir: str, params, *, init_checkpoint: str | None, method: str,
                      meta: Mapping[str, Any]) -> dict[str, Any]:
  """Writes WORKDIR/export/adapter for a finished run (next to export/model); returns what the
  run records: {"path", "bytes", "full_bytes", "ratio"}, or {"skipped": reason}.

  The base is the run's init checkpoint (the pretrained encoder); the mask statistics come from
  WORKDIR/mask_stats.json when the run selected a mask.
  """
  from shpeft_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models.convert import ADDITIVE_PREFIXES  # pylint: disable=g-import-not-at-top
  # An adapter is a difference from a base checkpoint: without one there is nothing to differ from.
  if not init_checkpoint:
    return {"skipped": "the run has no base checkpoint (model.init_checkpoint is empty: it trained "
                       "from scratch), so there is nothing for an adapter to be a difference from; "
                       "export/model is the model"}
  if method in NO_ADAPTER_METHODS:
    return {"skipped": f"method {method!r} trains the whole encoder"}
  additive = [n for n in flatten_names(params)
              if any(p.startswith(ADDITIVE_PREFIXES) for p in n.split("/"))]
  if additive:
    return {"skipped": f"unmerged additive parameters ({additive[0]}, ...) are not encoder weights"}
  try:
    _check_openai_tower(meta)
  except CheckpointError as e:
    return {"skipped": str(e)}
  base_params, _ = checkpoints.load_params(init_checkpoint)
  mask_stats = None
  stats_file = os.path.join(workdir, "mask_stats.json")
  if os.path.isfile(stats_file):
    with open(stats_file) as f:
      mask_stats = json.load(f)
  out = os.path.join(workdir, RUN_ADAPTER)
  stats = write_adapter(out, params, base_params, base_name=os.path.abspath(init_checkpoint),
                        mask_stats=mask_stats, method=method, meta=meta, overwrite=True)
  return {"path": out, "bytes": stats["bytes"], "full_bytes": stats["full_bytes"],
          "ratio": stats["ratio"], "changed": stats["changed"]}


def describe(record: Mapping[str, Any]) -> str:
  """The log line of write_run_adapter's record."""
  if "skipped" in record:
    return f"No export/adapter: {record['skipped']}."
  return (f"Wrote {record['path']}: {record['bytes'] / 2**20:.2f} MiB, {100 * record['ratio']:.2f}% "
          f"of the full model ({record['changed']} changed elements incl. the head).")
