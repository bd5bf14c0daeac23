"""Publication in POSIX shared memory: real segments, real processes, no mocks.

Every test gets a unique prefix; the ``prefix`` fixture fails the test if any segment of it
is left in /dev/shm afterwards (and removes it). Waits are conditions with deadlines.
"""

from __future__ import annotations

import errno
import grp
import logging
import mmap
import os
import random
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import posix_ipc
import pytest

from flatbuffers_schema import shm_layout as L
from flatbuffers_schema.shm_layout import SHM_DIR
from root_worker.featuremap.shm_reader import ShmReader
from trimmer_daemon.publisher import (
    Publisher,
    PublisherError,
    PublisherLockedError,
    PublishError,
)

try:
    import shm_helpers as H
except ImportError:  # tests/ collected as a package
    from tests import shm_helpers as H


@pytest.fixture
def prefix(shm_prefix: str) -> str:
    """A unique prefix; conftest's ``shm_prefix`` fails the test on any leftover segment."""
    return shm_prefix


@pytest.fixture
def publishers() -> Iterator[list[Publisher]]:
    """Publishers a test registers here are cleaned up even if it fails half-way."""
    made: list[Publisher] = []
    yield made
    for publisher in made:
        if publisher._ctl is not None:
            publisher.cleanup()


PUBLISHER_LOG = "trimmer_daemon.publisher"


def _log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The publisher's log messages a test captured, formatted."""
    return [r.getMessage() for r in caplog.records if r.name == PUBLISHER_LOG]


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name.lstrip("/"))


def _rw_control(prefix: str) -> mmap.mmap:
    fd = os.open(_path(L.control_name(prefix)), os.O_RDWR)
    try:
        return mmap.mmap(fd, L.CTL_SIZE)
    finally:
        os.close(fd)


def _next_segment_exists(prefix: str) -> bool:
    reader = ShmReader(prefix)
    info = reader.control()
    reader.close()
    return info is not None and os.path.exists(_path(f"{prefix}.g{info.generation + 1}"))


def _finish(proc, timeout: float = 60.0) -> dict:  # type: ignore[no-untyped-def]
    import json

    line = H.read_line(proc, timeout)
    assert proc.wait(timeout) == 0
    return json.loads(line)


# -- basics -----------------------------------------------------------------------------


def test_round_trip_sequence_and_unchanged_poll(prefix: str, publishers: list) -> None:
    reader = ShmReader(prefix)
    assert reader.poll() is None and reader.control() is None
    assert H.shm_names(prefix) == [], "a reader must never create segments"
    pub = Publisher(prefix)
    publishers.append(pub)
    assert pub.generation == 0 and pub.next_generation == 1
    assert reader.poll() is None  # control exists, nothing published yet
    assert reader.control().generation == 0
    for expected in (1, 2, 3):
        assert pub.next_generation == expected
        assert pub.publish(H.make_blob(expected)) == expected
        snapshot = reader.poll()
        assert snapshot is not None and snapshot.generation == expected == pub.generation
        assert bytes(snapshot.buffer) == H.make_blob(expected)
        assert snapshot.size == len(H.make_blob(expected))
        assert snapshot.segment == f"/{prefix}.g{expected}"
    assert reader.poll() is snapshot and reader.poll() is snapshot
    assert reader.generation == 3
    assert reader.stats.attaches == 3 and reader.stats.verify_failures == 0


def test_invalid_input_rejected(prefix: str, publishers: list) -> None:
    with pytest.raises(ValueError, match="invalid shm prefix"):
        Publisher("bad/prefix")
    with pytest.raises(ValueError, match="invalid shm prefix"):
        ShmReader("a.g1")
    with pytest.raises(ValueError, match="unknown group"):
        Publisher(prefix, group="no-such-group-ft")
    assert H.shm_names(prefix) == []
    pub = Publisher(prefix)
    publishers.append(pub)
    with pytest.raises(ValueError, match="empty"):
        pub.publish(b"")
    assert pub.generation == 0


def test_observable_fields(prefix: str, publishers: list) -> None:
    clock = H.FakeClock(1_700_000_000.0)
    pub = Publisher(prefix, clock=clock, pid=4242)
    publishers.append(pub)
    reader = ShmReader(prefix)
    info = reader.control()
    assert info.heartbeat_ns == 1_700_000_000 * 10**9 and info.heartbeat_pid == 4242
    clock.now += 5
    pub.publish(b"blob")
    snapshot = reader.poll()
    assert snapshot.published_at_ns == 1_700_000_005 * 10**9 and snapshot.publisher_pid == 4242
    clock.now += 1.5
    pub.heartbeat()
    info = reader.control()
    assert info.generation == 1 and info.blob_size == 4
    assert info.blob_checksum == L.checksum(b"blob") == snapshot.checksum
    assert info.published_at_ns == 1_700_000_005 * 10**9
    assert info.heartbeat_ns == 1_700_000_006_500_000_000 and info.heartbeat_pid == 4242


