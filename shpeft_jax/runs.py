"""Several runs of the trainer: a method's resolved config, the demo's pre-training, method lists.

`python -m shpeft_jax.main` calls `run(config, workdir)`: the config's `pretrain` stage when it is
enabled (the demo's encoder, cached in WORKDIR/pretrain), then one run of `peft.method` in WORKDIR,
or, when `config.methods` lists several, one run per method in WORKDIR/<method> and a table. The
sweep (`shpeft_jax.sweep`) uses the same pieces for its grid of variants and datasets.

A method's settings are resolved in ONE place, `method_config`: the base config, then
`config.method_overrides[method]` (or, for a method without an entry, the entry of the method
whose settings it shares: `Method.settings_of`, e.g. the random control takes SH-PEFT's), then
the caller's peft fields. So a method gets the same learning rate from `main` (with or without
`config.methods`) and from the sweep.

`run_one(config, workdir, seed=...)` is the per-run entry point for extensions (seeds, lr grids):
it takes a resolved config and returns the run's results.json.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import ml_collections

from shpeft_jax import params_io
from shpeft_jax import stages as stages_lib
from shpeft_jax import utils
from shpeft_jax import train
from shpeft_jax.errors import ConfigError
from shpeft_jax.evaluation import writers
from shpeft_jax.peft import methods as methods_lib


def method_config(config: ml_collections.ConfigDict, method: str,
                  peft_overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] = (),
                  dataset: str | None = None) -> ml_collections.ConfigDict:
  """The config of one run of `method`: `method_overrides` applied, then `peft_overrides`
  (peft fields, e.g. the ablations' estimator / mode / lam) and `dataset` (data.name).

  Overrides are nested like the config ({'optim': {'lr': 3.0}}); an unknown field is an error.
  The result has `methods=()` and no `method_overrides`: it is one run, fully resolved.
  """
  spec = methods_lib.get_method(method)
  overrides = config.method_overrides
  source = method if method in overrides else spec.settings_of
  c = copy.deepcopy(config)
  c.lock()  # An override may only change fields the config has.
  c.peft.method = method
  if source and source in overrides:
    try:
      c.update(overrides[source])
    except (AttributeError, KeyError) as e:
      raise ConfigError(f"method_overrides.{source} names a field the config does not have: "
                        f"{e}.") from e
  with c.unlocked():
    c.peft.method = method
    for field, value in dict(peft_overrides).items():
      c.peft[field] = value
    if dataset is not None:
      c.data.name = dataset
    c.methods = ()
    c.method_overrides = ml_collections.ConfigDict()
  return c


def run_one(config: ml_collections.ConfigDict, workdir: str, *, seed: int | None = None,
            restart_from: str | None = None) -> dict:
  """One run of a resolved config (`method_config`), optionally with another `seed`."""
  if seed is not None:
    config = copy.deepcopy(config)
    config.seed = int(seed)
  return train.train_and_evaluate(config, workdir, restart_from=restart_from)


# ---------------------------------------------------------------------------------------------
# The demo's pre-training stage.


def pretrain_config(config) -> ml_collections.ConfigDict:
  """The run that trains the demo's encoder on the source task: full training from scratch."""
  pre = config.pretrain
  sub = copy.deepcopy(config)
  with sub.unlocked():
    sub.data = pre.data
    sub.peft = copy.deepcopy(pre.peft)
    sub.peft.method = "full"
    sub.model.init_checkpoint = ""
    sub.optim = pre.optim
    sub.train.num_steps = pre.num_steps
    sub.train.log_every = max(1, int(pre.num_steps) // 50)  # ~50 points of its curves
    sub.train.report_best = False
    sub.train.eval_every = pre.eval_every
    sub.pretrain.enabled = False
    sub.methods = ()
    sub.method_overrides = ml_collections.ConfigDict()
  return sub


def pretrain(config, workdir: str, restart_from: str | None = None) -> str:
  """Trains the demo's encoder on the source task (cached: reused when its export exists)."""
  out = os.path.join(workdir, "pretrain")
  res = train.train_and_evaluate(pretrain_config(config), out, restart_from=restart_from)
  logging.debug("Pre-trained encoder on %s: test %s", config.pretrain.data.task,
               writers.format_metrics(res["test"]))
  return os.path.join(out, "export", "model")


def prepare(config: ml_collections.ConfigDict, workdir: str,
            restart_pretrain: bool = False) -> ml_collections.ConfigDict:
  """The base config of a group of runs in `workdir`: one XLA cache for all of them (they share
  model shapes, hence compiled programs), and the pre-trained encoder as init (run once)."""
  config = copy.deepcopy(config)
  cache = config.compilation_cache_dir
  if cache and not os.path.isabs(cache):
    with config.unlocked():
      config.compilation_cache_dir = os.path.abspath(os.path.join(workdir, cache))
  utils.enable_compilation_cache(config.compilation_cache_dir, workdir)
  if config.pretrain.enabled:
    init = pretrain(config, workdir, restart_from="data" if restart_pretrain else None)
    with config.unlocked():
      config.model.init_checkpoint = init
      config.pretrain.enabled = False
  return config


def restart_plan(restart_from: str | None) -> tuple[bool, str | None]:
  """--restart_from for a group of runs: (redo the pre-training?, the stage each run redoes).

  'pretrain' redoes the demo's pre-training and then all of every run, which starts from it.
  """
  restart_from = stages_lib.validate_restart_from(restart_from)
  if restart_from == "pretrain":
    return True, "data"
  return False, restart_from


def validate_runs(config, method_names: Sequence[str]) -> None:
  """Checks every run's config before any long work starts."""
  if config.pretrain.enabled:
    train.validate_config(pretrain_config(config))
  for method in method_names:
    c = method_config(config, method)
    if config.pretrain.enabled:
      c.model.init_checkpoint = ""  # Does not exist yet.
    train.validate_config(c)


# ---------------------------------------------------------------------------------------------
# What `main` runs.


def run(config: ml_collections.ConfigDict, workdir: str, *,
        restart_from: str | None = None) -> dict:
  """`config.methods` empty: the run of `peft.method` in workdir (its results). Otherwise one run
  per method in workdir/<method>, then a table ({method: results}).

  With `config.sweep.seeds` / `sweep.lr_grid` every method runs per learning rate and seed (in
  <method>/lr_<lr>/seed_<s>), the lr is chosen on the validation split, and the table gives the
  test metrics as mean ± sd over the seeds with the paired difference to SH-PEFT
  (`evaluation.compare`); the result is then {method: [{lr, seed, run_dir, results}, ...]}.

  restart_from: a stage (`shpeft_jax.stages.STAGES`) to redo with every later one, in every run;
  'pretrain' redoes the demo's pre-training and everything that starts from it.
  """
  restart_pretrain, restart_from = restart_plan(restart_from)
  methods = tuple(config.methods)
  validate_runs(config, methods or (config.peft.method,))
  base = prepare(config, workdir, restart_pretrain=restart_pretrain)
  restart = {"restart_from": restart_from} if restart_from else {}
  if config.sweep.seeds or config.sweep.lr_grid or any(
      "sweep" in o for o in config.method_overrides.values()):
    return _run_seeds(base, workdir, methods or (base.peft.method,), per_method=bool(methods),
                      run_fn=functools.partial(run_one, **restart))
  if not methods:
    return run_one(method_config(base, base.peft.method), workdir, **restart)
  from shpeft_jax import console  # pylint: disable=g-import-not-at-top
  progress = console.RunsProgress(len(methods))
  results = {}
  for m in methods:
    d = os.path.join(workdir, m.replace("/", "_"))
    results[m] = progress(m, d, functools.partial(run_one, method_config(base, m), d, **restart))
  progress.close()
  table = format_table(results)
  if jax.process_index() == 0:
    print(table, flush=True)
    with open(os.path.join(workdir, "results_table.txt"), "w") as f:
      f.write(table + "\n")
    params_io.json_dump(os.path.join(workdir, "results.json"), results)
  return results


def _run_seeds(base: ml_collections.ConfigDict, workdir: str, methods: Sequence[str], *,
               per_method: bool, run_fn=run_one) -> dict:
  """Every method over its lr grid and the seeds (in workdir/<method>/ when `per_method`, else in
  workdir/ itself, like a single run); the seed table (evaluation.compare)."""
  from shpeft_jax import console  # pylint: disable=g-import-not-at-top
  from shpeft_jax.evaluation import compare  # pylint: disable=g-import-not-at-top
  seeds = compare.seeds_of(base)
  out, records = {}, []
  configs = {m: method_config(base, m) for m in methods}
  progress = console.RunsProgress(sum(compare.runs_in_grid(c, seeds) for c in configs.values()))
  for m, c in configs.items():
    grid = compare.lr_grid_of(c)
    out[m] = compare.run_grid(c, os.path.join(workdir, m.replace("/", "_")) if per_method
                              else workdir, run_fn,
                              seeds=seeds, lr_grid=grid, by_lr=bool(c.sweep.lr_grid),
                              by_seed=bool(base.sweep.seeds), progress=progress, label=m)
    records += [{"dataset": c.data.name, "variant": m, "label": m, "method": m, "type": "",
                 "lr": r["lr"], "seed": r["seed"], **compare.metrics_of(r["results"]),
                 "run_dir": os.path.relpath(r["run_dir"], workdir)}
                for r in out[m]]
  progress.close()
  if jax.process_index() == 0:
    table = compare.format_seed_table(records)
    print(table, flush=True)
    with open(os.path.join(workdir, "results_table.txt"), "w") as f:
      f.write(table + "\n")
    params_io.json_dump(os.path.join(workdir, "results.json"),
                        {"runs": records, "summary": compare.summary_json(records)})
  return out


def format_table(results: dict) -> str:
  head = f"{'method':<10} {'trainable %':>12} {'F1':>8} {'accuracy':>9} {'AUC':>8}"
  lines = [head, "-" * len(head)]
  for method, r in results.items():
    m = r["test"]
    lines.append(f"{method:<10} {r['trainable_percent']:>12.3f} {100 * m['f1_macro']:>8.2f} "
                 f"{100 * m['accuracy']:>9.2f} {100 * m['auc_macro']:>8.2f}")
  return "\n".join(lines)
