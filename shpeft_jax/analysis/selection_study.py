r"""Can the demo tell selections apart? A study of demo settings, with the runs vmapped over seeds.

  python -m shpeft_jax.analysis.selection_study --workdir /tmp/sel_study \
      --candidates base,k5,wd,k5_wd [--seeds 0,1,2] [--lr_grid 0.1,0.3,1] [--steps 300]

For each candidate demo setting (tower shape, image size, k, pre-training length and weight
decay; `CANDIDATES`):

1. pre-trains the tower on digits 0-4 (AdamW, cosine, clipping, as `configs/demo.py`'s pretrain
   stage; cached in WORKDIR/<candidate>/pretrain.msgpack);
2. measures what the budget looks like: per parameter type, the share of the k selected weights
   (SH-PEFT's hybrid L2 mask) and the count of the type relative to k, and how far pre-training
   moved each kind of weight from its initialisation (the relative change ||w - w0|| / ||w0||);
3. transfers to digits 5-9 with SH-PEFT (hybrid L2, lambda = 1), the random mask of the same k,
   I_ta only and I_td-L2 only, for every seed and every learning rate of the grid, ALL IN ONE
   jitted program: the runs differ only in data (mask, head init, data order, learning rate), so
   one `jax.vmap` over runs of one `lax.scan` over steps trains them together, and the program
   compiles once per candidate instead of once per run;
4. picks each method's learning rate on the validation split (best mean validation macro F1 over
   the seeds), reads the test macro F1 at that rate only, and compares every method with SH-PEFT
   on the same seeds (`shpeft_jax.evaluation.stats`: mean +- sd, paired t interval, wins).

A seed sets the head initialisation, the order of the training batches, the scoring batches and
the random mask (never the pre-trained encoder), as in the trainer. The transfer step is the
trainer's (the paper's SGD from `optim.build`, momentum 0.9, cosine, no warm-up, gradient
and update masked, frozen weights kept by select); data come from the same digits splits and the
same evaluation transform, held in memory instead of going through tf.data.

Results: WORKDIR/<candidate>/study.json and WORKDIR/summary.md (one table per candidate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Sequence

import numpy as np

METHODS = ("shpeft", "random", "ta", "td_l2")
# (importance mode, estimator) of each scored method (the sweep's Table 4 keys; `shpeft` is
# hybrid_l2); `random` has uniform scores through the same exact top-k.
_SCORING = {"shpeft": ("hybrid", "l2"), "ta": ("ta", "l2"), "td_l1": ("td", "l1"),
            "hybrid_l1": ("hybrid", "l1"), "td_l2": ("td", "l2")}
# Methods whose trainable set is a rule over parameter names (peft/methods.py), no scores.
_RULES = ("full", "linear", "bitfit", "ln", "attn")
KNOWN = tuple(_SCORING) + ("random",) + _RULES
# The linear probe's input is the L2-normalised feature: it needs rates two decades higher
# (configs/demo.py); its grid is the shared one times 100.
_LR_SCALE = {"linear": 100.0}


@dataclasses.dataclass(frozen=True)
class Candidate:
  name: str
  width: int = 64
  layers: int = 4
  heads: int = 4
  mlp_dim: int = 256
  patch: int = 4
  image_size: int = 16
  k_percent: float = 1.0
  pretrain_steps: int = 1500
  pretrain_lr: float = 1e-3
  pretrain_wd: float = 1e-4
  note: str = ""


CANDIDATES = {c.name: c for c in (
    Candidate("base", note="configs/demo.py today"),
    Candidate("k5", k_percent=5.0, note="k = 5%: LayerNorm count / k like ViT-B/16 at 1%"),
    Candidate("k10", k_percent=10.0, note="k = 10%"),
    Candidate("wd", pretrain_wd=1.0, note="pre-training AdamW weight decay 1.0"),
    Candidate("long_wd", pretrain_wd=1.0, pretrain_steps=3000, note="3000 steps, decay 1.0"),
    Candidate("k5_wd", k_percent=5.0, pretrain_wd=1.0, note="k = 5% and decay 1.0"),
    Candidate("k10_wd", k_percent=10.0, pretrain_wd=1.0, note="k = 10% and decay 1.0"),
    Candidate("w128", width=128, mlp_dim=512, note="width 128 (4x the weights)"),
    Candidate("w128_wd", width=128, mlp_dim=512, pretrain_wd=1.0, note="width 128, decay 1.0"),
    Candidate("img32", image_size=32, patch=8, note="32 px, patch 8 (same tokens, 4x conv1)"),
)}


def _log(msg: str) -> None:
  print(f"[selection_study] {time.strftime('%H:%M:%S')} {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Data: the demo's digits splits through the evaluation transform, in memory.


def load_task(task: str, image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import demo  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import clip_vit  # pylint: disable=g-import-not-at-top
  out = {}
  for split, (images, labels) in demo.digits_splits(task).items():
    # The evaluation transform of input_pipeline (square images: resize, nothing to crop), on the
    # whole split at once; checked against `preprocess_for_eval` on the first image.
    x = tf.repeat(tf.constant(images[..., None], tf.float32), 3, axis=-1)
    x = tf.round(tf.clip_by_value(tf.image.resize(x, [image_size, image_size], method="bicubic",
                                                  antialias=True), 0.0, 255.0))  # uint8 levels
    x = ((x / 255.0 - tf.constant(clip_vit.CLIP_MEAN)) /
         tf.constant(clip_vit.CLIP_STD)).numpy()
    np.testing.assert_allclose(x[0], input_pipeline.preprocess_for_eval(images[0], image_size),
                               atol=1e-5)
    out[split] = (x.astype(np.float32), labels.astype(np.int32))
  return out


def batch_order(n: int, batch: int, steps: int, seed: int) -> np.ndarray:
  """[steps, batch] example indices: a fresh permutation per epoch, batches across epochs."""
  rng = np.random.default_rng(seed)
  need = steps * batch
  stream = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
  return stream[:need].reshape(steps, batch)


# ------------------------------------------------------------------------------------------------
# Model, pre-training, scoring.


def build(c: Candidate):
  from shpeft_jax.models import clip_vit  # pylint: disable=g-import-not-at-top
  vit = clip_vit.ViTConfig(name=c.name, patch_size=c.patch, width=c.width, layers=c.layers,
                           heads=c.heads, mlp_dim=c.mlp_dim, image_size=c.image_size)
  return clip_vit.ClipClassifier(vit, num_classes=5)


def _loss(model):
  import optax  # pylint: disable=g-import-not-at-top

  def loss(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


def pretrain(c: Candidate, data, workdir: str):
  """AdamW on the source task (the demo's pretrain stage); cached as msgpack."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import serialization  # pylint: disable=g-import-not-at-top
  model = build(c)
  init = model.init(jax.random.PRNGKey(0), data["train"][0][:1])["params"]
  # Candidates that differ only after pre-training (k) share it.
  key = (f"w{c.width}_l{c.layers}_h{c.heads}_m{c.mlp_dim}_p{c.patch}_i{c.image_size}_"
         f"s{c.pretrain_steps}_lr{c.pretrain_lr:g}_wd{c.pretrain_wd:g}")
  path = os.path.join(workdir, f"pretrain_{key}.msgpack")
  if os.path.exists(path):
    with open(path, "rb") as f:
      return init, serialization.from_bytes(init, f.read())
  sched = optax.warmup_cosine_decay_schedule(0.0, c.pretrain_lr, 100, c.pretrain_steps, 0.0)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(sched, weight_decay=c.pretrain_wd))
  x, y = (jax.numpy.asarray(a) for a in data["train"])
  order = jax.numpy.asarray(batch_order(len(y), 64, c.pretrain_steps, seed=0))
  grad = jax.grad(_loss(model))

  @jax.jit
  def run(params):
    def step(carry, idx):
      p, s = carry
      u, s = tx.update(grad(p, x[idx], y[idx]), s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), order)
    return p

  t0 = time.time()
  params = jax.device_get(run(init))
  _log(f"{c.name}: pre-trained {c.pretrain_steps} steps in {time.time() - t0:.0f}s")
  with open(path, "wb") as f:
    f.write(serialization.to_bytes(params))
  return init, params


