"""Classification metrics over a whole evaluation set: macro F1 (the paper's main number),
accuracy and macro one-vs-rest AUC, in pure numpy.

They match scikit-learn (`f1_score(average='macro')`, `accuracy_score`,
`roc_auc_score(multi_class='ovr', average='macro')`) without depending on it at run time.
Metrics are computed once over all collected predictions, never averaged over batches: macro F1
and AUC are not batch-decomposable.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _as_probs(logits_or_probs: np.ndarray) -> np.ndarray:
  """Rows that already are distributions are kept; anything else goes through a softmax.

  AUC ranks each class's column across examples, and that ranking changes under softmax, so the
  score must be the probability (as sklearn is given it), not the raw logit.
  """
  x = np.asarray(logits_or_probs, dtype=np.float64)
  if x.size and x.min() >= 0.0 and x.max() <= 1.0 and np.allclose(x.sum(-1), 1.0, atol=1e-4):
    return x
  return softmax(x)


def _midranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks with ties given their average rank."""
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  # Start of each run of equal values.
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], len(x)]
  avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
  ranks_sorted = np.repeat(avg, ends - starts)
  ranks = np.empty(len(x), dtype=np.float64)
  ranks[order] = ranks_sorted
  return ranks


def binary_auc(y_true: np.ndarray, score: np.ndarray) -> float:
  """ROC AUC = P(score_pos > score_neg) + 0.5 P(equal) (Mann-Whitney U); NaN if one class only.

  Identical to the trapezoidal area under the ROC curve with tied scores grouped, which is what
  sklearn computes.
  """
  y_true = np.asarray(y_true, dtype=bool)
  n_pos = int(y_true.sum())
  n_neg = len(y_true) - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = _midranks(np.asarray(score, dtype=np.float64))
  return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def f1_macro(labels: np.ndarray, preds: np.ndarray) -> float:
  """Unweighted mean of per-class F1 over the classes present in labels or predictions.

  That class set is sklearn's default (`labels=None`); a class that is predicted but never true (or
  the reverse) has F1 0.
  """
  classes = np.union1d(labels, preds)
  scores = []
  for c in classes:
    tp = np.sum((preds == c) & (labels == c))
    fp = np.sum((preds == c) & (labels != c))
    fn = np.sum((preds != c) & (labels == c))
    scores.append(2.0 * tp / (2.0 * tp + fp + fn))
  return float(np.mean(scores)) if scores else float("nan")


def auc_macro(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> float:
  """Macro one-vs-rest AUC; binary problems use the positive class's score only (as sklearn).

  Classes without positive (or without negative) examples have no AUC and are left out of the
  mean (sklearn raises instead); NaN when no class has one.
  """
  if num_classes == 2:
    return binary_auc(labels == 1, probs[:, 1])
  aucs = [binary_auc(labels == c, probs[:, c]) for c in range(num_classes)]
  aucs = [a for a in aucs if not np.isnan(a)]
  return float(np.mean(aucs)) if aucs else float("nan")


def classification_metrics(logits_or_probs: np.ndarray, labels: np.ndarray, num_classes: int,
                           valid: np.ndarray | None = None) -> dict[str, float]:
  """{'f1_macro', 'accuracy', 'auc_macro'} over every example whose `valid` is True.

  Args:
    logits_or_probs: [N, num_classes] logits, or probabilities (rows in [0, 1] summing to 1).
    labels: [N] integer labels.
    num_classes: number of classes of the task.
    valid: optional [N] bool; False rows (eval padding) are dropped.
  """
  scores = np.asarray(logits_or_probs)
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  if scores.ndim != 2 or scores.shape[1] != num_classes or scores.shape[0] != labels.shape[0]:
    raise ValueError(f"expected scores [N, {num_classes}] and labels [N], got {scores.shape} and "
                     f"{labels.shape}")
  if valid is not None:
    keep = np.asarray(valid, dtype=bool).reshape(-1)
    scores, labels = scores[keep], labels[keep]
  if labels.size == 0:
    return {"f1_macro": float("nan"), "accuracy": float("nan"), "auc_macro": float("nan")}
  probs = _as_probs(scores)
  preds = np.argmax(scores, axis=-1)
  return {
      "f1_macro": f1_macro(labels, preds),
      "accuracy": float(np.mean(preds == labels)),
      "auc_macro": auc_macro(labels, probs, num_classes),
  }
