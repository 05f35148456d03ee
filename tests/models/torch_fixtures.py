"""Helpers shared by the PyTorch reference tests of tests/models (torch must be importable)."""

import numpy as np
import torch


def perturb(module, seed):
  """Random 1-D params (LayerNorm scale/bias, biases): default ones/zeros would hide swaps."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn(p.shape, generator=g))
  return module.eval()


def images(n, size, seed=0):
  return np.random.RandomState(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
