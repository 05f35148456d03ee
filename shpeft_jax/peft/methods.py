"""Every `config.peft.method`: which parameters train, and which model hooks each method needs.

SH-PEFT and the baselines of Table 1 of the paper share one trainer. A method is one `Method`
entry of the registry `METHODS`, and `resolve(config.peft)` turns it into a `PeftMethod` value
once per run, which the trainer passes along:
  * the model it trains (`.additive`: LoRA / adapter / SSF / VPT hooks of the CLIP tower),
  * whether it scores weights first and with which estimator settings (`.importance`),
  * an element mask over the parameters (`build_mask`): True where the optimizer may move a
    weight. The trainer multiplies it into the final optax updates (`masking.masked_update`), so a
    frozen weight cannot move even under weight decay,
  * whether its additive leaves are folded into the plain weights at export (`.merges`).
Nothing outside this registry branches on a method's name.

Rule-based methods are ordered lists of `(rule name, regex, trainable)`; a parameter's '/'-joined
name is matched with `re.fullmatch` against the rules in order, the first match wins, and every
parameter must match one rule: a leaf that no rule expects (e.g. a LoRA leaf in a BitFit run, which
means the checkpoint and the config disagree) is an error rather than silently frozen. Which rule
matched each parameter is logged. Score-based methods (shpeft, random, spt_lora) use the same rules
to decide which leaves are *eligible*, then the selection module picks elements within them.

Readings of the baselines (see docs/BASELINES.md for the full discussion):
  * bitfit: every `bias` leaf of the encoder (attention q/k/v/out, MLP and LayerNorm biases), as in
    BitFit (Ben Zaken et al. 2022), which trains all additive bias terms including LayerNorm's beta.
  * ln (FT-LN, Basu et al. 2023): scale and bias of every LayerNorm (ln_pre, ln_1, ln_2, ln_post,
    and the fc_norm of average-pooled towers).
  * attn (FT-Attention, Touvron et al. ECCV'22 "Three things everyone should know about ViTs"):
    the multi-head self-attention weights of every block, q/k/v/out kernels and their biases;
    the MLPs, LayerNorms, embeddings and patch projection stay frozen.
  * spt_lora (He et al. ICCV'23): see `SptLora`.
The classifier head is always fully trainable (it is new), except that `peft.include_head=True`
lets SH-PEFT / random rank the head's elements with the encoder's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np

from shpeft_jax import param_names as pn
from shpeft_jax import utils
from shpeft_jax.errors import ConfigError
from shpeft_jax.models.clip_vit import LORA_TARGETS, AdditiveConfig
from shpeft_jax.peft.defaults import default_peft_config  # noqa: F401 (re-exported)

# Re-exported: the vocabulary lives in shpeft_jax.param_names.
ADDITIVE_RE, BACKBONE_RE, HEAD_RE = pn.ADDITIVE_RE, pn.BACKBONE_RE, pn.HEAD_RE

PeftConfig = Any  # config.peft: a ConfigDict or dict with every field of `default_peft_config`.


def validate_peft(peft_cfg: PeftConfig) -> "PeftMethod":
  """Raises ConfigError for a bad `config.peft`; returns the resolved method."""
  method = resolve(peft_cfg)
  k_count = int(peft_cfg["k_count"] or 0)
  if k_count < 0:
    raise ConfigError(f"peft.k_count must be >= 0 (0: use k_percent), got {k_count}.")
  k = peft_cfg["k_percent"]
  if not k_count and (isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 100):
    raise ConfigError(f"peft.k_percent must be in (0, 100] (percent of encoder weights), "
                      f"got {k!r}; e.g. --config.peft.k_percent=1.0 for the paper's 1%.")
  _ranking_settings(peft_cfg)
  if method.spec.reference:
    from shpeft_jax.peft import oracle  # pylint: disable=g-import-not-at-top
    oracle.check_set(peft_cfg, method.name)
  if not peft_cfg["lam"] >= 0:
    raise ConfigError(f"peft.lam must be >= 0, got {peft_cfg['lam']}.")
  return method


# ----------------------------------------------------------------------------------------------
# What a method is: rules over parameter names, model hooks, how its mask is chosen.


def _no_hooks(peft_cfg) -> AdditiveConfig:
  del peft_cfg
  return AdditiveConfig()


def _positive(value, field: str, method: str) -> int:
  value = int(value)
  if value <= 0:
    raise ConfigError(f"peft.{field} must be > 0 for method {method!r}, got {value}.")
  return value


def _lora_hooks(peft_cfg) -> AdditiveConfig:
  lora = peft_cfg["lora"]
  return AdditiveConfig(lora_rank=_positive(lora["rank"], "lora.rank", "lora"),
                        lora_alpha=float(lora["alpha"] or 0.0), lora_targets=tuple(lora["targets"]))


def _adapter_hooks(peft_cfg) -> AdditiveConfig:
  adapter = peft_cfg["adapter"]
  return AdditiveConfig(
      adapter_bottleneck=_positive(adapter["bottleneck"], "adapter.bottleneck", "adapter"),
      adapter_scale=float(adapter["scale"]))


def _ssf_hooks(peft_cfg) -> AdditiveConfig:
  return AdditiveConfig(ssf=True, ssf_init_std=float(peft_cfg["ssf"]["init_std"]))


def _vpt_hooks(deep: bool) -> Callable[[PeftConfig], AdditiveConfig]:
  name = "vpt_deep" if deep else "vpt_shallow"
  return lambda peft_cfg: AdditiveConfig(
      vpt_tokens=_positive(peft_cfg["vpt"]["tokens"], "vpt.tokens", name), vpt_deep=deep)


def _spt_hooks(peft_cfg) -> AdditiveConfig:
  spt = spt_settings(peft_cfg)
  return AdditiveConfig(lora_rank=_positive(spt["rank"], "spt.rank", "spt_lora"),
                        lora_alpha=spt["alpha"], lora_targets=LORA_TARGETS)


def _ranking_settings(peft_cfg) -> dict[str, Any]:
  """SH-PEFT's estimator knobs (the Table 4 / 5 ablations)."""
  estimator, mode = peft_cfg["estimator"], peft_cfg["mode"]
  if estimator not in ("l1", "l2"):
    raise ConfigError(f"peft.estimator must be 'l1' or 'l2', got {estimator!r}.")
  if mode not in ("hybrid", "td", "ta"):
    raise ConfigError(f"peft.mode must be 'hybrid', 'td' or 'ta', got {mode!r}.")
  l2_reduction = _get(peft_cfg, "l2_reduction", "sum_of_squares")
  if l2_reduction not in ("sum_of_squares", "square_of_sum"):
    raise ConfigError(f"peft.l2_reduction must be 'sum_of_squares' (sum_b g_b^2) or "
                      f"'square_of_sum' ((sum_b g_b)^2), got {l2_reduction!r}.")
  return dict(estimator=estimator, mode=mode, lam=float(peft_cfg["lam"]),
              l2_reduction=l2_reduction)


