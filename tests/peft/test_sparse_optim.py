"""sparse_masked_optimizer == masked_update (dense masks) to float tolerance, with far less state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from shpeft_jax import optim
from shpeft_jax.errors import ConfigError
from shpeft_jax.models.clip_vit import build_model, init_params
from shpeft_jax.peft import masking
from shpeft_jax.peft.sparse_optim import (SparseMaskedState, num_selected, sparse_masked_optimizer,
                                          tree_bytes)
from shpeft_jax.utils import flatten_names, unflatten_names


def _tiny():
  model = build_model("test_tiny", 3)
  params = init_params(model, jax.random.PRNGKey(0))
  return model, params


def _random_mask(params, frac, seed=0, head=None):
  """Element masks on the encoder (~frac selected), the head fully trainable (None)."""
  rng = np.random.default_rng(seed)
  flat = flatten_names(params)
  out = {}
  for name, x in flat.items():
    if name.startswith("head/"):
      out[name] = head
    else:
      out[name] = rng.random(x.shape) < frac
  return unflatten_names(out)


def _loss_fn(model):
  def loss(params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss


def _run(tx, params, model, steps=5, seed=1):
  loss = _loss_fn(model)

  @jax.jit
  def step(params, opt_state, images, labels):
    g = jax.grad(loss)(params, images, labels)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state

  opt_state = tx.init(params)
  key = jax.random.PRNGKey(seed)
  for i in range(steps):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    images = jax.random.normal(k1, (4, 16, 16, 3))
    labels = jax.random.randint(k2, (4,), 0, 3)
    params, opt_state = step(params, opt_state, images, labels)
  return params, opt_state


def _chain(**over):
  cfg = dict(lr=0.05, warmup_steps=2, momentum=0.9, weight_decay=0.01, grad_clip=0.5)
  cfg.update(over)
  return optim.build(cfg, 20).tx


def test_matches_dense_masked_path():
  """Momentum + decoupled decay + warm-up/cosine + global-norm clipping, 5 steps of a tiny ViT."""
  clip = 0.5
  model, params = _tiny()
  mask = _random_mask(params, 0.1)
  tx = _chain(grad_clip=clip)
  dense, _ = _run(masking.masked_update(tx, mask), params, model)
  sparse, state = _run(sparse_masked_optimizer(tx, mask), params, model)
  assert isinstance(state, SparseMaskedState)
  for (name, d), s, p0, m in zip(flatten_names(dense).items(), jax.tree.leaves(sparse),
                                 jax.tree.leaves(params), jax.tree.leaves(
                                     mask, is_leaf=lambda x: x is None)):
    np.testing.assert_allclose(np.asarray(s), np.asarray(d), rtol=1e-5, atol=1e-6, err_msg=name)
    if m is not None:  # Frozen elements bit-identical to the start, selected ones moved.
      np.testing.assert_array_equal(np.asarray(s)[~m], np.asarray(p0)[~m], err_msg=name)
      assert np.all(np.asarray(s)[m] != np.asarray(p0)[m]), name
  # The state holds momentum only for the selected elements + the dense head.
  k = sum(int(m.sum()) for m in jax.tree.leaves(mask))
  assert num_selected(mask) == k
  assert state.inner[0 if clip is None else 1].trace["selected"].shape == (k,)


def test_matches_hand_written_sgd_momentum():
  """Independent reference: numpy loop of m = mu m + g; p -= lr (m + wd p) on the selected only."""
  mu, lr, wd = 0.9, 0.1, 0.05
  rng = np.random.default_rng(3)
  params = {"w": rng.normal(size=(6, 5)).astype(np.float32), "h": rng.normal(size=(3,)).astype(
      np.float32), "z": rng.normal(size=(4,)).astype(np.float32)}
  mask = {"w": rng.random((6, 5)) < 0.3, "h": None, "z": False}
  tx = optax.chain(optax.trace(mu), optax.add_decayed_weights(wd), optax.scale(-lr))
  opt = sparse_masked_optimizer(tx, mask)
  state = opt.init(params)
  p = jax.tree.map(jnp.asarray, params)
  ref = {k: v.copy() for k, v in params.items()}
  mom = {k: np.zeros_like(v) for k, v in params.items()}
  for _ in range(4):
    g = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    u, state = opt.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, u)
    for k in ref:
      sel = np.ones(ref[k].shape, bool) if mask[k] is None else (
          np.zeros(ref[k].shape, bool) if mask[k] is False else mask[k])
      mom[k] = mu * mom[k] + g[k]
      ref[k] = np.where(sel, ref[k] - lr * (mom[k] + wd * ref[k]), ref[k])
  for k in ref:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-6, atol=1e-6, err_msg=k)
  assert state.inner[0].trace["selected"].shape == (int(mask["w"].sum()),)
  assert len(state.inner[0].trace["dense"]) == 1  # Only "h"; "z" is frozen and has no state.


def test_frozen_updates_are_negative_zero_and_mask_forms():
  """Frozen elements get -0.0 (p + u == p bitwise, -0.0 weights stay -0.0); 0/1 float, all-ones and
  all-zeros array masks behave like element masks / True / False."""
  params = {"a": jnp.array([-0.0, 1.0, 2.0, 3.0]), "b": jnp.ones((2, 2)), "c": jnp.ones((3,)),
            "d": jnp.ones((2,))}
  mask = {"a": np.array([0.0, 1.0, 0.0, 1.0]), "b": np.ones((2, 2), bool),
          "c": np.zeros((3,), bool), "d": True}
  opt = sparse_masked_optimizer(optax.sgd(1.0), mask)
  state = opt.init(params)
  assert [int(i.size) for i in state.indices] == [2]
  u, _ = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
  np.testing.assert_array_equal(np.signbit(np.asarray(u["a"])), [True, True, True, True])
  np.testing.assert_array_equal(np.asarray(u["a"]), [0.0, -1.0, 0.0, -1.0])
  np.testing.assert_array_equal(np.asarray(u["b"]), -np.ones((2, 2)))
  assert np.all(np.signbit(np.asarray(u["c"]))) and np.all(np.asarray(u["c"]) == 0)
  new = optax.apply_updates(params, u)
  assert np.signbit(np.asarray(new["a"])[0])  # -0.0 weight stays -0.0.
  dense_u, _ = masking.masked_update(optax.sgd(1.0), mask).update(
      jax.tree.map(jnp.ones_like, params), masking.masked_update(optax.sgd(1.0), mask).init(params),
      params)
  for k in params:
    np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(dense_u[k]))


def test_no_partial_leaf_gives_no_empty_arrays(tmp_path):
  """Full fine-tuning / linear probe masks (all-ones, all-zeros, None, False leaves): the state has
  no flat vector at all (orbax cannot checkpoint zero-size arrays) and updates equal the dense path."""
  import orbax.checkpoint as ocp
  params = {"a": jnp.ones((3, 2)), "b": jnp.arange(4.0), "c": jnp.ones((2,)), "d": jnp.ones((5,))}
  mask = {"a": np.ones((3, 2), bool), "b": None, "c": False, "d": np.zeros((5,), bool)}
  tx = optax.sgd(0.5, momentum=0.9)
  opt = sparse_masked_optimizer(tx, mask)
  state = opt.init(params)
  assert all(x.size > 0 for x in jax.tree.leaves(state))
  g = {k: jnp.full_like(v, 2.0) for k, v in params.items()}
  u, state = opt.update(g, state, params)
  ref, _ = masking.masked_update(tx, mask).update(g, masking.masked_update(tx, mask).init(params),
                                                  params)
  for k in params:
    np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(ref[k]))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "opt"), state)


def test_adam_state_is_also_sparse():
  """Any elementwise chain works: Adam's two moments (and count) match the dense masked path.

  The attention key biases are frozen here: their true gradient is 0 (softmax is shift-invariant
  along the keys), so what autodiff returns is rounding noise that Adam's normalisation blows up to
  +-lr, and two correct implementations disagree on noise.
  """
  model, params = _tiny()
  mask = _random_mask(params, 0.2, seed=5)
  for i in range(2):
    mask["encoder"][f"resblocks_{i}"]["attn"]["key"]["bias"] = False
  tx = optax.adam(1e-2)
  dense, _ = _run(masking.masked_update(tx, mask), params, model, steps=3)
  sparse, state = _run(sparse_masked_optimizer(tx, mask), params, model, steps=3)
  for d, s in zip(jax.tree.leaves(dense), jax.tree.leaves(sparse)):
    np.testing.assert_allclose(np.asarray(s), np.asarray(d), rtol=1e-5, atol=1e-6)
  assert state.inner[0].mu["selected"].shape == (num_selected(mask),)


def test_mismatched_mask_raises():
  _, params = _tiny()
  bad = _random_mask(params, 0.1)
  bad["encoder"]["conv1"]["kernel"] = np.ones((5,), bool)
  bad["encoder"]["conv1"]["kernel"][1] = False
  with pytest.raises(ConfigError, match="conv1"):
    sparse_masked_optimizer(optax.sgd(0.1), bad).init(params)
  missing = _random_mask(params, 0.1)
  del missing["head"]
  with pytest.raises(ConfigError, match="does not match"):
    sparse_masked_optimizer(optax.sgd(0.1), missing).init(params)


def test_vit_b16_state_memory_is_10x_smaller_at_one_percent():
  """Bytes of optimizer state (jax.eval_shape, nothing allocated) for ViT-B/16 at k = 1%."""
  model = build_model("ViT-B/16", 4)
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  n_enc = sum(x.size for n, x in flatten_names(shapes).items() if n.startswith("encoder/"))
  rng = np.random.default_rng(0)
  mask = unflatten_names({n: None if n.startswith("head/") else rng.random(x.shape, np.float32) < 0.01
                          for n, x in flatten_names(shapes).items()})
  base = optax.sgd(1e-3, momentum=0.9)
  full = tree_bytes(jax.eval_shape(base.init, shapes))
  sparse = tree_bytes(jax.eval_shape(sparse_masked_optimizer(base, mask).init, shapes))
  dense_masked = tree_bytes(jax.eval_shape(masking.masked_update(base, mask).init, shapes))
  assert full == 4 * sum(x.size for x in jax.tree.leaves(shapes))  # One float32 trace per weight.
  k = num_selected(mask)
  assert abs(k - 0.01 * n_enc) < 0.001 * n_enc
  # K momentum floats + K int32 indices + the head's trace.
  head = sum(x.size for n, x in flatten_names(shapes).items() if n.startswith("head/"))
  assert sparse == 8 * k + 4 * head
  assert full / sparse >= 10, (full, sparse)
  assert dense_masked > full  # The dense masked path keeps the full trace plus the masks.
