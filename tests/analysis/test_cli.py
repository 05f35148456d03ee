"""`python -m shpeft_jax.analysis`: end to end on tiny checkpoints, and its error messages."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from shpeft_jax.analysis import __main__ as cli
from shpeft_jax.analysis import hybridity, sparsity
from shpeft_jax.peft import mask_io

from analysis_fixtures import perturb, write_ckpt, zeros_like_model  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_pair):
  pre, ft_a = tiny_pair
  d = tmp_path_factory.mktemp("ckpts")
  paths = {"pre": write_ckpt(d / "pre", pre), "a": write_ckpt(d / "a", ft_a),
           "b": write_ckpt(d / "b", perturb(pre, seed=11))}
  return d, paths


def test_hybridity_cli_writes_json_and_plots(tmp_path, ckpts, tiny_pair, capsys):
  _, paths = ckpts
  pre, ft_a = tiny_pair
  changes = sparsity.weight_changes(pre["encoder"], ft_a["encoder"])
  rng = np.random.default_rng(1)
  random_scores = jax.tree_util.tree_map(lambda x: rng.random(x.shape), changes)
  for name, scores in (("a", changes), ("b", random_scores)):
    m, _ = sparsity.top_k_mask(scores, 1.0)
    mask_io.save_mask(str(tmp_path / name / "mask.npz"),
                      {"encoder": m, "head": {"bias": None, "kernel": None}})
  out = tmp_path / "out"
  rc = cli.main(["hybridity", "--pretrained", paths["pre"], "--finetuned", f"a={paths['a']}",
                 "--finetuned", f"b={paths['b']}", "--mask", f"a={tmp_path / 'a'}",
                 "--mask", f"b={tmp_path / 'b' / 'mask.npz'}", "--k", "5,1", "--out", str(out)])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "[hybridity] k=5%" in printed and "[hybridity] k=1%" in printed
  for f in ("hybridity_finetuned.json", "overlap_finetuned.png", "overlap_vs_k.png",
            "layers_finetuned_k5.png", "layers_finetuned_k1.png", "hybridity_masks.json",
            "overlap_masks.png", "task_agnostic_masks.png", "layers_masks.png"):
    assert (out / f).stat().st_size > 0, f
  with open(out / "hybridity_finetuned.json") as f:
    res = json.load(f)
  direct = hybridity.finetuned_study(
      sparsity.load_checkpoint(paths["pre"]),
      {"a": sparsity.load_checkpoint(paths["a"]), "b": sparsity.load_checkpoint(paths["b"])},
      k_percents=(5.0, 1.0), log=lambda s: None)
  assert [e["overlap"]["intersection"] for e in res["per_k"]] == [
      e["overlap"]["intersection"] for e in direct["per_k"]]
  with open(out / "hybridity_masks.json") as f:
    masks = json.load(f)
  # Mask 'a' is task a's top-1% changes, which the fine-tuned study also found at k = 1%.
  by_k = {e["k_percent"]: e for e in res["per_k"]}
  assert masks["overlap"]["counts"][0] == by_k[1.0]["overlap"]["counts"][0]


def test_sparsity_cli_on_digits(tmp_path, tiny_pair):
  """Tiny model on the real digits pipeline; k = 100% must equal the fine-tuned reference."""
  pre, _ = tiny_pair
  ft = perturb(pre, seed=21)
  rng = np.random.default_rng(0)
  ft["head"] = {"kernel": rng.standard_normal((32, 5)).astype(np.float32),
                "bias": np.zeros(5, np.float32)}
  p_pre = write_ckpt(tmp_path / "pre", pre)
  p_ft = write_ckpt(tmp_path / "ft", ft, num_classes=5)
  cfg = tmp_path / "cfg.py"
  cfg.write_text(textwrap.dedent("""
      import ml_collections
      from shpeft_jax.data import default_data_config
      def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.data = default_data_config()
        c.data.name = "digits"
        c.data.task = "source"
        c.train = ml_collections.ConfigDict(dict(batch_size=64, eval_batch_size=0))
        return c
  """))
  out = tmp_path / "out"
  rc = cli.main(["sparsity", "--pretrained", p_pre, "--finetuned", p_ft, "--config", str(cfg),
                 "--set", "data.task=target", "--k", "1,100", "--out", str(out)])
  assert rc == 0
  with open(out / "sparsity.json") as f:
    res = json.load(f)
  assert res["data"]["name"] == "digits_target" and res["data"]["split"] == "test"
  assert [p["k_percent"] for p in res["points"]] == [1.0, 100.0]
  assert res["points"][-1]["metrics"] == res["reference"]["finetuned"]
  assert res["points"][-1]["f1_percent_of_full"] == pytest.approx(100.0)
  assert res["points"][0]["selection"]["k"] == round(0.01 * res["num_encoder_weights"])
  assert (out / "sparsity.png").stat().st_size > 0


def test_cli_errors(tmp_path, ckpts, capsys):
  _, paths = ckpts
  rc = cli.main(["hybridity", "--pretrained", str(tmp_path / "missing"), "--finetuned",
                 f"a={paths['a']}", "--finetuned", f"b={paths['b']}", "--out", str(tmp_path)])
  assert rc == 2
  assert "does not exist" in capsys.readouterr().err
  other = write_ckpt(tmp_path / "other", zeros_like_model("demo_small"), model="demo_small")
  rc = cli.main(["hybridity", "--pretrained", paths["pre"], "--finetuned", f"a={paths['a']}",
                 "--finetuned", f"b={other}", "--out", str(tmp_path / "o")])
  assert rc == 2
  assert "model='demo_small'" in capsys.readouterr().err
  rc = cli.main(["hybridity", "--finetuned", f"a={paths['a']}", "--finetuned",
                 f"b={paths['b']}", "--out", str(tmp_path / "o")])
  assert rc == 2 and "needs --pretrained" in capsys.readouterr().err
  rc = cli.main(["hybridity", "--pretrained", paths["pre"], "--finetuned", f"a={paths['a']}",
                 "--finetuned", f"a={paths['b']}", "--out", str(tmp_path / "o")])
  assert rc == 2 and "given twice" in capsys.readouterr().err
  bad_mask = {"encoder": {"ln_post": {"scale": np.ones(7, bool), "bias": np.ones(32, bool)}}}
  mask_io.save_mask(str(tmp_path / "bad_mask.npz"), bad_mask)
  rc = cli.main(["hybridity", "--pretrained", paths["pre"], "--mask",
                 f"x={tmp_path / 'bad_mask.npz'}", "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert rc == 2 and "does not fit the pretrained encoder" in err and "(7,) vs (32,)" in err
  rc = cli.main(["sparsity", "--pretrained", paths["pre"], "--finetuned", paths["a"],
                 "--config", str(tmp_path / "nope.py"), "--out", str(tmp_path / "o")])
  assert rc == 2 and "Config file" in capsys.readouterr().err


def test_task_names():
  assert cli.parse_named(["a=/x/y", "/runs/busi/full/export/model", "/runs/cxr/shpeft/mask.npz",
                          "/runs/oct/best"], "--finetuned") == {
                              "a": "/x/y", "busi": "/runs/busi/full/export/model",
                              "cxr": "/runs/cxr/shpeft/mask.npz", "oct": "/runs/oct/best"}
  with pytest.raises(cli.ConfigError, match="given twice"):
    cli.parse_named(["/r/busi/full/export/model", "/r/busi/shpeft"], "--mask")
  assert cli.parse_k_list("5, 1,0.1") == [5.0, 1.0, 0.1]
  with pytest.raises(cli.ConfigError, match="comma-separated"):
    cli.parse_k_list("5%")


def test_module_entry_point(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "shpeft_jax.analysis", "sparsity", "--pretrained",
       str(tmp_path / "nope"), "--finetuned", str(tmp_path / "nope2"), "--config",
       os.path.join(ROOT, "configs", "demo.py"), "--out", str(tmp_path / "o")],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "pretrained checkpoint directory" in proc.stderr and "does not exist" in proc.stderr
