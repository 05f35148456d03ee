"""Per-class metrics, confusion matrix and ROC curves against scikit-learn."""

import numpy as np
import pytest
from sklearn import metrics as skm

from shpeft_jax.evaluation import metrics as M
from shpeft_jax.evaluation import per_class


def _fixture(k, n, seed, coarse=False, absent=None):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  if absent is not None:
    labels[labels == absent] = (absent + 1) % k
  if coarse:  # Many tied scores: the ROC thresholds must group them like sklearn does.
    logits = rng.integers(0, 3, (n, k)).astype(np.float64) + np.eye(k)[labels]
  else:
    logits = rng.normal(size=(n, k)) + 1.2 * np.eye(k)[labels]
  return labels, logits


@pytest.mark.parametrize("k,n,seed,coarse,absent", [
    (2, 61, 0, False, None), (3, 150, 1, False, None), (5, 400, 2, True, None),
    (4, 90, 3, False, 2)])
def test_matches_sklearn(k, n, seed, coarse, absent):
  labels, logits = _fixture(k, n, seed, coarse, absent)
  probs = M.softmax(logits)
  preds = logits.argmax(-1)
  names = [f"class{c}" for c in range(k)]
  rep = per_class.per_class_report(labels, logits, names)

  p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=range(k), zero_division=0)
  np.testing.assert_allclose([c["precision"] for c in rep["classes"]], p, atol=1e-12)
  np.testing.assert_allclose([c["recall"] for c in rep["classes"]], r, atol=1e-12)
  np.testing.assert_allclose([c["f1"] for c in rep["classes"]], f, atol=1e-12)
  np.testing.assert_array_equal([c["support"] for c in rep["classes"]], s)
  for avg in ("macro", "weighted"):
    ref = skm.precision_recall_fscore_support(labels, preds, average=avg, zero_division=0)
    assert [rep[avg]["precision"], rep[avg]["recall"], rep[avg]["f1"]] == pytest.approx(
        ref[:3], abs=1e-12), avg
  assert rep["macro"]["f1"] == pytest.approx(M.f1_macro(labels, preds), abs=1e-12)
  assert rep["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds), abs=1e-12)

  np.testing.assert_array_equal(rep["confusion"], skm.confusion_matrix(labels, preds,
                                                                        labels=range(k)))
  np.testing.assert_allclose(rep["confusion_normalised"], np.nan_to_num(skm.confusion_matrix(
      labels, preds, labels=range(k), normalize="true")), atol=1e-12)

  for c in range(k):
    if c == absent:
      assert np.isnan(rep["classes"][c]["auc"]) and names[c] not in rep["roc"]
      continue
    fpr, tpr, thr = skm.roc_curve(labels == c, probs[:, c])
    ours = rep["roc"][names[c]]
    np.testing.assert_allclose(ours["fpr"], fpr, atol=1e-12)
    np.testing.assert_allclose(ours["tpr"], tpr, atol=1e-12)
    auc = skm.roc_auc_score(labels == c, probs[:, c])
    assert ours["auc"] == pytest.approx(auc, abs=1e-12)
    assert rep["classes"][c]["auc"] == pytest.approx(skm.auc(fpr, tpr), abs=1e-12)
    f_ours, t_ours, th_ours = per_class.roc_curve(labels == c, probs[:, c])
    np.testing.assert_array_equal(th_ours, thr)


def test_roc_curve_hand_computed():
  # Scores 0.9 (pos), 0.8 (neg), 0.8 (pos), 0.1 (neg): a tie at 0.8 makes one diagonal step.
  fpr, tpr, thr = per_class.roc_curve([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.1])
  np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 1.0])
  np.testing.assert_allclose(tpr, [0.0, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.1])


def test_class_never_predicted_or_never_true():
  labels = np.array([0, 0, 1, 1, 2])
  logits = np.eye(3)[[0, 0, 0, 1, 1]] * 5.0  # Class 2 is never predicted.
  rep = per_class.per_class_report(labels, logits, ["a", "b", "c"])
  c = rep["classes"][2]
  assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)
  assert rep["confusion"] == [[2, 0, 0], [1, 1, 0], [0, 1, 0]]
  text = per_class.format_report(rep)
  assert "macro avg" in text and text.count("\n") == 7


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match="class names"):
    per_class.per_class_report(np.zeros(3), np.zeros((3, 2)), ["a"])
  with pytest.raises(ValueError, match="expected scores"):
    per_class.per_class_report(np.zeros(4), np.zeros((3, 2)))
