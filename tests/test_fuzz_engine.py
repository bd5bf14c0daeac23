"""The trim engine's fuzz harness (fuzz/engine/) keeps working: a short unsanitized run of
the target reaches every case, a saved input replays, a failing input is saved, and the
sanitized child setup reports a known heap overflow (the check that the ASan runs in
``make fuzz-engine`` and CI could fail at all)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from root_worker.frame import backends

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz" / "engine"
pytestmark = pytest.mark.skipif(not backends.HAVE_C, reason="C extension not built")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_target_reaches_every_case(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    done = run(str(FUZZ / "trim_target.py"), "--seconds=3", "--seed=7",
               f"--artifacts={tmp_path}", f"--stats={stats}")
    assert done.returncode == 0, done.stderr
    figures = json.loads(stats.read_text())
    assert figures["inputs"] > 100 and figures["trims"] > 100
    for key in ("frames_ok", "frames_refused", "raw_calls", "plans_forged_refused",
                "plans_other_key", "reentry_cases", "reentry_inside",
                *(f"trim_mode_{m}" for m in range(5))):
        assert figures.get(key, 0) > 0, (key, figures)
    assert not list(tmp_path.glob("crash-*"))


def test_replay_and_a_failing_input_is_saved(tmp_path: Path) -> None:
    sample = tmp_path / "input"
    sample.write_bytes(bytes(range(256)) * 8)
    done = run(str(FUZZ / "trim_target.py"), f"--replay={sample}")
    assert done.returncode == 0 and "passes" in done.stderr, done.stderr
    # A target whose C backend disagrees with numpy must stop, save the input and say so.
    broken = tmp_path / "broken.py"
    broken.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(FUZZ)!r})\n"
        "import trim_target\n"
        "from root_worker.frame import Trimmer\n"
        "real = Trimmer.trim_parts\n"
        "def wrong(self, *a, **k):\n"
        "    res = real(self, *a, **k)\n"
        "    return res._replace(parts=[b'x', *res.parts]) if self.backend == 'c' else res\n"
        "Trimmer.trim_parts = wrong\n"
        "sys.exit(trim_target.main(sys.argv[1:]))\n")
    done = run(str(broken), "--seconds=20", "--seed=1", f"--artifacts={tmp_path}")
    assert done.returncode == 1, done.stderr
    saved = list(tmp_path.glob("crash-*"))
    assert len(saved) == 1 and "FAILED on input" in done.stderr
    assert "c trim_parts differs" in done.stderr


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc's ASan runtime")
def test_sanitized_setup_reports_a_known_overflow() -> None:
    done = run(str(FUZZ / "sanitized.py"), "selfcheck", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "selfcheck ok" in done.stderr
