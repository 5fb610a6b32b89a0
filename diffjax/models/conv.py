"""The convolution and token-dense layers of diffjax's models: Flax's ``nn.Conv`` and ``nn.Dense`` with
the products of :mod:`diffjax.onednn_conv` and :mod:`diffjax.onednn_dense`.

Parameters (``kernel`` HWIO / ``[C, O]``, ``bias``) and results are those of ``nn.Conv`` / ``nn.Dense``;
only the product is replaced, through Flax's ``conv_general_dilated`` / ``dot_general`` hooks, by one
that runs diffjax's native kernels on XLA:CPU where they pay (convolutions: Winograd or oneDNN forward,
oneDNN gradients, XLA's dot for the 1x1 forward; dense layers: XLA's dot forward, oneDNN gradients
over many rows) and XLA's own ops on other backends or for the cases they do not cover.
"""

from __future__ import annotations

import flax.linen as nn

from diffjax import onednn_dense
from diffjax.onednn_conv import conv_general_dilated

__all__ = ["conv", "dense"]


def conv(features: int, kernel_size, **kwargs) -> nn.Conv:
  """``nn.Conv(features, kernel_size, **kwargs)`` with diffjax's convolution call."""
  return nn.Conv(features, kernel_size, conv_general_dilated=conv_general_dilated, **kwargs)


def dense(features: int, **kwargs) -> nn.Dense:
  """``nn.Dense(features, **kwargs)`` with diffjax's product (for layers over ``[B, L, C]`` tokens)."""
  return nn.Dense(features, dot_general=onednn_dense.dot_general, **kwargs)
