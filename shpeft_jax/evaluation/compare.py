"""From the runs of a sweep (methods x datasets x learning rates x seeds) to a fair comparison.

Each run is a record (a dict) with at least `dataset`, `variant`, `lr`, `seed`, `val_score` (the
task's headline metric on the validation split of the reported model: macro F1 for single-label
data, mean AUROC for multi-label data, `tasks`) and `score` (the same on the test split); records
from before task kinds have `val_f1` / `f1` only, which are then the score. The sweep adds the
label, type, method, trainable % and the other test metrics (`f1`, `accuracy`, `auc`).

1. `choose_lr`: for every (dataset, variant), the learning rate of the grid with the best mean
   validation score over the seeds (ties: the first rate of the grid in the order given). Test
   numbers play no part in the choice.
2. `summarize`: the test score at the chosen rate only, per (dataset, variant): mean +- sd over
   the seeds, and the paired difference to the reference variant (SH-PEFT) at *its* chosen rate
   on the same seeds (`stats.paired_difference`), with wins-ties-losses.
3. `write_tables` / `plot_f1_vs_trainable`: results.csv / results.md / runs.csv, and Fig. 4 with
   the spread over seeds as error bars.
4. The label-efficiency sweep (records with `train_fraction` and `data_name`; each fraction is a
   column of its own, so 1. and 2. hold per fraction and method): `write_fraction_table`
   (fractions.csv / fractions.md: method x fraction) and `plot_score_vs_fraction`.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Sequence

import numpy as np

from shpeft_jax.errors import ConfigError
from shpeft_jax.evaluation import stats

REFERENCE = "shpeft"
NAN = float("nan")


# The record key of each task headline, and how tables name it.
_HEADLINE_KEY = {"f1_macro": "f1", "auc_macro": "auc"}
_TITLES = {"f1_macro": ("macro F1", "F1"), "auc_macro": ("mean AUROC", "AUROC")}


def _finite(x) -> bool:
  return x is not None and math.isfinite(x)


def _score(r: dict) -> float:
  return r.get("score", r.get("f1", NAN))


def _val_score(r: dict) -> float:
  return r.get("val_score", r.get("val_f1", NAN))


def _headline(r: dict) -> str:
  return r.get("headline") or "f1_macro"


def title_of(rows: Sequence[dict], short: bool = False) -> str:
  """How tables name the score of `rows` (one metric, or 'score' when datasets differ)."""
  names = {_TITLES.get(_headline(r), (_headline(r),) * 2)[int(short)] for r in rows}
  return names.pop() if len(names) == 1 else "score"


def _groups(records: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
  out: dict[tuple[str, str], list[dict]] = {}
  for r in records:
    out.setdefault((r["dataset"], r["variant"]), []).append(r)
  return out


def choose_lr(records: Sequence[dict]) -> dict[tuple[str, str], float]:
  """{(dataset, variant): lr} with the best mean validation score over seeds."""
  out = {}
  for key, runs in _groups(records).items():
    grid = list(dict.fromkeys(r["lr"] for r in runs))
    seeds = {lr: sorted(r["seed"] for r in runs if r["lr"] == lr) for lr in grid}
    if len(grid) > 1 and len({tuple(s) for s in seeds.values()}) > 1:
      raise ConfigError(f"{key}: the learning rates were run on different seeds {seeds}; a "
                        "choice on unequal seeds is not fair. Resume the sweep to fill them in.")
    if len(grid) == 1:
      out[key] = grid[0]  # Nothing to choose; validation need not exist.
      continue
    mean_val = {}
    for lr in grid:
      vals = [_val_score(r) for r in runs if r["lr"] == lr]
      if any(v is None or not math.isfinite(v) for v in vals):
        raise ConfigError(f"{key} at lr {lr:g} has a run without a validation "
                          f"{title_of(runs)}; choosing the learning rate needs a validation "
                          "split (data.val_split).")
      mean_val[lr] = float(np.mean(vals))
    out[key] = max(grid, key=lambda lr: mean_val[lr])  # max keeps the first of equal values.
  return out


def summarize(records: Sequence[dict], reference: str = REFERENCE, *,
              interval: str = "t", confidence: float = 0.95) -> list[dict]:
  """One row per (dataset, variant) in first-seen order, at the chosen learning rate."""
  chosen = choose_lr(records)
  groups = _groups(records)
  rows = []
  for (dataset, variant), runs in groups.items():
    lr = chosen[(dataset, variant)]
    at = [r for r in runs if r["lr"] == lr]
    if len({r["seed"] for r in at}) != len(at):
      raise ConfigError(f"{dataset}/{variant} at lr {lr:g}: two runs with the same seed.")
    # A run without a test result (the sweep warns) leaves its seed out of the cell and of the
    # pairing; `n` says how many seeds a number stands on.
    at = [r for r in at if _finite(_score(r))]
    per_seed = {r["seed"]: _score(r) for r in at}
    diff = None
    ref_key = (dataset, reference)
    if ref_key in groups and variant != reference:
      ref_lr = chosen[ref_key]
      ref = {r["seed"]: _score(r) for r in groups[ref_key]
             if r["lr"] == ref_lr and _finite(_score(r))}
      common = sorted(set(per_seed) & set(ref))
      diff = stats.paired_difference({s: per_seed[s] for s in common},
                                     {s: ref[s] for s in common}, interval=interval,
                                     confidence=confidence)
    first = at[0] if at else runs[0]
    rows.append({
        "dataset": dataset, "variant": variant, "label": first.get("label", variant),
        "type": first.get("type", ""), "method": first.get("method", variant),
        "lr": lr, "grid": list(dict.fromkeys(r["lr"] for r in runs)),
        "seeds": sorted(per_seed), "headline": _headline(first),
        "score": stats.summarize([per_seed[s] for s in sorted(per_seed)]),
        "f1": stats.summarize([r.get("f1", NAN) for r in at if _finite(r.get("f1"))]),
        "accuracy": stats.summarize([r.get("accuracy", NAN) for r in at
                                     if _finite(r.get("accuracy"))]),
        "auc": stats.summarize([r.get("auc", NAN) for r in at if _finite(r.get("auc"))]),
        "val_score": float(np.mean([_val_score(r) for r in at])) if at else NAN,
        "vs_reference": diff,
        "trainable_percent": (float(np.mean([r.get("trainable_percent", NAN) for r in at]))
                              if at else NAN),
        # The label-efficiency sweep: the data of the column and its training-label fraction.
        "data_name": first.get("data_name", dataset),
        "train_fraction": first.get("train_fraction"),
    })
  return rows


def _by_variant(rows: Sequence[dict]) -> tuple[list[str], dict[str, dict[str, dict]]]:
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  table: dict[str, dict[str, dict]] = {}
  for r in rows:
    table.setdefault(r["variant"], {})[r["dataset"]] = r
  return datasets, table


def _avg(cells: Sequence[dict | None], datasets) -> float:
  """The score averaged over datasets (NaN unless every dataset has it, in the same metric)."""
  present = [c for c in cells if c is not None]
  vals = [c["score"].mean for c in present]
  same = len({c["headline"] for c in present}) == 1
  return float(np.mean(vals)) if len(vals) == len(datasets) and same else NAN


def _f(x: float, digits: int) -> str:
  return "" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _pct(x: float) -> str:
  return "" if x is None or not math.isfinite(x) else f"{x:.4g}"


def write_tables(records: Sequence[dict], workdir: str, reference: str = REFERENCE
                 ) -> dict[str, str]:
  """results.csv, results.md (Table 1 layout with spread) and runs.csv (every run)."""
  rows = summarize(records, reference)
  datasets, table = _by_variant(rows)
  chosen = {(r["dataset"], r["variant"]): r["lr"] for r in rows}
  paths = {k: os.path.join(workdir, f) for k, f in
           (("csv", "results.csv"), ("md", "results.md"), ("runs", "runs.csv"))}
  with open(paths["csv"], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["method", "type", "dataset", "metric", "lr", "n_seeds", "seeds", "score_mean",
                "score_sd", "f1_mean", "accuracy_mean", "auc_mean", "val_score_mean",
                f"diff_vs_{reference}", "ci_low", "ci_high", "wins", "ties", "losses",
                "trainable_percent"])
    for r in rows:
      d = r["vs_reference"]
      w.writerow([r["label"], r["type"], r["dataset"], r["headline"], f"{r['lr']:g}",
                  r["score"].n, " ".join(map(str, r["seeds"])), _f(100 * r["score"].mean, 2),
                  _f(100 * r["score"].sd, 2), _f(100 * r["f1"].mean, 2),
                  _f(100 * r["accuracy"].mean, 2),
                  _f(100 * r["auc"].mean, 2), _f(100 * r["val_score"], 2),
                  "" if d is None else _f(100 * d.mean, 2),
                  "" if d is None else _f(100 * d.ci_low, 2),
                  "" if d is None else _f(100 * d.ci_high, 2),
                  *(("", "", "") if d is None else (d.wins, d.ties, d.losses)),
                  _pct(r["trainable_percent"])])
  seeds = sorted({s for r in rows for s in r["seeds"]})
  grids = sorted({tuple(r["grid"]) for r in rows})
  title = title_of(rows)
  metric = {d: title_of([r for r in rows if r["dataset"] == d], short=True) for d in datasets}
  lines = [
      (f"{title[0].upper()}{title[1:]}" if title != "score" else
       "The task's headline metric (macro F1 for single-label datasets, mean AUROC for "
       "multi-label ones; named per dataset)")
      + f" (%) on the test split: mean ± sd over {len(seeds)} seed(s) "
      f"({', '.join(map(str, seeds))}), each method at the learning rate with the best mean "
      f"validation {title} (column lr; grid" + ("s " if len(grids) > 1 else " ")
      + "; ".join(", ".join(f"{x:g}" for x in g) for g in grids) + "). "
      f"Δ: the paired difference to SH-PEFT on the same seeds, with its 95% t interval, and "
      "the seeds on which the method is better-equal-worse. Trainable % of the model's "
      "parameters.", "",
      "| Method | Type | " + " | ".join(
          (f"{d} | " if title != "score" else f"{d} ({metric[d]}) | ") + "lr | Δ vs SH-PEFT | W-T-L"
          for d in datasets)
      + " | Avg | Trainable % |",
      "|---|---|" + "---:|---:|---:|---:|" * len(datasets) + "---:|---:|"]
  for variant, cells in table.items():
    any_cell = next(iter(cells.values()))
    parts = []
    for d in datasets:
      c = cells.get(d)
      if c is None:
        parts.append(" |  |  | ")
        continue
      diff = c["vs_reference"]
      parts.append(f"{c['score'].format(100)} (n={c['score'].n}) | {c['lr']:g} | "
                   f"{'' if diff is None else diff.format(100)} | "
                   f"{'' if diff is None else diff.record}")
    avg = _avg([cells.get(d) for d in datasets], datasets)
    pct = float(np.nanmean([c["trainable_percent"] for c in cells.values()]))
    lines.append(f"| {any_cell['label']} | {any_cell['type']} | {' | '.join(parts)} | "
                 f"{_f(100 * avg, 1)} | {_pct(pct)} |")
  with open(paths["md"], "w") as f:
    f.write("\n".join(lines) + "\n")
  fields = ["dataset", "variant", "label", "type", "method", "lr", "seed", "chosen_lr",
            "headline", "val_score", "score", "val_f1", "f1", "accuracy", "auc", "trainable",
            "total", "trainable_percent",
            "run_dir"]
  with open(paths["runs"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in records:
      w.writerow({**r, "chosen_lr": r["lr"] == chosen[(r["dataset"], r["variant"])]})
  return paths


def plot_f1_vs_trainable(records: Sequence[dict], path: str, reference: str = REFERENCE) -> str:
  """Fig. 4: average test score (macro F1 / mean AUROC, %) against trainable % (log x), error
  bars = sd over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = summarize(records, reference)
  datasets, table = _by_variant(rows)
  fig, ax = plt.subplots(figsize=(7.0, 4.8))
  n_seeds = set()
  at_x: dict[float, int] = {}  # Methods at the same trainable % (the ablations) side by side.
  labels: list[tuple[float, float, float, str]] = []
  for variant, cells in table.items():
    cs = [cells.get(d) for d in datasets]
    y = _avg(cs, datasets)
    x = float(np.nanmean([c["trainable_percent"] for c in cells.values()]))
    if not (math.isfinite(x) and math.isfinite(y)) or x <= 0:
      continue
    # sd of the average over datasets: per seed, average the datasets, then sd over seeds.
    per_seed = _per_seed_avg(records, cs)
    sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
    n_seeds.add(len(per_seed))
    ours = cells[datasets[0]]["method"] == reference if datasets[0] in cells else False
    i = at_x[round(x, 6)] = at_x.get(round(x, 6), -1) + 1
    base_x, x = x, x * 1.06 ** i
    ax.errorbar([x], [100 * y], yerr=[100 * sd], fmt="*" if ours else "o",
                ms=10 if ours else 6, capsize=3, color="tab:red" if ours else "tab:blue",
                zorder=3)
    lrs = "/".join(f"{c['lr']:g}" for c in cs if c is not None)
    labels.append((base_x, x, 100 * y, f"{cells[next(iter(cells))]['label']} (lr {lrs})"))
  ax.set_xscale("log")
  _place_labels(ax, labels)
  ax.set_xlabel("trainable parameters (%)")
  ax.set_ylabel(f"average test {title_of(rows)} (%)")
  seeds = "/".join(str(n) for n in sorted(n_seeds))
  ax.set_title(f"{title_of(rows, short=True)} vs trainable parameters (mean ± sd over {seeds} seeds, lr chosen on "
               "validation)", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  with utils.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=120, format="png")
  plt.close(fig)
  return path


