"""The committed flatc output is exactly what flatc generates from the committed schema."""

from __future__ import annotations

from pathlib import Path

from flatbuffers_schema import regen


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    root = regen.generate(tmp_path)
    assert (root / "fmap" / "FeatureMap.py").is_file(), "flatc produced no FeatureMap module"
    assert regen.differences(root) == []


def test_check_detects_a_stale_file(tmp_path: Path) -> None:
    root = regen.generate(tmp_path)
    stale = root / "fmap" / "Version.py"
    stale.write_text(stale.read_text() + "\n# edited by hand\n")
    assert regen.differences(root) == ["fmap/Version.py differs from flatc output"]
