"""A run that trains a subset of the encoder also writes export/adapter, records its size, and
base + adapter is the exported model bit for bit."""

import json
import os

import jax
import numpy as np

from shpeft_jax import adapter, checkpoints, train
from shpeft_jax.models import clip_vit
from shpeft_jax.utils import flatten_names

from train_fixtures import make_tiny_config  # pylint: disable=g-bad-import-order


def _init_checkpoint(path):
  model = clip_vit.build_model("test_tiny", 10)
  shapes = jax.eval_shape(lambda k: clip_vit.init_params(model, k), jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  checkpoints.save_params(path, params, {"model": "test_tiny", "image_size": 16, "num_classes": None})
  return params


def test_shpeft_run_writes_an_adapter_of_its_export(tmp_path, capsys):
  init = _init_checkpoint(str(tmp_path / "init"))
  config = make_tiny_config("shpeft", num_steps=2)
  config.model.init_checkpoint = str(tmp_path / "init")
  results = train.train_and_evaluate(config, str(tmp_path / "run"))

  adapter_dir = tmp_path / "run" / "export" / "adapter"
  assert adapter.is_adapter(str(adapter_dir))
  recorded = results["adapter"]
  assert recorded["bytes"] == sum(f.stat().st_size for f in adapter_dir.iterdir())
  assert recorded["ratio"] == recorded["bytes"] / recorded["full_bytes"]
  assert json.load(open(tmp_path / "run" / "results.json"))["adapter"] == recorded

  exported, _ = checkpoints.load_params(str(tmp_path / "run" / "export" / "model"))
  rebuilt, meta = adapter.load_with_base(str(adapter_dir), str(tmp_path / "init"))
  fe, fr = flatten_names(exported), flatten_names(rebuilt)
  assert sorted(fe) == sorted(fr)
  for name in fe:
    np.testing.assert_array_equal(fr[name].view(np.uint32), fe[name].view(np.uint32), err_msg=name)
  assert meta["num_classes"] == 5 and meta["adapter"]["method"] == "shpeft"

  # Only selected elements (5% of the encoder) and the head are stored.
  config_json = json.load(open(adapter_dir / adapter.CONFIG))
  mask_stats = json.load(open(tmp_path / "run" / "mask_stats.json"))
  head = sum(np.size(x) for x in jax.tree.leaves(exported["head"]))
  assert recorded["changed"] <= mask_stats["total"]["selected"] + head
  assert config_json["mask_stats"]["total"] == mask_stats["total"]
  assert config_json["base"]["sha256"] == adapter.base_hash(init)


def test_runs_without_an_adapter_say_why(tmp_path):
  params = {"encoder": {"w": np.zeros(3, np.float32)}, "head": {"bias": np.zeros(2, np.float32)}}
  write = lambda **kw: adapter.write_run_adapter(str(tmp_path), params, meta={}, **kw)
  assert "whole encoder" in write(init_checkpoint="/x", method="full")["skipped"]
  assert "init_checkpoint" in write(init_checkpoint="", method="shpeft")["skipped"]
  params["encoder"]["vpt_prompts_0"] = np.zeros((2, 3), np.float32)
  skipped = write(init_checkpoint="/x", method="vpt_shallow")["skipped"]
  assert "vpt_prompts_0" in skipped and "No export/adapter" in adapter.describe({"skipped": skipped})
  assert not os.path.exists(tmp_path / "export")


def test_no_adapter_without_a_base_says_why(tmp_path):
  """The demo's pre-training ('full', from scratch): the reason is the missing base checkpoint."""
  from shpeft_jax import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  for method in ("full", "shpeft"):
    rec = adapter_lib.write_run_adapter(str(tmp_path), {"head": {}}, init_checkpoint="",
                                        method=method, meta={})
    line = adapter_lib.describe(rec)
    assert "no base checkpoint" in line and "trains the whole encoder" not in line, line
    assert not os.path.exists(tmp_path / "export")
