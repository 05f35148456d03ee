"""Exact global top-k selection of weights by score (the threshold tau of Eq. 2), and mask statistics.

`select_top_k` marks EXACTLY k = round(k% * N) weights, N being the number of eligible weights over
the whole tree. Ordering: a higher score wins; among equal scores the LOWER global flat index wins.
The global flat index is the position in the concatenation of the score leaves in tree-flatten order
(the order of `shpeft_jax.utils.flatten_names`), each leaf raveled in C order. The result therefore
equals `np.argsort(-flat_scores, kind='stable')[:k]`.

Algorithm (O(N), no full sort; Floyd-Rivest style sample select, exact by construction):
  1. a deterministic strided sample of ~2^18 scores is sorted; its order statistic a few standard
     deviations below the expected rank of the k-th largest gives a lower bound `lo`;
  2. one pass extracts the candidates `score >= lo` (about 1.1 k of them); if there are fewer than k
     (an unlucky sample), `lo` is lowered and the pass repeated (down to -inf: plain introselect);
  3. `np.partition` of the candidates gives tau, the exact k-th largest value;
  4. one pass builds the masks `score > tau`, and the weights tied at tau are taken in flat order
     until exactly k are selected (a second pass only when ties straddle tau).
The paper's rule "I > tau" is our rule up to how ties at tau are split; with continuous scores there
are none.

Scopes (`scope=`, `peft.selection_scope`; the paper's is 'global'):
  * 'global': the one top-k over the whole tree above;
  * 'per_tensor': within every eligible tensor T separately, k_T = max(1, round(k% * |T|));
  * 'per_row': within every OUTPUT ROW of every kernel separately, k_r = max(1, round(k% * fan_in)):
    an output row is the set of weights that feed one output unit (GPS's "per neuron"). Flax
    layouts put the output axes last: Dense [in, out] and Conv [kh, kw, in, out] -> one row per
    output feature (a column of the [in, out] matrix: the fan_in = all axes but the last); the
    attention out projection [heads, head_dim, width] -> one row per output feature (fan_in =
    heads * head_dim); q/k/v DenseGeneral [width, heads, head_dim] -> one row per (head, head_dim)
    output (fan_in = width). Every other leaf (1-D biases and LayerNorm scales, the class token, the
    positional embedding, which are no linear map) falls back to 'per_tensor'.
Within a tensor or row the order is the global one: a higher score wins, ties go to the lower flat
index, so every group equals a stable argsort of its own scores. k% rounds per group (halves up) with
at least one weight per group, so the total differs slightly from the global k (`scoped_count`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np

from shpeft_jax.errors import ConfigError
from shpeft_jax.utils import path_name

PyTree = Any
SAMPLE_SIZE = 1 << 18
SCOPES = ("global", "per_tensor", "per_row")

_is_none = lambda x: x is None


@dataclasses.dataclass(frozen=True)
class SelectionInfo:
  """The outcome of a selection: tau, k, N, how many were selected and how ties were split."""
  threshold: float      # tau: the score of the k-th largest eligible weight.
  k: int                # requested count (after rounding k% * N).
  n: int                # eligible weights N.
  selected: int         # == k, checked.
  num_above: int        # weights with score > tau (all selected).
  num_tied: int         # weights with score == tau (num_tied_selected of them selected).
  num_tied_selected: int
  k_percent: float      # 100 * k / N.
  # 'global', or 'per_tensor' / 'per_row': then tau is the lowest group threshold and the counts
  # are sums over the groups.
  scope: str = "global"
  num_groups: int = 1

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def resolve_k(n: int, *, k_percent: float | None = None, k_count: int | None = None) -> int:
  """k from a percentage (rounded half up) or an absolute count, validated against N."""
  if (k_percent is None) == (k_count is None):
    raise ConfigError("Give exactly one of k_percent (e.g. 1.0 for 1%) and k_count (a number of "
                      f"weights); got k_percent={k_percent!r}, k_count={k_count!r}.")
  if n <= 0:
    raise ConfigError("There is no eligible weight to select from (N = 0).")
  if k_percent is not None:
    _check_percent(k_percent, n)
    k = int(math.floor(k_percent * n / 100.0 + 0.5))
    if k == 0:
      raise ConfigError(f"k_percent={k_percent}% of N={n} rounds to 0 weights; use a larger "
                        f"k_percent (at least {100.0 / n:.3g}%) or k_count.")
    return k
  if isinstance(k_count, bool) or not isinstance(k_count, (int, np.integer)):
    raise ConfigError(f"k_count must be an integer number of weights, got {k_count!r}.")
  if not 0 < k_count <= n:
    raise ConfigError(f"k_count must be in [1, N={n}], got {k_count}.")
  return int(k_count)


def _check_percent(k_percent, n: int) -> None:
  if isinstance(k_percent, bool) or not isinstance(k_percent, (int, float)) or not math.isfinite(
      k_percent):
    raise ConfigError(f"k_percent must be a number in (0, 100], got {k_percent!r}.")
  if not 0 < k_percent <= 100:
    raise ConfigError(f"k_percent must be in (0, 100] (a percentage of the {n} eligible "
                      f"weights), got {k_percent}.")


def _leaves(scores_tree):
  """(paths, leaves-or-None, treedef) with None leaves kept in place."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(scores_tree, is_leaf=_is_none)
  return [path_name(p) for p, _ in flat], [x for _, x in flat], treedef


