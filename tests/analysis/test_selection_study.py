"""The selection study's vmapped runs against the trainer's optimizer, one run at a time."""

import dataclasses

import jax
import numpy as np

from shpeft_jax.analysis import selection_study as study
from shpeft_jax import optim
from shpeft_jax.peft import masking


def _tiny():
  return dataclasses.replace(study.CANDIDATES["base"], name="tiny", width=16, layers=1, heads=2,
                             mlp_dim=32, image_size=8, patch=4)


def _apply(tx, full, p, s, g):
  u, s = tx.update(g, s, p)
  return masking.apply_updates(p, u, full), s


def test_vmapped_runs_equal_masked_sgd_run_by_run():
  c = _tiny()
  model = study.build(c)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, 5, 40).astype(np.int32)
  data = {"train": (x, y)}
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  enc = params["encoder"]
  steps, lrs = 4, [0.5, 0.05]
  heads = [study.fresh_head(model, x[:1], s) for s in (1, 2)]
  masks = [jax.tree.map(lambda w, s=s: np.random.default_rng(s).random(w.shape) < 0.3, enc)
           for s in (3, 4)]
  orders = [study.batch_order(40, 8, steps, seed=s) for s in (5, 6)]
  out = study.train_runs(model, enc, study._stack(heads), study._stack(masks), lrs,
                         np.stack(orders), data, steps)
  grad = jax.jit(jax.grad(study._loss(model)))
  for r in range(2):
    # The reference: the trainer's masked optimizer with the run's lr, one step at a time.
    full = {"encoder": masks[r], "head": jax.tree.map(lambda h: np.ones(h.shape, bool), heads[r])}
    tx = optim.build(dict(lr=lrs[r], momentum=0.9), steps, full).tx
    p = {"encoder": enc, "head": heads[r]}
    s = tx.init(p)
    step = jax.jit(lambda p, s, g, tx=tx, full=full: _apply(tx, full, p, s, g))
    for t in range(steps):
      p, s = step(p, s, grad(p, x[orders[r][t]], y[orders[r][t]]))
    got = jax.tree.map(lambda a, r=r: a[r], out)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    # Frozen encoder weights did not move; at least one selected weight did.
    moved = jax.tree.map(lambda a, b: np.asarray(a) != np.asarray(b), got["encoder"], enc)
    frozen_moved = sum(int(np.sum(m & ~k)) for m, k in zip(jax.tree.leaves(moved),
                                                            jax.tree.leaves(masks[r])))
    assert frozen_moved == 0
    assert sum(int(np.sum(m)) for m in jax.tree.leaves(moved)) > 0


def test_batch_order_is_a_permutation_per_epoch():
  o = study.batch_order(10, 4, 5, seed=0)  # 20 indices = two epochs of 10
  assert o.shape == (5, 4)
  flat = o.reshape(-1)
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
  assert not np.array_equal(study.batch_order(10, 4, 5, seed=1), o)
