"""Importance scores: scan accumulation vs a brute-force per-batch loop, hybrid formula by hand."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shpeft_jax.errors import ConfigError, DataError
from shpeft_jax.models import clip_vit
from shpeft_jax.peft import importance as imp
from shpeft_jax.utils import flatten_names

NUM_CLASSES = 3


def tiny_model():
  # test_tiny with one residual block: every parameter type, a fraction of the compile time.
  config = dataclasses.replace(clip_vit.get_model_config("test_tiny"), layers=1)
  return clip_vit.ClipClassifier(config, NUM_CLASSES)


@pytest.fixture(scope="module")
def tiny():
  model = tiny_model()
  params = clip_vit.init_params(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  size = model.config.image_size
  batches = []
  for b in range(5):
    valid = np.ones(4, bool)
    if b == 4:
      valid[2:] = False  # The last batch is padded: the mean runs over 2 examples.
    batches.append({"image": rng.normal(size=(4, size, size, 3)).astype(np.float32),
                    "label": rng.integers(0, NUM_CLASSES, 4).astype(np.int32),
                    "valid": valid})
  return model, params, imp.cross_entropy_loss_fn(model.apply), batches


_GRADS = {}
_BRUTE = {}


def brute_force(loss_fn, params, batches):
  """sum_b g_b, sum_b g_b**2, sum_b |g_b| with a plain Python loop, in float64 (memoised)."""
  key = (id(loss_fn), id(params), tuple(id(b) for b in batches))
  if key in _BRUTE:
    return _BRUTE[key]
  grad = _GRADS.setdefault(id(loss_fn), jax.jit(jax.grad(loss_fn)))
  s1 = s2 = sa = None
  for batch in batches:
    g = {k: np.asarray(v, np.float64) for k, v in flatten_names(grad(params, batch)).items()}
    if s1 is None:
      s1 = {k: np.zeros_like(v) for k, v in g.items()}
      s2 = {k: np.zeros_like(v) for k, v in g.items()}
      sa = {k: np.zeros_like(v) for k, v in g.items()}
    for k, v in g.items():
      s1[k] += v
      s2[k] += v * v
      sa[k] += np.abs(v)
  _BRUTE[key] = (s1, s2, sa)
  return s1, s2, sa


def stack(batches):
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def assert_close(acc_tree, reference, scored_prefix="encoder/"):
  got = flatten_names(acc_tree)
  names = [n for n in reference if n.startswith(scored_prefix)]
  assert set(got) == set(names)  # None (unscored) leaves vanish from flatten_names.
  # The attention key bias has an exactly-zero true gradient (softmax is shift invariant), so its
  # float noise (~1e-18) is compared against the global scale, not its own.
  scale = max(np.max(np.abs(reference[n])) for n in names)
  for n in names:
    np.testing.assert_allclose(np.asarray(got[n]), reference[n], rtol=2e-5, atol=1e-7 * scale,
                               err_msg=n)


@pytest.fixture(scope="module")
def full_acc(tiny):
  """All three sums over the 5 batches in one jitted scan (shared by several tests)."""
  _, params, loss_fn, batches = tiny
  return imp.accumulate_gradients(loss_fn, params, stack(batches),
                                  stats=("sum_grad", "sum_sq", "sum_abs"))


def test_scan_equals_python_loop(tiny, full_acc):
  _, params, loss_fn, batches = tiny
  s1, s2, sa = brute_force(loss_fn, params, batches)
  acc = full_acc
  assert int(acc["num_batches"]) == 5
  assert acc["sum_sq"]["head"] == {"kernel": None, "bias": None}
  assert_close(acc["sum_grad"], s1)
  assert_close(acc["sum_sq"], s2)
  assert_close(acc["sum_abs"], sa)
  # Every encoder tensor gets a gradient, including class token, positional embedding, LayerNorms;
  # except the attention key bias, whose true gradient is zero (softmax ignores a per-query shift).
  total = sum(float(jnp.sum(v)) for v in jax.tree.leaves(acc["sum_sq"]))
  for name, v in flatten_names(acc["sum_sq"]).items():
    if name.endswith("attn/key/bias"):
      assert float(jnp.sum(v)) < 1e-12 * total, name
    else:
      assert float(jnp.sum(v)) > 1e-9 * total, name
  assert any("class_embedding" in n for n in flatten_names(acc["sum_sq"]))


def test_chunks_accumulate_and_pad(tiny):
  """5 batches in chunks of 2 (the last chunk padded at weight 0) == the one-shot loop."""
  _, params, loss_fn, batches = tiny
  _, s2, _ = brute_force(loss_fn, params, batches)
  acc, info = imp.score_dataset(loss_fn, params, iter(batches), chunk_size=2, progress=False)
  assert info["num_batches"] == 5 and info["num_images"] == 18
  assert int(acc["num_batches"]) == 5
  assert_close(acc["sum_sq"], s2)
  # num_batches stops early; the accumulation equals the loop over the first 3 batches.
  _, s2_3, _ = brute_force(loss_fn, params, batches[:3])
  acc3, info3 = imp.score_dataset(loss_fn, params, iter(batches), num_batches=3, chunk_size=2,
                                  progress=True)
  assert info3["num_batches"] == 3
  assert_close(acc3["sum_sq"], s2_3)
  # Continuing an accumulator (donated) adds the next chunk.
  _, s2_4, _ = brute_force(loss_fn, params, batches[:4])
  first = imp.accumulate_gradients(loss_fn, params, stack(batches[:2]))
  both = imp.accumulate_gradients(loss_fn, params, stack(batches[2:4]), acc=first)
  assert int(both["num_batches"]) == 4
  assert_close(both["sum_sq"], s2_4)


def test_include_head(tiny):
  _, params, loss_fn, batches = tiny
  scored = imp.scored_mask_tree(params, include_head=True)
  assert all(jax.tree.leaves(scored))
  _, s2, _ = brute_force(loss_fn, params, batches[:2])
  acc = imp.accumulate_gradients(loss_fn, params, stack(batches[:2]), scored=scored)
  assert_close(acc["sum_sq"], s2, scored_prefix="")
  default = imp.scored_mask_tree(params)
  assert default["head"] == {"kernel": False, "bias": False}
  assert all(jax.tree.leaves(default["encoder"]))


def test_hybrid_by_hand():
  """Hand-computed numbers for a 3-weight encoder + head."""
  params = {"encoder": {"a": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])},
            "head": {"kernel": jnp.array([7.0])}}
  acc = {"sum_grad": {"encoder": {"a": jnp.array([0.5, -1.0]), "b": jnp.array([-2.0])},
                      "head": {"kernel": None}},
         "sum_sq": {"encoder": {"a": jnp.array([1.0, 4.0]), "b": jnp.array([3.0])},
                    "head": {"kernel": None}},
         "num_batches": jnp.array(2)}
  # L2: I_td = [1, 4, 3] (sum 8); I_ta = [1, 4, 9] (sum 14); ratio 8/14.
  s, info = imp.hybrid_importance(params, acc, estimator="l2", lam=1.0, return_info=True)
  r = 8.0 / 14.0
  np.testing.assert_allclose(s["encoder"]["a"], [1 + r * 1, 4 + r * 4], rtol=1e-6)
  np.testing.assert_allclose(s["encoder"]["b"], [3 + r * 9], rtol=1e-6)
  assert s["head"]["kernel"] is None
  assert info == pytest.approx({"sum_td": 8.0, "sum_ta": 14.0, "ratio": r})
  # L1, lam = 0.5: I_td = |sum g| = [0.5, 1, 2] (sum 3.5); I_ta = |w| = [1, 2, 3] (sum 6).
  s = imp.hybrid_importance(params, acc, estimator="l1", lam=0.5)
  c = 0.5 * 3.5 / 6.0
  np.testing.assert_allclose(s["encoder"]["a"], [0.5 + c * 1, 1 + c * 2], rtol=1e-6)
  np.testing.assert_allclose(s["encoder"]["b"], [2 + c * 3], rtol=1e-6)
  # td and ta modes; ta needs no accumulator.
  s = imp.hybrid_importance(params, acc, estimator="l1", mode="td")
  np.testing.assert_allclose(s["encoder"]["a"], [0.5, 1.0])
  s = imp.hybrid_importance(params, None, estimator="l2", mode="ta")
  np.testing.assert_allclose(s["encoder"]["b"], [9.0])
  assert s["head"]["kernel"] is None
  # lam = 0 reduces the hybrid to td.
  s = imp.hybrid_importance(params, acc, estimator="l2", lam=0.0)
  np.testing.assert_allclose(s["encoder"]["a"], [1.0, 4.0])


@pytest.mark.parametrize("estimator", ["l1", "l2"])
@pytest.mark.parametrize("lam", [0.3, 1.0, 4.0])
def test_hybrid_matches_numpy(tiny, full_acc, estimator, lam):
  _, params, loss_fn, batches = tiny
  s1, s2, _ = brute_force(loss_fn, params, batches)
  acc = full_acc
  got = flatten_names(imp.hybrid_importance(params, acc, estimator=estimator, lam=lam))
  w = {n: np.asarray(v, np.float64) for n, v in flatten_names(params).items()
       if n.startswith("encoder/")}
  td = {n: (np.abs(s1[n]) if estimator == "l1" else s2[n]) for n in w}
  ta = {n: (np.abs(v) if estimator == "l1" else v * v) for n, v in w.items()}
  ratio = sum(v.sum() for v in td.values()) / sum(v.sum() for v in ta.values())
  assert set(got) == set(w)
  for n in w:
    expect = td[n] + lam * ratio * ta[n]
    np.testing.assert_allclose(np.asarray(got[n]), expect, rtol=1e-4,
                               atol=1e-6 * np.abs(expect).max(), err_msg=n)


def test_sum_of_abs_variant(tiny, full_acc):
  _, params, loss_fn, batches = tiny
  s1, _, sa = brute_force(loss_fn, params, batches)
  assert_close(imp.task_dependent(full_acc, "l1", l1_reduction="sum_of_abs"), sa)
  assert_close(imp.task_dependent(full_acc, "l1"), {n: np.abs(v) for n, v in s1.items()})
  plain = imp.accumulate_gradients(loss_fn, params, stack(batches[:2]))
  with pytest.raises(ConfigError, match="sum_abs"):
    imp.task_dependent(plain, "l1", l1_reduction="sum_of_abs")


def test_square_of_sum_by_hand():
  """l2_reduction='square_of_sum': I_td = (sum_b g_b)^2 from three hand-written batch gradients."""
  params = {"encoder": {"a": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])},
            "head": {"kernel": jnp.array([7.0])}}
  # g_1 = [1, -2 | 0.5], g_2 = [-0.5, 1 | -1.5], g_3 = [1, 0 | 3].
  grads = [([1.0, -2.0], [0.5]), ([-0.5, 1.0], [-1.5]), ([1.0, 0.0], [3.0])]
  sum_a = [sum(g[0][i] for g in grads) for i in range(2)]  # [1.5, -1.0]
  sum_b = [sum(g[1][0] for g in grads)]                     # [2.0]
  sq_a = [sum(g[0][i] ** 2 for g in grads) for i in range(2)]  # [2.25, 5.0]
  sq_b = [sum(g[1][0] ** 2 for g in grads)]                     # [11.5]
  acc = {"sum_grad": {"encoder": {"a": jnp.array(sum_a), "b": jnp.array(sum_b)},
                      "head": {"kernel": None}},
         "sum_sq": {"encoder": {"a": jnp.array(sq_a), "b": jnp.array(sq_b)},
                    "head": {"kernel": None}},
         "num_batches": jnp.array(3)}
  td = imp.task_dependent(acc, "l2", l2_reduction="square_of_sum")
  np.testing.assert_allclose(td["encoder"]["a"], [2.25, 1.0])
  np.testing.assert_allclose(td["encoder"]["b"], [4.0])
  assert td["head"]["kernel"] is None
  np.testing.assert_allclose(imp.task_dependent(acc, "l2")["encoder"]["a"], [2.25, 5.0])
  # Hybrid: I_td = [2.25, 1, 4] (sum 7.25); I_ta = w^2 = [1, 4, 9] (sum 14).
  s, info = imp.hybrid_importance(params, acc, estimator="l2", l2_reduction="square_of_sum",
                                  return_info=True)
  r = 7.25 / 14.0
  np.testing.assert_allclose(s["encoder"]["a"], [2.25 + r, 1 + 4 * r], rtol=1e-6)
  np.testing.assert_allclose(s["encoder"]["b"], [4 + 9 * r], rtol=1e-6)
  assert info == pytest.approx({"sum_td": 7.25, "sum_ta": 14.0, "ratio": r})
  # The L1 estimator ignores l2_reduction.
  l1 = imp.task_dependent(acc, "l1", l2_reduction="square_of_sum")
  np.testing.assert_allclose(l1["encoder"]["a"], [1.5, 1.0])


def test_square_of_sum_matches_brute_force(tiny, full_acc):
  """(sum_b g_b)^2 of the scan over 5 real batches == the per-batch loop's, and differs from
  sum_b g_b^2 (Cauchy-Schwarz: (sum g)^2 <= B * sum g^2, equality only for equal g_b)."""
  _, params, loss_fn, batches = tiny
  s1, s2, _ = brute_force(loss_fn, params, batches)
  got = imp.task_dependent(full_acc, "l2", l2_reduction="square_of_sum")
  assert_close(got, {n: v * v for n, v in s1.items()})
  flat_sos = np.concatenate([np.ravel(v * v) for n, v in s1.items() if n.startswith("encoder/")])
  flat_ss = np.concatenate([np.ravel(s2[n]) for n in s1 if n.startswith("encoder/")])
  assert np.all(flat_sos <= len(batches) * flat_ss * (1 + 1e-9) + 1e-30)
  assert not np.allclose(flat_sos, flat_ss, rtol=0.1)
  # In 'td' mode (sum g)^2 ranks exactly as I_td-L1 = |sum g|: the same top-k mask.
  from shpeft_jax.peft import selection  # pylint: disable=g-import-not-at-top
  td_l1 = imp.hybrid_importance(params, full_acc, estimator="l1", mode="td")
  td_sq = imp.hybrid_importance(params, full_acc, estimator="l2", mode="td",
                                l2_reduction="square_of_sum")
  for k in (1.0, 10.0):
    jax.tree.map(np.testing.assert_array_equal, selection.select_top_k(td_l1, k_percent=k)[0],
                 selection.select_top_k(td_sq, k_percent=k)[0])
  w = {n: np.asarray(v, np.float64) for n, v in flatten_names(params).items()
       if n.startswith("encoder/")}
  ratio = sum((s1[n] ** 2).sum() for n in w) / sum((v * v).sum() for v in w.values())
  hyb = flatten_names(imp.hybrid_importance(params, full_acc, estimator="l2", lam=2.0,
                                            l2_reduction="square_of_sum"))
  for n in w:
    expect = s1[n] ** 2 + 2.0 * ratio * w[n] ** 2
    np.testing.assert_allclose(np.asarray(hyb[n]), expect, rtol=1e-4,
                               atol=1e-6 * np.abs(expect).max(), err_msg=n)


def test_invalid_inputs(tiny):
  _, params, loss_fn, batches = tiny
  acc = imp.accumulate_gradients(loss_fn, params, stack(batches[:2]))
  for lam in (-0.1, float("nan"), float("inf"), "1"):
    with pytest.raises(ConfigError, match="lambda"):
      imp.hybrid_importance(params, acc, lam=lam)
  with pytest.raises(ConfigError, match="estimator"):
    imp.hybrid_importance(params, acc, estimator="l3")
  with pytest.raises(ConfigError, match="mode"):
    imp.hybrid_importance(params, acc, mode="both")
  with pytest.raises(ConfigError, match="l2_reduction.*square_of_sum"):
    imp.hybrid_importance(params, acc, l2_reduction="sum_of_sum")
  with pytest.raises(ConfigError, match="accumulator"):
    imp.hybrid_importance(params, None, mode="hybrid")
  with pytest.raises(DataError, match="empty"):
    imp.score_dataset(loss_fn, params, iter([]), progress=False)
  with pytest.raises(DataError, match="num_batches"):
    imp.score_dataset(loss_fn, params, iter(batches), num_batches=0, progress=False)
  with pytest.raises(DataError, match="zero batches"):
    imp.accumulate_gradients(loss_fn, params, jax.tree.map(lambda x: x[:0], stack(batches)))
  with pytest.raises(DataError, match="same shape"):
    short = dict(batches[1], image=batches[1]["image"][:3])
    imp.score_dataset(loss_fn, params, iter([batches[0], short]), chunk_size=2, progress=False)
  with pytest.raises(ConfigError, match="No parameter"):
    imp.accumulate_gradients(loss_fn, params, stack(batches[:2]),
                             scored=jax.tree.map(lambda _: False, params))


def test_zero_head_blocks_gradient(tiny):
  """A zero-initialised head gives all-zero encoder gradients: a clear error, not a random mask."""
  _, params, loss_fn, batches = tiny
  zero_head = dict(params, head=jax.tree.map(jnp.zeros_like, params["head"]))
  acc = imp.accumulate_gradients(loss_fn, zero_head, stack(batches[:2]))
  with pytest.raises(DataError, match="zero-initialised"):
    imp.hybrid_importance(zero_head, acc)


SHARDED_SCRIPT = textwrap.dedent("""
  import os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import json, jax, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from shpeft_jax.models import clip_vit
  from shpeft_jax.peft import importance as imp
  from shpeft_jax.utils import flatten_names
  assert jax.device_count() == 8, jax.devices()
  import dataclasses
  config = dataclasses.replace(clip_vit.get_model_config("test_tiny"), layers=1)
  model = clip_vit.ClipClassifier(config, 3)
  params = clip_vit.init_params(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  batches = [{"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
              "label": rng.integers(0, 3, 8).astype(np.int32),
              "valid": np.arange(8) < (8 if b < 2 else 5)} for b in range(3)]
  loss_fn = imp.cross_entropy_loss_fn(model.apply)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = imp.chunk_sharding(mesh)
  stacked = jax.device_put(jax.tree.map(lambda *xs: np.stack(xs), *batches), sharding)
  assert len(stacked["image"].sharding.device_set) == 8
  sharded, _ = imp.score_dataset(loss_fn, params, iter(batches), chunk_size=2, progress=False,
                                 shardings=sharding)
  grad = jax.jit(jax.grad(loss_fn))
  ref = {}
  for bt in batches:
    for n, g in flatten_names(grad(params, bt)).items():
      ref[n] = ref.get(n, 0.0) + np.asarray(g, np.float64) ** 2
  got = flatten_names(sharded["sum_sq"])
  scale = max(float(np.max(np.abs(ref[n]))) for n in got)  # Global: key-bias grads are exactly 0.
  err = max(float(np.max(np.abs(np.asarray(got[n]) - ref[n]))) for n in got) / scale
  print(json.dumps({"rel_err": err, "num_tensors": len(got),
                    "num_batches": int(sharded["num_batches"]), "devices": jax.device_count()}))
""")


def test_data_parallel_over_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 8 and result["num_batches"] == 3
  assert result["num_tensors"] > 10 and result["rel_err"] < 1e-5, result


def test_warm_up_head_matches_manual_sgd(tiny):
  """Head-only SGD with momentum == a hand-written numpy loop; the encoder is not touched."""
  _, params, loss_fn, batches = tiny
  feed = [batches[0], batches[1]] * 3
  new, losses = imp.warm_up_head(loss_fn, params, iter(feed), steps=6, lr=0.5, momentum=0.9)
  assert new["encoder"] is params["encoder"] and len(losses) == 6
  grad = _GRADS.setdefault(id(loss_fn), jax.jit(jax.grad(loss_fn)))
  head = {k: np.asarray(v, np.float64) for k, v in params["head"].items()}
  vel = {k: np.zeros_like(v) for k, v in head.items()}
  for batch in feed:
    p = dict(params, head={k: jnp.asarray(v, jnp.float32) for k, v in head.items()})
    g = grad(p, batch)["head"]
    for k in head:
      vel[k] = 0.9 * vel[k] + np.asarray(g[k], np.float64)
      head[k] = head[k] - 0.5 * vel[k]
  for k in head:
    np.testing.assert_allclose(np.asarray(new["head"][k]), head[k], rtol=1e-4, atol=1e-6)
  assert losses[4] + losses[5] < losses[0] + losses[1]  # The same two batches, lower loss.
  same, none = imp.warm_up_head(loss_fn, params, iter(feed), steps=0)
  assert same is params and none == []
  with pytest.raises(ConfigError, match="steps"):
    imp.warm_up_head(loss_fn, params, iter(feed), steps=-1)
  with pytest.raises(DataError, match="ended after 2"):
    imp.warm_up_head(loss_fn, params, iter(batches[:2]), steps=3)
