"""Train-step throughput and peak memory: masked SH-PEFT vs full fine-tuning vs LoRA, JAX vs PyTorch.

Each (framework, mode, dtype) runs in its own subprocess so that its peak resident memory (ru_maxrss)
is its own. Modes:
  full          every weight trained; SGD momentum state for all of them.
  shpeft        SH-PEFT as the trainer runs it: full backward, `masking.masked_update` over an
                element mask of k% of the encoder (random positions: the cost does not depend on
                which weights are selected) + the head.
  shpeft_sparse the same with `sparse_optim.sparse_masked_optimizer` (config.optim.sparse_state):
                optimizer state for the selected weights only (JAX only).
  lora          LoRA rank 8 on q and v + the head; gradients of the trainable params only.
The PyTorch reference is `shpeft_jax.models.torch_reference.TorchClipClassifier` (OpenAI layout, same
shape), eager, `torch.optim.SGD(momentum=0.9)`; its SH-PEFT step multiplies the gradients by the mask
before the optimizer step, its LoRA adds low-rank q/v updates to the frozen fused in-projection.
bfloat16: JAX computes in bfloat16 with float32 params (`build_model(dtype='bfloat16')`), PyTorch
uses `torch.autocast('cpu', torch.bfloat16)`.

  python benchmarks/train_step.py --model ViT-B/16 --image_size 224 --batch 8 --steps 3

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

MODES = ("full", "shpeft", "shpeft_sparse", "lora")


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict:
  model = platform.processor()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------
# JAX


def build_jax(args, mode: str, dtype: str):
  """(run_step() -> loss, info) for a jitted, donated train step of `mode`."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from shpeft_jax import optim, train
  from shpeft_jax.models.clip_vit import AdditiveConfig, build_model, init_params
  from shpeft_jax.peft import masking, sparse_optim
  from shpeft_jax.utils import count_params, flatten_names, unflatten_names

  rss0 = _rss_mb()
  additive = AdditiveConfig(lora_rank=8, lora_targets=("q", "v")) if mode == "lora" else None
  model = build_model(args.model, args.num_classes, image_size=args.image_size, dtype=dtype,
                      additive=additive)
  params = jax.jit(lambda r: init_params(model, r))(jax.random.PRNGKey(0))
  chain = optim.build(dict(lr=1e-3, momentum=0.9), 1000).tx

  def loss_of(p, batch):
    logits = model.apply({"params": p}, batch["image"], train=True).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  names = flatten_names(params)
  trainable = None
  if mode == "full":
    tx = chain
  elif mode in ("shpeft", "shpeft_sparse"):
    rng = np.random.default_rng(0)
    mask = unflatten_names({
        n: None if n.startswith("head/") else rng.random(x.shape, np.float32) < args.k_percent / 100
        for n, x in names.items()})
    tx = (masking.masked_update(chain, mask) if mode == "shpeft"
          else sparse_optim.sparse_masked_optimizer(chain, mask))
  else:  # lora: differentiate the trainable subset only, like requires_grad=False in torch.
    is_trainable = lambda n: n.startswith("head/") or "/lora_" in n
    trainable = {n for n in names if is_trainable(n)}
    tx = chain

  if trainable is None:  # The trainer's update step (its loss is `loss_of` with valid = 1).
    train_step = train.make_train_step(train.make_loss_fn(model), tx)

    def step(state, batch):
      state, m = train_step(state, batch)
      return state, m["loss"]
    state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  else:
    def split(p):
      f = flatten_names(p)
      return ({n: v for n, v in f.items() if n in trainable},
              {n: v for n, v in f.items() if n not in trainable})

    def step(state, batch):
      def loss_t(t):
        return loss_of(unflatten_names({**t, **state["frozen"]}), batch)
      loss, grads = jax.value_and_grad(loss_t)(state["trainable"])
      updates, opt = tx.update(grads, state["opt"], state["trainable"])
      return {"trainable": optax.apply_updates(state["trainable"], updates), "opt": opt,
              "frozen": state["frozen"]}, loss
    t, f = split(params)
    state = {"trainable": t, "frozen": f, "opt": tx.init(t)}

  opt_bytes = sparse_optim.tree_bytes(state["opt"])
  step = jax.jit(step, donate_argnums=(0,))
  rng = np.random.default_rng(1)
  batch = {"image": jnp.asarray(rng.normal(size=(args.batch, args.image_size, args.image_size, 3)),
                                jnp.float32),
           "label": jnp.asarray(rng.integers(0, args.num_classes, args.batch), jnp.int32),
           "valid": jnp.ones(args.batch, bool)}
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  box = {"state": state}

  def run_step() -> float:
    box["state"], loss = compiled(box["state"], batch)
    return float(loss)  # Blocks until the step is done.

  return run_step, {"num_params": count_params(params), "opt_state_bytes": opt_bytes,
                    "compile_s": compile_s,
                    "xla_temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else None,
                    "rss_before_mb": rss0}


