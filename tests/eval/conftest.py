"""Shared fixtures: one digits judge per test session (trained once, ~10 s on 2 CPU cores)."""

import pytest

from diffjax.data import load_digits, split_holdout
from diffjax.eval import train_judge

JUDGE_SEED = 0
JUDGE_HOLDOUT = 0.2


@pytest.fixture(scope="session")
def digits():
  return load_digits()


@pytest.fixture(scope="session")
def digits_split(digits):
  """``(train, heldout)``: the same split :func:`train_judge` makes, so ``heldout`` is unseen by the judge."""
  return split_holdout(digits, holdout=JUDGE_HOLDOUT, seed=JUDGE_SEED)


@pytest.fixture(scope="session")
def digits_judge(digits):
  """``(params, info)`` of a judge trained on sklearn digits with 20% held out."""
  return train_judge(
    digits, seed=JUDGE_SEED, steps=300, batch_size=128, learning_rate=2e-3, holdout=JUDGE_HOLDOUT
  )
