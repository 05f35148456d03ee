"""`python -m shpeft_jax.report` on fixture run directories: numbers equal sklearn's, the PNGs are
real images of a sensible size, the HTML page embeds them, a directory of runs gets one page."""

import base64
import json
import os
import re
import time

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from shpeft_jax import report
from shpeft_jax.evaluation import metrics as M
from shpeft_jax.peft import mask_io

CLASSES = ["benign", "malignant", "normal", "other"]


def _fake_run(run_dir, method="shpeft", seed=0, n=120, with_mask=True, dataset="busi"):
  """A finished run as the trainer leaves it: results, metrics.jsonl, mask stats, predictions."""
  rng = np.random.default_rng(seed)
  k = len(CLASSES)
  labels = rng.integers(0, k, n)
  logits = rng.normal(size=(n, k)) + (1.0 + seed) * np.eye(k)[labels]
  os.makedirs(run_dir, exist_ok=True)
  report.save_predictions(os.path.join(run_dir, report.PREDICTIONS), logits, labels, CLASSES)
  test = M.classification_metrics(logits, labels, k)
  with open(os.path.join(run_dir, "results.json"), "w") as f:
    json.dump({"method": method, "dataset": dataset, "steps": 300, "trainable": 1234,
               "total": 100000, "trainable_percent": 1.234, "test": test, "test_final": test,
               "reported": "final"}, f)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for step in range(10, 301, 10):
      f.write(json.dumps({"step": step, "kind": "train", "loss": 2.0 / step ** (0.3 + 0.1 * seed),
                          "lr": 0.3 * (1 + np.cos(np.pi * step / 300)) / 2}) + "\n")
      if step % 100 == 0:
        f.write(json.dumps({"step": step, "kind": "val", "f1_macro": 0.5 + step / 1000 + 0.05 * seed,
                            "accuracy": 0.55 + step / 1000, "auc_macro": 0.8 + step / 3000}) + "\n")
    f.write('{"step": 300, "kind": "tr')  # a torn last line (killed run) is skipped
  if with_mask:
    mask = {"encoder": {f"resblocks_{i}": {"attn": {"query": {"kernel": rng.random((8, 2, 4)) < 0.02 * (i + 1)}},
                                           "mlp": {"c_fc": {"kernel": rng.random((8, 32)) < 0.01}}}
                        for i in range(3)}, "head": None}
    mask_io.save_mask_stats(os.path.join(run_dir, "mask_stats.json"), mask)
  return logits, labels


def _check_png(path, min_w=400, min_h=300):
  assert os.path.isfile(path), path
  assert os.path.getsize(path) > 15_000, (path, os.path.getsize(path))
  with Image.open(path) as im:
    assert im.format == "PNG"
    w, h = im.size
    assert w >= min_w and h >= min_h, (path, im.size)
    a = np.asarray(im.convert("L"))
  # Not blank: a real figure has many grey levels and ink on a good part of the canvas.
  assert len(np.unique(a)) > 20 and (a < 200).mean() > 0.01, path


