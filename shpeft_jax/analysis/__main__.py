r"""Command line of the statistical study.

  python -m shpeft_jax.analysis sparsity --pretrained DIR --finetuned DIR \
      --config configs/demo.py [--set data.task=target] [--k 0.05,0.1,...] --out DIR
  python -m shpeft_jax.analysis hybridity --pretrained DIR --finetuned A=DIR --finetuned B=DIR \
      [--mask A=FILE --mask B=FILE] [--k 5,1,0.1,0.05] --out DIR
  (hybridity also runs on masks alone: --mask A=FILE --mask B=FILE [--pretrained DIR] --out DIR)

Checkpoints are params checkpoints (`shpeft_jax.checkpoints`: DIR/meta.json + DIR/params/), the
format the trainer exports its best/final model in; a fine-tuned one may also be a task adapter
(WORKDIR/export/adapter), applied to --pretrained, which must be its base. Every command writes JSON and PNGs to --out.
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib.util
import logging
import os
import time
from typing import Any, Sequence

from shpeft_jax.errors import CheckpointError, ConfigError, cli_main, exit_process


def _log(msg: str) -> None:
  print(msg, flush=True)


def parse_k_list(text: str) -> list[float]:
  """'5,1,0.1' -> [5.0, 1.0, 0.1]; every entry must be a percentage in (0, 100]."""
  ks = []
  for item in text.split(","):
    try:
      k = float(item)
    except ValueError:
      k = float("nan")
    if not 0 < k <= 100:  # Also catches empty entries, 'abc', nan and inf.
      raise ConfigError(f"--k {text!r}: {item.strip()!r} is not a percentage in (0, 100]; pass "
                        "comma-separated values like 5,1,0.1.")
    ks.append(k)
  return ks


def _default_name(path: str) -> str:
  """A task name from a path: the run's folder, skipping the trainer's export/model, best, mask."""
  parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
  while len(parts) > 1 and parts[-1] in ("model", "export", "best", "mask.npz", "shpeft", "full"):
    parts.pop()
  return parts[-1]


def parse_named(items: Sequence[str] | None, flag: str) -> dict[str, str]:
  """['A=dir', 'B=dir'] -> {'A': 'dir', 'B': 'dir'}; a bare path is named after its folder."""
  out: dict[str, str] = {}
  for item in items or ():
    if "=" in item:
      name, path = item.split("=", 1)
    else:
      path = item
      name = _default_name(path)
    if not name or not path:
      raise ConfigError(f"{flag} expects NAME=PATH, got {item!r}.")
    if name in out:
      raise ConfigError(f"{flag}: the name {name!r} is given twice; names must be unique.")
    out[name] = path
  return out


def load_config(spec: str, overrides: Sequence[str] = ()):
  """`path.py` or `path.py:arg` -> get_config(arg), then `key.sub=value` overrides."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"Config file {path!r} does not exist; pass e.g. --config configs/demo.py.")
  mod_spec = importlib.util.spec_from_file_location("_analysis_config", path)
  module = importlib.util.module_from_spec(mod_spec)
  try:
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(f"{path} has no get_config().")
    config = module.get_config(arg) if arg else module.get_config()
  except (SyntaxError, NameError, ImportError, AttributeError, TypeError, KeyError) as e:
    where = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
    raise ConfigError(f"Config file {path}{where} cannot be loaded ({type(e).__name__}: "
                      f"{getattr(e, 'msg', None) or e}); fix it or pass another --config.") from e
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"--set expects key=value, got {item!r}.")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # A plain string.
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise ConfigError(f"--set {key}: the config has no field {p!r}.")
      node = node[p]
    try:
      node[parts[-1]] = value
    except (AttributeError, KeyError, TypeError) as e:
      raise ConfigError(f"--set {key}={value!r}: {e}") from e
  return config


def find_mask_file(path: str) -> str:
  """A mask file, or a folder (e.g. a trainer workdir) holding exactly one `*mask*.npz`."""
  if os.path.isfile(path):
    return path
  if os.path.isdir(path):
    found = sorted(glob.glob(os.path.join(path, "*mask*.npz")) +
                   glob.glob(os.path.join(path, "*", "*mask*.npz")))
    if len(found) == 1:
      return found[0]
    if not found:
      raise CheckpointError(f"No SH-PEFT mask file (*mask*.npz) in {path}; pass the file itself.")
    raise CheckpointError(f"Several mask files in {path}: {found}; pass the one you mean.")
  raise CheckpointError(f"Mask path {path!r} does not exist.")