def evaluate(model, params, x, y) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from shpeft_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  logits = np.asarray(jax.jit(model.apply)({"params": params}, x))
  return metrics.classification_metrics(logits, y, 5)


def fresh_head(model, sample, seed: int):
  import jax  # pylint: disable=g-import-not-at-top
  return model.init(jax.random.PRNGKey(seed), sample)["params"]["head"]


def masks_for_seed(c: Candidate, model, encoder, data, seed: int, k_percent: float,
                   methods: Sequence[str] = METHODS):
  """{method: mask tree (encoder bools, head None)} and the hybrid selection's info."""
  import jax  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import importance, methods as methods_lib, selection  # pylint: disable=g-import-not-at-top
  x, y = data["train"]
  params = {"encoder": encoder, "head": fresh_head(model, x[:1], seed)}
  nb = len(y) // 64
  order = batch_order(len(y), 64, nb, seed=1000 + seed)  # One epoch of scoring batches.
  batches = {"image": x[order], "label": y[order]}
  loss_fn = importance.cross_entropy_loss_fn(model.apply)
  acc = importance.accumulate_gradients(loss_fn, params, batches)
  out, info = {}, None
  for method in dict.fromkeys(("shpeft",) + tuple(methods)):
    if method in _RULES:
      out[method] = methods_lib.trainable_mask({"method": method}, params, log=False)
      continue
    if method == "random":
      rng = np.random.default_rng(2000 + seed)
      scores = {"encoder": jax.tree.map(lambda w: rng.random(w.shape), encoder), "head": None}
    else:
      mode, est = _SCORING[method]
      scores = importance.hybrid_importance(params, acc, estimator=est, mode=mode, lam=1.0)
    mask, sel = selection.select_top_k(scores, k_percent=k_percent)
    out[method] = mask
    if method == "shpeft":
      info = sel
  return out, info


