"""Shared fixtures of the trainer / entry-point tests: a tiny but complete config.

`configs/` is importable from the repository root (as `python -m shpeft_jax.main` sees it).
"""

import os
import sys
import tempfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

# Runs of the tiny model share compiled programs (init / update / eval) through XLA's persistent
# cache; compiling, not computing, dominates these tests on a small CPU.
XLA_CACHE = os.path.join(tempfile.gettempdir(), "shpeft_jax_test_xla_cache")


def make_tiny_config(method: str = "shpeft", num_steps: int = 6, batch_size: int = 16):
  """The paper's recipe on the digits demo data with the `test_tiny` ViT: seconds on a CPU."""
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_config()
  config.model.name = "test_tiny"
  config.model.image_size = 16
  config.data.name = "digits"
  config.data.task = "target"
  config.data.augment = False
  config.data.shuffle_buffer = 0
  config.peft.method = method
  config.peft.k_percent = 5.0
  config.peft.score_batches = 4
  config.peft.score_chunk = 2
  config.optim.lr = 0.05
  config.train.batch_size = batch_size
  config.train.num_steps = num_steps
  config.train.eval_every = 0
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  config.train.async_checkpoints = False
  config.train.progress_bar = False
  config.compilation_cache_dir = XLA_CACHE
  return config


@pytest.fixture
def tiny_config():
  return make_tiny_config()
