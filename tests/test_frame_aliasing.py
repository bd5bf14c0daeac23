"""The trim engine with arguments that share memory, forged plans and odd digests.

Every case runs on both backends (the C extension and the numpy fallback) and asserts the
same output bytes, or the same worded error before any byte of ``out`` moves:

* ``out`` is ``buf`` (a trim in place) or a shifted view of the same buffer: the output is
  exactly what a separate ``out`` gets, call after call (the C path alternates its copy
  order, and serves the first call of a plan from the general path);
* the raw C entry points (``copy_runs``, ``write_frame``) with ``runs`` living inside
  ``dst``, ``header`` inside ``dst``, ``src`` being ``dst``: the runs are read once, before
  any byte moves, and each step is a memmove -- the result of their pure-Python twins
  (``backends.copy_runs_loop``, ``backends.write_frame_py``);
* plan-cache entries: only ``_copyruns.Plan`` objects (made by ``make_plan``) are read as
  plans, and a Plan can be neither built nor copied nor read from Python;
* an ``Allowlist`` whose digest is not an ``int`` is refused at ``trim``/``trim_parts``.

The same tests run under AddressSanitizer and UBSan in CI (``fuzz/engine/sanitized.py
tests``), which is what makes "no byte out of range" an assertion here.
"""

from __future__ import annotations

import copy
import gc
import pickle
import struct
from collections.abc import Callable

import numpy as np
import pytest

from flatbuffers_schema.keys import Allowlist
from root_worker.frame import BACKENDS, Ragged, Trimmer, TrimResult, encode
from root_worker.frame import backends as frame_copy
from root_worker.frame.backends import copy_runs_loop, write_frame_py

needs_c = pytest.mark.skipif(not frame_copy.HAVE_C, reason="C extension not built")
if frame_copy.HAVE_C:
    from root_worker.frame import _copyruns  # type: ignore[attr-defined]


def dense_frame(n_cand: int, n_feat: int, seed: int = 0) -> tuple[bytes, Allowlist]:
    rng = np.random.default_rng(seed)
    cols = {f"d{i:04d}": rng.standard_normal(n_cand).astype(np.float32) for i in range(n_feat)}
    keep = [name for name, k in zip(cols, rng.random(n_feat) < 0.4, strict=True) if k]
    return encode(cols, {"request_id": f"dense-{seed}"}), Allowlist.from_names(keep)


def mixed_frame(n_cand: int, seed: int = 0) -> tuple[bytes, Allowlist]:
    rng = np.random.default_rng(seed)
    cols: dict[str, object] = {}
    for i in range(24):
        if i % 3 == 0:
            lengths = rng.integers(0, 6, n_cand)
            cols[f"m{i}"] = Ragged.from_lengths(rng.integers(0, 99, int(lengths.sum())), lengths)
        elif i % 3 == 1:
            cols[f"m{i}"] = rng.standard_normal((n_cand, 3)).astype(np.float16)
        else:
            cols[f"m{i}"] = rng.integers(0, 1 << 30, n_cand).astype(np.int32)
    keep = [f"m{i}" for i in range(24) if i % 4 != 1]
    return encode(cols, {"request_id": f"mixed-{seed}"}), Allowlist.from_names(keep)


FRAMES: dict[str, Callable[[], tuple[bytes, Allowlist]]] = {
    "dense": lambda: dense_frame(7, 60),
    "mixed": lambda: mixed_frame(9),
    # over the C path's GIL-release threshold (256 KiB of kept blocks)
    "large": lambda: dense_frame(200, 2000, seed=5),
}


def reference(frame: bytes, allow: Allowlist) -> bytes:
    """The trim of a private copy into a separate buffer (numpy backend)."""
    return bytes(Trimmer(backend="numpy").trim(bytes(frame), allow).data)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- out shares memory with buf ---------------------------------------------------------------
@pytest.mark.parametrize("shape", list(FRAMES))
@pytest.mark.parametrize("kind", ["bytearray", "ndarray"])
def test_trim_in_place_is_right_on_every_call(backend: str, shape: str, kind: str) -> None:
    frame, allow = FRAMES[shape]()
    want = reference(frame, allow)
    trimmer = Trimmer(backend=backend)
    for call in range(6):  # cold (general path), then the plan path in both copy orders
        buf: bytearray | np.ndarray = (bytearray(frame) if kind == "bytearray"
                                       else np.frombuffer(frame, np.uint8).copy())
        res = trimmer.trim(buf, allow, out=buf)
        assert bytes(res.data) == want, (backend, shape, call)
        assert res.bytes_in == len(frame) and res.bytes_out == len(want)
        assert bytes(memoryview(buf)[:len(want)]) == want  # the result is a view of buf


