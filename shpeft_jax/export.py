"""shpeft_jax params checkpoint -> PyTorch state dict (encoder, plus the trained head if any).

  python -m shpeft_jax.export CKPT_DIR --format openai|open_clip|hf|timm --out FILE [--overwrite]
  python -m shpeft_jax.export ADAPTER_DIR --base BASE_DIR --format openai|open_clip|hf|timm|peft --out PATH

CKPT_DIR is a trainer export (WORKDIR/export/model: encoder + trained head) or a converted
pretrained encoder (`python -m shpeft_jax.convert`: no head). The tower's activation and LayerNorm
epsilon come from its meta.json; a format whose class cannot compute them is refused. An adapter
(WORKDIR/export/adapter) is merged into its base first; --format peft writes a Hugging Face peft
SHiRA adapter directory instead of a file (see docs/ADAPTERS.md).

--format openai: OpenAI CLIP names without the `visual.` prefix (`conv1.weight`,
  `transformer.resblocks.N.attn.in_proj_weight`, ...; no `proj`). QuickGELU towers only.
--format open_clip: the same names, for open_clip's `VisionTransformer` (QuickGELU or GELU).
--format hf: with --out DIR, a Hugging Face model directory (config.json + model.safetensors,
  head.safetensors beside them when there is a head) that `CLIPVisionModel.from_pretrained(DIR)`
  loads strictly: the base of a peft adapter. With --out FILE.safetensors, one state dict of HF CLIP
  vision names (`embeddings.*`, `encoder.layers.N.*`; with a head behind `vision_model.`).
--format timm: timm `VisionTransformer` names (`cls_token`, `blocks.N.attn.qkv`, ...; BiomedCLIP's
  `visual.trunk`); with a head behind `trunk.`.
With a trained head, `head.weight` / `head.bias` are added and the file loads with strict=True into
the matching classifier of `shpeft_jax.models.torch_reference`; without one, into the library's own
class (docs/CONVERSION.md shows each). FILE ending in .safetensors is written with safetensors (with
metadata that `torch_reference.load_exported` and `shpeft_jax.convert` read back); .pt / .pth /
.bin with torch.save.

Additive PEFT parameters (LoRA, adapters, SSF, VPT) have no place in a plain CLIP state dict:
merge them into the base weights before exporting (see docs/CONVERSION.md).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from shpeft_jax import utils
from shpeft_jax.errors import CheckpointError, ConfigError, cli_main, exit_process
from shpeft_jax.models import clip_vit
from shpeft_jax.models import of_checkpoint
from shpeft_jax.models.convert import flax_to_torch_state_dict  # noqa: F401  (re-exported)
from shpeft_jax.models.convert import LAYOUTS, flax_encoder_config

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")

# Where each torch format loads with strict=True: (with a trained head, encoder only).
LOADS_INTO = {
    "openai": ("shpeft_jax.models.torch_reference.TorchClipClassifier",
               "OpenAI CLIP's VisionTransformer with proj = None (torch_reference.TorchVisionTransformer)"),
    "open_clip": ("shpeft_jax.models.torch_reference.TorchClipClassifier",
                  "open_clip's model.visual after `model.visual.proj = None`"),
    "hf": ("shpeft_jax.models.torch_reference.TorchHFClipClassifier",
           "transformers.CLIPVisionModel (transformers >= 5)"),
    "timm": ("shpeft_jax.models.torch_reference.TorchTimmClipClassifier (TorchPooledClassifier for "
             "DINOv2 / MAE features)",
             "timm's VisionTransformer(num_classes=0), e.g. BiomedCLIP's model.visual.trunk"),
    "hf_dinov2": ("shpeft_jax.models.torch_reference.TorchPooledClassifier",
                  "transformers.Dinov2Model (Dinov2WithRegistersModel with registers)"),
    "hf_vit": ("shpeft_jax.models.torch_reference.TorchPooledClassifier",
               "transformers.ViTModel(add_pooling_layer=False)"),
}


def export_metadata(model: str, image_size: int, num_classes: int | None, layout: str,
                    tower: Mapping[str, Any] | None = None) -> dict[str, str]:
  """safetensors metadata (str -> str) that `torch_reference.load_exported` and convert read back."""
  tower = clip_vit.tower_from_meta(tower or {})
  return {"format": "pt", "shpeft_model": model, "shpeft_image_size": str(image_size),
          "shpeft_num_classes": str(num_classes or 0), "shpeft_layout": layout,
          "shpeft_act": tower["act"], "shpeft_ln_eps": repr(tower["ln_eps"]),
          **{f"shpeft_{f}": str(int(v)) if isinstance(v, bool) else str(v)
             for f, v in tower.items() if f not in ("act", "ln_eps")}}


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


def check_params_match_meta(params: Mapping[str, Any], meta: Mapping[str, Any]) -> clip_vit.ViTConfig:
  """The tower config meta.json describes, checked against the params' shapes and head."""
  model, image_size = meta.get("model"), meta.get("image_size")
  want = of_checkpoint.vit_config(meta)  # the one reading of a checkpoint's tower
  if "encoder" not in params:
    raise CheckpointError("The params have no 'encoder' subtree; this is not a shpeft_jax model checkpoint.")
  cfg = flax_encoder_config(params["encoder"])
  fields = ("patch_size", "width", "layers", "heads", "mlp_dim", "image_size", "ln_pre", "patch_bias",
            "layer_scale", "registers", "final_norm", "fc_norm", "qkv_bias", "class_pos")
  if any(getattr(cfg, f) != getattr(want, f) for f in fields):
    raise CheckpointError(
        f"The params are not the {model} at {image_size}px that meta.json says (ln_pre "
        f"{want.ln_pre}, patch bias {want.patch_bias}); they have patch {cfg.patch_size}, width "
        f"{cfg.width}, {cfg.layers} layers, image size {cfg.image_size}, ln_pre {cfg.ln_pre}, "
        f"patch bias {cfg.patch_bias}.")
  num_classes = meta.get("num_classes")
  if ("head" in params) != (num_classes is not None):
    raise CheckpointError(
        f"meta.json says num_classes {num_classes} but the params "
        f"{'have' if 'head' in params else 'have no'} head; the checkpoint is inconsistent.")
  if num_classes is not None and np.shape(params["head"]["kernel"]) != (want.feature_dim, int(num_classes)):
    raise CheckpointError(f"head/kernel has shape {tuple(np.shape(params['head']['kernel']))}; meta.json "
                          f"says num_classes {num_classes} (expected ({want.feature_dim}, {num_classes})).")
  bad = [n for n, v in utils.flatten_names(params).items() if not np.all(np.isfinite(v))]
  if bad:
    raise CheckpointError(f"{len(bad)} tensors hold NaN or inf (e.g. {bad[0]}): the model diverged "
                          "and is not exported. Retrain with a lower optim.lr (or optim.grad_clip).")
  return want


