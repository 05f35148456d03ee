"""What content-keyed prepared data costs on an OCT2017-sized tree (issue 21 item 2).

  PYTHONPATH=$PWD python benchmarks/content_hash.py --root /tmp/oct_synth [--size 64]

Writes (once; reused when present) a synthetic tree in OCT2017's published layout with its
published counts: train 108,309 (CNV 37,205 / DME 11,348 / DRUSEN 8,616 / NORMAL 51,140) and test
1,000 (250 per class), each file a distinct small JPEG of random pixels (`--size` px square). Then
times, each on the same parsed file list:

* `parse`: `splits.oct_splits` (listing the tree; every source id starts with it);
* `size_key`: the old key, one `os.path.getsize` per file;
* `hash_warm`: blake2b of every file's bytes, files in the page cache, no cache file;
* `hash_cold`: the same after `posix_fadvise(DONTNEED)` on every file (dropped from the page
  cache where the kernel allows; a VM's host may still cache);
* `cached_first` / `cached_again`: `content_hash.digests` with its stat-signature cache, the first
  run (hash everything, write the cache) and a rerun (stat + cache lookup only);
* `source_id_again`: `builders.source_id` end to end with the cache warm (what a run start pays);
* `decode_sample`: `splits.read_image` (the full decode check of preparation) on 2,000 files,
  extrapolated per file, to compare with what preparing the records costs anyway;
* `blake2b_memory`: blake2b-128 of 256 MiB already in memory (the per-byte cost, without the
  per-file open / read / close that dominates small files).

Prints a summary on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np

OCT_TRAIN = {"CNV": 37205, "DME": 11348, "DRUSEN": 8616, "NORMAL": 51140}
OCT_TEST = {"CNV": 250, "DME": 250, "DRUSEN": 250, "NORMAL": 250}


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def make_tree(root: str, size: int, scale: float) -> int:
  """The synthetic OCT2017 tree under root/OCT2017 (skipped when complete); returns its file count."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  total = 0
  for split, counts in (("train", OCT_TRAIN), ("test", OCT_TEST)):
    for cls, n in counts.items():
      n = max(1, int(round(n * scale)))
      folder = os.path.join(root, "OCT2017", split, cls)
      os.makedirs(folder, exist_ok=True)
      have = len(os.listdir(folder))
      for i in range(have, n):
        pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        with open(os.path.join(folder, f"{cls}-{i:06d}-1.jpeg"), "wb") as f:
          f.write(buf.getvalue())
      total += n
  return total


def _timed(fn):
  t0, c0 = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - t0, time.process_time() - c0


def _drop_page_cache(paths) -> None:
  for p in paths:
    fd = os.open(p, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, help="folder of the synthetic tree (made once)")
  parser.add_argument("--size", type=int, default=64, help="JPEG side in pixels")
  parser.add_argument("--scale", type=float, default=1.0, help="fraction of the published counts")
  args = parser.parse_args(argv)
  from shpeft_jax.data import builders, content_hash, splits  # pylint: disable=g-import-not-at-top
  import shpeft_jax.utils  # pylint: disable=g-import-not-at-top,unused-import
  # (imported here: the cache's writer imports it, and a run has it loaded already)

  (n_files, t_make, _) = _timed(lambda: make_tree(args.root, args.size, args.scale))
  _log(f"tree: {n_files} files under {args.root} ({t_make:.1f} s to make or check)")
  parsed, t_parse, c_parse = _timed(lambda: splits.oct_splits(args.root))
  paths = sorted(p for exs in parsed.values() for p, _ in exs)
  total_bytes = sum(os.path.getsize(p) for p in paths)
  res = {"files": len(paths), "bytes": total_bytes, "jpeg_side": args.size}
  res["parse"] = (t_parse, c_parse)
  res["size_key"] = _timed(lambda: [os.path.getsize(p) for p in paths])[1:]
  res["hash_warm"] = _timed(lambda: content_hash.digests(paths, None))[1:]
  _drop_page_cache(paths)
  res["hash_cold"] = _timed(lambda: content_hash.digests(paths, None))[1:]
  cache = os.path.join(args.root, "bench_" + content_hash.CACHE_FILE)
  if os.path.exists(cache):
    os.remove(cache)
  res["cached_first"] = _timed(lambda: content_hash.digests(paths, cache))[1:]
  res["cached_again"] = _timed(lambda: content_hash.digests(paths, cache))[1:]
  res["cache_file_bytes"] = os.path.getsize(cache)
  parsed_source = builders.parsed_from_splits("oct", args.root, parsed)
  res["source_id_again"] = _timed(lambda: builders.source_id(parsed_source, cache))[1:]
  sample = paths[:: max(1, len(paths) // 2000)][:2000]
  res["decode_sample"] = _timed(lambda: [splits.read_image(p) for p in sample])[1:]
  res["decode_sample_files"] = len(sample)
  import hashlib  # pylint: disable=g-import-not-at-top
  block = np.random.default_rng(1).integers(0, 256, 256 * 2**20, dtype=np.uint8).tobytes()
  res["blake2b_memory"] = _timed(lambda: hashlib.blake2b(block, digest_size=16).hexdigest())[1:]

  mb = total_bytes / 2**20
  _log(f"{len(paths)} files, {mb:.0f} MiB ({total_bytes / len(paths) / 1024:.1f} KiB each)")
  for key in ("parse", "size_key", "hash_warm", "hash_cold", "cached_first", "cached_again",
              "source_id_again"):
    wall, cpu = res[key]
    _log(f"  {key:16s} {wall:7.2f} s wall  {cpu:7.2f} CPU-s")
  wall, cpu = res["decode_sample"]
  _log(f"  decode check     {wall / len(sample) * 1e3:.3f} ms/file wall, "
       f"{cpu / len(sample) * 1e3:.3f} CPU-ms/file -> {cpu / len(sample) * len(paths):.0f} CPU-s "
       "for the tree (what preparing pays anyway)")
  _log(f"  hash throughput  {mb / res['hash_warm'][0]:.0f} MiB/s warm, "
       f"{mb / res['hash_cold'][0]:.0f} MiB/s after DONTNEED (wall); blake2b in memory "
       f"{256 / res['blake2b_memory'][1]:.0f} MiB per CPU-s")
  print(json.dumps(res))


if __name__ == "__main__":
  main()