def _get(peft_cfg, field: str, default):
  """A peft field added after configs were written (dict configs of tests may lack it)."""
  try:
    return peft_cfg[field]
  except KeyError:
    return default


def _selection_scope(peft_cfg) -> str:
  """`peft.selection_scope`: where the top-k of shpeft / random is taken (selection.SCOPES)."""
  from shpeft_jax.peft import selection  # pylint: disable=g-import-not-at-top
  scope = _get(peft_cfg, "selection_scope", "global")
  if scope not in selection.SCOPES:
    raise ConfigError(f"peft.selection_scope must be one of {selection.SCOPES}, got {scope!r}.")
  if scope != "global" and int(peft_cfg["k_count"] or 0) > 0:
    raise ConfigError(f"peft.selection_scope={scope!r} takes k_percent of every tensor / row; "
                      "set peft.k_count=0 (k_count is a global count).")
  return scope


def _sensitivity_settings(peft_cfg) -> dict[str, Any]:
  """SPT's sensitivity: the task-dependent squared gradient only, whatever the knobs say."""
  del peft_cfg
  return dict(estimator="l2", mode="td", lam=0.0)


@dataclasses.dataclass(frozen=True)
class Method:
  """One `config.peft.method`: a registry entry (see `METHODS`).

  rules: (rule name, regex, trainable); a parameter's name is matched with `re.fullmatch` in
    order, the first match wins, and every parameter must match one rule.
  hooks: peft config -> the model's additive hooks (LoRA / adapter / SSF / VPT; none by default).
  selector: how the mask is chosen: `RULES` (per leaf, by the rules), `TopK` (global top-k of the
    importance scores, or of uniform random scores), `SptLora`.
  importance: peft config -> `importance.hybrid_importance` settings; None = no scoring pass.
  merges: its additive leaves fold into plain weights at export (merge.py).
  settings_of: whose `method_overrides` apply when the config has none for this method (the
    random control shares SH-PEFT's, so that the two differ in the selection only).
  reference: the method of the finished run its scores come from (`peft.oracle_run`; the oracle
    mask ranks that `full` run's |w_ft - w_0|, peft/oracle.py); the sweep runs it first and gives
    each seed its run of the same seed.
  """
  name: str
  kind: str              # Table 1's type: 'S' selective, 'A' additive, 'P' prompt, 'S+A'.
  label: str             # Row label of the results table.
  rules: tuple[tuple[str, str, bool], ...]
  hooks: Callable[[PeftConfig], AdditiveConfig] = _no_hooks
  selector: "Selector" = None  # type: ignore[assignment]  (RULES, set in __post_init__)
  importance: Callable[[PeftConfig], dict] | None = None
  merges: bool = False
  settings_of: str = ""
  reference: str = ""

  def __post_init__(self):
    if self.selector is None:
      object.__setattr__(self, "selector", RULES)

  @property
  def scored(self) -> bool:
    return self.importance is not None

  @property
  def element_mask(self) -> bool:
    return self.selector.element_mask


