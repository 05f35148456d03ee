"""tf.data input pipeline: encoded images in, uint8 numpy batches out.

Design (why it looks like this):
- Exact resume. The training stream is a concatenation of epochs; epoch e is the split shuffled with
  a seed derived from (seed, e), and each example's augmentation is drawn from a stateless key
  (seed, epoch, example index). Nothing depends on iterator state, so the iterator started at
  `start_step` yields exactly the batches an uninterrupted one yields after `start_step` steps (the
  resumed stream skips the consumed part of the current epoch without decoding it).
- Multi-process. Every process walks the same global stream of *encoded* records and keeps only its
  slice of each global batch (positions [p * local_B, (p + 1) * local_B)), before decoding: decoding
  and augmentation, the costly part, are split across processes, and the global batch is the same
  whatever the number of processes. Feed the local batches to
  `jax.make_array_from_process_local_data` (see `to_global_array`).
- Evaluation visits each example exactly once: the split is padded up to a multiple of the global
  batch with dummy examples whose `valid` is False, which metrics must mask out.
- Batches leave the host as uint8 pixels (the resized image rounded, as PIL's resize in CLIP's own
  preprocessing gives): the model normalises them with its tower's pixel statistics and casts to
  the compute dtype on the device, inside the jitted step (`clip_vit.normalise_pixels`): no float
  pass on the host, and a quarter of the host-to-device bytes of float32 batches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from shpeft_jax.data import decoded_cache
from shpeft_jax.data import demo
from shpeft_jax.data import parsed as parsed_lib
from shpeft_jax.data import subsets
from shpeft_jax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]

# A valid 1x1 black PNG: the image of the padding examples, so that padding goes through the same
# decode path as real examples.
_PAD_PNG = demo.encode_png(np.zeros((1, 1), np.uint8))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset before reading it.

  task: 'single_label' (label = class index) or 'multi_label' (label = one value per finding,
  1 / 0 / -1 unknown); class_names are the classes or the findings, in label order.
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  split_sizes: dict[str, int]
  # Identity of the records (the prepared source's id): part of every stage's fingerprint.
  source_id: str = ""
  task: str = parsed_lib.SINGLE_LABEL
  # The training subset (data.train_fraction / train_per_class; `subsets.facts`), None: whole.
  subset: dict | None = None


# The batches' label dtype per task kind (records: ClassLabel int64 / float32 vectors).
_LABEL_DTYPES = {parsed_lib.SINGLE_LABEL: tf.int32, parsed_lib.MULTI_LABEL: tf.float32}


def _padding_label(info: DatasetInfo) -> tf.Tensor:
  """The label of an eval padding row: 0 (single_label) or a vector of -1 (multi_label)."""
  if info.task == parsed_lib.MULTI_LABEL:
    return tf.fill([info.num_classes], tf.constant(parsed_lib.UNKNOWN, tf.float32))
  return tf.constant(0, tf.int64)


# ---------------------------------------------------------------------------------------------
# Sources: a fixed-order tf.data.Dataset of {'image': encoded bytes, 'label': int64} per split.


class _Source:
  """A fixed-order tf.data.Dataset of {'image': encoded bytes, 'label'} per split."""
  info: DatasetInfo
  # Where the decoded eval cache lives (`decoded_cache`); None: in memory.
  cache_dir: str | None = None

  def split_size(self, split: str) -> int:
    raise NotImplementedError

  def dataset(self, split: str) -> tf.data.Dataset:
    raise NotImplementedError

  def metadata(self, split: str) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def _check_split(self, split: str):
    if not split:
      raise ConfigError(f"{self.info.name}: empty split name; available splits: "
                        f"{sorted(self.info.split_sizes)}.")


class _DigitsSource(_Source):
  """The in-memory demo data (scikit-learn digits), source or target task."""

  def __init__(self, task: str):
    self._splits = demo.encoded_digits_splits(task)
    names = tuple(demo.class_names(task))
    self.info = DatasetInfo(f"digits_{task}", len(names), names,
                            {s: len(l) for s, (_, l) in self._splits.items()},
                            source_id=f"digits_{task}:sklearn")

  def split_size(self, split):
    self._check_split(split)
    if split not in self._splits:
      raise ConfigError(f"{self.info.name}: unknown split {split!r}; available: "
                        f"{sorted(self._splits)}.")
    return len(self._splits[split][1])

  def dataset(self, split):
    self.split_size(split)
    images, labels = self._splits[split]
    return tf.data.Dataset.from_tensor_slices({
        "image": tf.constant(list(images), tf.string),
        "label": tf.constant(labels, tf.int64)})

  def metadata(self, split):
    self.split_size(split)
    labels = self._splits[split][1]
    return {"file_name": np.asarray([f"{split}/{i:04d}" for i in range(len(labels))]),
            "patient": np.asarray([""] * len(labels)), "label": np.asarray(labels)}


class _TfdsSource(_Source):
  """A tfds builder from `builders.py`, prepared from the manual dir on first use."""

  def __init__(self, options: ml_collections.ConfigDict):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from shpeft_jax.data import builders  # pylint: disable=g-import-not-at-top
    self._tfds = tfds
    name, data_dir = options.name, options.data_dir
    try:
      self._builder, sid = builders.open_builder(name, data_dir, options.manual_dir, options)
    except tf.errors.OpError as e:
      raise DataError(f"{name}: cannot open data_dir={data_dir!r}: {e}") from e
    info = self._builder.info
    names = tuple(self._builder.class_names)
    self.info = DatasetInfo(name, len(names), names,
                            {s: info.splits[s].num_examples for s in info.splits.keys()},
                            source_id=f"{name}:{sid}", task=self._builder.task)
    self.cache_dir = os.path.join(os.fspath(self._builder.data_dir), "decoded")

  def split_size(self, split):
    self._check_split(split)
    try:
      return self._builder.info.splits[split].num_examples
    except (KeyError, ValueError, AssertionError) as e:
      raise ConfigError(f"{self.info.name}: unknown split {split!r} ({e}); available: "
                        f"{sorted(self.info.split_sizes)} (tfds slicing like 'train[:90%]' works)."
                        ) from e

  def dataset(self, split):
    self.split_size(split)
    ds = self._builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={"image": self._tfds.decode.SkipDecoding()},
        read_config=self._tfds.ReadConfig())
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})

  def metadata(self, split: str) -> dict[str, np.ndarray]:
    """file_name, patient and label of every record of `split`, in split order (no decoding)."""
    self.split_size(split)
    ds = self._builder.as_dataset(split=split, shuffle_files=False,
                                  decoders={"image": self._tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: {k: ex[k] for k in ("file_name", "patient", "label")})
    rows = list(self._tfds.as_numpy(ds))
    return {k: np.asarray([r[k] for r in rows]) for k in ("file_name", "patient", "label")}


class _SubsetSource(_Source):
  """`base` with its split `split` filtered to the record indices of a training subset
  (`subsets.select`); every other split is base's. Sizes, metadata and the records agree."""

  def __init__(self, base: _Source, split: str, spec: subsets.Spec):
    self._base, self._split = base, split
    meta = base.metadata(split)
    info = base.info
    self._indices = subsets.select(spec, meta["label"], meta["patient"], task=info.task,
                                   class_names=info.class_names, split=split)
    keep = np.zeros(len(meta["label"]), bool)
    keep[self._indices] = True
    self._keep = keep
    facts = subsets.facts(spec, self._indices, meta, task=info.task,
                          class_names=info.class_names, split=split)
    self.info = dataclasses.replace(
        info, split_sizes={**info.split_sizes, split: len(self._indices)}, subset=facts)
    self.cache_dir = base.cache_dir

  def split_size(self, split):
    return len(self._indices) if split == self._split else self._base.split_size(split)

  def dataset(self, split):
    ds = self._base.dataset(split)
    if split != self._split:
      return ds
    keep = tf.constant(self._keep)

    def kept(i, ex):  # Named functions: AutoGraph cannot parse two lambdas on one line.
      del ex
      return tf.gather(keep, i)

    def record(i, ex):
      del i
      return ex

    return ds.enumerate().filter(kept).map(record)

  def metadata(self, split):
    meta = self._base.metadata(split)
    if split != self._split:
      return meta
    return {k: np.asarray(v)[self._indices] for k, v in meta.items()}


