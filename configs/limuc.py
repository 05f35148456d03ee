"""LIMUC (D6, ulcerative colitis Mayo score, 4 classes).

The paper's recipe (configs/common.py): CLIP ViT-B/16, SH-PEFT k = 1%, 40k steps.

  python -m shpeft_jax.main --config configs/limuc.py --workdir /runs/limuc \\
      --config.model.init_checkpoint=/path/to/clip_vit_b16 --config.data.manual_dir=/path/to/data

The init checkpoint comes from `python -m shpeft_jax.convert` (docs/CONVERSION.md); the data layout
and download are in docs/DATASETS.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  config = common.get_config(arg)
  config.data.name = "limuc"
  config.data.val_split = ""    # no validation split: report the last step (as the paper)
  return config
