"""DICOM input: Modality LUT + VOI window against pydicom's own LUT functions, MONOCHROME1, RLE and
JPEG 2000 transfer syntaxes, refusals, an undecodable syntax left out and listed, and an image
folder of DICOM files through the pipeline (records hold PNG bytes of the decoded pixels)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from shpeft_jax import predict
from shpeft_jax.data import default_data_config, dicom, splits
from shpeft_jax.data import input_pipeline as ip
from shpeft_jax.errors import DataError

pydicom = pytest.importorskip("pydicom")
from pydicom import pixels as pdpx  # pylint: disable=g-import-not-at-top,g-bad-import-order
from pydicom import uid  # pylint: disable=g-import-not-at-top,g-bad-import-order

RNG = np.random.default_rng(0)
ARR = RNG.integers(0, 4096, (32, 32))


def _pydicom_reference(path):
  """pydicom's Modality LUT and windowing, mapped from the output range pydicom documents for
  windowing (PS3.3 C.11.2.1.2: [y_min, y_max] of the stored bits, through the rescale) to 8 bit."""
  ds = pydicom.dcmread(path)
  out = pdpx.apply_voi_lut(pdpx.apply_modality_lut(ds.pixel_array, ds), ds)
  y_min, y_max = 0, 2 ** ds.BitsStored - 1
  if "RescaleSlope" in ds:
    y_min = y_min * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    y_max = y_max * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  return np.round(255.0 * (out - y_min) / (y_max - y_min)).astype(np.uint8)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_modality_lut_and_window_match_pydicom(tmp_path, function):
  path = fx.make_dicom(str(tmp_path / "ct.dcm"), ARR, RescaleSlope=1.0, RescaleIntercept=-1024.0,
                       WindowCenter=[40.0, 400.0], WindowWidth=[400.0, 1500.0],
                       VOILUTFunction=function)
  got = dicom.decode(open(path, "rb").read(), path)
  assert got.dtype == np.uint8 and got.shape == ARR.shape
  ref = _pydicom_reference(path)
  assert np.abs(got.astype(int) - ref).max() <= 1  # rounding at .5 only
  assert (got == 0).any() and (got == 255).any()  # the window [-160, 240] HU clips both ends


def test_no_window_is_min_max_and_monochrome1_is_inverted(tmp_path):
  p2 = fx.make_dicom(str(tmp_path / "m2.dcm"), ARR)
  p1 = fx.make_dicom(str(tmp_path / "m1.dcm"), ARR, photometric="MONOCHROME1")
  by_hand = np.round(255.0 * (ARR - ARR.min()) / (ARR.max() - ARR.min())).astype(np.uint8)
  np.testing.assert_array_equal(dicom.decode(open(p2, "rb").read()), by_hand)
  np.testing.assert_array_equal(dicom.decode(open(p1, "rb").read()), 255 - by_hand)


@pytest.mark.parametrize("syntax,bits", [(uid.RLELossless, 12), (uid.JPEG2000Lossless, 16)])
def test_compressed_transfer_syntaxes_decode_like_the_uncompressed_file(tmp_path, syntax, bits):
  arr = ARR if bits == 12 else RNG.integers(0, 65536, (32, 32))
  plain = fx.make_dicom(str(tmp_path / "plain.dcm"), arr, bits_stored=bits)
  packed = fx.make_dicom(str(tmp_path / "packed.dcm"), arr, bits_stored=bits, syntax=syntax)
  assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
  np.testing.assert_array_equal(dicom.decode(open(packed, "rb").read()),
                                dicom.decode(open(plain, "rb").read()))


def _mpeg2(path):
  """A file whose transfer syntax (MPEG2 video) pydicom has no decoder for."""
  fx.make_dicom(path, ARR)
  ds = pydicom.dcmread(path)
  ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
  ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
  ds["PixelData"].VR = "OB"
  ds.save_as(path, enforce_file_format=True)
  return path


def test_refusals_name_the_file_and_the_fix(tmp_path):
  multi = fx.make_dicom(str(tmp_path / "cine.dcm"), np.stack([ARR, ARR, ARR]))
  with pytest.raises(DataError, match=r"cine.dcm is a multi-frame DICOM \(3 frames\)"):
    splits.read_image(multi)
  sr = fx.make_dicom(str(tmp_path / "sr.dcm"), ARR)
  ds = pydicom.dcmread(sr)
  del ds.PixelData
  ds.save_as(sr, enforce_file_format=True)
  with pytest.raises(DataError, match="without pixel data"):
    splits.read_image(sr)
  bad = tmp_path / "cut.dcm"
  bad.write_bytes(open(fx.make_dicom(str(tmp_path / "whole.dcm"), ARR), "rb").read()[:-900])
  with pytest.raises(DataError, match="corrupt DICOM .*cut.dcm"):
    splits.read_image(str(bad))
  with pytest.raises(dicom.UndecodableImage, match="MPEG2") as e:
    splits.read_image(_mpeg2(str(tmp_path / "video.dcm")))
  assert "MPEG2" in e.value.syntax


def test_image_folder_of_dicom_files_prepares_png_records_and_lists_the_undecodable(
    tmp_path, caplog):
  root = tmp_path / "scans"
  want = {}
  for cls, n in (("normal", 5), ("pneumonia", 4)):
    for i in range(n):
      arr = RNG.integers(0, 4096, (24, 24))
      path = fx.make_dicom(str(root / cls / f"{cls}_{i}.dcm"), arr, WindowCenter=2048.0,
                           WindowWidth=2000.0, syntax=uid.RLELossless if i % 2 else None)
      want[f"{cls}/{cls}_{i}.dcm"] = dicom.decode(open(path, "rb").read())
  _mpeg2(str(root / "normal" / "video.dcm"))
  cfg = default_data_config()
  cfg.name, cfg.manual_dir, cfg.data_dir = "image_folder", str(root), str(tmp_path / "tfds")
  with caplog.at_level("WARNING"):
    info = ip.dataset_info(cfg)
  assert sum(info.split_sizes.values()) == 9  # the MPEG2 file is left out...
  warned = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
  assert len(warned) == 1 and "MPEG2" in warned[0] and "normal/video.dcm" in warned[0]  # ...listed
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import builders  # pylint: disable=g-import-not-at-top
  builder, _ = builders.open_builder("image_folder", cfg.data_dir, cfg.manual_dir)
  seen = 0
  for split in info.split_sizes:
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    for ex in tfds.as_numpy(ds):
      img = np.asarray(Image.open(io.BytesIO(ex["image"])))
      assert Image.open(io.BytesIO(ex["image"])).format == "PNG"
      np.testing.assert_array_equal(img, want[ex["file_name"].decode()])
      seen += 1
  assert seen == 9
  # predict finds DICOM files in a folder like any image.
  files, missing = predict.list_inputs([str(root / "pneumonia")])
  assert len(files) == 4 and not missing and all(f.endswith(".dcm") for f in files)


def test_real_scanner_files_shipped_with_pydicom():
  """pydicom's wheel ships real files (pydicom/data/test_files): every lossless encoding of the
  same MR slice decodes to the same 8-bit image; CT, JPEG 2000 and colour files decode; truncated
  and multi-frame files are refused by name."""
  from pydicom.data import get_testdata_file  # pylint: disable=g-import-not-at-top

  def read(name):
    path = get_testdata_file(name)
    return dicom.decode(open(path, "rb").read(), path)

  mr = read("MR_small.dcm")
  assert mr.shape == (64, 64) and mr.dtype == np.uint8 and mr.max() == 255
  for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
               "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
    np.testing.assert_array_equal(read(name), mr, err_msg=name)
  ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  assert read("CT_small.dcm").shape == (ct.Rows, ct.Columns)
  assert read("JPEG2000.dcm").shape == (1024, 256)
  rgb = read("SC_rgb_rle.dcm")
  # 8-bit RGB is kept as it is.
  np.testing.assert_array_equal(rgb, pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")).pixel_array)
  with pytest.raises(DataError, match="corrupt DICOM pixel data .*MR_truncated.dcm"):
    read("MR_truncated.dcm")
  with pytest.raises(DataError, match=r"SC_rgb_rle_2frame.dcm is a multi-frame DICOM \(2 frames\)"):
    read("SC_rgb_rle_2frame.dcm")