@functools.lru_cache(maxsize=16)
def _cached_subset(options_json: str, split: str, spec: subsets.Spec) -> _Source:
  return _SubsetSource(_cached_source(options_json), split, spec)


@functools.lru_cache(maxsize=16)
def _cached_source(options_json: str) -> _Source:
  options = ml_collections.ConfigDict(json.loads(options_json))
  if options.name == "digits":
    return _DigitsSource(options.task or "target")
  from shpeft_jax.data import builders  # pylint: disable=g-import-not-at-top
  if options.name not in builders.BUILDERS:
    raise ConfigError(f"data.name={options.name!r} is not a known dataset; choose one of "
                      f"{sorted(list(builders.BUILDERS) + ['digits'])}.")
  return _TfdsSource(options)


def get_source(data_config: ml_collections.ConfigDict) -> _Source:
  """The (cached) source for a data config; prepares a tfds dataset on first use. With a
  training subset (data.train_fraction / train_per_class), its train split is the subset."""
  from shpeft_jax.data import source_options  # pylint: disable=g-import-not-at-top
  options_json = json.dumps(source_options(data_config).to_dict(), sort_keys=True)
  spec = subsets.spec_of(data_config)
  if spec.active:
    return _cached_subset(options_json, data_config.train_split, spec)
  return _cached_source(options_json)


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  return get_source(data_config).info


