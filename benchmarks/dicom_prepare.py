"""DICOM preparation throughput: 512x512 16-bit files -> 8-bit PNG records, images per CPU-second.

Writes synthetic chest-X-ray-like 512x512 12-bit-in-16 DICOM files (with a window, MONOCHROME2) in
three transfer syntaxes (uncompressed, RLE Lossless, JPEG 2000 Lossless), then times the reader
every dataset builder and predict use (`splits.read_image`: pydicom decode, Modality LUT, window,
PNG encode) on one core; for reference the same image as a 16-bit PNG. Prints one JSON line,
then a human summary.

  python benchmarks/dicom_prepare.py [--num_images 48] [--size 512]

Preparation decodes each file once; training reads the PNG records, so this is a one-time cost
per dataset (e.g. 100k files / (images per s) seconds on one core).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests", "data"))


def _image(rng, size: int) -> np.ndarray:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  body = 2500 * np.exp(-((xx - 0.5) ** 2 / 0.08 + (yy - 0.55) ** 2 / 0.12))
  return np.clip(body + rng.normal(0, 120, (size, size)) + 600, 0, 4095).astype(np.uint16)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=48)
  parser.add_argument("--size", type=int, default=512)
  args = parser.parse_args(argv)
  import data_fixtures as fx  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from pydicom import uid  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import splits  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = [_image(rng, args.size) for _ in range(args.num_images)]
  out = {"num_images": args.num_images, "size": args.size, "cpu_count": os.cpu_count()}
  with tempfile.TemporaryDirectory() as tmp:
    kinds = {"uncompressed": None, "rle": uid.RLELossless, "jpeg2000": uid.JPEG2000Lossless}
    for kind, syntax in kinds.items():
      paths = [fx.make_dicom(os.path.join(tmp, kind, f"{i}.dcm"), im, bits_stored=16,
                             WindowCenter=1800.0, WindowWidth=3000.0, syntax=syntax)
               for i, im in enumerate(images)]
      out[kind] = _time(splits.read_image, paths)
    pngs = []
    for i, im in enumerate(images):
      pngs.append(os.path.join(tmp, "png16", f"{i}.png"))
      os.makedirs(os.path.dirname(pngs[-1]), exist_ok=True)
      Image.fromarray(im).save(pngs[-1])
    out["png16"] = _time(splits.read_image, pngs)
  print(json.dumps(out))
  for kind in ("uncompressed", "rle", "jpeg2000", "png16"):
    r = out[kind]
    print(f"{kind:>12}: {r['images_per_cpu_s']:.1f} images per CPU-second "
          f"({r['images_per_s']:.1f} images/s wall)")
  return out


def _time(read, paths) -> dict:
  read(paths[0])  # warm-up (imports, codec init)
  t0, c0 = time.perf_counter(), time.process_time()
  for p in paths:
    read(p)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return {"images_per_s": len(paths) / wall, "images_per_cpu_s": len(paths) / cpu}


if __name__ == "__main__":
  main()
