"""CLIP ViT vision tower in Flax, and the paper's classifier (L2 norm + linear head).

Module names follow the OpenAI PyTorch checkpoint (`conv1`, `ln_pre`, `resblocks_N/attn`,
`mlp/c_fc`, `mlp/c_proj`, `ln_post`) so that conversion in both directions is a set of small,
mechanical rules (see `shpeft_jax/models/convert.py`). The CLIP `proj` is not part of the model:
SH-PEFT replaces it by L2 normalisation followed by a linear classifier (Sec. 3.1).

The CLIP towers users bring differ in four switches beyond their shape (`ViTConfig.act` ... `patch_bias`,
recorded in every params checkpoint's meta.json): the activation (OpenAI's QuickGELU, or the exact
erf GELU of open_clip's LAION / DataComp towers and of timm), the LayerNorm epsilon (1e-5 in CLIP,
1e-6 in timm), and for timm trunks such as BiomedCLIP's a patch projection with bias and no
`ln_pre`. timm's final `norm` acts on every token and CLIP's `ln_post` on the class token only;
the pooled feature is the same, so both are `ln_post` here.

The self-supervised towers (DINOv2, MAE, iBOT; UNI, RAD-DINO, Phikon) add more fields, each a
value read from the checkpoint, never an `if` elsewhere: LayerScale gammas (`ls_1`, `ls_2`),
register tokens, a class token with or without a position, the pooled feature (class token,
mean of the patch tokens, or both), the final norm and timm's `fc_norm`, q/k/v biases, and
DINOv2 giant's SwiGLU MLP (`act='swiglu'`).

Additive PEFT methods hook into the tower here (LoRA, AdaptFormer's parallel adapter, SSF, VPT);
they are off by default and their parameters live under names that start with `lora_`,
`adapter`, `ssf_` or `vpt_` so that trainable-parameter rules can select them by regex.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from shpeft_jax.errors import ConfigError

LN_EPS = 1e-5  # CLIP's LayerNorm epsilon (Flax defaults to 1e-6).
# gelu: exact erf form (torch nn.GELU(), approximate='none'). swiglu: DINOv2 giant's gated MLP,
# silu(x1) * x2 of the two halves of c_fc's output (c_fc has mlp_dim outputs, c_proj mlp_dim / 2
# inputs; timm SwiGLUPacked, HF Dinov2SwiGLUFFN).
ACTS = ("quick_gelu", "gelu", "swiglu")
POOLS = ("cls", "mean", "cls+mean")
# The fields of ViTConfig that a checkpoint decides (not the preset), as stored in meta.json.
TOWER_FIELDS = ("act", "ln_eps", "ln_pre", "patch_bias", "layer_scale", "registers", "pool",
                "final_norm", "fc_norm", "qkv_bias", "class_pos")
# Their values for a meta.json written before a field existed: OpenAI's CLIP tower.
TOWER_DEFAULTS = {"act": "quick_gelu", "ln_eps": LN_EPS, "ln_pre": True, "patch_bias": False,
                  "layer_scale": False, "registers": 0, "pool": "cls", "final_norm": True,
                  "fc_norm": False, "qkv_bias": True, "class_pos": True}

LORA_TARGETS = ("q", "k", "v", "o", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class AdditiveConfig:
  """Extra modules of the additive and prompt PEFT baselines. All off by default."""
  lora_rank: int = 0                      # 0 disables LoRA.
  lora_alpha: float = 0.0                 # scaling = alpha / rank; 0 means alpha = rank.
  lora_targets: tuple[str, ...] = ("q", "v")
  adapter_bottleneck: int = 0             # AdaptFormer parallel adapter; 0 disables.
  adapter_scale: float = 0.1
  ssf: bool = False                       # scale-and-shift after each operation.
  ssf_init_std: float = 0.0               # 0: identity init; SSF paper uses N(1, .02)/N(0, .02).
  vpt_tokens: int = 0                     # 0 disables VPT.
  vpt_deep: bool = False                  # False: shallow (input layer only).

  def __post_init__(self):
    unknown = set(self.lora_targets) - set(LORA_TARGETS)
    if unknown:
      raise ConfigError(f"Unknown LoRA target(s) {sorted(unknown)}; choose from {LORA_TARGETS}.")
    for f in ("lora_rank", "adapter_bottleneck", "vpt_tokens"):
      if getattr(self, f) < 0:
        raise ConfigError(f"{f} must be >= 0, got {getattr(self, f)}.")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape and tower fields of a ViT vision tower (CLIP or self-supervised)."""
  name: str
  patch_size: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  image_size: int = 224
  act: str = "quick_gelu"     # one of ACTS
  ln_eps: float = LN_EPS
  ln_pre: bool = True         # CLIP's LayerNorm before the blocks (timm's ViTs have none).
  patch_bias: bool = False    # bias of the patch projection (timm's non-CLIP ViTs have one).
  layer_scale: bool = False   # LayerScale: per-channel gammas `ls_1` / `ls_2` on each branch (DINOv2).
  registers: int = 0          # register tokens after the class token (no position, not pooled).
  pool: str = "cls"           # one of POOLS: class token, mean of patch tokens, or both concatenated.
  final_norm: bool = True     # `ln_post` on the tokens before pooling (timm `norm`, HF `layernorm`).
  fc_norm: bool = False       # LayerNorm of the pooled feature (timm's `fc_norm`, MAE avg-pool).
  qkv_bias: bool = True       # biases of the q / k / v projections.
  class_pos: bool = True      # the positional embedding has a row for the class token.

  def __post_init__(self):
    if self.act not in ACTS:
      raise ConfigError(f"Unknown activation {self.act!r}; choose from {ACTS} (gelu is the exact "
                        f"erf form; the tanh approximation is not supported).")
    if not 0 < float(self.ln_eps) < 1e-2:
      raise ConfigError(f"LayerNorm epsilon must be a small positive number, got {self.ln_eps!r}.")
    if self.pool not in POOLS:
      raise ConfigError(f"Unknown pooling {self.pool!r}; choose from {POOLS}.")
    if int(self.registers) < 0:
      raise ConfigError(f"registers must be >= 0, got {self.registers}.")
    if self.act == "swiglu" and self.mlp_dim % 2:
      raise ConfigError(f"A SwiGLU MLP's c_fc has an even number of outputs (two halves), got "
                        f"mlp_dim {self.mlp_dim}.")

  def tower(self) -> dict[str, Any]:
    """The checkpoint-decided switches, as meta.json stores them."""
    return {f: getattr(self, f) for f in TOWER_FIELDS}

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """Rows of the positional embedding: the patches, plus the class token's when it has one."""
    return self.grid ** 2 + int(self.class_pos)

  @property
  def feature_dim(self) -> int:
    return 2 * self.width if self.pool == "cls+mean" else self.width


