"""FID Inception-v3: pool features match a PyTorch reference; the loader names bad parameters.

The reference is written here in plain ``torch.nn``, faithful to torchvision's ``Inception3``
(torchvision 0.28 ``models/inception.py``: ``BasicConv2d``, ``InceptionB``, ``InceptionD``) with
pytorch-fid 0.3.0's ``FIDInceptionA``/``FIDInceptionC``/``FIDInceptionE_1``/``FIDInceptionE_2`` forward
passes and its ``InceptionV3`` preprocessing (``F.interpolate`` bilinear to 299, ``2 x - 1``).
torchvision itself is not used: the only release pinned to torch 2.13.0 on PyPI (0.28.0) is a CUDA
build whose ``_C.so`` needs ``libtorch_cuda.so``, so it does not import next to the CPU torch wheel.
Weights are random (default torch init, BatchNorm scale/shift random) with BatchNorm running statistics
from one training-mode pass, variances then scaled by U(1, 2): every BatchNorm has non-trivial mean/var,
activations stay well scaled, and no near-zero variance amplifies round-off.
"""

import json
import struct

import jax
import numpy as np
import pytest

from diffjax.cli import main
from diffjax.eval import FIDInceptionV3, inception_features, load_inception

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
tnn, F = torch.nn, torch.nn.functional


class BasicConv2d(tnn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = tnn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg(x):
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tnn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg(x))], 1)


