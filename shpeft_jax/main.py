"""Entry point: `python -m shpeft_jax.main --config configs/busi.py --workdir /tmp/busi`.

Thin, like the flax examples: parse the flags, bring up JAX (multi-host when the environment says
so: `shpeft_jax.distributed`), hide accelerators from TensorFlow (it only feeds data), then
`runs.run`: the config it is given (one run of `peft.method`, or `config.methods`, with the
`pretrain` stage when enabled; the demo, configs/demo.py, is such a preset).
Config fields are overridden with `--config.train.num_steps=100`; a field the config does not have
is an error (lock_config=True), reported with the list of fields that do exist.

Start-up is light: JAX, TensorFlow and the trainer are imported only after the flags and the config
file are read, so `--help` and a config error answer at once, each error in one line.
At the default verbosity the console says what each stage does (shpeft_jax.console);
`--verbosity=1` brings back every detail line.
"""

from __future__ import annotations

import contextlib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from shpeft_jax import stages

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py), optionally `file.py:arg`.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_RESTART_FROM = flags.DEFINE_enum(
    "restart_from", None, list(stages.STAGES),
    "Redo this stage and every later one (their results in --workdir are deleted first).")
flags.mark_flags_as_required(["config", "workdir"])


def _config_or_exit():
  """The --config file's config, or a one-line error (before anything heavy is imported)."""
  try:
    config = _CONFIG.value
    config.get("seed")  # A file that failed to load raises here (ml_collections' _ErrorConfig).
    return config
  except (IOError, OSError, AttributeError) as e:
    path = flags.FLAGS["config"].config_filename
    cause = e.__cause__ or e
    lines = [l.strip() for l in str(cause).splitlines() if l.strip()]
    why = "no such file" if not os.path.isfile(path.split(":")[0]) else (
        lines[-1] if lines else type(cause).__name__)
    print(f"error: --config {path}: {why} (configs/*.py lists the shipped configs).",
          file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _config_or_exit()
  from shpeft_jax import console  # pylint: disable=g-import-not-at-top
  console.setup_logging()
  console.import_tensorflow()  # Its banners dropped; accelerators hidden from it.
  import jax  # pylint: disable=g-import-not-at-top
  from shpeft_jax import distributed  # pylint: disable=g-import-not-at-top
  from shpeft_jax import errors  # pylint: disable=g-import-not-at-top
  from shpeft_jax.errors import ShpeftError  # pylint: disable=g-import-not-at-top
  # Multi-host (TPU pods, SLURM, several GPU hosts): join the world before any JAX computation.
  try:
    distributed.maybe_initialize(config)
  except ShpeftError as e:  # A wrong coordinator / process count: say so, exit, never hang.
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info("JAX %s on %s: process %d of %d, %d local / %d global devices.", jax.__version__,
               jax.default_backend(), jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  from shpeft_jax import runs  # pylint: disable=g-import-not-at-top
  from shpeft_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value

  def run_locked():
    # One run per workdir: a second one would interleave metrics and overwrite results.
    lock = (workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
      runs.run(config, workdir, restart_from=_RESTART_FROM.value)
  # Bad input and storage faults: one line (the traceback goes to workdir/log.txt).
  code = errors.cli_main(run_locked, verbosity=flags.FLAGS.verbosity, hint_path=workdir,
                         log_file=os.path.join(workdir, "log.txt"))
  if code:
    errors.exit_process(code)
  if jax.process_index() == 0:
    from shpeft_jax import report  # pylint: disable=g-import-not-at-top
    for line in report.after_run(workdir):
      print(line, flush=True)


def _config_arg(argv) -> str | None:
  """The --config value in argv (`--config FILE` or `--config=FILE`), if any."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(spec: str | None):
  """The config of a `FILE[:arg]` spec (the package defaults when none or unreadable)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if spec:
    path, _, arg = spec.partition(":")
    try:
      module_spec = importlib.util.spec_from_file_location("_shpeft_help_config", path)
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
      return module.get_config(arg) if arg else module.get_config(), spec
    except Exception:  # pylint: disable=broad-except  (help must answer whatever the file is)
      pass
  from shpeft_jax import base_config  # pylint: disable=g-import-not-at-top
  return base_config.get_config(), "the package defaults (shpeft_jax/base_config.py)"


def _config_fields(config, prefix: str = "") -> list[tuple[str, object]]:
  out = []
  for key in sorted(config.keys()):
    value = config[key]
    if hasattr(value, "keys") and hasattr(value, "items"):
      out += _config_fields(value, f"{prefix}{key}.")
    else:
      out.append((f"{prefix}{key}", value))
  return out


def _print_help(argv) -> None:
  """`--help`: the usage, the flags and every config field with its value; exit status 0."""
  print(__doc__.strip())
  print("\nFlags:\n  --config FILE[:arg]  config file (configs/*.py)\n  --workdir DIR        "
        "checkpoints, metrics, results\n  --restart_from STAGE redo a stage and every later one "
        f"({', '.join(stages.STAGES)})\n  --verbosity N        1: every detail line and full "
        "tracebacks\n  --config.FIELD=VALUE override a config field (below)")
  config, where = _load_config(_config_arg(argv))
  fields = _config_fields(config)
  print(f"\nConfig fields of {where} ({len(fields)}; docs/CONFIG.md explains each):")
  for name, value in fields:
    print(f"  --config.{name}={value!r}")


def _unknown_field_sentence(text: str, overrides: list[str]) -> str:
  """`unknown config field 'train.num_step'; did you mean 'train.num_steps'?` from
  ml_collections' `num_step Did you mean "num_steps" instead of "num_step"?`."""
  import re  # pylint: disable=g-import-not-at-top
  name = text.split()[0] if text.split() else "?"
  full = next((o[len("--config."):] for o in overrides
               if o == f"--config.{name}" or o.endswith(f".{name}") or f".{name}." in o + "."),
              name)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  if hint:
    parent = full[:full.rindex(".") + 1] if "." in full else ""
    suggestion = f"; did you mean '{parent}{hint.group(1)}'?"
  else:
    suggestion = "."
  return (f"unknown config field '{full}'{suggestion} `python -m shpeft_jax.main --config FILE "
          "--help` lists every field (new fields cannot be added from the command line).")


def _parse_flags(argv) -> list[str]:
  """absl's flag parsing, with an unknown config field reported as a one-line error."""
  if any(a in ("--help", "-h", "-?", "--helpfull", "--helpshort") for a in argv[1:]):
    _print_help(argv)
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    text = str(e.args[0] if e.args else e)
    while text[:1] in "\"'" and text[-1:] == text[:1]:
      text = text[1:-1]
    text = text.replace("\\n", " ").replace("\n", " ").replace("\\'", "").replace("'", "")
    print(f"error: {_unknown_field_sentence(text, overrides)}", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    print(f"error: {e}\nPass --help to see the flags and config fields.", file=sys.stderr)
    sys.exit(2)
  except (SyntaxError, OSError, ImportError, NameError, TypeError) as e:  # The --config file.
    from shpeft_jax import errors  # pylint: disable=g-import-not-at-top
    print(f"error: {errors.config_file_error(e, argv)}", file=sys.stderr)
    sys.exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
