"""The tower a checkpoint was converted as (act, ln_eps, ln_pre, patch_bias in meta.json) is the
tower the trainer builds, resumes and exports."""

import os

import numpy as np
import pytest

from shpeft_jax import checkpoints
from shpeft_jax.errors import CheckpointError
from shpeft_jax.models import clip_vit

GELU_TRUNK = {**clip_vit.TOWER_DEFAULTS, "act": "gelu", "ln_eps": 1e-6, "ln_pre": False, "patch_bias": True}


def _meta_only_checkpoint(path, **tower):
  checkpoints.save_params(str(path), {"encoder": {"class_embedding": np.zeros(4, np.float32)}},
                          {"model": "test_tiny", "image_size": 16, "num_classes": None, **tower})
  return str(path)


def test_tower_for_training_comes_from_the_init_checkpoint(tmp_path):
  init = _meta_only_checkpoint(tmp_path / "trunk", **GELU_TRUNK)
  assert checkpoints.tower_for_training(init) == GELU_TRUNK
  assert checkpoints.tower_for_training(init, act="gelu", ln_eps=1e-6) == GELU_TRUNK  # restated
  with pytest.raises(CheckpointError, match=r"config.model.act='quick_gelu' but .* converted as "
                                            r"act='gelu'"):
    checkpoints.tower_for_training(init, act="quick_gelu")
  with pytest.raises(CheckpointError, match="config.model.ln_eps=1e-05"):
    checkpoints.tower_for_training(init, ln_eps=1e-5)
  # Older checkpoints (no tower fields) and runs from scratch: OpenAI's tower unless chosen.
  old = _meta_only_checkpoint(tmp_path / "old")
  assert checkpoints.tower_for_training(old) == clip_vit.tower_from_meta({})
  assert checkpoints.tower_for_training("", act="gelu")["act"] == "gelu"
  assert checkpoints.tower_for_training("") == {**clip_vit.TOWER_DEFAULTS, "act": "quick_gelu",
                                                 "ln_eps": 1e-5, "ln_pre": True, "patch_bias": False}


def test_tower_survives_training_resume_and_export(tmp_path):
  """A BiomedCLIP-like tower (exact GELU, eps 1e-6, no ln_pre, patch bias) trained, stopped,
  resumed and exported stays that tower: the trainer builds it, and every meta.json says it."""
  import jax
  from train_fixtures import make_tiny_config  # pylint: disable=g-import-not-at-top
  from shpeft_jax import export, train
  from shpeft_jax.errors import ConfigError
  from shpeft_jax.models import convert

  init = tmp_path / "init"
  model = clip_vit.build_model("test_tiny", 10, tower=GELU_TRUNK)
  shapes = jax.eval_shape(lambda k: clip_vit.init_params(model, k), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  checkpoints.save_params(str(init), params, {"model": "test_tiny", "image_size": 16,
                                              "num_classes": None, **GELU_TRUNK})
  config = make_tiny_config("linear", num_steps=2)
  config.model.init_checkpoint = str(init)
  built = train.build_model(config, 3)
  assert built.config.tower() == GELU_TRUNK
  config.model.act = "quick_gelu"  # contradicts the checkpoint: refused before any work
  with pytest.raises(CheckpointError, match="converted as act='gelu'"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))
  config.model.act = ""

  workdir = str(tmp_path / "run")
  config.train.checkpoint_every = 1
  config.train.stop_after_steps = 1
  assert train.train_and_evaluate(config, workdir) == {"stopped_at": 1}
  assert os.listdir(f"{workdir}/checkpoints") == ["1"]
  config.train.stop_after_steps = 0
  train.train_and_evaluate(config, workdir)  # resumes from step 1
  exported, meta = checkpoints.load_params(f"{workdir}/export/model")
  assert clip_vit.tower_from_meta(meta) == GELU_TRUNK
  assert "ln_pre" not in exported["encoder"] and "bias" in exported["encoder"]["conv1"]

  # Export to PyTorch and back: the tower rides along in the file's metadata.
  out = tmp_path / "clf.safetensors"
  export.export_params(exported, meta, "timm", str(out))
  back, info = convert.convert_file(str(out))
  assert info.tower == GELU_TRUNK and info.num_classes == meta["num_classes"]
  with pytest.raises(ConfigError):
    clip_vit.get_model_config("test_tiny", act="tanh")
