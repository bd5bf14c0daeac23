"""The C steady-state path (``_copyruns.fast_trim``) and its copy kernels.

A Trimmer on the C backend serves a (layout, allowlist, block table) it has seen twice from
one C call.  These tests warm that path and then check that it gives the general path's
bytes, that every input byte deciding what is copied is still verified per request (a
changed layout, block table or preamble is never served from the cached plan), and that
the kernels copy exactly.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from flatbuffers_schema.keys import Allowlist
from root_worker.frame import FrameError, Ragged, Trimmer, TrimResult, decode, encode
from root_worker.frame import backends as frame_copy
from root_worker.frame.format import PREAMBLE, PREAMBLE_SIZE, align

pytestmark = pytest.mark.skipif(not frame_copy.HAVE_C, reason="C extension not built")

if frame_copy.HAVE_C:
    from root_worker.frame import _copyruns  # type: ignore[attr-defined]

KERNELS = ("memcpy", "movsb", "avx2", "avx512")


def supported_kernels() -> list[str]:
    best = frame_copy.KERNEL
    assert best in KERNELS
    return list(KERNELS[:KERNELS.index(best) + 1])


@pytest.fixture
def each_kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test once per kernel this CPU supports, restoring the default after."""
    best = frame_copy.KERNEL
    yield request.param
    _copyruns.set_kernel(best)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "each_kernel" in metafunc.fixturenames:
        kernels = supported_kernels() if frame_copy.HAVE_C else ["memcpy"]
        metafunc.parametrize("each_kernel", kernels, indirect=True)


def dense(n_cand: int, n_feat: int, seed: int = 0, dtype: str = "<f4") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"col_{i:04d}": rng.standard_normal(n_cand).astype(dtype) for i in range(n_feat)}


def mixed(n_cand: int, seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    cols: dict[str, object] = {}
    for i in range(30):
        if i % 4 == 1:
            cols[f"m{i}"] = rng.standard_normal((n_cand, 1 + i % 3)).astype(np.float64)
        else:
            cols[f"m{i}"] = rng.integers(0, 1 << 30, n_cand).astype(np.int32)
    return cols


def warm(trimmer: Trimmer, frame: bytes, allow: Allowlist, out: object = None) -> None:
    trimmer.trim(frame, allow, out=out)
    assert trimmer._fast, "C plan not installed"


def fast(trimmer: Trimmer, frame: object, allow: Allowlist, out: object = None,
         check_ragged: bool = False) -> Any:
    """Call the C path directly: a TrimResult, or None when it declines."""
    return _copyruns.plan_trim(trimmer._fast, frame, out, allow.digest, check_ragged,
                               TrimResult)


def reference(frame: bytes, allow: Allowlist) -> bytes:
    return bytes(Trimmer(backend="numpy").trim(frame, allow).data)


# --- kernels --------------------------------------------------------------------------------
def test_kernel_is_reported_and_selectable(each_kernel: str) -> None:
    assert _copyruns.set_kernel(each_kernel) == each_kernel
    assert _copyruns.KERNEL == frame_copy.KERNEL  # the import-time choice is unchanged
    with pytest.raises(ValueError, match="not supported"):
        _copyruns.set_kernel("sse9")


def test_kernels_copy_every_length_and_alignment(each_kernel: str) -> None:
    _copyruns.set_kernel(each_kernel)
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, 1 << 14, dtype=np.uint8)
    for length in list(range(0, 300)) + [511, 512, 513, 4095, 4096, 4097]:
        for s_off, d_off in ((0, 0), (1, 63), (48, 16), (17, 17), (63, 1), (32, 0)):
            dst = np.zeros(length + 200, dtype=np.uint8)
            runs = np.array([[s_off, d_off, length]], dtype=np.int64)
            assert _copyruns.copy_runs(dst, src, runs) == length
            assert bytes(dst[d_off:d_off + length]) == bytes(src[s_off:s_off + length])
            assert not dst[:d_off].any() and not dst[d_off + length:].any(), (length, s_off)


def test_kernels_copy_many_scattered_runs(each_kernel: str) -> None:
    _copyruns.set_kernel(each_kernel)
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    lengths = rng.integers(0, 3000, 400)
    starts = rng.integers(0, src.size - 3000, 400)
    dst_off = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    runs = np.stack([starts, dst_off, lengths], axis=1).astype(np.int64)
    dst = np.zeros(int(lengths.sum()), dtype=np.uint8)
    _copyruns.copy_runs(dst, src, runs)
    want = np.concatenate([src[s:s + n] for s, n in zip(starts, lengths, strict=True)])
    assert bytes(dst) == bytes(want)


