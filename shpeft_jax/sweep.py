"""Methods x datasets through the one trainer, then Table 1 (CSV + markdown) and Fig. 4 (PNG).

  python -m shpeft_jax.sweep --config configs/demo.py --workdir /tmp/sweep \\
      --methods full,linear,bitfit,lora,shpeft,random [--datasets digits] [--ablation table4]

Every run is `runs.run_one` on `runs.method_config(config, method, ...)` (the method's
`method_overrides`, as `main` applies them, then for the ablations `peft.estimator` / `mode` /
`lam`), in WORKDIR/<dataset>/<variant>/[lr_<lr>/][seed_<s>/]. A finished run leaves
results.json there and is not repeated, so an interrupted sweep resumes where it stopped. When the
config has a `pretrain` stage (the demo), it runs once, in WORKDIR/pretrain, and every run starts
from its encoder (whatever the seed).

Seeds and learning rates (`--seeds 0,1,2,3,4`, `--lr_grid 0.03,0.1,0.3,1`, or config.sweep.seeds /
sweep.lr_grid; a method's own grid in method_overrides[m].sweep.lr_grid wins): every variant runs
per lr and seed; its lr is the one with the best mean validation macro F1 over the seeds, and the
test numbers are read at that lr only (`shpeft_jax.evaluation.compare`).

Outputs in WORKDIR:
  results.csv / results.md   Table 1 layout: one row per method; per dataset the test F1 % as
                             mean ± sd over the seeds, the chosen lr, the paired difference to
                             SH-PEFT (95% t interval) and wins-ties-losses; Avg; trainable %
  runs.csv                   one line per run (dataset, method, lr, seed) with validation and test
                             F1, accuracy, AUC, trainable count, and whether its lr was chosen
  f1_vs_trainable.png        Fig. 4: average F1 against the trainable % (log scale), error bars =
                             sd over seeds, the chosen lr in each label
  sweep.json                 the runs and the summary rows as JSON

Label efficiency (`--train_fractions 0.01,0.1,1.0`): every run at each training-label fraction
(data.train_fraction: one stratified, patient-grouped subset per fraction, the same for every
method and seed) in WORKDIR/<dataset>_fraction_<f>/<variant>/...; each (dataset, fraction) is a
column of its own (lr chosen on validation per fraction and method, paired to SH-PEFT at the same
fraction), and the sweep adds
  fractions.csv / fractions.md  per dataset, method x fraction: mean ± sd, lr, Δ vs SH-PEFT, W-T-L
  score_vs_fraction.png         the headline test metric against the fraction, one line a method

Ablation presets (`--ablation`, comma-separated, added after `--methods`):
  table4  the importance estimators: I_ta | I_td-L1 | I_ta + I_td-L1 | I_td-L2 | I_ta + I_td-L2
          (I_ta-L1 = |w| and I_ta-L2 = w^2 rank the weights identically, so one I_ta row)
  table5  the hybrid balance lambda in 1.5, 1.2, 1.0, 0.8, 0.5 (L2 estimator)
  random  the control: SH-PEFT next to a random mask with the same k
  l2_reading  I_ta + I_td-L2 with I_td = sum_b g_b^2 (default) and with (sum_b g_b)^2
  scope   SH-PEFT and the random mask with the top-k global, per tensor and per output row

The oracle mask (`--methods full,oracle`, issue 26) trains the top-k of |w_ft - w_0| of the sweep's
`full` run of the same seed (at full's lr chosen on validation); the sweep runs `full` first and
sets peft.oracle_run per seed (a config's own peft.oracle_run is used as it is).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from shpeft_jax import stages as stages_lib
from shpeft_jax.errors import ConfigError, ShpeftError
from shpeft_jax.peft import methods as methods_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py), optionally `file.py:arg`.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and the tables.")
_METHODS = flags.DEFINE_list(
    "methods", [], "peft methods to compare (default: all of Table 1 when no --ablation is given). "
    f"Known: {','.join(methods_lib.method_names())}.")
_DATASETS = flags.DEFINE_list(
    "datasets", [], "config.data.name values, one table column each (default: the config's).")
_ABLATION = flags.DEFINE_list("ablation", [], "presets: table4, table5, random, l2_reading, scope.")
_SEEDS = flags.DEFINE_list(
    "seeds", [], "seeds to repeat every run with (config.seed; default: config.sweep.seeds, else "
    "config.seed). A seed changes the head init, data order, scoring batches and random mask.")
_LR_GRID = flags.DEFINE_list(
    "lr_grid", [], "learning rates to choose from on the validation split, per method (default: "
    "config.sweep.lr_grid, else each method's optim.lr; a method's own sweep.lr_grid wins).")
_TRAIN_FRACTIONS = flags.DEFINE_list(
    "train_fractions", [], "the label-efficiency sweep: training-label fractions in (0, 1] "
    "(data.train_fraction, one stratified subset per fraction from data.subset_seed, the same for "
    "every method and seed); every method and lr per fraction, the lr chosen on validation per "
    "fraction and method; adds fractions.csv / fractions.md / score_vs_fraction.png.")
_RESTART_FROM = flags.DEFINE_enum(
    "restart_from", None, list(stages_lib.STAGES),
    "Redo this stage and every later one in every run of the sweep ('pretrain': the demo's "
    "pre-training and every run, all started from it).")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the results table: a method and the peft fields it changes."""
  key: str                  # Directory name and CSV id.
  label: str                # Row label.
  kind: str                 # Table 1's type column (S, A, P, S+A).
  method: str
  overrides: tuple[tuple[str, Any], ...] = ()  # (peft field, value).


