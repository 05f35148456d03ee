"""The `csv` source: labels, splits and patient grouping against hand-computed expectations, and
every bad input of issue 22 as a one-line error naming it."""

import os
import re

import ml_collections
import pytest

import data_fixtures as fx
from shpeft_jax.data import default_data_config, tables
from shpeft_jax.errors import ConfigError, DataError

# 20 images of 9 patients with 5, 4, 3, 2, 2, 1, 1, 1, 1 images; class by patient.
PATIENT_SIZES = {"p1": 5, "p2": 4, "p3": 3, "p4": 2, "p5": 2, "p6": 1, "p7": 1, "p8": 1, "p9": 1}
PATIENT_CLASS = {"p1": "benign", "p2": "malignant", "p3": "normal", "p4": "benign",
                 "p5": "normal", "p6": "malignant", "p7": "benign", "p8": "normal",
                 "p9": "malignant"}


def _cfg(**kw) -> ml_collections.ConfigDict:
  c = default_data_config()
  c.name = "csv"
  c.csv_files = ("labels.csv",)
  c.update(kw)
  return c


def _patient_table(root, extra_columns=()):
  rows = []
  for p, n in PATIENT_SIZES.items():
    for i in range(n):
      rel = f"imgs/{p}_{i}.png"
      fx.touch(os.path.join(root, rel))
      rows.append([rel, PATIENT_CLASS[p], p] + [c(p, i) for _, c in extra_columns])
  fx.write_csv(os.path.join(root, "labels.csv"),
               ["path", "label", "patient"] + [h for h, _ in extra_columns], rows)
  return rows


def _patients(parsed, split):
  return sorted({parsed.patient(p) for p, _ in parsed.splits[split]})


def test_single_label_carved_by_patient(tmp_path):
  root = str(tmp_path)
  _patient_table(root)
  parsed = tables.csv_source(root, _cfg(csv_label_column="label", csv_patient_column="patient"))
  assert parsed.task == "single_label"
  assert parsed.class_names == ("benign", "malignant", "normal")  # sorted names
  # Targets 16 / 2 / 2 (80/10/10 of 20). Larger patients first, each to the split furthest below
  # its target (ties: train, validation, test): 5, 4, 3, 2, 2 -> train (16); the four one-image
  # patients -> validation, validation, test, test.
  assert parsed.split_sizes == {"train": 16, "validation": 2, "test": 2}
  assert _patients(parsed, "train") == ["p1", "p2", "p3", "p4", "p5"]
  singles = _patients(parsed, "validation") + _patients(parsed, "test")
  assert sorted(singles) == ["p6", "p7", "p8", "p9"]
  for split, records in parsed.splits.items():
    for path, label in records:
      assert parsed.class_names[label] == PATIENT_CLASS[parsed.patient(path)]
  # The same split from a shuffled table (row order does not matter).
  rows = _patient_table(str(tmp_path / "again"))
  fx.write_csv(str(tmp_path / "again" / "labels.csv"), ["path", "label", "patient"], rows[::-1])
  again = tables.csv_source(str(tmp_path / "again"),
                            _cfg(csv_label_column="label", csv_patient_column="patient"))
  assert {s: _patients(again, s) for s in again.splits} == {
      s: _patients(parsed, s) for s in parsed.splits}


def test_single_label_indices_class_names_and_path_format(tmp_path):
  root = str(tmp_path)
  rows = []
  for i in range(10):
    fx.touch(os.path.join(root, "images", f"id{i}.jpg"))
    rows.append([f"id{i}", str(i % 2), "train" if i < 6 else ("val" if i < 8 else "Test")])
  fx.write_csv(os.path.join(root, "labels.csv"), ["image_id", "Target", "fold"], rows)
  cfg = _cfg(csv_path_column="image_id", csv_path_format="images/{}.jpg",
             csv_label_column="Target", csv_split_column="fold",
             csv_class_names=("normal", "pneumonia"))
  parsed = tables.csv_source(root, cfg)
  assert parsed.class_names == ("normal", "pneumonia")
  assert parsed.split_sizes == {"train": 6, "validation": 2, "test": 2}
  assert dict(parsed.splits["test"]) == {os.path.join(root, "images", "id8.jpg"): 0,
                                         os.path.join(root, "images", "id9.jpg"): 1}
  # Without class names, indices are named '0', '1'.
  cfg.csv_class_names = ()
  assert tables.csv_source(root, cfg).class_names == ("0", "1")
  # An index outside the given classes names file, row and value.
  cfg.csv_class_names = ("normal",)
  with pytest.raises(DataError, match=r"labels.csv row 3 has Target='1', outside the class "
                                      r"indices 0..0"):
    tables.csv_source(root, cfg)


