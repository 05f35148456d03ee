"""Faults of the export / convert / analysis command lines end in one line and exit code 2."""

import errno
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from fault_fixtures import (error_lines, run_module, small_tmpfs, tiny_classifier,  # pylint: disable=g-bad-import-order
                            truncate_data_files)
import fault_fixtures  # pylint: disable=g-bad-import-order
from shpeft_jax import checkpoints
from shpeft_jax import predict
from shpeft_jax import errors
from shpeft_jax import export as export_cli
from shpeft_jax import utils
from shpeft_jax.analysis import __main__ as analysis_cli


def test_export_refuses_non_finite_weights(tmp_path, capsys):
  tiny_classifier(str(tmp_path / "m"), nan=True)
  out = tmp_path / "m.safetensors"
  assert export_cli.main([str(tmp_path / "m"), "--format", "openai", "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: CheckpointError: 1 tensors hold NaN or inf")
  assert "encoder/ln_post/scale" in err and "lower optim.lr" in err and "\n" not in err
  assert not os.path.exists(out) and os.listdir(tmp_path) == ["m"]


def test_corrupt_checkpoint_is_one_line_in_a_fresh_process(tmp_path):
  tiny_classifier(str(tmp_path / "m"))
  assert truncate_data_files(str(tmp_path / "m")) > 0
  proc = run_module("shpeft_jax.export", str(tmp_path / "m"), "--format", "openai", "--out",
                    str(tmp_path / "m.pt"))
  lines = error_lines(proc.stderr)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "is corrupt or incomplete" in lines[0] and str(tmp_path / "m") in lines[0]
  # --verbosity=1 shows the traceback for a bug report.
  proc = run_module("shpeft_jax.export", str(tmp_path / "m"), "--format", "openai", "--out",
                    str(tmp_path / "m.pt"), "--verbosity=1")
  assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr


@pytest.mark.parametrize("damage", ["meta_json", "empty_params"])
def test_other_checkpoint_damage_is_a_checkpoint_error(tmp_path, damage):
  tiny_classifier(str(tmp_path / "m"))
  if damage == "meta_json":
    (tmp_path / "m" / "meta.json").write_text("{not json")
  else:
    for f in os.listdir(tmp_path / "m" / "params"):
      p = tmp_path / "m" / "params" / f
      if p.is_file():
        p.unlink()
  with pytest.raises(errors.CheckpointError, match="corrupt"):
    checkpoints.load_params(str(tmp_path / "m"))


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full while writing"),
                                         (errno.EROFS, "cannot write"),
                                         (errno.EACCES, "cannot write")])
