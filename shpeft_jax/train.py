"""One SH-PEFT run: score -> select -> train -> evaluate -> export, resumable at every stage.

`train_and_evaluate(config, workdir)` runs the stages top to bottom, like big_vision's and the flax
examples' train.py. Each stage leaves its result in the workdir, so a rerun skips finished stages
and a killed run resumes from its last checkpoint with bit-identical parameters (the input stream
restarts at the checkpointed step, see `shpeft_jax.data.input_pipeline`):

The files each stage leaves in the workdir are listed in docs/TRAINING.md.

Around it: `sharding` (mesh and sharding rules), `optim` (the optimizer and its schedule),
`peft.methods` (what a method trains, resolved once into a `PeftMethod`), `evaluation` (the eval
loop, metrics and writers). Several runs (the demo's methods, pre-training, sweeps) are
orchestrated by `shpeft_jax.runs`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import TYPE_CHECKING, Any
import zipfile

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from shpeft_jax import checkpoints as ckpt_lib
from shpeft_jax import console
from shpeft_jax import errors
from shpeft_jax import optim
from shpeft_jax import params_io
from shpeft_jax import preemption
from shpeft_jax import run_checks
from shpeft_jax import sharding
from shpeft_jax import stages as stages_lib
from shpeft_jax import tasks
from shpeft_jax import utils
from shpeft_jax.errors import CheckpointError, ConfigError
from shpeft_jax.evaluation import evaluator
from shpeft_jax.evaluation import writers
from shpeft_jax.models import clip_vit
from shpeft_jax.peft import mask_io
from shpeft_jax.peft import masking
from shpeft_jax.peft import merge as merge_lib
from shpeft_jax.peft import methods as methods_lib
from shpeft_jax.peft import scoring
from shpeft_jax.peft import sparse_optim

if TYPE_CHECKING:  # Annotations only: benchmarks/gpu_check.py runs where it is not installed.
  import ml_collections

PyTree = Any


def split_names(config) -> tuple[str, str | None, str]:
  d = config.data
  return d.train_split, d.val_split or None, d.test_split


def validate_config(config: ml_collections.ConfigDict) -> dict:
  """Raises ConfigError / DataError / CheckpointError for bad input; returns derived facts."""
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import subsets  # pylint: disable=g-import-not-at-top
  vit = clip_vit.get_model_config(config.model.name, config.model.image_size)
  clip_vit.compute_dtype(config.model.dtype)
  method = methods_lib.validate_peft(config.peft)
  run_checks.check_run_settings(config)  # Numbers first: no data, model or compile work yet.
  subsets.spec_of(config.data)
  sharding.validate_batch_sizes(config.train)
  if config.train.num_steps <= 0:
    raise ConfigError(f"train.num_steps must be positive, got {config.train.num_steps}.")
  optim.validate(config.optim, config.train.num_steps)
  sharding.mesh_shape(config.mesh)
  # Data: opening the source raises DataError for a missing / misplaced dataset.
  info = input_pipeline.dataset_info(config.data)
  task = tasks.of(info.task)
  for split in split_names(config):
    if split is not None:
      input_pipeline.get_source(config.data).split_size(split)
  run_checks.check_run_settings(config, dict(info.split_sizes),
                                train_split=split_names(config)[0])
  if config.model.init_checkpoint:
    params_io.check_init_checkpoint(config.model.init_checkpoint, config.model.name,
                                    vit.image_size)
  vit = clip_vit.get_model_config(config.model.name, config.model.image_size, **model_tower(config))
  # The selection budget against the model's real weight count (k_count > N, a k_percent that
  # rounds to 0 weights), from shapes alone: before the scoring pass, not after it.
  methods_lib.count_trainable(method, methods_lib.param_shapes(
      config.model.name, info.num_classes, method.additive, vit.image_size, vit.tower()))
  pos_weight = tasks.pos_weight(
      config, task, info.num_classes,
      lambda: input_pipeline.record_metadata(config.data, split_names(config)[0])["label"])
  return {"vit": vit, "num_classes": info.num_classes, "class_names": info.class_names,
          "dataset": info.name, "split_sizes": dict(info.split_sizes), "method": method,
          "source_id": info.source_id, "task": task, "pos_weight": pos_weight,
          "subset": info.subset}


# ---------------------------------------------------------------------------------------------
# Model, loss and the jitted steps (benchmarks and tests build theirs with these).


def model_tower(config) -> dict[str, Any]:
  """Activation, LayerNorm eps, ln_pre, patch bias: the init checkpoint's (its meta.json), which
  config.model.act / ln_eps may only restate; they choose them for a run from scratch."""
  return ckpt_lib.tower_for_training(config.model.init_checkpoint, config.model.get("act", ""),
                                     config.model.get("ln_eps", 0.0))


def build_model(config, num_classes: int, method=None) -> clip_vit.ClipClassifier:
  method = methods_lib.resolve(config.peft if method is None else method)
  return clip_vit.build_model(config.model.name, num_classes, image_size=config.model.image_size,
                              dtype=config.model.dtype, additive=method.additive,
                              tower=model_tower(config))


def make_loss_fn(model, task: tasks.Task = tasks.of(tasks.SINGLE_LABEL), pos_weight=None):
  """The task's mean loss over a batch's valid examples: what training and the SH-PEFT score
  (its per-batch gradients) differentiate."""
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["image"], train=True).astype(jnp.float32)
    return task.loss(logits, batch["label"], batch["valid"], pos_weight)
  return loss_fn


def make_train_step(loss_fn, tx: optax.GradientTransformation):
  """state {params, opt, step, ...}, batch -> (new state, measurements); jit it with shardings.

  `tx` gives frozen elements an update of exactly zero; `masking.apply_updates` then selects p
  (not p + 0), which keeps them bit-identical even where XLA flushes subnormals to zero.
  """
  def train_step(state, batch):
    params = state["params"]
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    if isinstance(tx, sparse_optim.SparseMaskedTransformation):
      # The K selected weights are updated in place: no dense update tree in the step's memory.
      new_params, opt, update_norm = tx.apply_gradients(grads, state["opt"], params)
    else:
      updates, opt = tx.update(grads, state["opt"], params)
      new_params = masking.apply_updates(params, updates)
      update_norm = optax.tree.norm(updates)
    measurements = {"loss": loss, "grad_norm": optax.tree.norm(grads), "update_norm": update_norm,
                    "param_norm": optax.tree.norm(new_params)}
    # Every step, on device: read with the logged metrics and before anything is written.
    measurements["finite"] = run_checks.step_finite(loss, measurements["param_norm"])
    return {**state, "params": new_params, "opt": opt, "step": state["step"] + 1}, measurements
  return train_step


def make_eval_step(model):
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["image"]).astype(jnp.float32)
    return logits, batch["label"], batch["valid"]
  return eval_step


def init_params(config, model, mesh, rng):
  """(params created already sharded, overlaid with model.init_checkpoint; their shardings)."""
  init_fn = functools.partial(clip_vit.init_params, model)
  abstract = jax.eval_shape(init_fn, rng)
  param_sh = sharding.tree_shardings(mesh, abstract)
  params = jax.jit(init_fn, out_shardings=param_sh)(rng)
  if config.model.init_checkpoint:
    host = params_io.load_init_params(params_io.host(params), config.model.init_checkpoint,
                                      load_head=bool(config.model.load_head))
    params = jax.device_put(host, param_sh)
  return params, param_sh


# ---------------------------------------------------------------------------------------------
# Stages: score, select.


def select(config, method, workdir, loss_fn, params, mesh, rng) -> PyTree:
  """The host boolean mask (True = trained), saved to mask.npz + mask_stats.json (reused)."""
  mask_path = os.path.join(workdir, "mask.npz")
  host_params = params_io.host(params)
  if os.path.exists(mask_path):
    logging.info("Reusing the trainable mask in %s.", mask_path)
    try:
      return masking.full_mask(mask_io.load_mask(mask_path, host_params), host_params)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
      raise CheckpointError(f"{mask_path} is corrupt ({errors.first_line(e)}); rerun with "
                            "--restart_from=mask to recompute it.") from e
  scores = (scoring.score(config, method, workdir, loss_fn, params, mesh) if method.scored
            else None)
  mask, info = methods_lib.build_mask(method, host_params, scores=scores, rng=rng)
  mask = masking.full_mask(mask, host_params)
  if jax.process_index() == 0:
    mask_io.save_mask(mask_path, mask)
    mask_io.save_mask_stats(os.path.join(workdir, "mask_stats.json"), mask, info,
                            extra={"method": method.name})
  return mask


# ---------------------------------------------------------------------------------------------
# Stage: train.


def init_state(config, tx, params, param_sh, host_mask, mesh, rng):
  """The train state {params, opt, step, rng} (the mask lives in the optimizer state) + shardings."""
  num_steps = int(config.train.num_steps)
  init_opt = lambda p, m: optim.build(config.optim, num_steps, m).tx.init(p)
  if config.optim.sparse_state:  # Its indices come from the concrete host mask.
    init_opt = lambda p, m: tx.init(p)
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  opt_sh = sharding.tree_shardings(mesh, jax.eval_shape(init_opt, abstract_params, host_mask))
  mask = jax.device_put(host_mask, param_sh)
  opt = jax.jit(init_opt, in_shardings=(param_sh, param_sh), out_shardings=opt_sh)(params, mask)
  repl = sharding.replicated(mesh)
  state_sh = {"params": param_sh, "opt": opt_sh, "step": repl, "rng": repl}
  state = {"params": params, "opt": opt, "step": jnp.zeros((), jnp.int32), "rng": rng}
  return jax.device_put(state, state_sh), state_sh


def train_loop(config, state, train_step, schedule, manager, validation, writer, mesh,
               start_step: int, end_step: int):
  """Steps start_step+1 .. end_step: log, validate, checkpoint. Returns the state."""
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  t, num_steps = config.train, int(config.train.num_steps)
  it = input_pipeline.make_train_iterator(
      config.data, split=split_names(config)[0], global_batch_size=t.batch_size,
      image_size=config.model.image_size, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  progress = console.StepProgress(num_steps, start_step, desc=config.peft.method,
                                  batch_size=t.batch_size, enabled=bool(t.progress_bar))
  batch_sh = sharding.batch_sharding(mesh)
  # A non-finite step is caught before anything is written (`run_checks`); each step's flag stays
  # on the device until then, so the hot path has no host sync.
  watch = run_checks.FiniteWatch()
  at = [start_step]  # What a Ctrl-C message says: the step done last, the newest checkpoint.
  errors.note_progress(lambda: f"training in {manager.directory}, after step {at[0]} of "
                       f"{num_steps} (last complete checkpoint: step "
                       f"{(params_io.complete_steps(str(manager.directory)) or ['none'])[-1]})")
  with preemption.Preemption() as preempt:
    state = _steps(config, state, train_step, schedule, manager, validation, writer, it, batch_sh,
                   watch, progress, at, preempt, start_step, end_step)
  progress.close()
  errors.note_progress(None)
  return state


def _steps(config, state, train_step, schedule, manager, validation, writer, it, batch_sh, watch,
           progress, at, preempt, start_step: int, end_step: int):
  """The loop of train_loop; a SIGTERM (preempt) checkpoints the agreed step and stops."""
  t, num_steps = config.train, int(config.train.num_steps)
  lr_at = lambda s: schedule(s - 1)
  post = {}
  for step in range(start_step + 1, end_step + 1):
    state, measurements = train_step(state, sharding.to_global(next(it), batch_sh))
    at[0] = step
    watch.add(step, measurements.pop("finite"))
    if step % t.log_every == 0 or step == end_step or step == start_step + 1:
      watch.check(before=f"the metrics of step {step}", lr_at=lr_at)
      m = jax.device_get(measurements)
      post["loss"] = float(m["loss"])
      progress.update(step, **post)
      ips = progress.images_per_s(step)
      # Without a bar these lines are the progress; with one, detail for --verbosity=1.
      speed = (f"  {ips:.0f} img/s  ETA {progress.eta_s(step):.0f}s (after compiling)"
               if np.isfinite(ips) else "  (compiled)")
      (logging.info if progress.bar is None else logging.debug)(
          "[%s] step %d/%d loss %.4f%s", config.peft.method, step, num_steps, m["loss"], speed)
      writer.write(step, "train", {**m, "lr": float(schedule(step - 1)),
                                   "images_per_s": ips if np.isfinite(ips) else 0.0})
    elif step % 10 == 0:
      progress.update(step, **post)
    if t.eval_every > 0 and (step % t.eval_every == 0 or step == num_steps):
      watch.check(before=f"the validation at step {step} (and best/)", lr_at=lr_at)
      val = validation(step, state["params"])
      if val is not None:
        task = validation.task
        post[f"val_{task.headline_short.lower()}"] = f"{100 * val[task.headline]:.1f}"
        progress.update(step, **post)
    stop = preempt.reached(step)
    if step % t.checkpoint_every == 0 or step == end_step or stop:
      watch.check(before=f"the checkpoint at step {step}", lr_at=lr_at)
      manager.save(step, args=ocp.args.StandardSave({"state": state}))
    if stop:
      manager.wait_until_finished()
      progress.close()
      logging.info("SIGTERM: saved the checkpoint of step %d; stopping.", step)
      preempt.leave()
      raise errors.Preempted(f"preempted at step {step}")
  return state


# ---------------------------------------------------------------------------------------------
# Stages: evaluate, export.


def evaluate_and_export(config, workdir, method, params, param_sh, eval_step, mesh, best, meta,
                        writer, validation=None) -> dict:
  """Test metrics of the final (or, with train.report_best, the best) model; results.json and
  export/model (LoRA / SSF folded into the plain weights when the method merges).

  Multi-label decisions (per-finding F1, exact-match accuracy, predict's findings) use thresholds
  chosen on validation for the reported parameters (0.5 without a validation split); they are
  recorded in results.json and in the exported model's meta.json."""
  from shpeft_jax import checkpoints  # pylint: disable=g-import-not-at-top
  task = tasks.of(meta.get("task"))
  test_split, num_steps = split_names(config)[2], int(config.train.num_steps)
  evaluate = functools.partial(evaluator.evaluate, eval_step, config=config, split=test_split,
                               mesh=mesh, num_classes=meta["num_classes"], task=task,
                               with_predictions=True)

  def on_validation(p):  # (validation metrics, their thresholds) of params p.
    if validation is None:
      return None, None
    m = validation.evaluate(p)
    return m, (m or {}).get("thresholds")

  val_final, thr_final = on_validation(params)
  test_final, predictions = evaluate(params, thresholds=thr_final)
  writer.write(num_steps, "test", evaluator.scalars(test_final))
  results = {"method": method.name, "dataset": meta["dataset"], "task": task.name,
             "headline": task.headline, "steps": num_steps,
             "trainable": meta["trainable"], "total": meta["total"],
             "trainable_percent": 100.0 * meta["trainable"] / meta["total"],
             "test_final": test_final}
  if meta.get("train_subset"):  # data.train_fraction / train_per_class (data/subsets.py).
    results["train_subset"] = meta["train_subset"]
  report, report_params, val_report, thresholds = test_final, params, val_final, thr_final
  best_dir = os.path.join(workdir, "best")
  use_best = bool(config.train.report_best) and os.path.isdir(best_dir)
  if use_best:
    report_params = jax.device_put(checkpoints.load_params(best_dir)[0], param_sh)
    val_report, thresholds = on_validation(report_params)
    report, predictions = evaluate(report_params, thresholds=thresholds)
    results["test_best"] = report
    results["best_step"] = best["step"] if best else None
  if best is not None:
    results["val_best"] = best
  results["test"] = report
  results["reported"] = "best" if use_best else "final"
  if val_report is not None:
    # Validation metrics of the reported model: what a sweep chooses learning rates on.
    results["validation"] = val_report
  if task.uses_thresholds:
    results["thresholds"] = {
        "values": thresholds if thresholds is not None else [tasks.DEFAULT_THRESHOLD] * len(
            meta["class_names"]),
        "chosen_on": (f"validation ({split_names(config)[1]}), the reported model"
                      if thresholds is not None else "none: fixed 0.5 (no validation split)")}
    meta = {**meta, "thresholds": results["thresholds"]["values"]}
  if jax.process_index() == 0:
    _export(config, workdir, method, report_params, meta, results, predictions, test_split,
            checkpoints)
  return results


def _export(config, workdir, method, report_params, meta, results, predictions, test_split,
            checkpoints) -> None:
  """export/model, the task adapter, the test predictions and results.json (process 0)."""
  num_steps = int(config.train.num_steps)
  export_params = params_io.host(report_params)
  if method.merges:
    export_params = merge_lib.merge_additive(export_params, method.additive)
  bad = [n for n, v in utils.flatten_names(export_params).items() if not np.isfinite(v).all()]
  if bad:  # Only a model restored from an older, unguarded checkpoint can get here.
    raise errors.NonFiniteError(
        f"{len(bad)} tensors of the reported model hold NaN/inf (e.g. {bad[0]}); it is not "
        "exported. Lower optim.lr or set optim.grad_clip and rerun with --restart_from=train.")
  checkpoints.save_params(
      os.path.join(workdir, "export", "model"), export_params,
      {**meta, "step": results.get("best_step") or num_steps, "test": results["test"],
       "merged_additive": method.merges}, overwrite=True)
  # The same model as a task adapter: changed encoder elements + head (docs/ADAPTERS.md).
  from shpeft_jax import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  results["adapter"] = adapter_lib.write_run_adapter(
      workdir, export_params, init_checkpoint=config.model.init_checkpoint, method=method.name,
      meta={**meta, "step": results.get("best_step") or num_steps,
            "merged_additive": method.merges})
  logging.info("%s", adapter_lib.describe(results["adapter"]))
  from shpeft_jax import report as report_lib  # pylint: disable=g-import-not-at-top
  report_lib.save_predictions(os.path.join(workdir, report_lib.PREDICTIONS), *predictions,
                              meta["class_names"], split=test_split)
  params_io.json_dump(os.path.join(workdir, "results.json"), results)


# ---------------------------------------------------------------------------------------------
# The run.


def _start(config, workdir: str, restart_from: str | None) -> tuple[dict, dict, dict | None]:
  """(facts, stages, results.json if a run from the same inputs finished): checks come first."""
  os.makedirs(workdir, exist_ok=True)
  utils.enable_compilation_cache(config.compilation_cache_dir, workdir)
  results_path = os.path.join(workdir, "results.json")
  facts = validate_config(config)  # Before any long work.
  stages = stages_lib.check_trainer_stages(config, workdir, facts["source_id"], restart_from)
  if stages["export"].done and os.path.exists(results_path) and os.path.isdir(
      os.path.join(workdir, "export", "model")):
    logging.info("%s: results.json and the export exist (same inputs); nothing to do.", workdir)
    return facts, stages, params_io.json_load(results_path)
  if jax.process_index() == 0:
    # A run killed (-9) while writing left NAME.tmp-* behind: no other process writes here.
    for folder in (workdir, os.path.join(workdir, "export")):
      for path in utils.remove_stale_temporaries(folder):
        logging.info("Removed %s, left by an interrupted write.", path)
    params_io.json_dump(os.path.join(workdir, "config.json"),
                        json.loads(config.to_json_best_effort()))
  return facts, stages, None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restart_from: str | None = None) -> dict:
  """score -> select -> train -> evaluate -> export for one config; returns results.json.

  Each stage's result is reused only if it was made from the same inputs (`shpeft_jax.stages`);
  `restart_from` deletes that stage's and the later stages' results first.
  """
  facts, stages, done = _start(config, workdir, restart_from)
  if done is not None:
    return done
  method, num_classes = facts["method"], facts["num_classes"]
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  # Worth a console line only when there is a mesh to speak of.
  (logging.info if jax.device_count() > 1 else logging.debug)(
      "Mesh %s over %d devices (%d processes).", dict(mesh.shape), jax.device_count(),
      jax.process_count())

  model = build_model(config, num_classes, method)
  rng_init, rng_mask, rng_state = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  params, param_sh = init_params(config, model, mesh, rng_init)
  n_params = utils.count_params(params)
  logging.info("%s on %s: %s with %d classes, %d steps, in %s", method.name, facts["dataset"],
               config.model.name, num_classes, int(config.train.num_steps), workdir)
  if facts["subset"]:
    from shpeft_jax.data import subsets  # pylint: disable=g-import-not-at-top
    logging.info("Training subset: %s", subsets.line(facts["subset"]))
  task = facts["task"]
  loss_fn = make_loss_fn(model, task, facts["pos_weight"])
  host_mask = select(config, method, workdir, loss_fn, params, mesh, rng_mask)
  if is_main:
    for name in ("scores", "mask"):
      if os.path.exists(os.path.join(workdir, stages_lib.TRAINER_OUTPUTS[name][0])):
        stages[name].record()
  n_trainable = methods_lib.trainable_count(host_mask)
  console.report_trainable(workdir, host_mask, methods_lib.match_rules(
      method.spec, utils.flatten_names(host_mask)))

  num_steps = int(config.train.num_steps)
  tx, schedule = optim.build(config.optim, num_steps, host_mask)
  state, state_sh = init_state(config, tx, params, param_sh, host_mask, mesh, rng_state)
  del params, host_mask
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  train_step = jax.jit(make_train_step(loss_fn, tx), donate_argnums=(0,),
                       in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl))
  eval_step = jax.jit(make_eval_step(model), in_shardings=(param_sh, batch_sh),
                      out_shardings=(repl, repl, repl))

  t = config.train
  manager = params_io.checkpoint_manager(os.path.join(workdir, "checkpoints"), t)
  state, start_step = params_io.restore_latest(manager, state)
  meta = {"model": config.model.name, "image_size": int(config.model.image_size),
          "num_classes": num_classes, "method": method.name,
          "class_names": list(facts["class_names"]), "dataset": facts["dataset"],
          "task": task.name, **({"train_subset": facts["subset"]} if facts["subset"] else {}),
          "trainable": n_trainable, "total": n_params, **model.config.tower()}
  writer = writers.MetricWriter(workdir, resume_step=start_step)
  validation = evaluator.Validation(config, workdir, eval_step, mesh, num_classes, meta, writer,
                                    start_step, task)
  end_step = min(num_steps, t.stop_after_steps) if t.stop_after_steps else num_steps
  if start_step < end_step:
    if is_main:
      stages["train"].record()
    state = train_loop(config, state, train_step, schedule, manager, validation, writer, mesh,
                       start_step, end_step)
  manager.wait_until_finished()
  manager.close()
  if end_step < num_steps:
    writer.close()
    logging.info("Stopped after step %d of %d (train.stop_after_steps); rerun to resume.",
                 end_step, num_steps)
    return {"stopped_at": end_step}

  results = evaluate_and_export(config, workdir, method, state["params"], param_sh, eval_step,
                                mesh, validation.final(), meta, writer, validation)
  if is_main:
    stages["export"].record()
  writer.close()
  # The other processes wait for process 0's writes: a next stage (the demo's pre-trained
  # encoder as init_checkpoint) reads export/ right away.
  sharding.sync_processes(f"run done {workdir}")
  m = results["test"]
  logging.info("%s test (%s model): %s", method.name, results["reported"], task.summary(m))
  return results
