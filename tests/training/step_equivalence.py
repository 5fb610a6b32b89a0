"""Run as a script with 8 forced CPU devices: one train step on 8 devices vs on 1 device.

Prints the max absolute difference of parameters, EMA and loss as JSON (used by test_step.py).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from diffjax import parallel  # noqa: E402
from diffjax.data import get_batch, load_digits  # noqa: E402
from diffjax.models import UNet  # noqa: E402
from diffjax.schedules import make_schedule  # noqa: E402
from diffjax.training.builders import init_params  # noqa: E402
from diffjax.training.state import create_train_state, make_optimizer  # noqa: E402
from diffjax.training.step import compile_train_step, make_train_step  # noqa: E402


def main():
  assert jax.device_count() == 8, jax.devices()
  model = UNet(
    block_out_channels=(16, 32),
    layers_per_block=1,
    attention_levels=(False, True),
    attention_head_dim=8,
    norm_num_groups=4,
    dropout=0.1,
    num_classes=10,
  )
  # Adam divides by sqrt(v) + eps: with the default eps=1e-8 a gradient entry of ~1e-9 turns float
  # summation-order noise (~1e-7 relative) into O(lr) parameter noise. eps=1e-6 keeps the test about
  # the sharded step, not about that amplification.
  tx = make_optimizer(learning_rate=1e-3, warmup_steps=1, eps=1e-6)
  schedule = make_schedule("linear", num_timesteps=100)
  ds = load_digits()
  key = jax.random.key(0)
  out = {}
  for n in (1, 8):
    mesh = parallel.make_mesh(n)
    state = create_train_state(params=init_params(model, key=key, shape=(8, 8, 1)), tx=tx)
    state = jax.device_put(state, parallel.replicated(mesh))
    step = compile_train_step(make_train_step(model=model, schedule=schedule, tx=tx), mesh)
    k = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
    losses = []
    for s in range(2):
      batch = parallel.to_global(get_batch(ds, step=s, seed=0, global_batch_size=32), mesh)
      assert len(batch["image"].sharding.device_set) == n
      state, metrics = step(state, batch, k)
      losses.append(float(metrics["loss"]))
    out[n] = (jax.device_get(state), losses)
  (s1, l1), (s8, l8) = out[1], out[8]
  diff = lambda a, b: max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
  print(
    json.dumps(
      {
        "params": diff(s1.params, s8.params),
        "ema": diff(s1.ema_params, s8.ema_params),
        "loss": max(abs(a - b) for a, b in zip(l1, l8)),
        "devices": jax.device_count(),
        "step": int(s8.step),
      }
    )
  )


if __name__ == "__main__":
  main()
