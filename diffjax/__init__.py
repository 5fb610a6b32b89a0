"""diffjax: diffusion models in JAX/Flax.

Everything consumes one interface, ``model_fn(params, x_t, t, cond) -> prediction``:

* :mod:`diffjax.schedules`, :mod:`diffjax.diffusion`, :mod:`diffjax.losses` -- the math;
* :mod:`diffjax.samplers` -- DDPM ancestral and DDIM, whole loops under ``jit``;
* :mod:`diffjax.guidance` -- classifier-free guidance as a ``model_fn`` transformation;
* :mod:`diffjax.models` -- the Flax U-Net laid out like diffusers' ``UNet2DModel``;
* :mod:`diffjax.data`, :mod:`diffjax.training`, :mod:`diffjax.checkpoints`, :mod:`diffjax.parallel`;
* ``python -m diffjax train|sample`` -- the command line.
"""

__version__ = "0.1.0"

from diffjax.xla_cpu import install_cpu_flags as _install_cpu_flags

_install_cpu_flags()  # XLA:CPU convolutions on XNNPACK (see diffjax.xla_cpu); before any computation
