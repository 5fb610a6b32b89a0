"""The convolution layer of diffjax's models: Flax's ``nn.Conv`` computed by :mod:`diffjax.onednn_conv`.

Parameters (``kernel`` HWIO, ``bias``) and results are those of ``nn.Conv``; only the convolution call is
replaced, through Flax's ``conv_general_dilated`` hook, by one that runs oneDNN's kernels on XLA:CPU and
XLA's convolution on other backends or for the cases oneDNN does not cover.
"""

from __future__ import annotations

import flax.linen as nn

from diffjax.onednn_conv import conv_general_dilated

__all__ = ["conv"]


def conv(features: int, kernel_size, **kwargs) -> nn.Conv:
  """``nn.Conv(features, kernel_size, **kwargs)`` with diffjax's convolution call."""
  return nn.Conv(features, kernel_size, conv_general_dilated=conv_general_dilated, **kwargs)
