"""Metrics against scikit-learn, and over a padded, batched evaluation of the digits data."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from shpeft_jax.evaluation import metrics as M


def _sk(probs, labels):
  preds = probs.argmax(-1)
  if probs.shape[1] == 2:
    auc = roc_auc_score(labels, probs[:, 1])
  else:
    auc = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
  return {"f1_macro": f1_score(labels, preds, average="macro"),
          "accuracy": accuracy_score(labels, preds), "auc_macro": auc}


def _check(ours, ref):
  for k in ref:
    assert ours[k] == pytest.approx(ref[k], abs=1e-12), k


@pytest.mark.parametrize("k,n,seed", [(2, 57, 0), (3, 100, 1), (4, 333, 2), (5, 1000, 3)])
def test_logits_match_sklearn(k, n, seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  labels[:k] = np.arange(k)  # every class present (sklearn's OvR AUC requires it)
  logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
  _check(M.classification_metrics(logits, labels, k), _sk(M.softmax(logits), labels))


@pytest.mark.parametrize("k", [2, 4])
def test_ties_match_sklearn(k):
  rng = np.random.default_rng(7)
  n = 400
  labels = rng.integers(0, k, n)
  # Probabilities on a coarse grid: many tied scores per class column.
  raw = rng.integers(1, 4, (n, k)).astype(np.float64)
  probs = raw / raw.sum(-1, keepdims=True)
  ours = M.classification_metrics(probs, labels, k)
  _check(ours, _sk(probs, labels))


def test_probabilities_are_not_softmaxed_again():
  rng = np.random.default_rng(1)
  labels = np.r_[0, 1, 2, rng.integers(0, 3, 97)]
  probs = M.softmax(rng.normal(size=(100, 3)) * 3)
  _check(M.classification_metrics(probs, labels, 3), _sk(probs, labels))


def test_valid_mask_drops_padding():
  rng = np.random.default_rng(2)
  labels = np.r_[0, 1, 2, rng.integers(0, 3, 77)]
  logits = rng.normal(size=(80, 3))
  pad_logits = np.concatenate([logits, 100 * np.ones((20, 3))])
  pad_labels = np.concatenate([labels, np.zeros(20, int)])
  valid = np.r_[np.ones(80, bool), np.zeros(20, bool)]
  _check(M.classification_metrics(pad_logits, pad_labels, 3, valid=valid),
         _sk(M.softmax(logits), labels))


def test_f1_with_unpredicted_and_absent_classes():
  labels = np.array([0, 0, 1, 1, 2, 2])
  preds = np.array([0, 0, 0, 1, 1, 1])  # class 2 never predicted
  logits = np.eye(4)[preds] * 5  # 4 classes in the model, class 3 absent everywhere
  ours = M.classification_metrics(logits, labels, 4)
  assert ours["f1_macro"] == pytest.approx(f1_score(labels, preds, average="macro"))
  # By hand, F1 = 2tp / (2tp + fp + fn): class 0 (tp 2, fp 1, fn 0) = 0.8, class 1 (tp 1, fp 2,
  # fn 1) = 0.4, class 2 (never predicted) = 0; class 3 is in neither -> left out: 1.2 / 3.
  assert ours["f1_macro"] == pytest.approx(1.2 / 3)
  assert ours["accuracy"] == pytest.approx(3 / 6)


def test_binary_auc_by_hand():
  # Positives scored 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, tie, 0.5>0.1) -> 3.5/4.
  assert M.binary_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.5, 0.5, 0.1])) == 3.5 / 4


def test_eval_iterator_batches_that_do_not_divide_the_set():
  """Metrics of a padded, batched eval equal the metrics of the unbatched set."""
  from shpeft_jax.data import default_data_config, demo
  from shpeft_jax.data import input_pipeline as ip
  c = default_data_config()
  c.name, c.task = "digits", "target"
  images, labels = demo.digits_splits("target")["test"]
  n = len(labels)
  w = np.random.default_rng(0).normal(size=(8 * 8 * 3, 5))

  def model(x):  # a fixed linear "classifier" on the pixels
    return x.reshape(len(x), -1).astype(np.float64) @ w

  ref_x = images[..., None].repeat(3, -1)
  expected = M.classification_metrics(model(ref_x), labels, 5)
  for batch_size in (32, 37):
    assert n % batch_size
    all_logits, all_labels, all_valid = [], [], []
    for b in ip.make_eval_iterator(c, split="test", global_batch_size=batch_size, image_size=8):
      all_logits.append(model(b["image"]))
      all_labels.append(b["label"])
      all_valid.append(b["valid"])
    valid = np.concatenate(all_valid)
    assert valid.sum() == n and len(valid) == -(-n // batch_size) * batch_size
    got = M.classification_metrics(np.concatenate(all_logits), np.concatenate(all_labels), 5,
                                   valid=valid)
    for k in expected:
      assert got[k] == pytest.approx(expected[k], abs=1e-6)
