"""Sparse delta checkpoints: the weights that training changed, relative to a base params checkpoint.

SH-PEFT moves k = 1% of the encoder weights, so a fine-tuned model is the base model plus ~0.86M
(index, value) pairs plus the head. A full params checkpoint of ViT-B/16 is 344 MB; the delta is a
few MB and names the base it belongs to by path and content hash.

Layout of a delta directory:
  DIR/delta.json  {"format", "base": {"path", "sha256", "num_params"}, "order": [names],
                   "leaves": {name: {"kind": "sparse"|"dense", ...}}, "meta": {...}, "stats": {...}}
  DIR/delta.npz   uncompressed numpy arrays, keys "l{i}_values", "l{i}_gaps", "l{i}" (dense)

A leaf is stored
  - not at all when it is bit-identical to the base leaf (frozen);
  - "sparse" as the values of the elements whose bits differ from the base and their flat (C-order)
    indices, gap-encoded (first index in the JSON, then successive differences in the smallest
    unsigned dtype that holds them: uint16 for most leaves at 1%, which keeps the index cost at
    2 bytes per weight instead of 4-8);
  - "dense" in full when it is not in the base (the head of a new task, LoRA/adapter params), when its
    name starts with one of `dense_prefixes` (the head by default), or when more than a third of it
    changed (sparse storage would be larger).
"Changed" compares bit patterns, so -0.0 vs 0.0 and NaN payloads are preserved: restore rebuilds
the fine-tuned params bit for bit. Writes go to a temporary sibling first, then are renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from shpeft_jax import checkpoints
from shpeft_jax import utils
from shpeft_jax.errors import CheckpointError
from shpeft_jax.utils import flatten_names, unflatten_names

FORMAT = "shpeft_jax.delta/1"
INDEX = "delta.json"
ARRAYS = "delta.npz"
# Above this fraction of changed elements a leaf is cheaper stored whole (values + >= 2-byte gaps).
DENSE_FRACTION = 1.0 / 3.0


def _host(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(jax.device_get(v)) for k, v in flatten_names(tree).items()}


def content_hash(params) -> str:
  """sha256 over every leaf's name, dtype, shape and bytes, in sorted name order.

  Independent of where the params came from (a checkpoint, a conversion, memory), so a delta can
  check that the base it is applied to is the one it was made from.
  """
  h = hashlib.sha256()
  for name, a in sorted(_host(params).items()):
    a = np.ascontiguousarray(a)
    h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _bits(a: np.ndarray) -> np.ndarray:
  """An unsigned-integer view, so comparisons are on bit patterns (NaN == NaN, -0.0 != 0.0)."""
  a = np.ascontiguousarray(a)
  if a.dtype.kind in "fc" or a.dtype.kind == "V":
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))
  return a


def _smallest_uint(max_value: int) -> np.dtype:
  for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
    if max_value <= np.iinfo(dt).max:
      return np.dtype(dt)
  raise AssertionError(max_value)


def changed_indices(new: np.ndarray, base: np.ndarray) -> np.ndarray:
  """Flat (C-order) int64 indices of the elements whose bit patterns differ."""
  return np.flatnonzero(_bits(new).reshape(-1) != _bits(base).reshape(-1))


def encode_indices(idx: np.ndarray) -> tuple[int, np.ndarray]:
  """Sorted flat indices -> (first, gaps) with the gaps in the smallest unsigned dtype that holds
  them (uint16 for most leaves at 1%: 2 bytes per index instead of 8)."""
  gaps = np.diff(idx)
  return int(idx[0]), gaps.astype(_smallest_uint(int(gaps.max()) if gaps.size else 0))


def decode_indices(first: int, gaps: np.ndarray, count: int) -> np.ndarray:
  """Inverse of encode_indices."""
  idx = np.empty(count, np.int64)
  idx[0] = first
  np.cumsum(gaps.astype(np.int64), out=idx[1:])
  idx[1:] += first
  return idx


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def save_delta(path: str, params, base_path: str, *, base_params=None,
               meta: Mapping[str, Any] | None = None, dense_prefixes: tuple[str, ...] = ("head/",),
               overwrite: bool = False) -> dict[str, Any]:
  """Atomically writes the delta of `params` against the params checkpoint at `base_path`.

  Args:
    path: the delta directory to create.
    params: the fine-tuned params (device or numpy tree).
    base_path: a `shpeft_jax.checkpoints` params directory; recorded (absolute) with its hash.
    base_params: the base params if already in memory (must be the content of `base_path`; it is
      hashed either way, and the hash is what restore checks).
    meta: extra JSON-serialisable information (model name, step, config).
    dense_prefixes: names stored whole even if present in the base (the head by default).
    overwrite: replace an existing `path`.

  Returns:
    Statistics: changed elements, stored bytes, leaves per kind.
  """
  path = os.path.abspath(path)
  base_path = os.path.abspath(base_path)
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f"{path} already exists; pass overwrite=True or choose another path.")
  if base_params is None:
    base_params, _ = checkpoints.load_params(base_path)
  base = _host(base_params)
  new = _host(params)

  arrays: dict[str, np.ndarray] = {}
  leaves: dict[str, dict[str, Any]] = {}
  changed_total = 0
  for i, (name, a) in enumerate(new.items()):
    b = base.get(name)
    dense = b is None or name.startswith(tuple(dense_prefixes))
    if b is not None and not dense and (b.shape != a.shape or b.dtype != a.dtype):
      raise CheckpointError(
          f"{name!r} is {a.dtype}{list(a.shape)} in the params but {b.dtype}{list(b.shape)} in the "
          f"base {base_path}; a delta needs the base the model was fine-tuned from.")
    entry: dict[str, Any] = {"shape": list(a.shape), "dtype": a.dtype.str}
    if not dense:
      idx = changed_indices(a, b)
      changed_total += idx.size
      if idx.size == 0:
        continue  # Bit-identical to the base: nothing to store.
      if idx.size > DENSE_FRACTION * a.size:
        dense = True
      else:
        first, gaps = encode_indices(idx)
        arrays[f"l{i}_values"] = a.reshape(-1)[idx]
        arrays[f"l{i}_gaps"] = gaps
        entry.update(kind="sparse", key=f"l{i}", count=int(idx.size), first=first)
    if dense:
      if b is not None and b.shape == a.shape:
        changed_total += int(changed_indices(a, b).size)
      else:
        changed_total += a.size
      arrays[f"l{i}"] = a
      entry.update(kind="dense", key=f"l{i}")
    leaves[name] = entry

  missing = sorted(set(base) - set(new))
  index = {
      "format": FORMAT,
      "base": {"path": base_path, "sha256": content_hash(base),
               "num_params": int(sum(x.size for x in base.values()))},
      "order": list(new),
      "drop": missing,  # Base leaves the fine-tuned model does not have (e.g. an old head).
      "leaves": leaves,
      "meta": dict(meta or {}),
      "stats": {"num_params": int(sum(x.size for x in new.values())),
                "changed": int(changed_total),
                "sparse_leaves": sum(e["kind"] == "sparse" for e in leaves.values()),
                "dense_leaves": sum(e["kind"] == "dense" for e in leaves.values())},
  }
  with utils.atomic_path(path, directory=True) as tmp:
    with open(os.path.join(tmp, ARRAYS), "wb") as f:
      np.savez(f, **arrays)
    index["stats"]["bytes"] = _dir_bytes(tmp)
    with open(os.path.join(tmp, INDEX), "w") as f:
      json.dump(index, f, indent=1)
  stats = dict(index["stats"])
  stats["bytes"] = _dir_bytes(path)
  return stats


def load_delta_index(path: str) -> dict[str, Any]:
  """The delta's JSON index (base reference, leaves, meta, stats)."""
  f = os.path.join(path, INDEX)
  if not os.path.isfile(f) or not os.path.isfile(os.path.join(path, ARRAYS)):
    raise CheckpointError(f"{path} is not a delta checkpoint (needs {INDEX} and {ARRAYS}); write "
                          "one with shpeft_jax.delta_checkpoint.save_delta.")
  with open(f) as fh:
    index = json.load(fh)
  if index.get("format") != FORMAT:
    raise CheckpointError(f"{path} has format {index.get('format')!r}; this version reads {FORMAT}.")
  return index


