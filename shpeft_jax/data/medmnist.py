"""MedMNIST v2 / MedMNIST+ `.npz` files: the 12 2D datasets at 28, 64, 128 or 224 pixels.

Plain Python (numpy, no TensorFlow, no `medmnist` package: it pulls torchvision). Each file holds
`train_images`, `val_images`, `test_images` (uint8 [N, H, W] gray or [N, H, W, 3] RGB) and
`train_labels`, `val_labels`, `test_labels` (int [N, 1], or [N, 14] 0/1 for ChestMNIST), as
shipped on Zenodo. The images are streamed out of the (compressed) archive one at a time, so a
224-pixel file of several GB is never held in memory; each is stored as PNG (gray stays one
channel and becomes three when decoded, as every gray image does).
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import Iterator, Sequence

import numpy as np

from shpeft_jax.data import parsed as parsed_lib
from shpeft_jax.data import tables
from shpeft_jax.errors import ConfigError, DataError

SIZES = (28, 64, 128, 224)
URL = ("https://zenodo.org/records/10519652 (MedMNIST+, all sizes) or "
       "https://zenodo.org/records/6496656 (MedMNIST v2, 28 px)")
LAYOUT = """\
  <manual_dir>/pathmnist_224.npz   (<flag>_<size>.npz; 28 px: <flag>.npz as published)
    train_images, val_images, test_images   uint8 [N, H, W] or [N, H, W, 3]
    train_labels, val_labels, test_labels   [N, 1] class index, or [N, 14] 0/1 (chestmnist)"""

_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
           "lung-left", "lung-right", "pancreas", "spleen")
# The official label names and task of each 2D dataset (MedMNIST's INFO, v2 and v3). RetinaMNIST's
# ordinal grades are trained as 5 classes; binary datasets are 2-class single-label tasks.
INFO: dict[str, tuple[str, tuple[str, ...]]] = {
    "pathmnist": (parsed_lib.SINGLE_LABEL, (
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
        "normal colon mucosa", "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium")),
    "chestmnist": (parsed_lib.MULTI_LABEL, (
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
        "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia")),
    "dermamnist": (parsed_lib.SINGLE_LABEL, (
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
        "vascular lesions")),
    "octmnist": (parsed_lib.SINGLE_LABEL, (
        "choroidal neovascularization", "diabetic macular edema", "drusen", "normal")),
    "pneumoniamnist": (parsed_lib.SINGLE_LABEL, ("normal", "pneumonia")),
    "retinamnist": (parsed_lib.SINGLE_LABEL, ("0", "1", "2", "3", "4")),
    "breastmnist": (parsed_lib.SINGLE_LABEL, ("malignant", "normal, benign")),
    "bloodmnist": (parsed_lib.SINGLE_LABEL, (
        "basophil", "eosinophil", "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
        "monocyte", "neutrophil", "platelet")),
    "tissuemnist": (parsed_lib.SINGLE_LABEL, (
        "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
        "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
        "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb")),
    "organamnist": (parsed_lib.SINGLE_LABEL, _ORGANS),
    "organcmnist": (parsed_lib.SINGLE_LABEL, _ORGANS),
    "organsmnist": (parsed_lib.SINGLE_LABEL, _ORGANS),
}
# npz split prefix -> split name.
_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def npz_path(manual_dir: str, flag: str, size: int) -> str:
  """The published file of (flag, size) in manual_dir: `<flag>_<size>.npz`, `<flag>.npz` at 28."""
  names = [f"{flag}.npz", f"{flag}_28.npz"] if size == 28 else [f"{flag}_{size}.npz"]
  for n in names:
    if os.path.isfile(os.path.join(manual_dir, n)):
      return os.path.join(manual_dir, n)
  have = sorted(f for f in os.listdir(manual_dir) if f.endswith(".npz"))[:12]
  raise DataError(f"medmnist: no {' or '.join(names)} in {manual_dir} (its .npz files: {have}); "
                  f"download it from {URL} or set data.medmnist_flag / data.medmnist_size to a "
                  "file you have.")


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, fortran_order, dtype) of an open .npy stream, positioned at the data after it."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  return np.lib.format.read_array_header_2_0(f)


def _member_header(archive: zipfile.ZipFile, member: str, path: str
                   ) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of an npz member, read from its .npy header without loading the array."""
  with archive.open(member) as f:
    shape, fortran, dtype = _read_header(f)
  if fortran:
    raise DataError(f"medmnist: {path}:{member} is stored in Fortran order; re-save it with "
                    "numpy (np.savez) in C order.")
  return shape, dtype


