"""One prepared GPU check: ViT-B/16 at 224 px, bfloat16 compute with float32 params, one GPU.

  PYTHONPATH=. python benchmarks/gpu_check.py --out OUT_DIR          # on a GPU, < 8 min
  PYTHONPATH=. python benchmarks/gpu_check.py --out OUT_DIR --dry_run  # tiny model, CPU, seconds

Measures, in this order (a part that would overrun `--budget_s` is skipped and says so):
  1. the score pass, `importance.accumulate_gradients` (the project's jitted lax.scan), over 10,000
     synthetic images at batch 64 and 128: images/s, seconds per 10k images, MFU;
  2. one train step at batch 64 for full fine-tuning, masked SH-PEFT (k = 1%), SH-PEFT with the
     sparse optimizer state (`sparse_optim.apply_gradients`, in place) and LoRA (rank 8 on q, v):
     images/s, step time over full fine-tuning, peak device memory (`memory_stats()`, each step in
     its own process so that the peak is its own) and the compiled step's `memory_analysis()`;
  3. exact top-1% selection over the encoder's 86M scores on the device (sort) and on the host
     (`selection.select_top_k`);
  4. the masked SH-PEFT step fed from the host (a batch transferred per step, as the trainer's
     input pipeline feeds it) against the same step on a device-resident batch, and the
     host-to-device copy of one batch as float32 and as uint8;
  5. the same score pass and steps in PyTorch on the same weights (`shpeft_jax.export` ->
     `torch_reference.load_exported`), eager;
  6. larger towers, each in its own process: ViT-L/16-sized (vit:p16-w1024-l24-h16-m4096, the
     UNI / DINOv2-L shape) and ViT-g/14-sized (vit:p14-w1408-l40-h16-m6144, LAION's g/14): the
     score pass, the masked SH-PEFT step and the full fine-tuning step;
  7. PyTorch `torch.compile` where the budget allows.
Writes OUT_DIR/gpu_check.json (rewritten after every part, so a cut run keeps what it measured)
and OUT_DIR/gpu_check.md.

FLOPs: model FLOPs = 3 x the forward FLOPs (forward + backward of a full gradient), the forward's
the analytic matmul count (`analytic_forward_flops`: patch embedding, qkv/out, MLP, attention
scores/values). XLA's cost analysis of the compiled forward is recorded beside it, but it is no
basis on a GPU: there the matmuls are cuBLAS custom calls that it does not count (on the H200,
2026-12-04, it gave 1.6 GFLOP per ViT-B/16 image against the 35.1 analytic). MFU = model FLOP/s
over the device's dense bf16 peak (`PEAK_BF16_TFLOPS`, from the vendor's datasheet, by device name).

`--parts` runs a subset (e.g. `--parts towers,hostfed,torch` after a run that the budget cut):
each JAX part in its own process costs ~60-120 s on the H200 (start, CUDA, compile), so the full
check needs ~15 min; 15 device-minutes fit about one run of `--budget_s 540`.

Imports only what the GPU image has (jax, flax, optax, orbax, torch, safetensors): no TensorFlow,
tfds or ml_collections on this path (tests/test_gpu_check.py checks it). Without a visible GPU it
exits at once with one line and status 2, unless --dry_run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s, NVIDIA datasheets. First match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.4),   # Also GH200.
    ("H100", 989.4),   # SXM / HBM3.
    ("H800", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

MODES = ("full", "shpeft", "shpeft_sparse", "lora")
PARTS = ("score", "steps", "selection", "hostfed", "torch", "towers", "compile")
FORBIDDEN = ("tensorflow", "tensorflow_datasets", "ml_collections")


class Skip(Exception):
  """A part that cannot run here or would overrun the budget; recorded, not fatal."""


def fail(msg: str, code: int = 2):
  print(f"gpu_check: error: {msg}", file=sys.stderr, flush=True)
  sys.exit(code)


def peak_tflops(device_kind: str) -> float | None:
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def sizes(dry_run: bool) -> dict:
  if dry_run:
    return dict(model="test_tiny", image_size=16, score_images=64, score_batches=(4, 8),
                chunk_images=16, step_batch=4, steps=2, warmup=1, k_percent=1.0,
                towers=(("tiny tower", "vit:p4-w32-l2-h2-m64", 4),), tower_score_images=16)
  return dict(model="ViT-B/16", image_size=224, score_images=10_000, score_batches=(64, 128),
              chunk_images=1024, step_batch=64, steps=10, warmup=2, k_percent=1.0,
              towers=(("ViT-L/16-sized", "vit:p16-w1024-l24-h16-m4096", 64),
                      ("ViT-g/14-sized", "vit:p14-w1408-l40-h16-m6144", 32)),
              tower_score_images=2048)


class Budget:
  """Wall-clock budget of the whole check; parts ask before they start."""

  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds

  def left(self) -> float:
    return self.end - time.monotonic()

  def need(self, seconds: float, what: str):
    if self.left() < seconds:
      raise Skip(f"skipped: {what} needs ~{seconds:.0f} s, {max(self.left(), 0):.0f} s left of "
                 "--budget_s")


# ------------------------------------------------------------------------------------------------
# JAX


def analytic_forward_flops(cfg) -> float:
  """Matmul FLOPs of one image's forward (patch embedding, qkv/out, MLP, attention scores/values)."""
  tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
  d, m = cfg.width, cfg.mlp_dim
  per_layer = 2 * tokens * (4 * d * d + 2 * d * m) + 2 * 2 * tokens * tokens * d
  patch = 2 * (tokens - 1) * cfg.patch_size ** 2 * 3 * d
  return float(cfg.layers * per_layer + patch)


