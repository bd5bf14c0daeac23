"""Frame encode/decode: round trips of every dtype, dense and ragged, zero copy, alignment."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from root_worker.frame import (
    DTYPE_BY_CODE,
    Column,
    FrameError,
    Ragged,
    decode,
    encode,
    peek_metadata,
)
from root_worker.frame.codec import MAX_META_DEPTH
from root_worker.frame.format import (
    BLOCK_ALIGN,
    MAX_CANDIDATES,
    MAX_ELEM_BYTES,
    MAX_NAME_BYTES,
    PREAMBLE,
    PREAMBLE_SIZE,
    TABLE_ENTRY_SIZE,
    LayoutCache,
    align,
    layout_hint,
)

ALL_DTYPES = sorted({dt.name for dt in DTYPE_BY_CODE.values()})


def sample(dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def assert_same_column(got: object, want: object) -> None:
    if isinstance(want, Ragged):
        assert isinstance(got, Ragged)
        assert got == want
        assert got.offsets.dtype == np.dtype("<i8")
    else:
        assert isinstance(got, np.ndarray) and isinstance(want, np.ndarray)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def table_entries(frame: bytes) -> list[tuple[int, int]]:
    fields = PREAMBLE.unpack(frame[:PREAMBLE_SIZE])
    n_columns, layout_len = fields[3], fields[4]
    table_off = align(PREAMBLE_SIZE + layout_len, 8)
    return [struct.unpack_from("<QQ", frame, table_off + TABLE_ENTRY_SIZE * i)
            for i in range(n_columns)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(), (3,), (2, 1, 2)])
def test_dense_round_trip_every_dtype(dtype: str, shape: tuple[int, ...]) -> None:
    col = sample(np.dtype(dtype), (7, *shape))
    frame = decode(encode({"x": col, "y": col[::-1].copy()}, {"request_id": "r"}))
    assert frame.n_candidates == 7
    assert list(frame.columns) == ["x", "y"]
    assert_same_column(frame.columns["x"], col)
    assert_same_column(frame.columns["y"], col[::-1].copy())


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_ragged_round_trip_every_dtype(dtype: str) -> None:
    lengths = [3, 0, 1, 5, 0]
    values = sample(np.dtype(dtype), (sum(lengths),))
    rag = Ragged.from_lengths(values, lengths)
    got = decode(encode({"r": rag})).ragged("r")
    assert_same_column(got, rag)
    assert [len(got[i]) for i in range(5)] == lengths
    assert got.lengths.tolist() == lengths


def test_ragged_with_inner_shape_and_lists() -> None:
    rag = Ragged.from_lists([np.ones((2, 3)), np.zeros((0, 3)), np.full((1, 3), 7)], np.int16)
    got = decode(encode({"emb": rag})).columns["emb"]
    assert isinstance(got, Ragged)
    assert got.values.shape == (3, 3)
    assert got[2].tolist() == [[7, 7, 7]]
    assert [g.shape for g in got] == [(2, 3), (0, 3), (1, 3)]


def test_mixed_columns_keep_order_and_metadata() -> None:
    cols: dict[str, Column] = {
        "z_last_alphabetically": np.arange(4, dtype=np.int64),
        "ids": Ragged.from_lists([[1], [2, 3], [], [4, 5, 6]], np.uint32),
        "emb": np.ones((4, 16), dtype=np.float16),
        "ünïcödé/名前": np.array([True, False, True, True]),
    }
    meta = {"request_id": "req-42", "targets": [{"model": "m", "version": "3"}], "x": 1.5}
    frame = decode(encode(cols, meta))
    assert list(frame.columns) == list(cols)
    assert frame.metadata == meta
    for name, col in cols.items():
        assert_same_column(frame.columns[name], col)


def test_decode_is_zero_copy_and_blocks_are_aligned() -> None:
    buf = bytearray(encode({"a": np.arange(10, dtype=np.float32),
                            "b": Ragged.from_lengths(np.arange(6), [1, 2, 3, 0, 0, 0, 0, 0, 0, 0]),
                            "c": np.arange(30, dtype=np.int8).reshape(10, 3)}))
    for off, _ in table_entries(bytes(buf)):
        assert off % BLOCK_ALIGN == 0
    frame = decode(buf)
    a = frame.columns["a"]
    assert isinstance(a, np.ndarray) and np.shares_memory(a, np.frombuffer(buf, np.uint8))
    a[0] = 99.0  # a writable buffer gives writable views onto it
    assert decode(buf).columns["a"][0] == 99.0
    rag = frame.columns["b"]
    assert isinstance(rag, Ragged) and np.shares_memory(rag.values, np.frombuffer(buf, np.uint8))
    assert not decode(bytes(buf)).dense("c").flags.writeable


def test_decode_accepts_memoryview_and_numpy_buffers() -> None:
    raw = encode({"a": np.arange(3, dtype=np.uint16)}, {"request_id": "m"})
    for buf in (memoryview(raw), np.frombuffer(raw, np.uint8).copy(), bytearray(raw)):
        assert decode(buf).dense("a").tolist() == [0, 1, 2]
    assert decode(np.frombuffer(raw, np.uint8)[None, :]).metadata == {"request_id": "m"}


def test_big_endian_input_is_stored_little_endian() -> None:
    col = np.arange(5, dtype=">i4")
    frame = decode(encode({"be": col}))
    assert frame.dense("be").dtype == np.dtype("<i4")
    assert frame.dense("be").tolist() == [0, 1, 2, 3, 4]


def test_empty_frames() -> None:
    empty = decode(encode({}, {"request_id": "none"}, n_candidates=5))
    assert (empty.n_candidates, empty.columns, empty.metadata) == (5, {}, {"request_id": "none"})
    zero = decode(encode({"a": np.zeros(0, np.float32),
                          "r": Ragged.from_lengths(np.zeros(0, np.int8), [])}))
    assert zero.n_candidates == 0 and zero.dense("a").shape == (0,)
    assert zero.ragged("r").n_candidates == 0
    assert decode(encode({})).metadata == {}


def test_encoding_is_canonical_and_hinted() -> None:
    cols: dict[str, Column] = {"a": np.arange(3, dtype=np.float64),
                               "b": np.ones((3, 2), np.int32)}
    one, two = encode(cols, {"request_id": "x"}), encode(cols, {"request_id": "x"})
    assert one == two
    fields = PREAMBLE.unpack(one[:PREAMBLE_SIZE])
    layout_len, hint = fields[4], fields[5]
    assert hint == layout_hint(one[PREAMBLE_SIZE:PREAMBLE_SIZE + layout_len])
    # The layout (and its hint) does not depend on the candidate count or metadata.
    other = encode({"a": np.arange(9, dtype=np.float64), "b": np.ones((9, 2), np.int32)}, {})
    assert PREAMBLE.unpack(other[:PREAMBLE_SIZE])[5] == hint


def test_peek_metadata_reads_only_the_metadata() -> None:
    frame = encode({"a": np.arange(4, dtype=np.float32)}, {"request_id": "peek", "n": [1, 2]})
    assert peek_metadata(frame) == {"request_id": "peek", "n": [1, 2]}
    with pytest.raises(FrameError, match="bad magic"):
        peek_metadata(b"XXXX" + frame[4:])


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"a": np.zeros(3), "b": np.zeros(4)}, "disagree on the candidate count"),
        ({"a": np.zeros(3, dtype=np.complex64)}, "column 'a': unsupported dtype complex64"),
        ({"r": Ragged(np.zeros(3, np.complex64), [0, 3])},
         "column 'r': unsupported dtype complex64"),
        ({"r": Ragged(np.array(["x", "y"]), [0, 2])}, "column 'r': unsupported dtype <U1"),
        ({"a": np.array(["x", "y"])}, "unsupported dtype"),
        ({"a": np.float32(1.0)}, "leading candidate axis"),
        ({"a": np.zeros((3, 0))}, "non-zero dimensions"),
        ({"a": np.zeros((2, 1, 1, 1, 1, 1))}, "at most 4"),
        ({"": np.zeros(3)}, "non-empty strings"),
        ({"x" * 70000: np.zeros(3)}, "longer than 65535 bytes"),
    ],
)
def test_encode_rejects_bad_columns(columns: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode(columns)


def test_encode_rejects_non_json_metadata() -> None:
    with pytest.raises(ValueError):
        encode({"a": np.zeros(2)}, {"x": float("nan")})
    with pytest.raises(ValueError, match=r"^metadata is not JSON: Object of type object is "
                                         r"not JSON serializable \(use str, int, float, bool, "
                                         r"None, lists and objects of them\)$"):
        encode({"a": np.zeros(2)}, {"x": object()})
    with pytest.raises(ValueError, match="Object of type complex64 is not JSON"):
        encode({"a": np.zeros(2)}, {"x": np.complex64(1)})  # numpy scalars: numbers only


def test_encode_writes_int64_offsets_whatever_a_ragged_holds() -> None:
    """``Ragged.offsets`` is a plain attribute: offsets replaced after construction by
    another integer array (say int32 offsets taken from a pyarrow list array) are still
    written as the wire's int64, not as their own bytes under an int64 label."""
    rag = Ragged.from_lengths(np.arange(6, dtype=np.int16), [2, 0, 4])
    rag.offsets = np.array([0, 2, 2, 6], np.int32)
    got = decode(encode({"r": rag})).ragged("r")
    assert got.offsets.tolist() == [0, 2, 2, 6] and got.values.tolist() == list(range(6))


