"""`python -m shpeft_jax.predict` against the trainer's own evaluation of the same images.

A tiny run is trained by the trainer on an image-folder fixture whose test images come in every
supported format, mode and size; predict on those files must give the probabilities the trainer's
evaluation computed (captured from `train.evaluate`), and the metrics in the run's results.json.
"""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from train_fixtures import make_tiny_config
from shpeft_jax import checkpoints, predict, report, sharding, train
from shpeft_jax.evaluation import evaluator
from shpeft_jax.evaluation import metrics

CLASSES = ("benign", "malignant", "normal")
# (extension, PIL mode, width, height) of the test images: every format / mode / size path.
TEST_IMAGES = [(".png", "RGB", 20, 17), (".png", "L", 16, 16), (".jpg", "RGB", 31, 24),
               (".bmp", "RGB", 16, 16), (".tif", "RGB", 12, 20), (".png", "RGBA", 40, 40)]


def _write(path, mode, w, h, seed):
  rng = np.random.default_rng(seed)
  channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
  pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
  if channels == 1:
    pixels = pixels[..., 0]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels, mode).save(path)


def _image_folder(root):
  seed = 0
  for split, n in (("train", 6), ("val", 2)):
    for cls in CLASSES:
      for i in range(n):
        seed += 1
        _write(os.path.join(root, split, cls, f"{cls}_{i}.png"), "RGB", 16, 16, seed)
  for cls in CLASSES:
    for i, (ext, mode, w, h) in enumerate(TEST_IMAGES):
      seed += 1
      _write(os.path.join(root, "test", cls, f"{cls}_{i}{ext}"), mode, w, h, seed)
  return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("predict")
  root = _image_folder(str(tmp / "images"))
  config = make_tiny_config("linear", num_steps=2, batch_size=8)
  config.data.name = "image_folder"
  config.data.manual_dir = root
  config.data.data_dir = str(tmp / "tfds")
  config.train.eval_batch_size = 8
  config.train.eval_every = 2  # writes best/
  workdir = str(tmp / "run")
  results = train.train_and_evaluate(config, workdir)
  return config, root, workdir, results


