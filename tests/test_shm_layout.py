"""The shared-memory contract (flatbuffers_schema/shm_layout.py) unit by unit: names and
prefixes, the slot and heartbeat records with their crcs, the control header, and the crc
arithmetic the daemon uses to reuse the checksum of an unchanged part of a blob."""

from __future__ import annotations

import os
import random
import struct
import zlib

import pytest

from flatbuffers_schema import shm_layout as L


def test_names_of_a_prefix() -> None:
    assert L.control_name("ft") == "/ft.ctl" and L.blob_name("ft", 42) == "/ft.g42"
    assert L.lock_file("ft", "/run/x") == "/run/x/feature-trimmer.ft.lock"
    assert L.lock_file("ft") == "/run/lock/feature-trimmer.ft.lock"
    pattern = L.blob_pattern("a-b")
    assert pattern.fullmatch("a-b.g7").group(1) == "7"  # type: ignore[union-attr]
    for other in ("a-b.ctl", "a-bX.g7", "a-b.g", "a-b.g7x", "xa-b.g7", "a-b.g-1"):
        assert pattern.fullmatch(other) is None, other
    assert L.blob_pattern("a.b").fullmatch("aXb.g1") is None  # the prefix is escaped
    for good in ("a", "A_b-9", "x" * L.PREFIX_MAX_LEN):
        assert L.validate_prefix(good) == good
    for bad in ("", "a.b", "a/b", "a b", "x" * (L.PREFIX_MAX_LEN + 1)):
        with pytest.raises(ValueError, match=r"invalid shm prefix .*need 1\.\.200 chars"):
            L.validate_prefix(bad)


def test_segment_files_lists_only_the_prefix(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in ("p.ctl", "p.g1", "p.g12", "pp.g1", "p", "q.g1"):
        (tmp_path / name).write_bytes(b"")
    assert L.segment_files("p", str(tmp_path)) == ["p.ctl", "p.g1", "p.g12"]
    assert L.segment_files("p", str(tmp_path / "absent")) == []


def test_slots_alternate_and_round_trip_with_their_crc() -> None:
    assert [L.slot_offset(g) for g in (1, 2, 3, 4)] == [128, 64, 128, 64]
    rec = L.SlotRecord(7, 4096, 123_456_789, 0xDEADBEEF, 4242)
    raw = L.encode_slot(rec)
    assert len(raw) == L.SLOT_SIZE and raw[32:60] == b"\0" * 28
    assert struct.unpack_from("<QQQII", raw) == tuple(rec)
    assert struct.unpack_from("<I", raw, 60)[0] == zlib.crc32(raw[:60])
    assert L.decode_slot(raw) == rec
    for i in range(L.SLOT_SIZE):  # any one flipped byte is detected
        torn = bytearray(raw)
        torn[i] ^= 0x01
        assert L.decode_slot(bytes(torn)) is None, i
    assert L.decode_slot(raw[:-1]) is None and L.decode_slot(raw + b"\0") is None
    assert L.decode_slot(b"\0" * L.SLOT_SIZE) is None  # never written: crc 0 != crc32(0s)


def test_heartbeat_round_trip() -> None:
    raw = L.encode_heartbeat(10**18, 77)
    assert len(raw) == L.HEARTBEAT_STRUCT.size == 16
    assert L.decode_heartbeat(raw) == L.Heartbeat(10**18, 77)
    torn = bytearray(raw)
    torn[3] ^= 0x10
    assert L.decode_heartbeat(bytes(torn)) is None
    assert L.decode_heartbeat(L.encode_heartbeat(0, 77)) is None  # never written
    assert L.decode_heartbeat(b"\0" * 16) is None


def test_header_active_word_and_their_checks() -> None:
    ctl = bytearray(L.encode_header())
    assert len(ctl) == L.CTL_SIZE and ctl[:8] == L.MAGIC
    assert struct.unpack_from("<II", ctl, 8) == (L.LAYOUT_VERSION, L.CHECKSUM_CRC32)
    assert ctl[16:] == b"\0" * (L.CTL_SIZE - 16)
    L.check_header(ctl)
    assert L.read_active(ctl) == L.NONE_PUBLISHED == 0
    ctl[L.OFF_ACTIVE:L.OFF_ACTIVE + 8] = L.encode_active(2**64 - 1)
    assert L.read_active(ctl) == L.RETIRED and L.encode_active(5) == (5).to_bytes(8, "little")
    with pytest.raises(L.LayoutError, match=f"too small: {L.CTL_SIZE - 1} < {L.CTL_SIZE}"):
        L.check_header(ctl[:-1])
    with pytest.raises(L.LayoutError, match="bad control magic"):
        L.check_header(b"X" + ctl[1:])
    for version, algo in ((2, 1), (1, 2)):
        bad = bytearray(ctl)
        struct.pack_into("<II", bad, 8, version, algo)
        with pytest.raises(L.LayoutError, match=f"version={version} checksum_algo={algo}"):
            L.check_header(bad)


@pytest.mark.parametrize("len_b", [0, 1, 2, 3, 7, 8, 255, 256, 4097, 65_536, 1 << 20,
                                   (1 << 20) + 12_345])
def test_checksum_combine_equals_the_checksum_of_the_concatenation(
        len_b: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh zero-byte operators each time (the module caches them once per process), so a
    bug in building them cannot hide behind an earlier test's cache."""
    monkeypatch.setattr(L, "_ZERO_OPS", [])
    rng = random.Random(len_b)
    a = rng.randbytes(1000)
    b = rng.randbytes(len_b)
    want = zlib.crc32(a + b)
    assert L.checksum(a + b) == want
    assert L.checksum_combine(L.checksum(a), L.checksum(b), len(b)) == want
    assert L.checksum_continue(b, L.checksum(a)) == want
    assert L.checksum_combine(0, L.checksum(b), len(b)) == L.checksum(b)


def test_zero_byte_operators_advance_over_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    ops = L._zero_byte_operators(12)
    assert len(ops) == 12 and all(len(op) == 32 for op in ops)
    for k in range(12):  # ops[k]: the crc register after 2**k more zero bytes
        crc = zlib.crc32(b"seed")
        # zlib's crc32 pre- and post-inverts; the raw register advance is on crc ^ 0xffffffff
        raw = L._gf2_times(ops[k], crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
        assert raw == zlib.crc32(b"\0" * (1 << k), crc), k


def test_checksum_of_memory_views_and_mappings() -> None:
    data = os.urandom(5000)
    assert L.checksum(memoryview(data)) == L.checksum(bytearray(data)) == zlib.crc32(data)
