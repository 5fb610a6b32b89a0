"""Control signals from images: Sobel/NMS edges, low resolution, masked digit, edge agreement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.data.control_signals import (
  control_channels,
  control_signal,
  edge_agreement,
  low_resolution,
  masked_digit,
  sobel_edges,
)


def _square(size=12, lo=3, hi=9):
  img = -np.ones((1, size, size, 1), np.float32)
  img[:, lo:hi, lo:hi] = 1.0
  return jnp.asarray(img)


def test_edges_of_a_square_lie_on_its_border():
  img = _square()
  thick = np.asarray(sobel_edges(img, thin=False))[0, ..., 0]
  thin = np.asarray(sobel_edges(img))[0, ..., 0]
  assert set(np.unique(thick)) <= {0.0, 1.0} and thin.sum() > 0
  # Without thinning both sides of the step respond (rows 2-3 at the top border); thinning keeps one.
  assert thick[2, 6] == 1 and thick[3, 6] == 1
  assert thin[2:4, 6].sum() == 1 and thin[8:10, 6].sum() == 1
  assert thin.sum() < thick.sum()
  np.testing.assert_array_equal(np.asarray(jax.jit(sobel_edges)(img))[0, ..., 0], thin)  # traceable
  # Flat regions (inside and outside) have no edges.
  assert thick[6, 6] == 0 and thick[0, 0] == 0
  # An image agrees perfectly with its own edges; an empty image has none in common with them.
  iou, l1 = edge_agreement(sobel_edges(img), img)
  np.testing.assert_allclose(iou, [1.0])
  np.testing.assert_allclose(l1, [0.0])
  iou, l1 = edge_agreement(sobel_edges(img), -jnp.ones_like(img))
  np.testing.assert_allclose(iou, [0.0])
  np.testing.assert_allclose(l1, [thin.mean()], rtol=1e-6)
  # A one-pixel shift: low IoU, but tolerance 1 recovers most of it.
  shifted = jnp.roll(img, 1, axis=2)
  strict, _ = edge_agreement(sobel_edges(img), shifted)
  loose, _ = edge_agreement(sobel_edges(img), shifted, tolerance=1)
  assert float(loose[0]) > float(strict[0]) + 0.3


def test_low_resolution_and_mask():
  img = _square(8, 0, 4)  # the top-left 4x4 quadrant is white
  low = np.asarray(low_resolution(img, factor=4))
  assert low.shape == img.shape
  np.testing.assert_allclose(low[0, :4, :4], 1.0)
  np.testing.assert_allclose(low[0, 4:, 4:], 0.0)
  np.testing.assert_allclose(np.asarray(low_resolution(img, factor=2)), (np.asarray(img) + 1) / 2)
  odd = np.asarray(low_resolution(jnp.zeros((2, 7, 7, 1)), factor=4))
  assert odd.shape == (2, 7, 7, 1)
  np.testing.assert_allclose(odd, 0.5)
  m = np.asarray(masked_digit(img))
  assert m.shape == (1, 8, 8, 2)
  np.testing.assert_allclose(m[0, :4, :, 1], 1.0)
  np.testing.assert_allclose(m[0, 4:], 0.0)
  np.testing.assert_allclose(m[0, :4, :, 0], (np.asarray(img)[0, :4, :, 0] + 1) / 2)
  assert control_channels("masked") == 2 and control_channels("edges") == 1
  np.testing.assert_array_equal(control_signal("edges", img), sobel_edges(img))


def test_errors():
  with pytest.raises(ValueError, match="images must be"):
    sobel_edges(jnp.zeros((8, 8, 1)))
  with pytest.raises(ValueError, match="floating point"):
    sobel_edges(jnp.zeros((1, 8, 8, 1), jnp.uint8))
  with pytest.raises(ValueError, match="kind="):
    control_signal("depth", jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="control_edges must have shape"):
    edge_agreement(jnp.zeros((2, 8, 8, 1)), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="keep_rows"):
    masked_digit(jnp.zeros((1, 8, 8, 1)), keep_rows=9)
