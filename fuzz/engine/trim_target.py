"""Fuzz target: the trim engine, both backends, with aliasing and forged arguments on.

Run it through ``fuzz/engine/sanitized.py fuzz`` (the C extension built with ASan and UBSan);
run directly (``python fuzz/engine/trim_target.py --seconds 60``) it fuzzes the installed
build.  Inputs are random byte strings from a seeded generator (``--seed``), each decoded by
a :class:`Provider` into one of these cases, and every case asserts an exact expectation:

* ``trim``: a frame built from the input (dense and ragged columns, dtypes, shapes),
  optionally with bytes of its header, layout or block table overwritten, trimmed 1-3
  times by a C and a numpy Trimmer to an allowlist drawn from the input, with ``out``
  None, a separate buffer, the input itself (in place) or an overlapping view of one
  buffer at any shift, and ``check_ragged`` on or off; or through ``trim_parts``.  Both
  backends must give the bytes of a trim of a private copy, or the same exception type and
  message, and a refused in-place request must leave the buffer unchanged;
* ``raw``: ``copy_runs`` / ``write_frame`` with ``runs``, ``header`` and ``src`` placed
  anywhere in or out of ``dst``, runs valid or not: the bytes of the pure-Python twins
  (``backends.copy_runs_loop`` / ``write_frame_py``), or ValueError with nothing written;
* ``plans``: ``plan_trim`` over a cache holding a forged entry (TypeError) or a real Plan
  under another frame's key (a decline, or the right bytes);
* ``reentry``: a garbage collection at a random allocation inside a trim (both backends)
  runs a finalizer that rewrites words of the input and trims another frame with the same
  Trimmer: no memory error, a trim or a FrameError, and on the C path exactly the trim of
  the input as it was, as it became, or as it was checked with the new bytes copied.

Why not libFuzzer (atheris): under gcc's ASan runtime, preloaded, libFuzzer's coverage
callbacks resolve to the sanitizer's stubs (atheris warns "broken Python code coverage"), so
a coverage-guided run would mutate blindly; the structured random generator reaches every
case on every input instead.  A failing input is saved (``--artifacts``) and replayed with
``--replay FILE``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import struct
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from flatbuffers_schema.keys import Allowlist
from root_worker.frame import FrameError, Ragged, Trimmer, TrimParts, TrimResult, backends, encode

_copyruns: Any = backends._copyruns
MAX_INPUT = 4096
STATS: Counter[str] = Counter()


class Provider:
    """Structured values from the bytes of one input (zeros once they run out)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def _take(self, n: int) -> bytes:
        chunk = self.data[self.at:self.at + n]
        self.at += len(chunk)
        return chunk.ljust(n, b"\x00")

    def signed(self, n_bytes: int) -> int:
        return int.from_bytes(self._take(n_bytes), "little", signed=True)

    def int_in(self, lo: int, hi: int) -> int:
        span = hi - lo + 1
        word = self._take(max(1, (span.bit_length() + 7) // 8))
        return lo + int.from_bytes(word, "little") % span

    def flag(self) -> bool:
        return bool(self._take(1)[0] & 1)

    def raw(self, n: int) -> bytes:
        chunk = self.data[self.at:self.at + n]
        self.at += len(chunk)
        return chunk


NAMES = [f"f{i}" for i in range(12)]
DTYPES = ["<f4", "<f8", "<i4", "<i8", "<u2", "|i1", "|b1", "<f2", "<c8"]


# --- building inputs ---------------------------------------------------------------------------
def build_frame(fdp: Provider) -> tuple[bytes, list[str]] | None:
    n_cand = fdp.int_in(0, 9)
    n_cols = fdp.int_in(0, len(NAMES))
    names = NAMES[:]
    cols: dict[str, object] = {}
    for _ in range(n_cols):
        name = names.pop(fdp.int_in(0, len(names) - 1))
        dtype = np.dtype(DTYPES[fdp.int_in(0, len(DTYPES) - 1)])
        inner = tuple(fdp.int_in(1, 3) for _ in range(fdp.int_in(0, 2)))
        if fdp.flag():
            lengths = [fdp.int_in(0, 4) for _ in range(n_cand)]
            raw = fdp.raw(sum(lengths) * int(np.prod(inner)) * dtype.itemsize)
            values = np.zeros((sum(lengths), *inner), dtype)
            flat = values.reshape(-1).view(np.uint8)
            flat[:len(raw)] = np.frombuffer(raw, np.uint8)
            if dtype.kind == "b":
                values = values.view(np.uint8).astype(bool)
            cols[name] = Ragged.from_lengths(values, lengths)
        else:
            values = np.zeros((n_cand, *inner), dtype)
            raw = fdp.raw(values.nbytes)
            values.reshape(-1).view(np.uint8)[:len(raw)] = np.frombuffer(raw, np.uint8)
            if dtype.kind == "b":
                values = values.view(np.uint8).astype(bool)
            cols[name] = values
    try:
        frame = encode(cols, {"request_id": fdp.int_in(0, 1 << 20)},
                       n_candidates=n_cand)
    except (FrameError, ValueError, TypeError):
        return None
    return frame, list(cols)


def mutate(fdp: Provider, frame: bytes) -> bytes:
    """Overwrite a few words of the frame's header, layout or block table (or not)."""
    buf = bytearray(frame)
    n_cols, layout_len = struct.unpack_from("<II", buf, 8)
    table_at = (64 + layout_len + 7) & ~7
    for _ in range(fdp.int_in(0, 3)):
        where = fdp.int_in(0, 3)
        header_end = min(len(buf), table_at + 16 * n_cols + 64)
        if where == 0 and n_cols:  # a block table entry: offset or size, near or far
            at = table_at + 16 * fdp.int_in(0, n_cols - 1) + 8 * fdp.flag()
            delta = fdp.int_in(-256, 256)
            if at + 8 <= len(buf):
                old = struct.unpack_from("<Q", buf, at)[0]
                new = (old + delta if fdp.flag() else fdp.signed(8)) & (2**64 - 1)
                struct.pack_into("<Q", buf, at, new)
        elif where == 1 and header_end:  # any byte of the header, layout or table
            buf[fdp.int_in(0, header_end - 1)] = fdp.int_in(0, 255)
        elif where == 2 and buf:  # any byte at all (block data: ragged offsets heads)
            buf[fdp.int_in(0, len(buf) - 1)] = fdp.int_in(0, 255)
        elif where == 3:  # a truncated or extended frame
            cut = fdp.int_in(-64, 64)
            buf = buf[:cut] if cut < 0 else buf + bytes(cut)
    return bytes(buf)


def allowlist(fdp: Provider, names: list[str]) -> Allowlist:
    pool = names + ["absent_a", "absent_b"]
    return Allowlist.from_names([n for n in pool if fdp.flag()])


# --- the cases ---------------------------------------------------------------------------------
def outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except (FrameError, ValueError, TypeError) as exc:
        return type(exc).__name__, str(exc)


def reference(frame: bytes, allow: Allowlist, check_ragged: bool) -> tuple[str, Any]:
    return outcome(lambda: bytes(Trimmer(backend="numpy").trim(
        bytes(frame), allow, check_ragged=check_ragged).data))


def one_trim(trimmer: Trimmer, frame: bytes, allow: Allowlist, mode: int, shift: int,
             check_ragged: bool) -> tuple[str, Any]:
    STATS["trims"] += 1
    n = len(frame)
    if mode == 0:
        return outcome(lambda: bytes(trimmer.trim(frame, allow, check_ragged=check_ragged).data))
    if mode == 1:
        out = bytearray(n + 16)
        return outcome(lambda: bytes(trimmer.trim(frame, allow, out, check_ragged).data))
    if mode == 2:  # in place; a refusal leaves the buffer unchanged
        buf = bytearray(frame)
        got = outcome(lambda: bytes(trimmer.trim(buf, allow, out=buf,
                                                 check_ragged=check_ragged).data))
        assert got[0] == "ok" or bytes(buf) == frame, "a refused in-place trim wrote"
        return got
    if mode == 3:  # an overlapping view of one buffer
        base = n + 64
        big = np.zeros(n + 2 * base, np.uint8)
        big[base:base + n] = np.frombuffer(frame, np.uint8)
        shift = max(-base, min(base, shift))
        out_view = big[base + shift:base + shift + n]
        return outcome(lambda: bytes(trimmer.trim(big[base:base + n], allow, out=out_view,
                                                  check_ragged=check_ragged).data))
    res = outcome(lambda: trimmer.trim_parts(frame, allow, check_ragged))
    if res[0] == "ok":
        parts: TrimParts = res[1]
        return "ok", b"".join(bytes(p) for p in parts.parts)
    return res


def case_trim(fdp: Provider) -> None:
    built = build_frame(fdp)
    if built is None:
        return
    frame, names = built
    if fdp.flag():
        frame = mutate(fdp, frame)
    allow = allowlist(fdp, names)
    check_ragged = fdp.flag()
    want = reference(frame, allow, check_ragged)
    trimmers = {b: Trimmer(max_plans=2, max_sizes_per_plan=2, backend=b)
                for b in backends.BACKENDS}
    for _ in range(fdp.int_in(1, 3)):
        mode = fdp.int_in(0, 4)
        STATS[f"trim_mode_{mode}"] += 1
        shift = fdp.int_in(-len(frame) - 64, len(frame) + 64)
        for name, trimmer in trimmers.items():
            got = one_trim(trimmer, frame, allow, mode, shift, check_ragged)
            what = "trim_parts" if mode == 4 else f"trim (out mode {mode})"
            assert got == want, f"{name} {what} differs: {got!r:.300} != {want!r:.300}"
    STATS["frames_ok" if want[0] == "ok" else "frames_refused"] += 1


RAW_SIZE = 2048


def case_raw(fdp: Provider) -> None:
    init = fdp.raw(RAW_SIZE).ljust(RAW_SIZE, b"\x00")
    n = fdp.int_in(64, RAW_SIZE // 2)
    d0 = fdp.int_in(0, RAW_SIZE - n)
    src_at = fdp.int_in(-1, RAW_SIZE - n)  # -1: a separate buffer
    count = fdp.int_in(0, 6)
    runs = [[fdp.int_in(-2, n + 2) for _ in range(3)] for _ in range(count)]
    runs_at = fdp.int_in(-1, (RAW_SIZE - 24 * max(count, 1)) // 8) * 8
    use_write = fdp.flag()
    hdr_at = fdp.int_in(-1, RAW_SIZE - 128)
    hdr_len = fdp.int_in(40, 128)
    meta = [fdp.int_in(-1, n + 1) for _ in range(3)]
    valid = all(s >= 0 and d >= 0 and ln >= 0 and s + ln <= n and d + ln <= n
                for s, d, ln in runs)
    if use_write:
        meta_off, meta_len, out_meta = meta
        valid = valid and (52 <= hdr_len <= n and meta_off >= 0 and meta_len >= 0
                           and out_meta >= hdr_len and meta_off + meta_len <= n
                           and out_meta + meta_len <= n)
    results = []
    for impl in ("c", "py"):
        mem = bytearray(init)
        other = bytearray(init[::-1])
        dst = memoryview(mem)[d0:d0 + n]
        src = memoryview(other)[:n] if src_at < 0 else memoryview(mem)[src_at:src_at + n]
        header = (memoryview(other)[:hdr_len] if hdr_at < 0
                  else memoryview(mem)[hdr_at:hdr_at + hdr_len])
        if runs_at < 0 or not count:
            runs_arr = np.array(runs, np.int64).reshape(-1, 3)
        else:
            struct.pack_into(f"<{3 * count}q", mem, runs_at, *(v for r in runs for v in r))
            runs_arr = np.frombuffer(mem, np.int64, 3 * count, runs_at).reshape(-1, 3)
        before = bytes(mem)
        try:
            if impl == "py":
                if not valid:
                    got: tuple[str, int] = ("ValueError", 0)
                elif use_write:
                    backends.write_frame_py(dst, src, header, runs, *meta)
                    got = ("ok", 0)
                else:
                    backends.copy_runs_loop(dst, src, runs)
                    got = ("ok", 0)
            elif use_write:
                _copyruns.write_frame(dst, src, header, runs_arr, *meta)
                got = ("ok", 0)
            else:
                _copyruns.copy_runs(dst, src, runs_arr)
                got = ("ok", 0)
        except ValueError:
            got = ("ValueError", 0)
        del dst, src, header, runs_arr
        if got[0] != "ok":
            assert bytes(mem) == before and other == init[::-1], f"a refused {impl} call wrote"
        results.append((got, bytes(mem), bytes(other)))
        STATS["raw_calls"] += 1
    c, py = results
    assert c[0] == py[0], f"raw: C {c[0]} vs Python {py[0]} (valid={valid})"
    assert c == py, "raw: C and Python bytes differ"


FORGED: list[Any] = [b"x", (b"", b"", bytearray()), None, 1, [], object()]


def case_plans(fdp: Provider) -> None:
    built = build_frame(fdp)
    other = build_frame(fdp)
    if built is None or other is None:
        return
    (frame, names), (frame_b, _) = built, other
    allow = allowlist(fdp, names)
    trimmer = Trimmer(backend="c")
    trimmer.trim(frame, allow)
    if not trimmer._fast:
        return
    plan = next(iter(trimmer._fast.values()))
    key_b = struct.pack("<QQ", struct.unpack_from("<Q", frame_b, 16)[0], allow.digest)
    if fdp.flag():
        entry = FORGED[fdp.int_in(0, len(FORGED) - 1)]
        try:
            _copyruns.plan_trim({key_b: entry}, frame_b, None, allow.digest, False, TrimResult)
            raise AssertionError("a forged plan cache entry was accepted")
        except TypeError:
            STATS["plans_forged_refused"] += 1
        return
    got = _copyruns.plan_trim({key_b: plan}, frame_b, None, allow.digest, False, TrimResult)
    if got is not None:  # only the very same layout may be served by this plan
        assert bytes(got.data) == reference(frame_b, allow, False)[1]
    STATS["plans_other_key"] += 1


class _Rewriter:
    """A finalizer with side effects: rewrite the input, trim something else."""

    def __init__(self, action: Any) -> None:
        self.action = action
        self.me = self  # a cycle: only the collector frees it

    def __del__(self) -> None:
        self.action()


def case_reentry(fdp: Provider) -> None:
    built, other = build_frame(fdp), build_frame(fdp)
    if built is None or other is None:
        return
    (frame, names), (frame_b, _) = built, other
    allow = allowlist(fdp, names)
    mutated = mutate(fdp, frame)
    if len(mutated) != len(frame):
        return  # (the rewrite happens in place)
    threshold = fdp.int_in(1, 40)
    check_ragged = fdp.flag()
    before = reference(frame, allow, check_ragged)
    after = reference(mutated, allow, check_ragged)
    # checked as it was, copied as it became: the frame's header and table, the new data
    n_cols, layout_len = struct.unpack_from("<II", frame, 8)
    table_end = ((64 + layout_len + 7) & ~7) + 16 * n_cols
    hybrid = reference(frame[:table_end] + mutated[table_end:], allow, False)
    for backend in backends.BACKENDS:
        got = reentered_trim(Trimmer(backend=backend), frame, mutated, frame_b, allow,
                             threshold, check_ragged)
        STATS["trims"] += 1
        assert got[0] in ("ok", "FrameError"), f"{backend} re-entered trim: {got!r:.300}"
        if backend == "c" and before[0] == "ok" and got not in (before, after):
            # the C path validates, then (at the output's allocation) the finalizer may run,
            # then it copies: every output byte is the checked frame's or the rewritten one's
            assert got[0] == "ok" and hybrid[0] == "ok", f"c re-entered trim: {got!r:.300}"
            g, a, h = (np.frombuffer(x, np.uint8) for x in (got[1], before[1], hybrid[1]))
            assert g.size == a.size == h.size and np.all((g == a) | (g == h)), \
                "c re-entered trim: output bytes from neither input"
    STATS["reentry_cases"] += 1


def reentered_trim(trimmer: Trimmer, frame: bytes, mutated: bytes, frame_b: bytes,
                   allow: Allowlist, threshold: int, check_ragged: bool) -> tuple[str, Any]:
    """Trim a copy of ``frame`` while a finalizer, run by the collector at some allocation
    inside the call, rewrites it into ``mutated`` and trims ``frame_b`` with ``trimmer``."""
    for _ in range(2):
        outcome(lambda: trimmer.trim(frame, allow))  # its plan (and memo) for this table
    src = bytearray(frame)
    inside = [False]

    def rewrite() -> None:
        src[:] = mutated
        outcome(lambda: trimmer.trim(frame_b, allow))
        STATS["reentry_inside" if inside[0] else "reentry_outside"] += 1

    old = gc.get_threshold()
    gc.collect(0)
    gc.disable()
    try:
        _Rewriter(rewrite)
        gc.set_threshold(threshold)
        gc.enable()
        inside[0] = True
        got = outcome(lambda: bytes(trimmer.trim(src, allow, check_ragged=check_ragged).data))
        inside[0] = False
    finally:
        gc.set_threshold(*old)
        gc.enable()
        gc.collect(0)  # (if the finalizer has not run yet)
    return got


def test_one_input(data: bytes) -> None:
    STATS["inputs"] += 1
    fdp = Provider(data)
    case = fdp.int_in(0, 11)
    if case < 6:
        case_trim(fdp)
    elif case < 9:
        case_raw(fdp)
    elif case < 10:
        case_plans(fdp)
    else:
        case_reentry(fdp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long to run")
    parser.add_argument("--seed", type=int, default=None, help="generator seed (default: "
                        "random, printed)")
    parser.add_argument("--artifacts", type=Path, default=Path("."),
                        help="where a failing input is written")
    parser.add_argument("--replay", type=Path, default=None, help="run one saved input")
    parser.add_argument("--stats", type=Path, default=None, help="write the figures here")
    opts = parser.parse_args(argv)
    if not backends.HAVE_C:
        raise SystemExit("trim_target: the C extension is not built; nothing to fuzz")
    if opts.replay is not None:
        test_one_input(opts.replay.read_bytes())
        print(f"trim_target: {opts.replay} passes", file=sys.stderr)
        return 0
    seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    print(f"trim_target: seed {seed}, {opts.seconds:.0f} s", file=sys.stderr)
    start = time.monotonic()
    deadline = start + opts.seconds
    code = 0
    while time.monotonic() < deadline:
        data = rng.randbytes(rng.choice((rng.randrange(64), rng.randrange(MAX_INPUT))))
        try:
            test_one_input(data)
        except Exception:  # noqa: BLE001 - every failure is a finding: saved, then reported
            path = opts.artifacts / f"crash-{STATS['inputs']:08d}-seed-{seed}"
            path.write_bytes(data)
            traceback.print_exc()
            print(f"trim_target: FAILED on input {STATS['inputs']}, saved to {path}",
                  file=sys.stderr)
            code = 1
            break
    figures = dict(STATS, seed=seed, seconds=round(time.monotonic() - start, 1))
    print("trim_target: " + json.dumps(figures, sort_keys=True), file=sys.stderr)
    if opts.stats is not None:
        opts.stats.write_text(json.dumps(figures, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
