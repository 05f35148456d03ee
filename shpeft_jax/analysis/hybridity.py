"""Hybridity of fine-tuning (paper Sec. 2.1, Fig. 2 right): do tasks change the same weights?

For each task's fully fine-tuned checkpoint (all fine-tuned from the same pretrained weights) the
top-k% weights by |W_ft - W_ori| are its "key weights". For k in {5, 1, 0.1, 0.05}% we measure the
positional overlap between tasks,

  overlap(A, B) = |A ∩ B| / |A|     (|A| = |B| = k-count for exact top-k masks, so it is symmetric),

and put beside it what chance gives: two independent uniformly random masks of sizes |A| and |B|
out of N weights share |A| |B| / N positions on average, i.e. overlap = |B| / N = k (as a fraction).
An overlap far above k means the tasks share key weights (task-agnostic), far below 1 that most key
weights are task-specific: the paper's "hybridity".

The same analysis runs on SH-PEFT masks written by the trainer (which positions do tasks select),
plus two mask-level views: how much of each mask is explained by the task-agnostic term alone (its
overlap with the top-|mask| weights by |w| of the pretrained model; w^2 ranks identically, so this
covers both the L1 and L2 estimators), and the per-layer / per-type distribution of the selected
weights (`selection.mask_statistics`).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from shpeft_jax.analysis import sparsity
from shpeft_jax.errors import CheckpointError, ConfigError
from shpeft_jax.peft import selection
from shpeft_jax.utils import flatten_names, path_name

PyTree = Any

DEFAULT_K_PERCENTS = (5.0, 1.0, 0.1, 0.05)

_is_none = lambda x: x is None


# ----------------------------------------------------------------------------------------------
# Masks as flat vectors over a fixed set of named parameters.


def mask_names(mask_tree: PyTree) -> list[str]:
  """Names of the masked (non-None) leaves, in tree-flatten order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(mask_tree, is_leaf=_is_none)
  return [path_name(p) for p, x in flat if x is not None]


def mask_vector(mask_tree: PyTree, names: Sequence[str] | None = None) -> np.ndarray:
  """The masked leaves raveled and concatenated (in `names` order, default tree order) as bools."""
  flat = {k: v for k, v in flatten_names(mask_tree).items() if v is not None}
  names = list(flat) if names is None else list(names)
  missing = [n for n in names if n not in flat]
  if missing:
    raise CheckpointError(f"The mask has no entry for {missing[:5]} (and {max(0, len(missing) - 5)} "
                          "more); compare masks of the same model and selection scope.")
  if not names:
    return np.zeros((0,), bool)
  return np.concatenate([np.asarray(flat[n], bool).reshape(-1) for n in names])


def overlap_matrix(masks: Mapping[str, np.ndarray]) -> dict:
  """Pairwise positional overlap of equally long boolean vectors, and what chance would give.

  Returns a JSON-ready dict:
    tasks: names in order; n: vector length N; counts: |M_i|;
    intersection[i][j] = |M_i ∩ M_j|;
    overlap[i][j] = |M_i ∩ M_j| / |M_i| (fraction of task i's weights that task j also selects);
    chance[i][j] = |M_j| / N, the expected overlap of independent uniformly random masks;
    enrichment[i][j] = overlap / chance;
    shared_by_all: |∩_i M_i| / min_i |M_i| and its chance value prod_{i>0} (|M_i| / N).
  """
  names = list(masks)
  if not names:
    raise ConfigError("overlap_matrix needs at least one mask.")
  vecs = [np.asarray(masks[t], bool).reshape(-1) for t in names]
  n = vecs[0].size
  for t, v in zip(names, vecs):
    if v.size != n:
      raise CheckpointError(f"Mask {t!r} has {v.size} positions but {names[0]!r} has {n}; "
                            "compare masks of the same model.")
  counts = [int(np.count_nonzero(v)) for v in vecs]
  size = len(names)
  inter = np.zeros((size, size), np.int64)
  for i, j in itertools.combinations_with_replacement(range(size), 2):
    inter[i, j] = inter[j, i] = (counts[i] if i == j else
                                 int(np.count_nonzero(vecs[i] & vecs[j])))
  overlap = np.array([[inter[i, j] / counts[i] if counts[i] else float("nan")
                       for j in range(size)] for i in range(size)])
  chance = np.array([[counts[j] / n if n else float("nan") for j in range(size)]
                     for _ in range(size)])
  with np.errstate(divide="ignore", invalid="ignore"):
    enrichment = overlap / chance
  all_vec = np.logical_and.reduce(vecs)
  min_count = min(counts)
  shared_all = int(np.count_nonzero(all_vec))
  chance_all = float(np.prod([c / n for c in sorted(counts)[1:]])) if n else float("nan")
  return {
      "tasks": names,
      "n": int(n),
      "counts": counts,
      "intersection": inter.tolist(),
      "overlap": overlap.tolist(),
      "chance": chance.tolist(),
      "enrichment": enrichment.tolist(),
      "shared_by_all": {"count": shared_all,
                        "fraction": shared_all / min_count if min_count else float("nan"),
                        "chance": chance_all},
  }


