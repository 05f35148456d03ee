"""Layout parsing and split logic of the six datasets and the image folder, on fixture trees."""

import collections
import json
import os
import shutil

import numpy as np
import pytest

import data_fixtures as fx
from shpeft_jax.data import splits as S
from shpeft_jax.errors import DataError


def _rel(splits, root):
  return {k: [(os.path.relpath(p, root), l) for p, l in v] for k, v in splits.items()}


def _sizes(splits):
  return {k: len(v) for k, v in splits.items()}


# ------------------------------------------------------------------------------------- Chaoyang


def test_chaoyang_reads_json_labels(tmp_path):
  fx.make_chaoyang(str(tmp_path), train=(3, 2, 2, 1), test=(1, 2, 1, 1), images=False)
  splits = S.chaoyang_splits(str(tmp_path))
  assert _sizes(splits) == {"train": 8, "test": 5}
  assert S.counts(splits["train"], 4) == [3, 2, 2, 1]
  assert S.counts(splits["test"], 4) == [1, 2, 1, 1]
  # The label is the JSON's, matched to the named file.
  with open(tmp_path / "chaoyang-data" / "test.json") as f:
    expected = {os.path.join(str(tmp_path), "chaoyang-data", r["name"]): r["label"]
                for r in json.load(f)}
  assert dict(splits["test"]) == expected


def test_chaoyang_missing_listed_file(tmp_path):
  root = fx.make_chaoyang(str(tmp_path), images=False)
  os.remove(os.path.join(root, "train", os.listdir(os.path.join(root, "train"))[0]))
  with pytest.raises(DataError, match="does not exist"):
    S.chaoyang_splits(str(tmp_path))


# ------------------------------------------------------------------------------------- COVID-CT


def test_covid_ct_official_lists(tmp_path):
  fx.make_covid_ct(str(tmp_path), images=False)
  splits = S.covid_ct_splits(str(tmp_path))
  assert _sizes(splits) == {"train": 5, "validation": 3, "test": 3}
  # COVID is class 1, non-COVID class 0, per the list each file came from.
  assert S.counts(splits["train"], 2) == [2, 3]
  assert S.counts(splits["validation"], 2) == [2, 1]
  assert S.counts(splits["test"], 2) == [1, 2]
  for p, l in sum(splits.values(), []):
    assert ("CT_COVID" in p.split(os.sep)) == (l == 1)


def test_covid_ct_missing_split_list_names_layout(tmp_path):
  root = fx.make_covid_ct(str(tmp_path), images=False)
  os.remove(os.path.join(root, "Data-split", "COVID", "valCT_COVID.txt"))
  with pytest.raises(DataError, match=r"valCT_COVID\.txt[\s\S]*github.com/UCSD-AI4H/COVID-CT"):
    S.covid_ct_splits(str(tmp_path))


# ------------------------------------------------------------------------------------- BUSI


def test_busi_published_counts_give_paper_proportions(tmp_path):
  # The published 437 benign / 210 malignant / 133 normal images, each with its mask(s). The
  # paper's 559 / 79 / 160 add up to 798, not 780: the 780 are split in those proportions.
  root = fx.make_busi(str(tmp_path), counts=(437, 210, 133), images=False, masks=False)
  for cls in ("benign", "malignant"):
    fx.touch(os.path.join(root, cls, f"{cls} (1)_mask.png"))
  splits = S.busi_splits(str(tmp_path))
  # 780 * (559, 79, 160) / 798 = (546.4, 77.2, 156.4) -> largest remainder -> 547, 77, 156.
  assert _sizes(splits) == {"train": 547, "validation": 77, "test": 156}
  every = sum(splits.values(), [])
  assert len(every) == len(set(every)) == 780
  assert not any("_mask" in os.path.basename(p) for p, _ in every)
  # Stratified: each split holds each class's share to within one image.
  for split, exs in splits.items():
    c = S.counts(exs, 3)
    for cls, total in enumerate((437, 210, 133)):
      assert abs(c[cls] - total * len(exs) / 780) <= 1.0, (split, c)


def test_busi_mask_exclusion_and_mapping(tmp_path):
  root = fx.make_busi(str(tmp_path), counts=(5, 3, 2), images=False)
  splits = S.busi_splits(str(tmp_path))
  every = sum(splits.values(), [])
  assert len(every) == 10  # 10 images, 13 mask files skipped
  for p, l in every:
    assert os.path.basename(os.path.dirname(p)) == S.BUSI_CLASSES[l]
    assert "_mask" not in os.path.basename(p)
  assert sum(1 for c in os.listdir(root) for f in os.listdir(os.path.join(root, c))) == 23


def test_busi_split_is_deterministic_and_seeded(tmp_path):
  fx.make_busi(str(tmp_path / "a"), counts=(30, 15, 10), images=False)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  a = _rel(S.busi_splits(str(tmp_path / "a")), str(tmp_path / "a"))
  b = _rel(S.busi_splits(str(tmp_path / "b")), str(tmp_path / "b"))
  assert a == b  # same files elsewhere on disk -> same split
  c = _rel(S.busi_splits(str(tmp_path / "a"), seed=1), str(tmp_path / "a"))
  assert c != a and _sizes(c) == _sizes(a)


