"""The adapter's sparse encoding primitives, against hand computations."""

import hashlib

import numpy as np

from shpeft_jax.sparse_encoding import (changed_indices, content_hash, decode_indices,
                                        encode_indices)


def test_changed_compares_bits_and_indices_round_trip():
  base = np.array([[0.0, 1.0, np.nan], [2.0, 3.0, 4.0]], np.float32)
  new = base.copy()
  new[0, 0] = -0.0      # == 0.0 as a float, another bit pattern: changed
  new[1, 2] = 5.0
  # base[0, 2] NaN stays the same NaN: unchanged although NaN != NaN as floats.
  idx = changed_indices(new, base)
  np.testing.assert_array_equal(idx, [0, 5])
  first, gaps = encode_indices(np.array([3, 7, 300, 70_000]))
  assert first == 3 and gaps.dtype == np.uint32 and list(gaps) == [4, 293, 69_700]
  first, gaps = encode_indices(np.array([10, 11, 266]))
  assert gaps.dtype == np.uint8 and list(gaps) == [1, 255]
  np.testing.assert_array_equal(decode_indices(first, gaps, 3), [10, 11, 266])


def test_content_hash_is_sha256_of_sorted_names_dtypes_shapes_and_bytes():
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.ones(2, np.float32)
  h = hashlib.sha256()
  for name, x in (("encoder/a", a), ("encoder/b", b)):
    h.update(f"{name}|{x.dtype.str}|{x.shape}\n".encode())
    h.update(x.tobytes())
  assert content_hash({"encoder": {"b": b, "a": a}}) == h.hexdigest()
  b2 = b.copy()
  b2[1] = -b2[1]
  assert content_hash({"encoder": {"b": b2, "a": a}}) != h.hexdigest()