def _fraction_rows(records: Sequence[dict], reference: str
                   ) -> dict[str, dict[str, dict[float, dict]]]:
  """{data_name: {variant: {fraction: summary row}}} of the records that carry a fraction."""
  out: dict[str, dict[str, dict[float, dict]]] = {}
  for r in summarize(records, reference):
    if r["train_fraction"] is not None:
      out.setdefault(r["data_name"], {}).setdefault(r["variant"], {})[r["train_fraction"]] = r
  return out


def write_fraction_table(records: Sequence[dict], workdir: str, reference: str = REFERENCE
                         ) -> dict[str, str]:
  """fractions.csv (one line per data, method and fraction) and fractions.md (per data: methods x
  fractions; mean ± sd over seeds, the lr chosen on validation at that fraction, the paired
  difference to SH-PEFT at the same fraction with its 95% t interval and W-T-L)."""
  table = _fraction_rows(records, reference)
  paths = {"fractions_csv": os.path.join(workdir, "fractions.csv"),
           "fractions_md": os.path.join(workdir, "fractions.md")}
  lines = []
  with open(paths["fractions_csv"], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["dataset", "method", "variant", "metric", "train_fraction", "lr", "n_seeds",
                "score_mean", "score_sd", f"diff_vs_{reference}", "ci_low", "ci_high", "wins",
                "ties", "losses"])
    for data_name, variants in table.items():
      fractions = sorted({f for cells in variants.values() for f in cells})
      rows = [c for cells in variants.values() for c in cells.values()]
      seeds = sorted({s for c in rows for s in c["seeds"]})
      lines += [f"{data_name}: test {title_of(rows)} (%) against the fraction of training labels "
                f"(one stratified subset per fraction, the same for every method and seed): mean "
                f"± sd over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), lr chosen on "
                "validation per fraction and method; Δ: paired difference to SH-PEFT at the same "
                "fraction, 95% t interval, W-T-L.", "",
                "| Method | " + " | ".join(f"{100 * f:g}% | lr | Δ vs SH-PEFT | W-T-L"
                                           for f in fractions) + " |",
                "|---|" + "---:|---:|---:|---:|" * len(fractions)]
      for variant, cells in variants.items():
        parts = []
        for fr in fractions:
          c = cells.get(fr)
          d = None if c is None else c["vs_reference"]
          if c is not None:
            w.writerow([data_name, c["label"], variant, c["headline"], f"{fr:g}", f"{c['lr']:g}",
                        c["score"].n, _f(100 * c["score"].mean, 2), _f(100 * c["score"].sd, 2),
                        *(("",) * 6 if d is None else (
                            _f(100 * d.mean, 2), _f(100 * d.ci_low, 2), _f(100 * d.ci_high, 2),
                            d.wins, d.ties, d.losses))])
          parts.append(" |  |  | " if c is None else
                       f"{c['score'].format(100)} (n={c['score'].n}) | {c['lr']:g} | "
                       f"{'' if d is None else d.format(100)} | {'' if d is None else d.record}")
        label = next(iter(cells.values()))["label"]
        lines.append(f"| {label} | {' | '.join(parts)} |")
      lines.append("")
  with open(paths["fractions_md"], "w") as f:
    f.write("\n".join(lines))
  return paths


