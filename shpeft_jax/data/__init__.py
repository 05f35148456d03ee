"""Datasets and the input pipeline.

Data config fields (`config.data`, an ml_collections.ConfigDict; `default_data_config()`):

  name                      'chaoyang' | 'covid_ct' | 'busi' | 'cxr' | 'oct' | 'limuc' |
                            'image_folder' | 'digits' (the offline demo, scikit-learn digits).
  task                      digits only: 'source' (digits 0-4) or 'target' (digits 5-9 as 0-4);
                            'even' / 'odd' (relabelled 0-4) for the analysis' hybridity study.
  data_dir                  tfds data directory where prepared datasets live (None: tfds default,
                            ~/tensorflow_datasets). Prepared records are keyed by their source
                            (<data_dir>/<name>/src_<id>/), see docs/DATASETS.md.
  manual_dir                folder holding the user-downloaded dataset in its published layout
                            (see docs/DATASETS.md); for image_folder, the image root. None: tfds'
                            default <data_dir>/downloads/manual.
  train_split, val_split, test_split
                            split names ('train', 'validation', 'test'; tfds slices such as
                            'train[:90%]' work for tfds datasets). Chaoyang and LIMUC have no
                            validation split: set val_split to None or reuse 'test'.
  augment                   training augmentation on/off (off: the eval transform).
  random_resized_crop_scale (min, max) area fraction of the Inception-style random resized crop;
                            None disables the crop (resize + centre crop instead).
  hflip                     random horizontal flip (when augment is on).
  shuffle_buffer            examples in the shuffle buffer; 0 or less: the whole split (a full
                            permutation per epoch).
  cache                     keep the encoded split in memory after the first pass.
  num_parallel_calls        decode/augment parallelism; -1: tf.data AUTOTUNE.
"""

import ml_collections

DATASET_NAMES = ("chaoyang", "covid_ct", "busi", "cxr", "oct", "limuc", "image_folder", "digits")


def default_data_config() -> ml_collections.ConfigDict:
  """The data config with every field and its default (the offline digits target task)."""
  return ml_collections.ConfigDict({
      "name": "digits",
      "task": "target",
      "data_dir": ml_collections.config_dict.placeholder(str),
      "manual_dir": ml_collections.config_dict.placeholder(str),
      "train_split": "train",
      "val_split": "validation",
      "test_split": "test",
      "augment": True,
      "random_resized_crop_scale": (0.08, 1.0),
      "hflip": True,
      "shuffle_buffer": 20_000,
      "cache": False,
      "num_parallel_calls": -1,
  })