_PRESETS = {
    "ViT-B/16": dict(patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072, image_size=224),
    "ViT-B/32": dict(patch_size=32, width=768, layers=12, heads=12, mlp_dim=3072, image_size=224),
    "ViT-L/14": dict(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096, image_size=224),
    # Small towers of the same architecture for tests and the CPU demo.
    "test_tiny": dict(patch_size=4, width=32, layers=2, heads=2, mlp_dim=64, image_size=16),
    "demo_small": dict(patch_size=4, width=64, layers=4, heads=4, mlp_dim=256, image_size=16),
}


# Any other tower is named by its shape: 'vit:p14-w1280-l32-h16-m5120' (patch, width, depth,
# heads, MLP width), what `convert` writes into meta.json for a tower that is no preset (a ViT-S/16,
# ViT-H/14, ViT-g/14, a 4-layer ViT-L/14 ...). The name is the whole shape, so every entry point
# that builds a model from a name (train, predict, export, analysis, benchmarks) builds that tower.
SPEC_PREFIX = "vit:"
_SPEC = re.compile(r"vit:p(\d+)-w(\d+)-l(\d+)-h(\d+)-m(\d+)")


def spec_name(patch_size: int, width: int, layers: int, heads: int, mlp_dim: int) -> str:
  """The model name of a tower shape ('vit:p16-w384-l12-h6-m1536')."""
  return f"{SPEC_PREFIX}p{patch_size}-w{width}-l{layers}-h{heads}-m{mlp_dim}"


