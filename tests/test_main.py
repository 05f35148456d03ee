"""`python -m shpeft_jax.main` as a user runs it: the demo pipeline (tiny), reruns, flag errors."""

import json
import os
import re
import subprocess
import sys

from train_fixtures import REPO_ROOT, XLA_CACHE


def _main(*args, timeout=600, cwd=REPO_ROOT, pythonpath=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if pythonpath:
    env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
  return subprocess.run([sys.executable, "-m", "shpeft_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


# The demo config, shrunk to the tiny model and a few steps (the same stages and files).
_TINY_DEMO = ["--config", "configs/demo.py", "--config.model.name=test_tiny",
              "--config.train.batch_size=16", "--config.train.num_steps=4",
              "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
              "--config.peft.k_percent=5", "--config.peft.score_batches=2",
              "--config.pretrain.num_steps=4", "--config.pretrain.eval_every=2",
              "--config.pretrain.optim.warmup_steps=1",
              f"--config.compilation_cache_dir={XLA_CACHE}",
              # One seed and three methods: the single-run table (seeds: tests/test_seeds.py).
              "--config.sweep.seeds=()", '--config.methods=("shpeft","full","linear")']


def _table_rows(stdout):
  rows = {}
  for line in stdout.splitlines():
    m = re.fullmatch(r"(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line.strip())
    if m:
      rows[m.group(1)] = [float(x) for x in m.groups()[1:]]
  return rows


def test_demo_pipeline_prints_the_table_and_a_rerun_does_nothing(tmp_path):
  workdir = str(tmp_path / "demo")
  proc = _main(*_TINY_DEMO, "--workdir", workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = _table_rows(proc.stdout)
  assert list(rows) == ["shpeft", "full", "linear"], proc.stdout
  results = json.load(open(os.path.join(workdir, "results.json")))
  for method, (pct, f1, acc, auc) in rows.items():
    r = results[method]
    assert pct == round(100 * r["trainable"] / r["total"], 3)
    assert (f1, acc, auc) == tuple(round(100 * r["test"][k], 2)
                                   for k in ("f1_macro", "accuracy", "auc_macro"))
    meta = json.load(open(os.path.join(workdir, method, "export", "model", "meta.json")))
    assert meta["model"] == "test_tiny" and meta["method"] == method and meta["num_classes"] == 5
  assert rows["full"][0] == 100.0
  # The console: one line per run (its test / validation F1 as in results.json), the runs' own
  # stage lines in their console.txt, and a short whole (the seeded demo's count: README).
  err = [l for l in proc.stderr.replace("\r", "\n").splitlines() if l.strip()]
  for i, method in enumerate(("shpeft", "full", "linear")):
    r = results[method]
    line = (f"[{i + 1}/3] {method}: test F1 {100 * r['test']['f1_macro']:.2f}, "
            f"val F1 {100 * r['validation']['f1_macro']:.2f} (")
    assert sum(l.startswith(line) for l in err) == 1, proc.stderr[-3000:]
    own = open(os.path.join(workdir, method, "console.txt")).read()
    assert f"{method} on digits_target: test_tiny with 5 classes, 4 steps" in own
    assert f"{method} on digits_target" not in proc.stderr
  assert "full on digits_source" in proc.stderr  # the single pretrain run keeps its lines
  lines = proc.stdout.count("\n") + proc.stderr.count("\n")
  assert lines < 20, proc.stdout + proc.stderr
  # The linear probe trains exactly the head: 32 * 5 + 5 of the tiny model's weights.
  assert results["linear"]["trainable"] == 32 * 5 + 5
  # The transfer started from the pre-trained encoder, trained on the other task.
  pre = json.load(open(os.path.join(workdir, "pretrain", "results.json")))
  assert pre["dataset"] == "digits_source" and results["shpeft"]["dataset"] == "digits_target"
  cfg = json.load(open(os.path.join(workdir, "shpeft", "config.json")))
  assert cfg["model"]["init_checkpoint"] == os.path.join(workdir, "pretrain", "export", "model")

  stamps = {m: os.path.getmtime(os.path.join(workdir, m, "metrics.jsonl"))
            for m in ("pretrain", "shpeft", "full", "linear")}
  again = _main(*_TINY_DEMO, "--workdir", workdir)
  assert again.returncode == 0, again.stderr[-4000:]
  assert _table_rows(again.stdout) == rows
  assert stamps == {m: os.path.getmtime(os.path.join(workdir, m, "metrics.jsonl")) for m in stamps}


def test_unknown_config_key_is_a_clear_error(tmp_path):
  proc = _main("--config", "configs/demo.py", "--workdir", str(tmp_path / "w"),
               "--config.train.num_stepz=3", timeout=120)
  assert proc.returncode == 2
  assert "unknown config field" in proc.stderr
  err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert err == ["error: unknown config field 'train.num_stepz'; did you mean 'train.num_steps'? "
                 "`python -m shpeft_jax.main --config FILE --help` lists every field (new fields "
                 "cannot be added from the command line)."], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()


def test_help_exits_0_and_lists_every_config_field():
  from configs import oct as oct_config  # pylint: disable=g-import-not-at-top
  proc = _main("--config", "configs/oct.py", "--help", timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  listed = {l.split("=")[0].strip()[len("--config."):] for l in proc.stdout.splitlines()
            if l.strip().startswith("--config.") and "=" in l and "FIELD" not in l}

  def fields(c, prefix=""):
    for k in c.keys():
      v = c[k]
      if hasattr(v, "keys"):
        yield from fields(v, f"{prefix}{k}.")
      else:
        yield f"{prefix}{k}"
  assert listed == set(fields(oct_config.get_config())) and "train.num_steps" in listed


def test_a_dataset_config_loads_from_anywhere_and_rejects_unknown_fields(tmp_path):
  """configs/oct.py imports the recipe from the package (no sys.path tricks): it loads by absolute
  path from another directory, and an unknown field is still the one-line error."""
  proc = _main("--config", os.path.join(REPO_ROOT, "configs", "oct.py"), "--workdir",
               str(tmp_path / "w"), "--config.bogus=1", timeout=120, cwd=str(tmp_path),
               pythonpath=REPO_ROOT)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "unknown config field" in proc.stderr and "bogus" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()


def test_bad_input_exits_with_the_message(tmp_path):
  proc = _main("--config", "configs/common.py", "--workdir", str(tmp_path / "w"),
               "--config.peft.method=magic", timeout=120)
  assert proc.returncode == 2
  assert "error: ConfigError: Unknown peft.method 'magic'" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()


# A killed run's resume (kill -9, async checkpoints, bit-identical to an uninterrupted run):
# tests/reliability/test_kill_resume.py.
