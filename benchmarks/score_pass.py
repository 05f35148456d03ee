"""Throughput of the importance score pass: JAX scan accumulation vs a PyTorch eager loop.

Both sides compute the same thing on the same weights and the same batches: for each batch the
gradient of the mean cross-entropy, accumulated as sum_b g_b and sum_b g_b**2 over every encoder
parameter (the head excluded). JAX: `importance.score_dataset` (one jitted lax.scan per chunk).
PyTorch: `torch_reference.TorchClipClassifier` (OpenAI layout, weights exported from the Flax
params), a Python loop of backward() + in-place accumulation. The two results are compared as a
sanity check. Times exclude compilation (reported separately) and a warm-up batch for PyTorch.
Prints one JSON line, then a summary.

  python benchmarks/score_pass.py                         # ViT-B/16 at 224, batch 8, 4 batches
  python benchmarks/score_pass.py --image_size 64 --batch 4 --num_batches 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from shpeft_jax.models import clip_vit
from shpeft_jax.peft import importance


def make_batches(n, batch, size, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, num_classes, batch).astype(np.int32),
           "valid": np.ones(batch, bool)} for _ in range(n)]


def run_jax(model, params, batches, chunk):
  loss_fn = importance.cross_entropy_loss_fn(model.apply)
  t = time.perf_counter()  # First call: compile + run (the same chunk shape is reused below).
  importance.score_dataset(loss_fn, params, iter(batches[:chunk]), chunk_size=chunk,
                           progress=False)
  first = time.perf_counter() - t
  acc, info = importance.score_dataset(loss_fn, params, iter(batches), chunk_size=chunk,
                                       progress=False)
  jax.block_until_ready(acc)
  return acc, info["seconds"], first


def run_torch(model, params, batches, threads):
  import torch  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import convert, torch_reference  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  net = torch_reference.TorchClipClassifier.from_config(model.config, model.num_classes)
  sd = convert.flax_to_torch_state_dict(jax.device_get(params), "openai")
  net.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
  net.train()
  enc = [(n, p) for n, p in net.named_parameters() if not n.startswith("head.")]
  s1 = {n: torch.zeros_like(p) for n, p in enc}
  s2 = {n: torch.zeros_like(p) for n, p in enc}

  def step(b, accumulate=True):
    net.zero_grad(set_to_none=True)
    logits = net(torch.from_numpy(b["image"]).permute(0, 3, 1, 2))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(b["label"]).long())
    loss.backward()
    if accumulate:
      with torch.no_grad():
        for n, p in enc:
          s1[n].add_(p.grad)
          s2[n].addcmul_(p.grad, p.grad)

  step(batches[0], accumulate=False)  # Warm-up (allocator, threads).
  t = time.perf_counter()
  for b in batches:
    step(b)
  return s2, time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="ViT-B/16", help=f"one of {clip_vit.model_names()}")
  ap.add_argument("--image_size", type=int, default=None, help="default: the preset's")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--num_batches", type=int, default=4)
  ap.add_argument("--chunk", type=int, default=0, help="batches per jitted scan (0: all)")
  ap.add_argument("--num_classes", type=int, default=4)
  ap.add_argument("--skip_torch", action="store_true")
  ap.add_argument("--torch_threads", type=int, default=0, help="0: os.cpu_count()")
  args = ap.parse_args()

  model = clip_vit.build_model(args.model, args.num_classes, image_size=args.image_size)
  params = jax.device_get(clip_vit.init_params(model, jax.random.PRNGKey(0)))
  size = model.config.image_size
  batches = make_batches(args.num_batches, args.batch, size, args.num_classes)
  images = args.num_batches * args.batch
  chunk = args.chunk or args.num_batches

  acc, jax_s, jax_first = run_jax(model, params, batches, chunk)
  record = {"benchmark": "score_pass", "model": args.model, "image_size": size,
            "batch": args.batch, "num_batches": args.num_batches, "chunk": chunk,
            "encoder_params": int(sum(np.size(v) for v in jax.tree.leaves(params["encoder"]))),
            "jax_images_per_s": images / jax_s, "jax_seconds": jax_s,
            "jax_first_call_seconds_incl_compile": jax_first,
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "loadavg_1min": os.getloadavg()[0]}
  if not args.skip_torch:
    from shpeft_jax.models import convert  # pylint: disable=g-import-not-at-top
    threads = args.torch_threads or os.cpu_count()
    s2_torch, torch_s = run_torch(model, params, batches, threads)
    ours = convert.flax_to_torch_state_dict(
        dict(jax.device_get(acc["sum_sq"]), head=jax.tree.map(np.zeros_like, params["head"])),
        "openai")
    scale = max(float(v.max()) for v in s2_torch.values())
    err = max(float(np.max(np.abs(ours[n] - v.numpy()))) for n, v in s2_torch.items()) / scale
    record.update({"torch_images_per_s": images / torch_s, "torch_seconds": torch_s,
                   "jax_over_torch": (images / jax_s) / (images / torch_s),
                   "sum_sq_max_abs_err_rel_to_max": err, "torch_threads": threads})
  print(json.dumps(record))
  print(f"\nScore pass, {args.model} at {size}px, {args.num_batches} batches x {args.batch} "
        f"images, {record['backend']} ({os.cpu_count()} CPUs, load "
        f"{record['loadavg_1min']:.1f}):")
  print(f"  JAX scan:      {record['jax_images_per_s']:.2f} images/s "
        f"(first call incl. compile {jax_first:.1f} s)")
  if not args.skip_torch:
    print(f"  PyTorch eager: {record['torch_images_per_s']:.2f} images/s "
          f"({record['torch_threads']} threads)")
    print(f"  ratio JAX/PyTorch: {record['jax_over_torch']:.2f}x; sum g^2 agreement "
          f"(max abs err / max): {record['sum_sq_max_abs_err_rel_to_max']:.1e}")


if __name__ == "__main__":
  main()