# Line colours of the methods other than SH-PEFT (red).
_OTHERS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
           "tab:gray", "tab:olive", "tab:cyan")


def plot_score_vs_fraction(records: Sequence[dict], path: str, reference: str = REFERENCE) -> str:
  """The headline test score (%) against the training-label fraction (log x), one line per method
  (SH-PEFT red), error bars = sd over seeds; one panel per dataset."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  table = _fraction_rows(records, reference)
  fig, axes = plt.subplots(1, len(table), figsize=(6.4 * len(table), 4.6), squeeze=False)
  n_seeds = set()
  for ax, (data_name, variants) in zip(axes[0], table.items()):
    fractions = sorted({f for cells in variants.values() for f in cells})
    for i, (variant, cells) in enumerate(variants.items()):
      fs = sorted(cells)
      ys = [100 * cells[f]["score"].mean for f in fs]
      sds = [100 * (cells[f]["score"].sd if _finite(cells[f]["score"].sd) else 0.0) for f in fs]
      n_seeds.update(cells[f]["score"].n for f in fs)
      ours = cells[fs[0]]["method"] == reference
      shift = 1.04 ** (i - (len(variants) - 1) / 2)  # Side by side: error bars stay readable.
      ax.errorbar([f * shift for f in fs], ys, yerr=sds, marker="*" if ours else "o", ms=10 if ours else 5,
                  capsize=3, lw=2 if ours else 1.2, color="tab:red" if ours else _OTHERS[i % len(_OTHERS)],
                  label=cells[fs[0]]["label"], zorder=3 if ours else 2)
    rows = [c for cells in variants.values() for c in cells.values()]
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of the training labels")
    ax.set_ylabel(f"test {title_of(rows)} (%)")
    ax.set_title(data_name, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  seeds = "/".join(str(n) for n in sorted(n_seeds))
  grid = any(len(c["grid"]) > 1 for v in table.values() for cells in v.values()
             for c in cells.values())
  fig.suptitle(f"Label efficiency: mean ± sd over {seeds} seeds, "
               + ("lr chosen on validation per fraction and method" if grid else
                  "each method at its one configured lr"), fontsize=9)
  fig.tight_layout()
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  with utils.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=120, format="png")
  plt.close(fig)
  return path


def _place_labels(ax, labels: Sequence[tuple[float, float, float, str]]) -> None:
  """Labels (base x, plotted x, y, text) of the points. Points at the same trainable % (the masks
  at k, the ablations: drawn side by side) and any single point among them get their labels in a
  column to their right, spaced so that none overlaps, each joined to its point by a thin line."""
  lo, hi = ax.get_ylim()
  gap = 0.045 * (hi - lo)
  groups: dict[float, list] = {}
  for p in labels:
    groups.setdefault(round(p[0], 6), []).append(p)
  multi = [g for g in groups.values() if len(g) > 1]
  for g in groups.values():
    if len(g) == 1:
      host = next((m for m in multi if min(q[1] for q in m) / 1.1 <= g[0][1]
                   <= max(q[1] for q in m) * 1.1), None)
      if host is not None:
        host.append(g[0])
        g.clear()
  placed: list[tuple[float, float]] = []  # (x, y) of the column labels
  for g in groups.values():
    if len(g) > 1:
      column_x = max(q[1] for q in g) * 1.5
      at = math.inf
      for _, x, y, text in sorted(g, key=lambda q: -q[2]):
        at = min(y, at - gap)
        placed.append((column_x, at))
        ax.annotate(text, (x, y), xytext=(column_x, at), textcoords="data", fontsize=7,
                    va="center", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.55"})
  for g in groups.values():
    if len(g) == 1:
      _, x, y, text = g[0]
      # Beside its point, moved up or down past any column label that runs through there (a
      # label's height, ~12 points, is about `gap` in data units).
      near = [cy for cx, cy in placed if cx / 1.3 <= x <= cx * 3]
      dy = next((d for d in (4, -11, 16, -23, 28, -35)
                 if all(abs(y + (d + 3) * gap / 12 - cy) >= 0.8 * gap for cy in near)), 4)
      ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, dy), fontsize=7)


def _per_seed_avg(records: Sequence[dict], cells: Sequence[dict | None]) -> list[float]:
  """For each seed common to every dataset's cell, the test score averaged over the datasets."""
  cells = [c for c in cells if c is not None]
  if not cells:
    return []
  seeds = set.intersection(*(set(c["seeds"]) for c in cells))
  out = []
  for s in sorted(seeds):
    vals = [_score(r) for c in cells for r in records
            if (r["dataset"], r["variant"], r["lr"], r["seed"]) ==
            (c["dataset"], c["variant"], c["lr"], s)]
    out.append(float(np.mean(vals)))
  return out


