"""Stage fingerprints: same inputs reuse, changed inputs stop with the changed fields named."""

import json
import os

import ml_collections
import numpy as np
import pytest

from shpeft_jax import stages
from shpeft_jax.errors import ConfigError, StageMismatchError


def _cfg(k=1.0):
  return ml_collections.ConfigDict({"peft": {"method": "shpeft", "k_percent": k, "lam": 0.5},
                                    "seed": 0, "splits": ("train", "test")})


def test_first_run_records_then_reuses(tmp_path):
  s = stages.Stage(str(tmp_path), "mask", {"peft": _cfg().peft, "init": "abc"})
  assert s.check_or_record() is False  # nothing cached: compute
  assert os.path.isfile(tmp_path / "fingerprints" / "mask.json")
  again = stages.Stage(str(tmp_path), "mask", {"init": "abc", "peft": _cfg().peft})
  assert again.check_or_record() is True  # same inputs (other key order): reuse
  assert again.fingerprint == s.fingerprint


def test_changed_field_is_named_with_old_and_new_value_and_fix(tmp_path):
  stages.Stage(str(tmp_path), "mask", {"peft": _cfg(1.0).peft}).check_or_record()
  with pytest.raises(StageMismatchError) as e:
    stages.Stage(str(tmp_path), "mask", {"peft": _cfg(10).peft}).check_or_record()
  msg = str(e.value)
  assert "peft.k_percent: 1.0 -> 10" in msg
  assert "--restart_from=mask" in msg and "new --workdir" in msg
  assert "\n" not in msg
  assert "lam" not in msg  # unchanged fields are not listed
  # The record is unchanged: a failed check never overwrites the earlier inputs.
  rec = json.load(open(tmp_path / "fingerprints" / "mask.json"))
  assert rec["inputs"]["peft"]["k_percent"] == 1.0


def test_added_and_removed_fields_and_upstream_fingerprint(tmp_path):
  up1 = stages.Stage(str(tmp_path), "scores", {"seed": 0})
  up2 = stages.Stage(str(tmp_path / "other"), "scores", {"seed": 1})
  stages.Stage(str(tmp_path), "train", {"scores": up1.fingerprint, "a": 1}).check_or_record()
  with pytest.raises(StageMismatchError, match=r"a: 1 -> <absent>.*b: <absent> -> 2"):
    stages.Stage(str(tmp_path), "train", {"scores": up1.fingerprint, "b": 2}).check()
  with pytest.raises(StageMismatchError, match="scores: "):
    stages.Stage(str(tmp_path), "train", {"scores": up2.fingerprint, "a": 1}).check()


def test_canonical_values():
  assert stages.canonical({"b": (1, 2), "a": np.float32(0.5)}) == {"a": 0.5, "b": [1, 2]}
  # NaN must match itself, or a NaN-valued field would never be reused.
  assert stages.digest({"x": float("nan")}) == stages.digest({"x": float("nan")})
  assert stages.digest({"x": 1.0}) != stages.digest({"x": 1.0000001})
  assert stages.flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}


def test_checkpoint_id_follows_content_not_mtime(tmp_path):
  d = tmp_path / "ckpt"
  (d / "params").mkdir(parents=True)
  (d / "params" / "w").write_bytes(b"\x00" * 10)
  (d / "meta.json").write_text("{}")
  a = stages.checkpoint_id(str(d))
  os.utime(d / "params" / "w", (1, 1))
  assert stages.checkpoint_id(str(d)) == a
  (d / "params" / "w").write_bytes(b"\x00" * 9 + b"\x01")
  assert stages.checkpoint_id(str(d)) != a


def test_restart_from_removes_that_stage_and_later_ones(tmp_path):
  w = str(tmp_path)
  for name in ("scores", "mask", "train"):
    stages.Stage(w, name, {"x": 1}).record()
  os.makedirs(tmp_path / "scores")
  (tmp_path / "mask.npz").write_bytes(b"m")
  os.makedirs(tmp_path / "checkpoints" / "5")
  outputs = {"scores": ["scores"], "mask": ["mask.npz"], "train": ["checkpoints", "best"]}
  removed = stages.restart_from(w, "mask", outputs)
  assert os.path.isdir(tmp_path / "scores")
  assert stages.Stage(w, "scores", {"x": 1}).check()
  assert not os.path.exists(tmp_path / "mask.npz")
  assert not os.path.exists(tmp_path / "checkpoints")
  assert sorted(removed) == sorted(["mask.npz", "fingerprints/mask.json", "checkpoints",
                                    "fingerprints/train.json"])
  assert stages.Stage(w, "mask", {"x": 2}).check_or_record() is False  # recomputed freely
  with pytest.raises(ConfigError, match="is not a stage"):
    stages.restart_from(w, "masks", outputs)


def test_trainer_stages_follow_the_fields_each_stage_reads(tmp_path):
  from train_fixtures import make_tiny_config  # pylint: disable=g-import-not-at-top
  w = str(tmp_path)
  base = stages.trainer_stages(make_tiny_config(), w, source_id="digits:x", init_id="i0")

  def changed(**edits):
    c = make_tiny_config()
    for key, value in edits.items():
      section, name = key.split("__")
      c[section][name] = value
    new = stages.trainer_stages(c, w, source_id="digits:x", init_id="i0")
    return [n for n in stages.STAGES if n in new and new[n].fingerprint != base[n].fingerprint]

  assert changed(peft__k_percent=10.0) == ["mask", "train", "export"]
  assert changed(peft__lam=0.5) == ["scores", "mask", "train", "export"]
  assert changed(optim__lr=0.1) == ["train", "export"]
  assert changed(train__report_best=True) == ["export"]
  assert changed(data__augment=True) == ["data", "scores", "mask", "train", "export"]
  # How a run is carried out does not change its results.
  assert changed(train__checkpoint_every=4, train__log_every=1, train__progress_bar=True,
                 data__manual_dir="/elsewhere", data__eval_cache=False) == []
  # The size cap changes the records: the source id says so (a new one), not the field.
  assert changed(data__prepare_max_side=448) == []
  other_src = stages.trainer_stages(make_tiny_config(), w, source_id="digits:y", init_id="i0")
  assert other_src["data"].fingerprint != base["data"].fingerprint
  other_init = stages.trainer_stages(make_tiny_config(), w, source_id="digits:x", init_id="i1")
  assert other_init["scores"].fingerprint != base["scores"].fingerprint
  assert other_init["data"].fingerprint == base["data"].fingerprint