def _flops(compiled) -> float | None:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return float(ca["flops"]) if ca and ca.get("flops") else None


def _memory(compiled) -> dict | None:
  m = compiled.memory_analysis()
  if m is None:
    return None
  out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                         "alias_size_in_bytes", "temp_size_in_bytes")}
  # Live at once: the arguments, the outputs that do not reuse a donated argument, the scratch.
  out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def device_info() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform)
  return {"backend": jax.default_backend(), "device_kind": kind, "device_count": jax.device_count(),
          "jax": jax.__version__, "peak_bf16_tflops": peak_tflops(kind),
          "host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count()}


def device_memory() -> dict | None:
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
          if k in stats}


def build(sz: dict, dtype: str, lora: bool = False):
  import jax  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models.clip_vit import AdditiveConfig, build_model, init_params
  additive = AdditiveConfig(lora_rank=8, lora_targets=("q", "v")) if lora else None
  model = build_model(sz["model"], 4, image_size=sz["image_size"], dtype=dtype, additive=additive)
  params = jax.jit(lambda r: init_params(model, r))(jax.random.PRNGKey(0))
  return model, params


def forward_flops_per_image(model, params, batch: int) -> float | None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  s = model.config.image_size
  x = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
  f = _flops(jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, x).compile())
  return None if f is None else f / batch


def score_pass(model, params, batch: int, sz: dict, peak: float | None) -> dict:
  """`accumulate_gradients` over >= score_images images: device-resident chunks of batches."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import importance  # pylint: disable=g-import-not-at-top
  s = model.config.image_size
  chunk = max(1, sz["chunk_images"] // batch)
  n_chunks = math.ceil(sz["score_images"] / (chunk * batch))
  k1, k2 = jax.random.split(jax.random.PRNGKey(batch))
  batches = {"image": jax.random.normal(k1, (chunk, batch, s, s, 3), jnp.float32),
             "label": jax.random.randint(k2, (chunk, batch), 0, 4),
             "valid": jnp.ones((chunk, batch), bool)}
  loss_fn = importance.cross_entropy_loss_fn(model.apply)
  t = time.perf_counter()
  jax.block_until_ready(importance.accumulate_gradients(loss_fn, params, batches))
  first = time.perf_counter() - t
  acc = None
  t = time.perf_counter()
  for _ in range(n_chunks):
    acc = importance.accumulate_gradients(loss_fn, params, batches, acc=acc)
  jax.block_until_ready(acc)
  seconds = time.perf_counter() - t
  images = n_chunks * chunk * batch
  fwd = analytic_forward_flops(model.config)
  ips = images / seconds
  r = {"framework": "jax", "batch": batch, "images": images, "seconds": seconds,
       "images_per_s": ips, "seconds_per_10k": seconds * 10_000 / images,
       "first_call_s_incl_compile": first, "batches_per_scan": chunk,
       "forward_flops_per_image_analytic": fwd,
       "forward_flops_per_image_cost_analysis": forward_flops_per_image(model, params, batch),
       "model_tflops_per_s": 3 * fwd * ips / 1e12}
  r["mfu"] = (r["model_tflops_per_s"] / peak) if peak else None
  return r


def random_mask(params, k_percent: float, seed: int = 0):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from shpeft_jax.utils import flatten_names, unflatten_names  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return unflatten_names({
      n: None if n.startswith("head/") else rng.random(x.shape, np.float32) < k_percent / 100
      for n, x in flatten_names(jax.eval_shape(lambda: params)).items()})


def _prepare_step(mode: str, sz: dict, dtype: str):
  """One configuration's donated, jitted step, compiled: (compiled, state, batch, info)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from shpeft_jax import optim, train  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import masking, sparse_optim  # pylint: disable=g-import-not-at-top
  from shpeft_jax.utils import flatten_names, unflatten_names  # pylint: disable=g-import-not-at-top

  model, params = build(sz, dtype, lora=mode == "lora")
  optim_cfg = dict(lr=1e-3, momentum=0.9, sparse_state=mode == "shpeft_sparse")
  loss_fn = train.make_loss_fn(model)

  if mode == "lora":
    chain = optim.build(optim_cfg, 1000).tx
    flat = flatten_names(params)
    is_t = lambda n: n.startswith("head/") or "/lora_" in n
    t = {n: v for n, v in flat.items() if is_t(n)}
    state = {"trainable": t, "frozen": {n: v for n, v in flat.items() if not is_t(n)},
             "opt": chain.init(t)}

    def step(state, batch):
      loss, g = jax.value_and_grad(
          lambda t: loss_fn(unflatten_names({**t, **state["frozen"]}), batch))(state["trainable"])
      u, opt = chain.update(g, state["opt"], state["trainable"])
      return {"trainable": masking.apply_updates(state["trainable"], u),
              "frozen": state["frozen"], "opt": opt}, {"loss": loss}
  else:
    mask = random_mask(params, sz["k_percent"]) if mode != "full" else None
    tx = optim.build(optim_cfg, 1000, mask).tx
    assert (mode == "shpeft_sparse") == isinstance(tx, sparse_optim.SparseMaskedTransformation)
    del mask
    state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    step = train.make_train_step(loss_fn, tx)

  opt_bytes = sparse_optim.tree_bytes(state["opt"])
  b, s = sz["step_batch"], sz["image_size"]
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  batch = {"image": jax.random.normal(k1, (b, s, s, 3), jnp.float32),
           "label": jax.random.randint(k2, (b,), 0, 4), "valid": jnp.ones((b,), bool)}
  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  return compiled, state, batch, {"compile_s": compile_s, "opt_state_bytes": opt_bytes}