def test_multi_label_columns_with_blanks_and_split_column(tmp_path):
  root = str(tmp_path)
  rows = [  # path, Effusion, Mass, Nodule, split
      ["a.png", "1", "0", "", "train"], ["b.png", "0", "1", "-1", "train"],
      ["c.png", "1.0", "0.0", "1", "train"], ["d.png", "0", "0", "0", "validation"],
      ["e.png", "", "1", "0", "test"]]
  for r in rows:
    fx.touch(os.path.join(root, r[0]))
  fx.write_csv(os.path.join(root, "labels.csv"), ["path", "Effusion", "Mass", "Nodule", "split"],
               rows)
  parsed = tables.csv_source(root, _cfg(csv_label_columns=("Effusion", "Mass", "Nodule"),
                                        csv_split_column="split"))
  assert parsed.task == "multi_label" and parsed.class_names == ("Effusion", "Mass", "Nodule")
  labels = {os.path.basename(p): l for v in parsed.splits.values() for p, l in v}
  # Blank and -1 are unknown (-1.0), never negative.
  assert labels == {"a.png": (1.0, 0.0, -1.0), "b.png": (0.0, 1.0, -1.0),
                    "c.png": (1.0, 0.0, 1.0), "d.png": (0.0, 0.0, 0.0),
                    "e.png": (-1.0, 1.0, 0.0)}
  assert parsed.split_sizes == {"train": 3, "validation": 1, "test": 1}
  assert parsed.patients == {}  # no patient column: '' for every record
  # A value outside 1 / 0 / -1 / blank names file, row and value.
  rows[3][2] = "yes"
  fx.write_csv(os.path.join(root, "labels.csv"), ["path", "Effusion", "Mass", "Nodule", "split"],
               rows)
  with pytest.raises(DataError, match=r"labels.csv row 5 has Mass='yes'; allowed values are "):
    tables.csv_source(root, _cfg(csv_label_columns=("Effusion", "Mass", "Nodule"),
                                 csv_split_column="split"))


def test_findings_column_list_files_and_patient_grouped_validation(tmp_path):
  root = str(tmp_path)
  rows = [  # patient q1: 3 images, q2: 2, q3: 1, q4: 1 in train; t1 in test
      ["q1a.png", "Mass|Nodule", "q1"], ["q1b.png", "No Finding", "q1"],
      ["q1c.png", "Effusion", "q1"], ["q2a.png", "Mass", "q2"], ["q2b.png", "No Finding", "q2"],
      ["q3a.png", "Nodule", "q3"], ["q4a.png", "Effusion|Mass", "q4"],
      ["t1a.png", "Effusion", "t1"], ["t1b.png", "No Finding", "t1"]]
  for r in rows:
    fx.touch(os.path.join(root, "img", r[0]))
  fx.write_csv(os.path.join(root, "labels.csv"), ["path", "findings", "patient"], rows)
  with open(os.path.join(root, "train.txt"), "w") as f:
    f.write("\n".join(r[0] for r in rows[:7]) + "\n")
  with open(os.path.join(root, "test.txt"), "w") as f:
    f.write("t1a.png\nt1b.png\n")
  cfg = _cfg(csv_findings_column="findings", csv_image_root="img", csv_train_list="train.txt",
             csv_test_list="test.txt", csv_patient_column="patient", val_fraction=0.25)
  parsed = tables.csv_source(root, cfg)
  assert parsed.class_names == ("Effusion", "Mass", "Nodule")  # sorted; 'No Finding' = none
  labels = {os.path.basename(p): l for v in parsed.splits.values() for p, l in v}
  assert labels["q1a.png"] == (0.0, 1.0, 1.0) and labels["q1b.png"] == (0.0, 0.0, 0.0)
  assert labels["q4a.png"] == (1.0, 1.0, 0.0)
  # Train 7 images: targets 5 / 2 (75/25 of 7: 5.25, 1.75). q1 (3) -> train, q2 (2) -> train
  # (2 vs 2 short: train first), q3, q4 (1 each) -> validation.
  assert parsed.split_sizes == {"train": 5, "validation": 2, "test": 2}
  assert _patients(parsed, "train") == ["q1", "q2"]
  assert _patients(parsed, "validation") == ["q3", "q4"]
  # An unknown finding (with a fixed finding list) names file, row and value.
  cfg.csv_class_names = ("Effusion", "Mass")
  with pytest.raises(DataError, match=r"labels.csv row 2 has the finding 'Nodule' in findings"):
    tables.csv_source(root, cfg)


