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
