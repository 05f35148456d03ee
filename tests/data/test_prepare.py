"""Preparing records (issue 21): keyed by content, case-only class folders refused, and what a
killed or concurrent preparation leaves behind."""

import glob
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import data_fixtures as fx
from shpeft_jax.data import builders, content_hash, default_data_config
from shpeft_jax.data import input_pipeline as ip
from shpeft_jax.data import splits
from shpeft_jax.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name, data_dir, manual_dir):
  c = default_data_config()
  c.name, c.data_dir, c.manual_dir = name, str(data_dir), str(manual_dir)
  return c


def _pixels_by_name(c, split):
  """{file_name: uint8 pixels} of a split's records, read through the eval pipeline."""
  names = [n.decode() for n in ip.record_metadata(c, split)["file_name"]]
  images = [im for b in ip.make_eval_iterator(c, split=split, global_batch_size=len(names),
                                               image_size=16) for im in b["image"]]
  return dict(zip(names, images))


def test_same_size_same_mtime_replacement_is_a_new_source(tmp_path, monkeypatch):
  # Old code keyed the source by file sizes: a BMP replaced by another of the same shape (same
  # byte size) reused the stale records with exit 0.
  root = fx.make_image_folder(str(tmp_path / "imgs"), classes=("a", "b"), per_class=(3, 3),
                              split_dirs=True, ext=".bmp")
  c = _config("image_folder", tmp_path / "tfds", root)
  hashed = []
  real_digest = content_hash.file_digest
  monkeypatch.setattr(content_hash, "file_digest", lambda p: hashed.append(p) or real_digest(p))
  first = ip.dataset_info(c)
  assert len(hashed) == 18  # every file read once
  target = os.path.join(root, "test", "b", "b_1.bmp")
  old = os.stat(target)
  new_pixels = fx.write_image(target, seed=999)
  os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns))  # as `cp -p` / tar would leave it
  assert os.path.getsize(target) == old.st_size and os.stat(target).st_mtime_ns == old.st_mtime_ns
  ip._cached_source.cache_clear()  # pylint: disable=protected-access
  hashed.clear()
  second = ip.dataset_info(c)
  assert hashed == [target]  # unchanged files keep their cached digest
  assert second.source_id != first.source_id
  stored = _pixels_by_name(c, "test")["test/b/b_1.bmp"]
  np.testing.assert_array_equal(stored, new_pixels)  # re-prepared: the new image's records
  assert len(builders.prepared_sources("image_folder", str(tmp_path / "tfds"))) == 2
  # Nothing changed: no file is read again and the id is the same.
  ip._cached_source.cache_clear()  # pylint: disable=protected-access
  hashed.clear()
  assert ip.dataset_info(c).source_id == second.source_id and hashed == []


def test_class_folders_differing_only_by_case_are_refused(tmp_path):
  # Old code: `Cat/` and `cat/` became two classes without a word.
  root = fx.make_image_folder(str(tmp_path / "flat"), classes=("Cat", "cat", "dog"),
                              per_class=(2, 2, 2), images=False)
  with pytest.raises(DataError, match="class folders 'Cat' and 'cat' differ only by case"):
    splits.image_folder_splits(root)
  root = fx.make_image_folder(str(tmp_path / "split"), classes=("dog", "Dog"),
                              per_class=(2, 2), split_dirs=True, images=False)
  with pytest.raises(DataError, match="class folders 'Dog' and 'dog' differ only by case"):
    splits.image_folder_classes(root)


_SLOW_PREPARE = textwrap.dedent("""
    import sys, time
    from shpeft_jax.data import builders, splits
    real = splits.read_image
    def slow(path):
      time.sleep(0.5)
      return real(path)
    splits.read_image = slow
    builders.open_builder("busi", sys.argv[1], sys.argv[2])
""")


def _incomplete(data_dir):
  return glob.glob(os.path.join(str(data_dir), "busi", "*", "incomplete.*"))


def test_kill_9_during_preparation_leaves_nothing_after_the_next_run(tmp_path, caplog):
  # A real kill -9 while tfds writes its incomplete.* folder. Old code left it there for good.
  manual = str(tmp_path / "manual")
  fx.make_busi(manual, counts=(4, 3, 3))
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, str(tmp_path / "tfds"), manual],
                          env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not _incomplete(tmp_path / "tfds") and time.time() < deadline:
      time.sleep(0.2)
    assert _incomplete(tmp_path / "tfds"), "the child never started writing"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  left = _incomplete(tmp_path / "tfds")
  assert left  # what kill -9 leaves behind
  with caplog.at_level(logging.WARNING):
    info = ip.dataset_info(_config("busi", tmp_path / "tfds", manual))
  assert sum(info.split_sizes.values()) == 10
  assert not any(os.path.exists(d) for d in left) and not _incomplete(tmp_path / "tfds")
  assert any("removed 1 unfinished preparation folder" in r.getMessage() for r in caplog.records)


_HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"test-host pid 4242")
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def _hold_lock(dataset_dir, seconds):
  os.makedirs(dataset_dir, exist_ok=True)
  proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK,
                           os.path.join(dataset_dir, builders.PREPARE_LOCK), str(seconds)],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_live_preparer_keeps_its_folder_and_a_second_process_waits(tmp_path, caplog):
  manual = str(tmp_path / "manual")
  fx.make_busi(manual, counts=(3, 3, 3), masks=False)
  data_dir = tmp_path / "tfds"
  dataset_dir = str(data_dir / "busi")
  # While another process holds the prepare lock, this one waits, then prepares.
  holder = _hold_lock(dataset_dir, 3.0)
  t0 = time.time()
  with caplog.at_level(logging.WARNING):
    builder, _ = builders.open_builder("busi", str(data_dir), manual)
  assert time.time() - t0 > 1.5 and builder.is_prepared()
  holder.wait()
  assert any("test-host pid 4242 is preparing data" in r.getMessage() for r in caplog.records)
  # An incomplete folder of a live preparer (it holds the lock) is not touched by a run that
  # only reads prepared records; once the preparer is gone it is removed.
  live = os.path.join(os.path.dirname(os.fspath(builder.data_dir)), "incomplete.ABCDEF_2.0.0")
  os.makedirs(live)
  holder = _hold_lock(dataset_dir, 30.0)
  try:
    builders.open_builder("busi", str(data_dir), manual)
    assert os.path.isdir(live)
  finally:
    holder.kill()
    holder.wait()
  builders.open_builder("busi", str(data_dir), manual)
  assert not os.path.exists(live)
