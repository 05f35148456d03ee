"""Every entry point that loads a checkpoint runs the checkpoint's own tower.

Runs are trained from two towers that are not OpenAI's QuickGELU tower: a real HF
`CLIPVisionModel` with `hidden_act="gelu"` (the LAION / DataComp ports), converted with
`python -m shpeft_jax.convert`, and a BiomedCLIP-like timm trunk (exact GELU, LayerNorm eps 1e-6,
patch bias, no ln_pre). The reference is the trainer's own evaluation of the test split (its
model is built from the init checkpoint's tower); predict on the run and on its adapter + base,
report's re-evaluation, the sparsity analysis' model and the exported PyTorch files must all give
the same probabilities. Before `models/of_checkpoint.py`, predict ran both as QuickGELU towers.
"""

import os
import sys

import jax
import numpy as np
import pytest

from train_fixtures import make_tiny_config
from test_predict import CLASSES, TEST_IMAGES, _image_folder, _trainer_eval
from shpeft_jax import checkpoints, predict, report
from shpeft_jax.analysis import sparsity
from shpeft_jax.evaluation import metrics
from shpeft_jax.models import clip_vit, of_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_GELU = {**clip_vit.TOWER_DEFAULTS, "act": "gelu", "ln_eps": 1e-5, "ln_pre": True, "patch_bias": False}
TIMM_TRUNK = {**clip_vit.TOWER_DEFAULTS, "act": "gelu", "ln_eps": 1e-6, "ln_pre": False, "patch_bias": True}


def _hf_gelu_init(tmp):
  """A random HF CLIPVisionModel (gelu) saved as a model directory, converted by the CLI."""
  from shpeft_jax import convert as convert_cli  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import torch_reference as tr  # pylint: disable=g-import-not-at-top
  torch.manual_seed(3)
  hf = transformers.CLIPVisionModel(tr.hf_vision_config(clip_vit.get_model_config("test_tiny",
                                                                                   act="gelu")))
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.05 * torch.randn_like(p))
  hf.save_pretrained(os.path.join(tmp, "hf"))
  out = os.path.join(tmp, "init")
  assert convert_cli.main([os.path.join(tmp, "hf"), "--out", out]) == 0
  return out


def _timm_trunk_init(tmp):
  """Random params of the timm-trunk tower with its meta.json (as convert writes it)."""
  model = clip_vit.build_model("test_tiny", 10, tower=TIMM_TRUNK)
  shapes = jax.eval_shape(lambda k: clip_vit.init_params(model, k), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32),
                        shapes)
  out = os.path.join(tmp, "init")
  checkpoints.save_params(out, {"encoder": params["encoder"]},
                          {"model": "test_tiny", "image_size": 16, "num_classes": None,
                           **TIMM_TRUNK})
  return out


@pytest.fixture(scope="module", params=["hf_gelu", "timm_trunk"])
def tower_run(request, tmp_path_factory):
  from shpeft_jax import train  # pylint: disable=g-import-not-at-top
  tmp = str(tmp_path_factory.mktemp(request.param))
  init = {"hf_gelu": _hf_gelu_init, "timm_trunk": _timm_trunk_init}[request.param](tmp)
  tower = {"hf_gelu": HF_GELU, "timm_trunk": TIMM_TRUNK}[request.param]
  assert clip_vit.tower_from_meta(checkpoints.load_meta(init)) == tower
  root = _image_folder(os.path.join(tmp, "images"))
  config = make_tiny_config("shpeft", num_steps=3, batch_size=8)
  config.data.name = "image_folder"
  config.data.manual_dir = root
  config.data.data_dir = os.path.join(tmp, "tfds")
  config.train.eval_batch_size = 8
  config.peft.score_batches = 2
  config.model.init_checkpoint = init
  workdir = os.path.join(tmp, "run")
  train.train_and_evaluate(config, workdir)
  by_name, labels, _ = _trainer_eval(config, workdir)
  assert len(by_name) == len(CLASSES) * len(TEST_IMAGES)
  return request.param, tower, config, root, workdir, init, by_name, labels


