"""tests/models: keep a broken torchvision away from transformers (see reference_libs.py)."""

import reference_libs  # pylint: disable=g-bad-import-order

reference_libs.hide_broken_torchvision()
