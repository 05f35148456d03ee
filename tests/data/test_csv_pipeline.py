"""CSV sources through tfds and the input pipeline: the multi-label vector and patient in the
records and batches, the prepare CLI with a config, and a single-label CSV run of the trainer."""

import json
import os

import numpy as np
import pytest

import data_fixtures as fx
from shpeft_jax.data import default_data_config
from shpeft_jax.data import input_pipeline as ip

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _multi_label_folder(root):
  """6 train / 2 test images; each image's pixel value v = its row index * 20 identifies it."""
  rows = [  # path, Effusion, Mass, patient, split
      ["a.png", "1", "0", "P1", "train"], ["b.png", "0", "-1", "P1", "train"],
      ["c.png", "", "1", "P2", "train"], ["d.png", "1", "1", "P3", "train"],
      ["e.png", "0", "0", "P4", "train"], ["f.png", "1", "", "P4", "train"],
      ["g.png", "0", "1", "P5", "test"], ["h.png", "-1", "0", "P6", "test"]]
  from PIL import Image
  for i, r in enumerate(rows):
    Image.fromarray(np.full((8, 8), i * 20, np.uint8)).save(os.path.join(root, r[0]))
  fx.write_csv(os.path.join(root, "labels.csv"), ["path", "Effusion", "Mass", "patient", "split"],
               rows)
  return rows


def _config(tmp_path, **kw):
  c = default_data_config()
  c.update(dict(name="csv", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "m"),
                csv_files=("labels.csv",), **kw))
  return c


def _row_of(image):
  """The fixture row of a batch image (its constant pixel value / 20)."""
  value = image[..., 0]
  assert value.min() == value.max()
  return int(value.min()) // 20


def test_multi_label_vectors_and_patients_pass_through(tmp_path):
  os.makedirs(tmp_path / "m")
  rows = _multi_label_folder(str(tmp_path / "m"))
  cell = {"1": 1.0, "0": 0.0, "-1": -1.0, "": -1.0}
  expected = [np.array([cell[r[1]], cell[r[2]]], np.float32) for r in rows]
  c = _config(tmp_path, csv_label_columns=("Effusion", "Mass"), csv_split_column="split",
              csv_patient_column="patient", val_fraction=0.0)
  info = ip.dataset_info(c)
  assert info.task == "multi_label" and info.class_names == ("Effusion", "Mass")
  assert info.split_sizes == {"train": 6, "test": 2}
  # Records: patient and label stored (read without decoding).
  meta = ip.record_metadata(c, "train")
  by_name = {n.decode(): (p.decode(), l) for n, p, l in zip(meta["file_name"], meta["patient"],
                                                              meta["label"])}
  assert {n: p for n, (p, _) in by_name.items()} == {r[0]: r[3] for r in rows[:6]}
  for i, r in enumerate(rows[:6]):
    np.testing.assert_array_equal(by_name[r[0]][1], expected[i])
  # Eval batches: [B, L] float32, -1 kept, padding rows -1 and invalid.
  batches = list(ip.make_eval_iterator(c, split="test", global_batch_size=4, image_size=8))
  (b,) = batches
  assert b["label"].dtype == np.float32 and b["label"].shape == (4, 2)
  assert b["valid"].tolist() == [True, True, False, False]
  for image, label in zip(b["image"][:2], b["label"][:2]):
    np.testing.assert_array_equal(label, expected[_row_of(image)])
  np.testing.assert_array_equal(b["label"][2:], -np.ones((2, 2), np.float32))
  # Train batches over two epochs: every label matches its image's row.
  c.augment = False
  it = ip.make_train_iterator(c, split="train", global_batch_size=4, image_size=8, seed=0)
  seen = []
  for _ in range(3):
    b = next(it)
    assert b["label"].dtype == np.float32 and b["label"].shape == (4, 2) and b["valid"].all()
    for image, label in zip(b["image"], b["label"]):
      seen.append(_row_of(image))
      np.testing.assert_array_equal(label, expected[seen[-1]])
  assert sorted(seen[:6]) == [0, 1, 2, 3, 4, 5]  # the first epoch is a permutation


