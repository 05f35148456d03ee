"""kill -9 of a run that holds the workdir (async checkpoints on): the rerun of the same command
takes the lock over, keeps the fingerprints, resumes from the last complete checkpoint and ends
bit-identical to an uninterrupted run."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np

from fault_fixtures import ROOT  # pylint: disable=g-bad-import-order
from shpeft_jax import checkpoints
from shpeft_jax import params_io
from shpeft_jax import utils
from train_fixtures import TINY_OVERRIDES, cli_overrides  # pylint: disable=g-bad-import-order

STEPS = 40
OVERRIDES = dict(TINY_OVERRIDES, **{"train.num_steps": STEPS, "train.checkpoint_every": 4,
                                    "train.async_checkpoints": True, "train.log_every": 100})


def _cmd(workdir):
  return [sys.executable, "-m", "shpeft_jax.main", "--config", "configs/common.py", "--workdir",
          str(workdir), *cli_overrides(OVERRIDES)]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  return env


def _start_and_wait_for_checkpoint(workdir, step: int = 8, **popen):
  """The run of _cmd(workdir), returned once its checkpoint of `step` (or later) is complete."""
  proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(), **popen)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = params_io.complete_steps(str(workdir / "checkpoints"))
    if done and done[-1] >= step:
      return proc
    time.sleep(0.01)
  proc.kill()
  proc.wait()
  raise AssertionError(f"the run ended (rc {proc.returncode}) or timed out before checkpoint {step}")


def _rerun_resumes_bit_identically(tmp_path, workdir, step: int) -> str:
  """Reruns _cmd(workdir): it resumes from `step` and its exported model equals, bit for bit, an
  uninterrupted run's. Returns the rerun's stderr."""
  rerun = subprocess.run(_cmd(workdir), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-4000:]
  assert f"Resumed from the checkpoint at step {step}" in rerun.stderr
  # The uninterrupted reference runs the same command in a fresh process too: the pytest process
  # may carry global JAX state from other tests, which can change float rounding.
  ref = subprocess.run(_cmd(tmp_path / "reference"), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-4000:]
  resumed, _ = checkpoints.load_params(str(workdir / "export" / "model"))
  reference, _ = checkpoints.load_params(str(tmp_path / "reference" / "export" / "model"))
  resumed, reference = utils.flatten_names(resumed), utils.flatten_names(reference)
  assert resumed.keys() == reference.keys()
  for name in reference:
    np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
  return rerun.stderr


def test_kill_9_then_rerun_takes_over_and_is_bit_identical(tmp_path):
  workdir = tmp_path / "killed"
  proc = _start_and_wait_for_checkpoint(workdir, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
  try:
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  killed_at = params_io.complete_steps(str(workdir / "checkpoints"))[-1]
  assert 8 <= killed_at < STEPS and not (workdir / "results.json").exists()
  fingerprints = sorted(os.listdir(workdir / "fingerprints"))
  assert {"data.json", "mask.json", "train.json"} <= set(fingerprints)

  rerun = _rerun_resumes_bit_identically(tmp_path, workdir, killed_at)
  assert f"its previous holder, process {proc.pid}" in rerun


def test_ctrl_c_says_where_it_stopped_releases_the_workdir_and_keeps_the_checkpoints(tmp_path):
  """SIGINT (Ctrl-C) of a real run: exit 130, one line naming the step, no traceback, the workdir
  released (no holder left in its lock), the finished checkpoints kept for the rerun."""
  workdir = tmp_path / "interrupted"
  # A shell's background job (`.ci/run &`) passes SIGINT down ignored, and Python then keeps it
  # ignored: the run gets Ctrl-C's default, as a terminal's foreground job has it.
  proc = _start_and_wait_for_checkpoint(
      workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  ckpts = workdir / "checkpoints"
  try:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  last = [l for l in err.splitlines() if l.strip()][-1]
  m = re.fullmatch(r"interrupted during training in (\S+), after step (\d+) of 40 \(last "
                   r"complete checkpoint: step (\d+)\)\. Nothing finished was lost: rerun the same command "
                   r"to resume\.", last)
  assert m and m.group(1) == str(ckpts), err[-3000:]
  kept = params_io.complete_steps(str(ckpts))
  assert kept and int(m.group(3)) == max(kept) >= 8 and int(m.group(2)) >= 8
  assert (workdir / ".lock").read_text() == ""  # released: no holder
  assert not (workdir / "results.json").exists()


def test_sigterm_saves_the_next_step_says_so_and_the_rerun_is_bit_identical(tmp_path):
  """A scheduler's preemption notice (SIGTERM): the step in flight finishes, its checkpoint is
  saved (between the regular ones, every 4 steps), the Ctrl-C line is printed, exit 143; the rerun
  resumes from that step and ends bit-identical to an uninterrupted run."""
  workdir = tmp_path / "preempted"
  proc = _start_and_wait_for_checkpoint(workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
  before = params_io.complete_steps(str(workdir / "checkpoints"))[-1]
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  lines = [l for l in err.splitlines() if l.startswith("interrupted")]
  assert len(lines) == 1 and "rerun the same command to resume" in lines[0], err[-3000:]
  assert "Traceback" not in err
  saved = params_io.complete_steps(str(workdir / "checkpoints"))[-1]
  assert before <= saved < STEPS and f"last complete checkpoint: step {saved}" in lines[0]
  assert not (workdir / "results.json").exists()

  _rerun_resumes_bit_identically(tmp_path, workdir, saved)
