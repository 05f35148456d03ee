"""tfds builders of every source: the paper's six datasets, image folders, CSV tables,
ChestX-ray14, CheXpert and MedMNIST.

The datasets cannot be downloaded by code (licences, registration), so every builder reads a
user-downloaded copy from the manual directory (`tfds.download.DownloadConfig(manual_dir=...)`,
default `<data_dir>/downloads/manual`). Each builder class is the dataset's description (class
names, layout, download page, citation) and its `parse(manual_dir, data_config)`, which returns a
`parsed.ParsedSource`; the parsing lives in plain modules (`splits.py`, `tables.py`,
`chest_xray.py`, `medmnist.py`), the builders only check and store the images.

Each record (the contract of `parsed.py`) is `{'image': encoded JPEG/PNG bytes (decoded to 3
channels), 'label': ClassLabel (single_label) or float32 [L] (multi_label: 1 / 0 / -1 unknown),
'file_name': path relative to the dataset root, 'patient': text ('' without one)}`. The input
pipeline reads the encoded bytes and decodes them itself (`decode_and_crop_jpeg` is the fast path
of random resized crop).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import inspect
import io
import json
import os
import shutil
import socket
import sys
import time
from typing import Iterator

from absl import logging

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from shpeft_jax.data import chest_xray
from shpeft_jax.data import content_hash
from shpeft_jax.data import dicom
from shpeft_jax.data import medmnist
from shpeft_jax.data import parsed as parsed_lib
from shpeft_jax.data import splits as splits_lib
from shpeft_jax.data import tables
from shpeft_jax.errors import ConfigError, DataError

# 2.0.0: every record has `patient`, multi-label records a float32 label vector. Records of an
# older version are never read (prepared_sources lists the current version only).
_VERSION = tfds.core.Version("2.0.0")


def parsed_from_splits(name: str, root: str, splits: splits_lib.Splits,
                       class_names=None) -> parsed_lib.ParsedSource:
  """A ParsedSource of a single-label layout parsed by `splits.py` (no patient ids)."""
  return parsed_lib.ParsedSource(name=name, root=root, splits=dict(splits),
                                 class_names=tuple(class_names or BUILDERS[name].CLASS_NAMES))


class _ManualImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic: manual dir -> ParsedSource -> checked, encoded images.

  The label feature depends on the source (its class names, its task): a builder is made with the
  ParsedSource it stores (`parsed=`), or, to read prepared records back, with the `class_names`
  and `task` they were written with; by default the class's own (the paper's six datasets).
  """

  VERSION = _VERSION
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "2.0.0": "Records carry `patient`; multi-label sources store label vectors."}
  DATA_NAME = ""  # data.name
  CLASS_NAMES: tuple[str, ...] = ()
  TASK = parsed_lib.SINGLE_LABEL
  SPLITS_FN = None  # the splits.py parser of a single-label layout
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""
  LICENSE = ""
  LAYOUT = ""
  URL = ""

  def __init__(self, *, parsed: parsed_lib.ParsedSource | None = None,
               class_names=None, task: str | None = None, **kwargs):
    self._parsed = parsed
    self.class_names = tuple(parsed.class_names if parsed else class_names or self.CLASS_NAMES)
    self.task = parsed.task if parsed else task or self.TASK
    self.undecodable: list[tuple[str, str]] = []  # (file, transfer syntax) left out
    self.on_example = None  # called after each example written (the preparation's bar)
    super().__init__(**kwargs)

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds derives this from the package's resources, which needs the `importlib_resources`
    # backport for an editable install; the defining file is the same answer without it.
    return epath.Path(inspect.getfile(cls))

  @classmethod
  def parse(cls, manual_dir: str, data_config) -> parsed_lib.ParsedSource:
    """The source in manual_dir; `data_config` holds the source's options (see data/__init__)."""
    del data_config  # The paper's six layouts have no options.
    return parsed_from_splits(cls.DATA_NAME, manual_dir, cls.SPLITS_FN(manual_dir),
                              cls.CLASS_NAMES)

  def _info(self) -> tfds.core.DatasetInfo:
    if self.task == parsed_lib.MULTI_LABEL:
      label = tfds.features.Tensor(shape=(len(self.class_names),), dtype=np.float32)
    else:
      label = (tfds.features.ClassLabel(names=list(self.class_names)) if self.class_names
               else tfds.features.ClassLabel())
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": label,
            "file_name": tfds.features.Text(),
            "patient": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        license=self.LICENSE,
    )

  def _manual_dir(self, dl_manager) -> str:
    try:
      manual_dir = os.fspath(dl_manager.manual_dir)
    except (AssertionError, AttributeError, ValueError) as e:
      raise DataError(
          f"{self.name}: no manual download directory ({e}). Expected the published layout:\n"
          f"{self.LAYOUT}\nDownload it from {self.URL} and pass "
          "tfds.download.DownloadConfig(manual_dir=...) (data.manual_dir in the config).") from e
    return manual_dir

  def _split_generators(self, dl_manager):
    if self._parsed is None:
      from shpeft_jax.data import default_data_config  # pylint: disable=g-import-not-at-top
      self._parsed = self.parse(self._manual_dir(dl_manager), default_data_config())
    return {split: self._generate_examples(self._parsed, split) for split in self._parsed.splits}

  def _generate_examples(self, parsed: parsed_lib.ParsedSource, split: str) -> Iterator:
    records = parsed.splits[split]
    multi = parsed.task == parsed_lib.MULTI_LABEL

    def shrunk(rs):  # the size cap on every core, in order
      if not parsed.max_side:
        return parsed.images(split, rs)
      return parsed_lib.ordered_map(lambda d: shrink(d, parsed.max_side), parsed.images(split, rs))

    images = shrunk(records)
    for i, (key, label) in enumerate(records):
      name = splits_lib.relative_name(key, parsed.root)
      try:
        data = next(images)
      except dicom.UndecodableImage as e:
        # Left out and listed after preparation; the reader (a generator, ended by the raise)
        # starts again after this record.
        self.undecodable.append((name, e.syntax))
        images = shrunk(records[i + 1:])
        continue
      yield name, {"image": data, "file_name": name, "patient": parsed.patient(key),
                   "label": np.asarray(label, np.float32) if multi else label}
      if self.on_example is not None:
        self.on_example()


