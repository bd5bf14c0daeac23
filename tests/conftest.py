"""Shared fixtures: unique shared-memory prefixes that are checked for leftovers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from flatbuffers_schema.shm_layout import SHM_DIR
from flatbuffers_schema.shm_layout import segment_files as shm_leftovers


@pytest.fixture
def shm_prefix() -> Iterator[str]:
    """A unique shm prefix; the test fails if any of its segments is left in /dev/shm."""
    prefix = f"fttest_{uuid.uuid4().hex[:12]}"
    yield prefix
    left = shm_leftovers(prefix)
    for name in left:
        os.unlink(os.path.join(SHM_DIR, name))
    assert not left, f"segments left in {SHM_DIR}: {left}"
