"""The sparse encoding of a fine-tuned model against its base: which elements changed, their flat
indices gap-encoded in the smallest unsigned dtype, and the content hash that names a base.

One format holds a sparse delta: the task adapter (`shpeft_jax.adapter`, WORKDIR/export/adapter),
which predict, export, peft export and the analysis read. These are its primitives. ("Changed"
compares bit patterns, so -0.0 vs 0.0 and NaN payloads survive: an adapter applied to its base
rebuilds the fine-tuned params bit for bit.) The earlier second format, `delta_checkpoint`
(delta.json + delta.npz, with its own base check), was removed: it had no reader in the product.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np

from shpeft_jax.utils import flatten_names

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
