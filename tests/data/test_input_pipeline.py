"""The tf.data pipeline on the offline digits data: values, exactly-once eval, determinism, resume."""

import itertools

import numpy as np
import pytest

from shpeft_jax.data import default_data_config, demo
from shpeft_jax.data import input_pipeline as ip
from shpeft_jax.errors import ConfigError

# CLIP's statistics, written out: the reference must not come from the code under test.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _config(**kw):
  c = default_data_config()
  c.name, c.task = "digits", "target"
  c.update(kw)
  return c


def _reference(split, task="target"):
  """The eval images at 8x8 (no resize): gray -> RGB uint8, as the batches carry them."""
  images, labels = demo.digits_splits(task)[split]
  return images[..., None].repeat(3, -1), labels


def _take(it, n):
  return list(itertools.islice(it, n))


def test_dataset_info_and_batches_per_epoch():
  info = ip.dataset_info(_config())
  assert info.num_classes == 5 and info.class_names[0] == "digit_5"
  from sklearn.datasets import load_digits
  assert sum(info.split_sizes.values()) == int((load_digits().target >= 5).sum())  # 896
  assert ip.num_batches_per_epoch(_config(), split="test", global_batch_size=50) == \
      info.split_sizes["test"] // 50
  assert ip.num_batches_per_epoch(_config(), split="test", global_batch_size=50,
                                  drop_remainder=False) == -(-info.split_sizes["test"] // 50)


def test_eval_covers_every_example_once_with_padding():
  ref_x, ref_y = _reference("test")
  n = len(ref_y)
  batches = list(ip.make_eval_iterator(_config(), split="test", global_batch_size=50,
                                       image_size=8))
  assert n % 50 != 0 and len(batches) == -(-n // 50)
  for b in batches:
    assert b["image"].shape == (50, 8, 8, 3) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and b["valid"].dtype == bool
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == n and not valid[n:].any() and valid[:n].all()
  x = np.concatenate([b["image"] for b in batches])[valid]
  y = np.concatenate([b["label"] for b in batches])[valid]
  np.testing.assert_array_equal(x, ref_x)
  np.testing.assert_array_equal(y, ref_y)


def test_eval_split_across_processes_reassembles_the_global_batch():
  single = list(ip.make_eval_iterator(_config(), split="validation", global_batch_size=40,
                                      image_size=8))
  parts = [list(ip.make_eval_iterator(_config(), split="validation", global_batch_size=40,
                                      image_size=8, process_index=p, process_count=2))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(single)
  for s, a, b in zip(single, *parts):
    for k in ("image", "label", "valid"):
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), s[k])


def test_train_deterministic_and_seeded():
  c = _config()
  a = _take(ip.make_train_iterator(c, split="train", global_batch_size=64, image_size=8,
                                   seed=3), 5)
  b = _take(ip.make_train_iterator(c, split="train", global_batch_size=64, image_size=8,
                                   seed=3), 5)
  d = _take(ip.make_train_iterator(c, split="train", global_batch_size=64, image_size=8,
                                   seed=4), 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["label"], d[0]["label"])
  assert all(x["valid"].all() for x in a)


@pytest.mark.parametrize("start_step", [3, 9, 17])
def test_resume_matches_uninterrupted(start_step):
  # 538 training examples, batch 64: step 9 starts mid-epoch 1, step 17 mid-epoch 2.
  c = _config(shuffle_buffer=100)
  full = _take(ip.make_train_iterator(c, split="train", global_batch_size=64, image_size=8,
                                      seed=0), start_step + 3)
  resumed = _take(ip.make_train_iterator(c, split="train", global_batch_size=64, image_size=8,
                                         seed=0, start_step=start_step), 3)
  for x, y in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_train_processes_slice_the_same_global_batch():
  c = _config()
  single = _take(ip.make_train_iterator(c, split="train", global_batch_size=48, image_size=8,
                                        seed=1), 13)
  parts = [_take(ip.make_train_iterator(c, split="train", global_batch_size=48, image_size=8,
                                        seed=1, process_index=p, process_count=3), 13)
           for p in range(3)]
  for i, s in enumerate(single):
    assert parts[0][i]["image"].shape[0] == 16
    np.testing.assert_array_equal(np.concatenate([p[i]["image"] for p in parts]), s["image"])
    np.testing.assert_array_equal(np.concatenate([p[i]["label"] for p in parts]), s["label"])


def _match_rows(images, ref):
  """Index in `ref` of each image (exact match), -1 if none."""
  flat_ref = ref.reshape(len(ref), -1)
  out = []
  for im in images.reshape(len(images), -1):
    hits = np.flatnonzero(np.all(flat_ref == im, axis=1))
    out.append(hits[0] if len(hits) else -1)
  return np.array(out)


def test_epoch_without_augmentation_is_a_permutation():
  ref_x, ref_y = _reference("train")
  n = len(ref_y)  # 538 = 2 * 269
  it = ip.make_train_iterator(_config(augment=False), split="train", global_batch_size=269,
                              image_size=8, seed=5)
  epoch = _take(it, 2)
  x = np.concatenate([b["image"] for b in epoch])
  y = np.concatenate([b["label"] for b in epoch])
  idx = _match_rows(x, ref_x)
  assert (idx >= 0).all()
  # Duplicate digit images exist in sklearn's data, so compare the multiset, then the labels.
  assert sorted(map(bytes, x.reshape(n, -1))) == sorted(map(bytes, ref_x.reshape(n, -1)))
  np.testing.assert_array_equal(np.sort(y), np.sort(ref_y))
  assert not np.array_equal(y, ref_y)  # shuffled


def test_augmentation_full_crop_and_flip_values():
  ref_x, _ = _reference("train")
  # Scale (1, 1) on a square image: the crop is the whole image, the resize 8 -> 8 is the identity,
  # so each output is an original or its mirror image.
  c = _config(random_resized_crop_scale=(1.0, 1.0), hflip=True)
  b = next(ip.make_train_iterator(c, split="train", global_batch_size=128, image_size=8, seed=2))
  plain = _match_rows(b["image"], ref_x)
  mirrored = _match_rows(b["image"][:, :, ::-1], ref_x)
  assert ((plain >= 0) | (mirrored >= 0)).all()
  n_flipped = int(((plain < 0) & (mirrored >= 0)).sum())
  assert 30 < n_flipped < 98  # about half of 128
  # Default scale: real crops, upsampled to 32x32, uint8 RGB with equal channels.
  b = next(ip.make_train_iterator(_config(), split="train", global_batch_size=16, image_size=32,
                                  seed=2))
  assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.uint8
  np.testing.assert_array_equal(b["image"][..., 0], b["image"][..., 1])
  assert b["image"].std() > 10  # real pixels, not a constant


def test_source_and_target_tasks_differ():
  src, tgt = demo.digits_splits("source"), demo.digits_splits("target")
  assert sorted(set(src["train"][1])) == sorted(set(tgt["train"][1])) == [0, 1, 2, 3, 4]
  from sklearn.datasets import load_digits
  d = load_digits()
  # Every target image is a real digit 5-9 (relabelled d - 5), every source image a digit 0-4.
  lookup = {}
  for im, t in zip(np.round(d.images * 255 / 16).astype(np.uint8), d.target):
    lookup.setdefault(im.tobytes(), set()).add(int(t))
  for split in ("train", "validation", "test"):
    for im, l in zip(*tgt[split]):
      assert l + 5 in lookup[im.tobytes()]
    for im, l in zip(*src[split]):
      assert l in lookup[im.tobytes()]
  assert sum(len(v[1]) for v in src.values()) == int((d.target < 5).sum())


def test_bad_batch_and_split():
  with pytest.raises(ConfigError, match="divisible"):
    ip.make_train_iterator(_config(), split="train", global_batch_size=10, image_size=8, seed=0,
                           process_count=3)
  with pytest.raises(ConfigError, match="unknown split"):
    ip.make_eval_iterator(_config(), split="val", global_batch_size=8, image_size=8)
  with pytest.raises(ConfigError, match="not a known dataset"):
    ip.dataset_info(_config(name="mnist"))


def test_eval_transform_geometry():
  # 8 x 16: the shorter side is already 8, so no resize: the centre crop keeps columns 4..11.
  img = np.arange(8 * 16, dtype=np.uint8).reshape(8, 16) * 2
  out = ip.preprocess_for_eval(img, 8)
  expected = (img[:, 4:12, None].repeat(3, -1) / 255.0 - MEAN) / STD
  np.testing.assert_allclose(out, expected, atol=1e-6)
  # Downscaling a constant image keeps the constant; RGB channels stay apart.
  rgb = np.zeros((40, 32, 3), np.uint8) + np.array([10, 128, 250], np.uint8)
  out = ip.preprocess_for_eval(rgb, 8)
  assert out.shape == (8, 8, 3)
  np.testing.assert_allclose(out, np.broadcast_to((np.array([10, 128, 250]) / 255.0 - MEAN) / STD,
                                                  (8, 8, 3)), atol=1e-4)


def test_jpeg_fast_crop_equals_decode_then_crop():
  import io
  import tensorflow as tf
  from PIL import Image
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  jpeg = buf.getvalue()
  decoded = tf.io.decode_jpeg(jpeg).numpy()
  png = demo.encode_png(decoded)
  for i in range(5):
    key = tf.constant([i, 7], tf.int64)
    a = ip._random_resized_crop(tf.constant(jpeg), key, 16, (0.1, 1.0)).numpy().astype(int)
    b = ip._random_resized_crop(tf.constant(png), key, 16, (0.1, 1.0)).numpy().astype(int)
    # Same window: nearly all pixels agree (libjpeg's chroma upsampling differs at crop edges);
    # another window of these random pixels is off by ~40 on average.
    assert a.shape == b.shape == (16, 16, 3)
    assert np.mean(np.abs(a - b)) < 1.5, np.mean(np.abs(a - b))


def test_to_global_array_keeps_the_batch():
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch = next(ip.make_eval_iterator(_config(), split="test", global_batch_size=8, image_size=8))
  out = ip.to_global_array(batch, NamedSharding(mesh, P("data")))
  for k in batch:
    assert isinstance(out[k], jax.Array)
    np.testing.assert_array_equal(np.asarray(out[k]), batch[k])


def _host_float32_normalise(images):
  """The pipeline's former host normalisation (tf, float32): cast, / 255, CLIP mean / std."""
  import tensorflow as tf
  x = tf.cast(images, tf.float32) / 255.0
  return ((x - tf.constant(MEAN)) / tf.constant(STD)).numpy()


def test_device_normalisation_equals_host_float32_normalisation():
  import jax
  import jax.numpy as jnp
  from shpeft_jax.models import clip_vit
  # Every pixel value, both through the jitted model normalisation and the old host path.
  images = np.arange(256 * 3, dtype=np.int64).reshape(1, 16, 16, 3).astype(np.uint8)
  batches = list(ip.make_eval_iterator(_config(), split="test", global_batch_size=50,
                                       image_size=8))
  for x in [images, np.concatenate([b["image"] for b in batches])]:
    dev = jax.jit(lambda u: clip_vit.normalise_pixels(u, clip_vit.CLIP_MEAN, clip_vit.CLIP_STD,
                                                      jnp.float32))(x)
    np.testing.assert_allclose(np.asarray(dev), _host_float32_normalise(x), rtol=0, atol=2e-6)
  # Float input is taken as normalised: passed through, only cast.
  f = _host_float32_normalise(images)
  np.testing.assert_array_equal(np.asarray(clip_vit.normalise_pixels(
      f, clip_vit.CLIP_MEAN, clip_vit.CLIP_STD, jnp.float32)), f)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_on_uint8_batches_equals_model_on_host_normalised_floats(dtype):
  import jax
  from shpeft_jax.models import clip_vit
  model = clip_vit.build_model("test_tiny", 5, image_size=8, dtype=dtype)
  params = clip_vit.init_params(model, jax.random.PRNGKey(0))
  b = next(ip.make_eval_iterator(_config(), split="test", global_batch_size=64, image_size=8))
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  got = np.asarray(apply(params, b["image"]), np.float32)
  want = np.asarray(apply(params, _host_float32_normalise(b["image"])), np.float32)
  tol = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def test_tower_pixel_statistics_are_the_models():
  import jax
  from shpeft_jax.models import clip_vit
  mean, std = (0.5, 0.25, 0.125), (0.5, 0.25, 2.0)
  tower = clip_vit.tower_from_meta({"pixel_mean": list(mean), "pixel_std": list(std)})
  assert tower["pixel_mean"] == mean and tower["pixel_std"] == std
  np.testing.assert_allclose(clip_vit.tower_from_meta({})["pixel_std"], STD)  # old meta.json
  model = clip_vit.build_model("test_tiny", 5, image_size=8, tower=tower)
  params = clip_vit.init_params(model, jax.random.PRNGKey(1))
  x = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
  hand = (x.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x)),
                             np.asarray(model.apply({"params": params}, hand.astype(np.float32))),
                             atol=1e-5)
  with pytest.raises(ConfigError, match="pixel_mean / pixel_std"):
    clip_vit.get_model_config("test_tiny", pixel_std=(0.5, 0.0, 0.5))
