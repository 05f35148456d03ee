"""Preparing an OCT2017-sized folder: wall, CPU time and peak memory of `shpeft_jax.data.prepare`.

  PYTHONPATH=$PWD python benchmarks/prepare_large.py --root /tmp/oct_synth [--scale 1.0]
      [--size 64] [--cores 0,1]

Writes (once; reused when present) `benchmarks/content_hash.py`'s synthetic tree in OCT2017's
published layout and counts (108,309 train + 1,000 test files at --scale 1; `--size` px JPEGs of
random pixels), then runs the prepare CLI on it in a child process, once per `--cores` entry
(`taskset`: the reader uses one thread per core it may run on), each into a fresh data_dir, and
reports wall seconds, CPU seconds (user + system of the child) and the child's peak RSS. Prints
one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def run_prepare(manual_dir: str, cores: str) -> dict:
  data_dir = tempfile.mkdtemp(prefix="shpeft_prepare_")
  cmd = [sys.executable, "-m", "shpeft_jax.data.prepare", "--name", "oct", "--data_dir", data_dir,
         "--manual_dir", manual_dir]
  if cores:
    cmd = ["taskset", "-c", cores] + cmd
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  shutil.rmtree(data_dir, ignore_errors=True)
  if proc.returncode:
    raise SystemExit(f"prepare failed ({proc.returncode}): {proc.stderr[-2000:]}")
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  n = sum(info["split_sizes"].values())
  return {"benchmark": "prepare_large", "cores": cores or "all", "files": n,
          "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
          "files_per_cpu_s": round(n / max(cpu, 1e-9), 1), "files_per_s": round(n / wall, 1),
          # ru_maxrss of children: the largest child so far (KiB on Linux): run the smaller
          # configuration first.
          "peak_rss_mb_so_far": round(after.ru_maxrss / 1024, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--scale", type=float, default=1.0)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--cores", default="0;0,1", help="taskset core lists separated by ';', "
                      "one run each (e.g. '0;0,1'); '' = every core")
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import content_hash  # pylint: disable=g-import-not-at-top
  n = content_hash.make_tree(args.root, args.size, args.scale)
  print(f"tree: {n} files under {args.root}", file=sys.stderr)
  for cores in args.cores.split(";"):
    print(json.dumps({**run_prepare(os.path.join(args.root, "OCT2017"), cores),
                      "size_px": args.size, "scale": args.scale}), flush=True)


if __name__ == "__main__":
  main()
