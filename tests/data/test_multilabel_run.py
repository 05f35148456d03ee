"""One multi-label run end to end on a ChestMNIST fixture (the MedMNIST .npz layout): BCE score
-> select -> train (positive weights, validation by mean AUROC) -> evaluate (thresholds chosen
on validation) -> export -> predict (per-finding probabilities equal the trainer's) -> report;
every number recomputed with scikit-learn from the trainer's own predictions."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

import data_fixtures as fx
from train_fixtures import make_tiny_config  # pylint: disable=g-bad-import-order
from shpeft_jax import predict, report, tasks, train
from shpeft_jax.data import input_pipeline as ip

FINDINGS = 14


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multilabel")
  npz = fx.make_medmnist(str(tmp / "npz"), "chestmnist", 28, counts=(48, 24, 20),
                         num_labels=FINDINGS, rgb=False, multi_label=True, seed=3)
  config = make_tiny_config("shpeft", num_steps=6, batch_size=16)
  config.data.name = "medmnist"
  config.data.medmnist_flag, config.data.medmnist_size = "chestmnist", 28
  config.data.manual_dir, config.data.data_dir = str(tmp / "npz"), str(tmp / "tfds")
  config.train.eval_every = 3
  config.train.report_best = True
  config.train.pos_weight = "balanced"
  workdir = str(tmp / "run")
  results = train.train_and_evaluate(config, workdir)
  return config, npz, workdir, results, tmp


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_results_are_the_multi_label_metrics_of_the_trainers_predictions(run):
  config, npz, workdir, results, _ = run
  assert results["task"] == "multi_label" and results["headline"] == "auc_macro"
  assert results["reported"] == "best"
  with np.load(os.path.join(workdir, report.PREDICTIONS)) as z:
    logits, labels = z["logits"], z["labels"]
    assert [str(c) for c in z["class_names"]][-1] == "hernia"
  assert logits.shape == labels.shape == (20, FINDINGS)
  rows = [int(n.decode().rsplit("/", 1)[1]) for n in ip.record_metadata(config.data, "test")[
      "file_name"]]
  with np.load(npz) as z:
    np.testing.assert_array_equal(labels, z["test_labels"][rows])
  thresholds = results["thresholds"]["values"]
  assert len(thresholds) == FINDINGS and results["thresholds"]["chosen_on"].startswith("validation")
  p = _sigmoid(logits)
  defined = [j for j in range(FINDINGS) if 0 < labels[:, j].sum() < len(labels)]
  test = results["test"]
  assert test["auc_macro"] == pytest.approx(
      np.mean([skm.roc_auc_score(labels[:, j], p[:, j]) for j in defined]), abs=1e-6)
  assert test["map"] == pytest.approx(
      np.mean([skm.average_precision_score(labels[:, j], p[:, j]) for j in defined]), abs=1e-6)
  assert test["f1_macro"] == pytest.approx(np.mean(
      [skm.f1_score(labels[:, j], p[:, j] >= thresholds[j]) for j in defined]), abs=1e-6)
  assert test["undefined"] == [j for j in range(FINDINGS) if j not in defined]
  assert results["validation"]["thresholds"] == thresholds  # chosen there, used here
  # The best checkpoint is the step of the highest validation mean AUROC.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    val = [json.loads(l) for l in f if '"val"' in l]
  aucs = {r["step"]: r["auc_macro"] for r in val if r.get("kind") == "val"}
  assert aucs and results["best_step"] == max(aucs, key=lambda s: (aucs[s], -s))
  meta = json.load(open(os.path.join(workdir, "export", "model", "meta.json")))
  assert meta["task"] == "multi_label" and meta["thresholds"] == thresholds
  # The score used the BCE with the balanced positive weights: a mask of k% exists.
  assert os.path.isfile(os.path.join(workdir, "mask.npz"))


def test_predict_gives_the_trainers_probabilities_and_findings(run):
  config, npz, workdir, results, tmp = run
  rows = [int(n.decode().rsplit("/", 1)[1]) for n in ip.record_metadata(config.data, "test")[
      "file_name"]]
  with np.load(npz) as z:
    images = z["test_images"]
  files = []
  for i, r in enumerate(rows):
    files.append(str(tmp / "png" / f"row{r}.png"))
    os.makedirs(os.path.dirname(files[-1]), exist_ok=True)
    Image.fromarray(images[r], "L").save(files[-1])
  with np.load(os.path.join(workdir, report.PREDICTIONS)) as z:
    trainer = _sigmoid(z["logits"])
  loaded = predict.load_model(workdir)
  assert loaded.task is tasks.of("multi_label")
  done, probs, bad = predict.predict_files(loaded, files, batch_size=8, progress=False)
  assert done == files and not bad
  np.testing.assert_allclose(probs, trainer, atol=1e-6)
  out = str(tmp / "preds.csv")
  assert predict.main([workdir, *files, "--out", out, "--no_progress"]) == 0
  with open(out) as f:
    table = list(csv.reader(f))
  names = loaded.class_names
  assert table[0] == ["file", "predicted"] + [f"p_{n}" for n in names]
  t = np.asarray(results["thresholds"]["values"])
  for row, p in zip(table[1:], trainer):
    want = [n for n, on in zip(names, p >= t) if on]
    assert row[1] == "|".join(want), row[0]
    np.testing.assert_allclose([float(x) for x in row[2:]], p, atol=1e-6)


def test_report_draws_per_finding_roc_and_auroc_bars(run):
  _, _, workdir, results, _ = run
  out = report.write_report(workdir, log=lambda *_: None)
  rep = out["per_class"]
  assert rep["task"] == "multi_label" and len(rep["classes"]) == FINDINGS
  assert [c["auc"] for c in rep["classes"]] == pytest.approx(
      results["test"]["auc_per_label"], nan_ok=True)
  assert [c["threshold"] for c in rep["classes"]] == results["thresholds"]["values"]
  assert "confusion" not in out and os.path.isfile(out["auc_bars"]) and os.path.isfile(out["roc"])
  for png in (out["auc_bars"], out["roc"]):
    img = np.asarray(Image.open(png))
    assert img.shape[0] > 200 and img.std() > 0
  page = open(out["html"]).read()
  assert "Per finding" in page and "mean AUROC" in page and "AUROC per finding" in page
  text = open(out["per_class_txt"]).read()
  assert text.splitlines()[0].split()[:3] == ["auroc", "ap", "f1"]


@pytest.mark.parametrize("method", ["lora", "vpt_deep", "spt_lora"])
def test_other_methods_train_on_multi_label_data(run, method, tmp_path):
  """Additive (merged LoRA), prompt (VPT) and SPT-LoRA methods train on the BCE too; their
  exported model gives the test metrics results.json records (recomputed from its predictions)."""
  config, _, _, _, _ = run
  config = config.copy_and_resolve_references()
  config.peft.method = method
  config.train.num_steps, config.train.report_best, config.train.pos_weight = 2, False, ""
  results = train.train_and_evaluate(config, str(tmp_path / method))
  assert results["task"] == "multi_label" and results["method"] == method
  with np.load(str(tmp_path / method / report.PREDICTIONS)) as z:
    m = tasks.of("multi_label").metrics(z["logits"], z["labels"],
                                        thresholds=results["thresholds"]["values"])
  assert m["auc_macro"] == pytest.approx(results["test"]["auc_macro"], abs=1e-6)
  loaded = predict.load_model(str(tmp_path / method))
  assert loaded.task.name == "multi_label" and len(loaded.thresholds) == FINDINGS