class Chaoyang(_ManualImageBuilder):
  """D1 Chaoyang colon pathology, 4 classes, the official train / test JSON split."""

  CLASS_NAMES = splits_lib.CHAOYANG_CLASSES
  DATA_NAME = "chaoyang"
  SPLITS_FN = staticmethod(splits_lib.chaoyang_splits)
  DESCRIPTION = ("Chaoyang colon histopathology patches (normal, serrated, adenocarcinoma, "
                 "adenoma); official split 4,021 train / 2,139 test.")
  HOMEPAGE = "https://bupt-ai-cz.github.io/HSA-NRL/"
  CITATION = ("@article{zhu2021hard, title={Hard Sample Aware Noise Robust Learning for "
              "Histopathology Image Classification}, author={Zhu, Chuang and Chen, Wenkai and Peng, "
              "Ting and Wang, Ying and Jin, Mulan}, journal={IEEE TMI}, year={2021}}")
  LICENSE = "Research use as stated on the dataset homepage."
  LAYOUT = splits_lib.CHAOYANG_LAYOUT
  URL = splits_lib.CHAOYANG_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download from {URL} and extract:\n{LAYOUT}"


class CovidCt(_ManualImageBuilder):
  """D2 COVID-CT (UCSD-AI4H), 2 classes, the official Data-split lists."""

  CLASS_NAMES = splits_lib.COVID_CT_CLASSES
  DATA_NAME = "covid_ct"
  SPLITS_FN = staticmethod(splits_lib.covid_ct_splits)
  DESCRIPTION = ("COVID-CT lung CT slices (non-COVID, COVID); official split 425 / 118 / 203.")
  HOMEPAGE = "https://github.com/UCSD-AI4H/COVID-CT"
  CITATION = ("@article{yang2020covidct, title={COVID-CT-Dataset: A CT Scan Dataset about "
              "COVID-19}, author={Yang, Xingyi and He, Xuehai and Zhao, Jinyu and Zhang, Yichen and "
              "Zhang, Shanghang and Xie, Pengtao}, journal={arXiv:2003.13865}, year={2020}}")
  LICENSE = "Research use; the images come from medRxiv/bioRxiv preprints (see the repository)."
  LAYOUT = splits_lib.COVID_CT_LAYOUT
  URL = splits_lib.COVID_CT_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download from {URL} and extract:\n{LAYOUT}"