def method_variant(name: str) -> Variant:
  m = methods_lib.get_method(name)
  return Variant(m.name, m.label, m.kind, m.name)


def _shpeft(key, label, **overrides) -> Variant:
  return Variant(key, label, "S", "shpeft", tuple(sorted(overrides.items())))


ABLATIONS: dict[str, tuple[Variant, ...]] = {
    # Table 4 of the paper (lambda = 1).
    "table4": (
        _shpeft("ta", "I_ta", mode="ta", estimator="l2", lam=1.0),
        _shpeft("td_l1", "I_td-L1", mode="td", estimator="l1", lam=1.0),
        _shpeft("hybrid_l1", "I_ta + I_td-L1", mode="hybrid", estimator="l1", lam=1.0),
        _shpeft("td_l2", "I_td-L2", mode="td", estimator="l2", lam=1.0),
        _shpeft("hybrid_l2", "I_ta + I_td-L2", mode="hybrid", estimator="l2", lam=1.0),
    ),
    # Table 5 of the paper (L2 estimator).
    "table5": tuple(_shpeft(f"lam_{lam:g}", f"lambda = {lam:g}", mode="hybrid", estimator="l2",
                            lam=lam) for lam in (1.5, 1.2, 1.0, 0.8, 0.5)),
    "random": (method_variant("shpeft"), method_variant("random")),
    # The L2 estimator's two readings (issue 26, docs/SHPEFT.md). In 'td' mode (sum_b g_b)^2 ranks
    # exactly as I_td-L1 = |sum_b g_b| does, so only the hybrid differs from table4's rows.
    "l2_reading": (
        _shpeft("hybrid_l2", "I_ta + I_td-L2", mode="hybrid", estimator="l2", lam=1.0),
        _shpeft("hybrid_l2_sqsum", "I_ta + I_td-L2, (sum g)^2", mode="hybrid", estimator="l2",
                lam=1.0, l2_reduction="square_of_sum"),
    ),
    # Where the top-k is taken (issue 26): SH-PEFT and the random control in each scope.
    "scope": (method_variant("shpeft"), method_variant("random")) + tuple(
        v for scope in ("per_tensor", "per_row") for v in (
            _shpeft(f"shpeft_{scope}", f"SH-PEFT, {scope}", selection_scope=scope),
            Variant(f"random_{scope}", f"Random mask, {scope}", "S", "random",
                    (("selection_scope", scope),)))),
}


