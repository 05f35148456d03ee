"""A PEFT method is one registry entry: throw-away methods registered here train with the trainer's
own step, and nothing outside `methods.METHODS` needs to know their names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shpeft_jax import optim, train, utils
from shpeft_jax.models import clip_vit
from shpeft_jax.peft import methods

CLASSES = 3


def _peft(method: str):
  cfg = methods.default_peft_config()
  cfg.method = method
  return cfg


def _one_step(method: methods.PeftMethod):
  """(params before, params after, mask) of one step of the trainer's update on a random batch."""
  model = clip_vit.build_model("test_tiny", CLASSES, additive=method.additive)
  params = clip_vit.init_params(model, jax.random.PRNGKey(0))
  mask = methods.trainable_mask(method, params, log=False)
  tx, _ = optim.build(dict(lr=0.5, momentum=0.9, weight_decay=0.1), 10, mask)
  step = jax.jit(train.make_train_step(train.make_loss_fn(model), tx))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32),
           "label": jnp.asarray([0, 1, 2, 0], jnp.int32), "valid": jnp.ones(4, bool)}
  before = utils.flatten_names(jax.tree.map(np.asarray, params))
  state, m = step({"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)},
                  batch)
  assert np.isfinite(float(m["loss"]))
  return before, utils.flatten_names(jax.tree.map(np.asarray, state["params"])), \
      utils.flatten_names(mask)


def _assert_moved_exactly(before, after, mask, trained):
  assert {n for n in mask if mask[n].all()} == trained
  for name in before:
    if name in trained:
      assert np.any(after[name] != before[name]), name
    else:
      np.testing.assert_array_equal(after[name].view(np.uint32), before[name].view(np.uint32),
                                    err_msg=name)


def test_a_rule_based_method_is_one_registry_entry(monkeypatch):
  """The MLP output projections only: one `Method`, not in TABLE1_ORDER, not rejected."""
  entry = methods.Method("mlp_out_test", "S", "MLP out (test)", methods._rules(  # pylint: disable=protected-access
      ("mlp_out", r"encoder/resblocks_\d+/mlp/c_proj/(?:kernel|bias)")))
  monkeypatch.setitem(methods.METHODS, entry.name, entry)
  assert methods.method_names()[-1] == "mlp_out_test"
  method = methods.validate_peft(_peft("mlp_out_test"))
  assert not method.scored and not method.merges
  before, after, mask = _one_step(method)
  trained = {n for n in before if n.startswith("head/") or "/mlp/c_proj/" in n}
  assert len(trained) == 2 + 2 * 2  # head kernel/bias + 2 blocks x (kernel, bias)
  _assert_moved_exactly(before, after, mask, trained)


def test_an_additive_method_is_a_hook_config_and_one_registry_entry(monkeypatch):
  """LoRA on k and o (attention out) with SSF after every op: its hooks (models/clip_vit.py's LoRA and SSF
  modules) and one entry; it trains its additive leaves and the head, and is merged at export."""
  entry = methods.Method(
      "lora_ssf_test", "A", "LoRA+SSF (test)",
      methods._rules(("lora", r"encoder/.*/lora_[^/]+/(?:a|b)"),  # pylint: disable=protected-access
                     ("ssf", r"encoder/(?:.*/)?ssf_[^/]+/(?:scale|shift)")),
      hooks=lambda peft: clip_vit.AdditiveConfig(lora_rank=2, lora_targets=("k", "o"),
                                                 ssf=True, ssf_init_std=0.02),
      merges=True)
  monkeypatch.setitem(methods.METHODS, entry.name, entry)
  method = methods.resolve(_peft("lora_ssf_test"))
  assert method.additive.lora_rank == 2 and method.merges
  before, after, mask = _one_step(method)
  trained = {n for n in before if n.startswith("head/") or "/lora_" in n or "ssf_" in n}
  assert any("/lora_key/" in n for n in trained) and any("/lora_out/" in n for n in trained)
  assert not any("/lora_query/" in n for n in trained)
  # Weight decay moves every trained leaf, even LoRA's a (no gradient while b is still 0).
  _assert_moved_exactly(before, after, mask, trained)


def test_unknown_method_is_still_rejected():
  with pytest.raises(Exception, match="peft.method 'nope'"):
    methods.resolve(_peft("nope"))
