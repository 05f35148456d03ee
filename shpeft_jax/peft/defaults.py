"""`config.peft`'s defaults, in a module that imports neither JAX nor the methods, so that loading a
config file (and answering a config error) is instant. `methods.default_peft_config` is this."""


def default_peft_config():
  """`config.peft` with every field and its default (configs/common.py uses it as it is)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      method="shpeft",
      k_percent=1.0,         # % of the encoder's weights that are trained
      k_count=0,             # > 0: an absolute number of weights instead
      estimator="l2",        # 'l1' | 'l2' (the importance's norm)
      mode="hybrid",         # 'hybrid' | 'td' | 'ta' (Table 4's rows)
      lam=1.0,               # hybrid balance lambda
      l2_reduction="sum_of_squares",  # L2's I_td: sum_b g_b^2 | 'square_of_sum': (sum_b g_b)^2
      selection_scope="global",       # top-k over: 'global' | 'per_tensor' | 'per_row'
      oracle_run="",         # method 'oracle': workdir of the finished `full` run (peft/oracle.py)
      score_batches=-1,      # -1: one epoch of the training split
      score_chunk=8,         # batches per jitted lax.scan call
      include_head=False,    # the head is not ranked; it is always trained
      head_warmup_steps=0,   # > 0: linear-probe the head this many steps before scoring
      head_warmup_lr=0.1,    # SGD(momentum 0.9) lr of that warm-up
      lora=dict(rank=8, alpha=8.0, targets=("q", "v")),
      adapter=dict(bottleneck=64, scale=0.1), ssf=dict(init_std=0.0), vpt=dict(tokens=10),
      spt=dict(rank=8, alpha=0.0, threshold=0)))
