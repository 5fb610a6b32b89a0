"""The convolution and token-dense layers of diffjax's models: Flax's ``nn.Conv`` and ``nn.Dense`` with
the products of :mod:`diffjax.onednn_conv` and :mod:`diffjax.onednn_dense`.

Parameters (``kernel`` HWIO / ``[C, O]``, ``bias``) and results are those of ``nn.Conv`` / ``nn.Dense``;
only the product is replaced, through Flax's ``conv_general_dilated`` / ``dot_general`` hooks, by one
that runs diffjax's native kernels on XLA:CPU where they pay (convolutions: Winograd or oneDNN forward,
oneDNN gradients, the native dense product for the 1x1 forward; dense layers: :class:`Dense`, whose
forward is the native product with the bias fused, oneDNN gradients over many rows) and XLA's own ops
on other backends or for the cases they do not cover.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffjax import onednn_dense
from diffjax.onednn_conv import conv_general_dilated

__all__ = ["Dense", "conv", "dense"]


def conv(features: int, kernel_size, **kwargs) -> nn.Conv:
  """``nn.Conv(features, kernel_size, **kwargs)`` with diffjax's convolution call."""
  return nn.Conv(features, kernel_size, conv_general_dilated=conv_general_dilated, **kwargs)


class Dense(nn.Dense):
  """``nn.Dense`` (same parameters, initialisers and results) whose float32 forward over ``[..., L, C]``
  tokens is :func:`diffjax.onednn_dense.dense_bias` (the bias inside the product) where that covers it;
  otherwise ``nn.Dense``'s own computation with its ``dot_general``."""

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    fused_bias = bias if bias is not None else jnp.zeros((self.features,), jnp.result_type(kernel))
    if (
      self.precision is None
      and self.dot_general_cls is None
      and self.dot_general is onednn_dense.dot_general
      and onednn_dense.dense_bias_covers(inputs, kernel, fused_bias)
    ):
      return onednn_dense.dense_bias(inputs, kernel, fused_bias)
    dot_general = self.dot_general_cls() if self.dot_general_cls is not None else self.dot_general
    y = dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def dense(features: int, **kwargs) -> Dense:
  """:class:`Dense` ``(features, **kwargs)`` with diffjax's products (for layers over ``[B, L, C]`` tokens)."""
  return Dense(features, dot_general=onednn_dense.dot_general, **kwargs)