def select_top_k(scores_tree: PyTree, *, k_percent: float | None = None,
                 k_count: int | None = None, eligible: PyTree | None = None,
                 scope: str = "global") -> tuple[PyTree, SelectionInfo]:
  """The boolean mask of the exactly-k highest scores over the whole tree (or per group, `scope`).

  Args:
    scores_tree: non-NaN float scores (jax or numpy arrays). `None` leaves (unscored parameters,
      e.g. the head) take no part and stay `None` in the mask.
    k_percent: percentage of the N eligible weights, in (0, 100]; k = round(k% * N), halves up.
    k_count: alternatively an absolute number of weights in [1, N].
    eligible: optional tree of Python bools (one per leaf, same structure): False leaves are never
      selected, do not count in N, and get an all-False mask.
    scope: 'global' | 'per_tensor' | 'per_row' (module docstring); the last two need k_percent.

  Returns:
    (mask tree of numpy bool arrays / None, SelectionInfo).
  """
  _check_scope(scope, k_percent, k_count)
  names, leaves, treedef = _leaves(scores_tree)
  if eligible is None:
    flags = [x is not None for x in leaves]
  else:
    try:
      flags = treedef.flatten_up_to(eligible)
    except (ValueError, TypeError) as e:
      raise ConfigError(f"`eligible` must be a tree of bools shaped like the scores ({e}).") from e
    flags = [bool(f) and x is not None for f, x in zip(flags, leaves)]
  host = jax.device_get([x if f else None for f, x in zip(flags, leaves)])
  arrays = []
  for name, f, x in zip(names, flags, host):
    if not f:
      arrays.append(None)
      continue
    a = np.asarray(x)
    if a.dtype != np.float32 and a.dtype != np.float64:
      a = a.astype(np.float32)
    if a.size and np.isnan(a.max()):
      raise ConfigError(f"The scores of {name!r} contain NaN; the importance pass diverged (check "
                        "the data, the loss and the learning rate of any warm-up).")
    arrays.append(a.reshape(-1))
  live = [a for a in arrays if a is not None and a.size]
  n = int(sum(a.size for a in live))
  if scope != "global":
    return _select_grouped(names, leaves, arrays, treedef, n, k_percent, scope)
  k = resolve_k(n, k_percent=k_percent, k_count=k_count)

  masks, tau, num_above, num_tied, tied_selected = _top_k_masks(arrays, live, n, k)
  selected = num_above + tied_selected

  out = []
  for x, m, f in zip(leaves, masks, flags):
    if x is None:
      out.append(None)
    elif m is None or not f:
      out.append(np.zeros(np.shape(x), bool))
    else:
      out.append(m.reshape(np.shape(x)))
  info = SelectionInfo(threshold=float(tau), k=k, n=n, selected=selected, num_above=num_above,
                       num_tied=num_tied, num_tied_selected=tied_selected,
                       k_percent=100.0 * k / n)
  return jax.tree_util.tree_unflatten(treedef, out), info


