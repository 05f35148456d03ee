"""The trainer end to end on the tiny ViT and the bundled digits: sharding, exact resume, bad input.

References are independent of the trainer's own bookkeeping: an uninterrupted run for the resumed
one, a 1-device run for the 8-device mesh, the init checkpoint for frozen weights, and scikit-learn
on logits recomputed from the exported model for the reported metrics.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from train_fixtures import REPO_ROOT, make_tiny_config
from shpeft_jax import checkpoints, sharding, train, utils
from shpeft_jax.peft import scoring
from shpeft_jax.errors import CheckpointError, ConfigError, DataError
from shpeft_jax.models import clip_vit
from shpeft_jax.peft import methods

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _export(workdir):
  params, meta = checkpoints.load_params(os.path.join(workdir, "export", "model"))
  return utils.flatten_names(params), meta


def _assert_trees_equal(a, b):
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _init_checkpoint(path, model_name="test_tiny", image_size=16, meta_model=None, seed=1,
                     subnormals=False):
  """A random 'pretrained' classifier checkpoint like `convert` writes (10 classes: a source head).

  subnormals=True plants float32 subnormals (which XLA arithmetic flushes to zero) in a kernel, so
  that 'frozen weights stay bit-identical' also covers them.
  """
  model = clip_vit.build_model(model_name, 10, image_size=image_size)
  shapes = jax.eval_shape(lambda k: clip_vit.init_params(model, k), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)  # Any values do; numpy avoids compiling an init.
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  if subnormals:
    kernel = params["encoder"]["resblocks_1"]["mlp"]["c_fc"]["kernel"].reshape(-1)
    kernel[:64:4] = np.float32(1e-40) * np.sign(kernel[:64:4])
  checkpoints.save_params(path, params, {"model": meta_model or model_name,
                                         "image_size": image_size, "num_classes": None})
  return utils.flatten_names(jax.tree.map(np.asarray, params))


# ---------------------------------------------------------------------------------------------
# Exact resume, frozen weights, the stage files.


def test_stop_and_resume_gives_exactly_the_uninterrupted_params(tmp_path):
  init = _init_checkpoint(str(tmp_path / "init"), subnormals=True)
  config = make_tiny_config("shpeft", num_steps=6)
  config.model.init_checkpoint = str(tmp_path / "init")
  config.optim.grad_clip = 0.05

  full = train.train_and_evaluate(config, str(tmp_path / "a"))
  # Step 1 (no momentum yet, cosine at its peak): the update is lr * the clipped gradient.
  first = json.loads(open(tmp_path / "a" / "metrics.jsonl").readline())
  assert first["step"] == 1 and first["grad_norm"] > 0.05
  assert first["update_norm"] == pytest.approx(0.05 * 0.05, rel=1e-4)
  config.train.stop_after_steps = 3
  stopped = train.train_and_evaluate(config, str(tmp_path / "b"))
  assert stopped == {"stopped_at": 3}
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["2", "3"]  # keep_checkpoints=2
  assert not (tmp_path / "b" / "results.json").exists()
  config.train.stop_after_steps = 0
  resumed = train.train_and_evaluate(config, str(tmp_path / "b"))

  a, meta = _export(str(tmp_path / "a"))
  b, _ = _export(str(tmp_path / "b"))
  _assert_trees_equal(a, b)  # Bit for bit.
  assert resumed["test"] == full["test"]
  assert meta["model"] == "test_tiny" and meta["num_classes"] == 5 and meta["method"] == "shpeft"

  # Training moved the selected weights; every other encoder weight is bit-identical to the init
  # checkpoint; the head (re-initialised for the 5 target classes) is fully trained.
  from shpeft_jax.peft import mask_io
  mask = utils.flatten_names(mask_io.load_mask(str(tmp_path / "a" / "mask.npz")))
  n_encoder = sum(v.size for n, v in init.items() if n.startswith("encoder/"))
  n_selected = sum(int(mask[n].sum()) for n in mask if n.startswith("encoder/"))
  assert n_selected == round(0.05 * n_encoder)
  moved = 0
  for name, value in a.items():
    if name.startswith("head/"):
      assert value.shape[-1] == 5 or value.shape == (5,)
      continue
    frozen = ~mask[name]
    np.testing.assert_array_equal(value[frozen].view(np.uint32), init[name][frozen].view(np.uint32),
                                  err_msg=name)
    moved += int(np.count_nonzero(value[~frozen] != init[name][~frozen]))
  assert moved > 0.5 * n_selected

  # mask_stats.json records the selection next to the counts, checked against a hand count over
  # the saved scores: k of N encoder weights, tau = the k-th largest score, the ties at tau.
  from shpeft_jax import params_io
  stats = json.load(open(tmp_path / "a" / "mask_stats.json"))
  scores = utils.flatten_names(params_io.restore_tree(str(tmp_path / "a" / "scores")))
  flat_scores = np.concatenate([np.asarray(scores[n], np.float32).ravel() for n in sorted(scores)
                                if n.startswith("encoder/")])
  tau = np.sort(flat_scores)[::-1][n_selected - 1]
  assert (stats["k"], stats["n"], stats["selected"]) == (n_selected, n_encoder, n_selected)
  assert stats["k_percent"] == pytest.approx(100.0 * n_selected / n_encoder)
  assert stats["threshold"] == pytest.approx(float(tau), rel=1e-6)
  assert stats["num_tied"] == int(np.sum(flat_scores == tau))
  assert stats["num_above"] == int(np.sum(flat_scores > tau))
  assert stats["config"]["method"] == "shpeft"

  # metrics.jsonl has each logged step once, even though run b was interrupted and resumed.
  lines = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
  train_steps = [l["step"] for l in lines if l["kind"] == "train"]
  assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 6
  assert [l["kind"] for l in lines].count("test") == 1


def test_rerun_skips_finished_stages(tmp_path):
  config = make_tiny_config("shpeft", num_steps=2)
  config.model.dtype = "bfloat16"  # The bfloat16 compute path, on the way.
  first = train.train_and_evaluate(config, str(tmp_path))
  losses = [json.loads(l)["loss"] for l in open(tmp_path / "metrics.jsonl") if '"train"' in l]
  assert len(losses) == 2 and all(np.isfinite(losses)) and 1.0 < losses[0] < 2.5
  stamp = {p: os.path.getmtime(tmp_path / p) for p in ("mask.npz", "results.json", "scores")}
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again == first
  assert stamp == {p: os.path.getmtime(tmp_path / p) for p in stamp}

  # Without results, the run restarts from the final checkpoint and reuses mask and scores.
  os.remove(tmp_path / "results.json")
  third = train.train_and_evaluate(config, str(tmp_path))
  assert third["test"] == first["test"]
  assert stamp["mask.npz"] == os.path.getmtime(tmp_path / "mask.npz")


def test_reported_metrics_match_sklearn_on_the_exported_model(tmp_path):
  from shpeft_jax.data import input_pipeline
  config = make_tiny_config("full", num_steps=4)
  config.train.eval_every = 2
  config.train.report_best = True  # Report (and export) the best-validation model.
  results = train.train_and_evaluate(config, str(tmp_path))
  params, meta = checkpoints.load_params(str(tmp_path / "export" / "model"))
  model = clip_vit.build_model(meta["model"], meta["num_classes"], image_size=meta["image_size"])
  logits, labels = [], []
  for batch in input_pipeline.make_eval_iterator(config.data, split="test", global_batch_size=7,
                                                 image_size=16):
    keep = batch["valid"]
    logits.append(np.asarray(model.apply({"params": params}, batch["image"]))[keep])
    labels.append(batch["label"][keep])
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  assert len(labels) == input_pipeline.dataset_info(config.data).split_sizes["test"]
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  pred = logits.argmax(1)
  test = results["test"]
  assert test["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred), abs=1e-9)
  assert test["f1_macro"] == pytest.approx(skm.f1_score(labels, pred, average="macro"), abs=1e-9)
  assert test["auc_macro"] == pytest.approx(
      skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-5)
  assert results["trainable"] == results["total"] == utils.count_params(params)

  # Validation ran at steps 2 and 4; the best one is kept as a params checkpoint.
  vals = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"val"' in l]
  assert [v["step"] for v in vals] == [2, 4]
  best = json.load(open(tmp_path / "best.json"))
  assert best["f1_macro"] == max(v["f1_macro"] for v in vals)
  assert checkpoints.load_meta(str(tmp_path / "best"))["step"] == best["step"]
  assert results["reported"] == "best" and results["best_step"] == best["step"] == meta["step"]

  # TensorBoard event files carry the same training loss as metrics.jsonl.
  import tensorflow as tf
  tb = os.path.join(tmp_path, "tb")
  events = [e for f in os.listdir(tb) for e in tf.compat.v1.train.summary_iterator(
      os.path.join(tb, f))]
  losses = {e.step: float(tf.make_ndarray(v.tensor)) for e in events for v in e.summary.value
            if v.tag == "train/loss"}
  jsonl = {l["step"]: l["loss"] for l in map(json.loads, open(tmp_path / "metrics.jsonl"))
           if l["kind"] == "train"}
  assert losses.keys() == jsonl.keys()
  for step in losses:
    assert losses[step] == pytest.approx(jsonl[step], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# 8-device mesh == 1 device; restoring onto another device count; batch/device divisibility.

_EIGHT_DEVICES = textwrap.dedent("""
    import json, os, shutil, sys
    sys.path.insert(0, {tests!r})
    from train_fixtures import make_tiny_config
    import jax
    assert jax.device_count() == 8, jax.devices()
    from shpeft_jax import sharding, train
    from shpeft_jax.errors import ConfigError
    bad = make_tiny_config(batch_size=12)
    try:
      train.train_and_evaluate(bad, {bad_dir!r})
      print("NO-ERROR")
    except ConfigError as e:
      print("BATCH-ERROR:", e)
    config = make_tiny_config("shpeft", num_steps=6)
    config.mesh.fsdp = 2                   # params, opt state and mask sharded over 2 devices
    for workdir in ({full!r}, {half!r}):
      os.makedirs(workdir)
      shutil.copy({mask!r}, os.path.join(workdir, "mask.npz"))  # the 1-device run's selection
    train.train_and_evaluate(config, {full!r})
    mesh = sharding.make_mesh(config.mesh)
    print("MESH:", json.dumps(dict(mesh.shape)))
    config.train.stop_after_steps = 3
    print("STOPPED:", train.train_and_evaluate(config, {half!r}))
