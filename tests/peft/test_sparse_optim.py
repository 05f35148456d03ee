"""sparse_masked_optimizer == masked_update (dense masks), with far less state and, through
apply_gradients, no dense update tree."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from shpeft_jax import optim
from shpeft_jax.errors import ConfigError
from shpeft_jax.models.clip_vit import build_model, init_params
from shpeft_jax.peft import masking
from shpeft_jax.peft.sparse_optim import (SparseMaskedState, SparseMaskedTransformation,
                                          num_selected, sparse_masked_optimizer, tree_bytes)
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


# ------------------------------------------------------------------------------------------------
# apply_gradients: the updates applied in place, without a dense update tree.


def _run_step(model, params, step_fn, tx, steps=4, seed=1):
  """`steps` donated jitted steps of `step_fn(grads, opt_state, params) -> (params, opt_state)`."""
  loss = _loss_fn(model)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, images, labels):
    g = jax.grad(loss)(state["params"], images, labels)
    p, o = step_fn(g, state["opt"], state["params"])
    return {"params": p, "opt": o}

  state = {"params": jax.tree.map(jnp.array, params), "opt": tx.init(params)}
  key = jax.random.PRNGKey(seed)
  for i in range(steps):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    state = step(state, jax.random.normal(k1, (4, 16, 16, 3)), jax.random.randint(k2, (4,), 0, 3))
  return state["params"]


def _apply_via_update(tx):
  def fn(g, opt, p):
    u, opt = tx.update(g, opt, p)
    return masking.apply_updates(p, u), opt  # The trainer's rule for optax updates.
  return fn


def _apply_in_place(tx):
  def fn(g, opt, p):
    new, opt, _ = tx.apply_gradients(g, opt, p)
    return new, opt
  return fn


def _assert_bitwise_equal(a, b):
  for (name, x), y in zip(flatten_names(a).items(), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32),
                                  err_msg=name)


def test_apply_gradients_bit_exact_with_update():
  """In-place application == update + add of the same optimizer, bit for bit, over 4 donated steps
  (momentum, decay, schedule, clipping); == the dense masked path to float tolerance, as `update`
  always was (XLA fuses the dense path's full-size elementwise chain differently: a few elements
  per leaf differ in the last bits); frozen elements bit-identical, selected ones moved."""
  model, params = _tiny()
  mask = _random_mask(params, 0.1)
  mask["encoder"]["ln_pre"]["scale"] = False  # A fully frozen leaf.
  tx = _chain(grad_clip=0.5)
  sparse = sparse_masked_optimizer(tx, mask)
  in_place = _run_step(model, params, _apply_in_place(sparse), sparse)
  _assert_bitwise_equal(in_place, _run_step(model, params, _apply_via_update(sparse), sparse))
  dense_tx = masking.masked_update(tx, mask)
  dense = _run_step(model, params, _apply_via_update(dense_tx), dense_tx)
  for d, s in zip(jax.tree.leaves(dense), jax.tree.leaves(in_place)):
    np.testing.assert_allclose(np.asarray(s), np.asarray(d), rtol=1e-5, atol=1e-6)
  flat_new, flat_p0 = flatten_names(in_place), flatten_names(params)
  for name, m in flatten_names(mask).items():  # Frozen elements untouched, selected moved.
    new, p0 = np.asarray(flat_new[name]), np.asarray(flat_p0[name])
    keep = np.zeros(new.shape, bool) if m is False else ~m
    np.testing.assert_array_equal(new[keep].view(np.uint32), p0[keep].view(np.uint32),
                                  err_msg=name)
    if m is not False:
      assert np.all(new[m] != p0[m]), name


def test_apply_gradients_keeps_frozen_subnormals_and_reports_update_norm():
  """Frozen subnormal and -0.0 weights stay bit-identical (no arithmetic touches them), the
  selected ones follow p - lr * g, and update_norm is the norm of the applied updates."""
  tiny = np.float32(1e-40)  # Subnormal: XLA's flush-to-zero would turn p + (-0.0) into 0.
  params = {"a": jnp.array([tiny, -0.0, 2.0, 3.0, tiny]), "h": jnp.array([1.0, 2.0])}
  mask = {"a": np.array([False, False, True, True, False]), "h": None}
  opt = sparse_masked_optimizer(optax.sgd(0.5), mask)
  g = {"a": jnp.full((5,), 2.0), "h": jnp.array([1.0, -1.0])}
  new, state, norm = jax.jit(opt.apply_gradients, donate_argnums=(2,))(
      g, opt.init(params), jax.tree.map(jnp.array, params))
  a = np.asarray(new["a"])
  np.testing.assert_array_equal(a.view(np.uint32), np.array(
      [tiny, -0.0, 1.0, 2.0, tiny], np.float32).view(np.uint32))
  np.testing.assert_array_equal(np.asarray(new["h"]), [0.5, 2.5])
  np.testing.assert_allclose(float(norm), np.sqrt(2 * 1.0 + 2 * 0.25), rtol=1e-6)
  assert isinstance(state, SparseMaskedState)


def test_apply_gradients_materialises_no_dense_update_tree():
  """Compiled memory (XLA's buffer assignment, deterministic): the donated in-place step needs one
  parameter-sized scratch buffer less than update + add, and its peak (arguments + scratch) is
  below the dense masked path's, whose state holds a full momentum tree and the masks."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(512, 512)), jnp.float32), "b": jnp.zeros((512,))}
  mask = {"w": rng.random((512, 512)) < 0.01, "b": None}
  chain = _chain(weight_decay=1e-4, grad_clip=0.0)
  x = jnp.ones((8, 512))
  loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]))

  def analysis(tx, step_fn):
    def step(state, x):
      p, o = step_fn(jax.grad(loss)(state["params"], x), state["opt"], state["params"])
      return {"params": p, "opt": o}
    state = jax.eval_shape(lambda: {"params": params, "opt": tx.init(params)})
    m = jax.jit(step, donate_argnums=(0,)).lower(state, x).compile().memory_analysis()
    return m.temp_size_in_bytes, m.argument_size_in_bytes + m.temp_size_in_bytes

  sparse = sparse_masked_optimizer(chain, mask)
  temp_in_place, peak_in_place = analysis(sparse, _apply_in_place(sparse))
  temp_update, _ = analysis(sparse, _apply_via_update(sparse))
  dense_tx = masking.masked_update(chain, mask)
  _, peak_dense = analysis(dense_tx, _apply_via_update(dense_tx))
  w_bytes = 512 * 512 * 4
  assert temp_update - temp_in_place >= 0.9 * w_bytes, (temp_update, temp_in_place)
  assert temp_in_place < 1.2 * w_bytes, temp_in_place  # The gradient itself, and little more.
  assert peak_in_place < peak_dense - w_bytes, (peak_in_place, peak_dense)


