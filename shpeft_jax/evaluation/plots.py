"""PNG figures of one evaluation and one training run (matplotlib, Agg backend, no display).

Each function takes JSON-ready data (`per_class.per_class_report`'s dict, metrics.jsonl records),
so a figure can be redrawn from saved files without the model. Every write is atomic.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from shpeft_jax import utils


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> str:
  plt = _plt()
  try:
    with utils.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=110, bbox_inches="tight")
  finally:
    plt.close(fig)
  return path


def _short(name: str, n: int = 14) -> str:
  return name if len(name) <= n else name[:n - 1] + "\u2026"


def plot_confusion(report: Mapping[str, Any], path: str, *, title: str = "") -> str:
  """Two panels: counts, and rows normalised to 1 (the recall of each true class on the diagonal)."""
  plt = _plt()
  names = [_short(c["name"]) for c in report["classes"]]
  k = len(names)
  counts = np.asarray(report["confusion"], np.int64)
  norm = np.asarray(report["confusion_normalised"], np.float64)
  side = max(3.6, 0.55 * k + 2.2)
  fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.0, side))
  for ax, mat, label, fmt in ((axes[0], counts, "count", "d"),
                              (axes[1], norm, "fraction of the true class", ".2f")):
    vmax = max(float(mat.max()), 1e-12) if label == "count" else 1.0
    im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 20:
      for i in range(k):
        for j in range(k):
          v = mat[i, j]
          ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                  color="white" if v > 0.6 * vmax else "black")
  axes[0].set_title("counts")
  axes[1].set_title("row-normalised")
  fig.suptitle(title or f"Confusion matrix ({report['num_examples']} examples)")
  fig.tight_layout()
  return _save(fig, path)


def plot_roc(report: Mapping[str, Any], path: str, *, title: str = "") -> str:
  """One-vs-rest ROC curve of every class that has positives and negatives, AUC in the legend."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.8, 5.2))
  cmap = plt.get_cmap("tab10" if len(report["roc"]) <= 10 else "tab20")
  for i, (name, curve) in enumerate(report["roc"].items()):
    ax.plot(curve["fpr"], curve["tpr"], lw=1.6, color=cmap(i % cmap.N),
            label=f"{_short(name, 20)} (AUC {curve['auc']:.3f})", drawstyle="default")
  ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance")
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_aspect("equal")
  ax.set_xlabel("false positive rate (1 - specificity)")
  ax.set_ylabel("true positive rate (sensitivity)")
  auc = report.get("auc_macro")
  ax.set_title(title or (f"One-vs-rest ROC, macro AUC {auc:.3f}" if auc is not None
                         and not math.isnan(auc) else "One-vs-rest ROC"))
  ax.legend(loc="lower right", fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)


def plot_per_class_bars(per_method: Mapping[str, Mapping[str, Any]], path: str, *,
                        metric: str = "f1", title: str = "") -> str:
  """Grouped bars: `metric` of every class, one bar per method (the sweep comparison)."""
  plt = _plt()
  methods = list(per_method)
  names = [c["name"] for c in next(iter(per_method.values()))["classes"]]
  k, m = len(names), len(methods)
  width = 0.8 / max(m, 1)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * k * max(m, 2) * 0.5 + 2), 4.2))
  cmap = plt.get_cmap("tab10")
  for i, method in enumerate(methods):
    values = [100.0 * c[metric] for c in per_method[method]["classes"]]
    sd = [100.0 * c.get(f"{metric}_sd", 0.0) for c in per_method[method]["classes"]]
    ax.bar(np.arange(k) + (i - (m - 1) / 2) * width, values, width, label=method,
           color=cmap(i % 10), yerr=sd if any(sd) else None, capsize=2,
           error_kw={"elinewidth": 0.9, "ecolor": "0.2"})
  ax.set_xticks(range(k), [_short(n) for n in names], rotation=30 if k > 6 else 0,
                ha="right" if k > 6 else "center")
  ax.set_ylabel(f"{ {'f1': 'F1', 'auc': 'AUROC', 'ap': 'AP'}.get(metric, metric)} (%)")
  ax.set_ylim(0, 118)  # Room above 100 for the legend.
  ax.set_yticks(range(0, 101, 20))
  ax.set_title(title or f"Per-class {metric} by method")
  ax.legend(fontsize=8, ncols=min(m, 4), loc="upper center")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)


def _series(records: Sequence[Mapping[str, Any]], kind: str, key: str):
  pts = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r
         and r[key] is not None and math.isfinite(float(r[key]))]
  return [p[0] for p in pts], [float(p[1]) for p in pts]


_STYLES = ("-", "--", "-.", ":")


def plot_training_curves(runs: Mapping[str, Any], path: str, *, title: str = "") -> str:
  """Train loss, learning rate and (when validated more than once) validation metrics per step.

  `runs` maps a label to its metrics.jsonl records, or to a list of such lists (the seeds of one
  method: one colour, a line per seed). Lines that coincide (the same learning rate schedule)
  stay visible: each label has its own dash pattern and marker.
  """
  plt = _plt()
  runs = {k: (v if v and isinstance(v[0], (list, tuple)) else [v]) for k, v in runs.items()}
  single = len(runs) == 1 and len(next(iter(runs.values()))) == 1
  val_points = max((len(_series(r, "val", "f1_macro")[0]) for rs in runs.values() for r in rs),
                   default=0)
  panels = 3 if val_points > 1 else 2  # one validation point is no curve: no panel
  fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.0))
  many = len(runs) > 6  # One legend beside the figure instead of one over each panel.
  cmap = plt.get_cmap("tab20" if len(runs) > 10 else "tab10")
  for i, (label, seeds) in enumerate(runs.items()):
    color, style = cmap(i % cmap.N), _STYLES[i % len(_STYLES)]
    for j, records in enumerate(seeds):
      name = label if j == 0 else None
      alpha = 1.0 if len(seeds) == 1 else 0.75
      x, y = _series(records, "train", "loss")
      if x:
        axes[0].plot(x, y, color=color, lw=1.2, alpha=alpha, label=name)
      x, y = _series(records, "train", "lr")
      if x and j == 0:  # every seed of a method has the same schedule
        axes[1].plot(x, y, color=color, lw=1.6, ls=style, marker="os^vDP"[i % 6],
                     markevery=max(1, len(x) // 8), ms=4, label=name)
      if panels == 3:
        keys = (("f1_macro", "-"), ("accuracy", "--"), ("auc_macro", ":")) if single else (
            ("f1_macro", style),)
        for key, ls in keys:
          x, y = _series(records, "val", key)
          if x:
            axes[2].plot(x, [100 * v for v in y], ls=ls, marker="o", ms=3, lw=1.2, alpha=alpha,
                         color=cmap(("f1_macro", "accuracy", "auc_macro").index(key)) if single
                         else color, label=key if single else name)
  axes[0].set_title("training loss" + ("" if single else " (every seed)"))
  axes[0].set_yscale("log")
  axes[1].set_title("learning rate")
  lrs = [v for line in axes[1].get_lines() for v in line.get_ydata() if v > 0]
  if lrs and max(lrs) / min(lrs) > 1e3 and not single:  # e.g. a linear probe's lr of 100
    axes[1].set_yscale("log")
    axes[1].set_title("learning rate (log scale)")
  if panels == 3:
    axes[2].set_title("validation (%)" if single else "validation macro F1 (%)")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0] and not many:
      ax.legend(fontsize=7)
  fig.suptitle(title or "Training curves")
  fig.tight_layout()
  if many:
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  return _save(fig, path)
