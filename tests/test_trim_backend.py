"""Which trim backend serves, and why, is said where operators look.

``root_worker.frame.backends.describe_backend`` is the one home; ``trimmer-inspect status``
(text and ``--json``) shows it, as do ``/healthz`` and ``/metrics`` of the root (checked on
a real pool in ``test_root_service.py``).  A build without a C compiler installs, with a
warning naming the numpy fallback, and the fallback is then named with its cause.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from root_worker.frame import Trimmer
from root_worker.frame import backends as frame_backends
from root_worker.frame.backends import describe_backend

ROOT = Path(__file__).resolve().parent.parent
INSPECT = Path(sys.executable).with_name("trimmer-inspect")
# A status check of a prefix nobody publishes under: CRITICAL, but every fact is printed.
NO_MAP = f"ft-test-backend-{uuid.uuid4().hex[:8]}"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_describe_backend_names_the_default_trimmer_backend() -> None:
    info = describe_backend()
    assert info["backend"] == Trimmer().backend == frame_backends.BACKEND
    if frame_backends.HAVE_C:
        assert info == {"backend": "c", "kernel": frame_backends.KERNEL,
                        "reason": f"C accelerator ({frame_backends.KERNEL} copy kernel)"}
        numpy = describe_backend("numpy")
        assert numpy["backend"] == "numpy" and "chosen explicitly" in str(numpy["reason"])


@pytest.mark.skipif(not INSPECT.exists(), reason="trimmer-inspect is not installed here")
def test_status_shows_the_backend_serving() -> None:
    done = subprocess.run([str(INSPECT), "--shm-name", NO_MAP, "status"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"trim backend  {describe_backend()['reason']}" in done.stdout
    done = subprocess.run([str(INSPECT), "--shm-name", NO_MAP, "--json", "status"],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout)["trim_backend"] == describe_backend()


FALLBACK = """
import json, sys
sys.modules["root_worker.frame._copyruns"] = None  # as if the build had no compiler
from root_worker.oncall.cli import main
main(["--shm-name", sys.argv[1], "status"])
print("JSON", end="")
main(["--shm-name", sys.argv[1], "--json", "status"])
"""


def test_status_names_the_numpy_fallback_and_its_cause() -> None:
    done = run_python(FALLBACK, NO_MAP)
    text, doc = done.stdout.split("JSON")
    assert "trim backend  numpy: C accelerator not built (import of " in text, text
    assert json.loads(doc)["trim_backend"]["backend"] == "numpy"
    assert "reinstall with a C compiler" in json.loads(doc)["trim_backend"]["reason"]


def test_a_build_without_a_compiler_warns_and_installs(tmp_path: Path) -> None:
    """setup.py with CC=/bin/false: the build succeeds without the extension, and says so."""
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "VERSION"):
        shutil.copy(ROOT / name, tmp_path / name)
    frame = tmp_path / "root_worker" / "frame"
    frame.mkdir(parents=True)
    for src in (ROOT / "root_worker" / "frame").glob("_*.[ch]"):
        shutil.copy(src, frame / src.name)
    env = {"PATH": "/usr/bin:/bin", "CC": "/bin/false", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "C accelerator (root_worker.frame._copyruns) was not built" in done.stderr
    assert "numpy fallback" in done.stderr and "/bin/false" in done.stderr
    assert not list(frame.glob("_copyruns*.so"))
    # with the real compiler the same tree builds the accelerator, without the warning
    if shutil.which("gcc"):
        env["CC"] = "gcc"
        done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                              cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0 and "was not built" not in done.stderr, done.stderr
        assert list(frame.glob("_copyruns*.so"))
