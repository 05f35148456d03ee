"""ChestX-ray14 and CheXpert in their published layouts, against hand-computed expectations."""

import os

import ml_collections
import pytest

import data_fixtures as fx
from shpeft_jax.data import chest_xray, default_data_config
from shpeft_jax.errors import ConfigError, DataError


def _cfg(**kw) -> ml_collections.ConfigDict:
  c = default_data_config()
  c.update(kw)
  return c


def _by_name(parsed, split):
  return {os.path.basename(p): label for p, label in parsed.splits[split]}


def _patients(parsed, split):
  return sorted({parsed.patient(p) for p, _ in parsed.splits[split]})


# ------------------------------------------------------------------------------- ChestX-ray14


def test_chestxray14_lists_labels_and_patient_split(tmp_path):
  fx.make_chestxray14(str(tmp_path / "nih"), images=False)
  parsed = chest_xray.chestxray14_source(str(tmp_path / "nih"), _cfg(val_fraction=0.3))
  assert parsed.task == "multi_label" and len(parsed.class_names) == 14
  assert parsed.class_names[12] == "Pleural_Thickening"
  # train_val: patients with 4, 3, 2, 1 images; targets 7 / 3 (70 / 30 of 10). Larger patients
  # first, each to the split furthest below its target: 4 -> train (7 vs 3 short), 3 -> train
  # (3 vs 3: the first), 2 -> validation, 1 -> validation.
  assert parsed.split_sizes == {"train": 7, "validation": 3, "test": 2}
  assert _patients(parsed, "train") == ["1", "2"]
  assert _patients(parsed, "validation") == ["3", "4"]
  assert _patients(parsed, "test") == ["5", "6"]
  train = _by_name(parsed, "train")
  # Atelectasis, Cardiomegaly, Effusion = findings 0, 1, 2; 'No Finding' = all zeros.
  assert train["00000001_000.png"] == (1.0, 1.0, 1.0) + (0.0,) * 11
  assert train["00000001_003.png"] == (0.0,) * 14
  assert train["00000002_002.png"] == (0.0,) * 12 + (1.0, 1.0)  # Pleural_Thickening, Hernia
  assert _by_name(parsed, "validation")["00000004_000.png"] == (
      0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1)  # Mass (4), Hernia (13)
  # Images are found in images_001/images and images_002/images.
  paths = [p for v in parsed.splits.values() for p, _ in v]
  assert {p.split(os.sep)[-3] for p in paths} == {"images_001", "images_002"}
  # The default 10% validation: targets 9 / 1 -> patients 1, 2, 3 train, patient 4 validation.
  default = chest_xray.chestxray14_source(str(tmp_path / "nih"), _cfg())
  assert default.split_sizes == {"train": 9, "validation": 1, "test": 2}
  assert _patients(default, "validation") == ["4"]


def test_chestxray14_2017_csv_and_flat_images_folder(tmp_path):
  root = fx.make_chestxray14(str(tmp_path / "nih"), csv_name="Data_Entry_2017.csv", images=False)
  # The box.com archives each extract to images/: move every file there.
  os.makedirs(os.path.join(root, "images"))
  for sub in ("images_001", "images_002"):
    for f in os.listdir(os.path.join(root, sub, "images")):
      os.rename(os.path.join(root, sub, "images", f), os.path.join(root, "images", f))
  parsed = chest_xray.chestxray14_source(root, _cfg(val_fraction=0.3))
  assert parsed.num_examples == 12
  assert {p.split(os.sep)[-2] for v in parsed.splits.values() for p, _ in v} == {"images"}


def test_chestxray14_bad_input(tmp_path):
  root = fx.make_chestxray14(str(tmp_path / "nih"), images=False)
  csv_path = os.path.join(root, "Data_Entry_2017_v2020.csv")
  text = open(csv_path).read()
  # An unknown finding names the file, the row and the value.
  with open(csv_path, "w") as f:
    f.write(text.replace("Emphysema|Fibrosis", "Emphysema|Fibrosys"))
  with pytest.raises(DataError, match=r"Data_Entry_2017_v2020.csv row 7 has the finding "
                                      r"'Fibrosys' in Finding Labels"):
    chest_xray.chestxray14_source(root, _cfg())
  # A missing column names it and lists the ones present.
  with open(csv_path, "w") as f:
    f.write(text.replace("Patient ID", "PatientID"))
  with pytest.raises(DataError, match=r"no column 'Patient ID'; its columns are \['Image Index', "
                                      r"'Finding Labels', 'Follow-up #', 'PatientID'"):
    chest_xray.chestxray14_source(root, _cfg())
  # A patient in both official lists.
  with open(csv_path, "w") as f:
    f.write(text.replace("00000005_000.png,Effusion,10,5", "00000005_000.png,Effusion,10,4"))
  with pytest.raises(DataError, match="patient '4' has images in split 'train' and in split "
                                      "'test'"):
    chest_xray.chestxray14_source(root, _cfg(val_fraction=0.0))


