"""Hypothesis properties of the frame codec and the trim engine.

* encode/decode round-trips every column bit for bit, and the metadata;
* decode(trim(f, A)) has exactly the columns of f named in A, in f's order, byte-identical;
  trim is idempotent and both copy backends produce the same bytes;
* mutated bytes (bit flips, boundary values in header fields, truncation, splices) make
  decode and trim raise FrameError or succeed -- never another exception.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatbuffers_schema.keys import Allowlist
from root_worker.frame import (
    BACKENDS,
    DTYPE_BY_CODE,
    FrameError,
    Ragged,
    Trimmer,
    decode,
    encode,
)
from root_worker.frame.format import PREAMBLE, PREAMBLE_SIZE, TABLE_ENTRY_SIZE, align
from root_worker.frame.trim import IOV_MAX

PROFILE = settings(deadline=None, max_examples=120,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = sorted({dt.str for dt in DTYPE_BY_CODE.values()})
TRIMMERS = {b: Trimmer(backend=b) for b in BACKENDS}

names_st = st.text(st.characters(codec="utf-8"), min_size=1, max_size=6)
meta_value = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                       st.text(max_size=10))
metadata_st = st.dictionaries(st.text(max_size=6), meta_value, max_size=4)


def random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    n = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer(rng.bytes(n), dtype=dtype).reshape(shape).copy()


@st.composite
def column_sets(draw: st.DrawFn, max_columns: int = 8) -> tuple[dict[str, Any], int]:
    n_cand = draw(st.integers(0, 6))
    names = draw(st.lists(names_st, max_size=max_columns, unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cols: dict[str, Any] = {}
    for name in names:
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        inner = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
        if draw(st.booleans()):
            lengths = rng.integers(0, 4, n_cand)
            cols[name] = Ragged.from_lengths(
                random_array(rng, dtype, (int(lengths.sum()), *inner)), lengths)
        else:
            cols[name] = random_array(rng, dtype, (n_cand, *inner))
    return cols, n_cand


def wire_bytes(col: Any) -> bytes:
    if isinstance(col, Ragged):
        return col.offsets.astype("<i8").tobytes() + b"|" + col.values.tobytes()
    return bytes(col.tobytes())


def shape_of(col: Any) -> tuple[Any, ...]:
    if isinstance(col, Ragged):
        return ("ragged", col.values.dtype.str, col.values.shape)
    return ("dense", col.dtype.str, col.shape)


@PROFILE
@given(column_sets(), metadata_st)
def test_encode_decode_round_trip(cols_n: tuple[dict[str, Any], int],
                                  meta: dict[str, Any]) -> None:
    cols, n_cand = cols_n
    frame = decode(encode(cols, meta, n_candidates=n_cand))
    assert frame.n_candidates == n_cand
    assert frame.metadata == meta
    assert list(frame.columns) == list(cols)
    for name, col in cols.items():
        assert shape_of(frame.columns[name]) == shape_of(col)
        assert wire_bytes(frame.columns[name]) == wire_bytes(col)


@PROFILE
@given(column_sets(), metadata_st, st.data())
def test_trim_keeps_exactly_the_allowlisted_columns(cols_n: tuple[dict[str, Any], int],
                                                    meta: dict[str, Any],
                                                    data: st.DataObject) -> None:
    cols, n_cand = cols_n
    frame = encode(cols, meta, n_candidates=n_cand)
    chosen = data.draw(st.lists(st.sampled_from(list(cols)), unique=True)) if cols else []
    extra = data.draw(st.lists(names_st.filter(lambda n: n not in cols), max_size=3,
                               unique=True))
    allow = Allowlist.from_names(chosen + extra)
    outputs = {b: bytes(t.trim(frame, allow).data) for b, t in TRIMMERS.items()}
    assert len(set(outputs.values())) == 1, "backends disagree"
    trimmed = next(iter(outputs.values()))
    res = next(iter(TRIMMERS.values())).trim(frame, allow)
    assert (res.n_kept, res.n_missing) == (len(chosen), len(extra))
    out = decode(trimmed)
    assert list(out.columns) == [n for n in cols if n in set(chosen)]
    assert out.metadata == meta and out.n_candidates == n_cand
    for name, col in out.columns.items():
        assert wire_bytes(col) == wire_bytes(cols[name])
    for t in TRIMMERS.values():
        assert bytes(t.trim(trimmed, allow).data) == trimmed  # idempotent
        assert bytes(t.trim(frame, allow, check_ragged=True).data) == trimmed
        for limit in (IOV_MAX, 1):  # scatter-gather views, and the one-copy fallback
            t.max_parts = limit
            parts = t.trim_parts(frame, allow, check_ragged=data.draw(st.booleans()))
            assert b"".join(parts.parts) == trimmed
            if limit == 1:  # really the fallback: one new contiguous copy
                assert len(parts.parts) == 1
            else:  # the header, the kept blocks' views and the metadata
                assert len(parts.parts) >= 2
        t.max_parts = IOV_MAX
    kept = {n: c for n, c in cols.items() if n in set(chosen)}
    assert trimmed == encode(kept, meta, n_candidates=n_cand)


# --- mutated input ------------------------------------------------------------------------
BOUNDARY = [0, 1, 7, 63, 64, 65, 255, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 32, 1 << 63,
            (1 << 64) - 1, (1 << 64) - 64]


def regions(frame: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of the documented sections (magic excluded: it is checked first)."""
    fields = PREAMBLE.unpack(frame[:PREAMBLE_SIZE])
    n_columns, layout_len, meta_off = fields[3], fields[4], fields[9]
    table = align(PREAMBLE_SIZE + layout_len, 8)
    table_end = table + TABLE_ENTRY_SIZE * n_columns
    return {"preamble": (4, PREAMBLE_SIZE), "layout": (PREAMBLE_SIZE, PREAMBLE_SIZE + layout_len),
            "table": (table, table_end), "data": (table_end, meta_off),
            "metadata": (meta_off, len(frame)), "anywhere": (4, len(frame))}


