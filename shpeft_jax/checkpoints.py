"""Params checkpoints: one orbax tree of Flax params plus a `meta.json` that says what model it is.

This is the exchange format between `convert` (PyTorch -> Flax), the trainer's exported
best/final models, `export` (Flax -> PyTorch) and the analysis commands. Training-state
checkpoints (optimizer state, step, data position) are the trainer's own CheckpointManager.

Layout of a params checkpoint directory:
  DIR/params/   orbax StandardCheckpointer tree (float32 numpy leaves)
  DIR/meta.json {"model": "ViT-B/16", "image_size": 224, "num_classes": 4 or null,
                 "act": "quick_gelu" | "gelu", "ln_eps": 1e-5, "ln_pre": true, "patch_bias": false, ...}
The tower fields (clip_vit.TOWER_FIELDS) say how the encoder computes; a meta.json without them
(older checkpoints) means OpenAI's tower (QuickGELU, eps 1e-5).
Writes go to a temporary sibling first and are renamed into place, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from shpeft_jax import utils
from shpeft_jax.errors import CheckpointError
from shpeft_jax.models import clip_vit

META = "meta.json"
PARAMS = "params"


def process_local_checkpointer() -> ocp.StandardCheckpointer:
  """A checkpointer that involves only the calling process (no cross-process barriers).

  Params checkpoints hold host numpy copies and are written by one process (process 0 in a
  multi-process run); orbax's default checkpointer would wait at a barrier for all processes.
  """
  pid = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=pid, active_processes={pid}, barrier_sync_key_prefix=f"local{pid}"))


def save_params(path: str, params, meta: dict[str, Any], *, overwrite: bool = False) -> str:
  """Atomically writes params (host numpy copies) and meta to `path`."""
  path = os.path.abspath(path)
  if os.path.exists(path):
    if not overwrite:
      raise CheckpointError(f"{path} already exists; pass overwrite=True or choose another --out.")
  with utils.atomic_path(path, directory=True) as tmp:
    host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params)
    with process_local_checkpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS), host)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, META), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
  return path


def load_meta(path: str) -> dict[str, Any]:
  meta_file = os.path.join(path, META)
  if not os.path.isfile(meta_file):
    raise CheckpointError(
        f"{path} is not a shpeft_jax params checkpoint (no {META}). Create one with "
        f"`python -m shpeft_jax.convert SRC --out DIR` or point at a trainer workdir's exported model.")
  try:
    with open(meta_file) as f:
      return json.load(f)
  except ValueError as e:
    raise CheckpointError(f"{meta_file} is corrupt ({e}); recreate the checkpoint.") from e


def load_params(path: str) -> tuple[dict, dict[str, Any]]:
  """Returns (params as numpy tree, meta)."""
  path = os.path.abspath(path)
  meta = load_meta(path)
  params_dir = os.path.join(path, PARAMS)
  if not os.path.isdir(params_dir):
    raise CheckpointError(f"{path} has {META} but no {PARAMS}/ directory: the checkpoint is incomplete.")
  try:
    with process_local_checkpointer() as ckptr:
      params = ckptr.restore(params_dir)
  except (ValueError, OSError, KeyError) as e:  # TensorStore / orbax on missing or torn files.
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    raise CheckpointError(f"{path} is corrupt or incomplete ({detail}); recreate it (convert or "
                          "export it again) or point at another checkpoint.") from e
  params = jax.tree_util.tree_map(np.asarray, params)
  return params, meta


def tower_for_training(init_checkpoint: str, act: str = "", ln_eps: float = 0.0) -> dict[str, Any]:
  """The tower fields of the model the trainer builds: the init checkpoint's (OpenAI's QuickGELU
  tower when training from scratch). `act` / `ln_eps` (config.model.act / ln_eps; '' / 0 = unset)
  choose them for a run from scratch and may only restate an init checkpoint's: training a GELU
  checkpoint as QuickGELU (or the reverse) would silently train another network."""
  tower = clip_vit.tower_from_meta(load_meta(init_checkpoint) if init_checkpoint else {})
  for field, value in (("act", act), ("ln_eps", float(ln_eps or 0.0))):
    if not value:
      continue
    if init_checkpoint and value != tower[field]:
      raise CheckpointError(
          f"config.model.{field}={value!r} but model.init_checkpoint={init_checkpoint!r} was "
          f"converted as {field}={tower[field]!r} (its meta.json); leave config.model.{field} unset "
          f"to train the checkpoint as it is, or convert again if its meta.json is wrong.")
    tower[field] = value
  return tower
