import ml_collections
import pytest

from diffjax.config_files import apply_overrides


def _c():
  return ml_collections.ConfigDict(
    {"weighting": "min_snr", "path": "data", "steps": 3, "lr": 1e-3, "flag": False, "levels": (1, 2), "opt": None}
  )


def test_string_fields_take_the_text_verbatim_including_none():
  c = apply_overrides(_c(), {"weighting": "none", "path": "None"})
  assert c.weighting == "none"  # a valid value of diffusion.weighting, not Python's None
  assert c.path is None  # only Python's spelling clears a string field


def test_typed_fields_parse_and_check():
  c = apply_overrides(_c(), {"steps": "7", "lr": "2", "flag": "true", "levels": "[3, 4]", "opt": "null"})
  assert (c.steps, c.lr, c.flag, c.levels, c.opt) == (7, 2.0, True, (3, 4), None)
  assert isinstance(c.lr, float)
  with pytest.raises(ValueError, match="config.steps"):
    apply_overrides(_c(), {"steps": "many"})
