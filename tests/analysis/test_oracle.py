"""The oracle mask from a known delta-w by hand, and recall / delta share against hand counts."""

import jax
import numpy as np
import pytest

from shpeft_jax.analysis import oracle
from shpeft_jax.errors import ConfigError

W0 = {"resblocks_0": {"mlp": {"c_fc": {"kernel": np.zeros((2, 3), np.float32)}},
                      "ln_1": {"scale": np.ones(4, np.float32)}}}
# |delta|: c_fc [[5, 0, 1], [2, 2, 0]] and ln_1 [4, 0, 2, 3] (signed changes, magnitudes by hand).
WFT = {"resblocks_0": {"mlp": {"c_fc": {"kernel": np.array([[-5, 0, 1], [2, -2, 0]], np.float32)}},
                       "ln_1": {"scale": np.array([5, 1, -1, 4], np.float32)}}}


def test_oracle_mask_by_hand():
  # 10 weights; k = 40% -> 4: |delta| 5, 4, 3, then 2 tied three ways (ln_1[2], c_fc[1,0],
  # c_fc[1,1]): the lowest global flat index wins, and the tree order puts 'ln_1' before 'mlp',
  # so ln_1[2] is taken.
  mask, info = oracle.oracle_mask(W0, WFT, k_percent=40.0)
  np.testing.assert_array_equal(mask["resblocks_0"]["ln_1"]["scale"], [True, False, True, True])
  np.testing.assert_array_equal(mask["resblocks_0"]["mlp"]["c_fc"]["kernel"],
                                [[True, False, False], [False, False, False]])
  assert info.k == 4 and info.threshold == 2.0 and info.num_tied == 3


def test_compare_to_oracle_by_hand():
  delta = {"resblocks_0": {"mlp": {"c_fc": {"kernel": np.array([[5., 0, 1], [2, 2, 0]])}},
                           "ln_1": {"scale": np.array([4., 0, 2, 3])}}}
  orc, _ = oracle.oracle_mask(W0, WFT, k_percent=40.0)
  sel = {"resblocks_0": {"mlp": {"c_fc": {"kernel": np.array([[1, 1, 0], [0, 1, 0]], bool)}},
                         "ln_1": {"scale": np.array([0, 0, 0, 1], bool)}}}
  got = oracle.compare_to_oracle(sel, orc, delta)
  # Hits: c_fc[0,0] (5) and ln_1[3] (3) -> 2 of 4. Covered |delta|: 5 + 0 + 2 + 3 = 10 of 19;
  # the oracle covers 5 + 4 + 2 + 3 = 14 of 19.
  assert got["total"] == {"selected": 4, "oracle": 4, "hits": 2, "recall": 0.5,
                          "delta_share": pytest.approx(10 / 19),
                          "oracle_delta_share": pytest.approx(14 / 19)}
  assert got["per_type"]["mlp_fc"] == {"selected": 3, "oracle": 1, "hits": 1, "recall": 1.0,
                                       "delta_share": pytest.approx(7 / 10),
                                       "oracle_delta_share": pytest.approx(5 / 10)}
  assert got["per_type"]["layernorm"]["recall"] == pytest.approx(1 / 3)
  # The oracle against itself: recall 1, its own share.
  self_cmp = oracle.compare_to_oracle(orc, orc, delta)["total"]
  assert self_cmp["recall"] == 1.0 and self_cmp["delta_share"] == self_cmp["oracle_delta_share"]
  with pytest.raises(ConfigError, match="different parameters"):
    oracle.compare_to_oracle({"a": np.ones(2, bool)}, orc, delta)


def test_oracle_table_scores_and_masks():
  """A score tree equal to |delta| is the oracle (recall 1 at every k); -|delta| misses it."""
  from shpeft_jax.analysis import sparsity
  delta = sparsity.weight_changes(W0, WFT)
  worst = {"resblocks_0": {"mlp": {"c_fc": {"kernel": -delta["resblocks_0"]["mlp"]["c_fc"][
      "kernel"]}}, "ln_1": {"scale": -delta["resblocks_0"]["ln_1"]["scale"]}}}
  table = oracle.oracle_table({"same": delta, "worst": worst}, W0, WFT, k_percents=(10.0, 30.0))
  assert table[10.0]["same"]["total"]["recall"] == 1.0
  assert table[30.0]["same"]["total"]["recall"] == 1.0
  assert table[30.0]["worst"]["total"]["hits"] == 0


def test_command_line_on_checkpoints(tmp_path, capsys):
  """The command on two written checkpoints: the oracle against a mask file equal to it (recall 1),
  and the built-in random selection's recall near k (uniform scores), numbers read back from JSON."""
  import json
  from analysis_fixtures import perturb, random_like_model, write_ckpt
  from shpeft_jax.analysis import sparsity
  from shpeft_jax.peft import mask_io
  pre = random_like_model("test_tiny", seed=0)
  ft = perturb(pre, seed=1)
  write_ckpt(tmp_path / "pre", pre)
  write_ckpt(tmp_path / "ft", ft)
  orc, _ = oracle.oracle_mask(pre["encoder"], ft["encoder"], k_percent=10.0)
  mask_io.save_mask(str(tmp_path / "mask.npz"), {"encoder": orc})
  out = tmp_path / "oracle.json"
  assert oracle.main(["--pretrained", str(tmp_path / "pre"), "--finetuned", str(tmp_path / "ft"),
                      "--mask", f"copy={tmp_path / 'mask.npz'}", "--k", "10",
                      "--out", str(out)]) == 0
  got = json.loads(out.read_text())["10.0"]
  assert got["copy"]["total"]["recall"] == 1.0
  n = sum(np.size(x) for x in jax.tree_util.tree_leaves(pre["encoder"]))
  assert abs(got["random"]["total"]["recall"] - 0.10) < 4 * np.sqrt(0.1 * 0.9 / (0.1 * n)) + 0.01
  delta = sparsity.weight_changes(pre["encoder"], ft["encoder"])
  want = oracle.compare_to_oracle(orc, orc, delta)["total"]
  assert got["copy"]["total"]["delta_share"] == pytest.approx(want["oracle_delta_share"])
  assert "k=10%  copy" in capsys.readouterr().out
  assert oracle.main(["--pretrained", str(tmp_path / "nope"), "--finetuned", str(tmp_path / "ft"),
                      "--out", str(out)]) == 2
