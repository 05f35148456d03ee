"""An exclusive lock on a workdir: two runs in one workdir would interleave their results.

The lock is an `fcntl.flock` on `workdir/.lock`, which the kernel releases when its holder dies
(kill -9 included), so a lock left by a dead process never blocks a rerun. The file holds the
holder's host, pid and command line: a second live process gets a one-line WorkdirBusyError that
names them, and a run that takes over after a dead one says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

from absl import logging

from shpeft_jax.errors import WorkdirBusyError

LOCK_FILE = ".lock"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir): ...` holds the workdir for the block (re-entrant per process)."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd: int | None = None
    self._created = False
    self.previous: dict | None = None

  def _read(self, fd: int) -> dict | None:
    try:
      os.lseek(fd, 0, os.SEEK_SET)
      data = os.read(fd, 65536)
      return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
      return None

  def acquire(self) -> "WorkdirLock":
    if self._fd is not None:
      return self
    self._created = not os.path.isdir(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read(fd) or {}
      os.close(fd)
      who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} "
             f"(started {holder.get('started', '?')}: {holder.get('command', '?')})")
      raise WorkdirBusyError(
          f"{self.workdir} is in use by {who}. Wait for it to finish or use another --workdir; "
          "two runs in one workdir would mix their results.") from None
    self.previous = self._read(fd)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
    if self.previous and self.previous.get("pid") is not None:
      prev_pid = int(self.previous["pid"])
      same_host = self.previous.get("host") == me["host"]
      if not (same_host and prev_pid == os.getpid()):
        state = ("no longer running" if same_host and not _pid_alive(prev_pid) else "gone")
        logging.warning("Taking over %s: its previous holder, process %s on %s, is %s (it stopped "
                        "without releasing the workdir); its finished stages and checkpoints are "
                        "reused.", self.path, prev_pid, self.previous.get("host"), state)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)  # A clean exit leaves no holder to report.
    except OSError:
      pass
    if self._created and os.listdir(self.workdir) == [LOCK_FILE]:
      # A run that failed before writing anything (bad config) leaves no workdir behind.
      os.remove(self.path)
      os.rmdir(self.workdir)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
