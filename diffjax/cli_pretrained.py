"""``python -m diffjax sample --pretrained DIR``: text-to-image, img2img and ControlNet on a diffusers pipeline.

  python -m diffjax sample --pretrained DIR --prompt "an astronaut riding a horse" [--prompt ...] \
      [--negative-prompt TEXT] [--steps 25] [--guidance 7.5] [--eta 0] [--num N] [--seed 0] \
      [--height H --width W] [--variant fp16] [--clip-skip 0] --out S.npz
  ... --image IN.png --strength 0.6                 # img2img (SDEdit in latent space)
  ... --controlnet CN_DIR --control-image C.png [--controlnet-scale 1.0]
  ... --edit-prompt TEXT [--edit-prompt ...] [--cross-replace 0.8] [--self-replace 0.4]   # prompt-to-prompt

DIR is a Stable-Diffusion pipeline directory (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; safetensors weights), loaded by :mod:`diffjax.pretrained` without torch.
Sampling is DDIM over the scheduler config's timesteps (:mod:`diffjax.pretrained.scheduler`). Prompts are
cycled to ``--num`` images. Writes ``images`` (uint8 ``[N, H, W, 3]``), ``latents`` and ``prompts`` to the
``.npz`` and a PNG grid beside it (img2img: the input on the first row). With ``--edit-prompt`` (one per
``--prompt``) it runs prompt-to-prompt (:mod:`diffjax.pretrained.prompt_to_prompt`): ``images`` holds the
sources, then the edits (same noise per pair), and the grid shows them in two rows.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

__all__ = ["add_pretrained_arguments", "cmd_sample_pretrained", "reject_pretrained_only"]

DEFAULT_GUIDANCE = 7.5


def add_pretrained_arguments(s: argparse.ArgumentParser) -> None:
  """Adds the ``--pretrained`` options to the ``sample`` subparser."""
  g = s.add_argument_group("pretrained pipelines (--pretrained DIR instead of --workdir)")
  g.add_argument("--pretrained", default=None, help="Stable-Diffusion pipeline directory (diffusers format)")
  g.add_argument("--negative-prompt", default="", help="prompt guided away from (default: the empty prompt)")
  g.add_argument("--height", type=int, default=None, help="image height (default: the U-Net's sample size)")
  g.add_argument("--width", type=int, default=None, help="image width (default: the U-Net's sample size)")
  g.add_argument("--image", default=None, help="img2img: input .png (resized to --height x --width)")
  g.add_argument("--strength", type=float, default=0.6, help="img2img: fraction of the steps re-run, (0, 1]")
  g.add_argument("--controlnet", default=None, help="ControlNetModel directory (diffusers format)")
  g.add_argument("--control-image", default=None, help="ControlNet conditioning image (.png)")
  g.add_argument("--controlnet-scale", type=float, default=1.0, help="ControlNet conditioning scale")
  g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
  g.add_argument("--clip-skip", type=int, default=0, help="use the CLIP layer this many before the last")
  g.add_argument(
    "--edit-prompt",
    action="append",
    default=None,
    help="prompt-to-prompt: the edit of the --prompt at the same place (repeatable, one per --prompt)",
  )
  for flag, default, kind in (("--cross-replace", 0.8, "cross"), ("--self-replace", 0.4, "self")):
    g.add_argument(
      flag,
      type=float,
      default=default,
      help=f"prompt-to-prompt: fraction of the steps with the source's {kind}-attention",
    )


def reject_pretrained_only(args: argparse.Namespace) -> None:
  """Raises if a ``--pretrained``-only option was given to ``sample --workdir``."""
  given = [
    f"--{name.replace('_', '-')}"
    for name in (
      "negative_prompt", "height", "width", "image", "controlnet", "control_image", "variant", "edit_prompt"
    )
    if getattr(args, name)
  ]
  if args.clip_skip:
    given.append("--clip-skip")
  if given:
    raise ValueError(f"{', '.join(given)} apply to --pretrained pipelines only")


def _read_rgb(path: str, *, name: str, size: tuple[int, int]) -> np.ndarray:
  """A PNG as float ``[H, W, 3]`` in ``[0, 1]``, resized (bicubic, as diffusers' image processor) to ``size``."""
  from PIL import Image, UnidentifiedImageError

  if not os.path.isfile(path):
    raise FileNotFoundError(f"{name} file '{path}' does not exist")
  try:
    img = Image.open(path).convert("RGB")
  except (UnidentifiedImageError, OSError) as err:
    raise ValueError(f"{name} '{path}' is not a readable image: {err}") from err
  h, w = size
  if img.size != (w, h):
    img = img.resize((w, h), Image.Resampling.BICUBIC)
  return np.asarray(img, np.float32) / 255.0


def _check_args(args: argparse.Namespace) -> None:
  if args.workdir:
    raise ValueError("give either --workdir (a diffjax run) or --pretrained (a diffusers pipeline), not both")
  if args.labels:
    raise ValueError("--labels apply to class-conditional workdirs; --pretrained takes --prompt")
  if not args.prompt:
    raise ValueError("--pretrained needs --prompt TEXT (repeatable)")
  if args.sampler != "ddim":
    raise ValueError(
      f"--pretrained samples with DDIM over the scheduler config; --sampler {args.sampler} is not supported"
    )
  if args.spacing is not None:
    raise ValueError("--spacing does not apply to --pretrained: the scheduler config sets the timesteps")
  if args.num is not None and args.num < 1:
    raise ValueError(f"--num must be >= 1, got {args.num}")
  if args.image is not None and not 0.0 < args.strength <= 1.0:
    raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
  if (args.control_image is None) != (args.controlnet is None):
    raise ValueError("--controlnet and --control-image go together")
  for flag, path in (("--image", args.image), ("--control-image", args.control_image)):
    if path is not None and not os.path.isfile(path):  # before loading the pipeline
      raise FileNotFoundError(f"{flag} file '{path}' does not exist")
  if args.edit_prompt is not None:
    if len(args.edit_prompt) != len(args.prompt):
      raise ValueError(
        f"--edit-prompt must be given once per --prompt ({len(args.prompt)}), got {len(args.edit_prompt)}"
      )
    if args.image is not None or args.controlnet is not None or args.num is not None:
      raise ValueError("--edit-prompt (prompt-to-prompt) does not combine with --image, --controlnet, --num")
    if args.clip_skip:
      raise ValueError("--edit-prompt does not support --clip-skip")
    for flag, value in (("--cross-replace", args.cross_replace), ("--self-replace", args.self_replace)):
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"{flag} must be in [0, 1], got {value}")
  if args.clip_skip < 0:
    raise ValueError(f"--clip-skip must be >= 0, got {args.clip_skip}")
  out = args.out
  if not out or not out.endswith(".npz"):
    raise ValueError(f"--pretrained needs --out S.npz, got {out!r}")


