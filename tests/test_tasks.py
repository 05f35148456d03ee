"""Task kinds: multi-label metrics against scikit-learn, the BCE against PyTorch's
BCEWithLogitsLoss, thresholds against a brute-force search, the BCE SH-PEFT score against a
per-batch Python loop, and the config / checkpoint faults."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from sklearn import metrics as skm

from shpeft_jax import tasks
from shpeft_jax import train
from shpeft_jax.errors import CheckpointError, ConfigError
from shpeft_jax.models import clip_vit
from shpeft_jax.peft import importance as imp
from shpeft_jax.utils import flatten_names

MULTI, SINGLE = tasks.of("multi_label"), tasks.of("single_label")


def _multi_label_data(n=60, labels=5, seed=0, unknown=0.15):
  rng = np.random.default_rng(seed)
  y = (rng.random((n, labels)) < 0.35).astype(np.float32)
  logits = (2.0 * y - 1.0) * rng.random((n, labels)) * 1.5 + rng.normal(size=(n, labels))
  y[rng.random((n, labels)) < unknown] = -1.0  # unknown (CheXpert's 'ignore' policy)
  logits[:, 0] = np.round(logits[:, 0])  # ties in one column (sklearn groups them)
  return logits.astype(np.float32), y


def test_multi_label_metrics_match_sklearn():
  logits, y = _multi_label_data()
  y[:, 3] = np.where(y[:, 3] >= 0, 0.0, -1.0)  # finding 3: no positive among the known labels
  rng = np.random.default_rng(1)
  thresholds = rng.uniform(0.3, 0.7, y.shape[1]).tolist()
  m = MULTI.metrics(logits, y, thresholds=thresholds)
  p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  auc, ap, f1 = [], [], []
  for j in range(y.shape[1]):
    known = y[:, j] >= 0
    yj, pj = y[known, j].astype(int), p[known, j]
    if j == 3:  # a single class: undefined, never 0 or 1
      assert np.isnan(m["auc_per_label"][j]) and np.isnan(m["ap_per_label"][j])
      assert np.isnan(m["f1_per_label"][j])
      continue
    auc.append(skm.roc_auc_score(yj, pj))
    ap.append(skm.average_precision_score(yj, pj))
    f1.append(skm.f1_score(yj, (pj >= thresholds[j]).astype(int)))
    np.testing.assert_allclose(m["auc_per_label"][j], auc[-1], rtol=1e-12)
    np.testing.assert_allclose(m["ap_per_label"][j], ap[-1], rtol=1e-12)
    np.testing.assert_allclose(m["f1_per_label"][j], f1[-1], rtol=1e-12)
  assert m["undefined"] == [3]
  np.testing.assert_allclose(m["auc_macro"], np.mean(auc), rtol=1e-12)
  np.testing.assert_allclose(m["map"], np.mean(ap), rtol=1e-12)
  np.testing.assert_allclose(m["f1_macro"], np.mean(f1), rtol=1e-12)
  # On fully known rows, exact match = sklearn's multi-label (subset) accuracy.
  full = (y >= 0).all(1)
  pred = (p >= np.asarray(thresholds)).astype(int)
  m_full = MULTI.metrics(logits[full], y[full], thresholds=thresholds)
  assert m_full["accuracy"] == pytest.approx(skm.accuracy_score(y[full].astype(int), pred[full]))
  # Without unknowns, the macro AUROC is sklearn's multi-label roc_auc_score(average='macro').
  logits2, y2 = _multi_label_data(seed=3, unknown=0.0)
  assert MULTI.metrics(logits2, y2)["auc_macro"] == pytest.approx(
      skm.roc_auc_score(y2.astype(int), logits2, average="macro"), rel=1e-12)


def test_valid_rows_and_single_label_task():
  logits, y = _multi_label_data()
  valid = np.arange(len(y)) % 4 != 0
  assert MULTI.metrics(logits, y, valid) == MULTI.metrics(logits[valid], y[valid])
  rng = np.random.default_rng(2)
  lg, lab = rng.normal(size=(40, 3)), rng.integers(0, 3, 40)
  m = SINGLE.metrics(lg, lab)
  assert m["f1_macro"] == pytest.approx(skm.f1_score(lab, lg.argmax(1), average="macro"))
  assert SINGLE.thresholds(lg, lab) is None and SINGLE.headline == "f1_macro"
  assert MULTI.headline == "auc_macro"


def test_thresholds_maximise_validation_f1_by_brute_force():
  logits, y = _multi_label_data(n=45, seed=5)
  chosen = MULTI.thresholds(logits, y)
  p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  for j, t in enumerate(chosen):
    known = y[:, j] >= 0
    yj, pj = y[known, j] > 0.5, p[known, j]
    best = max(skm.f1_score(yj, pj >= c) for c in np.unique(pj))
    assert skm.f1_score(yj, pj >= t) == pytest.approx(best, abs=1e-12)
    assert t in pj  # a threshold at an observed score
  # One class only: the default 0.5.
  assert tasks.best_f1_threshold(np.zeros(5, bool), np.linspace(0, 1, 5)) == 0.5


def test_bce_matches_torch_with_pos_weight_and_unknown_labels():
  torch = pytest.importorskip("torch")
  logits, y = _multi_label_data(n=16, labels=4, seed=7)
  valid = np.ones(16, bool)
  valid[-3:] = False  # eval-style padding rows
  w = np.array([1.0, 2.5, 0.5, 4.0], np.float32)
  known = (y >= 0) & valid[:, None]
  for pos_weight in (None, w):
    got = float(MULTI.loss(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(valid),
                           None if pos_weight is None else jnp.asarray(pos_weight)))
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(logits, dtype=torch.float64), torch.tensor(np.maximum(y, 0), dtype=torch.float64),
        weight=torch.tensor(known, dtype=torch.float64), reduction="sum",
        pos_weight=None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float64))
    assert got == pytest.approx(float(ref) / known.sum(), rel=1e-5)
  # All unknown: loss 0 and a finite gradient (padded batches cannot poison a sum).
  g = jax.grad(lambda x: MULTI.loss(x, -jnp.ones_like(x), jnp.ones(16, bool)))(jnp.asarray(logits))
  assert float(MULTI.loss(jnp.asarray(logits), -jnp.ones_like(jnp.asarray(y)),
                          jnp.ones(16, bool))) == 0.0 and bool(jnp.all(g == 0))


def test_bce_shpeft_score_equals_a_per_batch_loop():
  """The SH-PEFT score of a multi-label task: the scan's sum of squared per-batch BCE gradients
  equals a Python loop over batches whose loss is optax's sigmoid BCE."""
  config = dataclasses.replace(clip_vit.get_model_config("test_tiny"), layers=1)
  model = clip_vit.ClipClassifier(config, 4)
  params = clip_vit.init_params(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  s = config.image_size
  batches = []
  for b in range(4):
    y = (rng.random((4, 4)) < 0.4).astype(np.float32)
    y[rng.random((4, 4)) < 0.2] = -1.0
    valid = np.ones(4, bool)
    if b == 3:
      valid[1:] = False
    batches.append({"image": rng.normal(size=(4, s, s, 3)).astype(np.float32), "label": y,
                    "valid": valid})
  w = np.array([1.0, 3.0, 0.5, 2.0], np.float32)
  loss_fn = train.make_loss_fn(model, MULTI, w)
  acc, info = imp.score_dataset(loss_fn, params, iter(batches), chunk_size=3, progress=False)
  assert info["num_batches"] == 4

  def reference_loss(p, batch):
    logits = model.apply({"params": p}, batch["image"])
    y = batch["label"]
    known = (y >= 0) & batch["valid"][:, None]
    yk = jnp.where(known, y, 0.0)
    # optax's BCE, with the positive weight applied to the positive term only.
    pos = optax.sigmoid_binary_cross_entropy(logits, jnp.ones_like(logits))
    neg = optax.sigmoid_binary_cross_entropy(logits, jnp.zeros_like(logits))
    per = w * yk * pos + (1.0 - yk) * neg
    return jnp.sum(jnp.where(known, per, 0.0)) / jnp.sum(known)

  grad = jax.jit(jax.grad(reference_loss))
  s2 = None
  for batch in batches:
    g = {k: np.asarray(v, np.float64) ** 2 for k, v in flatten_names(grad(params, batch)).items()}
    s2 = g if s2 is None else {k: s2[k] + g[k] for k in g}
  got = flatten_names(acc["sum_sq"])
  names = [n for n in s2 if n.startswith("encoder/")]
  assert set(got) == set(names)
  scale = max(np.max(np.abs(s2[n])) for n in names)
  for n in names:
    np.testing.assert_allclose(np.asarray(got[n]), s2[n], rtol=2e-4, atol=1e-7 * scale, err_msg=n)


def _cfg(pos_weight):
  return ml_collections.ConfigDict({"train": {"pos_weight": pos_weight}})


def test_pos_weight_values_and_refusals():
  labels = np.array([[1, 0, -1], [0, 0, 1], [1, -1, 0], [0, 1, 0]], np.float32)
  assert tasks.pos_weight(_cfg(""), MULTI, 3, lambda: labels) is None
  np.testing.assert_allclose(tasks.pos_weight(_cfg("balanced"), MULTI, 3, lambda: labels),
                             [2 / 2, 2 / 1, 2 / 1])
  np.testing.assert_allclose(tasks.pos_weight(_cfg("1,2.5,3"), MULTI, 3, lambda: labels),
                             [1, 2.5, 3])
  for bad in ("1,2", "a,b,c", "1,-2,3", "heavy"):
    with pytest.raises(ConfigError, match="train.pos_weight"):
      tasks.pos_weight(_cfg(bad), MULTI, 3, lambda: labels)
  with pytest.raises(ConfigError, match=r"findings \[1\] have no positive"):
    tasks.pos_weight(_cfg("balanced"), MULTI, 3, lambda: labels * np.array([1, 0, 1]))
  with pytest.raises(ConfigError, match="multi-label datasets"):
    tasks.pos_weight(_cfg("balanced"), SINGLE, 3, lambda: labels)
  with pytest.raises(ConfigError, match="unknown task kind"):
    tasks.of("regression")
  with pytest.raises(CheckpointError, match="meta.json"):
    tasks.of_meta({"task": "regression"})
  assert tasks.of_meta({}) is SINGLE  # checkpoints from before task kinds


def test_multi_label_report_and_decisions():
  logits, y = _multi_label_data(n=30, labels=3, seed=11)
  names = ["Atelectasis", "Effusion", "Hernia"]
  rep = MULTI.report(y, logits, names, thresholds=[0.5, 0.4, 0.6])
  m = MULTI.metrics(logits, y, thresholds=[0.5, 0.4, 0.6])
  assert [c["name"] for c in rep["classes"]] == names
  assert [c["auc"] for c in rep["classes"]] == m["auc_per_label"]
  assert [c["support"] for c in rep["classes"]] == [int((y[:, j] == 1).sum()) for j in range(3)]
  assert [c["negatives"] for c in rep["classes"]] == [int((y[:, j] == 0).sum()) for j in range(3)]
  assert set(rep["roc"]) == set(names) and rep["auc_macro"] == m["auc_macro"]
  assert "exact match" in MULTI.report_text(rep)
  probs = np.array([[0.9, 0.1, 0.7], [0.2, 0.45, 0.1]])
  assert MULTI.decisions(probs, names, [0.5, 0.4, 0.6]) == [["Atelectasis", "Hernia"], ["Effusion"]]
  assert SINGLE.decisions(probs, names) == [["Atelectasis"], ["Effusion"]]