@dataclasses.dataclass(frozen=True)
class PeftMethod:
  """A method resolved once per run from `config.peft`: what trains, with which hooks, scored
  with which settings, merged or not. The trainer passes this value along."""
  spec: Method
  peft: PeftConfig
  additive: AdditiveConfig
  importance: dict | None  # hybrid_importance settings when the method scores, else None.
  # Where shpeft / random take their top-k: 'global' | 'per_tensor' | 'per_row' (selection.py).
  scope: str = "global"

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def scored(self) -> bool:
    return self.importance is not None

  @property
  def merges(self) -> bool:
    return self.spec.merges

  def budget(self, n_eligible: int) -> int:
    """Number of weights to train: k_count if > 0 else k_percent % of n_eligible (halves up)."""
    from shpeft_jax.peft import selection  # pylint: disable=g-import-not-at-top
    k_count = int(self.peft["k_count"] or 0)
    if k_count > 0:
      return selection.resolve_k(n_eligible, k_count=k_count)
    return selection.resolve_k(n_eligible, k_percent=float(self.peft["k_percent"]))


def resolve(peft_cfg: PeftConfig | PeftMethod) -> PeftMethod:
  """`config.peft` -> PeftMethod (raises ConfigError for an unknown method or bad hook sizes)."""
  if isinstance(peft_cfg, PeftMethod):
    return peft_cfg
  spec = get_method(peft_cfg["method"])
  return PeftMethod(spec, peft_cfg, spec.hooks(peft_cfg),
                    spec.importance(peft_cfg) if spec.scored else None,
                    _selection_scope(peft_cfg))


