"""The train step compiles once, and its donated train state is reused in place.

A compile counter listens to JAX's own monitoring event for every XLA compilation
(`/jax/core/compile/backend_compile_duration`, recorded with the jitted function's name, also on a
persistent-cache hit), so a retrace caused by a changed shape, dtype, weak type or static argument
shows up as a second `train_step` compilation.
"""

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_fixtures import make_tiny_config
from shpeft_jax import optim
from shpeft_jax import train
from shpeft_jax.models.clip_vit import build_model, init_params
from shpeft_jax.peft import masking
from shpeft_jax.peft.sparse_optim import sparse_masked_optimizer
from shpeft_jax.utils import flatten_names, unflatten_names

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
  """Yields a list that collects the function name of every XLA compilation inside the block."""
  names = []

  def listener(event, duration, **kw):
    del duration
    if event == COMPILE_EVENT:
      names.append(kw.get("fun_name", "?"))
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_counter_counts_a_real_recompile():
  """The counter itself: a new input shape forces a second compile of the same function."""
  @jax.jit
  def probe_fn(x):
    return x * 2.0
  with count_compiles() as names:
    probe_fn(jnp.ones(3))
    probe_fn(jnp.ones(3) + 1)
    assert names.count("jit(probe_fn)") == 1
    probe_fn(jnp.ones(4))
  assert names.count("jit(probe_fn)") == 2
  assert probe_fn._cache_size() == 2
  # And the transfer guard used below does catch an implicit host -> device copy.
  with pytest.raises(Exception, match="[Dd]isallowed"), jax.transfer_guard("disallow"):
    probe_fn(np.ones(3, np.float32))


def _tiny_state(sparse: bool):
  model = build_model("test_tiny", 3)
  params = init_params(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  mask = unflatten_names({n: None if n.startswith("head/") else rng.random(x.shape) < 0.05
                          for n, x in flatten_names(params).items()})
  chain = optim.build(dict(lr=0.1, momentum=0.9, weight_decay=1e-4), 10).tx
  tx = sparse_masked_optimizer(chain, mask) if sparse else masking.masked_update(chain, mask)

  train_step = train.make_train_step(train.make_loss_fn(model), tx)  # The trainer's step.
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  return jax.jit(train_step, donate_argnums=(0,)), state


@pytest.mark.parametrize("sparse", [False, True])
def test_masked_step_compiles_once_and_donates(sparse):
  step, state = _tiny_state(sparse)
  batches = [{"image": jax.random.normal(jax.random.PRNGKey(i), (4, 16, 16, 3)),
              "label": jnp.arange(4, dtype=jnp.int32) % 3, "valid": jnp.ones(4, bool)}
             for i in range(4)]
  with count_compiles() as names, warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for i, batch in enumerate(batches):
      old = jax.tree.leaves(state)
      # After the first step, no implicit host<->device copy may happen in the loop.
      guard = jax.transfer_guard("disallow") if i else contextlib.nullcontext()
      with guard:
        state, m = step(state, batch)
        jax.device_get(m["loss"])  # The trainer's explicit fetch on logging steps.
      # Donation worked: every input buffer of the state was consumed (reused for the outputs).
      assert all(x.is_deleted() for x in old), i
  assert names.count("jit(train_step)") == 1, names
  assert step._cache_size() == 1
  assert int(state["step"]) == 4
  assert not [w for w in caught if "donated" in str(w.message).lower()], [
      str(w.message) for w in caught]


@pytest.mark.parametrize("method,sparse_state",
                         [("shpeft", False), ("shpeft", True), ("linear", True)])
def test_trainer_train_step_compiles_once(tmp_path, method, sparse_state):
  """The real trainer (score, select, 6 steps with checkpoints, eval, export) on the tiny ViT.

  ("linear", True): a mask without partially-trained leaves, whose sparse state must still
  checkpoint (orbax refuses zero-size arrays).
  """
  config = make_tiny_config(method, num_steps=6)
  if sparse_state:
    config.optim.sparse_state = True
  with count_compiles() as names, warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert names.count("jit(train_step)") == 1, names
  assert not [w for w in caught if "donated" in str(w.message).lower()], [
      str(w.message) for w in caught]
