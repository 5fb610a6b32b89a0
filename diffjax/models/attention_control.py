"""Attention control and recording for the cross-attention U-Net, as pure functions.

Prompt-to-prompt editing (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention
Control") and attention-based losses such as FastComposer's localization loss (Xiao et al. 2023,
"FastComposer: Tuning-Free Multi-Subject Image Generation with Localized Attention") need to read and
rewrite the attention probabilities inside the denoiser. Here this is done without hooks or module
state:

* **Control.** :class:`~diffjax.models.unet_condition.UNetCondition` (and every module below it down to
  :class:`~diffjax.models.transformer.Attention`) takes an optional call argument
  ``attention_control(probs, info) -> probs``. Each attention layer computes its probabilities
  ``probs = softmax(q k^T / sqrt(d))`` (``[B, heads, L, S]``, float32), hands them to the control with an
  :class:`AttentionInfo` (layer path, self or cross, spatial shape of the queries) and attends with what
  comes back. The control is an ordinary function: anything it depends on (the sampler's step, the
  maps to inject) is closed over or computed from ``probs`` itself, so it traces under ``jit`` and is
  rebuilt per call. Without a control (``None``) the layers compute exactly what they computed before.
* **Recording.** Every cross-attention layer ``sow``s its probabilities (before any control) into the
  flax collection :data:`ATTENTION_MAPS`. Flax keeps sown values only when the collection is mutable, so
  a plain ``apply`` records nothing and costs nothing; ``apply(..., mutable=[ATTENTION_MAPS])`` returns
  ``(output, {ATTENTION_MAPS: maps})``. :func:`cross_attention_maps` flattens that collection and
  :func:`token_maps` averages it over heads and layers into one ``[B, H, W, S]`` map per context token.

Example (read the maps, e.g. for a localization loss, and double one token's attention)::

    out, state = unet.apply({"params": p}, x, t, ctx, mask, mutable=[ATTENTION_MAPS])
    maps = token_maps(state[ATTENTION_MAPS], size=(h, w))            # [B, h, w, S]
    double = lambda probs, info: probs.at[..., 3].multiply(2.0) if info.is_cross else probs
    out2 = unet.apply({"params": p}, x, t, ctx, mask, attention_control=double)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
  "ATTENTION_MAPS",
  "AttentionControl",
  "AttentionInfo",
  "chain_controls",
  "cross_attention_maps",
  "token_maps",
]

ATTENTION_MAPS = "attention_maps"
"""Flax collection into which cross-attention layers sow their probabilities (variable ``"probs"``)."""


class AttentionInfo(NamedTuple):
  """What an attention layer tells its control besides the probabilities.

  Attributes:
      layer: The layer's module path joined by ``/``, e.g.
          ``"down_blocks_0/attentions_0/transformer_blocks_0/attn2"`` (static; unique per layer).
      is_cross: ``True`` for cross-attention to the context, ``False`` for self-attention.
      spatial_shape: ``(H, W)`` of the query tokens (``L = H * W``) inside a
          :class:`~diffjax.models.transformer.Transformer2DModel`, else ``None``.
  """

  layer: str
  is_cross: bool
  spatial_shape: tuple[int, int] | None = None


AttentionControl = Callable[[jnp.ndarray, AttentionInfo], jnp.ndarray]
"""``control(probs [B, heads, L, S] float32, info) -> probs`` of the same shape."""


def chain_controls(*controls: AttentionControl | None) -> AttentionControl | None:
  """Applies several controls one after the other (``None`` entries are skipped).

  Returns:
      The composed control, or ``None`` when every entry is ``None``.
  """
  active = [c for c in controls if c is not None]
  if not active:
    return None

  def chained(probs: jnp.ndarray, info: AttentionInfo) -> jnp.ndarray:
    for control in active:
      probs = control(probs, info)
    return probs

  return chained


def apply_control(control: AttentionControl, probs: jnp.ndarray, info: AttentionInfo) -> jnp.ndarray:
  """Calls ``control`` and checks that it kept the shape (used by the attention layers).

  Raises:
      ValueError: If the control returns another shape.
  """
  out = control(probs, info)
  if getattr(out, "shape", None) != probs.shape:
    raise ValueError(
      f"attention_control must return probabilities shaped like its input {probs.shape} at layer "
      f"{info.layer!r}, got {getattr(out, 'shape', type(out).__name__)}"
    )
  return out.astype(probs.dtype)


def cross_attention_maps(collection: Mapping[str, Any]) -> dict[str, jnp.ndarray]:
  """Flattens a sown :data:`ATTENTION_MAPS` collection into ``{layer path: probs}``.

  Args:
      collection: ``state[ATTENTION_MAPS]`` from ``apply(..., mutable=[ATTENTION_MAPS])`` (the nested
          dict of module names ending in ``{"probs": (array,)}``).

  Returns:
      Layer path (as in :attr:`AttentionInfo.layer`) to ``[B, heads, H, W, S]`` probabilities (``[B,
      heads, L, S]`` for a layer outside a spatial transformer), in the order the layers ran.

  Raises:
      ValueError: If the collection holds no maps.
  """
  out: dict[str, jnp.ndarray] = {}

  def walk(node: Any, path: tuple[str, ...]) -> None:
    if isinstance(node, Mapping):
      for name, child in node.items():
        if name == "probs":
          for i, value in enumerate(child):
            out["/".join(path) + (f"#{i}" if i else "")] = value
        else:
          walk(child, (*path, name))

  walk(collection, ())
  if not out:
    raise ValueError(
      f"no cross-attention maps in the collection: apply the model with mutable=[{ATTENTION_MAPS!r}]"
    )
  return out


def token_maps(
  collection: Mapping[str, Any],
  *,
  size: Sequence[int],
  layers: Callable[[str], bool] | None = None,
  method: str = "linear",
  lowest_resolution: bool = False,
) -> jnp.ndarray:
  """Per-token cross-attention maps averaged over heads and layers at one resolution.

  Each layer's ``[B, heads, h, w, S]`` probabilities are averaged over heads, resized to ``size``
  (``jax.image.resize``) and averaged over the layers, as prompt-to-prompt's local blend and FastComposer's
  localization loss aggregate them.

  Args:
      collection: A sown :data:`ATTENTION_MAPS` collection.
      size: ``(H, W)`` of the output maps.
      layers: Predicate on the layer path selecting the layers to average (``None``: all).
      method: Resize method of ``jax.image.resize`` (``"linear"``, ``"nearest"``, ...).
      lowest_resolution: Average only the selected layers whose maps have the fewest pixels (the
          coarsest level of the U-Net, where cross-attention is most localised; prompt-to-prompt's
          local blend uses Stable Diffusion's 16x16 maps for the same reason).

  Returns:
      float32 ``[B, H, W, S]``.

  Raises:
      ValueError: If no layer is selected or a layer's maps are not spatial.
  """
  maps = cross_attention_maps(collection)
  chosen = [(name, m) for name, m in maps.items() if layers is None or layers(name)]
  if not chosen:
    raise ValueError(f"the layer predicate selects none of the cross-attention layers {list(maps)}")
  for name, m in chosen:
    if m.ndim != 5:
      raise ValueError(f"layer {name!r} has non-spatial maps of shape {m.shape}; need [B, heads, H, W, S]")
  if lowest_resolution:
    fewest = min(m.shape[2] * m.shape[3] for _, m in chosen)
    chosen = [(name, m) for name, m in chosen if m.shape[2] * m.shape[3] == fewest]
  h, w = (int(v) for v in size)
  total = None
  for name, m in chosen:
    mean = jnp.mean(m.astype(jnp.float32), axis=1)
    if mean.shape[1:3] != (h, w):
      mean = jax.image.resize(mean, (mean.shape[0], h, w, mean.shape[3]), method=method)
    total = mean if total is None else total + mean
  return total / len(chosen)
