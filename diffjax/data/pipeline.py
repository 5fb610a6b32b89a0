"""Deterministic, stateless, host-sharded batching.

The batch for training step ``s`` is a pure function of ``(seed, s)``: the
example order is the concatenation of per-epoch permutations, each drawn from
``np.random.default_rng([seed, epoch])``, and step ``s`` takes positions
``s * B .. (s + 1) * B - 1`` of that sequence (``B`` = global batch size).
Resuming from a checkpoint therefore only needs the step number. Each host
takes its contiguous slice of the global batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from diffjax.data.sources import ImageDataset


def _check_int(value: Any, *, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def epoch_permutation(*, num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """Returns the example order of one epoch.

  Args:
      num_examples: Dataset size N.
      seed: Non-negative base seed.
      epoch: Non-negative epoch number.

  Returns:
      int64 ``[N]`` permutation of ``0..N-1`` from ``default_rng([seed, epoch])``.
  """
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(*, num_examples: int, global_batch_size: int, step: int, seed: int) -> np.ndarray:
  """Returns the dataset indices of the global batch for ``step``.

  Args:
      num_examples: Dataset size N (> 0).
      global_batch_size: Batch size B across all hosts (> 0; may exceed N).
      step: Training step (>= 0).
      seed: Non-negative data seed.

  Returns:
      int64 ``[B]`` indices: positions ``step*B .. (step+1)*B - 1`` of the
      concatenated epoch permutations, so every example appears exactly once
      per epoch and batches straddle epoch boundaries seamlessly.

  Raises:
      ValueError: If an argument is not an int or is out of range.
  """
  n = _check_int(num_examples, name="num_examples", minimum=1)
  b = _check_int(global_batch_size, name="global_batch_size", minimum=1)
  step = _check_int(step, name="step", minimum=0)
  seed = _check_int(seed, name="seed", minimum=0)
  start, stop = step * b, (step + 1) * b
  first_epoch, last_epoch = start // n, (stop - 1) // n
  order = np.concatenate(
    [epoch_permutation(num_examples=n, seed=seed, epoch=e) for e in range(first_epoch, last_epoch + 1)]
  )
  offset = start - first_epoch * n
  return order[offset : offset + b]


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
  """Maps ``uint8`` pixels 0..255 to float32 in ``[-1, 1]`` via ``x / 127.5 - 1``.

  Args:
      images_uint8: ``uint8`` array of any shape, e.g. ``[N, H, W, C]``.

  Returns:
      float32 array of the same shape.

  Raises:
      ValueError: If the input dtype is not uint8.
  """
  x = np.asarray(images_uint8)
  if x.dtype != np.uint8:
    raise ValueError(f"images_uint8 must have dtype uint8, got {x.dtype}")
  return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images_float: Any) -> np.ndarray:
  """Inverse of :func:`to_model_range`: ``round((x + 1) * 127.5)`` clipped to 0..255.

  Args:
      images_float: Float array (numpy or JAX) of any shape, nominally in ``[-1, 1]``.

  Returns:
      uint8 numpy array of the same shape. NaNs map to 0.
  """
  x = np.asarray(images_float, dtype=np.float32)
  x = np.nan_to_num(x, nan=-1.0)
  return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def get_batch(
  ds: ImageDataset,
  *,
  step: int,
  seed: int,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> dict[str, np.ndarray]:
  """Returns this host's share of the global batch for ``step``.

  Args:
      ds: Dataset with N examples of shape ``[H, W, C]``.
      step: Training step (>= 0).
      seed: Non-negative data seed.
      global_batch_size: Batch size B summed over all hosts; must be divisible
          by ``process_count``. May exceed N (epochs are concatenated).
      process_index: This host's index in ``[0, process_count)``.
      process_count: Number of hosts P.

  Returns:
      ``{'image': float32 [B/P, H, W, C] in [-1, 1], 'label': int32 [B/P]}``, the
      contiguous slice ``[i*B/P, (i+1)*B/P)`` of the global batch for host ``i``.

  Raises:
      ValueError: If B is not divisible by P or an index is out of range.
  """
  process_count = _check_int(process_count, name="process_count", minimum=1)
  process_index = _check_int(process_index, name="process_index", minimum=0)
  if process_index >= process_count:
    raise ValueError(f"process_index must be < process_count={process_count}, got {process_index}")
  global_batch_size = _check_int(global_batch_size, name="global_batch_size", minimum=1)
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be divisible by process_count={process_count}"
    )
  local = global_batch_size // process_count
  idx = batch_indices(num_examples=len(ds), global_batch_size=global_batch_size, step=step, seed=seed)[
    process_index * local : (process_index + 1) * local
  ]
  return {"image": to_model_range(ds.images[idx]), "label": ds.labels[idx]}


class _Failure:
  """Wraps an exception raised in the producer thread."""

  def __init__(self, error: BaseException):
    self.error = error


_DONE = object()


class Prefetcher:
  """Produces :func:`get_batch` results for consecutive steps in a background thread.

  Iterating yields ``(step, batch)`` for ``step = start_step, start_step + 1, ...``
  (forever, or ``num_steps`` times). Batches are identical to direct
  ``get_batch`` calls; an exception in the producer is re-raised by the
  iterator. Use as a context manager or call :meth:`close`.

  Args:
      ds: Dataset to batch.
      start_step: First step to produce (e.g. the restored checkpoint step).
      seed: Data seed.
      global_batch_size: Global batch size B.
      process_index: This host's index.
      process_count: Number of hosts.
      num_steps: Number of steps to produce; ``None`` means unbounded.
      buffer_size: Maximum number of ready batches held in the queue (1..16).
  """

  def __init__(
    self,
    ds: ImageDataset,
    *,
    start_step: int,
    seed: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_steps: int | None = None,
    buffer_size: int = 2,
  ):
    start_step = _check_int(start_step, name="start_step", minimum=0)
    buffer_size = _check_int(buffer_size, name="buffer_size", minimum=1)
    if buffer_size > 16:
      raise ValueError(f"buffer_size must be <= 16, got {buffer_size}")
    if num_steps is not None:
      num_steps = _check_int(num_steps, name="num_steps", minimum=0)
    self._kwargs = dict(
      seed=seed,
      global_batch_size=global_batch_size,
      process_index=process_index,
      process_count=process_count,
    )
    # Fail fast in the caller on bad batching arguments (cheap: one batch).
    get_batch(ds, step=start_step, **self._kwargs)
    self._ds = ds
    self._end_step = None if num_steps is None else start_step + num_steps
    self._queue: queue.Queue = queue.Queue(maxsize=buffer_size)
    self._stop = threading.Event()
    self._finished = False
    self._thread = threading.Thread(
      target=self._produce, args=(start_step,), name="diffjax-prefetch", daemon=True
    )
    self._thread.start()

  def _put(self, item: Any) -> bool:
    """Puts ``item`` unless stopped; returns False if the producer should exit."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self, step: int) -> None:
    try:
      while self._end_step is None or step < self._end_step:
        if self._stop.is_set():
          return
        batch = get_batch(self._ds, step=step, **self._kwargs)
        if not self._put((step, batch)):
          return
        step += 1
      self._put(_DONE)
    except BaseException as err:  # noqa: BLE001 - re-raised in the consumer.
      self._put(_Failure(err))

  def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    return self

  def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
    if self._finished:
      raise StopIteration
    while True:
      try:
        item = self._queue.get(timeout=0.1)
        break
      except queue.Empty:
        if self._stop.is_set() or (not self._thread.is_alive() and self._queue.empty()):
          self._finished = True
          raise StopIteration from None
    if item is _DONE:
      self._finished = True
      raise StopIteration
    if isinstance(item, _Failure):
      self._finished = True
      self.close()
      raise item.error
    return item

  def close(self) -> None:
    """Stops the producer thread and drops queued batches. Idempotent."""
    self._stop.set()
    self._finished = True
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread.is_alive() and self._thread is not threading.current_thread():
      self._thread.join(timeout=5.0)

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  def __del__(self) -> None:
    stop = getattr(self, "_stop", None)
    if stop is not None:
      stop.set()