def test_chestxray14_missing_images_counted_against_the_allowed_fraction(tmp_path):
  root = fx.make_chestxray14(str(tmp_path / "nih"), images=False)
  os.remove(os.path.join(root, "images_002", "images", "00000006_000.png"))  # 1 of 2 test images
  with pytest.raises(DataError, match=r"1 of the 2 images of split 'test' \(50.0%\) do not "
                                      r"exist[\s\S]*00000006_000.png \(.*row 13\)"):
    chest_xray.chestxray14_source(root, _cfg())
  parsed = chest_xray.chestxray14_source(root, _cfg(max_missing_fraction=0.5))
  assert parsed.split_sizes["test"] == 1


# ------------------------------------------------------------------------------- CheXpert


def test_chexpert_uncertainty_policies_and_blanks(tmp_path):
  fx.make_chexpert(str(tmp_path), images=False)
  # Row 1 of train.csv: Atelectasis -1, Cardiomegaly blank, Consolidation 1, Edema 0, Pleural
  # Effusion -1 (the 5 competition findings, in that order).
  row1 = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
  expected = {"ones": (1.0, 0.0, 1.0, 0.0, 1.0), "zeros": (0.0, 0.0, 1.0, 0.0, 0.0),
              "ignore": (-1.0, 0.0, 1.0, 0.0, -1.0)}
  for policy, vector in expected.items():
    parsed = chest_xray.chexpert_source(str(tmp_path), _cfg(chexpert_uncertainty=policy,
                                                            val_fraction=0.3))
    assert parsed.class_names == chest_xray.CHEXPERT_COMPETITION
    labels = dict(parsed.splits["train"])
    assert labels[os.path.join(str(tmp_path), *row1.split("/"))] == vector, policy
  # Splits: patients with 4, 3, 2, 1 images, 30% validation -> 7 / 3; valid.csv is the test split.
  assert parsed.split_sizes == {"train": 7, "validation": 3, "test": 2}
  assert _patients(parsed, "train") == ["patient00001", "patient00002"]
  assert _patients(parsed, "validation") == ["patient00003", "patient00004"]
  assert _patients(parsed, "test") == ["patient64541", "patient64542"]
  assert sorted(label for _, label in parsed.splits["test"]) == [(0.0, 0.0, 0.0, 1.0, 1.0),
                                                       (0.0, 1.0, 0.0, 0.0, 0.0)]


def test_chexpert_all_findings_and_frontal_only(tmp_path):
  fx.make_chexpert(str(tmp_path), images=False)
  parsed = chest_xray.chexpert_source(str(tmp_path), _cfg(chexpert_findings="all",
                                                          val_fraction=0.3))
  assert parsed.class_names == fx.CHEXPERT_COLUMNS[5:] and len(parsed.class_names) == 14
  row = os.path.join(str(tmp_path), "CheXpert-v1.0-small", "train", "patient00002", "study1",
                     "view1_frontal.jpg")
  assert dict(parsed.splits["train"])[row] == (1.0,) + (0.0,) * 13  # No Finding; blanks: 0
  # Frontal only: 6 of the 10 training images (2, 2, 1, 1 per patient): 70/30 -> 4 / 2.
  frontal = chest_xray.chexpert_source(str(tmp_path), _cfg(chexpert_frontal_only=True,
                                                           val_fraction=0.3))
  assert frontal.split_sizes == {"train": 4, "validation": 2, "test": 2}
  assert all("frontal" in p for v in frontal.splits.values() for p, _ in v)
  # Frontal only and uncertain -> 0: Atelectasis is then positive only on a lateral view.
  with pytest.raises(DataError, match="the finding 'Atelectasis' has no positive example in the "
                                      "training split"):
    chest_xray.chexpert_source(str(tmp_path), _cfg(chexpert_frontal_only=True, val_fraction=0.3,
                                                   chexpert_uncertainty="zeros"))


def test_chexpert_layout_and_bad_values(tmp_path):
  # The full-resolution folder name works the same.
  root = fx.make_chexpert(str(tmp_path), folder="CheXpert-v1.0", images=False)
  parsed = chest_xray.chexpert_source(str(tmp_path), _cfg(val_fraction=0.3))
  assert all(p.startswith(os.path.join(root, "train")) for p, _ in parsed.splits["train"])
  with pytest.raises(ConfigError, match="chexpert_uncertainty='maybe'"):
    chest_xray.chexpert_source(str(tmp_path), _cfg(chexpert_uncertainty="maybe"))
  rows = [dict(r) for r in fx.CHEXPERT_TRAIN]
  rows[2]["Edema"] = "2.0"
  fx.make_chexpert(str(tmp_path / "bad"), train=rows, images=False)
  with pytest.raises(DataError, match=r"train.csv row 4 has Edema='2.0'; allowed values are"):
    chest_xray.chexpert_source(str(tmp_path / "bad"), _cfg())
  with pytest.raises(DataError, match=r"no train.csv and valid.csv under [\s\S]*stanfordmlgroup"):
    chest_xray.chexpert_source(str(tmp_path / "bad" / "CheXpert-v1.0-small" / "train"), _cfg())
