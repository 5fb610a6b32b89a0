"""Behavioural tests of the diffjax U-Net (NHWC)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import UNet, UpBlock2D, count_params
from diffjax.models.resnet import Downsample2D

KEY = jax.random.PRNGKey(0)


def _init(model, shape, label=None):
  """Real Flax init (slow on CPU: every initializer compiles a PRNG kernel)."""
  x = jnp.zeros(shape, jnp.float32)
  t = jnp.zeros((shape[0],), jnp.int32)
  return model.init(KEY, x, t, label)


def _fast_init(model, shape, seed=0):
  """Random params with the model's exact tree, built from jax.eval_shape + NumPy.

  Keeps the suite fast on small CPUs; the real initializers are exercised by
  the ``class_model`` fixture.
  """
  shapes = jax.eval_shape(model.init, KEY, jnp.zeros(shape), jnp.zeros((shape[0],)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda s: jnp.asarray(rng.normal(scale=0.1, size=s.shape).astype(np.float32)), shapes
  )


def _inputs(shape, seed=1):
  kx, kt = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, shape)
  t = jax.random.randint(kt, (shape[0],), 0, 1000)
  return x, t


@pytest.fixture(scope="module")
def class_model():
  model = UNet(num_classes=10)
  return model, _init(model, (2, 8, 8, 1))


def test_output_shape_8x8_real_init(class_model):
  model, variables = class_model
  x, t = _inputs((2, 8, 8, 1))
  y = model.apply(variables, x, t, jnp.array([1, 2]))
  assert y.shape == (2, 8, 8, 1)
  assert y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))
  assert float(jnp.std(y)) > 1e-3  # conv_out is not zero-initialised
  assert float(jnp.std(variables["params"]["conv_out"]["kernel"])) > 0


@pytest.mark.parametrize(
  "kwargs, shape",
  [
    (
      dict(block_out_channels=(32, 64, 64), attention_levels=(False, False, True), layers_per_block=1),
      (2, 28, 28, 1),
    ),
    (dict(in_channels=3, out_channels=3, layers_per_block=1), (1, 32, 32, 3)),
  ],
)
def test_output_shape(kwargs, shape):
  model = UNet(**kwargs)
  variables = _fast_init(model, shape)
  x, t = _inputs(shape)
  y = jax.jit(model.apply)(variables, x, t)
  assert y.shape == shape[:3] + (model.out_channels,)
  assert y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))


def test_param_tree_names(class_model):
  _, variables = class_model
  p = variables["params"]
  assert set(p) == {
    "conv_in",
    "time_embedding",
    "class_embedding",
    "down_blocks_0",
    "down_blocks_1",
    "mid_block",
    "up_blocks_0",
    "up_blocks_1",
    "conv_norm_out",
    "conv_out",
  }
  assert set(p["time_embedding"]) == {"linear_1", "linear_2"}
  assert p["time_embedding"]["linear_1"]["kernel"].shape == (32, 128)
  assert p["class_embedding"]["embedding"].shape == (11, 128)
  assert set(p["down_blocks_0"]) == {"resnets_0", "resnets_1", "downsamplers_0"}
  assert set(p["down_blocks_1"]) == {"resnets_0", "resnets_1", "attentions_0", "attentions_1"}
  assert set(p["down_blocks_1"]["resnets_0"]) == {
    "norm1",
    "conv1",
    "time_emb_proj",
    "norm2",
    "conv2",
    "conv_shortcut",
  }
  assert set(p["down_blocks_1"]["attentions_0"]) == {"group_norm", "to_q", "to_k", "to_v", "to_out_0"}
  assert set(p["mid_block"]) == {"resnets_0", "attentions_0", "resnets_1"}
  assert set(p["up_blocks_0"]) == {f"resnets_{i}" for i in range(3)} | {
    f"attentions_{i}" for i in range(3)
  } | {"upsamplers_0"}
  assert set(p["up_blocks_1"]) == {f"resnets_{i}" for i in range(3)}
  # Skip concat widths as in diffusers: 64+64, 64+64, 64+32 then 64+32, 32+32, 32+32.
  assert p["up_blocks_0"]["resnets_2"]["conv1"]["kernel"].shape == (3, 3, 96, 64)
  assert p["up_blocks_1"]["resnets_0"]["conv1"]["kernel"].shape == (3, 3, 96, 32)
  assert p["up_blocks_1"]["resnets_2"]["conv1"]["kernel"].shape == (3, 3, 64, 32)
  assert count_params(p) == 1003137  # == diffusers.UNet2DModel with the same config


def test_jit_matches_eager(class_model):
  model, variables = class_model
  x, t = _inputs((2, 8, 8, 1))
  label = jnp.array([3, 7])
  eager = model.apply(variables, x, t, label)
  jitted = jax.jit(model.apply)(variables, x, t, label)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)


def test_scalar_timestep_broadcasts(class_model):
  model, variables = class_model
  x, _ = _inputs((2, 8, 8, 1))
  a = model.apply(variables, x, 42)
  b = model.apply(variables, x, jnp.array([42, 42]))
  c = model.apply(variables, x, jnp.array([42.0, 42.0]))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)
  d = model.apply(variables, x, jnp.array([42, 900]))
  assert not np.allclose(np.asarray(d[1]), np.asarray(a[1]), atol=1e-4)


def test_dropout(class_model):
  _, variables = class_model  # dropout is not a parameter: same tree
  model = UNet(num_classes=10, dropout=0.5)
  x, t = _inputs((2, 8, 8, 1))
  y1 = model.apply(variables, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  y2 = model.apply(variables, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(np.asarray(y1), np.asarray(y2), atol=1e-4)
  e1 = model.apply(variables, x, t, train=False)
  e2 = model.apply(variables, x, t)  # no dropout rng needed in eval mode
  np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
  assert not np.allclose(np.asarray(e1), np.asarray(y1), atol=1e-4)


def test_class_conditioning(class_model):
  model, variables = class_model
  assert model.null_label == 10
  x, t = _inputs((2, 8, 8, 1))
  y_a = model.apply(variables, x, t, jnp.array([0, 1]))
  y_b = model.apply(variables, x, t, jnp.array([5, 9]))
  assert not np.allclose(np.asarray(y_a), np.asarray(y_b), atol=1e-4)
  null = jnp.full((2,), model.null_label)
  y_null = model.apply(variables, x, t, null)
  assert bool(jnp.all(jnp.isfinite(y_null)))
  assert not np.allclose(np.asarray(y_null), np.asarray(y_a), atol=1e-4)
  y_none = model.apply(variables, x, t, None)
  np.testing.assert_allclose(np.asarray(y_none), np.asarray(y_null), atol=1e-6)


def test_null_label_on_unconditional_model_raises():
  with pytest.raises(ValueError, match="num_classes"):
    _ = UNet().null_label


def test_bfloat16_compute_keeps_float32_params(class_model):
  model = UNet(num_classes=10, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
  f32_model, variables = class_model
  x, t = _inputs((2, 8, 8, 1))
  y = jax.jit(model.apply)(variables, x, t)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 8, 8, 1)
  ref = f32_model.apply(variables, x, t)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.1 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize(
  "x_shape, t, label, match",
  [
    ((2, 8, 8), jnp.zeros((2,)), None, "x must have shape"),
    ((2, 8, 8, 3), jnp.zeros((2,)), None, "x has 3 channels"),
    ((2, 9, 8, 1), jnp.zeros((2,)), None, r"x spatial size .* divisible by 2\*\*\(levels-1\)=2"),
    ((2, 8, 8, 1), jnp.zeros((3,)), None, "t must be"),
    ((2, 8, 8, 1), jnp.zeros((2, 1)), None, "t must be"),
    ((2, 8, 8, 1), jnp.zeros((2,)), jnp.zeros((2, 1), jnp.int32), "label must have shape"),
    ((2, 8, 8, 1), jnp.zeros((2,)), jnp.zeros((2,), jnp.float32), "label must be an integer"),
  ],
)
def test_bad_inputs_raise(class_model, x_shape, t, label, match):
  model, variables = class_model
  with pytest.raises(ValueError, match=match):
    model.apply(variables, jnp.zeros(x_shape), t, label)


def test_label_on_unconditional_model_raises():
  model = UNet(layers_per_block=1)
  with pytest.raises(ValueError, match="label"):
    model.init(KEY, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)), jnp.array([1]))


def test_integer_x_rejected(class_model):
  model, variables = class_model
  with pytest.raises(ValueError, match="x must be a floating"):
    model.apply(variables, jnp.zeros((2, 8, 8, 1), jnp.int32), jnp.zeros((2,)))


def test_three_levels_need_divisibility_by_four():
  model = UNet(
    block_out_channels=(8, 8, 8),
    attention_levels=(False, False, False),
    layers_per_block=1,
    norm_num_groups=4,
  )
  with pytest.raises(ValueError, match=r"divisible by 2\*\*\(levels-1\)=4"):
    model.init(KEY, jnp.zeros((1, 14, 14, 1)), jnp.zeros((1,)))


def test_bad_config_raises():
  with pytest.raises(ValueError, match="attention_levels"):
    UNet(attention_levels=(True,)).init(KEY, jnp.zeros((1, 8, 8, 1)), 0)
  with pytest.raises(ValueError, match="norm_num_groups"):
    UNet(norm_num_groups=5).init(KEY, jnp.zeros((1, 8, 8, 1)), 0)


def test_up_block_skip_mismatch_raises():
  block = UpBlock2D(8, num_layers=1, add_upsample=False, norm_num_groups=4)
  with pytest.raises(ValueError, match=r"2\*\*\(levels-1\)"):
    block.init(KEY, jnp.zeros((1, 8, 8, 8)), [jnp.zeros((1, 7, 7, 8))], jnp.zeros((1, 16)))


def test_downsample_pads_like_torch():
  """Explicit ((1,1),(1,1)) padding: output (0,0) sees the zero pad at the
  top-left tap, unlike 'SAME' which pads (0,1) for stride 2 on even sizes."""
  x = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
  mod = Downsample2D(1)
  params = mod.init(KEY, x)["params"]
  kernel = jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)  # picks x_pad[2i, 2j]
  y = mod.apply({"params": {"conv": {"kernel": kernel, "bias": jnp.zeros(1)}}}, x)
  assert y.shape == (1, 2, 2, 1)
  np.testing.assert_allclose(np.asarray(y[0, :, :, 0]), [[0.0, 0.0], [0.0, 6.0]])
  assert set(params) == {"conv"}