def test_busi_empty_class_is_error(tmp_path):
  root = fx.make_busi(str(tmp_path), images=False)
  shutil.rmtree(os.path.join(root, "normal"))
  os.makedirs(os.path.join(root, "normal"))
  touch_mask = os.path.join(root, "normal", "normal (1)_mask.png")
  fx.touch(touch_mask)  # only a mask: still no image to classify
  with pytest.raises(DataError, match="holds no images"):
    S.busi_splits(str(tmp_path))


# ------------------------------------------------------------------------------------- CXR


@pytest.mark.parametrize("name,label", [
    ("person1_bacteria_1.jpeg", 1), ("person1000_virus_1681.jpeg", 2),
    ("PERSON3_BACTERIA_12.JPEG", 1), ("person55_virus_110.jpeg", 2)])
def test_cxr_label_from_filename(name, label):
  assert S.cxr_label(name, "PNEUMONIA") == label
  assert S.cxr_label("IM-0115-0001.jpeg", "NORMAL") == 0


def test_cxr_unparseable_pneumonia_name_is_error():
  with pytest.raises(DataError, match="person9_scan.jpeg"):
    S.cxr_label("person9_scan.jpeg", "PNEUMONIA")


def test_cxr_published_train_gives_paper_validation():
  # Mendeley v2 train: 1,349 normal + 3,883 pneumonia (2,538 bacterial, 1,345 viral) = 5,232.
  exs = [(f"/x/{i:05d}.jpeg", 0 if i < 1349 else 1 if i < 1349 + 2538 else 2)
         for i in range(5232)]
  splits = S._carve(exs, "validation", S.CXR_VAL_FRACTION, 0, "/x", "train")
  assert _sizes(splits) == {"train": 4708, "validation": 524}
  val = S.counts(splits["validation"], 3)
  for cls, total in enumerate((1349, 2538, 1345)):
    assert abs(val[cls] - total * 524 / 5232) <= 1.0
  assert not set(splits["train"]) & set(splits["validation"])


def test_cxr_class_mapping_and_kaggle_val_merged(tmp_path):
  fx.make_cxr(str(tmp_path), train=(4, 5, 3), test=(2, 1, 1), val=(1, 1, 0), images=False)
  splits = S.cxr_splits(str(tmp_path))
  train_val = splits["train"] + splits["validation"]
  assert len(train_val) == 14  # Kaggle's 16-image val folder is folded back into train
  assert S.counts(train_val, 3) == [5, 6, 3]
  for p, l in sum(splits.values(), []):
    name = os.path.basename(p)
    assert l == (0 if name.startswith("IM-") else 1 if "bacteria" in name else 2)


# ------------------------------------------------------------------------------------- OCT


def test_oct_mapping_and_carved_validation(tmp_path):
  fx.make_oct(str(tmp_path), train=(40, 20, 15, 45), test=(3, 3, 3, 3), images=False)
  splits = S.oct_splits(str(tmp_path))
  n_val = round(120 * 10832 / 108309)
  assert _sizes(splits) == {"train": 120 - n_val, "validation": n_val, "test": 12}
  for p, l in sum(splits.values(), []):
    assert os.path.basename(os.path.dirname(p)) == S.OCT_CLASSES[l]


def test_oct_paper_fraction_on_published_size():
  # 108,312 published training images -> 10,832 validation (the paper's number), 97,480 train.
  exs = [(f"/x/{i:06d}.jpeg", i % 4) for i in range(108312)]
  out = S._carve(exs, "validation", S.OCT_VAL_FRACTION, 0, "/x", "train")
  assert _sizes(out) == {"train": 97480, "validation": 10832}


def test_oct_missing_class_folder(tmp_path):
  root = fx.make_oct(str(tmp_path), images=False)
  shutil.rmtree(os.path.join(root, "test", "DME"))
  with pytest.raises(DataError, match="DME"):
    S.oct_splits(str(tmp_path))


# ------------------------------------------------------------------------------------- LIMUC


def test_limuc_published_folders(tmp_path):
  fx.make_limuc(str(tmp_path), published=True, train=(3, 2, 2, 1), test=(1, 1, 2, 1),
                images=False)
  splits = S.limuc_splits(str(tmp_path))
  assert S.counts(splits["train"], 4) == [3, 2, 2, 1]
  assert S.counts(splits["test"], 4) == [1, 1, 2, 1]


