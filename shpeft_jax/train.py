"""The SH-PEFT trainer: score -> select -> train -> evaluate -> export, resumable at every stage.

Reads top to bottom like big_vision's trainers: validation, mesh, input, model and optimizer,
shard and transfer, update step, checkpoints, evals, loop. Each stage leaves its result in the
workdir, so a rerun skips finished stages and a killed run resumes from its last checkpoint with
bit-identical parameters (the input stream restarts at the checkpointed step, see
`shpeft_jax.data.input_pipeline`):

  workdir/
    config.json            the config the run was started with
    scores/                hybrid importance scores (orbax tree; SH-PEFT only)
    mask/                  boolean trainable mask (orbax tree) + mask_stats.json
    checkpoints/<step>/    orbax CheckpointManager: params, opt state, mask, step, rng (keep-N)
    best/                  params checkpoint of the best validation macro F1 (+ best.json)
    metrics.jsonl          one JSON line per logged train step / evaluation
    tb/                    TensorBoard event files
    results.json           final test metrics (the evaluate stage's result)
    export/model/          params checkpoint of the reported model for `python -m shpeft_jax.export`

`train_and_evaluate` also runs the bundled demo (configs/demo.py): an optional `config.pretrain`
stage that trains a small encoder on a source task, and `config.methods` to run several PEFT
methods on the same transfer and print a comparison table.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from shpeft_jax import checkpoints as ckpt_lib
from shpeft_jax import utils
from shpeft_jax.errors import CheckpointError, ConfigError
from shpeft_jax.models import clip_vit
from shpeft_jax.peft import mask_io
from shpeft_jax.peft import masking
from shpeft_jax.peft import merge as merge_lib
from shpeft_jax.peft import methods as methods_lib

PyTree = Any

BATCH_AXES = ("data", "fsdp")


# ---------------------------------------------------------------------------------------------
# PEFT methods (shpeft_jax/peft/methods.py decides what each method trains).


def known_methods() -> tuple[str, ...]:
  return tuple(methods_lib.method_names())


def _is_head(name: str) -> bool:
  return name == "head" or name.startswith("head/")


def _full_mask(mask, params) -> PyTree:
  """None leaves mean "fully trainable" (masking.py's convention); materialise them as arrays."""
  return jax.tree.map(
      lambda m, p: np.ones(p.shape, bool) if m is None else
      np.broadcast_to(np.asarray(m, bool), p.shape).copy(),
      mask, params, is_leaf=lambda x: x is None)


def trainable_mask(peft_cfg, params, *, scores=None, rng=None) -> PyTree:
  """A full boolean tree (same shapes as params): True where the weight is trained."""
  return _full_mask(methods_lib.trainable_mask(peft_cfg, params, scores=scores, rng=rng), params)


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be checked before long work starts.


def _split_names(config) -> tuple[str, str | None, str]:
  d = config.data
  val = d.get("val_split", "validation") or None
  return d.get("train_split", "train"), val, d.get("test_split", "test")


def validate_config(config: ml_collections.ConfigDict) -> dict:
  """Raises ConfigError / DataError / CheckpointError for bad input; returns derived facts."""
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  vit = clip_vit.get_model_config(config.model.name, config.model.image_size)
  clip_vit.compute_dtype(config.model.dtype)
  peft = config.peft
  if peft.method not in known_methods():
    raise ConfigError(f"Unknown peft.method {peft.method!r}; choose one of {known_methods()}.")
  if int(peft.get("k_count", 0) or 0) < 0:
    raise ConfigError(f"peft.k_count must be >= 0 (0: use k_percent), got {peft.k_count}.")
  if not int(peft.get("k_count", 0) or 0):
    k = peft.k_percent
    if not isinstance(k, (int, float)) or not 0 < k <= 100:
      raise ConfigError(f"peft.k_percent must be in (0, 100] (percent of encoder weights), "
                        f"got {k!r}; e.g. --config.peft.k_percent=1.0 for the paper's 1%.")
  if peft.estimator not in ("l1", "l2"):
    raise ConfigError(f"peft.estimator must be 'l1' or 'l2', got {peft.estimator!r}.")
  if peft.mode not in ("hybrid", "td", "ta"):
    raise ConfigError(f"peft.mode must be 'hybrid', 'td' or 'ta', got {peft.mode!r}.")
  if not peft.lam >= 0:
    raise ConfigError(f"peft.lam must be >= 0, got {peft.lam}.")

  t = config.train
  n_dev, n_proc = jax.device_count(), jax.process_count()
  for name in ("batch_size", "eval_batch_size"):
    b = int(t.get(name, 0) or 0)
    if name == "eval_batch_size" and b == 0:
      continue
    if b <= 0 or b % n_dev:
      raise ConfigError(
          f"train.{name}={b} is not divisible by the {n_dev} devices of the mesh; use a multiple "
          f"of {n_dev} (e.g. --config.train.{name}={max(n_dev, (b // n_dev) * n_dev or n_dev)}).")
  if t.num_steps <= 0:
    raise ConfigError(f"train.num_steps must be positive, got {t.num_steps}.")
  if config.optim.name not in ("sgd", "adamw"):
    raise ConfigError(f"optim.name must be 'sgd' or 'adamw', got {config.optim.name!r}.")
  warmup = int(config.optim.get("warmup_steps", 0))
  if not 0 <= warmup < t.num_steps:
    raise ConfigError(f"optim.warmup_steps={warmup} must be in [0, num_steps={t.num_steps}).")
  if config.optim.schedule not in ("cosine", "constant"):
    raise ConfigError(f"optim.schedule must be 'cosine' or 'constant', got "
                      f"{config.optim.schedule!r}.")
  mesh_shape(config.mesh)

  # Data: opening the source raises DataError for a missing / misplaced dataset.
  info = input_pipeline.dataset_info(config.data)
  train_split, val_split, test_split = _split_names(config)
  for s in (train_split, val_split, test_split):
    if s is not None:
      input_pipeline.get_source(config.data).split_size(s)
  num_classes = info.num_classes

  init = config.model.get("init_checkpoint", "")
  if init:
    if not os.path.isdir(init):
      raise CheckpointError(
          f"model.init_checkpoint={init!r} does not exist. Create it with `python -m "
          f"shpeft_jax.convert SRC --out DIR` or leave it empty to train from scratch.")
    meta = ckpt_lib.load_meta(init)
    if meta.get("model") != config.model.name:
      raise CheckpointError(
          f"model.init_checkpoint={init!r} holds a {meta.get('model')!r} model but "
          f"config.model.name={config.model.name!r}; set --config.model.name="
          f"{meta.get('model')!r} or point at a {config.model.name} checkpoint.")
    if meta.get("image_size") not in (None, vit.image_size):
      raise CheckpointError(
          f"model.init_checkpoint was made for image_size={meta.get('image_size')} but "
          f"config.model.image_size={vit.image_size}; set --config.model.image_size="
          f"{meta.get('image_size')}.")
  del n_proc
  return {"vit": vit, "num_classes": num_classes, "class_names": info.class_names,
          "dataset": info.name, "split_sizes": dict(info.split_sizes)}


# ---------------------------------------------------------------------------------------------
# Mesh and shardings.


def mesh_shape(mesh_cfg) -> tuple[int, int]:
  n = jax.device_count()
  fsdp = int(mesh_cfg.get("fsdp", 1))
  data = int(mesh_cfg.get("data", -1))
  if fsdp <= 0 or n % fsdp:
    raise ConfigError(f"mesh.fsdp={fsdp} must divide the {n} devices.")
  if data <= 0:
    data = n // fsdp
  if data * fsdp != n:
    raise ConfigError(f"mesh.data * mesh.fsdp = {data} * {fsdp} != {n} devices; set "
                      f"mesh.data=-1 to use all of them.")
  return data, fsdp


def make_mesh(mesh_cfg) -> Mesh:
  data, fsdp = mesh_shape(mesh_cfg)
  devices = np.asarray(jax.devices()).reshape(data, fsdp)
  try:
    return Mesh(devices, BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  except (TypeError, AttributeError):
    return Mesh(devices, BATCH_AXES)


def param_spec(shape, fsdp: int) -> P:
  """FSDP: shard the largest dimension divisible by the fsdp axis; replicate otherwise."""
  if fsdp <= 1 or not shape:
    return P()
  for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[i] % fsdp == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, abstract_tree) -> PyTree:
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def _to_global(batch, sharding):
  batch = {k: batch[k] for k in ("image", "label", "valid")}
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


# ---------------------------------------------------------------------------------------------
# Model, loss, optimizer.


def build_model(config, num_classes: int) -> clip_vit.ClipClassifier:
  return clip_vit.build_model(config.model.name, num_classes, image_size=config.model.image_size,
                              dtype=config.model.dtype, additive=methods_lib.additive_config_for(config.peft))


def make_loss_fn(model):
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["image"], train=True).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    w = batch["valid"].astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
  return loss_fn


