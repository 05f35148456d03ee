"""A readable report of a finished run, or of several runs side by side.

  python -m shpeft_jax.report RUN_DIR [--split test]

For one run (a trainer workdir) it writes, in RUN_DIR/report/:
  per_class.json / per_class.txt   precision, recall, F1, support and one-vs-rest AUC per class,
                                   macro and weighted averages, accuracy (numbers equal sklearn's)
  confusion_matrix.png             counts and row-normalised
  roc_curves.png                   one-vs-rest ROC curve of every class, AUC in the legend
  training_curves.png              train loss, learning rate, validation F1 / accuracy / AUC
                                   (from metrics.jsonl)
  mask.png                         selected weights per layer and per parameter type
                                   (mask_stats.json; selective methods only)
  report.html                      all of the above in one self-contained page (images embedded)
The predictions come from RUN_DIR/test_predictions.npz, which the trainer writes with the test
evaluation; for a run without it, they are recomputed from RUN_DIR/export/model on the config's
test split.

For a directory of runs (the demo's workdir with several methods, or a sweep's workdir) it writes
each run's report and RUN_DIR/report/report.html comparing them: the results table, per-class F1
by method, the training curves on shared axes, and links to each run's page.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
from typing import Sequence

import numpy as np

from shpeft_jax.errors import CheckpointError, DataError, ShpeftError

PREDICTIONS = "test_predictions.npz"
_METRIC_TITLES = {"f1": "F1", "auc": "AUROC"}
REPORT_DIR = "report"


# ---------------------------------------------------------------------------------------------
# Inputs of a report.


def save_predictions(path: str, logits: np.ndarray, labels: np.ndarray,
                     class_names: Sequence[str], split: str = "test") -> str:
  """What the report needs of an evaluation: logits [N, K], labels ([N] class indices, or [N, L]
  findings 1 / 0 / -1 unknown), class names, split."""
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  with utils.atomic_path(path) as tmp:
    np.savez_compressed(tmp, logits=np.asarray(logits, np.float32),
                        labels=np.asarray(labels, np.int64),
                        class_names=np.asarray(list(class_names), dtype=str),
                        split=np.asarray(split))
  return path


def load_predictions(path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
  try:
    with np.load(path) as z:
      return z["logits"], z["labels"], [str(c) for c in z["class_names"]]
  except (OSError, KeyError, ValueError) as e:
    raise CheckpointError(f"{path} is unreadable ({e}); delete it to recompute the predictions "
                          "from export/model.") from e


def predictions_from_checkpoint(run_dir: str, split: str = "test"):
  """(logits, labels, class names) of RUN_DIR/export/model on `split` of the run's dataset.

  The same input pipeline (`make_eval_iterator`) and forward pass as the trainer's evaluation.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from shpeft_jax import predict  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  loaded = predict.load_model(os.path.join(run_dir, "export", "model"))
  if loaded.config is None:
    raise CheckpointError(f"{run_dir} has no config.json, so its dataset is unknown; rerun the "
                          "trainer (it writes test_predictions.npz) or pass a trainer workdir.")
  cfg = loaded.config
  bs = int(cfg.train.get("eval_batch_size", 0) or cfg.train.batch_size)
  it = input_pipeline.make_eval_iterator(cfg.data, split=split, global_batch_size=bs,
                                         image_size=loaded.image_size)
  logits, labels, valid = [], [], []
  for batch in it:
    logits.append(np.asarray(jax.device_get(loaded.logits_fn(loaded.params, batch["image"]))))
    labels.append(batch["label"])
    valid.append(batch["valid"])
  keep = np.concatenate(valid)
  return np.concatenate(logits)[keep], np.concatenate(labels)[keep], loaded.class_names


def _read_json(path: str, default=None):
  if not os.path.isfile(path):
    return default
  with open(path) as f:
    return json.load(f)


