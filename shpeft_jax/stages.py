"""Fingerprints of the cached stages of a workdir: a rerun reuses a stage only if its inputs match.

Each stage that leaves a result in the workdir (prepared data, pretrain, scores, mask, training,
export) records, next to its result, the inputs that determine it: the config fields it reads,
the id of the init checkpoint, the dataset's source fingerprint, the fingerprint of the stage
before it. A rerun compares:

  same inputs       -> the stage is reused / resumed as before;
  different inputs  -> StageMismatchError naming the changed fields, old and new values, and the
                       fix: a new --workdir, or --restart_from=STAGE (which deletes that stage's
                       and every later stage's results, then recomputes them).

  stage = Stage(workdir, "mask", {"peft": config.peft, "scores": scores_stage.fingerprint})
  stage.check_or_record()   # before reusing or computing the mask

A stage's inputs include the fingerprint of the stage it reads, so a change upstream is reported
at the first stage it reaches. Fingerprints live in `workdir/fingerprints/<stage>.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from typing import Any, Iterable, Mapping, Sequence

from absl import logging

from shpeft_jax.errors import ConfigError, StageMismatchError

# In pipeline order: --restart_from=STAGE redoes STAGE and everything after it.
STAGES = ("data", "pretrain", "scores", "mask", "train", "export")
FOLDER = "fingerprints"


def canonical(value: Any) -> Any:
  """A JSON-able, order-independent form of config values (ConfigDicts, tuples, numpy scalars)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
  if isinstance(value, (list, tuple)):
    return [canonical(v) for v in value]
  if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
    value = value.item()
  if isinstance(value, float):
    # NaN != NaN would make a stage never match itself; inf is not JSON.
    return value if math.isfinite(value) else repr(value)
  if value is None or isinstance(value, (bool, int, str)):
    return value
  return repr(value)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'peft.k_percent': 1.0, ...} of a canonical tree (lists and empty dicts are leaves)."""
  if isinstance(tree, dict) and tree:
    out: dict[str, Any] = {}
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    return out
  return {prefix: tree}


def digest(value: Any) -> str:
  return hashlib.sha256(json.dumps(canonical(value), sort_keys=True).encode()).hexdigest()[:16]


def file_digest(paths: Iterable[str], root: str | None = None) -> str:
  """sha256 of the names and contents of files (a checkpoint's identity, whatever its mtime)."""
  h = hashlib.sha256()
  for p in sorted(paths):
    h.update(os.path.relpath(p, root).encode() if root else p.encode())
    with open(p, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()[:16]


def checkpoint_id(path: str) -> str:
  """Content id of a params checkpoint directory (or of any file / directory)."""
  path = os.path.abspath(path)
  if os.path.isfile(path):
    return file_digest([path], os.path.dirname(path))
  files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
  return file_digest(files, path)


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """[(field, old, new)] of the leaves that differ (a missing field is ABSENT)."""
  a, b = flatten(canonical(old)), flatten(canonical(new))
  absent = ABSENT
  return [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b))
          if a.get(k, absent) != b.get(k, absent)]


class _Absent:
  def __repr__(self):
    return "<absent>"


ABSENT = _Absent()


def _short(v: Any) -> str:
  if v is ABSENT:
    return "<absent>"
  s = json.dumps(v) if not isinstance(v, str) else repr(v)
  return s if len(s) <= 60 else s[:57] + "..."


