"""Pure-PyTorch CLIP vision towers: the independent reference for tests and the target of export.

`TorchVisionTransformer` reproduces OpenAI CLIP's `VisionTransformer` (clip/model.py) module for
module, so its state dict has exactly OpenAI's names (`conv1.weight`, `class_embedding`,
`positional_embedding`, `ln_pre`, `transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`,
`ln_post`, optional `proj`) and its attention is torch's own `nn.MultiheadAttention`.

`TorchClipClassifier` is the paper's classifier on that tower (no `proj`; L2 norm + `head`),
`TorchHFClipClassifier` the same on Hugging Face's CLIP vision model (`vision_model.*` + `head.*`)
and `TorchTimmClipClassifier` on timm's VisionTransformer (`trunk.*` + `head.*`; needs timm).
Each takes the tower's activation (QuickGELU or exact GELU) and LayerNorm epsilon from the
`ViTConfig`. Files written by `python -m shpeft_jax.export` load into them with strict=True.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from shpeft_jax.models import clip_vit


class QuickGELU(nn.Module):

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
  return QuickGELU() if name == "quick_gelu" else nn.GELU()  # nn.GELU(): the exact erf form


class LayerNorm(nn.LayerNorm):
  """OpenAI's LayerNorm: computes in float32 so that float16 weights stay stable."""

  def __init__(self, width: int, eps: float = clip_vit.LN_EPS):
    super().__init__(width, eps=eps)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    orig = x.dtype
    return super().forward(x.float()).to(orig)


class ResidualAttentionBlock(nn.Module):

  def __init__(self, width: int, heads: int, mlp_dim: int, act: str = "quick_gelu",
               eps: float = clip_vit.LN_EPS):
    super().__init__()
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_1 = LayerNorm(width, eps)
    self.mlp = nn.Sequential(OrderedDict([
        ("c_fc", nn.Linear(width, mlp_dim)), ("gelu", activation(act)),
        ("c_proj", nn.Linear(mlp_dim, width))]))
    self.ln_2 = LayerNorm(width, eps)

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [L, N, D] like OpenAI.
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):

  def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str = "quick_gelu",
               eps: float = clip_vit.LN_EPS):
    super().__init__()
    self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, mlp_dim, act, eps)
                                     for _ in range(layers)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.resblocks(x)


class TorchVisionTransformer(nn.Module):
  """OpenAI CLIP's image tower; returns ln_post of the class token (@ proj if output_dim)."""

  def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
               mlp_dim: int | None = None, output_dim: int | None = None,
               act: str = "quick_gelu", eps: float = clip_vit.LN_EPS):
    super().__init__()
    scale = width ** -0.5
    grid = image_size // patch_size
    self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
    self.class_embedding = nn.Parameter(scale * torch.randn(width))
    self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
    self.ln_pre = LayerNorm(width, eps)
    self.transformer = Transformer(width, layers, heads, mlp_dim or 4 * width, act, eps)
    self.ln_post = LayerNorm(width, eps)
    self.proj = nn.Parameter(scale * torch.randn(width, output_dim)) if output_dim else None

  @classmethod
  def from_config(cls, cfg: clip_vit.ViTConfig, output_dim: int | None = None):
    _check_clip_structure(cfg)
    return cls(cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim,
               output_dim, cfg.act, cfg.ln_eps)

  def features(self, x: torch.Tensor) -> torch.Tensor:
    """NCHW images -> pooled features [N, D] (before proj)."""
    x = self.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                         device=x.device)
    x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
    x = self.ln_pre(x)
    x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    return self.ln_post(x[:, 0, :])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.features(x)
    if self.proj is not None:
      x = x @ self.proj
    return x