def read_metrics(run_dir: str) -> list[dict]:
  """The records of RUN_DIR/metrics.jsonl (a torn last line from a killed run is skipped)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  out = []
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return out


def is_run(path: str) -> bool:
  res = _read_json(os.path.join(path, "results.json"), {})
  return isinstance(res, dict) and "method" in res and "test" in res


def find_runs(path: str, max_depth: int = 4) -> list[str]:
  """Finished runs below `path`: the demo's methods (and seeds), a sweep's
  dataset/variant[/lr_<lr>][/seed_<s>] runs; a run's own folders are not searched.

  The demo's pre-training on the source task is not one of the compared methods.
  """
  runs = []

  def walk(folder: str, depth: int):
    for entry in sorted(os.listdir(folder)):
      sub = os.path.join(folder, entry)
      if (not os.path.isdir(sub) or entry in ("pretrain", REPORT_DIR, "xla_cache")
          or entry.startswith(".")):
        continue
      if is_run(sub):
        runs.append(sub)
      elif depth < max_depth:
        walk(sub, depth + 1)

  walk(path, 1)
  return runs


def chosen_runs(path: str, runs: Sequence[str]) -> list[str]:
  """The runs at each method's chosen learning rate, when PATH/runs.csv (a sweep) says which; the
  runs of the other rates of a grid are in runs.csv, not in the comparison page."""
  table = os.path.join(path, "runs.csv")
  if not os.path.isfile(table):
    return list(runs)
  import csv  # pylint: disable=g-import-not-at-top
  with open(table, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows or "run_dir" not in rows[0] or "chosen_lr" not in rows[0]:
    return list(runs)
  chosen = {os.path.normpath(os.path.join(path, r["run_dir"])) for r in rows
            if r["chosen_lr"] == "True" and r["run_dir"]}
  return [r for r in runs if os.path.normpath(r) in chosen] or list(runs)


def _seed_group(label: str) -> tuple[str, str | None]:
  """('shpeft/lr_0.3', '2') for 'shpeft/lr_0.3/seed_2'; (label, None) without a seed level."""
  parts = label.split(os.sep)
  seeds = [p for p in parts if p.startswith("seed_") and p[5:].isdigit()]
  if not seeds:
    return label, None
  return os.sep.join(p for p in parts if p not in seeds), seeds[-1][5:]


def _mean_per_class(reps: Sequence[dict], metric: str) -> dict:
  """The per-class `metric` averaged over runs (seeds) of one method, as a per-class report."""
  names = [c["name"] for c in reps[0]["classes"]]
  return {"classes": [{"name": n, metric: float(np.mean([r["classes"][i][metric] for r in reps])),
                       f"{metric}_sd": float(np.std([r["classes"][i][metric] for r in reps], ddof=1))
                       if len(reps) > 1 else 0.0, "seeds": len(reps)}
                      for i, n in enumerate(names)]}


# ---------------------------------------------------------------------------------------------
# One run.


# What a run's report is drawn from: a report newer than all of them is up to date.
_REPORT_INPUTS = ("results.json", PREDICTIONS, "metrics.jsonl", "mask_stats.json")
# The figures of a run's report, by key (run_report draws them, an up-to-date report lists them).
_REPORT_PNGS = {"confusion": "confusion_matrix.png", "auc_bars": "auroc_per_finding.png",
                "roc": "roc_curves.png",
                "curves": "training_curves.png", "mask": "mask.png"}


def _up_to_date_report(run_dir: str, split: str) -> dict | None:
  """RUN_DIR/report/ as run_report returns it, if it was written after every input; else None."""
  out = os.path.join(run_dir, REPORT_DIR)
  files = {"html": os.path.join(out, "report.html"),
           "per_class_json": os.path.join(out, "per_class.json"),
           "per_class_txt": os.path.join(out, "per_class.txt")}
  if split != "test" or not all(os.path.isfile(f) for f in files.values()):
    return None
  written = min(os.path.getmtime(f) for f in files.values())
  for name in _REPORT_INPUTS:
    p = os.path.join(run_dir, name)
    if os.path.exists(p) and os.path.getmtime(p) >= written:
      return None
  rep = _read_json(files["per_class_json"])
  if not rep or rep.get("split") != split:
    return None
  pngs = {k: os.path.join(out, f) for k, f in _REPORT_PNGS.items()
          if os.path.isfile(os.path.join(out, f))}
  return {**files, **pngs, "per_class": rep}


def run_report(run_dir: str, *, split: str = "test", log=print, reuse: bool = False) -> dict:
  """Writes RUN_DIR/report/ (see the module docstring); returns {'html': path, ...}.

  reuse: keep a report written after the run's results, predictions, metrics and mask stats (a
  sweep's comparison page re-reads hundreds of finished runs; drawing each again costs seconds).
  """
  from shpeft_jax import tasks  # pylint: disable=g-import-not-at-top
  from shpeft_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  run_dir = os.path.abspath(run_dir)
  if reuse:
    cached = _up_to_date_report(run_dir, split)
    if cached is not None:
      return cached
  results = _read_json(os.path.join(run_dir, "results.json"))
  if results is None:
    raise DataError(f"{run_dir} has no results.json: it is not a finished run. Finish it with "
                    "`python -m shpeft_jax.main` (a rerun resumes), or pass a finished one.")
  out = os.path.join(run_dir, REPORT_DIR)
  os.makedirs(out, exist_ok=True)
  pred_path = os.path.join(run_dir, PREDICTIONS)
  if split == "test" and os.path.isfile(pred_path):
    logits, labels, names = load_predictions(pred_path)
  else:
    log(f"report: {os.path.basename(run_dir)}: evaluating export/model on the {split} split")
    logits, labels, names = predictions_from_checkpoint(run_dir, split)
  task = tasks.of(results.get("task"))
  # Multi-label decisions at the thresholds the trainer chose on validation (results.json).
  rep = task.report(labels, logits, names, (results.get("thresholds") or {}).get("values"))
  rep.update(method=results.get("method"), dataset=results.get("dataset"), split=split,
             reported=results.get("reported"), task=task.name)
  files = {"per_class_json": os.path.join(out, "per_class.json"),
           "per_class_txt": os.path.join(out, "per_class.txt")}
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  with utils.atomic_path(files["per_class_json"]) as tmp, open(tmp, "w") as f:
    json.dump(rep, f, indent=1, default=_json_default)
  text = task.report_text(rep)
  with utils.atomic_path(files["per_class_txt"]) as tmp, open(tmp, "w") as f:
    f.write(text + "\n")

  label = f"{results.get('method')} on {results.get('dataset')}"
  pngs = {"roc": plots.plot_roc(rep, os.path.join(out, _REPORT_PNGS["roc"]), title=(
      "" if task.has_confusion else f"ROC per finding, mean AUROC {rep['auc_macro']:.3f}"))}
  if task.has_confusion:
    pngs["confusion"] = plots.plot_confusion(
        rep, os.path.join(out, _REPORT_PNGS["confusion"]),
        title=f"Confusion matrix, {label}, {split} split ({rep['num_examples']} images)")
  else:
    pngs["auc_bars"] = plots.plot_per_class_bars(
        {results.get("method", "run"): rep}, os.path.join(out, _REPORT_PNGS["auc_bars"]),
        metric="auc", title=f"AUROC per finding, {label}, {split} split")
  records = read_metrics(run_dir)
  if records:
    pngs["curves"] = plots.plot_training_curves({results.get("method", "run"): records},
                                                os.path.join(out, _REPORT_PNGS["curves"]),
                                                title=f"Training curves, {label}")
  stats = _read_json(os.path.join(run_dir, "mask_stats.json"))
  if stats and stats.get("per_layer") and 0 < stats.get("total", {}).get("fraction", 1) < 1:
    from shpeft_jax.peft import mask_io  # pylint: disable=g-import-not-at-top
    pngs["mask"] = os.path.join(out, _REPORT_PNGS["mask"])
    total = stats["total"]
    mask_io.plot_mask_stats(stats, pngs["mask"], title=(
        f"{results.get('method')}: {total['selected']:,} of {total['size']:,} masked weights "
        f"trained ({100 * total['fraction']:.3f} %)"))
  page = _run_page(run_dir, results, rep, text, pngs)
  files["html"] = os.path.join(out, "report.html")
  _write_text(files["html"], page)
  return {**files, **pngs, "per_class": rep}


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  raise TypeError(type(x))


def _write_text(path: str, text: str):
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  with utils.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


# ---------------------------------------------------------------------------------------------
# HTML (one self-contained file: images are embedded as base64).

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{padding:.25em .7em;border-bottom:1px solid #eee;
text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}.muted{color:#777;font-size:.9em}
.low{color:#b00020;font-weight:600}code{background:#f5f5f5;padding:0 .2em}
"""