def spt_settings(peft_cfg) -> dict[str, Any]:
  """`config.peft.spt`: LoRA rank/alpha of SPT-LoRA, and the LoRA-vs-sparse threshold.

  threshold <= 0 means "automatic": a matrix gets LoRA when it has more sensitive weights than its
  LoRA would cost (rank * (d_in + d_out)); see `SptLora`.
  """
  spt = peft_cfg["spt"]
  return dict(rank=int(spt["rank"]), alpha=float(spt["alpha"] or 0.0),
              threshold=int(spt["threshold"] or 0))


def additive_config_for(peft_cfg) -> AdditiveConfig:
  """Model hooks of the method (pass to `build_model(..., additive=...)`)."""
  return resolve(peft_cfg).additive


def needs_scoring(peft_cfg) -> bool:
  """True when the trainer must run the importance pass before building the mask."""
  return resolve(peft_cfg).scored


def importance_settings(peft_cfg) -> dict[str, Any]:
  """Estimator knobs for `importance.hybrid_importance` of a scored method."""
  method = resolve(peft_cfg)
  if not method.scored:
    raise ConfigError(f"peft.method {method.name!r} does not score weights.")
  return method.importance


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
            if any(pn.is_additive(n) for n in unmatched) else
            "every parameter must live under 'encoder/' or 'head/'")
    raise ConfigError(f"peft.method {method.name!r}: no rule matches parameter(s) "
                      f"{unmatched[:5]}{' ...' if len(unmatched) > 5 else ''}; {hint}.")
  return out


def _log_rules(method: Method, matched: Mapping[str, tuple[str, bool]], shapes) -> None:
  for name, (rule, trainable) in matched.items():
    logging.debug("peft %s: %-60s %-18s rule=%s %s", method.name, name, tuple(shapes[name]), rule,
                  "trainable" if trainable else "frozen")


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def _full_like(shape, value: bool) -> np.ndarray:
  return np.full(shape, value, dtype=np.bool_)


def _select(score_flat: Mapping[str, np.ndarray | None], k_count: int | None,
            method: PeftMethod | None = None):
  """Exact top-k over the non-None scores (selection module): ({name: mask}, SelectionInfo).

  Global top-k_count; with `method` (k_count None), k_percent within the method's scope."""
  from shpeft_jax.peft import selection  # pylint: disable=g-import-not-at-top
  tree = utils.unflatten_names(score_flat)
  if method is None:
    mask, info = selection.select_top_k(tree, k_count=k_count)
  else:
    mask, info = selection.select_top_k(tree, k_percent=float(method.peft["k_percent"]),
                                        scope=method.scope)
  logging.debug("peft selection: %s", info)
  leaves = jax.tree_util.tree_structure(tree, is_leaf=lambda x: x is None).flatten_up_to(mask)
  return dict(zip(score_flat, leaves)), info


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


def _scores_by_name(scores, shapes, eligible) -> dict[str, np.ndarray | None]:
  if scores is None:
    raise ConfigError("This peft.method needs importance scores; run the scoring pass first "
                      "(methods.resolve(config.peft).scored is True).")
  score_flat = utils.flatten_names(scores)  # None leaves (unscored) are dropped here.
  out = {}
  for n, s in shapes.items():
    if not eligible[n]:
      out[n] = None
      continue
    if n not in score_flat:
      raise ConfigError(f"Importance scores lack parameter {n!r}; score the same model the mask "
                        "is built for (scored=methods.scoring_eligible(method, params)).")
    v = np.asarray(jax.device_get(score_flat[n]), np.float32)
    if v.shape != tuple(s):
      raise ConfigError(f"Score of {n!r} has shape {v.shape}, the parameter {tuple(s)}.")
    out[n] = v
  return out


Shapes = Mapping[str, tuple[int, ...]]
Matched = Mapping[str, tuple[str, bool]]