def _k_tag(k: float) -> str:
  return f"{k:g}".replace(".", "p")


# ----------------------------------------------------------------------------------------------


def run_sparsity(args) -> dict:
  from shpeft_jax.analysis import plots, sparsity  # pylint: disable=g-import-not-at-top
  # Checkpoints first: a wrong path fails in a second, before TensorFlow is imported.
  pre = sparsity.load_checkpoint(args.pretrained, "pretrained checkpoint")
  ft = sparsity.load_checkpoint(args.finetuned, "fine-tuned checkpoint", base=pre)
  sparsity.check_same_encoder(pre, ft)
  config = load_config(args.config, args.set or ())
  if "data" not in config:
    raise ConfigError(f"{args.config} has no `data` section to read the {args.split} split from.")
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  image_size = ft.meta.get("image_size") or config.get("model", {}).get("image_size")
  if not image_size:
    raise CheckpointError(f"{ft.path}/meta.json has no image_size and the config none either.")
  image_size = int(image_size)
  info = input_pipeline.dataset_info(config.data)
  num_classes = int(ft.params["head"]["kernel"].shape[-1]) if "head" in ft.params else None
  if num_classes is not None and info.num_classes != num_classes:
    raise CheckpointError(
        f"The fine-tuned head has {num_classes} classes but {info.name} has {info.num_classes}; "
        "evaluate on the data the model was fine-tuned on (check --config / --set data.task=...).")
  train = config.get("train") or {}
  batch_size = args.batch_size or int(train.get("eval_batch_size", 0) or train.get("batch_size", 0)
                                      or 64)
  _log(f"[sparsity] data {info.name} split {args.split!r} ({info.split_sizes.get(args.split, '?')} "
       f"examples), image size {image_size}, batch {batch_size}")

  def batches():
    return input_pipeline.make_eval_iterator(config.data, split=args.split,
                                             global_batch_size=batch_size, image_size=image_size)
  # The split is read once per k; a small one is decoded once and kept in memory instead.
  n_examples = int(info.split_sizes.get(args.split) or 0)
  if 0 < n_examples * image_size * image_size * 3 * 4 <= args.cache_mb * 2**20:
    cached = list(batches())
    batches = lambda: iter(cached)  # pylint: disable=function-redefined
  result = sparsity.sparsity_curve(pre, ft, batches, k_grid=parse_k_list(args.k), log=_log)
  result["data"] = {"name": info.name, "split": args.split,
                    "num_examples": info.split_sizes.get(args.split)}
  os.makedirs(args.out, exist_ok=True)
  json_path = sparsity.write_json(result, os.path.join(args.out, "sparsity.json"))
  png = plots.plot_sparsity(result, os.path.join(args.out, "sparsity.png"),
                            title=args.title or f"Sparsity on {info.name} ({args.split})")
  _log(f"[sparsity] wrote {json_path} and {png}")
  return result


