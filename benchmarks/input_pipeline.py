"""Input pipeline throughput: training images/s (and per CPU core) at 224x224 with augmentation.

Writes synthetic JPEGs in an image-folder layout, prepares them with the tfds ImageFolder builder,
and times `make_train_iterator` (random resized crop + flip + CLIP normalisation, batches as numpy)
after a warm-up. Prints one JSON line, then a human summary.

  python benchmarks/input_pipeline.py [--num_images 512] [--source_size 512] [--steps 40]

One ViT-B/16 training step on an H100 eats about 2,500 images/s; divide by the per-core number for
the CPU cores one GPU needs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def _write_jpegs(root: str, num_images: int, size: int, num_classes: int = 4):
  from PIL import Image
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  for i in range(num_images):
    cls = f"class_{i % num_classes}"
    os.makedirs(os.path.join(root, cls), exist_ok=True)
    # Smooth structure plus noise: JPEG sizes like real scans (tens of KB), not pure noise.
    f = rng.uniform(2, 8, 3)
    img = np.stack([np.sin(f[c] * (xx + yy * (c + 1)) * np.pi) for c in range(3)], -1)
    img = (img * 90 + 128 + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(root, cls, f"{i:05d}.jpg"), quality=90)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--source_size", type=int, default=512)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args()

  from shpeft_jax.data import default_data_config
  from shpeft_jax.data import input_pipeline as ip

  workdir = args.workdir or tempfile.mkdtemp(prefix="shpeft_bench_")
  root = os.path.join(workdir, "images")
  if not os.path.isdir(root):
    _write_jpegs(root, args.num_images, args.source_size)
  c = default_data_config()
  c.name = "image_folder"
  c.manual_dir = root
  c.data_dir = os.path.join(workdir, "tfds")
  c.augment = True
  c.cache = True  # measure decode + augmentation, not the local disk
  info = ip.dataset_info(c)

  it = ip.make_train_iterator(c, split="train", global_batch_size=args.batch_size,
                              image_size=args.image_size, seed=0)
  for _ in range(args.warmup):
    batch = next(it)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(args.steps):
    batch = next(it)
  elapsed = time.perf_counter() - start
  # CPU seconds of all this process's threads: images per CPU-second is the per-core throughput
  # even on a machine shared with other jobs (wall-clock / cores undercounts there).
  cpu_seconds = time.process_time() - cpu_start
  assert batch["image"].shape == (args.batch_size, args.image_size, args.image_size, 3)

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  images_per_s = args.steps * args.batch_size / elapsed
  result = {
      "benchmark": "input_pipeline_train",
      "images_per_s": round(images_per_s, 1),
      "images_per_s_per_core": round(args.steps * args.batch_size / cpu_seconds, 1),
      "wall_images_per_s_per_core": round(images_per_s / cores, 1),
      "cpu_cores": cores,
      "image_size": args.image_size,
      "source_jpeg_size": args.source_size,
      "batch_size": args.batch_size,
      "steps": args.steps,
      "train_examples": info.split_sizes["train"],
      "augmentation": "random_resized_crop(0.08-1)+hflip",
  }
  print(json.dumps(result))
  needed = 2500 / max(result["images_per_s_per_core"], 1e-9)
  print(f"{images_per_s:.0f} images/s wall-clock on {cores} cores; "
        f"{result['images_per_s_per_core']:.0f} images per CPU-second (per core) "
        f"({args.source_size}px JPEG -> {args.image_size}px, random resized crop + flip). Feeding "
        f"one H100 at ~2,500 images/s (ViT-B/16 training) needs about {needed:.1f} such cores.")


if __name__ == "__main__":
  main()
