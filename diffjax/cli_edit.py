"""The ``edit`` command of ``python -m diffjax`` (flags read here and in :mod:`diffjax.cli` only).

  python -m diffjax edit --workdir W --image IN.png|IN.npz --strength 0.6 [--label 3] [--mask M.png] \
      [--sampler ddim|ddpm] [--steps 50] [--guidance 1] [--eta 0] [--num 8] [--seed 0] --out S.npz
  python -m diffjax edit --workdir W --prompt "a 3 to the left of a 5" --edit "a 3 to the left of a 8" \
      [--cross-replace 0.8] [--self-replace 0.4] [--blend-words 8] [--reweight WORD=SCALE] [--num 4] \
      --out S.npz

SDEdit (Meng et al. 2022) of one image (PNG, converted to the model's channels; its size must be the
model's) or of a batch (``.npz`` with uint8 ``images`` and optional ``labels``); a PNG image is repeated
``--num`` times, each copy with its own noise. A mask (PNG, same size, white = free to change) keeps the
rest of the image exactly. Writes ``images`` (uint8), ``labels`` and ``guides`` to ``--out`` and a PNG grid
(guides on the first row(s), edits below) beside it.

With ``--prompt`` and ``--edit`` (a text-to-image workdir) it is prompt-to-prompt (Hertz et al. 2022,
:mod:`diffjax.editing.prompt_to_prompt`): ``--num`` source images of ``--prompt`` (seed ``--seed``) and their
edits, sampled together; a word swap when both prompts have as many words, else a refinement
(``--alignment``). Writes ``sources`` and ``images`` (uint8, the edits) and the prompts to ``--out`` and a
grid (sources above edits) beside it.
"""

from __future__ import annotations

import argparse
import os
import zipfile

import numpy as np

__all__ = ["add_edit_parser", "cmd_edit"]


def add_edit_parser(sub) -> None:
  """Adds the ``edit`` subcommand to an argparse subparsers object."""
  e = sub.add_parser("edit", help="SDEdit: noise an image to a strength and denoise it with a trained model")
  e.add_argument("--workdir", required=True)
  e.add_argument("--image", default=None, help="SDEdit guide: a .png or a .npz with uint8 'images'")
  e.add_argument("--prompt", default=None, help="prompt-to-prompt: the source prompt (text-to-image run)")
  e.add_argument("--edit", default=None, help="prompt-to-prompt: the edited prompt")
  e.add_argument("--cross-replace", type=float, default=0.8, help="fraction of steps replacing cross-attn")
  e.add_argument("--self-replace", type=float, default=0.4, help="fraction of steps injecting self-attn")
  e.add_argument("--alignment", default="auto", choices=["auto", "replace", "refine"])
  e.add_argument("--blend-words", default=None, help="comma-separated words whose attention masks the edit")
  e.add_argument("--blend-threshold", type=float, default=0.3)
  e.add_argument("--blend-start", type=float, default=0.2, help="fraction of steps before the blend starts")
  e.add_argument(
    "--blend-maps", default="lowest", choices=["lowest", "all"], help="cross-attention layers of the blend mask"
  )
  e.add_argument("--reweight", action="append", default=[], help="WORD=SCALE (repeatable)")
  e.add_argument("--strength", type=float, default=0.6, help="fraction of the schedule re-run, in (0, 1]")
  e.add_argument("--label", type=int, default=None, help="class to edit towards (default: none / the npz's)")
  e.add_argument("--mask", default=None, help=".png, white where the image may change")
  e.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
  e.add_argument("--steps", type=int, default=50, help="DDIM steps of a full (strength 1) run")
  e.add_argument(
    "--guidance", type=float, default=None, help="guidance (default 1 for SDEdit, the run's for prompts)"
  )
  e.add_argument("--eta", type=float, default=0.0)
  e.add_argument("--num", type=int, default=1, help="copies of a single .png guide / source-edit pairs")
  e.add_argument("--seed", type=int, default=0)
  e.add_argument("--out", required=True, help="output .npz (a .png grid is written beside it)")


