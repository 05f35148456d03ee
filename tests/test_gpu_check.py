"""benchmarks/gpu_check.py on the CPU: the no-GPU failure, the --dry_run end to end (with TensorFlow,
tfds and ml_collections made unimportable, as on the GPU machine), and the report logic."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _module():
  spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=ROOT, **extra)
  return env


def test_no_gpu_fails_at_once_in_one_line(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out)], capture_output=True,
                        text=True, timeout=120, env=_env(JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("gpu_check:")]
  assert len(lines) == 1 and lines[0].startswith("gpu_check: error: no GPU visible"), proc.stderr
  assert "--dry_run" in lines[0]
  assert not out.exists()  # Nothing half-written.


def test_peak_table_by_device_name():
  mod = _module()
  assert mod.peak_tflops("NVIDIA H200") == 989.4
  assert mod.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert mod.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert mod.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert mod.peak_tflops("NVIDIA L40S") == 362.0
  assert mod.peak_tflops("cpu") is None


def test_analytic_flops_match_a_hand_count():
  """ViT-B/16 at 224: 197 tokens, D=768, MLP 3072, 12 layers: ~35 GFLOP per image forward (the
  often quoted 17.6 "GFLOPs" counts multiply-adds)."""
  from shpeft_jax.models.clip_vit import get_model_config
  mod = _module()
  t, d, m = 197, 768, 3072
  hand = 12 * (2 * t * (4 * d * d + 2 * d * m) + 4 * t * t * d) + 2 * 196 * 16 * 16 * 3 * d
  assert mod.analytic_forward_flops(get_model_config("ViT-B/16")) == hand
  assert 34.5e9 < hand < 35.5e9


def test_targets_and_markdown_from_a_report():
  mod = _module()
  step = lambda mode, ips, ratio: {"framework": "jax", "mode": mode, "images_per_s": ips,
                                   "step_s": 64 / ips, "step_time_over_full": ratio}
  report = {
      "date_utc": "2026-01-01T00:00:00Z", "dry_run": False, "dtype": "bfloat16 compute",
      "sizes": {"model": "ViT-B/16", "image_size": 224}, "flops_basis": "3x forward",
      "device": {"device_kind": "NVIDIA H200", "backend": "gpu", "jax": "0.11.2",
                 "peak_bf16_tflops": 989.4},
      "score_pass": [{"framework": "jax", "batch": 64, "images_per_s": 4000.0,
                      "seconds_per_10k": 2.5, "mfu": 0.2, "first_call_s_incl_compile": 30.0},
                     {"framework": "jax", "batch": 128, "error": "RuntimeError: oom"}],
      "train_step": [step("full", 1000.0, 1.0), step("shpeft", 940.0, 1.064),
                     step("lora", 1500.0, 0.667)],
      "selection": {"skipped": "skipped: selection needs ~15 s"},
      "torch": {"score_pass": [], "train_step": [
          {"framework": "torch", "how": "eager", "mode": "full", "images_per_s": 900.0},
          {"framework": "torch", "how": "compile", "mode": "full", "images_per_s": 1100.0},
          {"framework": "torch", "how": "eager", "mode": "lora", "images_per_s": 1200.0}]}}
  t = mod.targets(report)
  assert t["score_10k_under_5s"] is True and t["score_10k_under_3s"] is True
  assert t["masked_step_within_1.05x_full"] is False  # 1.064
  assert t["jax_full_step_at_least_torch"] is False   # Against the faster (compiled) torch.
  assert t["jax_lora_step_at_least_torch"] is True
  assert t["jax_shpeft_step_at_least_torch"] is None  # Not measured in torch.
  report["targets"] = t
  md = mod.markdown(report)
  assert "NVIDIA H200" in md and "| jax (lax.scan) | 64 | 4000.0 | 2.50 | 20.0% |" in md
  assert "not run" in md  # No host-fed part in this report.
  assert "RuntimeError: oom" in md and "skipped: selection" in md
  assert "| jax | shpeft | 940.0 | 1.064 |" in md


_DRY_RUN = textwrap.dedent("""
    import json, runpy, sys
    FORBIDDEN = ("tensorflow", "tensorflow_datasets", "ml_collections")
    # As on the GPU machine: `import X` raises ModuleNotFoundError and importlib.util.find_spec(X)
    # returns None (torch._dynamo probes for tensorflow that way and copes).
    for name in FORBIDDEN:
      sys.modules[name] = None
    sys.argv = [sys.argv[1], "--dry_run", "--out", sys.argv[2], "--budget_s", "900"]
    runpy.run_path(sys.argv[0], run_name="__main__")
    print("MODULES " + json.dumps(sorted(
        m for m, v in sys.modules.items() if m.split(".")[0] in FORBIDDEN and v is not None)))
