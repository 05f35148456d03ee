"""Sources labelled by tables: CSV reading, label columns, splits, and the checks they share.

Plain Python (no TensorFlow). `csv_source` is the generic `data.name='csv'` source; ChestX-ray14
and CheXpert (`chest_xray.py`) are tables in a published layout and use the same pieces:
`read_csv` (a missing column names it and lists the ones present), the label readers (a value
outside the allowed set names the file, row and value), `assign_splits` (a split column, list
files, or a seeded split grouped by patient), and `finish` (missing image files counted against
`data.max_missing_fraction`, a patient in two splits, an empty split, a finding without a
positive training example: each an error naming it).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from absl import logging

from shpeft_jax.data import parsed as parsed_lib
from shpeft_jax.data import splits as splits_lib
from shpeft_jax.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")
# Split names accepted in a split column (lower-cased) -> the split.
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "validation",
                  "valid": "validation", "validation": "validation", "dev": "validation",
                  "test": "test", "testing": "test"}
# Cells of a 0/1 label column; blank (and -1) is unknown: masked, never taken for negative.
_BINARY_CELLS = {"1": parsed_lib.POSITIVE, "1.0": parsed_lib.POSITIVE,
                 "0": parsed_lib.NEGATIVE, "0.0": parsed_lib.NEGATIVE,
                 "-1": parsed_lib.UNKNOWN, "-1.0": parsed_lib.UNKNOWN, "": parsed_lib.UNKNOWN}
# Missing image paths listed in an error.
_SHOWN_MISSING = 10


@dataclasses.dataclass(frozen=True)
class Row:
  """One CSV row: its cells by column name and where it came from (for error messages)."""
  file: str
  line: int
  cells: Mapping[str, str]

  @property
  def where(self) -> str:
    return f"{self.file} row {self.line}"


@dataclasses.dataclass(frozen=True)
class Item:
  """One labelled image before the checks: path, label, patient ('' if none), and its row."""
  path: str
  label: parsed_lib.Label
  patient: str
  where: str


# ---------------------------------------------------------------------------------------------
# Reading.


def read_csv(path: str, required: Sequence[str], name: str) -> list[Row]:
  """The rows of a CSV file (header first; UTF-8, a BOM is ignored).

  Header cells are stripped of surrounding whitespace; a required column that is absent is an
  error naming it and the columns present. `Row.line` is the file's line number (header = 1).
  """
  if not os.path.isfile(path):
    raise DataError(f"{name}: CSV file {path} does not exist; check data.manual_dir and the "
                    "file names (docs/DATASETS.md).")
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in required if c not in header]
    if missing:
      raise DataError(f"{name}: {path} has no column {missing[0]!r}; its columns are "
                      f"{[h for h in header if h]}.")
    rows = []
    for cells in reader:
      if not any(c.strip() for c in cells):
        continue  # A blank line (a trailing newline in an exported file).
      rows.append(Row(path, reader.line_num, dict(zip(header, (c.strip() for c in cells)))))
  return rows


def read_list(path: str, name: str) -> list[tuple[int, str]]:
  """(line number, entry) of a list file, one entry a line, blank lines skipped."""
  if not os.path.isfile(path):
    raise DataError(f"{name}: list file {path} does not exist; check its name and "
                    "data.manual_dir.")
  with open(path, encoding="utf-8-sig") as f:
    return [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]


# ---------------------------------------------------------------------------------------------
# Labels.


def single_labels(rows: Sequence[Row], column: str, class_names: Sequence[str], name: str
                  ) -> tuple[list[int], tuple[str, ...]]:
  """Class indices from one column of class names or of indices 0..K-1.

  class_names: the label order; empty: sorted names found, or '0'..'K-1' for indices. A value
  outside the given names (or an index >= their number) is an error naming file, row and value.
  """
  values = [r.cells.get(column, "") for r in rows]
  for r, v in zip(rows, values):
    if not v:
      raise DataError(f"{name}: {r.where} has an empty {column!r}; every row needs a label.")
  if all(v.isdigit() for v in values):
    k = max(int(v) for v in values) + 1
    names = tuple(class_names) or tuple(str(i) for i in range(k))
    for r, v in zip(rows, values):
      if int(v) >= len(names):
        raise DataError(f"{name}: {r.where} has {column}={v!r}, outside the class indices "
                        f"0..{len(names) - 1} of data.csv_class_names {list(names)}.")
    return [int(v) for v in values], names
  names = tuple(class_names) or tuple(sorted(set(values)))
  splits_lib.check_case_collisions(names, "classes", name)
  index = {n: i for i, n in enumerate(names)}
  for r, v in zip(rows, values):
    if v not in index:
      raise DataError(f"{name}: {r.where} has {column}={v!r}, not one of the classes "
                      f"{list(names)} (data.csv_class_names).")
  return [index[v] for v in values], names


def binary_columns(rows: Sequence[Row], columns: Sequence[str], cells: Mapping[str, float],
                   name: str) -> list[tuple[float, ...]]:
  """One value per column from the `cells` table (e.g. '1' -> 1.0); other values are errors."""
  out = []
  for r in rows:
    vector = []
    for c in columns:
      v = r.cells.get(c, "")
      if v not in cells:
        raise DataError(f"{name}: {r.where} has {c}={v!r}; allowed values are "
                        f"{sorted(k for k in cells if k)} or blank.")
      vector.append(cells[v])
    out.append(tuple(vector))
  return out


def findings_labels(rows: Sequence[Row], column: str, separator: str, no_finding: str,
                    finding_names: Sequence[str], name: str
                    ) -> tuple[list[tuple[float, ...]], tuple[str, ...]]:
  """Multi-hot vectors from one column of `separator`-joined findings (`no_finding` = none).

  finding_names: the label order; empty: the sorted findings found. A finding outside the given
  names, or an empty cell, is an error naming file, row and value.
  """
  parsed_rows = []
  for r in rows:
    v = r.cells.get(column, "")
    if not v:
      raise DataError(f"{name}: {r.where} has an empty {column!r}; write {no_finding!r} for an "
                      "image without findings.")
    found = [] if v == no_finding else [f.strip() for f in v.split(separator)]
    parsed_rows.append(found)
  names = tuple(finding_names) or tuple(sorted({f for fs in parsed_rows for f in fs}))
  splits_lib.check_case_collisions(names, "findings", name)
  index = {n: i for i, n in enumerate(names)}
  out = []
  for r, found in zip(rows, parsed_rows):
    vector = [parsed_lib.NEGATIVE] * len(names)
    for f in found:
      if f not in index:
        raise DataError(f"{name}: {r.where} has the finding {f!r} in {column}, not one of "
                        f"{list(names) + [no_finding]}.")
      vector[index[f]] = parsed_lib.POSITIVE
    out.append(tuple(vector))
  return out, names


# ---------------------------------------------------------------------------------------------
# Splits.


def split_of(value: str, where: str, column: str, name: str) -> str:
  split = _SPLIT_ALIASES.get(value.strip().lower())
  if split is None:
    raise DataError(f"{name}: {where} has {column}={value!r}; allowed split names are "
                    f"{sorted(_SPLIT_ALIASES)}.")
  return split


def grouped_split(items: Sequence[Item], fractions: Mapping[str, float], seed: int
                  ) -> dict[str, list[Item]]:
  """A seeded split in which every patient's images stay together.

  Images without a patient are groups of one. The split sizes' targets are `fractions` of the
  images (largest remainder); patients are taken larger first (equal sizes in a seeded random
  order) and each goes to the split furthest below its target (ties: the first in `fractions`).
  Every split is then within the largest patient's image count of its target; with groups of one
  the sizes are exact. Depends only on the items, not on their order.
  """
  groups: dict[str, list[Item]] = {}
  for it in sorted(items, key=lambda i: i.path):
    groups.setdefault(it.patient or "\0" + it.path, []).append(it)
  names = sorted(groups)
  shuffled = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
  order = sorted(shuffled, key=lambda g: -len(groups[g]))  # stable: ties keep the seeded order
  split_names = list(fractions)
  targets = splits_lib.apportion(len(items), list(fractions.values()))
  sizes = [0] * len(split_names)
  out: dict[str, list[Item]] = {s: [] for s in split_names}
  for g in order:
    k = max(range(len(split_names)), key=lambda j: (targets[j] - sizes[j], -j))
    out[split_names[k]] += groups[g]
    sizes[k] += len(groups[g])
  return {s: sorted(v, key=lambda i: i.path) for s, v in out.items()}


def carve(items: Sequence[Item], fractions: Mapping[str, float], task: str, seed: int
          ) -> dict[str, list[Item]]:
  """Split by patient when any item has one; single-label without patients: stratified, exact."""
  if task == parsed_lib.SINGLE_LABEL and not any(it.patient for it in items):
    by_path = {it.path: it for it in items}
    sizes = dict(zip(fractions, splits_lib.apportion(len(items), list(fractions.values()))))
    exs = splits_lib.stratified_split([(it.path, it.label) for it in items], sizes, seed, "/")
    return {s: [by_path[p] for p, _ in v] for s, v in exs.items()}
  return grouped_split(items, fractions, seed)


def carve_validation(by_split: dict[str, list[Item]], val_fraction: float, task: str,
                     seed: int) -> dict[str, list[Item]]:
  """`validation` carved from `train` (by patient) when the source has none; 0: no validation."""
  if not 0 <= val_fraction < 1:
    raise ConfigError(f"data.val_fraction={val_fraction} must be in [0, 1); 0 carves no "
                      "validation split.")
  if "validation" in by_split or val_fraction == 0:
    return by_split
  parts = carve(by_split["train"], {"train": 1 - val_fraction, "validation": val_fraction}, task,
                seed)
  return {**by_split, **parts}


# ---------------------------------------------------------------------------------------------
# Checks and the parsed source.


def drop_missing(by_split: dict[str, list[Item]], max_fraction: float, name: str
                 ) -> dict[str, list[Item]]:
  """Items whose image file does not exist are counted per split and dropped; more than
  `max_fraction` of a split missing stops the run with the first 10 listed."""
  if not 0 <= max_fraction <= 1:
    raise ConfigError(f"data.max_missing_fraction={max_fraction} must be in [0, 1].")
  out = {}
  for split, items in by_split.items():
    exists = [os.path.isfile(it.path) for it in items]
    missing = [it for it, ok in zip(items, exists) if not ok]
    if missing:
      shown = "\n".join(f"  {it.path} ({it.where})" for it in missing[:_SHOWN_MISSING])
      more = f"\n  ... and {len(missing) - _SHOWN_MISSING} more" if len(
          missing) > _SHOWN_MISSING else ""
      fraction = len(missing) / len(items)
      label = f"split {split!r}" if split in SPLITS else split
      if fraction > max_fraction:
        raise DataError(
            f"{name}: {len(missing)} of the {len(items)} images of {label} "
            f"({fraction:.1%}) do not exist, more than data.max_missing_fraction="
            f"{max_fraction:g} allows; extract the complete download, or raise "
            f"data.max_missing_fraction to train without them. The first ones:\n{shown}{more}")
      logging.warning("%s: %d of the %d images of %s do not exist and are left out "
                      "(data.max_missing_fraction=%g):\n%s%s", name, len(missing), len(items),
                      label, max_fraction, shown, more)
    out[split] = [it for it, ok in zip(items, exists) if ok]
  return out


def check_patients_disjoint(by_split: Mapping[str, list[Item]], name: str) -> None:
  first: dict[str, str] = {}
  for split in by_split:
    for it in by_split[split]:
      if it.patient and first.setdefault(it.patient, split) != split:
        raise DataError(f"{name}: patient {it.patient!r} has images in split "
                        f"{first[it.patient]!r} and in split {split!r} ({it.where}); a patient "
                        "must stay in one split, or test images leak into training.")


def check_nonempty(by_split: Mapping[str, list], name: str) -> None:
  for split, items in by_split.items():
    if not items:
      raise DataError(f"{name}: split {split!r} is empty; check the split column / list files "
                      "and data.val_fraction.")


def check_train_covers_labels(train_labels: Sequence[parsed_lib.Label],
                              class_names: Sequence[str], task: str, name: str) -> None:
  """Every class (single-label) or finding (multi-label) needs a positive training example."""
  if task == parsed_lib.MULTI_LABEL:
    positives = (np.asarray(train_labels, np.float32).reshape(-1, len(class_names)) ==
                 parsed_lib.POSITIVE).any(axis=0)
  else:
    positives = np.bincount(np.asarray(train_labels, np.int64),
                            minlength=len(class_names)) > 0
  for i, has in enumerate(positives):
    if not has:
      what = "finding" if task == parsed_lib.MULTI_LABEL else "class"
      raise DataError(f"{name}: the {what} {class_names[i]!r} has no positive example in the "
                      "training split, so nothing can learn it; drop it from the label set or "
                      "add training images.")


def merge_duplicate_rows(items: Sequence[Item], name: str) -> list[Item]:
  """One item per image: rows repeating an image with the same label and patient (a table with
  one row per annotation, e.g. per box) are merged, with a count; differing ones are an error."""
  first: dict[str, Item] = {}
  for it in items:
    seen = first.setdefault(it.path, it)
    if seen is not it and (seen.label, seen.patient) != (it.label, it.patient):
      raise DataError(f"{name}: the image {it.path} is listed twice with different labels or "
                      f"patients ({seen.where} and {it.where}); keep one row per image.")
  if len(first) < len(items):
    logging.info("%s: %d row(s) repeat an image with the same label and were merged.", name,
                 len(items) - len(first))
  return list(first.values())


def unique_per_split(by_split: Mapping[str, Sequence[Item]], name: str) -> dict[str, list[Item]]:
  """`merge_duplicate_rows` within each split; an image in two splits is an error."""
  out = {split: merge_duplicate_rows(items, name) for split, items in by_split.items()}
  split_of_path: dict[str, str] = {}
  for split, items in out.items():
    for it in items:
      other = split_of_path.setdefault(it.path, split)
      if other != split:
        raise DataError(f"{name}: the image {it.path} is in split {other!r} and in split "
                        f"{split!r} ({it.where}); an image belongs to one split.")
  return out


def finish(name: str, root: str, by_split: dict[str, list[Item]], class_names: Sequence[str],
           task: str) -> parsed_lib.ParsedSource:
  """The checks every table source ends with (after `unique_per_split` and `drop_missing`,
  which run before any split is carved), then the ParsedSource (train / validation / test)."""
  check_nonempty(by_split, name)
  check_patients_disjoint(by_split, name)
  check_train_covers_labels([it.label for it in by_split["train"]], class_names, task, name)
  ordered = {s: sorted(by_split[s], key=lambda i: i.path) for s in SPLITS if s in by_split}
  return parsed_lib.ParsedSource(
      name=name, root=root, class_names=tuple(class_names), task=task,
      splits={s: [(it.path, it.label) for it in v] for s, v in ordered.items()},
      patients={it.path: it.patient for v in ordered.values() for it in v if it.patient})


# ---------------------------------------------------------------------------------------------
# The generic CSV source (data.name='csv').

CSV_LAYOUT = """\
  <manual_dir>/labels.csv   (data.csv_files; several files are read as one table)
    path,label[,patient][,split]        one label column of class names or indices (single-label)
    path,Finding A,Finding B,...        several 0/1 columns (multi-label; blank or -1 = unknown)
    path,findings                       one column of '|'-separated findings (multi-label)
  <manual_dir>/<data.csv_image_root>/<path>   the images the path column names"""


def _csv_labels(rows: Sequence[Row], cfg) -> tuple[list[parsed_lib.Label], tuple[str, ...], str]:
  """(labels, class names, task) from whichever label field the config sets (exactly one)."""
  chosen = [f for f, v in (("csv_label_column", cfg.csv_label_column),
                           ("csv_label_columns", tuple(cfg.csv_label_columns)),
                           ("csv_findings_column", cfg.csv_findings_column)) if v]
  if len(chosen) != 1:
    raise ConfigError("csv: set exactly one of data.csv_label_column (single-label), "
                      "data.csv_label_columns or data.csv_findings_column (multi-label); "
                      f"set: {chosen or 'none'}.")
  if cfg.csv_label_column:
    labels, names = single_labels(rows, cfg.csv_label_column, tuple(cfg.csv_class_names), "csv")
    return list(labels), names, parsed_lib.SINGLE_LABEL
  if cfg.csv_label_columns:
    columns = tuple(cfg.csv_label_columns)
    splits_lib.check_case_collisions(columns, "findings", "csv")
    return (list(binary_columns(rows, columns, _BINARY_CELLS, "csv")), columns,
            parsed_lib.MULTI_LABEL)
  labels, names = findings_labels(rows, cfg.csv_findings_column, cfg.csv_findings_separator,
                                  cfg.csv_no_finding, tuple(cfg.csv_class_names), "csv")
  return list(labels), names, parsed_lib.MULTI_LABEL


def _lists_split(rows: Sequence[Row], cfg, manual_dir: str) -> list[str]:
  """The split of each row from the list files (entries = path-column values); '' = in none."""
  lists = {"train": cfg.csv_train_list, "validation": cfg.csv_val_list,
           "test": cfg.csv_test_list}
  if not lists["train"] or not lists["test"]:
    raise ConfigError("csv: list-file splits need data.csv_train_list and data.csv_test_list "
                      "(data.csv_val_list is optional: validation is carved from train).")
  row_of: dict[str, list[int]] = {}
  for i, r in enumerate(rows):
    row_of.setdefault(r.cells[cfg.csv_path_column], []).append(i)
  out = [""] * len(rows)
  for split, rel in lists.items():
    if not rel:
      continue
    path = os.path.join(manual_dir, rel)
    for line, entry in read_list(path, "csv"):
      if entry not in row_of:
        raise DataError(f"csv: {path} line {line} lists {entry!r}, which no row's "
                        f"{cfg.csv_path_column!r} holds.")
      for i in row_of[entry]:
        if out[i] and out[i] != split:
          raise DataError(f"csv: {entry!r} is listed for both {out[i]!r} and {split!r} "
                          f"({path} line {line}).")
        out[i] = split
  return out


def _row_splits(rows: Sequence[Row], cfg, manual_dir: str) -> list[str] | None:
  """Each row's split from the split column or the list files; None: carve them all."""
  has_lists = bool(cfg.csv_train_list or cfg.csv_val_list or cfg.csv_test_list)
  if cfg.csv_split_column and has_lists:
    raise ConfigError("csv: set data.csv_split_column or the list files "
                      "(data.csv_train_list / csv_val_list / csv_test_list), not both.")
  if cfg.csv_split_column:
    return [split_of(r.cells[cfg.csv_split_column], r.where, cfg.csv_split_column, "csv")
            for r in rows]
  if has_lists:
    return _lists_split(rows, cfg, manual_dir)
  return None


