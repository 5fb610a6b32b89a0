"""Prompt-to-prompt on a trained text-to-image run: prompts in, source and edited images out.

:func:`build_edit_spec` turns pairs of prompts (and the chosen blend and reweighting words) into the
arrays of :class:`~diffjax.editing.prompt_to_prompt.EditSpec`, and :func:`edit_controls` bundles it with
the per-call values as the traced :class:`EditControls` (both also serve the imported pipelines'
:mod:`diffjax.pretrained.prompt_to_prompt`); :func:`make_prompt_to_prompt` returns a
checked function over a :class:`~diffjax.training.text_builders.TextRun` that encodes the prompts, runs
:func:`~diffjax.editing.prompt_to_prompt.prompt_to_prompt_sample` under one ``jit`` (step count,
guidance, eta and every fraction traced) and decodes latents. The starting noise is drawn as
:func:`diffjax.text_sampling.make_text_generate` draws it, so the source images are what ``sample
--prompt`` makes with the same key, and a "regenerate" baseline is ``make_text_generate`` on the edited
prompts with the same key.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffjax.editing.prompt_to_prompt import BLEND_MAPS, EditSpec, check_fractions, prompt_to_prompt_sample
from diffjax.editing.token_alignment import align_prompts, token_scales, word_mask
from diffjax.models.text_tokenizer import PromptTokenizer
from diffjax.samplers.timesteps import check_num_steps

__all__ = ["EditControls", "build_edit_spec", "edit_controls", "make_prompt_to_prompt"]


@struct.dataclass
class EditControls:
  """The per-call values of a prompt-to-prompt edit as arrays, so that new values do not recompile.

  Attributes:
      spec: The :class:`~diffjax.editing.prompt_to_prompt.EditSpec` of the ``P`` prompt pairs.
      num_steps: int32 ``[]``, sampler steps.
      guidance: float32 ``[]``, classifier-free guidance scale.
      eta: float32 ``[]``, DDIM eta.
      cross_replace: float32 ``[]``, fraction of the steps with cross-attention replacement.
      self_replace: float32 ``[]``, fraction of the steps with self-attention injection.
  """

  spec: EditSpec
  num_steps: jnp.ndarray
  guidance: jnp.ndarray
  eta: jnp.ndarray
  cross_replace: jnp.ndarray
  self_replace: jnp.ndarray


def edit_controls(spec: EditSpec, *, num_steps, guidance, eta, cross_replace, self_replace) -> EditControls:
  """Bundles an edit's spec and per-call values as the arrays of :class:`EditControls`.

  Args:
      spec: The edit arrays (NumPy or JAX), e.g. from :func:`build_edit_spec`.
      num_steps: Sampler steps (int).
      guidance, eta, cross_replace, self_replace: Scalars (checked by the caller, see
          :func:`~diffjax.editing.prompt_to_prompt.check_fractions`).

  Returns:
      :class:`EditControls` of JAX arrays.
  """
  return EditControls(
    spec=jax.tree.map(jnp.asarray, spec),
    num_steps=jnp.asarray(num_steps, jnp.int32),
    guidance=jnp.asarray(guidance, jnp.float32),
    eta=jnp.asarray(eta, jnp.float32),
    cross_replace=jnp.asarray(cross_replace, jnp.float32),
    self_replace=jnp.asarray(self_replace, jnp.float32),
  )


def build_edit_spec(
  tokenizer: PromptTokenizer,
  sources: Sequence[str],
  edits: Sequence[str],
  *,
  max_length: int,
  kind: str = "auto",
  blend_words: Sequence[str] | Sequence[Sequence[str]] | None = None,
  reweight: Mapping[str, float] | None = None,
) -> EditSpec:
  """The edit arrays of ``P`` prompt pairs.

  Args:
      tokenizer: The text encoder's tokenizer.
      sources: ``P`` source prompts.
      edits: ``P`` edited prompts (pair ``p`` is ``(sources[p], edits[p])``).
      max_length: Padded prompt length ``L``.
      kind: ``"replace"`` (word swap), ``"refine"`` (added words) or ``"auto"`` (a word swap when both
          prompts have as many words); see :mod:`diffjax.editing.token_alignment`.
      blend_words: Words whose attention makes the local blend's mask (e.g. ``["8"]``). A word may
          belong to either prompt; the tokens aligned with it in the other prompt are used there too,
          so ``["8"]`` selects "8" in the edit and the "5" it replaces in the source. A list of ``P``
          lists gives each pair its own words. ``None``: no blend.
      reweight: ``{word: scale}`` for words of the edited prompts (attention re-weighting).

  Returns:
      NumPy-backed :class:`EditSpec`.

  Raises:
      ValueError: If the lists differ in length, a prompt pair does not fit ``kind``, the blend words
          select no token of a pair, or a reweighted word is missing.
  """
  sources, edits = list(sources), list(edits)
  if not sources or len(sources) != len(edits):
    raise ValueError(f"need as many edit prompts as source prompts (>= 1), got {len(sources)}, {len(edits)}")
  per_pair = _per_pair_words(blend_words, len(sources))
  mappers, alphas, scales, blend_src, blend_edit = [], [], [], [], []
  for source, edit, words in zip(sources, edits, per_pair, strict=True):
    a = align_prompts(tokenizer, source, edit, max_length=max_length, kind=kind)
    mappers.append(a.mapper)
    alphas.append(a.alphas)
    scales.append(token_scales(tokenizer, edit, dict(reweight or {}), max_length=max_length))
    if words:
      ws = word_mask(tokenizer, source, words, max_length=max_length)
      we = word_mask(tokenizer, edit, words, max_length=max_length)
      src = np.maximum(ws, (a.mapper @ we > 0).astype(np.float32))
      dst = np.maximum(we, (ws @ a.mapper > 0).astype(np.float32))
      if not src.any() and not dst.any():
        raise ValueError(f"blend words {list(words)} are in neither {source!r} nor {edit!r}")
      blend_src.append(src)
      blend_edit.append(dst)
    else:
      blend_src.append(np.zeros((max_length,), np.float32))
      blend_edit.append(np.zeros((max_length,), np.float32))
  return EditSpec(
    mapper=np.stack(mappers),
    alphas=np.stack(alphas),
    scales=np.stack(scales),
    blend=np.stack(blend_src + blend_edit),
  )


def _per_pair_words(blend_words, num: int) -> list[list[str] | None]:
  if not blend_words:
    return [None] * num
  if isinstance(blend_words, str):
    raise ValueError(f"blend_words must be a list of words, got the string {blend_words!r}")
  if all(isinstance(w, str) for w in blend_words):
    return [list(blend_words)] * num
  if len(blend_words) != num or any(isinstance(w, str) for w in blend_words):
    raise ValueError(f"blend_words must be a list of words or one list per pair ({num}), got {blend_words!r}")
  return [list(w) if w else None for w in blend_words]


def make_prompt_to_prompt(run, *, self_max_tokens: int | None = None) -> Callable:
  """Builds the prompt-to-prompt editor of a text-to-image run.

  Args:
      run: A :class:`~diffjax.training.text_builders.TextRun` (e.g. from
          :func:`~diffjax.training.text_builders.load_text_run`).
      self_max_tokens: Inject self-attention only in layers with at most this many query tokens
          (``None``: all layers).

  Returns:
      ``edit(params, key, sources, edits, *, num_steps=50, guidance=4.0, eta=0.0, cross_replace=0.8,
      self_replace=0.4, kind="auto", blend_words=None, blend_threshold=0.3, blend_start=0.2,
      blend_maps="lowest", reweight=None) -> (source_images, edited_images)``, each float32 ``[P, H, W, C]`` in about
      ``[-1, 1]``. ``key`` draws the starting noise (as ``make_text_generate`` does).
  """
  config = run.config
  prediction = config.diffusion.prediction
  codec = run.codec
  text_module = run.prompts.module if run.prompts.trainable else None
  null_cond = tuple(jnp.asarray(v) for v in run.prompts.null_condition())
  max_length = run.prompts.max_length
  sample_shape = tuple(run.sample_shape)

  @functools.partial(jax.jit, static_argnames=("blend", "blend_maps"))
  def sample(params, codec, key, cond, controls: EditControls, threshold, start, blend, blend_maps):
    p = controls.spec.mapper.shape[0]
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (p, *sample_shape), jnp.float32)
    x = prompt_to_prompt_sample(
      unet=run.unet,
      params=params,
      schedule=run.schedule,
      x_T=x_T,
      key=jax.random.fold_in(key, 1),
      cond=cond,
      null_cond=null_cond,
      spec=controls.spec,
      guidance=controls.guidance,
      num_steps=controls.num_steps,
      eta=controls.eta,
      cross_replace=controls.cross_replace,
      self_replace=controls.self_replace,
      blend=blend,
      blend_threshold=threshold,
      blend_start=start,
      blend_maps=blend_maps,
      self_max_tokens=self_max_tokens,
      text_module=text_module,
      prediction=prediction,
      clip_x0=None if codec is not None else 1.0,
    )
    return x if codec is None else codec.decode(x)

  def edit(
    params,
    key,
    sources: Sequence[str],
    edits: Sequence[str],
    *,
    num_steps: int = 50,
    guidance: float = 4.0,
    eta: float = 0.0,
    cross_replace: float = 0.8,
    self_replace: float = 0.4,
    kind: str = "auto",
    blend_words: Sequence[str] | None = None,
    blend_threshold: float = 0.3,
    blend_start: float = 0.2,
    blend_maps: str = "lowest",
    reweight: Mapping[str, float] | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    check_num_steps(num_steps, run.schedule.num_timesteps)
    if blend_maps not in BLEND_MAPS:
      raise ValueError(f"blend_maps must be one of {BLEND_MAPS}, got {blend_maps!r}")
    check_fractions(
      cross_replace=cross_replace,
      self_replace=self_replace,
      blend_threshold=blend_threshold,
      blend_start=blend_start,
      eta=eta,
    )
    spec = build_edit_spec(
      run.prompts.tokenizer,
      sources,
      edits,
      max_length=max_length,
      kind=kind,
      blend_words=blend_words,
      reweight=reweight,
    )
    tokens, mask = run.prompts.encode(list(sources) + list(edits))
    out = sample(
      params,
      codec,
      key,
      (jnp.asarray(tokens), jnp.asarray(mask)),
      edit_controls(
        spec,
        num_steps=num_steps,
        guidance=guidance,
        eta=eta,
        cross_replace=cross_replace,
        self_replace=self_replace,
      ),
      jnp.asarray(blend_threshold, jnp.float32),
      jnp.asarray(blend_start, jnp.float32),
      bool(blend_words),
      blend_maps,
    )
    out = np.asarray(jax.device_get(out), np.float32)
    p = len(sources)
    return out[:p], out[p:]

  return edit
