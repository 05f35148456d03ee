"""The trainer's score stage: importance scores of a run's weights, cached in WORKDIR/scores.

Which batches are scored (`peft.score_batches`; -1 = one epoch of the training split, the paper's
"selected within one training epoch"), the optional head warm-up, and the cache; the estimators
themselves are in `shpeft_jax.peft.importance`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from absl import logging
import jax

from shpeft_jax import errors
from shpeft_jax import params_io
from shpeft_jax import sharding
from shpeft_jax import utils
from shpeft_jax.errors import CheckpointError
from shpeft_jax.peft import methods as methods_lib

PyTree = Any


def score(config, method, workdir, loss_fn, params, mesh) -> PyTree:
  """Importance scores over `peft.score_batches` of the training split (cached in workdir/scores)."""
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import importance  # pylint: disable=g-import-not-at-top
  scores_dir = os.path.join(workdir, "scores")
  scored = methods_lib.scoring_eligible(method, params)
  if os.path.isdir(scores_dir):
    logging.info("Reusing importance scores in %s.", scores_dir)
    try:
      flat = utils.flatten_names(params_io.restore_tree(scores_dir))
    except (ValueError, OSError, KeyError) as e:
      raise CheckpointError(f"the importance scores in {scores_dir} are corrupt or incomplete "
                            f"({errors.first_line(e)}); rerun with --restart_from=scores.") from e
    return utils.map_with_names(lambda n, s: flat.get(n) if s else None, scored)
  # Multi-process: every process reads the same whole global batches (no process slice), so the
  # `device_put` of each chunk onto the global sharding sees identical data everywhere.
  peft, t = config.peft, config.train
  train_split = config.data.train_split
  iterator = functools.partial(
      input_pipeline.make_train_iterator, config.data, split=train_split,
      global_batch_size=t.batch_size, image_size=config.model.image_size, start_step=0)
  num_batches = int(peft.score_batches)
  if num_batches < 0:  # One epoch (the paper's "selected within one training epoch").
    num_batches = max(1, input_pipeline.num_batches_per_epoch(
        config.data, split=train_split, global_batch_size=t.batch_size))
  if peft.head_warmup_steps > 0:
    # Optional linear probe of the head before scoring (off by default: the paper scores with the
    # fresh head). It only changes the head used for scoring; training starts from the fresh head.
    params, losses = importance.warm_up_head(
        loss_fn, params, iterator(seed=config.seed + 2), steps=int(peft.head_warmup_steps),
        lr=float(peft.head_warmup_lr))
    logging.info("Head warm-up before scoring: %d steps, loss %.4f -> %.4f.",
                 peft.head_warmup_steps, losses[0], losses[-1])
  acc, info = importance.score_dataset(
      loss_fn, params, iterator(seed=config.seed + 1), num_batches=num_batches,
      chunk_size=int(peft.score_chunk), scored=scored, shardings=sharding.chunk_sharding(mesh),
      progress=False)
  scores = importance.hybrid_importance(params, acc, scored=scored, **method.importance)
  logging.info("scored the importance of the weights over %d batches (%d images) in %.1f s",
               info["num_batches"], info["num_images"], info["seconds"])
  if jax.process_index() == 0:
    params_io.save_tree(scores_dir, utils.unflatten_names(utils.flatten_names(scores)))
  return scores