def model_names() -> list[str]:
  return sorted(_PRESETS)


def _shape_of(name: str) -> dict[str, int]:
  if name in _PRESETS:
    return dict(_PRESETS[name])
  m = _SPEC.fullmatch(str(name))
  if m is None or min(int(g) for g in m.groups()) <= 0:
    raise ConfigError(f"Unknown model {name!r}; choose one of {model_names()} or name a tower by "
                      "its shape, e.g. 'vit:p16-w384-l12-h6-m1536' (patch, width, layers, heads, "
                      "MLP width).")
  p, w, l, h, mlp = (int(g) for g in m.groups())
  return dict(patch_size=p, width=w, layers=l, heads=h, mlp_dim=mlp, image_size=224)


def tower_from_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
  """The TOWER_FIELDS of a params checkpoint's meta.json. A field written before it existed takes
  TOWER_DEFAULTS (OpenAI-style: QuickGELU, eps 1e-5, ln_pre, no patch bias, class-token pooling)."""
  out = {f: meta.get(f, TOWER_DEFAULTS[f]) for f in TOWER_FIELDS}
  out["ln_eps"], out["registers"] = float(out["ln_eps"]), int(out["registers"])
  for f in ("ln_pre", "patch_bias", "layer_scale", "final_norm", "fc_norm", "qkv_bias", "class_pos"):
    out[f] = bool(out[f])
  return out


def get_model_config(name: str, image_size: int | None = None, **tower) -> ViTConfig:
  """Preset by name ('ViT-B/16', 'ViT-B/32', 'ViT-L/14', 'test_tiny', 'demo_small') or a shape
  name ('vit:p14-w1280-l32-h16-m5120', `spec_name`); `tower` sets TOWER_FIELDS (act, ln_eps,
  ln_pre, patch_bias, layer_scale, registers, ...), e.g. from `tower_from_meta(meta)`."""
  kw = _shape_of(name)
  unknown = set(tower) - set(TOWER_FIELDS)
  if unknown:
    raise ConfigError(f"Unknown tower option(s) {sorted(unknown)}; choose from {TOWER_FIELDS}.")
  if image_size is not None:
    kw["image_size"] = int(image_size)
  cfg = ViTConfig(name=name, **kw, **tower)
  if cfg.image_size % cfg.patch_size:
    raise ConfigError(
        f"image_size {cfg.image_size} is not a multiple of the patch size {cfg.patch_size} "
        f"of {name}; use e.g. {cfg.grid * cfg.patch_size}.")
  if cfg.width % cfg.heads:
    raise ConfigError(f"width {cfg.width} is not divisible by heads {cfg.heads}.")
  return cfg


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def activation(name: str):
  # approximate=False: torch's nn.GELU() is the erf form; the tanh form is ~5e-4 away.
  return quick_gelu if name == "quick_gelu" else functools.partial(jax.nn.gelu, approximate=False)


