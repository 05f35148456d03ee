"""Errors raised for bad user input, and the one error handler of every command line.

Each message names the problem and the fix. `cli_main` turns the project's errors and the usual
operating-system / storage faults (disk full, read-only or forbidden path, corrupt checkpoint) into
ONE line on stderr and exit code 2; the full traceback is printed only with `--verbosity=1` and is
always appended to the log file when the command has one (a trainer workdir's `log.txt`).
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, Iterator


class ShpeftError(ValueError):
  """Base class of the project's user-facing errors."""


class ConfigError(ShpeftError):
  """An invalid or inconsistent configuration value."""


class DataError(ShpeftError):
  """Missing, misplaced, corrupt or empty data."""


class CheckpointError(ShpeftError):
  """A checkpoint that is missing, corrupt or belongs to another model."""


class StageMismatchError(ConfigError):
  """A cached stage of a workdir was made from other inputs than the current run's."""


class WorkdirBusyError(ShpeftError):
  """Another live process holds the workdir."""


class NonFiniteError(ShpeftError, FloatingPointError):
  """The model became non-finite (NaN / inf); nothing non-finite is saved or exported."""


EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect of a process they asked to stop


class Preempted(KeyboardInterrupt):
  """SIGTERM (a scheduler's preemption notice) honoured: a checkpoint was saved at the step all
  processes agreed on. Reported like Ctrl-C, in one line; the rerun resumes from that step."""

# Where a long command currently is ("training step 120 of 300 in /w"), for Ctrl-C messages: a
# text, or a function that makes it when it is needed (the trainer's step changes every step).
_PROGRESS: list = []


def note_progress(text: str | Callable[[], str] | None) -> None:
  """Records where the command is; a Ctrl-C then says where it stopped. None: nowhere special."""
  _PROGRESS[:] = [text] if text is not None else []


def _progress_text() -> str:
  if not _PROGRESS:
    return ""
  try:
    text = _PROGRESS[0]() if callable(_PROGRESS[0]) else _PROGRESS[0]
  except Exception:  # pylint: disable=broad-except  (an interrupted run's state may be half-made)
    return ""
  return f" during {text}" if text else ""


def _chain(exc: BaseException) -> Iterator[BaseException]:
  """exc, its causes / contexts and the members of exception groups, each once."""
  seen, todo = set(), [exc]
  while todo:
    e = todo.pop(0)
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo.extend(getattr(e, "exceptions", ()) or ())
    todo.extend((e.__cause__, e.__context__))


_OS_ERROR_TEXT = {
    errno.ENOSPC: ("No space left on device", "os error 28", "RESOURCE_EXHAUSTED: Error writing"),
    errno.EROFS: ("Read-only file system", "os error 30"),
    errno.EACCES: ("Permission denied", "os error 13"),
}

_TENSORSTORE_HINTS = ("tensorstore", "zarr", "ocdbt", "_METADATA", "manifest.ocdbt", "checkpoint")


def describe(exc: BaseException, hint_path: str | None = None) -> str | None:
  """One line for a known fault (naming the path and the fix), or None for a real bug."""
  chain = list(_chain(exc))
  for e in chain:
    if isinstance(e, ShpeftError):
      return f"{type(e).__name__}: {e}"
  for e in chain:
    if isinstance(e, OSError) and e.errno is not None:
      path = e.filename or hint_path or "the output"
      if e.errno == errno.ENOSPC or e.errno == getattr(errno, "EDQUOT", -1):
        return (f"disk full while writing {path} ({e.strerror}). Free space on that disk or "
                "point the output (--workdir / --out) at another one; a rerun resumes from the "
                "last complete checkpoint.")
      if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write {path}: {e.strerror}. Choose a writable --workdir / --out, or fix "
                "the permissions of that folder.")
      if isinstance(e, FileNotFoundError):
        return f"{path} does not exist ({e.strerror}); check the path."
  # Writers in Rust / C++ (safetensors, TensorStore) report the OS error in their message only.
  for e in chain:
    text = str(e)
    for code, needles in _OS_ERROR_TEXT.items():
      if any(n in text for n in needles):
        return describe(OSError(code, os.strerror(code), hint_path), hint_path)
  # A corrupt or partial orbax checkpoint surfaces as a TensorStore / ValueError deep inside.
  text = " ".join(str(e) for e in chain)
  if any(h in text for h in _TENSORSTORE_HINTS) and any(
      type(e).__module__.startswith(("tensorstore", "orbax", "jaxlib")) or "TensorStore" in str(e)
      or "Checkpoint" in type(e).__name__ for e in chain):
    where = hint_path or "the checkpoint"
    return (f"cannot read {where}: the checkpoint is corrupt or incomplete "
            f"({first_line(chain[-1])}). Delete it (a trainer rerun resumes from the previous "
            "checkpoint) or recreate it.")
  return None


def first_line(e: BaseException) -> str:
  s = str(e).strip().splitlines()
  return (s[0][:200] if s else type(e).__name__)


