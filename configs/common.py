"""The paper's recipe (Sec. 3, "Implementation"), as a config file; defined in
shpeft_jax/base_config.py, which every file in configs/ starts from.

  python -m shpeft_jax.main --config configs/busi.py --workdir /tmp/busi \\
      --config.model.init_checkpoint=/path/to/clip_b16 --config.data.manual_dir=/path/to/BUSI
"""

from shpeft_jax.base_config import get_config  # pylint: disable=unused-import
