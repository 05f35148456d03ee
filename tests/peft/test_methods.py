"""Trainable sets of every peft.method, checked against hand-derived formulas and brute force."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from shpeft_jax import utils
from shpeft_jax.errors import ConfigError
from shpeft_jax.models import clip_vit
from shpeft_jax.peft import methods

D, L, MLP, HEADS, CLASSES = 768, 12, 3072, 12, 4
HEAD = D * CLASSES + CLASSES
# CLIP ViT-B/16 vision tower without `proj`, by hand.
BLOCK = 2 * 2 * D + 4 * (D * D + D) + (D * MLP + MLP) + (MLP * D + D)
ENCODER = 16 * 16 * 3 * D + D + 197 * D + 2 * D + L * BLOCK + 2 * D


def _cfg(method, **kw):
  cfg = methods.default_peft_config()
  cfg.method = method
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


@pytest.fixture(scope="module")
def vit_b16_rows():
  return {r["method"]: r for r in methods.trainable_table("ViT-B/16", CLASSES)}


def test_vit_b16_encoder_size_is_clip_minus_proj(vit_b16_rows):
  # OpenAI CLIP ViT-B/16 visual has 86,192,640 parameters including proj (768 x 512).
  assert ENCODER == 86_192_640 - 768 * 512
  assert vit_b16_rows["full"]["trainable"] == ENCODER + HEAD
  assert vit_b16_rows["full"]["backbone_and_head"] == ENCODER + HEAD


@pytest.mark.parametrize("method,expected", [
    ("linear", HEAD),
    # BitFit: q/k/v/out biases, ln_1/ln_2 biases, c_fc and c_proj biases per block, ln_pre/ln_post.
    ("bitfit", L * (4 * D + 2 * D + MLP + D) + 2 * D + HEAD),
    # FT-LN: 2 LayerNorms per block + ln_pre + ln_post, scale and bias each.
    ("ln", (2 * L + 2) * 2 * D + HEAD),
    ("attn", L * 4 * (D * D + D) + HEAD),
    ("lora", L * 2 * 2 * D * 8 + HEAD),  # rank 8 on q and v (the default).
    ("adapter", L * (D * 64 + 64 + 64 * D + D) + HEAD),  # bottleneck 64: down + up with biases.
    # SSF scale+shift after conv1, ln_1, q, k, v, out, ln_2, c_fc, c_proj and ln_post.
    ("ssf", 2 * (D + L * (7 * D + MLP) + D) + HEAD),
    ("vpt_shallow", 10 * D + HEAD),
    ("vpt_deep", L * 10 * D + HEAD),
    ("shpeft", math.floor(ENCODER / 100 + 0.5) + HEAD),  # 1% of the encoder + the head.
    ("random", math.floor(ENCODER / 100 + 0.5) + HEAD),
])
def test_vit_b16_trainable_counts_match_hand_formulas(vit_b16_rows, method, expected):
  assert vit_b16_rows[method]["trainable"] == expected
  assert vit_b16_rows[method]["exact"]


def test_timm_trunk_tower_counts_its_own_layer_norms_and_patch_bias():
  """BiomedCLIP's timm trunk: no ln_pre, a patch-embedding bias. FT-LN loses ln_pre's 2D, BitFit
  swaps ln_pre's bias for the patch bias, the whole model has D more - D*2 fewer weights."""
  tower = {"act": "gelu", "ln_eps": 1e-6, "ln_pre": False, "patch_bias": True}
  rows = {r["method"]: r for r in methods.trainable_table(
      "ViT-B/16", CLASSES, methods=("full", "ln", "bitfit", "shpeft"), tower=tower)}
  encoder = ENCODER - 2 * D + D
  assert rows["full"]["trainable"] == encoder + HEAD
  assert rows["ln"]["trainable"] == (2 * L + 1) * 2 * D + HEAD
  assert rows["bitfit"]["trainable"] == L * (4 * D + 2 * D + MLP + D) + D + D + HEAD
  assert rows["shpeft"]["trainable"] == math.floor(encoder / 100 + 0.5) + HEAD


