"""What the lean install's test files (.ci/lean-test) share: optional libraries.

The main suite has lz4, torch, pandas and pyarrow (the test extra): a test that needs one
imports it and fails loudly if it is missing. Only the lean venv (FT_LEAN_TEST=1, numpy and
pytest alone) skips those tests."""

from __future__ import annotations

import importlib
import os
from typing import Any

import pytest

LEAN = os.environ.get("FT_LEAN_TEST") == "1"


def optional(module: str) -> Any:
    """``module`` imported; in the lean venv, the test skips without it."""
    if LEAN:
        return pytest.importorskip(module)
    return importlib.import_module(module)