def test_grouped_split_exact_with_groups_of_one_and_order_free():
  items = [tables.Item(f"/x/{i:02d}.png", 0, "", "") for i in range(23)]
  parts = tables.grouped_split(items, {"train": 0.7, "validation": 0.1, "test": 0.2}, seed=0)
  # 23 * (0.7, 0.1, 0.2) = 16.1, 2.3, 4.6 -> largest remainder -> 16, 2, 5.
  assert {s: len(v) for s, v in parts.items()} == {"train": 16, "validation": 2, "test": 5}
  assert sorted(it.path for v in parts.values() for it in v) == sorted(it.path for it in items)
  assert tables.grouped_split(items[::-1], {"train": 0.7, "validation": 0.1, "test": 0.2},
                              seed=0) == parts
  assert tables.grouped_split(items, {"train": 0.7, "validation": 0.1, "test": 0.2},
                              seed=1) != parts


# ------------------------------------------------------------------------------- bad input


def test_missing_column_names_it_and_lists_the_present_ones(tmp_path):
  _patient_table(str(tmp_path))
  with pytest.raises(DataError, match=r"labels.csv has no column 'diagnosis'; its columns are "
                                      r"\['path', 'label', 'patient'\]"):
    tables.csv_source(str(tmp_path), _cfg(csv_label_column="diagnosis"))


def test_label_outside_the_given_classes_names_file_row_value(tmp_path):
  _patient_table(str(tmp_path))
  with pytest.raises(DataError, match=r"labels.csv row 11 has label='normal', not one of the "
                                      r"classes \['benign', 'malignant'\]"):
    tables.csv_source(str(tmp_path), _cfg(csv_label_column="label",
                                          csv_class_names=("benign", "malignant")))


def test_class_names_that_differ_only_by_case_are_refused(tmp_path):
  rows = _patient_table(str(tmp_path))
  rows[0][1] = "Benign"
  fx.write_csv(os.path.join(str(tmp_path), "labels.csv"), ["path", "label", "patient"], rows)
  with pytest.raises(DataError, match="classes 'Benign' and 'benign' differ only by case"):
    tables.csv_source(str(tmp_path), _cfg(csv_label_column="label"))


def test_missing_images_counted_listed_and_allowed_up_to_the_fraction(tmp_path):
  root = str(tmp_path)
  _patient_table(root)
  for name in ("p1_0.png", "p2_3.png"):
    os.remove(os.path.join(root, "imgs", name))
  cfg = _cfg(csv_label_column="label", csv_patient_column="patient")
  with pytest.raises(DataError) as e:
    tables.csv_source(root, cfg)
  msg = str(e.value)
  assert "2 of the 20 images of the table (10.0%) do not exist" in msg
  assert "p1_0.png (" in msg and "labels.csv row 2)" in msg and "p2_3.png" in msg
  cfg.max_missing_fraction = 0.1
  parsed = tables.csv_source(root, cfg)
  assert parsed.num_examples == 18