def test_vit_b16_bitfit_equals_number_of_bias_entries():
  shapes = methods.param_shapes("ViT-B/16", CLASSES)
  n_bias = sum(math.prod(v.shape) for n, v in utils.flatten_names(shapes).items()
               if n.startswith("encoder/") and n.endswith("/bias"))
  row = methods.count_trainable(_cfg("bitfit"), shapes)
  assert row["trainable"] == n_bias + HEAD


def test_vit_b16_lora_rank_and_targets_formula():
  cfg = _cfg("lora")
  cfg.lora.rank, cfg.lora.targets = 4, ("q", "k", "v", "o", "fc1", "fc2")
  shapes = methods.param_shapes("ViT-B/16", CLASSES, methods.additive_config_for(cfg))
  per_block = 4 * 4 * (D + D) + 4 * (D + MLP) + 4 * (MLP + D)
  assert methods.count_trainable(cfg, shapes)["trainable"] == L * per_block + HEAD


def test_vit_b16_spt_budget_and_mergeable_extras(vit_b16_rows):
  spt = vit_b16_rows["spt_lora"]
  assert not spt["exact"] and spt["trainable"] == math.floor(ENCODER / 100 + 0.5) + HEAD
  assert spt["inference_extra"] == 0 and vit_b16_rows["lora"]["inference_extra"] == 0
  assert vit_b16_rows["adapter"]["inference_extra"] == L * (2 * D * 64 + 64 + D)
  assert vit_b16_rows["vpt_deep"]["inference_extra"] == L * 10 * D


# ------------------------------------------------------------------------------------------------
# Masks on the tiny model, against independent name predicates.


def _tiny_params(peft_cfg, num_classes=3, seed=0):
  model = clip_vit.build_model("test_tiny", num_classes,
                               additive=methods.additive_config_for(peft_cfg))
  params = clip_vit.init_params(model, jax.random.PRNGKey(seed))
  return model, jax.tree_util.tree_map(np.asarray, params)


def _is_additive(name):
  return any(p.startswith(("lora_", "ssf_", "vpt_prompts_")) or p == "adapter"
             for p in name.split("/"))


PREDICATES = {
    "full": lambda n: True,
    "linear": lambda n: n.startswith("head/"),
    "bitfit": lambda n: n.startswith("head/") or n.split("/")[-1] == "bias",
    "ln": lambda n: n.startswith("head/") or n.split("/")[-2] in ("ln_pre", "ln_1", "ln_2",
                                                                   "ln_post"),
    "attn": lambda n: n.startswith("head/") or (
        "/attn/" in n and n.split("/")[-2] in ("query", "key", "value", "out")),
    "lora": lambda n: n.startswith("head/") or "/lora_" in n,
    "adapter": lambda n: n.startswith("head/") or "/adapter/" in n,
    "ssf": lambda n: n.startswith("head/") or "/ssf_" in n,
    "vpt_shallow": lambda n: n.startswith("head/") or n == "encoder/vpt_prompts_0",
    "vpt_deep": lambda n: n.startswith("head/") or "vpt_prompts_" in n,
}


@pytest.mark.parametrize("method", sorted(PREDICATES))
def test_rule_masks_match_name_predicates(method):
  cfg = _cfg(method)
  _, params = _tiny_params(cfg)
  mask = methods.trainable_mask(cfg, params)
  assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
  expected_count = 0
  for name, m in utils.flatten_names(mask).items():
    p = utils.flatten_names(params)[name]
    assert m.dtype == np.bool_ and m.shape == p.shape, name
    want = PREDICATES[method](name)
    assert (m.all() if want else not m.any()), (method, name)
    expected_count += p.size if want else 0
  assert methods.trainable_count(mask) == expected_count
  assert methods.count_trainable(cfg, params)["trainable"] == expected_count
  # Additive methods train their added leaves and nothing pretrained but the head.
  if method in ("lora", "adapter", "ssf", "vpt_shallow", "vpt_deep"):
    for name, m in utils.flatten_names(mask).items():
      if name.startswith("encoder/") and not _is_additive(name):
        assert not m.any(), name


