"""Classify new images with a trained model.

  python -m shpeft_jax.predict MODEL_DIR IMAGES... --out preds.csv [--batch_size 64]

MODEL_DIR is a trainer workdir (its export/model is used, else best/), a params checkpoint such as
WORKDIR/export/model or WORKDIR/best, or a task adapter (then --base names the base checkpoint).
IMAGES are files, folders (every PNG / JPEG / BMP / TIFF / DICOM below them) or glob patterns. Each image
goes through the evaluation transform of the trainer (`input_pipeline.eval_transform`: grayscale
to RGB, shorter side to the model's size with antialiased bicubic, centre crop, uint8; the model
normalises with its tower's pixel statistics on the device), so the probabilities are those the
trainer's evaluation computes for the same file.

The CSV has one row per readable image: its path, the prediction and the probability of every
class (columns `p_<class name>`). Single-label: the predicted class, softmax probabilities.
Multi-label (chest X-ray findings): the findings at or above the thresholds the trainer chose on
validation (recorded in the checkpoint's meta.json; 0.5 without), joined by `|` (empty: none),
and one sigmoid probability per finding. Unreadable or corrupt files do not stop the run; they
are listed at the end (the exit status is 2 only when no image at all could be read).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from shpeft_jax.errors import CheckpointError, ConfigError, DataError, ShpeftError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")


# ---------------------------------------------------------------------------------------------
# The model: which checkpoint a MODEL_DIR means, and its jitted classifier.


@dataclasses.dataclass
class LoadedModel:
  """A classifier ready to run: params, what they are (meta), the run's config if known."""
  checkpoint: str
  params: Any
  meta: dict
  config: Any  # ml_collections.ConfigDict of the run (config.json), or None.
  class_names: list[str]
  image_size: int
  logits_fn: Callable[[Any, np.ndarray], Any]
  task: Any = None  # tasks.Task of the checkpoint (meta.json's task kind).
  thresholds: list[float] | None = None  # Multi-label decision thresholds (meta.json).


def resolve_checkpoint(path: str) -> str:
  """The params checkpoint a MODEL_DIR names: itself, or a workdir's export/model, else best/."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} does not exist or is not a directory; pass a trainer workdir, "
                          "its export/model or best/ directory.")
  for candidate in (path, os.path.join(path, "export", "model"), os.path.join(path, "best")):
    if os.path.isfile(os.path.join(candidate, "meta.json")):
      return candidate
  runs = _runs_below(path)
  if runs:
    # A classifier of the task, not the demo's pre-training (which classifies its source digits).
    pick = next((r for r in runs if not os.path.basename(r).startswith("pretrain")), runs[0])
    shown = ", ".join(os.path.relpath(r, path) for r in runs[:12])
    more = f" and {len(runs) - 12} more" if len(runs) > 12 else ""
    raise CheckpointError(f"{path} holds {len(runs)} runs ({shown}{more}); pass one of them, "
                          f"e.g. {pick}.")
  raise CheckpointError(f"{path} holds no model: expected meta.json (a params checkpoint) or a "
                        "trainer workdir with export/model/ or best/. Has the run finished?")


def _runs_below(path: str, depth: int = 3) -> list[str]:
  """Trainer workdirs with an export/model below `path` (sorted; the sweep nests them)."""
  found = []
  for root, dirs, _ in os.walk(path):
    if os.path.isfile(os.path.join(root, "export", "model", "meta.json")):
      found.append(root)
      dirs[:] = []
    elif root[len(path):].count(os.sep) >= depth:
      dirs[:] = []
    else:
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
  return sorted(found)


def run_config(checkpoint: str):
  """The config.json of the run that wrote `checkpoint` (WORKDIR/best or WORKDIR/export/model)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  for up in (1, 2):
    cand = os.path.join(checkpoint, *[".."] * up, "config.json")
    if os.path.isfile(cand):
      with open(cand) as f:
        return ml_collections.ConfigDict(json.load(f))
  return None


def _adapter_module():
  try:
    from shpeft_jax import adapter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return adapter


