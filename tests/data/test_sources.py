"""Prepared data is keyed by its source; misplaced or odd downloads are found or explained."""

import logging
import os

import pytest

import data_fixtures as fx
from shpeft_jax.data import builders, default_data_config
from shpeft_jax.data import input_pipeline as ip
from shpeft_jax.data import splits
from shpeft_jax.errors import DataError


def _config(name, data_dir, manual_dir):
  c = default_data_config()
  c.name, c.data_dir, c.manual_dir = name, str(data_dir), str(manual_dir)
  return c


def _labels_of(c, split="train"):
  out = []
  for b in ip.make_eval_iterator(c, split=split, global_batch_size=4, image_size=8):
    out += [int(l) for l, v in zip(b["label"], b["valid"]) if v]
  return out


def test_two_image_folders_in_one_data_dir_never_share_records(tmp_path):
  # Old code: the second folder (2 classes) was read from the first one's records (3 classes).
  a = fx.make_image_folder(str(tmp_path / "a"), classes=("x", "y", "z"), per_class=(4, 4, 4),
                           split_dirs=True)
  b = fx.make_image_folder(str(tmp_path / "b"), classes=("cat", "dog"), per_class=(2, 3),
                           split_dirs=True)
  ia = ip.dataset_info(_config("image_folder", tmp_path / "tfds", a))
  ib = ip.dataset_info(_config("image_folder", tmp_path / "tfds", b))
  assert ia.class_names == ("x", "y", "z") and ia.split_sizes["train"] == 12
  assert ib.class_names == ("cat", "dog") and ib.split_sizes["train"] == 5
  assert ia.source_id != ib.source_id
  assert sorted(_labels_of(_config("image_folder", tmp_path / "tfds", b))) == [0, 0, 1, 1, 1]
  # Without manual_dir there is no telling which one is meant: an error lists both.
  ip._cached_source.cache_clear()  # pylint: disable=protected-access
  c = _config("image_folder", tmp_path / "tfds", tmp_path / "gone")
  with pytest.raises(DataError, match=r"holds 2 prepared sources.*set data.manual_dir"):
    ip.dataset_info(c)


def test_corrected_manual_dir_is_noticed_and_reprepared(tmp_path, caplog):
  # Old code: a re-prepare from a corrected download kept the old splits without a word.
  manual = str(tmp_path / "manual")
  root = fx.make_busi(manual, counts=(6, 4, 3))
  first = ip.dataset_info(_config("busi", tmp_path / "tfds", manual))
  assert sum(first.split_sizes.values()) == 13
  fx.write_image(os.path.join(root, "normal", "normal (4).png"), 99, gray=True)
  ip._cached_source.cache_clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    second = ip.dataset_info(_config("busi", tmp_path / "tfds", manual))
  assert sum(second.split_sizes.values()) == 14 and second.source_id != first.source_id
  assert any("differs from the one(s) prepared before" in r.getMessage() for r in caplog.records)
  assert len(builders.prepared_sources("busi", str(tmp_path / "tfds"))) == 2


def test_limuc_pointed_at_train_and_validation_sets_uses_the_sibling_test_set(tmp_path, caplog):
  # Old code: carved its own 'test' out of the training half (1686/11276 of 8 = 1 image).
  root = fx.make_limuc(str(tmp_path / "m"), train=(3, 2, 2, 1), test=(1, 1, 1, 1), images=False)
  with caplog.at_level(logging.WARNING):
    got = splits.limuc_splits(os.path.join(root, "train_and_validation_sets"))
  assert len(got["train"]) == 8 and len(got["test"]) == 4
  assert all("/test_set/" in p for p, _ in got["test"])
  assert any("one half of the published split" in r.getMessage() for r in caplog.records)
  # The test half alone has nothing to train on: say where the other half must be.
  alone = tmp_path / "alone" / "train_and_validation_sets"
  os.makedirs(tmp_path / "alone")
  os.rename(os.path.join(root, "train_and_validation_sets"), alone)
  with pytest.raises(DataError, match="does not hold both train_and_validation_sets/ and test_set/"):
    splits.limuc_splits(str(alone))


def test_busi_other_formats_are_read_and_unknown_ones_counted(tmp_path, caplog):
  # Old code: .gif / .webp images were skipped without a count.
  manual = str(tmp_path / "m")
  root = fx.make_busi(manual, counts=(3, 2, 2), images=False)
  from PIL import Image
  import numpy as np
  px = np.full((8, 8), 7, np.uint8)
  Image.fromarray(px).save(os.path.join(root, "benign", "benign (9).gif"))
  Image.fromarray(px).save(os.path.join(root, "malignant", "malignant (9).webp"))
  for f in ("normal (8).heic", "normal (9).jp2"):
    fx.touch(os.path.join(root, "normal", f))
  with caplog.at_level(logging.WARNING):
    got = splits.busi_splits(manual)
  names = [os.path.basename(p) for v in got.values() for p, _ in v]
  assert len(names) == 9 and "benign (9).gif" in names and "malignant (9).webp" in names
  msgs = [r.getMessage() for r in caplog.records]
  assert any("skipped 2 file(s)" in m and ".heic x1" in m and ".jp2 x1" in m for m in msgs), msgs
  data, fmt = splits.read_image(os.path.join(root, "malignant", "malignant (9).webp"))
  assert fmt == "png" and data[:4] == b"\x89PNG"


def test_folder_name_with_trailing_space_is_matched_and_shown_with_repr(tmp_path, caplog):
  # The Kaggle copy's `OCT2017 `: old code failed with "looked in ., OCT2017, ..." (invisible).
  manual = str(tmp_path / "m")
  root = fx.make_oct(manual, images=False)
  os.rename(root, root + " ")
  with caplog.at_level(logging.WARNING):
    got = splits.oct_splits(manual)
  assert len(got["test"]) == 4
  assert any("'OCT2017 '" in r.getMessage() for r in caplog.records)
  # When nothing fits, the listing is shown with repr so that odd whitespace is visible.
  os.rename(root + " ", os.path.join(manual, "OCT 2017\t"))
  with pytest.raises(DataError, match=r"holds \['OCT 2017\\t'\]"):
    splits.oct_splits(manual)
