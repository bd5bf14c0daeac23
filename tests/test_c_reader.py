"""The single-header C reader (flatbuffers_schema/c/ft_frame.h): built with gcc
``-std=c99 -Wall -Wextra -Werror -pedantic`` (plus AddressSanitizer/UBSan when the toolchain
has them, so an out-of-bounds read fails the test), run over the golden vectors and over
thousands of corrupted frames; it must accept and reject exactly what the Python decoder
does, at the same stage, with the same column bytes, and compute the same name keys."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from make_golden import GOLDEN

from root_worker.frame import FrameError, Ragged, decode

C_DIR = Path(__file__).resolve().parent.parent / "flatbuffers_schema" / "c"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
KEYS = json.loads((GOLDEN / "name_keys.json").read_text())
STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-Wshadow", "-Wconversion"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
N_CORRUPT = 3000
# the Python decoder's messages by stage (its order: preamble, layout, table, ragged, value,
# metadata); every golden invalid frame checks this table
PREAMBLE_MARKS = ("truncated preamble", "bad magic", "unsupported frame version",
                  "unknown flags", "reserved preamble", "preamble frame_len",
                  "layout section [offset", "bytes of column records", "block table [offset",
                  "must lie after the block table")

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


def python_class(message: str) -> str:
    if any(m in message for m in PREAMBLE_MARKS):
        return "preamble"
    if message.startswith("metadata ["):
        return "metadata"
    if "bool value byte" in message:
        return "value"
    if "ragged offsets" in message:
        return "ragged"
    if "block [offset" in message:
        return "table"
    return "layout"


def _compile(out: Path, flags: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["gcc", *STRICT, "-O1", "-g", *flags, "-o", str(out),
                           str(C_DIR / "ft_frame_dump.c")], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("c") / "ft_frame_dump"
    built = _compile(out, SANITIZE)
    if built.returncode != 0:  # no sanitizer runtime: the strict build must still pass
        built = _compile(out, [])
    assert built.returncode == 0, built.stderr
    return out


def test_header_compiles_cleanly_without_sanitizers(tmp_path: Path) -> None:
    built = _compile(tmp_path / "plain", ["-O2"])
    assert built.returncode == 0 and not built.stderr, built.stderr
    if shutil.which("g++"):  # usable from C++ too
        cxx = subprocess.run(["g++", "-std=c++11", "-Wall", "-Wextra", "-Werror", "-x", "c++",
                              "-fsyntax-only", "-DFT_FRAME_IMPLEMENTATION",
                              str(C_DIR / "ft_frame.h")], capture_output=True, text=True,
                             timeout=120)
        assert cxx.returncode == 0, cxx.stderr


def run_frames(driver: Path, paths: list[Path]) -> dict[str, list[str]]:
    proc = subprocess.run([str(driver), "frames"], input="".join(f"{p}\n" for p in paths),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not proc.stderr, proc.stderr[-2000:]  # sanitizer reports go to stderr
    out: dict[str, list[str]] = {}
    for block in proc.stdout.split("frame ")[1:]:
        lines = block.rstrip("\n").split("\n")
        out[lines[0]] = lines[1:]
    assert len(out) == len(paths)
    return out


def python_view(frame: bytes) -> list[str]:
    """What the driver must print for ``frame``, computed with the Python decoder (the
    error line carries only the class)."""
    try:
        f = decode(frame)
    except FrameError as exc:
        return [f"error {python_class(str(exc))}"]
    meta_offset = struct.unpack_from("<Q", frame, 40)[0]
    lines = [f"ok {f.n_candidates} {len(f.columns)} {_b2b(frame[meta_offset:])}"]
    for name, col in f.columns.items():
        values = col.values if isinstance(col, Ragged) else col
        dims = "x".join(map(str, values.shape[1:])) or "-"
        offsets = _b2b(col.offsets.tobytes()) if isinstance(col, Ragged) else "-"
        lines.append(f"col {name.encode().hex()} {values.dtype.name} "
                     f"{'ragged' if isinstance(col, Ragged) else 'dense'} {dims} "
                     f"{values.shape[0]} {_b2b(values.tobytes())} {offsets}")
    return lines


def _b2b(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def c_view(lines: list[str]) -> list[str]:
    if lines[0].startswith("error "):
        return [" ".join(lines[0].split()[:2])]
    return lines


def test_python_stage_table_matches_the_manifest() -> None:
    for name, want in MANIFEST["invalid"].items():
        assert python_class(want["python_error"]) == want["class"], name


def test_c_reader_agrees_with_the_golden_manifest(driver: Path) -> None:
    valid = {GOLDEN / "valid" / f"{n}.ftrm": n for n in MANIFEST["valid"]}
    invalid = {GOLDEN / "invalid" / f"{n}.ftrm": n for n in MANIFEST["invalid"]}
    got = run_frames(driver, [*valid, *invalid])
    for path, name in valid.items():
        want = MANIFEST["valid"][name]
        lines = got[str(path)]
        assert lines[0].startswith("ok "), (name, lines[0])
        _, n_cand, n_col, meta = lines[0].split()
        assert (int(n_cand), int(n_col), meta) == (
            want["n_candidates"], len(want["columns"]), want["metadata_b2b"]), name
        for line, spec in zip(lines[1:], want["columns"], strict=True):
            _, name_hex, dtype, kind, dims, n_values, values, offsets = line.split()
            assert bytes.fromhex(name_hex).decode() == spec["name"]
            assert (dtype, kind, values) == (spec["dtype"], spec["kind"], spec["values_b2b"])
            assert dims == ("x".join(map(str, spec["shape"])) or "-")
            if kind == "ragged":
                assert (int(n_values), offsets) == (spec["n_values"], spec["offsets_b2b"])
            else:
                assert (int(n_values), offsets) == (want["n_candidates"], "-")
    for path, name in invalid.items():
        line = got[str(path)][0]
        assert line.split()[:2] == ["error", MANIFEST["invalid"][name]["class"]], (name, line)


def test_c_name_keys_match_the_known_answers(driver: Path) -> None:
    rows = KEYS["keys"]
    proc = subprocess.run([str(driver), "keys"], input="".join(r["utf8_hex"] + "\n"
                                                               for r in rows),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert proc.stdout.split("\n")[:-1] == [f"{r['key']} {r['digest']}" for r in rows]


def _corrupt(rng: random.Random, frame: bytes) -> bytes:
    """One hostile variant: byte flips, edge values in size fields, truncation, growth."""
    buf = bytearray(frame)
    how = rng.randrange(6)
    if how == 0 and buf:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif how == 1 and len(buf) >= 64:  # an edge value in a preamble or table field
        at = rng.choice([8, 12, 24, 32, 40, 48] + list(range(64, min(len(buf) - 8, 400), 8)))
        edge = rng.choice([0, 1, 63, 64, 65, len(buf), len(buf) - 1, (1 << 32) - 1,
                           (1 << 63), (1 << 64) - 1, (1 << 64) - 64])
        size = 8 if at in (32, 40) or at >= 64 else 4
        struct.pack_into("<Q" if size == 8 else "<I", buf, at, edge % (1 << (8 * size)))
    elif how == 2:
        del buf[rng.randrange(len(buf) + 1):]
    elif how == 3:
        buf += bytes(rng.randrange(1, 130))
    elif how == 4 and buf:  # a random byte anywhere, e.g. a bool, a dim, a name, JSON
        buf[rng.randrange(len(buf))] = rng.choice([0, 1, 2, 0x22, 0x5C, 0x7B, 0x80, 0xFF])
    elif buf:
        i = rng.randrange(len(buf))
        buf[i:i + 8] = rng.randbytes(8)
    return bytes(buf)


def test_c_reader_agrees_with_python_on_corrupted_frames(driver: Path, tmp_path: Path) -> None:
    rng = random.Random(1234)
    sources = [p.read_bytes() for p in sorted((GOLDEN / "valid").glob("*.ftrm"))]
    paths, want = [], {}
    for i in range(N_CORRUPT):
        frame = _corrupt(rng, rng.choice(sources))
        path = tmp_path / f"c{i}.ftrm"
        path.write_bytes(frame)
        paths.append(path)
        want[str(path)] = python_view(frame)
    got = run_frames(driver, paths)
    differ = [p for p in want if c_view(got[p]) != want[p]]
    rejected = sum(w[0].startswith("error") for w in want.values())
    assert not differ, [(p, want[p][:1], got[p][:1]) for p in differ[:5]]
    assert 0.2 * N_CORRUPT < rejected < N_CORRUPT  # both outcomes are exercised
