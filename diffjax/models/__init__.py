"""Neural network models for diffjax (Flax Linen, NHWC)."""

from diffjax.models.attention import AttentionBlock, dot_product_attention
from diffjax.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffjax.models.params import count_params
from diffjax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffjax.models.unet import UNet
from diffjax.models.unet_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D

__all__ = [
  "AttentionBlock",
  "DownBlock2D",
  "Downsample2D",
  "ResnetBlock2D",
  "TimestepEmbedding",
  "UNet",
  "UNetMidBlock2D",
  "UpBlock2D",
  "Upsample2D",
  "count_params",
  "dot_product_attention",
  "get_timestep_embedding",
]