def test_prepare_cli_with_a_config_file(tmp_path, capsys):
  from shpeft_jax.data import prepare
  os.makedirs(tmp_path / "m")
  _multi_label_folder(str(tmp_path / "m"))
  prepare.main(["--config", os.path.join(REPO, "configs", "csv.py"),
                "--set", "data.csv_label_column=", "--set", "data.csv_label_columns=('Mass',)",
                "--set", "data.csv_split_column=split", "--set", "data.val_fraction=0.0",
                "--data_dir", str(tmp_path / "tfds"), "--manual_dir", str(tmp_path / "m")])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["name"] == "csv" and out["task"] == "multi_label"
  assert out["class_names"] == ["Mass"] and out["split_sizes"] == {"train": 6, "test": 2}


def test_single_label_csv_trains_end_to_end(tmp_path):
  from shpeft_jax import train
  from train_fixtures import make_tiny_config
  from PIL import Image
  root = tmp_path / "m"
  rows, rng = [], np.random.default_rng(0)
  for i in range(40):
    cls = ("red", "blue")[i % 2]
    pixels = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
    pixels[..., 0 if cls == "red" else 2] += 180
    os.makedirs(root / "img", exist_ok=True)
    Image.fromarray(pixels).save(root / "img" / f"{i:02d}.png")
    rows.append([f"img/{i:02d}.png", cls, f"patient{i // 2}"])
  fx.write_csv(str(root / "labels.csv"), ["file", "colour", "patient"], rows)
  config = make_tiny_config("linear", num_steps=4, batch_size=8)
  config.data.update(dict(name="csv", data_dir=str(tmp_path / "tfds"), manual_dir=str(root),
                          csv_files=("labels.csv",), csv_path_column="file",
                          csv_label_column="colour", csv_patient_column="patient"))
  config.train.eval_batch_size = 8
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  # 20 patients of 2 images, 80/10/10 by patient: 32 / 4 / 4 images.
  assert ip.dataset_info(config.data).split_sizes == {"train": 32, "validation": 4, "test": 4}
  with np.load(tmp_path / "run" / "test_predictions.npz") as z:
    logits, labels, names = z["logits"], z["labels"], [str(n) for n in z["class_names"]]
  assert names == ["blue", "red"] and logits.shape == (4, 2) and np.isfinite(logits).all()
  meta = ip.record_metadata(config.data, "test")
  assert sorted(labels.tolist()) == sorted(meta["label"].tolist())
  assert results["test"]["accuracy"] == np.mean(np.argmax(logits, -1) == labels)
  losses = [json.loads(l)["loss"] for l in open(tmp_path / "run" / "metrics.jsonl")
            if '"train"' in l]
  assert losses and all(np.isfinite(losses))


def test_trainer_takes_a_multi_label_table_as_a_multi_label_task(tmp_path):
  """The config check resolves the task kind from the table (two finding columns) and the BCE's
  positive weights from its train labels; weights of the wrong length are one line."""
  from shpeft_jax import train
  from shpeft_jax.errors import ConfigError
  from train_fixtures import make_tiny_config
  os.makedirs(tmp_path / "m")
  _multi_label_folder(str(tmp_path / "m"))
  config = make_tiny_config("linear")
  config.data.update(dict(name="csv", data_dir=str(tmp_path / "tfds"),
                          manual_dir=str(tmp_path / "m"), csv_files=("labels.csv",),
                          csv_label_columns=("Effusion", "Mass"), csv_split_column="split",
                          val_fraction=0.0))
  config.data.val_split = ""
  config.train.batch_size = 2
  config.train.pos_weight = "balanced"
  facts = train.validate_config(config)
  assert facts["task"].name == "multi_label" and facts["num_classes"] == 2
  labels = ip.record_metadata(config.data, "train")["label"]
  pos, neg = (labels == 1).sum(0), (labels == 0).sum(0)
  np.testing.assert_allclose(facts["pos_weight"], neg / pos)
  config.train.pos_weight = "1,2,3"
  with pytest.raises(ConfigError, match=r"^train.pos_weight='1,2,3': give '' \(none\), "
                                        r"'balanced', or 2 positive numbers"):
    train.validate_config(config)
