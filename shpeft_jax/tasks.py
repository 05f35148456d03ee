"""Task kinds: what a label is, and everything that follows from it, resolved once as a value.

A dataset's `DatasetInfo.task` names its kind; `of(name)` gives the `Task` that the trainer, the
SH-PEFT score, the evaluator, best-checkpoint selection, the sweep, predict and report read
(like a `PeftMethod`: no `if multi_label` anywhere else).

- `single_label` (the paper): label = class index; softmax cross-entropy; macro F1 headline
  (accuracy, macro one-vs-rest AUC too); the predicted class is the argmax.
- `multi_label` (chest X-ray tables, ChestMNIST): label = one value per finding, 1 positive,
  0 negative, -1 unknown; one sigmoid per finding with binary cross-entropy (optional per-finding
  positive weights; unknown elements are masked out of the loss and of every metric); headline
  mean AUROC (`auc_macro`: the macro average of the per-finding AUROCs, as
  `sklearn.metrics.roc_auc_score(average='macro')`), with per-finding average precision and mAP,
  per-finding F1 at a threshold chosen on validation and macro F1, and exact-match accuracy.
  A finding with a single class among its known labels in a split has no AUROC / AP / F1 there:
  reported as undefined (NaN, listed in `undefined`) and left out of the macro averages.

Every task's metrics carry the same three scalars (`f1_macro`, `accuracy`, `auc_macro`), so
logs, metric files and tables read them alike; `Task.headline` names the one that chooses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shpeft_jax.errors import CheckpointError, ConfigError
from shpeft_jax.evaluation import metrics as metrics_lib

SINGLE_LABEL = "single_label"
MULTI_LABEL = "multi_label"
DEFAULT_THRESHOLD = 0.5


def _nanmean(values) -> float:
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else float("nan")


# ---------------------------------------------------------------------------------------------
# Per-finding binary metrics (numpy; tests check them against scikit-learn).


def _ranked(y: np.ndarray, score: np.ndarray):
  """Scores in decreasing order grouped by distinct value: (thresholds, tps, fps) per group."""
  order = np.argsort(-score, kind="mergesort")
  s, y = score[order], y[order].astype(np.float64)
  last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # Last index of every distinct value.
  tps = np.cumsum(y)[last]
  return s[last], tps, (last + 1) - tps


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
  """sum_n (R_n - R_{n-1}) P_n over the distinct thresholds (sklearn's average_precision_score);
  NaN without positives."""
  y = np.asarray(y, bool)
  if not y.any():
    return float("nan")
  _, tps, fps = _ranked(y, np.asarray(score, np.float64))
  precision, recall = tps / (tps + fps), tps / tps[-1]
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_f1_threshold(y: np.ndarray, score: np.ndarray) -> float:
  """The threshold t (predict positive when score >= t) with the highest F1 on (y, score); among
  equal F1 the highest t. DEFAULT_THRESHOLD when y has one class only."""
  y = np.asarray(y, bool)
  if y.all() or not y.any():
    return DEFAULT_THRESHOLD
  thresholds, tps, fps = _ranked(y, np.asarray(score, np.float64))
  f1 = 2.0 * tps / (tps + fps + y.sum())
  return float(thresholds[int(np.argmax(f1))])  # argmax: the first (highest t) of equal F1.


def binary_f1(y: np.ndarray, pred: np.ndarray) -> float:
  tp = float(np.sum(y & pred))
  den = float(np.sum(y) + np.sum(pred))
  return 2.0 * tp / den if den else float("nan")


# ---------------------------------------------------------------------------------------------
# The task kinds.


@dataclasses.dataclass(frozen=True)
class Task:
  """What the labels of a dataset are; every consumer reads its fields and methods."""
  name: str
  headline: str  # The metric (key) that picks best checkpoints and learning rates.
  headline_title: str  # How tables and pages name it.
  headline_short: str  # Its short name (progress bar, table columns).
  label_title: str  # 'class' / 'finding'.
  uses_thresholds: bool  # Decisions at per-label thresholds chosen on validation.
  has_confusion: bool  # A confusion matrix is meaningful.
  class_metric: str  # The per-class / per-finding metric that reports rank and draw ('f1', 'auc').

  # Training.
  def loss(self, logits, labels, valid, pos_weight=None):
    """Mean loss over the batch's valid examples (jnp; jit-able)."""
    raise NotImplementedError

  def check_pos_weight(self, pos_weight) -> None:
    if pos_weight is not None:
      raise ConfigError(f"train.pos_weight is for multi-label datasets; this one is {self.name}. "
                        "Leave train.pos_weight empty.")

  # Evaluation (numpy).
  def probabilities(self, logits: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def thresholds(self, logits: np.ndarray, labels: np.ndarray) -> list[float] | None:
    """Per-label decision thresholds chosen on (logits, labels); None if the task has none."""
    return None

  def metrics(self, logits: np.ndarray, labels: np.ndarray, valid: np.ndarray | None = None,
              thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    raise NotImplementedError

  def report(self, labels: np.ndarray, logits: np.ndarray, names: Sequence[str],
             thresholds: Sequence[float] | None = None) -> dict:
    """The per-class / per-finding report (`evaluation.per_class`'s layout)."""
    raise NotImplementedError

  def report_text(self, report: dict) -> str:
    """`report` as a text table (sklearn's classification_report style)."""
    raise NotImplementedError

  def summary(self, m: dict) -> str:
    """One console line of test metrics (%), the headline first."""
    raise NotImplementedError

  def decisions(self, probs: np.ndarray, names: Sequence[str],
                thresholds: Sequence[float] | None = None) -> list[list[str]]:
    """What predict writes as the prediction of each row: the names predicted (one class; the
    findings at or above their thresholds, possibly none)."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SingleLabel(Task):
  """Softmax over classes (the paper's six datasets)."""

  def loss(self, logits, labels, valid, pos_weight=None):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    w = valid.astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

  def probabilities(self, logits):
    return metrics_lib.softmax(np.asarray(logits, np.float64))

  def metrics(self, logits, labels, valid=None, thresholds=None):
    out = metrics_lib.classification_metrics(logits, labels, np.shape(logits)[-1], valid=valid)
    return {k: float(v) for k, v in out.items()}

  def report(self, labels, logits, names, thresholds=None):
    from shpeft_jax.evaluation import per_class  # pylint: disable=g-import-not-at-top
    return per_class.per_class_report(labels, logits, names)

  def report_text(self, report):
    from shpeft_jax.evaluation import per_class  # pylint: disable=g-import-not-at-top
    return per_class.format_report(report)

  def summary(self, m):
    return (f"F1 {100 * m['f1_macro']:.2f}  accuracy {100 * m['accuracy']:.2f}  "
            f"AUC {100 * m['auc_macro']:.2f}")

  def decisions(self, probs, names, thresholds=None):
    return [[names[i]] for i in np.argmax(probs, axis=-1)]


@dataclasses.dataclass(frozen=True)
class MultiLabel(Task):
  """One sigmoid per finding; -1 labels are unknown and count nowhere."""

  def loss(self, logits, labels, valid, pos_weight=None):
    known = (labels >= 0) & valid[:, None]
    y = jnp.where(known, labels, 0.0)
    # -[w y log s(x) + (1 - y) log(1 - s(x))] (torch's BCEWithLogitsLoss with pos_weight w).
    log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
    w = 1.0 if pos_weight is None else jnp.asarray(pos_weight, jnp.float32)
    bce = -(w * y * log_p + (1.0 - y) * log_not_p)
    k = known.astype(jnp.float32)
    return jnp.sum(jnp.where(known, bce, 0.0)) / jnp.maximum(jnp.sum(k), 1.0)

  def check_pos_weight(self, pos_weight) -> None:
    return None

  def probabilities(self, logits):
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))

  def thresholds(self, logits, labels):
    p, y = self.probabilities(logits), np.asarray(labels, np.float64)
    return [best_f1_threshold(y[y[:, j] >= 0, j] > 0.5, p[y[:, j] >= 0, j])
            for j in range(p.shape[1])]

  def _columns(self, logits, labels, valid, thresholds):
    logits, labels = np.asarray(logits), np.asarray(labels, np.float64)
    if logits.ndim != 2 or labels.shape != logits.shape:
      raise ValueError(f"expected logits and labels [N, L], got {logits.shape} and "
                       f"{labels.shape}.")
    if valid is not None:
      keep = np.asarray(valid, bool)
      logits, labels = logits[keep], labels[keep]
    p = self.probabilities(logits)
    t = np.full(p.shape[1], DEFAULT_THRESHOLD) if thresholds is None else np.asarray(thresholds)
    if t.shape != (p.shape[1],):
      raise ValueError(f"{t.shape[0]} thresholds for {p.shape[1]} findings.")
    cols = []
    for j in range(p.shape[1]):
      known = labels[:, j] >= 0
      y, s = labels[known, j] > 0.5, p[known, j]
      defined = bool(y.any() and not y.all())
      cols.append({"y": y, "score": s, "pred": s >= t[j], "defined": defined,
                   "threshold": float(t[j])})
    return p, labels, cols

  def metrics(self, logits, labels, valid=None, thresholds=None):
    return self._metrics(*self._columns(logits, labels, valid, thresholds))

  def _metrics(self, p, labels, cols):
    nan = float("nan")
    auc = [metrics_lib.binary_auc(c["y"], c["score"]) if c["defined"] else nan for c in cols]
    ap = [average_precision(c["y"], c["score"]) if c["defined"] else nan for c in cols]
    f1 = [binary_f1(c["y"], c["pred"]) if c["defined"] else nan for c in cols]
    known = labels >= 0
    exact = np.all(~known | ((p >= np.asarray([c["threshold"] for c in cols])) == (labels > 0.5)),
                   axis=1)
    return {"auc_macro": _nanmean(auc), "map": _nanmean(ap), "f1_macro": _nanmean(f1),
            "accuracy": float(exact.mean()) if len(exact) else nan,
            "auc_per_label": auc, "ap_per_label": ap, "f1_per_label": f1,
            "thresholds": [c["threshold"] for c in cols],
            "undefined": [j for j, c in enumerate(cols) if not c["defined"]]}

  def report(self, labels, logits, names, thresholds=None):
    from shpeft_jax.evaluation import per_class  # pylint: disable=g-import-not-at-top
    names = list(names)
    p, labels, cols = self._columns(logits, labels, None, thresholds)
    if len(names) != len(cols):
      raise ValueError(f"{len(names)} finding names for {len(cols)} score columns.")
    m = self._metrics(p, labels, cols)
    classes, roc = [], {}
    for j, (name, c) in enumerate(zip(names, cols)):
      tp = float(np.sum(c["y"] & c["pred"]))
      npred, npos = float(np.sum(c["pred"])), int(np.sum(c["y"]))
      classes.append({
          "name": name, "precision": tp / npred if npred else float("nan"),
          "recall": tp / npos if npos else float("nan"), "f1": m["f1_per_label"][j],
          "support": npos, "negatives": int(len(c["y"]) - npos), "auc": m["auc_per_label"][j],
          "ap": m["ap_per_label"][j], "threshold": c["threshold"]})
      if c["defined"]:
        fpr, tpr, _ = per_class.roc_curve(c["y"], c["score"])
        roc[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": m["auc_per_label"][j]}
    macro = {k: _nanmean([c[k] for c in classes]) for k in ("precision", "recall", "f1", "ap")}
    return {"task": self.name, "classes": classes, "macro": {**macro, "support": len(p)},
            "accuracy": m["accuracy"], "auc_macro": m["auc_macro"], "map": m["map"],
            "num_examples": len(p), "roc": roc,
            "undefined": [names[j] for j in m["undefined"]]}

  def report_text(self, report, digits: int = 4):
    width = max([len("macro avg")] + [len(c["name"]) for c in report["classes"]])
    f = lambda x: "" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"
    head = (f"{'':<{width}} {'auroc':>9} {'ap':>9} {'f1':>9} {'threshold':>9} {'precision':>9} "
            f"{'recall':>9} {'pos':>7} {'neg':>7}")
    lines = [head]
    for c in report["classes"]:
      lines.append(f"{c['name']:<{width}} {f(c['auc']):>9} {f(c['ap']):>9} {f(c['f1']):>9} "
                   f"{f(c['threshold']):>9} {f(c['precision']):>9} {f(c['recall']):>9} "
                   f"{c['support']:>7d} {c['negatives']:>7d}")
    m = report["macro"]
    lines += ["", f"{'macro avg':<{width}} {f(report['auc_macro']):>9} {f(report['map']):>9} "
              f"{f(m['f1']):>9} {'':>9} {f(m['precision']):>9} {f(m['recall']):>9}",
              f"{'exact match':<{width}} {'':>9} {'':>9} {f(report['accuracy']):>9} "
              f"{'':>9} {'':>9} {'':>9} {report['num_examples']:>7d}"]
    if report.get("undefined"):
      lines.append(f"undefined (one class only among known labels): "
                   f"{', '.join(report['undefined'])}")
    return "\n".join(lines)

  def summary(self, m):
    return (f"mean AUROC {100 * m['auc_macro']:.2f}  mAP {100 * m['map']:.2f}  macro F1 "
            f"{100 * m['f1_macro']:.2f}  exact match {100 * m['accuracy']:.2f}")

  def decisions(self, probs, names, thresholds=None):
    t = np.full(len(names), DEFAULT_THRESHOLD) if thresholds is None else np.asarray(thresholds)
    return [[n for n, on in zip(names, row) if on] for row in probs >= t]


TASKS = {
    SINGLE_LABEL: SingleLabel(SINGLE_LABEL, headline="f1_macro", headline_title="macro F1",
                              headline_short="F1",
                              label_title="class", uses_thresholds=False, has_confusion=True,
                              class_metric="f1"),
    MULTI_LABEL: MultiLabel(MULTI_LABEL, headline="auc_macro", headline_title="mean AUROC",
                            headline_short="AUROC",
                            label_title="finding", uses_thresholds=True, has_confusion=False,
                            class_metric="auc"),
}


def of(name: str | None) -> Task:
  """The task kind named `name` (None: single_label, what checkpoints before task kinds were)."""
  task = TASKS.get(name or SINGLE_LABEL)
  if task is None:
    raise ConfigError(f"unknown task kind {name!r}; known: {sorted(TASKS)}.")
  return task


def of_meta(meta: dict) -> Task:
  """The task of a checkpoint's meta.json."""
  try:
    return of(meta.get("task"))
  except ConfigError as e:
    raise CheckpointError(f"meta.json: {e}") from e


def pos_weight(config, task: Task, num_labels: int, train_labels_fn) -> np.ndarray | None:
  """train.pos_weight resolved: None, or one weight per finding (BCE's positive-class weight).

  '': none. 'balanced': negatives / positives of every finding among the known labels of the
  train split (`train_labels_fn()` -> [N, L]). 'w1,w2,...': one weight per finding, as given.
  """
  value = str(config.train.get("pos_weight", "") or "").strip()
  if not value:
    return None
  task.check_pos_weight(value)
  if value == "balanced":
    y = np.asarray(train_labels_fn(), np.float64)
    pos, neg = (y > 0.5).sum(0), (y == 0).sum(0)
    if (pos == 0).any():
      raise ConfigError(f"train.pos_weight='balanced': findings {np.flatnonzero(pos == 0).tolist()}"
                        " have no positive example in the train split.")
    return (neg / pos).astype(np.float32)
  try:
    w = np.asarray([float(x) for x in value.split(",")], np.float32)
  except ValueError:
    w = np.zeros(0, np.float32)
  if w.shape != (num_labels,) or not np.isfinite(w).all() or (w <= 0).any():
    raise ConfigError(f"train.pos_weight={value!r}: give '' (none), 'balanced', or {num_labels} "
                      "positive numbers separated by commas (one per finding).")
  return w
