"""The paper's recipe (Sec. 3, "Implementation"): every dataset config starts from this one.

CLIP ViT-B/16 at 224 px, its projection replaced by L2 normalisation + a linear head; SGD with
momentum 0.9, batch 64, lr 1e-3 with cosine annealing, 40k iterations; SH-PEFT with the L2
estimator, lambda = 1, k = 1% of the encoder's weights, selected within one training epoch.
Every field is documented in docs/CONFIG.md.

  python -m shpeft_jax.main --config configs/busi.py --workdir /tmp/busi \\
      --config.model.init_checkpoint=/path/to/clip_b16 --config.data.manual_dir=/path/to/BUSI
"""

import ml_collections

from shpeft_jax import distributed
from shpeft_jax.data import default_data_config  # pylint: disable=unused-import (re-exported)
from shpeft_jax.peft.methods import default_peft_config


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "ViT-B/16"
  config.model.image_size = 224
  config.model.dtype = "float32"   # compute dtype: 'float32' | 'bfloat16' (params stay float32)
  config.model.init_checkpoint = ""  # params checkpoint from `python -m shpeft_jax.convert`
  config.model.load_head = False   # a new task gets a fresh head

  config.data = default_data_config()

  config.peft = default_peft_config()
  config.peft.method = "shpeft"
  config.peft.k_percent = 1.0      # % of the encoder's weights that are trained
  config.peft.k_count = 0          # > 0: an absolute number of weights instead
  config.peft.estimator = "l2"
  config.peft.mode = "hybrid"
  config.peft.lam = 1.0
  config.peft.score_batches = -1   # -1: one epoch of the training split
  config.peft.score_chunk = 8      # batches per jitted lax.scan call
  config.peft.include_head = False  # the head is not ranked; it is always trained
  config.peft.head_warmup_steps = 0  # > 0: linear-probe the head this many steps before scoring
  config.peft.head_warmup_lr = 0.1   # SGD(momentum 0.9) lr of that warm-up

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "sgd"        # 'sgd' | 'adamw'
  config.optim.lr = 1e-3
  config.optim.momentum = 0.9
  config.optim.weight_decay = 0.0
  config.optim.schedule = "cosine"  # 'cosine' | 'constant' (constant: adamw only)
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 0.0     # global-norm clipping; 0 = off
  config.optim.sparse_state = False  # optimizer state for selected weights only

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 64     # global, over all devices and processes
  config.train.eval_batch_size = 0  # 0: same as batch_size
  config.train.num_steps = 40_000
  config.train.eval_every = 1000   # validation macro F1; the best is kept in workdir/best
  config.train.log_every = 50
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 2
  config.train.async_checkpoints = True
  config.train.report_best = False  # True: report/export the best-validation model, not the last
  config.train.stop_after_steps = 0  # > 0: stop (checkpointed) after this step, e.g. for tests
  config.train.progress_bar = True

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1            # -1: all devices (divided by fsdp)
  config.mesh.fsdp = 1             # > 1: shard parameters FSDP-style over this many devices

  # XLA's persistent compilation cache ('' = off; a relative path is inside the workdir).
  config.compilation_cache_dir = ""

  # Multi-process runs (TPU pods, SLURM, several GPU hosts); empty fields: from the environment.
  config.distributed = distributed.default_config()
  return config
