"""Datasets and the input pipeline.

The contract the trainer builds on (docs/DATASETS.md, "Records and batches"):
- `input_pipeline.dataset_info(data_config) -> DatasetInfo(name, num_classes, class_names,
  split_sizes, source_id, task)`; `task` is 'single_label' or 'multi_label'. For multi-label,
  `class_names` are the finding names in label order and `num_classes` their number.
- Records (tfds): `label` is a ClassLabel int (single_label) or a float32 vector [L]
  (multi_label): 1.0 positive, 0.0 negative, -1.0 unknown (masked out of loss and metrics
  downstream). Every record has `patient` (text; '' where the source has no patient / group id)
  and `file_name` (path relative to the dataset root).
- Batches of the iterators: `image` float32 [B, H, W, 3], `valid` bool [B], `label` int32 [B]
  (single_label) or float32 [B, L] (multi_label); padding rows of the eval iterator have valid
  False and label 0 (single_label) or a vector of -1 (multi_label).

Data config fields (`config.data`, an ml_collections.ConfigDict; `default_data_config()`):

  name                      'chaoyang' | 'covid_ct' | 'busi' | 'cxr' | 'oct' | 'limuc' |
                            'image_folder' | 'csv' | 'chestxray14' | 'chexpert' | 'medmnist' |
                            'digits' (the offline demo, scikit-learn digits).
  task                      digits only: 'source' (digits 0-4) or 'target' (digits 5-9 as 0-4);
                            'even' / 'odd' (relabelled 0-4) for the analysis' hybridity study.
                            (Not the task kind: that is DatasetInfo.task, read from the source.)
  data_dir                  tfds data directory where prepared datasets live (None: tfds default,
                            ~/tensorflow_datasets). Prepared records are keyed by their source's
                            content (<data_dir>/<name>/src_<id>/), see docs/DATASETS.md.
  manual_dir                folder holding the user-downloaded dataset in its published layout
                            (see docs/DATASETS.md); for image_folder, the image root; for csv, the
                            folder the CSV file names are relative to; for medmnist, the folder
                            holding the .npz files. None: tfds' default <data_dir>/downloads/manual.
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

  Training subset (data/subsets.py; validation and test stay whole):
  train_fraction            fraction of the training split's labels, in (0, 1]; 1.0 (default):
                            all. Stratified per class / finding, patient-grouped.
  train_per_class           N images per class (multi-label: >= N positives per finding); 0
                            (default): off. Set one of train_fraction / train_per_class.
  subset_seed               seed of the subset (not the training seed: every method and
                            training seed of a comparison reads the same subset). Default 0.

  Source options (they change the records, hence the source id):
  max_missing_fraction      csv / chestxray14 / chexpert: the largest fraction of a split whose
                            image files may be missing (they are then left out with a warning
                            listing them); more stops with the first 10 listed. Default 0.
  val_fraction              csv / chestxray14 / chexpert: fraction of train carved out as
                            validation (grouped by patient) when the source has no validation
                            split; 0: no validation split. Default 0.1.
  csv_files                 csv: the CSV file(s), relative to manual_dir; several are one table.
  csv_image_root            csv: folder the path column is relative to, relative to manual_dir
                            ('' = manual_dir).
  csv_path_column           csv: the column of image paths (default 'path').
  csv_path_format           csv: the image path made of a path-column value (default '{}', the
                            value itself; e.g. 'images/{}.jpg' for a column of image ids).
  csv_label_column          csv, single-label: one column of class names or indices 0..K-1.
  csv_label_columns         csv, multi-label: several columns, one per finding (its name), holding
                            1 (positive), 0 (negative), -1 or blank (unknown).
  csv_findings_column       csv, multi-label: one column of findings joined by
                            csv_findings_separator (default '|'); csv_no_finding (default
                            'No Finding') means none. Set exactly one of the three label fields.
  csv_class_names           csv: label order (class names, or finding names of a findings
                            column); empty: sorted names found (indices: '0'..'K-1'). A value
                            outside it is an error.
  csv_split_column          csv: a column naming each row's split (train / val / test and
                            their usual spellings).
  csv_train_list, csv_val_list, csv_test_list
                            csv: list files (relative to manual_dir), one path-column value per
                            line; train and test needed, validation carved from train if absent.
  csv_patient_column        csv: patient / group id column: carved splits keep each patient's
                            images together, and a patient in two given splits is an error.
  csv_split_fractions       csv without a split column or lists: (train, validation, test)
                            fractions of the seeded split (by patient when a patient column is
                            given). Default (0.8, 0.1, 0.1).
  chexpert_findings         'competition' (the 5 competition findings, default) or 'all' (14).
  chexpert_uncertainty      what -1 (uncertain) becomes: 'ones' (default), 'zeros', or 'ignore'
                            (-1.0, unknown: masked out of loss and metrics).
  chexpert_frontal_only     keep frontal views only (default False).
  medmnist_flag             medmnist: the dataset, e.g. 'pathmnist', 'chestmnist' (12 2D ones).
  medmnist_size             medmnist: 28, 64, 128 or 224 (the file <flag>_<size>.npz).
"""

import ml_collections

DATASET_NAMES = ("chaoyang", "covid_ct", "busi", "cxr", "oct", "limuc", "image_folder", "csv",
                 "chestxray14", "chexpert", "medmnist", "digits")

# Fields that change how records are read, never which records a source has.
PIPELINE_FIELDS = ("train_split", "val_split", "test_split", "augment",
                   "random_resized_crop_scale", "hflip", "shuffle_buffer", "cache",
                   "num_parallel_calls", "eval_cache")
# Fields that choose which training records a run reads (data/subsets.py), not the source's.
SUBSET_FIELDS = ("train_fraction", "train_per_class", "subset_seed")


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
      # Evaluations after a split's first replay its decoded uint8 batches (data/decoded_cache.py).
      "eval_cache": True,
      # The training subset (data/subsets.py).
      "train_fraction": 1.0,
      "train_per_class": 0,
      "subset_seed": 0,
      # Source options.
      "max_missing_fraction": 0.0,
      "val_fraction": 0.1,
      "csv_files": (),
      "csv_image_root": "",
      "csv_path_column": "path",
      "csv_path_format": "{}",
      "csv_label_column": "",
      "csv_label_columns": (),
      "csv_findings_column": "",
      "csv_findings_separator": "|",
      "csv_no_finding": "No Finding",
      "csv_class_names": (),
      "csv_split_column": "",
      "csv_train_list": "",
      "csv_val_list": "",
      "csv_test_list": "",
      "csv_patient_column": "",
      "csv_split_fractions": (0.8, 0.1, 0.1),
      "chexpert_findings": "competition",
      "chexpert_uncertainty": "ones",
      "chexpert_frontal_only": False,
      "medmnist_flag": "",
      "medmnist_size": 224,
      # Preparation: images whose shorter side exceeds this are stored shrunk to it (0: as they
      # are); part of the source id.
      "prepare_max_side": 0,
  })


def source_options(data_config=None) -> ml_collections.ConfigDict:
  """The fields that decide a source's records: `data_config` without PIPELINE_FIELDS and
  SUBSET_FIELDS.

  A config.json written before a field existed (a run's, read back by report / predict) lacks it;
  its default is what that run used, so the defaults fill the gaps here, in this one place.
  """
  options = default_data_config().to_dict()
  if data_config is not None:
    given = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
    options.update(given)
  return ml_collections.ConfigDict(
      {k: v for k, v in options.items() if k not in PIPELINE_FIELDS + SUBSET_FIELDS})
