"""NIH ChestX-ray14 (14 findings, multi-label; docs/DATASETS.md "ChestX-ray14").

The paper's recipe (configs/common.py = shpeft_jax/base_config.py) on the official train_val /
test lists; validation is carved from train_val by patient (data.val_fraction = 0.1).

  python -m shpeft_jax.main --config configs/chestxray14.py --workdir /runs/chestxray14 \\
      --config.model.init_checkpoint=/path/to/clip_vit_b16 --config.data.manual_dir=/path/to/data

The init checkpoint comes from `python -m shpeft_jax.convert` (docs/CONVERSION.md); the data layout
and download are in docs/DATASETS.md.
"""

from shpeft_jax import base_config


def get_config(arg=None):
  config = base_config.get_config(arg)
  config.data.name = "chestxray14"
  # About 8,650 validation images (10% of train_val's 86,524): evaluate less often than the small
  # datasets.
  config.train.eval_every = 5000
  return config