def record_metadata(data_config: ml_collections.ConfigDict, split: str) -> dict[str, np.ndarray]:
  """{'file_name', 'patient', 'label'} arrays of `split`'s records in split order (no image is
  decoded): what a patient-grouped subset or a per-file report needs."""
  return get_source(data_config).metadata(split)


def num_batches_per_epoch(data_config: ml_collections.ConfigDict, *, split: str,
                          global_batch_size: int, drop_remainder: bool = True) -> int:
  """Steps per pass over `split`: floor for training, ceil (padded last batch) for evaluation."""
  n = get_source(data_config).split_size(split)
  return n // global_batch_size if drop_remainder else math.ceil(n / global_batch_size)


# ---------------------------------------------------------------------------------------------
# Preprocessing.


def _to_pixels(image: tf.Tensor) -> tf.Tensor:
  """A resized float image (0-255 scale) -> uint8, rounded to nearest."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def _decode(image_bytes: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, C] from JPEG / PNG / BMP / GIF bytes, C = 1 (grayscale) or 3 (colour), alpha
  dropped. Grayscale stays one channel through the resize (a third of its work) and becomes RGB
  at the end (`_rgb`): the same pixels as decoding to 3 channels first (tested)."""
  image = tf.io.decode_image(image_bytes, channels=0, expand_animations=False)
  return _colour_or_gray(image)


def _colour_or_gray(image: tf.Tensor) -> tf.Tensor:
  """[H, W, 1..4] -> [H, W, 1] (gray, gray + alpha) or [H, W, 3] (RGB, RGBA); a slice, not a
  tf.cond (as is `_rgb`'s tile)."""
  return image[..., :tf.where(tf.shape(image)[-1] < 3, 1, 3)]


def _rgb(image: tf.Tensor) -> tf.Tensor:
  """[H, W, 1 or 3] -> [H, W, 3]: a grayscale image's channel repeated."""
  image = tf.tile(image, [1, 1, 3 // tf.shape(image)[-1]])
  image.set_shape([None, None, 3])
  return image


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 image with its shorter side scaled to `size` (bicubic, antialiased, rounded), aspect
  kept; an image already that size is passed through bit-exactly. The resampling of the eval
  transform and of the preparation's size cap (`data.prepare_max_side`)."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  scale = tf.cast(size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
  new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
  new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))

  def resize():
    return _to_pixels(tf.image.resize(image, [new_h, new_w], method="bicubic", antialias=True))

  return tf.cond(tf.logical_and(tf.equal(new_h, h), tf.equal(new_w, w)), lambda: image, resize)


def _resize_centre_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """CLIP's eval transform: shorter side to `size` (bicubic, antialiased), centre crop, RGB."""
  image = resize_shorter_side(image, size)
  shape = tf.shape(image)
  top = (shape[0] - size) // 2
  left = (shape[1] - size) // 2
  image = _rgb(image[top:top + size, left:left + size])
  image.set_shape([size, size, 3])
  return image