class InceptionB(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(tnn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class InceptionD(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(tnn.Module):
  """``FIDInceptionE_1`` (``max_pool=False``) and ``FIDInceptionE_2`` (``max_pool=True``)."""

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg(x)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class FIDInception3(tnn.Module):
  """torchvision ``Inception3(num_classes=1008, aux_logits=False)`` with pytorch-fid's blocks."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, 32)
    self.Mixed_5c = FIDInceptionA(256, 64)
    self.Mixed_5d = FIDInceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, 128)
    self.Mixed_6c = FIDInceptionC(768, 160)
    self.Mixed_6d = FIDInceptionC(768, 160)
    self.Mixed_6e = FIDInceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = tnn.Linear(2048, 1008)  # in the checkpoint, unused for FID

  def forward(self, x):
    """``[B, 3, H, W]`` in [-1, 1] -> ``[B, 2048]`` (pytorch-fid block 3 output, flattened)."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _reference_features(net, images_uint8):
  """pytorch-fid's pipeline: ``/255`` (ToTensor), RGB, bilinear resize to 299, ``2 x - 1``, network."""
  x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
  x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
  x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
  with torch.no_grad():
    return net(2 * x - 1).numpy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """``(net, path)``: the random reference network in eval mode and its state dict as safetensors."""
  torch.manual_seed(0)
  net = FIDInception3()
  for m in net.modules():
    if isinstance(m, tnn.BatchNorm2d):
      tnn.init.uniform_(m.weight, 0.5, 1.5)
      tnn.init.normal_(m.bias, 0.0, 0.2)
      m.momentum = None  # running stats := statistics of the one calibration batch
  with torch.no_grad():
    net.train()(torch.rand(8, 3, 75, 75) * 2 - 1)
    for m in net.modules():  # batch variances of near-constant channels would amplify round-off
      if isinstance(m, tnn.BatchNorm2d):
        m.running_var.mul_(torch.empty_like(m.running_var).uniform_(1.0, 2.0))
  net.eval()
  path = tmp_path_factory.mktemp("inception") / "fid_inception.safetensors"
  safetensors_torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
  return net, str(path)


@pytest.fixture(scope="module")
def variables(reference):
  return load_inception(reference[1])


def _rel_err(ours, ref):
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_pool_features_match_reference_at_75x75(reference, variables):
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 75, 75, 3)).astype(np.float32)
  with torch.no_grad():
    ref = reference[0](torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  ours = np.asarray(jax.jit(FIDInceptionV3().apply)(variables, x))
  assert ours.shape == (2, 2048) and ref.std() > 0.1  # activations neither vanish nor collapse
  assert _rel_err(ours, ref) < 1e-4


@pytest.fixture(scope="module")
def grey_sets(reference):
  """Two sets of three random grey 28x28 uint8 images and their reference features ``[3, 2048]``."""
  rng = np.random.default_rng(1)
  sets = [rng.integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8) for _ in range(2)]
  return [(images, _reference_features(reference[0], images)) for images in sets]


def test_inception_features_match_pytorch_fid_pipeline(reference, variables, grey_sets):
  images, ref = grey_sets[0]
  ours = inception_features(variables, images, batch_size=2)  # two batches, the second padded
  assert ours.shape == (3, 2048) and ours.dtype == np.float32
  assert _rel_err(ours, ref) < 1e-4
  floats = inception_features(variables, images.astype(np.float32) / 255.0, batch_size=2)
  np.testing.assert_allclose(floats, ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())


def _low_rank_fid(a, b):
  """FID of two small feature sets ``[n, D]`` (n << D) without D x D matrices.

  With ``S1 = A^T A`` and ``S2 = B^T B`` (A, B the centred features over ``sqrt(n - 1)``), the non-zero
  eigenvalues of ``S1 S2`` are the squared singular values of ``A B^T``, so ``Tr (S1 S2)^{1/2}`` is
  the nuclear norm of ``A B^T`` (``[n_a, n_b]``).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)
  cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
  mean_term = np.sum((a.mean(0) - b.mean(0)) ** 2)
  return mean_term + np.sum(ca**2) + np.sum(cb**2) - 2 * np.linalg.norm(ca @ cb.T, ord="nuc")


def _write_idx(directory, images):
  """Writes ``uint8 [N, H, W, 1]`` as MNIST ``train-*`` IDX files (labels all 0)."""
  n, h, w, _ = images.shape
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
  (directory / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + bytes(n))


def test_eval_cli_inception_fid_matches_reference(tmp_path, capsys, reference, grey_sets):
  (samples, samples_ref), (real, real_ref) = grey_sets
  np.savez(tmp_path / "s.npz", images=samples)
  _write_idx(tmp_path / "ref", real)
  argv = ["eval", "--samples", str(tmp_path / "s.npz"), "--inception", reference[1]]
  argv += ["--reference-source", "mnist_idx", "--reference-path", str(tmp_path / "ref")]
  assert main([*argv, "--inception-batch-size", "2"]) == 0
  result = json.loads(capsys.readouterr().out)
  expected = _low_rank_fid(samples_ref, real_ref)
  assert expected > 0 and result["inception_fid"] == pytest.approx(expected, rel=1e-3)
  assert result["num_samples"] == 3 and result["num_reference"] == 3 and "precision" not in result
  assert result["inception"] == reference[1] and result["reference"] == "mnist_idx/train"


def test_wrapper_names_and_ignored_keys_load(tmp_path, reference, variables):
  prefixes = {"Conv2d_1a_3x3": "blocks.0.0", "Mixed_5b": "blocks.2.0", "Mixed_7c": "blocks.3.2"}
  sd = {}
  for k, v in reference[0].state_dict().items():
    head, _, rest = k.partition(".")
    sd[f"{prefixes[head]}.{rest}" if head in prefixes else k] = v.contiguous()
  sd["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
  safetensors_torch.save_file(sd, str(tmp_path / "w.safetensors"))
  loaded = load_inception(tmp_path / "w.safetensors")
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)


@pytest.mark.parametrize(
  "edit, needle",
  [
    ("drop", "lack 1 parameter(s) of the FID Inception-v3: 'Mixed_5b.branch1x1.bn.running_mean'"),
    ("shape", "'Mixed_6e.branch7x7_2.conv.weight' in"),
    ("extra", "does not have: 'Mixed_8a.conv.weight'"),
  ],
)
def test_bad_parameters_are_named(tmp_path, reference, edit, needle):
  sd = {k: v.contiguous() for k, v in reference[0].state_dict().items()}
  if edit == "drop":
    del sd["Mixed_5b.branch1x1.bn.running_mean"]
  elif edit == "shape":
    sd["Mixed_6e.branch7x7_2.conv.weight"] = (
      sd["Mixed_6e.branch7x7_2.conv.weight"].transpose(2, 3).contiguous()
    )
  else:
    sd["Mixed_8a.conv.weight"] = torch.zeros(1)
  safetensors_torch.save_file(sd, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ValueError, match="inception") as err:
    load_inception(tmp_path / "bad.safetensors")
  assert needle in str(err.value)
  if edit == "shape":
    assert "has shape [192, 192, 7, 1], expected [192, 192, 1, 7]" in str(err.value)


def test_missing_file_and_bad_images(tmp_path, variables):
  with pytest.raises(FileNotFoundError, match="no.safetensors"):
    load_inception(tmp_path / "no.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
  with pytest.raises(ValueError, match="not a readable safetensors"):
    load_inception(tmp_path / "junk.safetensors")
  with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
    inception_features(variables, np.full((2, 8, 8, 3), -1.0, np.float32))
  with pytest.raises(ValueError, match="C in"):
    inception_features(variables, np.zeros((2, 8, 8, 2), np.uint8))
