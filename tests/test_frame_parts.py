"""Per-request block tables, the ragged-offsets check and the scatter-gather result.

Both backends are run on the same inputs and must agree byte for byte and on
accept/reject: any valid block table (new ragged lengths, new ``n_candidates``,
non-canonical placement) is served by the C plan path in one call; ``check_ragged``
refuses a malformed offsets head of a kept ragged column; ``trim_parts`` joins to the
``trim`` output and shares the input's memory.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from daemon_helpers import run_threads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatbuffers_schema.keys import Allowlist
from root_worker.frame import (
    BACKENDS,
    FrameError,
    Ragged,
    Trimmer,
    TrimResult,
    cheader,
    decode,
    encode,
)
from root_worker.frame import backends as frame_copy
from root_worker.frame.format import PREAMBLE, PREAMBLE_SIZE, PREAMBLE_SPANS, align
from root_worker.frame.lru import LruCache
from root_worker.frame.trim import IOV_MAX, TrimParts

TRIMMERS = {b: Trimmer(backend=b) for b in BACKENDS}
needs_c = pytest.mark.skipif(not frame_copy.HAVE_C, reason="C extension not built")


def mixed_cols(n_cand: int, seed: int, n_feat: int = 40) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    cols: dict[str, Any] = {}
    for i in range(n_feat):
        if i % 6 == 0:
            lengths = rng.integers(0, 6, n_cand)
            cols[f"ids{i}"] = Ragged.from_lengths(rng.integers(0, 1 << 40, lengths.sum()),
                                                  lengths)
        elif i % 6 == 3:
            lengths = rng.integers(0, 3, n_cand)  # odd element size: 3 x int16
            cols[f"tri{i}"] = Ragged.from_lengths(
                rng.integers(0, 999, (lengths.sum(), 3)).astype(np.int16), lengths)
        elif i % 5 == 0:
            cols[f"emb{i}"] = rng.standard_normal((n_cand, 16)).astype(np.float32)
        else:
            cols[f"f{i}"] = rng.standard_normal(n_cand).astype(np.float32)
    return cols


def table_of(frame: bytes) -> tuple[int, int, int]:
    fields = PREAMBLE.unpack_from(frame, 0)
    return align(PREAMBLE_SIZE + fields[4], 8), fields[3], fields[9]


def spread(frame: bytes, gaps: list[int], fill: int = 0xEE) -> bytes:
    """The same frame with ``gaps[i] * 64`` extra bytes before block i (non-canonical
    placement; the gaps hold ``fill``)."""
    t_off, n_columns, meta_off = table_of(frame)
    table = np.frombuffer(frame, "<u8", 2 * n_columns, t_off).reshape(-1, 2)
    data_start = align(t_off + 16 * n_columns, 64)
    out = bytearray(frame[:data_start])
    new_table = table.copy()
    for i, (off, nb) in enumerate(table.tolist()):
        out += bytes([fill]) * (align(len(out), 64) - len(out) + 64 * gaps[i])
        new_table[i, 0] = len(out)
        out += frame[off:off + nb]
    meta = frame[meta_off:]
    out[t_off:t_off + new_table.nbytes] = new_table.astype("<u8").tobytes()
    struct.pack_into("<QQI", out, PREAMBLE_SPANS["frame_len"][0], len(out) + len(meta),
                     len(out), len(meta))
    return bytes(out + meta)


def outputs(frame: bytes, allow: Allowlist, check_ragged: bool = False) -> dict[str, Any]:
    """Each backend's output bytes, or the FrameError type it raised."""
    got: dict[str, Any] = {}
    for name, t in TRIMMERS.items():
        try:
            got[name] = bytes(t.trim(frame, allow, check_ragged=check_ragged).data)
        except FrameError:
            got[name] = FrameError
    return got


# --- any block table, one C call --------------------------------------------------------
@needs_c
def test_new_block_tables_each_request_are_served_by_one_c_call() -> None:
    allow = Allowlist.from_names([n for i, n in enumerate(mixed_cols(1, 0)) if i % 3 != 1])
    trimmer = Trimmer(backend="c")
    trimmer.trim(encode(mixed_cols(5, 0)), allow)
    rng = np.random.default_rng(9)
    for k in range(30):
        frame = encode(mixed_cols(int(rng.integers(0, 40)), seed=k), {"request_id": f"r{k}"})
        if k % 3 == 0:
            frame = spread(frame, rng.integers(0, 3, 40).tolist())
        res = frame_copy.plan_trim_c(trimmer._fast, frame, None, allow.digest, True,
                                     TrimResult)
        assert res is not None, k
        want = bytes(Trimmer(backend="numpy").trim(frame, allow, check_ragged=True).data)
        assert bytes(res.data) == want
        decode(res.data)
    assert len(trimmer._fast) == 1