def _csv_items(rows: Sequence[Row], labels: Sequence[parsed_lib.Label], cfg, image_root: str
               ) -> list[Item]:
  items = []
  for r, label in zip(rows, labels):
    value = r.cells[cfg.csv_path_column]
    if not value:
      raise DataError(f"csv: {r.where} has an empty {cfg.csv_path_column!r}.")
    try:
      rel = cfg.csv_path_format.format(value)
    except (IndexError, KeyError, ValueError) as e:
      raise ConfigError(f"csv: data.csv_path_format={cfg.csv_path_format!r} cannot format "
                        f"{value!r} ({e}); use one '{{}}' where the value goes.") from e
    patient = r.cells[cfg.csv_patient_column] if cfg.csv_patient_column else ""
    items.append(Item(os.path.normpath(os.path.join(image_root, rel)), label, patient, r.where))
  return items


def _carved_splits(items: Sequence[Item], cfg, task: str) -> dict[str, list[Item]]:
  """No split column or lists: the seeded split of data.csv_split_fractions."""
  fractions = dict(zip(SPLITS, tuple(cfg.csv_split_fractions)))
  if len(cfg.csv_split_fractions) != 3 or min(fractions.values()) < 0 or not np.isclose(
      sum(fractions.values()), 1.0):
    raise ConfigError(f"csv: data.csv_split_fractions={tuple(cfg.csv_split_fractions)} must be "
                      "three non-negative fractions (train, validation, test) summing to 1.")
  items = merge_duplicate_rows(items, "csv")
  items = drop_missing({"the table": items}, cfg.max_missing_fraction, "csv")["the table"]
  return carve(items, {s: f for s, f in fractions.items() if f > 0}, task,
               splits_lib.SPLIT_SEED)