class TorchClipClassifier(TorchVisionTransformer):
  """The paper's classifier in OpenAI layout: tower (no proj) -> F.normalize -> `head` Linear.

  Its state dict is the tower's OpenAI names (no `visual.` prefix) plus head.weight / head.bias.
  """

  def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
               mlp_dim: int | None = None, num_classes: int = 2, act: str = "quick_gelu",
               eps: float = clip_vit.LN_EPS):
    super().__init__(image_size, patch_size, width, layers, heads, mlp_dim, output_dim=None,
                     act=act, eps=eps)
    self.head = nn.Linear(width, num_classes)

  @classmethod
  def from_config(cls, cfg: clip_vit.ViTConfig, num_classes: int):
    _check_clip_structure(cfg)
    return cls(cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim,
               num_classes, cfg.act, cfg.ln_eps)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(F.normalize(self.features(x), dim=-1))


def _check_clip_structure(cfg: clip_vit.ViTConfig) -> None:
  if cfg.patch_bias or not cfg.ln_pre:
    raise clip_vit.ConfigError("A tower with a patch bias and no ln_pre (a timm trunk such as "
                               "BiomedCLIP's) is a timm VisionTransformer: use the timm layout.")


def hf_vision_config(cfg: clip_vit.ViTConfig):
  """transformers.CLIPVisionConfig with the shape, activation and LayerNorm eps of `cfg`."""
  from transformers import CLIPVisionConfig
  _check_clip_structure(cfg)
  return CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                          num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                          image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
                          hidden_act=cfg.act, layer_norm_eps=cfg.ln_eps)


def timm_vision_transformer(cfg: clip_vit.ViTConfig) -> nn.Module:
  """timm's VisionTransformer computing `cfg` (no head): pre_norm for CLIP-style towers (timm then
  drops the patch bias, as the converter expects); LayerScale as init_values, registers as
  reg_tokens without positions (no_embed_class: the class token has none either), fc_norm with
  average pooling (MAE), SwiGLUPacked MLPs (DINOv2 giant). Its forward pools the class token or
  the patch mean ('cls+mean' is not a timm pool: `pooled_features` computes it)."""
  import functools
  from timm.layers import QuickGELU as TimmQuickGELU
  from timm.layers import SwiGLUPacked
  from timm.models.vision_transformer import VisionTransformer
  act = {"quick_gelu": TimmQuickGELU, "gelu": nn.GELU, "swiglu": nn.SiLU}[cfg.act]
  extra = {"mlp_layer": SwiGLUPacked} if cfg.act == "swiglu" else {}
  return VisionTransformer(
      img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.layers,
      num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.width, num_classes=0,
      global_pool="avg" if cfg.pool == "mean" else "token", class_token=True, pre_norm=cfg.ln_pre,
      norm_layer=functools.partial(nn.LayerNorm, eps=cfg.ln_eps), act_layer=act,
      init_values=1e-5 if cfg.layer_scale else None, reg_tokens=cfg.registers,
      no_embed_class=not cfg.class_pos, fc_norm=cfg.fc_norm,
      final_norm=cfg.final_norm or cfg.fc_norm, qkv_bias=cfg.qkv_bias, **extra)


def pooled_features(tokens: torch.Tensor, cfg: clip_vit.ViTConfig) -> torch.Tensor:
  """The pooled feature of `cfg` from a tower's final-normed tokens [N, L, D] (class token first,
  then registers, then patches): what clip_vit.VisionTransformer._pool computes without fc_norm."""
  mean = lambda: tokens[:, 1 + cfg.registers:].mean(dim=1)
  return {"cls": lambda: tokens[:, 0], "mean": mean,
          "cls+mean": lambda: torch.cat([tokens[:, 0], mean()], dim=-1)}[cfg.pool]()


def hf_ssl_model(cfg: clip_vit.ViTConfig, layout: str) -> nn.Module:
  """transformers' Dinov2Model (Dinov2WithRegistersModel with registers) or ViTModel (without its
  tanh pooler) computing `cfg`; their `last_hidden_state` is the final-normed tokens."""
  import transformers
  common = dict(hidden_size=cfg.width, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.ln_eps,
                qkv_bias=cfg.qkv_bias)
  if layout == "hf_vit":
    return transformers.ViTModel(transformers.ViTConfig(
        **common, intermediate_size=cfg.mlp_dim, hidden_act=cfg.act), add_pooling_layer=False)
  swiglu = cfg.act == "swiglu"
  kw = dict(common, mlp_ratio=_dinov2_mlp_ratio(cfg), hidden_act="gelu" if swiglu else cfg.act,
            use_swiglu_ffn=swiglu)
  if cfg.registers:
    return transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        **kw, num_register_tokens=cfg.registers))
  return transformers.Dinov2Model(transformers.Dinov2Config(**kw))


