"""SH-PEFT weight importance (paper Sec. 2.2, Eq. 1): task-dependent, task-agnostic and hybrid.

The task-dependent part needs per-mini-batch gradients of the *mean* loss, g_b, accumulated over B
batches (one epoch by default). Two sums are kept in float32, both in ONE jitted `jax.lax.scan` over a
chunk of batches so that there is no Python loop and no host round trip per batch:

  sum_grad = sum_b g_b          (L1 estimator: |sum_b g_b|; L2 'square_of_sum': (sum_b g_b)**2)
  sum_sq   = sum_b g_b ** 2     (L2 estimator 'sum_of_squares', the default: SPT's sensitivity)

The hybrid score of a weight w is

  I = I_td + lam * (sum(I_td) / sum(I_ta)) * I_ta,   I_ta = |w| (L1) or w**2 (L2),

with both sums taken globally over every scored parameter. Scaling I_td by a constant scales I by the
same constant, so using sums rather than means over batches does not change the ranking.

Parameters that are not scored (by default the freshly initialised linear `head`) carry `None` in the
accumulator and score trees: they take no part in the ranking, and `masking.masked_update` treats a
`None` mask leaf as fully trainable, which is what SH-PEFT does with the head.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shpeft_jax import param_names
from shpeft_jax.errors import ConfigError, DataError
from shpeft_jax.utils import map_with_names

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

ESTIMATORS = ("l1", "l2")
MODES = ("hybrid", "td", "ta")
L1_REDUCTIONS = ("abs_of_sum", "sum_of_abs")
# The L2 estimator's two readings (docs/SHPEFT.md): sum_b g_b**2 (SPT's; the default) or
# (sum_b g_b)**2, the square of the scoring epoch's accumulated gradient.
L2_REDUCTIONS = ("sum_of_squares", "square_of_sum")
HEAD_PREFIX = param_names.HEAD

_is_none = lambda x: x is None


# ----------------------------------------------------------------------------------------------
# Which parameters are scored.


def scored_mask_tree(params: PyTree, *, include_head: bool = False,
                     head_prefix: str = HEAD_PREFIX) -> PyTree:
  """A tree of Python bools: True for every parameter that takes part in the ranking.

  Every parameter is scored (the whole encoder: attention, MLP, LayerNorm scales and biases, patch
  embedding, class token, positional embedding) except the ones under `head_prefix/`, the new
  linear head, which SH-PEFT (like SPT and GPS) always trains and never ranks. `include_head=True`
  ranks the head too.
  """
  def scored(name: str, _) -> bool:
    in_head = name == head_prefix or name.startswith(head_prefix + "/")
    return include_head or not in_head
  return map_with_names(scored, params)


def cross_entropy_loss_fn(apply_fn: Callable[..., jax.Array]) -> LossFn:
  """loss_fn(params, batch) = mean softmax cross-entropy over the batch's valid examples.

  `apply_fn` is e.g. `model.apply` of a `ClipClassifier`; batches follow the project's layout
  `{'image', 'label', 'valid'}`. Padding examples (valid=False) contribute nothing, and a batch
  made only of padding has loss 0 and gradient 0 (the denominator is clamped at 1), so padded
  batches cannot poison the sums with NaN.
  """
  def loss_fn(params, batch):
    logits = apply_fn({"params": params}, batch["image"], train=False).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    valid = batch.get("valid")
    w = jnp.ones_like(ce) if valid is None else valid.astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
  return loss_fn


# ----------------------------------------------------------------------------------------------
# Gradient accumulation: one jitted lax.scan per chunk of batches.


def _flags(params: PyTree, scored: PyTree | None) -> tuple[Any, tuple[bool, ...]]:
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if scored is None:
    scored = scored_mask_tree(params)
  try:
    flags = treedef.flatten_up_to(scored)
  except (ValueError, TypeError) as e:
    raise ConfigError(
        f"`scored` must be a tree of bools with the structure of the params ({e}); build it with "
        "scored_mask_tree(params).") from e
  flags = tuple(bool(f) for f in flags)
  if not any(flags):
    raise ConfigError("No parameter is scored: `scored` is False everywhere. Score at least one "
                      "parameter (by default every encoder parameter is scored).")
  del leaves
  return treedef, flags


def _check_stats(stats: Sequence[str]) -> tuple[str, ...]:
  known = ("sum_grad", "sum_sq", "sum_abs")
  stats = tuple(stats)
  bad = [s for s in stats if s not in known]
  if bad or not stats:
    raise ConfigError(f"Unknown accumulator statistics {bad or stats}; choose from {known}.")
  return stats


@functools.lru_cache(maxsize=32)
def _build_scan(loss_fn: LossFn, treedef, flags: tuple[bool, ...], stats: tuple[str, ...]):
  """The jitted chunk function: (acc, param leaves, batches, weights) -> acc (acc donated)."""

  def merge(all_leaves, scored_leaves):
    it = iter(scored_leaves)
    return treedef.unflatten([next(it) if f else p for f, p in zip(flags, all_leaves)])

  def chunk_fn(acc, all_leaves, batches, weights):
    scored_leaves = [p for f, p in zip(flags, all_leaves) if f]
    grad_fn = jax.grad(lambda sl, batch: loss_fn(merge(all_leaves, sl), batch))

    def body(carry, xs):
      batch, w = xs
      take = w > 0  # A padding slot of the last chunk adds nothing (where, not *, so NaN-safe).
      g = [x.astype(jnp.float32) for x in grad_fn(scored_leaves, batch)]
      new = dict(carry)
      if "sum_grad" in carry:
        new["sum_grad"] = [jnp.where(take, s + x, s) for s, x in zip(carry["sum_grad"], g)]
      if "sum_sq" in carry:
        new["sum_sq"] = [jnp.where(take, s + x * x, s) for s, x in zip(carry["sum_sq"], g)]
      if "sum_abs" in carry:
        new["sum_abs"] = [jnp.where(take, s + jnp.abs(x), s) for s, x in zip(carry["sum_abs"], g)]
      new["num_batches"] = carry["num_batches"] + take.astype(jnp.int32)
      return new, None

    acc, _ = jax.lax.scan(body, acc, (batches, weights))
    return acc

  del stats  # Part of the cache key only: the carry's keys decide what is accumulated.
  return jax.jit(chunk_fn, donate_argnums=(0,))


def _init_internal(params_leaves, flags, stats):
  acc = {s: [jnp.zeros(p.shape, jnp.float32) for f, p in zip(flags, params_leaves) if f]
         for s in stats}
  acc["num_batches"] = jnp.zeros((), jnp.int32)
  return acc


def _to_public(acc, treedef, flags) -> dict:
  out = {}
  for key, value in acc.items():
    if key == "num_batches":
      out[key] = value
      continue
    it = iter(value)
    out[key] = treedef.unflatten([next(it) if f else None for f in flags])
  return out


def _to_internal(acc, treedef, flags, stats) -> dict:
  out = {"num_batches": jnp.asarray(acc["num_batches"], jnp.int32)}
  for s in stats:
    if s not in acc:
      raise ConfigError(f"The accumulator has no {s!r}; it was built with other `stats`.")
    leaves = treedef.flatten_up_to(acc[s]) if acc[s] is not None else []
    out[s] = [x for f, x in zip(flags, leaves) if f]
  return out


def _leading_size(batches: PyTree) -> int:
  sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree_util.tree_leaves(batches)}
  if not sizes:
    raise DataError("`batches` has no arrays; pass a pytree of arrays with a leading "
                    "num_batches axis.")
  if len(sizes) != 1 or -1 in sizes:
    raise DataError(f"Every leaf of `batches` needs the same leading num_batches axis; got sizes "
                    f"{sorted(sizes)}.")
  return sizes.pop()


def accumulate_gradients(loss_fn: LossFn, params: PyTree, batches: PyTree, *,
                         scored: PyTree | None = None, acc: dict | None = None,
                         weights: jax.Array | np.ndarray | None = None,
                         stats: Sequence[str] = ("sum_grad", "sum_sq")) -> dict:
  """Adds the gradients of a chunk of batches to an accumulator, in one jitted `lax.scan`.

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar`, the mean loss over the batch's valid examples.
    params: the parameter tree (scoring point: pretrained encoder + head used during scoring).
    batches: a pytree of arrays with a leading `num_batches` axis (a chunk of stacked batches).
      Arrays may be sharded over a mesh axis 'data' along their batch axis (axis 1): the jitted
      function is plain `jax.jit`, so XLA partitions the work and all-reduces the gradients.
    scored: tree of bools (see `scored_mask_tree`); default: everything except `head/`.
    acc: an accumulator returned by a previous call (it is DONATED: do not reuse it), or None.
    weights: optional [num_batches] 0/1 array; a 0 slot is skipped (padding of the last chunk).
    stats: which sums to keep: 'sum_grad' (sum_b g_b), 'sum_sq' (sum_b g_b**2) and optionally
      'sum_abs' (sum_b |g_b|, for the `l1_reduction='sum_of_abs'` variant).

  Returns:
    `{'sum_grad': tree, 'sum_sq': tree, ..., 'num_batches': int32}`, float32 trees with the
    params' structure and `None` at unscored leaves.
  """
  stats = _check_stats(stats)
  treedef, flags = _flags(params, scored)
  n = _leading_size(batches)
  if n == 0:
    raise DataError("The chunk holds zero batches: importance needs at least one batch.")
  if weights is None:
    weights = jnp.ones((n,), jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (n,):
    raise DataError(f"weights must have shape ({n},), got {weights.shape}.")
  leaves = treedef.flatten_up_to(params)
  internal = (_init_internal(leaves, flags, stats) if acc is None
              else _to_internal(acc, treedef, flags, stats))
  fn = _build_scan(loss_fn, treedef, flags, stats)
  return _to_public(fn(internal, leaves, batches, weights), treedef, flags)


def chunk_sharding(mesh: jax.sharding.Mesh, axis: str = "data") -> jax.sharding.NamedSharding:
  """Sharding of a stacked chunk [num_batches, batch, ...]: the batch axis split over `axis`."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, axis))


def _num_valid(batch: PyTree) -> int:
  if isinstance(batch, Mapping) and "valid" in batch:
    return int(np.sum(np.asarray(batch["valid"])))
  return int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])


def _stack(batches: list[PyTree]) -> PyTree:
  try:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)
  except ValueError as e:
    raise DataError(
        f"Batches of one scoring chunk differ in structure or shape ({e}). Every batch must have "
        "the same shape: pad the last batch and mark the padding with valid=False.") from e


def score_dataset(loss_fn: LossFn, params: PyTree, batch_iterator: Iterable[PyTree], *,
                  num_batches: int | None = None, chunk_size: int = 8,
                  scored: PyTree | None = None, stats: Sequence[str] = ("sum_grad", "sum_sq"),
                  shardings: jax.sharding.Sharding | None = None, progress: bool = True,
                  log_every_s: float = 30.0) -> tuple[dict, dict]:
  """Accumulates gradients over a dataset: the outer driver of `accumulate_gradients`.

  Host batches are stacked `chunk_size` at a time and handed to the jitted scan, so the device sees
  one call per chunk. The accumulator stays on device and is donated from chunk to chunk. The next
  chunk is stacked on the host while the device works on the current one. A short last chunk is
  padded with copies of its last batch at weight 0 so that every chunk has one shape (one compile).

  Args:
    batch_iterator: yields host batches (pytrees of numpy arrays, all the same shape).
    num_batches: how many batches to use; None = until the iterator ends (one epoch: the paper's
      "selected within one training epoch"). Must be given for a repeating iterator.
    chunk_size: batches per jitted call (memory: one chunk of images lives on device).
    shardings: placement of each stacked chunk, e.g. `chunk_sharding(mesh)`; None = default device.
    progress: a tqdm bar (images, images/s, ETA), else a log line every `log_every_s` seconds.

  Returns:
    (acc, info): the accumulator (see `accumulate_gradients`) and
    `{'num_batches', 'num_images', 'seconds', 'images_per_s'}`.
  """
  if num_batches is not None and num_batches <= 0:
    raise DataError(f"num_batches must be positive (or None for one epoch), got {num_batches}.")
  if chunk_size <= 0:
    raise ConfigError(f"chunk_size must be positive, got {chunk_size}.")
  stats = _check_stats(stats)
  treedef, flags = _flags(params, scored)
  leaves = treedef.flatten_up_to(params)
  fn = _build_scan(loss_fn, treedef, flags, stats)
  iterator: Iterator = iter(batch_iterator)

  def next_chunk(budget):
    got = []
    while len(got) < min(chunk_size, budget):
      try:
        got.append(next(iterator))
      except StopIteration:
        break
    if not got:
      return None
    images = sum(_num_valid(b) for b in got)
    weights = np.zeros((chunk_size,), np.float32)
    weights[:len(got)] = 1.0
    got = got + [got[-1]] * (chunk_size - len(got))
    stacked = _stack(got)
    stacked = (jax.device_put(stacked, shardings) if shardings is not None
               else jax.device_put(stacked))
    return stacked, jnp.asarray(weights), int(weights.sum()), images

  bar = None
  if progress:
    try:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=num_batches, unit="batch", desc="importance", dynamic_ncols=True)
    except ImportError:
      bar = None

  acc = _init_internal(leaves, flags, stats)
  remaining = math.inf if num_batches is None else num_batches
  done_batches = done_images = 0
  start = last_log = time.perf_counter()
  chunk = next_chunk(remaining)
  while chunk is not None:
    stacked, weights, n, images = chunk
    acc = fn(acc, leaves, stacked, weights)
    remaining -= n
    chunk = next_chunk(remaining) if remaining > 0 else None  # Host work overlaps the device.
    acc["num_batches"].block_until_ready()
    done_batches += n
    done_images += images
    now = time.perf_counter()
    rate = done_images / max(now - start, 1e-9)
    if bar is not None:
      bar.update(n)
      bar.set_postfix(img_per_s=f"{rate:.1f}")
    elif now - last_log >= log_every_s or chunk is None:
      eta = ((num_batches - done_batches) * (now - start) / done_batches
             if num_batches is not None else float("nan"))
      logging.debug("importance: %d batches, %d images, %.1f images/s, ETA %.0f s",
                   done_batches, done_images, rate, eta)
      last_log = now
  if bar is not None:
    bar.close()
  if done_batches == 0:
    raise DataError("The dataset for the importance scores is empty: the batch iterator yielded "
                    "no batch. Check the training split and its path.")
  seconds = time.perf_counter() - start
  info = {"num_batches": done_batches, "num_images": done_images, "seconds": seconds,
          "images_per_s": done_images / max(seconds, 1e-9)}
  if num_batches is not None and done_batches < num_batches:
    logging.warning("importance: the iterator ended after %d of %d batches.", done_batches,
                    num_batches)
  return _to_public(acc, treedef, flags), info


# ----------------------------------------------------------------------------------------------
# Optional linear-probe warm-up of the head before scoring.


def warm_up_head(loss_fn: LossFn, params: PyTree, batch_iterator: Iterable[PyTree], *,
                 steps: int, lr: float = 0.1, momentum: float = 0.9,
                 head_prefix: str = HEAD_PREFIX) -> tuple[PyTree, list[float]]:
  """A short linear probe: `steps` SGD(momentum) steps on the head only, encoder untouched.

  The paper scores with the freshly initialised head (our default: `steps=0` skips this). A random
  head makes the task-dependent gradients partly a property of that random head; a few probe steps
  give the encoder gradients of a head that already separates the classes. The encoder is returned
  unchanged (the same arrays); only the backward pass into the head is computed.

  Returns:
    (params with the warmed-up head, the loss of every step).
  """
  if steps < 0:
    raise ConfigError(f"The head warm-up needs steps >= 0, got {steps}.")
  if steps == 0:
    return params, []
  if not lr > 0:
    raise ConfigError(f"The head warm-up needs lr > 0, got {lr}.")
  if not isinstance(params, Mapping) or head_prefix not in params:
    raise ConfigError(f"The head warm-up needs a '{head_prefix}' entry in the params.")
  from shpeft_jax import optim  # pylint: disable=g-import-not-at-top  (optim imports peft)
  tx = optim.build(dict(name="sgd", lr=lr, momentum=momentum, schedule="constant"), steps).tx
  head = params[head_prefix]
  rest = {k: v for k, v in params.items() if k != head_prefix}

  @jax.jit
  def step(head, opt_state, batch):
    loss, g = jax.value_and_grad(lambda h: loss_fn(dict(rest, **{head_prefix: h}), batch))(head)
    updates, opt_state = tx.update(g, opt_state, head)
    return optax.apply_updates(head, updates), opt_state, loss

  opt_state = tx.init(head)
  losses = []
  it = iter(batch_iterator)
  for _ in range(steps):
    try:
      batch = next(it)
    except StopIteration:
      raise DataError(f"The head warm-up needs {steps} batches but the iterator ended after "
                      f"{len(losses)}.") from None
    head, opt_state, loss = step(head, opt_state, batch)
    losses.append(float(loss))
  out = dict(params)
  out[head_prefix] = head
  return out, losses


# ----------------------------------------------------------------------------------------------
# Estimators.


def _check_estimator(kind: str) -> str:
  if kind not in ESTIMATORS:
    raise ConfigError(f"Unknown importance estimator {kind!r}; choose 'l1' or 'l2'.")
  return kind


def _check_acc(acc: Mapping | None) -> None:
  if acc is None or "num_batches" not in acc:
    raise ConfigError("The task-dependent score needs a gradient accumulator from "
                      "accumulate_gradients / score_dataset.")
  if int(acc["num_batches"]) <= 0:
    raise DataError("The accumulator holds zero batches: the importance dataset was empty.")


def task_dependent(acc: Mapping, kind: str = "l2", *, l1_reduction: str = "abs_of_sum",
                   l2_reduction: str = "sum_of_squares") -> PyTree:
  """I_td, None where unscored.

  L1: |sum_b g_b| (default) or sum_b |g_b|. L2: sum_b g_b**2 (default, SPT's reading) or
  (sum_b g_b)**2 (the square of the gradient of the loss summed over the scoring batches).
  """
  _check_estimator(kind)
  _check_acc(acc)
  if l1_reduction not in L1_REDUCTIONS:
    raise ConfigError(f"Unknown l1_reduction {l1_reduction!r}; choose from {L1_REDUCTIONS}.")
  if l2_reduction not in L2_REDUCTIONS:
    raise ConfigError(f"Unknown l2_reduction {l2_reduction!r}; choose from {L2_REDUCTIONS}.")
  if kind == "l2":
    if l2_reduction == "square_of_sum":
      return jax.tree.map(jnp.square, acc["sum_grad"])
    return acc["sum_sq"]
  if l1_reduction == "sum_of_abs":
    if "sum_abs" not in acc:
      raise ConfigError("l1_reduction='sum_of_abs' needs an accumulator built with "
                        "stats=('sum_grad', 'sum_sq', 'sum_abs').")
    return acc["sum_abs"]
  return jax.tree.map(jnp.abs, acc["sum_grad"])


def task_agnostic(params: PyTree, kind: str = "l2", *, scored: PyTree | None = None) -> PyTree:
  """I_ta: L1 = |w|, L2 = w**2, in float32. None where unscored."""
  _check_estimator(kind)
  treedef, flags = _flags(params, scored)
  fn = (lambda w: jnp.abs(w.astype(jnp.float32))) if kind == "l1" else (
      lambda w: jnp.square(w.astype(jnp.float32)))
  return treedef.unflatten([fn(w) if f else None for f, w in
                            zip(flags, treedef.flatten_up_to(params))])


def _tree_sum(tree) -> jax.Array:
  return sum(jnp.sum(x, dtype=jnp.float32) for x in jax.tree_util.tree_leaves(tree))


@jax.jit
def _combine(td, ta, lam):
  ratio = _tree_sum(td) / _tree_sum(ta)
  return jax.tree.map(lambda a, b: a + (lam * ratio) * b, td, ta), ratio


def hybrid_importance(params: PyTree, acc: Mapping | None = None, *, estimator: str = "l2",
                      lam: float = 1.0, mode: str = "hybrid", l1_reduction: str = "abs_of_sum",
                      l2_reduction: str = "sum_of_squares", scored: PyTree | None = None,
                      return_info: bool = False):
  """SH-PEFT's importance, Eq. 1 as estimated in Sec. 2.2.

  I = I_td + lam * (sum I_td / sum I_ta) * I_ta (mode 'hybrid'); I_td alone ('td'); I_ta alone
  ('ta', needs no accumulator). Sums run over every scored parameter. `l1_reduction` /
  `l2_reduction` choose the reading of I_td (see `task_dependent`). The scored set is the
  accumulator's non-None leaves (or `scored`, or by default every non-head parameter in 'ta' mode).

  Returns:
    A float32 score tree with None at unscored leaves; with `return_info`, also a dict with the two
    sums and the balancing ratio.
  """
  if mode not in MODES:
    raise ConfigError(f"Unknown importance mode {mode!r}; choose from {MODES}.")
  _check_estimator(estimator)
  if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
    raise ConfigError(f"lambda (the hybrid balance) must be a finite number >= 0, got {lam!r}.")
  if mode != "ta":
    _check_acc(acc)
    if scored is None:
      scored = jax.tree.map(lambda x: x is not None, acc["sum_sq"] if "sum_sq" in acc
                            else acc["sum_grad"], is_leaf=_is_none)
  info: dict[str, float] = {}
  if mode == "ta":
    scores = task_agnostic(params, estimator, scored=scored)
    info["sum_ta"] = float(_tree_sum(scores))
  else:
    td = task_dependent(acc, estimator, l1_reduction=l1_reduction, l2_reduction=l2_reduction)
    sum_td = float(_tree_sum(td))
    info["sum_td"] = sum_td
    if not math.isfinite(sum_td):
      raise DataError("The task-dependent scores are not finite (NaN/inf gradients): check the "
                      "inputs and the loss on the scoring data.")
    if sum_td == 0.0:
      raise DataError(
          "Every task-dependent score is zero: no gradient reaches the scored weights. Is the head "
          "zero-initialised (it blocks the encoder gradient)? Use a random head init or the "
          "linear-probe warm-up before scoring.")
    if mode == "td":
      scores = td
    else:
      ta = task_agnostic(params, estimator, scored=scored)
      sum_ta = float(_tree_sum(ta))
      info["sum_ta"] = sum_ta
      if sum_ta == 0.0:
        raise DataError("Every task-agnostic score is zero (all scored weights are 0), so the "
                        "hybrid balance sum(I_td)/sum(I_ta) is undefined; use mode='td'.")
      scores, ratio = _combine(td, ta, jnp.float32(lam))
      info["ratio"] = float(ratio)
  return (scores, info) if return_info else scores
