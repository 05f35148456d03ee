"""The oracle mask (issue 26): train the top-k of |w_ft - w_0| of a finished `full` run.

`peft.method = 'oracle'` selects exactly as SH-PEFT does (`methods.TopK`: the same k, scope and
tie rule) but its scores are the weight changes of full fine-tuning: w_ft is the exported model of
the `full` run in `peft.oracle_run` (that run's workdir), w_0 the weights THIS run starts from,
which must be the weights the full run started from (the same init checkpoint, by content, or the
same seed when both start from scratch). So it answers: had a score picked exactly the weights that
full fine-tuning moves most, how well would their sparse fine-tune do? The sweep fills
`peft.oracle_run` with its own `full` run of the same seed (`--methods full,oracle`).

The mask stage's fingerprint holds the content id of the full run's exported model, not its path
(`stages.trainer_stages`), so a redone full run invalidates the oracle's mask, not a moved folder.
`analysis.oracle` compares other selections with this mask (recall, share of |Δw|).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from shpeft_jax.errors import CheckpointError, ConfigError

FIELD = "oracle_run"


def run_dir_of(peft_cfg) -> str:
  """`peft.oracle_run` ('' when unset; dict configs of tests may lack the field)."""
  try:
    return str(peft_cfg[FIELD] or "")
  except KeyError:
    return ""


def check_set(peft_cfg, method_name: str) -> None:
  """ConfigError when a method that reads a full run has no `peft.oracle_run`, or ranks the head."""
  if not run_dir_of(peft_cfg):
    raise ConfigError(
        f"peft.method={method_name!r} trains the top-k of |w_ft - w_0| of a finished `full` run: "
        "set --config.peft.oracle_run=WORKDIR_OF_THAT_RUN, or sweep with --methods full,oracle.")
  if peft_cfg["include_head"]:
    raise ConfigError(f"peft.method={method_name!r} ranks the encoder's |w_ft - w_0|; the new head "
                      "has no pre-trained w_0 (it always trains): set peft.include_head=False.")


def _json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def model_dir(run_dir: str) -> str:
  """The full run's exported model (the weights its test numbers come from)."""
  return os.path.join(run_dir, "export", "model")


def check_reference(config, init_id: str) -> str:
  """Content id of the full run's exported model; ConfigError when the run is missing or
  unfinished, is not a `full` run, or started from other weights / another tower than `config`.

  init_id: content id of this run's model.init_checkpoint ('' when it starts from scratch).
  """
  from shpeft_jax import stages  # pylint: disable=g-import-not-at-top
  run = os.path.abspath(run_dir_of(config.peft))
  where = f"peft.oracle_run={run}"
  if not (os.path.isfile(os.path.join(run, "results.json")) and os.path.isfile(
      os.path.join(run, "config.json")) and os.path.isdir(model_dir(run))):
    raise ConfigError(f"{where} is not a finished run (no results.json, config.json and "
                      "export/model): run `--config.peft.method=full` there first.")
  ref = _json(os.path.join(run, "config.json"))
  method = ref.get("peft", {}).get("method")
  if method != "full":
    raise ConfigError(f"{where} is a {method!r} run; the oracle needs a `full` run (every encoder "
                      "weight trained) to rank |w_ft - w_0|.")
  ref_model, model = ref.get("model", {}), config.model
  for field in ("name", "image_size"):
    if ref_model.get(field) != model[field]:
      raise ConfigError(f"{where} trained model.{field}={ref_model.get(field)!r}, this run "
                        f"{model[field]!r}; the oracle needs a full run of the same tower.")
  ref_init = ref_model.get("init_checkpoint") or ""
  if bool(ref_init) != bool(init_id) or (not init_id and ref.get("seed") != config.seed):
    raise ConfigError(f"{where} started from {ref_init or 'scratch (seed %s)' % ref.get('seed')}, "
                      f"this run from {config.model.init_checkpoint or 'scratch'}; the oracle "
                      "needs a full run from the same weights.")
  if init_id and (not os.path.exists(ref_init) or stages.checkpoint_id(ref_init) != init_id):
    raise ConfigError(f"{where} started from {ref_init}, which is gone or holds other weights "
                      f"than this run's model.init_checkpoint={config.model.init_checkpoint}; the "
                      "oracle needs a full run from the same weights.")
  return stages.checkpoint_id(model_dir(run))


def reference_scores(peft_cfg, params: Mapping[str, Any]) -> dict:
  """{'encoder': |w_ft - w_0|} in float32, w_0 = params['encoder'] (the run's initial weights),
  w_ft = the encoder of peft.oracle_run's exported model; CheckpointError for another tower."""
  from shpeft_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  path = model_dir(os.path.abspath(run_dir_of(peft_cfg)))
  finetuned, _ = checkpoints.load_params(path)
  w0, wft = utils.flatten_names(params["encoder"]), utils.flatten_names(finetuned.get("encoder", {}))
  shapes0 = {n: tuple(np.shape(v)) for n, v in w0.items()}
  shapes1 = {n: tuple(np.shape(v)) for n, v in wft.items()}
  if shapes0 != shapes1:
    diff = sorted(set(shapes0.items()) ^ set(shapes1.items()))[:3]
    raise CheckpointError(f"The full run {path} holds another encoder than this run's (differing "
                          f"parameters {diff} ...); the oracle needs a full run of the same tower.")
  delta = {n: np.abs(np.asarray(wft[n], np.float32) - np.asarray(w0[n], np.float32)) for n in w0}
  return {"encoder": utils.unflatten_names(delta)}