# ----------------------------------------------------------------------------------------------
# Task-agnostic explanation of a mask.


def magnitude_scores(params: PyTree, like_mask: PyTree) -> PyTree:
  """|w| of `params` at the leaves that `like_mask` masks (None elsewhere)."""
  mask_flat = flatten_names(jax.tree_util.tree_map(
      lambda x: x is not None, like_mask, is_leaf=_is_none))
  params_flat = flatten_names(params)
  out = {}
  for name, masked in mask_flat.items():
    if not masked:
      out[name] = None
      continue
    if name not in params_flat:
      raise CheckpointError(f"The pretrained checkpoint has no parameter {name!r} that the mask "
                            "covers; use the pretrained checkpoint the mask was computed on.")
    out[name] = np.abs(np.asarray(params_flat[name], np.float32))
  return _unflatten_like(like_mask, out)


def _unflatten_like(tree: PyTree, flat: Mapping[str, Any]) -> PyTree:
  paths, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
  return jax.tree_util.tree_unflatten(treedef, [flat[path_name(p)] for p, _ in paths])


def task_agnostic_overlap(mask_tree: PyTree, pretrained_params: PyTree,
                          cache: dict | None = None) -> dict:
  """Fraction of the mask that the task-agnostic term alone would select.

  The reference mask is the top-|M| weights by |w| of the pretrained model over the same masked
  leaves (exact, `select_top_k`), so both masks have the same size and the overlap is
  |M ∩ TA| / |M|, against a chance level of |M| / N.
  """
  names = mask_names(mask_tree)
  vec = mask_vector(mask_tree, names)
  count = int(np.count_nonzero(vec))
  key = (tuple(names), count)
  if cache is not None and key in cache:
    ta_vec = cache[key]
  else:
    if count == 0:
      ta_vec = np.zeros_like(vec)
    else:
      ta_mask, _ = selection.select_top_k(magnitude_scores(pretrained_params, mask_tree),
                                          k_count=count)
      ta_vec = mask_vector(ta_mask, names)
    if cache is not None:
      cache[key] = ta_vec
  inter = int(np.count_nonzero(vec & ta_vec))
  return {"count": count, "n": int(vec.size), "intersection": inter,
          "overlap": inter / count if count else float("nan"),
          "chance": count / vec.size if vec.size else float("nan")}


