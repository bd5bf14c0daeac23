"""The trim engine's C extension under AddressSanitizer and UBSan: its tests and a fuzz run.

Builds ``root_worker/frame/_copyruns.c`` with ``gcc -fsanitize=address,undefined`` into a
temporary folder (the installed extension is left alone), then runs, in a child
interpreter that preloads gcc's ASan runtime and imports that build as
``root_worker.frame._copyruns``:

    python fuzz/engine/sanitized.py tests [PYTEST ARGS]   # the frame tests (default: all)
    python fuzz/engine/sanitized.py fuzz --seconds 60     # trim_target.py, bounded
    python fuzz/engine/sanitized.py selfcheck             # the setup reports a known overflow

Every memory error (heap overflow, use after free, overlapping ``memcpy``) and every
undefined behaviour (misaligned load, overflow, out-of-range shift) aborts the child with
its report on stderr, so the command fails.  ``PYTHONMALLOC=malloc`` gives every Python
object its own ASan-tracked allocation (redzones around ``bytes`` and ``bytearray``
buffers).  Leak checking is off: CPython keeps interned objects until exit by design.

Needs only gcc with libasan and libubsan (Debian's gcc has both).  ``make fuzz-engine``
runs the fuzzer for ``FUZZ_SECONDS``; ``.ci/run`` runs the tests and a short fuzz run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "root_worker" / "frame" / "_copyruns.c"
MODULE = "root_worker.frame._copyruns"
FRAME_TESTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_frame_*.py"))
CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
          "-fno-sanitize-recover=all", "-Wall", "-Werror", "-shared", "-fPIC"]
SANITIZER_ENV = {
    "PYTHONMALLOC": "malloc",
    # halt at the first report, with a stack; overlapping memcpy is checked (the default)
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_memcmp=1:"
                    "detect_stack_use_after_return=1:quarantine_size_mb=64",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:abort_on_error=1",
}
BUILD_TIMEOUT = 120


def build(into: Path) -> Path:
    """Compile the sanitized extension into ``into``; return the .so path."""
    cc = os.environ.get("CC", "gcc")
    so = into / f"_copyruns{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = [cc, *CFLAGS, f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(so)]
    subprocess.run(cmd, check=True, timeout=BUILD_TIMEOUT)
    return so


def runtime() -> str:
    """The ASan runtime to preload (it must come before every other library)."""
    cc = os.environ.get("CC", "gcc")
    path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise SystemExit(f"sanitized: {cc} has no libasan.so (install gcc's ASan runtime)")
    return os.path.realpath(path)


def child_env() -> dict[str, str]:
    env = dict(os.environ, **SANITIZER_ENV, LD_PRELOAD=runtime())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_child(so: Path, mode: str, args: list[str], timeout: float) -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", str(so), mode, *args]
    try:
        return subprocess.run(cmd, env=child_env(), cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"sanitized: {mode} did not finish in {timeout:.0f} s", file=sys.stderr)
        return 1


# --- in the child ------------------------------------------------------------------------------
def load_sanitized(so: str) -> None:
    """Import the sanitized build as the package's _copyruns, before anything imports it."""
    maps = Path("/proc/self/maps").read_text()
    if "libasan" not in maps:
        raise SystemExit("sanitized: the ASan runtime is not loaded (LD_PRELOAD)")
    spec = importlib.util.spec_from_file_location(MODULE, so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    spec.loader.exec_module(module)


def verify_sanitized(so: str) -> None:
    """Fail unless the frame package serves the C backend from the sanitized build."""
    from root_worker.frame import backends

    if backends._copyruns is not sys.modules[MODULE] or "c" not in backends.BACKENDS:
        raise SystemExit("sanitized: the frame package did not pick up the sanitized build")
    print(f"sanitized: {MODULE} from {so} (kernel {backends.KERNEL}), ASan + UBSan",
          file=sys.stderr)


def child(argv: list[str]) -> int:
    so, mode, rest = argv[0], argv[1], argv[2:]
    if mode == "selfcheck":
        return selfcheck_child()
    load_sanitized(so)
    if mode == "tests":
        import pytest

        verify_sanitized(so)
        return int(pytest.main(["-q", "-p", "no:cacheprovider", *(rest or FRAME_TESTS)]))
    if mode == "fuzz":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import trim_target

        verify_sanitized(so)
        return int(trim_target.main(rest))
    raise SystemExit(f"sanitized: unknown mode {mode!r}")


def selfcheck_child() -> int:
    """Write one byte past a bytearray's end: the preloaded ASan must abort this process."""
    import ctypes

    buf = bytearray(64)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ctypes.memmove(base + 60, b"\x01" * 16, 16)  # (bytearray keeps 1 spare byte)
    print("sanitized: selfcheck wrote past the buffer unnoticed", file=sys.stderr)
    return 0


# --- commands ----------------------------------------------------------------------------------
def selfcheck() -> None:
    """Fail unless the child setup (preload, PYTHONMALLOC) reports a heap overflow."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", "-", "selfcheck"]
    done = subprocess.run(cmd, env=child_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    if done.returncode == 0 or "heap-buffer-overflow" not in done.stderr:
        sys.stderr.write(done.stderr)
        raise SystemExit("sanitized: selfcheck failed: ASan did not report a known overflow")
    print("sanitized: selfcheck ok (ASan reports a heap overflow in the child setup)",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tests = sub.add_parser("tests", help="run the frame tests against the sanitized build")
    tests.add_argument("pytest_args", nargs=argparse.REMAINDER)
    tests.add_argument("--timeout", type=float, default=600)
    fz = sub.add_parser("fuzz", help="run fuzz/engine/trim_target.py against the sanitized build")
    fz.add_argument("--seconds", type=float, default=60)
    fz.add_argument("--seed", type=int, default=None, help="the generator's seed (default: random)")
    fz.add_argument("--artifacts", type=Path, default=None,
                    help="where a failing input goes (default: a temporary folder, kept on "
                         "failure)")
    fz.add_argument("--replay", type=Path, default=None, help="run one saved input")
    fz.add_argument("--stats", type=Path, default=None, help="also write the run's figures here")
    sub.add_parser("selfcheck", help="check that the setup reports a known heap overflow")
    opts = parser.parse_args(argv)
    selfcheck()
    if opts.command == "selfcheck":
        return 0
    with tempfile.TemporaryDirectory(prefix="ft-sanitized-") as tmp:
        so = build(Path(tmp))
        if opts.command == "tests":
            return run_child(so, "tests", opts.pytest_args, opts.timeout)
        return fuzz(so, Path(tmp), opts.seconds, opts.artifacts, opts.seed, opts.replay,
                    opts.stats)


def fuzz(so: Path, tmp: Path, seconds: float, artifacts: Path | None, seed: int | None,
         replay: Path | None, stats_out: Path | None) -> int:
    if replay is not None:
        return run_child(so, "fuzz", [f"--replay={replay.resolve()}"], timeout=300)
    keep = artifacts is not None
    artifacts = (artifacts or Path(tempfile.mkdtemp(prefix="ft-fuzz-engine-"))).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    stats = tmp / "stats.json"
    args = [f"--seconds={seconds}", f"--artifacts={artifacts}", f"--stats={stats}"]
    if seed is not None:
        args.append(f"--seed={seed}")
    start = time.monotonic()
    code = run_child(so, "fuzz", args, timeout=seconds + 300)
    figures = json.loads(stats.read_text()) if stats.exists() else {}
    figures.update(wall_seconds=round(time.monotonic() - start, 1), exit_code=code,
                   outcome="no findings" if code == 0 else "FAILED")
    crashes = sorted(str(p) for p in artifacts.iterdir())
    if crashes:
        figures["artifacts"] = crashes
    print("fuzz-engine: " + json.dumps(figures, sort_keys=True), file=sys.stderr)
    if stats_out is not None:
        stats_out.write_text(json.dumps(figures, sort_keys=True, indent=1) + "\n")
    if code == 0 and not crashes and not keep:
        shutil.rmtree(artifacts, ignore_errors=True)
    elif code != 0:
        print(f"fuzz-engine: inputs kept in {artifacts}; replay one with: python "
              f"fuzz/engine/sanitized.py fuzz --replay FILE", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