def test_non_canonical_input_trims_to_the_canonical_frame() -> None:
    cols = mixed_cols(7, 3)
    names = list(cols)
    allow = Allowlist.from_names(names[::2])
    canonical = encode({n: cols[n] for n in names[::2]}, {"request_id": "nc"})
    frame = spread(encode(cols, {"request_id": "nc"}), [i % 3 for i in range(40)], fill=0)
    assert frame != encode(cols, {"request_id": "nc"})
    for t in TRIMMERS.values():
        for _ in range(2):
            assert bytes(t.trim(frame, allow).data) == canonical


# --- ragged offsets check -----------------------------------------------------------------
def corrupt_offsets(frame: bytes, col: int, at: int, value: int) -> bytes:
    t_off, _, _ = table_of(frame)
    off = struct.unpack_from("<Q", frame, t_off + 16 * col)[0]
    bad = bytearray(frame)
    struct.pack_into("<q", bad, off + 8 * at, value)
    return bytes(bad)


@pytest.mark.parametrize("kernel", ["memcpy", "best"])
def test_check_ragged_refuses_bad_offsets_of_kept_columns(kernel: str) -> None:
    if frame_copy.HAVE_C:
        from root_worker.frame import _copyruns  # type: ignore[attr-defined]
        _copyruns.set_kernel(frame_copy.KERNEL if kernel == "best" else kernel)
    try:
        n_cand = 13  # vector loop of 4 plus a tail
        cols = mixed_cols(n_cand, 4)
        names = list(cols)
        frame = encode(cols)
        kept = Allowlist.from_names(["ids0", "f1"])
        dropped = Allowlist.from_names(["f1", "f2"])
        n_values = len(cols["ids0"].values)
        cases = {"first": (0, 5), "decrease": (7, -1), "last": (n_cand, n_values + 1),
                 "huge": (3, 1 << 62), "negative": (1, -5)}
        for why, (at, value) in cases.items():
            bad = corrupt_offsets(frame, names.index("ids0"), at, value)
            with pytest.raises(FrameError):
                decode(bad)
            for t in TRIMMERS.values():
                for _ in range(2):  # cold, then from the cached plan
                    with pytest.raises(FrameError, match="ids0.*ragged offsets"):
                        t.trim(bad, kept, check_ragged=True)
                    t.trim(bad, kept)  # off: copied verbatim, the leaf's decode refuses it
                    t.trim(bad, dropped, check_ragged=True)  # not kept: not checked
                    with pytest.raises(FrameError, match="ragged offsets"):
                        t.trim_parts(bad, kept, check_ragged=True)
            assert outputs(bad, kept, True) == {b: FrameError for b in BACKENDS}, why
        assert len(set(map(bytes, [t.trim(frame, kept, check_ragged=True).data
                                   for t in TRIMMERS.values()]))) == 1
    finally:
        if frame_copy.HAVE_C:
            _copyruns.set_kernel(frame_copy.KERNEL)


@pytest.mark.parametrize("kernel", ["memcpy", "best"])
def test_check_ragged_refuses_offsets_that_end_one_value_short(kernel: str) -> None:
    """offsets[C] one below n_values (ends at 8 of a block's 9 values, non-decreasing, so
    only the end comparison can see it): every backend's ``check_ragged`` refuses it, cold
    and from the cached plan, in ``trim`` and ``trim_parts``, as ``decode`` does.

    Fails on the planted bug ``heads[:, -1] != n_values`` -> ``>`` in
    ``format.check_ragged_offsets`` (numpy backend) and on ``!= n_values`` -> ``> n_values``
    in ``ragged_bad`` (_copyruns_plan.h, C backend): both then accept the frame (checked by
    planting each, rebuilding, running this test and reverting)."""
    if frame_copy.HAVE_C:
        from root_worker.frame import _copyruns  # type: ignore[attr-defined]
        _copyruns.set_kernel(frame_copy.KERNEL if kernel == "best" else kernel)
    try:
        for lengths in ([2, 3, 4], [0, 0, 5, 1, 1, 0, 2, 3, 1, 0, 4, 1, 1]):
            n_cand, n_values = len(lengths), sum(lengths)
            ids = Ragged.from_lengths(np.arange(n_values, dtype=np.int64), lengths)
            frame = encode({"dense": np.zeros(n_cand, np.float32), "ids": ids})
            kept = Allowlist.from_names(["ids"])
            bad = corrupt_offsets(frame, 1, n_cand, n_values - 1)
            with pytest.raises(FrameError, match="ragged offsets end at"):
                decode(bad)
            for t in TRIMMERS.values():
                for _ in range(2):  # cold, then from the cached plan
                    with pytest.raises(FrameError, match="'ids': ragged offsets end at "
                                                         f"{n_values - 1} but the block "
                                                         f"holds {n_values} values"):
                        t.trim(bad, kept, check_ragged=True)
                    with pytest.raises(FrameError, match="ragged offsets"):
                        t.trim_parts(bad, kept, check_ragged=True)
            assert outputs(bad, kept, True) == {b: FrameError for b in BACKENDS}
            assert outputs(frame, kept, True) == {
                b: bytes(TRIMMERS["numpy"].trim(frame, kept).data) for b in BACKENDS}
    finally:
        if frame_copy.HAVE_C:
            _copyruns.set_kernel(frame_copy.KERNEL)


