"""NIH ChestX-ray14 and Stanford CheXpert in their published layouts (multi-label).

Plain Python (no TensorFlow); the tables' shared pieces (columns, label cells, the patient-grouped
validation split, missing files, checks) are in `tables.py`.
"""

from __future__ import annotations

import os
import re

from absl import logging

from shpeft_jax.data import parsed as parsed_lib
from shpeft_jax.data import splits as splits_lib
from shpeft_jax.data import tables
from shpeft_jax.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# NIH ChestX-ray14.

# The 14 findings in the order of the NIH release (Wang et al. 2017) and most published work.
CHESTXRAY14_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia")
CHESTXRAY14_NO_FINDING = "No Finding"
CHESTXRAY14_URL = ("https://nihcc.app.box.com/v/ChestXray-NIHCC (or the Kaggle copy "
                   "nih-chest-xrays/data)")
CHESTXRAY14_LAYOUT = """\
  <manual_dir>/   (or <manual_dir>/ChestX-ray14/, CXR8/, data/)
    Data_Entry_2017_v2020.csv   (or Data_Entry_2017.csv)
    train_val_list.txt, test_list.txt
    images_001/images/00000001_000.png ... images_012/images/*.png
    (or images/*.png: the box.com archives images_001.tar.gz ... each extract to images/)"""
_CHESTXRAY14_CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
_IMAGE_DIR = re.compile(r"^images(_\d{3})?$")


def _chestxray14_root(manual_dir: str) -> tuple[str, str]:
  """(root, CSV path): the first candidate folder holding a Data_Entry file and both lists."""
  if not manual_dir or not os.path.isdir(manual_dir):
    raise DataError(f"chestxray14: data.manual_dir={manual_dir!r} does not exist. Expected the "
                    f"published layout:\n{CHESTXRAY14_LAYOUT}\nDownload it from {CHESTXRAY14_URL}.")
  for cand in (".", "ChestX-ray14", "CXR8", "data", "NIH"):
    root = os.path.normpath(os.path.join(manual_dir, cand))
    csvs = [c for c in _CHESTXRAY14_CSVS if os.path.isfile(os.path.join(root, c))]
    if csvs and all(os.path.isfile(os.path.join(root, f))
                    for f in ("train_val_list.txt", "test_list.txt")):
      return root, os.path.join(root, csvs[0])
  raise DataError(f"chestxray14: no Data_Entry_2017(_v2020).csv with train_val_list.txt and "
                  f"test_list.txt under {manual_dir} (holds {sorted(os.listdir(manual_dir))[:12]}). "
                  f"Expected the published layout:\n{CHESTXRAY14_LAYOUT}\nDownload it from "
                  f"{CHESTXRAY14_URL}.")


def _chestxray14_images(root: str) -> dict[str, str]:
  """{image file name: path} over images_NNN/images/ and images/ (one listing of each folder)."""
  found: dict[str, str] = {}
  for sub in sorted(os.listdir(root)):
    if not _IMAGE_DIR.match(sub) or not os.path.isdir(os.path.join(root, sub)):
      continue
    folder = os.path.join(root, sub, "images") if sub != "images" else os.path.join(root, sub)
    if os.path.isdir(folder):
      for f in os.listdir(folder):
        found.setdefault(f, os.path.join(folder, f))
  return found


def chestxray14_source(manual_dir: str, cfg) -> parsed_lib.ParsedSource:
  """The official train_val / test lists; validation carved from train_val by patient."""
  root, csv_path = _chestxray14_root(manual_dir)
  logging.info("chestxray14: labels from %s", csv_path)
  rows = tables.read_csv(csv_path, ("Image Index", "Finding Labels", "Patient ID"), "chestxray14")
  labels, _ = tables.findings_labels(rows, "Finding Labels", "|", CHESTXRAY14_NO_FINDING,
                                     CHESTXRAY14_FINDINGS, "chestxray14")
  images = _chestxray14_images(root)
  items = []
  for r, label in zip(rows, labels):
    name = r.cells["Image Index"]
    # A file never found is listed with the path where the images_001 layout would hold it.
    path = images.get(name) or os.path.join(root, "images_001", "images", name)
    items.append(tables.Item(path, label, r.cells["Patient ID"], r.where))
  items = tables.merge_duplicate_rows(items, "chestxray14")
  by_name = {os.path.basename(it.path): it for it in items}
  by_split: dict[str, list[tables.Item]] = {"train": [], "test": []}
  listed: dict[str, str] = {}
  for split, list_file in (("train", "train_val_list.txt"), ("test", "test_list.txt")):
    list_path = os.path.join(root, list_file)
    for line, name in tables.read_list(list_path, "chestxray14"):
      if name not in by_name:
        raise DataError(f"chestxray14: {list_path} line {line} lists {name!r}, which "
                        f"{os.path.basename(csv_path)} does not label.")
      if name in listed:
        raise DataError(f"chestxray14: {name!r} is listed twice ({listed[name]} and {list_file} "
                        f"line {line}); an image belongs to one split.")
      listed[name] = f"{list_file} line {line}"
      by_split[split].append(by_name[name])
  by_split = tables.drop_missing(by_split, cfg.max_missing_fraction, "chestxray14")
  by_split = tables.carve_validation(by_split, cfg.val_fraction, parsed_lib.MULTI_LABEL,
                                     splits_lib.SPLIT_SEED)
  return tables.finish("chestxray14", root, by_split, CHESTXRAY14_FINDINGS,
                       parsed_lib.MULTI_LABEL)


# ---------------------------------------------------------------------------------------------
# Stanford CheXpert.

