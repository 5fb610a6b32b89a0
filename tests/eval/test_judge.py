"""The judge classifier: accuracy on digits, features, save/load round trip, data fingerprint check."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from diffjax.data import to_model_range
from diffjax.eval import FEATURE_DIM, features, features_and_logits, load_judge, save_judge


def test_judge_reaches_95_percent_on_heldout_digits(digits, digits_split, digits_judge):
  _, info = digits_judge
  train, held = digits_split
  assert info["heldout_accuracy"] >= 0.95, info
  assert info["num_heldout"] == len(held) and info["num_train"] == len(train)
  assert info["data_fingerprint"] == digits.fingerprint()
  assert info["image_shape"] == [8, 8, 1] and info["num_classes"] == 10
  json.dumps(info)  # JSON-friendly.


def test_features_shapes_and_uint8_equals_model_range(digits_split, digits_judge):
  params, _ = digits_judge
  images = digits_split[1].images[:37]
  f_u8, lg = features_and_logits(params, images, batch_size=16)  # Exercises the padded last batch.
  assert f_u8.shape == (37, FEATURE_DIM) and lg.shape == (37, 10) and f_u8.dtype == np.float32
  np.testing.assert_allclose(features(params, to_model_range(images)), f_u8, rtol=1e-5, atol=1e-5)
  assert np.all(f_u8 >= 0.0)  # Post-ReLU activations.


def test_features_refuse_images_of_another_shape(digits_judge):
  params, _ = digits_judge
  with pytest.raises(ValueError, match=r"images of shape \[H, W, C\]=\[28, 28, 1\] do not fit this judge"):
    features(params, np.zeros((2, 28, 28, 1), np.uint8))
  with pytest.raises(ValueError, match=r"images must be a non-empty \[N, H, W, C\] array"):
    features(params, np.zeros((8, 8, 1), np.uint8))


def test_save_load_round_trip(tmp_path, digits, digits_judge):
  params, info = digits_judge
  path = tmp_path / "sub" / "judge.safetensors"
  save_judge(path, params, info)
  loaded, loaded_info = load_judge(path, expected_fingerprint=digits.fingerprint())
  assert loaded_info == info
  assert set(loaded) == set(params) == {"conv1", "conv2", "features", "head"}
  for layer in params:
    for name in params[layer]:
      np.testing.assert_array_equal(loaded[layer][name], np.asarray(params[layer][name]))
  x = digits.images[:5]
  np.testing.assert_array_equal(features(loaded, x), features(params, x))


def test_judge_trained_on_other_data_is_refused(tmp_path, digits, digits_judge):
  params, info = digits_judge
  path = tmp_path / "judge.safetensors"
  save_judge(path, params, info)
  other = digits.subset(np.arange(100)).fingerprint()
  with pytest.raises(
    ValueError, match=f"fingerprint {info['data_fingerprint']}, expected fingerprint {other}"
  ):
    load_judge(path, expected_fingerprint=other)


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="judge file .* does not exist"):
    load_judge(tmp_path / "missing.safetensors")
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="is not a readable safetensors file"):
    load_judge(bad)
  plain = tmp_path / "plain.safetensors"
  save_file({"w": np.zeros(3, np.float32)}, str(plain))
  with pytest.raises(ValueError, match="has no 'diffjax_judge_info' metadata"):
    load_judge(plain)
