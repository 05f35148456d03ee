"""Helpers of the fault-injection tests: a tiny classifier checkpoint, corruptions, a small tmpfs."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import subprocess
import sys

import jax
import numpy as np

from shpeft_jax import checkpoints
from shpeft_jax.models import clip_vit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_classifier(path: str, *, nan: bool = False, num_classes: int = 3) -> dict:
  model = clip_vit.build_model("test_tiny", num_classes)
  params = jax.tree.map(np.asarray, clip_vit.init_params(model, jax.random.PRNGKey(0)))
  if nan:
    params["encoder"]["ln_post"]["scale"] = params["encoder"]["ln_post"]["scale"].copy()
    params["encoder"]["ln_post"]["scale"][3] = np.nan
  checkpoints.save_params(path, params, {"model": "test_tiny", "image_size": 16,
                                         "num_classes": num_classes, "step": 1})
  return params


def truncate_data_files(ckpt_dir: str) -> int:
  """A partial copy / torn write: every TensorStore data file cut to 10 bytes."""
  files = [p for p in glob.glob(os.path.join(ckpt_dir, "**", "d", "*"), recursive=True)
           if os.path.isfile(p)]
  for p in files:
    with open(p, "r+b") as f:
      f.truncate(10)
  return len(files)


def run_module(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
  """The non-empty stderr lines, without library start-up noise that precedes our output."""
  noise = ("WARNING: All log messages before absl::InitializeLog()", "E0000 ", "W0000 ", "I0000 ")
  info = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d")  # absl INFO / WARNING log lines
  lines = [l for l in stderr.splitlines()
           if l.strip() and not l.startswith(noise) and not info.match(l)]
  # At the default verbosity the console prints plain stage lines (shpeft_jax.console) before any
  # error: the error is what follows the first `error:` line, and no traceback may precede it.
  first = next((i for i, l in enumerate(lines) if l.startswith("error:")), None)
  if first is None:
    return lines
  assert not any(l.startswith("Traceback") for l in lines[:first]), stderr[-3000:]
  return lines[first:]


@contextlib.contextmanager
def small_tmpfs(path: str, size: str = "256k", read_only: bool = False):
  """A tmpfs of `size` at `path` (needs root / CAP_SYS_ADMIN); yields False when it cannot mount."""
  os.makedirs(path, exist_ok=True)
  opts = f"size={size}" + (",ro" if read_only else "")
  ok = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path],
                      capture_output=True).returncode == 0
  try:
    yield ok
  finally:
    if ok:
      subprocess.run(["umount", "-l", path], capture_output=True)
