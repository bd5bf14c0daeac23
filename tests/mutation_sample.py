"""The CI sample of mutation testing (``make mutate-sample``, docs/testing.md).

    python tests/mutation_sample.py

A fixed few functions whose bugs cost correctness -- the ragged-offsets check, the trim's
request checks and plan caches (``Trimmer._prepare``), the publisher's flip and restart
recovery, the watcher's hold tracking, the buffer pool's take and charge -- mutated by mutmut
in a scratch copy of the tree (``build/mutate-sample``) whose ``[mutmut]`` section names
only their files and the tests that cover them, so mutmut's fixed costs (generating
mutants, one clean and one coverage run of the test subset) stay small. Then the report
in ``--strict`` mode: exit 1 if a mutant survived that docs/testing.md does not list as
equivalent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "build" / "mutate-sample"
SAMPLE = {  # file -> the mutants of it in the sample (mutmut names, fnmatch patterns)
    "root_worker/frame/format.py": ["root_worker.frame.format.x_check_ragged_offsets__*"],
    "root_worker/frame/trim.py": ["root_worker.frame.trim.xǁTrimmerǁ_prepare__*"],
    "trimmer_daemon/publisher.py": ["trimmer_daemon.publisher.*_flip__*",
                                    "trimmer_daemon.publisher.*_recover__*"],
    "trimmer_daemon/watcher.py": ["trimmer_daemon.watcher.*_track_writers__*"],
    "root_worker/service/buffers.py": ["root_worker.service.buffers.*_take__*",
                                       "root_worker.service.buffers.*charge__*"],
}
TESTS = ["tests/test_frame_parts.py", "tests/test_golden.py", "tests/test_frame_trim.py",
         "tests/test_frame_malformed.py", "tests/test_frame_aliasing.py",
         "tests/test_frame_fastpath.py", "tests/test_shm.py", "tests/test_watcher_hold.py",
         "tests/test_buffers.py"]
DESELECT = ["tests/test_shm.py::test_torn_read_stress",
            "tests/test_shm.py::test_kill_minus_nine_during_publication"]
TREES = ["root_worker", "flatbuffers_schema", "trimmer_daemon", "tests", "docs"]
FILES = ["README.md", "Makefile", "pyproject.toml"]


def _config() -> str:
    """setup.cfg with its [mutmut] section replaced by the sample's."""
    text = (ROOT / "setup.cfg").read_text()
    text = re.sub(r"(?ms)^\[mutmut\]\n.*?(?=^\[|\Z)", "", text)

    def block(key: str, values: list[str]) -> str:
        return f"{key} =\n" + "".join(f"    {v}\n" for v in values)

    return (text.rstrip("\n") + "\n\n[mutmut]\n" + block("source_paths", TREES[:3])
            + block("only_mutate", list(SAMPLE)) + block("pytest_add_cli_args_test_selection",
                                                         TESTS)
            + block("pytest_add_cli_args", [f"--deselect={t}" for t in DESELECT])
            + block("also_copy", ["docs", *FILES]))


def main() -> int:
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", "mutants")
    for tree in TREES:
        shutil.copytree(ROOT / tree, SCRATCH / tree, ignore=ignore)
    for name in FILES:
        shutil.copy2(ROOT / name, SCRATCH / name)
    (SCRATCH / "setup.cfg").write_text(_config())
    mutmut = str(Path(sys.executable).parent / "mutmut")
    patterns = [p for ps in SAMPLE.values() for p in ps]
    run = subprocess.run([mutmut, "run", "--max-children", "2", *patterns],
                         cwd=SCRATCH, stdout=subprocess.DEVNULL)
    if run.returncode:
        print(f"mutmut run failed ({run.returncode}); see {SCRATCH}", file=sys.stderr)
        return run.returncode
    report = subprocess.run([sys.executable, str(SCRATCH / "tests" / "mutation_report.py"),
                             "--strict"], cwd=SCRATCH)
    return report.returncode


if __name__ == "__main__":
    sys.exit(main())