# The 14 observation columns of train.csv / valid.csv, in the file's order.
CHEXPERT_OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices")
# The 5 findings of the CheXpert competition (Irvin et al. 2019), in the paper's order.
CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                        "Pleural Effusion")
CHEXPERT_FINDING_SETS = {"competition": CHEXPERT_COMPETITION, "all": CHEXPERT_OBSERVATIONS}
# -1 (uncertain) under each data.chexpert_uncertainty policy; blank (not mentioned) is negative.
CHEXPERT_UNCERTAINTY = {"ones": parsed_lib.POSITIVE, "zeros": parsed_lib.NEGATIVE,
                        "ignore": parsed_lib.UNKNOWN}
CHEXPERT_URL = ("https://stanfordmlgroup.github.io/competitions/chexpert/ (CheXpert-v1.0 or "
                "CheXpert-v1.0-small; Stanford AIMI registration)")
CHEXPERT_LAYOUT = """\
  <manual_dir>/CheXpert-v1.0-small/   (or CheXpert-v1.0/, or the files directly in <manual_dir>)
    train.csv, valid.csv   Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,...,Support Devices
    train/patient00001/study1/view1_frontal.jpg ...
    valid/patient64541/study1/view1_frontal.jpg ..."""
_PATIENT = re.compile(r"^patient\d+$")


def _chexpert_root(manual_dir: str) -> str:
  if not manual_dir or not os.path.isdir(manual_dir):
    raise DataError(f"chexpert: data.manual_dir={manual_dir!r} does not exist. Expected the "
                    f"published layout:\n{CHEXPERT_LAYOUT}\nDownload it from {CHEXPERT_URL}.")
  for cand in (".", "CheXpert-v1.0-small", "CheXpert-v1.0"):
    root = os.path.normpath(os.path.join(manual_dir, cand))
    if all(os.path.isfile(os.path.join(root, f)) for f in ("train.csv", "valid.csv")):
      return root
  raise DataError(f"chexpert: no train.csv and valid.csv under {manual_dir} (holds "
                  f"{sorted(os.listdir(manual_dir))[:12]}). Expected the published layout:\n"
                  f"{CHEXPERT_LAYOUT}\nDownload it from {CHEXPERT_URL}.")


def _chexpert_path(root: str, rel: str) -> str:
  """The image of a Path cell: 'CheXpert-v1.0-small/train/...' is relative to the folder that
  holds CheXpert-v1.0-small/, i.e. to root without its first component (whatever root is called)."""
  parts = rel.replace("\\", "/").split("/")
  if parts and parts[0].startswith("CheXpert-v1.0"):
    parts = parts[1:]
  return os.path.join(root, *parts)


def _chexpert_items(root: str, csv_name: str, findings: tuple[str, ...], cfg
                    ) -> list[tables.Item]:
  rows = tables.read_csv(os.path.join(root, csv_name), ("Path", "Frontal/Lateral") + findings,
                         "chexpert")
  cells = {"1": parsed_lib.POSITIVE, "1.0": parsed_lib.POSITIVE, "0": parsed_lib.NEGATIVE,
           "0.0": parsed_lib.NEGATIVE, "": parsed_lib.NEGATIVE,
           "-1": CHEXPERT_UNCERTAINTY[cfg.chexpert_uncertainty],
           "-1.0": CHEXPERT_UNCERTAINTY[cfg.chexpert_uncertainty]}
  labels = tables.binary_columns(rows, findings, cells, "chexpert")
  items = []
  for r, label in zip(rows, labels):
    view = r.cells["Frontal/Lateral"]
    if view not in ("Frontal", "Lateral"):
      raise DataError(f"chexpert: {r.where} has Frontal/Lateral={view!r}; allowed values are "
                      "'Frontal' and 'Lateral'.")
    if cfg.chexpert_frontal_only and view != "Frontal":
      continue
    patient = next((p for p in r.cells["Path"].split("/") if _PATIENT.match(p)), "")
    if not patient:
      raise DataError(f"chexpert: {r.where} has Path={r.cells['Path']!r} without a "
                      "patientNNNNN folder; the patient-grouped split needs it.")
    items.append(tables.Item(_chexpert_path(root, r.cells["Path"]), label, patient, r.where))
  return items


def chexpert_source(manual_dir: str, cfg) -> parsed_lib.ParsedSource:
  """train.csv -> train + validation (carved by patient); valid.csv -> test (the official test
  set is hidden, so published work tests on valid.csv)."""
  if cfg.chexpert_findings not in CHEXPERT_FINDING_SETS:
    raise ConfigError(f"data.chexpert_findings={cfg.chexpert_findings!r}; choose one of "
                      f"{sorted(CHEXPERT_FINDING_SETS)}.")
  if cfg.chexpert_uncertainty not in CHEXPERT_UNCERTAINTY:
    raise ConfigError(f"data.chexpert_uncertainty={cfg.chexpert_uncertainty!r}; choose one of "
                      f"{sorted(CHEXPERT_UNCERTAINTY)}.")
  findings = CHEXPERT_FINDING_SETS[cfg.chexpert_findings]
  root = _chexpert_root(manual_dir)
  by_split = {"train": _chexpert_items(root, "train.csv", findings, cfg),
              "test": _chexpert_items(root, "valid.csv", findings, cfg)}
  by_split = tables.unique_per_split(by_split, "chexpert")
  by_split = tables.drop_missing(by_split, cfg.max_missing_fraction, "chexpert")
  by_split = tables.carve_validation(by_split, cfg.val_fraction, parsed_lib.MULTI_LABEL,
                                     splits_lib.SPLIT_SEED)
  return tables.finish("chexpert", root, by_split, findings, parsed_lib.MULTI_LABEL)