# ------------------------------------------------------------------------------------------------
# The transfer: every (method, seed, lr) run in one vmapped program.


def train_runs(model, encoder, heads, masks, lrs, orders, data, steps: int):
  """Trains R runs at once: heads / masks stacked on a leading run axis, lrs [R], orders [R, T, B].

  Returns the stacked final params.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from shpeft_jax import optim  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import masking  # pylint: disable=g-import-not-at-top
  # lr = 1 here, the run's lr multiplies the update: the SGD chain (momentum trace, cosine
  # schedule, no weight decay) is linear in the learning rate, so this is the trainer's step.
  tx = optim.build(dict(lr=1.0, momentum=0.9), steps).tx
  x, y = (jnp.asarray(a) for a in data["train"])
  grad = jax.grad(_loss(model))

  def one_run(head, mask, lr, order):
    params = {"encoder": encoder, "head": head}
    full_mask = {"encoder": mask, "head": jax.tree.map(lambda h: jnp.ones(h.shape, bool), head)}

    def step(carry, idx):
      p, s = carry
      g = jax.tree.map(lambda gi, m: jnp.where(m, gi, 0.0), grad(p, x[idx], y[idx]), full_mask)
      u, s = tx.update(g, s, p)
      u = jax.tree.map(lambda ui, m: jnp.where(m, lr * ui, -0.0), u, full_mask)
      return (masking.apply_updates(p, u, full_mask), s), None

    (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), order)
    return p

  return jax.jit(jax.vmap(one_run))(heads, masks, jnp.asarray(lrs, jnp.float32),
                                    jnp.asarray(orders))


def _stack(trees):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


# ------------------------------------------------------------------------------------------------
# Budget proportions and how far pre-training moved the weights.


def budget_table(mask, info, encoder) -> dict:
  from shpeft_jax.peft import selection  # pylint: disable=g-import-not-at-top
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  st = selection.mask_statistics(mask)
  # LayerNorm scales and biases apart (the measure is the scales).
  flat = utils.flatten_names(mask)
  ln_scale = sum(int(np.count_nonzero(m)) for n, m in flat.items()
                 if selection.param_type_of(n) == "layernorm" and n.endswith("/scale"))
  ln_scale_size = sum(int(np.size(m)) for n, m in flat.items()
                      if selection.param_type_of(n) == "layernorm" and n.endswith("/scale"))
  k = info.k
  rows = {t: {"share_of_k": v["selected"] / k, "size_over_k": v["size"] / k,
              "fraction_selected": v["fraction"]} for t, v in st["per_type"].items()}
  rows["layernorm_scale"] = {"share_of_k": ln_scale / k, "size_over_k": ln_scale_size / k,
                             "fraction_selected": ln_scale / ln_scale_size}
  return {"k": k, "n": info.n, "per_type": rows}


def weight_change(init, trained) -> dict:
  """Relative change ||w - w0|| / ||w0|| of the encoder's kernels and of its LayerNorm scales."""
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import selection  # pylint: disable=g-import-not-at-top
  a, b = utils.flatten_names(init["encoder"]), utils.flatten_names(trained["encoder"])
  groups: dict[str, list[float]] = {}
  for n in a:
    t = selection.param_type_of(n) + ("_bias" if n.endswith("bias") else "")
    d = np.asarray(b[n], np.float64) - np.asarray(a[n], np.float64)
    groups.setdefault(t, [0.0, 0.0])
    groups[t][0] += float(np.sum(d * d))
    groups[t][1] += float(np.sum(np.asarray(a[n], np.float64) ** 2))
  return {t: math.sqrt(v[0] / v[1]) if v[1] else float("nan") for t, v in sorted(groups.items())}


