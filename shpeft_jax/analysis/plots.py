"""PNG plots of the sparsity and hybridity studies (matplotlib, Agg backend, no display needed).

Every function takes the JSON-ready result dicts of `sparsity.py` / `hybridity.py`, so a plot can be
redrawn from the saved JSON without reloading checkpoints.
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
  with utils.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
  return path


def _num(x) -> float:
  return float("nan") if x is None else float(x)


def plot_sparsity(result: Mapping[str, Any], path: str, *, title: str | None = None) -> str:
  """F1 of W_ori<-ft@k% vs k (log x), right axis in % of the full fine-tune F1.

  Dashed lines mark the fine-tuned model (100%) and the pretrained encoder under the fine-tuned
  head (k = 0), the two ends the curve must connect; the dotted line is the paper's 95% level.
  """
  plt = _plt()
  points = result["points"]
  ks = [p["k_percent"] for p in points]
  f1 = [_num(p["metrics"].get("f1")) for p in points]
  acc = [_num(p["metrics"].get("accuracy")) for p in points]
  full = _num(result["reference"]["finetuned"].get("f1"))
  floor = _num(result["reference"]["pretrained_encoder_finetuned_head"].get("f1"))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot(ks, f1, "o-", color="tab:blue", label="F1 of $W^{ori\\leftarrow ft@k\\%}$")
  ax.plot(ks, acc, "s:", color="tab:green", ms=4, alpha=0.7, label="accuracy")
  ax.axhline(full, color="tab:red", ls="--", lw=1, label=f"full fine-tune F1 = {full:.3f}")
  ax.axhline(floor, color="gray", ls="--", lw=1,
             label=f"k = 0 (pretrained encoder + FT head) F1 = {floor:.3f}")
  if full and math.isfinite(full):
    ax.axhline(0.95 * full, color="tab:red", ls=":", lw=1, label="95% of full fine-tune F1")
    sec = ax.secondary_yaxis("right", functions=(lambda y: 100.0 * y / full,
                                                 lambda p: p * full / 100.0))
    sec.set_ylabel("% of full fine-tune F1")
  ax.set_xscale("log")
  ax.set_xlabel("k: % of encoder weights taken from the fine-tuned model (top |W_ft - W_ori|)")
  ax.set_ylabel("macro F1 (test)")
  ax.set_xticks(ks)
  ax.set_xticklabels([f"{k:g}" for k in ks], fontsize=8)
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize=8, loc="upper left")  # The curve rises left to right: upper left is free.
  ax.set_title(title or f"Sparsity: {result.get('model', '')}, "
               f"{result.get('num_encoder_weights', '?')} encoder weights")
  try:
    return _save(fig, path)
  finally:
    plt.close(fig)


def plot_overlap_heatmaps(panels: Sequence[tuple[str, Mapping[str, Any]]], path: str, *,
                          title: str | None = None) -> str:
  """One heat map per (label, overlap_matrix) panel; cells show overlap % and chance % below it.

  The colour scale is shared (0..1) so panels for different k compare directly; the diagonal is 1
  by definition (a mask with itself).
  """
  plt = _plt()
  n = len(panels)
  if n == 0:
    raise ValueError("plot_overlap_heatmaps needs at least one panel.")
  size = max(len(m["tasks"]) for _, m in panels)
  cell = max(1.6, 1.15 * size)
  fig, axes = plt.subplots(1, n, figsize=(cell * n + 2.0, cell + 1.2), squeeze=False,
                           gridspec_kw={"wspace": 0.45})
  im = None
  for ax, (label, mat) in zip(axes[0], panels):
    o = np.asarray(mat["overlap"], float)
    c = np.asarray(mat["chance"], float)
    tasks = mat["tasks"]
    im = ax.imshow(o, vmin=0.0, vmax=1.0, cmap="viridis")
    same_chance = bool(np.allclose(c, c.flat[0]))
    for i in range(o.shape[0]):
      for j in range(o.shape[1]):
        color = "black" if o[i, j] > 0.6 else "white"
        if i == j:
          text = f"{100 * o[i, j]:.0f}%"
        elif same_chance:  # The chance level is in the title; show the ratio to it.
          text = f"{100 * o[i, j]:.1f}%\n{o[i, j] / c[i, j]:.3g}x chance"
        else:
          text = f"{100 * o[i, j]:.1f}%\n(chance {100 * c[i, j]:.2g}%)"
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    if same_chance:
      label = f"{label}\nchance overlap = {100 * c.flat[0]:.2g}%"
    ax.set_xticks(range(len(tasks)))
    ax.set_yticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, ha="right", fontsize=8)
    ax.set_yticklabels(tasks, fontsize=8)
    ax.set_title(label, fontsize=9)
  fig.colorbar(im, ax=list(axes[0]), fraction=0.025, pad=0.02,
               label="overlap |A ∩ B| / |A|")
  fig.suptitle(title or "Positional overlap of key weights between tasks", fontsize=10, y=1.06)
  try:
    return _save(fig, path)
  finally:
    plt.close(fig)


def plot_overlap_vs_k(per_k: Sequence[Mapping[str, Any]], path: str, *,
                      title: str | None = None) -> str:
  """Mean off-diagonal overlap vs k (log-log), against the chance line overlap = k."""
  plt = _plt()
  ks, means, lo, hi, ta = [], [], [], [], []
  for entry in per_k:
    o = np.asarray(entry["overlap"]["overlap"], float)
    off = o[~np.eye(o.shape[0], dtype=bool)]
    ks.append(entry["k_percent"])
    means.append(off.mean())
    lo.append(off.min())
    hi.append(off.max())
    if "task_agnostic" in entry:
      ta.append(np.mean([v["overlap"] for v in entry["task_agnostic"].values()]))
  order = np.argsort(ks)
  ks = np.asarray(ks)[order]
  fig, ax = plt.subplots(figsize=(6.5, 4.3))
  ax.fill_between(ks, np.asarray(lo)[order], np.asarray(hi)[order], color="tab:blue", alpha=0.2,
                  label="min..max over task pairs")
  ax.plot(ks, np.asarray(means)[order], "o-", color="tab:blue",
          label="mean overlap between tasks")
  if len(ta) == len(ks):
    ta = np.asarray(ta, float)[order]
    shown = np.where(ta > 0, ta, np.nan)  # log axis: a zero overlap is marked at the bottom.
    ax.plot(ks, shown, "s--", color="tab:orange",
            label="overlap with top-k |w| of the pretrained model (x: 0)")
    zeros = ks[ta <= 0]
    if zeros.size:
      floor = 0.5 * min(np.nanmin(shown) if np.isfinite(shown).any() else 1.0, ks.min() / 100)
      ax.plot(zeros, np.full(zeros.size, floor), "x", color="tab:orange", ms=9, mew=2)
  ax.plot(ks, ks / 100.0, "k:", label="chance (= k)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("k (% of encoder weights)")
  ax.set_ylabel("overlap |A ∩ B| / k-count")
  ax.set_xticks(ks)
  ax.set_xticklabels([f"{k:g}" for k in ks])
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title or "Hybridity: overlap of top-k changed weights vs chance", fontsize=10)
  try:
    return _save(fig, path)
  finally:
    plt.close(fig)


def plot_layer_distribution(layers: Mapping[str, Mapping[str, Any]], path: str, *,
                            title: str | None = None) -> str:
  """Grouped bars per layer and per parameter type: % of that group's weights selected, per task.

  The dashed line per task is its overall density; a bar above it means the layer is over-selected.
  """
  plt = _plt()
  tasks = list(layers)
  fig, axes = plt.subplots(1, 2, figsize=(14, 4.3), gridspec_kw={"width_ratios": [2, 1]})
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, key, xlabel in ((axes[0], "per_layer", "layer"), (axes[1], "per_type", "parameter type")):
    groups = list(layers[tasks[0]][key])
    width = 0.8 / max(1, len(tasks))
    x = np.arange(len(groups))
    for i, t in enumerate(tasks):
      vals = [100.0 * layers[t][key].get(g, {}).get("fraction", 0.0) for g in groups]
      color = colors[i % len(colors)]
      ax.bar(x + (i - (len(tasks) - 1) / 2) * width, vals, width, label=t, color=color)
      ax.axhline(100.0 * layers[t]["total"]["fraction"], color=color, ls="--", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("% of the group's weights selected (log)")
    ax.set_yscale("log")  # Densities span 0.01%..100%: small layers would vanish on a linear axis.
    ax.legend(fontsize=8)
  fig.suptitle(title or "Per-layer distribution of selected weights (dashed: overall density)",
               fontsize=10)
  fig.tight_layout()
  try:
    return _save(fig, path)
  finally:
    plt.close(fig)


def plot_task_agnostic(entries: Mapping[str, Mapping[str, Any]], path: str, *,
                       title: str | None = None) -> str:
  """Per mask: % of it inside the top-|M| weights by |w| of the pretrained model, vs chance."""
  plt = _plt()
  labels = list(entries)
  over = [100.0 * _num(entries[t]["overlap"]) for t in labels]
  chance = [100.0 * _num(entries[t]["chance"]) for t in labels]
  x = np.arange(len(labels))
  fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) + 2), 4))
  ax.bar(x - 0.2, over, 0.4, label="share of mask in top-|M| by |w|", color="tab:orange")
  ax.bar(x + 0.2, chance, 0.4, label="chance (= mask density)", color="gray")
  for xi, v in zip(x, over):
    ax.text(xi - 0.2, v, f"{v:.1f}%", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
  ax.set_ylabel("%")
  ax.legend(fontsize=8)
  ax.set_title(title or "How much of each mask the task-agnostic term |w| explains", fontsize=10)
  try:
    return _save(fig, path)
  finally:
    plt.close(fig)
