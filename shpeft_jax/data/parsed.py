"""What a source's parser returns: its records per split, the label names and the task kind.

Plain Python (no TensorFlow). Every source (the paper's six layouts, image folders, CSV tables,
ChestX-ray14, CheXpert, MedMNIST) is parsed into one `ParsedSource`; the tfds builder stores it,
the source id hashes it (`builders.source_id`), and nothing downstream asks which source it was.

The record contract (docs/DATASETS.md, "Records and batches"):
- single_label: `label` is the class index (an int, tfds ClassLabel);
- multi_label: `label` is a float32 vector [L] over `class_names` (the findings, in label order):
  POSITIVE 1.0, NEGATIVE 0.0, UNKNOWN -1.0 (masked out of the loss and the metrics);
- every record has `patient` (text; '' where the source has no patient or group id).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

SINGLE_LABEL = "single_label"
MULTI_LABEL = "multi_label"
TASKS = (SINGLE_LABEL, MULTI_LABEL)

POSITIVE, NEGATIVE, UNKNOWN = 1.0, 0.0, -1.0

# A class index (single_label) or one value per finding (multi_label).
Label = Union[int, tuple[float, ...]]
Record = tuple[str, Label]  # (key: an image path, or a name inside an array file; label)


def read_files(split: str, records: Sequence[Record]) -> Iterator[bytes]:
  """Encoded bytes of each record's image file, in order (the default image reader): read and
  checked (`splits.read_image`, a full decode) on every core (`ordered_map`)."""
  del split
  from shpeft_jax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
  for data, _ in ordered_map(splits_lib.read_image, (path for path, _ in records)):
    yield data


def ordered_map(fn: Callable, items: Iterable, ahead: int = 4) -> Iterator:
  """fn(item) for each item, in order, computed by one thread per core at most `ahead` per thread
  ahead of the consumer (Pillow's, pydicom's and TensorFlow's decoders release the GIL for most
  of their work), so preparing a large folder uses the host's cores. An exception of fn, or of
  `items` itself, is raised at its item, in order, as a sequential loop would."""
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  workers = max(1, min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else os.cpu_count() or 1))
  source = iter(items)
  pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="ordered_map")
  pending: collections.deque = collections.deque()

  def refill():
    while len(pending) < ahead * workers:
      try:
        item = next(source)
      except StopIteration:
        return
      except Exception as e:  # pylint: disable=broad-except  # raised in its turn, below
        pending.append(e)
        return
      pending.append(pool.submit(fn, item))

  try:
    refill()
    while pending:
      head = pending.popleft()
      if isinstance(head, Exception):
        raise head
      out = head.result()
      refill()
      yield out
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass(frozen=True)
class ParsedSource:
  """A source parsed into records.

  name: the dataset name (`data.name`).
  root: record file names are stored relative to it (`file_name` in the records).
  splits: {split: [(key, label), ...]} in a deterministic order; keys are unique in the source.
  class_names: class names (single_label) or finding names (multi_label), in label order.
  task: SINGLE_LABEL or MULTI_LABEL.
  patients: {key: patient id}; keys without one get ''.
  content_files: the files whose bytes identify the source (None: every record key is a file).
  images: (split, records) -> encoded image bytes of each record, in order.
  max_side: images whose shorter side is longer are stored shrunk to it (`data.prepare_max_side`;
    0: as they are).
  """
  name: str
  root: str
  splits: Mapping[str, list[Record]]
  class_names: tuple[str, ...]
  task: str = SINGLE_LABEL
  patients: Mapping[str, str] = dataclasses.field(default_factory=dict)
  content_files: tuple[str, ...] | None = None
  images: Callable[[str, Sequence[Record]], Iterator[bytes]] = read_files
  max_side: int = 0

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
    if self.max_side < 0:
      raise ValueError(f"max_side must be >= 0, got {self.max_side!r}")

  @property
  def split_sizes(self) -> dict[str, int]:
    return {split: len(records) for split, records in self.splits.items()}

  @property
  def num_examples(self) -> int:
    return sum(self.split_sizes.values())

  def patient(self, key: str) -> str:
    return self.patients.get(key, "")

  def files(self) -> list[str]:
    """The files to content-hash, sorted."""
    if self.content_files is not None:
      return sorted(self.content_files)
    return sorted({key for records in self.splits.values() for key, _ in records})
