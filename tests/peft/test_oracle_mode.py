"""The oracle-mask training mode (peft.method='oracle', issue 26): its mask from a known delta-w by
hand and against the analysis oracle / a brute-force selection per scope, the refusals (no run,
unfinished, not `full`, another tower, other initial weights), and its fingerprint (the full run's
content, not its path)."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from shpeft_jax import base_config
from shpeft_jax import checkpoints
from shpeft_jax import stages
from shpeft_jax import utils
from shpeft_jax.analysis import oracle as oracle_analysis
from shpeft_jax.errors import CheckpointError, ConfigError
from shpeft_jax.peft import methods
from shpeft_jax.peft import oracle
from shpeft_jax.peft import selection

# |delta|: c_fc [[5, 0, 1], [2, 2, 0]] and ln_1 [4, 0, 2, 3] (signed changes, magnitudes by hand).
W0 = {"encoder": {"resblocks_0": {"mlp": {"c_fc": {"kernel": np.zeros((2, 3), np.float32)}},
                                  "ln_1": {"scale": np.ones(4, np.float32)}}},
      "head": {"kernel": np.zeros((2, 2), np.float32)}}
WFT = {"encoder": {"resblocks_0": {
    "mlp": {"c_fc": {"kernel": np.array([[-5, 0, 1], [2, -2, 0]], np.float32)}},
    "ln_1": {"scale": np.array([5, 1, -1, 4], np.float32)}}},
       "head": {"kernel": np.full((2, 2), 7.0, np.float32)}}


def _full_run(path, params, *, method="full", model="test_tiny", image_size=16, seed=0,
              init_checkpoint=""):
  """A finished run folder as the trainer leaves it: config.json, results.json, export/model."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"peft": {"method": method}, "seed": seed,
               "model": {"name": model, "image_size": image_size,
                         "init_checkpoint": init_checkpoint}}, f)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump({"test": {}}, f)
  checkpoints.save_params(os.path.join(path, "export", "model"), params,
                          {"model": model, "image_size": image_size, "num_classes": 2})
  return str(path)


def _peft(run_dir="", **kw):
  cfg = methods.default_peft_config()
  cfg.method = "oracle"
  cfg.oracle_run = str(run_dir)
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_oracle_mask_by_hand(tmp_path):
  # 10 encoder weights; k = 40% -> 4: |delta| 5, 4, 3, then 2 tied three ways (ln_1[2],
  # c_fc[1,0], c_fc[1,1]): the lowest flat index in tree order ('ln_1' before 'mlp') wins. The
  # head is new: it always trains, and the full run's head does not count.
  run = _full_run(tmp_path / "full", WFT)
  mask, info = methods.build_mask(_peft(run, k_percent=40.0), W0)
  block = mask["encoder"]["resblocks_0"]
  np.testing.assert_array_equal(block["ln_1"]["scale"], [True, False, True, True])
  np.testing.assert_array_equal(block["mlp"]["c_fc"]["kernel"],
                                [[True, False, False], [False, False, False]])
  assert mask["head"]["kernel"].all()
  assert info.k == 4 and info.threshold == 2.0 and info.num_tied == 3
  # The analysis command's oracle is the same selection.
  ref, _ = oracle_analysis.oracle_mask(W0["encoder"], WFT["encoder"], k_percent=40.0)
  for name, m in utils.flatten_names(ref).items():
    np.testing.assert_array_equal(utils.flatten_names(mask["encoder"])[name], m)


@pytest.mark.parametrize("scope", ["global", "per_tensor", "per_row"])
def test_oracle_mask_of_a_tiny_tower_against_a_brute_force_top_k(tmp_path, scope):
  shapes = utils.flatten_names(methods.param_shapes("test_tiny", 2))
  rng = np.random.default_rng(0)
  w0 = utils.unflatten_names({n: rng.standard_normal(s.shape).astype(np.float32)
                              for n, s in shapes.items()})
  wft = utils.unflatten_names({n: (v + rng.uniform(0.1, 2.0) * rng.standard_normal(v.shape)
                                   ).astype(np.float32) for n, v in utils.flatten_names(w0).items()})
  run = _full_run(tmp_path / "full", wft)
  mask, _ = methods.build_mask(_peft(run, k_percent=10.0, selection_scope=scope), w0)
  delta = {n: np.abs(utils.flatten_names(wft["encoder"])[n] - v)
           for n, v in utils.flatten_names(w0["encoder"]).items()}
  got = utils.flatten_names(mask["encoder"])
  if scope == "global":  # Brute force: one argsort over every encoder weight.
    flat = np.concatenate([delta[n].ravel() for n in delta])
    k = selection.resolve_k(flat.size, k_percent=10.0)
    want = np.zeros(flat.size, bool)
    want[np.argsort(-flat, kind="stable")[:k]] = True
    np.testing.assert_array_equal(np.concatenate([got[n].ravel() for n in delta]), want)
  else:  # The same selection the scope's own tests check against a brute force, on |delta|.
    ref, _ = selection.select_top_k(utils.unflatten_names(delta), k_percent=10.0, scope=scope)
    for n, m in utils.flatten_names(ref).items():
      np.testing.assert_array_equal(got[n], m, err_msg=n)
  shapes_tree = methods.param_shapes("test_tiny", 2)
  assert methods.trainable_count(mask) == methods.count_trainable(
      _peft(run, k_percent=10.0, selection_scope=scope), shapes_tree)["trainable"]


