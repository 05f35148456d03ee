"""What a run prints: one line per stage, progress bars with an honest ETA, quiet libraries.

At the default verbosity the console shows what the run is doing and where its results are, and
nothing else: per-parameter detail goes to files in the workdir (`trainable_params.tsv`) and to
the log at `--verbosity=1`; library banners that say nothing to the user are dropped (TensorFlow's
oneDNN / CPU-feature lines and absl's pre-init notice, which its C++ side writes straight to file
descriptor 2 while TensorFlow is imported); warnings and errors still come through.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import re
import sys
import tempfile
import time
from typing import Any, Iterable, Mapping, Sequence

# Lines of the C++ side of TensorFlow / XLA that carry no information for the user.
_BANNERS = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|.*port\.cc:\d+\] oneDNN custom operations are on"
    r"|.*cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow"
    r"|.*Unable to register cu(DNN|FFT|BLAS) factory"
    r"|.*computation placer already registered"
    r"|.*TF-TRT Warning: Could not find TensorRT")

# Python log records that repeat what the run already says, or say nothing (matched on the message).
_NOISE = (
    re.compile(r"A polynomial schedule was set with a non-positive `transition_steps`"),
    re.compile(r"Unable to initialize backend '(tpu|cuda|rocm|METAL)'"),
)


# A storage fault as TensorStore / the OS words it.
_STORAGE_FAULT = re.compile(r"No space left on device|Disk quota exceeded|Read-only file system|"
                            r"Permission denied|os_error_code='?(28|30|13|122)")
# tfds warnings that every prepared source (a custom BuilderConfig, `src_<id>`) triggers by design.
_TFDS_NOTES = re.compile(r"Using custom data configuration|has no dataset_info\.json")


def verbosity() -> int:
  """absl's --verbosity (0 by default; 1 brings the detail back)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return int(flags.FLAGS["verbosity"].value)
  except (KeyError, flags.Error, TypeError):  # flags not parsed (library use): be detailed
    return 1


@contextlib.contextmanager
def _filtered_fd2(keep_all: bool):
  """Runs the body with file descriptor 2 captured; writes back every line but the banners."""
  if keep_all:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      text = capture.read().decode("utf-8", "replace")
      kept = [l for l in text.splitlines() if l.strip() and not _BANNERS.match(l)]
      if kept:
        sys.stderr.write("\n".join(kept) + "\n")
        sys.stderr.flush()


def import_tensorflow(detail: bool | None = None):
  """`import tensorflow` without its banners (kept at --verbosity=1); accelerators hidden from it.

  TensorFlow only feeds data: it must not grab the GPU / TPU memory that JAX needs.
  """
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  detail = verbosity() >= 1 if detail is None else detail
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if detail else "1")
  with _filtered_fd2(keep_all=detail):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass
  return tf


def _formatted(record: std_logging.LogRecord) -> str:
  try:
    return record.getMessage()
  except (TypeError, ValueError):
    return str(record.msg)


class _DropNoise(std_logging.Filter):
  """Drops library INFO chatter (orbax: dozens of lines per checkpoint) and known empty warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.WARNING and "/orbax/" in record.pathname:
      return False
    if "/tensorflow_datasets/" in record.pathname and (
        record.levelno < std_logging.WARNING or _TFDS_NOTES.search(_formatted(record))):
      # tfds' INFO lines per read (`Load dataset info from ...`, `Constructing tf.data.Dataset`)
      # and its notes on our own prepared-source configs: not news to the user.
      return False
    if record.exc_info and record.exc_info[0] and issubclass(record.exc_info[0],
                                                             KeyboardInterrupt):
      return False  # A library's traceback of the Ctrl-C: the command says it in one line.
    try:
      message = record.getMessage()
    except (TypeError, ValueError):
      return True
    if "/orbax/" in record.pathname and record.levelno >= std_logging.ERROR:
      # orbax's background threads log a storage fault (disk full, read-only) with its traceback,
      # once per thread, before the save raises it to us: the command reports it in one line.
      exc = record.exc_info[1] if record.exc_info else None
      if _STORAGE_FAULT.search(f"{message} {exc or ''}"):
        return False
    return not any(p.search(message) for p in _NOISE)


# Set while one run of a group (seeds, methods, a sweep) runs: its INFO lines go to its own
# run_dir/console.txt, not to the console (RunsProgress).
_QUIET: list[str] = []


class _QuietRuns(std_logging.Filter):
  """Drops INFO records from the console while a run of a group runs (warnings pass)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (_QUIET and record.levelno < std_logging.WARNING)


class _ConsoleFormatter(std_logging.Formatter):
  """The message alone for INFO; `warning:` / `error:` in front of the others."""

  def format(self, record: std_logging.LogRecord) -> str:
    message = record.getMessage()
    if record.exc_info:
      message += "\n" + self.formatException(record.exc_info)
    if record.levelno >= std_logging.ERROR:
      return f"error: {message}"
    if record.levelno >= std_logging.WARNING:
      return f"warning: {message}"
    return message


