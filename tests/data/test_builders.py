"""tfds builders end to end: fixture tree -> download_and_prepare -> input pipeline."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_fixtures as fx
from shpeft_jax.data import builders, default_data_config
from shpeft_jax.data import input_pipeline as ip
from shpeft_jax.errors import DataError


def _config(name, tmp_path, manual_dir):
  c = default_data_config()
  c.name = name
  c.data_dir = str(tmp_path / "tfds")
  c.manual_dir = manual_dir
  return c


def test_busi_prepared_and_read_through_pipeline(tmp_path):
  manual = str(tmp_path / "manual")
  root = fx.make_busi(manual, counts=(6, 4, 3))
  pixels = {}  # every image's pixels -> class, read back from the fixture files
  from PIL import Image
  for label, cls in enumerate(("benign", "malignant", "normal")):
    for f in os.listdir(os.path.join(root, cls)):
      if "_mask" not in f:
        pixels[np.asarray(Image.open(os.path.join(root, cls, f))).tobytes()] = label
  c = _config("busi", tmp_path, manual)
  info = ip.dataset_info(c)
  assert info.class_names == ("benign", "malignant", "normal")
  # 13 images in the paper's 559:79:160 ratio -> 9 / 1 / 3 (largest remainder of 9.1 / 1.3 / 2.6).
  assert info.split_sizes == {"train": 9, "validation": 1, "test": 3}
  (cfg, rec), = builders.prepared_sources("busi", str(tmp_path / "tfds")).items()
  assert os.path.isdir(tmp_path / "tfds" / "busi" / cfg / "2.0.0") and rec["num_examples"] == 13
  assert info.source_id == "busi:" + rec["source_id"]
  seen = []
  for split in ("train", "validation", "test"):
    for b in ip.make_eval_iterator(c, split=split, global_batch_size=4, image_size=16):
      for im, label, valid in zip(b["image"], b["label"], b["valid"]):
        if not valid:
          continue
        gray = im[..., 0]
        np.testing.assert_array_equal(im[..., 0], im[..., 2])  # gray -> 3 equal
        assert pixels[gray.tobytes()] == label
        seen.append(gray.tobytes())
  assert sorted(seen) == sorted(pixels)  # every image once, across the three splits


def test_cxr_jpeg_train_stream_and_labels(tmp_path):
  manual = str(tmp_path / "manual")
  fx.make_cxr(manual, train=(4, 4, 3), test=(2, 2, 1))
  c = _config("cxr", tmp_path, manual)
  info = ip.dataset_info(c)
  assert info.class_names == ("normal", "bacterial", "viral")
  assert info.split_sizes["test"] == 5 and info.split_sizes["train"] + \
      info.split_sizes["validation"] == 11
  b = next(ip.make_train_iterator(c, split="train", global_batch_size=8, image_size=24, seed=0))
  assert b["image"].shape == (8, 24, 24, 3) and b["image"].dtype == np.uint8
  assert set(b["label"].tolist()) <= {0, 1, 2}
  builder, _ = builders.open_builder("cxr", str(tmp_path / "tfds"), None)  # the prepared copy
  names = {ex["file_name"].numpy().decode(): int(ex["label"]) for ex in
           builder.as_dataset(split="test")}
  for name, label in names.items():
    assert label == (0 if "/NORMAL/" in name else 1 if "bacteria" in name else 2)


def test_image_folder_builder_reads_class_names_back(tmp_path):
  fx.make_image_folder(str(tmp_path / "imgs"), classes=("a", "b", "c"), per_class=(2, 2, 2),
                       split_dirs=True, ext=".jpg")
  c = _config("image_folder", tmp_path, str(tmp_path / "imgs"))
  info = ip.dataset_info(c)
  assert info.class_names == ("a", "b", "c")
  assert info.split_sizes == {"train": 6, "validation": 6, "test": 6}
  again, _ = builders.open_builder("image_folder", str(tmp_path / "tfds"), None)  # read back
  assert again.is_prepared() and again.info.features["label"].names == ["a", "b", "c"]


def test_corrupt_image_fails_the_build_naming_the_file(tmp_path):
  manual = str(tmp_path / "manual")
  root = fx.make_oct(manual)
  bad = os.path.join(root, "test", "DME", "DME-1000-0.jpeg")
  with open(bad, "rb") as f:
    data = f.read()
  with open(bad, "wb") as f:
    f.write(data[:100])
  builder = builders.Oct2017(data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DataError, match="DME-1000-0.jpeg"):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))


def test_missing_manual_dir_names_layout_and_url(tmp_path):
  builder = builders.Chaoyang(data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DataError, match=r"train\.json[\s\S]*HSA-NRL"):
    builder.download_and_prepare()
  c = _config("limuc", tmp_path, str(tmp_path / "not_there"))
  with pytest.raises(DataError, match=r"does not exist[\s\S]*Mayo 0[\s\S]*zenodo"):
    ip.dataset_info(c)


def test_prepare_cli(tmp_path, capsys):
  import json
  from shpeft_jax.data import prepare
  manual = str(tmp_path / "manual")
  fx.make_covid_ct(manual)
  prepare.main(["--name", "covid_ct", "--data_dir", str(tmp_path / "tfds"), "--manual_dir", manual])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["class_names"] == ["non_covid", "covid"]
  assert out["split_sizes"] == {"train": 5, "validation": 3, "test": 3}


@pytest.mark.parametrize("name,make,sizes", [
    ("chaoyang", fx.make_chaoyang, {"train": 8, "test": 4}),
    ("limuc", fx.make_limuc, {"train": 8, "test": 4}),
    # 10 training images: round(10 * 10832 / 108309) = 1 carved for validation.
    ("oct", fx.make_oct, {"train": 9, "validation": 1, "test": 4}),
])
def test_other_builders_prepare(tmp_path, name, make, sizes):
  manual = str(tmp_path / "manual")
  make(manual)
  info = ip.dataset_info(_config(name, tmp_path, manual))
  assert info.split_sizes == sizes
  assert info.num_classes == 4
  b = next(ip.make_eval_iterator(_config(name, tmp_path, manual), split="test",
                                 global_batch_size=3, image_size=16))
  assert b["image"].shape == (3, 16, 16, 3) and b["valid"].all()
