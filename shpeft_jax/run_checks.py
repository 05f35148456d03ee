"""Checks of a run's numeric settings, and the finiteness guard of the train step.

`check_run_settings` is called by the trainer's validation before any data, model or compile work:
every value that would otherwise fail late (`ZeroDivisionError` after compiling for
checkpoint_every=0), be rejected only after the scoring stage (lr=nan), or silently do something
else than asked (keep_checkpoints=0 keeps nothing to resume from; a batch larger than the split
repeats images) is a one-line ConfigError naming the field and a fix.

`step_finite` / `FiniteWatch` implement the every-step NaN guard: the jitted step returns the
finiteness of its loss and new parameters with its metrics; the loop keeps each step's flag (a
device scalar: no host sync on the hot path) and checks them with the logged metrics and before
anything is written (checkpoint, best/, export), so a non-finite model is never saved and the
error names the first bad step.
"""

from __future__ import annotations

import math
from typing import Mapping

from shpeft_jax.errors import ConfigError, NonFiniteError


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite_positive(name: str, v, fix: str, *, allow_zero: bool = False) -> None:
  ok = _is_number(v) and math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
  if not ok:
    want = ">= 0" if allow_zero else "> 0"
    raise ConfigError(f"{name}={v!r} must be a finite number {want}; {fix}.")


def check_run_settings(config, split_sizes: Mapping[str, int] | None = None, *,
                       train_split: str = "train") -> None:
  """Raises ConfigError for a bad optimizer / interval / k / batch setting (see module doc)."""
  o, t, peft = config.optim, config.train, config.peft
  _finite_positive("optim.lr", o.lr, "e.g. --config.optim.lr=1e-3 (the paper's)")
  for name in ("weight_decay", "grad_clip"):
    if name in o:
      _finite_positive(f"optim.{name}", o.get(name) or 0.0, f"set optim.{name}=0 to turn it off",
                       allow_zero=True)
  if "momentum" in o:
    m = o.momentum
    if m is not None and not (_is_number(m) and 0 <= m < 1):
      raise ConfigError(f"optim.momentum={m!r} must be in [0, 1); the paper uses 0.9.")
  for name in ("num_steps", "batch_size", "log_every", "checkpoint_every"):
    v = t.get(name)
    if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
      extra = (" (0 would divide by zero after compiling; set it to num_steps to checkpoint only "
               "at the end)" if name == "checkpoint_every" else "")
      raise ConfigError(f"train.{name}={v!r} must be a positive integer{extra}.")
  for name in ("eval_every", "stop_after_steps", "eval_batch_size", "warmup_steps"):
    node = o if name == "warmup_steps" else t
    v = node.get(name, 0) or 0
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
      raise ConfigError(f"{'optim' if node is o else 'train'}.{name}={v!r} must be an integer "
                        ">= 0 (0: off).")
  if t.get("report_best") and not (t.get("eval_every", 0) or 0):
    raise ConfigError("train.report_best=True picks the best-validation model, but validation is "
                      "off (train.eval_every=0); set --config.train.eval_every=N or drop report_best.")
  keep = t.get("keep_checkpoints", 2)
  if not (isinstance(keep, int) and keep >= 1):
    raise ConfigError(f"train.keep_checkpoints={keep!r} would keep no checkpoint, so an "
                      "interrupted run could not resume; set it to 1 or more.")
  k_count = peft.get("k_count", 0) or 0
  if not (isinstance(k_count, int) and k_count >= 0):
    raise ConfigError(f"peft.k_count={k_count!r} must be an integer >= 0 (0: use k_percent).")
  if not k_count:
    k = peft.get("k_percent")
    if not (_is_number(k) and math.isfinite(k) and 0 < k <= 100):
      raise ConfigError(f"peft.k_percent={k!r} must be in (0, 100] (percent of encoder weights); "
                        "e.g. --config.peft.k_percent=1.0 for the paper's 1%.")
  lam = peft.get("lam", 0.0)
  if not (_is_number(lam) and math.isfinite(lam) and lam >= 0):
    raise ConfigError(f"peft.lam={lam!r} must be a finite number >= 0.")
  if split_sizes and train_split in split_sizes:
    n = int(split_sizes[train_split])
    if t.batch_size > n:
      raise ConfigError(
          f"train.batch_size={t.batch_size} is larger than the {n} images of the {train_split!r} "
          f"split: every batch would repeat images. Use --config.train.batch_size={_fit(n)} or "
          "less.")


def _fit(n: int) -> int:
  """The largest power of two <= n (a batch size that divides common device counts)."""
  return 1 << (max(n, 1).bit_length() - 1)


# ---------------------------------------------------------------------------------------------
# Every-step finiteness guard.


def step_finite(loss, param_norm):
  """Inside the jitted step: True when the loss and every new parameter are finite.

  The norm of the new parameters (logged anyway) is finite exactly when no parameter is NaN/inf
  (short of 1e19-sized weights, which are diverged too), so the guard costs nothing extra.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.isfinite(loss) & jnp.isfinite(param_norm)


class FiniteWatch:
  """Host side of the guard: every step's flag is kept (a device scalar, no sync) and checked
  with the logged metrics and before anything is written; the error names the first bad step."""

  def __init__(self):
    self._pending: list = []

  def add(self, step: int, finite) -> None:
    self._pending.append((int(step), finite))

  def check(self, *, before: str, lr_at=None) -> None:
    """Raises NonFiniteError if any step since the last check was not finite."""
    if not self._pending:
      return
    import jax  # pylint: disable=g-import-not-at-top
    flags = jax.device_get([f for _, f in self._pending])
    steps = [s for s, _ in self._pending]
    self._pending.clear()
    for step, ok in zip(steps, flags):
      if not bool(ok):
        lr = float(lr_at(step)) if lr_at is not None else None
        raise_if_non_finite(step, before=before, lr=lr)


def raise_if_non_finite(first_bad_step, *, before: str, lr=None) -> None:
  """Raises NonFiniteError naming the first bad step, what was not written, and the fix."""
  bad = int(first_bad_step)
  if bad:
    at_lr = f" (lr {lr:g})" if isinstance(lr, float) else ""
    raise NonFiniteError(
        f"the loss or the parameters became NaN/inf at step {bad}{at_lr}; {before} was not written "
        "and nothing non-finite was saved. Lower optim.lr or set optim.grad_clip (e.g. 1.0) (with "
        "bfloat16 also try model.dtype='float32'), then rerun with --restart_from=train or a new "
        "--workdir.")
