"""The model of a checkpoint: ONE place that turns params + meta.json (+ the run's config) into the
classifier to apply.

Every entry point that loads a checkpoint and runs it (predict, export, the sparsity analysis, the
adapter's apply, report's per-class re-evaluation, benchmarks) builds its model here, so that the
tower the checkpoint was converted or trained as (`clip_vit.TOWER_FIELDS` in meta.json: activation,
LayerNorm epsilon, ln_pre, patch bias) is the tower that runs. Building a model from a preset name
and options elsewhere is how `predict` once ran every checkpoint as a QuickGELU tower.

What is read from where:
  * the preset name, image size and tower fields: meta.json (`vit_config`);
  * the number of classes: the head's kernel (checked against meta.json's `num_classes`);
  * additive PEFT hooks (LoRA / adapter / SSF / VPT leaves in the params): the run's config.json
    (`peft` section), which says how they are wired; refused when it is missing;
  * the compute dtype: the run's config (float32 when there is none).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from shpeft_jax.errors import CheckpointError, ConfigError
from shpeft_jax.models import clip_vit


def vit_config(meta: Mapping[str, Any], where: str = "the checkpoint") -> clip_vit.ViTConfig:
  """The tower meta.json describes: its shape (a preset, or a shape name 'vit:p..-w..-l..-h..-m..')
  at its image size, with its tower fields."""
  name = meta.get("model")
  if not name:
    raise CheckpointError(f"{where}: meta.json does not name its model ('model' key); convert or "
                          "export it again.")
  try:
    return clip_vit.get_model_config(name, meta.get("image_size"),
                                     **clip_vit.tower_from_meta(meta))
  except ConfigError as e:
    raise CheckpointError(f"{where}: meta.json: {e}") from e


def num_classes_of(params: Mapping[str, Any], meta: Mapping[str, Any],
                   where: str = "the checkpoint") -> int:
  """The head's output count, which meta.json's num_classes must agree with."""
  head = params.get("head") if isinstance(params, Mapping) else None
  meta_classes = meta.get("num_classes")
  if head is None or "kernel" not in head or not meta_classes:
    raise CheckpointError(f"{where} has no trained head (meta num_classes is {meta_classes!r}): it "
                          "is a pretrained encoder, not a classifier. Use a trainer workdir's "
                          "export/model or best/.")
  n = int(np.shape(head["kernel"])[-1])
  if int(meta_classes) != n:
    raise CheckpointError(f"{where}: meta.json says num_classes={meta_classes} but the head has {n} "
                          "outputs; the checkpoint is inconsistent.")
  return n


def additive_of(params: Mapping[str, Any], run_config=None,
                where: str = "the checkpoint") -> clip_vit.AdditiveConfig:
  """The additive hooks the params need: none, or the run's method's (config.json's peft)."""
  from shpeft_jax.peft import merge, methods  # pylint: disable=g-import-not-at-top
  if not merge.additive_leaves(params):
    return clip_vit.AdditiveConfig()
  if run_config is None:
    raise CheckpointError(f"{where} holds additive PEFT parameters (adapter / VPT / LoRA / SSF) but "
                          "no config.json was found next to it to say how they are wired; predict "
                          "from the run's workdir.")
  return methods.additive_config_for(run_config.peft)


def model_of_checkpoint(params: Mapping[str, Any], meta: Mapping[str, Any], run_config=None, *,
                        where: str = "the checkpoint", dtype: str | None = None
                        ) -> clip_vit.ClipClassifier:
  """The classifier that `params` (with their meta.json and, when known, the run's config) are.

  `dtype` overrides the compute dtype (default: the run's config.model.dtype, else float32)."""
  cfg = vit_config(meta, where)
  num_classes = num_classes_of(params, meta, where)
  additive = additive_of(params, run_config, where)
  if dtype is None:
    dtype = run_config.model.get("dtype", "float32") if run_config is not None else "float32"
  return clip_vit.ClipClassifier(cfg, num_classes, additive, clip_vit.compute_dtype(dtype))