# ------------------------------------------------------------------------------------------------
# PyTorch


def build_torch(args, mode: str, dtype: str):
  """(run_step() -> loss, info) for an eager PyTorch train step of `mode`."""
  import contextlib

  import numpy as np
  import torch
  import torch.nn.functional as F
  import torch_modes  # benchmarks/torch_modes.py, beside this script

  from shpeft_jax.models.torch_reference import TorchClipClassifier
  from shpeft_jax.models.clip_vit import get_model_config

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  rss0 = _rss_mb()
  model = TorchClipClassifier.from_config(get_model_config(args.model, args.image_size),
                                          args.num_classes)
  model.train()

  masks = torch_modes.set_mode(model, mode, k_percent=args.k_percent)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
  named = dict(model.named_parameters())
  rng = np.random.default_rng(1)
  images = torch.from_numpy(rng.normal(size=(args.batch, 3, args.image_size, args.image_size)).astype(
      np.float32))
  labels = torch.from_numpy(rng.integers(0, args.num_classes, args.batch))
  autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16"
              else contextlib.nullcontext())

  def run_step() -> float:
    opt.zero_grad(set_to_none=True)
    with autocast:
      logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    for name, m in masks.items():
      named[name].grad.mul_(m)
    opt.step()
    return loss.item()

  run_step()  # Creates the momentum buffers, so that their size can be reported.
  opt_bytes = sum(s["momentum_buffer"].numel() * s["momentum_buffer"].element_size()
                  for s in opt.state.values() if s.get("momentum_buffer") is not None)
  return run_step, {"num_params": sum(p.numel() for p in model.parameters()),
                    "opt_state_bytes": opt_bytes, "compile_s": 0.0, "xla_temp_mb": None,
                    "rss_before_mb": rss0}


# ------------------------------------------------------------------------------------------------
# Driver


def _build(args, entry: str):
  fw, mode, dtype = entry.split(":")
  return (build_jax if fw == "jax" else build_torch)(args, mode, dtype)


def _timed(run_step) -> tuple[float, float, float]:
  """(wall seconds, CPU seconds of this process over all threads, loss) of one step.

  The machine may be shared: CPU seconds are what the step itself consumed, wall seconds include
  time spent waiting for cores that other processes hold.
  """
  w, c = time.perf_counter(), time.process_time()
  loss = run_step()
  return time.perf_counter() - w, time.process_time() - c, loss


def _summary(args, times: list[tuple[float, float, float]]) -> dict:
  wall = statistics.median(t[0] for t in times)
  cpu = statistics.median(t[1] for t in times)
  return {"step_times_s": [t[0] for t in times], "step_cpu_s": [t[1] for t in times],
          "step_s": wall, "cpu_s": cpu, "images_per_s": args.batch / wall,
          "images_per_cpu_s": args.batch / cpu, "loss": times[-1][2]}


def single(args) -> dict:
  """One configuration in this process: its peak RSS is its own."""
  fw, mode, dtype = args.single.split(":")
  run_step, info = _build(args, args.single)
  for _ in range(args.warmup):
    run_step()
  r = {**info, **_summary(args, [_timed(run_step) for _ in range(args.steps)])}
  r.update(framework=fw, mode=mode, dtype=dtype, peak_rss_mb=_peak_rss_mb())
  return r