# ------------------------------------------------------------------------------------------------


def budget_only(c: Candidate, workdir: str, seed: int = 0) -> dict:
  """Steps 1-2 alone (pre-training, cached, and the budget table of one seed's SH-PEFT mask)."""
  os.makedirs(workdir, exist_ok=True)
  source, target = load_task("source", c.image_size), load_task("target", c.image_size)
  model = build(c)
  init, pre = pretrain(c, source, os.path.dirname(workdir.rstrip("/")))
  m, info = masks_for_seed(c, model, pre["encoder"], target, seed, c.k_percent, ("shpeft",))
  out = {"candidate": dataclasses.asdict(c), "seed": seed,
         "pretrain_source_test": evaluate(model, pre, *source["test"]),
         "weight_change": weight_change(init, pre),
         "budget": budget_table(m["shpeft"], info, pre["encoder"])}
  with open(os.path.join(workdir, "budget.json"), "w") as f:
    json.dump(out, f, indent=2, default=float)
  return out


def _train_and_score(model, encoder, heads, masks, lrs, orders, runs, target, steps):
  import jax  # pylint: disable=g-import-not-at-top
  from shpeft_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  final = jax.device_get(train_runs(model, encoder, _stack(heads), _stack(masks), lrs,
                                    np.stack(orders), target, steps))
  apply_all = jax.jit(jax.vmap(lambda p, x: model.apply({"params": p}, x), in_axes=(0, None)))
  logits = {split: np.asarray(apply_all(final, target[split][0]))
            for split in ("validation", "test")}
  out = []
  for i, (method, s, lr) in enumerate(runs):
    f1 = {split: metrics.classification_metrics(logits[split][i], target[split][1], 5)["f1_macro"]
          for split in logits}
    out.append({"method": method, "seed": s, "lr": lr, **f1})
  return out


