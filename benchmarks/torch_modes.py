"""The PyTorch side of the train-step benchmarks (train_step.py, gpu_check.py): which weights of a
`TorchClipClassifier` train in each mode.

  full    every weight
  shpeft  every weight, its gradient multiplied by a random mask of k % of the encoder's elements
          (the reference masked step: what the selection picks does not change the step's cost)
  lora    LoRA of rank r on the q and v projections (`LoRAAttention`) and the head; the rest frozen
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoRAAttention(nn.Module):
  """q/v of the frozen fused in-projection plus x @ A @ B (B starts at zero), rank r."""

  def __init__(self, attn: nn.MultiheadAttention, r: int = 8, device=None):
    super().__init__()
    self.attn, d = attn, attn.embed_dim
    self.lora_q_a = nn.Parameter(torch.randn(d, r, device=device) / d ** 0.5)
    self.lora_q_b = nn.Parameter(torch.zeros(r, d, device=device))
    self.lora_v_a = nn.Parameter(torch.randn(d, r, device=device) / d ** 0.5)
    self.lora_v_b = nn.Parameter(torch.zeros(r, d, device=device))

  def forward(self, x, *unused, need_weights=False):  # x: [L, N, D]
    del unused, need_weights
    a = self.attn
    q, k, v = F.linear(x, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
    q = q + x @ self.lora_q_a @ self.lora_q_b
    v = v + x @ self.lora_v_a @ self.lora_v_b
    L, N, D = x.shape
    h = a.num_heads
    split = lambda t: t.reshape(L, N, h, D // h).permute(1, 2, 0, 3)
    o = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return (a.out_proj(o.permute(2, 0, 1, 3).reshape(L, N, D)), None)


def set_mode(model: nn.Module, mode: str, *, k_percent: float, device=None,
             seed: int = 0) -> dict[str, torch.Tensor]:
  """Makes `model` train as `mode` says (in place); returns the gradient masks ({} but shpeft)."""
  if mode == "full":
    return {}
  if mode == "lora":
    for p in model.parameters():
      p.requires_grad_(False)
    for blk in model.transformer.resblocks:
      blk.attn = LoRAAttention(blk.attn, device=device)
    for p in model.head.parameters():
      p.requires_grad_(True)
    return {}
  if mode == "shpeft":
    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    return {n: torch.rand(p.shape, device=device, generator=g) < k_percent / 100
            for n, p in model.named_parameters() if not n.startswith("head.")}
  raise ValueError(f"torch has no mode {mode}")