def run_hybridity(args) -> dict:
  from shpeft_jax.analysis import hybridity, plots, sparsity  # pylint: disable=g-import-not-at-top
  finetuned = parse_named(args.finetuned, "--finetuned")
  masks = parse_named(args.mask, "--mask")
  if not finetuned and not masks:
    raise ConfigError("Give fine-tuned checkpoints (--finetuned NAME=DIR, at least two) and/or "
                      "SH-PEFT masks (--mask NAME=FILE).")
  pre = (sparsity.load_checkpoint(args.pretrained, "pretrained checkpoint")
         if args.pretrained else None)
  os.makedirs(args.out, exist_ok=True)
  out: dict[str, Any] = {}
  if finetuned:
    if pre is None:
      raise ConfigError("--finetuned needs --pretrained (weight changes are W_ft - W_ori).")
    ckpts = {}
    for name, path in finetuned.items():
      _log(f"[hybridity] loading {name} from {path}")
      ckpts[name] = sparsity.load_checkpoint(path, f"fine-tuned checkpoint {name!r}", base=pre)
    result = hybridity.finetuned_study(pre, ckpts, k_percents=parse_k_list(args.k), log=_log)
    sparsity.write_json(result, os.path.join(args.out, "hybridity_finetuned.json"))
    panels = [(f"top {e['k_percent']:g}%", e["overlap"]) for e in result["per_k"]]
    plots.plot_overlap_heatmaps(panels, os.path.join(args.out, "overlap_finetuned.png"),
                                title=args.title or "Overlap of top-k% changed weights "
                                "|W_ft - W_ori| between tasks (chance in brackets)")
    plots.plot_overlap_vs_k(result["per_k"], os.path.join(args.out, "overlap_vs_k.png"))
    for e in result["per_k"]:
      plots.plot_layer_distribution(
          e["layers"], os.path.join(args.out, f"layers_finetuned_k{_k_tag(e['k_percent'])}.png"),
          title=f"Where the top {e['k_percent']:g}% changed weights are (dashed: overall density)")
    out["finetuned"] = result
  if masks:
    from shpeft_jax.peft import mask_io  # pylint: disable=g-import-not-at-top
    trees = {}
    for name, path in masks.items():
      f = find_mask_file(path)
      _log(f"[hybridity] loading mask {name} from {f}")
      trees[name] = mask_io.load_mask(f)
      if pre is not None:
        hybridity.check_mask_fits(trees[name], pre.params, f"mask {name!r} ({f})")
    result = hybridity.mask_study(trees, pre, include_head=args.include_head, log=_log)
    shared = result.get("shared_task_agnostic")
    if shared:
      _log(f"[hybridity] {shared['shared']} positions are in every mask; "
           f"{100 * shared['fraction']:.1f}% of them are in the top-|M| by |w| "
           f"(chance {100 * shared['chance']:.3g}%)")
    result["files"] = {n: find_mask_file(p) for n, p in masks.items()}
    sparsity.write_json(result, os.path.join(args.out, "hybridity_masks.json"))
    if "overlap" in result:
      plots.plot_overlap_heatmaps([("SH-PEFT masks", result["overlap"])],
                                  os.path.join(args.out, "overlap_masks.png"),
                                  title="Overlap of SH-PEFT masks between tasks")
    if "task_agnostic" in result:
      plots.plot_task_agnostic(result["task_agnostic"],
                               os.path.join(args.out, "task_agnostic_masks.png"))
    plots.plot_layer_distribution(result["layers"], os.path.join(args.out, "layers_masks.png"),
                                  title="Where SH-PEFT masks select weights")
    out["masks"] = result
  _log(f"[hybridity] wrote results to {args.out}")
  return out


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m shpeft_jax.analysis", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  sp = sub.add_parser("sparsity", help="F1 of W_ori<-ft@k%% vs k (Fig. 2 left).")
  sp.add_argument("--pretrained", required=True, help="params checkpoint of the pretrained model")
  sp.add_argument("--finetuned", required=True, help="params checkpoint of the fine-tuned model")
  sp.add_argument("--config", required=True, help="config file (its `data` section), path.py[:arg]")
  sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                  help="config override, e.g. --set data.task=target (repeatable)")
  sp.add_argument("--split", default="test")
  sp.add_argument("--k", default="0.05,0.1,0.5,1,2,5,10,20,50,100", help="percentages")
  sp.add_argument("--batch_size", type=int, default=0,
                  help="default: config.train.eval_batch_size, else config.train.batch_size, else 64")
  sp.add_argument("--cache_mb", type=int, default=1024,
                  help="keep the decoded split in memory when it is at most this many MB")
  sp.add_argument("--out", required=True)
  sp.add_argument("--title", default=None)
  sp.set_defaults(fn=run_sparsity)

  hp = sub.add_parser("hybridity", help="overlap of key weights between tasks (Fig. 2 right).")
  hp.add_argument("--pretrained", help="params checkpoint all tasks were fine-tuned from")
  hp.add_argument("--finetuned", action="append", metavar="NAME=DIR",
                  help="fine-tuned checkpoint of one task (repeat for each task)")
  hp.add_argument("--mask", action="append", metavar="NAME=FILE",
                  help="SH-PEFT mask file (or the trainer workdir holding it), repeatable")
  hp.add_argument("--include_head", action="store_true",
                  help="compare the masks' head entries too (by default only the encoder, where "
                  "SH-PEFT selects; the head is always trained)")
  hp.add_argument("--k", default="5,1,0.1,0.05", help="percentages")
  hp.add_argument("--out", required=True)
  hp.add_argument("--title", default=None)
  hp.set_defaults(fn=run_hybridity)
  for p in (sp, hp):
    p.add_argument("--verbosity", type=int, default=0, help="1: full tracebacks of errors")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  t0 = time.time()

  def run():
    parse_k_list(args.k)  # Before any loading: a bad --k must not wait for (or be skipped by) it.
    args.fn(args)
    _log(f"done in {time.time() - t0:.1f}s")
  return cli_main(run, verbosity=args.verbosity, hint_path=args.out)


if __name__ == "__main__":
  exit_process(main())