def shared_task_agnostic(masks: Mapping[str, PyTree], cache: dict) -> dict:
  """Of the positions that EVERY mask selects, the fraction inside the top-|M| by |w|.

  Needs `cache` filled by `task_agnostic_overlap` for the first mask (same names and count). If the
  shared positions are mostly large-magnitude weights, the task-agnostic term explains what tasks
  have in common.
  """
  tasks = list(masks)
  names = mask_names(masks[tasks[0]])
  vecs = [mask_vector(masks[t], names) for t in tasks]
  shared = np.logical_and.reduce(vecs)
  ta_vec = cache[(tuple(names), int(np.count_nonzero(vecs[0])))]
  count = int(np.count_nonzero(shared))
  inter = int(np.count_nonzero(shared & ta_vec))
  return {"shared": count, "shared_in_top_abs_w": inter,
          "fraction": inter / count if count else float("nan"),
          "chance": float(np.count_nonzero(ta_vec)) / ta_vec.size if ta_vec.size else float("nan")}


def layer_distribution(mask_tree: PyTree) -> dict:
  """Per-layer and per-type counts of a mask (selected, size, fraction), from mask_statistics."""
  stats = selection.mask_statistics(mask_tree)
  return {"total": stats["total"], "per_layer": stats["per_layer"], "per_type": stats["per_type"]}


# ----------------------------------------------------------------------------------------------
# The two studies.


def changed_weight_masks(pretrained: sparsity.Checkpoint, finetuned: sparsity.Checkpoint,
                         k_percent: float) -> tuple[PyTree, dict]:
  """Top-k% encoder weights of one task by |W_ft - W_ori|, as a {'encoder': mask} tree."""
  changes = sparsity.weight_changes(pretrained.encoder, finetuned.encoder)
  mask, info = sparsity.top_k_mask(changes, k_percent)
  return {sparsity.ENCODER: mask}, info


def finetuned_study(pretrained: sparsity.Checkpoint,
                    finetuned: Mapping[str, sparsity.Checkpoint], *,
                    k_percents: Sequence[float] = DEFAULT_K_PERCENTS,
                    log: Callable[[str], None] = logging.info) -> dict:
  """Overlap of the tasks' top-k% changed weights, per k, with chance levels.

  Returns a JSON-ready dict with, per k: the overlap matrix, each task's task-agnostic overlap
  (its top-k changes vs the top-k |w| of the pretrained model) and per-layer distribution.
  """
  if len(finetuned) < 2:
    raise ConfigError(f"Hybridity compares tasks: give at least two fine-tuned checkpoints, got "
                      f"{len(finetuned)} ({sorted(finetuned)}).")
  for ckpt in finetuned.values():
    sparsity.check_same_encoder(pretrained, ckpt)
  t0 = time.time()
  changes = {t: sparsity.weight_changes(pretrained.encoder, c.encoder)
             for t, c in finetuned.items()}
  ta_cache: dict = {}
  per_k = []
  for k in k_percents:
    masks, infos = {}, {}
    for t in finetuned:
      m, info = sparsity.top_k_mask(changes[t], float(k))
      masks[t] = {sparsity.ENCODER: m}
      infos[t] = info
    names = mask_names(next(iter(masks.values())))
    vecs = {t: mask_vector(m, names) for t, m in masks.items()}
    mat = overlap_matrix(vecs)
    ta = {t: task_agnostic_overlap(m, pretrained.params, ta_cache) for t, m in masks.items()}
    layers = {t: layer_distribution(m) for t, m in masks.items()}
    per_k.append({"k_percent": float(k), "selection": infos, "overlap": mat,
                  "task_agnostic": ta, "shared_task_agnostic": shared_task_agnostic(masks, ta_cache),
                  "layers": layers})
    off = _off_diagonal_mean(mat)
    log(f"[hybridity] k={k:g}% ({mat['counts'][0]} weights per task): mean pairwise overlap "
        f"{off:.4f} vs chance {float(k) / 100:.4g} ({time.time() - t0:.1f}s)")
  return {
      "study": "hybridity_finetuned",
      "pretrained": pretrained.path,
      "finetuned": {t: c.path for t, c in finetuned.items()},
      "model": pretrained.meta.get("model"),
      "tasks": list(finetuned),
      "per_k": per_k,
  }