def _read_png(path: str, *, name: str, shape: tuple[int, int, int]) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError

  if not os.path.isfile(path):
    raise FileNotFoundError(f"{name} file '{path}' does not exist")
  try:
    img = Image.open(path)
    img = img.convert("L" if shape[2] == 1 else "RGB")
  except (UnidentifiedImageError, OSError) as err:
    raise ValueError(f"{name} '{path}' is not a readable image: {err}") from err
  arr = np.asarray(img, np.uint8)
  arr = arr[..., None] if arr.ndim == 2 else arr
  if arr.shape != shape:
    raise ValueError(
      f"{name} '{path}' is {arr.shape[1]}x{arr.shape[0]} but the model makes {shape[1]}x{shape[0]}"
    )
  return arr


def _read_guides(args, shape) -> tuple[np.ndarray, np.ndarray | None]:
  if args.image.endswith(".npz"):
    if not os.path.isfile(args.image):
      raise FileNotFoundError(f"--image file '{args.image}' does not exist")
    try:
      with np.load(args.image) as data:
        if "images" not in data.files:
          raise ValueError(f"--image '{args.image}' has no 'images' array (has {data.files})")
        images = data["images"]
        labels = data["labels"] if "labels" in data.files else None
    except (OSError, zipfile.BadZipFile) as err:
      raise ValueError(f"--image '{args.image}' is not a readable .npz file: {err}") from err
    return images, labels
  if args.num < 1:
    raise ValueError(f"--num must be >= 1, got {args.num}")
  image = _read_png(args.image, name="--image", shape=shape)
  return np.repeat(image[None], args.num, axis=0), None


def cmd_edit(args: argparse.Namespace) -> int:
  """Runs SDEdit (``--image``) or prompt-to-prompt (``--prompt`` and ``--edit``)."""
  if not args.out.endswith(".npz"):
    raise ValueError(f"--out must end with .npz, got {args.out!r}")
  if (args.prompt is None) != (args.edit is None):
    raise ValueError("prompt-to-prompt needs both --prompt (the source) and --edit (the edited prompt)")
  if (args.image is None) == (args.prompt is None):
    raise ValueError("give either --image (SDEdit) or --prompt and --edit (prompt-to-prompt)")
  if args.prompt is not None:
    return _cmd_prompt_to_prompt(args)
  return _cmd_sdedit(args)


def _parse_reweight(items: list[str]) -> dict[str, float]:
  out = {}
  for item in items:
    word, sep, scale = item.rpartition("=")
    try:
      out[word] = float(scale)
    except ValueError:
      word = ""
    if not sep or not word:
      raise ValueError(f"--reweight must be WORD=SCALE, got {item!r}")
  return out