@pytest.mark.parametrize("shift", [-4096, -64, -8, -1, 1, 8, 64, 4096])
@pytest.mark.parametrize("shape", ["dense", "mixed"])
def test_trim_into_an_overlapping_view_of_the_same_buffer(backend: str, shape: str,
                                                          shift: int) -> None:
    frame, allow = FRAMES[shape]()
    want = reference(frame, allow)
    n = len(frame)
    base = 4096 + 64
    trimmer = Trimmer(backend=backend)
    for call in range(4):
        big = np.full(n + 2 * base, 0xA5, np.uint8)
        big[base:base + n] = np.frombuffer(frame, np.uint8)
        src, out = big[base:base + n], big[base + shift:base + shift + n]
        res = trimmer.trim(src, allow, out=out, check_ragged=call % 2 == 1)
        assert bytes(res.data) == want, (backend, shape, shift, call)
        # nothing outside the output changed but the input's own bytes
        lo, hi = min(base, base + shift), max(base + n, base + shift + len(want))
        assert not np.any(big[:lo] != 0xA5) and not np.any(big[hi:] != 0xA5)


@needs_c
def test_raw_plan_trim_with_out_sharing_the_input() -> None:
    frame, allow = mixed_frame(5, seed=3)
    want = reference(frame, allow)
    trimmer = Trimmer(backend="c")
    trimmer.trim(frame, allow)  # installs the plan
    for call in range(4):
        buf = bytearray(frame)
        res = _copyruns.plan_trim(trimmer._fast, buf, buf, allow.digest, call % 2 == 0,
                                  TrimResult)
        assert res is not None and bytes(res.data) == want, call


def test_trim_parts_of_a_buffer_then_trimmed_in_place(backend: str) -> None:
    """trim_parts views the input; an in-place trim afterwards is still right itself."""
    frame, allow = mixed_frame(6, seed=4)
    want = reference(frame, allow)
    trimmer = Trimmer(backend=backend)
    buf = bytearray(frame)
    assert b"".join(bytes(p) for p in trimmer.trim_parts(bytes(buf), allow).parts) == want
    assert bytes(trimmer.trim(buf, allow, out=buf).data) == want


# --- the raw C entry points with aliased arguments --------------------------------------------
SIZE = 4096


