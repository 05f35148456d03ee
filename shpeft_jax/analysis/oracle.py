"""The oracle selection of issue 26: does a score find the weights that full fine-tuning moves?

The oracle mask at k% is the exact top-k of |w_ft - w_0| over the encoder (w_ft: the trainer's
`full` run, w_0: the weights it started from), selected with `peft.selection.select_top_k`, the
selection SH-PEFT trains with. Any other selection of the same k (SH-PEFT's scores, I_ta, I_td, a
random mask, another scope) is compared with it by

  recall        |selection AND oracle| / |oracle|   (the share of the oracle's weights it picks),
  delta_share   sum of |w_ft - w_0| over the selection / over all weights (how much of full
                fine-tuning's movement it could reproduce; the oracle's own share is its ceiling),

in total and per operation type (`selection.param_type_of`). Library functions only: the command
line and the oracle-mask training run are not built yet (docs/BASELINES.md, issue 26).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from shpeft_jax.analysis import sparsity
from shpeft_jax.errors import ConfigError
from shpeft_jax.peft import selection
from shpeft_jax.utils import flatten_names

PyTree = Any


def oracle_mask(pretrained_encoder: PyTree, finetuned_encoder: PyTree, *,
                k_percent: float) -> tuple[PyTree, selection.SelectionInfo]:
  """The exact top-k% of |w_ft - w_0| (ties: lower flat index, as every selection here)."""
  return selection.select_top_k(sparsity.weight_changes(pretrained_encoder, finetuned_encoder),
                                k_percent=k_percent)


def _ratio(a: float, b: float) -> float | None:
  return float(a) / float(b) if b else None


def compare_to_oracle(mask: PyTree, oracle: PyTree, delta: PyTree) -> dict:
  """Recall of the oracle's weights and share of the total |delta| covered, total and per type.

  `mask`, `oracle` (boolean) and `delta` (|w_ft - w_0|) are trees with the same names and shapes.
  Returns {'total': {...}, 'per_type': {type: {...}}}, each entry with selected, oracle, hits,
  recall, delta_share and oracle_delta_share (None where a denominator is 0).
  """
  m, o, d = flatten_names(mask), flatten_names(oracle), flatten_names(delta)
  if not set(m) == set(o) == set(d):
    raise ConfigError("The selection, the oracle mask and the weight changes cover different "
                      f"parameters ({sorted(set(m) ^ set(o))[:3]} ...); compare masks of one model.")
  sums: dict[str, np.ndarray] = {}
  for name in m:
    a, b, c = np.asarray(m[name], bool), np.asarray(o[name], bool), np.asarray(d[name], np.float64)
    if not a.shape == b.shape == c.shape:
      raise ConfigError(f"{name!r}: selection {a.shape}, oracle {b.shape}, delta {c.shape} differ.")
    row = np.array([a.sum(), b.sum(), (a & b).sum(), c[a].sum(), c[b].sum(), c.sum()])
    for group in ("total", selection.param_type_of(name)):
      sums[group] = sums.get(group, 0) + row

  def entry(r) -> dict:
    return {"selected": int(r[0]), "oracle": int(r[1]), "hits": int(r[2]),
            "recall": _ratio(r[2], r[1]), "delta_share": _ratio(r[3], r[5]),
            "oracle_delta_share": _ratio(r[4], r[5])}
  total = sums.pop("total")
  return {"total": entry(total), "per_type": {t: entry(r) for t, r in sorted(sums.items())}}


def oracle_table(selections: Mapping[str, PyTree], pretrained_encoder: PyTree,
                 finetuned_encoder: PyTree, k_percents=(1.0, 5.0, 10.0)) -> dict:
  """{k: {name: compare_to_oracle(...)}} for masks given per k: selections[name][k] is a mask, or
  selections[name] is a score tree whose own top-k% (global) is taken at every k."""
  delta = sparsity.weight_changes(pretrained_encoder, finetuned_encoder)
  out: dict[float, dict] = {}
  for k in k_percents:
    oracle, _ = selection.select_top_k(delta, k_percent=k)
    row = {}
    for name, sel in selections.items():
      mask = sel[k] if isinstance(sel, Mapping) and k in sel else selection.select_top_k(
          sel, k_percent=k)[0]
      row[name] = compare_to_oracle(mask, oracle, delta)
    out[k] = row
  return out
