"""Run settings are checked before any work; the finiteness guard names the first bad step."""

import jax
import jax.numpy as jnp
import pytest

from shpeft_jax import run_checks
from shpeft_jax.errors import ConfigError, NonFiniteError
from train_fixtures import make_tiny_config  # pylint: disable=g-bad-import-order

SIZES = {"train": 539, "validation": 180, "test": 180}


@pytest.mark.parametrize("field, value, words", [
    ("optim.lr", float("nan"), "optim.lr=nan must be a finite number > 0"),
    ("optim.lr", float("inf"), "optim.lr=inf"),
    ("optim.lr", 0.0, "optim.lr=0.0"),
    ("optim.lr", -1e-3, "optim.lr=-0.001"),
    ("optim.grad_clip", float("nan"), "optim.grad_clip=nan"),
    ("optim.momentum", 1.0, "optim.momentum=1.0 must be in [0, 1)"),
    ("optim.warmup_steps", -1, "optim.warmup_steps=-1"),
    ("train.checkpoint_every", 0, "would divide by zero"),
    ("train.log_every", 0, "train.log_every=0"),
    ("train.eval_every", -5, "train.eval_every=-5"),
    ("train.keep_checkpoints", 0, "could not resume"),
    ("peft.k_percent", float("nan"), "peft.k_percent=nan"),
    ("peft.k_percent", 0.0, "peft.k_percent=0.0"),
    ("peft.k_percent", 150.0, "peft.k_percent=150.0"),
    ("peft.k_count", -3, "peft.k_count=-3"),
    ("peft.lam", float("nan"), "peft.lam=nan"),
    ("train.batch_size", 1024, "larger than the 539 images of the 'train' split"),
    ("train.batch_size", 0, "train.batch_size=0 must be a positive integer"),
    ("train.report_best", True, "validation is off (train.eval_every=0)"),
])
def test_bad_setting_is_one_line_naming_field(field, value, words):
  config = make_tiny_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError) as e:
    run_checks.check_run_settings(config, SIZES)
  assert words in str(e.value) and "\n" not in str(e.value)


def test_paper_recipe_and_tiny_config_pass():
  from configs import common  # pylint: disable=g-import-not-at-top
  run_checks.check_run_settings(common.get_config(), {"train": 547})
  run_checks.check_run_settings(make_tiny_config(), SIZES)
  # The suggested batch size fits.
  config = make_tiny_config()
  config.train.batch_size = 64
  with pytest.raises(ConfigError, match="batch_size=32 or less"):
    run_checks.check_run_settings(config, {"train": 40})


def test_watch_names_the_first_non_finite_step_without_syncing_each_step():
  @jax.jit
  def step_fn(x):
    loss = jnp.sum(x)
    return run_checks.step_finite(loss, jnp.sqrt(jnp.sum(x * x)))

  watch = run_checks.FiniteWatch()
  xs = [jnp.ones(3), jnp.ones(3), jnp.array([1.0, jnp.nan, 0.0]), jnp.array([jnp.inf, 0.0, 0.0]),
        jnp.ones(3)]
  watch.add(1, step_fn(xs[0]))
  watch.check(before="the checkpoint at step 1")  # all finite: no error, flags consumed
  for step, x in enumerate(xs[1:], start=2):
    flag = step_fn(x)
    assert isinstance(flag, jax.Array)  # kept on device until checked
    watch.add(step, flag)
  with pytest.raises(NonFiniteError) as e:
    watch.check(before="the checkpoint at step 5", lr_at=lambda s: 1e6)
  msg = str(e.value)
  assert "at step 3 (lr 1e+06)" in msg and "checkpoint at step 5 was not written" in msg
  assert "Lower optim.lr" in msg and "\n" not in msg
  # A huge-but-finite parameter overflows the norm: that model has diverged as well.
  assert not bool(step_fn(jnp.array([3e19, 0.0, 0.0])))


@pytest.mark.parametrize("field, value, words", [
    ("peft.k_count", 10 ** 9, "k_count must be in [1, N="),
    ("peft.k_percent", 1e-9, "rounds to 0 weights"),
    ("train.batch_size", 0, "train.batch_size=0 must be a positive integer"),
])
def test_budget_and_batch_refused_before_any_work(field, value, words, monkeypatch):
  """validate_config refuses before the scoring pass (which would be the first work)."""
  from shpeft_jax import train  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import importance  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(importance, "hybrid_importance",
                      lambda *a, **k: (_ for _ in ()).throw(AssertionError("scored")))
  config = make_tiny_config("shpeft")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError) as e:
    train.validate_config(config)
  assert words in str(e.value) and "\n" not in str(e.value)
