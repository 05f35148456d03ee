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
import itertools
import os
from typing import Callable, Iterator, Mapping, Sequence, Union

SINGLE_LABEL = "single_label"
MULTI_LABEL = "multi_label"
TASKS = (SINGLE_LABEL, MULTI_LABEL)

POSITIVE, NEGATIVE, UNKNOWN = 1.0, 0.0, -1.0

# A class index (single_label) or one value per finding (multi_label).
Label = Union[int, tuple[float, ...]]
Record = tuple[str, Label]  # (key: an image path, or a name inside an array file; label)


def read_files(split: str, records: Sequence[Record]) -> Iterator[bytes]:
  """Encoded bytes of each record's image file, in order (the default image reader).

  Files are read and checked (`splits.read_image`, a full decode) by one thread per core, at most
  4 per thread ahead of the consumer (Pillow's and pydicom's decoders release the GIL for most of
  their work), so preparing a large folder uses the host's cores. An error is raised at its
  record, in order, as a sequential reader would.
  """
  del split
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  from shpeft_jax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
  workers = max(1, min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else os.cpu_count() or 1))
  paths = iter([path for path, _ in records])
  pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="read_image")
  try:
    pending = collections.deque(pool.submit(splits_lib.read_image, p)
                                for p in itertools.islice(paths, 4 * workers))
    while pending:
      data = pending.popleft().result()[0]
      for p in itertools.islice(paths, 1):
        pending.append(pool.submit(splits_lib.read_image, p))
      yield data
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
