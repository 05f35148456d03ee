"""Small tree helpers shared by every module."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import jax

SEP = "/"

# The process umask, read once at import (os.umask can only be read by setting it, which is not
# thread-safe later on).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_name(path) -> str:
  """'/'-joined name of a jax tree path."""
  return SEP.join(_key_str(k) for k in path)


def flatten_names(tree) -> dict[str, Any]:
  """{'a/b/kernel': leaf} for every leaf of a nested dict tree, in tree order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_name(p): v for p, v in leaves}


def unflatten_names(flat: Mapping[str, Any]) -> dict:
  """Inverse of flatten_names for nested dicts."""
  out: dict = {}
  for name, v in flat.items():
    node = out
    parts = name.split(SEP)
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def map_with_names(fn: Callable[[str, Any], Any], tree):
  """tree_map where fn also receives the leaf's '/'-joined name."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree)


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def hide_accelerators_from_tf():
  """TensorFlow only feeds data: keep it off the GPUs/TPUs that JAX uses."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (ImportError, RuntimeError, ValueError):
    pass


def current_umask() -> int:
  """The process umask, read without changing it (os.umask can only be read by setting it)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def follow_umask(path: str) -> None:
  """Gives `path` (a file, or a directory and everything below it) the modes that the process
  umask gives new files (0666 & ~umask) and directories (0777 & ~umask)."""
  mask = current_umask()
  if not os.path.isdir(path):
    os.chmod(path, 0o666 & ~mask)
    return
  os.chmod(path, 0o777 & ~mask)
  for root, dirs, files in os.walk(path):
    for d in dirs:
      os.chmod(os.path.join(root, d), 0o777 & ~mask)
    for f in files:
      os.chmod(os.path.join(root, f), 0o666 & ~mask)


def remove_stale_temporaries(folder: str) -> list[str]:
  """Removes what `atomic_path` leaves in `folder` when a process is killed (-9) mid-write: the
  `NAME.tmp-*` folders and `.tmp-NAME.*` files. Call it only where no other process writes (a
  trainer's workdir, under its lock). Returns the removed paths."""
  removed = []
  if not os.path.isdir(folder):
    return removed
  for entry in os.listdir(folder):
    path = os.path.join(folder, entry)
    if os.path.isdir(path) and (".tmp-" in entry or ".orbax-checkpoint-tmp" in entry) \
        and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.isfile(path) and entry.startswith(".tmp-"):
      os.remove(path)
    else:
      continue
    removed.append(path)
  return removed


@contextlib.contextmanager
def atomic_path(path: str, *, directory: bool = False):
  """Yields a temporary sibling of `path` (a file, or a directory) to write; on success it replaces
  `path` in one rename, on any error it is removed. A crash never leaves half a file under `path`.

  The temporary name keeps the file extension (matplotlib and np.savez choose formats by it).
  """
  path = os.path.abspath(path)
  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  # mkstemp / mkdtemp create owner-only entries (0600 / 0700); results must follow the user's
  # umask like any file they write, or a colleague on a shared cluster cannot read them.
  if directory:
    tmp = tempfile.mkdtemp(prefix=base + ".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())
  else:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + base + ".", suffix=os.path.splitext(base)[1],
                               dir=parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    # mkstemp makes the file private (0600); the result should have an ordinary file's mode.
    os.chmod(tmp, 0o666 & ~_UMASK)
  try:
    yield tmp
    # Some writers (safetensors) create owner-only (0600) files: every file follows the umask.
    follow_umask(tmp)
    if directory and os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
      os.remove(tmp)
    raise


def enable_compilation_cache(cache_dir: str, workdir: str):
  """XLA's persistent cache: runs of one process (pre-training, several methods) share compiled
  programs (same model => same init / eval / update HLO), which dominate a CPU demo's time.
  `cache_dir` relative to `workdir`; empty: off."""
  if not cache_dir:
    return
  cache = os.path.join(workdir, cache_dir) if not os.path.isabs(cache_dir) else cache_dir
  os.makedirs(cache, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