def train_step(mode: str, sz: dict, dtype: str) -> dict:
  """One configuration's donated, jitted step: compile, warm up, time `steps` steps.

  Full fine-tuning and SH-PEFT (masked or sparse state) run the trainer's own step
  (`train.make_train_step`, with its loss and norms); LoRA differentiates the trainable subset
  only, as a LoRA user's step would (like requires_grad=False in PyTorch).
  """
  import jax  # pylint: disable=g-import-not-at-top
  compiled, state, batch, info = _prepare_step(mode, sz, dtype)
  b = sz["step_batch"]
  for _ in range(sz["warmup"]):
    state, measurements = compiled(state, batch)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(sz["steps"]):
    state, measurements = compiled(state, batch)
  loss = float(measurements["loss"])  # Blocks on the last step.
  seconds = time.perf_counter() - t
  return {"framework": "jax", "mode": mode, "model": sz["model"], "batch": b,
          "steps": sz["steps"], "step_s": seconds / sz["steps"],
          "images_per_s": b * sz["steps"] / seconds, **info, "loss": loss,
          "step_flops_cost_analysis": _flops(compiled), "memory_analysis": _memory(compiled),
          "device_memory": device_memory()}


def host_fed(sz: dict, dtype: str) -> dict:
  """The masked SH-PEFT step fed from host memory, one batch copied per step (one batch ahead, as
  the trainer's prefetch does), against the same step on a device-resident batch; and the copy of
  one batch alone, as float32 (what the pipeline sends today) and as uint8 (a quarter)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  compiled, state, batch, info = _prepare_step("shpeft", sz, dtype)
  host = jax.device_get(batch)
  host_u8 = dict(host, image=np.clip(host["image"] * 40 + 128, 0, 255).astype(np.uint8))
  dev = jax.devices()[0]

  def copy_s(b, n=10):
    jax.block_until_ready(jax.device_put(b, dev))
    t = time.perf_counter()
    for _ in range(n):
      jax.block_until_ready(jax.device_put(b, dev))
    return (time.perf_counter() - t) / n

  def timed(feed) -> float:
    nonlocal state
    for _ in range(sz["warmup"]):
      state, _ = compiled(state, feed())
    jax.block_until_ready(state)
    t = time.perf_counter()
    nxt = feed()
    for _ in range(sz["steps"]):
      cur, nxt = nxt, feed()
      state, m = compiled(state, cur)
    float(m["loss"])
    return (time.perf_counter() - t) / sz["steps"]

  resident = timed(lambda: batch)
  fed = timed(lambda: jax.device_put(host, dev))
  b = sz["step_batch"]
  return {"framework": "jax", "mode": "shpeft", "batch": b, **info,
          "resident_step_s": resident, "host_fed_step_s": fed,
          "resident_images_per_s": b / resident, "host_fed_images_per_s": b / fed,
          "host_fed_over_resident": fed / resident,
          "copy_float32_s": copy_s(host), "copy_uint8_s": copy_s(host_u8),
          "batch_bytes_float32": int(host["image"].nbytes),
          "batch_bytes_uint8": int(host_u8["image"].nbytes)}


def tower_check(index: int, sz: dict, dtype: str, budget: Budget, peak: float | None) -> dict:
  """A larger tower (sizes()['towers'][index]): the score pass at its batch over
  `tower_score_images` images, then the masked SH-PEFT step and the full fine-tuning step."""
  import gc  # pylint: disable=g-import-not-at-top
  label, name, batch = sz["towers"][index]
  tsz = dict(sz, model=name, step_batch=batch, score_images=sz["tower_score_images"],
             chunk_images=min(sz["chunk_images"], sz["tower_score_images"]))
  out = {"tower": label, "model": name, "batch": batch}
  parts = [("score_pass", lambda: score_pass(*build(tsz, dtype), batch, tsz, peak)),
           ("shpeft_step", lambda: train_step("shpeft", tsz, dtype)),
           ("full_step", lambda: train_step("full", tsz, dtype))]
  for key, fn in parts:
    try:
      budget.need(30, f"{label} {key}")
      out[key] = fn()
    except Skip as e:
      out[key] = {"skipped": str(e)}
    except Exception as e:  # pylint: disable=broad-except
      out[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
    gc.collect()
  full, shp = out.get("full_step", {}), out.get("shpeft_step", {})
  if "step_s" in full and "step_s" in shp:
    shp["step_time_over_full"] = shp["step_s"] / full["step_s"]
  return out


def selection_check(sz: dict) -> dict:
  """Exact top-k% threshold of the encoder's scores: device sort vs the project's host select."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models.clip_vit import build_model, init_params
  from shpeft_jax.peft import selection  # pylint: disable=g-import-not-at-top
  model = build_model(sz["model"], 4, image_size=sz["image_size"])
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))["encoder"]
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  # Squared-gradient-like: heavy tailed with a per-tensor scale.
  scores = [jax.random.normal(k, x.shape) ** 2 * (10.0 ** (-3.0 * i / len(leaves)))
            for i, (k, x) in enumerate(zip(keys, leaves))]
  n = sum(x.size for x in scores)
  k = selection.resolve_k(n, k_percent=sz["k_percent"])

  @jax.jit
  def device_select(scores):
    flat = jnp.concatenate([x.ravel() for x in scores])
    tau = jnp.sort(flat)[flat.size - k]
    masks = [x >= tau for x in scores]
    return tau, sum(jnp.sum(m, dtype=jnp.int32) for m in masks), masks

  jax.block_until_ready(device_select(scores))  # Compile.
  t = time.perf_counter()
  tau, count, masks = jax.block_until_ready(device_select(scores))
  device_s = time.perf_counter() - t
  del masks
  t = time.perf_counter()
  host = jax.device_get(scores)
  transfer_s = time.perf_counter() - t
  t = time.perf_counter()
  _, info = selection.select_top_k(jax.tree.unflatten(treedef, host), k_percent=sz["k_percent"])
  host_s = time.perf_counter() - t
  # `x >= tau` also takes the ties at tau (the host select breaks them to exactly k).
  return {"n": int(n), "k": int(k), "device_s": device_s, "device_threshold": float(tau),
          "device_at_or_above": int(count), "host_transfer_s": transfer_s, "host_select_s": host_s,
          "host_threshold": float(info.threshold), "host_selected": int(info.selected),
          "agree": float(tau) == float(info.threshold) and int(info.selected) == k <= int(count)}