# -- atomicity under load ---------------------------------------------------------------


def test_torn_read_stress(prefix: str, tmp_path: Path) -> None:
    generations, max_size = 3000, 192 * 1024
    readers = [H.spawn("reader", prefix, max_size, generations, "-") for _ in range(2)]
    writer = None
    try:
        for proc in readers:
            assert H.read_line(proc) == "ready"
        writer = H.spawn("writer", prefix, generations, max_size)
        assert H.read_line(writer) == "started 0"
        result = _finish(writer)
        assert result == {"last": generations, "published": generations}
        reports = [_finish(proc) for proc in readers]
    finally:
        H.reap(*readers, writer)
    for report in reports:
        assert report["n_violations"] == 0, report["violations"]
        assert report["order_violations"] == 0, report["violations"]
        assert report["verify_failures"] == 0, report["last_error"]
        assert report["last"] == generations
        print("reader report:", report)
        assert report["distinct"] >= 30, report  # they really raced the writer
    # The writer exited with close(), the readers exited too: the last generation and the
    # control stay (readers never register segments for cleanup; only the owner unlinks).
    assert f"{prefix}.g{generations}" in H.shm_names(prefix)
    Publisher(prefix).cleanup()


def test_every_intermediate_state_of_a_publication_is_consistent(prefix: str,
                                                                 publishers: list) -> None:
    """The publisher's write order, checked deterministically: its control mapping is
    swapped for one that calls a hook after every write (same fd, same shared pages), and at
    each intermediate state of each publication the segment must be one a reader may meet
    (the active word names a whole slot of its generation whose blob is complete), and a
    real ShmReader polled right then must see no inconsistency and only the old or the new
    generation. A publication is exactly two writes: the slot, then the active word.

    Fails on the planted bug of writing the active word before the slot in
    ``Publisher._flip`` (checked by planting it and reverting): after the first write the
    word names a slot that still holds generation N-2."""
    pub = Publisher(prefix)
    publishers.append(pub)
    pub.publish(H.make_blob(1))
    reader = ShmReader(prefix)
    assert reader.poll().generation == 1
    seen: list[tuple[object, int, int]] = []  # (what was written, word, reader's generation)

    def hook(key: object) -> None:
        problem = H.control_problem(observed, prefix)
        assert problem is None, f"after writing {key}: {problem}"
        snap = reader.poll()
        assert reader.stats.inconsistent_reads == 0, reader.stats.last_error
        assert snap is not None
        seen.append((key, L.read_active(observed), snap.generation))

    assert pub._ctl is not None and pub._ctl_fd >= 0
    observed = H.ObservedControl(pub._ctl_fd, L.CTL_SIZE)
    observed.hook = hook
    pub._ctl.close()
    pub._ctl = observed
    for gen in range(2, 8):
        seen.clear()
        assert pub.publish(H.make_blob(gen)) == gen
        slot, active = L.slot_offset(gen), L.OFF_ACTIVE
        beat = slice(L.OFF_HEARTBEAT, L.OFF_HEARTBEAT + L.HEARTBEAT_STRUCT.size)
        assert [s for s in seen if s[0] != beat] == [
            (slice(slot, slot + L.SLOT_SIZE), gen - 1, gen - 1),
            (slice(active, active + 8), gen, gen)], seen
        assert bytes(reader.poll().buffer) == H.make_blob(gen)
    pub.heartbeat()  # other writes (the heartbeat) keep the control consistent too
    assert reader.stats.attaches == 7 and reader.stats.verify_failures == 0
    reader.close()
    observed.hook = lambda key: None  # cleanup (the fixture) retires the prefix


def test_kill_minus_nine_during_publication(prefix: str, tmp_path: Path) -> None:
    rng = random.Random(0x5EED)
    max_size = 1024 * 1024
    stop_file = tmp_path / "stop"
    background = H.spawn("reader", prefix, max_size, 0, stop_file)
    assert H.read_line(background) == "ready"
    reader = ShmReader(prefix)
    last_seen = 0
    mid_write_kills = 0
    try:
        for _ in range(20):
            writer = H.spawn("writer", prefix, 0, max_size)
            try:
                assert H.read_line(writer) == f"started {last_seen}"  # continues the sequence
                target = last_seen + rng.randint(1, 12)
                H.wait_until(
                    lambda t=target: reader.poll() and reader.generation >= t,
                    what=f"generation {target}",
                )
                if rng.random() < 0.5:  # aim inside the write of the next generation
                    H.wait_until(lambda: _next_segment_exists(prefix), what="a blob write")
            finally:
                writer.send_signal(signal.SIGKILL)
                H.reap(writer)
            snapshot = reader.poll()
            assert snapshot is not None and snapshot.generation > last_seen
            assert H.check_blob(snapshot.buffer, snapshot.generation, max_size) is None
            assert reader.control().generation == snapshot.generation
            last_seen = snapshot.generation
            unpublished = f"{prefix}.g{last_seen + 1}"
            mid_write_kills += unpublished in H.shm_names(prefix)
    finally:
        stop_file.touch()
        try:
            report = _finish(background)
        finally:
            H.reap(background)
    assert reader.stats.verify_failures == 0, reader.stats.last_error
    # No reader ever used an inconsistent generation: every snapshot it took was that
    # generation's whole blob, and no raw read found the active word naming a whole slot of
    # another generation (a word written before its slot).
    assert report["n_violations"] == 0 and report["verify_failures"] == 0, report
    assert report["order_violations"] == 0, report
    assert report["last"] == last_seen
    print("kills inside a publication:", mid_write_kills)
    assert mid_write_kills >= 1, "no kill landed inside a publication; the test proved nothing"
    successor = Publisher(prefix)
    assert successor.generation == last_seen
    assert f"{prefix}.g{last_seen + 1}" not in H.shm_names(prefix), "half-made blob not removed"
    assert successor.publish(b"after") == last_seen + 1
    assert bytes(reader.poll().buffer) == b"after"
    successor.cleanup()


