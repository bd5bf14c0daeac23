"""The import rules between the packages (README "Layout"): each room imports only what its
process needs. Checked in fresh interpreters, with the forbidden modules made unimportable."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A meta-path finder that refuses the named top-level modules, as on a host without them.
_BLOCK = """
import sys
class _Block:
    def __init__(self, names): self.names = set(names)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"{{name}} is blocked in this test", name=name)
        return None
sys.meta_path.insert(0, _Block({blocked!r}))
"""

ROOT_SIDE = ["gunicorn", "posix_ipc", "inotify_simple", "prometheus_client", "lz4",
             "flatbuffers"]


def _run(code: str, blocked: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCK.format(blocked=blocked) + code],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_blocker_really_blocks() -> None:
    r = _run("import gunicorn", ["gunicorn"])
    assert r.returncode != 0 and "blocked in this test" in r.stderr


@pytest.mark.parametrize("module", ["root_worker.frame", "flatbuffers_schema.keys"])
def test_frame_package_needs_numpy_only(module: str) -> None:
    code = f"""
import {module}
from root_worker.frame import encode, decode, trim, Ragged
import numpy as np
cols = {{"a": np.arange(4, dtype=np.float32),
        "b": Ragged.from_lists([[1], [2, 3], [], [4]], np.int64)}}
buf = encode(cols, {{}})
assert decode(buf).n_candidates == 4
"""
    r = _run(code, ROOT_SIDE)
    assert r.returncode == 0, r.stderr


def test_wire_and_layout_contracts_need_the_standard_library_only() -> None:
    code = "import flatbuffers_schema.wire, flatbuffers_schema.shm_layout, " \
           "flatbuffers_schema.atomic_file, flatbuffers_schema.settings"
    r = _run(code, ROOT_SIDE + ["numpy"])
    assert r.returncode == 0, r.stderr


def test_bundle_parser_needs_no_daemon_and_no_root() -> None:
    code = ("import sys; import trimmer_daemon.bundle.parse\n"
            "bad = [m for m in sys.modules if m.startswith(('root_worker', 'trimmer_daemon.'))"
            " and not m.startswith('trimmer_daemon.bundle')]\n"
            "assert not bad, bad")
    r = _run(code, ["gunicorn", "posix_ipc", "inotify_simple", "prometheus_client", "lz4",
                    "numpy"])
    assert r.returncode == 0, r.stderr


def test_the_service_loads_no_leaf_no_harness_no_oncall_no_daemon() -> None:
    code = """
import sys
import root_worker.app, root_worker.gunicorn_conf
bad = sorted(m for m in sys.modules if m.startswith(
    ("root_worker.leaf", "root_worker.testing", "root_worker.oncall", "trimmer_daemon",
     "inotify_simple")))
assert not bad, bad
"""
    r = _run(code, [])
    assert r.returncode == 0, r.stderr


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


RULES = {  # package -> module prefixes its files may never import (even lazily)
    "root_worker/service": ("root_worker.leaf", "root_worker.testing", "root_worker.oncall",
                            "trimmer_daemon"),
    "root_worker/featuremap": ("root_worker.leaf", "root_worker.testing", "root_worker.oncall",
                               "root_worker.service", "trimmer_daemon"),
    "root_worker/frame": ("root_worker.", "trimmer_daemon", "posix_ipc", "gunicorn",
                          "prometheus_client", "inotify_simple", "lz4", "flatbuffers."),
    "flatbuffers_schema": ("root_worker", "trimmer_daemon"),
    "trimmer_daemon": ("root_worker",),
}
ALLOWED_INSIDE = {"root_worker/frame": ("root_worker.frame",)}


@pytest.mark.parametrize("package", sorted(RULES))
def test_static_import_rules(package: str) -> None:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            if name.startswith(ALLOWED_INSIDE.get(package, ())):
                continue
            if name.startswith(RULES[package]):
                found.append(f"{path.relative_to(ROOT)}: {name}")
    assert not found, "\n".join(found)


def test_every_package_says_which_process_runs_it() -> None:
    inits = sorted(p for p in (ROOT / "root_worker").rglob("__init__.py")) + [
        ROOT / "trimmer_daemon" / "__init__.py",
        ROOT / "trimmer_daemon" / "bundle" / "__init__.py",
        ROOT / "flatbuffers_schema" / "__init__.py"]
    for init in inits:
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Runs in" in doc and "May import" in doc, f"{init.relative_to(ROOT)}: {doc[:80]!r}"


def test_packaging_habits() -> None:
    cfg = (ROOT / "setup.cfg").read_text()
    assert "license = Apache-2.0" in cfg
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    for pkg in ("flatbuffers_schema", "root_worker", "trimmer_daemon"):
        assert (ROOT / pkg / "py.typed").exists(), pkg
    assert "ruff==" in cfg and "mypy==" in cfg, "lint tools are pinned in the lint extra"
    assert "make lint" in (ROOT / ".ci" / "run").read_text()