class Busi(_ManualImageBuilder):
  """D3 BUSI breast ultrasound, 3 classes, seeded stratified 547 / 77 / 156 split, masks skipped."""

  CLASS_NAMES = splits_lib.BUSI_CLASSES
  DATA_NAME = "busi"
  SPLITS_FN = staticmethod(splits_lib.busi_splits)
  DESCRIPTION = ("Breast ultrasound images (benign, malignant, normal), 780 images; no official "
                 "split: seeded stratified 547 / 77 / 156 (the paper's 559:79:160 ratio; its sizes "
                 "add up to 798, not 780).")
  HOMEPAGE = "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset"
  CITATION = ("@article{aldhabyani2020busi, title={Dataset of breast ultrasound images}, "
              "author={Al-Dhabyani, Walid and Gomaa, Mohammed and Khaled, Hussien and Fahmy, Aly}, "
              "journal={Data in Brief}, volume={28}, pages={104863}, year={2020}}")
  LICENSE = "As stated on the dataset page / the open-access Data in Brief article."
  LAYOUT = splits_lib.BUSI_LAYOUT
  URL = splits_lib.BUSI_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download from {URL} and extract:\n{LAYOUT}"


_KERMANY_CITATION = (
    "@article{kermany2018identifying, title={Identifying medical diagnoses and treatable diseases "
    "by image-based deep learning}, author={Kermany, Daniel S and Goldbaum, Michael and others}, "
    "journal={Cell}, volume={172}, number={5}, pages={1122--1131}, year={2018}}\n"
    "@misc{kermany2018data, title={Large Dataset of Labeled Optical Coherence Tomography (OCT) and "
    "Chest X-Ray Images}, author={Kermany, Daniel and Zhang, Kang and Goldbaum, Michael}, "
    "publisher={Mendeley Data, V3}, doi={10.17632/rscbjbr9sj.3}, year={2018}}")


class PediatricCxr(_ManualImageBuilder):
  """D4 pediatric chest X-ray (Kermany), normal / bacterial / viral from the file names."""

  CLASS_NAMES = splits_lib.CXR_CLASSES
  DATA_NAME = "cxr"
  SPLITS_FN = staticmethod(splits_lib.cxr_splits)
  DESCRIPTION = ("Pediatric chest X-rays (normal, bacterial pneumonia, viral pneumonia); validation "
                 "carved from the published train split with a fixed seed (4,708 / 524), test as "
                 "published (624).")
  HOMEPAGE = "https://data.mendeley.com/datasets/rscbjbr9sj"
  CITATION = _KERMANY_CITATION
  LICENSE = "CC BY 4.0"
  LAYOUT = splits_lib.CXR_LAYOUT
  URL = splits_lib.CXR_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download from {URL} and extract:\n{LAYOUT}"


class Oct2017(_ManualImageBuilder):
  """D5 retinal OCT (Kermany OCT2017), CNV / DME / DRUSEN / NORMAL."""

  CLASS_NAMES = splits_lib.OCT_CLASSES
  DATA_NAME = "oct"
  SPLITS_FN = staticmethod(splits_lib.oct_splits)
  DESCRIPTION = ("Retinal OCT B-scans (CNV, DME, DRUSEN, NORMAL); validation carved from the "
                 "published train split with a fixed seed (10,832/108,309 of it), test as published.")
  HOMEPAGE = "https://data.mendeley.com/datasets/rscbjbr9sj"
  CITATION = _KERMANY_CITATION
  LICENSE = "CC BY 4.0"
  LAYOUT = splits_lib.OCT_LAYOUT
  URL = splits_lib.OCT_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download from {URL} and extract:\n{LAYOUT}"