def _stream_rows(path: str, member: str) -> Iterator[np.ndarray]:
  """The rows of an npz member, decompressed one at a time."""
  with zipfile.ZipFile(path) as archive, archive.open(member) as f:
    shape, _, dtype = _read_header(f)
    row_shape = shape[1:]
    row_bytes = int(np.prod(row_shape)) * dtype.itemsize
    for _ in range(shape[0]):
      yield np.frombuffer(f.read(row_bytes), dtype).reshape(row_shape)


def _encode_png(pixels: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _check_members(path: str, size: int) -> dict[str, int]:
  """{npz split: N} after checking every member's presence, dtype and shape."""
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise DataError(f"medmnist: {path} is not a readable .npz ({e}); download it again.") from e
  with archive:
    members = set(archive.namelist())
    counts = {}
    for prefix in _SPLITS:
      for kind in ("images", "labels"):
        if f"{prefix}_{kind}.npy" not in members:
          raise DataError(f"medmnist: {path} has no {prefix}_{kind}; its arrays are "
                          f"{sorted(m[:-4] for m in members)}.")
      shape, dtype = _member_header(archive, f"{prefix}_images.npy", path)
      if dtype != np.uint8 or len(shape) not in (3, 4) or shape[1:3] != (size, size) or (
          len(shape) == 4 and shape[3] != 3):
        raise DataError(f"medmnist: {path} {prefix}_images is {dtype} {shape}; expected uint8 "
                        f"[N, {size}, {size}] or [N, {size}, {size}, 3] (data.medmnist_size="
                        f"{size}).")
      counts[prefix] = shape[0]
  return counts


def _labels(path: str, prefix: str, n: int, task: str, num_labels: int
            ) -> list[parsed_lib.Label]:
  with np.load(path) as z:
    labels = np.asarray(z[f"{prefix}_labels"])
  width = num_labels if task == parsed_lib.MULTI_LABEL else 1
  if labels.shape != (n, width):
    raise DataError(f"medmnist: {path} {prefix}_labels has shape {labels.shape}, expected "
                    f"({n}, {width}).")
  allowed = (0, 1) if task == parsed_lib.MULTI_LABEL else range(num_labels)
  bad = ~np.isin(labels, list(allowed))
  if bad.any():
    row = int(np.argwhere(bad)[0][0])
    raise DataError(f"medmnist: {path} {prefix}_labels row {row} holds {labels[row].tolist()}; "
                    f"allowed values are {list(allowed)}.")
  if task == parsed_lib.MULTI_LABEL:
    return [tuple(float(v) for v in row) for row in labels]
  return [int(v) for v in labels[:, 0]]


def medmnist_source(manual_dir: str, cfg) -> parsed_lib.ParsedSource:
  """train / validation / test as shipped in `<flag>_<size>.npz`."""
  flag, size = cfg.medmnist_flag, cfg.medmnist_size
  if flag not in INFO:
    raise ConfigError(f"data.medmnist_flag={flag!r}; choose one of the 2D datasets "
                      f"{sorted(INFO)} (e.g. --config configs/medmnist.py:pathmnist_224).")
  if size not in SIZES:
    raise ConfigError(f"data.medmnist_size={size}; MedMNIST+ ships {list(SIZES)}.")
  if not manual_dir or not os.path.isdir(manual_dir):
    raise DataError(f"medmnist: data.manual_dir={manual_dir!r} does not exist; point it at the "
                    f"folder holding the .npz files:\n{LAYOUT}\nDownload: {URL}.")
  path = npz_path(manual_dir, flag, size)
  task, names = INFO[flag]
  counts = _check_members(path, size)
  splits = {}
  for prefix, split in _SPLITS.items():
    labels = _labels(path, prefix, counts[prefix], task, len(names))
    # Keys are <file>/<split>/<row> under manual_dir: each record's `file_name` says where its
    # image came from.
    splits[split] = [(os.path.join(path, prefix, f"{i:06d}"), label)
                     for i, label in enumerate(labels)]
    if not splits[split]:
      raise DataError(f"medmnist: {path} split {prefix!r} is empty.")

  def images(split: str, records: Sequence[parsed_lib.Record]) -> Iterator[bytes]:
    prefix = {v: k for k, v in _SPLITS.items()}[split]
    rows = _stream_rows(path, f"{prefix}_images.npy")
    indices = [int(os.path.basename(key)) for key, _ in records]
    if indices != sorted(indices):
      raise ValueError("medmnist records must be in row order to be streamed")
    wanted = iter(indices)
    nxt = next(wanted, None)
    for i, pixels in enumerate(rows):
      if nxt is None:
        return
      if i == nxt:
        yield _encode_png(pixels)
        nxt = next(wanted, None)

  tables.check_train_covers_labels([label for _, label in splits["train"]], names, task,
                                   f"medmnist {flag}")
  return parsed_lib.ParsedSource(
      name="medmnist", root=manual_dir, splits=splits, class_names=names, task=task,
      content_files=(path,), images=images)
