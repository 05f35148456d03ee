"""The oracle selection of issue 26: does a score find the weights that full fine-tuning moves?

The oracle mask at k% is the exact top-k of |w_ft - w_0| over the encoder (w_ft: the trainer's
`full` run, w_0: the weights it started from), selected with `peft.selection.select_top_k`, the
selection SH-PEFT trains with. Any other selection of the same k (SH-PEFT's scores, I_ta, I_td, a
random mask, another scope) is compared with it by

  recall        |selection AND oracle| / |oracle|   (the share of the oracle's weights it picks),
  delta_share   sum of |w_ft - w_0| over the selection / over all weights (how much of full
                fine-tuning's movement it could reproduce; the oracle's own share is its ceiling),

in total and per operation type (`selection.param_type_of`). Training with this mask is the
trainer's `peft.method='oracle'` (`shpeft_jax/peft/oracle.py`), which selects the same weights.
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


# ----------------------------------------------------------------------------------------------
# Command line: python -m shpeft_jax.analysis.oracle --pretrained DIR --finetuned DIR \
#     [--scores NAME=WORKDIR/scores ...] [--mask NAME=mask.npz ...] [--k 1,5,10] --out FILE.json
# Built-in selections at every k: I_ta (|w_0|) and a random mask (uniform scores, --seed).


def _encoder_of(tree: Mapping, what: str) -> dict:
  if not isinstance(tree, Mapping) or sparsity.ENCODER not in tree:
    raise ConfigError(f"The {what} has no '{sparsity.ENCODER}' subtree; pass a run's scores/ "
                      "folder or mask.npz.")
  return tree[sparsity.ENCODER]


def _selections(args, w0: dict) -> dict:
  from shpeft_jax import params_io  # pylint: disable=g-import-not-at-top
  from shpeft_jax.analysis import __main__ as cli  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import mask_io  # pylint: disable=g-import-not-at-top
  gen = np.random.default_rng(args.seed)
  out: dict[str, Any] = {
      "I_ta (|w_0|)": {k: np.abs(np.asarray(v)) for k, v in flatten_names(w0).items()},
      "random": {k: gen.random(np.shape(v)) for k, v in flatten_names(w0).items()}}
  for name, path in cli.parse_named(args.scores, "--scores").items():
    out[name] = flatten_names(_encoder_of(params_io.restore_tree(path), f"scores {path}"))
  masks = cli.parse_named(args.mask, "--mask")
  from shpeft_jax.utils import unflatten_names  # pylint: disable=g-import-not-at-top
  out = {n: unflatten_names(v) for n, v in out.items()}
  for name, path in masks.items():
    out[name] = {k: _encoder_of(mask_io.load_mask(cli.find_mask_file(path)), f"mask {path}")
                 for k in cli.parse_k_list(args.k)}
  return out


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from shpeft_jax.analysis import __main__ as cli  # pylint: disable=g-import-not-at-top
  from shpeft_jax.errors import cli_main  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m shpeft_jax.analysis.oracle", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pretrained", required=True, help="params checkpoint the full run started from")
  p.add_argument("--finetuned", required=True, help="params checkpoint of the full fine-tune")
  p.add_argument("--scores", action="append", metavar="NAME=DIR", help="a run's scores/ folder")
  p.add_argument("--mask", action="append", metavar="NAME=FILE",
                 help="a mask.npz, compared at its own k (reported under every --k)")
  p.add_argument("--k", default="1,5,10", help="percentages")
  p.add_argument("--seed", type=int, default=0, help="seed of the random selection")
  p.add_argument("--out", required=True, help="JSON file")
  args = p.parse_args(argv)

  def run():
    w0 = sparsity.load_checkpoint(args.pretrained, "pretrained checkpoint")
    wft = sparsity.load_checkpoint(args.finetuned, "fine-tuned checkpoint")
    sparsity.check_same_encoder(w0, wft)
    table = oracle_table(_selections(args, w0.encoder), w0.encoder, wft.encoder,
                         cli.parse_k_list(args.k))
    with open(args.out, "w") as f:
      json.dump({str(k): v for k, v in table.items()}, f, indent=1)
    for k, row in table.items():
      for name, r in row.items():
        t = r["total"]
        print(f"k={k:g}%  {name:28s} recall {t['recall']:.3f}  |dw| share {t['delta_share']:.3f}"
              f"  (oracle {t['oracle_delta_share']:.3f})")
  return cli_main(run, prog="oracle")


if __name__ == "__main__":
  raise SystemExit(main())