def test_column_names_up_to_the_limit() -> None:
    """A name of exactly MAX_NAME_BYTES UTF-8 bytes is a valid frame name (the field is
    a uint16); one byte more is refused before anything is packed."""
    name = "é" * (MAX_NAME_BYTES // 2) + "x"  # 65535 bytes, 32768 characters
    assert len(name.encode()) == MAX_NAME_BYTES
    assert list(decode(encode({name: np.arange(2)})).columns) == [name]
    with pytest.raises(ValueError, match=f"name is longer than {MAX_NAME_BYTES} bytes"):
        encode({name + "x": np.arange(2)})


def test_element_size_limit_holds_exactly() -> None:
    """An element (one candidate's dense cell, one ragged value) of MAX_ELEM_BYTES is
    packed; one of 2**32 bytes is refused naming the column (with no candidates, so the
    arrays are empty)."""
    at_limit = np.zeros((0, 65535, 65537), np.uint8)  # 65535 * 65537 == 2**32 - 1
    assert 65535 * 65537 == MAX_ELEM_BYTES
    frame = decode(encode({"big": at_limit}))
    assert frame.dense("big").shape == (0, 65535, 65537)
    rag = decode(encode({"r": Ragged(np.zeros((0, 65535, 65537), np.uint8), [0])}))
    assert rag.ragged("r").values.shape == (0, 65535, 65537)
    for col in (np.zeros((0, 1 << 29), np.float64), Ragged(np.zeros((0, 1 << 30), np.int32), [0])):
        with pytest.raises(ValueError, match=r"^column 'huge': elements of shape "
                                             r"\(\d+,\) are too large$"):
            encode({"huge": col})


def test_candidate_count_limit_holds_exactly() -> None:
    """``n_candidates`` is a uint32: 2**32 - 1 is a valid count, 2**32 and -1 are refused
    with the range in the message."""
    assert decode(encode({}, n_candidates=MAX_CANDIDATES)).n_candidates == MAX_CANDIDATES
    for bad in (MAX_CANDIDATES + 1, -1):
        with pytest.raises(ValueError, match=rf"^n_candidates {bad} is outside "
                                             rf"\[0, {MAX_CANDIDATES}\]$"):
            encode({}, n_candidates=bad)


def test_dtypes_cast_a_mapping_of_numpy_columns() -> None:
    """``dtypes=`` casts named columns of a plain dict too (dense and ragged values), not
    only of a DataFrame; the other columns keep their dtype."""
    frame = decode(encode({"a": np.arange(3), "r": Ragged.from_lengths(np.arange(4), [1, 0, 3]),
                           "b": np.ones(3, np.float16)},
                          dtypes={"a": np.int32, "r": np.uint8}))
    assert frame.dense("a").dtype == np.int32 and frame.dense("a").tolist() == [0, 1, 2]
    assert frame.ragged("r").values.dtype == np.uint8
    assert frame.ragged("r") == Ragged.from_lengths(np.arange(4, dtype=np.uint8), [1, 0, 3])
    assert frame.dense("b").dtype == np.float16


def test_numpy_string_dtype_is_refused_naming_the_column() -> None:
    """numpy 2's variable-width StringDType cannot be re-byte-ordered: encode still
    refuses it with the usual ValueError naming the column, not a TypeError from numpy."""
    string_dtype = getattr(np.dtypes, "StringDType", None)
    if string_dtype is None:
        pytest.skip("numpy < 2 has no StringDType")
    col = np.array(["a", "b"], dtype=string_dtype())
    with pytest.raises(ValueError, match="^column 's': unsupported dtype StringDType"):
        encode({"s": col})


def test_metadata_nesting_limit_holds_exactly_in_encode_and_decode() -> None:
    """Metadata nested exactly MAX_META_DEPTH deep (the top-level object is depth 1)
    round-trips, with more brackets than that beside it so that the depth is really
    measured; one level more is refused by encode, and by decode from a hand-made frame.
    Nesting through lists alone counts as through objects."""
    def nested(depth: int) -> dict[str, object]:
        inner: object = 0
        for _ in range(depth - 1):
            inner = [inner]
        return {"deep": inner, "wide": [[], [], [{}]]}

    ok = nested(MAX_META_DEPTH)
    assert decode(encode({}, ok)).metadata == ok
    with pytest.raises(ValueError, match=f"^metadata nests deeper than {MAX_META_DEPTH}$"):
        encode({}, nested(MAX_META_DEPTH + 1))
    base = encode({}, {})
    meta_off = PREAMBLE.unpack(base[:PREAMBLE_SIZE])[9]
    raw = json.dumps(nested(MAX_META_DEPTH + 1)).encode()
    bad = bytearray(base[:meta_off] + raw)
    struct.pack_into("<QQI", bad, 32, len(bad), meta_off, len(raw))
    with pytest.raises(FrameError, match=f"nested {MAX_META_DEPTH + 1} deep, more than "
                                         f"{MAX_META_DEPTH}"):
        decode(bytes(bad))


@pytest.mark.parametrize(
    ("values", "offsets", "message"),
    [
        (np.arange(3), [1, 2, 5],
         r"Ragged offsets must start at 0 and end at len\(values\) \(3\), got 1 \.\. 5"),
        (np.arange(3), [0, 2],
         r"Ragged offsets must start at 0 and end at len\(values\) \(3\), got 0 \.\. 2"),
        (np.arange(3), [0, 2, 1, 3], "Ragged offsets must be non-decreasing"),
        (np.arange(3), [[0, 3]], "Ragged offsets must be a non-empty 1-D integer array"),
        (np.arange(3), [0.0, 3.0], "Ragged offsets must be a non-empty 1-D integer array"),
        (np.arange(3), [], "Ragged offsets must be a non-empty 1-D integer array"),
        (np.float32(1), [0, 1], "Ragged values must have at least one dimension"),
    ],
)
def test_ragged_constructor_validates(values: np.ndarray, offsets: list[int],
                                      message: str) -> None:
    """The constructor's errors say what is wrong, in full (the first and last offset
    when the ends are wrong)."""
    with pytest.raises(ValueError, match=f"^{message}$"):
        Ragged(values, offsets)
    for lengths in ([2, -1, 2], [[3]], [1.5, 1.5]):
        with pytest.raises(ValueError, match="^Ragged lengths must be a 1-D array of "
                                             "non-negative whole counts$"):
            Ragged.from_lengths(np.arange(3), lengths)


def test_ragged_lengths_are_whole_counts_of_any_dtype() -> None:
    """Lengths come as int32 (pyarrow), uint8, float64 (a pandas column that once held
    NaN) or a list: each whole count is taken; a fractional one is refused instead of
    being truncated into a different split that happens to sum to the same total."""
    values = np.arange(3)
    for lengths in ([1, 2], np.array([1, 2], np.int32), np.array([1, 2], np.uint8),
                    np.array([1.0, 2.0]), np.array([1, 2], np.uint64)):
        assert Ragged.from_lengths(values, lengths).offsets.tolist() == [0, 1, 3]
    for fractional in ([1.5, 2.5], np.array([0.5, 2.5])):  # truncated: [0, 1, 3], [0, 0, 2]
        with pytest.raises(ValueError, match="non-negative whole counts"):
            Ragged.from_lengths(values, fractional)


def test_ragged_holds_int64_offsets_without_copying() -> None:
    """``Ragged.offsets`` is int64 whatever integer type it was given, and the caller's
    int64 arrays are used as they are: wrapping big decoded or preallocated arrays costs
    no copy, and the offsets a Ragged holds are the ones the caller built."""
    values = np.arange(5, dtype=np.float32)
    for given in ([0, 2, 5], np.array([0, 2, 5], np.int32), np.array([0, 2, 5], np.uint16)):
        rag = Ragged(values, given)
        assert rag.offsets.dtype == np.dtype("<i8")
        assert rag.offsets.tolist() == [0, 2, 5]
    offsets = np.array([0, 2, 5], np.int64)
    rag = Ragged(values, offsets)
    assert rag.values is values and rag.offsets is offsets
    assert Ragged.from_lengths(values, np.array([2, 3], np.int32)).offsets.dtype == np.int64


def test_frame_typed_accessors() -> None:
    frame = decode(encode({"d": np.arange(2), "r": Ragged.from_lengths(np.arange(1), [1, 0])}))
    assert frame.dense("d").tolist() == [0, 1]
    assert frame.ragged("r").lengths.tolist() == [1, 0]
    with pytest.raises(TypeError, match="ragged, not dense"):
        frame.dense("r")
    with pytest.raises(TypeError, match="dense, not ragged"):
        frame.ragged("d")
    with pytest.raises(KeyError):
        frame.dense("missing")


def test_ragged_equality_is_bitwise() -> None:
    a = Ragged.from_lengths(np.array([1.0, 2.0]), [1, 1])
    assert a == Ragged.from_lengths(np.array([1.0, 2.0]), [1, 1])
    assert a != Ragged.from_lengths(np.array([1.0, 2.0]), [2, 0])
    assert a != Ragged.from_lengths(np.array([1, 2]), [1, 1])
    assert a.__eq__("x") is NotImplemented
    assert "n_candidates=2" in repr(a)


def test_metadata_is_compact_utf8_json() -> None:
    frame = encode({"a": np.zeros(1)}, {"request_id": "é"})
    fields = PREAMBLE.unpack(frame[:PREAMBLE_SIZE])
    meta_off, meta_len = fields[9], fields[10]
    assert json.loads(frame[meta_off:meta_off + meta_len].decode()) == {"request_id": "é"}
    assert frame[meta_off:meta_off + meta_len] == '{"request_id":"é"}'.encode()


def test_ragged_from_lists_takes_the_dtype_scalars_and_no_candidates() -> None:
    r = Ragged.from_lists([[1, 2], [], [3]], np.int16)
    assert r.values.dtype == np.int16 and r.values.tolist() == [1, 2, 3]
    assert r.offsets.tolist() == [0, 2, 2, 3] and r.n_candidates == 3
    s = Ragged.from_lists([7, [8, 9]], np.float32)  # a scalar is one value
    assert s.values.dtype == np.float32 and s.values.tolist() == [7.0, 8.0, 9.0]
    assert s.lengths.tolist() == [1, 2]
    empty = Ragged.from_lists([], np.uint8)
    assert empty.values.dtype == np.uint8 and empty.values.shape == (0,)
    assert empty.offsets.tolist() == [0] and empty.n_candidates == 0
    rows = Ragged.from_lists([[[1, 2, 3]], np.zeros((0, 3))], np.int64)  # an inner shape
    assert rows.values.shape == (1, 3) and rows.lengths.tolist() == [1, 0]
    assert rows.values.dtype == np.int64


def test_as_bytes_view_gives_flat_unsigned_bytes() -> None:
    """Every buffer is read as unsigned bytes (a signed or wider format is cast, so byte
    0xFF reads 255, not -1); a flat byte memoryview is used as it is, no new view per
    call."""
    from root_worker.frame.codec import as_bytes_view

    raw = bytes([0, 1, 0x7F, 0x80, 0xFF, 2, 3, 4])
    flat = memoryview(raw)
    assert as_bytes_view(flat) is flat
    for buf in (raw, bytearray(raw), np.frombuffer(raw, np.int8), memoryview(raw).cast("b"),
                np.frombuffer(raw, np.uint16), np.frombuffer(raw, np.uint8).reshape(2, 4)):
        mv = as_bytes_view(buf)
        assert (mv.format, mv.ndim, mv.nbytes) == ("B", 1, 8)
        assert mv[4] == 255 and mv.tolist() == list(raw)


def bool_frame(cols: dict[str, Column], meta: dict[str, object]) -> tuple[bytearray, list[int]]:
    frame = bytearray(encode(cols, meta))
    return frame, [off for off, _ in table_entries(bytes(frame))]


def test_bool_bytes_other_than_0_and_1_are_refused_naming_column_and_byte() -> None:
    """A bool byte that is not 0 or 1 is refused naming the right column and byte even
    when an earlier bool column holds True values (1) and the bad byte is 2 or 255; a
    ragged bool column's offsets (which exceed 1) are not bool bytes."""
    cols: dict[str, Column] = {
        "first": np.array([True, True, False, True]),
        "ids": np.full(4, 7, np.int64),
        "tags": Ragged.from_lengths(np.ones(6, bool), [0, 3, 1, 2]),
        "second": np.array([False, True, False, False]),
    }
    frame, offs = bool_frame(cols, {"request_id": "b"})
    assert decode(bytes(frame)).dense("second").tolist() == [False, True, False, False]
    for bad in (2, 255):
        broken = bytearray(frame)
        broken[offs[3] + 2] = bad
        with pytest.raises(FrameError, match=rf"^column 3 'second': bool value byte 2 is "
                                             rf"{bad}, expected 0 or 1$"):
            decode(bytes(broken))
    broken = bytearray(frame)
    broken[offs[2] + 64 + 5] = 3  # value 5 of the ragged column, after its 64-byte head
    with pytest.raises(FrameError, match="^column 2 'tags': bool value byte 5 is 3, "
                                         "expected 0 or 1$"):
        decode(bytes(broken))


def test_an_empty_bool_block_checks_no_byte_of_the_next_block() -> None:
    """A bool column with no values (a ragged bool column whose every list is empty) has a
    block of just its offsets head: the bool check covers none of its bytes, and never the
    first byte of the block after it (here an int64 7, which is no bool). With 7 candidates
    the head is 64 bytes, so the next block starts exactly where the empty values would."""
    cols: dict[str, Column] = {
        "flags": Ragged.from_lengths(np.zeros(0, bool), [0] * 7),
        "ids": np.full(7, 7, np.int64),
    }
    frame, offs = bool_frame(cols, {"request_id": "e"})
    assert offs[1] == offs[0] + 64 and frame[offs[1]] == 7
    out = decode(bytes(frame))
    assert out.ragged("flags").lengths.tolist() == [0] * 7
    assert out.dense("ids").tolist() == [7] * 7


def test_bool_blocks_that_end_the_buffer_are_checked() -> None:
    """With an empty metadata section the last bool block ends the buffer: the bool
    check still covers each block exactly (not the int column between them), and the
    frame fails on its metadata -- a FrameError, never an IndexError."""
    cols: dict[str, Column] = {"first": np.array([True, False, True]),
                               "ids": np.full(3, 9, np.int64),
                               "last": np.array([False, True, True])}
    frame, offs = bool_frame(cols, {})
    meta_off = PREAMBLE.unpack(bytes(frame[:PREAMBLE_SIZE]))[9]
    assert offs[2] + 3 == meta_off  # the last block ends where the metadata starts
    bare = frame[:meta_off]
    struct.pack_into("<QQI", bare, 32, meta_off, meta_off, 0)
    with pytest.raises(FrameError, match=rf"^metadata \[offset {meta_off}, {meta_off}\) is "
                                         r"not valid JSON"):
        decode(bytes(bare))
    bare[meta_off - 1] = 2
    with pytest.raises(FrameError, match="^column 2 'last': bool value byte 2 is 2"):
        decode(bytes(bare))


def layout_of(frame: bytes) -> tuple[int, int, bytes]:
    """(hint, n_columns, layout bytes) as a frame's preamble declares them."""
    fields = PREAMBLE.unpack(frame[:PREAMBLE_SIZE])
    return fields[5], fields[3], frame[PREAMBLE_SIZE:PREAMBLE_SIZE + fields[4]]


def test_a_repeated_layout_is_parsed_once() -> None:
    """LayoutCache (the decoder's, the trimmer's): a layout seen again -- under its true
    hint, or under a wrong or zero one -- is the parsed Layout already cached, not a new
    parse."""
    hint, n_columns, raw = layout_of(encode({"a": np.arange(3.0), "b": np.ones((3, 2))}))
    cache = LayoutCache(4)
    first = cache.get(hint, n_columns, raw)
    assert first.raw == raw and first.hint == hint and first.names == ("a", "b")
    for _ in range(2):
        for h in (hint, 0, hint ^ 1):
            assert cache.get(h, n_columns, raw) is first
            assert cache.lookup(hint, n_columns, raw) is first
    assert cache.lookup(0, n_columns, raw) is None  # stored under its true hint only
    assert cache.lookup(hint, n_columns + 1, raw) is None


def test_the_layout_cache_keeps_the_recently_used_and_64_by_default() -> None:
    """A bounded least-recently-used cache: a layout looked up again is refreshed (with
    room for two, layouts A B A C evict B and keep A), and the default bound, the
    decoder's, is 64 layouts."""
    layouts = [layout_of(encode({f"c{i}": np.arange(2.0)})) for i in range(65)]
    cache = LayoutCache(2)
    a, b, c = layouts[:3]
    parsed_a, parsed_b = cache.get(*a), cache.get(*b)
    assert cache.get(*a) is parsed_a
    cache.get(*c)
    assert cache.lookup(*a) is parsed_a
    assert cache.lookup(*b) is None
    assert cache.get(*b) is not parsed_b

    default = LayoutCache()
    parsed = [default.get(*layout) for layout in layouts]
    assert default.lookup(*layouts[1]) is parsed[1]  # 64 kept: the oldest, c0, is out
    assert default.lookup(*layouts[0]) is None