def test_a_config_without_its_full_run_or_ranking_the_head_is_refused():
  with pytest.raises(ConfigError, match="set --config.peft.oracle_run=.*--methods full,oracle"):
    methods.validate_peft(_peft(""))
  with pytest.raises(ConfigError, match="include_head=False"):
    methods.validate_peft(_peft("/some/run", include_head=True))
  methods.validate_peft(_peft("/some/run"))  # Existence is checked when the run starts.


def _config(run_dir, *, seed=0, init="", model="test_tiny"):
  config = ml_collections.ConfigDict({"peft": _peft(run_dir).to_dict(), "seed": seed, "model": {
      "name": model, "image_size": 16, "init_checkpoint": init}})
  return config


def test_a_missing_unfinished_or_other_run_is_refused(tmp_path):
  with pytest.raises(ConfigError, match="is not a finished run .* run `--config.peft.method=full`"):
    oracle.check_reference(_config(tmp_path / "nowhere"), "")
  unfinished = _full_run(tmp_path / "unfinished", WFT)
  os.remove(os.path.join(unfinished, "results.json"))
  with pytest.raises(ConfigError, match="not a finished run"):
    oracle.check_reference(_config(unfinished), "")
  shpeft = _full_run(tmp_path / "shpeft", WFT, method="shpeft")
  with pytest.raises(ConfigError, match="is a 'shpeft' run; the oracle needs a `full` run"):
    oracle.check_reference(_config(shpeft), "")
  other_tower = _full_run(tmp_path / "demo_small", WFT, model="demo_small")
  with pytest.raises(ConfigError, match="model.name='demo_small'.*same tower"):
    oracle.check_reference(_config(other_tower), "")
  # From scratch: the initial weights are the seed's, so another seed is another start.
  full = _full_run(tmp_path / "full", WFT, seed=1)
  with pytest.raises(ConfigError, match="scratch \\(seed 1\\).*same weights"):
    oracle.check_reference(_config(full, seed=0), "")
  assert oracle.check_reference(_config(full, seed=1), "") == stages.checkpoint_id(
      oracle.model_dir(full))


def test_a_full_run_from_other_weights_or_of_another_encoder_is_refused(tmp_path):
  init_a = checkpoints.save_params(str(tmp_path / "init_a"), W0, {"model": "test_tiny"})
  init_b = checkpoints.save_params(str(tmp_path / "init_b"), WFT, {"model": "test_tiny"})
  full = _full_run(tmp_path / "full", WFT, init_checkpoint=init_a)
  id_a, id_b = stages.checkpoint_id(init_a), stages.checkpoint_id(init_b)
  assert oracle.check_reference(_config(full, init=init_a), id_a)
  with pytest.raises(ConfigError, match="holds other weights .*same weights"):
    oracle.check_reference(_config(full, init=init_b), id_b)
  with pytest.raises(ConfigError, match="started from .*this run from scratch"):
    oracle.check_reference(_config(full), "")
  # Same names in the config, another encoder in the checkpoint: refused when it is read.
  other = {"encoder": {"resblocks_0": {"ln_1": {"scale": np.ones(5, np.float32)}}}}
  run = _full_run(tmp_path / "other", other)
  with pytest.raises(CheckpointError, match="another encoder .*same tower"):
    methods.build_mask(_peft(run, k_percent=40.0), W0)


def test_the_fingerprint_holds_the_full_runs_content_not_its_path(tmp_path):
  config = base_config.get_config()
  config.model.name, config.model.image_size = "test_tiny", 16
  config.peft.method = "oracle"
  full = _full_run(tmp_path / "full", WFT, seed=config.seed)
  config.peft.oracle_run = full
  mask = stages.trainer_stages(config, str(tmp_path / "w"), source_id="s")["mask"]
  assert mask.inputs["peft.oracle_run (content)"] == stages.checkpoint_id(oracle.model_dir(full))
  assert "peft.oracle_run" not in mask.inputs
  moved = shutil.copytree(full, tmp_path / "moved")
  config.peft.oracle_run = str(moved)
  assert stages.trainer_stages(config, str(tmp_path / "w"), source_id="s")["mask"].fingerprint == (
      mask.fingerprint)
  # A redone full run (other weights) is another oracle mask.
  shutil.rmtree(os.path.join(moved, "export"))
  checkpoints.save_params(os.path.join(moved, "export", "model"), W0, {"model": "test_tiny"})
  assert stages.trainer_stages(config, str(tmp_path / "w"), source_id="s")["mask"].fingerprint != (
      mask.fingerprint)
  # Other methods: the field is not an input (workdirs from before it keep their fingerprints).
  config.peft.method = "random"
  other = stages.trainer_stages(config, str(tmp_path / "w"), source_id="s")["mask"]
  config.peft.oracle_run = ""
  assert stages.trainer_stages(config, str(tmp_path / "w"), source_id="s")["mask"].fingerprint == (
      other.fingerprint)
