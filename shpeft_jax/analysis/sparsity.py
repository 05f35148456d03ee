"""Sparsity of fine-tuning (paper Sec. 2.1, Fig. 2 left): how few changed weights carry the gain?

Given pretrained weights W_ori and fully fine-tuned weights W_ft, the change of a weight is
|W_ft - W_ori|. For each k in a grid we take the top k% of encoder weights by change (global, exact,
with `shpeft_jax.peft.selection.select_top_k`, the same selection SH-PEFT trains with), build

  W_ori<-ft@k% = W_ori everywhere, except at those positions where it takes W_ft,

keep the fine-tuned linear head (the pretrained model has no head for the task), and evaluate that
model on the test split. k = 100% is the fine-tuned model itself, k = 0% the pretrained encoder under
the fine-tuned head. The paper reports that ~10% of the changes keep ~95% of the full F1.

Only the encoder is ranked: the head is new for every task (it has no pretrained value), so it is
always taken from the fine-tuned checkpoint, exactly as SH-PEFT always trains it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from shpeft_jax import checkpoints
from shpeft_jax import utils
from shpeft_jax.errors import CheckpointError, ConfigError
from shpeft_jax.peft import selection
from shpeft_jax.utils import flatten_names

PyTree = Any

DEFAULT_K_GRID = (0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
ENCODER = "encoder"
HEAD = "head"


# ----------------------------------------------------------------------------------------------
# Loading and checking checkpoints.


@dataclasses.dataclass
class Checkpoint:
  """A params checkpoint read from disk: numpy params, its meta.json and where it came from."""
  params: dict
  meta: dict
  path: str

  @property
  def encoder(self) -> dict:
    return self.params[ENCODER]


def load_checkpoint(path: str, what: str = "checkpoint", base: Checkpoint | None = None) -> Checkpoint:
  """Reads a params checkpoint (`shpeft_jax.checkpoints`), or a task adapter applied to `base`
  (`shpeft_jax.adapter`; the pretrained checkpoint is its base), with errors naming which failed."""
  if not path:
    raise CheckpointError(f"No path given for the {what}.")
  if not os.path.isdir(path):
    raise CheckpointError(
        f"The {what} directory {path!r} does not exist. Pass a params checkpoint directory (it "
        "holds meta.json and params/), e.g. the trainer's exported best/final model or the output "
        "of `python -m shpeft_jax.convert`.")
  from shpeft_jax import adapter  # pylint: disable=g-import-not-at-top
  if adapter.is_adapter(path):
    if base is None:
      raise CheckpointError(f"The {what} at {path} is a task adapter; give its base as --pretrained.")
    params, meta = adapter.load_with_base(path, base.path, base_params=base.params)
  else:
    params, meta = checkpoints.load_params(path)
  if not isinstance(params, Mapping) or ENCODER not in params:
    raise CheckpointError(
        f"The {what} at {path} has no '{ENCODER}' subtree (top level: "
        f"{sorted(params) if isinstance(params, Mapping) else type(params).__name__}); expected "
        "the ClipClassifier layout {'encoder': ..., 'head': ...}.")
  return Checkpoint(params=params, meta=meta, path=path)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {k: tuple(np.shape(v)) for k, v in flatten_names(tree).items()}


def check_same_encoder(reference: Checkpoint, other: Checkpoint) -> None:
  """Raises CheckpointError unless both checkpoints hold the same model's encoder (names, shapes).

  Positional comparisons (a weight's change, two tasks' overlap) only mean something between
  checkpoints of the same architecture; a different preset, image size or an extra PEFT module
  would silently compare unrelated positions.
  """
  for key in ("model", "image_size"):
    a, b = reference.meta.get(key), other.meta.get(key)
    if a is not None and b is not None and a != b:
      raise CheckpointError(
          f"{other.path} is a {key}={b!r} checkpoint but {reference.path} has {key}={a!r}; "
          "compare checkpoints of the same model (fine-tuned from the same pretrained weights).")
  sa, sb = _shapes(reference.encoder), _shapes(other.encoder)
  if sa.keys() != sb.keys():
    only_a = sorted(sa.keys() - sb.keys())[:5]
    only_b = sorted(sb.keys() - sa.keys())[:5]
    raise CheckpointError(
        f"The encoders of {reference.path} and {other.path} have different parameters (only in "
        f"the first: {only_a}; only in the second: {only_b}). Both must be plain (fully "
        "fine-tuned or merged) encoders of the same model.")
  bad = [(k, sa[k], sb[k]) for k in sa if sa[k] != sb[k]]
  if bad:
    k, a, b = bad[0]
    raise CheckpointError(
        f"{len(bad)} encoder parameter(s) differ in shape between {reference.path} and "
        f"{other.path}, e.g. {k}: {a} vs {b}. Compare checkpoints of the same model and image size.")


def head_of(ckpt: Checkpoint) -> dict:
  if HEAD not in ckpt.params:
    raise CheckpointError(
        f"The fine-tuned checkpoint {ckpt.path} has no '{HEAD}' (the linear classifier); point "
        "--finetuned at a classifier checkpoint written by the trainer.")
  return ckpt.params[HEAD]


# ----------------------------------------------------------------------------------------------
# Weight changes, top-k masks and the W_ori<-ft@k% merge.


def weight_changes(pretrained: PyTree, finetuned: PyTree) -> PyTree:
  """|W_ft - W_ori| per leaf, in float32 (two encoder trees of identical structure)."""
  return jax.tree_util.tree_map(
      lambda a, b: np.abs(np.asarray(b, np.float32) - np.asarray(a, np.float32)),
      pretrained, finetuned)


def top_k_mask(scores: PyTree, k_percent: float) -> tuple[PyTree, dict]:
  """Boolean tree of the exactly-k highest scores over the whole tree (k% of all its weights).

  k_percent = 0 is allowed here (an all-False mask: the pretrained encoder), unlike in
  `select_top_k`, because the sparsity curve starts there.
  """
  if not (isinstance(k_percent, (int, float)) and math.isfinite(k_percent)
          and 0 <= k_percent <= 100):
    raise ConfigError(f"k must be a percentage in [0, 100], got {k_percent!r}.")
  n = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(scores)))
  if k_percent == 0:
    mask = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), bool), scores)
    return mask, {"k_percent_requested": 0.0, "k": 0, "n": n, "k_percent": 0.0,
                  "threshold": None}
  mask, info = selection.select_top_k(scores, k_percent=float(k_percent))
  d = info.to_dict()
  d["k_percent_requested"] = float(k_percent)
  return mask, d


def merge(pretrained_encoder: PyTree, finetuned_encoder: PyTree, mask: PyTree) -> PyTree:
  """W_ori<-ft: the fine-tuned value where `mask` is True, the pretrained value elsewhere."""
  return jax.tree_util.tree_map(
      lambda a, b, m: np.where(m, np.asarray(b), np.asarray(a)),
      pretrained_encoder, finetuned_encoder, mask)


def merged_params(pretrained_encoder: PyTree, finetuned: Mapping, mask: PyTree) -> dict:
  """Full classifier params: merged encoder + the fine-tuned head."""
  out = dict(finetuned)
  out[ENCODER] = merge(pretrained_encoder, finetuned[ENCODER], mask)
  return out


# ----------------------------------------------------------------------------------------------
# Evaluation.


def model_for(ckpt: Checkpoint):
  """The ClipClassifier that the fine-tuned checkpoint's params belong to (its own tower)."""
  from shpeft_jax.models import of_checkpoint  # pylint: disable=g-import-not-at-top
  head_of(ckpt)  # the analysis' own message for a checkpoint without a classifier
  return of_checkpoint.model_of_checkpoint(ckpt.params, ckpt.meta, where=ckpt.path)


