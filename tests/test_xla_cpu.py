"""The XNNPACK convolution setting of diffjax.xla_cpu: flag handling, and equality with XLA's default."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffjax.xla_cpu import XNNPACK_CONV_FLAGS, cpu_conv_library, install_cpu_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Forward and parameter gradients of a U-Net (channels 32/64 at 28x28, attention on level 2) on fixed
# inputs; also whether the compiled convolution is XLA's YNNPACK fusion. Run in a fresh process per
# setting, since XLA reads its flags once per process.
SCRIPT = r"""
import sys
import diffjax, jax, jax.numpy as jnp, numpy as np
from diffjax.models import UNet
model = UNet(in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
             attention_levels=(False, True), attention_head_dim=8, norm_num_groups=8, num_classes=10)
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((8, 28, 28, 1)), jnp.float32)
t = jnp.asarray(rng.integers(0, 1000, 8))
y = jnp.asarray(rng.integers(0, 10, 8))
params = model.init(jax.random.key(0), x, t, y)["params"]
loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, y) ** 2)
out = jax.jit(lambda p: model.apply({"params": p}, x, t, y))(params)
grads = jax.jit(jax.grad(loss))(params)
conv = jax.jit(lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
hlo = conv.lower(jnp.ones((8, 28, 28, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(grads)}
np.savez(sys.argv[1], out=np.asarray(out), **{"grad" + k: v for k, v in flat.items()})
print("YNN" if "__ynn_fusion" in hlo else "NOT_YNN")
"""


def _run(tmp_path, setting):
  path = str(tmp_path / f"{setting}.npz")
  env = {**os.environ, "DIFFJAX_CPU_CONV": setting, "DIFFJAX_CPU_KERNELS": "xla"}  # XLA's convolutions
  env["XLA_FLAGS"] = " ".join(
    f for f in env.get("XLA_FLAGS", "").split() if "ynn_fusion_type" not in f and "xnn_fusion_type" not in f
  )
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT, path], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(path)), proc.stdout.split()[-1]


def test_xnnpack_convolutions_match_xla_default_forward_and_gradients(tmp_path):
  fast, fast_kind = _run(tmp_path, "xnnpack")
  plain, plain_kind = _run(tmp_path, "xla")
  assert (fast_kind, plain_kind) == ("NOT_YNN", "YNN")  # the setting took effect in each process
  assert fast.keys() == plain.keys() and len(fast) > 20
  report = {}
  for k in plain:
    scale = max(1.0, float(np.abs(plain[k]).max()))
    err = float(np.abs(fast[k] - plain[k]).max()) / scale
    report[k] = err
  worst = max(report, key=report.get)
  assert report[worst] <= 1e-5, json.dumps({worst: report[worst]})


def test_install_appends_flags_once_and_respects_the_user():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert install_cpu_flags(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", *XNNPACK_CONV_FLAGS]
  assert not install_cpu_flags(env)  # already there
  user = {"XLA_FLAGS": "--xla_cpu_experimental_xnn_fusion_type=dot"}
  assert not install_cpu_flags(user) and user["XLA_FLAGS"] == "--xla_cpu_experimental_xnn_fusion_type=dot"
  off = {"DIFFJAX_CPU_CONV": "xla"}
  assert not install_cpu_flags(off) and "XLA_FLAGS" not in off
  assert cpu_conv_library({}) == "xnnpack"


def test_bad_setting_names_the_variable():
  with pytest.raises(ValueError, match="DIFFJAX_CPU_CONV"):
    cpu_conv_library({"DIFFJAX_CPU_CONV": "onednn"})


@pytest.mark.parametrize("late", [False, True])
def test_warns_only_when_imported_after_the_backend_started(late):
  code = "import warnings; warnings.simplefilter('always')\n"
  code += (
    "import jax, jax.numpy as jnp; jnp.ones(1).block_until_ready()\nimport diffjax\n"
    if late
    else "import diffjax\n"
  )
  env = {**os.environ}
  env.pop("DIFFJAX_CPU_CONV", None)
  env["XLA_FLAGS"] = " ".join(
    f for f in env.get("XLA_FLAGS", "").split() if "ynn_fusion_type" not in f and "xnn_fusion_type" not in f
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ("do not apply in this process" in proc.stderr) == late, proc.stderr[-3000:]
