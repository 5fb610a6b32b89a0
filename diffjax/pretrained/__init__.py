"""Stable-Diffusion-format (diffusers) model directories: import without torch, export, and sampling.

See :mod:`diffjax.pretrained.loader` (reading a pipeline directory), :mod:`diffjax.pretrained.scheduler`
(scheduler configs), :mod:`diffjax.pretrained.pipeline` (text-to-image and img2img on imported models)
and :mod:`diffjax.pretrained.export` (writing diffjax models in the same format).
"""
