"""The sweep: variants, per-run configs, Table 1 / Fig. 4 outputs, and a tiny end-to-end run."""

import csv
import json
import math
import os
import sys

import pytest

from shpeft_jax import runs
from shpeft_jax import sweep
from shpeft_jax.errors import ConfigError
from shpeft_jax.evaluation import compare
from shpeft_jax.peft import methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_config():
  sys.path.insert(0, REPO)
  from configs import demo  # pylint: disable=g-import-not-at-top
  return demo.get_config()


def test_default_variants_are_table1_and_ablation_presets_match_the_paper():
  assert [v.method for v in sweep.build_variants([], [])] == [
      m for m in methods.method_names() if m != "oracle"]
  t4 = sweep.build_variants([], ["table4"])
  assert [(dict(v.overrides)["mode"], dict(v.overrides)["estimator"]) for v in t4] == [
      ("ta", "l2"), ("td", "l1"), ("hybrid", "l1"), ("td", "l2"), ("hybrid", "l2")]
  assert all(v.method == "shpeft" and dict(v.overrides)["lam"] == 1.0 for v in t4)
  t5 = sweep.build_variants([], ["table5"])
  assert [dict(v.overrides)["lam"] for v in t5] == [1.5, 1.2, 1.0, 0.8, 0.5]
  assert [v.method for v in sweep.build_variants(["shpeft"], ["random"])] == ["shpeft", "random"]
  with pytest.raises(ConfigError, match="ablation"):
    sweep.build_variants([], ["table9"])
  with pytest.raises(ConfigError, match="method"):
    sweep.build_variants(["nope"], [])


def test_variant_config_replaces_only_the_variant_fields():
  base = _demo_config()
  v = sweep.build_variants([], ["table4"])[1]  # td-L1
  cfg = sweep.variant_config(base, v, "other_data")
  assert (cfg.peft.method, cfg.peft.mode, cfg.peft.estimator, cfg.peft.lam) == (
      "shpeft", "td", "l1", 1.0)
  assert cfg.data.name == "other_data" and not cfg.get("methods")
  assert base.peft.mode == "hybrid" and base.data.name == "digits"  # The base is untouched.
  assert cfg.model.name == base.model.name
  # The config's per-method overrides apply as in `main` (the demo tunes lr per method).
  overrides = base.method_overrides.to_dict()
  assert cfg.optim.lr == overrides["shpeft"]["optim"]["lr"]
  lin = sweep.variant_config(base, sweep.method_variant("linear"))
  assert lin.optim.lr == overrides["linear"]["optim"]["lr"] and lin.peft.method == "linear"
  assert sweep.variant_config(base, sweep.method_variant("adapter")).optim.lr == base.optim.lr
  rnd = sweep.variant_config(base, sweep.method_variant("random"))  # The control = SH-PEFT's.
  assert rnd.peft.method == "random" and rnd.optim.lr == overrides["shpeft"]["optim"]["lr"]


def _records():
  rows = []
  for ds, f1s in (("d1", (0.5, 0.8)), ("d2", (0.7, 0.6))):
    for (key, label, pct), f1 in zip((("linear", "Linear Prob", 0.01),
                                      ("shpeft", "SH-PEFT", 1.0)), f1s):
      rows.append({"dataset": ds, "variant": key, "label": label, "type": "S", "method": key,
                   "overrides": {}, "trainable": 1, "total": 100, "trainable_percent": pct,
                   "lr": 0.1, "seed": 0, "val_f1": f1, "f1": f1, "accuracy": f1, "auc": f1})
  return rows


