"""Parsing of the six datasets' published layouts into (path, label) lists per split.

Plain Python, no TensorFlow: the tfds builders call these functions, and the tests can check class
mapping, split sizes and determinism on tiny fixture trees in milliseconds.

Every function returns `{split_name: [(absolute_path, label_index), ...]}` with the paths sorted
(or in a seeded order that only depends on the relative paths), so the result is identical on every
machine, whatever the file system's listing order and wherever the data lives.
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from absl import logging

from shpeft_jax.errors import DataError

Example = tuple[str, int]
Splits = dict[str, list[Example]]

# DICOM (.dcm, .dicom) is decoded to PNG once, at preparation (`dicom.py`).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm",
                    ".dicom")
# Files that are never images of a dataset (a skipped one of any other kind is reported).
_NOT_DATA = (".txt", ".json", ".csv", ".md", ".xml", ".db", ".ini", ".zip", ".tar", ".gz")

# Seed of every carved split. Changing it changes the published numbers in docs/DATASETS.md.
SPLIT_SEED = 0

# ---------------------------------------------------------------------------------------------
# Per-dataset constants (class names in label order, where to download, the expected layout).

CHAOYANG_CLASSES = ("normal", "serrated", "adenocarcinoma", "adenoma")
CHAOYANG_URL = "https://bupt-ai-cz.github.io/HSA-NRL/ (form to request the 'chaoyang-data' archive)"
CHAOYANG_LAYOUT = """\
  <manual_dir>/chaoyang-data/   (or the files directly in <manual_dir>)
    train.json     [{"name": "train/xxx.JPG", "label": 0..3}, ...]
    test.json      [{"name": "test/yyy.JPG", "label": 0..3}, ...]
    train/*.JPG
    test/*.JPG"""

COVID_CT_CLASSES = ("non_covid", "covid")
COVID_CT_URL = "https://github.com/UCSD-AI4H/COVID-CT (Images-processed/*.zip and Data-split/)"
COVID_CT_LAYOUT = """\
  <manual_dir>/   (or <manual_dir>/COVID-CT/)
    CT_COVID/*.png|jpg           (unzipped Images-processed/CT_COVID.zip; may sit in Images-processed/)
    CT_NonCOVID/*.png|jpg        (unzipped Images-processed/CT_NonCOVID.zip)
    Data-split/COVID/{trainCT_COVID,valCT_COVID,testCT_COVID}.txt
    Data-split/NonCOVID/{trainCT_NonCOVID,valCT_NonCOVID,testCT_NonCOVID}.txt"""

BUSI_CLASSES = ("benign", "malignant", "normal")
BUSI_URL = "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset (Dataset_BUSI_with_GT)"
BUSI_LAYOUT = """\
  <manual_dir>/Dataset_BUSI_with_GT/   (or the class folders directly in <manual_dir>)
    benign/benign (1).png, benign (1)_mask.png, ...
    malignant/malignant (1).png, ...
    normal/normal (1).png, ...        (*_mask*.png are segmentation masks and are skipped)"""
# The paper's split sizes. They add up to 798, but BUSI has 780 images: the 780 are split in these
# proportions, 547 / 77 / 156 (no official split exists).
BUSI_SPLIT_SIZES = {"train": 559, "validation": 79, "test": 160}

CXR_CLASSES = ("normal", "bacterial", "viral")
CXR_URL = ("https://data.mendeley.com/datasets/rscbjbr9sj/2 (ChestXRay2017.zip) or "
           "https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia")
CXR_LAYOUT = """\
  <manual_dir>/chest_xray/   (or train/ and test/ directly in <manual_dir>)
    train/NORMAL/*.jpeg
    train/PNEUMONIA/personN_bacteria_M.jpeg, personN_virus_M.jpeg
    test/NORMAL/*.jpeg, test/PNEUMONIA/*.jpeg
    val/...  (optional, Kaggle copy only: merged into train before the validation split is carved)"""
# Validation carved from the 5,232 published training images: the paper's 4,708 / 524.
CXR_VAL_FRACTION = (524, 5232)

OCT_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
OCT_URL = ("https://data.mendeley.com/datasets/rscbjbr9sj/2 (OCT2017.tar.gz) or "
           "https://www.kaggle.com/datasets/paultimothymooney/kermany2018")
OCT_LAYOUT = """\
  <manual_dir>/OCT2017/   (or train/ and test/ directly in <manual_dir>)
    train/{CNV,DME,DRUSEN,NORMAL}/*.jpeg
    test/{CNV,DME,DRUSEN,NORMAL}/*.jpeg
    val/...  (optional, Kaggle copy only: merged into train before the validation split is carved)"""
# The paper's 97,477 / 10,832 train / validation.
OCT_VAL_FRACTION = (10832, 108309)

LIMUC_CLASSES = ("mayo_0", "mayo_1", "mayo_2", "mayo_3")
LIMUC_URL = "https://zenodo.org/records/5827695 (LIMUC, Labeled Images for Ulcerative Colitis)"
LIMUC_LAYOUT = """\
  <manual_dir>/   (or <manual_dir>/LIMUC/)
    train_and_validation_sets/{Mayo 0,Mayo 1,Mayo 2,Mayo 3}/*.bmp   (published 9,590 images)
    test_set/{Mayo 0,...,Mayo 3}/*.bmp                               (published 1,686 images)
  or, when only the class folders are present:
    {Mayo 0,Mayo 1,Mayo 2,Mayo 3}/*.bmp   (or patient_based_classified_images/...: split 9,590/1,686 here)"""
LIMUC_TEST_FRACTION = (1686, 11276)

IMAGE_FOLDER_LAYOUT = """\
  <root>/<class_name>/*.png|jpg                                   (split here 80/10/10)
  or <root>/{train,validation|val,test}/<class_name>/*.png|jpg"""
IMAGE_FOLDER_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


# ---------------------------------------------------------------------------------------------
# Helpers.


def _missing(name: str, manual_dir: str, layout: str, url: str, what: str) -> DataError:
  return DataError(
      f"{name}: {what} under manual_dir={manual_dir!r}. Expected the published layout:\n{layout}\n"
      f"Download it from {url} and point data.manual_dir (tfds DownloadConfig(manual_dir=...)) "
      "at the folder that holds it.")


def is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: str) -> list[str]:
  """Sorted absolute paths of the image files in `folder` (not recursive)."""
  return sorted(
      os.path.join(folder, f) for f in os.listdir(folder)
      if is_image_file(f) and os.path.isfile(os.path.join(folder, f)))


def _resolve(base: str, rel: str) -> tuple[str, list[str]]:
  """base/rel where each component may differ by surrounding whitespace (a Kaggle copy's
  `OCT2017 `); returns the path (or '' if absent) and the components that needed it."""
  path, fuzzy = base, []
  for part in os.path.normpath(rel).split(os.sep):
    if part in ("", "."):
      continue
    exact = os.path.join(path, part)
    if os.path.exists(exact):
      path = exact
      continue
    near = sorted(e for e in _listdir(path) if e.strip() == part) if os.path.isdir(path) else []
    if len(near) != 1:
      return "", fuzzy
    fuzzy.append(near[0])
    path = os.path.join(path, near[0])
  return path, fuzzy


def _listdir(path: str) -> list[str]:
  try:
    return sorted(os.listdir(path))
  except OSError:
    return []


def _find_root(manual_dir: str | None, candidates: Sequence[str], markers: Sequence[str],
               name: str, layout: str, url: str) -> str:
  """The first `manual_dir/candidate` that holds every marker path.

  Folder names that differ only by leading / trailing whitespace are matched (with a warning that
  shows the name with repr, where the whitespace is visible).
  """
  if not manual_dir or not os.path.isdir(manual_dir):
    raise _missing(name, str(manual_dir), layout, url, "the manual download directory does not exist")
  for cand in candidates:
    root, fuzzy = _resolve(manual_dir, cand)
    if not root:
      continue
    found = [_resolve(root, m) for m in markers]
    if all(p for p, _ in found):
      fuzzy += [f for _, fs in found for f in fs]
      if fuzzy:
        logging.warning("%s: using %s; the folder name%s %s differ%s from the published layout "
                        "by whitespace.", name, root, "s" if len(fuzzy) > 1 else "",
                        ", ".join(repr(f) for f in fuzzy), "" if len(fuzzy) > 1 else "s")
      return os.path.normpath(root)
  entries = _listdir(manual_dir)
  shown = ", ".join(repr(e) for e in entries[:12]) + (", ..." if len(entries) > 12 else "")
  raise _missing(name, manual_dir, layout, url,
                 f"could not find {', '.join(markers)} (looked in {', '.join(candidates)}; "
                 f"{manual_dir} holds [{shown}])")


def _class_folder_examples(folder: str, label: int, name: str,
                           exclude: re.Pattern | None = None) -> list[Example]:
  """(path, label) for every image in one class folder; an empty class is an error.

  Files that are neither images nor known non-data files are counted and reported, never dropped
  without a word.
  """
  files = [p for p in list_images(folder)
           if exclude is None or not exclude.search(os.path.basename(p))]
  other = [f for f in _listdir(folder) if not f.startswith(".") and not is_image_file(f)
           and os.path.isfile(os.path.join(folder, f)) and not f.lower().endswith(_NOT_DATA)]
  if other:
    by_ext: dict[str, int] = {}
    for f in other:
      ext = os.path.splitext(f)[1].lower() or "(no extension)"
      by_ext[ext] = by_ext.get(ext, 0) + 1
    logging.warning("%s: skipped %d file(s) in %s that are not images of a supported format "
                    "(%s: %s); supported: %s. Convert them to PNG to include them.", name,
                    len(other), folder, ", ".join(f"{k} x{v}" for k, v in sorted(by_ext.items())),
                    ", ".join(repr(f) for f in other[:3]), " ".join(IMAGE_EXTENSIONS))
  if not files:
    raise DataError(f"{name}: class folder {folder!r} holds no images; an empty class is not "
                    "skipped silently. Check that the archive was extracted completely.")
  return [(p, label) for p in files]


def check_case_collisions(names: Iterable[str], what: str, name: str) -> None:
  """Names that differ only by case ('Cat', 'cat') would be two classes: an error naming both."""
  seen: dict[str, str] = {}
  for n in sorted(names):
    other = seen.setdefault(n.casefold(), n)
    if other != n:
      raise DataError(f"{name}: {what} {other!r} and {n!r} differ only by case and would be two "
                      "classes; merge or rename one of them.")


def apportion(total: int, weights: Sequence[float]) -> list[int]:
  """Integers summing to `total`, proportional to `weights` (largest remainder, ties to the first)."""
  w = np.asarray(weights, dtype=np.float64)
  exact = total * w / w.sum()
  counts = np.floor(exact).astype(int)
  remainder = exact - counts
  order = sorted(range(len(w)), key=lambda i: (-remainder[i], i))
  for i in order[: total - counts.sum()]:
    counts[i] += 1
  return counts.tolist()


def stratified_split(examples: Sequence[Example], sizes: dict[str, int], seed: int,
                     root: str) -> Splits:
  """Deterministic stratified split of `examples` into splits of exactly `sizes`.

  Each class is shuffled with `seed` (after sorting by path relative to `root`, so neither the
  listing order nor the data location matters), and every example gets the key
  (rank_in_class + 0.5) / class_size. Sorting by that key interleaves the classes evenly, so cutting
  the sorted list into consecutive pieces of the requested sizes gives every split each class's share
  to within one example, and the split sizes exactly.
  """
  if sum(sizes.values()) != len(examples):
    raise ValueError(f"split sizes {sizes} do not add up to {len(examples)} examples")
  by_class: dict[int, list[Example]] = {}
  for ex in sorted(examples, key=lambda e: os.path.relpath(e[0], root)):
    by_class.setdefault(ex[1], []).append(ex)
  rng = np.random.default_rng(seed)
  keyed = []
  for label in sorted(by_class):
    items = by_class[label]
    perm = rng.permutation(len(items))
    for rank, i in enumerate(perm):
      keyed.append(((rank + 0.5) / len(items), label, items[i]))
  keyed.sort(key=lambda k: (k[0], k[1]))
  ordered = [k[2] for k in keyed]
  out, start = {}, 0
  for split, n in sizes.items():
    out[split] = sorted(ordered[start:start + n])
    start += n
  return out


def _carve(examples: list[Example], carved_split: str, fraction: tuple[int, int], seed: int,
           root: str, kept_split: str) -> Splits:
  """Split `examples` into `kept_split` and `carved_split` (round(n * num / den) examples)."""
  n = len(examples)
  n_carved = int(round(n * fraction[0] / fraction[1]))
  return stratified_split(examples, {kept_split: n - n_carved, carved_split: n_carved}, seed, root)


def _check_nonempty(splits: Splits, name: str) -> Splits:
  for split, exs in splits.items():
    if not exs:
      raise DataError(f"{name}: split {split!r} is empty; check the downloaded files.")
  return splits


# ---------------------------------------------------------------------------------------------
# D1 Chaoyang.


def chaoyang_splits(manual_dir: str) -> Splits:
  """train / test from the published train.json / test.json ({"name": relpath, "label": int})."""
  root = _find_root(manual_dir, (".", "chaoyang-data", "chaoyang"), ("train.json", "test.json"),
                    "chaoyang", CHAOYANG_LAYOUT, CHAOYANG_URL)
  splits = {}
  for split in ("train", "test"):
    json_path = os.path.join(root, f"{split}.json")
    try:
      with open(json_path) as f:
        records = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"chaoyang: {json_path} is not valid JSON ({e}); re-download it.") from e
    exs = []
    for rec in records:
      if not isinstance(rec, dict) or "name" not in rec or "label" not in rec:
        raise DataError(f"chaoyang: {json_path} has an entry {rec!r} without 'name' and 'label'.")
      label = int(rec["label"])
      if not 0 <= label < len(CHAOYANG_CLASSES):
        raise DataError(f"chaoyang: {json_path} entry {rec['name']!r} has label {label}, "
                        f"expected 0..{len(CHAOYANG_CLASSES) - 1}.")
      path = os.path.join(root, rec["name"])
      if not os.path.isfile(path):
        raise DataError(f"chaoyang: {json_path} lists {rec['name']!r} but {path} does not exist; "
                        "extract the train/ and test/ image folders next to the JSON files.")
      exs.append((path, label))
    splits[split] = sorted(exs)
  return _check_nonempty(splits, "chaoyang")


# ---------------------------------------------------------------------------------------------
# D2 COVID-CT.


def _read_list(path: str) -> list[str]:
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def covid_ct_splits(manual_dir: str) -> Splits:
  """train / validation / test from the official Data-split txt lists (425 / 118 / 203)."""
  markers = ("Data-split/COVID", "Data-split/NonCOVID")
  root = _find_root(manual_dir, (".", "COVID-CT", "COVID-CT-master"), markers, "covid_ct",
                    COVID_CT_LAYOUT, COVID_CT_URL)
  folders = {}
  for cls in ("CT_COVID", "CT_NonCOVID"):
    for cand in (cls, os.path.join("Images-processed", cls), os.path.join(cls, cls)):
      if os.path.isdir(os.path.join(root, cand)):
        folders[cls] = os.path.join(root, cand)
        break
    else:
      raise _missing("covid_ct", manual_dir, COVID_CT_LAYOUT, COVID_CT_URL,
                     f"no {cls}/ image folder (unzip Images-processed/{cls}.zip)")
  splits: Splits = {"train": [], "validation": [], "test": []}
  for cls, sub, label in (("CT_NonCOVID", "NonCOVID", 0), ("CT_COVID", "COVID", 1)):
    for split, prefix in (("train", "train"), ("validation", "val"), ("test", "test")):
      list_path = os.path.join(root, "Data-split", sub, f"{prefix}{cls}.txt")
      if not os.path.isfile(list_path):
        raise _missing("covid_ct", manual_dir, COVID_CT_LAYOUT, COVID_CT_URL,
                       f"no split list {os.path.relpath(list_path, root)}")
      for fname in _read_list(list_path):
        path = os.path.join(folders[cls], fname)
        if not os.path.isfile(path):
          raise DataError(f"covid_ct: {list_path} lists {fname!r} but {path} does not exist; "
                          f"unzip the complete {cls}.zip.")
        splits[split].append((path, label))
  return _check_nonempty({k: sorted(v) for k, v in splits.items()}, "covid_ct")


# ---------------------------------------------------------------------------------------------
# D3 BUSI.

_MASK = re.compile(r"_mask", re.IGNORECASE)


def busi_splits(manual_dir: str, seed: int = SPLIT_SEED) -> Splits:
  """Stratified seeded split of the 780 images (masks skipped) in the paper's 559:79:160 ratio.

  The paper's sizes add up to 798; the published 780 images give 547 / 77 / 156.
  """
  root = _find_root(manual_dir, (".", "Dataset_BUSI_with_GT", "Dataset_BUSI"), BUSI_CLASSES,
                    "busi", BUSI_LAYOUT, BUSI_URL)
  exs = []
  for label, cls in enumerate(BUSI_CLASSES):
    exs += _class_folder_examples(os.path.join(root, cls), label, "busi", exclude=_MASK)
  total = sum(BUSI_SPLIT_SIZES.values())
  sizes = dict(zip(BUSI_SPLIT_SIZES, apportion(len(exs), [v / total for v in
                                                          BUSI_SPLIT_SIZES.values()])))
  return _check_nonempty(stratified_split(exs, sizes, seed, root), "busi")


# ---------------------------------------------------------------------------------------------
# D4 pediatric chest X-ray (Kermany).


def cxr_label(filename: str, folder: str) -> int:
  """normal (0) from the NORMAL folder; bacterial (1) / viral (2) from a PNEUMONIA file's name."""
  if folder.upper() == "NORMAL":
    return 0
  lower = filename.lower()
  has_bacteria, has_virus = "bacteria" in lower, "virus" in lower
  if has_bacteria == has_virus:
    raise DataError(f"pediatric_cxr: cannot tell bacterial from viral pneumonia for {filename!r} "
                    "(the published names are personN_bacteria_M.jpeg / personN_virus_M.jpeg); "
                    "rename or remove the file.")
  return 1 if has_bacteria else 2


def _cxr_folder(split_dir: str) -> list[Example]:
  exs = []
  for folder in ("NORMAL", "PNEUMONIA"):
    d = os.path.join(split_dir, folder)
    if not os.path.isdir(d):
      raise DataError(f"pediatric_cxr: missing folder {d}. Expected layout:\n{CXR_LAYOUT}")
    files = list_images(d)
    if not files:
      raise DataError(f"pediatric_cxr: folder {d} holds no images; an empty class is an error.")
    exs += [(p, cxr_label(os.path.basename(p), folder)) for p in files]
  return exs


def cxr_splits(manual_dir: str, seed: int = SPLIT_SEED) -> Splits:
  """train / validation (carved, 524/5232 of train) / test, 3 classes normal/bacterial/viral."""
  root = _find_root(
      manual_dir, (".", "chest_xray", "chest_xray/chest_xray", "ChestXRay2017/chest_xray",
                   "CellData/chest_xray"),
      ("train/NORMAL", "train/PNEUMONIA", "test/NORMAL", "test/PNEUMONIA"), "pediatric_cxr",
      CXR_LAYOUT, CXR_URL)
  train = _cxr_folder(os.path.join(root, "train"))
  if os.path.isdir(os.path.join(root, "val", "NORMAL")):
    train += _cxr_folder(os.path.join(root, "val"))
  for label, cls in enumerate(CXR_CLASSES):
    if not any(l == label for _, l in train):
      raise DataError(f"pediatric_cxr: no {cls} images in train; the class would be empty.")
  splits = _carve(train, "validation", CXR_VAL_FRACTION, seed, root, "train")
  splits["test"] = sorted(_cxr_folder(os.path.join(root, "test")))
  return _check_nonempty(splits, "pediatric_cxr")


# ---------------------------------------------------------------------------------------------
# D5 OCT2017.


def _oct_folder(split_dir: str) -> list[Example]:
  exs = []
  for label, cls in enumerate(OCT_CLASSES):
    d = os.path.join(split_dir, cls)
    if not os.path.isdir(d):
      raise DataError(f"oct2017: missing class folder {d}. Expected layout:\n{OCT_LAYOUT}")
    exs += _class_folder_examples(d, label, "oct2017")
  return exs


def oct_splits(manual_dir: str, seed: int = SPLIT_SEED) -> Splits:
  """train / validation (carved, 10,832/108,309 of train) / test (1,000 in the Mendeley copy)."""
  root = _find_root(manual_dir, (".", "OCT2017", "OCT2017/OCT2017", "CellData/OCT", "OCT"),
                    ("train/CNV", "test/CNV"), "oct2017", OCT_LAYOUT, OCT_URL)
  train = _oct_folder(os.path.join(root, "train"))
  if os.path.isdir(os.path.join(root, "val", "CNV")):
    train += _oct_folder(os.path.join(root, "val"))
  splits = _carve(train, "validation", OCT_VAL_FRACTION, seed, root, "train")
  splits["test"] = sorted(_oct_folder(os.path.join(root, "test")))
  return _check_nonempty(splits, "oct2017")


# ---------------------------------------------------------------------------------------------
# D6 LIMUC.

_MAYO = re.compile(r"^mayo[ _-]?([0-3])$", re.IGNORECASE)


def _mayo_folders(parent: str) -> dict[int, str]:
  found = {}
  if os.path.isdir(parent):
    for f in sorted(os.listdir(parent)):
      m = _MAYO.match(f)
      if m and os.path.isdir(os.path.join(parent, f)):
        found[int(m.group(1))] = os.path.join(parent, f)
  return found


def _limuc_examples(parent: str, recursive: bool = False) -> list[Example]:
  folders = _mayo_folders(parent)
  if recursive and not folders:
    # patient_based_classified_images/<patient>/Mayo k/...
    exs = []
    for sub in sorted(os.listdir(parent)):
      if os.path.isdir(os.path.join(parent, sub)) and _mayo_folders(os.path.join(parent, sub)):
        for label, d in _mayo_folders(os.path.join(parent, sub)).items():
          exs += [(p, label) for p in list_images(d)]
    return exs
  if sorted(folders) != [0, 1, 2, 3]:
    raise DataError(f"limuc: {parent} should hold the four class folders 'Mayo 0'..'Mayo 3', "
                    f"found {sorted(folders)}. Expected layout:\n{LIMUC_LAYOUT}")
  exs = []
  for label, d in sorted(folders.items()):
    exs += _class_folder_examples(d, label, "limuc")
  return exs


def limuc_splits(manual_dir: str, seed: int = SPLIT_SEED) -> Splits:
  """The published train_and_validation_sets / test_set, else a seeded 9,590 / 1,686 split."""
  if manual_dir and os.path.basename(os.path.normpath(manual_dir)).strip() in (
      "train_and_validation_sets", "test_set"):
    # Pointed at one half of the published split: carving a test set out of it would test on
    # other images than the paper's. Use the folder that holds both halves.
    parent = os.path.dirname(os.path.normpath(manual_dir))
    if _resolve(parent, "train_and_validation_sets")[0] and _resolve(parent, "test_set")[0]:
      logging.warning("limuc: data.manual_dir=%s is one half of the published split; using %s, "
                      "which holds train_and_validation_sets/ and test_set/.", manual_dir, parent)
      manual_dir = parent
    else:
      raise DataError(
          f"limuc: data.manual_dir={manual_dir!r} is one half of the published split but "
          f"{parent} does not hold both train_and_validation_sets/ and test_set/; point "
          "data.manual_dir at the folder that holds both (the extracted LIMUC archive).")
  root = None
  for cand in (".", "LIMUC", "limuc"):
    r = os.path.normpath(os.path.join(manual_dir, cand)) if manual_dir else None
    if r and os.path.isdir(r) and (
        os.path.isdir(os.path.join(r, "train_and_validation_sets")) or _mayo_folders(r)
        or os.path.isdir(os.path.join(r, "patient_based_classified_images"))):
      root = r
      break
  if root is None:
    what = ("the manual download directory does not exist" if not manual_dir
            or not os.path.isdir(manual_dir) else
            "found neither train_and_validation_sets/ nor 'Mayo 0'..'Mayo 3' class folders")
    raise _missing("limuc", str(manual_dir), LIMUC_LAYOUT, LIMUC_URL, what)
  tv = os.path.join(root, "train_and_validation_sets")
  if os.path.isdir(tv):
    test_dir = os.path.join(root, "test_set")
    if not os.path.isdir(test_dir):
      raise _missing("limuc", manual_dir, LIMUC_LAYOUT, LIMUC_URL,
                     "train_and_validation_sets/ is there but test_set/ is not")
    splits = {"train": sorted(_limuc_examples(tv)), "test": sorted(_limuc_examples(test_dir))}
  else:
    if _mayo_folders(root):
      exs = _limuc_examples(root)
    else:
      exs = _limuc_examples(os.path.join(root, "patient_based_classified_images"), recursive=True)
    splits = _carve(exs, "test", LIMUC_TEST_FRACTION, seed, root, "train")
  return _check_nonempty(splits, "limuc")


# ---------------------------------------------------------------------------------------------
# Generic image folder.

_SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val", "valid"), "test": ("test",)}


def image_folder_classes(root: str) -> list[str]:
  """Sorted class names: sub-folders of root, or of its split folders."""
  if not root or not os.path.isdir(root):
    raise DataError(f"image_folder: root {root!r} does not exist. Expected layout:\n"
                    f"{IMAGE_FOLDER_LAYOUT}\nSet data.manual_dir to the folder that holds it.")
  split_dirs = _image_folder_split_dirs(root)
  parents = list(split_dirs.values()) if split_dirs else [root]
  classes = sorted({c for p in parents for c in os.listdir(p)
                    if os.path.isdir(os.path.join(p, c)) and not c.startswith(".")})
  if not classes:
    raise DataError(f"image_folder: no class folders in {root!r}. Expected layout:\n"
                    f"{IMAGE_FOLDER_LAYOUT}")
  check_case_collisions(classes, "class folders", "image_folder")
  return classes


def _image_folder_split_dirs(root: str) -> dict[str, str]:
  out = {}
  for split, names in _SPLIT_DIRS.items():
    for n in names:
      if os.path.isdir(os.path.join(root, n)):
        out[split] = os.path.join(root, n)
        break
  return out


def image_folder_splits(root: str, seed: int = SPLIT_SEED) -> Splits:
  """Split folders as given, or a seeded stratified 80/10/10 split of class folders."""
  classes = image_folder_classes(root)
  split_dirs = _image_folder_split_dirs(root)
  if split_dirs:
    if "train" not in split_dirs:
      raise DataError(f"image_folder: {root!r} has split folders {sorted(split_dirs)} but no train/.")
    splits = {}
    for split, d in split_dirs.items():
      exs = []
      for label, cls in enumerate(classes):
        if os.path.isdir(os.path.join(d, cls)):
          exs += _class_folder_examples(os.path.join(d, cls), label, "image_folder")
        elif split == "train":
          raise DataError(f"image_folder: class {cls!r} has no folder in {d}; every class needs "
                          "training images.")
      splits[split] = sorted(exs)
    return _check_nonempty(splits, "image_folder")
  exs = []
  for label, cls in enumerate(classes):
    exs += _class_folder_examples(os.path.join(root, cls), label, "image_folder")
  sizes = dict(zip(IMAGE_FOLDER_FRACTIONS, apportion(len(exs), list(
      IMAGE_FOLDER_FRACTIONS.values()))))
  return _check_nonempty(stratified_split(exs, sizes, seed, root), "image_folder")


# ---------------------------------------------------------------------------------------------
# Image reading for the builders.


def read_image(path: str) -> tuple[bytes, str]:
  """(encoded bytes, 'jpeg'|'png') of a checked image; other formats are re-encoded as PNG.

  The image is fully decoded once here so that a truncated or corrupt file fails while the dataset is
  built, with its name, instead of deep inside a training run.
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import dicom  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  if dicom.is_dicom(path, data):
    return dicom.to_png(data, path), "png"
  try:
    with Image.open(io.BytesIO(data)) as img:
      fmt = img.format
      img.load()
      if fmt in ("JPEG", "PNG") and img.mode in ("L", "RGB", "RGBA", "LA", "P", "I;16", "I"):
        if img.mode in ("I;16", "I"):  # 16-bit PNG: TF would decode to uint16.
          return _to_png(img), "png"
        return data, fmt.lower()
      return _to_png(img), "png"
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DataError(f"corrupt or unreadable image {path}: {e}. Re-download or delete the file."
                    ) from e


def _to_png(img) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if img.mode in ("I;16", "I"):
    arr = np.asarray(img, dtype=np.float64)
    arr = (arr / max(arr.max(), 1) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
  elif img.mode not in ("L", "RGB"):
    img = img.convert("RGB")
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def relative_name(path: str, root: str) -> str:
  """`path` relative to `root`, '/'-separated (a plain prefix cut when path starts with root:
  os.path.relpath costs about 10 us, 1 s per source id of an OCT2017-sized tree)."""
  prefix = root if root.endswith(os.sep) else root + os.sep
  rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
  return rel.replace(os.sep, "/")


def counts(examples: Iterable[Example], num_classes: int) -> list[int]:
  c = [0] * num_classes
  for _, label in examples:
    c[label] += 1
  return c
