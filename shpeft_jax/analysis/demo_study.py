r"""The statistical study on the bundled demo data, end to end with the real trainer.

  python -m shpeft_jax.analysis.demo_study --workdir /tmp/shpeft_study \
      [--tasks target,even,odd] [--out docs/img]

1. Pre-trains the demo encoder (`demo_small`) on the source task (digits 0-4), exactly as
   `configs/demo.py` does (`WORKDIR/pretrain`, cached).
2. Fine-tunes that same encoder on each task with full fine-tuning and with SH-PEFT (k = 1%)
   through `shpeft_jax.runs` (`WORKDIR/<task>/{full,shpeft}`, cached: a rerun skips finished work).
3. Runs `python -m shpeft_jax.analysis sparsity` per task and `... hybridity` over all tasks
   (`WORKDIR/analysis/...`), and copies the PNGs to --out.

The digits tasks stand in for medical modalities (nothing else ships offline): every task is a
5-way classification of 8x8 digits upsampled to 16 px, so the study shows the mechanics and the
shape of the curves, not the paper's numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "configs", "demo.py")


def _log(msg: str) -> None:
  print(f"[demo_study] {msg}", flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tasks", default="target,even,odd")
  parser.add_argument("--methods", default="full,shpeft")
  parser.add_argument("--config", default=CONFIG)
  parser.add_argument("--steps", type=int, default=0, help="override train.num_steps (transfer)")
  parser.add_argument("--pretrain_steps", type=int, default=0, help="override pretrain.num_steps")
  parser.add_argument("--out", default="", help="copy the PNGs here (e.g. docs/img)")
  args = parser.parse_args(argv)

  from shpeft_jax import runs  # pylint: disable=g-import-not-at-top
  from shpeft_jax.analysis import __main__ as cli  # pylint: disable=g-import-not-at-top

  tasks = [t for t in args.tasks.split(",") if t]
  methods = tuple(m for m in args.methods.split(",") if m)
  base = cli.load_config(args.config)
  with base.unlocked():
    if args.steps:
      base.train.num_steps = args.steps
      base.train.eval_every = min(base.train.eval_every, args.steps)
      base.train.checkpoint_every = min(base.train.checkpoint_every, args.steps)
      base.optim.warmup_steps = min(base.optim.warmup_steps, args.steps // 2)
    if args.pretrain_steps:
      base.pretrain.num_steps = args.pretrain_steps
      base.pretrain.eval_every = min(base.pretrain.eval_every, args.pretrain_steps)
      base.pretrain.optim.warmup_steps = min(base.pretrain.optim.warmup_steps,
                                             args.pretrain_steps // 2)
  os.makedirs(args.workdir, exist_ok=True)

  t0 = time.time()
  _log("stage 1: pre-training on the source task")
  pretrained = runs.pretrain(base, args.workdir)
  _log(f"pretrained encoder: {pretrained} ({time.time() - t0:.0f}s)")

  results = {}
  for task in tasks:
    c = copy.deepcopy(base)
    with c.unlocked():
      c.data.task = task
      c.pretrain.enabled = False
      c.model.init_checkpoint = pretrained
      c.methods = methods
    _log(f"stage 2: fine-tuning on {task!r} with {methods} ({time.time() - t0:.0f}s)")
    results[task] = runs.run(c, os.path.join(args.workdir, task))
  with open(os.path.join(args.workdir, "transfer_results.json"), "w") as f:
    json.dump(results, f, indent=2, default=float)

  analysis = os.path.join(args.workdir, "analysis")
  pngs = []
  if "full" in methods:
    for task in tasks:
      out = os.path.join(analysis, f"sparsity_{task}")
      _log(f"stage 3: sparsity on {task!r} ({time.time() - t0:.0f}s)")
      rc = cli.main(["sparsity", "--pretrained", pretrained,
                     "--finetuned", os.path.join(args.workdir, task, "full", "export", "model"),
                     "--config", args.config, "--set", f"data.task={task}", "--out", out,
                     "--title", f"Sparsity: digits '{task}' (demo_small, pretrained on 0-4)"])
      if rc:
        return rc
      pngs.append((os.path.join(out, "sparsity.png"), f"sparsity_{task}.png"))
  hyb = ["hybridity", "--pretrained", pretrained, "--out", os.path.join(analysis, "hybridity")]
  if "full" in methods:
    for task in tasks:
      hyb += ["--finetuned", f"{task}={os.path.join(args.workdir, task, 'full', 'export', 'model')}"]
  if "shpeft" in methods:
    for task in tasks:
      hyb += ["--mask", f"{task}={os.path.join(args.workdir, task, 'shpeft', 'mask.npz')}"]
  _log(f"stage 3: hybridity over {tasks} ({time.time() - t0:.0f}s)")
  rc = cli.main(hyb)
  if rc:
    return rc
  hdir = os.path.join(analysis, "hybridity")
  for name in sorted(os.listdir(hdir)):
    if name.endswith(".png"):
      pngs.append((os.path.join(hdir, name), f"hybridity_{name}"))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    for src, dst in pngs:
      shutil.copyfile(src, os.path.join(args.out, dst))
    _log(f"copied {len(pngs)} PNGs to {args.out}")
  _log(f"done in {time.time() - t0:.0f}s; results under {analysis}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