def _torch_linear_init(fan_in: int):
  """PyTorch nn.Linear's default init (kaiming uniform a=sqrt(5) == U(-1/sqrt(fan_in), ..))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class SSF(nn.Module):
  """y = x * scale + shift over the trailing `shape` axes (SSF, Lian et al. 2022)."""
  shape: Sequence[int]
  init_std: float = 0.0

  @nn.compact
  def __call__(self, x):
    std = self.init_std
    scale = self.param("scale", lambda k, s: 1.0 + std * jax.random.normal(k, s), tuple(self.shape))
    shift = self.param("shift", lambda k, s: std * jax.random.normal(k, s), tuple(self.shape))
    return x * scale.astype(x.dtype) + shift.astype(x.dtype)


class LoRA(nn.Module):
  """Low-rank update x @ a @ b * (alpha / r); b starts at zero so the update starts at zero."""
  rank: int
  out_shape: Sequence[int]
  alpha: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d_in = x.shape[-1]
    d_out = math.prod(self.out_shape)
    a = self.param("a", _torch_linear_init(d_in), (d_in, self.rank))
    b = self.param("b", nn.initializers.zeros, (self.rank, d_out))
    scale = (self.alpha or self.rank) / self.rank
    y = (x @ a.astype(self.dtype)) @ b.astype(self.dtype) * scale
    return y.reshape(x.shape[:-1] + tuple(self.out_shape))


def _with_additive(y, inp, name: str, target: str, out_shape, add: AdditiveConfig, dtype):
  """A linear layer's output `y` (of input `inp`) plus the additive methods that wrap it:
  LoRA (`lora_<name>`, when `target` is in add.lora_targets) and SSF (`ssf_<name>`)."""
  if add.lora_rank and target in add.lora_targets:
    y = y + LoRA(add.lora_rank, tuple(out_shape), add.lora_alpha, dtype, name=f"lora_{name}")(inp)
  if add.ssf:
    y = SSF(tuple(out_shape), add.ssf_init_std, name=f"ssf_{name}")(y)
  return y


class MultiHeadAttention(nn.Module):
  """Self-attention with separate q/k/v/out projections (OpenAI's fused in_proj split in three)."""
  width: int
  heads: int
  additive: AdditiveConfig = AdditiveConfig()
  dtype: Any = jnp.float32
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x):
    head_dim = self.width // self.heads
    add = self.additive
    dense = lambda name, axis, features, bias=True: nn.DenseGeneral(
        features=features, axis=axis, use_bias=bias, dtype=self.dtype, param_dtype=jnp.float32,
        name=name)

    def project(name, target):
      y = dense(name, -1, (self.heads, head_dim), self.qkv_bias)(x)
      return _with_additive(y, x, name, target, (self.heads, head_dim), add, self.dtype)

    q, k, v = project("query", "q"), project("key", "k"), project("value", "v")
    q = q / jnp.sqrt(head_dim).astype(self.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    out = dense("out", (-2, -1), self.width)(ctx)
    flat = ctx.reshape(ctx.shape[:-2] + (self.width,))
    return _with_additive(out, flat, "out", "o", (self.width,), add, self.dtype)


class MLP(nn.Module):
  width: int
  mlp_dim: int
  additive: AdditiveConfig = AdditiveConfig()
  dtype: Any = jnp.float32
  act: str = "quick_gelu"

  @nn.compact
  def __call__(self, x):
    add = self.additive

    def linear(name, target, features, inp):
      y = nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32, name=name)(inp)
      return _with_additive(y, inp, name, target, (features,), add, self.dtype)

    h = linear("c_fc", "fc1", self.mlp_dim, x)
    if self.act == "swiglu":
      x1, x2 = jnp.split(h, 2, axis=-1)
      h = jax.nn.silu(x1) * x2
    else:
      h = activation(self.act)(h)
    return linear("c_proj", "fc2", self.width, h)


class Adapter(nn.Module):
  """AdaptFormer's parallel adapter: scale * up(relu(down(x))), `up` zero-initialised."""
  width: int
  bottleneck: int
  scale: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.bottleneck, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=_torch_linear_init(self.width), bias_init=nn.initializers.zeros,
                 name="down")(x)
    h = nn.relu(h)
    h = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros, name="up")(h)
    return h * self.scale