def test_write_faults_of_export_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys,
                                                               code, words):
  tiny_classifier(str(tmp_path / "m"))
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  def failing_save(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
      f.write(b"partial")
    raise OSError(code, os.strerror(code), filename)

  monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
  out = tmp_path / "o.safetensors"
  assert export_cli.main([str(tmp_path / "m"), "--format", "hf", "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {words}") and "\n" not in err, err
  assert ".tmp-o.safetensors" in err or str(out) in err
  assert sorted(os.listdir(tmp_path)) == ["m"]  # the partial temp file is gone


def test_disk_full_on_a_real_small_tmpfs(tmp_path):
  tiny_classifier(str(tmp_path / "m"))
  mnt = str(tmp_path / "small")
  with small_tmpfs(mnt, "64k") as mounted:
    if not mounted:
      pytest.skip("cannot mount a tmpfs here (needs root); the patched-writer test covers ENOSPC")
    proc = run_module("shpeft_jax.export", str(tmp_path / "m"), "--format", "openai", "--out",
                      os.path.join(mnt, "m.safetensors"))
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: disk full while writing " + mnt)
    assert os.listdir(mnt) == []


def test_read_only_out_on_a_real_tmpfs(tmp_path):
  tiny_classifier(str(tmp_path / "m"))
  mnt = str(tmp_path / "ro")
  with small_tmpfs(mnt, "1m", read_only=True) as mounted:
    if not mounted:
      pytest.skip("cannot mount a tmpfs here (needs root)")
    proc = run_module("shpeft_jax.export", str(tmp_path / "m"), "--format", "openai", "--out",
                      os.path.join(mnt, "m.safetensors"))
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot write {mnt}") and "Read-only" in lines[0]


def test_keyboard_interrupt_says_where_and_that_a_rerun_resumes(capsys):
  def work():
    errors.note_progress("training step 7 of 20 in /w")
    raise KeyboardInterrupt
  assert errors.cli_main(work) == errors.EXIT_INTERRUPTED
  err = capsys.readouterr().err
  assert "interrupted during training step 7 of 20 in /w" in err and "rerun" in err


def test_unknown_bug_keeps_its_traceback_and_log_file_gets_known_ones(tmp_path, capsys):
  with pytest.raises(ZeroDivisionError):
    errors.cli_main(lambda: 1 / 0)
  log = tmp_path / "log.txt"

  def disk_full():
    raise OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/4")
  assert errors.cli_main(disk_full, log_file=str(log)) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: disk full while writing /w/checkpoints/4") and "\n" not in err
  assert "Traceback" in log.read_text()


def test_disk_full_hidden_under_an_event_loop_error_is_found():
  # orbax's async writer: the last line of the raw traceback was `Event loop is closed`.
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/20/state")
    except OSError as inner:
      raise RuntimeError("Event loop is closed") from inner
  except RuntimeError as e:
    assert errors.describe(e).startswith("disk full while writing /w/checkpoints/20/state")


def test_analysis_rejects_bad_k_before_any_work(tmp_path, capsys):
  # Masks only: the old code never parsed --k, so a typo was ignored without a word.
  rc = analysis_cli.main(["hybridity", "--mask", f"a={tmp_path}/a.npz", "--mask",
                          f"b={tmp_path}/b.npz", "--k", "5,abc", "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "'abc' is not a percentage in (0, 100]" in err and "\n" not in err
  for bad in ("5,,1", "nan", "0", "101", "-1", "inf"):
    with pytest.raises(errors.ConfigError):
      analysis_cli.parse_k_list(bad)
  assert not os.path.exists(tmp_path / "o")


def test_analysis_config_syntax_error_is_one_line(tmp_path, capsys):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n  pass\n")
  with pytest.raises(errors.ConfigError, match=r"bad.py line 1 cannot be loaded \(SyntaxError"):
    analysis_cli.load_config(str(bad))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    with utils.atomic_path(str(tmp_path / "f.json")) as tmp, open(tmp, "w") as f:
      f.write("{}")
    with utils.atomic_path(str(tmp_path / "d"), directory=True) as tmp:
      pass
    tiny_classifier(str(tmp_path / "m"))
    assert export_cli.main([str(tmp_path / "m"), "--format", "openai", "--out",
                            str(tmp_path / "m.safetensors")]) == 0
  finally:
    os.umask(old)
  mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
  assert mode(tmp_path / "f.json") == 0o666 & ~umask
  assert mode(tmp_path / "m.safetensors") == 0o666 & ~umask
  assert mode(tmp_path / "d") == 0o777 & ~umask
  assert mode(tmp_path / "m") == 0o777 & ~umask
  for d, _, files in os.walk(tmp_path / "m"):
    assert mode(d) & 0o777 == 0o777 & ~umask, d
    for f in files:
      assert mode(os.path.join(d, f)) == 0o666 & ~umask, os.path.join(d, f)


def test_only_orbax_closed_loop_noise_is_dropped_from_stderr(capsys, monkeypatch):
  """A corrupt checkpoint's late `Event loop is closed` (from a TensorStore thread) is not printed."""
  import asyncio  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  assert errors.cli_main(lambda: 0) == 0  # installs the filter once
  assert errors.cli_main(lambda: 0) == 0

  loop = asyncio.new_event_loop()
  loop.close()

  class LateCallback:  # what a TensorStore thread does after orbax closed its loop
    def __del__(self):
      loop.call_soon_threadsafe(print)

  class Bug:
    def __del__(self):
      raise RuntimeError("Event loop is closed")  # same text, not from asyncio: printed

  x = LateCallback()
  del x
  assert capsys.readouterr().err == ""
  y = Bug()
  del y
  err = capsys.readouterr().err
  assert "Event loop is closed" in err and "Traceback" in err


# ---------------------------------------------------------------------------------------------
# predict: its output faults and a wrong model directory, each one line and exit 2.


def _one_image(path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
  return str(path)


def test_predict_output_faults_are_one_line(tmp_path, capsys):
  model = tmp_path / "model"
  fault_fixtures.tiny_classifier(str(model))
  img = _one_image(tmp_path / "a.png")
  (tmp_path / "outdir").mkdir()
  rc = predict.main([str(model), img, "--out", str(tmp_path / "outdir"), "--overwrite",
                     "--no_progress"])
  err = fault_fixtures.error_lines(capsys.readouterr().err)
  assert rc == 2 and len(err) == 1 and "is a directory" in err[0], err
  ro = tmp_path / "ro"
  with fault_fixtures.small_tmpfs(str(ro), read_only=True) as ok:
    if not ok:
      pytest.skip("cannot mount a tmpfs here")
    rc = predict.main([str(model), img, "--out", str(ro / "p.csv"), "--no_progress"])
    err = fault_fixtures.error_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and "cannot write" in err[0], err
  full = tmp_path / "full"
  with fault_fixtures.small_tmpfs(str(full), size="64k") as ok:
    if not ok:
      pytest.skip("cannot mount a tmpfs here")
    with open(full / "filler", "wb", buffering=0) as f:
      try:
        while True:
          f.write(b"\0" * 4096)
      except OSError:
        pass
    rc = predict.main([str(model), img, "--out", str(full / "p.csv"), "--no_progress"])
    err = fault_fixtures.error_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and "disk full" in err[0], err
    assert not [p for p in os.listdir(full) if p != "filler"]  # no half-written CSV


def test_predict_names_the_runs_of_a_workdir(tmp_path, capsys):
  for run in ("pretrain", "shpeft_seed0", "random_seed0"):
    os.makedirs(tmp_path / run / "export" / "model")
    (tmp_path / run / "export" / "model" / "meta.json").write_text("{}")
  img = _one_image(tmp_path / "a.png")
  assert predict.main([str(tmp_path), img, "--out", str(tmp_path / "p.csv")]) == 2
  err = fault_fixtures.error_lines(capsys.readouterr().err)
  assert len(err) == 1 and "holds 3 runs (pretrain, random_seed0, shpeft_seed0)" in err[0], err
  assert err[0].endswith(f"e.g. {tmp_path / 'random_seed0'}."), err


def test_predict_refuses_a_wrong_model_dir_before_heavy_imports(tmp_path):
  img = _one_image(tmp_path / "a.png")
  code = ("import sys; from shpeft_jax import predict; "
          f"rc = predict.main([{str(tmp_path / 'nope')!r}, {img!r}, '--out', "
          f"{str(tmp_path / 'p.csv')!r}]); "
          "print(rc, 'tensorflow' in sys.modules, 'jax' in sys.modules)")
  env = {**os.environ, "PYTHONPATH": fault_fixtures.ROOT}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
  assert out.stdout.split() == ["2", "False", "False"], (out.stdout, out.stderr[-2000:])
  assert "does not exist" in out.stderr
