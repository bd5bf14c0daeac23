"""The lean distribution (lean/: feature-trimmer-lean) is the main tree's own files: every
symlink resolves, the packages it declares are the directories it holds, and its modules
import nothing beyond themselves, the standard library and numpy at import time (optional
libraries only inside functions). .ci/lean-test builds and tests the wheel itself."""

from __future__ import annotations

import ast
import os
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEAN = ROOT / "lean"
PROJECT = ("flatbuffers_schema", "root_worker", "trimmer_daemon")
OPTIONAL = {"lz4", "torch", "pandas", "pyarrow"}  # imported inside functions only


def _modules() -> dict[str, Path]:
    found = {}
    paths = [Path(d) / f for d, _, files in os.walk(LEAN, followlinks=True) for f in files
             if f.endswith(".py")]
    for path in paths:
        rel = path.relative_to(LEAN)
        if rel.parts[0] not in PROJECT:
            continue
        parts = rel.with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def test_every_link_resolves_into_the_main_tree() -> None:
    links = [
        Path(d) / n for d, dirs, files in os.walk(LEAN) for n in dirs + files
        if (Path(d) / n).is_symlink()]
    assert links
    for link in links:
        target = link.resolve()
        assert target.exists(), f"{link} -> {target}"
        assert ROOT in target.parents and LEAN not in target.parents, link


def test_declared_packages_are_the_packages_it_holds() -> None:
    conf = tomllib.loads((LEAN / "pyproject.toml").read_text())
    declared = set(conf["tool"]["setuptools"]["packages"])
    held = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert declared == held
    assert conf["project"]["dependencies"] == ["numpy>=1.26,<3"]


def test_lean_modules_import_only_lean_modules_and_numpy() -> None:
    modules = _modules()
    stdlib = set(sys.stdlib_module_names)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top in PROJECT:
                    # a module, or a name from a module (the longest prefix that is one)
                    assert target in modules or target.rsplit(".", 1)[0] in modules, (
                        f"{name} imports {target}, which lean/ does not ship")
                elif top not in stdlib and top not in {"numpy", "__future__"}:
                    assert top in OPTIONAL and id(node) not in top_level, (
                        f"{name} imports {target} at import time: not a lean dependency")