# ------------------------------------------------------------------------------------------------
# PyTorch, on the same weights (exported by the project's exporter).


def torch_check(weights: str, sz: dict, budget: Budget, how: str = "eager") -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import torch_reference  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_modes  # pylint: disable=g-import-not-at-top  (benchmarks/torch_modes.py)

  cuda = torch.cuda.is_available()
  dev = torch.device("cuda" if cuda else "cpu")
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)
  out = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
         "score_pass": [], "train_step": []}

  def fresh():
    return torch_reference.load_exported(weights).to(dev).train()

  def peak_reset():
    if cuda:
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()

  def peak():
    return int(torch.cuda.max_memory_allocated()) if cuda else None

  def compiled_or_eager(net, how):
    if how == "eager":
      return net
    return torch.compile(net)

  def score(batch, how):
    net = fresh()
    fn = compiled_or_eager(net, how)
    enc = [p for n, p in net.named_parameters() if not n.startswith("head.")]
    s1 = [torch.zeros_like(p) for p in enc]
    s2 = [torch.zeros_like(p) for p in enc]
    g = torch.Generator(device=dev).manual_seed(batch)
    x = torch.randn(batch, 3, sz["image_size"], sz["image_size"], device=dev, generator=g)
    y = torch.randint(0, 4, (batch,), device=dev, generator=g)
    chunk = max(1, sz["chunk_images"] // batch)
    n = math.ceil(sz["score_images"] / (chunk * batch)) * chunk

    def one():
      net.zero_grad(set_to_none=True)
      with autocast():
        logits = fn(x)
      F.cross_entropy(logits.float(), y).backward()
      with torch.no_grad():
        torch._foreach_add_(s1, [p.grad for p in enc])
        torch._foreach_addcmul_(s2, [p.grad for p in enc], [p.grad for p in enc])

    peak_reset()
    t = time.perf_counter()
    one()  # Warm-up (and compilation).
    sync()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n):
      one()
    sync()
    seconds = time.perf_counter() - t
    images = n * batch
    return {"framework": "torch", "how": how, "batch": batch, "images": images,
            "seconds": seconds, "images_per_s": images / seconds,
            "seconds_per_10k": seconds * 10_000 / images, "first_call_s_incl_compile": first,
            "peak_memory_bytes": peak()}

  def step(mode, how):
    net = fresh()
    masks = torch_modes.set_mode(net, mode, k_percent=sz["k_percent"], device=dev)
    fn = compiled_or_eager(net, how)
    named = dict(net.named_parameters())
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3,
                          momentum=0.9)
    b = sz["step_batch"]
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(b, 3, sz["image_size"], sz["image_size"], device=dev, generator=g)
    y = torch.randint(0, 4, (b,), device=dev, generator=g)

    def one():
      opt.zero_grad(set_to_none=True)
      with autocast():
        logits = fn(x)
      loss = F.cross_entropy(logits.float(), y)
      loss.backward()
      for name, m in masks.items():  # The reference SH-PEFT step: masked gradients.
        named[name].grad.mul_(m)
      opt.step()
      return loss

    peak_reset()
    t = time.perf_counter()
    for _ in range(sz["warmup"]):
      one()
    sync()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(sz["steps"]):
      loss = one()
    loss = float(loss)
    seconds = time.perf_counter() - t
    return {"framework": "torch", "how": how, "mode": mode, "batch": b,
            "step_s": seconds / sz["steps"], "images_per_s": b * sz["steps"] / seconds,
            "warmup_s_incl_compile": first, "loss": loss, "peak_memory_bytes": peak()}

  # Compiling a ViT-B/16 forward + backward takes ~1 min per graph (each batch size and mode is
  # one): eager runs everything first, compiled runs the most telling comparisons first.
  b0, *rest = sz["score_batches"]
  if how == "eager":
    tasks = [("eager", "score", b) for b in sz["score_batches"]]
    tasks += [("eager", "step", m) for m in ("full", "shpeft", "lora")]
  else:
    tasks = [("compile", "score", b0), ("compile", "step", "full"), ("compile", "step", "shpeft")]
    tasks += [("compile", "score", b) for b in rest] + [("compile", "step", "lora")]
  for how, part, arg in tasks:
    tags = {"framework": "torch", "how": how, ("batch" if part == "score" else "mode"): arg}
    try:
      budget.need(15 if how == "eager" else 90, f"torch {how} {part} {arg}")
      r = score(arg, how) if part == "score" else step(arg, how)
    except Skip as e:
      r = {**tags, "skipped": str(e)}
    except Exception as e:  # pylint: disable=broad-except
      r = {**tags, "error": f"{type(e).__name__}: {e}"[:500]}
    out["score_pass" if part == "score" else "train_step"].append(r)
  return out


