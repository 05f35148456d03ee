"""Where a run's measurements go: metrics.jsonl, TensorBoard (clu.metric_writers), the console."""

from __future__ import annotations

import json
import os
import sys
import time

from absl import logging
import jax


class MetricWriter:
  """Appends {'step', 'kind', ...} lines to metrics.jsonl and `kind/name` scalars to TensorBoard.

  On a resume, the lines a killed run wrote after its last checkpoint (and a previous final test
  line) are dropped: the resumed run rewrites them, so each step appears once.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        lines = [json.loads(l) for l in f if l.strip()]
      keep = [l for l in lines if l.get("step", 0) <= resume_step and l.get("kind") != "test"]
      with open(self.path, "w") as f:
        f.writelines(json.dumps(l) + "\n" for l in keep)
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self._tb = metric_writers.SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, kind: str, values: dict):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "kind": kind, **values}) + "\n")
    self._tb.write_scalars(int(step), {f"{kind}/{k}": v for k, v in values.items()})
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class Progress:
  """A tqdm bar when stderr is a terminal, else periodic log lines; images/s and ETA in both."""

  def __init__(self, total: int, start: int, batch_size: int, desc: str, enabled: bool):
    self.total, self.batch_size, self.start, self.desc = total, batch_size, start, desc
    self.t0 = time.perf_counter()
    self.bar = None
    if enabled and jax.process_index() == 0 and sys.stderr.isatty():
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)

  def rate(self, step: int) -> tuple[float, float]:
    dt = max(time.perf_counter() - self.t0, 1e-9)
    steps_per_s = (step - self.start) / dt
    eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
    return steps_per_s * self.batch_size, eta

  def log(self, step: int, loss: float):
    """A logged step: the bar's postfix, or one log line when there is no bar."""
    ips, eta = self.rate(step)
    if self.bar is None:
      logging.info("[%s] step %d/%d loss %.4f  %.0f img/s  ETA %.0fs", self.desc, step,
                   self.total, loss, ips, eta)
    self.update(step, loss)
    return ips

  def update(self, step: int, loss: float | None = None):
    if self.bar is not None:
      self.bar.n = step
      ips, _ = self.rate(step)
      self.bar.set_postfix(img_s=f"{ips:.0f}", loss=None if loss is None else f"{loss:.4f}",
                           refresh=False)
      self.bar.refresh()

  def close(self):
    if self.bar is not None:
      self.bar.close()


def format_metrics(m: dict) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in sorted(m.items()) if isinstance(v, float))