class Selector:
  """How a method's mask is chosen. This base: per leaf, by the method's rules (full, linear,
  bitfit, LoRA, ...). `mask` returns ({name: bool array}, SelectionInfo or None)."""
  element_mask = False

  def eligible(self, method: PeftMethod, name: str) -> bool:
    """Whether the method ranks this parameter's elements (scores or random)."""
    del method, name
    return False

  def mask(self, method: PeftMethod, shapes: Shapes, matched: Matched, scores, rng):
    del method, scores, rng
    return {n: _full_like(shapes[n], t) for n, (_, t) in matched.items()}, None

  def count(self, method: PeftMethod, shapes: Shapes, matched: Matched):
    """(trainable weights, exact?) from the shapes alone."""
    del method
    return sum(math.prod(s) for n, s in shapes.items() if matched[n][1]), True


RULES = Selector()


class TopK(Selector):
  """Global top-k of the element scores over the pretrained encoder (+ the head with
  `peft.include_head`); `random=True`: of independent uniform scores (the control)."""
  element_mask = True

  def __init__(self, random: bool = False):
    self.random = random

  def eligible(self, method, name):
    return pn.is_backbone(name) or (bool(method.peft["include_head"]) and
                                    bool(re.fullmatch(pn.HEAD_RE, name)))

  def mask(self, method, shapes, matched, scores, rng):
    eligible = {n: self.eligible(method, n) for n in shapes}
    if self.random:
      score_flat = _random_scores(shapes, eligible, _rng_seed(rng))
    else:
      score_flat = _scores_by_name(scores, shapes, eligible)
    if method.scope == "global":
      k = method.budget(sum(math.prod(shapes[n]) for n, e in eligible.items() if e))
      selected, info = _select(score_flat, k)
    else:
      selected, info = _select(score_flat, None, method)
    return {n: (np.asarray(selected[n], np.bool_) if eligible[n]
                else _full_like(shapes[n], matched[n][0] == "head")) for n in shapes}, info

  def count(self, method, shapes, matched):
    from shpeft_jax.peft import selection  # pylint: disable=g-import-not-at-top
    eligible = {n: self.eligible(method, n) for n in shapes}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    if method.scope == "global":
      k = method.budget(sum(sizes[n] for n, e in eligible.items() if e))
    else:
      k = selection.scoped_count({n: s for n, s in shapes.items() if eligible[n]},
                                 k_percent=float(method.peft["k_percent"]), scope=method.scope)
    return k + sum(s for n, s in sizes.items() if matched[n][0] == "head" and not eligible[n]), True


class SptLora(Selector):
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
  element_mask = True

  def eligible(self, method, name):
    return bool(pn.LINEAR_RE.fullmatch(name))

  def mask(self, method, shapes, matched, scores, rng):
    del matched, rng
    spt = spt_settings(method.peft)
    rank = spt["rank"]
    eligible = {n: self.eligible(method, n) for n in shapes}
    if not any(eligible.values()):
      raise ConfigError("spt_lora found no linear-layer kernels to select from.")
    n_encoder = sum(math.prod(s) for n, s in shapes.items() if pn.is_backbone(n))
    budget = min(method.budget(n_encoder), sum(math.prod(shapes[n]) for n in shapes
                                               if eligible[n]))
    mask_flat, info = _select(_scores_by_name(scores, shapes, eligible), budget)

    out = {n: _full_like(s, bool(re.fullmatch(pn.HEAD_RE, n))) for n, s in shapes.items()}
    lora_chosen = []
    for n in (n for n, e in eligible.items() if e):
      m = pn.LINEAR_RE.fullmatch(n)
      layer, module = m.group(1), m.group(2)
      d_in, d_out = _fan_in_out(module, shapes[n])
      cost = rank * (d_in + d_out)
      threshold = spt["threshold"] if spt["threshold"] > 0 else cost
      sel = np.asarray(mask_flat[n], np.bool_)
      if int(sel.sum()) <= threshold:
        out[n] = sel
        continue
      lora_prefix = f"encoder/resblocks_{layer}/{pn.LORA_MODULE[module]}"
      for leaf in ("a", "b"):
        name = f"{lora_prefix}/{leaf}"
        if name not in shapes:
          raise ConfigError(f"spt_lora chose LoRA for {n} but the model has no {name}; build it "
                            "with `additive_config_for(config.peft)`.")
        out[name] = _full_like(shapes[name], True)
      lora_chosen.append(n)
    logging.info("spt_lora: budget %d weights; LoRA (rank %d) on %d of %d matrices: %s", budget,
                 rank, len(lora_chosen), sum(eligible.values()), lora_chosen)
    return out, info

  def count(self, method, shapes, matched):
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    backbone = sum(s for n, s in sizes.items() if pn.is_backbone(n))
    head = sum(s for n, s in sizes.items() if matched[n][0] == "head")
    return method.budget(backbone) + head, False  # An upper bound: the split depends on the data.


