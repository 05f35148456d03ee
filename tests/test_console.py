"""The console helpers: banner filtering at the file-descriptor level, the progress bar's clock,
the trainable-parameter file and summary."""

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from train_fixtures import REPO_ROOT
from shpeft_jax import console


def test_banners_dropped_other_fd2_output_kept():
  code = """
import os, sys
from shpeft_jax import console
with console._filtered_fd2(keep_all=False):
  os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
  os.write(2, b"I0000 00:00:17.1 19124 port.cc:153] oneDNN custom operations are on. You may see...\\n")
  os.write(2, b"I0000 00:00:17.2 19124 cpu_feature_guard.cc:227] This TensorFlow binary is optimized x\\n")
  os.write(2, b"E0000 real_error.cc:1] a real problem\\n")
  print("python stderr line", file=sys.stderr)
print("after", file=sys.stderr)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": REPO_ROOT}, cwd=REPO_ROOT)
  assert out.returncode == 0, out.stderr
  assert out.stderr.splitlines() == ["E0000 real_error.cc:1] a real problem",
                                     "python stderr line", "after"]


def test_progress_clock_starts_after_the_first_step(monkeypatch):
  clock = iter([100.0, 103.0, 104.0, 105.0])  # step 1 ends at 100 s (after compiling)
  monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
  p = console.StepProgress(total=11, start=0, desc="x", batch_size=8, enabled=False)
  p.update(1)                         # compiled step: starts the clock, no rate yet
  assert np.isnan(p.steps_per_s(1))
  p.update(4)
  assert p.steps_per_s(4) == pytest.approx(3 / 3.0)   # 3 steps in 3 s (perf_counter 103)
  assert p.eta_s(5) == pytest.approx(6 / (4 / 4.0))   # 4 steps in 4 s, 6 to go
  assert p.images_per_s(6) == pytest.approx(8 * 5 / 5.0)
  p.close()


def test_trainable_file_and_summary(tmp_path):
  mask = {"encoder": {"resblocks_0": {"attn": {"query": {"kernel": np.eye(4, dtype=bool)}},
                                      "ln_1": {"scale": np.zeros(4, bool)}}},
          "head": {"kernel": np.ones((4, 2), bool), "bias": np.ones(2, bool)}}
  rules = {"encoder/resblocks_0/attn/query/kernel": ("backbone", True),
           "encoder/resblocks_0/ln_1/scale": ("backbone", True),
           "head/kernel": ("head", True), "head/bias": ("head", True)}
  rows = console.trainable_rows(mask, rules)
  by_name = {r["name"]: r for r in rows}
  assert by_name["encoder/resblocks_0/attn/query/kernel"]["trainable"] == 4
  assert by_name["encoder/resblocks_0/attn/query/kernel"]["type"] == "attn_qkv"
  path = console.write_trainable_tsv(str(tmp_path / "trainable_params.tsv"), rows)
  lines = open(path).read().splitlines()
  assert lines[0].split("\t")[:3] == ["name", "type", "layer"] and len(lines) == 5
  assert "encoder/resblocks_0/ln_1/scale\tlayernorm\tresblocks_0\t4\tbackbone\t0\t4\t0.0000" in lines
  summary = console.trainable_summary(rows)
  assert summary[0].startswith("trainable: 14 of 30 parameters (46.667 %)")
  assert "attn_qkv 25.00" in summary[1] and "layernorm 0.00" in summary[1]
  assert "head 100.00" in summary[1] and len(summary) <= 5


def test_summary_of_whole_types_is_one_line():
  full = {"a": {"query": {"kernel": np.ones(3, bool)}}, "head": {"kernel": np.ones(2, bool)}}
  assert console.trainable_summary(console.trainable_rows(full)) == [
      "trainable: 5 of 5 parameters (100.000 %): every type"]
  linear = {"encoder": {"ln_pre": {"scale": np.zeros(3, bool)}}, "head": {"kernel": np.ones(2, bool)}}
  assert console.trainable_summary(console.trainable_rows(linear)) == [
      "trainable: 2 of 5 parameters (40.000 %): head (the rest frozen)"]


def test_quiet_cosine_schedule_is_the_same_schedule():
  """Without warm-up the cosine is built without optax's zero-length linear part (which logs a
  warning three times per run); its values are bit-identical to the warm-up form's."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from shpeft_jax import optim  # pylint: disable=g-import-not-at-top
  for lr, n, end in [(0.3, 300, 0.0), (100.0, 300, 0.0), (1e-3, 1500, 1e-5)]:
    cfg = {**optim.DEFAULTS, "lr": lr, "warmup_steps": 0, "end_lr": end, "schedule": "cosine"}
    ours = optim.make_schedule(cfg, n)
    ref = optax.warmup_cosine_decay_schedule(0.0, lr, 0, n, end)
    steps = jnp.arange(n + 2)
    a, b = (np.asarray(jax.jit(jax.vmap(f))(steps)) for f in (ours, ref))
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_runs_progress_one_line_per_run_and_the_runs_lines_in_their_file(tmp_path, monkeypatch,
                                                                          capsys):
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(console, "verbosity", lambda: 0)
  shown = io.StringIO()
  handler = std_logging.StreamHandler(shown)
  handler.addFilter(console._QuietRuns())  # what setup_logging puts on absl's handler
  root = std_logging.getLogger()
  root.addHandler(handler)
  old_level = root.level
  root.setLevel(std_logging.INFO)
  try:
    progress = console.RunsProgress(2)
    assert not progress.tty  # pytest's stderr: a log, so every run gets its line, no bar

    def run(f1):
      std_logging.getLogger("absl").info("stage line of the run")
      std_logging.getLogger("absl").warning("a warning of the run")
      return {"test": {"f1_macro": f1}, "validation": {"f1_macro": 0.5}}

    out = [progress("shpeft seed 0", str(tmp_path / "a"), lambda: run(0.8123)),
           progress("random seed 0", str(tmp_path / "b"), lambda: run(0.25))]
    std_logging.getLogger("absl").info("after the group")
  finally:
    root.removeHandler(handler)
    root.setLevel(old_level)
  assert out[0]["test"]["f1_macro"] == 0.8123
  err = capsys.readouterr().err.splitlines()
  assert re.fullmatch(r"\[1/2\] shpeft seed 0: test F1 81\.23, val F1 50\.00 \(\d+ s; ETA "
                      r"\d\d:\d\d\)", err[0]), err
  assert re.fullmatch(r"\[2/2\] random seed 0: test F1 25\.00, val F1 50\.00 \(\d+ s\)", err[1])
  # The console got the warnings and what came after the group, not the runs' INFO lines.
  assert shown.getvalue().splitlines() == ["a warning of the run"] * 2 + ["after the group"]
  for d in ("a", "b"):
    own = (tmp_path / d / "console.txt").read_text().splitlines()
    assert own == ["stage line of the run", "warning: a warning of the run"]