def summary_json(records: Sequence[dict], reference: str = REFERENCE) -> list[dict[str, Any]]:
  """The rows of `summarize` as plain JSON values (for sweep.json)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  out = []
  for r in summarize(records, reference):
    row = dict(r)
    for k in ("score", "f1", "accuracy", "auc"):
      row[k] = dataclasses.asdict(r[k])
    row["vs_reference"] = None if r["vs_reference"] is None else dataclasses.asdict(
        r["vs_reference"])
    out.append(row)
  return out


# ------------------------------------------------------------------------------------------------
# Running one method over learning rates and seeds (used by the sweep and by `main`'s method list).


def lr_grid_of(config, lr_grid: Sequence[float] | None = None) -> tuple[float, ...]:
  """The learning rates to try for one resolved method config.

  `config.sweep.lr_grid` of the resolved config (a method's own grid comes in through
  `method_overrides[method].sweep.lr_grid`), else `lr_grid` (the sweep's --lr_grid), else the
  config's single `optim.lr`. A method's own grid wins over --lr_grid: the linear probe needs
  rates two decades above the others (configs/demo.py).
  """
  sweep = config.get("sweep") if hasattr(config, "get") else None
  own = tuple(sweep.get("lr_grid", ()) or ()) if sweep else ()
  grid = own or tuple(lr_grid or ()) or (float(config.optim.lr),)
  grid = tuple(float(x) for x in grid)
  bad = [x for x in grid if not (math.isfinite(x) and x > 0)]
  if bad or len(set(grid)) != len(grid):
    raise ConfigError(f"The learning-rate grid {grid} must hold distinct positive numbers.")
  return grid


def seeds_of(config, seeds: Sequence[int] | None = None) -> tuple[int, ...]:
  """--seeds, else `config.sweep.seeds`, else (config.seed,)."""
  sweep = config.get("sweep") if hasattr(config, "get") else None
  out = tuple(seeds or ()) or (tuple(sweep.get("seeds", ()) or ()) if sweep else ())
  out = tuple(int(s) for s in out) or (int(config.seed),)
  if len(set(out)) != len(out):
    raise ConfigError(f"Seeds {out} repeat a seed; each seed is one paired run.")
  return out


def run_dir_of(base: str, lr: float, seed: int, *, by_lr: bool, by_seed: bool) -> str:
  """base/lr_<lr>/seed_<seed>; a level only when the sweep varies it, so a one-lr one-seed run
  keeps the layout (and the cached results) of earlier versions."""
  parts = [base]
  if by_lr:
    parts.append(f"lr_{lr:g}")
  if by_seed:
    parts.append(f"seed_{seed}")
  return os.path.join(*parts)


def run_grid(config, run_dir: str, run_fn, *, seeds: Sequence[int], lr_grid: Sequence[float],
             by_lr: bool, by_seed: bool, progress=None, label: str = "") -> list[dict]:
  """run_fn(config with optim.lr = lr and seed = s, its run dir) for every lr x seed.

  Returns [{'lr', 'seed', 'run_dir', 'results'}]. The seed changes what the trainer seeds with
  config.seed (head init, data order, scoring batches, the random mask), never the encoder: the
  pre-trained / converted weights come from config.model.init_checkpoint, the same for every run.
  progress: a `console.RunsProgress` (one console line per run, named `label lr .. seed ..`).
  """
  import copy  # pylint: disable=g-import-not-at-top
  out = []
  for lr in lr_grid:
    for seed in seeds:
      c = copy.deepcopy(config)
      c.optim.lr = float(lr)
      c.seed = int(seed)
      d = run_dir_of(run_dir, lr, seed, by_lr=by_lr, by_seed=by_seed)
      if progress is None:
        res = run_fn(c, d)
      else:
        name = " ".join([label or c.peft.method] + ([f"lr {float(lr):g}"] if by_lr else [])
                        + ([f"seed {int(seed)}"] if by_seed else []))
        res = progress(name, d, lambda c=c, d=d: run_fn(c, d))
      out.append({"lr": float(lr), "seed": int(seed), "run_dir": d, "results": res})
  return out


def runs_in_grid(config, seeds: Sequence[int]) -> int:
  """How many runs `run_grid` makes for one resolved config."""
  return len(lr_grid_of(config)) * len(seeds)


def metrics_of(results: dict) -> dict:
  """The fields of a record that come from one run's results.json."""
  test = results.get("test") or {}
  val = results.get("validation") or {}
  headline = results.get("headline") or "f1_macro"
  return {"trainable": results.get("trainable"), "total": results.get("total"),
          "trainable_percent": results.get("trainable_percent", NAN), "headline": headline,
          "val_score": val.get(headline, NAN), "score": test.get(headline, NAN),
          "val_f1": val.get("f1_macro", NAN), "f1": test.get("f1_macro", NAN),
          "accuracy": test.get("accuracy", NAN), "auc": test.get("auc_macro", NAN)}


def format_seed_table(records: Sequence[dict], reference: str = REFERENCE) -> str:
  """The demo's closing table: mean ± sd over seeds, lr, and the paired difference to SH-PEFT,
  led by the task's headline metric (macro F1 / mean AUROC), then the other test metrics."""
  rows = summarize(records, reference)
  n = max((r["score"].n for r in rows), default=0)
  short = title_of(rows, short=True)
  main_key = {_HEADLINE_KEY.get(r["headline"]) for r in rows}
  others = [(k, t) for k, t in (("f1", "F1"), ("accuracy", "accuracy"), ("auc", "AUC"))
            if {k} != main_key]
  delta = f"Δ {short} vs shpeft [95% CI]"
  head = (f"{'method':<10} {'trainable %':>11} {'lr':>6} {short + ' (mean ± sd)':>15} "
          + " ".join(f"{t:>15}" for _, t in others) + f" {delta:>24} {'W-T-L':>6}")
  lines = [f"test metrics (%) over {n} seed(s) "
           f"{', '.join(map(str, sorted({s for r in rows for s in r['seeds']})))}", head,
           "-" * len(head)]
  for r in rows:
    d = r["vs_reference"]
    lines.append(f"{r['variant']:<10} {r['trainable_percent']:>11.3f} {r['lr']:>6g} "
                 f"{r['score'].format(100):>15} "
                 + " ".join(f"{r[k].format(100):>15}" for k, _ in others)
                 + f" {'' if d is None else d.format(100):>24} "
                 f"{'' if d is None else d.record:>6}")
  return "\n".join(lines)