def _fan_in_out(module: str, kernel_shape: tuple[int, ...]) -> tuple[int, int]:
  """(d_in, d_out) of a linear layer's kernel: q/k/v [D, h, hd]; out [h, hd, D]; dense [in, out]."""
  if module == "attn/out":
    return math.prod(kernel_shape[:-1]), kernel_shape[-1]
  return kernel_shape[0], math.prod(kernel_shape[1:])


# ----------------------------------------------------------------------------------------------
# The registry. A new rule-based method is one entry here; an additive one also needs its model
# hook (models/clip_vit.py) and a `hooks` function above.

_HEAD = ("head", pn.HEAD_RE, True)
_FROZEN_BACKBONE = ("frozen_backbone", pn.BACKBONE_RE, False)


def _rules(*trainable: tuple[str, str]) -> tuple[tuple[str, str, bool], ...]:
  return (_HEAD,) + tuple((n, r, True) for n, r in trainable) + (_FROZEN_BACKBONE,)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds a method to `METHODS` (a later entry of the same name replaces the earlier one)."""
  METHODS[method.name] = method
  return method


for _m in [
    Method("full", "S", "Full Finetune", (_HEAD, ("backbone", pn.BACKBONE_RE, True))),
    Method("linear", "S", "Linear Prob", _rules()),
    Method("bitfit", "S", "BitFit", _rules(("bias", r"encoder/.*/bias"))),
    Method("ln", "S", "FT-LN", _rules(
        ("layernorm", r"encoder/(?:.*/)?(?:ln_[^/]+|fc_norm)/(?:scale|bias)"))),
    Method("attn", "S", "FT-Att", _rules(
        ("attention", r"encoder/resblocks_\d+/attn/(?:query|key|value|out)/(?:kernel|bias)"))),
    Method("shpeft", "S", "SH-PEFT", (_HEAD, ("scored_backbone", pn.BACKBONE_RE, True)),
           selector=TopK(), importance=_ranking_settings),
    Method("random", "S", "Random mask", (_HEAD, ("random_backbone", pn.BACKBONE_RE, True)),
           selector=TopK(random=True), settings_of="shpeft"),
    # Issue 26's oracle: SH-PEFT's selection of the scores |w_ft - w_0| of a `full` run.
    Method("oracle", "S", "Oracle mask", (_HEAD, ("oracle_backbone", pn.BACKBONE_RE, True)),
           selector=TopK(), settings_of="shpeft", reference="full"),
    Method("lora", "A", "LoRA", _rules(("lora", r"encoder/.*/lora_[^/]+/(?:a|b)")),
           hooks=_lora_hooks, merges=True),
    Method("adapter", "A", "Adapter-par", _rules(("adapter", r"encoder/resblocks_\d+/adapter/.*")),
           hooks=_adapter_hooks),
    Method("ssf", "A", "SSF", _rules(("ssf", r"encoder/(?:.*/)?ssf_[^/]+/(?:scale|shift)")),
           hooks=_ssf_hooks, merges=True),
    Method("vpt_shallow", "P", "VPT-Shallow", _rules(("vpt", r"encoder/vpt_prompts_0")),
           hooks=_vpt_hooks(deep=False)),
    Method("vpt_deep", "P", "VPT-Deep", _rules(("vpt", r"encoder/vpt_prompts_\d+")),
           hooks=_vpt_hooks(deep=True)),
    # LoRA leaves are matched here only to say they are eligible; `SptLora` decides which train.
    Method("spt_lora", "S+A", "SPT-LoRA", (_HEAD, ("spt_lora", r"encoder/.*/lora_[^/]+/(?:a|b)", True),
                                         ("spt_backbone", pn.BACKBONE_RE, True)),
           hooks=_spt_hooks, selector=SptLora(), importance=_sensitivity_settings, merges=True),
]:
  register(_m)

# Display order of the results tables (Table 1, then the controls); methods not listed follow in
# registration order. It never decides what is valid.
TABLE1_ORDER = ("full", "linear", "adapter", "ssf", "lora", "vpt_deep", "vpt_shallow", "ln",
                "bitfit", "attn", "spt_lora", "shpeft", "random", "oracle")


def method_names() -> list[str]:
  """Every registered method, in display order."""
  return [n for n in TABLE1_ORDER if n in METHODS] + [n for n in METHODS if n not in TABLE1_ORDER]


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ConfigError(f"Unknown peft.method {name!r}; choose one of {method_names()}.")
  return METHODS[name]


# ----------------------------------------------------------------------------------------------
# Masks.


def scoring_eligible(method, params) -> dict:
  """Tree of Python bools: the parameters a method ranks (pass as `scored=` to importance).

  shpeft / random: every pretrained encoder weight (all operations, the paper's scope), plus the
  head when `peft.include_head`; spt_lora: the linear-layer kernels only (SPT's scope). Other
  methods: none. `method`: a PeftMethod or `config.peft`.
  """
  method = resolve(method)
  flat = utils.flatten_names(params)
  return utils.unflatten_names({n: method.spec.selector.eligible(method, n) for n in flat})


def build_mask(method, params, *, scores=None, rng=None, log: bool = True):
  """(boolean element mask like `params`, SelectionInfo or None for rule-based methods).

  params may be arrays or `jax.ShapeDtypeStruct`s (only shapes are read). `scores` (a tree with the
  params' names; None or missing leaves are unscored) is required for a scored method; `rng` (int
  seed or PRNG key; default 0) seeds the random-mask control. The head is always fully trainable
  unless `peft.include_head` lets shpeft / random / oracle rank it with the encoder. A method with
  a `reference` (the oracle) scores |w_ft - w_0| of `peft.oracle_run` against `params` (then the
  initial weights, as arrays) when no scores are given.
  """
  method = resolve(method)
  if scores is None and method.spec.reference:
    from shpeft_jax.peft import oracle  # pylint: disable=g-import-not-at-top
    scores = oracle.reference_scores(method.peft, params)
  flat = utils.flatten_names(params)
  shapes = {n: _shape(v) for n, v in flat.items()}
  matched = match_rules(method.spec, shapes)
  if log:
    _log_rules(method.spec, matched, shapes)
  out, info = method.spec.selector.mask(method, shapes, matched, scores, rng)
  # flatten_names keeps tree order, so the mask leaves line up with params' tree structure.
  mask = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params),
                                      [out[n] for n in flat])
  return mask, info


def trainable_mask(method, params, *, scores=None, rng=None, log: bool = True):
  """Boolean element mask, same tree structure and shapes as `params` (True = trainable)."""
  return build_mask(method, params, scores=scores, rng=rng, log=log)[0]


def trainable_count(mask_tree) -> int:
  """Number of True entries (trainable weights) of a mask tree."""
  return int(sum(int(np.count_nonzero(np.asarray(m))) for m in jax.tree_util.tree_leaves(mask_tree)))


# ----------------------------------------------------------------------------------------------
# Trainable-parameter table.


def param_shapes(model_name: str, num_classes: int, additive: AdditiveConfig | None = None,
                 image_size: int | None = None, tower: Mapping[str, Any] | None = None) -> dict:
  """Parameter ShapeDtypeStructs of a model via `jax.eval_shape` (no memory, fast for ViT-B/16).

  tower: the checkpoint's tower fields (`clip_vit.TOWER_FIELDS`, e.g. BiomedCLIP's timm trunk has
  a patch-embedding bias and no ln_pre); default: OpenAI's layout.
  """
  from shpeft_jax.models import clip_vit  # pylint: disable=g-import-not-at-top
  model = clip_vit.build_model(model_name, num_classes, image_size=image_size, additive=additive,
                               tower=tower)
  return jax.eval_shape(lambda: clip_vit.init_params(model, jax.random.PRNGKey(0)))


def count_trainable(method, shapes) -> dict[str, Any]:
  """Trainable-weight count of a method from parameter shapes alone (no scores needed).

  Rule-based methods count exactly. shpeft / random train exactly k + head weights (selection is
  exact). spt_lora trains at most its budget + head (the split between LoRA and sparse weights
  depends on the data), reported as an upper bound.
  """
  method = resolve(method)
  flat = utils.flatten_names(shapes)
  sizes = {n: math.prod(_shape(v)) for n, v in flat.items()}
  matched = match_rules(method.spec, sizes)
  head = sum(s for n, s in sizes.items() if matched[n][0] == "head")
  backbone = sum(s for n, s in sizes.items() if pn.is_backbone(n))
  trainable, exact = method.spec.selector.count(
      method, {n: _shape(v) for n, v in flat.items()}, matched)
  additive = sum(s for n, s in sizes.items() if pn.is_additive(n))
  spec = method.spec
  return dict(method=spec.name, label=spec.label, kind=spec.kind, trainable=int(trainable),
              exact=exact, backbone_and_head=int(backbone + head), added_params=int(additive),
              inference_extra=0 if spec.merges else int(additive),
              percent=100.0 * trainable / (backbone + head))


def trainable_table(model_name: str = "ViT-B/16", num_classes: int = 4, methods=None,
                    peft_cfg=None, image_size: int | None = None,
                    tower: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
  """One row per method: trainable weights and % of the pretrained model + head (Fig. 4's x-axis).

  `peft_cfg` supplies the knobs (LoRA rank, adapter bottleneck, k, ...); its `method` is replaced
  by each method in turn. Shapes come from `jax.eval_shape`, so ViT-B/16 costs no memory.
  """
  base = default_peft_config() if peft_cfg is None else peft_cfg
  rows = []
  for name in methods or method_names():
    cfg = _with_method(base, name)
    shapes = param_shapes(model_name, num_classes, additive_config_for(cfg), image_size, tower)
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
  # `python -m shpeft_jax.peft.methods [MODEL] [NUM_CLASSES] [CHECKPOINT]`: the table of
  # docs/BASELINES.md; with a converted checkpoint, for its tower (e.g. BiomedCLIP's timm trunk).
  import sys  # pylint: disable=g-import-not-at-top
  _model = sys.argv[1] if len(sys.argv) > 1 else "ViT-B/16"
  _classes = int(sys.argv[2]) if len(sys.argv) > 2 else 4
  _tower = None
  if len(sys.argv) > 3:
    from shpeft_jax import checkpoints as _ckpt  # pylint: disable=g-import-not-at-top
    from shpeft_jax.models import clip_vit as _vit  # pylint: disable=g-import-not-at-top
    _tower = _vit.tower_from_meta(_ckpt.load_meta(sys.argv[3]))
  print(table_markdown(trainable_table(_model, _classes, tower=_tower), _model, _classes))
