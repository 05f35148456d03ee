"""Learning rate chosen on validation, statistics at that rate, tables and the plot."""

import csv
import math
import os

import numpy as np
import pytest

from shpeft_jax.errors import ConfigError
from shpeft_jax.evaluation import compare


def _rec(variant, lr, seed, val, test, dataset="digits", pct=1.0):
  return {"dataset": dataset, "variant": variant, "label": variant.upper(), "type": "S",
          "method": variant, "lr": lr, "seed": seed, "val_f1": val, "f1": test,
          "accuracy": test, "auc": test, "trainable_percent": pct}


def _records():
  recs = []
  for s in range(3):
    # SH-PEFT: lr 0.3 is best on validation; lr 1.0 would be best on TEST - it must not be used.
    recs.append(_rec("shpeft", 0.3, s, 0.90, 0.80 + 0.01 * s))
    recs.append(_rec("shpeft", 1.0, s, 0.85, 0.95))
    recs.append(_rec("random", 0.3, s, 0.70, 0.70))
    recs.append(_rec("random", 1.0, s, 0.88, [0.84, 0.79, 0.84][s], pct=1.0))
  return recs


def test_lr_is_chosen_on_validation_not_test():
  chosen = compare.choose_lr(_records())
  assert chosen[("digits", "shpeft")] == 0.3
  assert chosen[("digits", "random")] == 1.0
  rows = {r["variant"]: r for r in compare.summarize(_records())}
  sh = rows["shpeft"]
  assert sh["lr"] == 0.3 and sh["f1"].mean == pytest.approx(0.81)  # not the 0.95 at lr 1.0
  assert sh["f1"].sd == pytest.approx(0.01) and sh["seeds"] == [0, 1, 2]
  d = rows["random"]["vs_reference"]
  # random at 1.0 vs SH-PEFT at 0.3, seed by seed: +0.04, -0.02, +0.02.
  assert d.mean == pytest.approx(0.04 / 3) and d.record == "2-0-1"
  assert sh["vs_reference"] is None


def test_tied_validation_takes_the_first_rate_of_the_grid():
  recs = [_rec("shpeft", lr, s, 0.9, 0.5 + lr) for lr in (0.1, 0.3) for s in range(2)]
  assert compare.choose_lr(recs)[("digits", "shpeft")] == 0.1


def test_missing_validation_or_unequal_seeds_is_refused():
  recs = _records()
  recs[0] = dict(recs[0], val_f1=float("nan"))
  with pytest.raises(ConfigError, match="without a validation macro F1"):
    compare.choose_lr(recs)
  recs = [r for r in _records() if not (r["variant"] == "random" and r["lr"] == 1.0
                                        and r["seed"] == 2)]
  with pytest.raises(ConfigError, match="different seeds"):
    compare.choose_lr(recs)


def test_single_rate_needs_no_validation():
  recs = [_rec("shpeft", 0.3, s, float("nan"), 0.8) for s in range(2)]
  assert compare.choose_lr(recs)[("digits", "shpeft")] == 0.3


def test_tables_show_spread_lr_seeds_and_paired_difference(tmp_path):
  paths = compare.write_tables(_records(), str(tmp_path))
  md = open(paths["md"]).read()
  assert "mean ± sd over 3 seed(s) (0, 1, 2)" in md
  # SH-PEFT row: 81.0 ± 1.0 at lr 0.3; random: (84 + 79 + 84) / 3 = 82.3, sd 2.9, +1.3 vs SH-PEFT.
  assert "| SHPEFT | S | 81.0 ± 1.0 (n=3) | 0.3 |  |  |" in md
  sd = np.std([84, 79, 84], ddof=1)
  assert f"| RANDOM | S | 82.3 ± {sd:.1f} (n=3) | 1 | +1.3 [" in md and "| 2-0-1 |" in md
  rows = list(csv.DictReader(open(paths["csv"])))
  assert [(r["method"], r["lr"], r["n_seeds"]) for r in rows] == [("SHPEFT", "0.3", "3"),
                                                                  ("RANDOM", "1", "3")]
  assert float(rows[1]["ci_low"]) < float(rows[1]["diff_vs_shpeft"]) < float(rows[1]["ci_high"])
  runs = list(csv.DictReader(open(paths["runs"])))
  assert len(runs) == 12
  assert {(r["variant"], r["lr"]) for r in runs if r["chosen_lr"] == "True"} == {
      ("shpeft", "0.3"), ("random", "1.0")}


def test_plot_has_error_bars(tmp_path):
  path = compare.plot_f1_vs_trainable(_records(), str(tmp_path / "f1.png"))
  assert os.path.getsize(path) > 1000
  # The error bar of SH-PEFT is its sd over seeds of the dataset average (one dataset here).
  per_seed = compare._per_seed_avg(_records(), [compare.summarize(_records())[0]])
  assert per_seed == pytest.approx([0.80, 0.81, 0.82])


def test_average_over_datasets_needs_every_dataset():
  recs = [_rec("shpeft", 0.3, s, 0.9, 0.8, dataset="a") for s in range(2)]
  recs += [_rec("shpeft", 0.3, s, 0.9, 0.6, dataset="b") for s in range(2)]
  recs += [_rec("full", 0.3, s, 0.9, 0.9, dataset="a") for s in range(2)]
  rows = compare.summarize(recs)
  _, table = compare._by_variant(rows)
  assert compare._avg([table["shpeft"]["a"], table["shpeft"]["b"]], ["a", "b"]) == \
      pytest.approx(0.7)
  assert math.isnan(compare._avg([table["full"]["a"], None], ["a", "b"]))


def _config(**sweep):
  import ml_collections
  c = ml_collections.ConfigDict({"seed": 0, "optim": {"lr": 0.3},
                                 "model": {"init_checkpoint": "/ckpt/encoder"},
                                 "sweep": {"seeds": (), "lr_grid": ()}})
  c.sweep.update(sweep)
  return c


