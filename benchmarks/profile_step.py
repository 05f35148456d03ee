"""Profile a few masked SH-PEFT train steps: a jax.profiler trace, compile log, transfer guard.

  python benchmarks/profile_step.py --model test_tiny --steps 5 --trace_dir /tmp/shpeft_trace
  tensorboard --logdir /tmp/shpeft_trace   # or open the .xplane.pb / trace.json.gz in Perfetto

What it checks, on the step the trainer runs (value_and_grad -> masked optax chain -> apply, state
donated):
  - compilations per jitted function (`jax.log_compiles` output and JAX's compile event): the train
    step must compile once, every later step reuses it;
  - host round-trips: the steady-state steps run under `jax.transfer_guard("disallow")`, so any
    implicit host<->device copy inside the loop raises;
  - donation: the previous state's buffers are deleted after each step (reused in place), and no
    "donated buffers were not usable" warning is emitted.
Prints a summary and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from shpeft_jax import optim, train
from shpeft_jax.models.clip_vit import build_model, init_params
from shpeft_jax.peft import masking, sparse_optim
from shpeft_jax.utils import flatten_names, unflatten_names

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class _Capture(logging.Handler):

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def _top_ops(trace_dir: str, n: int = 10) -> dict[str, float]:
  """Total duration per XLA op/fusion in the Chrome trace (Python frames and runtime spans left out)."""
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  files = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
  if not files:
    return {}
  with gzip.open(files[0]) as f:
    events = json.load(f)["traceEvents"]
  total = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name.startswith("$") or "::" in name or " " in name or name in (
        "train", "ParseArguments"):
      continue
    total[name] += e.get("dur", 0.0)
  return dict(total.most_common(n))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="test_tiny")
  ap.add_argument("--image_size", type=int, default=None)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--k_percent", type=float, default=1.0)
  ap.add_argument("--sparse_state", action="store_true")
  ap.add_argument("--trace_dir", default=None, help="default: a new temporary directory")
  args = ap.parse_args(argv)

  model = build_model(args.model, 4, image_size=args.image_size)
  size = model.config.image_size
  params = init_params(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  mask = unflatten_names({n: None if n.startswith("head/") else rng.random(x.shape) < args.k_percent / 100
                          for n, x in flatten_names(params).items()})
  chain = optim.build(dict(lr=1e-3, momentum=0.9), 1000).tx
  tx = (sparse_optim.sparse_masked_optimizer(chain, mask) if args.sparse_state
        else masking.masked_update(chain, mask))

  # The trainer's loss and update step.
  train_step = jax.jit(train.make_train_step(train.make_loss_fn(model), tx), donate_argnums=(0,))
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  batches = [jax.device_put({
      "image": rng.normal(size=(args.batch, size, size, 3)).astype(np.float32),
      "label": rng.integers(0, 4, args.batch).astype(np.int32),
      "valid": np.ones(args.batch, bool)}) for _ in range(args.steps)]

  compiled_fns = []
  listener = lambda event, duration, **kw: (
      compiled_fns.append(kw.get("fun_name")) if event == COMPILE_EVENT else None)
  jax.monitoring.register_event_duration_secs_listener(listener)
  capture = _Capture()
  logging.getLogger("jax").addHandler(capture)
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="shpeft_trace_")
  donated_ok, times = True, []
  with warnings.catch_warnings(record=True) as caught, jax.log_compiles(True):
    warnings.simplefilter("always")
    state, m = train_step(state, batches[0])  # Compiles.
    jax.block_until_ready(m)
    with jax.profiler.trace(trace_dir):
      with jax.transfer_guard("disallow"):
        for i in range(1, args.steps):
          old = jax.tree.leaves(state)
          t0 = time.perf_counter()
          with jax.profiler.StepTraceAnnotation("train", step_num=i):
            state, m = train_step(state, batches[i])
            jax.block_until_ready(m)
          times.append(time.perf_counter() - t0)
          donated_ok &= all(x.is_deleted() for x in old)
    loss = float(jax.device_get(m["loss"]))
  jax.monitoring.unregister_event_duration_listener(listener)
  logging.getLogger("jax").removeHandler(capture)

  donation_warnings = [str(w.message) for w in caught if "donated" in str(w.message).lower()]
  compile_log = [l for l in capture.lines if "Compiling" in l or "Finished XLA compilation" in l]
  trace_files = [os.path.relpath(os.path.join(r, f), trace_dir)
                 for r, _, fs in os.walk(trace_dir) for f in fs]
  top_ops = _top_ops(trace_dir)
  out = {"benchmark": "profile_step", "model": args.model, "batch": args.batch,
         "sparse_state": args.sparse_state,
         "train_step_compiles": compiled_fns.count("jit(train_step)"),
         "all_compiles": compiled_fns, "host_transfers_in_loop": 0,  # transfer_guard would raise
         "donation_reused_buffers": bool(donated_ok), "donation_warnings": donation_warnings,
         "steady_step_s": float(np.median(times)) if times else None, "loss": loss,
         "trace_dir": trace_dir, "trace_files": trace_files,
         "log_compiles_lines": len(compile_log), "top_ops_us": top_ops}
  print(f"train_step compiled {out['train_step_compiles']}x over {args.steps} steps; all compiles: "
        f"{compiled_fns}", file=sys.stderr)
  print(f"donation: buffers reused={donated_ok}, warnings={donation_warnings}", file=sys.stderr)
  print(f"no implicit host transfer inside the loop (transfer_guard='disallow'); median step "
        f"{out['steady_step_s']:.4f}s; trace in {trace_dir}: {trace_files}", file=sys.stderr)
  print("top XLA thunks by total time in the trace (us): " + ", ".join(
      f"{k} {v:.0f}" for k, v in top_ops.items()), file=sys.stderr)
  print(json.dumps(out))
  ok = out["train_step_compiles"] == 1 and donated_ok and not donation_warnings
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