def _img(path: str, alt: str) -> str:
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _pct(x) -> str:
  return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _page(title: str, body: str) -> str:
  return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
          f"<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _per_class_table(rep: dict) -> str:
  rows = ["<tr><th>class</th><th>precision %</th><th>recall %</th><th>F1 %</th>"
          "<th>AUC %</th><th>support</th></tr>"]
  worst = min((c["f1"] for c in rep["classes"] if c["support"]), default=None)
  for c in rep["classes"]:
    cls = ' class="low"' if worst is not None and c["f1"] == worst and c["support"] else ""
    rows.append(f"<tr><td>{html.escape(c['name'])}</td><td>{_pct(c['precision'])}</td>"
                f"<td>{_pct(c['recall'])}</td><td{cls}>{_pct(c['f1'])}</td>"
                f"<td>{_pct(c['auc'])}</td><td>{c['support']}</td></tr>")
  for key, name in (("macro", "macro avg"), ("weighted", "weighted avg")):
    r = rep[key]
    auc = _pct(rep["auc_macro"]) if key == "macro" else ""
    rows.append(f"<tr><th>{name}</th><th>{_pct(r['precision'])}</th><th>{_pct(r['recall'])}</th>"
                f"<th>{_pct(r['f1'])}</th><th>{auc}</th><th>{r['support']}</th></tr>")
  rows.append(f"<tr><th>accuracy</th><th></th><th></th><th>{_pct(rep['accuracy'])}</th><th></th>"
              f"<th>{rep['num_examples']}</th></tr>")
  return "<table>" + "\n".join(rows) + "</table>"


