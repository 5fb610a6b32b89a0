"""Tests for diffjax.data.pipeline: deterministic batching, sharding, prefetch."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from diffjax.data import (
  ImageDataset,
  Prefetcher,
  batch_indices,
  get_batch,
  to_model_range,
  to_uint8,
)


@pytest.fixture(scope="module")
def tiny_ds() -> ImageDataset:
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(10, 4, 3, 1), dtype=np.uint8)
  images[0] = 0
  images[1] = 255
  return ImageDataset(images=images, labels=np.arange(10, dtype=np.int32) % 3, num_classes=3, name="tiny")


def test_batch_indices_deterministic_and_seeded():
  a = batch_indices(num_examples=100, global_batch_size=16, step=5, seed=0)
  b = batch_indices(num_examples=100, global_batch_size=16, step=5, seed=0)
  c = batch_indices(num_examples=100, global_batch_size=16, step=5, seed=1)
  d = batch_indices(num_examples=100, global_batch_size=16, step=6, seed=0)
  assert a.shape == (16,) and np.issubdtype(a.dtype, np.integer)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a, d)


def test_each_epoch_is_a_permutation():
  n, bs = 10, 5  # Two steps per epoch, no boundary crossing.
  for epoch in range(3):
    seen = np.concatenate(
      [
        batch_indices(num_examples=n, global_batch_size=bs, step=s, seed=7)
        for s in (2 * epoch, 2 * epoch + 1)
      ]
    )
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))

  def epoch(steps):
    return np.concatenate(
      [batch_indices(num_examples=n, global_batch_size=bs, step=s, seed=7) for s in steps]
    )

  e0, e1 = epoch((0, 1)), epoch((2, 3))
  assert not np.array_equal(e0, e1)  # Epochs are reshuffled.
  np.testing.assert_array_equal(e0, np.random.default_rng([7, 0]).permutation(n))
  np.testing.assert_array_equal(e1, np.random.default_rng([7, 1]).permutation(n))


def test_epoch_boundary_crossing():
  n, bs, seed = 10, 4, 3
  stream = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(5)])
  for step in range(10):
    got = batch_indices(num_examples=n, global_batch_size=bs, step=step, seed=seed)
    np.testing.assert_array_equal(got, stream[step * bs : (step + 1) * bs])
  # Step 2 covers positions 8..11: the end of epoch 0 and the start of epoch 1.
  step2 = batch_indices(num_examples=n, global_batch_size=bs, step=2, seed=seed)
  np.testing.assert_array_equal(step2[:2], stream[8:10])
  np.testing.assert_array_equal(step2[2:], np.random.default_rng([seed, 1]).permutation(n)[:2])
  # Batch larger than the dataset spans several epochs.
  big = batch_indices(num_examples=n, global_batch_size=25, step=1, seed=seed)
  np.testing.assert_array_equal(big, stream[25:50])


def test_batch_indices_bad_args():
  with pytest.raises(ValueError, match="num_examples"):
    batch_indices(num_examples=0, global_batch_size=4, step=0, seed=0)
  with pytest.raises(ValueError, match="global_batch_size"):
    batch_indices(num_examples=10, global_batch_size=0, step=0, seed=0)
  with pytest.raises(ValueError, match="step"):
    batch_indices(num_examples=10, global_batch_size=2, step=-1, seed=0)
  with pytest.raises(ValueError, match="seed"):
    batch_indices(num_examples=10, global_batch_size=2, step=0, seed=1.5)


def test_range_conversions():
  x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  y = to_model_range(x)
  assert y.dtype == np.float32
  assert y.min() == -1.0 and y.max() == 1.0
  np.testing.assert_array_equal(to_uint8(y), x)
  np.testing.assert_array_equal(to_uint8(np.array([-3.0, 2.0, np.nan])), [0, 255, 0])
  with pytest.raises(ValueError, match="images_uint8 must have dtype uint8"):
    to_model_range(y)


def test_get_batch_values_and_range(tiny_ds):
  batch = get_batch(tiny_ds, step=3, seed=0, global_batch_size=6)
  assert batch["image"].shape == (6, 4, 3, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  idx = batch_indices(num_examples=10, global_batch_size=6, step=3, seed=0)
  np.testing.assert_array_equal(to_uint8(batch["image"]), tiny_ds.images[idx])
  np.testing.assert_array_equal(batch["label"], tiny_ds.labels[idx])
  # A whole epoch covers the extreme images, so both ends of the range appear.
  epoch = get_batch(tiny_ds, step=0, seed=0, global_batch_size=10)
  assert epoch["image"].min() == -1.0 and epoch["image"].max() == 1.0


@pytest.mark.parametrize("step", [0, 1, 7])
def test_two_hosts_concatenate_to_one(tiny_ds, step):
  full = get_batch(tiny_ds, step=step, seed=5, global_batch_size=8)
  parts = [
    get_batch(tiny_ds, step=step, seed=5, global_batch_size=8, process_index=i, process_count=2)
    for i in range(2)
  ]
  assert parts[0]["image"].shape == (4, 4, 3, 1)
  for key in ("image", "label"):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])


def test_get_batch_bad_args(tiny_ds):
  with pytest.raises(ValueError, match="global_batch_size=7 must be divisible by "):
    get_batch(tiny_ds, step=0, seed=0, global_batch_size=7, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    get_batch(tiny_ds, step=0, seed=0, global_batch_size=4, process_index=2, process_count=2)
  # Larger than the dataset is allowed: epochs are concatenated.
  assert get_batch(tiny_ds, step=0, seed=0, global_batch_size=32)["label"].shape == (32,)


def test_prefetcher_matches_direct_calls(tiny_ds):
  kwargs = dict(seed=2, global_batch_size=4, process_index=1, process_count=2)
  with Prefetcher(tiny_ds, start_step=5, num_steps=6, buffer_size=2, **kwargs) as pf:
    got = list(pf)
  assert [s for s, _ in got] == list(range(5, 11))
  for step, batch in got:
    want = get_batch(tiny_ds, step=step, **kwargs)
    np.testing.assert_array_equal(batch["image"], want["image"])
    np.testing.assert_array_equal(batch["label"], want["label"])


def test_prefetcher_unbounded_close_stops_thread(tiny_ds):
  before = threading.active_count()
  pf = Prefetcher(tiny_ds, start_step=0, seed=0, global_batch_size=2)
  steps = [next(pf)[0] for _ in range(5)]
  assert steps == [0, 1, 2, 3, 4]
  pf.close()
  pf.close()  # Idempotent.
  assert not pf._thread.is_alive()
  with pytest.raises(StopIteration):
    next(pf)
  assert threading.active_count() <= before


def test_prefetcher_propagates_errors(tiny_ds, monkeypatch):
  import diffjax.data.pipeline as pipeline

  real = pipeline.get_batch

  def flaky(ds, *, step, **kw):
    if step == 3:
      raise RuntimeError("boom at step 3")
    return real(ds, step=step, **kw)

  monkeypatch.setattr(pipeline, "get_batch", flaky)
  pf = Prefetcher(tiny_ds, start_step=0, seed=0, global_batch_size=2)
  assert [next(pf)[0] for _ in range(3)] == [0, 1, 2]
  with pytest.raises(RuntimeError, match="boom at step 3"):
    next(pf)
  deadline = time.monotonic() + 5
  while pf._thread.is_alive() and time.monotonic() < deadline:
    time.sleep(0.01)
  assert not pf._thread.is_alive()


def test_prefetcher_bad_args_fail_eagerly(tiny_ds):
  with pytest.raises(ValueError, match="global_batch_size=3 must be divisible by "):
    Prefetcher(tiny_ds, start_step=0, seed=0, global_batch_size=3, process_count=2)
  with pytest.raises(ValueError, match="buffer_size"):
    Prefetcher(tiny_ds, start_step=0, seed=0, global_batch_size=2, buffer_size=0)
