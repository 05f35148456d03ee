"""Helpers of the trainer / entry-point tests: a tiny but complete config.

A plain module, not conftest.py: several test folders have a conftest, and `from conftest import`
would get whichever was imported first.

`configs/` is importable from the repository root (as `python -m shpeft_jax.main` sees it).
"""

import os
import sys
import tempfile


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

# Runs of the tiny model share compiled programs (init / update / eval) through XLA's persistent
# cache; compiling, not computing, dominates these tests on a small CPU.
XLA_CACHE = os.path.join(tempfile.gettempdir(), "shpeft_jax_test_xla_cache")

# The paper's recipe (configs/common.py) on the digits demo data with the `test_tiny` ViT.
TINY_OVERRIDES = {
    "model.name": "test_tiny", "model.image_size": 16,
    "data.name": "digits", "data.task": "target", "data.augment": False,
    "data.shuffle_buffer": 0,
    "peft.k_percent": 5.0, "peft.score_batches": 4, "peft.score_chunk": 2,
    "optim.lr": 0.05,
    "train.batch_size": 16, "train.eval_every": 0, "train.log_every": 2,
    "train.checkpoint_every": 2, "train.async_checkpoints": False, "train.progress_bar": False,
    "compilation_cache_dir": XLA_CACHE,
}


def cli_overrides(overrides: dict) -> list[str]:
  """The same overrides as `--config.a.b=value` flags of `python -m shpeft_jax.main`."""
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def make_tiny_config(method: str = "shpeft", num_steps: int = 6, batch_size: int = 16):
  """configs/common.py with TINY_OVERRIDES: a whole run takes seconds on a CPU."""
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_config()
  for key, value in TINY_OVERRIDES.items():
    *path, leaf = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  config.peft.method = method
  config.train.num_steps = num_steps
  config.train.batch_size = batch_size
  return config
