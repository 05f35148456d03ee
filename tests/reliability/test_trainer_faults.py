"""The trainer never silently mixes, saves NaN, or shares a workdir (issue 16's silent cases)."""

import os
import shutil
import subprocess

import pytest

from fault_fixtures import ROOT, error_lines, run_module, small_tmpfs  # pylint: disable=g-bad-import-order
from shpeft_jax import errors
from shpeft_jax import train
from shpeft_jax import workdir_lock
from shpeft_jax.errors import ConfigError, NonFiniteError, StageMismatchError
from train_fixtures import TINY_OVERRIDES, cli_overrides, make_tiny_config  # pylint: disable=g-bad-import-order


def _mtimes(root):
  return {os.path.relpath(os.path.join(d, f), root): os.path.getmtime(os.path.join(d, f))
          for d, _, fs in os.walk(root) for f in fs if f != ".lock"}


def test_changed_k_is_refused_on_unfinished_and_finished_workdirs_and_restart_redoes_it(tmp_path):
  w = str(tmp_path)
  config = make_tiny_config("shpeft", num_steps=4)
  config.train.stop_after_steps = 2
  assert train.train_and_evaluate(config, w) == {"stopped_at": 2}
  # Old code: reused the 5% mask and wrote k_percent=10 into config.json.
  config10 = make_tiny_config("shpeft", num_steps=4)
  config10.peft.k_percent = 10.0
  before = _mtimes(w)
  with pytest.raises(StageMismatchError) as e:
    train.train_and_evaluate(config10, w)
  assert "'mask' stage (peft.k_percent: 5.0 -> 10.0)" in str(e.value)
  assert "--restart_from=mask" in str(e.value)
  assert _mtimes(w) == before  # nothing touched
  done = train.train_and_evaluate(make_tiny_config("shpeft", num_steps=4), w)
  # Old code: "nothing to do", exit 0, with the 5% results.
  with pytest.raises(StageMismatchError, match=r"peft.k_percent: 5.0 -> 10.0"):
    train.train_and_evaluate(config10, w)
  # A different number of steps changes the training, not the mask.
  config8 = make_tiny_config("shpeft", num_steps=8)
  with pytest.raises(StageMismatchError, match=r"'train' stage \(train.num_steps: 4 -> 8\)"):
    train.train_and_evaluate(config8, w)
  # --restart_from=mask keeps the scores and redoes the mask, training and export.
  scores_time = os.path.getmtime(tmp_path / "scores")
  redone = train.train_and_evaluate(config10, w, restart_from="mask")
  assert os.path.getmtime(tmp_path / "scores") == scores_time
  assert redone["trainable"] > done["trainable"]
  assert train.train_and_evaluate(config10, w) == redone  # now finished with k=10: reused


def test_nan_is_caught_at_the_step_it_appears_and_nothing_non_finite_is_written(tmp_path):
  # Old code: NaN was checked at logged steps only; with a diverging lr, log_every=100 and
  # checkpoint_every=2 the NaN model went into checkpoints, best/ and the export. (The tiny
  # model's LayerNorms and L2-normalised features survive lr=1e6; 1e30 overflows them.)
  config = make_tiny_config("full", num_steps=6)
  config.optim.lr = 1e30
  config.train.log_every = 100
  config.train.checkpoint_every = 2
  config.train.eval_every = 2
  with pytest.raises(NonFiniteError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  msg = str(e.value)
  bad = int(msg.split("NaN/inf at step ")[1].split()[0])
  assert 1 <= bad <= 3 and "Lower optim.lr" in msg and "(lr " in msg
  assert not os.path.exists(tmp_path / "best") and not os.path.exists(tmp_path / "export")
  ckpts = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert all(s < bad for s in ckpts)


@pytest.mark.parametrize("field, value, words", [
    ("train.keep_checkpoints", 0, "could not resume"),
    ("train.checkpoint_every", 0, "would divide by zero"),
    ("optim.lr", float("nan"), r"optim.lr.*nan"),
    ("optim.grad_clip", float("nan"), r"optim.grad_clip.*nan"),
    ("train.batch_size", 1024, "larger than the 538 images"),
])
def test_bad_settings_fail_before_any_work(tmp_path, field, value, words):
  config = make_tiny_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=words):
    train.train_and_evaluate(config, str(tmp_path))
  assert not [p for p in os.listdir(tmp_path) if p not in ("fingerprints",)], os.listdir(tmp_path)


def test_corrupt_training_checkpoint_is_one_line_and_the_previous_one_resumes(tmp_path, capsys):
  from fault_fixtures import truncate_data_files  # pylint: disable=g-import-not-at-top
  w = str(tmp_path)
  with_stop = make_tiny_config("shpeft", num_steps=6)
  with_stop.train.stop_after_steps = 4
  with_stop.train.keep_checkpoints = 3
  train.train_and_evaluate(with_stop, w)
  assert truncate_data_files(os.path.join(w, "checkpoints", "4")) > 0
  code = errors.cli_main(lambda: train.train_and_evaluate(make_tiny_config("shpeft", 6), w))
  err = capsys.readouterr().err.strip()
  assert code == 2 and "\n" not in err
  assert f"the training checkpoint {w}/checkpoints/4 is corrupt or incomplete" in err
  assert "delete that folder" in err
  shutil.rmtree(os.path.join(w, "checkpoints", "4"))
  res = train.train_and_evaluate(make_tiny_config("shpeft", 6), w)
  assert res["steps"] == 6


