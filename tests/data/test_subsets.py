"""Training subsets (data.train_fraction / train_per_class / subset_seed): counts by hand on
fixtures, seeded and patient-grouped selection, the pipeline's sizes, fingerprints, bad input."""

import hashlib

import numpy as np
import pytest

import data_fixtures as fx
from shpeft_jax.data import default_data_config
from shpeft_jax.data import input_pipeline as ip
from shpeft_jax.data import subsets
from shpeft_jax.errors import ConfigError, DataError


def _config(name, tmp_path, **fields):
  c = default_data_config()
  c.name, c.data_dir, c.manual_dir = name, str(tmp_path / "tfds"), str(tmp_path / "manual")
  c.augment, c.shuffle_buffer = False, 0
  for k, v in fields.items():
    c[k] = v
  return c


def _epoch(c, seed, batch):
  """(sorted labels, sorted image digests) of the first `batch` training examples."""
  b = next(ip.make_train_iterator(c, split=c.train_split, global_batch_size=batch, image_size=8,
                                  seed=seed))
  digests = sorted(hashlib.sha256(x.tobytes()).hexdigest() for x in b["image"])
  return sorted(b["label"].tolist()), digests


def test_single_label_fraction_and_shots_counts_by_hand(tmp_path):
  # Chaoyang train has (3, 2, 2, 1) images per class, no patients.
  fx.make_chaoyang(str(tmp_path / "manual"))
  whole = _config("chaoyang", tmp_path, val_split=None)
  # 0.5: per class max(1, round(0.5 * n)) = (2, 1, 1, 1), 5 images (round half up).
  half = _config("chaoyang", tmp_path, val_split=None, train_fraction=0.5)
  src = ip.get_source(half)
  assert src.split_size("train") == 5 and ip.dataset_info(half).split_sizes["train"] == 5
  assert np.bincount(src.metadata("train")["label"], minlength=4).tolist() == [2, 1, 1, 1]
  assert ip.num_batches_per_epoch(half, split="train", global_batch_size=2) == 2
  # The records the pipeline yields are the subset's (one epoch = one batch of 5).
  labels, _ = _epoch(half, seed=0, batch=5)
  assert labels == [0, 0, 1, 2, 3]
  # Only the training split is cut; test stays whole; the records are the split's own.
  assert src.split_size("test") == ip.get_source(whole).split_size("test") == 4
  assert set(src.metadata("train")["file_name"]) <= set(ip.record_metadata(whole, "train")
                                                         ["file_name"])
  info = ip.dataset_info(half).subset
  assert info["num_images"] == 5 and info["of_images"] == 8
  assert info["positives_per_class"] == dict(zip(ip.dataset_info(whole).class_names, [2, 1, 1, 1]))
  # One image per class.
  one = _config("chaoyang", tmp_path, val_split=None, train_per_class=1)
  assert np.bincount(ip.record_metadata(one, "train")["label"]).tolist() == [1, 1, 1, 1]
  # Class 3 has one image: two shots are refused, naming it and the largest possible N.
  two = _config("chaoyang", tmp_path, val_split=None, train_per_class=2)
  with pytest.raises(DataError, match=r"train_per_class=2 is more than the 1 images of class "
                                      r"'.*' in the 'train' split; use at most 1"):
    ip.get_source(two)
  assert ip.dataset_info(whole).subset is None


@pytest.mark.parametrize("seed", range(6))
def test_multi_label_fraction_counts_by_hand(seed):
  # 10 images, 2 findings: f0 positive in 4 (2..5), f1 in 2 (6, 7, disjoint), 4 without finding
  # (0, 1, 8, 9; record 9 has f1 unknown). fraction 0.5: targets (2, 1); 3 positives, then
  # filled to 5 images with images that add no positive: 2 without finding.
  labels = np.zeros((10, 2), np.float32)
  labels[2:6, 0] = 1
  labels[6:8, 1] = 1
  labels[9, 1] = -1
  idx = subsets.select(subsets.Spec(0.5, 0, seed), labels, [""] * 10, task="multi_label",
                       class_names=["f0", "f1"])
  assert len(idx) == 5
  assert (labels[idx] == 1).sum(0).tolist() == [2, 1]
  assert ((labels[idx] == 1).sum(1) == 0).sum() == 2
  # N per finding: the findings' positives only (>= N), no image without a finding is needed.
  idx = subsets.select(subsets.Spec(1.0, 2, seed), labels, [""] * 10, task="multi_label",
                       class_names=["f0", "f1"])
  assert (labels[idx] == 1).sum(0).tolist() == [2, 2] and len(idx) == 4


@pytest.mark.parametrize("seed", range(6))
def test_patients_are_never_split_counts_by_hand(seed):
  # Class 0: patients A, B, C with 2 images each; class 1: patients D, E with 1 image each.
  # fraction 0.5: targets (3, 1): one of D/E, then whole patients of class 0 until >= 3: two of
  # A/B/C (4 images, the second patient brings the class above its target).
  patients = np.array(["A", "A", "B", "B", "C", "C", "D", "E"])
  labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
  idx = subsets.select(subsets.Spec(0.5, 0, seed), labels, patients, task="single_label",
                       class_names=["a", "b"])
  assert np.bincount(labels[idx]).tolist() == [4, 1]
  chosen = set(patients[idx])
  assert all(set(np.flatnonzero(patients == p)) <= set(idx) for p in chosen)