# -- single instance --------------------------------------------------------------------


def test_second_publisher_refused(prefix: str, publishers: list) -> None:
    first = Publisher(prefix)
    publishers.append(first)
    first.publish(b"one")
    with pytest.raises(PublisherLockedError) as info:
        Publisher(prefix)
    assert prefix in str(info.value) and f"pid {os.getpid()}" in str(info.value)
    assert info.value.holder_pid == os.getpid()
    assert first.publish(b"two") == 2  # the refused one disturbed nothing


def test_lock_released_when_holder_is_killed(prefix: str) -> None:
    holder = H.spawn("holder", prefix)
    try:
        assert H.read_line(holder) == "ready"
        with pytest.raises(PublisherLockedError, match=f"{prefix}.*pid {holder.pid}"):
            Publisher(prefix)
    finally:
        holder.send_signal(signal.SIGKILL)
        H.reap(holder)
    successor = Publisher(prefix)
    assert successor.generation == 1
    assert ShmReader(prefix).poll().generation == 1  # the dead daemon's map still serves
    successor.cleanup()


# -- verification -----------------------------------------------------------------------


@pytest.mark.parametrize("lie", ["corrupt_blob", "control_checksum", "control_size"])
def test_reader_keeps_previous_on_mismatch(prefix: str, publishers: list, lie: str) -> None:
    pub = Publisher(prefix)
    publishers.append(pub)
    reader = ShmReader(prefix, clock=H.FakeClock())
    pub.publish(b"good generation one")
    assert reader.poll().generation == 1
    pub.publish(b"generation two payload")
    if lie == "corrupt_blob":  # root may open the immutable segment read-write
        fd = os.open(_path(f"{prefix}.g2"), os.O_RDWR)
        os.pwrite(fd, b"X", 3)
        os.close(fd)
    else:
        good = L.decode_slot(bytes(pub._ctl[L.slot_offset(2) : L.slot_offset(2) + 64]))
        if lie == "control_checksum":
            lying = good._replace(blob_checksum=good.blob_checksum ^ 1)
        else:
            lying = good._replace(blob_size=good.blob_size + 4096)
        ctl = _rw_control(prefix)
        ctl[L.slot_offset(2) : L.slot_offset(2) + L.SLOT_SIZE] = L.encode_slot(lying)
        ctl.close()
    snapshot = reader.poll()
    assert snapshot.generation == 1 and bytes(snapshot.buffer) == b"good generation one"
    assert reader.stats.verify_failures == 1
    assert reader.stats.last_error_generation == 2
    assert ("checksum" if lie != "control_size" else "bytes") in reader.stats.last_error
    reader._clock.now += 60  # periodic re-checks do not re-verify a rejected generation
    assert reader.poll() is snapshot and reader.poll() is snapshot
    assert reader.stats.verify_failures == 1
    pub.publish(b"generation three")
    assert reader.poll().generation == 3


def test_corrupt_control_slot_is_bounded_and_survivable(prefix: str, publishers: list) -> None:
    pub = Publisher(prefix)
    publishers.append(pub)
    clock = H.FakeClock()
    reader = ShmReader(prefix, clock=clock)
    pub.publish(b"one")
    first = reader.poll()
    ctl = _rw_control(prefix)  # a slot that fails its own crc, and the word pointing at it
    ctl[L.slot_offset(2) : L.slot_offset(2) + L.SLOT_SIZE] = b"\x5a" * L.SLOT_SIZE
    ctl[L.OFF_ACTIVE : L.OFF_ACTIVE + 8] = L.encode_active(2)
    ctl.close()
    assert reader.poll() is first
    assert reader.stats.inconsistent_reads == 4 and "unreadable" in reader.stats.last_error
    assert reader.poll() is first and reader.stats.inconsistent_reads == 4  # no spinning
    assert reader.control() is None
    pub.publish(b"two")  # rewrites slot and word (same word value as the forged one)
    clock.now += 1.0  # ... so the reader picks it up at its periodic re-check
    assert bytes(reader.poll().buffer) == b"two"


