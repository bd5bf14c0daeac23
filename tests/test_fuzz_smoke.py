"""Every atheris fuzz target (``fuzz/``) runs for a bounded time and finds nothing.

Each target runs in its own process through ``python -m fuzz.run`` (its seed corpus first:
valid inputs and the regression inputs of known faults, then coverage-guided mutations for
``SECONDS``); a finding -- an exception other than the entry point's documented errors, a
broken invariant, a timeout, an out-of-memory -- fails the test with libFuzzer's report.
``make fuzz`` runs the same targets longer (``FUZZ_SECONDS``, default 300).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import ROOT

pytest.importorskip("atheris", reason="atheris is not installed (the 'fuzz' extra)")

SECONDS = 8
TARGETS = ["http_request", "http_response", "frame_codec", "trim_checks", "bundle_parser",
           "targets_parser"]


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_nothing(target: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fuzz.run", "--seconds", str(SECONDS),
                           "--workdir", str(tmp_path), target], cwd=ROOT,
                          capture_output=True, text=True, timeout=SECONDS + 120)
    print(proc.stdout.splitlines()[0] if proc.stdout else proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_every_target_is_smoke_tested() -> None:
    from fuzz.seeds import SEEDS

    assert sorted(SEEDS) == sorted(TARGETS)
    assert sorted(p.stem for p in (ROOT / "fuzz").glob("*.py")
                  if p.stem not in ("__init__", "harness", "http_adapter", "run", "seeds")
                  ) == sorted(TARGETS)
