"""The paper's recipe (Sec. 3, "Implementation"): every config file starts from this one.

CLIP ViT-B/16 at 224 px, its projection replaced by L2 normalisation + a linear head; SGD with
momentum 0.9, batch 64, lr 1e-3 with cosine annealing, 40k iterations; SH-PEFT with the L2
estimator, lambda = 1, k = 1% of the encoder's weights, selected within one training epoch.
Every field is documented in docs/CONFIG.md.

It lives in the package (not in configs/) so that the config files, which ml_collections loads
by path as stand-alone modules, import it from anywhere: `from shpeft_jax import base_config`.
configs/common.py is this recipe as a config file.
"""

import ml_collections

from shpeft_jax import distributed
from shpeft_jax.data import default_data_config
from shpeft_jax.peft.defaults import default_peft_config


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
  # The tower's activation ('quick_gelu' | 'gelu') and LayerNorm eps. Unset ('' / 0.0): those the
  # init checkpoint was converted with (its meta.json), or OpenAI CLIP's (QuickGELU, 1e-5) from
  # scratch. Set, they may only restate the checkpoint's.
  config.model.act = ""
  config.model.ln_eps = 0.0

  config.data = default_data_config()

  # SH-PEFT, L2 estimator, lambda = 1, k = 1% (every field: shpeft_jax/peft/methods.py).
  config.peft = default_peft_config()

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
  config.train.eval_every = 1000   # validation (the task's headline); best in workdir/best
  config.train.log_every = 50
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 2
  config.train.async_checkpoints = True
  config.train.report_best = False  # True: report/export the best-validation model, not the last
  # Multi-label only: BCE positive weights, '' | 'balanced' (neg/pos per finding in train) |
  # 'w1,w2,...' (one per finding).
  config.train.pos_weight = ""
  config.train.stop_after_steps = 0  # > 0: stop (checkpointed) after this step, e.g. for tests
  config.train.progress_bar = True

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1            # -1: all devices (divided by fsdp)
  config.mesh.fsdp = 1             # > 1: shard parameters FSDP-style over this many devices

  # XLA's persistent compilation cache ('' = off; a relative path is inside the workdir).
  config.compilation_cache_dir = ""

  # Multi-process runs (TPU pods, SLURM, several GPU hosts); empty fields: from the environment.
  config.distributed = distributed.default_config()

  # Several runs in one call (shpeft_jax/runs.py): the methods to compare, one sub-directory each
  # (empty: the one run of peft.method), and per-method settings nested like the config, e.g.
  # {"linear": {"optim": {"lr": 100.0}}}; they apply wherever the method runs (main, sweep).
  config.methods = ()
  config.method_overrides = ml_collections.ConfigDict()
  # Seeds and learning rates (main's method list and the sweep; docs/BASELINES.md): every run
  # is repeated per seed, the lr is chosen per method on the validation split from lr_grid.
  # Empty: config.seed / optim.lr. A method's own grid: method_overrides[m].sweep.lr_grid.
  config.sweep = ml_collections.ConfigDict()
  config.sweep.seeds = ()
  config.sweep.lr_grid = ()

  # Stage 0 (the demo): pre-train the encoder on a source task, cached in WORKDIR/pretrain, and
  # start every run from it. Full training from scratch with its own data and optimizer.
  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.enabled = False
  config.pretrain.data = default_data_config()
  config.pretrain.num_steps = 1000
  config.pretrain.eval_every = 0
  config.pretrain.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, momentum=0.9, weight_decay=1e-4, schedule="cosine",
      warmup_steps=0, grad_clip=0.0, sparse_state=False))
  # The pre-training's peft fields (it runs method 'full'; only its stage fingerprints read them),
  # apart from the transfer's `peft` so that `--config.peft.*` on a sweep keeps the cached encoder.
  config.pretrain.peft = default_peft_config()
  return config
