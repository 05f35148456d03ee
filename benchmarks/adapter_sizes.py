"""Sizes of task adapters on ViT-B/16: one base and six k = 1% adapters (docs/ADAPTERS.md).

  python benchmarks/adapter_sizes.py [--out DIR]

Random weights in ViT-B/16 shapes (sizes do not depend on the values, only on how many elements
changed and where). Six masks at k = 1% of the encoder: three uniform (the random control; seeds
0-2) and three global top-1% selections of skewed scores (seeds 3-5: per-tensor scales drawn
log-uniformly over two decades, so some tensors get 10x the average density and others almost
nothing, as SH-PEFT's importance scores do). Each adapter's fine-tuned weights are the base plus
N(0, 1e-3) at the selected positions and a new 4-class head. Reports the bytes on disk of: the
base as a params checkpoint (orbax) and as an OpenAI-layout safetensors file, each adapter, and
the peft SHiRA export of the first skewed adapter.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from shpeft_jax import adapter, checkpoints, export
from shpeft_jax.models.clip_vit import build_model, init_params
from shpeft_jax.utils import flatten_names, unflatten_names

K = 0.01


def _du(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _mask(shapes, seed: int, skewed: bool) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  if not skewed:
    return {n: rng.random(s.shape) < K for n, s in shapes.items()}
  scores = {n: rng.random(s.shape, np.float32) * np.float32(10 ** rng.uniform(-2, 0))
            for n, s in shapes.items()}
  flat = np.concatenate([v.reshape(-1) for v in scores.values()])
  kth = np.partition(flat, flat.size - round(K * flat.size))[flat.size - round(K * flat.size)]
  return {n: v >= kth for n, v in scores.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=None, help="where to write (default: a temporary folder)")
  args = parser.parse_args()
  root = args.out or tempfile.mkdtemp(prefix="adapter_sizes.")
  os.makedirs(root, exist_ok=True)
  shapes = flatten_names(jax.eval_shape(
      lambda: init_params(build_model("ViT-B/16", 4), jax.random.PRNGKey(0))))
  enc = {n: s for n, s in shapes.items() if n.startswith("encoder/")}
  rng = np.random.default_rng(100)
  base = unflatten_names({n: 0.02 * rng.standard_normal(s.shape, np.float32) for n, s in enc.items()})
  meta = {"model": "ViT-B/16", "image_size": 224, "num_classes": None}
  base_dir = checkpoints.save_params(os.path.join(root, "base"), base, meta, overwrite=True)
  base_st = os.path.join(root, "base_openai.safetensors")
  export.write_state_dict(base_st, export.flax_to_torch_state_dict(base, "openai"), overwrite=True)
  n_enc = sum(int(np.prod(s.shape)) for s in enc.values())
  print(f"ViT-B/16 encoder: {n_enc} parameters; k = {K:g} -> {round(K * n_enc)} changed weights")
  print(f"base params checkpoint (orbax): {_du(base_dir) / 2**20:.1f} MiB; "
        f"OpenAI-layout safetensors: {_du(base_st) / 2**20:.1f} MiB")
  print("| adapter | mask | changed | MiB | % of base safetensors | write s | load s |")
  print("|---|---|---|---|---|---|---|")
  flat_base = flatten_names(base)
  total = 0
  first_skewed = None
  for seed in range(6):
    skewed = seed >= 3
    mask = _mask(enc, seed, skewed)
    r = np.random.default_rng(1000 + seed)
    tuned = {}
    for n, b in flat_base.items():
      y = b.copy()
      y[mask[n]] += 1e-3 * r.standard_normal(int(mask[n].sum()), np.float32)
      tuned[n] = y
    tuned["head/kernel"] = r.standard_normal((768, 4), np.float32) * 0.03
    tuned["head/bias"] = np.zeros(4, np.float32)
    tuned = unflatten_names(tuned)
    out = os.path.join(root, f"adapter_{seed}")
    t0 = time.time()
    stats = adapter.write_adapter(out, tuned, base, base_name=base_dir, method="shpeft",
                                  meta=dict(meta, num_classes=4), overwrite=True)
    t1 = time.time()
    adapter.load_with_base(out, base_dir)
    t2 = time.time()
    total += stats["bytes"]
    print(f"| {seed} | {'skewed top-1%' if skewed else 'uniform 1%'} | {stats['changed']} | "
          f"{stats['bytes'] / 2**20:.2f} | {100 * stats['bytes'] / _du(base_st):.2f} | "
          f"{t1 - t0:.1f} | {t2 - t1:.1f} |")
    if skewed and first_skewed is None:
      first_skewed = (tuned, out)
  print(f"one base + six adapters: {(_du(base_st) + total) / 2**20:.1f} MiB "
        f"(six full copies: {6 * _du(base_st) / 2**20:.1f} MiB)")
  tuned, out = first_skewed
  peft_dir = os.path.join(root, "peft")
  shutil.rmtree(peft_dir, ignore_errors=True)
  print(adapter.export_peft(out, base_dir, peft_dir))
  if not args.out:
    shutil.rmtree(root)


if __name__ == "__main__":
  main()