def test_runs_progress_closes_its_bar_and_keeps_the_error(tmp_path, monkeypatch):
  monkeypatch.setattr(console, "verbosity", lambda: 0)
  progress = console.RunsProgress(3)

  def boom():
    raise ValueError("bad run")

  with pytest.raises(ValueError, match="bad run"):
    progress("x", str(tmp_path / "x"), boom)
  assert progress.bar is None and not console._QUIET and progress.done == 0


def test_tfds_chatter_of_a_prepared_source_is_dropped(tmp_path):
  """Every dataset, not only the demo: tfds's INFO lines on each read and its notes on our
  prepared-source BuilderConfig do not reach the console; other tfds warnings would."""
  import logging as std  # pylint: disable=g-import-not-at-top
  from test_predict import _image_folder  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import builders  # pylint: disable=g-import-not-at-top
  root = _image_folder(str(tmp_path / "images"))
  builders.open_builder("image_folder", str(tmp_path / "tfds"), root)  # prepares
  raw, kept = [], []

  class Collect(std.Handler):
    def __init__(self, sink, filtered):
      super().__init__()
      self.sink = sink
      if filtered:
        self.addFilter(console._DropNoise())  # pylint: disable=protected-access

    def emit(self, record):
      self.sink.append(record)

  absl_logger = std.getLogger("absl")
  handlers = [Collect(raw, False), Collect(kept, True)]
  level = absl_logger.level
  absl_logger.setLevel(std.INFO)
  for h in handlers:
    absl_logger.addHandler(h)
  try:
    builder, _ = builders.open_builder("image_folder", str(tmp_path / "tfds"), root)
    for _ in builder.as_dataset(split="test").take(1):
      pass
  finally:
    for h in handlers:
      absl_logger.removeHandler(h)
    absl_logger.setLevel(level)
  tfds_raw = [r.getMessage() for r in raw if "/tensorflow_datasets/" in r.pathname]
  assert any("Constructing tf.data.Dataset" in m or "Load dataset info" in m for m in tfds_raw)
  assert not [r.getMessage() for r in kept if "/tensorflow_datasets/" in r.pathname]
  warn = std.LogRecord("absl", std.WARNING, "/x/tensorflow_datasets/core/other.py", 1,
                       "a real problem", None, None)
  assert console._DropNoise().filter(warn)  # pylint: disable=protected-access