def make_optimizer(optim_cfg, num_steps: int, mask: PyTree) -> optax.GradientTransformation:
  """The paper's SGD (momentum, cosine) via `masking.optimizer`, or AdamW; masked final updates.

  The mask lives in the optimizer state (`masking.masked_update`), so it is sharded, donated and
  checkpointed with it. Frozen elements get an update of exactly -0.0: they stay bit-identical.
  """
  clip = float(optim_cfg.get("grad_clip", 0.0) or 0.0)
  if optim_cfg.name == "sgd":
    if optim_cfg.schedule != "cosine":
      raise ConfigError("optim.name='sgd' uses the paper's cosine schedule; set "
                        "optim.schedule='cosine'.")
    return _mask_optimizer(optim_cfg, masking.optimizer(dict(
        lr=float(optim_cfg.lr), total_steps=int(num_steps),
        warmup_steps=int(optim_cfg.get("warmup_steps", 0)),
        momentum=optim_cfg.get("momentum", 0.9),
        weight_decay=float(optim_cfg.get("weight_decay", 0.0)),
        grad_clip_norm=clip or None)).tx, mask)
  parts = [optax.clip_by_global_norm(clip)] if clip else []
  parts.append(optax.adamw(make_optimizer_schedule(optim_cfg, num_steps),
                           weight_decay=float(optim_cfg.get("weight_decay", 0.0))))
  return _mask_optimizer(optim_cfg, optax.chain(*parts), mask)