def _top_k_masks(arrays, live, n: int, k: int):
  """(flat masks, tau, #above, #tied, #tied selected): the exact top-k over `live` (the non-empty
  arrays of `arrays`, None entries kept as None), ties at tau taken in flat order."""
  tau, num_above, tied = _kth_largest(live, n, k)
  num_tied = sum(tied)
  need = k - num_above
  take_all_ties = need == num_tied  # The common case: one pass `>= tau` builds the masks.
  masks = [None if a is None else (a >= tau if take_all_ties else a > tau) for a in arrays]
  tied_selected = num_tied if take_all_ties else 0
  if not take_all_ties:
    # Ties at tau are taken in flat order; only the arrays that hold ties are scanned.
    live_index = [i for i, a in enumerate(arrays) if a is not None and a.size]
    for i, t in zip(live_index, tied):
      if t == 0:
        continue
      if tied_selected == need:
        break
      eq = np.flatnonzero(arrays[i] == tau)[:need - tied_selected]
      masks[i][eq] = True
      tied_selected += eq.size
  if num_above + tied_selected != k:  # Unreachable; never hand out a wrong mask.
    raise RuntimeError(f"selection picked {num_above + tied_selected} weights instead of k={k}.")
  return masks, tau, num_above, num_tied, tied_selected


def _check_scope(scope: str, k_percent, k_count) -> None:
  if scope not in SCOPES:
    raise ConfigError(f"Unknown selection scope {scope!r}; choose from {SCOPES}.")
  if scope != "global" and (k_count is not None or k_percent is None):
    raise ConfigError(f"scope={scope!r} selects k_percent of every tensor / row; give k_percent, "
                      "not k_count (a global count).")


def row_matrix_shape(name: str, shape: tuple[int, ...], scope: str) -> tuple[int, int]:
  """(group length, number of groups) of a tensor under a non-global scope: the groups are the
  columns of the tensor reshaped (C order) to this shape, so a lower row is a lower flat index.

  'per_row' on a kernel: (fan_in, output units), see the module docstring; otherwise (and for 1-D
  tensors or leaves that are not a `kernel`): one group, the whole tensor.
  """
  size = math.prod(shape)
  if scope != "per_row" or len(shape) < 2 or name.split("/")[-1] != "kernel":
    return size, 1
  n_in_axes = 1 if param_type_of(name) == "attn_qkv" else len(shape) - 1
  fan_in = math.prod(shape[:n_in_axes])
  return fan_in, size // fan_in


def _group_k(group_size: int, k_percent: float) -> int:
  return max(1, int(math.floor(k_percent * group_size / 100.0 + 0.5)))


def scoped_count(shapes: dict[str, tuple[int, ...]], *, k_percent: float, scope: str) -> int:
  """How many weights `select_top_k(..., scope=scope)` selects from tensors of these shapes."""
  _check_scope(scope, k_percent, None)
  n = sum(math.prod(s) for s in shapes.values())
  k = resolve_k(n, k_percent=k_percent) if scope == "global" else 0
  if scope != "global":
    resolve_k(n, k_count=max(n, 1))  # Validates N > 0.
    _check_percent(k_percent, n)
    for name, shape in shapes.items():
      if math.prod(shape):
        length, groups = row_matrix_shape(name, tuple(shape), scope)
        k += groups * _group_k(length, k_percent)
  return k