def build_variants(methods: Sequence[str], ablations: Sequence[str]) -> list[Variant]:
  """--methods then --ablation presets, duplicates (same key) dropped; if both are empty, every
  method but the oracle (Table 1 and the random control)."""
  unknown = [a for a in ablations if a not in ABLATIONS]
  if unknown:
    raise ConfigError(f"Unknown --ablation {unknown}; choose from {sorted(ABLATIONS)}.")
  if not methods and not ablations:  # The oracle reads a full run of each seed: asked for by name.
    methods = [m for m in methods_lib.method_names() if not methods_lib.get_method(m).reference]
  out: dict[str, Variant] = {}
  for v in [method_variant(m) for m in methods] + [v for a in ablations for v in ABLATIONS[a]]:
    out.setdefault(v.key, v)
  return list(out.values())


def variant_config(base: ml_collections.ConfigDict, variant: Variant,
                   dataset: str | None = None) -> ml_collections.ConfigDict:
  """The config of one run: `runs.method_config` with this variant's peft fields and data.name."""
  from shpeft_jax import runs  # pylint: disable=g-import-not-at-top  (imports jax)
  return runs.method_config(base, variant.method, variant.overrides, dataset)


@dataclasses.dataclass(frozen=True)
class Column:
  """One column of the results table: a dataset, or with --train_fractions a dataset at a
  training-label fraction (its own column, lr choice and pairing to SH-PEFT)."""
  dataset: str
  fraction: float | None = None  # None: the config's data (no --train_fractions).

  @property
  def key(self) -> str:  # Records' `dataset` and the runs' folder under WORKDIR.
    return self.dataset if self.fraction is None else f"{self.dataset}_fraction_{self.fraction:g}"

  def config(self, cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    if self.fraction is not None:
      with cfg.unlocked():
        cfg.data.train_fraction = float(self.fraction)
    return cfg


def columns(datasets: Sequence[str], fractions: Sequence[float] | None) -> list[Column]:
  """The table's columns; ConfigError for a fraction outside (0, 1] or a repeated one."""
  from shpeft_jax.data import subsets  # pylint: disable=g-import-not-at-top
  if not fractions:
    return [Column(d) for d in datasets]
  fractions = [float(f) for f in fractions]
  for f in fractions:
    subsets.spec_of({"train_fraction": f})
  if len(set(fractions)) != len(fractions):
    raise ConfigError(f"--train_fractions {fractions} repeats a fraction.")
  return [Column(d, f) for d in datasets for f in fractions]


def _check_references(config, variants: Sequence[Variant]) -> None:
  """ConfigError before any run when a variant reads another method's runs (the oracle: `full`)
  that the sweep does not make and the config does not name (peft.oracle_run)."""
  keys = {v.key for v in variants}
  for v in variants:
    ref = _reference_of(v)
    if ref and ref not in keys and not variant_config(config, v).peft.oracle_run:
      raise ConfigError(f"--methods {v.method} ranks |w_ft - w_0| of the sweep's `{ref}` run of "
                        f"each seed: add {ref} to --methods, or set --config.peft.oracle_run to "
                        "a finished full run.")


def _validate_all(config, variants: Sequence[Variant], cols: Sequence[Column]) -> None:
  """Every (column, variant) config is checked before the first run: a typo in the last dataset
  (or a fraction too small for a class) must not wait for hours of earlier runs."""
  from shpeft_jax import runs  # pylint: disable=g-import-not-at-top
  from shpeft_jax import train  # pylint: disable=g-import-not-at-top
  if config.pretrain.enabled:
    train.validate_config(runs.pretrain_config(config))
  for col in cols:
    for v in variants:
      cfg = col.config(variant_config(config, v, col.dataset))
      if config.pretrain.enabled:
        cfg.model.init_checkpoint = ""  # Made by the pretrain stage.
      if _reference_of(v) and not cfg.peft.oracle_run:
        cfg.peft.oracle_run = f"<the sweep's {_reference_of(v)} run>"  # Made before it.
      try:
        train.validate_config(cfg)
      except ShpeftError as e:
        raise type(e)(f"{col.key} / {v.key}: {e}") from e


def run_sweep(config: ml_collections.ConfigDict, workdir: str, variants: Sequence[Variant],
              datasets: Sequence[str] | None = None,
              run_fn: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
              seeds: Sequence[int] | None = None,
              lr_grid: Sequence[float] | None = None,
              restart_from: str | None = None,
              train_fractions: Sequence[float] | None = None) -> list[dict]:
  """Runs every (dataset, variant, lr, seed); returns one record per run (see `_record`).

  restart_from: a stage (`stages.STAGES`) to redo, with every later one, in every run; 'pretrain'
  also redoes the demo's pre-training (and so everything).
  train_fractions: the label-efficiency sweep: every run per fraction, in
  WORKDIR/<dataset>_fraction_<f>/<variant>/..., records carrying `train_fraction`.
  """
  from shpeft_jax import runs  # pylint: disable=g-import-not-at-top  (imports jax)
  from shpeft_jax.evaluation import compare  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  restart_pretrain, restart_from = runs.restart_plan(restart_from)
  validate = run_fn is None
  run_fn = run_fn or runs.run_one
  if restart_from:
    run_fn = functools.partial(run_fn, restart_from=restart_from)
  datasets = list(datasets or [config.data.name])
  cols = columns(datasets, train_fractions)
  config = _with_sweep_flags(config, seeds, lr_grid)
  _check_references(config, variants)
  if validate:
    _validate_all(config, variants, cols)
  base = runs.prepare(config, workdir, restart_pretrain=restart_pretrain)
  from shpeft_jax import console  # pylint: disable=g-import-not-at-top
  seeds = compare.seeds_of(base)
  records = []
  # A variant that reads another method's runs (the oracle reads `full`) comes after them.
  plan = [(col, v, col.config(variant_config(base, v, col.dataset))) for col in cols
          for v in sorted(variants, key=lambda v: bool(_reference_of(v)))]
  progress = console.RunsProgress(sum(compare.runs_in_grid(c, seeds) for _, _, c in plan),
                                  desc="sweep")
  for col, v, cfg in plan:
    grid = compare.lr_grid_of(cfg)
    run_dir = os.path.join(workdir, col.key, v.key)
    logging.debug("sweep: %s / %s -> %s (lr %s, seeds %s)", col.key, v.label, run_dir, grid,
                  seeds)
    label = v.key if len(cols) == 1 else f"{col.key}/{v.key}"
    fn = _reading_reference(run_fn, cfg, v, records, col.key, workdir)
    for r in compare.run_grid(cfg, run_dir, fn, seeds=seeds, lr_grid=grid,
                              by_lr=bool(cfg.sweep.lr_grid), by_seed=bool(base.sweep.seeds),
                              progress=progress, label=label):
      fraction = {} if col.fraction is None else {"data_name": col.dataset,
                                                  "train_fraction": col.fraction}
      records.append({**_record(col.key, v, r["results"], r["lr"], r["seed"]), **fraction,
                      "run_dir": os.path.relpath(r["run_dir"], workdir)})
  progress.close()
  return records


def _reference_of(v: Variant) -> str:
  """The method whose runs this variant's selection reads ('full' for the oracle), else ''."""
  return methods_lib.get_method(v.method).reference


def _reading_reference(run_fn, cfg, v: Variant, records: Sequence[dict], column: str,
                       workdir: str):
  """run_fn, or for a variant that reads another method's runs (the oracle: `full`) with no
  peft.oracle_run of its own, run_fn with peft.oracle_run = that method's run of the same seed in
  this column, at the lr chosen for it on validation."""
  from shpeft_jax.evaluation import compare  # pylint: disable=g-import-not-at-top
  ref = _reference_of(v)
  if not ref or cfg.peft.oracle_run:
    return run_fn
  runs = [r for r in records if r["dataset"] == column and r["variant"] == ref]
  if not runs:
    raise ConfigError(f"{column} / {v.key}: the sweep has no `{ref}` runs to read; add {ref} "
                      "to --methods.")
  lr = compare.choose_lr(runs)[(column, ref)]
  by_seed = {r["seed"]: os.path.join(workdir, r["run_dir"]) for r in runs if r["lr"] == lr}

  def run(c, d):
    if c.seed not in by_seed:
      raise ConfigError(f"{column} / {v.key}: no `{ref}` run of seed {c.seed} at lr {lr:g}; "
                        "give both the same --seeds.")
    c.peft.oracle_run = by_seed[c.seed]
    logging.debug("sweep: %s / %s seed %d reads %s.", column, v.key, c.seed, by_seed[c.seed])
    return run_fn(c, d)
  return run


def _with_sweep_flags(config, seeds, lr_grid) -> ml_collections.ConfigDict:
  """--seeds / --lr_grid written into config.sweep (a method's own sweep.lr_grid still wins)."""
  import copy  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(config)
  with config.unlocked():
    if seeds:
      config.sweep.seeds = tuple(int(s) for s in seeds)
    if lr_grid:
      config.sweep.lr_grid = tuple(float(x) for x in lr_grid)
  return config


def _record(dataset: str, v: Variant, res: dict, lr: float, seed: int) -> dict:
  from shpeft_jax.evaluation import compare  # pylint: disable=g-import-not-at-top
  if not res.get("test"):
    logging.warning("sweep: %s / %s has no test result (%s); left empty in the table.", dataset,
                    v.key, res)
  return {"dataset": dataset, "variant": v.key, "label": v.label, "type": v.kind,
          "method": v.method, "overrides": dict(v.overrides), "lr": float(lr), "seed": int(seed),
          **compare.metrics_of(res)}


def write_outputs(records: Sequence[dict], workdir: str) -> dict[str, str]:
  """results.csv / results.md / runs.csv, Fig. 4 and sweep.json (evaluation.compare)."""
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top  (imports jax)
  from shpeft_jax.evaluation import compare  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  paths = compare.write_tables(records, workdir)
  paths["png"] = compare.plot_f1_vs_trainable(records,
                                              os.path.join(workdir, "f1_vs_trainable.png"))
  if any("train_fraction" in r for r in records):
    paths.update(compare.write_fraction_table(records, workdir))
    paths["fraction_png"] = compare.plot_score_vs_fraction(
        records, os.path.join(workdir, "score_vs_fraction.png"))
  paths["json"] = os.path.join(workdir, "sweep.json")
  with utils.atomic_path(paths["json"]) as tmp, open(tmp, "w") as f:
    json.dump({"records": list(records), "summary": compare.summary_json(records)}, f, indent=2,
              default=str)
  return paths


def _numbers(flag: str, values: Sequence[str], kind) -> list:
  try:
    return [kind(x) for x in values]
  except ValueError as e:
    raise ConfigError(f"{flag} takes comma-separated numbers, got {','.join(values)!r}.") from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from shpeft_jax import console  # pylint: disable=g-import-not-at-top
  console.setup_logging()
  console.import_tensorflow()  # Its banners dropped; accelerators hidden from it.
  import jax  # pylint: disable=g-import-not-at-top
  from shpeft_jax import errors  # pylint: disable=g-import-not-at-top
  from shpeft_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value
  records = []

  def run():
    variants = build_variants(_METHODS.value, _ABLATION.value)
    seeds = _numbers("--seeds", _SEEDS.value, int)
    lr_grid = _numbers("--lr_grid", _LR_GRID.value, float)
    fractions = _numbers("--train_fractions", _TRAIN_FRACTIONS.value, float)
    lock = (workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
      records.extend(run_sweep(_CONFIG.value, workdir, variants, _DATASETS.value,
                               seeds=seeds, lr_grid=lr_grid, restart_from=_RESTART_FROM.value,
                               train_fractions=fractions))
  code = errors.cli_main(run, verbosity=flags.FLAGS.verbosity, hint_path=workdir,
                         log_file=os.path.join(workdir, "log.txt"))
  if code:
    errors.exit_process(code)
  if jax.process_index() == 0:
    paths = write_outputs(records, _WORKDIR.value)
    for key in ("md", "fractions_md"):
      if key in paths:
        with open(paths[key]) as f:
          print(f.read(), flush=True)
    print("wrote " + ", ".join(paths.values()), flush=True)
    from shpeft_jax import report  # pylint: disable=g-import-not-at-top
    for line in report.after_run(_WORKDIR.value):  # one page comparing every run
      print(line, flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
