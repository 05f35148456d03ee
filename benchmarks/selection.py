"""Exact global top-k threshold over ViT-B/16-sized score trees (~86M float32 scores).

Compares `selection.select_top_k` (sample select + one candidate pass + partition + one mask pass)
with numpy's `np.argpartition` (introselect) and a full `np.sort` of the concatenated scores, and
checks that all agree on the threshold and the selected count. Prints one JSON line, then a summary.

  python benchmarks/selection.py                    # ViT-B/16 encoder shapes, k = 1%, 0.01%, 5%
  python benchmarks/selection.py --n 10000000 --dist uniform --skip_sort
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from shpeft_jax.peft import selection


def vit_b16_shapes() -> dict[str, tuple]:
  from shpeft_jax.models import clip_vit  # pylint: disable=g-import-not-at-top
  from shpeft_jax.utils import flatten_names  # pylint: disable=g-import-not-at-top
  model = clip_vit.build_model("ViT-B/16", 2)
  shapes = jax.eval_shape(lambda: clip_vit.init_params(model, jax.random.PRNGKey(0)))
  return {n: tuple(s.shape) for n, s in flatten_names(shapes["encoder"]).items()}


def make_scores(shapes, dist, seed):
  rng = np.random.default_rng(seed)
  tree = {}
  for name, shape in shapes.items():
    if dist == "uniform":
      tree[name] = rng.random(shape, dtype=np.float32)
    else:  # Squared-gradient-like: heavy tailed, per-tensor scale, a few exact zeros.
      x = rng.standard_normal(shape, dtype=np.float32)
      x *= np.float32(10.0 ** rng.uniform(-3, 0))
      x = x * x
      x.reshape(-1)[:: 997] = 0.0
      tree[name] = x
  return tree


def timed(fn, repeats):
  times, out = [], None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), min(times), out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=0, help="flat score count instead of ViT-B/16 shapes")
  ap.add_argument("--dist", choices=["sqgrad", "uniform"], default="sqgrad")
  ap.add_argument("--k_percent", type=float, nargs="+", default=[1.0, 0.01, 5.0])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip_sort", action="store_true", help="skip the slow full np.sort")
  args = ap.parse_args()

  shapes = {"scores": (args.n,)} if args.n else vit_b16_shapes()
  tree = make_scores(shapes, args.dist, 0)
  n = sum(int(np.prod(s)) for s in shapes.values())
  flat = np.concatenate([v.reshape(-1) for v in tree.values()])

  results = {}
  for kp in args.k_percent:
    med, best, (mask, info) = timed(lambda: selection.select_top_k(tree, k_percent=kp),
                                    args.repeats)
    count = int(sum(int(m.sum()) for m in mask.values()))
    k = info.k
    pmed, _, part = timed(lambda: np.partition(flat, n - k)[n - k], 1)
    amed, _, _ = timed(lambda: np.argpartition(flat, n - k)[n - k:], 1)
    ok = count == k and float(part) == info.threshold
    results[f"{kp:g}%"] = {"k": k, "select_top_k_s": round(med, 4), "select_top_k_best_s":
                           round(best, 4), "np_partition_s": round(pmed, 4),
                           "np_argpartition_s": round(amed, 4), "exact": ok,
                           "threshold": info.threshold, "num_tied": info.num_tied}
  sort_s = None
  if not args.skip_sort:
    sort_s, _, sorted_flat = timed(lambda: np.sort(flat), 1)
    for kp, r in results.items():
      r["exact"] = r["exact"] and float(sorted_flat[n - r["k"]]) == r["threshold"]
  record = {"benchmark": "selection", "n": n, "dist": args.dist, "tensors": len(shapes),
            "results": results, "np_sort_s": None if sort_s is None else round(sort_s, 3),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "numpy": np.__version__, "loadavg_1min": os.getloadavg()[0]}
  print(json.dumps(record))
  print(f"\nExact top-k over N={n:,} scores in {len(shapes)} tensors ({args.dist}), "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}:")
  for kp, r in results.items():
    print(f"  k={kp:>6} ({r['k']:>9,}): select_top_k {r['select_top_k_s']:.3f} s (best "
          f"{r['select_top_k_best_s']:.3f}) | np.partition {r['np_partition_s']:.3f} s | "
          f"np.argpartition {r['np_argpartition_s']:.3f} s | exact={r['exact']}")
  if sort_s is not None:
    print(f"  full np.sort: {sort_s:.3f} s")


if __name__ == "__main__":
  main()
