"""Optimizer state for the selected weights only: O(k N) memory instead of O(N).

`shpeft_jax.peft.masking.masked_update` keeps the inner chain's state (SGD momentum, ...) for every
parameter and throws the frozen elements' updates away at the end. With k = 1% of ViT-B/16 that is
86M momentum floats (344 MB) of which 0.86M are ever used. `sparse_masked_optimizer` runs the same
inner chain on a much smaller tree instead:

  {'selected': ONE flat vector of the K selected elements of every partially-masked leaf,
   'dense':    the fully-trainable leaves (mask None / True / all-ones, e.g. the head), as they are}

Per step the gradients (and params, for weight decay) of the partial leaves are gathered at
precomputed flat indices and concatenated, the inner chain updates that small tree, and the result is
scattered back into full-shape updates whose frozen elements are -0.0 (so `p + u == p` bit for bit,
like `masked_update`). Every elementwise transformation (trace/momentum, decayed weights, learning
rate schedules, Adam moments) therefore gives exactly the numbers of the dense masked path, and
`clip_by_global_norm` sees the same norm because `masked_update` masks the gradients before its
chain too. The flat indices live in the optimizer state as int32 device arrays (like the masks of
`masked_update`), so a jitted step gets them as arguments instead of as ~1M baked-in constants, and
a checkpoint of the state restores them.

Applying the updates: `update` keeps the optax contract and returns full-shape updates (a
-0.0-filled copy of every partially-masked leaf: one params-sized scratch tree per step, 327 MB on
ViT-B/16). A train step should call `tx.apply_gradients(grads, state, params)` instead: it adds the
K updates to the K gathered params and scatters the results into the flattened (donated) param
buffers in place (`p.at[idx].set(...)`), so no dense update tree is ever materialised and frozen
elements are never touched (bit-identical by construction, subnormals included).

What this does NOT save: the backward pass still produces a full gradient for every weight (the
selected elements are spread over every matrix).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shpeft_jax.errors import ConfigError
from shpeft_jax.utils import path_name

PyTree = Any

from shpeft_jax.peft.masking import is_mask_leaf as _is_mask_leaf  # pylint: disable=g-bad-import-order

# How each parameter leaf is handled, decided once from the (concrete) mask.
DENSE, SPARSE, FROZEN = "dense", "sparse", "frozen"


class SparseMaskedState(NamedTuple):
  """The inner chain's state over {'selected': [K], 'dense': (...)} plus the gather indices.

  `indices[j]` are the int32 flat (C-order) positions of the selected elements of the j-th
  partially-masked leaf; their lengths fix the static offsets into the flat vector.
  """
  inner: Any
  indices: tuple


def _leaf_plan(mask_tree: PyTree):
  """(treedef, kinds, host flat indices of SPARSE leaves, names, mask shapes) from a concrete mask.

  `shapes[i]` is None for None/True/False leaves (no shape to check).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(mask_tree, is_leaf=_is_mask_leaf)
  kinds, indices, names, shapes = [], [], [], []
  for path, m in flat:
    name = path_name(path)
    names.append(name)
    shapes.append(None if _is_mask_leaf(m) else tuple(np.shape(m)))
    if m is None or m is True:
      kinds.append(DENSE)
      continue
    if m is False:
      kinds.append(FROZEN)
      continue
    if isinstance(m, jax.core.Tracer):
      raise ConfigError(f"The mask of {name!r} is a traced value; build the sparse optimizer outside "
                        "jit, from the concrete mask that selection returned.")
    a = np.asarray(jax.device_get(m)).reshape(-1) != 0
    if a.size and a.all():
      kinds.append(DENSE)
    elif not a.any():
      kinds.append(FROZEN)
    else:
      if a.size >= 2 ** 31:
        raise ConfigError(f"{name!r} has {a.size} elements; int32 flat indices cannot address it.")
      kinds.append(SPARSE)
      indices.append(np.flatnonzero(a).astype(np.int32))
  return treedef, kinds, indices, names, shapes


def apply_update(p: jax.Array, u: jax.Array) -> jax.Array:
  """p + u where u != 0, p itself (a select, no arithmetic) where u == 0: the trainer's rule.

  Selecting p keeps a weight with a zero update bit-identical even where XLA flushes subnormal
  arithmetic to zero.
  """
  u = u.astype(p.dtype)
  return jnp.where(u == 0, p, (p + u).astype(p.dtype))


class SparseMaskedTransformation(optax.GradientTransformation):
  """An optax `(init, update)` pair that can also apply its updates in place.

  The fields stay `(init, update)`, so optax (`chain`, `inject_hyperparams`, ...) takes it like any
  transformation; `apply_gradients` is carried by the update function.
  """

  @property
  def apply_gradients(self) -> Callable[[PyTree, SparseMaskedState, PyTree],
                                        tuple[PyTree, SparseMaskedState, jax.Array]]:
    """`(grads, state, params) -> (new_params, new_state, update_norm)`, no dense update tree.

    `new_params` equals `jax.tree.map(apply_update, params, update(grads, state, params)[0])` bit
    for bit; `update_norm` is the global L2 norm of the applied updates (frozen ones are zero).
    Donate `params` to the jitted step so that XLA scatters into their buffers in place.
    """
    return self.update.apply_gradients  # pytype: disable=attribute-error