# ------------------------------------------------------------------------------------------------
# Driver


def _child(args) -> None:
  """`--_child step:MODE | hostfed: | tower:INDEX | torch:WEIGHTS`: one part in its own process,
  JSON on stdout, with the process's own start (import + device init) and total seconds: on the
  H200 a step's process took 80-120 s of which compile 20-27 s (2026-12-04), so they are logged."""
  t0 = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()
  startup = time.perf_counter() - t0
  sz = sizes(args.dry_run)
  kind, _, arg = args._child.partition(":")
  if kind == "step":
    r = train_step(arg, sz, args.dtype)
  elif kind == "hostfed":
    r = host_fed(sz, args.dtype)
  elif kind == "tower":
    r = tower_check(int(arg), sz, args.dtype, Budget(args.budget_s),
                    device_info()["peak_bf16_tflops"])
  else:  # torch:WEIGHTS (eager) or torch+compile:WEIGHTS
    r = torch_check(arg, sz, Budget(args.budget_s), "compile" if kind == "torch+compile" else "eager")
  r.update(process_startup_s=startup, process_s=time.perf_counter() - t0)
  print("RESULT " + json.dumps(r), flush=True)


def _torch_compile(args) -> bool:
  # Inductor on a CPU needs a C++ toolchain and minutes: the dry run stays eager.
  return not (args.no_torch_compile or args.dry_run)


def _run_isolated(args, child: str, budget: Budget, what: str) -> dict:
  budget.need(20, what)
  cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--dtype", args.dtype,
         "--budget_s", str(int(budget.left()) - 5), "--_child", child]
  cmd += ["--dry_run"] if args.dry_run else []
  cmd += ["--no_torch_compile"] if args.no_torch_compile else []
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(budget.left() - 2, 1))
  except subprocess.TimeoutExpired as e:
    raise Skip(f"{what}: killed at the budget ({e.timeout:.0f} s)") from e
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))
  return json.loads(lines[-1][len("RESULT "):])