def _mask_optimizer(optim_cfg, tx, mask) -> optax.GradientTransformation:
  """`optim.sparse_state=True`: state for the selected weights only (peft/sparse_optim.py)."""
  if optim_cfg.get("sparse_state", False):
    from shpeft_jax.peft import sparse_optim  # pylint: disable=g-import-not-at-top
    return sparse_optim.sparse_masked_optimizer(tx, mask)
  return masking.masked_update(tx, mask)


# ---------------------------------------------------------------------------------------------
# Metrics writers: metrics.jsonl, TensorBoard event files, progress.


class MetricWriter:
  """Appends {'step', 'kind', ...} lines to metrics.jsonl and scalars to TensorBoard event files.

  TensorBoard files are written with the Event protos that ship with TensorFlow (the `tensorboard`
  package, which `tf.summary` needs, is not a dependency).
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    # Drop lines a killed run wrote after its last checkpoint (and a previous final test line):
    # the resumed run rewrites them.
    if os.path.exists(self.path):
      with open(self.path) as f:
        keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step
                and json.loads(l).get("kind") != "test"]
      with open(self.path, "w") as f:
        f.writelines(keep)
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
      tb_dir = os.path.join(workdir, "tb")
      os.makedirs(tb_dir, exist_ok=True)
      fname = os.path.join(tb_dir, f"events.out.tfevents.{time.time():.0f}.{os.getpid()}")
      self._tb = tf.io.TFRecordWriter(fname)
      self._event_pb2 = event_pb2
      self._tb.write(event_pb2.Event(wall_time=time.time(),
                                     file_version="brain.Event:2").SerializeToString())
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("TensorBoard event files disabled: %s", e)

  def write(self, step: int, kind: str, values: dict):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "kind": kind, **values}) + "\n")
    if self._tb is not None:
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      summary = summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag=f"{kind}/{k}", simple_value=v) for k, v in values.items()])
      self._tb.write(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary).SerializeToString())
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _json_dump(path: str, obj):
  with utils.atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def _json_load(path: str):
  with open(path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(eval_fn, params, config, split: str, mesh: Mesh, num_classes: int) -> dict:
  """Macro F1, accuracy and macro AUC of `params` on `split` (every example exactly once)."""
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  bs = int(config.train.get("eval_batch_size", 0) or config.train.batch_size)
  it = input_pipeline.make_eval_iterator(
      config.data, split=split, global_batch_size=bs, image_size=config.model.image_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  sharding = batch_sharding(mesh)
  logits, labels, valid = [], [], []
  for batch in it:
    out = eval_fn(params, _to_global(batch, sharding))
    l, y, v = jax.device_get(out)
    logits.append(l)
    labels.append(y)
    valid.append(v)
  logits, labels, valid = map(np.concatenate, (logits, labels, valid))
  return classification_metrics(logits, labels, num_classes, valid)


def classification_metrics(logits, labels, num_classes, valid=None) -> dict:
  """{f1_macro, accuracy, auc_macro} as floats (shpeft_jax.evaluation.metrics)."""
  from shpeft_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  out = metrics.classification_metrics(logits, labels, num_classes, valid=valid)
  return {k: float(v) for k, v in out.items() if np.ndim(v) == 0}


# ---------------------------------------------------------------------------------------------
# The single-run pipeline.


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _save_tree(path: str, tree):
  """Atomic (orbax writes to a temporary directory and renames) save of a host tree."""
  with ckpt_lib.process_local_checkpointer() as ckptr:  # written by process 0 only
    ckptr.save(os.path.abspath(path), _host(tree))
    ckptr.wait_until_finished()


def _restore_tree(path: str, abstract=None):
  with ckpt_lib.process_local_checkpointer() as ckptr:  # no cross-process barrier
    if abstract is None:
      return ckptr.restore(os.path.abspath(path))
    return ckptr.restore(os.path.abspath(path), abstract)


def load_init_params(params: PyTree, init_dir: str, *, load_head: bool = False) -> PyTree:
  """Overlays a params checkpoint onto freshly initialised (host) params.

  The head is re-initialised unless `load_head` (a new task has new classes); parameters the
  checkpoint lacks (additive PEFT modules, the head) keep their initial values.
  """
  loaded, meta = ckpt_lib.load_params(init_dir)
  flat_loaded = utils.flatten_names(loaded)
  flat = utils.flatten_names(params)
  if not any(n.startswith("encoder/") for n in flat_loaded):
    raise CheckpointError(f"{init_dir} has no encoder/ parameters; it is not a classifier "
                          "checkpoint made by `shpeft_jax.convert` or the trainer.")
  out, used = {}, 0
  for name, value in flat.items():
    if name in flat_loaded and (load_head or not _is_head(name)):
      src = flat_loaded[name]
      if tuple(src.shape) != tuple(value.shape):
        raise CheckpointError(
            f"{init_dir}: parameter {name} has shape {tuple(src.shape)} but the "
            f"{meta.get('model')!r}-sized model of the config expects {tuple(value.shape)}. "
            "Is the checkpoint of another model size or image size?")
      out[name] = np.asarray(src, np.float32)
      used += 1
    else:
      out[name] = value
  unused = [n for n in flat_loaded if n not in flat and not _is_head(n)]
  if unused:
    raise CheckpointError(f"{init_dir}: {len(unused)} checkpoint parameters do not exist in the "
                          f"model, e.g. {unused[:3]}; is it a checkpoint of another model?")
  logging.info("Loaded %d parameter tensors from %s.", used, init_dir)
  return utils.unflatten_names(out)


class _Progress:
  """A tqdm bar when stderr is a terminal, else periodic log lines; images/s and ETA in both."""

  def __init__(self, total: int, start: int, batch_size: int, desc: str, enabled: bool):
    self.total, self.batch_size, self.start = total, batch_size, start
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


def run_single(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """score -> select -> train -> evaluate -> export for one config; returns results.json."""
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  results_path = os.path.join(workdir, "results.json")
  export_dir = os.path.join(workdir, "export", "model")
  if os.path.exists(results_path) and os.path.isdir(export_dir):
    logging.info("%s: results.json and the export exist; nothing to do.", workdir)
    return _json_load(results_path)

  # ----- Validation (before any long work).
  facts = validate_config(config)
  num_classes = facts["num_classes"]
  train_split, val_split, test_split = _split_names(config)
  if jax.process_index() == 0:
    _json_dump(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  t = config.train

  # ----- Mesh.
  mesh = make_mesh(config.mesh)
  bsharding = batch_sharding(mesh)
  repl = NamedSharding(mesh, P())
  logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # ----- Model and params, created already sharded.
  model = build_model(config, num_classes)
  init_fn = functools.partial(clip_vit.init_params, model)
  rng = jax.random.PRNGKey(config.seed)
  rng_init, rng_mask, rng_state = jax.random.split(rng, 3)
  abstract_params = jax.eval_shape(init_fn, rng_init)
  param_sh = tree_shardings(mesh, abstract_params)
  params = jax.jit(init_fn, out_shardings=param_sh)(rng_init)
  init_dir = config.model.get("init_checkpoint", "")
  if init_dir:
    host = load_init_params(_host(params), init_dir,
                            load_head=bool(config.model.get("load_head", False)))
    params = jax.device_put(host, param_sh)
  n_params = utils.count_params(abstract_params)
  logging.info("Model %s: %d parameters, %d classes.", config.model.name, n_params, num_classes)

  loss_fn = make_loss_fn(model)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  mask_path = os.path.join(workdir, "mask.npz")

  # ----- Score and select (skipped when the mask file exists).
  mask_sh = param_sh
  host_params = _host(params)
  if os.path.exists(mask_path):
    host_mask = _full_mask(mask_io.load_mask(mask_path, host_params), host_params)
    logging.info("Reusing the trainable mask in %s.", mask_path)
  else:
    scores = None
    if methods_lib.needs_scoring(config.peft):
      scores = _score_stage(config, workdir, loss_fn, params, mesh)
    host_mask = trainable_mask(config.peft, host_params, scores=scores, rng=rng_mask)
    if jax.process_index() == 0:
      mask_io.save_mask(mask_path, host_mask)
      mask_io.save_mask_stats(os.path.join(workdir, "mask_stats.json"), host_mask,
                              extra={"method": config.peft.method})
    del scores
  del host_params
  mask = jax.device_put(host_mask, mask_sh)
  n_trainable = int(sum(int(np.count_nonzero(m)) for m in jax.tree_util.tree_leaves(host_mask)))
  logging.info("Trainable: %d of %d (%.4f%%).", n_trainable, n_params,
               100.0 * n_trainable / n_params)

  # ----- Optimizer and train state (the mask lives in the optimizer state).
  tx = make_optimizer(config.optim, t.num_steps, host_mask)
  init_opt = lambda p, m: make_optimizer(config.optim, t.num_steps, m).init(p)
  if config.optim.get("sparse_state", False):  # Its indices come from the concrete host mask.
    init_opt = lambda p, m: tx.init(p)
  abstract_opt = jax.eval_shape(init_opt, abstract_params, host_mask)
  opt_sh = tree_shardings(mesh, abstract_opt)
  opt = jax.jit(init_opt, in_shardings=(param_sh, mask_sh), out_shardings=opt_sh)(params, mask)
  del mask
  state = {"params": params, "opt": opt, "step": jnp.zeros((), jnp.int32), "rng": rng_state}
  state_sh = {"params": param_sh, "opt": opt_sh, "step": repl, "rng": repl}
  state = jax.device_put(state, state_sh)

  # ----- Update step.
  def train_step(state, batch):
    params = state["params"]
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt = tx.update(grads, state["opt"], params)
    # Frozen elements get an update of exactly zero; selecting p (not computing p + 0) keeps them
    # bit-identical even where XLA flushes subnormal arithmetic to zero.
    new_params = jax.tree.map(lambda p, u: jnp.where(u == 0, p, (p + u).astype(p.dtype)),
                              params, updates)
    measurements = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                    "update_norm": optax.tree.norm(updates),
                    "param_norm": optax.tree.norm(new_params)}
    new_state = {"params": new_params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}
    return new_state, measurements

  train_step = jax.jit(train_step, donate_argnums=(0,), in_shardings=(state_sh, bsharding),
                       out_shardings=(state_sh, repl))

  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["image"]).astype(jnp.float32)
    return logits, batch["label"], batch["valid"]

  eval_fn = jax.jit(eval_step, in_shardings=(param_sh, bsharding),
                    out_shardings=(repl, repl, repl))

  # ----- Checkpoints: restore the latest, if any (onto this mesh, whatever it was saved on).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(t.get("keep_checkpoints", 2)), create=True,
      enable_async_checkpointing=bool(t.get("async_checkpoints", True)))
  manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options)
  start_step = 0
  if manager.latest_step() is not None:
    start_step = int(manager.latest_step())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"state": state})
    state = manager.restore(start_step, args=ocp.args.StandardRestore(abstract))["state"]
    logging.info("Resumed from the checkpoint at step %d.", start_step)

  best_dir = os.path.join(workdir, "best")
  best_json = os.path.join(workdir, "best.json")
  best = _json_load(best_json) if os.path.exists(best_json) else None
  if best is not None and best["step"] > start_step:
    best = None  # Written after the checkpoint we resume from: it will be recomputed.
  writer = MetricWriter(workdir, resume_step=start_step)
  meta = {"model": config.model.name, "image_size": int(config.model.image_size),
          "num_classes": num_classes, "method": config.peft.method,
          "class_names": list(facts["class_names"]), "dataset": facts["dataset"],
          "trainable": n_trainable, "total": n_params}

  def maybe_eval(step):
    nonlocal best
    if val_split is None:
      return
    m = evaluate(eval_fn, state["params"], config, val_split, mesh, num_classes)
    writer.write(step, "val", m)
    logging.info("step %d val: %s", step, _fmt(m))
    if best is None or m["f1_macro"] > best["f1_macro"]:
      best = {"step": int(step), **m}
      if jax.process_index() == 0:
        ckpt_lib.save_params(best_dir, state["params"], {**meta, "step": int(step)},
                             overwrite=True)
        _json_dump(best_json, best)

  # ----- Train loop.
  num_steps = int(t.num_steps)
  stop_after = int(t.get("stop_after_steps", 0) or 0)
  end_step = min(num_steps, stop_after) if stop_after else num_steps
  if start_step < end_step:
    it = input_pipeline.make_train_iterator(
        config.data, split=train_split, global_batch_size=t.batch_size,
        image_size=config.model.image_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())
    progress = _Progress(num_steps, start_step, t.batch_size, config.peft.method,
                         bool(t.get("progress_bar", True)))
    log_every, eval_every = int(t.log_every), int(t.eval_every)
    ckpt_every = int(t.checkpoint_every)
    step = start_step
    for step in range(start_step + 1, end_step + 1):
      batch = _to_global(next(it), bsharding)
      state, measurements = train_step(state, batch)
      if step % log_every == 0 or step == end_step or step == start_step + 1:
        m = jax.device_get(measurements)
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"The loss is {m['loss']} at step {step}; lower optim.lr or "
                                   "set optim.grad_clip.")
        ips, eta = progress.rate(step)
        lr = float(_lr_at(config.optim, num_steps, step - 1))
        writer.write(step, "train", {**m, "lr": lr, "images_per_s": ips})
        if progress.bar is None:
          logging.info("[%s] step %d/%d loss %.4f  %.0f img/s  ETA %.0fs",
                       config.peft.method, step, num_steps, m["loss"], ips, eta)
        progress.update(step, float(m["loss"]))
      elif progress.bar is not None and step % 10 == 0:
        progress.update(step)
      if eval_every > 0 and (step % eval_every == 0 or step == num_steps):
        maybe_eval(step)
      if step % ckpt_every == 0 or step == end_step:
        manager.save(step, args=ocp.args.StandardSave({"state": state}))
    progress.close()
    manager.wait_until_finished()
  manager.wait_until_finished()
  manager.close()
  if end_step < num_steps:
    writer.close()
    logging.info("Stopped after step %d of %d (train.stop_after_steps); rerun to resume.",
                 end_step, num_steps)
    return {"stopped_at": end_step}
  if best is None and val_split is not None and t.eval_every > 0 and os.path.isdir(best_dir):
    best = _json_load(best_json)

  # ----- Evaluate (test split) and export the reported model.
  final_params = state["params"]
  test_final = evaluate(eval_fn, final_params, config, test_split, mesh, num_classes)
  writer.write(num_steps, "test", test_final)
  results = {"method": config.peft.method, "dataset": facts["dataset"], "steps": num_steps,
             "trainable": n_trainable, "total": n_params,
             "trainable_percent": 100.0 * n_trainable / n_params,
             "test_final": test_final}
  report = test_final
  report_params = final_params
  use_best = bool(config.train.get("report_best", False)) and os.path.isdir(best_dir)
  if use_best:
    best_params, _ = ckpt_lib.load_params(best_dir)
    best_params = jax.device_put(best_params, param_sh)
    results["test_best"] = evaluate(eval_fn, best_params, config, test_split, mesh, num_classes)
    results["best_step"] = best["step"] if best else None
    report, report_params = results["test_best"], best_params
  if best is not None:
    results["val_best"] = best
  results["test"] = report
  results["reported"] = "best" if use_best else "final"
  if jax.process_index() == 0:
    # LoRA / SSF are folded into the plain weights so that export/model is a plain CLIP.
    export_params, merged = merge_lib.export_ready(_host(report_params), config.peft)
    ckpt_lib.save_params(export_dir, export_params,
                         {**meta, "step": results.get("best_step") or num_steps,
                          "test": report, "merged_additive": merged}, overwrite=True)
    _json_dump(results_path, results)
  writer.close()
  if jax.process_count() > 1:
    # The other processes wait for process 0's writes: a next stage (the demo's pre-trained
    # encoder as init_checkpoint) reads export/ right away.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"run_single done {workdir}")
  logging.info("%s test: %s", config.peft.method, _fmt(report))
  return results


def _lr_at(optim_cfg, num_steps, step):
  return make_optimizer_schedule(optim_cfg, num_steps)(step)


def make_optimizer_schedule(optim_cfg, num_steps):
  warmup = int(optim_cfg.get("warmup_steps", 0))
  if optim_cfg.schedule == "cosine":
    if warmup:
      return optax.warmup_cosine_decay_schedule(0.0, optim_cfg.lr, warmup, num_steps, 0.0)
    return optax.cosine_decay_schedule(optim_cfg.lr, num_steps)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, optim_cfg.lr, warmup),
                                 optax.constant_schedule(optim_cfg.lr)], [warmup])
  return optax.constant_schedule(optim_cfg.lr)


def _fmt(m: dict) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in sorted(m.items()) if isinstance(v, float))


def _score_stage(config, workdir, loss_fn, params, mesh) -> PyTree:
  """Hybrid importance scores over one epoch of the training split (cached in workdir/scores)."""
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import importance  # pylint: disable=g-import-not-at-top
  scores_dir = os.path.join(workdir, "scores")
  scored = methods_lib.scoring_eligible(config.peft, params)
  if os.path.isdir(scores_dir):
    logging.info("Reusing importance scores in %s.", scores_dir)
    flat = utils.flatten_names(_restore_tree(scores_dir))
    return utils.map_with_names(lambda n, s: flat.get(n) if s else None, scored)
  # Multi-process: every process reads the same whole global batches (no process slice), so the
  # `device_put` of each chunk onto the global sharding sees identical data everywhere.
  train_split = _split_names(config)[0]
  t = config.train
  num_batches = int(config.peft.score_batches)
  if num_batches < 0:  # One epoch (the paper's "selected within one training epoch").
    num_batches = max(1, input_pipeline.num_batches_per_epoch(
        config.data, split=train_split, global_batch_size=t.batch_size))
  it = input_pipeline.make_train_iterator(
      config.data, split=train_split, global_batch_size=t.batch_size,
      image_size=config.model.image_size, seed=config.seed + 1, start_step=0)
  # Chunks of stacked batches [chunk, B, ...] are sharded along the batch axis.
  chunk_sh = NamedSharding(mesh, P(None, BATCH_AXES))
  warmup_steps = int(config.peft.get("head_warmup_steps", 0))
  if warmup_steps > 0:
    # Optional linear probe of the head before scoring (off by default: the paper scores with the
    # fresh head). It only changes the head used for scoring; training starts from the fresh head.
    warm_it = input_pipeline.make_train_iterator(
        config.data, split=train_split, global_batch_size=t.batch_size,
        image_size=config.model.image_size, seed=config.seed + 2, start_step=0)
    params, losses = importance.warm_up_head(
        loss_fn, params, warm_it, steps=warmup_steps,
        lr=float(config.peft.get("head_warmup_lr", 0.1)))
    logging.info("Head warm-up before scoring: %d steps, loss %.4f -> %.4f.", warmup_steps,
                 losses[0], losses[-1])
  acc, info = importance.score_dataset(
      loss_fn, params, it, num_batches=num_batches, chunk_size=int(config.peft.score_chunk),
      scored=scored, shardings=chunk_sh, progress=False)
  scores = importance.hybrid_importance(params, acc, scored=scored,
                                        **methods_lib.importance_settings(config.peft))
  logging.info("Importance over %d batches (%d images) in %.1fs.", info["num_batches"],
               info["num_images"], info["seconds"])
  if jax.process_index() == 0:
    _save_tree(scores_dir, utils.unflatten_names(utils.flatten_names(scores)))
  return scores


# ---------------------------------------------------------------------------------------------
# Top level: optional pre-training (the demo) and several methods in one process.


def _pretrain_config(config) -> ml_collections.ConfigDict:
  """The run that trains the demo's encoder on the source task: full training from scratch."""
  pre = config.pretrain
  sub = copy.deepcopy(config)
  with sub.unlocked():
    sub.data = pre.data
    sub.peft.method = "full"
    sub.model.init_checkpoint = ""
    sub.optim = pre.optim
    sub.train.num_steps = pre.num_steps
    sub.train.report_best = False
    sub.train.eval_every = pre.get("eval_every", 0)
    for key in ("pretrain", "methods", "method_overrides"):
      if key in sub:
        del sub[key]
  return sub