def test_vanished_segment_is_a_change_not_a_crash(prefix: str, publishers: list) -> None:
    pub = Publisher(prefix)
    publishers.append(pub)
    reader = ShmReader(prefix)
    pub.publish(b"one")
    first = reader.poll()
    pub.publish(b"two")
    posix_ipc.unlink_shared_memory(f"/{prefix}.g2")  # as if reclaimed before we attached
    assert reader.poll() is first
    assert reader.stats.attach_errors >= 1 and "vanished" in reader.stats.last_error
    pub.publish(b"three")
    assert bytes(reader.poll().buffer) == b"three"


def test_uninitialised_or_foreign_control(prefix: str, publishers: list) -> None:
    # A publisher killed between creating and initialising the control segment.
    empty = posix_ipc.SharedMemory(f"/{prefix}.ctl", posix_ipc.O_CREX, mode=0o640)
    empty.close_fd()
    reader = ShmReader(prefix)
    assert reader.poll() is None and reader.control() is None
    pub = Publisher(prefix)
    publishers.append(pub)
    pub.publish(b"fresh")
    assert bytes(reader.poll().buffer) == b"fresh"
    pub.close()
    # A control block of another layout version: readers refuse it, a publisher re-inits.
    ctl = _rw_control(prefix)
    ctl[8:12] = (99).to_bytes(4, "little")
    ctl.close()
    stranger = ShmReader(prefix)
    assert stranger.poll() is None and "layout version=99" in stranger.stats.last_error
    pub = Publisher(prefix)
    publishers.append(pub)
    assert pub.publish(b"re-initialised") == 2  # sequence continues past existing blobs
    assert bytes(stranger.poll().buffer) == b"re-initialised"


# -- bounded: reclaim -------------------------------------------------------------------


def test_reclaim_after_grace_keeps_old_mapping_readable(prefix: str, publishers: list) -> None:
    clock = H.FakeClock()
    pub = Publisher(prefix, grace_s=10.0, clock=clock, max_bytes_factor=1e6)  # grace only
    publishers.append(pub)
    reader = ShmReader(prefix)
    pub.publish(H.make_blob(1, 64 * 1024))
    old = reader.poll()
    keys = np.frombuffer(old.buffer, dtype=np.uint8)  # a zero-copy view pins the mapping
    pub.publish(H.make_blob(2))
    pub.publish(H.make_blob(3))
    assert reader.poll().generation == 3
    clock.now += 5
    assert pub.reclaim() == []
    clock.now += 5.5
    assert pub.reclaim() == [f"/{prefix}.g1"]  # g2 is the previous one: always kept
    assert H.shm_names(prefix) == [f"{prefix}.ctl", f"{prefix}.g2", f"{prefix}.g3"]
    assert H.check_blob(old.buffer, 1, 64 * 1024) is None  # unlinked, still mapped
    # g2 stopped being current 10.5 s ago; once it is no longer the previous one, the
    # reclaim inside publish() removes it.
    pub.publish(H.make_blob(4))
    assert H.shm_names(prefix) == [f"{prefix}.ctl", f"{prefix}.g3", f"{prefix}.g4"]
    pub.publish(H.make_blob(5))  # g3 retired just now: within its grace period
    assert H.shm_names(prefix) == [f"{prefix}.ctl", f"{prefix}.g3", f"{prefix}.g4", f"{prefix}.g5"]
    clock.now += 10
    assert pub.reclaim() == [f"/{prefix}.g3"]
    reader.close()  # no BufferError although a numpy view still uses generation 1
    del old
    assert keys[:8].tobytes() == (1).to_bytes(8, "little")


def test_restart_continues_sequence_and_reclaims_leftovers(
        prefix: str, publishers: list, caplog: pytest.LogCaptureFixture) -> None:
    clock = H.FakeClock()
    pub = Publisher(prefix, clock=clock, max_bytes_factor=1e6)
    for generation in (1, 2, 3):
        pub.publish(H.make_blob(generation))
    pub.close()  # a daemon that exits leaves its map in place
    with pytest.raises(PublisherError, match="closed"):
        pub.publish(b"late")
    reader = ShmReader(prefix)
    assert reader.poll().generation == 3
    # A daemon killed inside publish() leaves a half-written, never-flipped segment.
    crashed = posix_ipc.SharedMemory(f"/{prefix}.g4", posix_ipc.O_CREX, mode=0o640)
    os.write(crashed.fd, b"half a blo")
    crashed.close_fd()
    with caplog.at_level(logging.INFO, logger=PUBLISHER_LOG):
        successor = Publisher(prefix, clock=clock, max_bytes_factor=1e6)
    publishers.append(successor)
    assert successor.generation == 3
    assert f"{prefix}.g4" not in H.shm_names(prefix)
    assert f"removed unpublished segment prefix={prefix} generation=4" in _log_lines(caplog)
    assert successor.publish(H.make_blob(4)) == 4
    assert reader.poll().generation == 4
    clock.now += 11
    assert sorted(successor.reclaim()) == [f"/{prefix}.g1", f"/{prefix}.g2"]