def setup_logging(detail: bool | None = None):
  """absl's handler without noise; at the default verbosity, plain readable lines."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  detail = verbosity() >= 1 if detail is None else detail
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropNoise) for f in handler.filters):
    handler.addFilter(_DropNoise())
  if not detail:
    handler.setFormatter(_ConsoleFormatter())
    if not any(isinstance(f, _QuietRuns) for f in handler.filters):
      handler.addFilter(_QuietRuns())
  # Libraries that log through the standard logging tree (optax's schedule warning) as well.
  root = std_logging.getLogger()
  if not any(isinstance(f, _DropNoise) for f in root.filters):
    root.addFilter(_DropNoise())


def is_main_process() -> bool:
  try:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index() == 0
  except Exception:  # pylint: disable=broad-except
    return True


def stage(message: str, *args):
  """One line saying what the run does now (INFO: shown at the default verbosity)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.info(message, *args)


class StepProgress:
  """A tqdm bar over steps that starts after the first (compiling) step.

  The first step of a run compiles the update; a bar started before it reports a rate (and an ETA)
  that includes compilation (minutes on a CPU for a step of milliseconds). Started after it, the
  rate and the ETA are the steady state's. Without a bar (not process 0, or disabled) the caller
  logs its own lines.
  """

  def __init__(self, total: int, start: int, *, desc: str, batch_size: int = 0,
               enabled: bool = True, unit: str = "step"):
    self.total, self.start, self.desc = int(total), int(start), desc
    self.batch_size, self.unit = int(batch_size), unit
    self.enabled = enabled and is_main_process() and not _QUIET
    self.bar = None
    self._t0: float | None = None
    self._n0 = self.start

  def update(self, n: int, **postfix):
    """Step `n` is done (postfix values are shown next to the bar, e.g. loss=...)."""
    if self._t0 is None:  # The first (compiled) step: the clock starts now.
      self._t0, self._n0 = time.perf_counter(), n
      if self.enabled:
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
        self.bar = tqdm(total=self.total, initial=n, desc=self.desc, unit=self.unit,
                        dynamic_ncols=True, file=sys.stderr, smoothing=0.1,
                        # A log file gets a refresh (a carriage return) every 30 s, not 2 a second.
                        mininterval=0.5 if sys.stderr.isatty() else 30.0,
                        leave=True, bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/"
                        "{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
      return
    if self.bar is not None:
      self.bar.update(n - self.bar.n)
      post = {}
      if self.batch_size:
        post["img/s"] = f"{self.images_per_s(n):.0f}"
      post.update({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in postfix.items()
                   if v is not None})
      if post:
        self.bar.set_postfix(post, refresh=False)

  def steps_per_s(self, n: int) -> float:
    if self._t0 is None or n <= self._n0:
      return float("nan")
    return (n - self._n0) / max(time.perf_counter() - self._t0, 1e-9)

  def images_per_s(self, n: int) -> float:
    return self.steps_per_s(n) * self.batch_size

  def eta_s(self, n: int) -> float:
    rate = self.steps_per_s(n)
    return (self.total - n) / rate if rate > 0 else float("nan")

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None


class RunsProgress:
  """A group of runs (seeds x learning rates x methods, a sweep) on a short console.

  At the default verbosity each run's own stage lines and step bar are left out of the console
  (they go to RUN_DIR/console.txt). Each finished run gets one line, `[i/n] label: test F1 ..,
  val F1 .. (seconds; ETA of the group)`. On a terminal one bar over the runs shows the rate and
  the ETA, and the per-run lines are left out when the group has more than `max_lines` runs (its
  runs.csv has them); in a log file (stderr not a terminal) every run's line is written. At
  --verbosity=1 every run prints everything, as a single run does.
  """

  def __init__(self, total: int, *, desc: str = "runs", max_lines: int = 30):
    self.total, self.desc = int(total), desc
    self.detail = verbosity() >= 1
    self.tty = sys.stderr.isatty()
    self.lines = self.total <= max_lines or not self.tty
    self.bar = None
    self.done = 0
    self._t0 = None

  def _write(self, line: str):
    if not is_main_process():
      return
    if self.bar is not None:
      self.bar.write(line, file=sys.stderr)
    else:
      print(line, file=sys.stderr, flush=True)

  def __call__(self, label: str, run_dir: str, fn):
    """fn() (one run writing into run_dir); returns its results."""
    if self.detail:
      return fn()
    if self._t0 is None:
      self._t0 = time.perf_counter()
    if self.bar is None and self.tty and is_main_process() and self.total > 1:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=self.total, initial=self.done, desc=self.desc, unit="run",
                      dynamic_ncols=True, file=sys.stderr, leave=False,
                      bar_format="{desc}: {n_fmt}/{total_fmt} |{bar:20}| [{elapsed}<{remaining},"
                      " {rate_fmt}{postfix}]")
    os.makedirs(run_dir, exist_ok=True)
    handler = std_logging.FileHandler(os.path.join(run_dir, "console.txt"))
    handler.setFormatter(_ConsoleFormatter())
    handler.addFilter(_DropNoise())
    root = std_logging.getLogger()
    root.addHandler(handler)
    _QUIET.append(run_dir)
    t0 = time.perf_counter()
    try:
      results = fn()
    except BaseException:
      self.close()  # The error line must not land inside the bar.
      raise
    finally:
      _QUIET.pop()
      root.removeHandler(handler)
      handler.close()
    self.done += 1
    now = time.perf_counter()
    eta = (now - self._t0) / self.done * (self.total - self.done)
    line = (f"[{self.done}/{self.total}] {label}: {_result_text(results)} "
            f"({now - t0:.0f} s" + (f"; ETA {_clock(eta)})" if self.done < self.total else ")"))
    if self.lines:
      self._write(line)
    if self.bar is not None:
      self.bar.set_postfix_str(f"{label}: {_result_text(results)}", refresh=False)
      self.bar.update(1)
    return results

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  return (f"{h}:" if h else "") + f"{rest // 60:02d}:{rest % 60:02d}"