def random_runs(rng: np.random.Generator, src_len: int, dst_len: int, count: int) -> np.ndarray:
    runs = np.zeros((count, 3), np.int64)
    for i in range(count):
        n = int(rng.integers(0, min(src_len, dst_len) // 2))
        runs[i] = (rng.integers(0, src_len - n + 1), rng.integers(0, dst_len - n + 1), n)
    return runs


def layout_case(rng: np.random.Generator) -> dict[str, int]:
    """Where dst, src and the runs live in one SIZE-byte buffer (8-aligned runs)."""
    length = int(rng.integers(512, SIZE // 2))
    return {"dst": int(rng.integers(0, SIZE - length)), "src": int(rng.integers(0, SIZE - length)),
            "len": length, "runs": 8 * int(rng.integers(0, (SIZE - 8 * 3 * 8) // 8))}


@needs_c
@pytest.mark.parametrize("where_runs", ["own", "in_dst"])
@pytest.mark.parametrize("where_src", ["own", "is_dst", "overlaps_dst"])
def test_raw_copy_runs_reads_runs_once_and_moves(where_runs: str, where_src: str) -> None:
    rng = np.random.default_rng(hash((where_runs, where_src)) & 0xFFFF)
    for case in range(60):
        init = rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes()
        pos = layout_case(rng)
        n = pos["len"]
        if where_src == "is_dst":
            pos["src"] = pos["dst"]
        count = int(rng.integers(1, 8))
        runs = random_runs(rng, n, n, count)
        if where_runs == "in_dst":  # the first run rewrites the runs' own bytes
            pos["runs"] = (pos["dst"] + 8) & ~7
            runs[0] = (0, pos["runs"] - pos["dst"], min(n - (pos["runs"] - pos["dst"]), 24 * count))
        results = []
        for impl in ("c", "py"):
            mem = bytearray(init)
            if where_src == "own":
                src_buf = memoryview(bytearray(init[SIZE - n:]))
            else:
                src_buf = memoryview(mem)[pos["src"]:pos["src"] + n]
            if where_runs == "own":
                runs_arr = runs.copy()
            else:
                struct.pack_into(f"<{3 * count}q", mem, pos["runs"], *runs.ravel().tolist())
                runs_arr = np.frombuffer(mem, np.int64, 3 * count, pos["runs"]).reshape(-1, 3)
            dst = memoryview(mem)[pos["dst"]:pos["dst"] + n]
            if impl == "c":
                assert _copyruns.copy_runs(dst, src_buf, runs_arr) == int(runs[:, 2].sum())
            else:
                copy_runs_loop(dst, src_buf, runs_arr.tolist())
            del dst, src_buf, runs_arr
            results.append(bytes(mem))
        assert results[0] == results[1], (where_runs, where_src, case)


@needs_c
@pytest.mark.parametrize("alias", ["none", "src_is_dst", "header_in_dst", "runs_in_dst", "all"])
def test_raw_write_frame_with_aliased_arguments(alias: str) -> None:
    rng = np.random.default_rng(len(alias))
    for case in range(60):
        init = rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes()
        n = int(rng.integers(1024, SIZE // 2))
        d0 = int(rng.integers(0, SIZE - n))
        hdr_len = 8 * int(rng.integers(7, 16))
        meta_len = int(rng.integers(0, 64))
        meta_off = int(rng.integers(0, n - meta_len))
        out_meta = int(rng.integers(hdr_len, n - meta_len))
        count = int(rng.integers(1, 6))
        runs = random_runs(rng, n, n, count)
        runs_at = ((d0 + 16) & ~7) if alias in ("runs_in_dst", "all") else None
        if runs_at is not None:  # the first run overwrites the runs with garbage offsets
            runs[0] = (0, runs_at - d0, min(n - (runs_at - d0), 24 * count))
        results = []
        for impl in ("c", "py"):
            mem = bytearray(init)
            other = bytearray(init[::-1])
            dst = memoryview(mem)[d0:d0 + n]
            src = dst if alias in ("src_is_dst", "all") else memoryview(other)[:n]
            header = (dst[32:32 + hdr_len] if alias in ("header_in_dst", "all")
                      else memoryview(other)[n:n + hdr_len])
            if runs_at is None:
                runs_arr = runs.copy()
            else:
                struct.pack_into(f"<{3 * count}q", mem, runs_at, *runs.ravel().tolist())
                runs_arr = np.frombuffer(mem, np.int64, 3 * count, runs_at).reshape(-1, 3)
            args = (meta_off, meta_len, out_meta)
            if impl == "c":
                done = _copyruns.write_frame(dst, src, header, runs_arr, *args)
                assert done == out_meta + meta_len
            else:
                write_frame_py(dst, src, header, runs_arr.tolist(), *args)
            del dst, src, header, runs_arr
            results.append(bytes(mem) + bytes(other))
        assert results[0] == results[1], (alias, case)


@needs_c
def test_raw_entry_points_check_runs_before_any_byte_moves() -> None:
    mem = bytearray(range(256)) * 4
    before = bytes(mem)
    dst = memoryview(mem)[:512]
    bad = np.array([[0, 0, 8], [0, 600, 8]], np.int64)  # the second run is out of range
    with pytest.raises(ValueError, match="run 1"):
        _copyruns.copy_runs(dst, memoryview(mem)[512:], bad)
    with pytest.raises(ValueError, match="run 1"):
        _copyruns.write_frame(dst, dst, dst[:64], bad, 0, 0, 64)
    assert bytes(mem) == before


# --- plan-cache entries ------------------------------------------------------------------------
@needs_c
def test_plans_are_opaque_and_only_make_plan_builds_them() -> None:
    frame, allow = dense_frame(4, 10)
    trimmer = Trimmer(backend="c")
    trimmer.trim(frame, allow)
    key, plan = next(iter(trimmer._fast.items()))
    assert type(plan) is _copyruns.Plan
    with pytest.raises(TypeError):
        _copyruns.Plan()
    with pytest.raises(TypeError):
        type(plan).__new__(type(plan))
    with pytest.raises(TypeError):
        memoryview(plan)
    for clone in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError):
            clone(plan)
    assert not [a for a in dir(plan) if not a.startswith("__")]
    with pytest.raises((AttributeError, TypeError)):
        plan.blob = b"x"  # type: ignore[attr-defined]


@needs_c
def test_forged_cache_entries_are_refused_before_any_read() -> None:
    """The old entry shape -- (layout, blob with intact magic and sizes, memo) -- and anything
    else that is not a Plan is a TypeError, never read as a plan."""
    frame, allow = dense_frame(4, 10)
    trimmer = Trimmer(backend="c")
    trimmer.trim(frame, allow)
    key = next(iter(trimmer._fast))
    head = struct.pack("<16Q", 0x344E414C504D5254, 10, 0, 0, 1 << 40, 0, 0, 0, 0, 0,
                       1 << 50, 1 << 50, 1 << 50, 1 << 50, 1 << 50, 128)
    forged = (frame[64:64 + 10], head, bytearray(4096))
    out = bytearray(len(frame))
    for entry in (forged, [forged], b"x", None, trimmer):
        with pytest.raises(TypeError, match="Plan objects"):
            _copyruns.plan_trim({key: entry}, frame, out, allow.digest, False, TrimResult)
        with pytest.raises(TypeError, match="Plan objects"):
            _copyruns.plan_parts({key: entry}, frame, allow.digest, False, 64, TrimResult)
    assert out == bytearray(len(frame))
    trimmer._fast[key] = forged  # a Trimmer whose cache was tampered with says so too
    with pytest.raises(TypeError, match="Plan objects"):
        trimmer.trim(frame, allow)


@needs_c
def test_a_plan_under_another_key_is_never_applied_to_other_layouts() -> None:
    frame_a, allow = dense_frame(4, 10)
    frame_b, _ = dense_frame(4, 12, seed=1)
    trimmer = Trimmer(backend="c")
    trimmer.trim(frame_a, allow)
    plan_a = next(iter(trimmer._fast.values()))
    key_b = struct.pack("<QQ", struct.unpack_from("<Q", frame_b, 16)[0], allow.digest)
    assert _copyruns.plan_trim({key_b: plan_a}, frame_b, None, allow.digest, False,
                               TrimResult) is None  # layout bytes differ: declined
    trimmer._fast[key_b] = plan_a
    assert bytes(trimmer.trim(frame_b, allow).data) == reference(frame_b, allow)


# --- digests -------------------------------------------------------------------------------
@pytest.mark.parametrize("digest", ["abc", 1.5, None, b"\x01", np.uint64(7)],
                         ids=["str", "float", "None", "bytes", "np.uint64"])
def test_non_int_digests_are_refused_the_same_way(backend: str, digest: object) -> None:
    frame, allow = mixed_frame(3)
    odd = Allowlist(allow.keys, digest)  # type: ignore[arg-type]
    trimmer = Trimmer(backend=backend)
    for _ in range(2):  # cold and with the good allowlist's plan installed
        out = bytearray(b"\x5a" * len(frame))
        with pytest.raises(TypeError, match=r"Allowlist.digest must be an int .* got "
                                            + type(digest).__name__):
            trimmer.trim(frame, odd, out=out)
        assert out == bytearray(b"\x5a" * len(frame))  # refused before any byte moved
        with pytest.raises(TypeError, match="Allowlist.digest must be an int"):
            trimmer.trim_parts(frame, odd)
        trimmer.trim(frame, allow)
        trimmer.trim(frame, allow)


# --- re-entry: Python code that runs inside a C call -------------------------------------------
@needs_c
@pytest.mark.parametrize("shape", ["dense", "mixed"])
def test_a_finalizer_rewriting_the_input_mid_call_cannot_move_a_checked_copy(
        shape: str) -> None:
    """A garbage collection inside the C call (the output's memoryview is its first
    allocation) runs a finalizer that points the input's block table far out of range and
    trims another frame of the same layout with the same Trimmer (a new memo).  The call
    still copies what it checked: the trim of the frame as it was."""
    frame, allow = FRAMES[shape]()
    n_feat = struct.unpack_from("<I", frame, 8)[0]
    layout_len = struct.unpack_from("<I", frame, 12)[0]
    table_at = (64 + layout_len + 7) & ~7
    other = (dense_frame(3, 60) if shape == "dense" else mixed_frame(4))[0]
    want = reference(frame, allow)
    trimmer = Trimmer(backend="c")
    for _ in range(2):
        trimmer.trim(frame, allow)  # the plan (and, dense, its memo) for this table
    src = bytearray(frame)
    state = {"inside": False, "fired_inside": False}

    class Rewriter:
        def __del__(self) -> None:
            state["fired_inside"] = state["inside"]
            for i in range(n_feat):
                struct.pack_into("<QQ", src, table_at + 16 * i, 1 << 40, 1 << 40)
            trimmer.trim(other, allow)

    gc.collect()
    old = gc.get_threshold()
    gc.disable()
    try:
        cycle = Rewriter()
        cycle.self = cycle  # type: ignore[attr-defined]
        del cycle
        gc.set_threshold(1)
        gc.enable()
        state["inside"] = True
        res = trimmer.trim(src, allow)
        state["inside"] = False
    finally:
        gc.set_threshold(*old)
        gc.enable()
    assert state["fired_inside"], "the finalizer did not run inside the call"
    assert bytes(res.data) == want