def test_chestxray14_subset_keeps_patients_whole_and_every_finding(tmp_path):
  # Train (val_fraction 0): patients 1 (4 images, 8 findings of which 6 only here), 2 (3 images,
  # Consolidation .. Hernia, 5 only here), 3 (2), 4 (1). One shot per finding forces patients 1
  # and 2 for any seed: 7 images, every finding >= 1 positive; 3 and 4 add nothing needed.
  fx.make_chestxray14(str(tmp_path / "manual"))
  for seed in (0, 1, 2):
    c = _config("chestxray14", tmp_path, val_fraction=0.0, val_split=None, train_per_class=1,
                subset_seed=seed)
    meta = ip.record_metadata(c, "train")
    assert sorted(set(meta["patient"].astype(str))) == ["1", "2"] and len(meta["patient"]) == 7
    assert ((meta["label"] == 1).sum(0) >= 1).all()
  # Hernia has 2 positive images (patients 2 and 4), Atelectasis 1: two shots are refused.
  c = _config("chestxray14", tmp_path, val_fraction=0.0, val_split=None, train_per_class=2)
  with pytest.raises(DataError, match="more than the 1 positive images of finding"):
    ip.get_source(c)


def test_same_subset_for_every_training_seed_another_for_another_subset_seed(tmp_path):
  fx.make_image_folder(str(tmp_path / "manual"), classes=("x", "y"), per_class=(10, 10),
                      split_dirs=True)
  c = _config("image_folder", tmp_path, train_fraction=0.3)
  info = ip.dataset_info(c).subset
  assert info["num_images"] == 6
  # The training seed shuffles the subset; it does not choose it.
  assert _epoch(c, seed=0, batch=6) == _epoch(c, seed=7, batch=6)
  ids = {ip.dataset_info(_config("image_folder", tmp_path, train_fraction=0.3,
                                 subset_seed=s)).subset["subset_id"]
         for s in range(4)}
  assert len(ids) > 1 and info["subset_id"] in ids
  # A rebuilt source (a new process) selects the same records.
  ip._cached_subset.cache_clear()  # pylint: disable=protected-access
  assert ip.dataset_info(c).subset["subset_id"] == info["subset_id"]


@pytest.mark.parametrize("fields, message", [
    ({"train_fraction": 0.0}, r"data.train_fraction=0.0 must be in \(0, 1\]"),
    ({"train_fraction": 1.5}, r"data.train_fraction=1.5 must be in \(0, 1\]"),
    ({"train_fraction": float("nan")}, r"data.train_fraction=nan must be in"),
    ({"train_per_class": -1}, "data.train_per_class=-1 must be an integer >= 0"),
    ({"train_per_class": 2.5}, "data.train_per_class=2.5 must be an integer >= 0"),
    ({"train_fraction": 0.5, "train_per_class": 3}, "both set; set one of them"),
])
def test_bad_subset_values_are_one_line_config_errors(fields, message):
  c = {**default_data_config().to_dict(), **fields}  # A config.json's values, unchecked.
  with pytest.raises(ConfigError, match=message) as e:
    subsets.spec_of(c)
  assert "\n" not in str(e.value)


def test_absent_class_is_refused():
  with pytest.raises(DataError, match="class 'c' has no image in the 'train' split, so the "
                                      "training subset"):
    subsets.select(subsets.Spec(0.5, 0, 0), np.array([0, 1, 0, 1]), [""] * 4,
                   task="single_label", class_names=["a", "b", "c"])
  with pytest.raises(DataError, match="finding 'g' has no positive image"):
    subsets.select(subsets.Spec(1.0, 1, 0), np.array([[1, -1], [0, 0]], np.float32), [""] * 2,
                   task="multi_label", class_names=["f", "g"])


def test_chestmnist_fraction_meets_every_findings_target_through_the_pipeline(tmp_path):
  """Multi-label MedMNIST (float labels [14]) through the pipeline: every finding reaches
  max(1, round(f x its positives)) positives (hand formula on the whole split's labels), the
  split size and the recorded positives are the subset's."""
  fx.make_medmnist(str(tmp_path / "manual"), "chestmnist", 28, counts=(40, 4, 4), num_labels=14,
                   rgb=False, multi_label=True)
  c = default_data_config()
  c.name, c.medmnist_flag, c.medmnist_size = "medmnist", "chestmnist", 28
  c.manual_dir, c.data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  whole = ip.record_metadata(c, "train")["label"]
  c.train_fraction = 0.25
  sub = ip.record_metadata(c, "train")["label"]
  assert sub.dtype == np.float32 and sub.shape[1] == 14
  target = np.maximum(1, np.floor(0.25 * (whole == 1).sum(0) + 0.5))
  assert ((sub == 1).sum(0) >= target).all()
  assert ip.dataset_info(c).split_sizes == {"train": len(sub), "validation": 4, "test": 4}
  assert ip.dataset_info(c).subset["positives_per_class"] == dict(
      zip(ip.dataset_info(c).class_names, (sub == 1).sum(0).astype(int).tolist()))
