"""Preemption: SIGTERM means "save and stop", at a step boundary that every process agrees on.

SLURM, Kubernetes and preemptible TPU VMs send SIGTERM some seconds before they kill a job. The
trainer then finishes the step it is in, saves a checkpoint of that step, prints the same line as
Ctrl-C and exits with status 143; the rerun of the same command resumes bit-identically from that
checkpoint (as after any interruption).

Agreement between processes: in a multi-process world JAX's preemption sync manager (started by
`jax.distributed.initialize`; its notifier catches SIGTERM) propagates the notice through the
coordination service and picks the next step that all processes reach
(`multihost_utils.reached_preemption_sync_point`, the mechanism orbax uses). In one process a
SIGTERM handler sets a flag that the loop reads at the next step boundary.
"""

from __future__ import annotations

import signal
import threading

from absl import logging
import jax


def _sync_manager():
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  state = distributed.global_state
  return state.preemption_sync_manager if state.client is not None else None


class Preemption:
  """`with Preemption() as p: ... if p.reached(step): save, stop`."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1 and _sync_manager() is not None

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __enter__(self) -> "Preemption":
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def leave(self) -> None:
    """After the agreed checkpoint: every process leaves the world together (JAX's shutdown
    barrier). A process that exits on its own makes a peer that is still finishing its save see
    the coordination service vanish, and XLA aborts that peer (SIGABRT instead of exit 143)."""
    if self._multi:
      try:
        jax.distributed.shutdown()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("jax.distributed.shutdown after the preemption checkpoint: %s", e)

  def reached(self, step: int) -> bool:
    """True at the step where this process (and every other one) must checkpoint and stop.
    Called at every step boundary by every process (the sync protocol needs each step)."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.requested
