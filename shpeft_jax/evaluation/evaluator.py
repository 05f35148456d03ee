"""The evaluation loop: a jitted eval step over a whole split -> macro F1, accuracy, macro AUC;
and the validation during training that keeps the best model."""

from __future__ import annotations

import os
from typing import Any, Callable

from absl import logging
import jax
import numpy as np

from shpeft_jax import checkpoints
from shpeft_jax import params_io
from shpeft_jax import sharding
from shpeft_jax.evaluation import metrics
from shpeft_jax.evaluation import writers


def scalar_metrics(logits, labels, num_classes: int, valid=None) -> dict[str, float]:
  """{f1_macro, accuracy, auc_macro} as floats (`metrics.classification_metrics`' scalars)."""
  out = metrics.classification_metrics(logits, labels, num_classes, valid=valid)
  return {k: float(v) for k, v in out.items() if np.ndim(v) == 0}


def evaluate(eval_step: Callable, params: Any, config, split: str, mesh,
             num_classes: int) -> dict[str, float]:
  """Metrics of `params` on `split`, every example exactly once (padding carries valid=0).

  `eval_step(params, batch) -> (logits, labels, valid)` is `train.make_eval_step`'s.
  """
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
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
  return scalar_metrics(logits, labels, num_classes, valid)


class Validation:
  """Validation macro F1 every `train.eval_every` steps; the best params go to workdir/best."""

  def __init__(self, config, workdir, eval_step, mesh, num_classes, meta, writer, start_step):
    self.config, self.eval_step, self.mesh, self.num_classes = config, eval_step, mesh, num_classes
    self.meta, self.writer = meta, writer
    self.split = config.data.val_split or None
    self.dir, self.json = os.path.join(workdir, "best"), os.path.join(workdir, "best.json")
    self.best = params_io.json_load(self.json) if os.path.exists(self.json) else None
    if self.best is not None and self.best["step"] > start_step:
      self.best = None  # Written after the checkpoint we resume from: it will be recomputed.

  def __call__(self, step: int, params):
    if self.split is None:
      return
    m = evaluate(self.eval_step, params, self.config, self.split, self.mesh, self.num_classes)
    self.writer.write(step, "val", m)
    logging.info("step %d val: %s", step, writers.format_metrics(m))
    if self.best is None or m["f1_macro"] > self.best["f1_macro"]:
      self.best = {"step": int(step), **m}
      if jax.process_index() == 0:
        checkpoints.save_params(self.dir, params, {**self.meta, "step": int(step)},
                                overwrite=True)
        params_io.json_dump(self.json, self.best)

  def final(self):
    if (self.best is None and self.split is not None and self.config.train.eval_every > 0
        and os.path.isdir(self.dir)):
      self.best = params_io.json_load(self.json)
    return self.best
