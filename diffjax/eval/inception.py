"""The FID Inception-v3 network (pool features, 2048-d) in Flax, for standard FID from local weights.

FID (Heusel et al. 2017) is the Fréchet distance (:mod:`diffjax.eval.frechet`) between Gaussians fitted
to the 2048-d final average-pool features of the Inception-v3 graph ``inception-2015-12-05`` that the
original TensorFlow FID code uses. This module is a Flax Linen (NHWC) port of pytorch-fid's version of
that graph (``pytorch_fid/inception.py``, mseitzer/pytorch-fid v0.3.0): torchvision's ``Inception3``
with the blocks replaced by ``FIDInceptionA``/``FIDInceptionC``/``FIDInceptionE_1``/``FIDInceptionE_2``,
which differ from torchvision's in two ways that match TensorFlow:

* the average pools of the branch pools in Mixed_5b..5d, 6b..6e and 7b ignore padded zeros
  (``count_include_pad=False``);
* Mixed_7c's branch pool is a 3x3 *max* pool (stride 1, padding 1).

Every convolution is ``conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU``. Inputs are
prepared as pytorch-fid does: values in ``[0, 1]`` (``uint8 / 255``) are resized to 299x299 with
bilinear interpolation (``F.interpolate(mode='bilinear', align_corners=False)``, no antialiasing,
reproduced exactly here with two interpolation matrices), mapped to ``[-1, 1]`` by ``2 x - 1``, and
grey images are repeated to 3 channels (as PIL's ``convert('RGB')`` does). Scores therefore match
pytorch-fid's; clean-fid (PIL bicubic resize) and the TensorFlow code (its own resize) give slightly
different numbers. FID from fewer than ~2048 images per side is biased upwards and not comparable with
published values (those use 10k-50k).

Weights are not shipped and never downloaded here. Convert pytorch-fid's weights (``FID_WEIGHTS_URL``,
``pt_inception-2015-12-05-6726825d.pth``) to safetensors once, on a machine with internet access::

    pip install torch torchvision pytorch-fid safetensors
    python -c "
    from pytorch_fid.inception import fid_inception_v3
    from safetensors.torch import save_file
    sd = fid_inception_v3().state_dict()  # downloads the .pth into the torch hub cache
    save_file({k: v.contiguous() for k, v in sd.items()}, 'pt_inception-2015-12-05.safetensors')"

then ``load_inception('pt_inception-2015-12-05.safetensors')`` or
``python -m diffjax eval --samples S.npz --inception pt_inception-2015-12-05.safetensors``. The loader
reads torchvision/pytorch-fid state-dict names (``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch1x1.bn.running_mean``, ...) and also the names of pytorch-fid's ``InceptionV3``
wrapper (``blocks.0.0.conv.weight``, ...); ``fc.*``, ``AuxLogits.*`` and ``num_batches_tracked`` are
ignored. torchvision's ImageNet weights (``inception_v3(weights='DEFAULT')``, a 1000-class ``fc``) load
too, but give a different, non-standard score; a warning says so.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

__all__ = [
  "INCEPTION_FEATURE_DIM",
  "INCEPTION_SIZE",
  "FIDInceptionV3",
  "inception_features",
  "load_inception",
]

INCEPTION_FEATURE_DIM = 2048
INCEPTION_SIZE = 299
_MIN_SIZE = 75  # smallest input for which every stride-2 stage still has a pixel
_BN_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


class _ConvBN(nn.Module):
  """torchvision's ``BasicConv2d``: conv without bias, BatchNorm (eps 1e-3, inference), ReLU."""

  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  pad: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    (ph, pw) = self.pad
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=self.strides,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=_HIGHEST,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x: jnp.ndarray) -> jnp.ndarray:
  """3x3 stride-1 average pool over the unpadded pixels only (TF ``SAME``; ``count_include_pad=False``)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x: jnp.ndarray) -> jnp.ndarray:
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class _FIDInceptionA(nn.Module):
  """Mixed_5b/5c/5d: ``[B, H, W, Cin] -> [B, H, W, 224 + pool_features]``."""

  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _ConvBN(64, (1, 1), name="branch1x1")(x)
    b5 = _ConvBN(48, (1, 1), name="branch5x5_1")(x)
    b5 = _ConvBN(64, (5, 5), pad=(2, 2), name="branch5x5_2")(b5)
    b3 = _ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = _ConvBN(96, (3, 3), pad=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = _ConvBN(96, (3, 3), pad=(1, 1), name="branch3x3dbl_3")(b3)
    bp = _ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):
  """Mixed_6a (grid reduction): ``[B, H, W, 288] -> [B, (H - 3) // 2 + 1, ..., 768]``."""

  @nn.compact
  def __call__(self, x):
    b3 = _ConvBN(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = _ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = _ConvBN(96, (3, 3), pad=(1, 1), name="branch3x3dbl_2")(bd)
    bd = _ConvBN(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class _FIDInceptionC(nn.Module):
  """Mixed_6b..6e (factorised 7x7): ``[B, H, W, 768] -> [B, H, W, 768]``."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = _ConvBN(192, (1, 1), name="branch1x1")(x)
    b7 = _ConvBN(c7, (1, 1), name="branch7x7_1")(x)
    b7 = _ConvBN(c7, (1, 7), pad=(0, 3), name="branch7x7_2")(b7)
    b7 = _ConvBN(192, (7, 1), pad=(3, 0), name="branch7x7_3")(b7)
    bd = _ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = _ConvBN(c7, (7, 1), pad=(3, 0), name="branch7x7dbl_2")(bd)
    bd = _ConvBN(c7, (1, 7), pad=(0, 3), name="branch7x7dbl_3")(bd)
    bd = _ConvBN(c7, (7, 1), pad=(3, 0), name="branch7x7dbl_4")(bd)
    bd = _ConvBN(192, (1, 7), pad=(0, 3), name="branch7x7dbl_5")(bd)
    bp = _ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):
  """Mixed_7a (grid reduction): ``[B, H, W, 768] -> [B, (H - 3) // 2 + 1, ..., 1280]``."""

  @nn.compact
  def __call__(self, x):
    b3 = _ConvBN(192, (1, 1), name="branch3x3_1")(x)
    b3 = _ConvBN(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = _ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = _ConvBN(192, (1, 7), pad=(0, 3), name="branch7x7x3_2")(b7)
    b7 = _ConvBN(192, (7, 1), pad=(3, 0), name="branch7x7x3_3")(b7)
    b7 = _ConvBN(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class _FIDInceptionE(nn.Module):
  """Mixed_7b (``max_pool=False``, FIDInceptionE_1) / 7c (``max_pool=True``, E_2): ``-> [B, H, W, 2048]``."""

  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = _ConvBN(320, (1, 1), name="branch1x1")(x)
    b3 = _ConvBN(384, (1, 1), name="branch3x3_1")(x)
    b3a = _ConvBN(384, (1, 3), pad=(0, 1), name="branch3x3_2a")(b3)
    b3b = _ConvBN(384, (3, 1), pad=(1, 0), name="branch3x3_2b")(b3)
    bd = _ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = _ConvBN(384, (3, 3), pad=(1, 1), name="branch3x3dbl_2")(bd)
    bda = _ConvBN(384, (1, 3), pad=(0, 1), name="branch3x3dbl_3a")(bd)
    bdb = _ConvBN(384, (3, 1), pad=(1, 0), name="branch3x3dbl_3b")(bd)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same(x)
    bp = _ConvBN(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID Inception-v3 up to the final average pool (pytorch-fid's block 3 output).

  ``__call__`` maps ``[B, H, W, 3]`` float images already in ``[-1, 1]`` (H, W >= 75; 299 for FID) to
  ``[B, 2048]`` pool features. Variables: ``{'params': ..., 'batch_stats': ...}`` with submodules named
  as in torchvision (``Conv2d_1a_3x3``, ``Mixed_5b/branch1x1``, ... each with ``conv`` and ``bn``).
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < _MIN_SIZE:
      raise ValueError(f"FIDInceptionV3 takes [B, H, W, 3] with H, W >= {_MIN_SIZE}, got shape {x.shape}")
    x = _ConvBN(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = _ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = _ConvBN(64, (3, 3), pad=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_valid(x)
    x = _ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = _ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_valid(x)
    x = _FIDInceptionA(32, name="Mixed_5b")(x)
    x = _FIDInceptionA(64, name="Mixed_5c")(x)
    x = _FIDInceptionA(64, name="Mixed_5d")(x)
    x = _InceptionB(name="Mixed_6a")(x)
    x = _FIDInceptionC(128, name="Mixed_6b")(x)
    x = _FIDInceptionC(160, name="Mixed_6c")(x)
    x = _FIDInceptionC(160, name="Mixed_6d")(x)
    x = _FIDInceptionC(192, name="Mixed_6e")(x)
    x = _InceptionD(name="Mixed_7a")(x)
    x = _FIDInceptionE(max_pool=False, name="Mixed_7b")(x)
    x = _FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# ---------------------------------------------------------------------------------------------- loading

# pytorch-fid's InceptionV3 wrapper keeps the same modules under nn.Sequential blocks.
_WRAPPER_NAMES = {
  "blocks.0.0": "Conv2d_1a_3x3",
  "blocks.0.1": "Conv2d_2a_3x3",
  "blocks.0.2": "Conv2d_2b_3x3",
  "blocks.1.0": "Conv2d_3b_1x1",
  "blocks.1.1": "Conv2d_4a_3x3",
  **{f"blocks.2.{i}": name for i, name in enumerate(["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a"])},
  **{f"blocks.2.{i + 4}": name for i, name in enumerate(["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"])},
  **{f"blocks.3.{i}": name for i, name in enumerate(["Mixed_7a", "Mixed_7b", "Mixed_7c"])},
}
# torch leaf name -> (flax collection, flax leaf name)
_LEAVES = {
  "conv.weight": ("params", "conv", "kernel"),
  "bn.weight": ("params", "bn", "scale"),
  "bn.bias": ("params", "bn", "bias"),
  "bn.running_mean": ("batch_stats", "bn", "mean"),
  "bn.running_var": ("batch_stats", "bn", "var"),
}


@functools.lru_cache(maxsize=1)
def _expected() -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """``{torch name: (collection, flax path, torch shape)}`` for every variable of the network."""
  shapes = jax.eval_shape(
    FIDInceptionV3().init, jax.random.key(0), jax.ShapeDtypeStruct((1, _MIN_SIZE, _MIN_SIZE, 3), jnp.float32)
  )
  table = {}
  for collection, tree in shapes.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      module, (sub, name) = path[:-2], path[-2:]
      (torch_leaf,) = [k for k, v in _LEAVES.items() if v == (collection, sub, name)]
      shape = tuple(leaf.shape)
      if name == "kernel":  # flax HWIO <- torch OIHW
        shape = (shape[3], shape[2], shape[0], shape[1])
      table[".".join(module) + "." + torch_leaf] = (collection, path, shape)
  return table


def _canonical(name: str) -> str:
  for prefix, canon in _WRAPPER_NAMES.items():
    if name.startswith(prefix + "."):
      return canon + name[len(prefix) :]
  return name


def _ignored(name: str) -> bool:
  return name.startswith(("fc.", "AuxLogits.")) or name.endswith("num_batches_tracked")


def _listing(names: list[str], limit: int = 5) -> str:
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_inception(path: str | os.PathLike) -> dict[str, Any]:
  """Reads FID Inception-v3 weights from a torchvision/pytorch-fid state dict saved as safetensors.

  Args:
      path: ``.safetensors`` file whose tensors carry torchvision ``Inception3`` names
          (``Conv2d_1a_3x3.conv.weight`` ``[32, 3, 3, 3]``, ``Mixed_5b.branch1x1.bn.running_var``
          ``[64]``, ...) or pytorch-fid ``InceptionV3`` wrapper names (``blocks.0.0.conv.weight``, ...).
          See the module docstring for converting pytorch-fid's ``.pth``.

  Returns:
      ``{'params': ..., 'batch_stats': ...}``: the variables of :class:`FIDInceptionV3` as float32 JAX
      arrays (conv kernels transposed from OIHW to HWIO).

  Raises:
      FileNotFoundError: If ``path`` does not exist.
      ValueError: If the file is not readable safetensors, or a parameter is missing, unexpected, or
          has the wrong shape (each named, with expected and found shapes in torch layout).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"inception weights file '{path}' does not exist")
  try:
    with safe_open(path, framework="numpy") as f:
      names = f.keys()  # safe_open is not iterable
      tensors = {_canonical(k): f.get_tensor(k) for k in names}
  except (SafetensorError, OSError, ValueError, TypeError) as err:
    raise ValueError(f"inception weights '{path}' are not a readable safetensors file: {err}") from err
  expected = _expected()
  unexpected = sorted(k for k in tensors if k not in expected and not _ignored(k))
  if unexpected:
    raise ValueError(
      f"inception weights '{path}' hold parameters the FID Inception-v3 does not have: {_listing(unexpected)}"
    )
  missing = [k for k in expected if k not in tensors]
  if missing:
    raise ValueError(
      f"inception weights '{path}' lack {len(missing)} parameter(s) of the FID Inception-v3: {_listing(missing)}"
    )
  fc = tensors.get("fc.weight")
  if fc is not None and fc.shape[0] != 1008:
    warnings.warn(
      f"inception weights '{path}' have a {fc.shape[0]}-class fc layer; pytorch-fid's FID weights have "
      "1008 classes. These are probably torchvision's ImageNet weights: scores will not be standard FID.",
      stacklevel=2,
    )
  flat = {}
  for name, (collection, flax_path, shape) in expected.items():
    value = np.asarray(tensors[name])
    if value.shape != shape:
      raise ValueError(
        f"inception parameter '{name}' in '{path}' has shape {list(value.shape)}, expected {list(shape)}"
      )
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f"inception parameter '{name}' in '{path}' has dtype {value.dtype}, expected float")
    value = value.astype(np.float32)
    if flax_path[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0)
    flat[(collection, *flax_path)] = jnp.asarray(value)
  return traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------------------------------- features


def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``[out, in]`` weights of PyTorch's 1-D linear resize with ``align_corners=False``, no antialias.

  Follows ATen's ``area_pixel_compute_source_index`` (source ``(i + 0.5) * in / out - 0.5``, clamped
  at 0) and ``guard_index_and_lambda`` (the right neighbour clamped to the last pixel).
  """
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = np.clip(src - i0, 0.0, 1.0)
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), i0), 1.0 - lam)
  np.add.at(m, (np.arange(out_size), i1), lam)
  return m.astype(np.float32)


@jax.jit
def _preprocess(images: jnp.ndarray) -> jnp.ndarray:
  """``[B, H, W, C]`` uint8 (0..255) or float (``[0, 1]``), C in {1, 3} -> ``[B, 299, 299, 3]`` in [-1, 1]."""
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  _, h, w, c = x.shape
  if h != INCEPTION_SIZE:
    x = jnp.einsum("oh,bhwc->bowc", _resize_matrix(h, INCEPTION_SIZE), x, precision=_HIGHEST)
  if w != INCEPTION_SIZE:
    x = jnp.einsum("ow,bhwc->bhoc", _resize_matrix(w, INCEPTION_SIZE), x, precision=_HIGHEST)
  x = 2.0 * x - 1.0
  return jnp.repeat(x, 3, axis=-1) if c == 1 else x


@jax.jit
def _pool_features(variables, x: jnp.ndarray) -> jnp.ndarray:
  return FIDInceptionV3().apply(variables, x)


def _check_images(images) -> np.ndarray:
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[0] < 1 or x.shape[-1] not in (1, 3) or min(x.shape[1:3]) < 1:
    raise ValueError(f"images must be a non-empty [N, H, W, C] array with C in (1, 3), got shape {x.shape}")
  if x.dtype == np.uint8:
    return x
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"images must be uint8 (0..255) or float (in [0, 1]), got dtype {x.dtype}")
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError("images contain NaN or infinite values")
  lo, hi = float(x.min()), float(x.max())
  if lo < -1e-3 or hi > 1.0 + 1e-3:
    raise ValueError(
      f"float images must lie in [0, 1] (pytorch-fid's convention), got range [{lo:.3g}, {hi:.3g}]; map "
      "diffjax model outputs in [-1, 1] with (x + 1) / 2 or diffjax.data.to_uint8"
    )
  return x


def inception_features(variables: dict[str, Any], images, *, batch_size: int = 50) -> np.ndarray:
  """FID Inception-v3 pool features of images, as pytorch-fid computes them.

  Each batch is resized to 299x299 (bilinear, ``align_corners=False``), mapped to ``[-1, 1]``, grey
  images are repeated to RGB, and the jitted network returns the 2048-d average-pool features.

  Args:
      variables: ``{'params', 'batch_stats'}`` from :func:`load_inception`.
      images: ``[N, H, W, C]`` with C in {1, 3}: ``uint8`` in 0..255 or float in ``[0, 1]``. Any H, W.
      batch_size: Images per forward pass; the last batch is zero-padded so that one compilation
          serves all batches.

  Returns:
      float32 ``[N, 2048]`` features, for :func:`diffjax.eval.frechet_distance_from_features`.

  Raises:
      ValueError: If ``images`` has the wrong rank, channel count, dtype or (float) value range, or
          ``batch_size < 1``.

  Example::

      variables = load_inception("pt_inception-2015-12-05.safetensors")
      fid = frechet_distance_from_features(
          inception_features(variables, samples_uint8), inception_features(variables, real_uint8)
      )
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  x = _check_images(images)
  variables = jax.device_put(variables)
  n = x.shape[0]
  bs = min(batch_size, n)
  out = []
  for start in range(0, n, bs):
    chunk = x[start : start + bs]
    pad = bs - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    feats = jax.device_get(_pool_features(variables, _preprocess(chunk)))
    out.append(np.asarray(feats[: bs - pad], dtype=np.float32))
  return np.concatenate(out)
