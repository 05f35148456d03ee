"""Methods x datasets through the one trainer, then Table 1 (CSV + markdown) and Fig. 4 (PNG).

  python -m shpeft_jax.sweep --config configs/demo.py --workdir /tmp/sweep \\
      --methods full,linear,bitfit,lora,shpeft,random [--datasets digits] [--ablation table4]

Every run is `runs.run_one` on `runs.method_config(config, method, ...)` (the method's
`method_overrides`, as `main` applies them, then for the ablations `peft.estimator` / `mode` /
`lam`), in WORKDIR/<dataset>/<variant>/. A finished run leaves
results.json there and is not repeated, so an interrupted sweep resumes where it stopped. When the
config has a `pretrain` stage (the demo), it runs once, in WORKDIR/pretrain, and every run starts
from its encoder.

Outputs in WORKDIR:
  results.csv / results.md   Table 1 layout: one row per method, one F1 % column per dataset, Avg,
                             and the trainable % (the x-axis of Fig. 4)
  runs.csv                   one line per (dataset, method) with F1, accuracy, AUC, trainable count
  f1_vs_trainable.png        Fig. 4: average F1 against the trainable % (log scale)
  sweep.json                 everything above as JSON

Ablation presets (`--ablation`, comma-separated, added after `--methods`):
  table4  the importance estimators: I_ta | I_td-L1 | I_ta + I_td-L1 | I_td-L2 | I_ta + I_td-L2
          (I_ta-L1 = |w| and I_ta-L2 = w^2 rank the weights identically, so one I_ta row)
  table5  the hybrid balance lambda in 1.5, 1.2, 1.0, 0.8, 0.5 (L2 estimator)
  random  the control: SH-PEFT next to a random mask with the same k
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from shpeft_jax import utils
from shpeft_jax.errors import ConfigError
from shpeft_jax.peft import methods as methods_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py), optionally `file.py:arg`.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and the tables.")
_METHODS = flags.DEFINE_list(
    "methods", [], "peft methods to compare (default: all of Table 1 when no --ablation is given). "
    f"Known: {','.join(methods_lib.method_names())}.")
_DATASETS = flags.DEFINE_list(
    "datasets", [], "config.data.name values, one table column each (default: the config's).")
_ABLATION = flags.DEFINE_list("ablation", [], "presets: table4, table5, random.")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the results table: a method and the peft fields it changes."""
  key: str                  # Directory name and CSV id.
  label: str                # Row label.
  kind: str                 # Table 1's type column (S, A, P, S+A).
  method: str
  overrides: tuple[tuple[str, Any], ...] = ()  # (peft field, value).


def method_variant(name: str) -> Variant:
  m = methods_lib.get_method(name)
  return Variant(m.name, m.label, m.kind, m.name)


def _shpeft(key, label, **overrides) -> Variant:
  return Variant(key, label, "S", "shpeft", tuple(sorted(overrides.items())))


ABLATIONS: dict[str, tuple[Variant, ...]] = {
    # Table 4 of the paper (lambda = 1).
    "table4": (
        _shpeft("ta", "I_ta", mode="ta", estimator="l2", lam=1.0),
        _shpeft("td_l1", "I_td-L1", mode="td", estimator="l1", lam=1.0),
        _shpeft("hybrid_l1", "I_ta + I_td-L1", mode="hybrid", estimator="l1", lam=1.0),
        _shpeft("td_l2", "I_td-L2", mode="td", estimator="l2", lam=1.0),
        _shpeft("hybrid_l2", "I_ta + I_td-L2", mode="hybrid", estimator="l2", lam=1.0),
    ),
    # Table 5 of the paper (L2 estimator).
    "table5": tuple(_shpeft(f"lam_{lam:g}", f"lambda = {lam:g}", mode="hybrid", estimator="l2",
                            lam=lam) for lam in (1.5, 1.2, 1.0, 0.8, 0.5)),
    "random": (method_variant("shpeft"), method_variant("random")),
}


def build_variants(methods: Sequence[str], ablations: Sequence[str]) -> list[Variant]:
  """--methods then --ablation presets, duplicates (same key) dropped; all of Table 1 if empty."""
  unknown = [a for a in ablations if a not in ABLATIONS]
  if unknown:
    raise ConfigError(f"Unknown --ablation {unknown}; choose from {sorted(ABLATIONS)}.")
  if not methods and not ablations:
    methods = methods_lib.method_names()
  out: dict[str, Variant] = {}
  for v in [method_variant(m) for m in methods] + [v for a in ablations for v in ABLATIONS[a]]:
    out.setdefault(v.key, v)
  return list(out.values())


def variant_config(base: ml_collections.ConfigDict, variant: Variant,
                   dataset: str | None = None) -> ml_collections.ConfigDict:
  """The config of one run: `runs.method_config` with this variant's peft fields and data.name."""
  from shpeft_jax import runs  # pylint: disable=g-import-not-at-top  (imports jax)
  return runs.method_config(base, variant.method, variant.overrides, dataset)


def run_sweep(config: ml_collections.ConfigDict, workdir: str, variants: Sequence[Variant],
              datasets: Sequence[str] | None = None,
              run_fn: Callable[[ml_collections.ConfigDict, str], dict] | None = None) -> list[dict]:
  """Runs every (dataset, variant); returns one record per run (see `_record`)."""
  from shpeft_jax import runs  # pylint: disable=g-import-not-at-top  (imports jax)
  run_fn = run_fn or runs.run_one
  datasets = list(datasets or [config.data.name])
  base = runs.prepare(config, workdir)
  records = []
  for dataset in datasets:
    for v in variants:
      cfg = variant_config(base, v, dataset)
      run_dir = os.path.join(workdir, dataset, v.key)
      logging.info("sweep: %s / %s -> %s", dataset, v.label, run_dir)
      records.append(_record(dataset, v, run_fn(cfg, run_dir)))
  return records