def _assert_same(files, probs, root, by_name, tol=1e-6):
  assert len(files) == len(by_name)
  for f, p in zip(files, probs):
    rel = os.path.relpath(f, root).replace(os.sep, "/")
    np.testing.assert_allclose(p, metrics.softmax(by_name[rel].astype(np.float64)), atol=tol,
                               rtol=0, err_msg=rel)


def test_the_model_of_a_checkpoint_is_its_tower(tower_run):
  _, tower, _, _, workdir, _, _, _ = tower_run
  params, meta = checkpoints.load_params(os.path.join(workdir, "export", "model"))
  model = of_checkpoint.model_of_checkpoint(params, meta)
  assert model.config.tower() == tower and model.num_classes == len(CLASSES)
  # The analysis builds the same model.
  ckpt = sparsity.Checkpoint(params=params, meta=meta, path=workdir)
  assert sparsity.model_for(ckpt).config == model.config


def test_predict_run_gives_the_trainers_probabilities(tower_run):
  _, _, _, root, workdir, _, by_name, _ = tower_run
  files, _ = predict.list_inputs([os.path.join(root, "test")])
  loaded = predict.load_model(workdir)
  done, probs, unreadable = predict.predict_files(loaded, files, batch_size=8, progress=False)
  assert not unreadable
  _assert_same(done, probs, root, by_name)


def test_report_reevaluation_is_the_trainers(tower_run):
  _, _, _, _, workdir, _, by_name, labels = tower_run
  logits, labels2, _ = report.predictions_from_checkpoint(workdir)
  np.testing.assert_array_equal(labels2, labels)
  np.testing.assert_allclose(logits, np.stack(list(by_name.values())), atol=1e-6, rtol=0)


def test_adapter_with_base_gives_the_trainers_probabilities(tower_run):
  name, _, _, root, workdir, init, by_name, _ = tower_run
  adapter_dir = os.path.join(workdir, "export", "adapter")
  if name == "timm_trunk":
    # Adapters hold OpenAI-layout towers: the trainer says so instead of writing a wrong one.
    assert not os.path.exists(adapter_dir)
    return
  files, _ = predict.list_inputs([os.path.join(root, "test")])
  loaded = predict.load_model(adapter_dir, base=init)
  done, probs, _ = predict.predict_files(loaded, files, batch_size=8, progress=False)
  _assert_same(done, probs, root, by_name, tol=1e-5)


# (tower, layout) pairs whose PyTorch class cannot compute the tower: refused in one line.
REFUSED = {("hf_gelu", "openai"), ("timm_trunk", "openai"), ("timm_trunk", "open_clip"),
           ("timm_trunk", "hf")}


