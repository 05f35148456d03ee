"""tfds builders for the paper's six datasets and a generic image folder.

The datasets cannot be downloaded by code (licences, registration), so every builder reads a
user-downloaded copy from the manual directory (`tfds.download.DownloadConfig(manual_dir=...)`,
default `<data_dir>/downloads/manual`). The parsing and the splits live in `splits.py` as plain
functions; the builders only check and store the images.

Each example is `{'image': encoded JPEG/PNG bytes (decoded to 3 channels), 'label': ClassLabel,
'file_name': path relative to the dataset root}`. The input pipeline reads the encoded bytes and
decodes them itself (`decode_and_crop_jpeg` is the fast path of random resized crop).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from typing import Callable

from absl import logging

from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from shpeft_jax.data import splits as splits_lib
from shpeft_jax.errors import DataError

_VERSION = tfds.core.Version("1.0.0")


class _ManualImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic: manual dir -> parse function -> checked, encoded images."""

  VERSION = _VERSION
  RELEASE_NOTES = {"1.0.0": "First release."}
  CLASS_NAMES: tuple[str, ...] = ()
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""
  LICENSE = ""
  LAYOUT = ""
  URL = ""

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds derives this from the package's resources, which needs the `importlib_resources`
    # backport for an editable install; the defining file is the same answer without it.
    return epath.Path(inspect.getfile(cls))

  def _parse(self, manual_dir: str) -> splits_lib.Splits:
    raise NotImplementedError

  def _class_names(self) -> list[str] | None:
    return list(self.CLASS_NAMES)

  def _info(self) -> tfds.core.DatasetInfo:
    names = self._class_names()
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=names) if names else
                     tfds.features.ClassLabel(),
            "file_name": tfds.features.Text(),
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

  # Set by `open_builder`, which parsed the source already to compute its id.
  _parsed: splits_lib.Splits | None = None

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_dir(dl_manager)
    parsed = self._parsed if self._parsed is not None else self._parse(manual_dir)
    return {split: self._generate_examples(exs, manual_dir) for split, exs in parsed.items()}

  def _generate_examples(self, examples, manual_dir):
    for path, label in examples:
      data, _ = splits_lib.read_image(path)
      name = splits_lib.relative_name(path, manual_dir)
      yield name, {"image": data, "label": label, "file_name": name}


class Chaoyang(_ManualImageBuilder):
  """D1 Chaoyang colon pathology, 4 classes, the official train / test JSON split."""

  CLASS_NAMES = splits_lib.CHAOYANG_CLASSES
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

  def _parse(self, manual_dir):
    return splits_lib.chaoyang_splits(manual_dir)


class CovidCt(_ManualImageBuilder):
  """D2 COVID-CT (UCSD-AI4H), 2 classes, the official Data-split lists."""

  CLASS_NAMES = splits_lib.COVID_CT_CLASSES
  DESCRIPTION = ("COVID-CT lung CT slices (non-COVID, COVID); official split 425 / 118 / 203.")
  HOMEPAGE = "https://github.com/UCSD-AI4H/COVID-CT"
  CITATION = ("@article{yang2020covidct, title={COVID-CT-Dataset: A CT Scan Dataset about "
              "COVID-19}, author={Yang, Xingyi and He, Xuehai and Zhao, Jinyu and Zhang, Yichen and "
              "Zhang, Shanghang and Xie, Pengtao}, journal={arXiv:2003.13865}, year={2020}}")
  LICENSE = "Research use; the images come from medRxiv/bioRxiv preprints (see the repository)."
  LAYOUT = splits_lib.COVID_CT_LAYOUT
  URL = splits_lib.COVID_CT_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download from {URL} and extract:\n{LAYOUT}"

  def _parse(self, manual_dir):
    return splits_lib.covid_ct_splits(manual_dir)


class Busi(_ManualImageBuilder):
  """D3 BUSI breast ultrasound, 3 classes, seeded stratified 547 / 77 / 156 split, masks skipped."""

  CLASS_NAMES = splits_lib.BUSI_CLASSES
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

  def _parse(self, manual_dir):
    return splits_lib.busi_splits(manual_dir)


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
  DESCRIPTION = ("Pediatric chest X-rays (normal, bacterial pneumonia, viral pneumonia); validation "
                 "carved from the published train split with a fixed seed (4,708 / 524), test as "
                 "published (624).")
  HOMEPAGE = "https://data.mendeley.com/datasets/rscbjbr9sj"
  CITATION = _KERMANY_CITATION
  LICENSE = "CC BY 4.0"
  LAYOUT = splits_lib.CXR_LAYOUT
  URL = splits_lib.CXR_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download from {URL} and extract:\n{LAYOUT}"

  def _parse(self, manual_dir):
    return splits_lib.cxr_splits(manual_dir)


class Oct2017(_ManualImageBuilder):
  """D5 retinal OCT (Kermany OCT2017), CNV / DME / DRUSEN / NORMAL."""

  CLASS_NAMES = splits_lib.OCT_CLASSES
  DESCRIPTION = ("Retinal OCT B-scans (CNV, DME, DRUSEN, NORMAL); validation carved from the "
                 "published train split with a fixed seed (10,832/108,309 of it), test as published.")
  HOMEPAGE = "https://data.mendeley.com/datasets/rscbjbr9sj"
  CITATION = _KERMANY_CITATION
  LICENSE = "CC BY 4.0"
  LAYOUT = splits_lib.OCT_LAYOUT
  URL = splits_lib.OCT_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download from {URL} and extract:\n{LAYOUT}"

  def _parse(self, manual_dir):
    return splits_lib.oct_splits(manual_dir)