@dataclasses.dataclass
class Stage:
  """One cached stage of a workdir and the inputs that determine its result."""

  workdir: str
  name: str
  inputs: Mapping[str, Any]
  # Set by the trainer's start-of-run check: a result made from these inputs exists.
  done: bool = dataclasses.field(default=False, compare=False)

  def __post_init__(self):
    if self.name not in STAGES:
      raise ValueError(f"unknown stage {self.name!r}; one of {STAGES}")
    self.inputs = canonical(self.inputs)

  @property
  def path(self) -> str:
    return os.path.join(self.workdir, FOLDER, f"{self.name}.json")

  @property
  def fingerprint(self) -> str:
    return digest(self.inputs)

  def recorded(self) -> dict | None:
    if not os.path.exists(self.path):
      return None
    with open(self.path) as f:
      return json.load(f)

  def record(self) -> None:
    from shpeft_jax import utils  # pylint: disable=g-import-not-at-top  (keeps `main --help` light)
    with utils.atomic_path(self.path) as tmp, open(tmp, "w") as f:
      json.dump({"stage": self.name, "fingerprint": self.fingerprint, "inputs": self.inputs}, f,
                indent=1, sort_keys=True)

  def check(self) -> bool:
    """True when recorded with the same inputs, False when never recorded; raises on a change."""
    rec = self.recorded()
    if rec is None:
      return False
    if rec.get("fingerprint") == self.fingerprint:
      return True
    diff = changed_fields(rec.get("inputs", {}), self.inputs)
    shown = "; ".join(f"{k}: {_short(o)} -> {_short(n)}" for k, o, n in diff[:4])
    more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
    raise StageMismatchError(
        f"{self.workdir} was made with other inputs for its '{self.name}' stage ({shown}{more}); "
        f"reusing it would mix results. Use a new --workdir, or pass --restart_from={self.name} "
        f"to redo '{self.name}' and the stages after it.")

  def ensure(self, outputs_exist: bool, *, record: bool = True) -> bool:
    """At a run's start: whether a result made from these inputs exists. Raises on changed inputs;
    a result from before fingerprints existed is adopted (recorded, with a warning)."""
    if self.check():
      return outputs_exist
    if outputs_exist:
      logging.warning("%s: the '%s' stage has no fingerprint (made by an older version); assuming "
                      "it was made from this run's inputs. Pass --restart_from=%s if not.",
                      self.workdir, self.name, self.name)
      if record:
        self.record()
      return True
    return False

  def check_or_record(self) -> bool:
    """True: the stage's cached result may be reused. False: (re)compute it; inputs recorded."""
    if self.check():
      return True
    self.record()
    return False


def validate_restart_from(stage: str | None) -> str | None:
  if not stage:
    return None
  if stage not in STAGES:
    raise ConfigError(f"--restart_from={stage!r} is not a stage; choose one of {STAGES}.")
  return stage


def restart_from(workdir: str, stage: str, outputs: Mapping[str, Sequence[str]]) -> list[str]:
  """Deletes the results and fingerprints of `stage` and every later stage; returns what went.

  `outputs` maps a stage name to its result paths relative to the workdir (the trainer's layout).
  """
  stage = validate_restart_from(stage)
  removed = []
  for name in STAGES[STAGES.index(stage):]:
    for rel in list(outputs.get(name, ())) + [os.path.join(FOLDER, f"{name}.json")]:
      p = os.path.join(workdir, rel)
      if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
      elif os.path.lexists(p):
        os.remove(p)
      else:
        continue
      removed.append(rel)
  if removed:
    logging.info("--restart_from=%s: removed %s from %s.", stage, ", ".join(removed), workdir)
  return removed


# ---------------------------------------------------------------------------------------------
# The trainer's stages: which config fields determine each result.

# Fields that change how a run is carried out, never its numbers (resume is bit-identical across
# checkpoint intervals and device counts), or that are replaced by an identity (data paths -> the
# prepared source's id, init_checkpoint path -> its content id).
NOT_INPUTS = (
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpoints", "train.stop_after_steps", "train.progress_bar",
    "data.data_dir", "data.manual_dir", "data.cache", "data.num_parallel_calls",
    "data.eval_cache", "data.prepare_max_side",
    "model.init_checkpoint", "mesh", "distributed", "compilation_cache_dir", "methods",
    "method_overrides", "pretrain", "peft.oracle_run",
)

# peft fields added after workdirs existed, with their defaults: a stage input only when set to
# another value.
NEW_PEFT_FIELDS = {"peft.l2_reduction": "sum_of_squares", "peft.selection_scope": "global"}

# Result paths of each stage, relative to a run's workdir (for --restart_from).
TRAINER_OUTPUTS = {
    "data": [],
    "pretrain": ["pretrain"],
    "scores": ["scores"],
    "mask": ["mask.npz", "mask_stats.json"],
    "train": ["checkpoints", "best", "best.json", "metrics.jsonl", "tb"],
    "export": ["export", "results.json", "results_table.txt"],
}


