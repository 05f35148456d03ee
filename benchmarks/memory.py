"""Optimizer-state bytes and delta-checkpoint task-adapter size for ViT-B/16 at k% (no training; CPU is enough).

Optimizer state is measured with `jax.eval_shape` (exact bytes of every state leaf, nothing
allocated) for: full fine-tuning (SGD momentum on every weight), the trainer's default masked SH-PEFT
(`masking.masked_update`: full momentum + the element masks) and the sparse state
(`sparse_optim.sparse_masked_optimizer`, `config.optim.sparse_state=True`).

The task adapter (`shpeft_jax.adapter`, the one sparse-delta format) is written for a model in
which k% of the
encoder weights (random positions) and the whole head differ from a random base, and compared with
a full params checkpoint of the same model written by `shpeft_jax.checkpoints.save_params` (orbax),
and with the raw float32 bytes of the params. Restore is timed and checked bit for bit.

`--step_batch B` also compiles (never runs: abstract shapes, nothing allocated) one donated train
step per optimizer at batch B and reads XLA's buffer assignment (`compiled.memory_analysis()`): the
arguments (params + optimizer state + batch), the scratch (`temp`: gradients, activations, update
trees) and the step's peak = arguments + outputs - donated aliases + scratch. Steps: full, masked
(`masked_update`), sparse state applied through `update` + add (a dense update tree) and sparse
state applied in place (`apply_gradients`, what the trainer uses).

  python benchmarks/memory.py --model ViT-B/16 --k_percent 1
  python benchmarks/memory.py --model ViT-B/16 --k_percent 1 --step_batch 8 --no_full_checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
import optax

from shpeft_jax import adapter, checkpoints, optim
from shpeft_jax.models.clip_vit import build_model, init_params
from shpeft_jax.peft import masking, sparse_optim
from shpeft_jax.utils import flatten_names, unflatten_names


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


STEP_MODES = ("full", "masked", "sparse_update", "sparse_in_place")


def step_memory(model, shapes, mask, batch: int, modes=STEP_MODES) -> dict:
  """{mode: XLA memory analysis (bytes) of the donated step}, compiled from abstract shapes."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  chain = optim.build(dict(lr=1e-3, momentum=0.9), 1000).tx
  size = model.config.image_size

  def loss_of(p, b):
    logits = model.apply({"params": p}, b["image"], train=True).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()

  out = {}
  for mode in modes:
    tx = {"full": chain, "masked": masking.masked_update(chain, mask)}.get(mode) or (
        sparse_optim.sparse_masked_optimizer(chain, mask))

    def step(state, b, mode=mode, tx=tx):
      loss, g = jax.value_and_grad(loss_of)(state["params"], b)
      if mode == "sparse_in_place":  # What the trainer's step does with the sparse state.
        p, opt, _ = tx.apply_gradients(g, state["opt"], state["params"])
      else:
        u, opt = tx.update(g, state["opt"], state["params"])
        p = masking.apply_updates(state["params"], u)
      return {"params": p, "opt": opt}, loss

    state = {"params": shapes, "opt": jax.eval_shape(tx.init, shapes)}
    b = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
         "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    t0 = time.perf_counter()
    m = jax.jit(step, donate_argnums=(0,)).lower(state, b).compile().memory_analysis()
    r = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                         "alias_size_in_bytes", "temp_size_in_bytes")}
    r["peak_bytes"] = (r["argument_size_in_bytes"] + r["output_size_in_bytes"]
                       - r["alias_size_in_bytes"] + r["temp_size_in_bytes"])
    r["compile_s"] = time.perf_counter() - t0
    out[mode] = r
    print(f"  step {mode:16s} args {r['argument_size_in_bytes'] / 2**20:8.1f} MB  temp "
          f"{r['temp_size_in_bytes'] / 2**20:8.1f} MB  peak {r['peak_bytes'] / 2**20:8.1f} MB  "
          f"(compile {r['compile_s']:.0f} s)", file=sys.stderr, flush=True)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="ViT-B/16")
  ap.add_argument("--num_classes", type=int, default=4)
  ap.add_argument("--k_percent", type=float, default=1.0)
  ap.add_argument("--no_full_checkpoint", action="store_true",
                  help="skip writing the full orbax checkpoint (compare with raw bytes only)")
  ap.add_argument("--tmp", default=None, help="scratch directory (default: a new temp dir)")
  ap.add_argument("--step_batch", type=int, default=0,
                  help="also report the compiled train step's memory at this batch (0: skip)")
  ap.add_argument("--step_modes", default=",".join(STEP_MODES))
  args = ap.parse_args(argv)

  model = build_model(args.model, args.num_classes)
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  names = flatten_names(shapes)
  n_total = sum(x.size for x in names.values())
  n_encoder = sum(x.size for n, x in names.items() if n.startswith("encoder/"))
  rng = np.random.default_rng(0)
  frac = args.k_percent / 100.0
  mask = unflatten_names({n: None if n.startswith("head/") else rng.random(x.shape, np.float32) < frac
                          for n, x in names.items()})
  k = sparse_optim.num_selected(mask)

  sgd = optax.sgd(1e-3, momentum=0.9)
  adam = optax.adam(1e-3)
  opt = {
      "full_sgd_momentum": sparse_optim.tree_bytes(jax.eval_shape(sgd.init, shapes)),
      "masked_sgd_momentum": sparse_optim.tree_bytes(
          jax.eval_shape(masking.masked_update(sgd, mask).init, shapes)),
      "sparse_sgd_momentum": sparse_optim.tree_bytes(
          jax.eval_shape(sparse_optim.sparse_masked_optimizer(sgd, mask).init, shapes)),
      "full_adam": sparse_optim.tree_bytes(jax.eval_shape(adam.init, shapes)),
      "sparse_adam": sparse_optim.tree_bytes(
          jax.eval_shape(sparse_optim.sparse_masked_optimizer(adam, mask).init, shapes)),
  }
  opt_ratio = opt["full_sgd_momentum"] / opt["sparse_sgd_momentum"]
  steps = None
  if args.step_batch:
    steps = step_memory(model, shapes, mask, args.step_batch, args.step_modes.split(","))

  # Delta checkpoint of a model that differs from its base in k% of the encoder + the head.
  base, tuned = {}, {}
  for n, x in names.items():
    base[n] = rng.standard_normal(x.shape, np.float32)
    y = base[n].copy()
    if n.startswith("head/"):
      y += 1.0
    else:
      idx = rng.choice(y.size, size=round(frac * y.size), replace=False)
      y.reshape(-1)[idx] += 0.01
    tuned[n] = y
  base_t, tuned_t = unflatten_names(base), unflatten_names(tuned)
  tmp = args.tmp or tempfile.mkdtemp(prefix="shpeft_memory_")
  os.makedirs(tmp, exist_ok=True)
  try:
    meta = {"model": args.model, "image_size": int(model.config.image_size),
            "num_classes": args.num_classes}
    checkpoints.save_params(os.path.join(tmp, "base"), {"encoder": base_t["encoder"]},
                            {**meta, "num_classes": None}, overwrite=True)
    t0 = time.perf_counter()
    stats = adapter.write_adapter(os.path.join(tmp, "adapter"), tuned_t, base_t,
                                  base_name=os.path.join(tmp, "base"), method="shpeft", meta=meta,
                                  overwrite=True)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored, _ = adapter.load_with_base(os.path.join(tmp, "adapter"), os.path.join(tmp, "base"))
    load_s = time.perf_counter() - t0
    flat = flatten_names(restored)
    exact = all(np.array_equal(flat[n].view(np.uint32), tuned[n].view(np.uint32)) for n in tuned)
    full_ckpt = None
    if not args.no_full_checkpoint:
      checkpoints.save_params(os.path.join(tmp, "full"), tuned_t, {"model": args.model},
                              overwrite=True)
      full_ckpt = dir_bytes(os.path.join(tmp, "full"))
  finally:
    if args.tmp is None:
      shutil.rmtree(tmp, ignore_errors=True)
  raw = 4 * n_total
  out = {
      "benchmark": "memory", "model": args.model, "k_percent": args.k_percent,
      "num_params": n_total, "num_encoder": n_encoder, "selected": k,
      "opt_state_bytes": opt, "full_over_sparse_sgd_state": opt_ratio,
      "step_batch": args.step_batch or None, "step_memory": steps,
      "delta": {"bytes": stats["bytes"], "changed": stats["changed"], "save_s": save_s,
                "load_s": load_s, "bit_exact": bool(exact), "raw_params_bytes": raw,
                "full_checkpoint_bytes": full_ckpt,
                "ratio_vs_raw": stats["bytes"] / raw,
                "ratio_vs_full_checkpoint": (stats["bytes"] / full_ckpt) if full_ckpt else None},
  }
  mb = lambda b: b / 2**20
  print(f"{args.model}: N={n_total:,} (encoder {n_encoder:,}), k={args.k_percent}% -> K={k:,} "
        "selected", file=sys.stderr)
  for name, b in opt.items():
    print(f"  optimizer state {name:22s} {mb(b):9.2f} MB", file=sys.stderr)
  print(f"  full / sparse SGD-momentum state: {opt_ratio:.1f}x", file=sys.stderr)
  print(f"  task adapter {mb(stats['bytes']):.2f} MB vs raw params {mb(raw):.1f} MB "
        f"({100 * stats['bytes'] / raw:.2f}%)" + (
            f", vs full orbax checkpoint {mb(full_ckpt):.1f} MB "
            f"({100 * stats['bytes'] / full_ckpt:.2f}%)" if full_ckpt else "") +
        f"; save {save_s:.1f}s, restore {load_s:.1f}s, bit-exact={exact}", file=sys.stderr)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