def test_unexpected_additive_leaf_is_an_error_not_silently_frozen():
  _, params = _tiny_params(_cfg("lora"))
  with pytest.raises(ConfigError, match="no rule matches.*lora_"):
    methods.trainable_mask(_cfg("bitfit"), params)
  with pytest.raises(ConfigError, match="Unknown peft.method"):
    methods.trainable_mask(_cfg("bogus"), params)


def test_rule_matches_are_logged():
  cfg = _cfg("bitfit")
  _, params = _tiny_params(cfg)
  with pytest.MonkeyPatch.context() as mp:
    lines = []
    # Detail (--verbosity=1); the console gets trainable_params.tsv's summary instead.
    mp.setattr(methods.logging, "debug", lambda fmt, *a: lines.append(fmt % a))
    methods.trainable_mask(cfg, params)
  names = utils.flatten_names(params)
  assert sum("rule=" in l for l in lines) == len(names)
  assert any("encoder/ln_pre/bias" in l and "rule=bias" in l and "trainable" in l for l in lines)
  assert any("encoder/conv1/kernel" in l and "rule=frozen_backbone" in l for l in lines)


# ------------------------------------------------------------------------------------------------
# Score-based masks, against a brute-force stable argsort.


def _random_scores(params, seed=1, skip_head=True):
  gen = np.random.default_rng(seed)
  return utils.unflatten_names({
      n: (None if skip_head and n.startswith("head/") else gen.random(p.shape).astype(np.float32))
      for n, p in utils.flatten_names(params).items()})


def test_shpeft_mask_is_exact_global_top_k_plus_head():
  cfg = _cfg("shpeft", k_percent=3.0)
  _, params = _tiny_params(cfg)
  scores = _random_scores(params)
  mask = utils.flatten_names(methods.trainable_mask(cfg, params, scores=scores))
  flat_s = utils.flatten_names(scores)
  names = [n for n in utils.flatten_names(params) if not n.startswith("head/")]
  allv = np.concatenate([flat_s[n].ravel() for n in names])
  k = math.floor(allv.size * 3.0 / 100 + 0.5)
  ref = np.zeros(allv.size, bool)
  ref[np.argsort(-allv, kind="stable")[:k]] = True
  got = np.concatenate([mask[n].ravel() for n in names])
  np.testing.assert_array_equal(got, ref)
  assert mask["head/kernel"].all() and mask["head/bias"].all()
  head = sum(mask[n].size for n in mask if n.startswith("head/"))
  assert methods.trainable_count(utils.unflatten_names(mask)) == k + head
  with pytest.raises(ConfigError, match="needs importance scores"):
    methods.trainable_mask(cfg, params)


def test_shpeft_include_head_ranks_the_head_too():
  cfg = _cfg("shpeft", k_count=150, include_head=True)
  _, params = _tiny_params(cfg)
  scores = _random_scores(params, skip_head=False)
  flat_s = utils.flatten_names(scores)
  flat_s["head/kernel"] = np.full_like(flat_s["head/kernel"], 2.0)  # Above every encoder score.
  flat_s["head/bias"] = np.full_like(flat_s["head/bias"], -1.0)  # Below every encoder score.
  mask = utils.flatten_names(
      methods.trainable_mask(cfg, params, scores=utils.unflatten_names(flat_s)))
  assert methods.trainable_count(utils.unflatten_names(mask)) == 150
  assert mask["head/kernel"].all() and not mask["head/bias"].any()
  assert sum(int(m.sum()) for n, m in mask.items() if n.startswith("encoder/")) == 150 - 32 * 3