def test_limuc_class_folders_only_split_is_paper_sized(tmp_path):
  fx.make_limuc(str(tmp_path), published=False, train=(30, 20, 10, 8), test=(6, 4, 2, 2),
                images=False)
  splits = S.limuc_splits(str(tmp_path))
  assert _sizes(splits) == {"train": 82 - round(82 * 1686 / 11276),
                            "test": round(82 * 1686 / 11276)}
  again = S.limuc_splits(str(tmp_path))
  assert again == splits
  # The published 11,276 images -> 9,590 / 1,686.
  exs = [(f"/x/{i:05d}.bmp", i % 4) for i in range(11276)]
  out = S._carve(exs, "test", S.LIMUC_TEST_FRACTION, 0, "/x", "train")
  assert _sizes(out) == {"train": 9590, "test": 1686}


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn,url", [
    (S.chaoyang_splits, "HSA-NRL"), (S.covid_ct_splits, "UCSD-AI4H"), (S.busi_splits, "BUSI"),
    (S.cxr_splits, "rscbjbr9sj"), (S.oct_splits, "kermany2018"), (S.limuc_splits, "zenodo")])
def test_missing_or_misplaced_manual_dir(tmp_path, fn, url):
  with pytest.raises(DataError, match=rf"does not exist[\s\S]*Expected[\s\S]*{url}"):
    fn(str(tmp_path / "nowhere"))
  # A folder that exists but holds something else (e.g. the archive not extracted).
  fx.touch(str(tmp_path / "misplaced" / "archive.zip"))
  with pytest.raises(DataError, match=rf"Expected[\s\S]*{url}"):
    fn(str(tmp_path / "misplaced"))


def test_corrupt_image_named(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
  with pytest.raises(DataError, match="bad.png"):
    S.read_image(str(bad))
  truncated = tmp_path / "trunc.jpg"
  fx.write_image(str(truncated), 0, size=64)
  truncated.write_bytes(truncated.read_bytes()[:200])
  with pytest.raises(DataError, match="trunc.jpg"):
    S.read_image(str(truncated))


def test_read_image_passes_jpeg_png_and_reencodes_bmp(tmp_path):
  from PIL import Image
  import io
  for ext, fmt in ((".png", "png"), (".jpg", "jpeg"), (".bmp", "png")):
    p = str(tmp_path / f"x{ext}")
    pixels = fx.write_image(p, 3)
    data, got = S.read_image(p)
    assert got == fmt
    if ext != ".jpg":
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    else:
      assert data == open(p, "rb").read()


# ------------------------------------------------------------------------------------- helpers


def test_stratified_split_exact_sizes_and_shares():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 997)
  exs = [(f"/r/{i:04d}", int(l)) for i, l in enumerate(labels)]
  sizes = {"a": 600, "b": 97, "c": 300}
  out = S.stratified_split(exs, sizes, seed=7, root="/r")
  assert _sizes(out) == sizes
  assert sorted(sum(out.values(), [])) == sorted(exs)
  totals = collections.Counter(labels.tolist())
  for name, part in out.items():
    c = collections.Counter(l for _, l in part)
    for cls, t in totals.items():
      assert abs(c[cls] - t * sizes[name] / 997) <= 1.0
  # Listing order does not matter.
  assert S.stratified_split(exs[::-1], sizes, seed=7, root="/r") == out


def test_apportion_matches_hand_computation():
  assert S.apportion(798, [559, 79, 160]) == [559, 79, 160]
  assert S.apportion(780, [559, 79, 160]) == [547, 77, 156]
  assert S.apportion(10, [0.8, 0.1, 0.1]) == [8, 1, 1]
  assert S.apportion(7, [1, 1, 1]) == [3, 2, 2]


# ------------------------------------------------------------------------------------- folder


def test_image_folder_flat_and_split_dirs(tmp_path):
  fx.make_image_folder(str(tmp_path / "flat"), per_class=(10, 10), images=False)
  flat = S.image_folder_splits(str(tmp_path / "flat"))
  assert _sizes(flat) == {"train": 16, "validation": 2, "test": 2}
  assert S.image_folder_classes(str(tmp_path / "flat")) == ["cat", "dog"]
  fx.make_image_folder(str(tmp_path / "split"), per_class=(2, 3), split_dirs=True, images=False)
  sp = S.image_folder_splits(str(tmp_path / "split"))
  assert _sizes(sp) == {"train": 5, "validation": 5, "test": 5}
  for p, l in sp["train"]:
    assert os.path.basename(os.path.dirname(p)) == ["cat", "dog"][l]


def test_image_folder_empty_class_is_error(tmp_path):
  fx.make_image_folder(str(tmp_path), images=False)
  os.makedirs(tmp_path / "empty_class")
  with pytest.raises(DataError, match="empty_class"):
    S.image_folder_splits(str(tmp_path))


def test_empty_split_is_error(tmp_path):
  root = fx.make_covid_ct(str(tmp_path), sizes={"COVID": (2, 0, 1), "NonCOVID": (2, 0, 1)},
                          images=False)
  assert os.path.getsize(os.path.join(root, "Data-split", "COVID", "valCT_COVID.txt")) <= 1
  with pytest.raises(DataError, match="'validation' is empty"):
    S.covid_ct_splits(str(tmp_path))