def test_tables_and_plot_from_records(tmp_path):
  paths = sweep.write_outputs(_records(), str(tmp_path))
  with open(paths["csv"]) as f:
    table = list(csv.reader(f))
  assert table[0][:9] == ["method", "type", "dataset", "metric", "lr", "n_seeds", "seeds",
                          "score_mean", "score_sd"]
  assert [row[:9] for row in table[1:]] == [
      ["Linear Prob", "S", "d1", "f1_macro", "0.1", "1", "0", "50.00", ""],
      ["SH-PEFT", "S", "d1", "f1_macro", "0.1", "1", "0", "80.00", ""],
      ["Linear Prob", "S", "d2", "f1_macro", "0.1", "1", "0", "70.00", ""],
      ["SH-PEFT", "S", "d2", "f1_macro", "0.1", "1", "0", "60.00", ""]]
  # One seed: no sd, no interval; the paired difference is the one seed's difference.
  assert table[0][13:15] == ["diff_vs_shpeft", "ci_low"]
  assert table[1][13] == "-30.00" and table[1][14] == ""
  md = open(paths["md"]).read()
  assert "| Method | Type | d1 | lr | Δ vs SH-PEFT | W-T-L | d2 | lr |" in md
  assert "| SH-PEFT | S | 80.0 (n=1) | 0.1 |  |  | 60.0 (n=1) | 0.1 |  |  | 70.0 | 1 |" in md
  assert "| Linear Prob | S | 50.0 (n=1) | 0.1 | -30.0 | 0-0-1 | 70.0 (n=1) | 0.1 | +10.0 |" in md
  import matplotlib.image as mpimg  # pylint: disable=g-import-not-at-top
  img = mpimg.imread(paths["png"])
  assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0
  with open(paths["runs"]) as f:
    assert len(list(csv.DictReader(f))) == 4


def test_run_sweep_layout_and_configs_with_a_recording_runner(tmp_path):
  base = _demo_config()
  with base.unlocked():
    base.pretrain.enabled = False
    base.sweep.seeds = ()  # The plain layout: one run per (dataset, variant).
  seen = []

  def fake_run(cfg, workdir):
    seen.append((cfg.data.name, cfg.peft.method, cfg.peft.lam, workdir))
    return {"trainable": 7, "total": 70, "trainable_percent": 10.0,
            "test": {"f1_macro": 0.25 if cfg.peft.lam == 0.5 else 0.5, "accuracy": 0.5,
                     "auc_macro": 0.5}, "validation": {"f1_macro": 0.5}}

  variants = sweep.build_variants(["linear"], ["table5"])
  records = sweep.run_sweep(base, str(tmp_path), variants, ["a", "b"], run_fn=fake_run)
  assert len(records) == len(seen) == 2 * 6
  assert seen[0] == ("a", "linear", 1.0, os.path.join(str(tmp_path), "a", "linear"))
  assert seen[-1] == ("b", "shpeft", 0.5, os.path.join(str(tmp_path), "b", "lam_0.5"))
  rows = compare.summarize(records)
  assert [r["f1"].mean for r in rows] == ([0.5] * 5 + [0.25]) * 2
  assert {r["lr"] for r in records} == {100.0, 0.3}  # linear 100, the shpeft ablations 0.3


def test_seeds_and_lr_grid_layout_and_choice_on_validation(tmp_path):
  """--seeds / --lr_grid: one run per (lr, seed) in lr_<lr>/seed_<s>, the lr chosen on validation
  (the validation-best lr differs from the test-best one), the encoder the same for every run."""
  base = _demo_config()
  with base.unlocked():
    base.pretrain.enabled = False
    base.model.init_checkpoint = "/ckpt/encoder"
    base.method_overrides = base.method_overrides.to_dict()
  seen = []

  def fake_run(cfg, workdir):
    seen.append((cfg.peft.method, cfg.optim.lr, cfg.seed, cfg.model.init_checkpoint, workdir))
    lr = cfg.optim.lr
    return {"trainable": 7, "total": 70, "trainable_percent": 10.0,
            # Validation prefers the small lr, test the large one: the table must show the small.
            "validation": {"f1_macro": 0.9 if lr == 0.1 else 0.6},
            "test": {"f1_macro": (0.70 if lr == 0.1 else 0.95) + 0.01 * cfg.seed,
                     "accuracy": 0.5, "auc_macro": 0.5}}

  variants = sweep.build_variants(["shpeft", "random"], [])
  records = sweep.run_sweep(base, str(tmp_path), variants, run_fn=fake_run, seeds=[0, 1, 2],
                            lr_grid=[0.1, 1.0])
  assert len(seen) == 2 * 2 * 3
  assert {s[3] for s in seen} == {"/ckpt/encoder"}
  assert seen[0][4] == os.path.join(str(tmp_path), "digits", "shpeft", "lr_0.1", "seed_0")
  assert [(s[1], s[2]) for s in seen[:6]] == [(0.1, 0), (0.1, 1), (0.1, 2), (1.0, 0), (1.0, 1),
                                              (1.0, 2)]
  paths = sweep.write_outputs(records, str(tmp_path))
  md = open(paths["md"]).read()
  assert "mean ± sd over 3 seed(s) (0, 1, 2)" in md
  assert "| SH-PEFT | S | 71.0 ± 1.0 (n=3) | 0.1 |" in md  # not 96.0 at lr 1
  with open(paths["runs"]) as f:
    runs = list(csv.DictReader(f))
  assert len(runs) == 12 and sum(r["chosen_lr"] == "True" for r in runs) == 6


