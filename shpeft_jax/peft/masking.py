"""Element masks applied to the FINAL updates of an optax chain (paper Eq. 2).

Why the final updates: masking only the gradients is not enough. Momentum carries the history of
earlier steps and (decoupled) weight decay adds `wd * w` to the update of every weight, so a frozen
weight with a zero gradient would still move. `masked_update` wraps any optax chain and replaces the
update of every frozen element by -0.0 after the whole chain has run, so that `p + u == p` bit for bit
(IEEE: x + (-0.0) == x for every x, including +0.0, -0.0 and NaN; +0.0 would turn a -0.0 weight into
+0.0). A `where` rather than a multiplication keeps NaN/inf updates of frozen weights out too.

One caveat: XLA on CPU and GPU flushes subnormal floats to zero in arithmetic, so
`optax.apply_updates` (p + u) turns a frozen subnormal weight (|w| < 1.2e-38) into 0 even though
u = -0.0. `apply_updates` below selects the old value for frozen elements instead of adding, and is
bit-exact for every value; the trainer's step uses it. The optimizer itself (SGD / AdamW and the
schedule, wrapped in `masked_update`) is built by `shpeft_jax.optim.build`.

The incoming gradients are masked as well (`mask_gradients=True`): it changes nothing for frozen
weights (their updates are discarded anyway) but keeps their momentum at zero and makes gradient
clipping see only the trainable weights' gradient norm.

Mask leaves: a bool (or 0/1 float) array of the parameter's shape = element mask; `None` or `True` =
fully trainable (the head); `False` = fully frozen.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from shpeft_jax.errors import ConfigError
from shpeft_jax.utils import path_name

PyTree = Any

def is_mask_leaf(x) -> bool:
  """A whole-leaf mask entry: None / True (fully trainable) or False (frozen)."""
  return x is None or isinstance(x, bool)


_is_mask_leaf = is_mask_leaf


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

  Without `mask_tree`, an element whose update is exactly zero counts as frozen (`masked_update`
  gives frozen elements -0.0, and p + 0 == p anyway), so the step needs no mask; with it, the mask
  decides. Equal to `optax.apply_updates` except that frozen subnormal weights are not flushed to
  zero.
  """
  if mask_tree is None:
    return jax.tree.map(lambda p, u: jnp.where(u == 0, p, (p + u).astype(p.dtype)),
                        params, updates)
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


def full_mask(mask_tree: PyTree, params: PyTree) -> PyTree:
  """The mask with every leaf a bool array of its parameter's shape (None / True / False leaves
  materialised), as the trainer keeps it on the host and in the optimizer state."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return jax.tree.map(
      lambda m, p: np.ones(p.shape, bool) if m is None else
      np.broadcast_to(np.asarray(m, bool), p.shape).copy(),
      mask_tree, params, is_leaf=lambda x: x is None)