def _result_text(results: Mapping[str, Any] | None) -> str:
  """'test F1 80.23, val F1 81.10' (the task's headline: mean AUROC 'AUROC' for multi-label)
  from a results.json (or why there is none)."""
  from shpeft_jax import tasks  # pylint: disable=g-import-not-at-top
  results = results or {}
  if "stopped_at" in results:
    return f"stopped at step {results['stopped_at']}"
  task = tasks.of(results.get("task"))
  parts = []
  for key, name in (("test", "test"), ("validation", "val")):
    m = results.get(key) or {}
    if task.headline in m:
      parts.append(f"{name} {task.headline_short} {100 * m[task.headline]:.2f}")
  return ", ".join(parts) or "no test result"


# ---------------------------------------------------------------------------------------------
# Which parameters train: a file with one line per tensor, a few lines on the console.


def trainable_rows(mask_tree, rules: Mapping[str, tuple[str, bool]] | None = None) -> list[dict]:
  """One dict per parameter: name, type, layer, shape, rule, trainable elements, size."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import selection  # pylint: disable=g-import-not-at-top
  rows = []
  flat, _ = jax.tree_util.tree_flatten_with_path(mask_tree)
  for path, m in flat:
    name = utils.path_name(path)
    a = np.asarray(m)
    rule = rules.get(name, ("", None))[0] if rules else ""
    rows.append({"name": name, "type": selection.param_type_of(name),
                 "layer": selection.layer_of(name), "shape": tuple(a.shape), "rule": rule,
                 "trainable": int(np.count_nonzero(a)), "size": int(a.size)})
  return rows


def write_trainable_tsv(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
  """trainable_params.tsv: the per-parameter lines the console no longer prints."""
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  with utils.atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write("name\ttype\tlayer\tshape\trule\ttrainable\tsize\tpercent\n")
    for r in rows:
      pct = 100.0 * r["trainable"] / r["size"] if r["size"] else 0.0
      f.write(f"{r['name']}\t{r['type']}\t{r['layer']}\t{'x'.join(map(str, r['shape']))}\t"
              f"{r['rule']}\t{r['trainable']}\t{r['size']}\t{pct:.4f}\n")
  return path


def trainable_summary(rows: Iterable[Mapping[str, Any]], *, per_line: int = 4) -> list[str]:
  """A few lines: the trainable count and %, then the % trained of each parameter type."""
  rows = list(rows)
  total = sum(r["size"] for r in rows)
  trained = sum(r["trainable"] for r in rows)
  by_type: dict[str, list[int]] = {}
  for r in rows:
    acc = by_type.setdefault(r["type"], [0, 0])
    acc[0] += r["trainable"]
    acc[1] += r["size"]
  head = (f"trainable: {trained:,} of {total:,} parameters "
          f"({100.0 * trained / max(total, 1):.3f} %)")
  if all(s in (0, n) for s, n in by_type.values()):  # Whole types only: name them, one line.
    whole = [t for t, (s, n) in by_type.items() if s and s == n]
    return [head + (": every type" if len(whole) == len(by_type) else
                    f": {', '.join(whole) or 'none'} (the rest frozen)")]
  lines = [head + "; % of each parameter type trained:"]
  items = [f"{t} {100.0 * s / max(n, 1):.2f}" for t, (s, n) in by_type.items()]
  for i in range(0, len(items), per_line):
    lines.append("  " + ", ".join(items[i:i + per_line]))
  return lines


def report_trainable(workdir: str, mask_tree, rules: Mapping[str, tuple[str, bool]]) -> None:
  """One line per parameter tensor to WORKDIR/trainable_params.tsv (process 0); the console gets
  the counts by type."""
  import jax  # pylint: disable=g-import-not-at-top
  rows = trainable_rows(mask_tree, rules)
  if jax.process_index() == 0:
    write_trainable_tsv(os.path.join(workdir, "trainable_params.tsv"), rows)
  from absl import logging  # pylint: disable=g-import-not-at-top
  for line in trainable_summary(rows):
    logging.info("%s", line)
