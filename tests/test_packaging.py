"""Packaging: the wheel builds without setuptools warnings and carries the C reader and the
demo's example data; the sdist carries what it takes to test, deploy and read about the
project; ``python -m root_worker.testing.demo`` runs from the unpacked wheel (no checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ("import sys; from setuptools import build_meta; "
         "print(getattr(build_meta, sys.argv[1])(sys.argv[2]))")


def _build(hook: str, out: Path) -> tuple[Path, str]:
    """A PEP 517 hook of setuptools, run in the tree as pip would (no isolation: the
    venv's setuptools); returns the artefact and everything the build printed."""
    proc = subprocess.run([sys.executable, "-c", BUILD, hook, str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1], proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _build("build_wheel", tmp_path_factory.mktemp("wheel"))


def test_the_wheel_builds_without_warnings_and_holds_its_data(wheel: tuple[Path, str]) -> None:
    path, log = wheel
    assert "absent from the `packages` configuration" not in log, log
    assert "is absent from" not in log
    names = set(zipfile.ZipFile(path).namelist())
    for member in ("flatbuffers_schema/c/ft_frame.h", "flatbuffers_schema/feature_map.fbs",
                   "root_worker/testing/example-data/features.json",
                   "root_worker/testing/example-data/bundles/ads/module_info.json",
                   "root_worker/testing/example-data/bundles/homefeed-v2/module_info.json"):
        assert member in names, member


def test_the_sdist_holds_tests_docs_examples_units_and_deploy(tmp_path: Path) -> None:
    path, _ = _build("build_sdist", tmp_path)
    with tarfile.open(path) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for member in ("tests/test_deploy.py", "tests/data/golden/manifest.json",
                   "docs/kubernetes.md", "docs/leaf-sdk.md", "examples/daemon.toml",
                   "examples/bundles/ads/module_info.json", "systemd/feature-trimmer.service",
                   "deploy/kubernetes/base/kustomization.yaml",
                   "deploy/prometheus/feature-trimmer.rules.yml", "Containerfile", "Makefile",
                   ".ci/run", ".ci/private-shm", "VERSION", "lean/pyproject.toml",
                   "lean/root_worker/leaf/sdk.py",
                   "bench/report.py"):
        assert member in names, member
    assert not [n for n in names if n.endswith((".so", ".pyc")) or "__pycache__" in n]


def test_the_demo_runs_from_the_unpacked_wheel(wheel: tuple[Path, str], tmp_path: Path) -> None:
    """Unpacked as pip installs it, run from its own directory: the project's modules and
    the example data come from the wheel, the dependencies from this environment."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel[0]).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import root_worker.testing.stack as s; "
                            "print(s.__file__); print(s.EXAMPLES_DIR)"], cwd=site, env=env,
                           capture_output=True, text=True, timeout=60)
    module, examples = where.stdout.split()
    assert module.startswith(str(site)) and examples.startswith(str(site)), where
    demo = subprocess.run([sys.executable, "-m", "root_worker.testing.demo", "demo",
                           "--requests", "4", "--clients", "1", "--candidates", "4"],
                          cwd=site, env=env, capture_output=True, text=True, timeout=240)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "demo passed" in demo.stdout
    bad = subprocess.run([sys.executable, "-m", "root_worker.testing.demo", "--examples",
                          str(tmp_path)], cwd=site, env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "no features.json" in bad.stderr
    assert "Traceback" not in bad.stderr
