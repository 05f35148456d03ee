"""OCT2017 (D5, retinal OCT, 4 classes).

The paper's recipe (configs/common.py = shpeft_jax/base_config.py): CLIP ViT-B/16, SH-PEFT k = 1%, 40k steps.

  python -m shpeft_jax.main --config configs/oct.py --workdir /runs/oct \\
      --config.model.init_checkpoint=/path/to/clip_vit_b16 --config.data.manual_dir=/path/to/data

The init checkpoint comes from `python -m shpeft_jax.convert` (docs/CONVERSION.md); the data layout
and download are in docs/DATASETS.md.
"""

from shpeft_jax import base_config


def get_config(arg=None):
  config = base_config.get_config(arg)
  config.data.name = "oct"
  # 10,832 validation images: evaluate less often than the small datasets.
  config.train.eval_every = 5000
  return config