def test_cleanup_removes_everything_and_readers_let_go(prefix: str) -> None:
    pub = Publisher(prefix, grace_s=3600, max_bytes_factor=1e6)
    reader = ShmReader(prefix)
    for generation in range(1, 6):
        pub.publish(H.make_blob(generation))
    assert reader.poll().generation == 5
    assert len(H.shm_names(prefix)) == 6
    pub.cleanup()
    assert H.shm_names(prefix) == []
    assert reader.poll() is None and reader.control() is None
    with pytest.raises(PublisherError, match="closed"):
        pub.heartbeat()


def test_reader_notices_control_replaced(prefix: str, publishers: list) -> None:
    clock = H.FakeClock()
    pub = Publisher(prefix)
    pub.publish(b"first daemon")
    reader = ShmReader(prefix, clock=clock)
    assert reader.poll().generation == 1
    pub.close()
    posix_ipc.unlink_shared_memory(f"/{prefix}.ctl")  # an operator removed it by hand
    fresh = Publisher(prefix)
    publishers.append(fresh)
    assert fresh.publish(b"second daemon") == 2
    assert reader.poll().generation == 1  # not before the periodic re-check
    clock.now += 1.0
    assert bytes(reader.poll().buffer) == b"second daemon"
    assert reader.stats.control_opens == 2


# -- least privilege --------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_segment_mode_ignores_umask(prefix: str, publishers: list, umask: int) -> None:
    old = os.umask(umask)
    try:
        pub = Publisher(prefix)
        publishers.append(pub)
        pub.publish(b"x")
    finally:
        os.umask(old)
    for name in (f"{prefix}.ctl", f"{prefix}.g1"):
        assert stat.S_IMODE(os.stat(_path(name)).st_mode) == 0o640, name


def test_custom_mode_and_group(prefix: str, publishers: list) -> None:
    other = next((g for g in grp.getgrall() if g.gr_gid != os.getgid()), None)
    if other is None:
        pytest.skip("needs a second group")
    pub = Publisher(prefix, mode=0o600, group=other.gr_name)
    publishers.append(pub)
    pub.publish(b"x")
    for name in (f"{prefix}.ctl", f"{prefix}.g1"):
        st = os.stat(_path(name))
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == other.gr_gid, name


def test_reader_mapping_is_read_only(prefix: str, publishers: list) -> None:
    pub = Publisher(prefix)
    publishers.append(pub)
    pub.publish(b"immutable")
    snapshot = ShmReader(prefix).poll()
    assert snapshot.buffer.readonly
    with pytest.raises(TypeError):
        snapshot.buffer[0] = 0
    with pytest.raises(TypeError):
        snapshot.buffer.obj[0:1] = b"X"  # the mmap itself is PROT_READ
    view = np.frombuffer(snapshot.buffer, dtype=np.uint8)
    assert not view.flags.writeable
    assert bytes(snapshot.buffer) == b"immutable"


# -- /dev/shm full ----------------------------------------------------------------------


def test_publish_fails_cleanly_when_space_runs_out(prefix: str, publishers: list) -> None:
    """A write that fails (a file-size limit standing in for a full /dev/shm, in this
    process so mutation testing sees it): PublishError naming the size, the segment, the
    cause (its strerror and errno) and the generation that stays current; the half-made
    segment is removed, readers keep the current map, the number is not used up, and the
    next attempt with room succeeds."""
    pub = Publisher(prefix)
    publishers.append(pub)
    pub.publish(H.make_blob(1))
    reader = ShmReader(prefix)
    assert reader.poll().generation == 1
    size = 1024 * 1024
    with H.file_size_limit(64 * 1024), pytest.raises(PublishError) as info:
        pub.publish(b"\xab" * size)
    assert str(info.value) == (
        f"cannot write {size} bytes to shm segment /{prefix}.g2: File too large "
        f"(errno {errno.EFBIG}); generation 1 stays current")
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EFBIG
    assert (pub.generation, pub.next_generation) == (1, 2)
    assert H.shm_names(prefix) == [f"{prefix}.ctl", f"{prefix}.g1"]
    assert reader.poll().generation == 1
    assert pub.publish(H.make_blob(2)) == 2  # the next attempt, with room, succeeds
    assert H.check_blob(reader.poll().buffer, 2, 4096) is None
    reader.close()


# -- hardening (issue #11) ----------------------------------------------------------------


