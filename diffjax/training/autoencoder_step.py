"""Losses and the jitted training step of the KL autoencoder.

The objective follows the first stage of latent diffusion (Rombach et al. 2022, App. G; the
``LPIPSWithDiscriminator`` of the CompVis code), written per pixel::

    loss = mean|x - x_rec|  (or squared)                   reconstruction, over B, H, W, C
         + perceptual_weight * mean_b d(x, x_rec)          optional feature distance
         + kl_weight * mean_b KL(q(z|x) || N(0, I)) / (H W C)
         + lambda_adv * disc_weight * (-mean D(x_rec))      optional, from step disc_start on

Dividing the summed KL by the pixel count keeps ``kl_weight`` on LDM's scale (they sum both terms per
image; 1e-6 for their KL-f8 models). The adversarial term is the hinge GAN of a PatchGAN discriminator
(Isola et al. 2017) with LDM's adaptive weight ``lambda_adv = |grad_W rec| / (|grad_W adv| + 1e-4)``
taken at the decoder's last layer ``W = decoder/conv_out/kernel`` (Esser et al. 2021, Eq. 7). The
discriminator is trained in the same step on the hinge loss with ``x_rec`` held fixed. LDM's learned
output log-variance is left out (it only rescales the reconstruction term).

Perceptual term: LPIPS (Zhang et al. 2018) needs pretrained VGG/AlexNet weights, which are not
available offline. :func:`make_judge_perceptual` instead uses the convolutional features of a judge
network trained here (:mod:`diffjax.eval.judge`, e.g. on MNIST), in LPIPS's unweighted form: per layer,
channel-normalised features, squared difference summed over channels, averaged over positions. It only
applies to images with the judge's channel count (grey for the MNIST judge).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffjax.models.autoencoder import AutoencoderKL
from diffjax.training.state import TrainState, ema_update

__all__ = [
  "PatchDiscriminator",
  "hinge_d_loss",
  "make_autoencoder_train_step",
  "make_judge_perceptual",
  "psnr",
  "reconstruction_loss",
]

PerceptualFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


class PatchDiscriminator(nn.Module):
  """PatchGAN discriminator (Isola et al. 2017; LDM's ``NLayerDiscriminator``): a map of real/fake logits.

  ``conv4x4/2 -> LeakyReLU(0.2)``, then ``num_layers - 1`` blocks ``conv4x4/2 -> GroupNorm -> LeakyReLU``
  doubling the width (at most 8x), then ``conv4x4/1 -> GroupNorm -> LeakyReLU -> conv4x4/1 -> 1``.
  GroupNorm replaces LDM's BatchNorm so the discriminator has no mutable batch statistics.

  Attributes:
      base_channels: Width of the first layer.
      num_layers: Stride-2 layers (each halves the resolution).
  """

  base_channels: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W, C]`` in ``[-1, 1]`` -> logits ``[B, H / 2**num_layers - 2, ..., 1]``."""
    pad = ((1, 1), (1, 1))
    h = nn.leaky_relu(nn.Conv(self.base_channels, (4, 4), strides=2, padding=pad, name="conv_0")(x), 0.2)
    ch = self.base_channels
    for i in range(1, self.num_layers + 1):
      ch = self.base_channels * min(2**i, 8)
      stride = 2 if i < self.num_layers else 1
      h = nn.Conv(ch, (4, 4), strides=stride, padding=pad, use_bias=False, name=f"conv_{i}")(h)
      h = nn.leaky_relu(nn.GroupNorm(num_groups=min(32, ch // 4), name=f"norm_{i}")(h), 0.2)
    return nn.Conv(1, (4, 4), padding=pad, name="conv_out")(h)


def hinge_d_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray) -> jnp.ndarray:
  """Discriminator hinge loss ``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))``; scalar."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def reconstruction_loss(x: jnp.ndarray, recon: jnp.ndarray, kind: str = "l1") -> jnp.ndarray:
  """Mean absolute (``"l1"``) or squared (``"l2"``) error over all of ``[B, H, W, C]``; scalar."""
  if kind == "l1":
    return jnp.mean(jnp.abs(x - recon))
  if kind == "l2":
    return jnp.mean(jnp.square(x - recon))
  raise ValueError(f"reconstruction loss {kind!r} is not one of ('l1', 'l2')")


def psnr(x: jnp.ndarray, recon: jnp.ndarray) -> jnp.ndarray:
  """PSNR in dB per image for images in ``[-1, 1]`` (peak-to-peak 2, i.e. 255 in 8-bit); ``[B]``.

  ``recon`` is clipped to ``[-1, 1]`` first, as an 8-bit image would be.
  """
  mse = jnp.mean(jnp.square(x - jnp.clip(recon, -1.0, 1.0)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def make_judge_perceptual(judge_params) -> PerceptualFn:
  """Unweighted-LPIPS distance on the conv features of a judge network (see the module docstring).

  Args:
      judge_params: Params of :class:`diffjax.eval.judge.JudgeCNN` (e.g. from ``load_judge``).

  Returns:
      ``d(x, y) -> [B]`` for ``[B, H, W, C]`` images in ``[-1, 1]``, any ``H, W``; differentiable.
  """
  frozen = jax.tree.map(jnp.asarray, judge_params)
  for name in ("conv1", "conv2"):
    if name not in frozen:
      raise ValueError(f"judge params have no {name!r} layer: {sorted(frozen)}")

  def conv_features(x: jnp.ndarray) -> list[jnp.ndarray]:
    # The judge's two 3x3 'SAME' conv + ReLU layers (JudgeCNN.conv1/conv2), applied directly so any H, W
    # works (the judge's dense layers are tied to its training resolution).
    out = []
    h = x
    for name in ("conv1", "conv2"):
      p = frozen[name]
      h = (
        jax.lax.conv_general_dilated(
          h, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        + p["bias"]
      )
      h = jax.nn.relu(h)
      out.append(h)
    return out

  def distance(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    total = jnp.zeros(x.shape[0], jnp.float32)
    for fx, fy in zip(conv_features(x), conv_features(y), strict=True):
      nx = fx / (jnp.linalg.norm(fx, axis=-1, keepdims=True) + 1e-10)
      ny = fy / (jnp.linalg.norm(fy, axis=-1, keepdims=True) + 1e-10)
      total = total + jnp.mean(jnp.sum(jnp.square(nx - ny), axis=-1), axis=(1, 2))
    return total

  return distance


def make_autoencoder_optimizer(
  vae_tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation | None = None
) -> optax.GradientTransformation:
  """One optimiser over ``{"vae": ..., "disc": ...}`` params: each part gets its own transformation."""
  transforms = {"vae": vae_tx} if disc_tx is None else {"vae": vae_tx, "disc": disc_tx}

  def labels(params):
    return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}

  return optax.multi_transform(transforms, labels)


def _last_layer_grad(h: jnp.ndarray, kernel: jnp.ndarray, d_out: jnp.ndarray) -> jnp.ndarray:
  """Gradient w.r.t. the kernel of a 3x3 'padding=1' conv with input ``h`` given the output cotangent."""

  def conv(k):
    return jax.lax.conv_general_dilated(
      h, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  return jax.vjp(conv, kernel)[1](d_out)[0]


def make_autoencoder_train_step(
  *,
  model: AutoencoderKL,
  tx: optax.GradientTransformation,
  discriminator: PatchDiscriminator | None = None,
  rec_loss: str = "l1",
  kl_weight: float = 1e-6,
  perceptual_fn: PerceptualFn | None = None,
  perceptual_weight: float = 0.0,
  disc_weight: float = 0.5,
  disc_start: int = 0,
  ema_decay: float = 0.999,
  sample_posterior: bool = True,
) -> Callable:
  """Builds ``train_step(state, batch, key) -> (state, metrics)`` for the autoencoder.

  Args:
      model: The autoencoder.
      tx: Optimiser over ``{"vae": ..., "disc": ...}`` (see :func:`make_autoencoder_optimizer`).
      discriminator: PatchGAN discriminator; ``None`` trains without the adversarial term.
      rec_loss: ``"l1"`` or ``"l2"``.
      kl_weight: Weight of the per-pixel KL (LDM scale, see the module docstring).
      perceptual_fn: ``d(x, x_rec) -> [B]`` feature distance, or ``None``.
      perceptual_weight: Its weight.
      disc_weight: Factor on the adaptive adversarial weight.
      disc_start: Step from which the adversarial and discriminator losses are switched on.
      ema_decay: EMA decay of ``state.ema_params``.
      sample_posterior: Decode a posterior sample (True, as in LDM) or the mean.

  The batch is ``{"image": [B, H, W, C] float32 in [-1, 1]}``; the state's params are ``{"vae": ...}``
  plus ``"disc"`` with a discriminator. The per-step key is ``fold_in(key, state.step)``. Metrics:
  ``loss, rec, kl`` (nats per image), ``psnr`` (train batch, dB), ``grad_norm``, ``skipped`` and, with a
  discriminator, ``g_loss, d_loss, adv_weight``.
  """
  if perceptual_weight and perceptual_fn is None:
    raise ValueError("perceptual_weight > 0 needs a perceptual_fn")
  if kl_weight < 0 or perceptual_weight < 0 or disc_weight < 0:
    raise ValueError("loss weights must be >= 0")
  use_gan = discriminator is not None

  def train_step(state: TrainState, batch: dict, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    x = batch["image"]
    npix = x.shape[1] * x.shape[2] * x.shape[3]
    active = (state.step >= disc_start).astype(jnp.float32)

    def nll_of(recon):
      nll = reconstruction_loss(x, recon, rec_loss)
      if perceptual_weight:
        nll = nll + perceptual_weight * jnp.mean(perceptual_fn(x, recon))
      return nll

    def loss_fn(params):
      vae = params["vae"]
      z_key = key if sample_posterior else None
      if use_gan:
        (recon, post), inter = model.apply({"params": vae}, x, z_key, mutable=["intermediates"])
        h = jax.lax.stop_gradient(inter["intermediates"]["decoder"]["conv_out_input"][0])
      else:
        recon, post = model.apply({"params": vae}, x, z_key)
      nll = nll_of(recon)
      kl = jnp.mean(post.kl())
      loss = nll + kl_weight * kl / npix
      aux = {"rec": reconstruction_loss(x, recon, rec_loss), "kl": kl, "psnr": jnp.mean(psnr(x, recon))}
      if use_gan:
        frozen_d = jax.lax.stop_gradient(params["disc"])

        def g_of(r):
          return -jnp.mean(discriminator.apply({"params": frozen_d}, r))

        g_loss = g_of(recon)
        r = jax.lax.stop_gradient(recon)
        w = jax.lax.stop_gradient(vae["decoder"]["conv_out"]["kernel"])
        grad_nll = _last_layer_grad(h, w, jax.grad(nll_of)(r))
        grad_g = _last_layer_grad(h, w, jax.grad(g_of)(r))
        adv = jnp.clip(optax.tree.norm(grad_nll) / (optax.tree.norm(grad_g) + 1e-4), 0.0, 1e4)
        adv = jax.lax.stop_gradient(adv) * disc_weight * active
        loss = loss + adv * g_loss
        d_loss = hinge_d_loss(
          discriminator.apply({"params": params["disc"]}, x),
          discriminator.apply({"params": params["disc"]}, r),
        )
        loss = loss + active * d_loss
        aux.update(g_loss=g_loss, d_loss=d_loss, adv_weight=adv)
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ema = ema_update(state.ema_params, new_params, decay=ema_decay, step=state.step)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep(new, old):
      return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    new_state = TrainState(
      step=state.step + 1,
      params=keep(new_params, state.params),
      ema_params=keep(new_ema, state.ema_params),
      opt_state=keep(new_opt_state, state.opt_state),
      skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    return new_state, {"loss": loss, "grad_norm": grad_norm, "skipped": new_state.skipped, **aux}

  return train_step