def _cmd_prompt_to_prompt(args: argparse.Namespace) -> int:
  import jax

  from diffjax.data import to_uint8
  from diffjax.editing.p2p_pipeline import build_edit_spec, make_prompt_to_prompt
  from diffjax.images import save_image_grid
  from diffjax.models.text_encoder import minilm_dir
  from diffjax.models.text_tokenizer import PromptTokenizer
  from diffjax.training.text_builders import is_text_config, load_text_run
  from diffjax.training.workdir import read_config

  if args.num < 1:
    raise ValueError(f"--num must be >= 1, got {args.num}")
  if args.label is not None or args.mask is not None or args.sampler != "ddim":
    raise ValueError("--label, --mask and --sampler belong to SDEdit (--image); prompt-to-prompt uses DDIM")
  for name in ("cross_replace", "self_replace", "blend_threshold", "blend_start", "eta"):
    if not 0.0 <= getattr(args, name) <= 1.0:
      raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
  reweight = _parse_reweight(args.reweight)
  blend = [w.strip() for w in args.blend_words.split(",") if w.strip()] if args.blend_words else None
  if args.blend_words is not None and not blend:
    raise ValueError(f"--blend-words must name at least one word, got {args.blend_words!r}")
  config = read_config(args.workdir)
  if not is_text_config(config):
    raise ValueError(f"--prompt needs a text-to-image workdir; {args.workdir!r} is not one (use --image)")
  guidance = float(config.sample.get("guidance", 4.0)) if args.guidance is None else args.guidance
  # Both encoders use MiniLM's WordPiece vocabulary: bad prompts or words fail before the model loads.
  tokenizer = PromptTokenizer.from_file(minilm_dir() / "tokenizer.json")
  spec_args = {"kind": args.alignment, "blend_words": blend, "reweight": reweight}
  build_edit_spec(tokenizer, [args.prompt], [args.edit], max_length=config.text.max_length, **spec_args)
  run = load_text_run(args.workdir)
  edit = make_prompt_to_prompt(run)
  sources, edited = edit(
    run.params,
    jax.random.key(args.seed),
    [args.prompt] * args.num,
    [args.edit] * args.num,
    num_steps=args.steps,
    guidance=guidance,
    eta=args.eta,
    cross_replace=args.cross_replace,
    self_replace=args.self_replace,
    kind=args.alignment,
    blend_words=blend,
    blend_threshold=args.blend_threshold,
    blend_start=args.blend_start,
    blend_maps=args.blend_maps,
    reweight=reweight,
  )
  sources, edited = to_uint8(sources), to_uint8(edited)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez(
    args.out, images=edited, sources=sources, prompt=np.asarray(args.prompt), edit=np.asarray(args.edit)
  )
  nrow = min(args.num, 8)
  grid = []
  for start in range(0, args.num, nrow):
    grid += [sources[start : start + nrow], edited[start : start + nrow]]
  save_image_grid(np.concatenate(grid), args.out[:-4] + ".png", nrow=nrow)
  print(f"wrote {args.num} prompt-to-prompt edits to {args.out} and {args.out[:-4]}.png")
  return 0


def _cmd_sdedit(args: argparse.Namespace) -> int:
  import jax

  from diffjax.editing.pipeline import make_sdedit
  from diffjax.images import save_image_grid
  from diffjax.training.builders import image_shape
  from diffjax.training.restore import load_trained
  from diffjax.training.workdir import read_config

  if not 0.0 <= args.eta <= 1.0:
    raise ValueError(f"--eta must be in [0, 1], got {args.eta}")
  if not 0.0 < args.strength <= 1.0:
    raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
  config = read_config(args.workdir)
  shape = tuple(image_shape(config))
  guides, labels = _read_guides(args, shape)
  model, schedule, params = load_trained(config, args.workdir)
  nc = model.num_classes
  if args.label is not None:
    if nc is None:
      raise ValueError("--label given but the model in --workdir is unconditional")
    if not 0 <= args.label < nc:
      raise ValueError(f"--label must be in [0, {nc}), got {args.label}")
    labels = np.full((guides.shape[0],), args.label)
  mask = None
  if args.mask:
    m = _read_png(args.mask, name="--mask", shape=(*shape[:2], 1))
    mask = np.repeat((m.astype(np.float32) / 255.0)[None], guides.shape[0], axis=0)
  edit = make_sdedit(
    model=model,
    schedule=schedule,
    image_shape=shape,
    sampler=args.sampler,
    prediction=config.diffusion.prediction,
  )
  images = edit(
    params,
    jax.random.key(args.seed),
    guides,
    labels=labels,
    strength=args.strength,
    num_steps=args.steps,
    guidance=1.0 if args.guidance is None else args.guidance,
    eta=args.eta,
    mask=mask,
  )
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  labels_out = np.full((guides.shape[0],), -1) if labels is None else np.asarray(labels)
  np.savez(args.out, images=images, labels=labels_out.astype(np.int32), guides=guides)
  nrow = min(guides.shape[0], 10)
  grid = []
  for start in range(0, guides.shape[0], nrow):
    grid += [guides[start : start + nrow], images[start : start + nrow]]
  save_image_grid(np.concatenate(grid), args.out[:-4] + ".png", nrow=nrow)
  print(f"wrote {images.shape[0]} edits (strength {args.strength}) to {args.out} and {args.out[:-4]}.png")
  return 0