def fix_sizes(frame: bytearray) -> None:
    """After a length change, make frame_len/meta_len agree so deeper checks run."""
    if len(frame) >= PREAMBLE_SIZE:
        meta_off = struct.unpack_from("<Q", frame, 40)[0]
        struct.pack_into("<Q", frame, 32, len(frame))
        if meta_off <= len(frame) and len(frame) - meta_off < 1 << 32:
            struct.pack_into("<I", frame, 48, len(frame) - meta_off)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    cols, n_cand = draw(column_sets(max_columns=5))
    frame = bytearray(encode(cols, draw(metadata_st), n_candidates=n_cand))
    spans = regions(bytes(frame))
    for _ in range(draw(st.integers(1, 3))):
        lo, hi = spans[draw(st.sampled_from(sorted(spans)))]
        hi = min(hi, len(frame))
        if lo >= hi:
            continue
        pos = lo + draw(st.integers(0, 1 << 20)) % (hi - lo)  # spread, not biased to lo
        kind = draw(st.sampled_from(["flip", "byte", "field32", "field64", "truncate",
                                     "splice"]))
        if kind == "flip":
            frame[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            frame[pos] = draw(st.integers(0, 255))
        elif kind in ("field32", "field64"):
            size, fmt = (4, "<I") if kind == "field32" else (8, "<Q")
            pos -= pos % size if draw(st.booleans()) else 0
            if pos + size <= len(frame):
                value = draw(st.sampled_from(BOUNDARY)) & ((1 << (8 * size)) - 1)
                struct.pack_into(fmt, frame, pos, value)
        else:
            if kind == "truncate":
                del frame[pos:]
            else:
                frame[pos:pos] = draw(st.binary(min_size=1, max_size=80))
            if draw(st.booleans()):
                fix_sizes(frame)
    return bytes(frame)


def expect_only_frame_errors(frame: bytes) -> None:
    decoded = None
    try:
        decoded = decode(frame)
    except FrameError:
        pass
    names = list(decoded.columns)[::2] if decoded is not None else ["x"]
    allow = Allowlist.from_names(names)
    for check_ragged in (False, True):
        verdicts: dict[str, bytes | None] = {}
        for backend, t in TRIMMERS.items():
            for _ in range(2):  # cold, then from the cached plan
                try:
                    res = t.trim(frame, allow, check_ragged=check_ragged)
                except FrameError:
                    assert decoded is None, "trim rejected a frame that decode accepts"
                    verdicts[backend] = None
                    continue
                verdicts[backend] = bytes(res.data)
                if decoded is not None:
                    assert list(decode(res.data).columns) == names
                elif check_ragged:  # every kept column was checked: only metadata can be bad
                    try:
                        decode(res.data)
                    except FrameError as exc:
                        assert str(exc).startswith("metadata"), exc
        assert len(set(verdicts.values())) == 1, f"backends disagree: {verdicts}"


@settings(PROFILE, max_examples=400)
@given(mutated_frames())
def test_mutated_frames_raise_only_frame_error(frame: bytes) -> None:
    expect_only_frame_errors(frame)


@settings(PROFILE, max_examples=200)
@given(st.binary(max_size=300), st.sampled_from([b"", b"FTRM\x01\x00\x00\x00"]))
def test_random_bytes_raise_only_frame_error(blob: bytes, prefix: bytes) -> None:
    expect_only_frame_errors(prefix + blob)