@pytest.mark.parametrize("layout", ["openai", "open_clip", "hf", "timm"])
def test_exports_compute_the_trainers_logits_in_torch(tower_run, layout, tmp_path, capsys):
  from shpeft_jax import export  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import torch_reference as tr  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  name, _, _, root, workdir, _, by_name, _ = tower_run
  out = str(tmp_path / "m.safetensors")
  rc = export.main([os.path.join(workdir, "export", "model"), "--format", layout, "--out", out])
  if (name, layout) in REFUSED:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot be written as" in err[0] or "QuickGELU" in err[0]
    assert not os.path.exists(out)
    return
  assert rc == 0
  if layout == "timm":  # timm imports torchvision, which cannot load beside the CPU torch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))
    import reference_libs  # pylint: disable=g-import-not-at-top
    reference_libs.import_reference("timm")
  module = tr.load_exported(out).eval()
  files = [f for f in sorted(by_name) if f.endswith((".png", ".jpg", ".bmp"))][:6]
  x = np.stack([input_pipeline.eval_transform(open(os.path.join(root, f), "rb").read(), 16).numpy()
                for f in files])
  with torch.no_grad():
    got = module(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  np.testing.assert_allclose(got, np.stack([by_name[f] for f in files]), atol=1e-5, rtol=0)


def test_every_file_written_follows_the_umask(tower_run, tmp_path):
  """Training, export in every format (peft included), predict and report under umask 022: every
  file is 0644 and every folder 0755 (mkstemp / safetensors make owner-only 0600 files)."""
  import stat  # pylint: disable=g-import-not-at-top
  from shpeft_jax import export  # pylint: disable=g-import-not-at-top
  name, _, _, root, workdir, init, _, _ = tower_run
  if name != "hf_gelu":
    pytest.skip("one tower is enough")
  old = os.umask(0o022)
  try:
    out = tmp_path / "out"
    for fmt in ("open_clip", "hf", "timm"):
      assert export.main([os.path.join(workdir, "export", "model"), "--format", fmt,
                          "--out", str(out / f"m_{fmt}.safetensors")]) == 0
    assert export.main([os.path.join(workdir, "export", "model"), "--format", "peft",
                        "--base", init, "--out", str(out / "peft")]) == 0
    assert predict.main([workdir, os.path.join(root, "test"), "--out", str(out / "p.csv"),
                         "--no_progress"]) == 0
    assert report.main([workdir]) == 0
  finally:
    os.umask(old)
  bad = []
  for top in (workdir, str(out)):
    for r, dirs, files in os.walk(top):
      for d in dirs:
        if stat.S_IMODE(os.stat(os.path.join(r, d)).st_mode) != 0o755:
          bad.append((os.path.join(r, d), oct(os.stat(os.path.join(r, d)).st_mode)))
      for f in files:
        if stat.S_IMODE(os.stat(os.path.join(r, f)).st_mode) != 0o644:
          bad.append((os.path.join(r, f), oct(os.stat(os.path.join(r, f)).st_mode)))
  assert not bad, bad[:10]


def _eval_images(root, names):
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  x = np.stack([input_pipeline.eval_transform(open(os.path.join(root, f), "rb").read(), 16).numpy()
                for f in names])
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_hf_directory_is_the_base_of_the_peft_adapter(tower_run, tmp_path, capsys):
  """docs/ADAPTERS.md's recipe: `export BASE --format hf --out BASE_HF_DIR` is a directory that
  CLIPVisionModel.from_pretrained loads strictly (config.json says gelu); the run exported the same
  way gives the trainer's logits; the peft adapter loaded onto BASE_HF_DIR reproduces them."""
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  from shpeft_jax import export  # pylint: disable=g-import-not-at-top
  name, _, _, root, workdir, init, by_name, _ = tower_run
  base_dir, run_dir, peft_dir = (str(tmp_path / d) for d in ("base_hf", "run_hf", "peft"))
  if name == "timm_trunk":  # no CLIPVisionModel computes a timm trunk: refused in one line
    assert export.main([init, "--format", "hf", "--out", base_dir]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Use --format timm" in err[0] and not os.path.exists(base_dir)
    return
  peft = pytest.importorskip("peft")
  assert export.main([init, "--format", "hf", "--out", base_dir]) == 0
  assert export.main([os.path.join(workdir, "export", "model"), "--format", "hf",
                      "--out", run_dir]) == 0
  assert export.main([os.path.join(workdir, "export", "model"), "--format", "peft", "--base",
                      init, "--out", peft_dir]) == 0
  base, info = transformers.CLIPVisionModel.from_pretrained(base_dir, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert base.config.hidden_act == "gelu" and base.config.layer_norm_eps == 1e-5
  files = [f for f in sorted(by_name) if f.endswith((".png", ".jpg", ".bmp"))][:6]
  x, want = _eval_images(root, files), np.stack([by_name[f] for f in files])

  def logits(model, head_file):
    head = load_file(head_file)
    with torch.no_grad():
      feats = model.eval()(pixel_values=x).pooler_output
      return (F.normalize(feats, dim=-1) @ head["head.weight"].T + head["head.bias"]).numpy()

  run, info = transformers.CLIPVisionModel.from_pretrained(run_dir, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  np.testing.assert_allclose(logits(run, os.path.join(run_dir, "head.safetensors")), want,
                             atol=1e-5, rtol=0)
  adapted = peft.PeftModel.from_pretrained(base, peft_dir)
  np.testing.assert_allclose(logits(adapted, os.path.join(peft_dir, "head.safetensors")), want,
                             atol=1e-5, rtol=0)