def sparse_masked_optimizer(base_tx: optax.GradientTransformation,
                            mask_tree: PyTree) -> SparseMaskedTransformation:
  """Same updates as `masked_update(base_tx, mask_tree)`, state only for the trainable elements.

  Args:
    base_tx: any optax chain whose transformations are elementwise, or global-norm clipping (e.g.
      `shpeft_jax.optim.build(cfg, num_steps).tx`, the chain before masking).
    mask_tree: the same mask tree `masked_update` takes: per parameter a bool / 0-1 array of its shape
      (element mask), `None` or `True` (fully trainable, e.g. the head) or `False` (frozen). Must be
      concrete (numpy or device arrays, not tracers): indices are computed once, on the host.

  Returns:
    A `SparseMaskedTransformation` whose state is a `SparseMaskedState`; swap it in for
    `masked_update(base_tx, mask_tree)` (the trainer does when `config.optim.sparse_state=True`),
    and apply its updates with `apply_gradients` rather than `update` + add.
  """
  treedef, kinds, host_indices, names, mask_shapes = _leaf_plan(mask_tree)
  sizes = tuple(int(i.size) for i in host_indices)
  offsets = tuple(int(x) for x in np.cumsum((0,) + sizes))

  def leaves_of(tree, what):
    try:
      return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
      raise ConfigError(f"The mask tree does not match the {what} tree ({e}).") from e

  def gather(leaves, indices):
    """The small tree the inner chain sees: selected elements (one flat vector) + dense leaves."""
    parts = [jnp.ravel(x)[i] for x, i in zip(
        (x for x, k in zip(leaves, kinds) if k == SPARSE), indices)]
    if not parts:  # No partially-masked leaf (full fine-tuning, linear probe): no flat vector.
      selected = None  # (not a zero-size array: orbax refuses to checkpoint those)
    else:
      selected = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    return {"selected": selected, "dense": tuple(x for x, k in zip(leaves, kinds) if k == DENSE)}

  def init_fn(params):
    leaves = leaves_of(params, "parameter")
    for name, x, shape in zip(names, leaves, mask_shapes):
      if shape is not None and shape != tuple(jnp.shape(x)):
        raise ConfigError(f"The mask of {name!r} has shape {shape} but the parameter has shape "
                          f"{tuple(jnp.shape(x))}; the mask belongs to another model.")
    indices = tuple(jnp.asarray(i) for i in host_indices)
    return SparseMaskedState(base_tx.init(gather(leaves, indices)), indices)

  def small_update(updates, state, params):
    """(gradient leaves, small params or None, small updates, new inner state)."""
    if tuple(int(i.shape[0]) for i in state.indices) != sizes:
      raise ConfigError("The optimizer state's selection does not match this optimizer's mask "
                        "(different number of selected weights); rebuild the optimizer from the "
                        "mask the state was created with.")
    g_leaves = leaves_of(updates, "gradient")
    small_g = gather(g_leaves, state.indices)
    small_p = None if params is None else gather(leaves_of(params, "parameter"), state.indices)
    small_u, inner = base_tx.update(small_g, state.inner, small_p)
    return g_leaves, small_p, small_u, inner

  def selected_part(flat, j):
    return jax.lax.slice_in_dim(flat, offsets[j], offsets[j + 1])

  def update_fn(updates, state, params=None):
    g_leaves, _, small_u, inner = small_update(updates, state, params)
    out, dense_it, j = [], iter(small_u["dense"]), 0
    for g, k in zip(g_leaves, kinds):
      if k == DENSE:
        out.append(next(dense_it))
      elif k == FROZEN:
        out.append(jnp.full_like(g, -0.0))
      else:
        u = selected_part(small_u["selected"], j).astype(g.dtype)
        full = jnp.full((g.size,), -0.0, g.dtype).at[state.indices[j]].set(
            u, indices_are_sorted=True, unique_indices=True)
        out.append(full.reshape(g.shape))
        j += 1
    return treedef.unflatten(out), SparseMaskedState(inner, state.indices)

  def apply_gradients(grads, state, params):
    p_leaves = leaves_of(params, "parameter")
    _, small_p, small_u, inner = small_update(grads, state, params)
    out, dense_it, j = [], iter(small_u["dense"]), 0
    for p, k in zip(p_leaves, kinds):
      if k == DENSE:
        out.append(apply_update(p, next(dense_it)))
      elif k == FROZEN:
        out.append(p)
      else:
        # The gathered params were gathered from these very buffers: add, then scatter back.
        new = apply_update(selected_part(small_p["selected"], j),
                           selected_part(small_u["selected"], j).astype(p.dtype))
        flat = jnp.ravel(p).at[state.indices[j]].set(new, indices_are_sorted=True,
                                                     unique_indices=True)
        out.append(flat.reshape(p.shape))
        j += 1
    update_norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                               for x in jax.tree.leaves(small_u)))
    return treedef.unflatten(out), SparseMaskedState(inner, state.indices), update_norm

  update_fn.apply_gradients = apply_gradients
  return SparseMaskedTransformation(init_fn, update_fn)


def num_selected(mask_tree: PyTree) -> int:
  """K: how many elements of partially-masked leaves the sparse state keeps by index."""
  return int(sum(i.size for i in _leaf_plan(mask_tree)[2]))


def tree_bytes(tree: PyTree) -> int:
  """Bytes of every array leaf (works on jax.ShapeDtypeStruct trees from jax.eval_shape too)."""
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")))
