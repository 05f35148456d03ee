"""The issue-26 study on the demo: SH-PEFT, the random mask and the oracle mask over 5 seeds.

The demo (configs/demo.py) with full fine-tuning held at its validated rate (0.1): the oracle mask
of seed s is the top-k of |w_ft - w_0| of the `full` run of seed s in the same sweep, so `full`
runs once per seed while every masked method gets the --lr_grid. docs/BASELINES.md, "Issue 26".

  python -m shpeft_jax.sweep --config configs/oracle_study.py --workdir DIR \\
      --methods full,shpeft,random,oracle --seeds 0,1,2,3,4 --lr_grid 0.1,0.3,1
"""

import ml_collections

from configs import demo


def get_config(arg=None):
  config = demo.get_config(arg)
  config.method_overrides.full = ml_collections.ConfigDict({"sweep": {"lr_grid": (0.1,)}})
  config.sweep.seeds = (0, 1, 2, 3, 4)
  return config