def make_logits_fn(model) -> Callable[[PyTree, np.ndarray], jax.Array]:
  """One jitted apply; params are an argument, so every k reuses the same compiled function."""
  @jax.jit
  def logits_fn(params, images):
    return model.apply({"params": params}, images, train=False)
  return logits_fn


def predict(logits_fn, params: PyTree, batches: Iterable[Mapping[str, np.ndarray]]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(logits, labels, valid) over all batches, concatenated on the host."""
  params = jax.device_put(params)
  logits, labels, valid = [], [], []
  for batch in batches:
    logits.append(np.asarray(logits_fn(params, jnp.asarray(batch["image"]))))
    labels.append(np.asarray(batch["label"]))
    v = batch.get("valid")
    valid.append(np.ones(len(labels[-1]), bool) if v is None else np.asarray(v, bool))
  if not logits:
    raise ConfigError("The evaluation data is empty: no test batch was produced.")
  return np.concatenate(logits), np.concatenate(labels), np.concatenate(valid)


def evaluate(logits_fn, params, batches, num_classes: int) -> dict[str, float]:
  from shpeft_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  logits, labels, valid = predict(logits_fn, params, batches)
  out = metrics.classification_metrics(logits, labels, num_classes, valid=valid)
  # Short names in our JSON: f1 (macro), accuracy, auc (macro one-vs-rest).
  return {"f1": float(out["f1_macro"]), "accuracy": float(out["accuracy"]),
          "auc": float(out["auc_macro"])}


# ----------------------------------------------------------------------------------------------
# The study.


def sparsity_curve(pretrained: Checkpoint, finetuned: Checkpoint,
                   batches_fn: Callable[[], Iterable[Mapping[str, np.ndarray]]], *,
                   k_grid: Sequence[float] = DEFAULT_K_GRID,
                   log: Callable[[str], None] = logging.info) -> dict:
  """Evaluates W_ori<-ft@k% for every k in the grid (plus the k = 0 and full fine-tune references).

  Args:
    pretrained, finetuned: checkpoints of the same model (checked).
    batches_fn: returns a fresh iterable of test batches ({'image', 'label', 'valid'}) each call.
    k_grid: percentages in (0, 100].

  Returns:
    A JSON-ready dict: 'reference' {'finetuned', 'pretrained_encoder_finetuned_head'} metrics
    ({'f1', 'accuracy', 'auc'}), 'points' (one per k, in increasing k: the selection info, the
    metrics, each metric as % of the fine-tuned one, per-layer counts), 'num_encoder_weights'.
  """
  check_same_encoder(pretrained, finetuned)
  k_grid = sorted({float(k) for k in k_grid})
  for k in k_grid:
    if not 0 < k <= 100:
      raise ConfigError(f"Every k must be a percentage in (0, 100], got {k}.")
  model = model_for(finetuned)
  num_classes = model.num_classes
  logits_fn = make_logits_fn(model)
  changes = weight_changes(pretrained.encoder, finetuned.encoder)
  n = int(sum(x.size for x in jax.tree_util.tree_leaves(changes)))
  num_changed = int(sum(np.count_nonzero(x) for x in jax.tree_util.tree_leaves(changes)))

  t0 = time.time()
  log(f"[sparsity] evaluating the fine-tuned model ({n} encoder weights, "
      f"{num_changed} changed) ...")
  full = evaluate(logits_fn, finetuned.params, batches_fn(), num_classes)
  log(f"[sparsity] fine-tuned: {_fmt(full)}")
  zero_mask, _ = top_k_mask(changes, 0.0)
  floor = evaluate(logits_fn, merged_params(pretrained.encoder, finetuned.params, zero_mask),
                   batches_fn(), num_classes)
  log(f"[sparsity] pretrained encoder + fine-tuned head (k=0%): {_fmt(floor)}")

  points = []
  for i, k in enumerate(k_grid):
    mask, info = top_k_mask(changes, k)
    params = merged_params(pretrained.encoder, finetuned.params, mask)
    m = evaluate(logits_fn, params, batches_fn(), num_classes)
    rel = {f"{name}_percent_of_full": (100.0 * v / full[name] if full[name] else float("nan"))
           for name, v in m.items()}
    stats = selection.mask_statistics(mask)
    points.append({"k_percent": k, "selection": info, "metrics": m, **rel,
                   "per_layer": {g: e["selected"] for g, e in stats["per_layer"].items()}})
    log(f"[sparsity] k={k:g}% ({info['k']} weights) [{i + 1}/{len(k_grid)}, "
        f"{time.time() - t0:.1f}s]: {_fmt(m)}, F1 = {rel.get('f1_percent_of_full', float('nan')):.1f}% "
        "of full fine-tune")
  return {
      "study": "sparsity",
      "pretrained": os.path.abspath(pretrained.path),
      "finetuned": os.path.abspath(finetuned.path),
      "model": finetuned.meta.get("model"),
      "num_classes": num_classes,
      "num_encoder_weights": n,
      "num_changed_weights": num_changed,
      "reference": {"finetuned": full, "pretrained_encoder_finetuned_head": floor},
      "points": points,
  }


def _fmt(m: Mapping[str, float]) -> str:
  return ", ".join(f"{k}={v:.4f}" for k, v in m.items())


def write_json(obj: Any, path: str) -> str:
  with utils.atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(_finite(obj), f, indent=2, sort_keys=False, default=_json_default)
  return path


def _finite(obj):
  """NaN/inf -> None, so the file is strict JSON (an undefined AUC is null, not NaN)."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, Mapping):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  return obj


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")
