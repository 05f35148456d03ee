"""DICOM images -> 8-bit PNG bytes, once, when a dataset is prepared (and in predict).

Wherever the project reads an image file (image folders, CSV tables, the published layouts,
predict), a DICOM file (`.dcm` / `.dicom`, or any file with the `DICM` preamble) goes through
`to_png`: pydicom decodes the pixel data (compressed transfer syntaxes through the PyPI decoders of
the `dicom` extra: pylibjpeg with libjpeg / openjpeg; RLE is built in), then

1. the Modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence) gives stored values
   their meaning (e.g. Hounsfield units);
2. the VOI transform chooses what is shown: the file's window (Window Center / Width, the first
   one when several, with its VOI LUT Function LINEAR / LINEAR_EXACT / SIGMOID, DICOM PS3.3
   C.11.2.1.2-3) mapped straight to 0..255, else its VOI LUT Sequence, else the image's own
   min..max;
3. MONOCHROME1 (white = low) is inverted so that every image is MONOCHROME2-like;
4. the result is 8 bit (gray, or RGB for colour files) and stored as PNG: the prepared records
   hold PNG bytes, so training never decodes DICOM.

Multi-frame files (cine, tomosynthesis, whole volumes) are refused with their frame count: a
single-image classifier does not choose a frame silently. A file whose transfer syntax no installed
decoder handles raises `UndecodableImage` (naming the syntax), which the dataset builders count and
list instead of stopping.
"""

from __future__ import annotations

import io

import numpy as np

from shpeft_jax.errors import DataError

EXTENSIONS = (".dcm", ".dicom")


class UndecodableImage(DataError):
  """An image whose encoding no installed decoder handles (left out and listed, not fatal)."""

  def __init__(self, message: str, syntax: str = ""):
    super().__init__(message)
    self.syntax = syntax


def is_dicom(path: str, data: bytes) -> bool:
  return path.lower().endswith(EXTENSIONS) or data[128:132] == b"DICM"


def _pydicom():
  try:
    import pydicom  # pylint: disable=g-import-not-at-top
    from pydicom import pixels  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError("DICOM files need pydicom and its decoders: pip install -e \".[dicom]\" "
                    "(pydicom, pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg).") from e
  return pydicom, pixels


def _window(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
  """The VOI window of PS3.3 C.11.2.1.2 (LINEAR) / C.11.2.1.3 (LINEAR_EXACT, SIGMOID) to 0..1."""
  x = arr.astype(np.float64)
  if function == "SIGMOID":
    if width <= 0:
      raise DataError(f"Window Width {width} must be > 0 for a SIGMOID window.")
    return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
  if function == "LINEAR":
    if width < 1:
      raise DataError(f"Window Width {width} must be >= 1 for a LINEAR window.")
    center, width = center - 0.5, width - 1.0
  elif width <= 0:
    raise DataError(f"Window Width {width} must be > 0 for a LINEAR_EXACT window.")
  if width == 0:  # LINEAR with width 1: a threshold
    return (x > center).astype(np.float64)
  return np.clip((x - center) / width + 0.5, 0.0, 1.0)


def _first(value) -> float:
  try:
    return float(value[0])
  except TypeError:
    return float(value)


def _to_unit(ds, arr: np.ndarray, pixels) -> np.ndarray:
  """Modality LUT, then the file's VOI (window / VOI LUT / min-max), as floats in 0..1."""
  arr = pixels.apply_modality_lut(arr, ds)
  if "WindowCenter" in ds and "WindowWidth" in ds:
    function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
    return _window(arr, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
  if ds.get("VOILUTSequence"):
    arr = pixels.apply_voi_lut(arr, ds).astype(np.float64)
  arr = arr.astype(np.float64)
  lo, hi = float(arr.min()), float(arr.max())
  return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def decode(data: bytes, path: str = "") -> np.ndarray:
  """The image of a DICOM file as uint8 [H, W] (gray) or [H, W, 3] (colour)."""
  pydicom, pixels = _pydicom()
  try:
    ds = pydicom.dcmread(io.BytesIO(data))
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"corrupt DICOM file {path}: {e}. Re-export or delete the file.") from e
  if "PixelData" not in ds:
    raise DataError(f"{path} is a DICOM file without pixel data (a report or structured "
                    "document?); remove it from the dataset.")
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames > 1:
    raise DataError(f"{path} is a multi-frame DICOM ({frames} frames); export the frame to "
                    "classify as a single-frame file.")
  meta = getattr(ds, "file_meta", None)
  syntax = meta.get("TransferSyntaxUID", "") if meta is not None else ""
  try:
    arr = ds.pixel_array
  except (NotImplementedError, RuntimeError) as e:
    name = getattr(syntax, "name", str(syntax)) or "unknown"
    raise UndecodableImage(f"{path}: no installed decoder handles its transfer syntax {name} "
                           f"({syntax}) ({str(e).splitlines()[0][:120]})", name) from e
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"corrupt DICOM pixel data in {path}: {e}. Re-export or delete the file."
                    ) from e
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  if arr.ndim == 3:  # colour: pydicom returns RGB (YBR converted); 8 bit kept as is.
    if arr.dtype != np.uint8:
      arr = np.round(255.0 * arr / max(float(arr.max()), 1.0)).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])
  unit = _to_unit(ds, arr, pixels)
  if photometric == "MONOCHROME1":
    unit = 1.0 - unit
  return np.round(255.0 * unit).astype(np.uint8)


def to_png(data: bytes, path: str = "") -> bytes:
  """DICOM bytes -> 8-bit PNG bytes (see the module docstring)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(decode(data, path)).save(buf, format="PNG")
  return buf.getvalue()
