"""COVID-CT (D2, lung CT, 2 classes).

The paper's recipe (configs/common.py = shpeft_jax/base_config.py): CLIP ViT-B/16, SH-PEFT k = 1%, 40k steps.

  python -m shpeft_jax.main --config configs/covid_ct.py --workdir /runs/covid_ct \\
      --config.model.init_checkpoint=/path/to/clip_vit_b16 --config.data.manual_dir=/path/to/data

The init checkpoint comes from `python -m shpeft_jax.convert` (docs/CONVERSION.md); the data layout
and download are in docs/DATASETS.md.
"""

from shpeft_jax import base_config


def get_config(arg=None):
  config = base_config.get_config(arg)
  config.data.name = "covid_ct"
  return config
