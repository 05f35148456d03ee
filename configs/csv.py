"""A dataset labelled by a CSV file (docs/DATASETS.md "CSV-labelled data").

The paper's recipe with `data.name = 'csv'`; the table's layout is given by the data.csv_* fields
(shpeft_jax/data/__init__.py, docs/CONFIG.md). By default: `labels.csv` in data.manual_dir with a
`path` column (relative to data.manual_dir) and a `label` column of class names, split 80/10/10
(stratified, seeded). A HAM10000-style table (image_id, dx, lesion_id; the images of both
HAM10000_images_part_* archives collected in one images/ folder), split by lesion:

  python -m shpeft_jax.main --config configs/csv.py --workdir /runs/ham10000 \\
      --config.model.init_checkpoint=/path/to/clip_vit_b16 --config.data.manual_dir=/path/to/data \\
      --config.data.csv_files="('HAM10000_metadata.csv',)" --config.data.csv_path_column=image_id \\
      --config.data.csv_path_format="images/{}.jpg" --config.data.csv_label_column=dx \\
      --config.data.csv_patient_column=lesion_id
"""

from shpeft_jax import base_config


def get_config(arg=None):
  config = base_config.get_config(arg)
  config.data.name = "csv"
  config.data.csv_files = ("labels.csv",)
  config.data.csv_path_column = "path"
  config.data.csv_label_column = "label"
  return config