def _dinov2_mlp_ratio(cfg: clip_vit.ViTConfig) -> int:
  """Dinov2Config's (integer) mlp_ratio giving `cfg`'s MLP: int(width * ratio) outputs, or for
  SwiGLU a hidden width (mlp_dim / 2 here) of (int(width * ratio * 2 / 3) + 7) // 8 * 8."""
  for ratio in range(1, 33):
    hidden = cfg.width * ratio
    if cfg.act == "swiglu" and (int(hidden * 2 / 3) + 7) // 8 * 8 == cfg.mlp_dim // 2:
      return ratio
    if cfg.act != "swiglu" and hidden == cfg.mlp_dim:
      return ratio
  raise clip_vit.ConfigError(f"No integer Dinov2Config.mlp_ratio gives an MLP of {cfg.mlp_dim} for "
                             f"width {cfg.width}; this tower cannot be a transformers Dinov2Model.")


class TorchPooledClassifier(nn.Module):
  """The paper's classifier on a timm / HF Dinov2 / HF ViT tower: `head(F.normalize(pooled))`,
  keys `<prefix>*` + `head.*` (prefix `trunk.` for timm, `dinov2.` / `vit.` for HF, as their own
  classification models name the backbone)."""

  def __init__(self, cfg: clip_vit.ViTConfig, layout: str, num_classes: int):
    super().__init__()
    self.cfg, self.layout = cfg, layout
    tower = timm_vision_transformer(cfg) if layout == "timm" else hf_ssl_model(cfg, layout)
    self.prefix = {"timm": "trunk", "hf_dinov2": "dinov2", "hf_vit": "vit"}[layout]
    self.add_module(self.prefix, tower)
    self.head = nn.Linear(cfg.feature_dim, num_classes)

  def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
    """Files hold transformers' checkpoint names; a transformers >= 5 module has its own."""
    if self.layout != "timm":
      from shpeft_jax.models import hf_ssl_layouts  # pylint: disable=g-import-not-at-top
      prefix = self.prefix + "."
      tower = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
      live = hf_ssl_layouts.live_names(tower, getattr(self, self.prefix).state_dict())
      state_dict = {**{k: v for k, v in state_dict.items() if not k.startswith(prefix)},
                    **{prefix + k: torch.as_tensor(v) for k, v in live.items()}}
    return super().load_state_dict(state_dict, strict=strict, assign=assign)

  def features(self, x: torch.Tensor) -> torch.Tensor:
    tower = getattr(self, self.prefix)
    if self.layout != "timm":
      return pooled_features(tower(pixel_values=x).last_hidden_state, self.cfg)
    if self.cfg.pool == "cls+mean":
      return pooled_features(tower.forward_features(x), self.cfg)
    return tower(x)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(F.normalize(self.features(x), dim=-1))


def _hf_vision_tower(config):
  """HF's CLIP vision tower whose state dict has no `vision_model.` prefix.

  transformers < 5 calls it CLIPVisionTransformer (CLIPVisionModel wraps it as `vision_model`);
  transformers >= 5 folded it into CLIPVisionModel itself.
  """
  from transformers.models.clip import modeling_clip
  tower_cls = getattr(modeling_clip, "CLIPVisionTransformer", None)
  if tower_cls is None:
    return modeling_clip.CLIPVisionModel(config)
  return tower_cls(config)


class TorchHFClipClassifier(nn.Module):
  """The paper's classifier on HF's CLIP vision tower: keys `vision_model.*` + `head.*`."""

  def __init__(self, config, num_classes: int):
    super().__init__()
    self.vision_model = _hf_vision_tower(config)
    self.head = nn.Linear(config.hidden_size, num_classes)

  @classmethod
  def from_config(cls, cfg: clip_vit.ViTConfig, num_classes: int):
    return cls(hf_vision_config(cfg), num_classes)

  def features(self, x: torch.Tensor) -> torch.Tensor:
    return self.vision_model(pixel_values=x).pooler_output

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(F.normalize(self.features(x), dim=-1))


