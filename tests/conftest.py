"""Fixtures of the trainer / entry-point tests (helpers live in train_fixtures.py)."""

import pytest

from train_fixtures import make_tiny_config  # pylint: disable=g-bad-import-order


@pytest.fixture
def tiny_config():
  return make_tiny_config()