def test_the_oracle_reads_the_full_run_of_its_seed_at_the_validated_lr(tmp_path):
  base = _demo_config()
  with base.unlocked():
    base.pretrain.enabled = False
    base.model.init_checkpoint = "/ckpt/encoder"
    base.method_overrides = base.method_overrides.to_dict()
  seen = []

  def fake_run(cfg, workdir):
    seen.append((cfg.peft.method, cfg.optim.lr, cfg.seed, cfg.peft.oracle_run, workdir))
    return {"trainable": 7, "total": 70, "trainable_percent": 10.0,
            "validation": {"f1_macro": 0.9 if cfg.optim.lr == 0.3 else 0.6},
            "test": {"f1_macro": 0.8, "accuracy": 0.5, "auc_macro": 0.5}}

  # Listed first, the oracle still runs after `full`, whose runs it reads.
  variants = sweep.build_variants(["oracle", "full"], [])
  sweep.run_sweep(base, str(tmp_path), variants, run_fn=fake_run, seeds=[0, 1],
                  lr_grid=[0.1, 0.3])
  assert [s[0] for s in seen] == ["full"] * 4 + ["oracle"] * 4
  assert {s[3] for s in seen[:4]} == {""}
  assert [(s[1], s[2], s[3]) for s in seen[4:]] == [
      (lr, seed, os.path.join(str(tmp_path), "digits", "full", "lr_0.3", f"seed_{seed}"))
      for lr in (0.1, 0.3) for seed in (0, 1)]
  # A config's own peft.oracle_run is used as it is, and then `full` need not be in the sweep.
  seen.clear()
  with base.unlocked():
    base.peft.oracle_run = "/runs/full"
  sweep.run_sweep(base, str(tmp_path / "own"), sweep.build_variants(["oracle"], []),
                  run_fn=fake_run, seeds=[0])
  assert [(s[0], s[3]) for s in seen] == [("oracle", "/runs/full")]


def test_an_oracle_without_its_full_runs_is_refused_before_any_run(tmp_path):
  seen = []
  with pytest.raises(ConfigError, match="the sweep's `full` run of each seed: add full to"):
    sweep.run_sweep(_demo_config(), str(tmp_path), sweep.build_variants(["shpeft", "oracle"], []),
                    run_fn=lambda c, w: seen.append(w))
  assert not seen and not os.listdir(tmp_path)


def _tiny_demo_base(num_steps: int):
  """The demo config with test_tiny, no pre-training, `num_steps` steps, one seed (CPU seconds)."""
  base = _demo_config()
  with base.unlocked():
    base.model.name = "test_tiny"
    base.pretrain.enabled = False
    base.train.num_steps = num_steps
    base.train.eval_every = 0
    base.train.checkpoint_every = num_steps
    base.train.batch_size = 16
    base.peft.score_batches = 1
    base.peft.k_percent = 5.0
    base.sweep.seeds = ()
  return base