def test_random_mask_same_k_seeded_and_spread():
  cfg = _cfg("random", k_percent=10.0)
  _, params = _tiny_params(cfg)
  m1 = methods.trainable_mask(cfg, params, rng=3)
  m2 = methods.trainable_mask(cfg, params, rng=3)
  m3 = methods.trainable_mask(cfg, params, rng=jax.random.PRNGKey(4))
  flat1, flat3 = utils.flatten_names(m1), utils.flatten_names(m3)
  enc = [n for n in flat1 if n.startswith("encoder/")]
  n_enc = sum(flat1[n].size for n in enc)
  k = math.floor(n_enc * 10.0 / 100 + 0.5)
  for m in (m1, m3):
    flat = utils.flatten_names(m)
    assert sum(int(flat[n].sum()) for n in enc) == k
    assert flat["head/kernel"].all() and flat["head/bias"].all()
  jax.tree_util.tree_map(np.testing.assert_array_equal, m1, m2)
  assert any((flat1[n] != flat3[n]).any() for n in enc)
  # Uniform over elements: the largest tensors get close to 10% each (binomial sd ~ 0.6%).
  big = max(enc, key=lambda n: flat1[n].size)
  assert abs(flat1[big].mean() - 0.10) < 0.03


def _spt_reference(cfg, params, scores, rank):
  """SPT-LoRA mask by brute force: stable argsort over linear kernels, per-matrix counts."""
  flat_p, flat_s = utils.flatten_names(params), utils.flatten_names(scores)
  linear = [n for n in flat_p if n.split("/")[-2] in ("query", "key", "value", "out", "c_fc",
                                                        "c_proj") and n.endswith("/kernel")]
  enc = sum(p.size for n, p in flat_p.items() if n.startswith("encoder/") and not _is_additive(n))
  budget = int(cfg.k_count) if cfg.k_count else math.floor(enc * cfg.k_percent / 100 + 0.5)
  allv = np.concatenate([flat_s[n].ravel() for n in linear])
  sel = np.zeros(allv.size, bool)
  sel[np.argsort(-allv, kind="stable")[:budget]] = True
  want, off, chosen = {n: np.zeros(p.shape, bool) for n, p in flat_p.items()}, 0, []
  for n in linear:
    p = flat_p[n]
    s = sel[off:off + p.size].reshape(p.shape)
    off += p.size
    if n.endswith("out/kernel"):
      d_in, d_out = p.shape[0] * p.shape[1], p.shape[2]
    else:
      d_in, d_out = p.shape[0], int(np.prod(p.shape[1:]))
    if s.sum() > rank * (d_in + d_out):
      parent, mod = n.rsplit("/", 2)[0], n.rsplit("/", 2)[1]
      want[f"{parent}/lora_{mod}/a"][:] = True
      want[f"{parent}/lora_{mod}/b"][:] = True
      chosen.append(n)
    else:
      want[n] = s
  want["head/kernel"][:] = True
  want["head/bias"][:] = True
  return want, chosen, budget


def test_spt_lora_matches_brute_force_and_budget():
  cfg = _cfg("spt_lora", k_percent=20.0)
  cfg.spt.rank = 2
  assert methods.needs_scoring(cfg)
  assert methods.importance_settings(cfg) == dict(estimator="l2", mode="td", lam=0.0)
  add = methods.additive_config_for(cfg)
  assert add.lora_rank == 2 and set(add.lora_targets) == set(clip_vit.LORA_TARGETS)
  _, params = _tiny_params(cfg)
  scores = utils.flatten_names(_random_scores(params))
  # Make two matrices highly sensitive so that they must get LoRA.
  for n in ("encoder/resblocks_0/mlp/c_fc/kernel", "encoder/resblocks_1/attn/value/kernel"):
    scores[n] = scores[n] + 10.0
  scores = utils.unflatten_names(scores)
  mask = utils.flatten_names(methods.trainable_mask(cfg, params, scores=scores))
  want, chosen, budget = _spt_reference(cfg, params, scores, rank=2)
  assert "encoder/resblocks_0/mlp/c_fc/kernel" in chosen
  assert "encoder/resblocks_1/attn/value/kernel" in chosen
  assert len(chosen) < 12  # Some matrices stay sparse.
  for n in want:
    np.testing.assert_array_equal(mask[n], want[n], err_msg=n)
  head = 32 * 3 + 3
  total = methods.trainable_count(utils.unflatten_names(mask))
  assert head < total <= budget + head
  # Biases, LayerNorms, embeddings and unchosen LoRA factors stay frozen.
  assert not mask["encoder/ln_pre/scale"].any() and not mask["encoder/conv1/kernel"].any()
  assert not mask["encoder/resblocks_0/attn/lora_query/b"].any() or (
      "encoder/resblocks_0/attn/query/kernel" in chosen)