def _select_grouped(names, leaves, arrays, treedef, n, k_percent, scope):
  """`select_top_k` for the 'per_tensor' / 'per_row' scopes, group by group."""
  resolve_k(n, k_count=max(n, 1))  # Validates N > 0.
  _check_percent(k_percent, n)  # Every group keeps at least one weight: no "rounds to 0".
  out, k_total, above, tied, tied_sel, groups, taus = [], 0, 0, 0, 0, 0, []
  for name, x, a in zip(names, leaves, arrays):
    if x is None:
      out.append(None)
      continue
    shape = tuple(np.shape(x))
    if a is None or not a.size:
      out.append(np.zeros(shape, bool))
      continue
    length, cols = row_matrix_shape(name, shape, scope)
    k = _group_k(length, k_percent)
    if cols == 1:  # One group: the global path's O(N) select on this tensor alone.
      (mask,), tau, num_above, num_tied, _ = _top_k_masks([a], [a], a.size, k)
      tau = np.asarray([tau])
    else:  # Rows: a stable sort of each column (ties: the lower flat index first).
      mat = a.reshape(length, cols)
      order = np.argsort(-mat, axis=0, kind="stable")[:k]
      mask = np.zeros(mat.shape, bool)
      np.put_along_axis(mask, order, True, axis=0)
      tau = np.take_along_axis(mat, order[-1:], axis=0)  # Each row's k-th largest score.
      num_above = int(np.count_nonzero(mat > tau))
      num_tied = int(np.count_nonzero(mat == tau))
    above += num_above
    tied += num_tied
    tied_sel += k * cols - num_above
    k_total += k * cols
    groups += cols
    taus.append(float(tau.min()))
    out.append(mask.reshape(shape))
  selected = sum(int(np.count_nonzero(m)) for m in out if m is not None)
  if selected != k_total:  # Unreachable; never hand out a wrong mask.
    raise RuntimeError(f"selection picked {selected} weights instead of k={k_total}.")
  info = SelectionInfo(threshold=min(taus), k=k_total, n=n, selected=selected, num_above=above,
                       num_tied=tied, num_tied_selected=tied_sel, k_percent=100.0 * k_total / n,
                       scope=scope, num_groups=groups)
  return jax.tree_util.tree_unflatten(treedef, out), info