@pytest.mark.slow
def test_tiny_sweep_end_to_end_on_the_demo_digits(tmp_path):
  """The real trainer on the bundled digits with test_tiny and a few steps (CPU)."""
  base = _tiny_demo_base(num_steps=3)  # One seed: the plain layout (seeds: test_seeds.py).
  variants = sweep.build_variants(["linear", "shpeft", "random"], [])
  records = sweep.run_sweep(base, str(tmp_path), variants)
  paths = sweep.write_outputs(records, str(tmp_path))
  by = {r["variant"]: r for r in records}
  # Trainable counts agree with the methods table for the same model (5 digits classes).
  for key in ("linear", "shpeft", "random"):
    cfg = sweep.variant_config(base, sweep.method_variant(key))
    shapes = methods.param_shapes("test_tiny", 5, methods.additive_config_for(cfg.peft))
    assert by[key]["trainable"] == methods.count_trainable(cfg.peft, shapes)["trainable"]
    assert 0.0 <= by[key]["f1"] <= 1.0
  assert by["linear"]["trainable"] == 32 * 5 + 5
  with open(paths["csv"]) as f:
    rows = {r["method"]: r for r in csv.DictReader(f)}
  assert math.isclose(float(rows["SH-PEFT"]["f1_mean"]), 100 * by["shpeft"]["f1"], abs_tol=0.006)
  assert os.path.isfile(os.path.join(str(tmp_path), "digits", "shpeft", "results.json"))
  assert os.path.getsize(paths["png"]) > 1000
  # A second call reuses the finished runs (results.json) and gives the same records.
  again = sweep.run_sweep(base, str(tmp_path), variants)
  assert [r["f1"] for r in again] == [r["f1"] for r in records]


def test_restart_from_reaches_every_run_and_a_bad_stage_is_refused(tmp_path, monkeypatch):
  base = _demo_config()
  with base.unlocked():
    base.pretrain.enabled = False
    base.model.init_checkpoint = "/ckpt/encoder"
  seen = []

  def fake_run(cfg, workdir, restart_from=None):
    seen.append((cfg.peft.method, cfg.seed, restart_from))
    return {"trainable": 1, "total": 2, "trainable_percent": 50.0,
            "test": {"f1_macro": 0.5, "accuracy": 0.5, "auc_macro": 0.5}}

  variants = sweep.build_variants(["shpeft", "full"], [])
  sweep.run_sweep(base, str(tmp_path), variants, run_fn=fake_run, seeds=[0, 1],
                  restart_from="mask")
  assert seen == [(m, s, "mask") for m in ("shpeft", "full") for s in (0, 1)]
  seen.clear()
  # 'pretrain' redoes the pre-trained encoder, so every run is redone from its data stage.
  prepared = []
  real_prepare = runs.prepare
  monkeypatch.setattr(runs, "prepare", lambda config, workdir, restart_pretrain=False: (
      prepared.append(restart_pretrain) or real_prepare(config, workdir)))
  sweep.run_sweep(base, str(tmp_path), variants, run_fn=fake_run, restart_from="pretrain")
  assert prepared == [True]
  assert len(seen) == 2 * len(base.sweep.seeds) and {r for _, _, r in seen} == {"data"}
  sweep.run_sweep(base, str(tmp_path), variants, run_fn=fake_run, restart_from="train")
  assert prepared == [True, False]
  with pytest.raises(ConfigError, match="is not a stage"):
    sweep.run_sweep(base, str(tmp_path), variants, run_fn=fake_run, restart_from="nope")