def test_check_ragged_finds_the_bad_one_of_several_kept_ragged_columns() -> None:
    """Three kept ragged columns, only the last one's offsets decrease: refused naming it
    (fails if the per-column reduction becomes one over all columns: the first, good,
    column is then explained and nothing raised -- a mutant that survived before)."""
    lengths = [1, 2, 0, 3]
    cols = {f"r{i}": Ragged.from_lengths(np.arange(6, dtype=np.int64), lengths)
            for i in range(3)}
    frame = encode(cols)
    allow = Allowlist.from_names(list(cols))
    bad = corrupt_offsets(frame, 2, 2, 0)  # offsets [0, 1, 0, 3, 6]
    for t in TRIMMERS.values():
        with pytest.raises(FrameError, match="'r2': ragged offsets decrease at candidate 2"):
            t.trim(bad, allow, check_ragged=True)
    assert outputs(frame, allow, True) == {b: bytes(TRIMMERS["numpy"].trim(frame, allow).data)
                                           for b in BACKENDS}


def test_check_ragged_of_an_empty_last_column_right_before_tiny_metadata() -> None:
    """A ragged column with no values whose offsets head (8 offsets: exactly 64 bytes) is
    the last block, followed by 2 bytes of metadata: the check reads exactly the head's
    words (reading one more would run past the frame)."""
    frame = encode({"r": Ragged.from_lengths(np.zeros(0, np.int64), [0] * 7)}, {})
    allow = Allowlist.from_names(["r"])
    assert len(frame) == table_of(frame)[2] + 2
    for t in TRIMMERS.values():
        assert bytes(t.trim(frame, allow, check_ragged=True).data) == frame


def test_check_ragged_on_zero_candidates_and_odd_elements() -> None:
    for n_cand in (0, 1, 4, 5):
        cols = mixed_cols(n_cand, 5)
        frame = encode(cols)
        allow = Allowlist.from_names(list(cols))
        got = outputs(frame, allow, check_ragged=True)
        assert len(set(got.values())) == 1 and FrameError not in got.values()
        bad = corrupt_offsets(frame, 3, n_cand, 1 << 20)  # tri3: 6-byte values
        assert outputs(bad, allow, True) == {b: FrameError for b in BACKENDS}


# --- scatter-gather -------------------------------------------------------------------------
def test_trim_parts_join_to_the_trim_output_and_share_the_input() -> None:
    cols = mixed_cols(9, 6)
    names = list(cols)
    frame = bytearray(encode(cols, {"request_id": "sg"}))
    allow = Allowlist.from_names(names[1::3] + names[10:18] + ["absent"])
    ref = Trimmer(backend="numpy").trim(frame, allow)
    want, n_kept = bytes(ref.data), ref.n_kept
    src = np.frombuffer(frame, np.uint8)
    for t in (Trimmer(backend=b) for b in BACKENDS):
        for _ in range(2):
            res = t.trim_parts(frame, allow)
            assert isinstance(res, TrimParts)
            assert b"".join(res.parts) == want and res.bytes_out == len(want)
            assert (res.bytes_in, res.n_kept, res.n_missing) == (len(frame), n_kept, 1)
            assert isinstance(res.parts[0], bytes)
            views = res.parts[1:]
            assert views
            for v in views:  # zero-copy: each part is a range of the input buffer
                assert np.shares_memory(np.frombuffer(v, np.uint8), src)
                assert len(v) == memoryview(v).nbytes and memoryview(v).readonly
            assert len(res.parts) <= 2 + n_kept
        with pytest.raises(BufferError):  # the lifetime rule: the input is pinned
            frame.extend(b"x")
        del res, views, v
    del src
    frame.extend(b"x")  # released with the parts


