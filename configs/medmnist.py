"""MedMNIST+ 2D datasets from their .npz files (docs/DATASETS.md "MedMNIST").

`configs/medmnist.py:<flag>_<size>` picks the file, e.g. pathmnist_224, chestmnist_64 (multi-label),
octmnist_28; `:<flag>` alone means 224 px. The splits are the shipped train / val / test.

  python -m shpeft_jax.main --config configs/medmnist.py:pathmnist_224 --workdir /runs/pathmnist \\
      --config.model.init_checkpoint=/path/to/clip_vit_b16 --config.data.manual_dir=/path/to/npz

The images are resized to model.image_size (224) whatever the file's size. The init checkpoint
comes from `python -m shpeft_jax.convert` (docs/CONVERSION.md). An unknown flag or size is
refused with the list of the valid ones when the data is opened.
"""

from shpeft_jax import base_config


def get_config(arg=None):
  flag, _, size = (arg or "pathmnist_224").rpartition("_")
  if not flag or not size.isdigit():
    flag, size = arg, "224"
  config = base_config.get_config()
  config.data.name = "medmnist"
  config.data.medmnist_flag = flag
  config.data.medmnist_size = int(size)
  return config
