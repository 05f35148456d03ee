"""Tiny fixture trees in each dataset's published layout (a handful of 16x16 images)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def write_image(path: str, seed: int, size: int = 16, gray: bool = False) -> np.ndarray:
  """A random image at `path` (format from the extension); returns the uint8 pixels written."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  shape = (size, size) if gray else (size, size, 3)
  pixels = rng.integers(0, 256, shape, dtype=np.uint8)
  ext = os.path.splitext(path)[1].lower()
  fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}[ext]
  Image.fromarray(pixels).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return pixels


def touch(path: str):
  """An empty file: enough for the parsers, which only list names."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "wb").close()


def _writer(images: bool):
  counter = iter(range(10**9))
  if images:
    return lambda p, gray=False: write_image(p, next(counter), gray=gray)
  return lambda p, gray=False: touch(p)


def make_chaoyang(manual_dir: str, train=(3, 2, 2, 1), test=(1, 1, 1, 1), images=True) -> str:
  root = os.path.join(manual_dir, "chaoyang-data")
  w = _writer(images)
  for split, per_class in (("train", train), ("test", test)):
    records = []
    for label, n in enumerate(per_class):
      for i in range(n):
        name = f"{split}/{500 + label * 10 + i} {label}-IMG00{i}x016-{label}.JPG"
        w(os.path.join(root, name))
        records.append({"name": name, "label": label})
    with open(os.path.join(root, f"{split}.json"), "w") as f:
      json.dump(records, f)
  return root


def make_covid_ct(manual_dir: str, sizes=None, images=True) -> str:
  """COVID-CT: Images-processed/CT_{COVID,NonCOVID}/ + Data-split/{COVID,NonCOVID}/*.txt."""
  sizes = sizes or {"COVID": (3, 1, 2), "NonCOVID": (2, 2, 1)}
  root = os.path.join(manual_dir, "COVID-CT")
  w = _writer(images)
  for sub, (n_train, n_val, n_test) in sizes.items():
    cls = f"CT_{sub}"
    for prefix, n in (("train", n_train), ("val", n_val), ("test", n_test)):
      names = []
      for i in range(n):
        name = (f"2020.03.{i:02d}.{prefix}-p{i}-{sub}.png" if sub == "COVID"
                else f"{i}{prefix}%{sub}.jpg")
        w(os.path.join(root, "Images-processed", cls, name))
        names.append(name)
      os.makedirs(os.path.join(root, "Data-split", sub), exist_ok=True)
      with open(os.path.join(root, "Data-split", sub, f"{prefix}{cls}.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
  return root


def make_busi(manual_dir: str, counts=(5, 3, 2), images=True, masks=True) -> str:
  root = os.path.join(manual_dir, "Dataset_BUSI_with_GT")
  w = _writer(images)
  for cls, n in zip(("benign", "malignant", "normal"), counts):
    for i in range(1, n + 1):
      w(os.path.join(root, cls, f"{cls} ({i}).png"), gray=True)
      if masks:
        touch(os.path.join(root, cls, f"{cls} ({i})_mask.png"))
        if i == 1:
          touch(os.path.join(root, cls, f"{cls} ({i})_mask_1.png"))
  return root


def make_cxr(manual_dir: str, train=(3, 3, 2), test=(1, 1, 1), val=None, images=True) -> str:
  """chest_xray/{train,test}/{NORMAL,PNEUMONIA}; counts are (normal, bacterial, viral)."""
  root = os.path.join(manual_dir, "chest_xray")
  w = _writer(images)
  splits = {"train": train, "test": test}
  if val is not None:
    splits["val"] = val
  for split, (n_norm, n_bact, n_vir) in splits.items():
    for i in range(n_norm):
      w(os.path.join(root, split, "NORMAL", f"IM-{i:04d}-0001.jpeg"), gray=True)
    for i in range(n_bact):
      w(os.path.join(root, split, "PNEUMONIA", f"person{i}_bacteria_{100 + i}.jpeg"), gray=True)
    for i in range(n_vir):
      w(os.path.join(root, split, "PNEUMONIA", f"person{i}_virus_{200 + i}.jpeg"), gray=True)
  return root


def make_oct(manual_dir: str, train=(3, 2, 2, 3), test=(1, 1, 1, 1), images=True) -> str:
  root = os.path.join(manual_dir, "OCT2017")
  w = _writer(images)
  for split, per_class in (("train", train), ("test", test)):
    for cls, n in zip(("CNV", "DME", "DRUSEN", "NORMAL"), per_class):
      for i in range(n):
        w(os.path.join(root, split, cls, f"{cls}-{1000 + i}-{i}.jpeg"), gray=True)
  return root


def make_limuc(manual_dir: str, published=True, train=(3, 2, 2, 1), test=(1, 1, 1, 1),
               images=True) -> str:
  root = os.path.join(manual_dir, "LIMUC")
  w = _writer(images)
  if published:
    for sub, per_class in (("train_and_validation_sets", train), ("test_set", test)):
      for k, n in enumerate(per_class):
        for i in range(n):
          w(os.path.join(root, sub, f"Mayo {k}", f"{sub[:4]}_{k}_{i}.bmp"))
  else:
    for k, n in enumerate(np.add(train, test)):
      for i in range(n):
        w(os.path.join(root, f"Mayo {k}", f"img_{k}_{i}.bmp"))
  return root


def make_image_folder(root: str, classes=("cat", "dog"), per_class=(4, 3), split_dirs=False,
                      ext=".png", images=True) -> str:
  w = _writer(images)
  if split_dirs:
    for split, scale in (("train", 1), ("val", 1), ("test", 1)):
      for cls, n in zip(classes, per_class):
        for i in range(n * scale):
          w(os.path.join(root, split, cls, f"{cls}_{i}{ext}"))
  else:
    for cls, n in zip(classes, per_class):
      for i in range(n):
        w(os.path.join(root, cls, f"{cls}_{i}{ext}"))
  return root


# ---------------------------------------------------------------------------------------------
# Table-labelled layouts (multi-label chest X-rays, CSV folders, MedMNIST npz).

CHESTXRAY14_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                      "Patient Gender,View Position,OriginalImage[Width,Height],"
                      "OriginalImagePixelSpacing[x,y],")
# (image, findings, patient, list): patients with 4, 3, 2 and 1 train_val images (every finding
# positive among patients 1 and 2), two test patients.
CHESTXRAY14_ROWS = (
    ("00000001_000.png", "Atelectasis|Cardiomegaly|Effusion", 1, "train_val"),
    ("00000001_001.png", "Infiltration|Mass|Nodule", 1, "train_val"),
    ("00000001_002.png", "Pneumonia|Pneumothorax", 1, "train_val"),
    ("00000001_003.png", "No Finding", 1, "train_val"),
    ("00000002_000.png", "Consolidation|Edema", 2, "train_val"),
    ("00000002_001.png", "Emphysema|Fibrosis", 2, "train_val"),
    ("00000002_002.png", "Pleural_Thickening|Hernia", 2, "train_val"),
    ("00000003_000.png", "Cardiomegaly", 3, "train_val"),
    ("00000003_001.png", "No Finding", 3, "train_val"),
    ("00000004_000.png", "Hernia|Mass", 4, "train_val"),
    ("00000005_000.png", "Effusion", 5, "test"),
    ("00000006_000.png", "No Finding", 6, "test"),
)


def make_chestxray14(manual_dir: str, rows=CHESTXRAY14_ROWS, csv_name="Data_Entry_2017_v2020.csv",
                     images=True) -> str:
  """Data_Entry CSV, train_val_list.txt / test_list.txt, images in images_001/images/ (the first
  half) and images_002/images/ (the rest), 16x16 gray PNGs."""
  root = manual_dir
  w = _writer(images)
  os.makedirs(root, exist_ok=True)
  lines = [CHESTXRAY14_HEADER]
  lists = {"train_val": [], "test": []}
  for i, (name, findings, patient, split) in enumerate(rows):
    lines.append(f"{name},{findings},{i},{patient},058Y,M,PA,2682,2749,0.143,0.143,")
    lists[split].append(name)
    folder = "images_001" if i < len(rows) // 2 else "images_002"
    w(os.path.join(root, folder, "images", name), gray=True)
  with open(os.path.join(root, csv_name), "w") as f:
    f.write("\n".join(lines) + "\n")
  for split, names in lists.items():
    with open(os.path.join(root, f"{split}_list.txt"), "w") as f:
      f.write("\n".join(names) + "\n")
  return root


CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
                    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                    "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")


def chexpert_row(path: str, view: str, **values) -> dict:
  """A CheXpert CSV row: observation columns blank unless given (keys with '_' for ' ')."""
  row = {c: "" for c in CHEXPERT_COLUMNS}
  row.update({"Path": path, "Sex": "Female", "Age": "68", "Frontal/Lateral": view,
              "AP/PA": "AP" if view == "Frontal" else ""})
  for k, v in values.items():
    row[k.replace("_", " ")] = v
  return row


# train.csv: patient00001 has 4 images (2 studies), patient00002 3, patient00003 2, patient00004 1;
# every observation is 1.0 at least once in patients 1 and 2. valid.csv: two patients, 0/1 only.
_P = "CheXpert-v1.0-small/{split}/patient{p:05d}/study{s}/view{v}_{view}.jpg"
CHEXPERT_TRAIN = (
    chexpert_row(_P.format(split="train", p=1, s=1, v=1, view="frontal"), "Frontal",
                 Atelectasis="-1.0", Consolidation="1.0", Edema="0.0", Pleural_Effusion="-1.0",
                 No_Finding="", Support_Devices="1.0"),
    chexpert_row(_P.format(split="train", p=1, s=1, v=2, view="lateral"), "Lateral",
                 Atelectasis="1.0", Cardiomegaly="1.0", Enlarged_Cardiomediastinum="1.0",
                 Lung_Opacity="1.0", Lung_Lesion="1.0"),
    chexpert_row(_P.format(split="train", p=1, s=2, v=1, view="frontal"), "Frontal",
                 Edema="1.0", Pleural_Effusion="1.0", Pneumonia="1.0", Pneumothorax="1.0",
                 Cardiomegaly="-1.0"),
    chexpert_row(_P.format(split="train", p=1, s=2, v=2, view="lateral"), "Lateral",
                 Pleural_Other="1.0", Fracture="1.0"),
    chexpert_row(_P.format(split="train", p=2, s=1, v=1, view="frontal"), "Frontal",
                 No_Finding="1.0"),
    chexpert_row(_P.format(split="train", p=2, s=1, v=2, view="lateral"), "Lateral",
                 Consolidation="-1.0", Edema="-1.0"),
    chexpert_row(_P.format(split="train", p=2, s=2, v=1, view="frontal"), "Frontal",
                 Cardiomegaly="0.0", Atelectasis="0.0"),
    chexpert_row(_P.format(split="train", p=3, s=1, v=1, view="frontal"), "Frontal",
                 Atelectasis="-1.0"),
    chexpert_row(_P.format(split="train", p=3, s=1, v=2, view="lateral"), "Lateral",
                 Edema="1.0"),
    chexpert_row(_P.format(split="train", p=4, s=1, v=1, view="frontal"), "Frontal",
                 Consolidation="0.0"),
)
_ALL_ZERO = {c.replace(" ", "_"): "0.0" for c in CHEXPERT_COLUMNS[5:]}
CHEXPERT_VALID = (
    chexpert_row(_P.format(split="valid", p=64541, s=1, v=1, view="frontal"), "Frontal",
                 **{**_ALL_ZERO, "Cardiomegaly": "1.0"}),
    chexpert_row(_P.format(split="valid", p=64542, s=1, v=1, view="frontal"), "Frontal",
                 **{**_ALL_ZERO, "Edema": "1.0", "Pleural_Effusion": "1.0"}),
)


def make_chexpert(manual_dir: str, folder="CheXpert-v1.0-small", train=CHEXPERT_TRAIN,
                  valid=CHEXPERT_VALID, images=True) -> str:
  import csv  # pylint: disable=g-import-not-at-top
  root = os.path.join(manual_dir, folder)
  w = _writer(images)
  for name, rows in (("train.csv", train), ("valid.csv", valid)):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, name), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=CHEXPERT_COLUMNS)
      writer.writeheader()
      writer.writerows(rows)
    for r in rows:
      w(os.path.join(root, *r["Path"].split("/")[1:]))
  return root


def write_csv(path: str, header, rows) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  import csv  # pylint: disable=g-import-not-at-top
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return path


def make_medmnist(manual_dir: str, flag: str, size: int, counts=(12, 3, 4), num_labels=9,
                  rgb=True, multi_label=False, seed=0) -> str:
  """<flag>_<size>.npz (<flag>.npz at 28) with random images; labels cover every class in train."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for prefix, n in zip(("train", "val", "test"), counts):
    shape = (n, size, size, 3) if rgb else (n, size, size)
    arrays[f"{prefix}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
    if multi_label:
      labels = rng.integers(0, 2, (n, num_labels))
      if prefix == "train":
        labels[np.arange(num_labels) % n, np.arange(num_labels)] = 1  # every finding positive
    else:
      labels = (np.arange(n) % num_labels)[:, None]
    arrays[f"{prefix}_labels"] = labels.astype(np.uint8)
  os.makedirs(manual_dir, exist_ok=True)
  path = os.path.join(manual_dir, f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
  np.savez_compressed(path, **arrays)
  return path


def make_dicom(path: str, pixels: np.ndarray, *, bits_stored: int = 12, photometric="MONOCHROME2",
               syntax=None, **attrs) -> str:
  """A DICOM file (pydicom, Explicit VR Little Endian unless `syntax`) holding `pixels` [H, W]
  (or [F, H, W] with NumberOfFrames) with the given attributes (WindowCenter, RescaleSlope, ...)."""
  from pydicom.dataset import Dataset, FileMetaDataset  # pylint: disable=g-import-not-at-top
  from pydicom import uid  # pylint: disable=g-import-not-at-top
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
  ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
  ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
  ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
  ds.Modality = "DX"
  ds.Rows, ds.Columns = pixels.shape[-2:]
  if pixels.ndim == 3:
    ds.NumberOfFrames = pixels.shape[0]
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
  ds.PixelRepresentation = 0
  ds.PixelData = pixels.astype(np.uint16).tobytes()
  for k, v in attrs.items():
    setattr(ds, k, v)
  if syntax is not None:
    ds.compress(syntax)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ds.save_as(path, enforce_file_format=True)
  return path