def _per_label_table(rep: dict) -> str:
  """Multi-label: one row per finding (AUROC, AP, F1 at its validation threshold, ...)."""
  rows = ["<tr><th>finding</th><th>AUROC %</th><th>AP %</th><th>F1 %</th><th>threshold</th>"
          "<th>precision %</th><th>recall %</th><th>positives</th><th>negatives</th></tr>"]
  aucs = [c["auc"] for c in rep["classes"] if c["auc"] == c["auc"]]
  worst = min(aucs, default=None)
  for c in rep["classes"]:
    cls = ' class="low"' if worst is not None and c["auc"] == worst else ""
    rows.append(f"<tr><td>{html.escape(c['name'])}</td><td{cls}>{_pct(c['auc'])}</td>"
                f"<td>{_pct(c['ap'])}</td><td>{_pct(c['f1'])}</td><td>{c['threshold']:.3f}</td>"
                f"<td>{_pct(c['precision'])}</td><td>{_pct(c['recall'])}</td>"
                f"<td>{c['support']}</td><td>{c['negatives']}</td></tr>")
  m = rep["macro"]
  rows.append(f"<tr><th>mean</th><th>{_pct(rep['auc_macro'])}</th><th>{_pct(rep['map'])}</th>"
              f"<th>{_pct(m['f1'])}</th><th></th><th>{_pct(m['precision'])}</th>"
              f"<th>{_pct(m['recall'])}</th><th></th><th></th></tr>")
  rows.append(f"<tr><th>exact match</th><th></th><th></th><th>{_pct(rep['accuracy'])}</th>"
              f"<th></th><th></th><th></th><th>{rep['num_examples']}</th><th></th></tr>")
  note = ("" if not rep.get("undefined") else
          f"<p class=\"muted\">Undefined (one class only among the known labels of this split): "
          f"{html.escape(', '.join(rep['undefined']))}.</p>")
  return "<table>" + "\n".join(rows) + "</table>" + note


# The per-class section of a run's page, by task kind.
_TABLES = {"single_label": (_per_class_table, "Per class", (
    '<p class="muted">The lowest F1 is in red. Precision: of the images predicted as the class, '
    "the fraction that are; recall (sensitivity): of the images of the class, the fraction "
    "found.</p>")), "multi_label": (_per_label_table, "Per finding", (
        '<p class="muted">The lowest AUROC is in red. F1, precision and recall at the threshold '
        "chosen on validation (highest validation F1); AUROC and AP need no threshold. Unknown "
        "labels (-1) count nowhere.</p>"))}


def _data_of(results: dict) -> str:
  """A run's data as the comparison page groups it: the dataset, with its training subset."""
  subset = results.get("train_subset")
  return str(results.get("dataset")) + (f" ({subset['description']})" if subset else "")