def test_sparse_segment_is_rejected_before_mapping(prefix: str, publishers: list) -> None:
    """A slot naming a huge sparse segment: the reader checks allocation, not just length."""
    pub = Publisher(prefix)
    publishers.append(pub)
    reader = ShmReader(prefix)
    pub.publish(b"good generation one")
    assert reader.poll().generation == 1
    huge = 256 << 20
    sparse = posix_ipc.SharedMemory(f"/{prefix}.g2", posix_ipc.O_CREX, mode=0o640)
    os.ftruncate(sparse.fd, huge)  # no page allocated
    sparse.close_fd()
    ctl = _rw_control(prefix)
    ctl[L.slot_offset(2) : L.slot_offset(2) + L.SLOT_SIZE] = L.encode_slot(
        L.SlotRecord(2, huge, 1, 0, os.getpid()))
    ctl[L.OFF_ACTIVE : L.OFF_ACTIVE + 8] = L.encode_active(2)
    ctl.close()
    snapshot = reader.poll()
    assert snapshot.generation == 1 and bytes(snapshot.buffer) == b"good generation one"
    assert reader.stats.verify_failures == 1 and "sparse" in reader.stats.last_error
    assert f"0 of {huge} bytes allocated" in reader.stats.last_error


def test_generation_segments_stay_within_count_and_byte_bounds(prefix: str,
                                                                publishers: list) -> None:
    clock = H.FakeClock()
    pub = Publisher(prefix, grace_s=3600, clock=clock, max_segments=4, max_bytes_factor=3)
    publishers.append(pub)
    reader = ShmReader(prefix)
    for generation in range(1, 41):
        size = 1000 if generation % 7 else 20_000  # an occasional big one
        pub.publish(bytes([generation % 256]) * size)
        blobs = [n for n in H.shm_names(prefix) if not n.endswith(".ctl")]
        sizes = [os.stat(_path(n)).st_size for n in blobs]
        assert len(blobs) <= 4, blobs
        assert sum(sizes) <= 3 * size, (generation, sizes)  # 3x the current blob
        assert reader.poll().generation == generation
    assert pub.forced_reclaims > 0
    with pytest.raises(ValueError, match="max_segments"):
        Publisher(prefix + "x", max_segments=1)


def _blobs(prefix: str) -> list[int]:
    return sorted(int(n.rsplit(".g", 1)[1]) for n in H.shm_names(prefix)
                  if not n.endswith(".ctl"))


def test_the_bounds_keep_exactly_as_many_segments_as_they_allow(prefix: str,
                                                                publishers: list) -> None:
    """Equal blobs, a grace that never passes. After each publication the publisher makes
    room for a next blob of the same size, so the newest ``max_segments - 1`` generations
    stay (no fewer) and each publication past that reclaims exactly one; with the byte
    bound binding instead, ``max_bytes_factor - 1`` blobs' worth stay, and a bigger blob
    raises the bound. Fails on an off-by-one in either bound or in the reclaim count."""
    clock = H.FakeClock()
    pub = Publisher(prefix, grace_s=3600, clock=clock, max_segments=4, max_bytes_factor=50)
    publishers.append(pub)
    for generation in range(1, 9):
        pub.publish(b"x" * 1000)
        assert _blobs(prefix) == list(range(max(1, generation - 2), generation + 1))
        assert pub.forced_reclaims == max(0, generation - 3)
    other = prefix + "b"
    pub = Publisher(other, grace_s=3600, clock=clock, max_segments=50, max_bytes_factor=3)
    publishers.append(pub)
    for generation in range(1, 7):
        pub.publish(b"y" * 1000)
        assert _blobs(other) == list(range(max(1, generation - 1), generation + 1))
        assert pub.forced_reclaims == max(0, generation - 2)
    pub.publish(b"z" * 3000)  # 3x the new blob: the kept ones and it fit, none reclaimed
    assert _blobs(other) == [5, 6, 7] and pub.forced_reclaims == 4


def test_a_restarted_publisher_counts_its_predecessors_blobs_in_the_bounds(
        prefix: str, publishers: list) -> None:
    """The sizes of the generations a predecessor left (read from the segments) count
    against the byte bound of the next publication: fails if they are taken as 0 bytes."""
    clock = H.FakeClock()
    first = Publisher(prefix, grace_s=3600, clock=clock, max_segments=50, max_bytes_factor=4)
    publishers.append(first)
    for _ in range(3):
        first.publish(b"a" * 1000)
    first.close()  # a restart: the segments stay
    assert _blobs(prefix) == [1, 2, 3] and first.forced_reclaims == 0
    second = Publisher(prefix, grace_s=3600, clock=clock, max_segments=50,
                       max_bytes_factor=4)
    publishers.append(second)
    second.publish(b"b" * 1000)
    assert _blobs(prefix) == [2, 3, 4] and second.forced_reclaims == 1
    # the same with a prefix that starts like the segment names' leading "/" and "X"
    other = "X" + prefix
    first = Publisher(other, grace_s=3600, clock=clock, max_segments=50, max_bytes_factor=4)
    publishers.append(first)
    for _ in range(3):
        first.publish(b"a" * 1000)
    first.close()
    second = Publisher(other, grace_s=3600, clock=clock, max_segments=50, max_bytes_factor=4)
    publishers.append(second)
    second.publish(b"b" * 1000)
    assert _blobs(other) == [2, 3, 4] and second.forced_reclaims == 1