def test_disk_full_during_training_is_one_line_and_a_rerun_resumes(tmp_path, capsys):
  w = str(tmp_path / "small")
  with small_tmpfs(w, "160k") as mounted:
    if not mounted:
      pytest.skip("cannot mount a tmpfs here (needs root)")
    config = make_tiny_config("shpeft", num_steps=4)
    code = errors.cli_main(lambda: train.train_and_evaluate(config, w), hint_path=w,
                           log_file=os.path.join(w, "log.txt"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err[-2000:]
    assert err.startswith(f"error: disk full while writing {w}") and "rerun resumes" in err
    subprocess.run(["mount", "-o", "remount,size=64m", w], check=True)
    res = train.train_and_evaluate(config, w)
    assert res["steps"] == 4 and os.path.isdir(os.path.join(w, "export", "model"))


def test_second_run_in_a_busy_workdir_and_config_file_faults_are_one_line(tmp_path):
  w = str(tmp_path / "w")
  cfg = os.path.join(ROOT, "configs", "common.py")
  args = cli_overrides({**TINY_OVERRIDES, "train.num_steps": 2})
  with workdir_lock.WorkdirLock(w):  # a live holder: this test's process
    proc = run_module("shpeft_jax.main", "--config", cfg, "--workdir", w, *args)
    assert sorted(os.listdir(w)) == [".lock"]  # the refused run wrote nothing
  lines = error_lines(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert f"{w} is in use by process {os.getpid()}" in lines[0]
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n")
  for path, words in ((str(tmp_path / "nope.py"), "no such file"),
                      (str(bad), "line 1: invalid syntax")):
    proc = run_module("shpeft_jax.main", "--config", path, "--workdir", w)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert words in lines[0] and path in lines[0]


def test_sweep_validates_every_dataset_and_method_before_its_first_run(tmp_path):
  from shpeft_jax import sweep  # pylint: disable=g-import-not-at-top
  config = make_tiny_config()
  variants = sweep.build_variants(["linear", "shpeft"], [])
  with pytest.raises(ConfigError, match=r"^no_such_set / linear: data.name='no_such_set'"):
    sweep.run_sweep(config, str(tmp_path), variants, ["digits", "no_such_set"])
  config.method_overrides = {"shpeft": {"optim": {"lr": float("nan")}}}
  with pytest.raises(ConfigError, match=r"^digits / shpeft: optim.lr.*nan"):
    sweep.run_sweep(config, str(tmp_path), variants, ["digits"])
  assert os.listdir(tmp_path) == []  # not even the first (valid) run started


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
  """kill -9 during export leaves export/model.tmp-*; the next run of the workdir removes them
  (and a `.tmp-` file of an atomic file write), keeping everything else."""
  from train_fixtures import make_tiny_config  # pylint: disable=g-import-not-at-top
  from shpeft_jax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  stale_dir = workdir / "export" / "model.tmp-k9x2"
  os.makedirs(stale_dir / "params")
  (stale_dir / "meta.json").write_text("{}")
  (workdir / ".tmp-results.json.ab12.json").write_text("{")
  (workdir / "notes.txt").write_text("mine")
  train.train_and_evaluate(make_tiny_config("linear", num_steps=2), str(workdir))
  assert not stale_dir.exists() and not (workdir / ".tmp-results.json.ab12.json").exists()
  assert sorted(os.listdir(workdir / "export")) == ["model"]
  assert (workdir / "notes.txt").read_text() == "mine"


def test_disk_full_while_the_scores_are_saved_is_one_line(tmp_path):
  """The workdir fills up while the importance scores are written (orbax, background threads):
  one line on stderr, not orbax's per-thread tracebacks; the rerun on a larger disk cleans the
  half-written scores up and finishes."""
  w = str(tmp_path / "small")
  args = ["--config", os.path.join(ROOT, "configs", "common.py"), "--workdir", w,
          *cli_overrides({**TINY_OVERRIDES, "train.num_steps": 2})]
  with small_tmpfs(w, "48k") as mounted:
    if not mounted:
      pytest.skip("cannot mount a tmpfs here (needs root)")
    proc = run_module("shpeft_jax.main", *args, timeout=300)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: disk full while writing {w}"), lines
    assert "scores.orbax-checkpoint-tmp" in os.listdir(w)  # the scores' unfinished write
    subprocess.run(["mount", "-o", "remount,size=64m", w], check=True)
    proc = run_module("shpeft_jax.main", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [e for e in os.listdir(w) if "tmp" in e] and os.path.isdir(os.path.join(w, "scores"))