def _pretrain(config, workdir: str) -> str:
  """Trains the demo's encoder on the source task (cached: reused when its export exists)."""
  out = os.path.join(workdir, "pretrain")
  res = run_single(_pretrain_config(config), out)
  logging.info("Pre-trained encoder on %s: test %s", config.pretrain.data.get("task", ""),
               _fmt(res["test"]))
  return os.path.join(out, "export", "model")


def _enable_compilation_cache(config, workdir: str):
  """XLA's persistent cache: runs of one process (pre-training, several methods) share compiled
  programs (same model => same init / eval / update HLO), which dominate a CPU demo's time."""
  cache = config.get("compilation_cache_dir", "")
  if not cache:
    return
  cache = os.path.join(workdir, cache) if not os.path.isabs(cache) else cache
  os.makedirs(cache, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def method_config(config, method: str) -> ml_collections.ConfigDict:
  """`config` with peft.method = method and `config.method_overrides[method]` merged in.

  Overrides are nested like the config ({'optim': {'lr': 3.0}}); an unknown field is an error.
  """
  c = copy.deepcopy(config)
  c.peft.method = method
  overrides = config.get("method_overrides") or {}
  if method in overrides:
    try:
      c.update(overrides[method])
    except (AttributeError, KeyError) as e:
      raise ConfigError(f"method_overrides.{method} names a field the config does not have: "
                        f"{e}.") from e
  for key in ("methods", "method_overrides"):
    if key in c:
      with c.unlocked():
        del c[key]
  return c


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The entry point of `python -m shpeft_jax.main`. Returns the results (per method)."""
  config = copy.deepcopy(config)
  _enable_compilation_cache(config, workdir)
  methods = tuple(config.get("methods", ()) or ())
  pretrain = bool(config.get("pretrain") and config.pretrain.get("enabled", True))
  # Validate every run's config before any long work starts.
  if pretrain:
    validate_config(_pretrain_config(config))
  for method in methods or (config.peft.method,):
    c = method_config(config, method)
    if pretrain:
      c.model.init_checkpoint = ""  # Does not exist yet.
    validate_config(c)
  if pretrain:
    init = _pretrain(config, workdir)
    with config.unlocked():
      config.model.init_checkpoint = init
  if not methods:
    return run_single(config, workdir)
  results = {}
  for method in methods:
    c = method_config(config, method)
    results[method] = run_single(c, os.path.join(workdir, method.replace("/", "_")))
  table = format_table(results)
  if jax.process_index() == 0:
    print(table, flush=True)
    with open(os.path.join(workdir, "results_table.txt"), "w") as f:
      f.write(table + "\n")
    _json_dump(os.path.join(workdir, "results.json"), results)
  return results


def format_table(results: dict) -> str:
  head = f"{'method':<10} {'trainable %':>12} {'F1':>8} {'accuracy':>9} {'AUC':>8}"
  lines = [head, "-" * len(head)]
  for method, r in results.items():
    m = r["test"]
    lines.append(f"{method:<10} {r['trainable_percent']:>12.3f} {100 * m['f1_macro']:>8.2f} "
                 f"{100 * m['accuracy']:>9.2f} {100 * m['auc_macro']:>8.2f}")
  return "\n".join(lines)
