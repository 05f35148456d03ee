"""Several runs: one resolution of a method's settings for main, the sweep and the demo."""

import copy
import os
import sys

import pytest

from shpeft_jax import runs, sweep
from shpeft_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_config():
  sys.path.insert(0, REPO)
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.pretrain.enabled = False  # What is compared here is the transfer runs' configs.
  return config


def _captured(monkeypatch):
  seen = {}

  def fake_run(config, workdir, seed=None):
    del seed
    # The first run of each method: the demo repeats them per seed (config.sweep.seeds).
    seen.setdefault(config.peft.method, (copy.deepcopy(config), workdir))
    return {"test": {"f1_macro": 0.5, "accuracy": 0.5, "auc_macro": 0.5},
            "trainable_percent": 1.0}
  monkeypatch.setattr(runs, "run_one", fake_run)
  return seen


def test_main_and_sweep_give_a_method_the_same_resolved_config(monkeypatch, tmp_path):
  methods = ("shpeft", "random", "full", "linear", "lora")
  # main with config.methods (the demo's way).
  main_many = _captured(monkeypatch)
  config = _demo_config()
  config.methods = methods
  runs.run(config, str(tmp_path / "many"))
  # main with methods=() and peft.method=X, once per method.
  main_one = {}
  for m in methods:
    seen = _captured(monkeypatch)
    config = _demo_config()
    config.methods = ()
    config.peft.method = m
    runs.run(config, str(tmp_path / "one" / m))
    main_one.update(seen)
  # The sweep.
  from_sweep = {}
  sweep.run_sweep(_demo_config(), str(tmp_path / "sweep"),
                  [sweep.method_variant(m) for m in methods],
                  run_fn=lambda c, d: from_sweep.setdefault(c.peft.method, c) and {})
  overrides = _demo_config().method_overrides.to_dict()
  expected_lr = {"shpeft": overrides["shpeft"]["optim"]["lr"],
                 "random": overrides["shpeft"]["optim"]["lr"],  # shares SH-PEFT's settings
                 "linear": overrides["linear"]["optim"]["lr"],
                 "full": _demo_config().optim.lr, "lora": _demo_config().optim.lr}
  def settings(config):  # All but the XLA cache, which lives in each group's workdir.
    d = config.to_dict()
    d.pop("compilation_cache_dir")
    return d

  for m in methods:
    a, b, c = main_many[m][0], main_one[m][0], from_sweep[m]
    assert settings(a) == settings(b) == settings(c), m
    assert a.optim.lr == expected_lr[m], m
    assert a.methods == () and not a.method_overrides and a.peft.method == m
  assert main_many["random"][1] == str(tmp_path / "many" / "random" / "seed_0")
  assert main_one["random"][1] == str(tmp_path / "one" / "random" / "seed_0")  # its workdir


def test_method_config_rejects_an_override_of_a_missing_field():
  config = _demo_config()
  with config.unlocked():
    config.method_overrides.lora = {"optim": {"lrr": 1.0}}
  with pytest.raises(ConfigError, match="method_overrides.lora"):
    runs.method_config(config, "lora")
  with pytest.raises(ConfigError, match="peft.method 'nope'"):
    runs.method_config(config, "nope")


def test_peft_flags_of_a_sweep_keep_the_cached_pre_training(tmp_path):
  """`--config.peft.*` changes the transfer runs, not the demo's pre-training (method 'full'):
  its stage fingerprints stay those of the plain demo, which are those the pre-training had
  before it took its own `pretrain.peft` (the transfer's peft with method 'full')."""
  import copy  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  from shpeft_jax import stages  # pylint: disable=g-import-not-at-top

  def prints(pre):
    got = stages.trainer_stages(pre, str(tmp_path), source_id="digits-source")
    return {name: stage.fingerprint for name, stage in got.items()}

  config = demo.get_config()
  plain = prints(runs.pretrain_config(config))
  earlier = runs.pretrain_config(config)
  with earlier.unlocked():
    earlier.peft = copy.deepcopy(config.peft)
    earlier.peft.method = "full"
  assert prints(earlier) == plain
  flagged = demo.get_config()
  flagged.peft.k_percent = 1.0
  flagged.peft.selection_scope = "per_row"
  flagged.peft.l2_reduction = "square_of_sum"
  assert prints(runs.pretrain_config(flagged)) == plain
  assert runs.pretrain_config(flagged).peft.method == "full"
  # Without the fix the flags reached the pre-training's mask stage.
  leaked = runs.pretrain_config(flagged)
  with leaked.unlocked():
    leaked.peft = copy.deepcopy(flagged.peft)
    leaked.peft.method = "full"
  assert prints(leaked)["mask"] != plain["mask"]
