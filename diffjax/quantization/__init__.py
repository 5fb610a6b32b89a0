"""Post-training quantization of diffusion models, simulated with fake-quant in the compute graph.

* :mod:`~diffjax.quantization.quantizers`: uniform quantizers, straight-through rounding, range search,
  int4 packing (pure functions).
* :mod:`~diffjax.quantization.fake_quant`: :class:`QuantConfig` and :class:`QuantizedModel`, which runs any
  diffjax model under method interception with quantized weights, activations, attention products and
  (optionally) split decoder shortcuts; scales live in the ``"quant"`` variable collection.
* :mod:`~diffjax.quantization.calibration`: naive, time-aware and per-timestep calibration along
  full-precision sampling trajectories (Q-Diffusion, Li et al. 2023; PTQ4DM, Shang et al. 2023).
* :mod:`~diffjax.quantization.adaround`: AdaRound-style learned weight rounding per block.
* :mod:`~diffjax.quantization.export`: int8 / packed-int4 weights with scales in safetensors, and back.
"""

from diffjax.quantization.calibration import (
  CALIBRATION_METHODS,
  CalibrationInputs,
  calibrate,
  record_ddim_inputs,
  select_inputs,
)
from diffjax.quantization.fake_quant import QuantConfig, QuantizedModel, fake_quant_params
from diffjax.quantization.quantizers import fake_quant, round_ste

__all__ = [
  "CALIBRATION_METHODS",
  "CalibrationInputs",
  "QuantConfig",
  "QuantizedModel",
  "calibrate",
  "fake_quant",
  "fake_quant_params",
  "record_ddim_inputs",
  "round_ste",
  "select_inputs",
]