def _given_splits(items: Sequence[Item], row_splits: Sequence[str], cfg, task: str
                  ) -> dict[str, list[Item]]:
  """Splits from the split column or the list files; validation carved from train if absent."""
  by_split: dict[str, list[Item]] = {}
  for it, split in zip(items, row_splits):
    if split:
      by_split.setdefault(split, []).append(it)
  left_out = list(row_splits).count("")
  if left_out:
    logging.warning("csv: %d row(s) are in none of the list files and are left out.", left_out)
  if "train" not in by_split or "test" not in by_split:
    raise DataError(f"csv: the splits found are {sorted(by_split)}; a train and a test split "
                    "are needed.")
  by_split = unique_per_split(by_split, "csv")
  by_split = drop_missing(by_split, cfg.max_missing_fraction, "csv")
  return carve_validation(by_split, cfg.val_fraction, task, splits_lib.SPLIT_SEED)


def csv_source(manual_dir: str, cfg) -> parsed_lib.ParsedSource:
  """The `csv` source: images named by a path column, labels and splits from the table."""
  if not manual_dir or not os.path.isdir(manual_dir):
    raise DataError(f"csv: data.manual_dir={manual_dir!r} does not exist; point it at the "
                    f"folder holding the CSV file(s) and the images:\n{CSV_LAYOUT}")
  if not cfg.csv_files:
    raise ConfigError("csv: data.csv_files is empty; name the CSV file(s) (relative to "
                      "data.manual_dir), e.g. --config.data.csv_files=\"('labels.csv',)\".")
  required = [cfg.csv_path_column] + [c for c in (
      cfg.csv_label_column, cfg.csv_findings_column, cfg.csv_split_column,
      cfg.csv_patient_column) if c] + list(cfg.csv_label_columns)
  rows = [r for f in cfg.csv_files
          for r in read_csv(os.path.join(manual_dir, f), required, "csv")]
  if not rows:
    raise DataError(f"csv: {', '.join(cfg.csv_files)} hold no rows.")
  labels, class_names, task = _csv_labels(rows, cfg)
  image_root = os.path.normpath(os.path.join(manual_dir, cfg.csv_image_root))
  items = _csv_items(rows, labels, cfg, image_root)
  row_splits = _row_splits(rows, cfg, manual_dir)
  by_split = (_carved_splits(items, cfg, task) if row_splits is None
              else _given_splits(items, row_splits, cfg, task))
  return finish("csv", image_root, by_split, class_names, task)
