"""What makes the input pipeline cheap changes no pixel that is promised: grayscale kept one
channel through the resize, the decoded eval cache, the preparation's size cap."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shpeft_jax.data import builders, decoded_cache, default_data_config
from shpeft_jax.data import input_pipeline as ip
from shpeft_jax.errors import ConfigError


def _encoded(pixels: np.ndarray, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format=fmt, **kw)
  return buf.getvalue()


def _scan(h, w, channels=None, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  img = 128 + 80 * np.sin(9 * xx + 5 * yy) + rng.normal(0, 10, (h, w))
  img = img.clip(0, 255).astype(np.uint8)
  return img if channels is None else np.stack([img, img[::-1], 255 - img][:channels], -1)


SOURCES = {
    "gray jpeg": lambda: _encoded(_scan(70, 52), "JPEG", quality=90),
    "rgb jpeg": lambda: _encoded(_scan(52, 70, 3), "JPEG", quality=90),
    "gray png": lambda: _encoded(_scan(60, 45), "PNG"),
    "gray+alpha png": lambda: _encoded(np.stack([_scan(40, 48), _scan(40, 48, seed=1)], -1), "PNG"),
    "rgba png": lambda: _encoded(np.concatenate([_scan(33, 40, 3), _scan(33, 40)[..., None]], -1),
                                 "PNG"),
    "palette png": lambda: _encoded(np.asarray(Image.fromarray(_scan(30, 30, 3)).quantize(16)),
                                    "PNG"),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_eval_transform_equals_decoding_to_rgb_first(name):
  data = SOURCES[name]()
  rgb = tf.io.decode_image(data, channels=3, expand_animations=False)  # the former decode
  for size in (16, 24):
    want = ip._resize_centre_crop(rgb, size).numpy()
    got = ip.eval_transform(tf.constant(data), size).numpy()
    assert got.dtype == np.uint8 and got.shape == (size, size, 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["gray jpeg", "rgb jpeg", "gray png", "rgba png"])
def test_random_resized_crop_equals_decoding_to_rgb_first(name):
  data = SOURCES[name]()
  rgb = tf.io.decode_image(data, channels=3, expand_animations=False)
  for i in range(4):
    key = tf.constant([i, 3], tf.int64)
    got = ip._random_resized_crop(tf.constant(data), key, 16, (0.1, 1.0)).numpy()
    w = ip._crop_window(tf.shape(rgb), key, (0.1, 1.0)).numpy()
    crop = (tf.image.decode_and_crop_jpeg(data, w, channels=3) if "jpeg" in name  # the former
            else rgb[w[0]:w[0] + w[2], w[1]:w[1] + w[3]])
    want = ip._to_pixels(tf.image.resize(crop, [16, 16], method="bilinear")).numpy()
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# The decoded eval cache.


def _folder(root, n=11, size=40):
  for i in range(n):
    d = os.path.join(root, f"c{i % 2}")
    os.makedirs(d, exist_ok=True)
    Image.fromarray(_scan(size, size + 8, 3, seed=i)).save(os.path.join(d, f"{i}.jpg"), quality=90)
  return root


def _config(tmp_path, **kw):
  c = default_data_config()
  c.name, c.manual_dir = "image_folder", _folder(str(tmp_path / "images"))
  c.data_dir = str(tmp_path / "tfds")
  c.update(kw)
  return c


def _logits(batches):
  """A fixed random linear model of the uint8 batches (what predictions are made of)."""
  w = np.random.default_rng(0).normal(size=(16 * 16 * 3, 3)).astype(np.float32)
  return np.concatenate([b["image"].reshape(len(b["image"]), -1).astype(np.float32) @ w
                         for b in batches])


def _cache_folders(c):
  base = os.path.join(c.data_dir, "image_folder")
  return [os.path.join(r, d) for r, ds, _ in os.walk(base) for d in ds
          if os.path.basename(r) == "decoded"]


def test_cached_eval_gives_the_uncached_batches_and_predictions(tmp_path, monkeypatch):
  c = _config(tmp_path)
  kw = dict(split="train", global_batch_size=4, image_size=16)
  plain = list(ip.make_eval_iterator(_config(tmp_path, eval_cache=False), **kw))
  assert not _cache_folders(c)
  first = list(ip.make_eval_iterator(c, **kw))  # decodes and records
  assert len(_cache_folders(c)) == 1
  # The later pass decodes nothing: the tf.data path is not even built.
  monkeypatch.setattr(ip, "_eval_preprocess_fn", lambda *a: pytest.fail("decoded again"))
  again = list(ip.make_eval_iterator(c, **kw))
  n = ip.dataset_info(c).split_sizes["train"]
  assert len(plain) == len(first) == len(again) == -(-n // 4) and n % 4  # padding included
  for a, b, d in zip(plain, first, again):
    assert a.keys() == d.keys()
    for k in a:
      assert a[k].dtype == d[k].dtype
      np.testing.assert_array_equal(a[k], b[k])
      np.testing.assert_array_equal(a[k], d[k])
  np.testing.assert_array_equal(_logits(plain), _logits(again))
  monkeypatch.undo()
  # Another batch size or process slice is another record, not a wrong replay.
  halves = [list(ip.make_eval_iterator(c, **{**kw, "process_index": p, "process_count": 2}))
            for p in range(2)]
  for s, x, y in zip(plain, *halves):
    for k in s:
      np.testing.assert_array_equal(np.concatenate([x[k], y[k]]), s[k])
  assert len(_cache_folders(c)) == 3


def test_abandoned_or_failed_pass_records_nothing(tmp_path):
  c = _config(tmp_path)
  kw = dict(split="train", global_batch_size=2, image_size=16)
  it = ip.make_eval_iterator(c, **kw)
  next(it)
  it.close()  # an evaluation stopped after one batch
  base = os.path.join(c.data_dir, "image_folder")
  leftovers = [os.path.join(r, f) for r, ds, fs in os.walk(base) for f in ds + fs if "decoded" in r]
  assert leftovers == []
  # A read-only cache folder: the evaluation still gives every batch.
  full = list(ip.make_eval_iterator(_config(tmp_path, eval_cache=False), **kw))
  cache_dir = ip.get_source(c).cache_dir
  os.makedirs(cache_dir, exist_ok=True)
  os.chmod(cache_dir, 0o500)
  try:
    got = list(ip.make_eval_iterator(c, **kw))
  finally:
    os.chmod(cache_dir, 0o700)
  assert len(got) == len(full)
  for a, b in zip(got, full):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_digits_cache_in_memory():
  c = default_data_config()
  c.name, c.task = "digits", "target"
  kw = dict(split="validation", global_batch_size=32, image_size=8)
  a = list(ip.make_eval_iterator(c, **kw))
  k = [key for key in decoded_cache._MEMORY]
  assert k, "the pass was not recorded"
  b = list(ip.make_eval_iterator(c, **kw))
  for x, y in zip(a, b):
    for name in x:
      np.testing.assert_array_equal(x[name], y[name])


# ---------------------------------------------------------------------------------------------
# The preparation's size cap.


def test_shrink_uses_the_eval_resampling():
  big = _encoded(_scan(300, 200), "PNG")
  small = builders.shrink(big, 48)
  image = tf.io.decode_png(small).numpy()
  assert image.shape == (72, 48, 1)  # shorter side 48, aspect kept, still grayscale
  want = ip.resize_shorter_side(tf.io.decode_png(big), 48).numpy()
  np.testing.assert_array_equal(image, want)  # PNG: lossless
  assert builders.shrink(big, 0) is big and builders.shrink(big, 200) == big  # not larger
  jpeg = builders.shrink(_encoded(_scan(200, 260, 3), "JPEG", quality=90), 64)
  assert tf.io.is_jpeg(jpeg) and tf.io.decode_jpeg(jpeg).shape == (64, 83, 3)
  # The eval transform of the stored image is close to the eval transform of the original (two
  # resamplings instead of one): within a grey level or two on average.
  original = ip.eval_transform(tf.constant(big), 24).numpy().astype(int)
  stored = ip.eval_transform(tf.constant(small), 24).numpy().astype(int)
  assert np.abs(original - stored).mean() < 2.0, np.abs(original - stored).mean()


def test_prepare_max_side_is_part_of_the_source(tmp_path):
  base = _config(tmp_path)
  capped = _config(tmp_path, prepare_max_side=24)
  a, b = ip.dataset_info(base), ip.dataset_info(capped)
  assert a.source_id != b.source_id and a.split_sizes == b.split_sizes
  (builder, _), = [builders.open_builder("image_folder", capped.data_dir, capped.manual_dir,
                                         capped)]
  for ex in builder.as_dataset(split="train"):
    assert min(ex["image"].shape[:2]) == 24
  with pytest.raises(ConfigError, match="prepare_max_side"):
    ip.dataset_info(_config(tmp_path, prepare_max_side=8))



def test_parallel_reader_keeps_order_and_raises_at_the_bad_record(tmp_path):
  from shpeft_jax.data import parsed, splits
  from shpeft_jax.errors import DataError
  paths = []
  for i in range(40):
    p = str(tmp_path / f"{i:02d}.png")
    Image.fromarray(_scan(20, 20 + i, seed=i)).save(p)
    paths.append(p)
  records = [(p, 0) for p in paths]
  want = [splits.read_image(p)[0] for p in paths]
  assert list(parsed.read_files("train", records)) == want
  with open(paths[23], "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n broken")
  got = []
  with pytest.raises(DataError, match="23.png"):
    for data in parsed.read_files("train", records):
      got.append(data)
  assert got == want[:23]


def test_config_json_from_before_eval_cache_still_evaluates():
  c = default_data_config()
  c.name, c.task = "digits", "target"
  old = {k: v for k, v in c.to_dict().items() if k != "eval_cache"}
  import ml_collections
  got = list(ip.make_eval_iterator(ml_collections.ConfigDict(old), split="test",
                                   global_batch_size=64, image_size=8))
  want = list(ip.make_eval_iterator(c, split="test", global_batch_size=64, image_size=8))
  for x, y in zip(got, want):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_ordered_map_raises_a_source_error_in_its_turn():
  from shpeft_jax.data import parsed

  def source():
    yield from range(5)
    raise KeyError("record 5")

  got = []
  with pytest.raises(KeyError, match="record 5"):
    for x in parsed.ordered_map(lambda v: v * v, source(), ahead=1):
      got.append(x)
  assert got == [0, 1, 4, 9, 16]