class Limuc(_ManualImageBuilder):
  """D6 LIMUC ulcerative colitis, Mayo endoscopic score 0..3, 9,590 / 1,686."""

  CLASS_NAMES = splits_lib.LIMUC_CLASSES
  DATA_NAME = "limuc"
  SPLITS_FN = staticmethod(splits_lib.limuc_splits)
  DESCRIPTION = ("LIMUC colonoscopy images graded Mayo 0-3 (11,276 images); the published "
                 "train_and_validation_sets / test_set split (9,590 / 1,686), or a seeded stratified "
                 "split of the same sizes when only the class folders are present.")
  HOMEPAGE = "https://zenodo.org/records/5827695"
  CITATION = ("@article{polat2023limuc, title={Labeled Images for Ulcerative Colitis (LIMUC) "
              "Dataset}, author={Polat, Gorkem and Kani, Haluk Tarik and Ergenc, Ilkay and Alahdab, "
              "Yesim Ozen and Temizel, Alptekin and Atug, Ozlen}, journal={Zenodo / Inflammatory "
              "Bowel Diseases}, doi={10.5281/zenodo.5827695}, year={2023}}")
  LICENSE = "CC BY 4.0"
  LAYOUT = splits_lib.LIMUC_LAYOUT
  URL = splits_lib.LIMUC_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download from {URL} and extract:\n{LAYOUT}"


class ImageFolder(_ManualImageBuilder):
  """The user's own dataset: `<root>/<class>/*.png|jpg`, optional train/validation/test folders.

  Class names come from the folder names (a builder made with `root_dir=` reads them there).
  """

  DATA_NAME = "image_folder"
  DESCRIPTION = "A user-supplied image folder dataset."
  LAYOUT = splits_lib.IMAGE_FOLDER_LAYOUT
  URL = "your own data"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put your images in:\n{LAYOUT}"

  def __init__(self, *, root_dir: str | None = None, **kwargs):
    if root_dir and "parsed" not in kwargs and "class_names" not in kwargs:
      kwargs["class_names"] = splits_lib.image_folder_classes(os.path.abspath(root_dir))
    super().__init__(**kwargs)

  @classmethod
  def parse(cls, manual_dir, data_config):
    del data_config
    return parsed_from_splits("image_folder", manual_dir,
                              splits_lib.image_folder_splits(manual_dir),
                              splits_lib.image_folder_classes(manual_dir))


class CsvDataset(_ManualImageBuilder):
  """Images named by a CSV table: single-label (a class column) or multi-label (0/1 columns or
  a findings column); splits from a column, list files, or seeded and grouped by patient."""

  name = "csv"
  DATA_NAME = "csv"
  DESCRIPTION = "A CSV-labelled image dataset (data.csv_* fields)."
  LAYOUT = tables.CSV_LAYOUT
  URL = "your own data"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put your table and images in:\n{LAYOUT}"

  @classmethod
  def parse(cls, manual_dir, data_config):
    return tables.csv_source(manual_dir, data_config)