def _run_page(run_dir: str, results: dict, rep: dict, text: str, pngs: dict) -> str:
  from shpeft_jax import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.of(results.get("task"))
  table, heading, note = _TABLES[task.name]
  test = results.get("test", {})
  facts = [("method", results.get("method")), ("dataset", results.get("dataset")),
           ("steps", results.get("steps")),
           ("trainable", f"{results.get('trainable', 0):,} of {results.get('total', 0):,} "
                         f"({results.get('trainable_percent', float('nan')):.3f} %)"),
           ("reported model", f"{results.get('reported', 'final')} "
                              f"(test {task.headline_title} {_pct(test.get(task.headline))} %)"),
           ("run directory", run_dir)]
  if results.get("train_subset"):
    from shpeft_jax.data import subsets  # pylint: disable=g-import-not-at-top
    facts.insert(2, ("training subset", subsets.line(results["train_subset"])))
  body = ["<table>" + "".join(f"<tr><td>{k}</td><td>{html.escape(str(v))}</td></tr>"
                              for k, v in facts) + "</table>"]
  body.append(f"<h2>{heading} ({html.escape(rep['split'])} split, {rep['num_examples']} images)"
              "</h2>")
  body.append(table(rep))
  body.append(note)
  if "confusion" in pngs:
    body.append("<h2>Confusion matrix</h2>" + _img(pngs["confusion"], "confusion matrix"))
  if "auc_bars" in pngs:
    body.append("<h2>AUROC per finding</h2>" + _img(pngs["auc_bars"], "AUROC per finding"))
  body.append(f"<h2>ROC curves ({'one vs rest' if task.has_confusion else 'per finding'})</h2>"
              + _img(pngs["roc"], "ROC curves"))
  if "curves" in pngs:
    body.append("<h2>Training</h2>" + _img(pngs["curves"], "training curves"))
  if "mask" in pngs:
    body.append("<h2>Selected weights</h2>" + _img(pngs["mask"], "mask per layer and type"))
  body.append(f"<h2>As text</h2><pre>{html.escape(text)}</pre>")
  return _page(f"shpeft_jax report: {results.get('method')} on {results.get('dataset')}",
               "\n".join(body))


# ---------------------------------------------------------------------------------------------
# Several runs.


def comparison_report(path: str, runs: Sequence[str], *, split: str = "test", log=print) -> dict:
  """Each run's report, then PATH/report/report.html comparing them.

  A sweep with a learning-rate grid compares the runs at each method's chosen rate
  (`chosen_runs`). Runs that differ only in their seed are one method in the plots: its per-class
  F1 is the mean over the seeds, its training curves those of its first seed.
  """
  from shpeft_jax import tasks  # pylint: disable=g-import-not-at-top
  from shpeft_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  out = os.path.join(path, REPORT_DIR)
  os.makedirs(out, exist_ok=True)
  n_all = len(runs)
  runs = chosen_runs(path, runs)
  per_run = {}
  for run in runs:
    per_run[os.path.relpath(run, path)] = (run, run_report(run, split=split, log=log, reuse=True),
                                           _read_json(os.path.join(run, "results.json")))
  pngs = {}
  by_dataset: dict[str, dict[str, list]] = {}
  task_of = {}  # dataset -> its task kind (the per-class metric drawn for it)
  curves: dict[str, list] = {}
  for label, (run, rep, res) in per_run.items():
    group, seed = _seed_group(label)
    task_of[_data_of(res)] = tasks.of(res.get("task"))
    by_dataset.setdefault(_data_of(res), {}).setdefault(group, []).append(rep["per_class"])
    records = read_metrics(run)
    if records:  # every seed: one colour per method, a line per seed
      curves.setdefault(group, []).append(records)
  for i, (dataset, groups) in enumerate(by_dataset.items()):
    seeded = any(len(v) > 1 for v in groups.values())
    metric, what = task_of[dataset].class_metric, task_of[dataset].label_title
    reps = {g: (v[0] if len(v) == 1 else _mean_per_class(v, metric)) for g, v in groups.items()}
    pngs[f"f1_{i}"] = plots.plot_per_class_bars(
        reps, os.path.join(out, f"per_class_{metric}_{i}.png"), metric=metric,
        title=f"Per-{what} {_METRIC_TITLES[metric]} by method ({dataset}, {split} split"
        + (", mean ± sd over seeds)" if seeded else ")"))
  if curves:
    pngs["curves"] = plots.plot_training_curves(curves, os.path.join(out, "training_curves.png"),
                                                title="Training curves of every method")
  rows = ["<tr><th>run</th><th>method</th><th>dataset</th><th>trainable %</th><th>F1 %</th>"
          "<th>accuracy %</th><th>AUC %</th><th>worst class / finding (F1 / AUROC %)</th>"
          "<th>page</th></tr>"]
  for label, (run, rep, res) in per_run.items():
    pc = rep["per_class"]
    metric = task_of[_data_of(res)].class_metric
    worst = min(pc["classes"], key=lambda c: (c[metric] if c["support"] and c[metric] == c[metric]
                                              else math.inf))
    link = os.path.relpath(rep["html"], out)
    rows.append(
        f"<tr><td>{html.escape(label)}</td><td>{html.escape(str(res.get('method')))}</td>"
        f"<td>{html.escape(_data_of(res))}</td>"
        f"<td>{res.get('trainable_percent', float('nan')):.3f}</td>"
        f"<td>{_pct(pc['macro']['f1'])}</td><td>{_pct(pc['accuracy'])}</td>"
        f"<td>{_pct(pc['auc_macro'])}</td>"
        f"<td>{html.escape(worst['name'])} ({_pct(worst[metric])})</td>"
        f"<td><a href=\"{html.escape(link)}\">report</a></td></tr>")
  shown = (f"{len(per_run)} runs" if len(per_run) == n_all else
           f"the {len(per_run)} runs at each method's chosen learning rate (of {n_all}; "
           "runs.csv lists every run)")
  body = []
  table = os.path.join(path, "results_table.txt")  # the console's closing table, word for word
  if os.path.isfile(table):
    with open(table) as f:
      body.append("<h2>Methods over seeds (the console's table)</h2><pre>"
                  + html.escape(f.read().rstrip()) + "</pre>")
  body += [f"<h2>Runs</h2><p>{shown} in <code>{html.escape(path)}</code>, {split} split.</p>",
           "<table>" + "\n".join(rows) + "</table>"]
  for key in sorted(k for k in pngs if k.startswith("f1_")):
    body.append("<h2>Per class / per finding</h2>" + _img(pngs[key], "per-class metric by method"))
  if "curves" in pngs:
    body.append("<h2>Training</h2>" + _img(pngs["curves"], "training curves"))
  page = os.path.join(out, "report.html")
  _write_text(page, _page("shpeft_jax report: methods compared", "\n".join(body)))
  return {"html": page, **pngs, "runs": {k: v[1]["html"] for k, v in per_run.items()}}


