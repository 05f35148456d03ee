"""Every `config.peft.method`: which parameters train, and which model hooks each method needs.

SH-PEFT and the baselines of Table 1 of the paper share one trainer. A method is two things:
  * the model it trains (`additive_config_for`: LoRA / adapter / SSF / VPT hooks of the CLIP tower),
  * an element mask over the parameters (`trainable_mask`): True where the optimizer may move a
    weight. The trainer multiplies it into the final optax updates (`masking.masked_update`), so a
    frozen weight cannot move even under weight decay.

Rule-based methods are ordered lists of `(rule name, regex, trainable)`; a parameter's '/'-joined
name is matched with `re.fullmatch` against the rules in order, the first match wins, and every
parameter must match one rule: a leaf that no rule expects (e.g. a LoRA leaf in a BitFit run, which
means the checkpoint and the config disagree) is an error rather than silently frozen. Which rule
matched each parameter is logged. Score-based methods (shpeft, random, spt_lora) use the same rules
to decide which leaves are *eligible*, then the selection module picks elements within them.

Readings of the baselines (see docs/BASELINES.md for the full discussion):
  * bitfit: every `bias` leaf of the encoder (attention q/k/v/out, MLP and LayerNorm biases), as in
    BitFit (Ben Zaken et al. 2022), which trains all additive bias terms including LayerNorm's beta.
  * ln (FT-LN, Basu et al. 2023): scale and bias of every LayerNorm (ln_pre, ln_1, ln_2, ln_post).
  * attn (FT-Attention, Touvron et al. ECCV'22 "Three things everyone should know about ViTs"):
    the multi-head self-attention weights of every block, q/k/v/out kernels and their biases;
    the MLPs, LayerNorms, embeddings and patch projection stay frozen.
  * spt_lora (He et al. ICCV'23): see `_spt_mask`.
The classifier head is always fully trainable (it is new), except that `peft.include_head=True`
lets SH-PEFT / random rank the head's elements with the encoder's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from shpeft_jax import utils
from shpeft_jax.errors import ConfigError
from shpeft_jax.models.clip_vit import LORA_TARGETS, AdditiveConfig

# A leaf created by an additive hook: LoRA factors, adapter, SSF scale/shift, VPT prompts.
ADDITIVE_RE = r"(?:.*/)?(?:lora_[^/]+|adapter|ssf_[^/]+|vpt_prompts_\d+)(?:/.*)?"
# Pretrained encoder weights (no additive leaf).
BACKBONE_RE = r"encoder/(?!(?:.*/)?(?:lora_|adapter/|ssf_|vpt_prompts_)).*"
HEAD_RE = r"head/.*"
# Linear layers of the transformer blocks (SPT's selection scope) and their LoRA module names.
_LINEAR_RE = re.compile(r"encoder/resblocks_(\d+)/(attn/(?:query|key|value|out)|mlp/(?:c_fc|c_proj))/kernel")
_LORA_NAME = {"attn/query": "attn/lora_query", "attn/key": "attn/lora_key",
              "attn/value": "attn/lora_value", "attn/out": "attn/lora_out",
              "mlp/c_fc": "mlp/lora_c_fc", "mlp/c_proj": "mlp/lora_c_proj"}


@dataclasses.dataclass(frozen=True)
class Method:
  """One `config.peft.method`."""
  name: str
  kind: str              # Table 1's type: 'S' selective, 'A' additive, 'P' prompt, 'S+A'.
  label: str             # Row label of the results table.
  rules: tuple[tuple[str, str, bool], ...]  # (rule name, regex, trainable); first fullmatch wins.
  scored: bool = False   # Needs importance scores (a scoring pass) before training.
  element_mask: bool = False  # Mask chosen per element (by scores or at random), not per leaf.


_HEAD = ("head", HEAD_RE, True)
_FROZEN_BACKBONE = ("frozen_backbone", BACKBONE_RE, False)


def _rules(*trainable: tuple[str, str]) -> tuple[tuple[str, str, bool], ...]:
  return (_HEAD,) + tuple((n, r, True) for n, r in trainable) + (_FROZEN_BACKBONE,)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("full", "S", "Full Finetune", ((_HEAD), ("backbone", BACKBONE_RE, True))),
    Method("linear", "S", "Linear Prob", _rules()),
    Method("bitfit", "S", "BitFit", _rules(("bias", r"encoder/.*/bias"))),
    Method("ln", "S", "FT-LN", _rules(("layernorm", r"encoder/(?:.*/)?ln_[^/]+/(?:scale|bias)"))),
    Method("attn", "S", "FT-Att", _rules(
        ("attention", r"encoder/resblocks_\d+/attn/(?:query|key|value|out)/(?:kernel|bias)"))),
    Method("shpeft", "S", "SH-PEFT", ((_HEAD), ("scored_backbone", BACKBONE_RE, True)),
           scored=True, element_mask=True),
    Method("random", "S", "Random mask", ((_HEAD), ("random_backbone", BACKBONE_RE, True)),
           element_mask=True),
    Method("lora", "A", "LoRA", _rules(("lora", r"encoder/.*/lora_[^/]+/(?:a|b)"))),
    Method("adapter", "A", "Adapter-par", _rules(("adapter", r"encoder/resblocks_\d+/adapter/.*"))),
    Method("ssf", "A", "SSF", _rules(("ssf", r"encoder/(?:.*/)?ssf_[^/]+/(?:scale|shift)"))),
    Method("vpt_shallow", "P", "VPT-Shallow", _rules(("vpt", r"encoder/vpt_prompts_0"))),
    Method("vpt_deep", "P", "VPT-Deep", _rules(("vpt", r"encoder/vpt_prompts_\d+"))),
    # LoRA leaves are matched here only to say they are eligible; `_spt_mask` decides which train.
    Method("spt_lora", "S+A", "SPT-LoRA", ((_HEAD), ("spt_lora", r"encoder/.*/lora_[^/]+/(?:a|b)", True),
                                         ("spt_backbone", BACKBONE_RE, True)),
           scored=True, element_mask=True),
]}

# Row order of Table 1 (then the controls).
TABLE1_ORDER = ("full", "linear", "adapter", "ssf", "lora", "vpt_deep", "vpt_shallow", "ln",
                "bitfit", "attn", "spt_lora", "shpeft", "random")


def method_names() -> list[str]:
  return list(TABLE1_ORDER)


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ConfigError(f"Unknown config.peft.method {name!r}; choose one of {method_names()}.")
  return METHODS[name]


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  """Field of a ConfigDict / dict / None with a default (older configs lack newer knobs)."""
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    return cfg.get(key, default)
  try:
    return cfg.get(key, default)
  except AttributeError:
    return getattr(cfg, key, default)


def spt_settings(peft_cfg) -> dict[str, Any]:
  """`config.peft.spt` with defaults: LoRA rank/alpha of SPT-LoRA, and the LoRA-vs-sparse threshold.

  threshold <= 0 means "automatic": a matrix gets LoRA when it has more sensitive weights than its
  LoRA would cost (rank * (d_in + d_out)); see `_spt_mask`.
  """
  spt = _get(peft_cfg, "spt", None) or {}
  return dict(rank=int(_get(spt, "rank", 8)), alpha=float(_get(spt, "alpha", 0.0) or 0.0),
              threshold=int(_get(spt, "threshold", 0) or 0))


def additive_config_for(peft_cfg) -> AdditiveConfig:
  """Model hooks for `peft_cfg.method` (pass to `build_model(..., additive=...)`)."""
  method = get_method(_get(peft_cfg, "method"))
  if method.name == "lora":
    lora = _get(peft_cfg, "lora", {}) or {}
    rank = int(_get(lora, "rank", 8))
    if rank <= 0:
      raise ConfigError(f"peft.lora.rank must be > 0 for method 'lora', got {rank}.")
    return AdditiveConfig(lora_rank=rank, lora_alpha=float(_get(lora, "alpha", 0.0) or 0.0),
                          lora_targets=tuple(_get(lora, "targets", ("q", "v"))))
  if method.name == "adapter":
    adapter = _get(peft_cfg, "adapter", {}) or {}
    bottleneck = int(_get(adapter, "bottleneck", 64))
    if bottleneck <= 0:
      raise ConfigError(f"peft.adapter.bottleneck must be > 0, got {bottleneck}.")
    return AdditiveConfig(adapter_bottleneck=bottleneck,
                          adapter_scale=float(_get(adapter, "scale", 0.1)))
  if method.name == "ssf":
    ssf = _get(peft_cfg, "ssf", {}) or {}
    return AdditiveConfig(ssf=True, ssf_init_std=float(_get(ssf, "init_std", 0.0)))
  if method.name in ("vpt_shallow", "vpt_deep"):
    tokens = int(_get(_get(peft_cfg, "vpt", {}) or {}, "tokens", 10))
    if tokens <= 0:
      raise ConfigError(f"peft.vpt.tokens must be > 0 for method {method.name!r}, got {tokens}.")
    return AdditiveConfig(vpt_tokens=tokens, vpt_deep=method.name == "vpt_deep")
  if method.name == "spt_lora":
    spt = spt_settings(peft_cfg)
    if spt["rank"] <= 0:
      raise ConfigError(f"peft.spt.rank must be > 0, got {spt['rank']}.")
    return AdditiveConfig(lora_rank=spt["rank"], lora_alpha=spt["alpha"], lora_targets=LORA_TARGETS)
  return AdditiveConfig()


def needs_scoring(peft_cfg) -> bool:
  """True when the trainer must run the importance pass before building the mask."""
  return get_method(_get(peft_cfg, "method")).scored


def importance_settings(peft_cfg) -> dict[str, Any]:
  """Estimator knobs for `importance.hybrid_importance` for a scored method.

  SH-PEFT uses the config's `estimator` / `mode` / `lam` (the Table 4 / 5 ablations). SPT's
  sensitivity is the task-dependent squared gradient only, whatever those knobs say.
  """
  method = get_method(_get(peft_cfg, "method"))
  if method.name == "spt_lora":
    return dict(estimator="l2", mode="td", lam=0.0)
  estimator = _get(peft_cfg, "estimator", "l2")
  mode = _get(peft_cfg, "mode", "hybrid")
  if estimator not in ("l1", "l2"):
    raise ConfigError(f"peft.estimator must be 'l1' or 'l2', got {estimator!r}.")
  if mode not in ("hybrid", "td", "ta"):
    raise ConfigError(f"peft.mode must be 'hybrid', 'td' or 'ta', got {mode!r}.")
  return dict(estimator=estimator, mode=mode, lam=float(_get(peft_cfg, "lam", 1.0)))


# ----------------------------------------------------------------------------------------------
# Rule matching.


def match_rules(method: Method | str, names) -> dict[str, tuple[str, bool]]:
  """{param name: (rule name, trainable)}; raises ConfigError for a name no rule matches."""
  if isinstance(method, str):
    method = get_method(method)
  compiled = [(n, re.compile(r), t) for n, r, t in method.rules]
  out, unmatched = {}, []
  for name in names:
    for rule, regex, trainable in compiled:
      if regex.fullmatch(name):
        out[name] = (rule, trainable)
        break
    else:
      unmatched.append(name)
  if unmatched:
    hint = ("it is a LoRA/adapter/SSF/VPT leaf the method does not use: build the model with "
            "`additive_config_for(config.peft)` for the same method"
            if any(re.fullmatch(ADDITIVE_RE, n) for n in unmatched) else
            "every parameter must live under 'encoder/' or 'head/'")
    raise ConfigError(f"peft.method {method.name!r}: no rule matches parameter(s) "
                      f"{unmatched[:5]}{' ...' if len(unmatched) > 5 else ''}; {hint}.")
  return out


def _log_rules(method: Method, matched: Mapping[str, tuple[str, bool]], shapes) -> None:
  for name, (rule, trainable) in matched.items():
    logging.info("peft %s: %-60s %-18s rule=%s %s", method.name, name, tuple(shapes[name]), rule,
                 "trainable" if trainable else "frozen")


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def _full_like(shape, value: bool) -> np.ndarray:
  return np.full(shape, value, dtype=np.bool_)


def _budget(peft_cfg, n_eligible: int) -> int:
  """Number of weights to train: k_count if > 0 else k_percent % of n_eligible (halves up)."""
  from shpeft_jax.peft import selection  # pylint: disable=g-import-not-at-top
  k_count = int(_get(peft_cfg, "k_count", 0) or 0)
  if k_count > 0:
    return selection.resolve_k(n_eligible, k_count=k_count)
  return selection.resolve_k(n_eligible, k_percent=float(_get(peft_cfg, "k_percent", 1.0)))


def _select(score_flat: Mapping[str, np.ndarray | None], k_count: int) -> dict[str, np.ndarray]:
  """Exact global top-k over the non-None scores (selection module); {name: bool mask or None}."""
  from shpeft_jax.peft import selection  # pylint: disable=g-import-not-at-top
  tree = utils.unflatten_names(score_flat)
  mask, info = selection.select_top_k(tree, k_count=k_count)
  logging.info("peft selection: %s", info)
  leaves = jax.tree_util.tree_structure(tree, is_leaf=lambda x: x is None).flatten_up_to(mask)
  return dict(zip(score_flat, leaves))


def _rng_seed(rng) -> int:
  if rng is None:
    return 0
  if isinstance(rng, (int, np.integer)):
    return int(rng)
  key = rng
  if hasattr(jax.dtypes, "prng_key") and jax.dtypes.issubdtype(getattr(key, "dtype", None),
                                                                 jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return int(np.asarray(key, dtype=np.uint32).ravel()[-1])


def _random_scores(shapes: Mapping[str, tuple[int, ...]], eligible: Mapping[str, bool], seed: int):
  """Independent uniform scores per eligible element.

  float64, so that ties (which selection breaks by position) are negligible even over 86M weights;
  float32 uniforms take only 2^24 values and would favour early tensors among ties.
  """
  gen = np.random.default_rng(seed)
  return {n: (gen.random(s) if eligible[n] else None) for n, s in shapes.items()}


def scoring_eligible(peft_cfg, params) -> dict:
  """Tree of Python bools: the parameters a scored method ranks (pass as `scored=` to importance).

  shpeft: every pretrained encoder weight (all operations, the paper's scope), plus the head when
  `peft.include_head`; spt_lora: the linear-layer kernels only (SPT's scope). Other methods: none.
  """
  method = get_method(_get(peft_cfg, "method"))
  flat = utils.flatten_names(params)
  if method.name == "spt_lora":
    flags = {n: bool(_LINEAR_RE.fullmatch(n)) for n in flat}
  elif method.element_mask:
    include_head = bool(_get(peft_cfg, "include_head", False))
    flags = {n: bool(re.fullmatch(BACKBONE_RE, n)) or (include_head and bool(re.fullmatch(HEAD_RE, n)))
             for n in flat}
  else:
    flags = {n: False for n in flat}
  return utils.unflatten_names(flags)


def trainable_mask(peft_cfg, params, *, scores=None, rng=None, log: bool = True):
  """Boolean element mask, same tree structure and shapes as `params` (True = trainable).

  params may be arrays or `jax.ShapeDtypeStruct`s (only shapes are read). `scores` (a tree with the
  params' names; None or missing leaves are unscored) is required for shpeft / spt_lora; `rng` (int
  seed or PRNG key; default 0) seeds the random-mask control. The head is always fully trainable
  unless `peft.include_head` lets shpeft / random rank it with the encoder.
  """
  method = get_method(_get(peft_cfg, "method"))
  flat = utils.flatten_names(params)
  shapes = {n: _shape(v) for n, v in flat.items()}
  matched = match_rules(method, shapes)
  if log:
    _log_rules(method, matched, shapes)

  if method.name == "spt_lora":
    out = _spt_mask(peft_cfg, shapes, scores)
  elif method.element_mask:
    eligible = utils.flatten_names(scoring_eligible(peft_cfg, params))
    n_eligible = sum(math.prod(shapes[n]) for n, e in eligible.items() if e)
    k = _budget(peft_cfg, n_eligible)
    if method.name == "random":
      score_flat = _random_scores(shapes, eligible, _rng_seed(rng))
    else:
      if scores is None:
        raise ConfigError(f"peft.method {method.name!r} needs importance scores; run the scoring "
                          "pass first (methods.needs_scoring(config.peft) is True).")
      score_flat = _scores_by_name(scores, shapes, eligible)
    selected = _select(score_flat, k)
    out = {n: (np.asarray(selected[n], np.bool_) if eligible[n]
               else _full_like(shapes[n], matched[n][0] == "head")) for n in shapes}
  else:
    out = {n: _full_like(shapes[n], t) for n, (_, t) in matched.items()}
  # flatten_names keeps tree order, so the mask leaves line up with params' tree structure.
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), [out[n] for n in flat])


def _scores_by_name(scores, shapes, eligible) -> dict[str, np.ndarray | None]:
  score_flat = utils.flatten_names(scores)  # None leaves (unscored) are dropped here.
  out = {}
  for n, s in shapes.items():
    if not eligible[n]:
      out[n] = None
      continue
    if n not in score_flat:
      raise ConfigError(f"Importance scores lack parameter {n!r}; score the same model the mask "
                        "is built for (scored=methods.scoring_eligible(config.peft, params)).")
    v = np.asarray(jax.device_get(score_flat[n]), np.float32)
    if v.shape != tuple(s):
      raise ConfigError(f"Score of {n!r} has shape {v.shape}, the parameter {tuple(s)}.")
    out[n] = v
  return out


def _spt_mask(peft_cfg, shapes: Mapping[str, tuple[int, ...]], scores) -> dict[str, np.ndarray]:
  """SPT-LoRA (He et al., ICCV'23, "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning").

  Our reading of SPT's Algorithm 1, under one budget of trainable weights:
    1. sensitivity = task-dependent squared gradient (importance 'td', 'l2'), over the weights of
       the linear layers only (q/k/v/out, c_fc, c_proj kernels; SPT's scope);
    2. the budget B is the SH-PEFT count: k_count, or k_percent % of the encoder's weights; take
       the global top-B sensitive weights;
    3. per matrix W, if its count of top-B weights exceeds the threshold sigma (default: the
       matrix's LoRA cost rank * (d_in + d_out), i.e. LoRA is used where it is cheaper than the
       sparse weights it replaces), W gets structured tuning: its LoRA factors train and W stays
       frozen; otherwise W's selected weights train, unstructured (element mask).
  Every matrix carries LoRA factors (the model is built with all six LoRA targets); the factors of
  matrices not chosen stay frozen and, with `b` zero-initialised, contribute nothing. Biases,
  LayerNorms and embeddings are frozen (SPT tunes linear layers only); the head trains.
  The total is <= B because each LoRA costs no more than the weights it replaces.
  """
  if scores is None:
    raise ConfigError("peft.method 'spt_lora' needs sensitivity scores; run the scoring pass "
                      "first (methods.needs_scoring(config.peft) is True).")
  spt = spt_settings(peft_cfg)
  rank = spt["rank"]
  eligible = {n: bool(_LINEAR_RE.fullmatch(n)) for n in shapes}
  if not any(eligible.values()):
    raise ConfigError("spt_lora found no linear-layer kernels to select from.")
  n_encoder = sum(math.prod(s) for n, s in shapes.items() if re.fullmatch(BACKBONE_RE, n))
  budget = min(_budget(peft_cfg, n_encoder), sum(math.prod(shapes[n]) for n in shapes
                                                 if eligible[n]))
  mask_flat = _select(_scores_by_name(scores, shapes, eligible), budget)

  out = {n: _full_like(s, False) for n, s in shapes.items()}
  for n in shapes:
    if re.fullmatch(HEAD_RE, n):
      out[n] = _full_like(shapes[n], True)
  lora_chosen = []
  for n, is_linear in eligible.items():
    if not is_linear:
      continue
    m = _LINEAR_RE.fullmatch(n)
    layer, module = m.group(1), m.group(2)
    kernel_shape = shapes[n]
    d_in, d_out = _fan_in_out(module, kernel_shape)
    cost = rank * (d_in + d_out)
    threshold = spt["threshold"] if spt["threshold"] > 0 else cost
    sel = np.asarray(mask_flat[n], np.bool_)
    n_sensitive = int(sel.sum())
    lora_prefix = f"encoder/resblocks_{layer}/{_LORA_NAME[module]}"
    if n_sensitive > threshold:
      for leaf in ("a", "b"):
        name = f"{lora_prefix}/{leaf}"
        if name not in shapes:
          raise ConfigError(f"spt_lora chose LoRA for {n} but the model has no {name}; build it "
                            "with `additive_config_for(config.peft)`.")
        out[name] = _full_like(shapes[name], True)
      lora_chosen.append(n)
    else:
      out[n] = sel
  logging.info("spt_lora: budget %d weights; LoRA (rank %d) on %d of %d matrices: %s", budget,
               rank, len(lora_chosen), sum(eligible.values()), lora_chosen)
  return out


def _fan_in_out(module: str, kernel_shape: tuple[int, ...]) -> tuple[int, int]:
  """(d_in, d_out) of a linear layer's kernel: q/k/v [D, h, hd]; out [h, hd, D]; dense [in, out]."""
  if module == "attn/out":
    return math.prod(kernel_shape[:-1]), kernel_shape[-1]
  return kernel_shape[0], math.prod(kernel_shape[1:])


def trainable_count(mask_tree) -> int:
  """Number of True entries (trainable weights) of a mask tree."""
  return int(sum(int(np.count_nonzero(np.asarray(m))) for m in jax.tree_util.tree_leaves(mask_tree)))


# ----------------------------------------------------------------------------------------------
# Trainable-parameter table.


def default_peft_config():
  """The schema's `config.peft` defaults (configs/common.py owns the real one)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      method="shpeft", k_percent=1.0, k_count=0, estimator="l2", mode="hybrid", lam=1.0,
      include_head=False, lora=dict(rank=8, alpha=8.0, targets=("q", "v")),
      adapter=dict(bottleneck=64, scale=0.1), ssf=dict(init_std=0.0), vpt=dict(tokens=10),
      spt=dict(rank=8, alpha=0.0, threshold=0)))


def param_shapes(model_name: str, num_classes: int, additive: AdditiveConfig | None = None,
                 image_size: int | None = None) -> dict:
  """Parameter ShapeDtypeStructs of a model via `jax.eval_shape` (no memory, fast for ViT-B/16)."""
  from shpeft_jax.models import clip_vit  # pylint: disable=g-import-not-at-top
  model = clip_vit.build_model(model_name, num_classes, image_size=image_size, additive=additive)
  return jax.eval_shape(lambda: clip_vit.init_params(model, jax.random.PRNGKey(0)))


def count_trainable(peft_cfg, shapes) -> dict[str, Any]:
  """Trainable-weight count of a method from parameter shapes alone (no scores needed).

  Rule-based methods count exactly. shpeft / random train exactly k + head weights (selection is
  exact). spt_lora trains at most its budget + head (the split between LoRA and sparse weights
  depends on the data), reported as an upper bound.
  """
  method = get_method(_get(peft_cfg, "method"))
  flat = utils.flatten_names(shapes)
  sizes = {n: math.prod(_shape(v)) for n, v in flat.items()}
  matched = match_rules(method, sizes)
  head = sum(s for n, s in sizes.items() if matched[n][0] == "head")
  backbone = sum(s for n, s in sizes.items() if re.fullmatch(BACKBONE_RE, n))
  exact = True
  if method.name == "spt_lora":
    trainable, exact = _budget(peft_cfg, backbone) + head, False
  elif method.element_mask:
    eligible = utils.flatten_names(scoring_eligible(peft_cfg, shapes))
    n_eligible = sum(sizes[n] for n, e in eligible.items() if e)
    trainable = _budget(peft_cfg, n_eligible) + sum(
        s for n, s in sizes.items() if matched[n][0] == "head" and not eligible[n])
  else:
    trainable = sum(s for n, s in sizes.items() if matched[n][1])
  additive = sum(s for n, s in sizes.items() if re.fullmatch(ADDITIVE_RE, n))
  mergeable = method.name in ("lora", "ssf", "spt_lora")
  return dict(method=method.name, label=method.label, kind=method.kind, trainable=int(trainable),
              exact=exact, backbone_and_head=int(backbone + head), added_params=int(additive),
              inference_extra=0 if mergeable else int(additive),
              percent=100.0 * trainable / (backbone + head))


def trainable_table(model_name: str = "ViT-B/16", num_classes: int = 4, methods=None,
                    peft_cfg=None, image_size: int | None = None) -> list[dict[str, Any]]:
  """One row per method: trainable weights and % of the pretrained model + head (Fig. 4's x-axis).

  `peft_cfg` supplies the knobs (LoRA rank, adapter bottleneck, k, ...); its `method` is replaced
  by each method in turn. Shapes come from `jax.eval_shape`, so ViT-B/16 costs no memory.
  """
  base = default_peft_config() if peft_cfg is None else peft_cfg
  rows = []
  for name in methods or method_names():
    cfg = _with_method(base, name)
    shapes = param_shapes(model_name, num_classes, additive_config_for(cfg), image_size)
    rows.append(count_trainable(cfg, shapes))
  return rows


def _with_method(peft_cfg, name: str):
  import ml_collections  # pylint: disable=g-import-not-at-top
  if isinstance(peft_cfg, ml_collections.ConfigDict):
    cfg = ml_collections.ConfigDict(peft_cfg.to_dict())
  else:
    cfg = ml_collections.ConfigDict(dict(peft_cfg))
  cfg.method = name
  return cfg


def table_markdown(rows, model_name: str = "ViT-B/16", num_classes: int = 4) -> str:
  """Markdown of `trainable_table` rows."""
  lines = [f"| method | type | trainable ({model_name}, {num_classes}-class head) | % of "
           "pretrained + head | extra params at inference |", "|---|---|---:|---:|---:|"]
  for r in rows:
    count = f"{r['trainable']:,}" if r["exact"] else f"<= {r['trainable']:,}"
    lines.append(f"| {r['label']} (`{r['method']}`) | {r['kind']} | {count} | "
                 f"{r['percent']:.4f} | {r['inference_extra']:,} |")
  return "\n".join(lines)


if __name__ == "__main__":
  # `python -m shpeft_jax.peft.methods [MODEL] [NUM_CLASSES]`: the table of docs/BASELINES.md.
  import sys  # pylint: disable=g-import-not-at-top
  _model = sys.argv[1] if len(sys.argv) > 1 else "ViT-B/16"
  _classes = int(sys.argv[2]) if len(sys.argv) > 2 else 4
  print(table_markdown(trainable_table(_model, _classes), _model, _classes))