class ChestXray14(_ManualImageBuilder):
  """NIH ChestX-ray14: 14 findings, the official train_val / test lists, validation by patient."""

  name = "chestxray14"
  DATA_NAME = "chestxray14"
  CLASS_NAMES = chest_xray.CHESTXRAY14_FINDINGS
  TASK = parsed_lib.MULTI_LABEL
  DESCRIPTION = ("NIH ChestX-ray14: 112,120 frontal chest X-rays of 30,805 patients, 14 "
                 "text-mined findings (multi-label); official train_val (86,524) / test (25,596) "
                 "lists, validation carved from train_val by patient.")
  HOMEPAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
  CITATION = ("@inproceedings{wang2017chestxray, title={ChestX-ray8: Hospital-scale Chest X-ray "
              "Database and Benchmarks on Weakly-Supervised Classification and Localization of "
              "Common Thorax Diseases}, author={Wang, Xiaosong and Peng, Yifan and Lu, Le and Lu, "
              "Zhiyong and Bagheri, Mohammadhadi and Summers, Ronald M}, booktitle={CVPR}, "
              "year={2017}}")
  LICENSE = "Unrestricted use with attribution (NIH Clinical Center), see the download page."
  LAYOUT = chest_xray.CHESTXRAY14_LAYOUT
  URL = chest_xray.CHESTXRAY14_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download from {URL} and extract:\n{LAYOUT}"

  @classmethod
  def parse(cls, manual_dir, data_config):
    return chest_xray.chestxray14_source(manual_dir, data_config)


class Chexpert(_ManualImageBuilder):
  """Stanford CheXpert: 5 competition findings (or all 14), an uncertainty policy for -1."""

  name = "chexpert"
  DATA_NAME = "chexpert"
  TASK = parsed_lib.MULTI_LABEL
  DESCRIPTION = ("CheXpert chest radiographs (Stanford, 65,240 patients), 14 observations labelled "
                 "1 / 0 / -1 (uncertain) / blank (not mentioned); train.csv -> train + validation "
                 "(by patient), valid.csv -> test.")
  HOMEPAGE = "https://stanfordmlgroup.github.io/competitions/chexpert/"
  CITATION = ("@inproceedings{irvin2019chexpert, title={CheXpert: A Large Chest Radiograph "
              "Dataset with Uncertainty Labels and Expert Comparison}, author={Irvin, Jeremy and "
              "Rajpurkar, Pranav and others}, booktitle={AAAI}, year={2019}}")
  LICENSE = "Stanford University School of Medicine CheXpert Dataset Research Use Agreement."
  LAYOUT = chest_xray.CHEXPERT_LAYOUT
  URL = chest_xray.CHEXPERT_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download from {URL} and extract:\n{LAYOUT}"

  @classmethod
  def parse(cls, manual_dir, data_config):
    return chest_xray.chexpert_source(manual_dir, data_config)


class MedMnist(_ManualImageBuilder):
  """MedMNIST v2 / MedMNIST+ 2D datasets from their `.npz` files, splits as shipped."""

  name = "medmnist"
  DATA_NAME = "medmnist"
  DESCRIPTION = ("MedMNIST+ 2D datasets (12 tasks, 28 / 64 / 128 / 224 px), official "
                 "train / val / test splits; ChestMNIST is multi-label.")
  HOMEPAGE = "https://medmnist.com/"
  CITATION = ("@article{yang2023medmnist, title={MedMNIST v2 - A large-scale lightweight "
              "benchmark for 2D and 3D biomedical image classification}, author={Yang, Jiancheng "
              "and Shi, Rui and Wei, Donglai and Liu, Zequan and Zhao, Lin and Ke, Bilian and "
              "Pfister, Hanspeter and Ni, Bingbing}, journal={Scientific Data}, volume={10}, "
              "pages={41}, year={2023}}")
  LICENSE = "CC BY 4.0 (each dataset also carries its source's licence)."
  LAYOUT = medmnist.LAYOUT
  URL = medmnist.URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download from {URL} into one folder:\n{LAYOUT}"

  @classmethod
  def parse(cls, manual_dir, data_config):
    return medmnist.medmnist_source(manual_dir, data_config)


# data.name -> builder class.
BUILDERS: dict[str, type[_ManualImageBuilder]] = {
    cls.DATA_NAME: cls for cls in (Chaoyang, CovidCt, Busi, PediatricCxr, Oct2017, Limuc,
                                   ImageFolder, CsvDataset, ChestXray14, Chexpert, MedMnist)}