def encoder_only(mask_tree: PyTree) -> PyTree:
  """The mask with every leaf outside `encoder/` set to None (not part of the comparison).

  The trainer stores full masks in which the linear head is all True: SH-PEFT always trains the
  head, it never selects it, and counting its weights would add positions every task "shares".
  """
  prefix = sparsity.ENCODER + "/"
  return jax.tree_util.tree_map_with_path(
      lambda p, m: m if path_name(p).startswith(prefix) else None, mask_tree, is_leaf=_is_none)


def check_mask_fits(mask_tree: PyTree, params: PyTree, what: str = "mask") -> None:
  """Raises CheckpointError unless the mask's encoder leaves match the params' names and shapes.

  Only the encoder is checked: the head of a pretrained checkpoint belongs to another task (or is
  absent), while the masks' heads belong to theirs.
  """
  prefix = sparsity.ENCODER + "/"
  m = {k: np.shape(v) for k, v in flatten_names(mask_tree).items()
       if v is not None and k.startswith(prefix)}
  p = {k: np.shape(v) for k, v in flatten_names(params).items() if k.startswith(prefix)}
  missing, extra = sorted(p.keys() - m.keys()), sorted(m.keys() - p.keys())
  bad = [f"{k}: {m[k]} vs {p[k]}" for k in m.keys() & p.keys() if m[k] != p[k]]
  if missing or extra or bad:
    raise CheckpointError(
        f"The {what} does not fit the pretrained encoder (not in the mask: {missing[:3]}; not in "
        f"the model: {extra[:3]}; shape mismatches: {bad[:3]}). Use the pretrained checkpoint "
        "the masks were selected on.")


def mask_study(masks: Mapping[str, PyTree], pretrained: sparsity.Checkpoint | None = None, *,
               include_head: bool = False, log: Callable[[str], None] = logging.info) -> dict:
  """Overlap of SH-PEFT masks across tasks, their task-agnostic share and layer distribution.

  By default only the encoder part of each mask is compared (see `encoder_only`).
  """
  if not masks:
    raise ConfigError("mask_study needs at least one mask.")
  if not include_head:
    masks = {t: encoder_only(m) for t, m in masks.items()}
  tasks = list(masks)
  names = mask_names(masks[tasks[0]])
  for t in tasks[1:]:
    other = mask_names(masks[t])
    if other != names:
      diff = sorted(set(names) ^ set(other))[:5]
      raise CheckpointError(f"Masks {tasks[0]!r} and {t!r} cover different parameters (e.g. "
                            f"{diff}); compare masks of the same model and selection scope.")
  vecs = {t: mask_vector(masks[t], names) for t in tasks}
  out: dict = {"study": "hybridity_masks", "tasks": tasks}
  if len(tasks) >= 2:
    out["overlap"] = overlap_matrix(vecs)
    log(f"[hybridity] masks: mean pairwise overlap {_off_diagonal_mean(out['overlap']):.4f} "
        f"(chance ~{np.mean(out['overlap']['counts']) / out['overlap']['n']:.4g})")
  if pretrained is not None:
    cache: dict = {}
    out["task_agnostic"] = {t: task_agnostic_overlap(masks[t], pretrained.params, cache)
                            for t in tasks}
    if len(tasks) >= 2:
      out["shared_task_agnostic"] = shared_task_agnostic(masks, cache)
    for t, d in out["task_agnostic"].items():
      log(f"[hybridity] mask {t}: {100 * d['overlap']:.1f}% of it is in the top-|M| by |w| "
          f"(chance {100 * d['chance']:.3g}%)")
  out["layers"] = {t: layer_distribution(masks[t]) for t in tasks}
  return out


def _off_diagonal_mean(mat: Mapping) -> float:
  o = np.asarray(mat["overlap"], float)
  if o.shape[0] < 2:
    return float("nan")
  return float(o[~np.eye(o.shape[0], dtype=bool)].mean())