""")



@pytest.mark.slow
@pytest.mark.torch
def test_dry_run_end_to_end_without_tensorflow(tmp_path):
  """Every part runs on the tiny model; fields are consistent with hand counts; nothing of
  TensorFlow / tfds / ml_collections is imported (they are unimportable in this subprocess)."""
  pytest.importorskip("torch")
  out = tmp_path / "out"
  # Cheaper XLA compilation: the dry run checks the script, not the speed of the code.
  env = _env(XLA_FLAGS="--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", _DRY_RUN, SCRIPT, str(out)], capture_output=True,
                        text=True, timeout=900, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = json.loads([l for l in proc.stdout.splitlines() if l.startswith("MODULES ")][-1][8:])
  assert loaded == []

  r = json.loads((out / "gpu_check.json").read_text())
  md = (out / "gpu_check.md").read_text()
  assert r["dry_run"] and r["device"]["backend"] == "cpu" and r["device"]["peak_bf16_tflops"] is None
  assert r["forbidden_modules_loaded"] == []
  sz = r["sizes"]

  # Score pass: the image count follows from the sizes; seconds per 10k from the measured time.
  assert [s["batch"] for s in r["score_pass"]] == list(sz["score_batches"])
  for s in r["score_pass"]:
    chunk = sz["chunk_images"] // s["batch"]
    assert s["images"] == math.ceil(sz["score_images"] / (chunk * s["batch"])) * chunk * s["batch"]
    assert s["seconds"] > 0 and s["images_per_s"] == pytest.approx(s["images"] / s["seconds"])
    assert s["seconds_per_10k"] == pytest.approx(s["seconds"] * 1e4 / s["images"])
    assert s["mfu"] is None  # No peak for a CPU.
    # XLA's count = the analytic matmul FLOPs + the elementwise work (LayerNorm, GELU, softmax).
    analytic = r["forward_flops_per_image_analytic"]
    assert analytic <= s["forward_flops_per_image_cost_analysis"] <= 1.5 * analytic

  # Train steps: four modes, ratios to full, state bytes ordered as the optimizers dictate.
  steps = {s["mode"]: s for s in r["train_step"]}
  assert sorted(steps) == sorted(["full", "shpeft", "shpeft_sparse", "lora"])
  assert all(s["images_per_s"] > 0 and math.isfinite(s["loss"]) for s in steps.values())
  assert steps["full"]["step_time_over_full"] == 1.0
  for mode in ("shpeft", "shpeft_sparse", "lora"):
    assert steps[mode]["step_time_over_full"] == pytest.approx(
        steps[mode]["step_s"] / steps["full"]["step_s"])
  import jax
  from shpeft_jax.models.clip_vit import build_model, init_params
  from shpeft_jax.peft.sparse_optim import num_selected
  model = build_model(sz["model"], 4, image_size=sz["image_size"])
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  n_all = sum(x.size for x in jax.tree.leaves(shapes))
  n_enc = sum(x.size for x in jax.tree.leaves(shapes["encoder"]))
  k_sel = num_selected(_module().random_mask(shapes, sz["k_percent"]))
  count = 4  # The learning-rate schedule's int32 step count.
  assert steps["full"]["opt_state_bytes"] == 4 * n_all + count  # One float32 momentum per weight.
  assert steps["shpeft"]["opt_state_bytes"] == 4 * n_all + n_enc + count  # + a bool mask each.
  # K momentum floats + K int32 indices + the head's momentum.
  assert steps["shpeft_sparse"]["opt_state_bytes"] == 8 * k_sel + 4 * (n_all - n_enc) + count
  ma = {m: s["memory_analysis"] for m, s in steps.items()}
  assert ma["shpeft_sparse"]["peak_estimate_bytes"] < ma["shpeft"]["peak_estimate_bytes"]
  for m in ma.values():
    assert m["peak_estimate_bytes"] == (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
                                        - m["alias_size_in_bytes"] + m["temp_size_in_bytes"])

  # Selection: k of the tiny encoder's weights, the device threshold = the host's exact one.
  sel = r["selection"]
  assert sel["n"] == n_enc and sel["k"] == round(n_enc * sz["k_percent"] / 100)
  assert sel["agree"] and sel["device_threshold"] == sel["host_threshold"]
  assert sel["host_selected"] == sel["k"] <= sel["device_at_or_above"]

  # PyTorch on the exported weights: eager only in the dry run.
  t = r["torch"]
  assert [(s["how"], s["batch"]) for s in t["score_pass"]] == [
      ("eager", b) for b in sz["score_batches"]]
  assert [(s["how"], s["mode"]) for s in t["train_step"]] == [
      ("eager", "full"), ("eager", "shpeft"), ("eager", "lora")]
  assert all(s.get("images_per_s", 0) > 0 for s in t["score_pass"] + t["train_step"]), t

  assert set(r["targets"]) >= {"score_10k_under_5s", "masked_step_within_1.05x_full",
                               "jax_full_step_at_least_torch"}
  # Host-fed step: the same masked step, resident and fed per step; a uint8 batch is 1/4.
  h = r["host_fed"]
  assert h["mode"] == "shpeft" and h["batch"] == sz["step_batch"]
  assert h["host_fed_over_resident"] == pytest.approx(h["host_fed_step_s"] / h["resident_step_s"])
  assert h["batch_bytes_float32"] == 4 * h["batch_bytes_uint8"] == (
      4 * sz["step_batch"] * sz["image_size"] ** 2 * 3)
  # Larger towers (a tiny stand-in in the dry run): built from the shape name, all three parts.
  (tower,) = r["towers"]
  name = sz["towers"][0][1]
  assert tower["model"] == name and tower["batch"] == sz["towers"][0][2]
  from shpeft_jax.models.clip_vit import get_model_config
  tcfg = get_model_config(name)
  assert (tcfg.width, tcfg.layers, tcfg.heads, tcfg.mlp_dim) == (32, 2, 2, 64)
  sp = tower["score_pass"]
  assert sp["forward_flops_per_image_analytic"] == _module().analytic_forward_flops(
      get_model_config(name, image_size=sz["image_size"]))
  assert sp["images"] >= sz["tower_score_images"] and sp["images_per_s"] > 0
  for key in ("shpeft_step", "full_step"):
    assert tower[key]["model"] == name and math.isfinite(tower[key]["loss"]), tower[key]
  assert tower["shpeft_step"]["step_time_over_full"] == pytest.approx(
      tower["shpeft_step"]["step_s"] / tower["full_step"]["step_s"])
  assert r["complete"] and r["parts"] == sorted(_module().PARTS)

  assert "DRY RUN" in md and md.count("| jax | ") == 5 and md.count("| torch (eager) |") == 5
  assert "| tiny tower | `vit:p4-w32-l2-h2-m64` |" in md


def test_unknown_part_is_refused_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "o"), "--parts",
                         "score,towerz"], capture_output=True, text=True, timeout=120, env=_env())
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("gpu_check: error: unknown --parts ['towerz']; choose from "
                                 "score,steps,selection,hostfed,torch,towers,compile")