def test_additive_config_mapping_and_scoring_flags():
  assert methods.additive_config_for(_cfg("full")) == clip_vit.AdditiveConfig()
  cfg = _cfg("lora")
  cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = 4, 16.0, ("q", "o")
  assert methods.additive_config_for(cfg) == clip_vit.AdditiveConfig(
      lora_rank=4, lora_alpha=16.0, lora_targets=("q", "o"))
  assert methods.additive_config_for(_cfg("adapter")).adapter_bottleneck == 64
  assert methods.additive_config_for(_cfg("ssf")).ssf
  shallow, deep = methods.additive_config_for(_cfg("vpt_shallow")), methods.additive_config_for(
      _cfg("vpt_deep"))
  assert (shallow.vpt_tokens, shallow.vpt_deep, deep.vpt_tokens, deep.vpt_deep) == (
      10, False, 10, True)
  assert [m for m in methods.method_names() if methods.needs_scoring(_cfg(m))] == [
      "spt_lora", "shpeft"]
  assert methods.importance_settings(_cfg("shpeft", estimator="l1", mode="ta", lam=0.5)) == dict(
      estimator="l1", mode="ta", lam=0.5, l2_reduction="sum_of_squares")
  with pytest.raises(ConfigError, match="estimator"):
    methods.importance_settings(_cfg("shpeft", estimator="l3"))


# ------------------------------------------------------------------------------------------------
# Zero-initialised additive methods leave the pretrained model's outputs unchanged at step 0.


@pytest.mark.parametrize("method,extra", [
    ("lora", dict(targets=clip_vit.LORA_TARGETS)), ("adapter", {}), ("ssf", {}),
    ("spt_lora", {})])
def test_zero_init_additive_leaves_pretrained_outputs_unchanged(method, extra):
  cfg = _cfg(method)
  if extra:
    cfg.lora.targets = extra["targets"]
  plain = clip_vit.build_model("test_tiny", 3)
  pretrained = jax.tree_util.tree_map(np.asarray,
                                      clip_vit.init_params(plain, jax.random.PRNGKey(7)))
  model, params = _tiny_params(cfg, seed=8)
  flat, pre = utils.flatten_names(params), utils.flatten_names(pretrained)
  added = [n for n in flat if n not in pre]
  assert added and all(_is_additive(n) for n in added)
  merged = utils.unflatten_names({n: pre.get(n, v) for n, v in flat.items()})
  x = jax.random.normal(jax.random.PRNGKey(9), (4, 16, 16, 3))
  # Eager: on tiny models op-by-op dispatch is cheaper than compiling.
  y0, f0 = plain.apply({"params": pretrained}, x, return_features=True)
  y1, f1 = model.apply({"params": merged}, x, return_features=True)
  np.testing.assert_allclose(np.asarray(f1), np.asarray(f0), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=0, atol=1e-6)
  # And the added parameters are not all zero (LoRA's `a`, the adapter's `down` are random), so
  # the identity comes from the zero-initialised `b` / `up` / SSF (1, 0), not from a dead branch.
  if method != "ssf":
    assert any(np.abs(flat[n]).max() > 0 for n in added)