def test_trim_parts_falls_back_to_one_copy_above_max_parts() -> None:
    cols = mixed_cols(6, 7)
    frame = encode(cols)
    allow = Allowlist.from_names(list(cols)[::2])  # 20 kept, none adjacent: 20 runs
    want = bytes(Trimmer(backend="numpy").trim(frame, allow).data)
    for backend in BACKENDS:
        for limit, n_parts in ((22, 22), (21, 1), (1, 1)):
            t = Trimmer(backend=backend, max_parts=limit)
            for _ in range(2):
                res = t.trim_parts(frame, allow)
                assert len(res.parts) == n_parts, (backend, limit)
                assert b"".join(res.parts) == want
    assert IOV_MAX >= 16
    with pytest.raises(ValueError, match="max_parts"):
        Trimmer(max_parts=0)


def test_trim_parts_of_empty_and_exotic_inputs() -> None:
    empty = encode({}, {"request_id": "none"}, n_candidates=3)
    frame = encode(mixed_cols(4, 8))
    nothing = Allowlist.from_names(["zzz"])
    for t in TRIMMERS.values():
        assert b"".join(t.trim_parts(empty, nothing).parts) == empty
        res = t.trim_parts(frame, nothing)
        assert b"".join(res.parts) == bytes(t.trim(frame, nothing).data)
        assert res.n_kept == 0
        allow = Allowlist.from_names(list(mixed_cols(1, 8))[:5])
        want = bytes(t.trim(frame, allow).data)
        for src in (memoryview(frame), np.frombuffer(frame, np.uint8),
                    np.frombuffer(frame[:len(frame) // 8 * 8], np.int64)):
            if src.nbytes != len(frame):
                with pytest.raises(FrameError):
                    t.trim_parts(src, allow)
                continue
            assert b"".join(t.trim_parts(src, allow).parts) == want
        with pytest.raises(FrameError):
            t.trim_parts(frame[:-1], allow)


# --- one definition of the layout, one LRU -------------------------------------------------
def test_c_header_is_generated_from_format_py() -> None:
    assert cheader.HEADER_PATH.read_text() == cheader.render(), (
        "root_worker/frame/_frame_layout.h is stale: run python -m root_worker.frame.cheader")
    assert "#define FRAME_META_LEN_AT 48" in cheader.render()
    proc = subprocess.run([sys.executable, "-m", "root_worker.frame.cheader", "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_c_source_spells_no_preamble_offsets() -> None:
    parts = sorted(cheader.HEADER_PATH.parent.glob("_copyruns*.[ch]"))
    assert len(parts) == 5, parts
    source = "\n".join(p.read_text() for p in parts)
    assert '#include "_frame_layout.h"' in source
    for name in PREAMBLE_SPANS:
        assert f"FRAME_{name.upper()}_AT" in source, name
    assert not re.findall(r"(?:load|store)_le\((?:s|d|t|ot|o) \+ \d", source)
    assert "FRAME_TABLE_NBYTES_AT" in source
    assert '"FTRM"' not in source


def test_lru_cache_evicts_the_least_recently_used() -> None:
    lru: LruCache[str, int] = LruCache(2)
    lru.put("a", 1)
    lru.put("b", 2)
    lru.touch("a")
    lru.put("c", 3)
    assert list(lru) == ["a", "c"]
    lru.touch("gone")
    lru.put("a", 4)
    assert list(lru.items()) == [("c", 3), ("a", 4)]
    with pytest.raises(ValueError):
        LruCache(0)


# --- the C table check agrees with numpy on every kind of table -----------------------------
TABLE_VALUES = [0, 1, 8, 63, 64, 65, 576, 640, 4096, (1 << 32) - 1, 1 << 32, (1 << 63) - 64,
                1 << 63, (1 << 64) - 64, (1 << 64) - 1]


@settings(deadline=None, max_examples=300,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.integers(0, 9), st.integers(0, 2**32 - 1), st.data())
def test_c_and_numpy_agree_on_mutated_block_tables(n_cand: int, seed: int,
                                                   data: st.DataObject) -> None:
    """Vector (4 columns per step) and scalar C checks, each against numpy: accept/reject
    and output bytes, for tables with shifted, resized, swapped or extreme entries."""
    cols = mixed_cols(n_cand, seed % 1000, n_feat=data.draw(st.integers(1, 23)))
    frame = bytearray(encode(cols))
    t_off, n_columns, _ = table_of(bytes(frame))
    for _ in range(data.draw(st.integers(1, 3))):
        i, field = data.draw(st.integers(0, n_columns - 1)), data.draw(st.integers(0, 1))
        at = t_off + 16 * i + 8 * field
        old = struct.unpack_from("<Q", frame, at)[0]
        how = data.draw(st.sampled_from(["shift", "set", "swap"]))
        if how == "shift":
            new = (old + data.draw(st.sampled_from([-128, -64, -8, -1, 1, 8, 64, 128]))) % 2**64
        elif how == "set":
            new = data.draw(st.sampled_from(TABLE_VALUES))
        else:
            j = data.draw(st.integers(0, n_columns - 1))
            new = struct.unpack_from("<Q", frame, t_off + 16 * j + 8 * field)[0]
        struct.pack_into("<Q", frame, at, new)
    allow = Allowlist.from_names(data.draw(st.lists(st.sampled_from(list(cols)), max_size=8)))
    want = outputs(bytes(frame), allow)["numpy"]
    if not frame_copy.HAVE_C:
        return
    from root_worker.frame import _copyruns  # type: ignore[attr-defined]
    try:
        for kernel in ("memcpy", frame_copy.KERNEL):
            _copyruns.set_kernel(kernel)
            c = Trimmer(backend="c")
            for _ in range(2):  # cold (general path), then the C plan path
                try:
                    got: Any = bytes(c.trim(bytes(frame), allow).data)
                except FrameError:
                    got = FrameError
                assert got == want, kernel
            direct = frame_copy.plan_trim_c(c._fast, bytes(frame), None, allow.digest, False,
                                            TrimResult)
            assert (direct is None) == (want is FrameError), kernel
    finally:
        _copyruns.set_kernel(frame_copy.KERNEL)


@needs_c
def test_threads_sharing_a_plan_get_their_own_tables() -> None:
    """Large trims release the GIL while copying; threads trimming frames of one layout
    with different block tables (so the plan's memo changes under them) stay exact."""
    names = [f"c{i:04d}" for i in range(400)]
    rng = np.random.default_rng(11)
    frames = [encode({n: rng.standard_normal(n_cand).astype(np.float32) for n in names})
              for n_cand in (700, 900, 1100)]
    allow = Allowlist.from_names(names[::2])
    wants = [bytes(Trimmer(backend="numpy").trim(f, allow).data) for f in frames]
    trimmer = Trimmer(backend="c")
    trimmer.trim(frames[0], allow)
    assert max(len(w) for w in wants) > 512 * 1024  # above the GIL-release threshold
    errors: list[str] = []

    def work(k: int) -> None:
        out = np.zeros(max(map(len, frames)), np.uint8)
        for i in range(60):
            j = (k + i) % len(frames)
            if bytes(trimmer.trim(frames[j], allow, out=out).data) != wants[j]:
                errors.append(f"thread {k} frame {j} call {i}")

    run_threads(work, 3)
    assert not errors, errors[:5]


@pytest.mark.parametrize("n_cand", [16, 256])  # small, and above the GIL-release threshold
@pytest.mark.parametrize("ragged", [False, True])  # memo (tables repeat) or built per call
def test_many_runs_outgrow_the_stack_scratch(n_cand: int, ragged: bool) -> None:
    names = [f"c{i:04d}" for i in range(1300)]
    rng = np.random.default_rng(12)
    cols: dict[str, Any] = {n: rng.standard_normal(n_cand).astype(np.float32) for n in names}
    if ragged:
        cols["ids"] = Ragged.from_lengths(np.arange(3 * n_cand), np.full(n_cand, 3))
    frame = encode(cols, {"request_id": "many"})
    allow = Allowlist.from_names(names[::2] + ["ids"])  # 650 runs (+1): above 512
    want = bytes(Trimmer(backend="numpy").trim(frame, allow).data)
    for t in (Trimmer(backend=b) for b in BACKENDS):
        out = np.zeros(len(frame), np.uint8)
        for _ in range(3):  # cold, plan (and memo) built, served from the plan
            assert bytes(t.trim(frame, allow, out=out).data) == want
            parts = t.trim_parts(frame, allow, check_ragged=True)
            assert len(parts.parts) == 650 + ragged + 2
            assert b"".join(parts.parts) == want