def _kth_largest(arrays: list[np.ndarray], n: int, k: int) -> tuple[float, int, list[int]]:
  """(tau, #values > tau, #values == tau per array) over `arrays` together, 1 <= k <= n, O(n).

  tau is the exact k-th largest value. Every value >= tau is a candidate, so the counts are exact;
  the per-array tie counts let the tie pass visit only the arrays that hold ties.
  """
  stride = max(1, n // SAMPLE_SIZE)
  sample = np.sort(np.concatenate([a[::stride] for a in arrays]))[::-1]  # Descending.
  s = sample.size
  expected = k * s / n
  margin = 4.0 * math.sqrt(expected) + 16.0
  while True:
    rank = int(math.ceil(expected + margin))
    lo = sample[rank] if rank < s else -np.inf
    per_array = arrays if lo == -np.inf else [a[a >= lo] for a in arrays]
    if sum(c.size for c in per_array) >= k:
      break
    margin = max(4.0 * margin, 64.0)  # The sample was unlucky: widen and retry (rare).
  candidates = np.concatenate(per_array)
  pos = candidates.size - k
  part = np.partition(candidates, pos)
  tau = part[pos]
  num_above = int(np.count_nonzero(part[pos + 1:] > tau))
  tied = [int(np.count_nonzero(c == tau)) for c in per_array]
  return tau, num_above, tied


# ----------------------------------------------------------------------------------------------
# Statistics of a mask.

_LAYER_RE = re.compile(r"(?:^|/)(resblocks_\d+)(?:/|$)")


def layer_of(name: str) -> str:
  """The layer group of a parameter name: resblocks_i, embeddings, ln_pre, ln_post, head, ..."""
  m = _LAYER_RE.search(name)
  if m:
    return m.group(1)
  parts = name.split("/")
  if parts[0] == "encoder" and len(parts) > 1:
    parts = parts[1:]
  first = parts[0]
  if first in ("conv1", "class_embedding", "positional_embedding", "register_tokens") or first.startswith(
      "vpt_prompts"):
    return "embeddings"
  return first


def param_type_of(name: str) -> str:
  """The parameter type: attn_qkv, attn_out, mlp_fc, mlp_proj, layernorm, patch_embed, ..."""
  parts = name.split("/")
  rules = (
      (lambda: "attn" in parts and any(p in ("query", "key", "value") for p in parts), "attn_qkv"),
      (lambda: "attn" in parts and "out" in parts, "attn_out"),
      (lambda: "mlp" in parts and "c_fc" in parts, "mlp_fc"),
      (lambda: "mlp" in parts and "c_proj" in parts, "mlp_proj"),
      (lambda: any(re.fullmatch(r"ln_(\d+|pre|post)|fc_norm", p) for p in parts), "layernorm"),
      (lambda: any(re.fullmatch(r"ls_\d", p) for p in parts), "layer_scale"),
      (lambda: "register_tokens" in parts, "register_tokens"),
      (lambda: "conv1" in parts, "patch_embed"),
      (lambda: "class_embedding" in parts, "class_token"),
      (lambda: "positional_embedding" in parts, "pos_embed"),
      (lambda: parts[0] == "head", "head"),
  )
  for test, label in rules:
    if test():
      return label
  return "other"


def kind_of(name: str) -> str:
  """'bias' for biases, 'weight' for everything else (kernels, LayerNorm scales, embeddings)."""
  return "bias" if name.split("/")[-1] == "bias" else "weight"


def _layer_sort_key(layer: str):
  order = {"embeddings": 0, "ln_pre": 1, "ln_post": 3, "head": 4}
  m = re.fullmatch(r"resblocks_(\d+)", layer)
  if m:
    return (2, int(m.group(1)), layer)
  return (order.get(layer, 5), 0, layer)


def _entry(selected: int, size: int) -> dict:
  return {"selected": int(selected), "size": int(size),
          "fraction": float(selected) / size if size else 0.0}


def mask_statistics(mask_tree: PyTree) -> dict:
  """Per-tensor, per-layer, per-type and per-kind counts of a mask tree.

  Returns a JSON-ready dict:
    total: {selected, size, fraction} over masked tensors;
    tensors: {name: {selected, size, fraction, shape, layer, type}};
    per_layer / per_type / per_kind: {group: {selected, size, fraction}} (layers in network order);
    unmasked: sorted names of None leaves (not part of the selection; fully trainable).
  """
  names, leaves, _ = _leaves(mask_tree)
  tensors, unmasked = {}, []
  groups: dict[str, dict[str, list[int]]] = {"per_layer": {}, "per_type": {}, "per_kind": {}}
  total_sel = total_size = 0
  for name, m in zip(names, leaves):
    if m is None:
      continue
    a = np.asarray(m)
    sel, size = int(np.count_nonzero(a)), int(a.size)
    layer, ptype, kind = layer_of(name), param_type_of(name), kind_of(name)
    tensors[name] = dict(_entry(sel, size), shape=list(a.shape), layer=layer, type=ptype)
    for key, g in (("per_layer", layer), ("per_type", ptype), ("per_kind", kind)):
      acc = groups[key].setdefault(g, [0, 0])
      acc[0] += sel
      acc[1] += size
    total_sel += sel
    total_size += size
  unmasked = [name for name, m in zip(names, leaves) if m is None]
  stats = {"total": _entry(total_sel, total_size), "tensors": tensors}
  stats["per_layer"] = {g: _entry(*groups["per_layer"][g])
                        for g in sorted(groups["per_layer"], key=_layer_sort_key)}
  stats["per_type"] = {g: _entry(*v) for g, v in sorted(groups["per_type"].items())}
  stats["per_kind"] = {g: _entry(*v) for g, v in sorted(groups["per_kind"].items())}
  stats["unmasked"] = sorted(unmasked)
  return stats
