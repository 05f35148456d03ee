"""Stanford CheXpert (multi-label; docs/DATASETS.md "CheXpert").

The paper's recipe (configs/common.py = shpeft_jax/base_config.py) on the 5 competition findings
(Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion) with uncertain labels (-1) read
as positive (U-Ones). train.csv gives train and a validation split carved by patient; valid.csv is
the test split (the official test set is hidden, so published work tests on valid.csv).
`configs/chexpert.py:all` trains on all 14 observations.

  python -m shpeft_jax.main --config configs/chexpert.py --workdir /runs/chexpert \\
      --config.model.init_checkpoint=/path/to/clip_vit_b16 --config.data.manual_dir=/path/to/data \\
      --config.data.chexpert_uncertainty=ignore

The init checkpoint comes from `python -m shpeft_jax.convert` (docs/CONVERSION.md); the data layout
and download are in docs/DATASETS.md.
"""

from shpeft_jax import base_config


def get_config(arg=None):
  config = base_config.get_config()
  config.data.name = "chexpert"
  config.data.chexpert_findings = arg or "competition"  # 'competition' (5) or 'all' (14)
  config.data.chexpert_uncertainty = "ones"
  config.data.chexpert_frontal_only = False
  # About 22,000 validation images (10% of train.csv): evaluate less often.
  config.train.eval_every = 5000
  return config