def write_report(path: str, *, split: str = "test", log=print) -> dict:
  """The report of a run, or the comparison of the runs below `path`."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise DataError(f"{path} does not exist; pass a trainer or sweep workdir.")
  if is_run(path):
    return run_report(path, split=split, log=log)
  runs = find_runs(path)
  if not runs:
    raise DataError(f"{path} holds no finished run (no results.json with a test result here or "
                    "up to four levels below). Has the training finished?")
  return comparison_report(path, runs, split=split, log=log)


def after_run(workdir: str, *, log=None) -> list[str]:
  """The report of a finished run or group of runs, then the lines that say where everything is.

  Called at the end of `python -m shpeft_jax.main` and of a sweep. A failing report does not fail
  the finished training: it becomes one warning line with the command that retries it.
  """
  workdir = os.path.abspath(workdir)
  log = log or (lambda *_: None)
  lines = []
  results = os.path.join(workdir, "results.json")
  table = os.path.join(workdir, "results_table.txt")
  if os.path.isfile(results):
    lines.append(f"results: {results}" + (f", {table}" if os.path.isfile(table) else ""))
  try:
    lines.append(f"report:  {write_report(workdir, log=log)['html']}")
  except Exception as e:  # pylint: disable=broad-except
    lines.append(f"warning: no report ({type(e).__name__}: {e}); retry with "
                 f"`python -m shpeft_jax.report {workdir}`")
  if is_run(workdir):
    exports = [workdir]
  else:
    exports = find_runs(workdir)
  exports = [r for r in exports if os.path.isdir(os.path.join(r, "export", "model"))]
  if len(exports) == 1:
    lines.append(f"export:  {os.path.join(exports[0], 'export', 'model')}")
  elif len(exports) <= 12:
    names = ",".join(os.path.relpath(r, workdir) for r in exports)
    lines.append(f"export:  {workdir}/{{{names}}}/export/model")
  elif exports:
    lines.append(f"export:  RUN_DIR/export/model of each of the {len(exports)} runs below "
                 f"{workdir}")
  return lines


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m shpeft_jax.report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dir", help="trainer workdir, or a workdir of several runs (demo, sweep)")
  parser.add_argument("--split", default="test",
                      help="split to report (default test; others are evaluated from "
                      "export/model)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    out = write_report(args.run_dir, split=args.split)
  except ShpeftError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"report: {out['html']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