def export_params(params: Mapping[str, Any], meta: Mapping[str, Any], layout: str, out: str,
                  *, overwrite: bool = False) -> dict[str, np.ndarray]:
  """Validates params against meta, converts (`flax_to_torch_state_dict`) and writes `out`.
  Params without a head (a converted pretrained encoder) give an encoder-only file."""
  if layout not in LAYOUTS:
    raise ConfigError(f"Unknown --format {layout!r}; choose from {LAYOUTS}.")
  cfg = check_params_match_meta(params, meta)
  sd = flax_to_torch_state_dict(params, layout, tower=cfg.tower())  # Raises on additive leaves.
  write_state_dict(out, sd, export_metadata(meta["model"], cfg.image_size, meta.get("num_classes"),
                                            layout, cfg.tower()), overwrite=overwrite)
  return sd


def _export_torch(args: argparse.Namespace, params, meta) -> str:
  sd = export_params(params, meta, args.format, args.out, overwrite=args.overwrite)
  head = meta.get("num_classes")
  what = f"{head} classes" if head is not None else "encoder only"
  into = LOADS_INTO[args.format][0 if head is not None else 1]
  return (f"wrote {args.out}: {len(sd)} tensors, {meta['model']} at {meta['image_size']}px, "
          f"{meta.get('act', 'quick_gelu')}, {what}; loads with strict=True into {into}")


HF_HEAD = "head.safetensors"


