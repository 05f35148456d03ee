"""Per-device memory of one SH-PEFT train step, for a device count and an FSDP degree.

Plans a run before renting devices: XLA compiles the trainer's update (forward, backward, masked
SGD with momentum, params/optimizer state sharded exactly as `shpeft_jax.train` shards them) for
`--devices` CPU stand-in devices and reports what one device holds. Nothing is executed and no
weights are needed (shapes only).

  python launch/memory_plan.py --model ViT-B/16 --batch 64 --devices 1,8 --fsdp 1,8

Columns (MiB per device): state = params + optimizer state (momentum, mask); temp = XLA's scratch
for activations, gradients and collectives at that per-device batch; total = both. Numbers are for
the CPU compiler; GPU/TPU compilers fuse differently, so treat them as a guide (within tens of
percent), not as the accelerator's exact peak.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="ViT-B/16")
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--num_classes", type=int, default=4)
  parser.add_argument("--batch", type=int, default=64, help="global batch size")
  parser.add_argument("--devices", default="8", help="comma-separated device counts")
  parser.add_argument("--fsdp", default="1", help="comma-separated FSDP degrees to compare")
  parser.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
  args = parser.parse_args(argv)
  counts = [int(d) for d in args.devices.split(",")]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={max(counts)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding  # pylint: disable=g-import-not-at-top

  from shpeft_jax import optim, sharding, train  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import clip_vit  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import masking  # pylint: disable=g-import-not-at-top

  model = clip_vit.build_model(args.model, args.num_classes, image_size=args.image_size,
                               dtype=args.dtype)
  size = model.config.image_size
  abstract_params = jax.eval_shape(lambda r: clip_vit.init_params(model, r),
                                   jax.random.PRNGKey(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
  mask = jax.tree.map(lambda x: np.zeros(x.shape, bool), abstract_params)
  loss_fn = train.make_loss_fn(model)
  print(f"{args.model} ({n_params / 1e6:.1f}M params, {size}px), global batch {args.batch}, "
        f"compute {args.dtype}; MiB per device")
  print(f"{'devices':>7} {'img/dev':>7} {'data x fsdp':>11} {'state':>8} {'temp':>8} {'total':>8}")
  combos = [(n, f) for n in counts for f in (int(f) for f in args.fsdp.split(","))
            if n % f == 0 and args.batch % n == 0]
  for n, fsdp in combos:
    mesh = Mesh(np.asarray(jax.devices()[:n]).reshape(n // fsdp, fsdp), sharding.BATCH_AXES)
    tx = optim.build(dict(lr=1e-3, momentum=0.9), 1000, mask).tx
    param_sh = sharding.tree_shardings(mesh, abstract_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = sharding.tree_shardings(mesh, abstract_opt)
    batch_sh = sharding.batch_sharding(mesh)
    state_sh = {"params": param_sh, "opt": opt_sh}

    def step(state, batch):
      grads = jax.grad(loss_fn)(state["params"], batch)
      updates, opt = tx.update(grads, state["opt"], state["params"])
      return {"params": optax.apply_updates(state["params"], updates), "opt": opt}

    shaped = lambda tree, sh: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    state = shaped({"params": abstract_params, "opt": abstract_opt}, state_sh)
    b = args.batch
    batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=batch_sh),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh),
             "valid": jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=batch_sh)}
    compiled = jax.jit(step, donate_argnums=(0,), out_shardings=state_sh).lower(
        state, batch).compile()
    mem = compiled.memory_analysis()
    # Per-device state bytes from the actual shard shapes.
    state_bytes = sum(
        int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
        for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(
            state_sh, is_leaf=lambda v: isinstance(v, NamedSharding))))
    temp = mem.temp_size_in_bytes if mem is not None else float("nan")
    mib = 2.0 ** 20
    print(f"{n:>7} {args.batch // n:>7} {n // fsdp:>6} x {fsdp:<2} {state_bytes / mib:>8.1f} "
          f"{temp / mib:>8.1f} {(state_bytes + temp) / mib:>8.1f}", flush=True)


if __name__ == "__main__":
  main()