def test_publications_and_reclaims_say_what_happened_in_the_log(
        prefix: str, publishers: list, caplog: pytest.LogCaptureFixture) -> None:
    clock = H.FakeClock()
    pub = Publisher(prefix, grace_s=10, clock=clock, max_segments=4, max_bytes_factor=50)
    publishers.append(pub)
    with pytest.raises(ValueError, match=r"^cannot publish an empty blob$"):
        pub.publish(b"")
    with caplog.at_level(logging.DEBUG, logger=PUBLISHER_LOG):
        for _ in range(3):
            pub.publish(b"x" * 100)
        clock.now += 11  # past the grace: the next publication reclaims by age
        pub.publish(b"x" * 100)
    lines = _log_lines(caplog)
    assert [line for line in lines if line.startswith("published ")] == [
        f"published prefix={prefix} generation={g} size=100" for g in (1, 2, 3, 4)]
    assert f"reclaimed early prefix={prefix} generation=1 (bounds: 4 segments, 50 x the " \
           "blob)" in lines
    assert f"reclaimed prefix={prefix} segments=/{prefix}.g2" in lines


def test_restart_reclaims_what_a_fast_restart_loop_left(
        prefix: str, publishers: list, caplog: pytest.LogCaptureFixture) -> None:
    """Grace runs from the current generation's publication, not from each restart: a
    restart half a second inside it reclaims nothing, one half a second past it reclaims
    every older generation at once (and logs them). The clock reads like today's epoch
    seconds, so a grace computed from a mis-scaled publication time (ns / 1e9) is off by
    seconds and fails."""
    clock = H.FakeClock(1_700_000_000.0)
    for generation in range(1, 11):  # ten daemons, each publishes once and exits at once
        pub = Publisher(prefix, clock=clock, grace_s=10.0, max_segments=100,
                        max_bytes_factor=1e6)
        assert pub.publish(H.make_blob(generation)) == generation
        pub.close()
        clock.now += 0.5
    assert len(H.shm_names(prefix)) == 1 + 10  # nothing could be reclaimed yet
    clock.now += 9.0  # generation 10 was published 9.5 s ago: within the grace
    early = Publisher(prefix, clock=clock, grace_s=10.0)
    publishers.append(early)
    assert len(H.shm_names(prefix)) == 1 + 10 and early.generation == 10
    early.close()
    clock.now += 1.0  # the grace has passed since generation 10 was published
    with caplog.at_level(logging.DEBUG, logger=PUBLISHER_LOG):
        successor = Publisher(prefix, clock=clock, grace_s=10.0)
    publishers.append(successor)
    assert H.shm_names(prefix) == [f"{prefix}.ctl", f"{prefix}.g10"]
    assert ShmReader(prefix).poll().generation == 10
    segments = ",".join(f"/{prefix}.g{g}" for g in range(1, 10))
    assert f"reclaimed prefix={prefix} segments={segments}" in _log_lines(caplog)


@pytest.mark.parametrize("state", ["slot fails its crc", "slot of another generation",
                                   "retired by an unfinished cleanup"])
def test_restart_on_a_control_with_no_valid_active_slot(
        prefix: str, publishers: list, caplog: pytest.LogCaptureFixture, state: str) -> None:
    """A predecessor left a control whose active word names no valid slot: a slot that
    fails its crc (a stray write), a word a few generations ahead of the slot it names, or
    RETIRED from a cleanup that died before unlinking. A starting publisher says so (a
    warning with the word), resets the word to "nothing published", removes the blobs it
    cannot vouch for (logging each), and continues the sequence above them: a number on
    disk is never reused, so a worker never takes a new map for one it verified. Its next
    publication is served."""
    pub = Publisher(prefix, grace_s=3600, max_bytes_factor=1e6)
    publishers.append(pub)
    for generation in (1, 2, 3):
        pub.publish(H.make_blob(generation))
    pub.close()
    ctl = _rw_control(prefix)
    if state == "slot fails its crc":
        word = 4
        ctl[L.slot_offset(word) : L.slot_offset(word) + L.SLOT_SIZE] = b"\x5a" * L.SLOT_SIZE
    elif state == "slot of another generation":
        word = 3 + L.SLOT_COUNT  # its slot is generation 3's, whole and valid
    else:
        word = L.RETIRED
    ctl[L.OFF_ACTIVE : L.OFF_ACTIVE + L.ACTIVE_STRUCT.size] = L.encode_active(word)
    try:
        with caplog.at_level(logging.INFO, logger=PUBLISHER_LOG):
            successor = Publisher(prefix, grace_s=3600)
        publishers.append(successor)
        assert L.read_active(ctl) == L.NONE_PUBLISHED
        L.check_header(ctl)  # the rest of the control is untouched (raises if not)
    finally:
        ctl.close()
    warnings = [r.getMessage() for r in caplog.records
                if r.name == PUBLISHER_LOG and r.levelno == logging.WARNING]
    assert warnings == [f"control has no valid active slot prefix={prefix} word={word}"]
    assert [line for line in _log_lines(caplog) if line.startswith("removed ")] == [
        f"removed unpublished segment prefix={prefix} generation={g}" for g in (1, 2, 3)]
    assert H.shm_names(prefix) == [f"{prefix}.ctl"]
    assert (successor.generation, successor.next_generation) == (0, 4)
    assert successor.live_segments() == []
    reader = ShmReader(prefix)
    assert reader.poll() is None and reader.control().generation == 0
    assert successor.publish(H.make_blob(4)) == 4
    assert H.check_blob(reader.poll().buffer, 4, 4096) is None
    reader.close()