class TorchTimmClipClassifier(nn.Module):
  """The paper's classifier on timm's VisionTransformer: keys `trunk.*` + `head.*`."""

  def __init__(self, cfg: clip_vit.ViTConfig, num_classes: int):
    super().__init__()
    self.trunk = timm_vision_transformer(cfg)
    self.head = nn.Linear(cfg.width, num_classes)

  @classmethod
  def from_config(cls, cfg: clip_vit.ViTConfig, num_classes: int):
    return cls(cfg, num_classes)

  def features(self, x: torch.Tensor) -> torch.Tensor:
    return self.trunk(x)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(F.normalize(self.features(x), dim=-1))


def build_torch_classifier(model: str, num_classes: int | None, *, image_size: int | None = None,
                           layout: str = "openai", tower=None) -> nn.Module:
  """The torch module an exported file of this preset / layout / tower loads into (strict=True):
  the classifier, or for num_classes 0 / None (encoder-only exports) the tower itself.
  `tower`: clip_vit.TOWER_FIELDS (e.g. `clip_vit.tower_from_meta(meta)`); default OpenAI's."""
  cfg = clip_vit.get_model_config(model, image_size, **(tower or {}))
  if layout in ("openai", "open_clip"):
    return (TorchClipClassifier.from_config(cfg, num_classes) if num_classes
            else TorchVisionTransformer.from_config(cfg))
  if layout == "hf":
    if num_classes:
      return TorchHFClipClassifier.from_config(cfg, num_classes)
    from transformers import CLIPVisionModel
    return CLIPVisionModel(hf_vision_config(cfg))
  if layout == "timm":
    plain = all(getattr(cfg, f) == clip_vit.TOWER_DEFAULTS[f] for f in _SSL_FIELDS)
    if not num_classes:
      return timm_vision_transformer(cfg)
    return (TorchTimmClipClassifier.from_config(cfg, num_classes) if plain
            else TorchPooledClassifier(cfg, layout, num_classes))
  if layout in ("hf_dinov2", "hf_vit"):
    return TorchPooledClassifier(cfg, layout, num_classes) if num_classes else hf_ssl_model(cfg, layout)
  raise clip_vit.ConfigError(f"Unknown layout {layout!r}; choose openai, open_clip, hf, timm, "
                             f"hf_dinov2 or hf_vit.")


# Tower fields of the self-supervised towers (beyond CLIP's switches).
_SSL_FIELDS = ("layer_scale", "registers", "pool", "final_norm", "fc_norm", "qkv_bias", "class_pos")


def load_exported(path: str) -> nn.Module:
  """Builds the right module for a safetensors file written by shpeft_jax.export and loads it
  (strict=True): the classifier, or the tower of an encoder-only file. For `.pt` files use
  build_torch_classifier + load_state_dict yourself."""
  from safetensors import safe_open
  from safetensors.torch import load_file
  with safe_open(path, framework="pt") as f:
    meta = f.metadata() or {}
  if "shpeft_model" not in meta:
    raise clip_vit.ConfigError(f"{path} has no shpeft_jax export metadata; build the model with "
                               f"build_torch_classifier(...) and call load_state_dict yourself.")
  tower = {f: meta[f"shpeft_{f}"] for f in clip_vit.TOWER_FIELDS if f"shpeft_{f}" in meta}
  tower = clip_vit.tower_from_meta({k: (v == "1" if isinstance(clip_vit.TOWER_DEFAULTS[k], bool)
                                        else v) for k, v in tower.items()})
  net = build_torch_classifier(meta["shpeft_model"], int(meta["shpeft_num_classes"]),
                               image_size=int(meta["shpeft_image_size"]), layout=meta["shpeft_layout"],
                               tower=tower)
  net.load_state_dict(load_file(path), strict=True)
  return net.eval()