def _layer_norm(name, eps: float = LN_EPS):
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class ResidualAttentionBlock(nn.Module):
  width: int
  heads: int
  mlp_dim: int
  additive: AdditiveConfig = AdditiveConfig()
  dtype: Any = jnp.float32
  act: str = "quick_gelu"
  ln_eps: float = LN_EPS
  layer_scale: bool = False
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x):
    add = self.additive

    def norm(name, inp):
      y = _layer_norm(name, self.ln_eps)(inp).astype(self.dtype)
      if add.ssf:
        y = SSF((self.width,), add.ssf_init_std, name=f"ssf_{name}")(y)
      return y

    def scaled(name, y):  # LayerScale (CaiT / DINOv2): a per-channel gamma on the branch.
      if not self.layer_scale:
        return y
      gamma = self.param(name, nn.initializers.constant(1e-5), (self.width,))
      return y * gamma.astype(y.dtype)

    attn = MultiHeadAttention(self.width, self.heads, add, self.dtype, self.qkv_bias, name="attn")
    x = x + scaled("ls_1", attn(norm("ln_1", x)))
    mlp = MLP(self.width, self.mlp_dim, add, self.dtype, self.act, name="mlp")
    mlp_out = scaled("ls_2", mlp(norm("ln_2", x)))
    if add.adapter_bottleneck:
      mlp_out = mlp_out + Adapter(self.width, add.adapter_bottleneck, add.adapter_scale, self.dtype,
                                  name="adapter")(x)
    return x + mlp_out


class VisionTransformer(nn.Module):
  """A ViT image tower up to its pooled feature: CLIP's (ln_post of the class token, before `proj`)
  and the self-supervised towers' (DINOv2 / MAE / iBOT), as the config's tower fields say.

  Tokens: [class, registers, VPT prompts, patches]. Positions are added to the patches and, when
  `class_pos`, to the class token; registers and prompts have none (DINOv2 with registers)."""
  config: ViTConfig
  additive: AdditiveConfig = AdditiveConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    cfg, add = self.config, self.additive
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ConfigError(f"Expected NHWC images [B, H, W, 3], got shape {images.shape}.")
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
      raise ConfigError(
          f"Images are {images.shape[1]}x{images.shape[2]} but the model expects "
          f"{cfg.image_size}x{cfg.image_size}; set config.image_size or resize the input.")
    x = self._embed(images)
    n_prefix = 1 + cfg.registers
    n_prompts = add.vpt_tokens
    if n_prompts:
      x = jnp.concatenate([x[:, :n_prefix], self._prompts(0, x.shape[0]), x[:, n_prefix:]], axis=1)
    if cfg.ln_pre:
      x = _layer_norm("ln_pre", cfg.ln_eps)(x)
    x = x.astype(self.dtype)
    for i in range(cfg.layers):
      if n_prompts and add.vpt_deep and i > 0:
        x = jnp.concatenate([x[:, :n_prefix], self._prompts(i, x.shape[0]),
                             x[:, n_prefix + n_prompts:]], axis=1)
      x = ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_dim, add, self.dtype, cfg.act,
                                 cfg.ln_eps, cfg.layer_scale, cfg.qkv_bias,
                                 name=f"resblocks_{i}")(x)
    return self._pool(x, n_prefix + n_prompts)

  def _embed(self, images):
    """Patch embedding, class token (+ position) and register tokens: [B, 1 + R + grid**2, D]."""
    cfg, add = self.config, self.additive
    p, d = cfg.patch_size, cfg.width
    scale = d ** -0.5
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=cfg.patch_bias,
                dtype=self.dtype, param_dtype=jnp.float32, name="conv1")(images.astype(self.dtype))
    if add.ssf:
      x = SSF((d,), add.ssf_init_std, name="ssf_conv1")(x)
    x = x.reshape(x.shape[0], -1, d)
    b = x.shape[0]
    cls = self.param("class_embedding", nn.initializers.normal(scale), (d,))
    pos = self.param("positional_embedding", nn.initializers.normal(scale), (cfg.num_tokens, d))
    cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1) if cfg.class_pos else x
    x = x + pos.astype(self.dtype)
    if not cfg.class_pos:
      x = jnp.concatenate([cls, x], axis=1)
    if cfg.registers:
      reg = self.param("register_tokens", nn.initializers.normal(scale), (cfg.registers, d))
      reg = jnp.broadcast_to(reg.astype(self.dtype), (b, cfg.registers, d))
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
    return x

  def _prompts(self, layer: int, batch: int):
    # VPT's init: uniform with the xavier bound of the patch projection.
    p, d = self.config.patch_size, self.config.width
    bound = math.sqrt(6.0 / float(3 * p * p + d))
    init = lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound)
    prompts = self.param(f"vpt_prompts_{layer}", init, (self.additive.vpt_tokens, d))
    return jnp.broadcast_to(prompts.astype(self.dtype), (batch,) + prompts.shape)

  def _pool(self, x, n_before_patches: int):
    """ln_post (final norm) -> class token / mean of the patch tokens / both -> fc_norm."""
    cfg, add = self.config, self.additive
    # SSF follows the last LayerNorm, so that merge.py folds it into that norm's scale / bias.
    ssf = lambda name, y: SSF((y.shape[-1],), add.ssf_init_std, name=f"ssf_{name}")(y) if add.ssf else y
    if cfg.final_norm:
      # On every token (timm's `norm`); CLIP's ln_post of the class token is the same feature.
      tokens = x if cfg.pool != "cls" else x[:, :1]
      x = ssf("ln_post", _layer_norm("ln_post", cfg.ln_eps)(tokens))
    x = x.astype(jnp.float32)
    mean = lambda: jnp.mean(x[:, n_before_patches:], axis=1)
    pooled = {"cls": lambda: x[:, 0], "mean": mean,
              "cls+mean": lambda: jnp.concatenate([x[:, 0], mean()], axis=-1)}[cfg.pool]()
    if cfg.fc_norm:
      pooled = ssf("fc_norm", _layer_norm("fc_norm", cfg.ln_eps)(pooled))
    elif not cfg.final_norm:
      pooled = ssf("pool", pooled)
    return pooled.astype(jnp.float32)


