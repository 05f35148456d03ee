"""Workdir lock: a second live process is refused in one line; a dead holder's lock is taken over."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from shpeft_jax import workdir_lock
from shpeft_jax.errors import WorkdirBusyError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_HOLDER = textwrap.dedent("""
    import sys, time
    from shpeft_jax import workdir_lock
    lock = workdir_lock.WorkdirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def _start_holder(workdir):
  p = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], stdout=subprocess.PIPE,
                       env={**os.environ, "PYTHONPATH": ROOT}, text=True)
  assert p.stdout.readline().strip() == "locked"
  return p


def test_second_live_process_gets_one_line_error_naming_the_holder(tmp_path):
  p = _start_holder(str(tmp_path))
  try:
    with pytest.raises(WorkdirBusyError) as e:
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    msg = str(e.value)
    assert f"process {p.pid} on " in msg and "another --workdir" in msg and "\n" not in msg
  finally:
    p.kill()
    p.wait()


def test_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path, caplog):
  p = _start_holder(str(tmp_path))
  p.send_signal(signal.SIGKILL)
  p.wait()
  # The dead holder's record is still in the file.
  assert json.load(open(tmp_path / ".lock"))["pid"] == p.pid
  with caplog.at_level("WARNING"):
    with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
      assert lock.previous["pid"] == p.pid
      assert json.load(open(tmp_path / ".lock"))["pid"] == os.getpid()
  assert any(f"process {p.pid}" in r.getMessage() and "no longer running" in r.getMessage()
             for r in caplog.records)


def test_release_lets_the_next_run_in_silently(tmp_path, caplog):
  with workdir_lock.WorkdirLock(str(tmp_path)):
    pass
  with caplog.at_level("WARNING"):
    with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
      assert lock.previous is None
  assert not [r for r in caplog.records if "Taking over" in r.getMessage()]


def test_a_run_that_wrote_nothing_leaves_no_workdir(tmp_path):
  w = tmp_path / "new"
  with workdir_lock.WorkdirLock(str(w)):
    assert os.listdir(w) == [".lock"]
  assert not w.exists()
  with workdir_lock.WorkdirLock(str(w)):
    (w / "config.json").write_text("{}")
  assert sorted(os.listdir(w)) == [".lock", "config.json"]
