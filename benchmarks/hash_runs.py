"""sha256 (first 16 hex) of every run's results.json and exported params under ROOT.

The params hash covers the name-sorted names and raw bytes of every exported tensor.

  PYTHONPATH=$PWD python benchmarks/hash_runs.py /tmp/ref_demo

Used to check that a refactoring changes no number: run it on the workdirs of the same commands
before and after (benchmarks/refactor_reference.md).
"""
import hashlib
import os
import sys

import numpy as np

from shpeft_jax import checkpoints, utils


def main(root: str):
  for dirpath, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    if "results.json" in files:
      rel = os.path.relpath(dirpath, root)
      h = hashlib.sha256(open(os.path.join(dirpath, "results.json"), "rb").read()).hexdigest()[:16]
      line = f"{rel:30s} results.json {h}"
      exp = os.path.join(dirpath, "export", "model")
      if os.path.isdir(exp):
        params, _ = checkpoints.load_params(exp)
        flat = utils.flatten_names(params)
        hp = hashlib.sha256()
        for n in sorted(flat):
          hp.update(n.encode()); hp.update(np.ascontiguousarray(np.asarray(flat[n])).tobytes())
        line += f"  params {hp.hexdigest()[:16]}"
      print(line)


if __name__ == "__main__":
  main(sys.argv[1])