def l2_normalize(x, eps: float = 1e-12):
  # Same as torch.nn.functional.normalize(x, dim=-1): x / max(||x||, eps).
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class ClipClassifier(nn.Module):
  """Encoder + the paper's head: L2 normalisation of the pooled feature, then a linear layer."""
  config: ViTConfig
  num_classes: int
  additive: AdditiveConfig = AdditiveConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, return_features: bool = False):
    del train  # CLIP has no dropout; kept for a uniform call signature.
    feats = VisionTransformer(self.config, self.additive, self.dtype, name="encoder")(images)
    z = l2_normalize(feats)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                      kernel_init=_torch_linear_init(self.config.feature_dim),
                      bias_init=_torch_linear_init(self.config.feature_dim), name="head")(z)
    if return_features:
      return logits, feats
    return logits


def compute_dtype(name: str):
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if name not in table:
    raise ConfigError(f"Unknown compute dtype {name!r}; choose from {sorted(table)}.")
  return table[name]


def build_model(model_name: str, num_classes: int, *, image_size: int | None = None,
                dtype: str = "float32", additive: AdditiveConfig | None = None,
                tower: Mapping[str, Any] | None = None) -> ClipClassifier:
  """The classifier for a preset name, e.g. build_model('ViT-B/16', 4); `tower`: TOWER_FIELDS
  (e.g. `tower_from_meta(meta)` of the init checkpoint; default: OpenAI's QuickGELU tower)."""
  if num_classes < 2:
    raise ConfigError(f"num_classes must be >= 2, got {num_classes}.")
  return ClipClassifier(get_model_config(model_name, image_size, **(tower or {})), num_classes,
                        additive or AdditiveConfig(), compute_dtype(dtype))


def init_params(model: ClipClassifier, rng) -> dict:
  size = model.config.image_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  return model.init(rng, dummy)["params"]
