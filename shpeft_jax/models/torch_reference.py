"""Pure-PyTorch CLIP vision towers: the independent reference for tests and the target of export.

`TorchVisionTransformer` reproduces OpenAI CLIP's `VisionTransformer` (clip/model.py) module for
module, so its state dict has exactly OpenAI's names (`conv1.weight`, `class_embedding`,
`positional_embedding`, `ln_pre`, `transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`,
`ln_post`, optional `proj`) and its attention is torch's own `nn.MultiheadAttention`.

`TorchClipClassifier` is the paper's classifier on that tower (no `proj`; L2 norm + `head`), and
`TorchHFClipClassifier` the same on Hugging Face's CLIP vision model (`vision_model.*` + `head.*`).
Files written by `python -m shpeft_jax.export` load into them with strict=True.
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


class LayerNorm(nn.LayerNorm):
  """OpenAI's LayerNorm: computes in float32 so that float16 weights stay stable."""

  def __init__(self, width: int):
    super().__init__(width, eps=clip_vit.LN_EPS)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    orig = x.dtype
    return super().forward(x.float()).to(orig)


class ResidualAttentionBlock(nn.Module):

  def __init__(self, width: int, heads: int, mlp_dim: int):
    super().__init__()
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_1 = LayerNorm(width)
    self.mlp = nn.Sequential(OrderedDict([
        ("c_fc", nn.Linear(width, mlp_dim)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(mlp_dim, width))]))
    self.ln_2 = LayerNorm(width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [L, N, D] like OpenAI.
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):

  def __init__(self, width: int, layers: int, heads: int, mlp_dim: int):
    super().__init__()
    self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, mlp_dim) for _ in range(layers)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.resblocks(x)


class TorchVisionTransformer(nn.Module):
  """OpenAI CLIP's image tower; returns ln_post of the class token (@ proj if output_dim)."""

  def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
               mlp_dim: int | None = None, output_dim: int | None = None):
    super().__init__()
    scale = width ** -0.5
    grid = image_size // patch_size
    self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
    self.class_embedding = nn.Parameter(scale * torch.randn(width))
    self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
    self.ln_pre = LayerNorm(width)
    self.transformer = Transformer(width, layers, heads, mlp_dim or 4 * width)
    self.ln_post = LayerNorm(width)
    self.proj = nn.Parameter(scale * torch.randn(width, output_dim)) if output_dim else None

  @classmethod
  def from_config(cls, cfg: clip_vit.ViTConfig, output_dim: int | None = None, **kw):
    return cls(cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim,
               output_dim, **kw)

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
               mlp_dim: int | None = None, num_classes: int = 2):
    super().__init__(image_size, patch_size, width, layers, heads, mlp_dim, output_dim=None)
    self.head = nn.Linear(width, num_classes)

  @classmethod
  def from_config(cls, cfg: clip_vit.ViTConfig, num_classes: int):
    return cls(cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim,
               num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(F.normalize(self.features(x), dim=-1))


def hf_vision_config(cfg: clip_vit.ViTConfig):
  """transformers.CLIPVisionConfig with the shape of a preset (QuickGELU, LayerNorm eps 1e-5)."""
  from transformers import CLIPVisionConfig
  return CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                          num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                          image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
                          hidden_act="quick_gelu", layer_norm_eps=clip_vit.LN_EPS)


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


def build_torch_classifier(model: str, num_classes: int, *, image_size: int | None = None,
                           layout: str = "openai") -> nn.Module:
  """The torch classifier an exported file of this preset / layout loads into."""
  cfg = clip_vit.get_model_config(model, image_size)
  if layout == "openai":
    return TorchClipClassifier.from_config(cfg, num_classes)
  if layout == "hf":
    return TorchHFClipClassifier.from_config(cfg, num_classes)
  raise clip_vit.ConfigError(f"Unknown layout {layout!r}; choose 'openai' or 'hf'.")


def load_exported(path: str) -> nn.Module:
  """Builds the right classifier for a safetensors file written by shpeft_jax.export and loads it
  (strict=True). For `.pt` files use build_torch_classifier + load_state_dict yourself."""
  from safetensors import safe_open
  from safetensors.torch import load_file
  with safe_open(path, framework="pt") as f:
    meta = f.metadata() or {}
  if "shpeft_model" not in meta:
    raise clip_vit.ConfigError(f"{path} has no shpeft_jax export metadata; build the model with "
                               f"build_torch_classifier(...) and call load_state_dict yourself.")
  net = build_torch_classifier(meta["shpeft_model"], int(meta["shpeft_num_classes"]),
                               image_size=int(meta["shpeft_image_size"]), layout=meta["shpeft_layout"])
  net.load_state_dict(load_file(path), strict=True)
  return net.eval()