def test_run_report_numbers_equal_sklearn(tmp_path):
  run = str(tmp_path / "run")
  logits, labels = _fake_run(run)
  assert report.main([run]) == 0
  out = os.path.join(run, "report")
  rep = json.load(open(os.path.join(out, "per_class.json")))
  preds = logits.argmax(-1)
  p, r, f, s = skm.precision_recall_fscore_support(labels, preds, zero_division=0)
  assert [c["name"] for c in rep["classes"]] == CLASSES
  np.testing.assert_allclose([c["precision"] for c in rep["classes"]], p, atol=1e-6)
  np.testing.assert_allclose([c["recall"] for c in rep["classes"]], r, atol=1e-6)
  np.testing.assert_allclose([c["f1"] for c in rep["classes"]], f, atol=1e-6)
  assert [c["support"] for c in rep["classes"]] == list(s)
  probs = M.softmax(logits.astype(np.float32).astype(np.float64))  # saved as float32
  for c, name in enumerate(CLASSES):
    assert rep["classes"][c]["auc"] == pytest.approx(
        skm.roc_auc_score(labels == c, probs[:, c]), abs=1e-9)
  assert rep["auc_macro"] == pytest.approx(
      skm.roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-9)
  assert rep["macro"]["f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro"), abs=1e-9)
  assert rep["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds), abs=1e-12)
  assert rep["confusion"] == skm.confusion_matrix(labels, preds).tolist()

  pngs = {"confusion_matrix.png": (800, 350), "roc_curves.png": (450, 450),
          "training_curves.png": (1200, 350), "mask.png": (1000, 350)}
  for name, (w, h) in pngs.items():
    _check_png(os.path.join(out, name), w, h)
  page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
  embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
  assert len(embedded) == 4 and "src=\"http" not in page and "<link" not in page
  for data in embedded:
    assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
  for name in CLASSES:
    assert f"<td>{name}</td>" in page
  text = open(os.path.join(out, "per_class.txt")).read()
  assert "macro avg" in text and "malignant" in text


def test_run_without_mask_or_curves(tmp_path):
  run = str(tmp_path / "run")
  _fake_run(run, method="full", with_mask=False)
  os.remove(os.path.join(run, "metrics.jsonl"))
  out = report.write_report(run, log=lambda *_: None)
  assert "mask" not in out and "curves" not in out
  assert sorted(os.listdir(os.path.join(run, "report"))) == [
      "confusion_matrix.png", "per_class.json", "per_class.txt", "report.html", "roc_curves.png"]


def test_directory_of_runs_gets_one_comparison_page(tmp_path):
  top = tmp_path / "sweep"
  for i, method in enumerate(("shpeft", "full", "linear")):
    _fake_run(str(top / "busi" / method), method=method, seed=i)
  _fake_run(str(top / "pretrain"), method="full", seed=5)  # the demo's source task: not compared
  assert report.main([str(top)]) == 0
  out = top / "report"
  page = (out / "report.html").read_text()
  for method in ("shpeft", "full", "linear"):
    assert f'href="../busi/{method}/report/report.html"' in page
    assert (top / "busi" / method / "report" / "report.html").is_file()
  assert "pretrain" not in page and not (top / "pretrain" / "report").exists()
  _check_png(str(out / "per_class_f1_0.png"), 500, 300)
  _check_png(str(out / "training_curves.png"), 1200, 350)


def test_a_second_comparison_reuses_up_to_date_run_reports_only(tmp_path):
  top = tmp_path / "sweep"
  runs = {m: top / "busi" / m for m in ("shpeft", "full")}
  for i, (m, d) in enumerate(runs.items()):
    _fake_run(str(d), method=m, seed=i)
  first = report.comparison_report(str(top), [str(d) for d in runs.values()], log=lambda *_: None)
  stamp = {m: os.path.getmtime(d / "report" / "confusion_matrix.png") for m, d in runs.items()}
  # The full run's predictions change (a rerun): its report is drawn again, shpeft's is kept.
  time.sleep(0.05)
  _fake_run(str(runs["full"]), method="full", seed=7)
  second = report.comparison_report(str(top), [str(d) for d in runs.values()], log=lambda *_: None)
  assert os.path.getmtime(runs["shpeft"] / "report" / "confusion_matrix.png") == stamp["shpeft"]
  assert os.path.getmtime(runs["full"] / "report" / "confusion_matrix.png") > stamp["full"]
  # What the reuse returns is what drawing it again computes.
  reused = report.run_report(str(runs["shpeft"]), log=lambda *_: None, reuse=True)
  assert os.path.getmtime(runs["shpeft"] / "report" / "confusion_matrix.png") == stamp["shpeft"]
  redrawn = report.run_report(str(runs["shpeft"]), log=lambda *_: None)
  assert os.path.getmtime(runs["shpeft"] / "report" / "confusion_matrix.png") > stamp["shpeft"]
  assert reused["per_class"] == json.loads(json.dumps(redrawn["per_class"], default=float))
  assert {k for k in reused if k != "per_class"} == {k for k in redrawn if k != "per_class"}
  assert second["runs"].keys() == first["runs"].keys()


def test_a_seeded_lr_grid_sweep_compares_the_chosen_runs_mean_over_seeds(tmp_path):
  """digits/<variant>/lr_<lr>/seed_<s> (a sweep with --seeds and --lr_grid): all found four levels
  down; the page shows the runs at each variant's chosen lr only (runs.csv), the plots one entry per
  variant with its per-class F1 averaged over the seeds."""
  top = tmp_path / "sweep"
  rows = ["dataset,variant,lr,seed,chosen_lr,f1,run_dir"]
  for variant, chosen in (("shpeft", "0.3"), ("random", "0.1")):
    for lr in ("0.1", "0.3"):
      for seed in (0, 1):
        rel = os.path.join("busi", variant, f"lr_{lr}", f"seed_{seed}")
        _fake_run(str(top / rel), method=variant, seed=seed + (2 if lr == "0.3" else 0))
        rows.append(f"busi,{variant},{lr},{seed},{lr == chosen},0.5,{rel}")
  (top / "runs.csv").write_text("\n".join(rows) + "\n")
  (top / "pretrain").mkdir()
  found = report.find_runs(str(top))
  assert len(found) == 8
  kept = report.chosen_runs(str(top), found)
  assert sorted(os.path.relpath(r, top) for r in kept) == sorted(
      os.path.join("busi", v, f"lr_{lr}", f"seed_{s}")
      for v, lr in (("shpeft", "0.3"), ("random", "0.1")) for s in (0, 1))
  out = report.write_report(str(top), log=lambda *_: None)
  page = (top / "report" / "report.html").read_text()
  assert "the 4 runs at each method&#x27;s chosen learning rate (of 8" in page or \
      "the 4 runs at each method's chosen learning rate (of 8" in page
  assert "lr_0.1/seed_0/report" not in page.replace("random/lr_0.1", "")
  assert not (top / "busi" / "shpeft" / "lr_0.1" / "seed_0" / "report").exists()
  _check_png(out["f1_0"], 500, 300)
  # The mean over seeds, by hand, and the seed level taken off the label.
  assert report._seed_group(os.path.join("busi", "shpeft", "lr_0.3", "seed_1")) == (
      os.path.join("busi", "shpeft", "lr_0.3"), "1")
  assert report._seed_group("shpeft") == ("shpeft", None)
  a = {"classes": [{"name": "x", "f1": 0.2}, {"name": "y", "f1": 0.9}]}
  b = {"classes": [{"name": "x", "f1": 0.4}, {"name": "y", "f1": 0.5}]}
  mean = report._mean_per_class([a, b], "f1")["classes"]
  assert [c["name"] for c in mean] == ["x", "y"]
  np.testing.assert_allclose([c["f1"] for c in mean], [0.3, 0.7])
  # A workdir of many runs names their exports in one short line.
  lines = report.after_run(str(top))
  assert all(len(l) < 300 for l in lines)


def test_errors(tmp_path, capsys):
  assert report.main([str(tmp_path / "nope")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert report.main([str(tmp_path)]) == 2
  assert "holds no finished run" in capsys.readouterr().err


def test_after_run_says_where_everything_is(tmp_path):
  top = tmp_path / "demo"
  for i, method in enumerate(("shpeft", "full")):
    _fake_run(str(top / method), method=method, seed=i)
    (top / method / "export" / "model").mkdir(parents=True)
  (top / "results.json").write_text("{}")
  lines = report.after_run(str(top))
  assert lines == [f"results: {top}/results.json", f"report:  {top}/report/report.html",
                   f"export:  {top}/{{full,shpeft}}/export/model"]
  # A broken run: the training's results stand, the report is one warning line.
  os.remove(top / "full" / report.PREDICTIONS)
  (top / "full" / "results.json").write_text('{"method": "full", "test": {}}')
  lines = report.after_run(str(top))
  assert lines[1].startswith("warning: no report (") and "python -m shpeft_jax.report" in lines[1]


def test_comparison_page_leads_with_the_console_table_and_shows_spread(tmp_path, monkeypatch):
  """A demo-like group (methods x 3 seeds): the page starts with the console's table (its
  results_table.txt, word for word); per-class bars carry the sd over seeds (hand-computed);
  the curves draw every seed; a panel of one validation point is left out."""
  import html as html_lib  # pylint: disable=g-import-not-at-top
  from shpeft_jax.evaluation import compare, plots  # pylint: disable=g-import-not-at-top
  top = tmp_path / "demo"
  records, reps = [], {}
  for method in ("shpeft", "random"):
    for seed in range(3):
      run = top / method / f"seed_{seed}"
      _fake_run(str(run), method=method, seed=seed + (method == "random"), with_mask=False)
      res = json.load(open(run / "results.json"))
      records.append({"dataset": "busi", "variant": method, "label": method, "method": method,
                      "type": "", "lr": 0.3, "seed": seed, **compare.metrics_of(res)})
  table = compare.format_seed_table(records)
  (top / "results_table.txt").write_text(table + "\n")
  figures = {}
  real_save = plots._save  # pylint: disable=protected-access

  def capture(fig, path):
    figures[os.path.basename(path)] = [
        (ax.get_title(), len(ax.get_lines()), len(ax.containers)) for ax in fig.axes]
    figures[os.path.basename(path) + ":errbars"] = sum(
        1 for ax in fig.axes for c in ax.containers if getattr(c, "errorbar", None) is not None)
    return real_save(fig, path)
  monkeypatch.setattr(plots, "_save", capture)
  out = report.write_report(str(top), log=lambda *_: None)
  page = open(out["html"]).read()
  assert page.index(html_lib.escape(table.splitlines()[1])) < page.index("<h2>Runs</h2>")
  for line in table.splitlines():
    assert html_lib.escape(line) in page
  # Per-class F1: the mean and the sd (ddof=1) over the three seeds, drawn as error bars.
  per_seed = [json.load(open(top / "shpeft" / f"seed_{s}" / "report" / "per_class.json"))
              for s in range(3)]
  mean = report._mean_per_class(per_seed, "f1")  # pylint: disable=protected-access
  for i, c in enumerate(mean["classes"]):
    vals = [r["classes"][i]["f1"] for r in per_seed]
    assert c["f1"] == pytest.approx(np.mean(vals)) and c["f1_sd"] == pytest.approx(np.std(vals, ddof=1))
  assert figures["per_class_f1_0.png:errbars"] == 2  # one set of error bars per method
  # Curves: 3 panels (validation has 3 points per run), loss lines = 2 methods x 3 seeds.
  panels = figures["training_curves.png"]
  assert len(panels) == 3 and panels[0][1] == 6 and panels[1][1] == 2, panels
  # One validation point per run: no validation panel.
  one_val = [{"step": s, "kind": "train", "loss": 1.0 / s, "lr": 0.1} for s in range(1, 151)]
  plots.plot_training_curves({"a": one_val + [{"step": 150, "kind": "val", "f1_macro": 0.5}]},
                             str(tmp_path / "c.png"))
  assert len(figures["c.png"]) == 2


def test_the_demo_logs_enough_points_to_draw_a_curve():
  """~50 loss points per 150-step transfer run and per pre-training (not 4)."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from shpeft_jax import runs  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  assert config.train.num_steps // config.train.log_every >= 50
  pre = runs.pretrain_config(config)
  assert pre.train.num_steps // pre.train.log_every >= 50


def test_comparison_page_renders_in_a_real_browser(tmp_path):
  """Headless Chromium draws the page: the table at the top, figures below, no blank lower half."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "screenshot_report", os.path.join(os.path.dirname(__file__), "..", "docs", "tools",
                                        "screenshot_report.py"))
  shot = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(shot)
  if shot.chromium() is None:
    pytest.skip("Debian's chromium is not installed")
  top = tmp_path / "demo"
  for method in ("shpeft", "random", "full"):
    for seed in range(2):
      _fake_run(str(top / method / f"seed_{seed}"), method=method, seed=seed, with_mask=False)
  out = report.write_report(str(top), log=lambda *_: None)
  png = str(tmp_path / "page.png")
  w, h = shot.screenshot(out["html"], png)
  assert w == 1400 and 1200 < h < 6000, (w, h)  # the page ends; the crop found its bottom
  a = np.asarray(Image.open(png).convert("L"))
  thirds = [a[i * h // 3:(i + 1) * h // 3] for i in range(3)]
  assert all((t < 200).mean() > 0.01 for t in thirds), [(t < 200).mean() for t in thirds]
