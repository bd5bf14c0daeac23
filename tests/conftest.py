"""Shared fixtures: unique shared-memory prefixes that are checked for leftovers, and the
two-bundle set the daemon tests start their daemons on."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import F1, F3, model_doc, write_bundle

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


@pytest.fixture
def bundles(tmp_path: Path) -> dict[str, Path]:
    """Bundles ``ads`` (model ctr, version 1, F1) and ``feed`` (rank, 1, F3) on disk."""
    paths = {"ads": tmp_path / "ads" / "module_info.json",
             "feed": tmp_path / "feed" / "module_info.json"}
    write_bundle(paths["ads"], model_doc("ctr", "1", F1))
    write_bundle(paths["feed"], model_doc("rank", "1", F3))
    return paths
