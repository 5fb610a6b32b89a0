"""Prompt-to-prompt editing (Hertz et al. 2022) on an imported Stable-Diffusion pipeline.

"Prompt-to-Prompt Image Editing with Cross Attention Control" samples a source prompt and its edit from
the same noise and, for the first ``cross_replace`` fraction of the steps, lets the edit attend with the
source's cross-attention maps (carried over to its tokens by a word-swap or refinement alignment,
:mod:`diffjax.editing.token_alignment`), optionally injecting the source's self-attention for the first
``self_replace`` fraction and re-weighting chosen words (Sec. 3.2). The per-step rewrite of the attention
probabilities is :func:`diffjax.editing.prompt_to_prompt.prompt_to_prompt_control`, handed to the imported
U-Net through :func:`~diffjax.pretrained.pipeline.make_unet_fn`'s ``attention_control``.

The run is the pipeline's own text-to-image (:func:`~diffjax.pretrained.pipeline.make_text_to_image`):
the ``P`` source prompts and ``P`` edits in one batch of ``2P`` (rows ``[0, P)`` sources, ``[P, 2P)``
edits, pair ``p`` from the same latents), DDIM on the scheduler's timestep table, classifier-free guidance
against the negative prompt (the U-Net sees ``[prompt rows, negative rows]``, and only the prompt half is
controlled, as in the authors' code). The step index of the control is recovered from the timestep, so
step count, guidance, eta and both fractions are traced: new values do not recompile.

Stable Diffusion attends to the padding positions of its context too; their attention is carried over
as well (:func:`~diffjax.editing.token_alignment.map_padding`), as the authors' ``seq_aligner`` does.
Not here: the local blend (it needs maps accumulated across steps; it is in
:func:`diffjax.editing.prompt_to_prompt.prompt_to_prompt_sample` for diffjax's own text-to-image models)
and ControlNet pipelines.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.editing.p2p_pipeline import EditControls, build_edit_spec, edit_controls
from diffjax.editing.prompt_to_prompt import EditSpec, check_fractions, prompt_to_prompt_control
from diffjax.editing.token_alignment import map_padding
from diffjax.models.clip_tokenizer import CLIPTokenizer
from diffjax.pretrained.loader import StableDiffusion
from diffjax.pretrained.pipeline import _guided_ddim, _initial_latents, _Spec, _unet_fn, encode_prompts
from diffjax.samplers.timesteps import TimestepTable

__all__ = ["CLIPPromptTokens", "make_prompt_to_prompt", "pipeline_edit_spec", "step_index"]


class CLIPPromptTokens:
  """A :class:`~diffjax.models.clip_tokenizer.CLIPTokenizer` seen as the token alignment expects it.

  ``tokenize`` includes the start and end tokens, so list positions are rows of the ``[L]`` context;
  ``encode`` raises on a prompt that does not fit (an alignment of a truncated prompt would be wrong).
  """

  def __init__(self, tokenizer: CLIPTokenizer):
    self.tokenizer = tokenizer

  def tokenize(self, prompt: str) -> list[str]:
    specials = self.tokenizer.special_tokens
    return [specials["bos_token"], *self.tokenizer.tokenize(prompt), specials["eos_token"]]

  def words(self, prompt: str) -> list[tuple[str, tuple[int, ...]]]:
    return self.tokenizer.words(prompt)

  def encode(self, prompts: Sequence[str], *, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    return self.tokenizer.encode(list(prompts), max_length=max_length, truncate=False)


def pipeline_edit_spec(
  tokenizer: CLIPTokenizer,
  sources: Sequence[str],
  edits: Sequence[str],
  *,
  kind: str = "auto",
  reweight: Mapping[str, float] | None = None,
) -> EditSpec:
  """The edit arrays of ``P`` prompt pairs for a pipeline's ``[model_max_length]`` CLIP context.

  Args:
      tokenizer: The pipeline's tokenizer.
      sources: ``P`` source prompts.
      edits: ``P`` edited prompts.
      kind: ``"replace"`` (word swap), ``"refine"`` (added words) or ``"auto"``.
      reweight: ``{word: scale}`` attention re-weighting of words of the edited prompts.

  Returns:
      NumPy-backed :class:`~diffjax.editing.prompt_to_prompt.EditSpec` (``L = model_max_length``, padding
      mapped, no local blend).

  Raises:
      ValueError: If the prompts do not pair up, do not fit ``kind`` or the context, or a reweighted word
          is missing.
  """
  tok = CLIPPromptTokens(tokenizer)
  length = tokenizer.model_max_length
  spec = build_edit_spec(tok, sources, edits, max_length=length, kind=kind, reweight=reweight)
  mappers, alphas = [], []
  for p, (source, edit) in enumerate(zip(sources, edits, strict=True)):
    m, a = map_padding(
      spec.mapper[p],
      spec.alphas[p],
      source_length=len(tok.tokenize(source)),
      edit_length=len(tok.tokenize(edit)),
    )
    mappers.append(m)
    alphas.append(a)
  return spec.replace(mapper=np.stack(mappers), alphas=np.stack(alphas))


def step_index(table: TimestepTable, num_steps: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
  """Index (0 = first, noisiest) of the sampler step at timestep ``t`` in a DDIM timestep table.

  The table's entries ``0 .. num_steps - 1`` are the visited timesteps in increasing order, so the step
  index is the number of visited timesteps above ``t``. Traceable.
  """
  ts = table.timesteps
  visited = jnp.arange(ts.shape[0]) < num_steps
  return jnp.sum(jnp.logical_and(ts > jnp.asarray(t, ts.dtype), visited)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample(
  spec: _Spec,
  self_max_tokens: int | None,
  params,
  schedule,
  key,
  latents,
  context,
  null_context,
  controls: EditControls,
  table,
):
  unet_fn = _unet_fn(spec.unet, None)

  def model_fn(p, z, t, c):
    control = prompt_to_prompt_control(
      spec=controls.spec,
      step=step_index(table, controls.num_steps, t[0]),
      num_steps=controls.num_steps,
      cross_replace=controls.cross_replace,
      self_replace=controls.self_replace,
      self_max_tokens=self_max_tokens,
    )
    return unet_fn(p, z, t, c, attention_control=control)

  return _guided_ddim(
    spec,
    params,
    schedule,
    key,
    jnp.concatenate([latents, latents]),
    context,
    null_context,
    table,
    controls.num_steps,
    controls.guidance,
    controls.eta,
    model_fn=model_fn,
  )


def make_prompt_to_prompt(sd: StableDiffusion, *, self_max_tokens: int | None = 16 * 16) -> Callable:
  """Builds the prompt-to-prompt editor of an imported pipeline.

  Args:
      sd: The pipeline (without a ControlNet).
      self_max_tokens: Inject self-attention only in layers with at most this many query tokens (default
          16 x 16 as in the authors' code, i.e. the 16 x 16 and 8 x 8 layers at SD's 64 x 64 latents);
          ``None``: every layer.

  Returns:
      ``edit(params, key, sources, edits, *, num_steps=50, guidance=7.5, eta=0.0, cross_replace=0.8,
      self_replace=0.4, kind="auto", reweight=None, negative_prompt="", latents=None, height=None,
      width=None) -> (images [2P, H, W, 3] in [0, 1], latents [2P, h, w, c])``: rows ``[0, P)`` the
      sources (what :func:`~diffjax.pretrained.pipeline.make_text_to_image` makes from the same key or
      latents), rows ``[P, 2P)`` the edits. ``latents`` ``[P, h, w, c]`` (default: standard normal from
      ``key`` as ``make_text_to_image`` draws them). ``params`` is
      :func:`~diffjax.pretrained.pipeline.pipeline_params`.

  Raises:
      ValueError: For a ControlNet pipeline.
  """
  if sd.controlnet is not None:
    raise ValueError("prompt-to-prompt is not available for ControlNet pipelines; load it without one")
  spec = _Spec.of(sd, None)
  sched = sd.scheduler

  def edit(
    params,
    key,
    sources: Sequence[str],
    edits: Sequence[str],
    *,
    num_steps: int = 50,
    guidance: float = 7.5,
    eta: float = 0.0,
    cross_replace: float = 0.8,
    self_replace: float = 0.4,
    kind: str = "auto",
    reweight: Mapping[str, float] | None = None,
    negative_prompt: str = "",
    latents=None,
    height: int | None = None,
    width: int | None = None,
  ):
    check_fractions(cross_replace=cross_replace, self_replace=self_replace, eta=eta)
    if not isinstance(negative_prompt, str):
      raise ValueError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
    edit_spec = pipeline_edit_spec(sd.tokenizer, sources, edits, kind=kind, reweight=reweight)
    p = len(sources)
    latents = _initial_latents(sd, key, latents, batch=p, height=height, width=width, what=f"{p} prompt pairs")
    context = encode_prompts(sd, params, list(sources) + list(edits))
    null_context = encode_prompts(sd, params, [negative_prompt] * (2 * p))
    return _sample(
      spec,
      self_max_tokens,
      params,
      sched.schedule,
      jax.random.fold_in(key, 1),
      latents,
      context,
      null_context,
      edit_controls(
        edit_spec,
        num_steps=num_steps,
        guidance=guidance,
        eta=eta,
        cross_replace=cross_replace,
        self_replace=self_replace,
      ),
      sched.table(num_steps),
    )

  return edit