def test_grid_and_seed_resolution():
  c = _config()
  assert compare.lr_grid_of(c) == (0.3,) and compare.seeds_of(c) == (0,)
  assert compare.lr_grid_of(c, [0.1, 1]) == (0.1, 1.0)
  assert compare.seeds_of(c, [3, 4]) == (3, 4)
  own = _config(lr_grid=(10.0, 100.0), seeds=(0, 1, 2))
  assert compare.lr_grid_of(own, [0.1, 1]) == (10.0, 100.0)  # the method's own grid wins
  assert compare.seeds_of(own) == (0, 1, 2)
  with pytest.raises(ConfigError, match="distinct positive"):
    compare.lr_grid_of(c, [0.1, -1])
  with pytest.raises(ConfigError, match="repeat a seed"):
    compare.seeds_of(c, [1, 1])


def test_run_grid_sets_lr_and_seed_never_the_encoder(tmp_path):
  seen = []

  def run_fn(cfg, run_dir):
    seen.append((cfg.optim.lr, cfg.seed, cfg.model.init_checkpoint, run_dir))
    return {"test": {"f1_macro": 0.5}, "validation": {"f1_macro": 0.4}, "trainable_percent": 1.0}

  base = _config()
  out = compare.run_grid(base, str(tmp_path / "shpeft"), run_fn, seeds=(0, 1), lr_grid=(0.1, 1.0),
                         by_lr=True, by_seed=True)
  assert [(lr, s) for lr, s, _, _ in seen] == [(0.1, 0), (0.1, 1), (1.0, 0), (1.0, 1)]
  assert {ckpt for _, _, ckpt, _ in seen} == {"/ckpt/encoder"}
  assert seen[1][3] == str(tmp_path / "shpeft" / "lr_0.1" / "seed_1")
  assert base.optim.lr == 0.3 and base.seed == 0  # the caller's config is not changed
  assert compare.metrics_of(out[0]["results"])["val_f1"] == 0.4
  # One lr and one seed: the old layout, so earlier results are reused.
  assert compare.run_dir_of("/w/d/shpeft", 0.3, 0, by_lr=False, by_seed=False) == "/w/d/shpeft"


def test_seed_table_text():
  text = compare.format_seed_table(_records())
  assert "over 3 seed(s) 0, 1, 2" in text
  line = next(l for l in text.splitlines() if l.startswith("random"))
  assert "82.3 ± 2.9" in line and "+1.3 [" in line and "2-0-1" in line


def test_a_run_without_test_result_is_left_out_and_counted():
  recs = _records()
  recs = [dict(r, f1=float("nan")) if (r["variant"], r["lr"], r["seed"]) == ("random", 1.0, 2)
          else r for r in recs]
  rows = {r["variant"]: r for r in compare.summarize(recs)}
  assert rows["random"]["f1"].n == 2 and rows["random"]["seeds"] == [0, 1]
  assert rows["random"]["vs_reference"].n == 2  # paired on the seeds both have
  assert rows["shpeft"]["f1"].n == 3


def test_multi_label_records_choose_and_compare_on_mean_auroc():
  """Records of a multi-label dataset carry the task's headline (mean AUROC): the learning rate
  is chosen on the validation AUROC even where the validation F1 says otherwise, the cell and the
  paired difference are AUROC, and the tables name the metric per dataset."""
  recs = []
  for s in range(2):
    for variant, lr, val_auc, val_f1, auc in (("shpeft", 0.1, 0.80, 0.2, 0.70 + 0.02 * s),
                                               ("shpeft", 1.0, 0.70, 0.9, 0.99),
                                               ("linear", 0.1, 0.75, 0.5, 0.60)):
      recs.append({**_rec(variant, lr, s, val_f1, 0.3, dataset="chestxray14"), "auc": auc,
                   "headline": "auc_macro", "val_score": val_auc, "score": auc})
    recs.append(_rec("shpeft", 0.1, s, 0.9, 0.8))  # digits: single-label, macro F1
    recs.append(_rec("linear", 0.1, s, 0.9, 0.7))
  rows = {(r["dataset"], r["variant"]): r for r in compare.summarize(recs)}
  cxr = rows[("chestxray14", "shpeft")]
  assert cxr["lr"] == 0.1 and cxr["score"].mean == pytest.approx(0.71)
  assert cxr["headline"] == "auc_macro" and cxr["f1"].mean == pytest.approx(0.3)
  d = rows[("chestxray14", "linear")]["vs_reference"]
  assert d.mean == pytest.approx(np.mean([0.60 - 0.70, 0.60 - 0.72])) and d.record == "0-0-2"
  assert rows[("digits", "shpeft")]["score"].mean == pytest.approx(0.8)
  text = compare.format_seed_table([r for r in recs if r["dataset"] == "chestxray14"])
  assert "AUROC (mean ± sd)" in text and "Δ AUROC vs shpeft" in text
  assert text.splitlines()[1].split().count("AUC") == 0  # the headline is not repeated
  paths = compare.write_tables(recs, str(_tmp()))
  md = open(paths["md"]).read()
  assert "chestxray14 (AUROC) | lr" in md and "digits (F1) | lr" in md
  # Averaging AUROC with F1 over datasets means nothing: the Avg column stays empty.
  row = next(l for l in md.splitlines() if l.startswith("| SHPEFT | S |"))
  assert row.startswith("| SHPEFT | S | 71.0 ± 1.4 (n=2) | 0.1 |")
  assert row.split("|")[-3].strip() == ""


def _tmp():
  import tempfile  # pylint: disable=g-import-not-at-top
  return tempfile.mkdtemp()
