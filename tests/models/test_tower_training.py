"""The tower a checkpoint was converted as (act, ln_eps, ln_pre, patch_bias in meta.json) is the
tower the trainer builds, resumes and exports."""

import numpy as np
import pytest

from shpeft_jax import checkpoints
from shpeft_jax.errors import CheckpointError
from shpeft_jax.models import clip_vit

GELU_TRUNK = {"act": "gelu", "ln_eps": 1e-6, "ln_pre": False, "patch_bias": True}


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
  assert checkpoints.tower_for_training("") == {"act": "quick_gelu", "ln_eps": 1e-5,
                                                 "ln_pre": True, "patch_bias": False}