def test_trainer_step_applies_the_sparse_state_in_place():
  """`train.make_train_step` with `optim.sparse_state`: the same params (bit for bit) and update
  norm as the same optimizer through `update` + add, with one params-sized buffer less scratch."""
  from shpeft_jax import optim, train
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(512, 512)), jnp.float32), "b": jnp.zeros((512,))}
  mask = {"w": rng.random((512, 512)) < 0.01, "b": None}
  tx = optim.build(dict(lr=0.1, momentum=0.9, weight_decay=1e-4, sparse_state=True), 100, mask).tx
  assert isinstance(tx, SparseMaskedTransformation)
  through_update = optax.GradientTransformation(tx.init, tx.update)  # No apply_gradients.
  loss = lambda p, batch: jnp.mean(jnp.tanh(batch["x"] @ p["w"] + p["b"]) ** 2)
  batch = {"x": jnp.asarray(rng.normal(size=(8, 512)), jnp.float32)}
  results = []
  for t in (tx, through_update):
    step = jax.jit(train.make_train_step(loss, t), donate_argnums=(0,))
    state = {"params": jax.tree.map(jnp.array, params), "opt": t.init(params),
             "step": jnp.zeros((), jnp.int32)}
    temp = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    for _ in range(3):
      state, m = step(state, batch)
    results.append((state["params"], m, temp))
  (p_in_place, m_in_place, temp_in_place), (p_update, m_update, temp_update) = results
  _assert_bitwise_equal(p_in_place, p_update)
  np.testing.assert_allclose(float(m_in_place["update_norm"]), float(m_update["update_norm"]),
                             rtol=1e-5)
  assert float(m_in_place["update_norm"]) > 0
  assert temp_update - temp_in_place >= 0.9 * 512 * 512 * 4, (temp_update, temp_in_place)
