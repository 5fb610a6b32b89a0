"""Noise-conditional classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021).

"Diffusion Models Beat GANs on Image Synthesis", Sec. 4 and Appendix: the classifier is "the
downsampling trunk of the UNet model with an attention pool at the 8x8 layer"; it is trained on noised
images at random timesteps, and its gradient ``grad_x log p(y | x_t, t)`` steers sampling
(:mod:`diffjax.guidance.classifier`). Here: the U-Net's encoder half -- ``conv_in``, the sinusoidal time
embedding and its MLP, the down blocks and the middle block, with the names and shapes of
:class:`~diffjax.models.UNet` -- and a head GroupNorm -> SiLU -> global average pool -> Dense
(their ``pool="adaptive"`` variant).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffjax.models.resnet import conv3x3, group_norm
from diffjax.models.unet import UNet
from diffjax.models.unet_blocks import DownBlock2D, UNetMidBlock2D

__all__ = ["NoisyClassifier"]


class NoisyClassifier(nn.Module):
  """Classifier ``logits(x_t, t)`` over ``num_classes`` classes on noisy images.

  Attributes:
      num_classes: Output classes.
      in_channels, block_out_channels, layers_per_block, attention_levels, attention_head_dim,
      norm_num_groups, norm_eps, dropout, flip_sin_to_cos, freq_shift, dtype, attention_impl: As in
          :class:`~diffjax.models.UNet` (the encoder half of one).

  Example:
      >>> import jax, jax.numpy as jnp
      >>> clf = NoisyClassifier(num_classes=10, block_out_channels=(16, 32), attention_head_dim=8,
      ...                       norm_num_groups=4)
      >>> x = jnp.zeros((2, 8, 8, 1))
      >>> p = clf.init(jax.random.key(0), x, jnp.zeros(2, jnp.int32))["params"]
      >>> clf.apply({"params": p}, x, jnp.array([0, 999])).shape
      (2, 10)
  """

  num_classes: int = 10
  in_channels: int = 1
  block_out_channels: Sequence[int] = (32, 64)
  layers_per_block: int = 2
  attention_levels: Sequence[bool] = (False, True)
  attention_head_dim: int = 8
  norm_num_groups: int = 8
  norm_eps: float = 1e-5
  dropout: float = 0.0
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"

  def _unet(self) -> UNet:
    # An unbound U-Net of the same encoder, used only for its configuration and input checks.
    return UNet(
      in_channels=self.in_channels,
      out_channels=self.in_channels,
      block_out_channels=self.block_out_channels,
      layers_per_block=self.layers_per_block,
      attention_levels=self.attention_levels,
      attention_head_dim=self.attention_head_dim,
      norm_num_groups=self.norm_num_groups,
      norm_eps=self.norm_eps,
      parent=None,
    )

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray | int, *, train: bool = False) -> jnp.ndarray:
    """Class logits of noisy images.

    Args:
        x: ``[B, H, W, in_channels]`` noisy images ``x_t``.
        t: ``[B]`` integer timesteps, or a scalar.
        train: Enables dropout.

    Returns:
        ``[B, num_classes]`` float32 logits.

    Raises:
        ValueError: On an invalid configuration or malformed ``x``/``t``.
    """
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
    unet = self._unet()
    unet._check_config()
    x, t, _ = unet._check_inputs(x, t, None)
    chans = tuple(self.block_out_channels)
    common = {
      "attention_head_dim": self.attention_head_dim,
      "norm_num_groups": self.norm_num_groups,
      "norm_eps": self.norm_eps,
      "dropout": self.dropout,
      "dtype": self.dtype,
      "attention_impl": self.attention_impl,
    }
    t_emb = get_timestep_embedding(
      t, chans[0], flip_sin_to_cos=self.flip_sin_to_cos, downscale_freq_shift=self.freq_shift
    ).astype(self.dtype)
    emb = TimestepEmbedding(4 * chans[0], dtype=self.dtype, name="time_embedding")(t_emb)
    h = conv3x3(chans[0], self.dtype, "conv_in")(x.astype(self.dtype))
    for i, ch in enumerate(chans):
      h, _ = DownBlock2D(
        ch,
        num_layers=self.layers_per_block,
        add_attention=bool(self.attention_levels[i]),
        add_downsample=i < len(chans) - 1,
        name=f"down_blocks_{i}",
        **common,
      )(h, emb, train=train)
    h = UNetMidBlock2D(name="mid_block", **common)(h, emb, train=train)
    h = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "out_norm")(h))
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="out")(h).astype(jnp.float32)