def cmd_sample_pretrained(args: argparse.Namespace) -> int:
  """Runs ``sample --pretrained``; returns the exit status."""
  import jax

  from diffjax.images import save_image_grid
  from diffjax.pretrained.loader import load_pipeline
  from diffjax.pretrained.pipeline import (
    encode_prompts,
    make_image_to_image,
    make_text_to_image,
    pipeline_params,
    to_uint8_images,
  )

  _check_args(args)
  sd = load_pipeline(args.pretrained, variant=args.variant, controlnet=args.controlnet)
  if args.edit_prompt is not None:
    return _prompt_to_prompt(args, sd)
  if sd.controlnet is not None and args.control_image is None:
    raise ValueError(f"'{args.pretrained}' holds a ControlNet pipeline: give --control-image IMG.png")
  num = args.num or len(args.prompt)
  prompts = [str(p) for p in np.resize(np.asarray(args.prompt, dtype=object), num)]
  h0, w0 = sd.default_size
  size = (args.height or h0, args.width or w0)
  params = pipeline_params(sd)
  context = encode_prompts(sd, params, prompts, clip_skip=args.clip_skip)
  null = encode_prompts(sd, params, [args.negative_prompt] * num, clip_skip=args.clip_skip)
  control = None
  if args.control_image is not None:
    image = _read_rgb(args.control_image, name="--control-image", size=size)
    control = (np.repeat(image[None], num, axis=0), args.controlnet_scale)
  key = jax.random.key(args.seed)
  common = {"num_steps": args.steps, "guidance": args.guidance, "eta": args.eta, "control": control}
  guides = None
  if args.image is not None:
    guides = np.repeat(_read_rgb(args.image, name="--image", size=size)[None], num, axis=0)
    images, latents = make_image_to_image(sd)(
      params, key, guides, context, null, strength=args.strength, **common
    )
  else:
    images, latents = make_text_to_image(sd)(
      params, key, context, null, height=size[0], width=size[1], **common
    )
  images = to_uint8_images(jax.device_get(images))
  out = args.out
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, images=images, latents=np.asarray(jax.device_get(latents)), prompts=np.asarray(prompts))
  png = out[:-4] + ".png"
  grid = images if guides is None else np.concatenate([to_uint8_images(guides), images])
  save_image_grid(grid, png, nrow=num if guides is not None else None)
  what = f"img2img (strength {args.strength})" if guides is not None else "text-to-image"
  print(
    f"wrote {num} {what} samples ({images.shape[1]}x{images.shape[2]}, DDIM {args.steps} steps) to {out} and {png}"
  )
  return 0


def _prompt_to_prompt(args: argparse.Namespace, sd) -> int:
  """``sample --pretrained DIR --prompt SRC --edit-prompt DST``: sources and edits from the same noise."""
  import jax

  from diffjax.images import save_image_grid
  from diffjax.pretrained.pipeline import pipeline_params, to_uint8_images
  from diffjax.pretrained.prompt_to_prompt import make_prompt_to_prompt

  sources, edits = [str(p) for p in args.prompt], [str(p) for p in args.edit_prompt]
  images, latents = make_prompt_to_prompt(sd)(
    pipeline_params(sd),
    jax.random.key(args.seed),
    sources,
    edits,
    num_steps=args.steps,
    guidance=args.guidance,
    eta=args.eta,
    cross_replace=args.cross_replace,
    self_replace=args.self_replace,
    negative_prompt=args.negative_prompt,
    height=args.height,
    width=args.width,
  )
  images = to_uint8_images(jax.device_get(images))
  out = args.out
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(
    out, images=images, latents=np.asarray(jax.device_get(latents)), prompts=np.asarray(sources + edits)
  )
  png = out[:-4] + ".png"
  save_image_grid(images, png, nrow=len(sources))
  print(
    f"wrote {len(sources)} prompt-to-prompt pairs (cross-replace {args.cross_replace}, self-replace "
    f"{args.self_replace}, DDIM {args.steps} steps) to {out} and {png}"
  )
  return 0