class Limuc(_ManualImageBuilder):
  """D6 LIMUC ulcerative colitis, Mayo endoscopic score 0..3, 9,590 / 1,686."""

  CLASS_NAMES = splits_lib.LIMUC_CLASSES
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

  def _parse(self, manual_dir):
    return splits_lib.limuc_splits(manual_dir)


class ImageFolder(_ManualImageBuilder):
  """The user's own dataset: `<root>/<class>/*.png|jpg`, optional train/validation/test folders.

  Class names come from the folder names, so the builder needs the root at construction
  (`ImageFolder(root_dir=..., data_dir=...)`); a prepared dataset is read back without it. Use one
  data_dir per image-folder dataset: tfds stores it under `<data_dir>/image_folder/1.0.0`.
  """

  DESCRIPTION = "A user-supplied image folder dataset."
  LAYOUT = splits_lib.IMAGE_FOLDER_LAYOUT
  URL = "your own data"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put your images in:\n{LAYOUT}"

  def __init__(self, *, root_dir: str | None = None, **kwargs):
    self._root_dir = os.path.abspath(root_dir) if root_dir else None
    super().__init__(**kwargs)

  def _class_names(self):
    return splits_lib.image_folder_classes(self._root_dir) if self._root_dir else None

  def _manual_dir(self, dl_manager):
    return self._root_dir or super()._manual_dir(dl_manager)

  def _parse(self, manual_dir):
    return splits_lib.image_folder_splits(manual_dir)


# Config name -> builder class.
BUILDERS: dict[str, Callable[..., _ManualImageBuilder]] = {
    "chaoyang": Chaoyang,
    "covid_ct": CovidCt,
    "busi": Busi,
    "cxr": PediatricCxr,
    "oct": Oct2017,
    "limuc": Limuc,
    "image_folder": ImageFolder,
}


# ---------------------------------------------------------------------------------------------
# Prepared data keyed by its source.
#
# tfds stores a builder's records under <data_dir>/<name>/<config>/<version>. The config name is
# `src_<id>`, the id a hash of the parsed source: every (split, file, label, size) and, for an
# image folder, its root and class list. Two image folders, or a named dataset re-prepared from a
# corrected manual_dir, get their own records; a run never reads another source's.

SOURCE_FILE = "shpeft_source.json"

_PARSERS: dict[str, Callable[[str], splits_lib.Splits]] = {
    "chaoyang": splits_lib.chaoyang_splits,
    "covid_ct": splits_lib.covid_ct_splits,
    "busi": splits_lib.busi_splits,
    "cxr": splits_lib.cxr_splits,
    "oct": splits_lib.oct_splits,
    "limuc": splits_lib.limuc_splits,
    "image_folder": splits_lib.image_folder_splits,
}


def source_id(name: str, manual_dir: str, parsed: splits_lib.Splits,
              class_names: list[str]) -> str:
  h = hashlib.sha256(json.dumps([name, list(class_names)]).encode())
  if name == "image_folder":
    h.update(os.path.abspath(manual_dir).encode())
  for split in sorted(parsed):
    for path, label in parsed[split]:
      rel = splits_lib.relative_name(path, manual_dir)
      h.update(f"{split}\t{rel}\t{label}\t{os.path.getsize(path)}\n".encode())
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


def open_builder(name: str, data_dir: str | None, manual_dir: str | None
                 ) -> tuple[_ManualImageBuilder, str]:
  """(prepared builder, source id) for the source in manual_dir, preparing it on first use.

  Without a readable manual_dir, the one prepared copy in data_dir is used (several: an error that
  lists them and asks for data.manual_dir).
  """
  from shpeft_jax.utils import atomic_path  # pylint: disable=g-import-not-at-top
  cls = BUILDERS[name]
  data_dir = _default_data_dir(data_dir)
  manual = manual_dir or os.path.join(data_dir, "downloads", "manual")
  prepared = prepared_sources(name, data_dir)
  if not os.path.isdir(manual) and prepared:
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
    return cls(data_dir=data_dir, config=_config(cfg)), rec["source_id"]
  parsed = _PARSERS[name](manual)  # DataError for a missing / misplaced / empty source.
  class_names = (splits_lib.image_folder_classes(manual) if name == "image_folder"
                 else list(cls.CLASS_NAMES))
  sid = source_id(name, manual, parsed, class_names)
  cfg = f"src_{sid}"
  kwargs = {"root_dir": manual} if name == "image_folder" else {}
  builder = cls(data_dir=data_dir, config=_config(cfg, f"prepared from {manual}"), **kwargs)
  if not builder.is_prepared():
    others = {c: r for c, r in prepared.items() if c != cfg}
    if others:
      logging.warning(
          "%s: the source in %s differs from the one(s) prepared before in %s (%s); preparing it "
          "as %s. Runs made from the old records keep their fingerprints and will say so.", name,
          manual, data_dir, ", ".join(f"{c} from {r.get('manual_dir')}" for c, r in others.items()),
          cfg)
    builder._parsed = parsed  # pylint: disable=protected-access
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
    record = {"name": name, "source_id": sid, "manual_dir": os.path.abspath(manual),
              "class_names": class_names, "num_examples": sum(len(v) for v in parsed.values()),
              "split_sizes": {k: len(v) for k, v in parsed.items()},
              "prepared": time.strftime("%Y-%m-%d %H:%M:%S")}
    with atomic_path(os.path.join(os.fspath(builder.data_dir), SOURCE_FILE)) as tmp, \
        open(tmp, "w") as f:
      json.dump(record, f, indent=1)
  return builder, sid
