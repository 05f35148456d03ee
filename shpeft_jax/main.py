"""Entry point: `python -m shpeft_jax.main --config configs/busi.py --workdir /tmp/busi`.

Thin, like the flax examples: parse the flags, bring up JAX (multi-host when the environment says
so: `shpeft_jax.distributed`), hide accelerators from TensorFlow (it only feeds data), then
`runs.run`: the config it is given (one run of `peft.method`, or `config.methods`, with the
`pretrain` stage when enabled; the demo, configs/demo.py, is such a preset).
Config fields are overridden with `--config.train.num_steps=100`; a field the config does not have
is an error (lock_config=True), reported with the list of fields that do exist.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from shpeft_jax import utils

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py), optionally `file.py:arg`.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drops INFO lines of orbax (dozens per checkpoint), keeps its warnings and errors."""

  def filter(self, record) -> bool:
    import logging as std_logging  # pylint: disable=g-import-not-at-top
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  utils.hide_accelerators_from_tf()
  import jax  # pylint: disable=g-import-not-at-top
  from shpeft_jax import distributed  # pylint: disable=g-import-not-at-top
  from shpeft_jax.errors import ShpeftError  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  # Multi-host (TPU pods, SLURM, several GPU hosts): join the world before any JAX computation.
  try:
    distributed.maybe_initialize(config)
  except ShpeftError as e:  # A wrong coordinator / process count: say so, exit, never hang.
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s).", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  from shpeft_jax import runs  # pylint: disable=g-import-not-at-top
  try:
    runs.run(config, _WORKDIR.value)
  except ShpeftError as e:
    # Bad input: a one-paragraph message is more useful than a traceback.
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv) -> list[str]:
  """absl's flag parsing, with an unknown config field reported as a one-line error."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    text = str(e.args[0] if e.args else e)
    while text[:1] in "\"'" and text[-1:] == text[:1]:
      text = text[1:-1]
    text = text.replace("\\n", " ").replace("\n", " ").replace("\\'", "").replace("'", "")
    print(f"error: unknown config field ({text}) among {overrides}. Every field is listed in "
          "docs/CONFIG.md; new fields cannot be added from the command line.", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    print(f"error: {e}\nPass --helpshort to see the flags.", file=sys.stderr)
    sys.exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
