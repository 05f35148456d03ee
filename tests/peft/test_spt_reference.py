"""td-L2 score == SPT's squared-gradient sensitivity computed by an independent PyTorch reference.

SPT (He et al., ICCV 2023) scores a weight by sum_b (dL_b/dw)^2 over mini-batches, L_b the mean
loss of batch b. Two checks: (1) a hand-written 2-layer MLP with LayerNorm in both frameworks, and
(2) the CLIP test model against the pure-PyTorch OpenAI-layout tower in `torch_reference`, with the
weights moved over by the project's exporter.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shpeft_jax.peft import importance as imp  # pylint: disable=g-import-not-at-top
from shpeft_jax.utils import flatten_names  # pylint: disable=g-import-not-at-top


def torch_sensitivity(model, loss_of_batch, batches):
  """sum_b (dL_b/dw)^2 per named parameter, float64, with torch autograd, one batch at a time."""
  out = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
  for batch in batches:
    model.zero_grad()
    loss_of_batch(model, batch).backward()
    for n, p in model.named_parameters():
      if p.grad is not None:
        out[n] += p.grad.double() ** 2
  return {n: v.numpy() for n, v in out.items()}


def test_mlp_matches_torch():
  rng = np.random.default_rng(0)
  d_in, d_h, n_cls = 6, 10, 4
  w = {"ln": {"scale": 1 + 0.1 * rng.normal(size=d_in), "bias": 0.1 * rng.normal(size=d_in)},
       "fc1": {"kernel": rng.normal(size=(d_in, d_h)) / 2, "bias": 0.1 * rng.normal(size=d_h)},
       "fc2": {"kernel": rng.normal(size=(d_h, d_h)) / 3, "bias": 0.1 * rng.normal(size=d_h)},
       "head": {"kernel": rng.normal(size=(d_h, n_cls)), "bias": 0.1 * rng.normal(size=n_cls)}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), w)
  batches = [{"x": rng.normal(size=(8, d_in)).astype(np.float32),
              "label": rng.integers(0, n_cls, 8).astype(np.int32),
              "valid": np.arange(8) < (8 if b < 3 else 5)} for b in range(4)]

  def apply(variables, x, train=False):
    p = variables["params"]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    h = (x - mu) / jnp.sqrt(var + 1e-5) * p["ln"]["scale"] + p["ln"]["bias"]
    h = jax.nn.gelu(h @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False)
    h = jnp.tanh(h @ p["fc2"]["kernel"] + p["fc2"]["bias"])
    return h @ p["head"]["kernel"] + p["head"]["bias"]

  stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
  loss_fn = lambda p, b: imp.cross_entropy_loss_fn(apply)(p, {"image": b["x"], "label": b["label"],
                                                              "valid": b["valid"]})
  acc = imp.accumulate_gradients(loss_fn, params, stacked)
  scores = flatten_names(imp.hybrid_importance(params, acc, estimator="l2", mode="td"))

  net = torch.nn.Sequential()
  net.add_module("ln", torch.nn.LayerNorm(d_in, eps=1e-5))
  net.add_module("fc1", torch.nn.Linear(d_in, d_h))
  net.add_module("gelu", torch.nn.GELU())
  net.add_module("fc2", torch.nn.Linear(d_h, d_h))
  net.add_module("tanh", torch.nn.Tanh())
  net.add_module("head", torch.nn.Linear(d_h, n_cls))
  with torch.no_grad():
    net.ln.weight.copy_(torch.tensor(w["ln"]["scale"]))
    net.ln.bias.copy_(torch.tensor(w["ln"]["bias"]))
    for name in ("fc1", "fc2", "head"):
      getattr(net, name).weight.copy_(torch.tensor(w[name]["kernel"].T))
      getattr(net, name).bias.copy_(torch.tensor(w[name]["bias"]))

  def torch_loss(model, b):
    valid = torch.tensor(b["valid"])
    ce = torch.nn.functional.cross_entropy(model(torch.tensor(b["x"])), torch.tensor(
        b["label"]).long(), reduction="none")
    return ce[valid].mean()  # Mean over the batch's valid examples.

  ref = torch_sensitivity(net, torch_loss, batches)
  pairs = {"ln/scale": "ln.weight", "ln/bias": "ln.bias", "fc1/kernel": "fc1.weight",
           "fc1/bias": "fc1.bias", "fc2/kernel": "fc2.weight", "fc2/bias": "fc2.bias"}
  assert set(scores) == set(pairs)  # The head is not scored.
  for ours, theirs in pairs.items():
    r = ref[theirs].T if ours.endswith("kernel") else ref[theirs]
    assert r.max() > 0
    np.testing.assert_allclose(np.asarray(scores[ours]), r, rtol=2e-4, atol=1e-6 * r.max(),
                               err_msg=ours)


def test_tiny_clip_matches_torch_reference():
  torch_reference = pytest.importorskip("shpeft_jax.models.torch_reference")
  from shpeft_jax.models import clip_vit  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import convert  # pylint: disable=g-import-not-at-top
  config = dataclasses.replace(clip_vit.get_model_config("test_tiny"), layers=1)
  model = clip_vit.ClipClassifier(config, 3)
  params = clip_vit.init_params(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  batches = [{"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
              "label": rng.integers(0, 3, 4).astype(np.int32),
              "valid": np.arange(4) < (4 if b < 2 else 3)} for b in range(3)]
  acc = imp.accumulate_gradients(imp.cross_entropy_loss_fn(model.apply), params,
                                 jax.tree.map(lambda *xs: np.stack(xs), *batches))
  scores = imp.hybrid_importance(params, acc, estimator="l2", mode="td")
  # The exporter is a pure re-layout (transposes, the q/k/v fuse), so it maps squared gradients
  # onto torch's names exactly as it maps weights.
  scores_torch = convert.flax_to_torch_state_dict(
      dict(scores, head=jax.tree.map(np.zeros_like, params["head"])), "openai")

  net = torch_reference.TorchClipClassifier.from_config(config, 3)
  sd = convert.flax_to_torch_state_dict(jax.device_get(params), "openai")
  net.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)

  def torch_loss(m, b):
    logits = m(torch.from_numpy(b["image"]).permute(0, 3, 1, 2))
    ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(b["label"]).long(),
                                           reduction="none")
    return ce[torch.from_numpy(b["valid"])].mean()

  ref = torch_sensitivity(net, torch_loss, batches)
  names = [n for n in ref if not n.startswith("head.")]
  assert set(names) == {n for n in scores_torch if not n.startswith("head.")}
  scale = max(ref[n].max() for n in names)
  for n in names:
    # Per-tensor relative check, with an absolute floor from the global scale for the in_proj
    # key-bias entries whose true gradient is exactly zero.
    np.testing.assert_allclose(scores_torch[n], ref[n], rtol=1e-3, atol=1e-6 * scale, err_msg=n)
  assert len(names) >= 14
