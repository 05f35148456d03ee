"""Per-class behaviour of a classifier: precision / recall / F1 / support, the confusion matrix and
one-vs-rest ROC curves, in pure numpy.

A missed malignant lesion is not a missed benign one, so the report shows every class, not only
the macro averages of `metrics.py`. The numbers match scikit-learn:
`precision_recall_fscore_support(labels=range(K), zero_division=0)`, `confusion_matrix`,
`roc_curve` (with its default `drop_intermediate=True`) and `roc_auc_score`; the macro average
is over the classes present in the labels or the predictions, as `f1_score(average='macro')`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from shpeft_jax.evaluation import metrics


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """[K, K] int64 counts: row = true class, column = predicted class."""
  labels = np.asarray(labels, np.int64).reshape(-1)
  preds = np.asarray(preds, np.int64).reshape(-1)
  if labels.size and (min(labels.min(), preds.min()) < 0 or
                      max(labels.max(), preds.max()) >= num_classes):
    raise ValueError(f"labels and predictions must lie in [0, {num_classes}).")
  return np.bincount(labels * num_classes + preds,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def row_normalised(cm: np.ndarray) -> np.ndarray:
  """Each row divided by its total (the recall of each true class on the diagonal); 0 rows stay 0."""
  cm = np.asarray(cm, np.float64)
  totals = cm.sum(axis=1, keepdims=True)
  return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fpr, tpr, thresholds) of a binary problem, as sklearn.metrics.roc_curve.

  Thresholds are the distinct scores in decreasing order, led by +inf (nothing predicted
  positive); points on a straight segment are dropped (sklearn's `drop_intermediate=True`), which
  leaves the area unchanged. NaN rates when one class is absent.
  """
  y_true = np.asarray(y_true, bool).reshape(-1)
  score = np.asarray(score, np.float64).reshape(-1)
  order = np.argsort(score, kind="mergesort")[::-1]
  score, y_true = score[order], y_true[order]
  # The last index of each run of equal scores: one ROC point per distinct threshold.
  last = np.r_[np.flatnonzero(np.diff(score)), score.size - 1]
  tps = np.cumsum(y_true)[last].astype(np.float64)
  fps = 1.0 + last - tps
  thresholds = score[last]
  if fps.size > 2:
    keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
    fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
  fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
  thresholds = np.r_[np.inf, thresholds]
  with np.errstate(invalid="ignore", divide="ignore"):
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
  return fpr, tpr, thresholds


def per_class_report(labels: np.ndarray, logits_or_probs: np.ndarray,
                     class_names: Sequence[str] | None = None) -> dict:
  """Everything the report shows about one evaluation, JSON-ready.

  Returns {'classes': [{'name', 'precision', 'recall', 'f1', 'support', 'auc'}] in label order,
  'macro': {...}, 'weighted': {...}, 'accuracy', 'auc_macro', 'num_examples',
  'confusion': [[counts]], 'confusion_normalised': [[row fractions]],
  'roc': {class name: {'fpr', 'tpr', 'auc'}}}. A class without positives (or negatives) has
  auc NaN and no ROC curve; binary problems get one curve per class like any other.
  """
  scores = np.asarray(logits_or_probs)
  labels = np.asarray(labels, np.int64).reshape(-1)
  if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
    raise ValueError(f"expected scores [N, K] and labels [N], got {scores.shape} and "
                     f"{labels.shape}.")
  num_classes = scores.shape[1]
  names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"{len(names)} class names for {num_classes} score columns.")
  probs = metrics._as_probs(scores)  # pylint: disable=protected-access
  preds = np.argmax(scores, axis=-1)
  cm = confusion_matrix(labels, preds, num_classes)
  tp = np.diag(cm).astype(np.float64)
  support = cm.sum(axis=1)
  predicted = cm.sum(axis=0)
  precision = _safe_div(tp, predicted)
  recall = _safe_div(tp, support)
  f1 = _safe_div(2.0 * tp, support + predicted)

  classes, roc = [], {}
  for c, name in enumerate(names):
    positives = labels == c
    auc = metrics.binary_auc(positives, probs[:, c])
    classes.append({"name": name, "precision": float(precision[c]), "recall": float(recall[c]),
                    "f1": float(f1[c]), "support": int(support[c]), "auc": auc})
    if not np.isnan(auc):
      fpr, tpr, _ = roc_curve(positives, probs[:, c])
      roc[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": auc}

  present = (support + predicted) > 0
  macro = {k: float(np.mean(v[present])) if present.any() else float("nan")
           for k, v in (("precision", precision), ("recall", recall), ("f1", f1))}
  n = int(support.sum())
  weighted = {k: float(np.sum(v * support) / n) if n else float("nan")
              for k, v in (("precision", precision), ("recall", recall), ("f1", f1))}
  return {
      "classes": classes,
      "macro": {**macro, "support": n},
      "weighted": {**weighted, "support": n},
      "accuracy": float(tp.sum() / n) if n else float("nan"),
      "auc_macro": metrics.auc_macro(labels, probs, num_classes) if n else float("nan"),
      "num_examples": n,
      "confusion": cm.tolist(),
      "confusion_normalised": row_normalised(cm).tolist(),
      "roc": roc,
  }


def format_report(report: dict, digits: int = 4) -> str:
  """A text table like sklearn's classification_report, plus accuracy and AUC."""
  width = max([len("weighted avg")] + [len(c["name"]) for c in report["classes"]])
  head = f"{'':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'auc':>9} {'support':>8}"
  lines = [head]

  def row(name, r, auc):
    a = "" if auc is None or np.isnan(auc) else f"{auc:.{digits}f}"
    return (f"{name:<{width}} {r['precision']:>9.{digits}f} {r['recall']:>9.{digits}f} "
            f"{r['f1']:>9.{digits}f} {a:>9} {r['support']:>8d}")

  for c in report["classes"]:
    lines.append(row(c["name"], c, c["auc"]))
  lines.append("")
  lines.append(f"{'accuracy':<{width}} {'':>9} {'':>9} {report['accuracy']:>9.{digits}f} "
               f"{'':>9} {report['num_examples']:>8d}")
  lines.append(row("macro avg", report["macro"], report["auc_macro"]))
  lines.append(row("weighted avg", report["weighted"], None))
  return "\n".join(lines)
