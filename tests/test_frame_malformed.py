"""Malformed frames: decode and trim raise FrameError naming what is wrong and where.

Each case patches one field of a valid frame (``REF``) at its documented offset
(docs/frame-format.md) and checks the exact message.  Structural errors must come out of
``trim`` identically; ragged-offset and metadata *content* is checked by ``decode`` only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest

from flatbuffers_schema.keys import Allowlist
from root_worker.frame import BACKENDS, Column, FrameError, Ragged, Trimmer, decode, encode
from root_worker.frame.format import (
    MAGIC,
    MAX_ELEM_BYTES,
    PREAMBLE,
    PREAMBLE_SIZE,
    TABLE_ENTRY_SIZE,
    VERSION,
    ZERO_RESERVED,
    align,
    layout_hint,
    read_preamble,
)

COLS: dict[str, Column] = {
    "alpha": np.arange(6, dtype=np.float32),
    "beta": np.arange(12, dtype=np.int16).reshape(6, 2),
    "gamma": Ragged.from_lengths(np.arange(9, dtype=np.int64), [2, 0, 3, 1, 0, 3]),
}
REF = encode(COLS, {"request_id": "bad-1"})
FIELDS = PREAMBLE.unpack(REF[:PREAMBLE_SIZE])
N_COLUMNS, LAYOUT_LEN, N_CAND, META_OFF, META_LEN = (FIELDS[3], FIELDS[4], FIELDS[6],
                                                     FIELDS[9], FIELDS[10])
SIZE = len(REF)
RECORDS = PREAMBLE_SIZE
DIMS = RECORDS + 8 * N_COLUMNS  # only "beta" has a dimension
NAMES = DIMS + 4  # "alpha" "beta" "gamma"
TABLE = align(PREAMBLE_SIZE + LAYOUT_LEN, 8)
TABLE_END = TABLE + TABLE_ENTRY_SIZE * N_COLUMNS
# One column with a 200-byte name and no candidates: room for 26 records, a tiny frame.
LONG_NAME = encode({"n" * 200: np.zeros(0, np.float32)}, {})
BLOCKS = [struct.unpack_from("<QQ", REF, TABLE + TABLE_ENTRY_SIZE * i) for i in range(3)]


def patch(frame: bytes, offset: int, fmt: str, *values: object) -> bytes:
    buf = bytearray(frame)
    struct.pack_into("<" + fmt, buf, offset, *values)
    return bytes(buf)


# Three columns whose blocks tile the data exactly: a 54-byte name puts table_end (192) on a
# 64-byte boundary, so the first block starts exactly at data_start; "a" (64 bytes) ends
# where "b" starts; the metadata starts where "c" ends.
SIZED = encode({"a" * 54: np.arange(16, dtype=np.float32), "b": np.arange(16.0),
                "c": np.arange(16, dtype=np.int8)}, {})
SIZED_TABLE = align(PREAMBLE_SIZE + PREAMBLE.unpack(SIZED[:PREAMBLE_SIZE])[4], 8)
# One 1-byte block, the metadata moved from right after it (129) to the next 64-byte
# boundary (a gap before the metadata is allowed).
_ONE = encode({"x": np.array([7], np.int8)}, {"k": 1})
ONE_GAP = patch(patch(_ONE[:129] + bytes(63) + _ONE[129:], 40, "Q", 192), 32, "Q",
                len(_ONE) + 63)
ONE_TABLE = 80
# Two columns with a dimension each (dims at 80 and 84).
TWO_DIMS = encode({"p": np.zeros((2, 2), np.int16), "q": np.zeros((2, 3), np.int16)})


def with_layout_tail(frame: bytes, extra: int) -> bytes:
    """``frame`` with ``extra`` (a multiple of 64) zero bytes appended to its layout section,
    everything after moved along (preamble and block table fixed up, the hint kept): the
    only fault is a layout section longer than its column records declare."""
    fields = PREAMBLE.unpack(frame[:PREAMBLE_SIZE])
    n_columns, layout_len, meta_off = fields[3], fields[4], fields[9]
    end = PREAMBLE_SIZE + layout_len
    out = bytearray(frame[:end] + bytes(extra) + frame[end:])
    struct.pack_into("<I", out, 12, layout_len + extra)
    struct.pack_into("<Q", out, 32, len(out))
    struct.pack_into("<Q", out, 40, meta_off + extra)
    table = align(end + extra, 8)
    for i in range(n_columns):
        at = table + TABLE_ENTRY_SIZE * i
        struct.pack_into("<Q", out, at, struct.unpack_from("<Q", out, at)[0] + extra)
    return bytes(out)


def entry(i: int) -> int:
    return TABLE + TABLE_ENTRY_SIZE * i


def with_metadata(raw: bytes) -> bytes:
    """REF with its metadata bytes replaced (preamble sizes fixed up)."""
    frame = REF[:META_OFF] + raw
    frame = patch(frame, 32, "Q", len(frame))
    return patch(frame, 48, "I", len(raw))


def test_reference_frame_is_valid_and_as_documented() -> None:
    assert decode(REF).metadata == {"request_id": "bad-1"}
    assert (N_COLUMNS, LAYOUT_LEN, N_CAND) == (3, 42, 6)
    assert REF[NAMES:NAMES + 14] == b"alphabetagamma"
    assert BLOCKS == [(192, 24), (256, 24), (320, 136)]
    # The other base frames are valid and laid out as their comments say.
    assert SIZED_TABLE + TABLE_ENTRY_SIZE * 3 == 192
    assert [struct.unpack_from("<QQ", SIZED, SIZED_TABLE + 16 * i) for i in range(3)] == [
        (192, 64), (256, 128), (384, 16)]
    assert PREAMBLE.unpack(SIZED[:PREAMBLE_SIZE])[9] == 400
    assert struct.unpack_from("<QQ", ONE_GAP, ONE_TABLE) == (128, 1)
    assert decode(ONE_GAP).dense("x").tolist() == [7]
    assert decode(ONE_GAP).metadata == {"k": 1}
    assert decode(TWO_DIMS).dense("q").shape == (2, 3)
    assert TWO_DIMS[80:88] == struct.pack("<II", 2, 3)
    assert decode(with_layout_tail(REF, 0)).metadata == {"request_id": "bad-1"}


def run_decode(frame: bytes) -> None:
    decode(frame)


def make_trim(backend: str) -> Callable[[bytes], None]:
    def run(frame: bytes) -> None:
        Trimmer(backend=backend).trim(frame, Allowlist.from_names(["beta", "gamma"]))
    return run


READERS = [pytest.param(run_decode, id="decode")] + [
    pytest.param(make_trim(b), id=f"trim-{b}") for b in BACKENDS]

STRUCTURAL = {
    "truncated preamble": (REF[:10], "truncated preamble: frame is 10 bytes, need 64"),
    "empty buffer": (b"", "truncated preamble: frame is 0 bytes, need 64"),
    "bad magic": (b"XTRM" + REF[4:], "bad magic b'XTRM' at offset 0, expected b'FTRM'"),
    "bad version": (patch(REF, 4, "H", 7),
                    "unsupported frame version 7 at offset 4, expected 1"),
    "unknown flags": (patch(REF, 6, "H", 1), "unknown flags 0x0001 at offset 6, expected 0"),
    "reserved bytes": (patch(REF, 60, "B", 1),
                       "reserved preamble bytes (offsets 28..32, 52..64) are not zero"),
    "truncated frame": (REF[:-1], f"preamble frame_len {SIZE} != buffer length {SIZE - 1}"),
    "trailing garbage": (REF + b"\0", f"preamble frame_len {SIZE} != buffer length {SIZE + 1}"),
    "layout_len past end": (
        patch(REF, 12, "I", 10_000),
        f"layout section [offset 64, 10064) runs past end of frame ({SIZE} bytes)"),
    "huge n_columns": (
        patch(REF, 8, "I", 0xFFFF_FFFF),
        f"n_columns 4294967295 needs 34359738360 bytes of column records but the layout "
        f"section is {LAYOUT_LEN} bytes"),
    "table past end": (
        patch(LONG_NAME, 8, "I", 26),
        f"block table [offset 272, 688) for 26 columns runs past end of frame "
        f"({len(LONG_NAME)} bytes)"),
    "metadata inside table": (
        patch(REF, 40, "Q", TABLE),
        f"metadata [offset {TABLE}, {TABLE + META_LEN}) must lie after the block table (ends "
        f"at {TABLE_END}) and end the frame ({SIZE} bytes)"),
    "metadata not ending frame": (
        patch(REF, 48, "I", META_LEN - 1),
        f"metadata [offset {META_OFF}, {SIZE - 1}) must lie after the block table (ends at "
        f"{TABLE_END}) and end the frame ({SIZE} bytes)"),
    "layout size mismatch": (
        patch(REF, RECORDS + 4, "H", 6),
        f"layout section is {LAYOUT_LEN} bytes but its 3 column records declare 43 "
        f"(records + 4 dims + 15 names)"),
    "unknown kind": (patch(REF, RECORDS + 8 + 1, "B", 9), "column 1: unknown column kind 9"),
    "ndim too large": (patch(REF, RECORDS + 2, "B", 5), "column 0: ndim above 4: 5"),
    "reserved record byte": (patch(REF, RECORDS + 16 + 3, "B", 2),
                             "column 2: reserved record byte is 2"),
    "empty name": (patch(REF, RECORDS + 8 + 4, "H", 0), "column 1: empty name, name_len 0"),
    "bad utf-8 name": (
        patch(REF, NAMES + 5 + 1, "B", 0xFF),
        f"column 1: name bytes [layout offset {NAMES - 64 + 5}, {NAMES - 64 + 9}) are not "
        f"valid UTF-8 (invalid start byte at byte 1)"),
    "duplicate name": (
        patch(REF, NAMES, "5s", b"gamma"),
        "column 2 'gamma': duplicate name (also column 0)"),
    "bad dtype code": (patch(REF, RECORDS + 8, "B", 99),
                       "column 1 'beta': unknown dtype code 99"),
    "dtype code zero": (patch(REF, RECORDS, "B", 0), "column 0 'alpha': unknown dtype code 0"),
    "zero dimension": (patch(REF, DIMS, "I", 0), "column 1 'beta': shape has a zero dimension"),
    "huge element": (
        patch(REF, DIMS, "I", 0xFFFF_FFFF),
        "column 1 'beta': shape (4294967295,) makes 8589934590 bytes per element, above the "
        "limit 4294967295"),
    # The column named is the one holding the zero, not the first column with a dimension.
    "zero dimension in a later column": (
        patch(TWO_DIMS, 84, "I", 0), "column 1 'q': shape has a zero dimension"),
    "layout with trailing bytes": (
        with_layout_tail(REF, 64),
        f"layout section is {LAYOUT_LEN + 64} bytes but its 3 column records declare "
        f"{LAYOUT_LEN} (records + 4 dims + 14 names)"),
    "metadata past the end": (
        patch(patch(REF[:META_OFF - 4], 32, "Q", META_OFF - 4), 48, "I", 4),
        f"metadata [offset {META_OFF}, {META_OFF + 4}) must lie after the block table (ends "
        f"at {TABLE_END}) and end the frame ({META_OFF - 4} bytes)"),
    "misaligned block": (
        patch(REF, entry(1), "Q", BLOCKS[1][0] + 8),
        "column 1 'beta': block [offset 264, 288) is not aligned to 64 bytes"),
    "odd block offset": (
        patch(REF, entry(1), "Q", BLOCKS[1][0] + 1),
        "column 1 'beta': block [offset 257, 281) is not aligned to 64 bytes"),
    "block inside header": (
        patch(REF, entry(0), "Q", 64),
        f"column 0 'alpha': block [offset 64, 88) starts inside the header (data starts at "
        f"{TABLE_END})"),
    "block past end": (
        patch(REF, entry(2), "Q", 1 << 20),
        f"column 2 'gamma': block [offset 1048576, 1048712) runs past end of data (metadata "
        f"starts at {META_OFF})"),
    "one byte at the metadata": (  # [192, 193): the block's end is 1 past meta_offset
        patch(ONE_GAP, ONE_TABLE, "Q", 192),
        "column 0 'x': block [offset 192, 193) runs past end of data (metadata starts at "
        "192)"),
    "huge block size": (
        patch(REF, entry(2) + 8, "Q", 0xFFFF_FFFF_FFFF_FFC0),
        f"column 2 'gamma': block [offset 320, {320 + 0xFFFF_FFFF_FFFF_FFC0}) runs past end "
        f"of data (metadata starts at {META_OFF})"),
    "overlapping blocks": (
        patch(REF, entry(1), "Q", 192),
        "column 1 'beta': block [offset 192, 216) overlaps or precedes the block of column 0 "
        "'alpha', which ends at 216"),
    # A later block overlapping the one before it *and* ending exactly at the metadata:
    # the overlap is what is wrong (named with the block it overlaps), not the end.
    "overlap ending at the metadata": (
        patch(SIZED, SIZED_TABLE + 32, "QQ", 320, 80),
        "column 2 'c': block [offset 320, 400) overlaps or precedes the block of column 1 "
        "'b', which ends at 384"),
    # Wrong sizes on blocks placed exactly at data_start and exactly at the previous end:
    # only the size is wrong.
    "wrong size at data start": (
        patch(SIZED, SIZED_TABLE + 8, "Q", 60),
        f"column 0 {'a' * 54!r}: dense block [offset 192, 252) is 60 bytes, expected 64 (16 "
        f"candidates x 4 bytes)"),
    "wrong size right after the previous block": (
        patch(SIZED, SIZED_TABLE + 16 + 8, "Q", 120),
        "column 1 'b': dense block [offset 256, 376) is 120 bytes, expected 128 (16 "
        "candidates x 8 bytes)"),
    "wrong dense size": (
        patch(REF, entry(0) + 8, "Q", 20),
        "column 0 'alpha': dense block [offset 192, 212) is 20 bytes, expected 24 (6 "
        "candidates x 4 bytes)"),
    "wrong n_candidates": (
        patch(REF, 24, "I", 5),
        "column 0 'alpha': dense block [offset 192, 216) is 24 bytes, expected 20 (5 "
        "candidates x 4 bytes)"),
    "huge n_candidates": (
        patch(REF, 24, "I", 0xFFFF_FFFF),
        "column 0 'alpha': dense block [offset 192, 216) is 24 bytes, expected 17179869180 "
        "(4294967295 candidates x 4 bytes)"),
    "ragged smaller than head": (
        patch(REF, entry(2) + 8, "Q", 40),
        "column 2 'gamma': ragged block [offset 320, 360) is 40 bytes, smaller than its "
        "64-byte offsets head (6 candidates)"),
    "ragged partial value": (
        patch(REF, entry(2) + 8, "Q", 132),
        "column 2 'gamma': ragged block [offset 320, 452) holds 68 value bytes, not a "
        "multiple of the 8-byte element"),
}

CONTENT = {
    "ragged offsets[0]": (patch(REF, 320, "q", 1),
                          "column 2 'gamma': ragged offsets[0] is 1, expected 0"),
    "ragged offsets decrease": (
        patch(REF, 320 + 8 * 3, "q", 1),
        "column 2 'gamma': ragged offsets decrease at candidate 3 (2 -> 1)"),
    "ragged offsets past values": (
        patch(REF, 320 + 8 * 6, "q", 10),
        "column 2 'gamma': ragged offsets end at 10 but the block holds 9 values"),
    "ragged offsets wrap negative": (
        patch(REF, 320 + 8 * 6, "q", -1),
        "column 2 'gamma': ragged offsets decrease at candidate 6 (6 -> -1)"),
    "metadata not utf-8": (
        with_metadata(b'{"a":"\xff"}'),
        f"metadata [offset {META_OFF}, {META_OFF + 9}) is not valid UTF-8 (invalid start "
        f"byte at byte 6)"),
    "metadata not json": (
        with_metadata(b'{"request_id": '),
        f"metadata [offset {META_OFF}, {META_OFF + 15}) is not valid JSON (Expecting value: "
        f"line 1 column 16 (char 15))"),
    "metadata not an object": (
        with_metadata(b"[1, 2]"),
        f"metadata [offset {META_OFF}, {META_OFF + 6}) is a JSON list, expected an object"),
    "metadata empty": (
        with_metadata(b""),
        f"metadata [offset {META_OFF}, {META_OFF}) is not valid JSON (Expecting value: line 1 "
        f"column 1 (char 0))"),
    "metadata nested too deep": (
        with_metadata(b"[" * 100_000),
        None),
    "metadata duplicate key": (  # named by its second occurrence, not the first key
        with_metadata(b'{"a": 1, "b": 2, "b": 3}'),
        f"metadata [offset {META_OFF}, {META_OFF + 24}) is not valid JSON (duplicate key "
        f"'b')"),
    "metadata a string of brackets": (  # brackets inside a string are not nesting
        with_metadata(b'"' + b"[" * 200 + b'"'),
        f"metadata [offset {META_OFF}, {META_OFF + 202}) is a JSON str, expected an object"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", sorted(STRUCTURAL))
def test_structural_errors(case: str, reader: Callable[[bytes], None]) -> None:
    frame, message = STRUCTURAL[case]
    with pytest.raises(FrameError) as info:
        reader(frame)
    assert str(info.value) == message


def test_an_element_of_exactly_the_size_limit_is_accepted() -> None:
    """``MAX_ELEM_BYTES`` bytes per element is the largest accepted (an int8 column of
    shape (4294967295,), here with no candidates); one byte more (65536 x 65536) is
    refused."""
    base = encode({"x": np.zeros((0, 3), np.int8)}, {"k": 1})
    dims = PREAMBLE_SIZE + 8  # the one record, then its one dimension
    at_limit = patch(base, dims, "I", MAX_ELEM_BYTES)
    layout_len = PREAMBLE.unpack(base[:PREAMBLE_SIZE])[4]
    at_limit = patch(at_limit, 16, "Q", layout_hint(at_limit[64:64 + layout_len]))
    assert decode(at_limit).columns["x"].shape == (0, MAX_ELEM_BYTES)
    for backend in BACKENDS:
        res = Trimmer(backend=backend).trim(at_limit, Allowlist.from_names(["x"]))
        assert bytes(res.data) == at_limit
    two = encode({"x": np.zeros((0, 3, 3), np.int8)}, {"k": 1})
    over = patch(two, dims, "II", 65536, 65536)
    message = ("column 0 'x': shape (65536, 65536) makes 4294967296 bytes per element, above "
               "the limit 4294967295")
    for read in [decode] + [make_trim(b) for b in BACKENDS]:
        with pytest.raises(FrameError) as info:
            read(over)
        assert str(info.value) == message


def test_a_frame_of_only_its_preamble_is_well_formed() -> None:
    """The smallest frame is its 64-byte preamble: no columns, and an empty layout, block
    table and metadata, each ending exactly at the end of the frame.  Its structure is
    valid (the metadata's content, empty here, is decode's to refuse): read_preamble
    accepts it and trimming returns it unchanged."""
    frame = PREAMBLE.pack(MAGIC, VERSION, 0, 0, 0, layout_hint(b""), 0, 0, PREAMBLE_SIZE,
                          PREAMBLE_SIZE, 0, ZERO_RESERVED)
    pre = read_preamble(memoryview(frame))
    assert (pre.layout_end, pre.table_end, pre.meta_offset, pre.frame_len) == (64, 64, 64, 64)
    for backend in BACKENDS:
        trimmer = Trimmer(backend=backend)
        for _ in range(2):
            assert bytes(trimmer.trim(frame, Allowlist.from_names(["a"])).data) == frame
    with pytest.raises(FrameError, match=r"metadata \[offset 64, 64\) is not valid JSON"):
        decode(frame)


@pytest.mark.parametrize("case", sorted(CONTENT))
def test_content_errors_in_decode(case: str) -> None:
    frame, message = CONTENT[case]
    with pytest.raises(FrameError) as info:
        decode(frame)
    if message is None:
        assert "is not valid JSON" in str(info.value)
    else:
        assert str(info.value) == message


def test_trim_copies_ragged_content_verbatim_but_decode_rejects_it() -> None:
    frame, _ = CONTENT["ragged offsets past values"]
    out = Trimmer().trim(frame, Allowlist.from_names(["gamma"]))
    with pytest.raises(FrameError, match="ragged offsets end at 10"):
        decode(out.data)


@pytest.mark.parametrize("bad", [None, "text", 12, [1, 2]])
def test_non_buffers_are_frame_errors(bad: object) -> None:
    with pytest.raises(FrameError, match="contiguous bytes-like"):
        decode(bad)
    with pytest.raises(FrameError, match="contiguous bytes-like"):
        Trimmer().trim(bad, Allowlist.from_names(["a"]))


def test_non_contiguous_buffer_is_a_frame_error() -> None:
    for bad in (np.frombuffer(REF, np.uint8)[::2], memoryview(REF)[::2]):
        with pytest.raises(FrameError, match="contiguous"):
            decode(bad)
        with pytest.raises(FrameError, match="contiguous"):
            Trimmer().trim(bad, Allowlist.from_names(["alpha"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_still_checks_per_request_fields(backend: str) -> None:
    """A cached plan must not let a bad preamble, layout or block table through: each case
    differs from the warmed frame in one place, and the plan and size plan cached for
    that frame's hint, allowlist, layout start, n_candidates and meta_offset must not
    stand in for the checks (a bad magic, metadata declared past the frame's end, a
    layout section with bytes after the ones its records declare)."""
    trimmer = Trimmer(backend=backend)
    allow = Allowlist.from_names(["alpha", "gamma"])
    trimmer.trim(REF, allow)  # warm the caches
    trimmer.trim(REF, allow)
    for case in ("bad version", "truncated frame", "metadata not ending frame",
                 "overlapping blocks", "wrong dense size", "reserved bytes", "bad magic",
                 "unknown flags", "metadata past the end", "layout with trailing bytes",
                 "odd block offset"):
        frame, message = STRUCTURAL[case]
        for _ in range(2):
            with pytest.raises(FrameError) as info:
                trimmer.trim(frame, allow)
            assert str(info.value) == message, case
            with pytest.raises(FrameError) as info:
                trimmer.trim_parts(frame, allow)
            assert str(info.value) == message, case
    assert bytes(trimmer.trim(REF, allow).data) == bytes(Trimmer().trim(REF, allow).data)



def test_a_block_inside_the_metadata_is_refused_by_every_reader() -> None:
    """A dense block that lies wholly inside the frame but over the metadata (its end
    within ``frame_len``, past ``meta_offset``): every reader refuses it with the block
    error, instead of returning a column whose bytes are the metadata JSON.

    Fails on the planted bug ``check_table(..., pre.frame_len)`` instead of
    ``pre.meta_offset`` in codec.decode (decode returns the JSON bytes as 'beta'), in
    Trimmer's plan check (trim.py: the numpy trimmer copies them) and in
    check.check_frame (accepts the frame): checked by planting each and reverting."""
    from root_worker.frame.check import check_frame

    cols = {"alpha": COLS["alpha"], "beta": COLS["beta"]}
    good = encode(cols, {"request_id": "bad-1", "pad": "x" * 400})
    t_off = align(PREAMBLE_SIZE + PREAMBLE.unpack(good[:PREAMBLE_SIZE])[4], 8)
    meta_off = PREAMBLE.unpack(good[:PREAMBLE_SIZE])[9]
    beta_nb = struct.unpack_from("<Q", good, t_off + TABLE_ENTRY_SIZE + 8)[0]
    inside = align(meta_off, 64)
    assert inside + beta_nb <= len(good)  # the block ends inside the frame
    frame = patch(good, t_off + TABLE_ENTRY_SIZE, "Q", inside)
    message = (f"column 1 'beta': block [offset {inside}, {inside + beta_nb}) runs "
               f"past end of data (metadata starts at {meta_off})")
    readers: dict[str, Callable[[bytes], object]] = {
        "decode": decode, "check_frame": check_frame}
    for b in BACKENDS:
        t = Trimmer(backend=b)
        readers[f"trim-{b}"] = lambda f, t=t: t.trim(f, Allowlist.from_names(["beta"]))
        readers[f"trim-{b}-alpha"] = lambda f, t=t: t.trim(f, Allowlist.from_names(["alpha"]))
        readers[f"parts-{b}"] = lambda f, t=t: t.trim_parts(f, Allowlist.from_names(["beta"]))
    for name, read in readers.items():
        read(good)  # the same frame with the block where it was is fine
        for _ in range(2):  # cold, then from a cached plan
            with pytest.raises(FrameError) as info:
                read(frame)
            assert str(info.value) == message, name


def test_metadata_limits_hold_exactly_at_their_bounds() -> None:
    """Many brackets side by side are not depth (only nesting counts); an integer of
    exactly the digit limit is read, a minus sign not counted as a digit; an overflowing
    number is named by its first 40 characters."""
    from root_worker.frame.codec import MAX_META_DEPTH, MAX_META_INT_DIGITS

    wide = {"a": [[i] for i in range(3 * MAX_META_DEPTH)], "b": [{"c": 1}] * MAX_META_DEPTH}
    assert decode(encode({}, wide)).metadata == wide
    limit = "9" * MAX_META_INT_DIGITS
    for text in (limit, "-" + limit):
        meta = decode(with_metadata(f'{{"n": {text}}}'.encode())).metadata
        assert meta == {"n": int(text)}
    with pytest.raises(FrameError, match=f"integer of {MAX_META_INT_DIGITS + 1} digits"):
        decode(with_metadata(f'{{"n": -{limit}9}}'.encode()))
    huge = "1" + "0" * 400 + ".5"
    with pytest.raises(FrameError) as info:
        decode(with_metadata(f'{{"x": {huge}}}'.encode()))
    assert f"number {huge[:40]} overflows a 64-bit float" in str(info.value)
    assert f"number {huge[:41]} " not in str(info.value)