# --- fast path hits -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["uniform", "mixed"])
def test_fast_path_serves_repeated_frames_byte_identically(each_kernel: str, shape: str) -> None:
    _copyruns.set_kernel(each_kernel)
    cols = dense(37, 300) if shape == "uniform" else mixed(37)
    frame = encode(cols, {"request_id": "fast"})
    allow = Allowlist.from_names(list(cols)[1::3] + list(cols)[7:20] + ["absent"])
    trimmer = Trimmer(backend="c")
    out = np.zeros(len(frame), dtype=np.uint8)
    warm(trimmer, frame, allow, out)
    want = reference(frame, allow)
    for _ in range(2):  # consecutive calls copy the runs in opposite orders
        out[:] = 0x5A
        res = fast(trimmer, frame, allow, out)
        assert isinstance(res, TrimResult)
        assert bytes(res.data) == want
    assert np.shares_memory(np.frombuffer(res.data, np.uint8), out)
    assert (res.bytes_in, res.bytes_out) == (len(frame), len(want))
    slow = Trimmer(backend="numpy").trim(frame, allow)
    assert (res.n_kept, res.n_missing) == (slow.n_kept, slow.n_missing)
    # and through the public method, with every kind of out
    for o in (None, bytearray(len(frame)), memoryview(bytearray(len(frame) + 7)),
              np.zeros(len(frame), np.uint8), np.zeros(len(frame) // 4 + 1, np.int32)):
        got = trimmer.trim(frame, allow, out=o)
        assert bytes(got.data) == want
        assert got.data.format == "B" and got.data.nbytes == len(want)


def test_fast_path_with_new_metadata_each_request() -> None:
    cols = dense(16, 50)
    allow = Allowlist.from_names(list(cols)[::2])
    trimmer = Trimmer(backend="c")
    out = bytearray(1 << 16)
    for i in range(6):
        meta = {"request_id": "r" * i, "i": i}  # meta_len changes, meta_offset does not
        frame = encode(cols, meta)
        res = trimmer.trim(frame, allow, out=out)
        assert bytes(res.data) == reference(frame, allow)
        assert decode(res.data).metadata == meta
    assert len(trimmer._fast) == 1
    assert fast(trimmer, encode(cols, {"x": 1}), allow, out) is not None


def test_fast_path_accepts_other_source_buffers() -> None:
    frame = encode(dense(8, 40), {"request_id": "src"})
    allow = Allowlist.from_names([f"col_{i:04d}" for i in range(0, 40, 3)])
    trimmer = Trimmer(backend="c")
    warm(trimmer, frame, allow)
    want = reference(frame, allow)
    for src in (bytearray(frame), memoryview(frame), np.frombuffer(frame, np.uint8).copy()):
        res = fast(trimmer, src, allow)
        assert res is not None and bytes(res.data) == want


def test_fast_path_for_a_frame_without_columns_and_an_empty_result() -> None:
    trimmer = Trimmer(backend="c")
    empty = encode({}, {"request_id": "none"}, n_candidates=3)
    allow = Allowlist.from_names(["a"])
    warm(trimmer, empty, allow)
    assert bytes(fast(trimmer, empty, allow).data) == empty
    frame = encode(dense(5, 10))
    nothing = Allowlist.from_names(["zzz"])
    warm(trimmer, frame, nothing)
    res = fast(trimmer, frame, nothing)
    assert bytes(res.data) == reference(frame, nothing)
    assert (res.n_kept, res.n_missing) == (0, 1)


# --- every request is verified ------------------------------------------------------------------
def table_offset(frame: bytes) -> int:
    layout_len = PREAMBLE.unpack_from(frame, 0)[4]
    return align(PREAMBLE_SIZE + layout_len, 8)


@pytest.mark.parametrize("shape", ["uniform", "mixed"])
def test_changed_layout_or_table_is_never_served_from_the_plan(shape: str) -> None:
    cols = dense(12, 60) if shape == "uniform" else mixed(12)
    names = list(cols)
    frame = encode(cols, {"request_id": "v"})
    allow = Allowlist.from_names(names[::2])
    trimmer = Trimmer(backend="c")
    warm(trimmer, frame, allow)
    t_off = table_offset(frame)
    n_columns = len(names)

    # A renamed column (same hint: the hint is never trusted), in a kept and a dropped one.
    for col in (0, 1, n_columns - 1):
        renamed = bytearray(frame)
        name_at = frame.index(names[col].encode(), PREAMBLE_SIZE)
        renamed[name_at] ^= 0x01
        assert fast(trimmer, renamed, allow) is None
        got = trimmer.trim(renamed, allow)
        assert bytes(got.data) == reference(bytes(renamed), allow)

    # A block table entry changed, for a dropped column too: caught, then rejected by the
    # general path because the blocks now overlap / are misaligned.
    for col, field, delta in ((1, 0, 64), (n_columns - 1, 0, 8), (3, 1, 4), (0, 1, -4)):
        bad = bytearray(frame)
        at = t_off + 16 * col + 8 * field
        struct.pack_into("<Q", bad, at, struct.unpack_from("<Q", bad, at)[0] + delta)
        assert fast(trimmer, bad, allow) is None
        with pytest.raises(FrameError):
            trimmer.trim(bad, allow)

    # Preamble: reserved bytes, flags, version, frame_len, metadata bounds.
    for at, fmt, value in ((28, "I", 1), (60, "B", 1), (6, "H", 1), (4, "H", 2),
                           (32, "Q", len(frame) + 1), (48, "I", 0)):
        bad = bytearray(frame)
        struct.pack_into("<" + fmt, bad, at, value)
        assert fast(trimmer, bad, allow) is None
        with pytest.raises(FrameError):
            trimmer.trim(bad, allow)
    for short in (frame[:-1], frame[:PREAMBLE_SIZE], frame[:10], b""):
        assert fast(trimmer, short, allow) is None
        with pytest.raises(FrameError):
            trimmer.trim(short, allow)
    # The cached plan still serves the real frame.
    assert bytes(fast(trimmer, frame, allow).data) == reference(frame, allow)


def test_any_valid_block_table_is_served_from_the_plan() -> None:
    """New ragged lengths, new n_candidates, same or other meta_offset: one C call each."""
    allow = Allowlist.from_names(["r", "d"])
    trimmer = Trimmer(backend="c")

    def frame(values: int, lengths: list[int]) -> bytes:
        return encode({"r": Ragged.from_lengths(np.arange(values), lengths),
                       "x": np.arange(len(lengths), dtype=np.int8),
                       "d": np.arange(float(len(lengths)))})

    warm(trimmer, frame(6, [1, 2, 3, 0]), allow)
    for values, lengths in ((6, [3, 3, 0, 0]), (7, [3, 4, 0, 0]), (0, [0]), (40, [10] * 4),
                            (9, [1] * 9), (0, [])):
        f = frame(values, lengths)
        res = fast(trimmer, f, allow)
        assert res is not None, (values, lengths)
        assert bytes(res.data) == reference(f, allow)
    assert len(trimmer._fast) == 1


def test_wrong_hints_and_odd_digests_never_get_fast_slots() -> None:
    frame = encode(dense(4, 10))
    allow = Allowlist.from_names(["col_0001", "col_0004"])
    trimmer = Trimmer(backend="c")
    zero_hint = bytearray(frame)
    struct.pack_into("<Q", zero_hint, 16, 0)
    for _ in range(4):
        assert bytes(trimmer.trim(zero_hint, allow).data) == reference(frame, allow)
    assert not trimmer._fast
    for digest in (-1, 1 << 64, 1 << 80):
        odd = Allowlist(allow.keys, digest)
        for _ in range(3):
            assert bytes(trimmer.trim(frame, odd).data) == reference(frame, allow)
    assert not trimmer._fast


def test_every_uint64_digest_gets_a_fast_slot() -> None:
    """The C plan cache keys any digest in [0, 2**64), the bounds included: an allowlist
    whose digest is 0 or 2**64 - 1 is installed and then served by one C call like any
    other."""
    frame = encode(dense(4, 10))
    hint = struct.unpack_from("<Q", frame, 16)[0]
    allow = Allowlist.from_names(["col_0001", "col_0004"])
    for digest in (0, 1, (1 << 64) - 1):
        trimmer = Trimmer(backend="c")
        edge = Allowlist(allow.keys, digest)
        assert bytes(trimmer.trim(frame, edge).data) == reference(frame, allow)
        assert list(trimmer._fast) == [struct.pack("<QQ", hint, digest)]
        res = fast(trimmer, frame, edge)
        assert res is not None and bytes(res.data) == reference(frame, allow)


def test_out_problems_fall_back_to_the_worded_errors() -> None:
    frame = encode(dense(6, 20))
    allow = Allowlist.from_names([f"col_{i:04d}" for i in range(20)])
    trimmer = Trimmer(backend="c")
    warm(trimmer, frame, allow)
    assert fast(trimmer, frame, allow, bytearray(100)) is None
    with pytest.raises(ValueError, match=f"needs {len(frame)}"):
        trimmer.trim(frame, allow, out=bytearray(100))
    assert fast(trimmer, frame, allow, bytes(len(frame))) is None
    with pytest.raises(ValueError, match="read-only"):
        trimmer.trim(frame, allow, out=bytes(len(frame)))
    strided = np.zeros(2 * len(frame), np.uint8)[::2]
    assert fast(trimmer, frame, allow, strided) is None
    assert fast(trimmer, frame, allow, 12) is None
    with pytest.raises(TypeError):
        trimmer.trim(frame, allow, out=12)


def test_fast_cache_is_bounded_and_cleared() -> None:
    trimmer = Trimmer(max_plans=2, max_sizes_per_plan=2, backend="c")
    allow = Allowlist.from_names(["col_0000"])
    for n_feat in range(1, 9):
        frame = encode(dense(3, n_feat))
        for _ in range(2):
            trimmer.trim(frame, allow)
    assert len(trimmer._fast) == 2
    trimmer.clear()
    assert not trimmer._fast


# --- make_plan and plan_trim argument checks ------------------------------------------------
def test_make_plan_rejects_inconsistent_plans() -> None:
    ok: dict[str, Any] = dict(layout=bytes(30), n_columns=2, elem=np.array([4, 8], np.uint64),
                              ragged=np.array([0, 1], np.uint8), kept=np.array([1], np.int64),
                              prefix=bytes(96), n_missing=0)
    assert isinstance(_copyruns.make_plan(*ok.values()), _copyruns.Plan)
    bad_cases: list[dict[str, Any]] = [
        dict(elem=np.array([4], np.uint64)),  # one element size for two columns
        dict(elem=np.array([0, 8], np.uint64)),  # zero-size elements
        dict(elem=np.array([4, 1 << 32], np.uint64)),  # above MAX_ELEM_BYTES
        dict(ragged=np.array([0, 2], np.uint8)),
        dict(ragged=np.array([0], np.uint8)),
        dict(kept=np.array([2], np.int64)),  # no such column
        dict(kept=np.array([-1], np.int64)),
        dict(kept=np.array([1, 1], np.int64)),  # not increasing
        dict(kept=np.array([1, 0], np.int64)),
        dict(prefix=bytes(40)),  # shorter than a preamble
        dict(prefix=bytes(97)),  # the output table would be unaligned
        dict(n_columns=1 << 32),
    ]
    for change in bad_cases:
        with pytest.raises(ValueError, match="make_plan"):
            _copyruns.make_plan(*{**ok, **change}.values())
    with pytest.raises(TypeError):
        _copyruns.make_plan(*{**ok, "layout": bytearray(30)}.values())


def test_plan_trim_checks_its_arguments() -> None:
    frame = encode(dense(3, 3))
    with pytest.raises(TypeError):
        _copyruns.plan_trim({}, frame, None, 1, False)
    with pytest.raises(TypeError):
        _copyruns.plan_trim([], frame, None, 1, False, TrimResult)
    with pytest.raises(TypeError):
        _copyruns.plan_trim({}, frame, None, 1, False, dict)
    with pytest.raises(TypeError):
        _copyruns.plan_parts({}, frame, 1, False, 10, dict)
    assert _copyruns.plan_trim({}, frame, None, 1, False, TrimResult) is None
    assert _copyruns.plan_trim({}, object(), None, 1, False, TrimResult) is None
    assert _copyruns.plan_trim({}, frame, None, "x", False, TrimResult) is None
    trimmer = Trimmer(backend="c")
    allow = Allowlist.from_names(["col_0000"])
    warm(trimmer, frame, allow)
    key = next(iter(trimmer._fast))
    for entry in (b"x", (b"x",), (frame[64:], b"short"), (frame[64:], bytes(400))):
        with pytest.raises(TypeError, match="Plan objects"):
            _copyruns.plan_trim({key: entry}, frame, None, allow.digest, False, TrimResult)


def test_fast_path_on_a_large_frame_releasing_the_gil() -> None:
    """The benchmark's shape: 2000 float32 columns x 200 candidates, ~40% kept."""
    cols = dense(200, 2000, seed=5)
    frame = encode(cols, {"request_id": "big"})
    keep = np.random.default_rng(6).random(2000) < 0.4
    allow = Allowlist.from_names([n for n, k in zip(cols, keep, strict=True) if k])
    trimmer = Trimmer(backend="c")
    out = np.zeros(len(frame), np.uint8)
    warm(trimmer, frame, allow, out)
    want = reference(frame, allow)
    for _ in range(2):  # both copy orders
        out[:] = 0
        res = fast(trimmer, frame, allow, out)
        assert res is not None and res.bytes_out > 256 * 1024
        assert bytes(res.data) == want


@pytest.mark.parametrize("shape", ["uniform", "mixed"])
def test_a_change_anywhere_in_layout_or_table_is_caught(each_kernel: str, shape: str) -> None:
    """Every byte of the layout section is compared (vector loops plus their tails), and
    every block table entry is validated (these changes all make the table invalid)."""
    _copyruns.set_kernel(each_kernel)
    cols = dense(3, 300) if shape == "uniform" else {**mixed(3), **dense(3, 40)}
    frame = encode(cols)
    allow = Allowlist.from_names(list(cols)[::3])
    trimmer = Trimmer(backend="c")
    warm(trimmer, frame, allow)
    layout_len = PREAMBLE.unpack_from(frame, 0)[4]
    t_off = table_offset(frame)
    positions = list(range(PREAMBLE_SIZE, PREAMBLE_SIZE + layout_len, 37))
    positions += [PREAMBLE_SIZE + layout_len - 1]
    positions += list(range(t_off, t_off + 16 * len(cols), 41)) + [t_off + 16 * len(cols) - 1]
    for at in positions:
        bad = bytearray(frame)
        bad[at] ^= 0x10
        assert fast(trimmer, bad, allow) is None, at
        if at >= t_off:
            with pytest.raises(FrameError):
                trimmer.trim(bad, allow)
    assert fast(trimmer, frame, allow) is not None


# --- the branch-free table check: edge values, every kernel, agreement with numpy ----------
def edge_frame(n_cols: int, n_cand: int) -> dict[str, object]:
    """Dense (elem 4, 24), ragged with a power-of-two (8) and other (3, 12) elem sizes, in a
    pattern that puts each kind in every lane of the 4-column vector check."""
    rng = np.random.default_rng(n_cols)
    cols: dict[str, object] = {}
    for i in range(n_cols):
        kind = i % 5
        lengths = rng.integers(0, 4, n_cand)
        n = int(lengths.sum())
        if kind == 0:
            cols[f"c{i}"] = rng.standard_normal(n_cand).astype(np.float32)
        elif kind == 1:
            cols[f"c{i}"] = Ragged.from_lengths(rng.integers(0, 99, n), lengths)
        elif kind == 2:
            cols[f"c{i}"] = Ragged.from_lengths(rng.integers(0, 99, (n, 3)).astype(np.uint8),
                                                lengths)
        elif kind == 3:
            cols[f"c{i}"] = rng.standard_normal((n_cand, 3))
        else:
            cols[f"c{i}"] = Ragged.from_lengths(rng.standard_normal((n, 3)).astype(np.float32),
                                                lengths)
    return cols


@pytest.mark.parametrize("n_cols", [1, 4, 5, 8, 9, 13])
def test_table_check_edge_values_agree_with_numpy(each_kernel: str, n_cols: int) -> None:
    """Offsets and sizes near 2^62, 2^63 and 2^64 (wrap-around), sizes one off, blocks moved
    into their padding or onto a neighbour: the C check (vector lanes and scalar tail)
    accepts exactly what the numpy check accepts, and serves it byte for byte."""
    _copyruns.set_kernel(each_kernel)
    cols = edge_frame(n_cols, 5)
    frame = encode(cols, {"request_id": "edge"})
    allow = Allowlist.from_names(list(cols)[::2])
    trimmer = Trimmer(backend="c")
    warm(trimmer, frame, allow)
    t_off = table_offset(frame)
    big = [1 << 62, (1 << 62) - 64, 1 << 63, (1 << 64) - 64, (1 << 64) - 1, len(frame) + 64]
    for col in range(n_cols):
        at = t_off + 16 * col
        off, nb = struct.unpack_from("<QQ", frame, at)
        changes = [(v, nb) for v in big] + [(off, v) for v in big]
        changes += [(off, (1 << 64) - off), (off, (1 << 64) - off + 64), (off, nb + 1),
                    (off, nb - 1), (off, nb + 3), (off, nb + 8), (off, nb + 12), (off, 0),
                    (off + 64, nb), (off - 64, nb), (off, nb + 64)]
        for new_off, new_nb in changes:
            bad = bytearray(frame)
            struct.pack_into("<QQ", bad, at, new_off % (1 << 64), new_nb % (1 << 64))
            try:
                want: bytes | None = reference(bytes(bad), allow)
            except FrameError:
                want = None
            got = fast(trimmer, bad, allow)
            assert (got is None) == (want is None), (col, new_off, new_nb)
            if got is not None:
                assert bytes(got.data) == want


def test_trim_is_one_c_call_with_the_method_signature() -> None:
    """On the C backend Trimmer.trim is the C entry; it takes the documented arguments
    positionally or by keyword and words bad calls as the Python method does."""
    cols = dense(4, 20)
    frame = encode(cols)
    allow = Allowlist.from_names(list(cols)[::3])
    trimmer = Trimmer(backend="c")
    assert type(trimmer.trim).__name__ == "TrimEntry"
    want = reference(frame, allow)
    out = bytearray(len(frame))
    for call in (lambda: trimmer.trim(frame, allow),
                 lambda: trimmer.trim(frame, allow, out),
                 lambda: trimmer.trim(frame, allow, out, True),
                 lambda: trimmer.trim(frame, allow, out=out, check_ragged=True),
                 lambda: trimmer.trim(frame, allow, check_ragged=1, out=out),
                 lambda: trimmer.trim(buf=frame, allowlist=allow),
                 lambda: trimmer.trim(frame, allowlist=allow, out=out)):
        for _ in range(2):  # the general path, then the plan
            res = call()
            assert isinstance(res, TrimResult)
            assert bytes(res.data) == want
    for bad_call in (lambda: trimmer.trim(frame),
                     lambda: trimmer.trim(frame, allow, out, False, 1),
                     lambda: trimmer.trim(frame, allow, out, out=out),
                     lambda: trimmer.trim(frame, allow, nope=1)):
        with pytest.raises(TypeError):
            bad_call()
    with pytest.raises(AttributeError):
        trimmer.trim(frame, object())  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        trimmer.trim(frame[:-1], allow)
    with pytest.raises(TypeError):
        _copyruns.trim_entry({}, TrimResult, None, None)


def test_the_entrys_last_plan_is_right_when_evicted_or_cleared() -> None:
    """The C entry keeps its last plan by key: alternating layouts through a one-plan cache
    (each evicting the other) and a cleared trimmer still get exactly the right bytes."""
    trimmer = Trimmer(max_plans=1, backend="c")
    frames = [encode(dense(5, 12)), encode(mixed(5)), encode(dense(5, 13))]
    allows = [Allowlist.from_names(list(dense(5, 13))[::2] + list(mixed(5))[1::2])]
    allows.append(Allowlist.from_names(list(dense(5, 13))[1::3]))
    for rnd in range(4):
        for frame in frames:
            for allow in allows:
                assert bytes(trimmer.trim(frame, allow).data) == reference(frame, allow)
        assert len(trimmer._fast) <= 1
        if rnd == 1:
            trimmer.clear()
            assert not trimmer._fast


def test_a_subclass_trim_is_not_shadowed_by_the_c_entry() -> None:
    class Counting(Trimmer):
        calls = 0

        def trim(self, buf: Any, allowlist: Allowlist, out: Any = None,
                 check_ragged: bool = False) -> TrimResult:
            Counting.calls += 1
            return super().trim(buf, allowlist, out, check_ragged)

    frame = encode(dense(3, 6))
    allow = Allowlist.from_names(["col_0001"])
    trimmer = Counting(backend="c")
    for _ in range(3):
        assert bytes(trimmer.trim(frame, allow).data) == reference(frame, allow)
    assert Counting.calls == 3
    assert trimmer._fast  # the C plan still serves it, through the Python method
