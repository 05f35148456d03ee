"""Host copies of trees, the trainer's orbax tree files, and the init checkpoint a run starts from."""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np

from shpeft_jax import checkpoints as ckpt_lib
from shpeft_jax import param_names
from shpeft_jax import utils
from shpeft_jax import errors
from shpeft_jax.errors import CheckpointError

PyTree = Any


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def save_tree(path: str, tree):
  """Atomic (orbax writes to a temporary directory and renames) save of a host tree."""
  with ckpt_lib.process_local_checkpointer() as ckptr:  # written by process 0 only
    ckptr.save(os.path.abspath(path), host(tree))
    ckptr.wait_until_finished()


def restore_tree(path: str, abstract=None):
  with ckpt_lib.process_local_checkpointer() as ckptr:  # no cross-process barrier
    if abstract is None:
      return ckptr.restore(os.path.abspath(path))
    return ckptr.restore(os.path.abspath(path), abstract)


def json_dump(path: str, obj):
  with utils.atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def json_load(path: str):
  with open(path) as f:
    return json.load(f)


def check_init_checkpoint(init: str, model_name: str, image_size: int) -> None:
  """Raises CheckpointError when `model.init_checkpoint` is missing or of another model."""
  if not os.path.isdir(init):
    raise CheckpointError(
        f"model.init_checkpoint={init!r} does not exist. Create it with `python -m "
        f"shpeft_jax.convert SRC --out DIR` or leave it empty to train from scratch.")
  meta = ckpt_lib.load_meta(init)
  if meta.get("model") != model_name:
    raise CheckpointError(
        f"model.init_checkpoint={init!r} holds a {meta.get('model')!r} model but "
        f"config.model.name={model_name!r}; set --config.model.name="
        f"{meta.get('model')!r} or point at a {model_name} checkpoint.")
  if meta.get("image_size") not in (None, image_size):
    raise CheckpointError(
        f"model.init_checkpoint was made for image_size={meta.get('image_size')} but "
        f"config.model.image_size={image_size}; set --config.model.image_size="
        f"{meta.get('image_size')}.")


def load_init_params(params: PyTree, init_dir: str, *, load_head: bool = False) -> PyTree:
  """Overlays a params checkpoint onto freshly initialised (host) params.

  The head is re-initialised unless `load_head` (a new task has new classes); parameters the
  checkpoint lacks (additive PEFT modules, the head) keep their initial values.
  """
  loaded, meta = ckpt_lib.load_params(init_dir)
  flat_loaded = utils.flatten_names(loaded)
  flat = utils.flatten_names(params)
  if not any(n.startswith(param_names.ENCODER + "/") for n in flat_loaded):
    raise CheckpointError(f"{init_dir} has no encoder/ parameters; it is not a classifier "
                          "checkpoint made by `shpeft_jax.convert` or the trainer.")
  out, used = {}, 0
  for name, value in flat.items():
    if name in flat_loaded and (load_head or not param_names.is_head(name)):
      src = flat_loaded[name]
      if tuple(src.shape) != tuple(value.shape):
        raise CheckpointError(
            f"{init_dir}: parameter {name} has shape {tuple(src.shape)} but the "
            f"{meta.get('model')!r}-sized model of the config expects {tuple(value.shape)}. "
            "Is the checkpoint of another model size or image size?")
      out[name] = np.asarray(src, np.float32)
      used += 1
    else:
      out[name] = value
  unused = [n for n in flat_loaded if n not in flat and not param_names.is_head(n)]
  if unused:
    raise CheckpointError(f"{init_dir}: {len(unused)} checkpoint parameters do not exist in the "
                          f"model, e.g. {unused[:3]}; is it a checkpoint of another model?")
  logging.debug("Loaded %d parameter tensors from %s.", used, init_dir)
  return utils.unflatten_names(out)


def checkpoint_manager(directory: str, train_cfg):
  """The trainer's orbax CheckpointManager (keep-N, optionally async) over `directory`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=int(train_cfg.keep_checkpoints), create=True,
          enable_async_checkpointing=bool(train_cfg.async_checkpoints)))


def complete_steps(directory: str) -> list[int]:
  """The steps whose checkpoint is complete on disk (orbax renames a finished save to its step
  number; an unfinished one keeps a temporary suffix). The manager's own list can lag behind the
  disk while its finalize thread runs, so a Ctrl-C message reads the disk."""
  try:
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())
  except OSError:
    return []


def restore_latest(manager, state) -> tuple[Any, int]:
  """The latest checkpoint onto this mesh (whatever it was saved on), or the state as it is."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if manager.latest_step() is None:
    return state, 0
  step = int(manager.latest_step())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          {"state": state})
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))["state"]
  except (ValueError, OSError, KeyError) as e:
    raise CheckpointError(
        f"the training checkpoint {os.path.join(str(manager.directory), str(step))} is corrupt or "
        f"incomplete ({errors.first_line(e)}); delete that folder to resume from the checkpoint "
        "before it, or rerun with --restart_from=train.") from e
  logging.info("Resumed from the checkpoint at step %d.", step)
  return state, step
