"""Tests that import torchtitan 0.3.0: they run in the 0.3.0 environment only (see
tests/test_torchtitan030.py, which runs them in a subprocess of their own; the main environment has
torchtitan 0.2.2, and the two cannot share one interpreter)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: harness, reference

torchtitan = pytest.importorskip("torchtitan")
if not torchtitan.__version__.startswith("0.3."):
    pytest.exit(f"tests/torchtitan030 needs torchtitan 0.3.x, found {torchtitan.__version__}", returncode=4)