def _pick(flat: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
  return {k: v for k, v in flat.items()
          if any(k == p or k.startswith(p + ".") for p in prefixes)
          and not any(k == n or k.startswith(n + ".") for n in NOT_INPUTS)}


def trainer_stages(config, workdir: str, *, source_id: str, init_id: str = "") -> dict[str, Stage]:
  """{stage: Stage} of one trainer run, each stage's inputs holding the previous one's id."""
  from shpeft_jax.data import subsets  # pylint: disable=g-import-not-at-top
  flat = flatten(canonical(config))
  # The training subset's fields only when set: workdirs from before them keep their fingerprints.
  data_fields = {k: v for k, v in _pick(flat, ["data"]).items()
                 if k.removeprefix("data.") not in subsets.FIELDS}
  data = Stage(workdir, "data", {"source": source_id, **data_fields,
                                 **subsets.recorded_fields(config.data)})
  # peft fields added after workdirs were made are recorded only when not at their default, so
  # that those workdirs keep their fingerprints.
  peft = {k: v for k, v in _pick(flat, ["peft"]).items() if NEW_PEFT_FIELDS.get(k, ABSENT) != v}
  # The scores do not depend on how many weights are then selected, nor where.
  scoring = {k: v for k, v in peft.items()
             if k not in ("peft.k_percent", "peft.k_count", "peft.selection_scope")}
  # The loss (multi-label positive weights) changes the scores; recorded only when set, so that
  # workdirs from before the field keep their fingerprints.
  loss = {"train.pos_weight": flat["train.pos_weight"]} if flat.get("train.pos_weight") else {}
  scores = Stage(workdir, "scores", {
      "data": data.fingerprint, "model.init_checkpoint (content)": init_id, "seed": flat.get("seed"),
      "batch_size": flat.get("train.batch_size"), **_pick(flat, ["model"]), **scoring, **loss})
  mask = Stage(workdir, "mask", {"scores": scores.fingerprint, **peft,
                                 **_oracle_input(config, init_id)})
  train = Stage(workdir, "train", {
      "mask": mask.fingerprint,
      **_pick(flat, ["optim", "train.batch_size", "train.num_steps", "train.eval_every",
                     "train.eval_batch_size"]), **loss})
  export = Stage(workdir, "export", {"train": train.fingerprint, **{
      k: v for k, v in _pick(flat, ["train"]).items() if k != "train.pos_weight" or v}})
  return {"data": data, "scores": scores, "mask": mask, "train": train, "export": export}


def _oracle_input(config, init_id: str) -> dict[str, str]:
  """The oracle's full run by the content of its exported model (checked: finished, `full`, from
  the same weights), for a method with a `reference`; nothing for the others."""
  from shpeft_jax.peft import methods  # pylint: disable=g-import-not-at-top
  from shpeft_jax.peft import oracle  # pylint: disable=g-import-not-at-top
  if not methods.resolve(config.peft).spec.reference:
    return {}
  return {"peft.oracle_run (content)": oracle.check_reference(config, init_id)}


def check_trainer_stages(config, workdir: str, source_id: str,
                         restart_stage: str | None) -> dict[str, Stage]:
  """The trainer's stage fingerprints, checked upstream first (the error then names the fields
  that changed); each Stage gets `.done`: a result made from the same inputs exists."""
  import jax  # pylint: disable=g-import-not-at-top
  from shpeft_jax import sharding  # pylint: disable=g-import-not-at-top
  is_main = jax.process_index() == 0
  if restart_stage and is_main:
    restart_from(workdir, restart_stage, TRAINER_OUTPUTS)
  sharding.sync_processes(f"restart {workdir}")  # The others wait for process 0's deletions.
  init = config.model.init_checkpoint
  stages = trainer_stages(config, workdir, source_id=source_id,
                          init_id=checkpoint_id(init) if init else "")
  if is_main:
    stages["data"].check_or_record()
  else:
    stages["data"].check()
  for name in ("scores", "mask", "train", "export"):
    exists = any(os.path.exists(os.path.join(workdir, p)) for p in TRAINER_OUTPUTS[name])
    stages[name].done = stages[name].ensure(exists, record=is_main)
  return stages