def _log_traceback(log_file: str | None, exc: BaseException) -> bool:
  """Appends the traceback to an existing folder's log file; False if not written."""
  if not log_file or not os.path.isdir(os.path.dirname(os.path.abspath(log_file))):
    return False
  try:
    with open(log_file, "a") as f:
      traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
    return True
  except OSError:
    return False  # The log is on the disk that just failed: stderr has the message already.


def handle(exc: BaseException, *, verbosity: int = 0, log_file: str | None = None,
           hint_path: str | None = None, prog: str = "") -> int | None:
  """Prints the one-line report of `exc` and returns the exit code; None for an unknown bug."""
  if isinstance(exc, KeyboardInterrupt):
    where = _progress_text()
    print(f"\ninterrupted{where}. Nothing finished was lost: rerun the same command to resume.",
          file=sys.stderr, flush=True)
    return EXIT_PREEMPTED if isinstance(exc, Preempted) else EXIT_INTERRUPTED
  line = describe(exc, hint_path)
  if line is None:
    return None
  # Another run's workdir is not ours to write in.
  logged = not isinstance(exc, WorkdirBusyError) and _log_traceback(log_file, exc)
  if verbosity >= 1:
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
  tail = f" (traceback in {log_file})" if logged and verbosity < 1 else ""
  print(f"{prog + ': ' if prog else ''}error: {line}{tail}", file=sys.stderr, flush=True)
  return EXIT_ERROR


def cli_main(fn: Callable[[], int | None], *, verbosity: int = 0, log_file: str | None = None,
             hint_path: str | None = None, prog: str = "") -> int:
  """Runs fn() with the project's error handling; returns its exit code (0 when it returns None).

  Known faults -> one line + exit 2; Ctrl-C -> where it stopped + exit 130; anything else is a
  bug and keeps its traceback.
  """
  _drop_closed_loop_noise()
  try:
    rc = fn()
    return 0 if rc is None else int(rc)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    code = handle(e, verbosity=verbosity, log_file=log_file, hint_path=hint_path, prog=prog)
    if code is None:
      _log_traceback(log_file, e)
      raise
    return code


def _is_closed_loop_noise(exc: BaseException | None) -> bool:
  """orbax's `Event loop is closed` from a TensorStore thread after a failed read (not ours)."""
  if not isinstance(exc, RuntimeError) or str(exc) != "Event loop is closed":
    return False
  tb = exc.__traceback__
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


def _drop_closed_loop_noise() -> None:
  """Keeps a failed command's one-line error alone on stderr.

  When a TensorStore read inside orbax fails (a corrupt checkpoint), its worker threads later call
  back into orbax's already closed asyncio loop; Python prints that as an unrelated `Exception
  ignored ... Event loop is closed` traceback at a random moment, also between our error line and
  the exit. Only that exact exception is dropped; every other unraisable exception is printed.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_shpeft_filter", False):
    return

  def hook(unraisable):
    if _is_closed_loop_noise(unraisable.exc_value):
      return
    previous(unraisable)

  hook._shpeft_filter = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def verbosity_from_argv(argv) -> int:
  """--verbosity=N / -v N / --verbosity N from a raw argv (absl's flag, for the error handler)."""
  argv = list(argv or ())
  for i, a in enumerate(argv):
    for flag in ("--verbosity", "-v"):
      if a.startswith(flag + "="):
        try:
          return int(a.split("=", 1)[1])
        except ValueError:
          return 0
      if a == flag and i + 1 < len(argv):
        try:
          return int(argv[i + 1])
        except ValueError:
          return 0
  return 0


def env_verbosity() -> int:
  try:
    return int(os.environ.get("SHPEFT_VERBOSITY", "0"))
  except ValueError:
    return 0


def exit_process(code: int) -> None:
  """sys.exit, except that a failed command skips the interpreter's shutdown.

  After a TensorStore read fails, its worker threads call back into orbax's closed event loop at
  shutdown and print unrelated `Event loop is closed` tracebacks under the one-line error.
  """
  if code:
    import logging  # pylint: disable=g-import-not-at-top
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # The one-line report is out: nothing written after it is ours.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    except (OSError, ValueError):
      pass
    logging.shutdown()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def config_file_error(exc: BaseException, argv) -> str:
  """One line for a --config file that is missing or does not load (ml_collections' errors)."""
  path = "?"
  argv = list(argv or ())
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      path = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  path = path.split(":", 1)[0]
  if isinstance(exc, SyntaxError):
    return (f"config file {exc.filename or path} line {exc.lineno}: {exc.msg}; fix the file "
            "(configs/*.py are examples).")
  if not os.path.isfile(path):
    return (f"config file {path} does not exist; pass one of configs/*.py, e.g. "
            "--config configs/busi.py.")
  text = first_line(exc.__cause__ or exc.__context__ or exc)
  return f"config file {path} cannot be loaded ({type(exc).__name__}: {text}); fix the file."
