"""Input pipeline throughput per CPU core: every transform, every kind of source.

Writes synthetic image folders (OCT-like 512 px grayscale JPEGs, X-ray-like 1024 px grayscale
PNGs, 224 px RGB PNGs as MedMNIST+ stores them), prepares each once with the tfds ImageFolder
builder, and times, after a warm-up:

  train    `make_train_iterator`: random resized crop + flip (what training and the score pass read)
  eval     `make_eval_iterator`: decode, shorter side to 224 (bicubic, antialiased), centre crop;
           pass 1 and pass 2 (a later evaluation of the same split: the decoded cache's case)
  predict  `predict._batches` over the image files (read + check + the eval transform)

in **images per CPU-second**: the process's CPU time (every tf.data thread included), not wall
time, so the figure is the per-core throughput even on a shared machine; the cores one GPU needs
at 3,500 images/s (ViT-B/16 at 35-40% of an H100/H200's bf16 peak) are 3,500 / that figure.
Prints one JSON line per measurement and a Markdown table.

  python benchmarks/input_pipeline.py [--sources jpeg512,png1024,png224] [--num_images 256]
      [--transforms train,eval,predict] [--workdir DIR (reuse the images and prepared data)]
      [--set data.prepare_max_side=448 ...]

Runs on the code on PYTHONPATH: `PYTHONPATH=/path/to/main python benchmarks/input_pipeline.py`
measures another checkout with the same script (BENCHMARKS.md's before / after table).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

GPU_IMAGES_PER_S = 3500
# name: (side, height, channels, format)
SOURCES = {
    "jpeg512": (512, 496, 1, "jpg"),     # OCT2017: 512 x 496 grayscale JPEG B-scans
    "png1024": (1024, 1024, 1, "png"),   # chest X-ray: 1024 px 8-bit grayscale PNG
    "png224": (224, 224, 3, "png"),      # MedMNIST+ 224 / small RGB sources
}


def _synthetic(rng, width: int, height: int, channels: int) -> np.ndarray:
  """Smooth structure plus noise: encoded sizes like real scans (tens of KB per 512 px JPEG)."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  yy, xx = yy / height, xx / width
  f = rng.uniform(2, 8, 3)
  img = np.stack([np.sin(f[c] * (xx + yy * (c + 1)) * np.pi) for c in range(channels)], -1)
  img = img * 90 + 128 + rng.normal(0, 12, img.shape)
  return img.clip(0, 255).astype(np.uint8)


def write_images(root: str, source: str, num_images: int, num_classes: int = 4) -> list[str]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  width, height, channels, ext = SOURCES[source]
  rng = np.random.default_rng(0)
  files = []
  for i in range(num_images):
    d = os.path.join(root, f"class_{i % num_classes}")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{i:05d}.{ext}")
    files.append(path)
    if os.path.exists(path):
      continue
    img = _synthetic(rng, width, height, channels)
    Image.fromarray(img[..., 0] if channels == 1 else img).save(
        path, **({"quality": 90} if ext == "jpg" else {}))
  return files


def _timed(fn):
  """(result, cpu seconds, wall seconds) of fn()."""
  cpu, wall = time.process_time(), time.perf_counter()
  out = fn()
  return out, time.process_time() - cpu, time.perf_counter() - wall


def _row(source, transform, images, cpu_s, wall_s, **extra):
  per_cpu_s = images / max(cpu_s, 1e-9)
  return {"benchmark": "input_pipeline", "source": source, "transform": transform,
          "images": images, "cpu_s": round(cpu_s, 3), "wall_s": round(wall_s, 3),
          "images_per_cpu_s": round(per_cpu_s, 1),
          "cores_for_gpu": round(GPU_IMAGES_PER_S / per_cpu_s, 1), **extra}


def bench_source(args, source: str, overrides: dict) -> list[dict]:
  from shpeft_jax.data import default_data_config  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  base = os.path.join(args.workdir, source)
  files = write_images(os.path.join(base, "images"), source, args.num_images)
  c = default_data_config()
  c.name, c.manual_dir = "image_folder", os.path.join(base, "images")
  for key, value in overrides.items():
    if key in c:  # a field the checkout under test does not have is left out (before numbers)
      c[key] = value
  c.data_dir = tempfile.mkdtemp(prefix="tfds_", dir=base)  # a fresh preparation every run
  c.cache = True  # records in memory: measure decoding and transforms, not the disk
  try:
    info, cpu, wall = _timed(lambda: ip.dataset_info(c))
    rows = [_row(source, "prepare (decode check, records)", args.num_images, cpu, wall)]
    rows += _transforms(args, c, info, source, files)
  finally:
    shutil.rmtree(c.data_dir, ignore_errors=True)
  return rows


def _transforms(args, c, info, source, files) -> list[dict]:
  from shpeft_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  rows = []
  size, bs = args.image_size, args.batch_size
  if "train" in args.transforms:
    it = ip.make_train_iterator(c, split="train", global_batch_size=bs, image_size=size, seed=0)
    for _ in range(args.warmup):
      next(it)
    _, cpu, wall = _timed(lambda: [next(it) for _ in range(args.steps)])
    rows.append(_row(source, "train (random resized crop + flip)", args.steps * bs, cpu, wall))
  if "eval" in args.transforms:
    n = info.split_sizes["train"]
    for p in (1, 2):
      batches, cpu, wall = _timed(lambda: list(ip.make_eval_iterator(
          c, split="train", global_batch_size=bs, image_size=size)))
      assert sum(int(b["valid"].sum()) for b in batches) == n
      rows.append(_row(source, f"eval (resize + centre crop), pass {p}", n, cpu, wall))
  if "predict" in args.transforms:
    from shpeft_jax import predict  # pylint: disable=g-import-not-at-top
    unreadable = []
    batches, cpu, wall = _timed(lambda: list(predict._batches(files, size, bs, unreadable)))
    assert not unreadable and sum(len(i) for i, _ in batches) == len(files)
    rows.append(_row(source, "predict (read + check + eval transform)", len(files), cpu, wall))
  return rows


def _parse_sets(sets) -> dict:
  out = {}
  for s in sets or ():
    key, _, value = s.partition("=")
    if not key.startswith("data."):
      raise SystemExit(f"--set {s}: only data.* fields")
    out[key[5:]] = json.loads(value)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sources", default=",".join(SOURCES))
  parser.add_argument("--transforms", default="train,eval,predict")
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=12, help="timed training batches")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--set", action="append", metavar="data.FIELD=JSON")
  args = parser.parse_args()
  args.transforms = args.transforms.split(",")
  args.workdir = args.workdir or tempfile.mkdtemp(prefix="shpeft_bench_")
  overrides = _parse_sets(args.set)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  rows = []
  for source in args.sources.split(","):
    for row in bench_source(args, source, overrides):
      row.update(cpu_cores=cores, overrides=overrides)
      print(json.dumps(row), flush=True)
      rows.append(row)
  print(f"\n{cores} cores; {args.num_images} images per source; images per CPU-second and the "
        f"cores one GPU needs at {GPU_IMAGES_PER_S:,} images/s:\n")
  print("| source | transform | images per CPU-s | cores per GPU | wall images/s |")
  print("|---|---|---:|---:|---:|")
  for r in rows:
    print(f"| {r['source']} | {r['transform']} | {r['images_per_cpu_s']:,.0f} | "
          f"{r['cores_for_gpu']:.1f} | {r['images'] / max(r['wall_s'], 1e-9):,.0f} |")


if __name__ == "__main__":
  main()
