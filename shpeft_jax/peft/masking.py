"""Element masks applied to the FINAL updates of an optax chain (paper Eq. 2), and the optimizer.

Why the final updates: masking only the gradients is not enough. Momentum carries the history of
earlier steps and (decoupled) weight decay adds `wd * w` to the update of every weight, so a frozen
weight with a zero gradient would still move. `masked_update` wraps any optax chain and replaces the
update of every frozen element by -0.0 after the whole chain has run, so that `p + u == p` bit for bit
(IEEE: x + (-0.0) == x for every x, including +0.0, -0.0 and NaN; +0.0 would turn a -0.0 weight into
+0.0). A `where` rather than a multiplication keeps NaN/inf updates of frozen weights out too.

One caveat: XLA on CPU and GPU flushes subnormal floats to zero in arithmetic, so
`optax.apply_updates` (p + u) turns a frozen subnormal weight (|w| < 1.2e-38) into 0 even though
u = -0.0. `apply_updates(params, updates, mask_tree)` below selects the old value for frozen
elements instead of adding, and is bit-exact for every value; the trainer should use it.

The incoming gradients are masked as well (`mask_gradients=True`): it changes nothing for frozen
weights (their updates are discarded anyway) but keeps their momentum at zero and makes gradient
clipping see only the trainable weights' gradient norm.

Mask leaves: a bool (or 0/1 float) array of the parameter's shape = element mask; `None` or `True` =
fully trainable (the head); `False` = fully frozen.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from shpeft_jax.errors import ConfigError
from shpeft_jax.utils import path_name

PyTree = Any

_is_mask_leaf = lambda x: x is None or isinstance(x, bool)


def _apply_mask(mask_tree: PyTree, tree: PyTree, fill: float) -> PyTree:
  def apply(m, u):
    if u is None or m is None or m is True:
      return u
    if m is False:
      return jnp.full_like(u, fill)
    if tuple(jnp.shape(m)) != tuple(jnp.shape(u)):
      raise ConfigError(f"A mask leaf has shape {jnp.shape(m)} but its parameter has shape "
                        f"{jnp.shape(u)}; the mask belongs to another model.")
    return jnp.where(jnp.asarray(m) != 0, u, jnp.asarray(fill, u.dtype))
  try:
    return jax.tree.map(apply, mask_tree, tree, is_leaf=_is_mask_leaf)
  except ValueError as e:
    if "shape" in str(e) and "mask" in str(e):
      raise
    raise ConfigError(f"The mask tree does not match the parameter tree ({e}).") from e


def _check_mask(mask_tree: PyTree, params: PyTree) -> None:
  """Raises ConfigError naming the first parameter whose mask has the wrong structure or shape."""
  try:
    flat = jax.tree_util.tree_flatten_with_path(mask_tree, is_leaf=_is_mask_leaf)[0]
    targets = jax.tree_util.tree_structure(mask_tree, is_leaf=_is_mask_leaf).flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"The mask tree does not match the parameter tree ({e}).") from e
  for (path, m), p in zip(flat, targets):
    if not _is_mask_leaf(m) and tuple(jnp.shape(m)) != tuple(jnp.shape(p)):
      raise ConfigError(f"The mask of {path_name(path)!r} has shape {tuple(jnp.shape(m))} but the "
                        f"parameter has shape {tuple(jnp.shape(p))}; the mask belongs to another "
                        "model.")


class MaskedUpdateState(NamedTuple):
  """The inner chain's state plus the element masks as device arrays.

  The masks live in the optimizer state (not in a closure) so that a jitted update step receives
  them as arguments, sharded like the parameters, instead of baking ~86M booleans into the program.
  """
  inner: Any
  masks: tuple


def masked_update(inner: optax.GradientTransformation, mask_tree: PyTree, *,
                  mask_gradients: bool = True) -> optax.GradientTransformation:
  """Wraps `inner` so that frozen elements (mask 0/False) get an update of exactly -0.0."""
  mask_leaves, mask_def = jax.tree_util.tree_flatten(mask_tree, is_leaf=_is_mask_leaf)
  is_array = [not _is_mask_leaf(m) for m in mask_leaves]

  def rebuild(masks):
    it = iter(masks)
    return jax.tree_util.tree_unflatten(
        mask_def, [next(it) if a else m for a, m in zip(is_array, mask_leaves)])

  def init_fn(params):
    masks = tuple(jnp.asarray(m) != 0 for a, m in zip(is_array, mask_leaves) if a)
    _check_mask(rebuild(masks), params)  # Fails early, with names, on a mismatched mask.
    return MaskedUpdateState(inner.init(params), masks)

  def update_fn(updates, state, params=None):
    mask = rebuild(state.masks)
    if mask_gradients:
      updates = _apply_mask(mask, updates, 0.0)
    updates, inner_state = inner.update(updates, state.inner, params)
    return _apply_mask(mask, updates, -0.0), MaskedUpdateState(inner_state, state.masks)

  return optax.GradientTransformation(init_fn, update_fn)


def apply_updates(params: PyTree, updates: PyTree, mask_tree: PyTree | None = None) -> PyTree:
  """p + u for trainable elements, p itself (a select, no arithmetic) for frozen ones.

  Equal to `optax.apply_updates` except that frozen subnormal weights are not flushed to zero.
  """
  if mask_tree is None:
    return optax.apply_updates(params, updates)
  new = optax.apply_updates(params, updates)

  def keep(m, p, n):
    if m is None or m is True:
      return n
    if m is False:
      return p
    return jnp.where(jnp.asarray(m) != 0, n, p)
  return jax.tree.map(keep, mask_tree, params, new, is_leaf=_is_mask_leaf)


def state_masks(opt_state: Any, mask_tree: PyTree) -> PyTree:
  """The mask tree rebuilt from the device arrays held in a MaskedUpdateState (for jitted steps)."""
  leaves, treedef = jax.tree_util.tree_flatten(mask_tree, is_leaf=_is_mask_leaf)
  it = iter(opt_state.masks)
  return jax.tree_util.tree_unflatten(
      treedef, [m if _is_mask_leaf(m) else next(it) for m in leaves])


class Optimizer(NamedTuple):
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def _get(config: Any, key: str, default: Any = None) -> Any:
  if isinstance(config, Mapping):
    return config.get(key, default)
  return getattr(config, key, default) if hasattr(config, key) else default


def optimizer(config: Any, mask_tree: PyTree | None = None) -> Optimizer:
  """SGD with momentum, decoupled weight decay, linear warm-up + cosine decay, optional clipping.

  `config` (a ConfigDict or dict) fields: `lr` (peak, paper: 1e-3), `total_steps` (paper: 40k),
  `warmup_steps` (0), `end_lr` (0), `momentum` (0.9), `nesterov` (False), `weight_decay` (0),
  `grad_clip_norm` (None = off).

  Per step: g -> [clip by global norm] -> momentum trace -> + weight_decay * w -> * -lr(step) ->
  [mask]. The decay is decoupled from the momentum buffer (it is added after the trace, AdamW-style,
  and scaled by the scheduled learning rate), unlike torch.optim.SGD's weight_decay, which is added to
  the gradient before momentum. With `mask_tree`, the chain is wrapped in `masked_update`.
  """
  lr = _get(config, "lr")
  total = _get(config, "total_steps")
  warmup = int(_get(config, "warmup_steps", 0) or 0)
  end_lr = float(_get(config, "end_lr", 0.0) or 0.0)
  momentum = _get(config, "momentum", 0.9)
  wd = float(_get(config, "weight_decay", 0.0) or 0.0)
  clip = _get(config, "grad_clip_norm", None)
  if lr is None or not lr > 0:
    raise ConfigError(f"optimizer: lr must be > 0, got {lr!r}.")
  if total is None or int(total) <= 0:
    raise ConfigError(f"optimizer: total_steps must be a positive integer, got {total!r}.")
  total = int(total)
  if not 0 <= warmup < total:
    raise ConfigError(f"optimizer: warmup_steps must be in [0, total_steps={total}), got {warmup}.")
  if momentum is not None and not 0 <= momentum < 1:
    raise ConfigError(f"optimizer: momentum must be in [0, 1), got {momentum}.")
  if wd < 0:
    raise ConfigError(f"optimizer: weight_decay must be >= 0, got {wd}.")
  if clip is not None and not clip > 0:
    raise ConfigError(f"optimizer: grad_clip_norm must be > 0 or None, got {clip}.")

  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(lr), warmup_steps=warmup, decay_steps=total,
      end_value=end_lr)
  parts = []
  if clip is not None:
    parts.append(optax.clip_by_global_norm(float(clip)))
  if momentum:
    parts.append(optax.trace(decay=float(momentum), nesterov=bool(_get(config, "nesterov", False))))
  if wd:
    parts.append(optax.add_decayed_weights(wd))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  if mask_tree is not None:
    tx = masked_update(tx, mask_tree)
  return Optimizer(tx, schedule)
