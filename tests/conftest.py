import os
import sys

# Make `tests.*` helpers and the repo's `configs/` importable however pytest is invoked.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