""")


def test_eight_device_mesh_matches_one_device_and_resumes_across_device_counts(tmp_path):
  config = make_tiny_config("shpeft", num_steps=6)
  one = str(tmp_path / "one")
  train.train_and_evaluate(config, one)
  script = _EIGHT_DEVICES.format(tests=TESTS_DIR, bad_dir=str(tmp_path / "bad"),
                                 full=str(tmp_path / "eight"), half=str(tmp_path / "half"),
                                 mask=os.path.join(one, "mask.npz"))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = proc.stdout
  assert "BATCH-ERROR: train.batch_size=12 is not divisible by the 8 devices" in out, out
  assert not (tmp_path / "bad").exists() or not (tmp_path / "bad" / "checkpoints").exists()
  assert 'MESH: {"data": 4, "fsdp": 2}' in out
  assert "STOPPED: {'stopped_at': 3}" in out

  a, _ = _export(one)
  b, _ = _export(str(tmp_path / "eight"))
  assert a.keys() == b.keys()
  init_diff = 0.0
  for name in a:
    np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=2e-6, err_msg=name)
    init_diff = max(init_diff, float(np.abs(a[name]).max()))
  assert init_diff > 0

  # The 8-device checkpoint at step 3 finishes on this process's device(s): same params again.
  config.train.stop_after_steps = 0
  train.train_and_evaluate(config, str(tmp_path / "half"))
  c, _ = _export(str(tmp_path / "half"))
  for name in a:
    np.testing.assert_allclose(c[name], a[name], rtol=1e-5, atol=2e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before any long work.


def _assert_no_work(workdir):
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  assert not os.path.exists(os.path.join(workdir, "mask.npz"))


def test_missing_dataset(tmp_path):
  config = make_tiny_config()
  config.data.name = "busi"
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.manual_dir = str(tmp_path / "nowhere")
  with pytest.raises(DataError, match="nowhere"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  _assert_no_work(str(tmp_path / "w"))


def test_checkpoint_of_another_model_size(tmp_path):
  _init_checkpoint(str(tmp_path / "small"), model_name="demo_small")
  config = make_tiny_config()
  config.model.init_checkpoint = str(tmp_path / "small")
  with pytest.raises(CheckpointError, match="holds a 'demo_small' model but config.model.name="
                     "'test_tiny'"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  _assert_no_work(str(tmp_path / "w"))

  # The same mistake hidden behind a wrong meta.json is caught by the shapes.
  _init_checkpoint(str(tmp_path / "liar"), model_name="demo_small", meta_model="test_tiny")
  config.model.init_checkpoint = str(tmp_path / "liar")
  with pytest.raises(CheckpointError, match="another model size"):
    train.train_and_evaluate(config, str(tmp_path / "w2"))
  _assert_no_work(str(tmp_path / "w2"))

  config.model.init_checkpoint = str(tmp_path / "absent")
  with pytest.raises(CheckpointError, match="does not exist"):
    train.train_and_evaluate(config, str(tmp_path / "w3"))


@pytest.mark.parametrize("field,value,match", [
    ("peft.method", "magic", "peft.method 'magic'"),
    ("peft.k_percent", 0.0, r"k_percent must be in \(0, 100\]"),
    ("peft.k_percent", 150.0, r"k_percent must be in \(0, 100\]"),
    ("train.batch_size", 0, "must be a positive integer"),
    ("mesh.fsdp", 3, "mesh.fsdp=3 must divide"),
    ("model.name", "ViT-Z/99", "Unknown model"),
    ("data.test_split", "nope", "unknown split 'nope'"),
])
def test_bad_config_values(tmp_path, field, value, match):
  config = make_tiny_config()
  section, key = field.split(".")
  config[section][key] = value
  if field == "mesh.fsdp" and jax.device_count() % 3 == 0:
    pytest.skip("3 divides the device count")
  with pytest.raises(ConfigError, match=match):
    train.train_and_evaluate(config, str(tmp_path))
  _assert_no_work(str(tmp_path))


def test_head_warmup_changes_only_the_scoring_head(tmp_path):
  """peft.head_warmup_steps > 0 scores with a linear-probed head: the scores differ from the
  fresh-head scores, and equal a hand-made warm-up followed by the same score pass."""
  from shpeft_jax.data import input_pipeline
  from shpeft_jax.peft import importance

  fresh = make_tiny_config(num_steps=2)
  fresh.peft.score_batches = 2
  warm = make_tiny_config(num_steps=2)
  warm.peft.score_batches = 2
  warm.peft.head_warmup_steps = 3
  warm.peft.head_warmup_lr = 0.5
  num_classes = train.validate_config(warm)["num_classes"]
  model = train.build_model(warm, num_classes)
  params = clip_vit.init_params(model, jax.random.PRNGKey(warm.seed))
  loss_fn = train.make_loss_fn(model)
  mesh = sharding.make_mesh(warm.mesh)
  method = methods.resolve(warm.peft)
  s_fresh = scoring.score(fresh, method, str(tmp_path / "fresh"), loss_fn, params, mesh)
  s_warm = scoring.score(warm, method, str(tmp_path / "warm"), loss_fn, params, mesh)

  # Independent reference: warm the head by hand, then score with the fresh-head code path.
  it = input_pipeline.make_train_iterator(
      warm.data, split="train", global_batch_size=warm.train.batch_size,
      image_size=warm.model.image_size, seed=warm.seed + 2, start_step=0)
  warmed, _ = importance.warm_up_head(loss_fn, params, it, steps=3, lr=0.5)
  assert not np.allclose(warmed["head"]["kernel"], params["head"]["kernel"])
  s_ref = scoring.score(fresh, method, str(tmp_path / "ref"), loss_fn, warmed, mesh)
  k = "encoder/resblocks_0/mlp/c_fc/kernel"
  fw, ff, fr = (utils.flatten_names(s)[k] for s in (s_warm, s_fresh, s_ref))
  np.testing.assert_allclose(np.asarray(fw), np.asarray(fr), rtol=1e-5, atol=1e-12)
  assert not np.allclose(np.asarray(fw), np.asarray(ff), rtol=1e-3)