def study(c: Candidate, workdir: str, seeds: Sequence[int], lr_grid: Sequence[float],
          steps: int, methods: Sequence[str] = METHODS) -> dict:
  from shpeft_jax.evaluation import stats  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  out_path = os.path.join(workdir, "study.json")
  # Runs already in study.json are kept (a wider grid or more seeds only trains what is new).
  done = []
  if os.path.exists(out_path):
    with open(out_path) as f:
      prev = json.load(f)
    if prev["steps"] != steps:
      raise SystemExit(f"{out_path} has runs of {prev['steps']} steps, not {steps}; use another "
                       "--workdir.")
    done = prev["runs"]
  have = {(r["method"], r["seed"], r["lr"]) for r in done}
  t0 = time.time()
  source, target = load_task("source", c.image_size), load_task("target", c.image_size)
  model = build(c)
  init, pre = pretrain(c, source, os.path.dirname(workdir.rstrip("/")))
  t_pre = time.time() - t0
  pre_test = evaluate(model, pre, *source["test"])
  encoder = pre["encoder"]
  runs, heads, masks, lrs, orders = [], [], [], [], []
  budget = None
  for s in seeds:
    todo = [(method, lr) for method in methods
            for lr in (g * _LR_SCALE.get(method, 1.0) for g in lr_grid)
            if (method, s, lr) not in have]
    if not todo and budget is not None:
      continue
    m, info = masks_for_seed(c, model, encoder, target, s, c.k_percent, methods)
    if budget is None:
      budget = budget_table(m["shpeft"], info, encoder)
    head = fresh_head(model, target["train"][0][:1], s)
    order = batch_order(len(target["train"][1]), 64, steps, seed=s)
    for method, lr in todo:
      runs.append((method, s, lr))
      heads.append(head)
      masks.append(m[method]["encoder"])
      lrs.append(lr)
      orders.append(order)
  t1 = time.time()
  all_runs = list(done)
  if runs:
    all_runs += _train_and_score(model, encoder, heads, masks, lrs, orders, runs, target, steps)
  t_train = time.time() - t1
  results = [r for r in all_runs if r["method"] in methods and r["seed"] in seeds and
             r["lr"] in {g * _LR_SCALE.get(r["method"], 1.0) for g in lr_grid}]
  # Each method's lr: best mean validation F1 over the seeds; test read at that lr only.
  chosen, test_at = {}, {}
  for method in methods:
    grid = [g * _LR_SCALE.get(method, 1.0) for g in lr_grid]
    by_lr = {lr: np.mean([r["validation"] for r in results
                          if r["method"] == method and r["lr"] == lr]) for lr in grid}
    chosen[method] = max(grid, key=lambda lr: by_lr[lr])
    test_at[method] = {r["seed"]: r["test"] for r in results
                       if r["method"] == method and r["lr"] == chosen[method]}
  cmp = stats.compare_methods(test_at, "shpeft")
  table = {m: {"lr": chosen[m], "summary": dataclasses.asdict(v["summary"]),
               "vs_shpeft": None if v["vs_reference"] is None
               else dataclasses.asdict(v["vs_reference"])} for m, v in cmp.items()}
  out = {"candidate": dataclasses.asdict(c), "seeds": list(seeds), "lr_grid": list(lr_grid),
         "methods": list(methods),
         "steps": steps, "pretrain_seconds": t_pre, "train_seconds": t_train,
         "num_runs": len(results), "new_runs": len(runs), "pretrain_source_test": pre_test,
         "weight_change": weight_change(init, pre), "budget": budget, "runs": all_runs,
         "table": table}
  with open(out_path, "w") as f:
    json.dump(out, f, indent=2, default=float)
  return out


