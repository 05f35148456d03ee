"""The one optimizer builder: `build(config.optim, num_steps, mask) -> Optimizer(tx, schedule)`.

Used by the trainer, the head warm-up before scoring (`importance.warm_up_head`) and the
benchmarks, so that the learning-rate schedule is built once and the logged lr is the one used.

  * 'sgd' (the paper's): g -> [clip_by_global_norm] -> momentum trace -> + weight_decay * w ->
    * -lr(step). The decay is decoupled from the momentum buffer (added after the trace,
    AdamW-style, and scaled by the scheduled learning rate), unlike torch.optim.SGD's weight_decay.
  * 'adamw': [clip_by_global_norm] -> optax.adamw(schedule, weight_decay).
  * schedule: 'cosine' (linear warm-up from 0 for `warmup_steps`, then cosine to `end_lr`) or
    'constant' (after the same warm-up).

With a mask, the chain is wrapped in `masking.masked_update` (frozen elements get exactly -0.0,
the mask lives in the optimizer state) or, with `sparse_state`, in
`sparse_optim.sparse_masked_optimizer` (state for the selected weights only).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import optax

from shpeft_jax.errors import ConfigError

PyTree = Any

# Fields of `config.optim` (configs/common.py) and their values when a caller passes a partial dict.
DEFAULTS = dict(name="sgd", lr=None, momentum=0.9, nesterov=False, weight_decay=0.0,
                schedule="cosine", warmup_steps=0, end_lr=0.0, grad_clip=0.0, sparse_state=False)


class Optimizer(NamedTuple):
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def _fields(optim_cfg: Mapping[str, Any]) -> dict[str, Any]:
  cfg = dict(DEFAULTS)
  cfg.update(optim_cfg.to_dict() if hasattr(optim_cfg, "to_dict") else dict(optim_cfg))
  return cfg


def validate(optim_cfg: Mapping[str, Any], num_steps: int) -> dict[str, Any]:
  """Raises ConfigError naming the bad `optim.*` field; returns the fields with defaults."""
  cfg = _fields(optim_cfg)
  lr, warmup, momentum = cfg["lr"], int(cfg["warmup_steps"] or 0), cfg["momentum"]
  if cfg["name"] not in ("sgd", "adamw"):
    raise ConfigError(f"optim.name must be 'sgd' or 'adamw', got {cfg['name']!r}.")
  if cfg["schedule"] not in ("cosine", "constant"):
    raise ConfigError(f"optim.schedule must be 'cosine' or 'constant', got {cfg['schedule']!r}.")
  if lr is None or isinstance(lr, bool) or not lr > 0:
    raise ConfigError(f"optim.lr must be > 0, got {lr!r}.")
  if num_steps is None or int(num_steps) <= 0:
    raise ConfigError(f"The number of steps (train.num_steps) must be positive, got {num_steps!r}.")
  if not 0 <= warmup < int(num_steps):
    raise ConfigError(f"optim.warmup_steps={warmup} must be in [0, num_steps={num_steps}).")
  if momentum is not None and not 0 <= momentum < 1:
    raise ConfigError(f"optim.momentum must be in [0, 1), got {momentum}.")
  if not float(cfg["weight_decay"] or 0.0) >= 0:
    raise ConfigError(f"optim.weight_decay must be >= 0, got {cfg['weight_decay']}.")
  if not float(cfg["grad_clip"] or 0.0) >= 0:
    raise ConfigError(f"optim.grad_clip must be >= 0 (0 = off), got {cfg['grad_clip']}.")
  return cfg


def make_schedule(cfg: Mapping[str, Any], num_steps: int) -> optax.Schedule:
  lr, warmup = float(cfg["lr"]), int(cfg["warmup_steps"] or 0)
  if cfg["schedule"] == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=int(num_steps),
        end_value=float(cfg["end_lr"] or 0.0))
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  return optax.constant_schedule(lr)


def build(optim_cfg: Mapping[str, Any], num_steps: int, mask: PyTree | None = None) -> Optimizer:
  """The optimizer of `optim_cfg` (config.optim, or a partial dict: `DEFAULTS` fill the rest)."""
  cfg = validate(optim_cfg, num_steps)
  schedule = make_schedule(cfg, num_steps)
  clip = float(cfg["grad_clip"] or 0.0)
  wd = float(cfg["weight_decay"] or 0.0)
  parts = [optax.clip_by_global_norm(clip)] if clip else []
  if cfg["name"] == "sgd":
    if cfg["momentum"]:
      parts.append(optax.trace(decay=float(cfg["momentum"]), nesterov=bool(cfg["nesterov"])))
    if wd:
      parts.append(optax.add_decayed_weights(wd))
    parts.append(optax.scale_by_learning_rate(schedule))
  else:
    parts.append(optax.adamw(schedule, weight_decay=wd))
  tx = optax.chain(*parts)
  if mask is not None:
    from shpeft_jax.peft import masking  # pylint: disable=g-import-not-at-top
    if cfg["sparse_state"]:
      from shpeft_jax.peft import sparse_optim  # pylint: disable=g-import-not-at-top
      tx = sparse_optim.sparse_masked_optimizer(tx, mask)
    else:
      tx = masking.masked_update(tx, mask)
  return Optimizer(tx, schedule)