def test_a_segment_gone_between_listing_and_stat_counts_as_no_bytes(prefix: str,
                                                                      publishers: list) -> None:
    """A predecessor's generation whose name cannot be stat'ed when a publisher starts (it
    vanished after the directory was listed; here its name is a dangling symlink) is not an
    error: it counts as 0 bytes in what the publisher reports (``live_segments``, the
    daemon's shm_bytes metric) and in the byte bound, and is reclaimed like the others."""
    first = Publisher(prefix, grace_s=3600, max_segments=50, max_bytes_factor=50)
    publishers.append(first)
    for _ in range(3):
        first.publish(b"a" * 1000)
    first.close()
    gone = _path(f"{prefix}.g1")
    os.unlink(gone)
    os.symlink(f"/nonexistent/{prefix}", gone)
    clock = H.FakeClock(time.time())
    second = Publisher(prefix, grace_s=3600, clock=clock, max_segments=50,
                       max_bytes_factor=50)
    publishers.append(second)
    assert sorted(second.live_segments()) == [(1, 0), (2, 1000), (3, 1000)]
    clock.now += 3600
    assert second.reclaim() == [f"/{prefix}.g1"]  # g2: the previous one, kept
    assert not os.path.lexists(gone)
    assert sorted(second.live_segments()) == [(2, 1000), (3, 1000)]


def test_lock_survives_dev_shm_being_cleaned(prefix: str, publishers: list,
                                             tmp_path: Path) -> None:
    pub = Publisher(prefix, lock_dir=str(tmp_path))
    publishers.append(pub)
    pub.publish(b"one")
    for name in H.shm_names(prefix):  # rm /dev/shm/<prefix>.*
        os.unlink(_path(name))
    with pytest.raises(PublisherLockedError) as info:
        Publisher(prefix, lock_dir=str(tmp_path))
    assert info.value.holder_pid == os.getpid()
    assert str(tmp_path / f"feature-trimmer.{prefix}.lock") in str(info.value)


def test_heartbeat_recreates_a_removed_or_replaced_control(prefix: str,
                                                           publishers: list) -> None:
    clock = H.FakeClock()
    pub = Publisher(prefix)
    publishers.append(pub)
    reader = ShmReader(prefix, clock=clock)
    pub.publish(b"the map")
    assert reader.poll().generation == 1
    os.unlink(_path(f"{prefix}.ctl"))  # removed by hand
    assert reader.poll().generation == 1  # a worker keeps what it has
    assert pub.heartbeat() and pub.control_recreations == 1
    assert not pub.blob_missing()
    clock.now += 1.0
    assert bytes(reader.poll().buffer) == b"the map"  # found again, same generation
    assert reader.stats.control_opens == 2
    # replaced by a foreign file of the same name
    os.unlink(_path(f"{prefix}.ctl"))
    foreign = posix_ipc.SharedMemory(f"/{prefix}.ctl", posix_ipc.O_CREX, mode=0o640)
    os.write(foreign.fd, b"\0" * L.CTL_SIZE)
    foreign.close_fd()
    assert pub.heartbeat() and pub.control_recreations == 2
    assert pub.publish(b"next") == 2
    clock.now += 1.0
    assert bytes(reader.poll().buffer) == b"next"
    os.unlink(_path(f"{prefix}.g2"))
    assert pub.blob_missing()


def test_control_unavailable_at_start_is_retried_by_publish(prefix: str) -> None:
    """/dev/shm full at start: the publisher starts anyway; publish retries the control."""
    child = H.spawn("fsize_start", prefix)
    try:
        result = _finish(child)
    finally:
        H.reap(child)
    assert "cannot open control segment" in result["first_error"], result
    assert result["problem_while_full"] and result["problem_after"] == ""
    assert result["generation"] == 1
    assert ShmReader(prefix).poll().generation == 1
    Publisher(prefix).cleanup()
