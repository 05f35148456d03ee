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

What this does NOT save: the backward pass still produces a full gradient for every weight (the
selected elements are spread over every matrix), and the scatter produces full-shape updates that
`optax.apply_updates` adds in place when the train state is donated.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

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


def sparse_masked_optimizer(base_tx: optax.GradientTransformation,
                            mask_tree: PyTree) -> optax.GradientTransformation:
  """Same updates as `masked_update(base_tx, mask_tree)`, state only for the trainable elements.

  Args:
    base_tx: any optax chain whose transformations are elementwise, or global-norm clipping (e.g.
      `shpeft_jax.optim.build(cfg, num_steps).tx`, the chain before masking).
    mask_tree: the same mask tree `masked_update` takes: per parameter a bool / 0-1 array of its shape
      (element mask), `None` or `True` (fully trainable, e.g. the head) or `False` (frozen). Must be
      concrete (numpy or device arrays, not tracers): indices are computed once, on the host.

  Returns:
    An optax.GradientTransformation whose state is a `SparseMaskedState`; swap it in for
    `masked_update(base_tx, mask_tree)` (the trainer does when `config.optim.sparse_state=True`).
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

  def update_fn(updates, state, params=None):
    if tuple(int(i.shape[0]) for i in state.indices) != sizes:
      raise ConfigError("The optimizer state's selection does not match this optimizer's mask "
                        "(different number of selected weights); rebuild the optimizer from the "
                        "mask the state was created with.")
    g_leaves = leaves_of(updates, "gradient")
    small_g = gather(g_leaves, state.indices)
    small_p = None if params is None else gather(leaves_of(params, "parameter"), state.indices)
    small_u, inner = base_tx.update(small_g, state.inner, small_p)

    out, dense_it, j = [], iter(small_u["dense"]), 0
    flat_u = small_u["selected"]
    for g, k in zip(g_leaves, kinds):
      if k == DENSE:
        out.append(next(dense_it))
      elif k == FROZEN:
        out.append(jnp.full_like(g, -0.0))
      else:
        u = jax.lax.slice_in_dim(flat_u, offsets[j], offsets[j + 1]).astype(g.dtype)
        full = jnp.full((g.size,), -0.0, g.dtype).at[state.indices[j]].set(
            u, indices_are_sorted=True, unique_indices=True)
        out.append(full.reshape(g.shape))
        j += 1
    return treedef.unflatten(out), SparseMaskedState(inner, state.indices)

  return optax.GradientTransformation(init_fn, update_fn)


def num_selected(mask_tree: PyTree) -> int:
  """K: how many elements of partially-masked leaves the sparse state keeps by index."""
  return int(sum(i.size for i in _leaf_plan(mask_tree)[2]))


def tree_bytes(tree: PyTree) -> int:
  """Bytes of every array leaf (works on jax.ShapeDtypeStruct trees from jax.eval_shape too)."""
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")))
