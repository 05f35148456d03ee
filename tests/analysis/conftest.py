"""Tiny pretrained / fine-tuned params fixtures for the analysis tests (test_tiny, no data)."""

import numpy as np
import pytest

from shpeft_jax.models import clip_vit

import analysis_fixtures as fx  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="session")
def tiny_model():
  return clip_vit.build_model("test_tiny", fx.NUM_CLASSES)


@pytest.fixture(scope="session")
def tiny_pair(tiny_model):
  pre = fx.random_like_model("test_tiny", seed=0)
  ft = fx.perturb(pre, seed=1)
  return pre, ft


@pytest.fixture(scope="session")
def tiny_images(tiny_model):
  size = tiny_model.config.image_size
  return np.random.default_rng(3).standard_normal((6, size, size, 3)).astype(np.float32)
