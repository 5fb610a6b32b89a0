"""Text conditions: prompt encoding, caption dropout, the null prompt as CFG's unconditional branch,
the trainable encoder inside the model_fn, and text-to-image generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.guidance import classifier_free_guidance
from diffjax.models.unet_condition import UNetCondition
from diffjax.schedules import make_schedule
from diffjax.text_conditioning import NULL_PROMPT, PromptEncoder, drop_condition, make_text_model_fn
from diffjax.text_sampling import make_text_generate


@pytest.fixture(scope="module")
def minilm():
  return PromptEncoder.build(kind="minilm", max_length=12)


def _key(seed):
  # unsafe_rbg: the initialisation (one generator per parameter) compiles several times faster on CPU.
  return jax.random.key(seed, impl="unsafe_rbg")


def _unet():
  return UNetCondition(
    in_channels=1,
    out_channels=1,
    block_out_channels=(8,),
    cross_attention_levels=(True,),
    num_attention_heads=2,
    norm_num_groups=4,
  )


@pytest.fixture(scope="module")
def frozen_model(minilm):
  unet = _unet()
  ctx, mask = minilm.encode(["a 3 to the left of a 5", "an eight on the right"])
  params = jax.jit(unet.init)(_key(0), jnp.zeros((2, 8, 16, 1)), jnp.zeros(2), ctx, mask)["params"]
  return make_text_model_fn(unet), params, (ctx, mask)


def test_encode_shapes_and_null_prompt(minilm):
  ctx, mask = minilm.encode(["a 3 to the left of a 5", NULL_PROMPT])
  assert ctx.shape == (2, 12, 384) and mask.shape == (2, 12)
  assert mask[1].tolist() == [1, 1] + [0] * 10  # [CLS] [SEP]
  null_ctx, null_mask = minilm.null_condition()
  np.testing.assert_allclose(null_ctx[0], ctx[1], atol=1e-5)
  np.testing.assert_array_equal(null_mask[0], mask[1])
  with pytest.raises(ValueError, match="max_length=12"):
    minilm.encode(["a 3 to the left of a 5 and a 7 to the right of a 9 below a 4"])


def test_null_prompt_is_the_unconditional_branch(minilm, frozen_model):
  model_fn, params, cond = frozen_model
  null = minilm.null_condition()
  x = jax.random.normal(jax.random.key(1), (2, 8, 16, 1))
  t = jnp.array([10, 700])
  null_b = tuple(jnp.repeat(n, 2, axis=0) for n in null)
  uncond, cond_out = jax.jit(model_fn)(params, jnp.tile(x, (2, 1, 1, 1)), jnp.tile(t, 2), _cat(null_b, cond)).reshape(
    2, *x.shape
  )
  assert float(jnp.max(jnp.abs(uncond - cond_out))) > 1e-4  # the prompt matters

  @jax.jit
  def guided(w):
    return classifier_free_guidance(model_fn, guidance_scale=w, null_cond=null_b)(params, x, t, cond)

  for w, want in ((0.0, uncond), (1.0, cond_out), (4.0, uncond + 4.0 * (cond_out - uncond))):
    np.testing.assert_allclose(guided(w), want, atol=1e-4)


def _cat(a, b):
  return tuple(jnp.concatenate([u, v]) for u, v in zip(a, b, strict=True))


def test_drop_condition():
  cond = (jnp.ones((64, 3, 2)), jnp.ones((64, 3), jnp.int32))
  null = (jnp.zeros((1, 3, 2)), jnp.array([[1, 0, 0]], jnp.int32))
  same = drop_condition(jax.random.key(0), cond, null_cond=null, p=0.0)
  assert all(bool(jnp.array_equal(a, b)) for a, b in zip(same, cond, strict=True))
  dropped = drop_condition(jax.random.key(0), cond, null_cond=null, p=0.5)
  rows = np.asarray(dropped[1][:, 1] == 0)
  assert 10 < rows.sum() < 54
  np.testing.assert_array_equal(np.asarray(dropped[0])[rows], 0.0)
  np.testing.assert_array_equal(np.asarray(dropped[0])[~rows], 1.0)


def test_trainable_encoder_gets_gradients():
  prompts = PromptEncoder.build(
    kind="small",
    max_length=12,
    key=_key(0),
    num_layers=1,
    hidden_size=32,
    num_heads=2,
    intermediate_size=64,
  )
  assert prompts.trainable and prompts.context_dim == 32
  ids, mask = prompts.encode(["a 1 to the left of a 2", NULL_PROMPT])
  assert ids.dtype == np.int32 and ids.shape == (2, 12)
  unet = _unet()
  ctx = jnp.zeros((2, 12, 32))
  params = {
    "unet": jax.jit(unet.init)(_key(1), jnp.zeros((2, 8, 16, 1)), jnp.zeros(2), ctx, mask)["params"],
    "text_encoder": prompts.params,
  }
  model_fn = make_text_model_fn(unet, text_module=prompts.module)
  x = jnp.ones((2, 8, 16, 1))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model_fn(p, x, jnp.array([5, 9]), (ids, mask)) ** 2)))(params)
  norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads["text_encoder"]))
  assert norm > 0


def test_make_text_generate(minilm, frozen_model):
  model_fn, params, cond = frozen_model
  generate = make_text_generate(
    model_fn=model_fn,
    schedule=make_schedule("linear", num_timesteps=50),
    sample_shape=(8, 16, 1),
    null_cond=minilm.null_condition(),
  )
  a = generate(params, jax.random.key(0), cond, num_steps=3, guidance=4.0)
  b = generate(params, jax.random.key(0), cond, num_steps=3, guidance=1.0)
  assert a.shape == (2, 8, 16, 1) and float(jnp.max(jnp.abs(a - b))) > 0
  with pytest.raises(ValueError, match="num_steps"):
    generate(params, jax.random.key(0), cond, num_steps=0)
  with pytest.raises(ValueError, match="cond must be"):
    generate(params, jax.random.key(0), (cond[0], cond[1][:, :5]))
  with pytest.raises(ValueError, match="empty batch"):
    generate(params, jax.random.key(0), (cond[0][:0], cond[1][:0]))
  with pytest.raises(ValueError, match="prompts is empty"):
    minilm.encode([])
  with pytest.raises(ValueError, match="tokens long"):
    minilm.encode(["a 3 to the left of a 5 and a 7 to the right of a 9 and a 4"])