def write_hf_directory(params: Mapping[str, Any], meta: Mapping[str, Any], out: str, *,
                       overwrite: bool = False, layout: str = "hf") -> dict[str, Any]:
  """A Hugging Face model directory of the encoder (config.json with the tower's true shape,
  hidden_act and layer_norm_eps + model.safetensors, written by transformers' save_pretrained) that
  `CLIPVisionModel.from_pretrained(out)` loads strictly; the trained head, if any, beside it in
  head.safetensors (`head.weight` [C, D], `head.bias` [C]: logits = head(F.normalize(pooler_output))).
  This directory is the base a peft adapter (`--format peft`) loads onto. layout 'hf_dinov2' /
  'hf_vit': the same with transformers' Dinov2Model (Dinov2WithRegistersModel) / ViTModel
  (without its tanh pooler), logits = head(F.normalize(pooled last_hidden_state))."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import torch_reference  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise CheckpointError(f"{out} already exists; pass --overwrite or choose another --out.")
  cfg = check_params_match_meta(params, meta)
  sd = flax_to_torch_state_dict({"encoder": params["encoder"]}, layout, tower=cfg.tower())
  if layout == "hf":
    try:
      hf_config = torch_reference.hf_vision_config(cfg)
    except ConfigError as e:
      raise CheckpointError(f"this tower cannot be written as a Hugging Face CLIPVisionModel ({e}) "
                            "Use --format timm.") from e
    model = transformers.CLIPVisionModel(hf_config)
  else:
    from shpeft_jax.models import hf_ssl_layouts  # pylint: disable=g-import-not-at-top
    model = torch_reference.hf_ssl_model(cfg, layout)
    hf_config = model.config
    sd = hf_ssl_layouts.live_names(sd, model.state_dict())
  model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()},
                        strict=True)
  with utils.atomic_path(out, directory=True) as tmp:
    model.save_pretrained(tmp, safe_serialization=True)
    if "head" in params:
      save_file({"head.weight": np.ascontiguousarray(np.asarray(params["head"]["kernel"],
                                                                np.float32).T),
                 "head.bias": np.ascontiguousarray(np.asarray(params["head"]["bias"], np.float32))},
                os.path.join(tmp, HF_HEAD), metadata={"format": "pt"})
  return {"tensors": len(sd), "head": "head" in params, "config": hf_config}


def _export_hf(args: argparse.Namespace, params, meta) -> str:
  """--format hf / hf_dinov2 / hf_vit: a model directory (--out DIR), or one state-dict file
  (--out FILE.safetensors)."""
  if args.out.endswith((".safetensors",) + _TORCH_SUFFIXES):
    return _export_torch(args, params, meta)
  info = write_hf_directory(params, meta, args.out, overwrite=args.overwrite, layout=args.format)
  head = f"; head.safetensors holds the {meta.get('num_classes')}-class head" if info["head"] else ""
  cls = type(info["config"]).__name__.replace("Config", "Model")
  return (f"wrote {args.out}: a Hugging Face model directory ({info['tensors']} tensors, "
          f"hidden_act {info['config'].hidden_act}, layer_norm_eps {info['config'].layer_norm_eps})"
          f"{head}; loads with transformers.{cls}.from_pretrained({args.out!r})")


# --format -> exporter(args, params, meta) -> the line printed on success.
EXPORTERS: dict[str, Callable[[argparse.Namespace, Any, Mapping[str, Any]], str]] = {
    fmt: _export_torch for fmt in LAYOUTS}
EXPORTERS.update(hf=_export_hf, hf_dinov2=_export_hf, hf_vit=_export_hf)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m shpeft_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("ckpt_dir", help="params checkpoint (e.g. WORKDIR/export/model)")
  parser.add_argument("--format", required=True, choices=list(EXPORTERS) + ["peft"])
  parser.add_argument("--base", default=None,
                      help="the base params checkpoint of an adapter CKPT_DIR (and of --format peft)")
  parser.add_argument("--out", required=True, help="FILE.safetensors, or FILE.pt / .pth / .bin; "
                      "a directory for --format peft and for --format hf's model directory")
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
  print(EXPORTERS[args.format](args, params, meta))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return cli_main(lambda: run(args), verbosity=args.verbosity, hint_path=args.out)


if __name__ == "__main__":
  exit_process(main())
