"""PyTorch CLIP checkpoint -> shpeft_jax params checkpoint (the `encoder` of the classifier).

  python -m shpeft_jax.convert SRC --out DIR [--image_size N]
                               [--format auto|openai|open_clip|hf|timm] [--model ViT-B/16]
                               [--act quick_gelu|gelu] [--ln_eps EPS] [--overwrite]

SRC is an OpenAI CLIP file (TorchScript archive such as ViT-B-16.pt, or a plain state dict), an
open_clip state dict (.bin / .pt / .safetensors, `module.` prefixes and {'state_dict': ...} are
unpacked; `visual.trunk.*` timm trunks such as BiomedCLIP's too), a Hugging Face CLIPModel /
CLIPVisionModel file or directory (model.safetensors or pytorch_model.bin), or a timm ViT state
dict. Text-tower keys and the CLIP projection are ignored.

The activation (QuickGELU or exact GELU) and LayerNorm epsilon are read from the config beside the
weights: open_clip_config.json (`quick_gelu`, `timm_model_name`), config.json (HF `hidden_act`,
`layer_norm_eps`; timm `architecture`); OpenAI's TorchScript release is QuickGELU. A plain state
dict does not say which activation it was trained with: pass --act, or conversion stops.

The positional embedding is resampled (bicubic, as open_clip does)
when --image_size differs from the checkpoint's. Everything is validated before anything is
written, and the output directory appears atomically: a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from shpeft_jax import checkpoints
from shpeft_jax.errors import CheckpointError, cli_main, exit_process
from shpeft_jax.models import clip_vit
from shpeft_jax.models import convert as convert_lib


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m shpeft_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="checkpoint file or Hugging Face model directory")
  parser.add_argument("--out", required=True, help="params checkpoint directory to create")
  parser.add_argument("--image_size", type=int, default=None,
                      help="image size to train at (default: the checkpoint's)")
  parser.add_argument("--format", default="auto", choices=convert_lib.FORMATS)
  parser.add_argument("--model", default=None,
                      help="preset the checkpoint must match, e.g. ViT-B/16 (default: inferred)")
  parser.add_argument("--heads", type=int, default=None,
                      help="attention heads of a tower that is no preset, where no config beside "
                      "the weights says")
  parser.add_argument("--act", default=None, choices=clip_vit.ACTS,
                      help="activation of the tower, where the checkpoint's config does not say")
  parser.add_argument("--ln_eps", type=float, default=None,
                      help="LayerNorm epsilon, where the checkpoint's config does not say")
  parser.add_argument("--no_antialias", action="store_true",
                      help="resample positional embeddings without antialiasing (default: as the "
                           "source library does: open_clip / timm / HF Dinov2WithRegisters "
                           "antialias, HF Dinov2 / ViT do not)")
  parser.add_argument("--pool", default=None, choices=clip_vit.POOLS,
                      help="pooled feature: class token, mean of the patch tokens, or both "
                           "concatenated (DINOv2's linear probe); default: the checkpoint's")
  parser.add_argument("--pixel_stats", default=None,
                      help="pixel mean / std the tower was trained with, where no file beside it "
                           "says: clip, imagenet, half or 'm1,m2,m3/s1,s2,s3' (CLIP formats: "
                           "CLIP's by default)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  parser.add_argument("--verbosity", type=int, default=0, help="1: full tracebacks of errors")
  return parser


def run(args: argparse.Namespace) -> dict:
  """Converts and writes; returns the meta written."""
  if os.path.exists(args.out) and not args.overwrite:  # Fail before the (slow) read.
    raise CheckpointError(f"{args.out} already exists; pass --overwrite or choose another --out.")
  params, info = convert_lib.convert_file(args.src, fmt=args.format, model=args.model,
                                          image_size=args.image_size,
                                          antialias=False if args.no_antialias else None,
                                          pool=args.pool, act=args.act, ln_eps=args.ln_eps,
                                          heads=args.heads, pixel_stats=args.pixel_stats)
  meta = {"model": info.model, "image_size": info.image_size, "num_classes": info.num_classes,
          "source": os.path.abspath(args.src), "source_format": info.source_format,
          "source_image_size": info.source_image_size, **info.tower,
          "tower_source": info.tower_source}
  checkpoints.save_params(args.out, params, meta, overwrite=args.overwrite)
  return meta


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return cli_main(lambda: _report(run(args), args), verbosity=args.verbosity, hint_path=args.out)


def _report(meta: dict, args: argparse.Namespace) -> int:
  resized = (f", positional embedding resized from {meta['source_image_size']}"
             if meta["source_image_size"] != meta["image_size"] else "")
  print(f"wrote {args.out}: {meta['model']} at {meta['image_size']}px, {meta['act']}, "
        f"LayerNorm eps {meta['ln_eps']:g} (source format {meta['source_format']}{resized}; "
        f"{meta['tower_source']})")
  return 0


if __name__ == "__main__":
  exit_process(main())