def test_more_than_ten_missing_lists_the_first_ten(tmp_path):
  root = str(tmp_path)
  rows = [[f"m{i:02d}.png", "a", "train" if i < 14 else "test"] for i in range(16)]
  fx.write_csv(os.path.join(root, "labels.csv"), ["path", "label", "split"], rows)
  with pytest.raises(DataError) as e:
    tables.csv_source(root, _cfg(csv_label_column="label", csv_split_column="split"))
  msg = str(e.value)
  assert "14 of the 14 images of split 'train'" in msg
  assert re.findall(r"m(\d\d)\.png", msg) == [f"{i:02d}" for i in range(10)]
  assert "... and 4 more" in msg


def test_patient_in_two_given_splits_is_an_error(tmp_path):
  _patient_table(str(tmp_path), extra_columns=[("split", lambda p, i: "test" if (
      p == "p1" and i == 4) or p in ("p6", "p7") else "train")])
  with pytest.raises(DataError, match=r"patient 'p1' has images in split 'train' and in split "
                                      r"'test' \(.*labels.csv row 6\)"):
    tables.csv_source(str(tmp_path), _cfg(csv_label_column="label", csv_patient_column="patient",
                                          csv_split_column="split"))


def test_empty_split_is_an_error_naming_it(tmp_path):
  root = str(tmp_path)
  _patient_table(root, extra_columns=[("split", lambda p, i: {"p6": "val", "p7": "test"}.get(
      p, "train"))])
  os.remove(os.path.join(root, "imgs", "p6_0.png"))  # the only validation image
  with pytest.raises(DataError, match="split 'validation' is empty"):
    tables.csv_source(root, _cfg(csv_label_column="label", csv_split_column="split",
                                 max_missing_fraction=1.0))


def test_finding_without_positive_training_example_is_an_error(tmp_path):
  root = str(tmp_path)
  rows = [["a.png", "1", "0", "train"], ["b.png", "1", "0", "train"],
          ["c.png", "0", "1", "test"]]
  for r in rows:
    fx.touch(os.path.join(root, r[0]))
  fx.write_csv(os.path.join(root, "labels.csv"), ["path", "Effusion", "Mass", "split"], rows)
  with pytest.raises(DataError, match="the finding 'Mass' has no positive example in the "
                                      "training split"):
    tables.csv_source(root, _cfg(csv_label_columns=("Effusion", "Mass"), csv_split_column="split",
                                 val_fraction=0.0))


def test_repeated_rows_merge_and_conflicting_ones_are_refused(tmp_path):
  root = str(tmp_path)
  rows = _patient_table(root)
  fx.write_csv(os.path.join(root, "labels.csv"), ["path", "label", "patient"], rows + [rows[0]])
  parsed = tables.csv_source(root, _cfg(csv_label_column="label", csv_patient_column="patient"))
  assert parsed.num_examples == 20
  fx.write_csv(os.path.join(root, "labels.csv"), ["path", "label", "patient"],
               rows + [[rows[0][0], "normal", "p1"]])
  with pytest.raises(DataError, match=r"imgs/p1_0.png is listed twice with different labels"):
    tables.csv_source(root, _cfg(csv_label_column="label", csv_patient_column="patient"))


def test_config_mistakes(tmp_path):
  _patient_table(str(tmp_path))
  with pytest.raises(ConfigError, match="set exactly one of"):
    tables.csv_source(str(tmp_path), _cfg())
  with pytest.raises(ConfigError, match="csv_split_fractions"):
    tables.csv_source(str(tmp_path), _cfg(csv_label_column="label",
                                          csv_split_fractions=(0.5, 0.1)))
  with pytest.raises(ConfigError, match="not both"):
    tables.csv_source(str(tmp_path), _cfg(csv_label_column="label", csv_split_column="patient",
                                          csv_train_list="t.txt"))