def load_delta(path: str, *, base_path: str | None = None,
               base_params=None) -> tuple[dict, dict[str, Any]]:
  """Rebuilds the fine-tuned params (numpy tree) from a delta and its base.

  Args:
    path: the delta directory.
    base_path: where the base params checkpoint is now (default: the path recorded at save time).
    base_params: the base params if already in memory (checked against the recorded hash too).

  Returns:
    (params, meta) with the meta passed to save_delta.

  Raises:
    CheckpointError: the base is missing, or its content hash / shapes differ from the recorded base.
  """
  path = os.path.abspath(path)
  index = load_delta_index(path)
  ref = index["base"]
  if base_params is None:
    base_path = base_path or ref["path"]
    if not os.path.isdir(base_path):
      raise CheckpointError(f"The base checkpoint of delta {path} is not at {base_path}; pass "
                            "base_path= with the params checkpoint it was fine-tuned from.")
    base_params, _ = checkpoints.load_params(base_path)
  base = _host(base_params)
  leaves = index["leaves"]
  for name, e in leaves.items():
    b = base.get(name)
    if e["kind"] == "sparse" and (b is None or list(b.shape) != e["shape"]
                                  or b.dtype.str != e["dtype"]):
      got = "missing" if b is None else f"{b.dtype}{list(b.shape)}"
      raise CheckpointError(f"The base has {name!r} {got} but the delta was made against "
                            f"{np.dtype(e['dtype'])}{e['shape']}: wrong base model.")
  got_hash = content_hash(base)
  if got_hash != ref["sha256"]:
    raise CheckpointError(
        f"The base given for delta {path} has content hash {got_hash[:16]}..., but the delta was "
        f"made against {ref['path']} with hash {ref['sha256'][:16]}...; restore with the exact base "
        "checkpoint the model was fine-tuned from.")
  with np.load(os.path.join(path, ARRAYS)) as z:
    out = {}
    for name in index["order"]:
      e = leaves.get(name)
      if e is None:  # Unchanged: the base leaf itself.
        out[name] = base[name]
      elif e["kind"] == "dense":
        out[name] = z[e["key"]]
      else:
        idx = decode_indices(e["first"], z[e["key"] + "_gaps"], e["count"])
        values = z[e["key"] + "_values"]
        flat = base[name].reshape(-1).copy()
        flat[idx] = values
        out[name] = flat.reshape(e["shape"])
  return unflatten_names(out), index["meta"]