def test_train_fractions_sweep_chooses_lr_per_fraction_and_pairs_to_shpeft(tmp_path):
  """--train_fractions: one column per fraction (its runs in <data>_fraction_<f>/), the lr chosen
  on validation per fraction and method, the fraction table's numbers against numpy / scipy."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import stats as sps  # pylint: disable=g-import-not-at-top
  base = _demo_config()
  with base.unlocked():
    base.pretrain.enabled = False
    base.method_overrides = base.method_overrides.to_dict()
  seen = []

  def test_score(method, fraction, lr, seed):
    return 0.4 + 0.5 * fraction + (0.05 if method == "shpeft" else 0.01 * seed) + (
        0.02 * seed if lr == 1.0 else 0.03 * seed * seed)

  def fake_run(cfg, workdir):
    f, lr, m = cfg.data.train_fraction, cfg.optim.lr, cfg.peft.method
    seen.append((m, f, lr, cfg.seed, workdir))
    # Validation prefers lr 0.1 at the small fraction, lr 1.0 at the whole split.
    val = 0.9 if (lr == 0.1) == (f < 1.0) else 0.5
    return {"trainable": 7, "total": 70, "trainable_percent": 10.0, "validation": {"f1_macro": val},
            "test": {"f1_macro": test_score(m, f, lr, cfg.seed), "accuracy": 0.5,
                     "auc_macro": 0.5}}

  variants = sweep.build_variants(["shpeft", "random"], [])
  records = sweep.run_sweep(base, str(tmp_path), variants, run_fn=fake_run, seeds=[0, 1, 2],
                            lr_grid=[0.1, 1.0], train_fractions=[0.1, 1.0])
  assert len(seen) == 2 * 2 * 2 * 3
  assert seen[0][4] == os.path.join(str(tmp_path), "digits_fraction_0.1", "shpeft", "lr_0.1",
                                    "seed_0")
  assert {r["train_fraction"] for r in records} == {0.1, 1.0}
  paths = sweep.write_outputs(records, str(tmp_path))
  with open(paths["fractions_csv"]) as f:
    rows = {(r["variant"], r["train_fraction"]): r for r in csv.DictReader(f)}
  assert {k: rows[k]["lr"] for k in rows} == {("shpeft", "0.1"): "0.1", ("random", "0.1"): "0.1",
                                               ("shpeft", "1"): "1", ("random", "1"): "1"}
  for (variant, fraction), row in rows.items():
    f, lr = float(fraction), float(row["lr"])
    scores = np.array([test_score(variant, f, lr, s) for s in (0, 1, 2)])
    assert float(row["score_mean"]) == pytest.approx(100 * scores.mean(), abs=0.006)
    assert float(row["score_sd"]) == pytest.approx(100 * scores.std(ddof=1), abs=0.006)
    if variant == "random":
      ref = np.array([test_score("shpeft", f, lr, s) for s in (0, 1, 2)])
      d = scores - ref
      lo, _ = sps.t.interval(0.95, 2, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(3))
      assert float(row["diff_vs_shpeft"]) == pytest.approx(100 * d.mean(), abs=0.006)
      assert (row["wins"], row["ties"], row["losses"]) == ("0", "0", "3")
      assert float(row["ci_low"]) == pytest.approx(100 * lo, abs=0.006)
  md = open(paths["fractions_md"]).read()
  assert "| Method | 10% | lr | Δ vs SH-PEFT | W-T-L | 100% | lr |" in md
  assert md.count("| Random") == 1 and md.count("| SH-PEFT") == 1
  import matplotlib.image as mpimg  # pylint: disable=g-import-not-at-top
  img = mpimg.imread(paths["fraction_png"])
  assert img.ndim == 3 and img.shape[1] > 300 and img.std() > 0


@pytest.mark.parametrize("fractions, message", [
    ([0.0, 1.0], r"data.train_fraction=0.0 must be in \(0, 1\]"),
    ([1.5], r"data.train_fraction=1.5 must be in \(0, 1\]"),
    ([0.1, 0.1], "repeats a fraction"),
])
def test_bad_train_fractions_are_refused_before_any_run(tmp_path, fractions, message):
  seen = []
  with pytest.raises(ConfigError, match=message):
    sweep.run_sweep(_demo_config(), str(tmp_path), sweep.build_variants(["shpeft"], []),
                    run_fn=lambda c, w: seen.append(w), train_fractions=fractions)
  assert not seen and not os.listdir(tmp_path)


@pytest.mark.slow
def test_tiny_fraction_sweep_end_to_end_same_subset_for_every_method_and_resumed(tmp_path):
  """The real trainer at fractions 0.2 and 1.0: the subset's size by hand, one subset for every
  method, a second call reuses every run, the comparison page groups runs by data and subset."""
  import json  # pylint: disable=g-import-not-at-top
  from shpeft_jax import report  # pylint: disable=g-import-not-at-top
  base = _tiny_demo_base(num_steps=2)
  variants = sweep.build_variants(["shpeft", "linear"], [])
  records = sweep.run_sweep(base, str(tmp_path), variants, train_fractions=[0.2, 1.0])
  subsets = {}
  for r in records:
    with open(os.path.join(str(tmp_path), r["run_dir"], "results.json")) as f:
      subsets[(r["variant"], r["train_fraction"])] = json.load(f).get("train_subset")
  # Digits target train: 109, 109, 108, 104, 108 images per class; round(0.2 n) halves up =
  # 22, 22, 22, 21, 22 = 109 images.
  assert subsets[("shpeft", 0.2)]["num_images"] == 109
  assert sorted(subsets[("shpeft", 0.2)]["positives_per_class"].values()) == [21, 22, 22, 22, 22]
  assert subsets[("shpeft", 0.2)]["subset_id"] == subsets[("linear", 0.2)]["subset_id"]
  assert subsets[("shpeft", 1.0)] is None and subsets[("linear", 1.0)] is None
  paths = sweep.write_outputs(records, str(tmp_path))
  assert "| Method | 20% | lr |" in open(paths["fractions_md"]).read()
  again = sweep.run_sweep(base, str(tmp_path), variants, train_fractions=[0.2, 1.0])
  assert [r["f1"] for r in again] == [r["f1"] for r in records]
  out = report.write_report(str(tmp_path), log=lambda *_: None)
  page = open(out["html"]).read()
  assert "digits_target (0.2 of the training labels (subset_seed 0))" in page


@pytest.mark.slow
def test_tiny_sweep_with_the_oracle_end_to_end(tmp_path):
  """full, then the oracle from its export, with the real trainer (test_tiny, 3 steps): the
  oracle's mask is the analysis oracle's top-5% of |w_ft - w_0|, w_0 the init checkpoint."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from shpeft_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from shpeft_jax import stages  # pylint: disable=g-import-not-at-top
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  from shpeft_jax.analysis import oracle as oracle_analysis  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import mask_io  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shapes = utils.flatten_names(methods.param_shapes("test_tiny", 5))
  init = utils.unflatten_names({n: (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
                                for n, s in shapes.items()})
  init_dir = checkpoints.save_params(str(tmp_path / "init"), init, {
      "model": "test_tiny", "image_size": 16, "num_classes": 5})
  base = _tiny_demo_base(num_steps=3)
  with base.unlocked():
    base.model.init_checkpoint = init_dir
  work = str(tmp_path / "sweep")
  records = sweep.run_sweep(base, work, sweep.build_variants(["full", "oracle"], []))
  by = {r["variant"]: r for r in records}
  full_model = os.path.join(work, "digits", "full", "export", "model")
  w_ft, _ = checkpoints.load_params(full_model)
  want, _ = oracle_analysis.oracle_mask(init["encoder"], w_ft["encoder"], k_percent=5.0)
  got = mask_io.load_mask(os.path.join(work, "digits", "oracle", "mask.npz"))
  for name, m in utils.flatten_names(want).items():
    np.testing.assert_array_equal(utils.flatten_names(got["encoder"])[name], m, err_msg=name)
  assert all(np.all(m) for m in utils.flatten_names(got["head"]).values())
  n_encoder = sum(int(np.size(m)) for m in utils.flatten_names(want).values())
  k = round(0.05 * n_encoder)
  assert by["oracle"]["trainable"] == k + 32 * 5 + 5
  with open(os.path.join(work, "digits", "oracle", "fingerprints", "mask.json")) as f:
    assert json.load(f)["inputs"]["peft.oracle_run (content)"] == stages.checkpoint_id(full_model)
  assert 0.0 <= by["oracle"]["f1"] <= 1.0