def load_model(model_dir: str, base: str | None = None) -> LoadedModel:
  """Loads a classifier from a workdir, a params checkpoint or a task adapter (with its base)."""
  import jax  # pylint: disable=g-import-not-at-top
  from shpeft_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from shpeft_jax import tasks  # pylint: disable=g-import-not-at-top
  from shpeft_jax.models import of_checkpoint  # pylint: disable=g-import-not-at-top

  adapter = _adapter_module()
  if adapter is not None and adapter.is_adapter(model_dir):
    if not base:
      raise ConfigError(f"{model_dir} is a task adapter: pass the checkpoint it was trained from "
                        "with --base DIR.")
    params, meta = adapter.load_with_base(model_dir, base)
    checkpoint = os.path.abspath(model_dir)
  else:
    if base:
      raise ConfigError(f"--base is only for task adapters; {model_dir} is not one.")
    checkpoint = resolve_checkpoint(model_dir)
    params, meta = checkpoints.load_params(checkpoint)
  config = run_config(checkpoint)
  # The one builder of a checkpoint's model: the tower meta.json records, the head's classes, the
  # run's additive hooks and dtype.
  model = of_checkpoint.model_of_checkpoint(params, meta, config, where=checkpoint)
  num_classes = model.num_classes
  names = list(meta.get("class_names") or [])
  if len(names) != num_classes:
    names = [f"class_{i}" for i in range(num_classes)]
  image_size = int(model.config.image_size)

  def logits(params, images):
    return model.apply({"params": params}, images).astype(jax.numpy.float32)

  task = tasks.of_meta(meta)
  thresholds = meta.get("thresholds")
  if thresholds is not None and len(thresholds) != num_classes:
    raise CheckpointError(f"{checkpoint}/meta.json has {len(thresholds)} thresholds for "
                          f"{num_classes} findings; re-export the run.")
  return LoadedModel(checkpoint, jax.device_put(params), meta, config, names, image_size,
                     jax.jit(logits), task, thresholds)


# ---------------------------------------------------------------------------------------------
# Inputs.