def _crop_window(shape: tf.Tensor, key: tf.Tensor, scale: tuple[float, float]) -> tf.Tensor:
  """[y, x, h, w] of an Inception-style random resized crop, drawn from a stateless key."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_size=shape,
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=key,
      min_object_covered=0.0,
      aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
      area_range=tuple(scale),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def _random_resized_crop(image_bytes: tf.Tensor, key: tf.Tensor, size: int,
                         scale: tuple[float, float]) -> tf.Tensor:
  """Crop then resize to size x size; JPEGs decode only the crop window (the fast path)."""

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    window = _crop_window(shape, key, scale)
    return _colour_or_gray(tf.image.decode_and_crop_jpeg(image_bytes, window, channels=0))

  def other():
    image = _decode(image_bytes)
    w = _crop_window(tf.shape(image), key, scale)
    return image[w[0]:w[0] + w[2], w[1]:w[1] + w[3]]

  crop = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  return _rgb(_to_pixels(tf.image.resize(crop, [size, size], method="bilinear")))


def _example_key(seed: int, epoch: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  key = tf.constant([seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF], tf.int64)
  key = tf.random.experimental.stateless_fold_in(key, epoch)
  return tf.random.experimental.stateless_fold_in(key, index)


def _train_preprocess_fn(data_config, image_size: int, seed: int, label_dtype: tf.DType):
  augment = bool(data_config.augment)
  scale = data_config.random_resized_crop_scale
  use_crop = augment and scale is not None and len(scale) == 2
  use_flip = augment and bool(data_config.hflip)

  def fn(ex):
    key = _example_key(seed, ex["epoch"], ex["index"])
    crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    if use_crop:
      image = _random_resized_crop(ex["image"], crop_key, image_size, tuple(scale))
    else:
      image = _resize_centre_crop(_decode(ex["image"]), image_size)
    if use_flip:
      image = tf.image.stateless_random_flip_left_right(image, flip_key)
    return {"image": image, "label": tf.cast(ex["label"], label_dtype),
            "valid": ex["valid"]}

  return fn


def eval_transform(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Encoded image -> uint8 [size, size, 3]: what evaluation and predict feed the model (which
  normalises it on the device)."""
  return _resize_centre_crop(_decode(image_bytes), image_size)


def _eval_preprocess_fn(image_size: int, label_dtype: tf.DType):
  def fn(ex):
    return {"image": eval_transform(ex["image"], image_size),
            "label": tf.cast(ex["label"], label_dtype), "valid": ex["valid"]}
  return fn


# ---------------------------------------------------------------------------------------------
# Iterators.


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(f"global_batch_size={global_batch_size} must be positive and divisible by "
                      f"the process count {process_count}.")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} not in [0, {process_count}).")
  return global_batch_size // process_count


