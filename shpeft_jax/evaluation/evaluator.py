"""The evaluation loop: a jitted eval step over a whole split -> the task's metrics (`tasks`:
macro F1, accuracy, macro AUC for single-label; mean AUROC, mAP, per-finding F1 ... for
multi-label); and the validation during training that keeps the best model by the task's headline."""

from __future__ import annotations

import os
from typing import Any, Callable

from absl import logging
import jax
import numpy as np

from shpeft_jax import checkpoints
from shpeft_jax import params_io
from shpeft_jax import sharding
from shpeft_jax import tasks
from shpeft_jax.evaluation import metrics
from shpeft_jax.evaluation import writers


def scalars(m: dict) -> dict[str, float]:
  """The scalar metrics of `m` (what the metric writer logs; per-label lists stay out)."""
  return {k: float(v) for k, v in m.items() if np.ndim(v) == 0 and not isinstance(v, str)}


def evaluate(eval_step: Callable, params: Any, config, split: str, mesh,
             num_classes: int, *, task=None, thresholds=None, with_predictions: bool = False):
  """The task's metrics of `params` on `split`, every example exactly once (padding carries
  valid=0); decisions at `thresholds` (multi-label; None: 0.5).

  `eval_step(params, batch) -> (logits, labels, valid)` is `train.make_eval_step`'s. With
  `with_predictions`, (metrics, (logits, labels) of the valid examples) for the report.
  """
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  del num_classes  # The logits' width.
  task = task or tasks.of(None)
  bs = int(config.train.eval_batch_size or config.train.batch_size)
  it = input_pipeline.make_eval_iterator(
      config.data, split=split, global_batch_size=bs, image_size=config.model.image_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  batch_sh = sharding.batch_sharding(mesh)
  logits, labels, valid = [], [], []
  for batch in it:
    l, y, v = jax.device_get(eval_step(params, sharding.to_global(batch, batch_sh)))
    logits.append(l)
    labels.append(y)
    valid.append(v)
  logits, labels, valid = map(np.concatenate, (logits, labels, valid))
  keep = np.asarray(valid, bool)
  m = task.metrics(logits[keep], labels[keep], thresholds=thresholds)
  if with_predictions:
    return m, (logits[keep], labels[keep])
  return m


def validation_metrics(task, logits, labels) -> dict:
  """Validation metrics with the decision thresholds chosen on this same validation set (kept
  in the metrics: what the test evaluation of the same parameters then uses)."""
  return task.metrics(logits, labels, thresholds=task.thresholds(logits, labels))


class Validation:
  """Validation every `train.eval_every` steps; the best params by the task's headline metric
  (macro F1 / mean AUROC) go to workdir/best."""

  def __init__(self, config, workdir, eval_step, mesh, num_classes, meta, writer, start_step,
               task=None):
    self.config, self.eval_step, self.mesh, self.num_classes = config, eval_step, mesh, num_classes
    self.meta, self.writer, self.task = meta, writer, task or tasks.of(None)
    self.split = config.data.val_split or None
    self.dir, self.json = os.path.join(workdir, "best"), os.path.join(workdir, "best.json")
    self.best = params_io.json_load(self.json) if os.path.exists(self.json) else None
    if self.best is not None and self.best["step"] > start_step:
      self.best = None  # Written after the checkpoint we resume from: it will be recomputed.

  def evaluate(self, params) -> dict | None:
    """Validation metrics of `params` (multi-label: thresholds chosen on validation)."""
    if self.split is None:
      return None
    _, (logits, labels) = evaluate(self.eval_step, params, self.config, self.split, self.mesh,
                                   self.num_classes, task=self.task, with_predictions=True)
    return validation_metrics(self.task, logits, labels)

  def __call__(self, step: int, params):
    m = self.evaluate(params)
    if m is None:
      return None
    self.writer.write(step, "val", scalars(m))
    # Detail: the progress bar shows the validation headline at the default verbosity.
    logging.debug("step %d val: %s", step, writers.format_metrics(scalars(m)))
    key = self.task.headline
    if self.best is None or _better(m[key], self.best.get(key)):
      self.best = {"step": int(step), **m}
      if jax.process_index() == 0:
        meta = {**self.meta, "step": int(step)}
        if m.get("thresholds") is not None:
          meta["thresholds"] = m["thresholds"]
        checkpoints.save_params(self.dir, params, meta, overwrite=True)
        params_io.json_dump(self.json, self.best)
    return m

  def final(self):
    if (self.best is None and self.split is not None and self.config.train.eval_every > 0
        and os.path.isdir(self.dir)):
      self.best = params_io.json_load(self.json)
    return self.best


def _better(new: float, old: float | None) -> bool:
  """Strictly better; a NaN headline (a split where no finding is defined) never wins, and any
  number beats a recorded NaN."""
  if old is None or not np.isfinite(old):
    return bool(np.isfinite(new)) or old is None
  return bool(np.isfinite(new) and new > old)
