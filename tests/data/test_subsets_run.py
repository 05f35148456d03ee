"""A training subset through the trainer: fingerprints (old workdirs unchanged, another fraction
refused), the scoring epoch and the batch checks over the subset, results.json and the run page."""

import json
import logging
import os

import numpy as np
import pytest

from shpeft_jax import report, stages, train
from shpeft_jax.data import input_pipeline as ip
from shpeft_jax.errors import ConfigError, DataError, StageMismatchError
from train_fixtures import make_tiny_config


def test_subset_fields_enter_the_data_fingerprint_only_when_set(tmp_path):
  w = str(tmp_path)
  base = stages.trainer_stages(make_tiny_config(), w, source_id="digits:x")
  # A config from before the fields existed (a workdir's config.json) has the same fingerprints.
  old = make_tiny_config()
  fields = {k: v for k, v in old.data.to_dict().items()
            if k not in ("train_fraction", "train_per_class", "subset_seed")}
  old.data = type(old.data)(fields)
  assert stages.trainer_stages(old, w, source_id="digits:x")["data"].fingerprint == (
      base["data"].fingerprint)
  # The subset seed alone (no subset) changes nothing; a fraction, shots or its seed do.
  seeded = make_tiny_config()
  seeded.data.subset_seed = 3
  assert stages.trainer_stages(seeded, w, source_id="digits:x")["data"].fingerprint == (
      base["data"].fingerprint)
  prints = set()
  for edits in ({"train_fraction": 0.1}, {"train_fraction": 0.5}, {"train_per_class": 4},
                {"train_fraction": 0.1, "subset_seed": 1}):
    c = make_tiny_config()
    c.data.update(edits)
    new = stages.trainer_stages(c, w, source_id="digits:x")
    assert all(new[n].fingerprint != base[n].fingerprint for n in stages.STAGES if n in new)
    prints.add(new["data"].fingerprint)
  assert len(prints) == 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("subset_run"))
  config = make_tiny_config(num_steps=2)
  config.data.train_per_class = 4
  config.peft.score_batches = -1  # One epoch of the (subset) training split.
  config.train.eval_every = 0
  return config, workdir


def test_trainer_runs_on_the_subset_and_records_it(run, caplog):
  config, workdir = run
  with caplog.at_level(logging.INFO):
    results = train.train_and_evaluate(config, workdir)
  sub = results["train_subset"]
  # Digits target: 5 classes, 4 images each.
  assert sub["num_images"] == 20 and sub["train_per_class"] == 4 and sub["subset_seed"] == 0
  assert sorted(sub["positives_per_class"].values()) == [4] * 5
  meta = ip.record_metadata(config.data, "train")
  assert np.bincount(meta["label"]).tolist() == [4] * 5
  # The scoring epoch is the subset's: floor(20 / 16) = 1 batch of 16 images.
  assert any("over 1 batches (16 images)" in r.getMessage() for r in caplog.records)
  assert any(r.getMessage().startswith("Training subset: 4 per class (subset_seed 0): 20 of 538 "
                                       "'train' images (subset id ") for r in caplog.records)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["train_subset"]["subset_id"] == sub["subset_id"]
  # The run page states the subset.
  report.write_report(workdir, log=lambda *_: None)
  with open(os.path.join(workdir, "report", "report.html")) as f:
    page = f.read()
  assert "training subset" in page and "4 per class (subset_seed 0): 20 of " in page


def test_rerun_with_another_subset_is_refused(run):
  config, workdir = run
  if not os.path.exists(os.path.join(workdir, "results.json")):
    train.train_and_evaluate(config, workdir)
  other = make_tiny_config(num_steps=2)
  other.data.train_per_class, other.peft.score_batches, other.train.eval_every = 5, -1, 0
  with pytest.raises(StageMismatchError, match=r"'data' stage \(data.train_per_class: 4 -> 5"):
    train.train_and_evaluate(other, workdir)


def test_batch_checks_and_bad_shots_before_any_work(tmp_path):
  # 2 per class = 10 images: a batch of 16 would repeat images (the subset's size is checked).
  c = make_tiny_config()
  c.data.train_per_class = 2
  with pytest.raises(ConfigError, match="larger than the 10 images of the 'train' split"):
    train.validate_config(c)
  c.data.train_per_class = 10_000
  with pytest.raises(DataError, match="train_per_class=10000 is more than the"):
    train.validate_config(c)
  c.data.train_per_class, c.data.train_fraction = 0, 0.0
  with pytest.raises(ConfigError, match=r"train_fraction=0.0 must be in \(0, 1\]"):
    train.validate_config(c)
  assert not os.listdir(tmp_path)
