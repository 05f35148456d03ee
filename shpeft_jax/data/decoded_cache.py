"""The decoded evaluation cache: a split's eval batches, decoded and resized once, replayed after.

Every evaluation of a split (validation during training, the test evaluation, report's
re-evaluation) feeds the model the same uint8 batches: the eval transform is deterministic. The
first pass decodes them as usual and records this process's batches; every later pass with the
same key replays them from the record and decodes nothing (`data.eval_cache`, on by default).

Where: a folder per key under the prepared source's directory
(`<data_dir>/<dataset>/src_<source id>/<version>/decoded/<key>/` with `image.npy` (memory-mapped
when read), `label.npy`, `valid.npy`), written to a temporary sibling and renamed into place
when the pass is complete, so a killed or abandoned pass leaves no record under a key. Sources
without a data_dir (the in-memory digits) keep it in memory. A read-only data_dir is not an error:
the pass is then not recorded.

The key is everything the batches depend on: the source's content id, the split (and a training
subset's facts when the split is the subset's), the image size, the global batch size, this
process's index and the process count, the label dtype and `TRANSFORM_VERSION` (bumped when the
eval transform changes). Delete `decoded/` to reclaim the space (about 150 KB per image at
224 px).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator

from absl import logging
import numpy as np

# Bump when the eval transform's output changes (resampling, rounding, channels).
TRANSFORM_VERSION = 1
_MEMORY: dict[str, dict[str, np.ndarray]] = {}


def key(**facts: Any) -> str:
  """A short digest of what the batches depend on (JSON of the facts, sorted)."""
  blob = json.dumps([TRANSFORM_VERSION, facts], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _paths(folder: str) -> dict[str, str]:
  return {k: os.path.join(folder, f"{k}.npy") for k in ("image", "label", "valid")}


def load(cache_dir: str | None, k: str) -> dict[str, np.ndarray] | None:
  """The recorded batches' arrays of key `k` (images memory-mapped), None if not recorded."""
  if cache_dir is None:
    return _MEMORY.get(k)
  paths = _paths(os.path.join(cache_dir, k))
  if not all(os.path.isfile(p) for p in paths.values()):
    return None
  try:
    return {name: np.load(p, mmap_mode="r" if name == "image" else None)
            for name, p in paths.items()}
  except (OSError, ValueError) as e:  # A damaged record: decode again (and re-record).
    logging.warning("decoded eval cache %s is unreadable (%s); decoding the split again.",
                    os.path.join(cache_dir, k), e)
    return None


def replay(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """The recorded batches, in order (copies: the caller may keep or donate them)."""
  for start in range(0, len(arrays["valid"]), batch_size):
    yield {name: np.array(a[start:start + batch_size]) for name, a in arrays.items()}


def record(batches: Iterator[dict[str, np.ndarray]], cache_dir: str | None, k: str,
           num_batches: int) -> Iterator[dict[str, np.ndarray]]:
  """Yields `batches` unchanged and records them under key `k` once all `num_batches` came."""
  if cache_dir is None:
    got = list(batches)
    if len(got) == num_batches:
      _MEMORY[k] = {name: np.concatenate([b[name] for b in got]) for name in got[0]}
    yield from got
    return
  from shpeft_jax.utils import atomic_path  # pylint: disable=g-import-not-at-top
  try:
    os.makedirs(cache_dir, exist_ok=True)
    writer = atomic_path(os.path.join(cache_dir, k), directory=True)
    tmp = writer.__enter__()
  except OSError as e:
    logging.warning("decoded eval cache: cannot write in %s (%s); evaluations decode every time.",
                    cache_dir, e)
    yield from batches
    return
  sink = _Sink(tmp, num_batches)
  try:
    for b in batches:
      sink.add(b)  # A failed write (disk full) stops the recording, never the evaluation.
      yield b
    sink.close()
  except BaseException as e:  # Abandoned (GeneratorExit) or failed: the temporary is removed.
    writer.__exit__(type(e), e, e.__traceback__)
    if isinstance(e, _NotRecorded):
      logging.warning("decoded eval cache: %s not recorded (%s).", k, e)
      return
    raise
  try:
    writer.__exit__(None, None, None)
  except OSError as e:  # e.g. another process renamed the same record into place meanwhile
    logging.info("decoded eval cache: %s not recorded (%s).", k, e)


class _NotRecorded(Exception):
  pass


class _Sink:
  """Writes a pass's batches into `folder` (images straight into a memory-mapped .npy)."""

  def __init__(self, folder: str, num_batches: int):
    self.folder, self.num_batches = folder, num_batches
    self.image, self.labels, self.valid, self.error = None, [], [], None

  def add(self, b: dict[str, np.ndarray]) -> None:
    if self.error is not None:
      return
    n, done = len(b["image"]), len(self.labels)
    try:
      if self.image is None:
        self.image = np.lib.format.open_memmap(
            os.path.join(self.folder, "image.npy"), mode="w+", dtype=b["image"].dtype,
            shape=(self.num_batches * n,) + b["image"].shape[1:])
      self.image[done * n:(done + 1) * n] = b["image"]
    except (OSError, ValueError, IndexError) as e:
      self.error = e
      return
    self.labels.append(b["label"])
    self.valid.append(b["valid"])

  def close(self) -> None:
    if self.error is not None:
      raise _NotRecorded(f"writing failed: {self.error}")
    if len(self.labels) != self.num_batches:
      raise _NotRecorded(f"the pass gave {len(self.labels)} of {self.num_batches} batches")
    try:
      self.image.flush()
      self.image = None
      np.save(os.path.join(self.folder, "label.npy"), np.concatenate(self.labels))
      np.save(os.path.join(self.folder, "valid.npy"), np.concatenate(self.valid))
    except OSError as e:
      raise _NotRecorded(f"writing failed: {e}") from e