def paired(args) -> dict:
  """Several configurations in ONE process, their steps interleaved round by round.

  On a shared machine the load changes from minute to minute; interleaving exposes every
  configuration to the same load, and the ratio of two configurations is taken per round (then
  the median), which is far steadier than a ratio of two runs made minutes apart.
  """
  entries = args.paired.split(",")
  steps = {}
  for e in entries:
    steps[e] = _build(args, e)
  for _ in range(args.warmup):
    for e in entries:
      steps[e][0]()
  rounds = []
  for _ in range(args.steps):
    rounds.append({e: _timed(steps[e][0]) for e in entries})
  out = {e: {**steps[e][1], **_summary(args, [r[e] for r in rounds])} for e in entries}
  ratios = {}
  for a in entries:
    for b in entries:
      if a != b:
        ratios[f"{a}/{b}:wall"] = statistics.median(r[a][0] / r[b][0] for r in rounds)
        ratios[f"{a}/{b}:cpu"] = statistics.median(r[a][1] / r[b][1] for r in rounds)
  return {"entries": out, "step_time_ratios": ratios}


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="ViT-B/16")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--num_classes", type=int, default=4)
  ap.add_argument("--k_percent", type=float, default=1.0)
  ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  ap.add_argument("--modes", default=",".join(MODES))
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--frameworks", default="jax,torch")
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  ap.add_argument("--single", default="", help=argparse.SUPPRESS)
  ap.add_argument("--paired", default="",
                  help="comma-separated fw:mode:dtype entries timed interleaved in one process, "
                       "e.g. jax:full:float32,jax:shpeft:float32 (prints one JSON line)")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  if args.single:
    print("RESULT " + json.dumps(single(args)), flush=True)
    return
  if args.paired:
    pr = paired(args)
    for e, r in pr["entries"].items():
      print(f"  {e:28s} {r['images_per_s']:7.2f} img/s  {r['images_per_cpu_s']:7.2f} img/CPU-s  "
            f"step {r['step_s']:.2f}s wall {r['cpu_s']:.2f}s CPU", file=sys.stderr)
    for k, v in pr["step_time_ratios"].items():
      print(f"  {k:70s} {v:7.3f}", file=sys.stderr)
    print(json.dumps({"benchmark": "train_step_paired", "machine": machine(),
                      "config": {k: v for k, v in vars(args).items() if k != "single"}, **pr}))
    return
  results = []
  passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
  for dtype in args.dtypes.split(","):
    for mode in args.modes.split(","):
      for fw in args.frameworks.split(","):
        if fw == "torch" and mode == "shpeft_sparse":
          continue  # No sparse-state optimizer in the PyTorch reference.
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough,
               "--single", f"{fw}:{mode}:{dtype}"]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
          r = {"framework": fw, "mode": mode, "dtype": dtype,
               "error": (proc.stderr or proc.stdout)[-2000:]}
        else:
          r = json.loads(line[-1][len("RESULT "):])
        results.append(r)
        ok = "error" not in r
        print(f"  {fw:5s} {mode:13s} {dtype:8s} " + (
            f"{r['images_per_s']:7.2f} img/s {r['images_per_cpu_s']:7.2f} img/CPU-s  peak RSS "
            f"{r['peak_rss_mb']:7.0f} MB  opt state {r['opt_state_bytes'] / 2**20:8.2f} MB"
            if ok else "ERROR " + r["error"].strip().splitlines()[-1]), file=sys.stderr, flush=True)

  def get(fw, mode, dtype):
    for r in results:
      if (r["framework"], r["mode"], r["dtype"]) == (fw, mode, dtype) and "error" not in r:
        return r
    return None

  ratios = {}
  for dtype in args.dtypes.split(","):
    for fw in args.frameworks.split(","):
      full = get(fw, "full", dtype)
      for mode in ("shpeft", "shpeft_sparse", "lora"):
        r = get(fw, mode, dtype)
        if full and r:
          ratios[f"{fw}/{dtype}/{mode}_over_full_step_time"] = r["step_s"] / full["step_s"]
          ratios[f"{fw}/{dtype}/{mode}_over_full_step_cpu"] = r["cpu_s"] / full["cpu_s"]
          ratios[f"{fw}/{dtype}/full_over_{mode}_opt_state_bytes"] = (
              full["opt_state_bytes"] / max(r["opt_state_bytes"], 1))
    for mode in ("full", "shpeft", "lora"):
      j, t = get("jax", mode, dtype), get("torch", mode, dtype)
      if j and t:
        ratios[f"{dtype}/{mode}/jax_over_torch_images_per_s"] = j["images_per_s"] / t["images_per_s"]
        ratios[f"{dtype}/{mode}/jax_over_torch_images_per_cpu_s"] = (
            j["images_per_cpu_s"] / t["images_per_cpu_s"])
  print("\n".join(f"  {k:55s} {v:8.3f}" for k, v in ratios.items()), file=sys.stderr)
  out = {"benchmark": "train_step", "machine": machine(),
         "config": {k: v for k, v in vars(args).items() if k != "single"},
         "results": results, "ratios": ratios}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