def _budget_table(res: dict) -> list[str]:
  """Markdown rows: each parameter type's share of k and its change in pre-training."""
  lines = ["| type | share of k (SH-PEFT) | type size / k | relative change in pre-training |",
           "|---|---:|---:|---:|"]
  wc = res["weight_change"]
  for t, v in res["budget"]["per_type"].items():
    change = wc.get(t if t != "layernorm_scale" else "layernorm", float("nan"))
    lines.append(f"| {t} | {100 * v['share_of_k']:.1f}% | {v['size_over_k']:.2f} | "
                 f"{change:.3f} |")
  return lines


def budget_markdown(res: dict) -> str:
  c = res["candidate"]
  lines = [f"### {c['name']}: {c['note']} (budget only)", "",
           f"k = {c['k_percent']}% ({res['budget']['k']} of {res['budget']['n']}), source test F1 "
           f"{100 * res['pretrain_source_test']['f1_macro']:.1f}", "",
           *_budget_table(res)]
  return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
  from shpeft_jax.evaluation import stats  # pylint: disable=g-import-not-at-top
  c = res["candidate"]
  lines = [f"### {c['name']}: {c['note']}", "",
           f"width {c['width']}, {c['layers']} layers, {c['image_size']} px / patch {c['patch']}, "
           f"k = {c['k_percent']}% ({res['budget']['k']} of {res['budget']['n']}), pre-training "
           f"{c['pretrain_steps']} steps, decay {c['pretrain_wd']} (source test F1 "
           f"{100 * res['pretrain_source_test']['f1_macro']:.1f}); {res['num_runs']} runs ({res.get('new_runs', res['num_runs'])} new, trained "
           f"in {res['train_seconds']:.0f}s), pre-training {res['pretrain_seconds']:.0f}s.", "",
           *_budget_table(res)]
  lines += ["", f"| method | lr (validation) | test F1 % over {len(res['seeds'])} seeds | "
            "- SH-PEFT [95% t CI] | wins-ties-losses |", "|---|---:|---:|---:|---:|"]
  for m, v in res["table"].items():
    s = stats.Summary(**v["summary"])
    d = "" if v["vs_shpeft"] is None else stats.PairedDifference(**v["vs_shpeft"])
    lines.append(f"| {m} | {v['lr']:g} | {s.format(100)} | {d and d.format(100)} | "
                 f"{d and d.record} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--candidates", default="base,k5,wd,k5_wd")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--lr_grid", default="0.1,0.3,1")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"known: {','.join(KNOWN)} (shpeft is always scored: it is the reference)")
  parser.add_argument("--budget_only", action="store_true",
                      help="pre-train and measure the budget proportions, no transfer runs")
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  grid = [float(x) for x in args.lr_grid.split(",")]
  names = [n for n in args.candidates.split(",") if n]
  methods = [m for m in args.methods.split(",") if m]
  bad = [m for m in methods if m not in KNOWN]
  if bad:
    print(f"error: unknown method(s) {bad}; choose from {KNOWN}", file=sys.stderr)
    return 2
  unknown = [n for n in names if n not in CANDIDATES]
  if unknown:
    print(f"error: unknown candidate(s) {unknown}; choose from {sorted(CANDIDATES)}",
          file=sys.stderr)
    return 2
  parts = []
  for n in names:
    _log(f"candidate {n}")
    if args.budget_only:
      parts.append(budget_markdown(budget_only(CANDIDATES[n], os.path.join(args.workdir, n),
                                               seeds[0])))
    else:
      res = study(CANDIDATES[n], os.path.join(args.workdir, n), seeds, grid, args.steps, methods)
      parts.append(markdown(res))
    print(parts[-1], flush=True)
    with open(os.path.join(args.workdir, "budget.md" if args.budget_only else "summary.md"),
              "w") as f:
      f.write("\n".join(parts))
  return 0


if __name__ == "__main__":
  sys.exit(main())
