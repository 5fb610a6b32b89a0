"""int8 / packed-int4 export and exact reload."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors import safe_open

from diffjax.quantization import QuantConfig, QuantizedModel, calibrate, fake_quant_params
from diffjax.quantization.export import load_quantized, save_quantized, weight_bytes


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_is_exact(tiny, calibrated8, apply8, tmp_path, bits):
  model, params, _, inputs, _ = tiny
  if bits == 8:
    qm, quant = calibrated8
    cfg = qm.config
  else:
    cfg = QuantConfig.wa(bits, 8, split_shortcut=True)
    qm = QuantizedModel(model, cfg)
    quant = calibrate(qm, params, inputs, method="single")
  path = tmp_path / "m.safetensors"
  sizes = save_quantized(path, params, quant, cfg)
  p2, q2, cfg2 = load_quantized(path)
  assert cfg2 == cfg
  # Loaded kernels are exactly the fake-quantized ones, and the fake quantizer leaves them unchanged.
  fq = traverse_util.flatten_dict(fake_quant_params(params, quant, cfg))
  loaded = traverse_util.flatten_dict(p2)
  assert fq.keys() == loaded.keys()
  for k in fq:
    np.testing.assert_array_equal(np.asarray(fq[k]), loaded[k])
  np.testing.assert_array_equal(
    np.asarray(traverse_util.flatten_dict(fake_quant_params(p2, q2, cfg))[("conv_out", "kernel")]),
    loaded[("conv_out", "kernel")],
  )
  # The "quant" collection comes back unchanged, so the loaded model runs the same program on the same
  # numbers; checked end to end at 8 bits (one compiled program shared with other tests).
  flat_q, flat_q2 = traverse_util.flatten_dict(quant), traverse_util.flatten_dict(q2)
  assert flat_q.keys() == flat_q2.keys()
  for k in flat_q:
    np.testing.assert_array_equal(np.asarray(flat_q[k]), flat_q2[k])
  if bits == 8:
    x, t, y = jnp.asarray(inputs.x[1]), jnp.full((inputs.num_rows,), inputs.t[1]), jnp.asarray(inputs.cond)
    a = apply8({"params": params, "quant": quant}, x, t, y)
    b = apply8({"params": p2, "quant": q2}, x, t, y)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Stored integer types and sizes.
  with safe_open(str(path), framework="numpy") as f:
    q = f.get_tensor("mid_block/resnets_0/conv1/kernel.q")
    assert q.dtype == (np.uint8 if bits == 4 else np.int8)
    assert f.get_tensor("conv_in/kernel.q").dtype == np.int8  # the stem stays 8-bit
  n = params["mid_block"]["resnets_0"]["conv1"]["kernel"].size
  assert q.size == (n + 1) // 2 if bits == 4 else n
  kernel_bytes = 4 * sum(v.size for k, v in traverse_util.flatten_dict(params).items() if k[-1] == "kernel")
  assert sizes["quantized_kernels"] < kernel_bytes / (3 if bits == 8 else 5)
  assert sizes["total"] == sizes["quantized_kernels"] + sizes["float"] < sizes["float32_total"]
  assert sizes["file"] >= sizes["total"]
  assert weight_bytes(params, quant, cfg) == {k: v for k, v in sizes.items() if k != "file"}


def test_load_rejects_other_files(tmp_path):
  from safetensors.numpy import save_file

  path = tmp_path / "x.safetensors"
  save_file({"a": np.zeros(2, np.float32)}, str(path))
  with pytest.raises(ValueError, match="diffjax_quant"):
    load_quantized(path)
  with pytest.raises(FileNotFoundError):
    load_quantized(tmp_path / "missing.safetensors")