def _keep_process_slice(ds: tf.data.Dataset, global_batch_size: int, local_batch_size: int,
                        process_index: int) -> tf.data.Dataset:
  """Each process keeps its slice of every global batch (before decoding: cheap)."""
  gb, lb, p = global_batch_size, local_batch_size, process_index
  ds = ds.enumerate().filter(lambda k, ex: tf.equal((k % gb) // lb, p))
  return ds.map(lambda k, ex: ex)


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Deterministic order; parallelism across elements, not inside ops: each map call runs its ops
  on one thread (`max_intra_op_parallelism=1`), `num_parallel_calls` (AUTOTUNE by default) runs
  as many calls as there are cores, and the prefetch buffers are autotuned. The records are read
  by tfds' parallel interleave over the shard files (16 at a time, order fixed)."""
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = True
  return ds.with_options(options)


def _parallel_calls(data_config) -> int:
  n = data_config.num_parallel_calls
  return tf.data.AUTOTUNE if n is None or n < 0 else int(n)


def _as_numpy(ds: tf.data.Dataset) -> Iterator[Batch]:
  for batch in ds.as_numpy_iterator():
    yield batch


def _indexed(source: _Source, split: str, cache: bool) -> tf.data.Dataset:
  ds = source.dataset(split).enumerate().map(
      lambda i, ex: {"index": i, "image": ex["image"], "label": ex["label"],
                     "valid": tf.constant(True)})
  return ds.cache() if cache else ds


def make_train_iterator(data_config: ml_collections.ConfigDict, *, split: str,
                        global_batch_size: int, image_size: int, seed: int, start_step: int = 0,
                        process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """Infinite, shuffled, augmented batches of this process's `global_batch_size // process_count`.

  Batches may straddle an epoch boundary (the stream of epochs is batched as one). With the same
  arguments the batches are identical; `start_step=s` yields what an iterator started at 0 yields
  from its s-th batch on.
  """
  local_b = _local_batch_size(global_batch_size, process_index, process_count)
  source = get_source(data_config)
  n = source.split_size(split)
  if n == 0:
    raise DataError(f"{source.info.name}: split {split!r} is empty.")
  base = _indexed(source, split, bool(data_config.cache))
  buffer = int(data_config.shuffle_buffer or 0)
  buffer = n if buffer <= 0 else min(buffer, n)
  first_epoch, offset = divmod(int(start_step) * global_batch_size, n)
  seed = int(seed)

  def epoch_stream(epoch):
    epoch_seed = tf.constant(seed % (2**31 - 1), tf.int64) * 1_000_003 + epoch
    ds = base.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.skip(tf.where(tf.equal(epoch, first_epoch), tf.constant(offset, tf.int64), 0))
    return ds.map(lambda ex: {**ex, "epoch": epoch})

  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_stream)
  ds = _keep_process_slice(ds, global_batch_size, local_b, process_index)
  ds = ds.map(_train_preprocess_fn(data_config, image_size, seed,
                                   _LABEL_DTYPES[source.info.task]),
              num_parallel_calls=_parallel_calls(data_config), deterministic=True)
  ds = ds.batch(local_b, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _as_numpy(_options(ds))


def make_eval_iterator(data_config: ml_collections.ConfigDict, *, split: str,
                       global_batch_size: int, image_size: int, process_index: int = 0,
                       process_count: int = 1) -> Iterator[Batch]:
  """Finite, ordered batches covering every example of `split` exactly once.

  The last global batch is completed with padding (`valid` False, label 0 or, multi-label, a
  vector of -1; image of a black pixel); every process yields ceil(N / global_batch_size) batches.
  With `data.eval_cache` the first pass records its batches and later passes replay them without
  decoding (`decoded_cache`): the same arrays.
  """
  local_b = _local_batch_size(global_batch_size, process_index, process_count)
  source = get_source(data_config)
  n = source.split_size(split)
  if n == 0:
    raise DataError(f"{source.info.name}: split {split!r} is empty.")
  num_batches = math.ceil(n / global_batch_size)
  cache_key = None
  # A run's config.json from before the field (report's re-evaluation) lacks it: the default,
  # which gives the same batches either way.
  if data_config.eval_cache if "eval_cache" in data_config else True:
    info = source.info
    cache_key = decoded_cache.key(
        source=info.source_id, split=split, n=n, image_size=int(image_size),
        global_batch_size=int(global_batch_size), process=[process_index, process_count],
        task=info.task, subset=info.subset if info.subset else None)
    recorded = decoded_cache.load(source.cache_dir, cache_key)
    if recorded is not None:
      return decoded_cache.replay(recorded, local_b)
  ds = _indexed(source, split, bool(data_config.cache))
  n_pad = num_batches * global_batch_size - n
  if n_pad:
    pad = tf.data.Dataset.from_tensors({
        "index": tf.constant(-1, tf.int64), "image": tf.constant(_PAD_PNG),
        "label": _padding_label(source.info), "valid": tf.constant(False)}).repeat(n_pad)
    ds = ds.concatenate(pad)
  ds = _keep_process_slice(ds, global_batch_size, local_b, process_index)
  ds = ds.map(_eval_preprocess_fn(image_size, _LABEL_DTYPES[source.info.task]),
              num_parallel_calls=_parallel_calls(data_config), deterministic=True)
  ds = ds.batch(local_b, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  batches = _as_numpy(_options(ds))
  if cache_key is None:
    return batches
  return decoded_cache.record(batches, source.cache_dir, cache_key, num_batches)


def to_global_array(batch: Batch, sharding) -> dict[str, Any]:
  """Local numpy batch -> global jax.Arrays sharded along the batch axis (multi-process safe)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def preprocess_for_eval(image: np.ndarray, image_size: int, mean=None, std=None) -> np.ndarray:
  """The evaluation transform on one uint8 image [H, W] or [H, W, C] and the model's normalisation
  (`clip_vit.normalise_pixels`; CLIP's statistics unless given): float32 [size, size, 3], what the
  tower sees (for inference scripts that feed normalised floats)."""
  from shpeft_jax.models import clip_vit  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  pixels = _resize_centre_crop(tf.constant(image[..., :3], tf.uint8), image_size).numpy()
  return np.asarray(clip_vit.normalise_pixels(
      pixels, mean or clip_vit.CLIP_MEAN, std or clip_vit.CLIP_STD, np.float32))


if os.environ.get("SHPEFT_TF_HIDE_GPU", "1") == "1":
  # TF must not grab accelerator memory that JAX needs (a no-op with tensorflow-cpu).
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    pass
