"""``check_frame`` (root_worker/frame/check.py): the whole-frame check the root runs on a
frame it passes through untrimmed. It must refuse exactly what ``decode`` refuses in the
block table and every ragged column's offsets -- each kind of bad offsets head, in any
ragged column, with the same worded error -- and accept every good frame without decoding
values."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from root_worker.frame import FrameError, Ragged, check_frame, decode, encode
from root_worker.frame.format import PREAMBLE, PREAMBLE_SIZE, TABLE_ENTRY_SIZE, align

LENGTHS = [2, 0, 3, 1, 0, 3]  # 6 candidates, 9 values


def frame_of(n_cand: int = 6) -> bytes:
    lengths = (LENGTHS * 3)[:n_cand]
    return encode({
        "dense": np.arange(n_cand, dtype=np.float32),
        "r1": Ragged.from_lengths(np.arange(sum(lengths), dtype=np.int64), lengths),
        "pairs": np.zeros((n_cand, 2), np.int16),
        "r2": Ragged.from_lengths(np.arange(sum(lengths) * 3, dtype=np.int16).reshape(-1, 3),
                                  lengths),
    }, {"request_id": "check"})


def with_offset(frame: bytes, column: int, at: int, value: int) -> bytes:
    layout_len = PREAMBLE.unpack(frame[:PREAMBLE_SIZE])[4]
    table = align(PREAMBLE_SIZE + layout_len, 8)
    off = struct.unpack_from("<Q", frame, table + TABLE_ENTRY_SIZE * column)[0]
    bad = bytearray(frame)
    struct.pack_into("<q", bad, off + 8 * at, value)
    return bytes(bad)


def test_good_frames_pass() -> None:
    for n_cand in (0, 1, 2, 6, 13):
        frame = frame_of(n_cand)
        assert check_frame(frame) is None
        assert check_frame(memoryview(frame)) is None
        assert check_frame(bytearray(frame)) is None
    assert check_frame(encode({}, {})) is None  # no columns
    assert check_frame(encode({"d": np.zeros(3, np.uint8)})) is None  # no ragged column


# column index, offset index, value -> decode's words
CASES = {
    "r1 first": (1, 0, 1, "column 1 'r1': ragged offsets[0] is 1, expected 0"),
    "r1 decrease": (1, 3, 1, "column 1 'r1': ragged offsets decrease at candidate 3 (2 -> 1)"),
    "r1 end short": (1, 6, 8, "column 1 'r1': ragged offsets end at 8 but the block holds 9 "
                              "values"),
    "r1 end long": (1, 6, 10, "column 1 'r1': ragged offsets end at 10 but the block holds 9 "
                              "values"),
    "r2 first": (3, 0, -1, "column 3 'r2': ragged offsets[0] is -1, expected 0"),
    "r2 decrease": (3, 1, 3, "column 3 'r2': ragged offsets decrease at candidate 2 (3 -> 2)"),
    "r2 end short": (3, 6, 7, "column 3 'r2': ragged offsets end at 7 but the block holds 9 "
                              "values"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_kind_of_bad_offsets_in_any_ragged_column_is_refused(case: str) -> None:
    """One bad head at a time, the other ragged column good: each is found (a decrease
    alone, with offsets[0] and the end right, included) and worded exactly as decode words
    it."""
    column, at, value, message = CASES[case]
    bad = with_offset(frame_of(), column, at, value)
    with pytest.raises(FrameError) as dec:
        decode(bad)
    assert str(dec.value) == message
    with pytest.raises(FrameError) as chk:
        check_frame(bad)
    assert str(chk.value) == message


def test_one_candidate_and_a_decrease_at_the_end() -> None:
    frame = frame_of(1)  # offsets [0, 2]
    assert check_frame(frame) is None
    bad = with_offset(with_offset(frame, 1, 1, 1), 1, 0, 0)
    with pytest.raises(FrameError, match="ragged offsets end at 1 but the block holds 2"):
        check_frame(bad)


def test_a_bad_block_table_is_refused_before_the_offsets() -> None:
    frame = frame_of()
    layout_len = PREAMBLE.unpack(frame[:PREAMBLE_SIZE])[4]
    table = align(PREAMBLE_SIZE + layout_len, 8)
    bad = bytearray(frame)
    struct.pack_into("<Q", bad, table + 8, 8)  # dense block of 6 float32 said to be 8 bytes
    with pytest.raises(FrameError, match="column 0 'dense': dense block .* is 8 bytes, "
                                         "expected 24"):
        check_frame(bytes(bad))
    with pytest.raises(FrameError, match="truncated preamble"):
        check_frame(frame[:10])
