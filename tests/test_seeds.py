"""Seeds through the real trainer: what a seed changes, and what it must not (the encoder)."""

import os
import sys

import jax
import numpy as np
import pytest

from shpeft_jax import checkpoints, params_io, runs, utils
from shpeft_jax.peft import mask_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_seeds_change_mask_scores_and_head_never_the_pretrained_encoder(tmp_path):
  sys.path.insert(0, REPO)
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.model.name = "test_tiny"
  config.pretrain.num_steps = 2
  config.pretrain.eval_every = 0
  config.pretrain.optim.warmup_steps = 0
  config.train.num_steps = 2
  config.train.eval_every = 0
  config.train.checkpoint_every = 2
  config.train.batch_size = 16
  config.peft.score_batches = 2
  config.peft.k_percent = 5.0
  config.methods = ("shpeft", "random")
  config.sweep.seeds = (0, 1)
  config.sweep.lr_grid = ()
  out = runs.run(config, str(tmp_path))
  assert sorted(out) == ["random", "shpeft"] and [r["seed"] for r in out["shpeft"]] == [0, 1]
  pre, _ = checkpoints.load_params(str(tmp_path / "pretrain" / "export" / "model"))
  pre_enc = utils.flatten_names(pre["encoder"])
  masks, exports = {}, {}
  for m in ("shpeft", "random"):
    for s in (0, 1):
      d = tmp_path / m / f"seed_{s}"
      assert (d / "results.json").is_file()
      masks[m, s] = {k: v for k, v in utils.flatten_names(mask_io.load_mask(
          str(d / "mask.npz"))).items() if v is not None}
      exports[m, s], _ = checkpoints.load_params(str(d / "export" / "model"))
  for m in ("shpeft", "random"):
    # The selection moves with the seed (random: the mask key; SH-PEFT: head init and batches).
    assert any(not np.array_equal(masks[m, 0][k], masks[m, 1][k]) for k in masks[m, 0])
    # The head starts from a different init (after 2 steps it still differs).
    assert not np.allclose(exports[m, 0]["head"]["kernel"], exports[m, 1]["head"]["kernel"])
    for s in (0, 1):
      # Every frozen encoder weight is the pre-trained one, bit for bit, whatever the seed.
      enc = utils.flatten_names(exports[m, s]["encoder"])
      for name, w in enc.items():
        key = "encoder/" + name
        frozen = ~masks[m, s][key] if key in masks[m, s] else np.ones(w.shape, bool)
        np.testing.assert_array_equal(np.asarray(w)[frozen], np.asarray(pre_enc[name])[frozen])
  # The scores of SH-PEFT differ between seeds (other scoring batches and head).
  sc = [jax.tree.leaves(params_io.restore_tree(str(tmp_path / "shpeft" / f"seed_{s}" / "scores")))
        for s in (0, 1)]
  assert any(not np.array_equal(a, b) for a, b in zip(*sc))
  # One pre-training for all runs.
  assert sorted(os.listdir(tmp_path)) == ["pretrain", "random", "results.json",
                                          "results_table.txt", "shpeft", "xla_cache"]
  table = open(tmp_path / "results_table.txt").read()
  assert "over 2 seed(s) 0, 1" in table
