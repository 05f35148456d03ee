"""Label-scarce training subsets: `data.train_fraction` and `data.train_per_class`.

The subset is a deterministic selection of record indices of the training split, computed once
from the split's metadata (labels, patients, file names; no image is decoded) and applied as a
filter in the input pipeline (`input_pipeline.get_source` wraps the source). It depends only on
the records and `data.subset_seed`, never on the training seed or the method, so a comparison of
methods and seeds trains on one subset. Validation and test stay whole.

Selection (one greedy, iterative stratification over label columns, Sechidis et al. 2011 style):
- Units are patients (records sharing a non-empty `patient`), so a patient's images are all in
  or all out; a record without a patient is its own unit. Units are visited in an order drawn
  from `subset_seed`.
- Labels become positive counts per unit and column: single-label one-hot (a class is a column),
  multi-label the findings (1 positive; 0 and -1 unknown are not).
- Each column gets a target: train_per_class N -> N positives; train_fraction f ->
  max(1, round(f * positives in the split)) (halves up). Columns are served rarest first: units with a
  positive in the column are added in seeded order until the column reaches its target (a unit
  counts for every column it is positive in; the last unit of a patient may bring a column
  above target).
- train_fraction only: units are then added, in seeded order, while the subset holds fewer than
  round(f * records) images and the unit keeps every column at or below its target (multi-label
  images without a finding fill up here).

Bad input (ConfigError / DataError, one line, before any work): a fraction outside (0, 1], a
negative or non-integer shot count, both set, more shots than a class has, a class or finding
with no positive in the split (it would be absent from the subset).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Sequence

import numpy as np

from shpeft_jax.data import parsed as parsed_lib
from shpeft_jax.errors import ConfigError, DataError

# The data fields of a subset and their defaults (off). Recorded in fingerprints only when set.
FIELDS = {"train_fraction": 1.0, "train_per_class": 0, "subset_seed": 0}


@dataclasses.dataclass(frozen=True)
class Spec:
  """What subset of the training split to take (from config.data)."""
  fraction: float = 1.0
  per_class: int = 0
  seed: int = 0

  @property
  def active(self) -> bool:
    return self.fraction < 1.0 or self.per_class > 0

  def describe(self) -> str:
    if self.per_class:
      return f"{self.per_class} per class (subset_seed {self.seed})"
    return f"{self.fraction:g} of the training labels (subset_seed {self.seed})"


def spec_of(data_config) -> Spec:
  """The subset of `data_config`; ConfigError for a bad value (checked before any data work)."""
  get = (data_config.get if hasattr(data_config, "get") else
         lambda k, d=None: getattr(data_config, k, d))
  fraction = get("train_fraction", 1.0)
  per_class = get("train_per_class", 0)
  seed = get("subset_seed", 0)
  fraction = 1.0 if fraction is None else fraction
  if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
      or not math.isfinite(fraction) or not 0 < fraction <= 1):
    raise ConfigError(f"data.train_fraction={fraction!r} must be in (0, 1] (1.0: all training "
                      "labels), e.g. --config.data.train_fraction=0.1.")
  per_class = per_class or 0
  if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
    raise ConfigError(f"data.train_per_class={per_class!r} must be an integer >= 0 (images per "
                      "class; 0: off), e.g. --config.data.train_per_class=16.")
  if per_class and fraction < 1:
    raise ConfigError(f"data.train_fraction={fraction:g} and data.train_per_class={per_class} are "
                      "both set; set one of them (the other to its default: 1.0 / 0).")
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ConfigError(f"data.subset_seed={seed!r} must be an integer.")
  return Spec(float(fraction), int(per_class), int(seed))


def recorded_fields(data_config) -> dict:
  """{'data.train_fraction': ...} of the subset fields that differ from their default: what a
  fingerprint records (runs without a subset keep the fingerprints they had)."""
  spec = spec_of(data_config)
  if not spec.active:
    return {}
  return {f"data.{k}": getattr(spec, a) for k, a in
          (("train_fraction", "fraction"), ("train_per_class", "per_class"),
           ("subset_seed", "seed"))}


def positives(labels: np.ndarray, task: str, num_classes: int) -> np.ndarray:
  """bool [N, L]: record i is a positive of column l (one-hot classes, or findings == 1)."""
  labels = np.asarray(labels)
  if task == parsed_lib.MULTI_LABEL:
    return labels.reshape(len(labels), -1) == 1.0
  out = np.zeros((len(labels), num_classes), bool)
  out[np.arange(len(labels)), labels.astype(np.int64)] = True
  return out


def units(patients: Sequence, n: int) -> np.ndarray:
  """int [N]: the unit of each record; records of one non-empty patient share a unit."""
  if len(patients) != n:
    raise ValueError(f"{len(patients)} patients for {n} records")
  # A leading NUL keeps a record's own key apart from every patient id.
  keys = [_text(p) or f"\0record {i}" for i, p in enumerate(patients)]
  _, unit = np.unique(np.asarray(keys, dtype=str), return_inverse=True)
  return unit.reshape(-1)


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def select(spec: Spec, labels: np.ndarray, patients: Sequence, *, task: str,
           class_names: Sequence[str], split: str = "train") -> np.ndarray:
  """Sorted record indices of the subset (see the module doc); DataError if it cannot be made."""
  pos = positives(labels, task, len(class_names))
  n, num_cols = pos.shape
  unit = units(patients, n)
  num_units = int(unit.max()) + 1 if n else 0
  unit_pos = np.zeros((num_units, num_cols), np.int64)
  np.add.at(unit_pos, unit, pos.astype(np.int64))
  unit_size = np.bincount(unit, minlength=num_units)
  totals = unit_pos.sum(0)
  kind = "finding" if task == parsed_lib.MULTI_LABEL else "class"
  for l in range(num_cols):
    if totals[l] == 0:
      raise DataError(f"{kind} {class_names[l]!r} has no {'positive ' if kind == 'finding' else ''}"
                      f"image in the {split!r} split, so the training subset ({spec.describe()}) "
                      "would lack it; use a split that has it, or no subset.")
    if spec.per_class > totals[l]:
      raise DataError(f"data.train_per_class={spec.per_class} is more than the {totals[l]} "
                      f"{'positive ' if kind == 'finding' else ''}images of {kind} "
                      f"{class_names[l]!r} in the {split!r} split; use at most {min(totals)}.")
  if spec.per_class:
    target = np.full(num_cols, spec.per_class, np.int64)
  else:
    target = np.maximum(1, np.floor(spec.fraction * totals + 0.5)).astype(np.int64)
  order = np.random.default_rng(spec.seed).permutation(num_units)
  chosen = np.zeros(num_units, bool)
  have = np.zeros(num_cols, np.int64)
  for l in np.argsort(totals, kind="stable"):  # Rarest column first.
    for u in order:
      if have[l] >= target[l]:
        break
      if not chosen[u] and unit_pos[u, l]:
        chosen[u] = True
        have += unit_pos[u]
  if not spec.per_class:
    size, want = int(unit_size[chosen].sum()), int(math.floor(spec.fraction * n + 0.5))
    for u in order:
      if size >= want:
        break
      if not chosen[u] and np.all(have + unit_pos[u] <= target):
        chosen[u] = True
        have += unit_pos[u]
        size += int(unit_size[u])
  return np.flatnonzero(chosen[unit])


def subset_id(file_names: Sequence) -> str:
  """Content id of a subset: sha256 of its records' file names (same id = same images)."""
  h = hashlib.sha256()
  for f in sorted(_text(f) for f in file_names):
    h.update(f.encode() + b"\n")
  return h.hexdigest()[:16]


def facts(spec: Spec, indices: np.ndarray, metadata: dict, *, task: str,
          class_names: Sequence[str], split: str) -> dict:
  """What results.json and the report record of a subset."""
  pos = positives(np.asarray(metadata["label"])[indices], task, len(class_names))
  n_patients = len({_text(p) for p in np.asarray(metadata["patient"])[indices] if _text(p)})
  return {"split": split, "train_fraction": spec.fraction, "train_per_class": spec.per_class,
          "subset_seed": spec.seed, "num_images": int(len(indices)),
          "of_images": int(len(metadata["label"])), "num_patients": n_patients,
          "positives_per_class": dict(zip(class_names, pos.sum(0).astype(int).tolist())),
          "subset_id": subset_id(np.asarray(metadata["file_name"])[indices]),
          "description": spec.describe()}


def line(facts_: dict) -> str:
  """One line of a run's training subset (`facts`, results.json 'train_subset')."""
  patients = f", {facts_['num_patients']} patients" if facts_.get("num_patients") else ""
  return (f"{facts_['description']}: {facts_['num_images']} of {facts_['of_images']} "
          f"{facts_['split']!r} images{patients} (subset id {facts_['subset_id']})")
