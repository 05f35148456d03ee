"""shpeft_jax params checkpoint -> PyTorch state dict of the classifier (encoder + trained head).

  python -m shpeft_jax.export CKPT_DIR --format openai|hf --out FILE [--overwrite]
  python -m shpeft_jax.export ADAPTER_DIR --base BASE_DIR --format openai|hf|peft --out PATH

An adapter (WORKDIR/export/adapter) is merged into its base first; --format peft writes a Hugging
Face peft SHiRA adapter directory instead of a file (see docs/ADAPTERS.md).

--format openai: OpenAI CLIP names without the `visual.` prefix (`conv1.weight`,
  `transformer.resblocks.N.attn.in_proj_weight`, ...) plus `head.weight` / `head.bias`; loads with
  strict=True into `shpeft_jax.models.torch_reference.TorchClipClassifier`.
--format hf: `vision_model.*` (Hugging Face CLIP vision names) plus `head.*`; loads with strict=True
  into `torch_reference.TorchHFClipClassifier`.
FILE ending in .safetensors is written with safetensors (with metadata that
`torch_reference.load_exported` reads); .pt / .pth / .bin with torch.save.

Additive PEFT parameters (LoRA, adapters, SSF, VPT) have no place in a plain CLIP state dict:
merge them into the base weights before exporting (see docs/CONVERSION.md).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Sequence

import numpy as np

from shpeft_jax import utils
from shpeft_jax.errors import CheckpointError, ConfigError, cli_main, exit_process
from shpeft_jax.models import clip_vit
from shpeft_jax.models.convert import flax_to_torch_state_dict  # noqa: F401  (re-exported)
from shpeft_jax.models.convert import LAYOUTS, flax_encoder_config

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def export_metadata(model: str, image_size: int, num_classes: int, layout: str) -> dict[str, str]:
  """safetensors metadata (str -> str) that `torch_reference.load_exported` reads back."""
  return {"format": "pt", "shpeft_model": model, "shpeft_image_size": str(image_size),
          "shpeft_num_classes": str(num_classes), "shpeft_layout": layout}


def write_state_dict(path: str, sd: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None,
                     *, overwrite: bool = False) -> str:
  """Writes a numpy state dict as safetensors or torch.save, atomically (temp file + rename)."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f"{path} already exists; pass --overwrite or choose another --out.")
  if not path.endswith((".safetensors",) + _TORCH_SUFFIXES):
    raise ConfigError(f"--out {path}: use a .safetensors, .pt, .pth or .bin file name.")
  with utils.atomic_path(path) as tmp:
    if path.endswith(".safetensors"):
      from safetensors.numpy import save_file
      save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp, metadata=metadata)
    else:
      import torch
      torch.save({k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}, tmp)
  return path


def export_params(params: Mapping[str, Any], meta: Mapping[str, Any], layout: str, out: str,
                  *, overwrite: bool = False) -> dict[str, np.ndarray]:
  """Validates params against meta, converts (`flax_to_torch_state_dict`) and writes `out`."""
  if layout not in LAYOUTS:
    raise ConfigError(f"Unknown --format {layout!r}; choose from {LAYOUTS}.")
  if "head" not in params or meta.get("num_classes") is None:
    raise CheckpointError(
        "The checkpoint has no trained head (meta num_classes is null): export writes a classifier. "
        "Export the trainer's export/model/ directory (or best/), not a converted pretrained encoder.")
  model, image_size = meta.get("model"), meta.get("image_size")
  cfg = flax_encoder_config(params["encoder"])
  if model not in clip_vit.model_names():
    raise CheckpointError(f"meta.json names model {model!r}, which is not a preset {clip_vit.model_names()}.")
  want = clip_vit.get_model_config(model, image_size)
  if (cfg.patch_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.image_size) != (
      want.patch_size, want.width, want.layers, want.heads, want.mlp_dim, want.image_size):
    raise CheckpointError(f"The params are not a {model} at {image_size}px as meta.json says "
                          f"(they have patch {cfg.patch_size}, width {cfg.width}, {cfg.layers} layers, "
                          f"image size {cfg.image_size}).")
  bad = [n for n, v in utils.flatten_names(params).items() if not np.all(np.isfinite(v))]
  if bad:
    raise CheckpointError(f"{len(bad)} tensors hold NaN or inf (e.g. {bad[0]}): the model diverged "
                          "and is not exported. Retrain with a lower optim.lr (or optim.grad_clip).")
  sd = flax_to_torch_state_dict(params, layout)  # Raises on additive leaves / incomplete trees.
  num_classes = int(meta["num_classes"])
  if sd["head.weight"].shape != (num_classes, cfg.width):
    raise CheckpointError(f"head/kernel has shape {tuple(params['head']['kernel'].shape)}; meta.json "
                          f"says num_classes {num_classes} (expected ({cfg.width}, {num_classes})).")
  write_state_dict(out, sd, export_metadata(model, want.image_size, num_classes, layout),
                   overwrite=overwrite)
  return sd


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m shpeft_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("ckpt_dir", help="params checkpoint (e.g. WORKDIR/export/model)")
  parser.add_argument("--format", required=True, choices=LAYOUTS + ("peft",))
  parser.add_argument("--base", default=None,
                      help="the base params checkpoint of an adapter CKPT_DIR (and of --format peft)")
  parser.add_argument("--out", required=True, help="FILE.safetensors, or FILE.pt / .pth / .bin")
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("--verbosity", type=int, default=0, help="1: full tracebacks of errors")
  return parser


def run(args: argparse.Namespace) -> int:
  if os.path.exists(args.out) and not args.overwrite:
    raise CheckpointError(f"{args.out} already exists; pass --overwrite or choose another --out.")
  from shpeft_jax import adapter  # pylint: disable=g-import-not-at-top
  if args.format == "peft":
    print(adapter.export_peft(args.ckpt_dir, args.base, args.out, overwrite=args.overwrite))
    return 0
  params, meta = adapter.load_model(args.ckpt_dir, args.base)
  sd = export_params(params, meta, args.format, args.out, overwrite=args.overwrite)
  cls = "TorchClipClassifier" if args.format == "openai" else "TorchHFClipClassifier"
  print(f"wrote {args.out}: {len(sd)} tensors, {meta['model']} at {meta['image_size']}px, "
        f"{meta['num_classes']} classes; load with shpeft_jax.models.torch_reference.{cls} (strict=True)")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return cli_main(lambda: run(args), verbosity=args.verbosity, hint_path=args.out)


if __name__ == "__main__":
  exit_process(main())
