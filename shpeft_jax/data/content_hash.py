"""Content hashes of a source's files, reused while a file's stat signature is unchanged.

Prepared records are keyed by what the files hold, not by their names or sizes: a re-encoded
image of the same byte size (every BMP / TIFF / DICOM of one shape) must give new records. Hashing
every byte on every run start costs a full read of the dataset, so each file's digest is cached
with its stat signature (device, inode, size, mtime, ctime), as git's index does: a file is read
again only when one of them changed. ctime cannot be set from user space (`touch -d`, `cp -p`,
`rsync -t` and tar restore mtime, never ctime), so a same-size, same-mtime replacement still
changes the signature. Measured in BENCHMARKS.md ("Content-keyed prepared data").

The cache is one JSON file per dataset name in the tfds data_dir; deleting it forces a full re-hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Sequence

from absl import logging

CACHE_FILE = "shpeft_content_hashes.json"
# Bump when the digest changes (algorithm, size): old caches are then ignored, never misread.
_CACHE_FORMAT = "blake2b-128/1"
# Above this many files to hash, a progress bar (or log lines without a terminal) shows the pass.
_PROGRESS_MIN_FILES = 2000


def file_digest(path: str) -> str:
  """blake2b-128 of the file's bytes, hex."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _signature(st: os.stat_result) -> str:
  return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _load(cache_path: str) -> dict[str, list[str]]:
  try:
    with open(cache_path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return {}  # Absent, or torn by a crash: everything is hashed again.
  if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
    return {}
  files = data.get("files")
  return files if isinstance(files, dict) else {}


def _save(cache_path: str, files: dict[str, list[str]]) -> None:
  from shpeft_jax.utils import atomic_path  # pylint: disable=g-import-not-at-top
  try:
    with atomic_path(cache_path) as tmp, open(tmp, "w") as f:
      json.dump({"format": _CACHE_FORMAT, "files": files}, f, separators=(",", ":"))
  except OSError as e:  # A read-only data_dir: the hashes are simply computed again next time.
    logging.warning("Could not save the content-hash cache %s (%s); the next run hashes the "
                    "files again.", cache_path, e)


def _bar(total: int, desc: str):
  if total < _PROGRESS_MIN_FILES or not sys.stderr.isatty():
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit="file", dynamic_ncols=True, leave=False)


def digests(paths: Sequence[str], cache_path: str | None, desc: str = "hashing") -> list[str]:
  """The content digest of every path (absolute), reusing cached digests of unchanged files.

  cache_path: the JSON cache to read and update (None: hash everything, cache nothing).
  """
  cached = _load(cache_path) if cache_path else {}
  # Signatures are taken before reading: a file rewritten while it is read no longer matches its
  # stored signature and is hashed again next time.
  stats = [os.stat(p) for p in paths]
  todo = [i for i, (p, st) in enumerate(zip(paths, stats))
          if cached.get(p, ("", ""))[0] != _signature(st)]
  out = [cached[p][1] if p in cached else "" for p in paths]
  if todo:
    t0, bar = time.perf_counter(), _bar(len(todo), desc)
    for n, i in enumerate(todo):
      out[i] = file_digest(paths[i])
      if bar is not None:
        bar.update(1)
      elif len(todo) >= _PROGRESS_MIN_FILES and n % 20000 == 19999:
        logging.info("%s: %d of %d files", desc, n + 1, len(todo))
    if bar is not None:
      bar.close()
    logging.info("%s: read %d file(s) (%d unchanged since the last run) in %.1f s", desc,
                 len(todo), len(paths) - len(todo), time.perf_counter() - t0)
  if cache_path and todo:
    fresh = {p: [_signature(st), d] for p, st, d in zip(paths, stats, out)}
    # Files of other sources of the same dataset (another manual_dir) stay in the cache.
    _save(cache_path, {**cached, **fresh})
  return out