def _try(results: list, what: str, fn, **tags):
  t = time.perf_counter()
  try:
    r = fn()
  except Skip as e:
    r = {**tags, "skipped": str(e)}
  except Exception as e:  # pylint: disable=broad-except
    r = {**tags, "error": f"{type(e).__name__}: {e}"[:1000]}
  print(f"gpu_check: {what}: " + ("ok" if "error" not in r and "skipped" not in r
                                 else r.get("error") or r.get("skipped"))
        + f" ({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)
  results.append(r)
  return r


def _torch_part(args, weights: str, budget: Budget, isolate: bool, compile_too: bool) -> dict:
  tr = []
  child = f"torch{'+compile' if compile_too else ''}:{weights}"
  _try(tr, "PyTorch" + (" compile" if compile_too else " eager"), lambda: (
      _run_isolated(args, child, budget, "PyTorch") if isolate
      else torch_check(weights, sizes(args.dry_run), budget,
                       "compile" if compile_too else "eager")))
  return tr[0]


def save(report: dict) -> None:
  """The JSON so far (complete: false until the end): a run cut short keeps what it measured."""
  path = os.path.join(report["out"], "gpu_check.json")
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
  os.replace(path + ".tmp", path)


def run(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  budget = Budget(args.budget_s)
  sz = sizes(args.dry_run)
  info = device_info()
  isolate = args.isolate if args.isolate is not None else not args.dry_run
  report = {"check": "gpu_check", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dry_run": args.dry_run, "dtype": f"{args.dtype} compute, float32 params",
            "sizes": sz, "device": info, "isolated_processes": isolate,
            "flops_basis": "model FLOPs = 3 x forward FLOPs; forward = the analytic matmul count "
                           "(XLA's cost analysis misses cuBLAS calls on a GPU; recorded beside)",
            "score_pass": [], "train_step": [], "selection": None, "host_fed": None,
            "torch": None, "towers": [], "out": args.out, "complete": False}
  peak = info["peak_bf16_tflops"]
  parts = set(args.parts.split(",")) if args.parts != "all" else set(PARTS)
  if args.skip_torch:
    parts -= {"torch", "compile"}
  report["parts"] = sorted(parts)

  model, params = build(sz, args.dtype)
  report["forward_flops_per_image_analytic"] = analytic_forward_flops(model.config)
  if "score" in parts:
    for b in sz["score_batches"]:
      _try(report["score_pass"], f"JAX score pass, batch {b}",
           lambda b=b: (budget.need(20, f"score pass at batch {b}"),
                        score_pass(model, params, b, sz, peak))[1], framework="jax", batch=b)
      save(report)
  if "steps" in parts:
    _steps(args, report, sz, budget, isolate)
  if "selection" in parts:
    sel = []
    _try(sel, "selection", lambda: (budget.need(15, "selection"), selection_check(sz))[1])
    report["selection"] = sel[0]
    save(report)
  if "hostfed" in parts:
    fed = []
    _try(fed, "host-fed step", lambda: (
        _run_isolated(args, "hostfed:", budget, "host-fed step") if isolate
        else (budget.need(10, "host-fed step"), host_fed(sz, args.dtype))[1]))
    report["host_fed"] = fed[0]
    save(report)

  weights = None
  if parts & {"torch", "compile"}:
    from shpeft_jax import export  # pylint: disable=g-import-not-at-top
    weights = os.path.join(tempfile.mkdtemp(prefix="gpu_check_"), "weights.safetensors")
    export.export_params(jax.device_get(params), {"model": sz["model"],
                                                  "image_size": sz["image_size"],
                                                  "num_classes": 4}, "openai", weights)
  del params
  try:
    if "torch" in parts:  # PyTorch eager first (the same-run ratios), torch.compile last.
      report["torch"] = _torch_part(args, weights, budget, isolate, compile_too=False)
      save(report)
    if "towers" in parts:
      for i, (label, _, _) in enumerate(sz["towers"]):
        _try(report["towers"], f"{label} tower", lambda i=i, label=label: (
            _run_isolated(args, f"tower:{i}", budget, f"{label} tower") if isolate
            else tower_check(i, sz, args.dtype, budget, peak)), tower=label)
        save(report)
    if "compile" in parts and _torch_compile(args):
      _compiled_torch(args, report, weights, budget, isolate)
  finally:
    if weights:
      shutil.rmtree(os.path.dirname(weights), ignore_errors=True)
  report["targets"] = targets(report)
  report["seconds_total"] = args.budget_s - budget.left()
  report["complete"] = True
  return report


def _steps(args, report: dict, sz: dict, budget: Budget, isolate: bool) -> None:
  for mode in MODES:
    fn = ((lambda m=mode: _run_isolated(args, f"step:{m}", budget, f"{m} step")) if isolate
          else (lambda m=mode: (budget.need(10, f"{m} step"), train_step(m, sz, args.dtype))[1]))
    _try(report["train_step"], f"JAX {mode} step", fn, framework="jax", mode=mode)
    save(report)
  full = next((r for r in report["train_step"] if r.get("mode") == "full" and "step_s" in r), None)
  for r in report["train_step"]:
    if full and "step_s" in r:
      r["step_time_over_full"] = r["step_s"] / full["step_s"]


def _compiled_torch(args, report: dict, weights: str, budget: Budget, isolate: bool) -> None:
  compiled = _torch_part(args, weights, budget, isolate, compile_too=True)
  report["torch"] = report["torch"] or {"score_pass": [], "train_step": []}
  for key in ("score_pass", "train_step"):
    report["torch"].setdefault(key, []).extend(
        r for r in compiled.get(key, []) if r.get("how") == "compile")
  if "error" in compiled or "skipped" in compiled:
    report["torch"]["compile"] = compiled.get("error") or compiled.get("skipped")


def targets(report) -> dict:
  """The issue's goals, each True / False / None (not measured)."""
  ok = lambda r: r and "error" not in r and "skipped" not in r
  jax_score = [r for r in report["score_pass"] if ok(r)]
  steps = {r["mode"]: r for r in report["train_step"] if ok(r)}
  torch = report.get("torch") or {}
  t_steps = [r for r in torch.get("train_step", []) if ok(r)]
  best_t = {}
  for r in t_steps:
    if r["mode"] not in best_t or r["images_per_s"] > best_t[r["mode"]]["images_per_s"]:
      best_t[r["mode"]] = r
  best_score = min((r["seconds_per_10k"] for r in jax_score), default=None)
  out = {"score_10k_under_5s": None if best_score is None else best_score < 5.0,
         "score_10k_under_3s": None if best_score is None else best_score < 3.0,
         "masked_step_within_1.05x_full": (steps["shpeft"]["step_time_over_full"] <= 1.05
                                           if "shpeft" in steps and "full" in steps else None)}
  for mode in ("full", "shpeft", "lora"):
    out[f"jax_{mode}_step_at_least_torch"] = (
        steps[mode]["images_per_s"] >= best_t[mode]["images_per_s"]
        if mode in steps and mode in best_t else None)
  return out


def _fmt(x, spec=".1f", scale=1.0):
  return "-" if x is None else format(x * scale, spec)


def markdown(report) -> str:
  d, mb = report["device"], 1 / 2 ** 20
  lines = [f"## GPU check {report['date_utc']} on {d['device_kind']} ({d['backend']}, "
           f"jax {d['jax']}" + (", DRY RUN: tiny model on CPU, numbers mean nothing" if
                                 report["dry_run"] else "") + ")", "",
           f"Model {report['sizes']['model']} at {report['sizes']['image_size']} px, "
           f"{report['dtype']}; peak bf16 {_fmt(d['peak_bf16_tflops'], '.0f')} TFLOP/s; "
           f"{report['flops_basis']}.", "",
           "| score pass | batch | images/s | s per 10k | MFU | first call (incl. compile) |",
           "|---|---|---|---|---|---|"]
  torch = report.get("torch") or {}
  for r in report["score_pass"] + torch.get("score_pass", []):
    name = r["framework"] + (f" ({r['how']})" if "how" in r else " (lax.scan)")
    if "images_per_s" not in r:
      lines.append(f"| {name} | {r['batch']} | {r.get('error') or r.get('skipped')} | | | |")
      continue
    lines.append(f"| {name} | {r['batch']} | {_fmt(r['images_per_s'])} | "
                 f"{_fmt(r['seconds_per_10k'], '.2f')} | {_fmt(r.get('mfu'), '.1%')} | "
                 f"{_fmt(r['first_call_s_incl_compile'])} s |")
  lines += ["", "| train step | mode | images/s | / full (time) | peak device memory | "
            "compiled args + temp | optimizer state |", "|---|---|---|---|---|---|---|"]
  for r in report["train_step"] + torch.get("train_step", []):
    name = r["framework"] + (f" ({r['how']})" if "how" in r else "")
    if "images_per_s" not in r:
      lines.append(f"| {name} | {r['mode']} | {r.get('error') or r.get('skipped')} | | | | |")
      continue
    dm = (r.get("device_memory") or {}).get("peak_bytes_in_use", r.get("peak_memory_bytes"))
    ma = r.get("memory_analysis") or {}
    args_temp = (ma["argument_size_in_bytes"] + ma["temp_size_in_bytes"]) if ma else None
    lines.append(f"| {name} | {r['mode']} | {_fmt(r['images_per_s'])} | "
                 f"{_fmt(r.get('step_time_over_full'), '.3f')} | {_fmt(dm, '.0f', mb)} MB | "
                 f"{_fmt(args_temp, '.0f', mb)} MB | {_fmt(r.get('opt_state_bytes'), '.1f', mb)} MB |")
  s = report.get("selection") or {}
  lines += ["", "| top-k selection | n | k | seconds | agree |", "|---|---|---|---|---|"]
  if "n" in s:
    lines.append(f"| device (sort) | {s['n']:,} | {s['k']:,} | {_fmt(s['device_s'], '.3f')} | "
                 f"{s['agree']} |")
    lines.append(f"| host (`select_top_k`, + {_fmt(s['host_transfer_s'], '.2f')} s transfer) | "
                 f"{s['n']:,} | {s['k']:,} | {_fmt(s['host_select_s'], '.3f')} | {s['agree']} |")
  else:
    lines.append(f"| {s.get('error') or s.get('skipped')} | | | | |")
  h = report.get("host_fed") or {}
  lines += ["", "| fed from the host (SH-PEFT step) | batch | device-resident images/s | host-fed "
            "images/s | fed / resident (time) | copy float32 | copy uint8 |", "|---|---|---|---|---|---|---|"]
  if "host_fed_step_s" in h:
    lines.append(f"| jax | {h['batch']} | {_fmt(h['resident_images_per_s'])} | "
                 f"{_fmt(h['host_fed_images_per_s'])} | {_fmt(h['host_fed_over_resident'], '.3f')} | "
                 f"{_fmt(h['copy_float32_s'], '.2f', 1e3)} ms | {_fmt(h['copy_uint8_s'], '.2f', 1e3)} ms |")
  else:
    lines.append(f"| {h.get('error') or h.get('skipped') or 'not run'} | | | | | | |")
  lines += ["", "| larger tower | model | batch | score images/s | score MFU | s per 10k | SH-PEFT "
            "step images/s | full step images/s | SH-PEFT / full (time) | full step peak memory |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for t in report.get("towers") or []:
    if "model" not in t:
      lines.append(f"| {t.get('tower')} | {t.get('error') or t.get('skipped')} | | | | | | | | |")
      continue
    sp, sh, fu = (t.get(k) or {} for k in ("score_pass", "shpeft_step", "full_step"))
    why = lambda r: r.get("error") or r.get("skipped") or "-"
    peak_b = (fu.get("device_memory") or {}).get("peak_bytes_in_use")
    lines.append(
        f"| {t['tower']} | `{t['model']}` | {t['batch']} | "
        f"{_fmt(sp['images_per_s']) if 'images_per_s' in sp else why(sp)} | "
        f"{_fmt(sp.get('mfu'), '.1%')} | {_fmt(sp.get('seconds_per_10k'), '.2f')} | "
        f"{_fmt(sh['images_per_s']) if 'images_per_s' in sh else why(sh)} | "
        f"{_fmt(fu['images_per_s']) if 'images_per_s' in fu else why(fu)} | "
        f"{_fmt(sh.get('step_time_over_full'), '.3f')} | {_fmt(peak_b, '.0f', mb)} MB |")
  lines += ["", "| goal | met |", "|---|---|"]
  lines += [f"| {k} | {'-' if v is None else v} |" for k, v in report["targets"].items()]
  return "\n".join(lines) + "\n"


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--out", required=True, help="directory for gpu_check.json / gpu_check.md")
  ap.add_argument("--dry_run", action="store_true",
                  help="tiny model and sizes on whatever device is there (CPU): checks the script")
  ap.add_argument("--dtype", default="bfloat16", help="compute dtype (params stay float32)")
  ap.add_argument("--budget_s", type=float, default=540.0,
                  help="wall-clock budget; parts that would overrun it are skipped")
  ap.add_argument("--parts", default="all",
                  help=f"comma-separated subset of {','.join(PARTS)} (default: all, in that order)")
  ap.add_argument("--skip_torch", action="store_true", help="= --parts without torch, compile")
  ap.add_argument("--no_torch_compile", action="store_true",
                  help="PyTorch eager only (default: eager, then torch.compile if time is left)")
  ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                  help="each JAX step and PyTorch in its own process, so that each peak memory is "
                       "its own (default: on for the GPU run, off for --dry_run)")
  ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
  return ap.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  unknown = set(args.parts.split(",")) - set(PARTS) if args.parts != "all" else set()
  if unknown:
    fail(f"unknown --parts {sorted(unknown)}; choose from {','.join(PARTS)}")
  if not args.dry_run:
    # Before JAX starts: no 75% preallocation (PyTorch shares the GPU; peaks are allocations).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args._child:
    _child(args)
    return
  try:
    import jax  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    fail(f"JAX is not importable with {sys.executable} ({e}); use the Python that has jax "
         "(PYTHON=... for gpu_check.sh)")
  if not args.dry_run:
    try:
      gpus = jax.devices("gpu")
    except RuntimeError as e:
      fail(f"no GPU visible to JAX ({str(e).splitlines()[0][:120]}); run on a GPU machine with "
           "jax[cuda], or pass --dry_run for the tiny CPU check")
    if not gpus:
      fail("no GPU visible to JAX; run on a GPU machine, or pass --dry_run")

  def on_alarm(*_):
    raise TimeoutError(f"the check overran --budget_s={args.budget_s:.0f} s by 30 s")

  os.makedirs(args.out, exist_ok=True)
  def hard_exit():  # A part stuck in C++ (a hung driver, compiler) never returns to Python.
    print(f"gpu_check: error: stuck past --budget_s={args.budget_s:.0f} s + 90 s; exiting",
          file=sys.stderr, flush=True)
    os._exit(3)

  signal.signal(signal.SIGALRM, on_alarm)  # Never hang: a part over the budget ends the run...
  signal.alarm(int(args.budget_s) + 30)
  watchdog = threading.Timer(args.budget_s + 90, hard_exit)  # ... or, failing that, the process.
  watchdog.daemon = True
  watchdog.start()
  try:
    report = run(args)
  except TimeoutError as e:
    fail(str(e), code=3)
  finally:
    signal.alarm(0)
    watchdog.cancel()
  report["forbidden_modules_loaded"] = sorted(  # (a None entry marks a module as absent)
      m for m, v in sys.modules.items() if m.split(".")[0] in FORBIDDEN and v is not None)
  with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1)
  md = markdown(report)
  with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
    f.write(md)
  print(md)
  bad = [r for r in report["score_pass"] + report["train_step"] if "error" in r]
  if bad:
    fail(f"{len(bad)} JAX part(s) failed; see {args.out}/gpu_check.json", code=1)


if __name__ == "__main__":
  main()
