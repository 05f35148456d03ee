"""Wall time of a whole run of the entry point, e.g. the demo config, from an empty workdir.

  python benchmarks/end_to_end.py --config configs/demo.py
  python benchmarks/end_to_end.py --config configs/demo.py -- --config.optim.sparse_state=True

Runs `python -m shpeft_jax.main --config CONFIG --workdir FRESH_DIR [extra flags]` in a subprocess
(so nothing is cached from an earlier run: the demo's XLA compilation cache lives in the workdir),
and reports the wall time, the CPU seconds the run consumed (user + sys of the child, all threads)
and the per-method test results it wrote. A machine shared with other jobs stretches the wall time
but hardly the CPU seconds; both are printed. Last line: one JSON object.

The 1,000-step ViT-B/16 run of issue 7 needs a GPU and an init checkpoint; it is not run here.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from train_step import machine  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default=os.path.join(REPO, "configs", "demo.py"))
  ap.add_argument("--workdir", default=None, help="default: a fresh temporary directory, removed")
  ap.add_argument("extra", nargs="*", help="flags passed to shpeft_jax.main after --")
  args = ap.parse_args(argv)

  workdir = args.workdir or tempfile.mkdtemp(prefix="shpeft_e2e_")
  if os.path.exists(workdir) and os.listdir(workdir):
    raise SystemExit(f"--workdir {workdir} is not empty; the benchmark times a run from scratch.")
  cmd = [sys.executable, "-m", "shpeft_jax.main", f"--config={args.config}",
         f"--workdir={workdir}", *args.extra]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  results = None
  path = os.path.join(workdir, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  if args.workdir is None:
    shutil.rmtree(workdir, ignore_errors=True)
  tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
  print(tail, file=sys.stderr)
  print(f"\n{' '.join(cmd)}\n  exit {proc.returncode}; wall {wall:.1f} s; CPU {cpu:.1f} s "
        f"(user+sys, all threads); peak RSS {after.ru_maxrss / 1024:.0f} MB", file=sys.stderr)
  print(json.dumps({"benchmark": "end_to_end", "machine": machine(), "command": cmd,
                    "returncode": proc.returncode, "wall_s": wall, "cpu_s": cpu,
                    "peak_rss_mb": after.ru_maxrss / 1024, "results": results}))
  return proc.returncode


if __name__ == "__main__":
  sys.exit(main())