# ---------------------------------------------------------------------------------------------
# Prepared data keyed by its source.
#
# tfds stores a builder's records under <data_dir>/<name>/<config>/<version>. The config name is
# `src_<id>`, the id a hash of the parsed source: every record's (split, file name, label,
# patient, content digest of its file), the class names and the task. Two image folders, a
# corrected manual_dir or one image replaced by another of the same size get their own records;
# a run never reads another source's.

SOURCE_FILE = "shpeft_source.json"
PREPARE_LOCK = ".shpeft_prepare.lock"
# Bump when what the id covers changes.
_ID_FORMAT = "content/2"


def source_id(parsed: parsed_lib.ParsedSource, cache_path: str | None) -> str:
  """12 hex digits identifying the records `parsed` gives (content digests: content_hash)."""
  files = parsed.files()
  digest = dict(zip(files, content_hash.digests(files, cache_path, f"{parsed.name}: hashing")))
  # The size cap only when set: sources prepared before it existed keep their ids.
  h = hashlib.sha256(json.dumps([_ID_FORMAT, parsed.name, list(parsed.class_names), parsed.task]
                                + ([f"max_side={parsed.max_side}"] if parsed.max_side else [])
                                ).encode())
  for split in sorted(parsed.splits):
    for key, label in parsed.splits[split]:
      rel = splits_lib.relative_name(key, parsed.root)
      h.update(f"{split}\t{rel}\t{label}\t{parsed.patient(key)}\t{digest.get(key, '')}\n"
               .encode())
  for f in parsed.content_files or ():
    h.update(f"file\t{splits_lib.relative_name(f, parsed.root)}\t{digest[f]}\n".encode())
  return h.hexdigest()[:12]


def _default_data_dir(data_dir: str | None) -> str:
  if data_dir:
    return os.path.abspath(os.path.expanduser(data_dir))
  return os.path.expanduser(tfds.core.constants.DATA_DIR)


def prepared_sources(name: str, data_dir: str | None) -> dict[str, dict]:
  """{config name: source record} of the prepared, source-keyed copies of `name` in data_dir."""
  base = os.path.join(_default_data_dir(data_dir), BUILDERS[name].name)
  out = {}
  if os.path.isdir(base):
    for cfg in sorted(os.listdir(base)):
      rec = os.path.join(base, cfg, str(_VERSION), SOURCE_FILE)
      if cfg.startswith("src_") and os.path.isfile(rec):
        with open(rec) as f:
          out[cfg] = json.load(f)
  return out


def _config(cfg_name: str, description: str = "") -> tfds.core.BuilderConfig:
  return tfds.core.BuilderConfig(name=cfg_name, description=description or cfg_name)


# ---------------------------------------------------------------------------------------------
# The size cap (data.prepare_max_side).


def max_side_of(options) -> int:
  """data.prepare_max_side, checked: 0 (off) or a side of at least 16 pixels."""
  value = options.prepare_max_side
  if isinstance(value, bool) or not isinstance(value, int) or value < 0 or 0 < value < 16:
    raise ConfigError(f"data.prepare_max_side={value!r}: give 0 (store images as they are) or a "
                      "side in pixels >= 16, e.g. 2 x model.image_size = 448.")
  return value


def shrink(data: bytes, max_side: int) -> bytes:
  """Encoded JPEG / PNG bytes with the shorter side shrunk to `max_side` by the eval transform's
  resampling (`input_pipeline.resize_shorter_side`: bicubic, antialiased), in the same format
  (JPEG quality 95) and channels; smaller images (and max_side 0) are returned as they are."""
  if not max_side:
    return data
  return _shrink_graph()(data, max_side).numpy()


