"""Offline demo data: scikit-learn's bundled digits (1,797 real 8x8 grayscale images).

None of the paper's datasets can ship with the code, and no PyPI package bundles real medical images
(see /work/shared/DATA.md), so the end-to-end demo transfers between two *different* real tasks:
the SOURCE task is digits 0-4 (5 classes), the TARGET task is digits 5-9 relabelled 0-4. A model
trained on one and adapted to the other exercises the same code path as CLIP -> medical transfer.

Images are stored as PNG bytes so that they go through exactly the same decode / resize /
normalise / batch pipeline as the tfds datasets.
"""

from __future__ import annotations

import functools
import io

import numpy as np

from shpeft_jax.data import splits as splits_lib
from shpeft_jax.errors import ConfigError

TASKS = {"source": (0, 1, 2, 3, 4), "target": (5, 6, 7, 8, 9),
         # Further tasks on the same images, for the hybridity study (several fine-tunes of the
         # source-pretrained encoder): the even and the odd digits, relabelled 0-4.
         "even": (0, 2, 4, 6, 8), "odd": (1, 3, 5, 7, 9)}
SPLIT_FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}


def class_names(task: str) -> list[str]:
  return [f"digit_{d}" for d in _digits_of(task)]


def _digits_of(task: str) -> tuple[int, ...]:
  if task not in TASKS:
    raise ConfigError(f"digits: data.task must be one of {sorted(TASKS)}, got {task!r}.")
  return TASKS[task]


@functools.lru_cache(maxsize=None)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
  return images, d.target.astype(np.int64)


def digits_splits(task: str, seed: int = splits_lib.SPLIT_SEED
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (uint8 images [N, 8, 8], labels [N] in 0..4)}: seeded stratified 60/20/20 split."""
  digits = _digits_of(task)
  images, targets = _all_digits()
  idx = np.flatnonzero(np.isin(targets, digits))
  relabel = {d: i for i, d in enumerate(digits)}
  examples = [(f"{i:05d}", relabel[int(targets[i])]) for i in idx]
  sizes = dict(zip(SPLIT_FRACTIONS, splits_lib.apportion(len(examples),
                                                         list(SPLIT_FRACTIONS.values()))))
  parts = splits_lib.stratified_split(examples, sizes, seed, ".")
  out = {}
  for split, exs in parts.items():
    ids = np.array([int(name) for name, _ in exs], dtype=np.int64)
    out[split] = (images[ids], np.array([l for _, l in exs], dtype=np.int64))
  return out


def encode_png(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


@functools.lru_cache(maxsize=None)
def encoded_digits_splits(task: str) -> dict[str, tuple[tuple[bytes, ...], np.ndarray]]:
  """Like digits_splits, with each image PNG-encoded (cached: a few milliseconds once)."""
  return {split: (tuple(encode_png(im) for im in images), labels)
          for split, (images, labels) in digits_splits(task).items()}