def test_one_masked_sgd_step_moves_only_the_trainable_weights():
  from shpeft_jax.peft import masking
  cfg = _cfg("bitfit")
  model, params = _tiny_params(cfg)
  mask = methods.trainable_mask(cfg, params)
  tx = masking.masked_update(optax.sgd(0.1, momentum=0.9), mask)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  y = jnp.array([0, 1, 2, 0])

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  @jax.jit
  def step(p):
    updates, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
    return optax.apply_updates(p, updates)

  new = jax.tree_util.tree_map(np.asarray, step(params))
  for name, m in utils.flatten_names(mask).items():
    moved = np.asarray(utils.flatten_names(new)[name]) != utils.flatten_names(params)[name]
    assert not (moved & ~m).any(), name
  assert np.asarray(utils.flatten_names(new)["encoder/resblocks_0/mlp/c_fc/bias"] !=
                    utils.flatten_names(params)["encoder/resblocks_0/mlp/c_fc/bias"]).any()


@pytest.mark.parametrize("method", ["shpeft", "random"])
@pytest.mark.parametrize("scope", ["per_tensor", "per_row"])
def test_selection_scope_mask_and_count(method, scope):
  """peft.selection_scope: the mask is the scoped selection of the scores (shpeft) or of the
  random control's scores, every encoder tensor / kernel row gets its share, the head trains, and
  count_trainable (shapes only) equals the mask's count."""
  from shpeft_jax.peft import selection
  cfg = _cfg(method, k_percent=5.0, selection_scope=scope)
  _, params = _tiny_params(cfg)
  scores = _random_scores(params) if method == "shpeft" else None
  mask, info = methods.build_mask(cfg, params, scores=scores, rng=3, log=False)
  flat = utils.flatten_names(mask)
  enc = {n: p.shape for n, p in utils.flatten_names(params).items() if n.startswith("encoder/")}
  if method == "shpeft":
    ref, _ = selection.select_top_k(
        utils.unflatten_names({n: utils.flatten_names(scores)[n] for n in enc}), k_percent=5.0,
        scope=scope)
    for n, m in utils.flatten_names(ref).items():
      np.testing.assert_array_equal(flat[n], m, err_msg=n)
  for n, shape in enc.items():
    length, groups = selection.row_matrix_shape(n, shape, scope)
    per_group = flat[n].reshape(length, groups).sum(axis=0)
    np.testing.assert_array_equal(per_group, max(1, math.floor(5.0 * length / 100 + 0.5)))
  assert flat["head/kernel"].all() and flat["head/bias"].all()
  head = flat["head/kernel"].size + flat["head/bias"].size
  assert info.scope == scope and info.selected == selection.scoped_count(enc, k_percent=5.0,
                                                                         scope=scope)
  shapes = jax.eval_shape(lambda: params)
  assert methods.count_trainable(cfg, shapes)["trainable"] == methods.trainable_count(mask) \
      == info.selected + head


def test_new_ranking_fields_are_validated():
  for field, bad, match in (("selection_scope", "per_col", "selection_scope must be one of"),
                            ("l2_reduction", "sum", "l2_reduction must be 'sum_of_squares'")):
    with pytest.raises(ConfigError, match=match):
      methods.validate_peft(_cfg("shpeft", **{field: bad}))
  with pytest.raises(ConfigError, match="set peft.k_count=0"):
    methods.resolve(_cfg("shpeft", selection_scope="per_row", k_count=100))
  assert methods.importance_settings(_cfg("shpeft", l2_reduction="square_of_sum")) == dict(
      estimator="l2", mode="hybrid", lam=1.0, l2_reduction="square_of_sum")
  assert methods.resolve(_cfg("shpeft")).scope == "global"
  # SPT's sensitivity keeps its own reading whatever the knob says.
  assert methods.importance_settings(_cfg("spt_lora", l2_reduction="square_of_sum")) == dict(
      estimator="l2", mode="td", lam=0.0)
