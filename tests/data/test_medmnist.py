"""MedMNIST .npz files: official label names and task, splits as shipped, two sizes, gray -> 3
channels, images streamed out of the archive equal to the arrays."""

import io
import os

import numpy as np
import pytest

import data_fixtures as fx
from shpeft_jax.data import default_data_config, medmnist
from shpeft_jax.data import input_pipeline as ip
from shpeft_jax.errors import ConfigError, DataError


def _cfg(flag, size, manual_dir, data_dir=None):
  c = default_data_config()
  c.name, c.medmnist_flag, c.medmnist_size = "medmnist", flag, size
  c.manual_dir, c.data_dir = manual_dir, data_dir
  return c


def _decode(png: bytes) -> np.ndarray:
  from PIL import Image
  return np.asarray(Image.open(io.BytesIO(png)))


def test_pathmnist_28_rgb_single_label(tmp_path):
  path = fx.make_medmnist(str(tmp_path), "pathmnist", 28, counts=(12, 3, 4), num_labels=9)
  assert os.path.basename(path) == "pathmnist.npz"  # 28 px: the published name has no size
  parsed = medmnist.medmnist_source(str(tmp_path), _cfg("pathmnist", 28, str(tmp_path)))
  assert parsed.task == "single_label" and parsed.class_names[0] == "adipose"
  assert parsed.class_names[8] == "colorectal adenocarcinoma epithelium"
  assert parsed.split_sizes == {"train": 12, "validation": 3, "test": 4}
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  assert [l for _, l in parsed.splits["train"]] == arrays["train_labels"][:, 0].tolist()
  streamed = list(parsed.images("test", parsed.splits["test"]))
  for png, expected in zip(streamed, arrays["test_images"]):
    np.testing.assert_array_equal(_decode(png), expected)
  # A subset of the records streams exactly those rows.
  sub = [parsed.splits["train"][i] for i in (1, 5, 11)]
  for png, i in zip(parsed.images("train", sub), (1, 5, 11)):
    np.testing.assert_array_equal(_decode(png), arrays["train_images"][i])


def test_chestmnist_64_multi_label_through_the_pipeline(tmp_path):
  path = fx.make_medmnist(str(tmp_path / "npz"), "chestmnist", 64, counts=(14, 2, 3),
                          num_labels=14, rgb=False, multi_label=True)
  cfg = _cfg("chestmnist", 64, str(tmp_path / "npz"), str(tmp_path / "tfds"))
  info = ip.dataset_info(cfg)
  assert info.task == "multi_label" and info.num_classes == 14
  assert info.class_names[12] == "pleural" and info.class_names[13] == "hernia"
  assert info.split_sizes == {"train": 14, "validation": 2, "test": 3}
  with np.load(path) as z:
    images, labels = z["test_images"], z["test_labels"]
  # tfds stores records in a hashed order; file_name says which row of the array each one is.
  meta = ip.record_metadata(cfg, "test")
  rows = [int(name.decode().rsplit("/", 1)[1]) for name in meta["file_name"]]
  assert sorted(rows) == [0, 1, 2]
  assert all(name.decode().startswith("chestmnist_64.npz/test/") for name in meta["file_name"])
  assert meta["patient"].tolist() == [b""] * 3
  batches = list(ip.make_eval_iterator(cfg, split="test", global_batch_size=2, image_size=64))
  got = np.concatenate([b["image"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  label = np.concatenate([b["label"] for b in batches])
  assert label.dtype == np.float32 and label.shape == (4, 14)
  np.testing.assert_array_equal(label[valid], labels[rows].astype(np.float32))
  # Padding row: valid False and a vector of -1 (unknown).
  assert valid.tolist() == [True, True, True, False]
  np.testing.assert_array_equal(label[3], np.full(14, -1.0, np.float32))
  # Gray images become 3 equal channels; at 64 px no resize: the pixels come back exactly.
  for c in range(3):
    np.testing.assert_array_equal(got[valid][..., c], images[rows])
  train = next(ip.make_train_iterator(cfg, split="train", global_batch_size=4, image_size=32,
                                      seed=0))
  assert train["label"].dtype == np.float32 and train["label"].shape == (4, 14)
  assert set(np.unique(train["label"])) <= {0.0, 1.0}


def test_bad_flag_size_and_file(tmp_path):
  fx.make_medmnist(str(tmp_path), "pathmnist", 28)
  with pytest.raises(ConfigError, match="medmnist_flag='pathmnst'"):
    medmnist.medmnist_source(str(tmp_path), _cfg("pathmnst", 28, str(tmp_path)))
  with pytest.raises(ConfigError, match=r"medmnist_size=32; MedMNIST\+ ships \[28, 64, 128, 224\]"):
    medmnist.medmnist_source(str(tmp_path), _cfg("pathmnist", 32, str(tmp_path)))
  with pytest.raises(DataError, match=r"no pathmnist_224.npz in .* \(its .npz files: "
                                      r"\['pathmnist.npz'\]\)"):
    medmnist.medmnist_source(str(tmp_path), _cfg("pathmnist", 224, str(tmp_path)))
  # A file of another size than the config says.
  os.rename(tmp_path / "pathmnist.npz", tmp_path / "pathmnist_64.npz")
  with pytest.raises(DataError, match=r"train_images is uint8 \(12, 28, 28, 3\); expected uint8 "
                                      r"\[N, 64, 64\]"):
    medmnist.medmnist_source(str(tmp_path), _cfg("pathmnist", 64, str(tmp_path)))
  # A label outside the classes.
  arrays = {k: v for k, v in np.load(tmp_path / "pathmnist_64.npz").items()}
  arrays["val_labels"][1, 0] = 9
  np.savez(tmp_path / "pathmnist.npz", **arrays)
  with pytest.raises(DataError, match=r"val_labels row 1 holds \[9\]; allowed values are "
                                      r"\[0, 1, 2, 3, 4, 5, 6, 7, 8\]"):
    medmnist.medmnist_source(str(tmp_path), _cfg("pathmnist", 28, str(tmp_path)))


def test_info_covers_the_twelve_2d_datasets():
  assert sorted(medmnist.INFO) == sorted([
      "pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
      "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist"])
  counts = {flag: len(names) for flag, (_, names) in medmnist.INFO.items()}
  # Numbers of classes of the MedMNIST v2 paper (Table 1).
  assert counts == {"pathmnist": 9, "chestmnist": 14, "dermamnist": 7, "octmnist": 4,
                    "pneumoniamnist": 2, "retinamnist": 5, "breastmnist": 2, "bloodmnist": 8,
                    "tissuemnist": 8, "organamnist": 11, "organcmnist": 11, "organsmnist": 11}
  assert [f for f, (task, _) in medmnist.INFO.items() if task == "multi_label"] == ["chestmnist"]