@functools.lru_cache(maxsize=1)
def _shrink_graph():
  """`shrink` as one traced TensorFlow function (eager op by op costs more than the resize)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  @tf.function(input_signature=[tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int32)])
  def fn(data, max_side):
    image = tf.io.decode_image(data, channels=0, expand_animations=False)

    def small():
      out = input_pipeline.resize_shorter_side(image, max_side)
      return tf.cond(tf.io.is_jpeg(data), lambda: tf.io.encode_jpeg(out, quality=95),
                     lambda: tf.io.encode_png(out))

    return tf.cond(tf.minimum(tf.shape(image)[0], tf.shape(image)[1]) <= max_side,
                   lambda: data, small)

  return fn


# ---------------------------------------------------------------------------------------------
# Preparing: one process at a time per dataset, leftovers of killed ones removed.


def _stale_incomplete(dataset_dir: str) -> list[str]:
  """tfds' `incomplete.*` folders under <data_dir>/<name>/<config>/ (a killed preparation's)."""
  prefix = tfds.core.constants.INCOMPLETE_PREFIX
  out = []
  for cfg in sorted(os.listdir(dataset_dir)) if os.path.isdir(dataset_dir) else []:
    cfg_dir = os.path.join(dataset_dir, cfg)
    if os.path.isdir(cfg_dir):
      out += [os.path.join(cfg_dir, e) for e in sorted(os.listdir(cfg_dir))
              if e.startswith(prefix) and os.path.isdir(os.path.join(cfg_dir, e))]
  return out


@contextlib.contextmanager
def prepare_lock(dataset_dir: str, name: str, wait: bool = True):
  """Holds `<data_dir>/<name>/.shpeft_prepare.lock` (an flock, released by the kernel when its
  holder dies, kill -9 included) and removes `incomplete.*` folders, which only a holder writes.

  Yields True when held; with wait=False, yields False at once if another process holds it.
  """
  os.makedirs(dataset_dir, exist_ok=True)
  path = os.path.join(dataset_dir, PREPARE_LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if not wait:
        yield False
        return
      holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
      logging.warning("%s: %s is preparing data in %s; waiting for it to finish.", name, holder,
                      dataset_dir)
      fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}".encode(), 0)
    stale = _stale_incomplete(dataset_dir)
    for d in stale:
      shutil.rmtree(d, ignore_errors=True)
    if stale:
      logging.warning("%s: removed %d unfinished preparation folder(s) left by an interrupted "
                      "run: %s", name, len(stale), ", ".join(stale[:3]))
    yield True
  finally:
    os.close(fd)


def _read_back(name: str, data_dir: str, manual: str, manual_dir: str | None,
               prepared: dict[str, dict]) -> tuple[_ManualImageBuilder, str]:
  """The one prepared copy, when the manual dir is not readable (several: an error)."""
  if len(prepared) > 1:
    listed = "; ".join(f"{c} from {r.get('manual_dir')} ({r.get('num_examples')} images, "
                       f"prepared {r.get('prepared')})" for c, r in prepared.items())
    raise DataError(f"{name}: data_dir {data_dir} holds {len(prepared)} prepared sources "
                    f"({listed}) and data.manual_dir={manual_dir!r} is not readable; set "
                    "data.manual_dir to the source to use.")
  cfg, rec = next(iter(prepared.items()))
  (logging.warning if manual_dir else logging.info)(
      "%s: manual_dir %s not found; reading the copy prepared from %s.", name, manual,
      rec.get("manual_dir"))
  builder = BUILDERS[name](data_dir=data_dir, config=_config(cfg),
                           class_names=rec["class_names"], task=rec["task"])
  return builder, rec["source_id"]


def _prepare(builder: _ManualImageBuilder, parsed: parsed_lib.ParsedSource, sid: str,
             manual: str) -> None:
  from shpeft_jax import console  # pylint: disable=g-import-not-at-top
  from shpeft_jax.utils import atomic_path  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  if console.verbosity() >= 1:  # tfds' own banners and per-split bars
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  else:
    # One bar over every image (rate, ETA) instead of tfds' banner and its nested per-split and
    # shuffle bars named by temporary paths.
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=parsed.num_examples, desc=f"preparing {parsed.name}", unit="img",
               dynamic_ncols=True, leave=False, file=sys.stderr)
    builder.on_example = lambda: bar.update(1)
    tfds.display_progress_bar(False)
    try:
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual))
    finally:
      tfds.display_progress_bar(True)
      builder.on_example = None
      bar.close()
  sizes = {s: builder.info.splits[s].num_examples for s in builder.info.splits.keys()}
  logging.info("%s: prepared %d images (%s) in %.1f s into %s", parsed.name, sum(sizes.values()),
               ", ".join(f"{k} {v}" for k, v in sizes.items()), time.time() - t0,
               os.fspath(builder.data_dir))
  if builder.undecodable:
    syntaxes = sorted({s for _, s in builder.undecodable})
    logging.warning("%s: %d DICOM file(s) left out: no installed decoder handles their transfer "
                    "syntax (%s). To include them, install a decoder for it (pydicom's docs "
                    "list them) and delete %s so that the data is prepared again. First ones: %s",
                    parsed.name, len(builder.undecodable), ", ".join(syntaxes),
                    os.fspath(builder.data_dir), ", ".join(n for n, _ in builder.undecodable[:10]))
  record = {"name": parsed.name, "source_id": sid, "manual_dir": os.path.abspath(manual),
            "class_names": list(parsed.class_names), "task": parsed.task,
            "num_examples": parsed.num_examples, "split_sizes": parsed.split_sizes,
            "prepared": time.strftime("%Y-%m-%d %H:%M:%S")}
  with atomic_path(os.path.join(os.fspath(builder.data_dir), SOURCE_FILE)) as tmp, \
      open(tmp, "w") as f:
    json.dump(record, f, indent=1)


def open_builder(name: str, data_dir: str | None, manual_dir: str | None, data_config=None
                 ) -> tuple[_ManualImageBuilder, str]:
  """(prepared builder, source id) for the source in manual_dir, preparing it on first use.

  data_config: the source's options (`data.csv_*`, `data.chexpert_*`, ...; None: the defaults).
  Without a readable manual_dir, the one prepared copy in data_dir is used (several: an error
  that lists them and asks for data.manual_dir). One process prepares a dataset at a time;
  the others wait and then read its records.
  """
  from shpeft_jax.data import source_options  # pylint: disable=g-import-not-at-top
  cls = BUILDERS[name]
  data_dir = _default_data_dir(data_dir)
  dataset_dir = os.path.join(data_dir, cls.name)
  manual = manual_dir or os.path.join(data_dir, "downloads", "manual")
  prepared = prepared_sources(name, data_dir)
  if not os.path.isdir(manual) and prepared:
    return _read_back(name, data_dir, manual, manual_dir, prepared)
  options = source_options(data_config)
  parsed = cls.parse(manual, options)  # DataError: missing / misplaced / empty
  parsed = dataclasses.replace(parsed, max_side=max_side_of(options))
  sid = source_id(parsed, os.path.join(dataset_dir, content_hash.CACHE_FILE))
  cfg = _config(f"src_{sid}", f"prepared from {manual}")
  builder = cls(data_dir=data_dir, config=cfg, parsed=parsed)
  if builder.is_prepared():
    if _stale_incomplete(dataset_dir):
      try:
        with prepare_lock(dataset_dir, name, wait=False):
          pass  # Removes them when no other process is preparing.
      except OSError as e:  # A read-only data_dir: reading the records still works.
        logging.warning("%s: could not remove unfinished preparation folders in %s (%s).", name,
                        dataset_dir, e)
    return builder, sid
  with prepare_lock(dataset_dir, name):
    # Another process may have prepared the same source while this one waited.
    builder = cls(data_dir=data_dir, config=cfg, parsed=parsed)
    if not builder.is_prepared():
      others = {c: r for c, r in prepared.items() if c != cfg.name}
      if others:
        logging.warning(
            "%s: the source in %s differs from the one(s) prepared before in %s (%s); preparing "
            "it as %s. Runs made from the old records keep their fingerprints and will say so.",
            name, manual, data_dir,
            ", ".join(f"{c} from {r.get('manual_dir')}" for c, r in others.items()), cfg.name)
      _prepare(builder, parsed, sid, manual)
  return builder, sid