def list_inputs(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """(image files in order, [(input, why)] for inputs that match nothing).

  A folder contributes every image file below it (sorted), a glob pattern its sorted matches, a
  file itself (whatever its extension: an unreadable one is reported when read).
  """
  files, missing, seen = [], [], set()

  def add(p):
    p = os.path.abspath(p)
    if p not in seen:
      seen.add(p)
      files.append(p)

  for item in inputs:
    if os.path.isdir(item):
      found = sorted(os.path.join(r, f) for r, _, fs in os.walk(item) for f in fs
                     if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
      if not found:
        missing.append((item, "folder without PNG/JPEG/BMP/TIFF images"))
      for p in found:
        add(p)
    elif os.path.isfile(item):
      add(item)
    elif glob.has_magic(item):
      found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
      if not found:
        missing.append((item, "pattern matches no file"))
      for p in found:
        add(p)
    else:
      missing.append((item, "no such file or folder"))
  return files, missing


def _why_unreadable(path: str, error: Exception) -> str:
  from PIL import UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  cause = error.__cause__ or error
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    return "empty file"
  if isinstance(cause, UnidentifiedImageError):
    return "not an image (unknown format or corrupt header)"
  return str(cause).splitlines()[0]


def _batches(files: Sequence[str], image_size: int, batch_size: int,
             unreadable: list[tuple[str, str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(indices into files, uint8 images [B, S, S, 3]) per batch; unreadable files are skipped and
  noted.

  Files are read and checked by the builders' own reader (`splits.read_image`, which re-encodes
  BMP / TIFF / 16-bit PNG as the datasets store them), then transformed by tf.data with the
  trainer's evaluation transform.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import splits  # pylint: disable=g-import-not-at-top

  def encoded():
    for i, path in enumerate(files):
      try:
        data, _ = splits.read_image(path)
      except (DataError, OSError) as e:
        unreadable.append((path, _why_unreadable(path, e)))
        continue
      yield i, data

  ds = tf.data.Dataset.from_generator(encoded, output_signature=(
      tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string)))
  ds = ds.map(lambda i, b: (i, input_pipeline.eval_transform(b, image_size)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  for index, images in ds.as_numpy_iterator():
    yield index, images


def predict_files(loaded: LoadedModel, files: Sequence[str], *, batch_size: int = 64,
                  progress: bool = True) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
  """(files predicted, probabilities [N, K] float64, [(file, why)] unreadable).

  Every batch is padded to `batch_size`, so one compiled program serves the whole run.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  from shpeft_jax import tasks  # pylint: disable=g-import-not-at-top
  task = loaded.task or tasks.of(None)
  if batch_size <= 0:
    raise ConfigError(f"--batch_size must be positive, got {batch_size}.")
  unreadable: list[tuple[str, str]] = []
  done, probs = [], []
  bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, file=sys.stderr,
             dynamic_ncols=True, postfix={"unreadable": 0})
  for index, images in _batches(files, loaded.image_size, batch_size, unreadable):
    n = len(index)
    if n < batch_size:
      images = np.concatenate([images, np.zeros((batch_size - n,) + images.shape[1:],
                                                images.dtype)])
    logits = np.asarray(loaded.logits_fn(loaded.params, images))[:n]
    probs.append(task.probabilities(logits.astype(np.float64)))
    done += [files[i] for i in index]
    bar.update(min(len(files), len(done) + len(unreadable)) - bar.n)
    bar.set_postfix(classified=len(done), unreadable=len(unreadable), refresh=False)
  bar.update(len(files) - bar.n)
  bar.set_postfix(classified=len(done), unreadable=len(unreadable))
  bar.close()
  k = len(loaded.class_names)
  return done, (np.concatenate(probs) if probs else np.zeros((0, k))), unreadable


def write_csv(path: str, files: Sequence[str], probs: np.ndarray, class_names: Sequence[str],
              task=None, thresholds: Sequence[float] | None = None) -> list[list[str]]:
  """One row per image: file, prediction (the class; multi-label: the findings joined by '|'),
  p_<class> for every class (6 decimals). Returns the predictions."""
  from shpeft_jax import tasks  # pylint: disable=g-import-not-at-top
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  decisions = (task or tasks.of(None)).decisions(probs, list(class_names), thresholds)
  with utils.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file", "predicted"] + [f"p_{c}" for c in class_names])
    for file, d, p in zip(files, decisions, probs):
      w.writerow([file, "|".join(d)] + [f"{x:.6f}" for x in p])
  return decisions


# ---------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m shpeft_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("model_dir", help="trainer workdir, WORKDIR/export/model, WORKDIR/best, or "
                      "a task adapter (with --base)")
  parser.add_argument("images", nargs="+", help="image files, folders or glob patterns")
  parser.add_argument("--out", required=True, help="CSV file to write")
  parser.add_argument("--base", default=None, help="base checkpoint of a task adapter")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  return parser


def run(args: argparse.Namespace) -> int:
  """The command; faults raise (main turns them into one line and exit 2)."""
  out = os.path.abspath(args.out)
  if os.path.isdir(out):
    raise ConfigError(f"--out {args.out} is a directory; pass the CSV file to write, e.g. "
                      f"{os.path.join(args.out, 'predictions.csv')}.")
  if os.path.exists(out) and not args.overwrite:
    raise ConfigError(f"{args.out} already exists; pass --overwrite or choose another --out.")
  if args.batch_size <= 0:
    raise ConfigError(f"--batch_size must be positive, got {args.batch_size}.")
  # The model directory and the inputs are checked before the heavy imports (JAX, TensorFlow).
  adapter_dir = os.path.isfile(os.path.join(args.model_dir, "shpeft_adapter.json"))
  if not adapter_dir:
    resolve_checkpoint(args.model_dir)
  files, missing = list_inputs(args.images)
  for item, why in missing:
    print(f"warning: {item}: {why}", file=sys.stderr)
  if not files:
    raise DataError("no images to classify (see the warnings above).")
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  utils.hide_accelerators_from_tf()
  loaded = load_model(args.model_dir, args.base)
  done, probs, unreadable = predict_files(loaded, files, batch_size=args.batch_size,
                                          progress=not args.no_progress)
  if done:
    decisions = write_csv(out, done, probs, loaded.class_names, loaded.task, loaded.thresholds)
    counts = {c: sum(c in d for d in decisions) for c in loaded.class_names}
    summary = ", ".join(f"{n} {c}" for c, n in counts.items() if n) or "no finding predicted"
    print(f"wrote {args.out}: {len(done)} images ({summary}) with {loaded.checkpoint}")
  if unreadable:
    print(f"{len(unreadable)} unreadable file(s), not classified:", file=sys.stderr)
    for path, why in unreadable:
      print(f"  {path}: {why}", file=sys.stderr)
  if not done:
    raise DataError("no image could be read (see the list above).")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  from shpeft_jax.errors import cli_main  # pylint: disable=g-import-not-at-top
  args = build_parser().parse_args(argv)
  return cli_main(lambda: run(args), hint_path=args.out)


if __name__ == "__main__":
  sys.exit(main())