def _record(dataset: str, v: Variant, res: dict) -> dict:
  test = res.get("test") or {}
  nan = float("nan")
  if not test:
    logging.warning("sweep: %s / %s has no test result (%s); left empty in the table.", dataset,
                    v.key, res)
  return {"dataset": dataset, "variant": v.key, "label": v.label, "type": v.kind,
          "method": v.method, "overrides": dict(v.overrides),
          "trainable": res.get("trainable"), "total": res.get("total"),
          "trainable_percent": res.get("trainable_percent", nan),
          "f1": test.get("f1_macro", nan), "accuracy": test.get("accuracy", nan),
          "auc": test.get("auc_macro", nan)}


def _mean(xs):
  xs = [x for x in xs if x is not None and not math.isnan(x)]
  return sum(xs) / len(xs) if xs else float("nan")


def table_rows(records: Sequence[dict]) -> tuple[list[str], list[dict]]:
  """(datasets, rows): one row per variant in first-seen order with F1 % per dataset and Avg."""
  datasets = list(dict.fromkeys(r["dataset"] for r in records))
  rows: dict[str, dict] = {}
  for r in records:
    row = rows.setdefault(r["variant"], {"variant": r["variant"], "label": r["label"],
                                         "type": r["type"], "method": r["method"], "f1": {},
                                         "pct": []})
    row["f1"][r["dataset"]] = 100.0 * r["f1"]
    row["pct"].append(r["trainable_percent"])
  for row in rows.values():
    row["avg"] = _mean([row["f1"].get(d, float("nan")) for d in datasets])
    row["trainable_percent"] = _mean(row.pop("pct"))
  return datasets, list(rows.values())


def _fmt(x: float, digits: int = 1) -> str:
  return "" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _fmt_pct(x: float) -> str:
  return "" if math.isnan(x) else f"{x:.4g}"


def write_tables(records: Sequence[dict], workdir: str) -> dict[str, str]:
  """results.csv / results.md (Table 1 layout) and runs.csv; returns their paths."""
  datasets, rows = table_rows(records)
  paths = {k: os.path.join(workdir, f) for k, f in
           (("csv", "results.csv"), ("md", "results.md"), ("runs", "runs.csv"))}
  with open(paths["csv"], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["method", "type", *datasets, "avg", "trainable_percent"])
    for row in rows:
      w.writerow([row["label"], row["type"], *[_fmt(row["f1"].get(d, float("nan")), 2)
                                               for d in datasets],
                  _fmt(row["avg"], 2), _fmt_pct(row["trainable_percent"])])
  lines = [f"| Method | Type | {' | '.join(datasets)} | Avg | Trainable % |",
           "|" + "---|" * 2 + "---:|" * (len(datasets) + 2)]
  for row in rows:
    cells = [_fmt(row["f1"].get(d, float("nan"))) for d in datasets]
    lines.append(f"| {row['label']} | {row['type']} | {' | '.join(cells)} | {_fmt(row['avg'])} | "
                 f"{_fmt_pct(row['trainable_percent'])} |")
  with open(paths["md"], "w") as f:
    f.write("Macro F1 (%) on the test split; trainable % of the model's parameters.\n\n")
    f.write("\n".join(lines) + "\n")
  fields = ["dataset", "variant", "label", "type", "method", "trainable", "total",
            "trainable_percent", "f1", "accuracy", "auc"]
  with open(paths["runs"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(records)
  return paths


def plot_f1_vs_trainable(records: Sequence[dict], path: str) -> str:
  """Fig. 4: average F1 (%) against trainable % (log x), one labelled point per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  _, rows = table_rows(records)
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for row in rows:
    x, y = row["trainable_percent"], row["avg"]
    if math.isnan(x) or math.isnan(y) or x <= 0:
      continue
    ours = row["method"] == "shpeft"
    ax.scatter([x], [y], s=60 if ours else 36, marker="*" if ours else "o",
               color="tab:red" if ours else "tab:blue", zorder=3)
    ax.annotate(row["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters (%)")
  ax.set_ylabel("average macro F1 (%)")
  ax.set_title("F1 vs trainable parameters")
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_outputs(records: Sequence[dict], workdir: str) -> dict[str, str]:
  os.makedirs(workdir, exist_ok=True)
  paths = write_tables(records, workdir)
  paths["png"] = plot_f1_vs_trainable(records, os.path.join(workdir, "f1_vs_trainable.png"))
  paths["json"] = os.path.join(workdir, "sweep.json")
  with open(paths["json"], "w") as f:
    json.dump({"records": list(records)}, f, indent=2, default=str)
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  utils.hide_accelerators_from_tf()
  import jax  # pylint: disable=g-import-not-at-top
  from shpeft_jax.errors import ShpeftError  # pylint: disable=g-import-not-at-top
  try:
    variants = build_variants(_METHODS.value, _ABLATION.value)
    records = run_sweep(_CONFIG.value, _WORKDIR.value, variants, _DATASETS.value)
  except ShpeftError as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    paths = write_outputs(records, _WORKDIR.value)
    with open(paths["md"]) as f:
      print(f.read(), flush=True)
    print("wrote " + ", ".join(paths.values()), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