def _trainer_eval(config, workdir):
  """Logits of the trainer's evaluation of the test split, with the file name of each row."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import builders  # pylint: disable=g-import-not-at-top
  params, meta = checkpoints.load_params(os.path.join(workdir, "export", "model"))
  model = train.build_model(config, meta["num_classes"])
  step = jax.jit(lambda p, b: (model.apply({"params": p}, b["image"]).astype(jnp.float32),
                               b["label"], b["valid"]))
  seen = []

  def eval_fn(p, batch):
    out = step(p, batch)
    seen.append(jax.device_get(out))
    return out

  m = evaluator.evaluate(eval_fn, params, config, "test", sharding.make_mesh(config.mesh),
                         meta["num_classes"])
  logits, labels, valid = (np.concatenate(x) for x in zip(*seen))
  builder, _ = builders.open_builder("image_folder", config.data.data_dir, config.data.manual_dir)
  names = [ex["file_name"].decode() for ex in tfds.as_numpy(
      builder.as_dataset(split="test", shuffle_files=False))]
  return dict(zip(names, logits[valid])), labels[valid], m


def _read_csv(path):
  with open(path) as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


def test_same_probabilities_as_the_trainer(trained_run, tmp_path):
  config, root, workdir, results = trained_run
  by_name, _, trainer_metrics = _trainer_eval(config, workdir)
  assert len(by_name) == len(CLASSES) * len(TEST_IMAGES)
  out = str(tmp_path / "preds.csv")
  # A folder, a glob and a file, overlapping: each image once, in the order given.
  rc = predict.main([workdir, os.path.join(root, "test", "benign"),
                     os.path.join(root, "test", "mal*", "*"),
                     os.path.join(root, "test", "normal"),
                     os.path.join(root, "test", "benign", "benign_0.png"),
                     "--out", out, "--batch_size", "8", "--no_progress"])
  assert rc == 0
  header, rows = _read_csv(out)
  assert header == ["file", "predicted"] + [f"p_{c}" for c in CLASSES]
  assert len(rows) == len(by_name)
  probs, labels = [], []
  for row in rows:
    rel = os.path.relpath(row[0], root).replace(os.sep, "/")
    p = np.array([float(x) for x in row[2:]])
    ref = metrics.softmax(by_name[rel].astype(np.float64))
    np.testing.assert_allclose(p, ref, atol=2e-6, err_msg=rel)  # the CSV keeps 6 decimals
    assert row[1] == CLASSES[int(np.argmax(ref))]
    probs.append(p)
    labels.append(CLASSES.index(rel.split("/")[1]))
  # The run's own record of its test evaluation, recomputed from predict's output.
  ours = metrics.classification_metrics(np.array(probs), np.array(labels), len(CLASSES))
  for key in ("f1_macro", "accuracy", "auc_macro"):
    assert ours[key] == pytest.approx(results["test"][key], abs=1e-5), key
    assert trainer_metrics[key] == pytest.approx(results["test"][key], abs=1e-12), key


def test_full_precision_and_checkpoint_forms(trained_run):
  """export/model, best/ and the workdir give the same model; probabilities to float precision."""
  config, root, workdir, _ = trained_run
  by_name, _, _ = _trainer_eval(config, workdir)
  files, missing = predict.list_inputs([os.path.join(root, "test")])
  assert not missing and len(files) == len(by_name)
  for model_dir in (workdir, os.path.join(workdir, "export", "model")):
    loaded = predict.load_model(model_dir)
    assert loaded.checkpoint == os.path.join(workdir, "export", "model")
    assert loaded.class_names == list(CLASSES) and loaded.image_size == 16
    done, probs, unreadable = predict.predict_files(loaded, files, batch_size=8, progress=False)
    assert done == files and not unreadable
    for f, p in zip(done, probs):
      rel = os.path.relpath(f, root).replace(os.sep, "/")
      np.testing.assert_allclose(p, metrics.softmax(by_name[rel].astype(np.float64)),
                                 rtol=1e-6, atol=1e-7, err_msg=rel)
  # best/ is written at the best validation step (here the only evaluation, the last step).
  best = predict.load_model(os.path.join(workdir, "best"))
  assert best.meta["num_classes"] == 3 and best.class_names == list(CLASSES)


def test_unreadable_files_are_listed_not_fatal(trained_run, tmp_path, capsys):
  _, root, workdir, _ = trained_run
  folder = tmp_path / "mixed"
  folder.mkdir()
  good = os.path.join(root, "test", "normal", "normal_2.jpg")
  (folder / "good.jpg").write_bytes(open(good, "rb").read())
  (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
  (folder / "empty.jpg").write_bytes(b"")
  (folder / "notes.txt").write_text("not an image, not listed")
  out = str(tmp_path / "p.csv")
  rc = predict.main([workdir, str(folder), str(tmp_path / "nothing_*.png"), "--out", out,
                     "--no_progress"])
  err = capsys.readouterr().err
  assert rc == 0
  _, rows = _read_csv(out)
  assert [os.path.basename(r[0]) for r in rows] == ["good.jpg"]
  assert "2 unreadable file(s)" in err
  assert "broken.png: not an image (unknown format or corrupt header)" in err
  assert "empty.jpg: empty file" in err
  assert "nothing_*.png: pattern matches no file" in err
  assert "notes.txt" not in err
  # Nothing readable: exit status 2, no CSV.
  rc = predict.main([workdir, str(folder / "broken.png"), "--out", str(tmp_path / "q.csv"),
                     "--no_progress"])
  assert rc == 2 and not os.path.exists(tmp_path / "q.csv")


def test_bad_model_dirs(tmp_path, capsys):
  img = tmp_path / "a.png"
  _write(str(img), "RGB", 8, 8, 0)
  assert predict.main([str(tmp_path / "missing"), str(img), "--out", str(tmp_path / "o.csv")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert predict.main([str(tmp_path), str(img), "--out", str(tmp_path / "o.csv")]) == 2
  assert "holds no model" in capsys.readouterr().err
  # A converted (pretrained) encoder has no head to classify with.
  params = {"encoder": {"ln_post": {"scale": np.ones(4, np.float32)}}}
  checkpoints.save_params(str(tmp_path / "enc"), params, {"model": "test_tiny", "image_size": 16,
                                                          "num_classes": None})
  assert predict.main([str(tmp_path / "enc"), str(img), "--out", str(tmp_path / "o.csv")]) == 2
  assert "no trained head" in capsys.readouterr().err


def test_report_predictions_are_the_trainers(trained_run, tmp_path):
  """The trainer's test_predictions.npz holds its test evaluation; a run without the file gets
  the same predictions from the report, which then evaluates export/model itself."""
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  config, _, workdir, results = trained_run
  by_name, labels, _ = _trainer_eval(config, workdir)
  saved = os.path.join(workdir, report.PREDICTIONS)
  logits0, labels0, names0 = report.load_predictions(saved)
  assert names0 == list(CLASSES)
  np.testing.assert_array_equal(labels0, labels)
  np.testing.assert_array_equal(logits0, np.stack(list(by_name.values())).astype(np.float32))
  os.replace(saved, str(tmp_path / "saved.npz"))
  logits, labels2, names = report.predictions_from_checkpoint(workdir)
  assert names == list(CLASSES)
  np.testing.assert_array_equal(labels2, labels)
  np.testing.assert_allclose(logits, np.stack(list(by_name.values())), rtol=1e-6, atol=1e-6)
  out = report.write_report(workdir, log=lambda *_: None)
  rep = json.load(open(out["per_class_json"]))
  preds = logits.argmax(-1)
  np.testing.assert_allclose([c["f1"] for c in rep["classes"]],
                             skm.f1_score(labels, preds, average=None, labels=range(3)), atol=1e-12)
  assert rep["macro"]["f1"] == pytest.approx(results["test"]["f1_macro"], abs=1e-9)
  assert os.path.getsize(out["confusion"]) > 15_000 and os.path.isfile(out["html"])
  os.replace(str(tmp_path / "saved.npz"), saved)
