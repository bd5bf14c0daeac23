"""The publisher's spare segment (issue #11, item 6): the next generation's segment made and
allocated ahead of time, so a publication only copies into it.

Real POSIX shared memory throughout: real segments in /dev/shm, real readers, a real
publisher process killed with SIGKILL, a real file-size limit standing in for a full
/dev/shm (as in tests/test_shm.py). The ``shm_prefix`` fixture fails a test that leaves
any segment behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_helpers import DaemonProc, model_doc, replace_bundle, wait_for

from flatbuffers_schema import shm_layout as L
from flatbuffers_schema.shm_layout import SHM_DIR, segment_files
from root_worker.featuremap.shm_reader import ShmReader
from trimmer_daemon.publisher import Publisher

ROOT = Path(__file__).resolve().parent.parent
SIZE = 256 * 1024
Readers = Callable[[str], ShmReader]


@pytest.fixture
def pubs() -> Iterator[list[Publisher]]:
    """Publishers of a test, cleaned up (every segment removed) even when it fails."""
    made: list[Publisher] = []
    try:
        yield made
    finally:
        for pub in made:
            if pub._ctl is not None:
                pub.cleanup()


@pytest.fixture
def reader_of() -> Iterator[Readers]:
    """Opens readers of a prefix, closed at the end of the test."""
    opened: list[ShmReader] = []

    def open_reader(prefix: str) -> ShmReader:
        opened.append(ShmReader(prefix))
        return opened[-1]
    try:
        yield open_reader
    finally:
        for reader in opened:
            reader.close()


def _stat(prefix: str, generation: int) -> os.stat_result:
    return os.stat(os.path.join(SHM_DIR, L.blob_name(prefix, generation).lstrip("/")))


def _blob(generation: int, size: int = SIZE) -> bytes:
    return bytes([generation % 251]) * size


def _generations(prefix: str) -> list[int]:
    pattern = L.blob_pattern(prefix)
    return sorted(int(m.group(1)) for n in segment_files(prefix) if (m := pattern.fullmatch(n)))


def test_spare_is_the_next_segment_unseen_until_flipped_and_removed_at_close(
        shm_prefix: str, reader_of: Readers, pubs: list) -> None:
    pub = Publisher(shm_prefix, grace_s=3600)
    pubs.append(pub)
    assert not pub.wants_spare and not pub.prepare_spare()  # nothing published: no size yet
    pub.publish(_blob(1))
    reader = reader_of(shm_prefix)
    assert pub.wants_spare and pub.prepare_spare()
    assert not pub.wants_spare and not pub.prepare_spare()  # one spare at a time
    st = _stat(shm_prefix, 2)
    assert st.st_size == SIZE and st.st_blocks * 512 >= SIZE  # allocated, not sparse
    assert st.st_mode & 0o777 == pub.mode
    assert (2, SIZE) in pub.live_segments()
    assert reader.poll().generation == 1  # the control block never names the spare
    assert pub.publish(_blob(2)) == 2
    assert _stat(shm_prefix, 2).st_ino == st.st_ino  # the publication wrote into the spare
    snapshot = reader.poll()
    assert snapshot.generation == 2 and bytes(snapshot.buffer) == _blob(2)
    assert pub.prepare_spare() and _generations(shm_prefix) == [1, 2, 3]
    pub.close()  # a daemon's SIGTERM: the map stays, the spare goes
    assert _generations(shm_prefix) == [1, 2]
    assert reader_of(shm_prefix).poll().generation == 2
    Publisher(shm_prefix).cleanup()


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_blob_smaller_or_larger_than_the_spare(shm_prefix: str, reader_of: Readers,
                                               pubs: list, factor: float) -> None:
    pub = Publisher(shm_prefix, grace_s=3600)
    pubs.append(pub)
    pub.publish(_blob(1))
    assert pub.prepare_spare()
    inode = _stat(shm_prefix, 2).st_ino
    blob = _blob(2, int(SIZE * factor))
    assert pub.publish(blob) == 2
    st = _stat(shm_prefix, 2)
    assert st.st_ino == inode and st.st_size == len(blob)  # trimmed or extended exactly
    snapshot = reader_of(shm_prefix).poll()
    assert snapshot.generation == 2 and bytes(snapshot.buffer) == blob


def test_spare_counts_against_both_bounds(shm_prefix: str, reader_of: Readers,
                                          pubs: list) -> None:
    """With a spare prepared after every publication, segments and bytes stay within the
    bounds at every step, whatever the sizes."""
    pub = Publisher(shm_prefix, grace_s=3600, max_segments=4, max_bytes_factor=3)
    pubs.append(pub)
    reader = reader_of(shm_prefix)
    spares = 0
    for generation in range(1, 31):
        size = 4096 if generation % 5 else 64 * 1024  # an occasional big one
        pub.publish(_blob(generation, size))
        assert reader.poll().generation == generation
        spares += pub.prepare_spare()
        sizes = [_stat(shm_prefix, g).st_size for g in _generations(shm_prefix)]
        assert len(sizes) <= 4, sizes
        assert sum(sizes) <= 3 * size, (generation, sizes)
        assert sorted(pub.live_segments()) == list(zip(_generations(shm_prefix), sizes,
                                                       strict=True))
    assert spares > 10


def test_a_crashed_publishers_spare_is_reclaimed_at_start(shm_prefix: str,
                                                          reader_of: Readers) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from trimmer_daemon.publisher import Publisher
        pub = Publisher({shm_prefix!r})
        pub.publish(b"x" * {SIZE})
        assert pub.prepare_spare()
        print("ready", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert _generations(shm_prefix) == [1, 2]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    successor = Publisher(shm_prefix)
    try:
        assert _generations(shm_prefix) == [1]  # the spare was never flipped to: removed
        assert successor.next_generation == 2
        assert successor.publish(b"y" * 100) == 2
        assert bytes(reader_of(shm_prefix).poll().buffer) == b"y" * 100
    finally:
        successor.cleanup()


def test_no_room_for_the_spare_is_harmless(shm_prefix: str, reader_of: Readers) -> None:
    """A file-size limit below the blob (a stand-in for a full /dev/shm) while preparing
    the spare: no spare, nothing left behind, the next publication works."""
    script = textwrap.dedent(f"""
        import json, os, resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from trimmer_daemon.publisher import Publisher
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        pub = Publisher({shm_prefix!r})
        pub.publish(b"x" * {SIZE})
        resource.setrlimit(resource.RLIMIT_FSIZE, ({SIZE // 2}, resource.RLIM_INFINITY))
        made = pub.prepare_spare()
        left = sorted(os.listdir("/dev/shm"))
        again = pub.wants_spare
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        generation = pub.publish(b"z" * {SIZE})
        pub.close()
        print(json.dumps({{"made": made, "again": again, "generation": generation,
                          "left": [n for n in left if n.startswith({shm_prefix!r} + ".")]}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    try:
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result == {"made": False, "again": False, "generation": 2,
                          "left": [f"{shm_prefix}.ctl", f"{shm_prefix}.g1"]}
        assert bytes(reader_of(shm_prefix).poll().buffer) == b"z" * SIZE
    finally:
        Publisher(shm_prefix).cleanup()


def test_daemon_publishes_into_its_spare_and_removes_it_at_stop(
        shm_prefix: str, tmp_path: Path) -> None:
    bundle = tmp_path / "ads" / "module_info.json"
    bundle.parent.mkdir()
    replace_bundle(bundle, model_doc("ctr", "1", ["a", "b"]))
    with DaemonProc(shm_prefix, {"ads": bundle}, tmp_path / "d.log",
                    extra=["--grace-seconds", "30"]) as d:
        first = d.wait_view(lambda v: v.model_count == 1).generation
        wait_for(lambda: _generations(shm_prefix)[-1:] == [first + 1], what="a spare")
        inode = _stat(shm_prefix, first + 1).st_ino
        replace_bundle(bundle, model_doc("ctr", "2", ["a", "c"]))
        view = d.wait_view(lambda v: v.resolve("ctr").version == "2")
        assert view.generation == first + 1
        assert _stat(shm_prefix, first + 1).st_ino == inode
        wait_for(lambda: _generations(shm_prefix)[-1:] == [first + 2], what="the next spare")
        d.live.close()
        assert d.stop() == 0
        assert _generations(shm_prefix)[-1] == first + 1  # the spare went with the daemon


def test_a_part_already_in_the_spare_is_not_written_again(shm_prefix: str, reader_of: Readers,
                                                          pubs: list) -> None:
    """A same-size blob whose unchanged part is the same bytes object at the same offset:
    that part is left as the spare holds it (shown by tampering with the spare on purpose:
    the reader's checksum then rejects the generation and keeps the previous one), while an
    equal but different object is written."""
    pub = Publisher(shm_prefix, grace_s=3600)
    pubs.append(pub)
    block = b"B" * SIZE
    pub.publish_parts([b"head-one", block])
    reader = reader_of(shm_prefix)
    assert reader.poll().generation == 1
    for generation, part, accepted in ((2, block, False), (3, bytes(bytearray(block)), True)):
        assert pub.prepare_spare()
        path = os.path.join(SHM_DIR, L.blob_name(shm_prefix, generation).lstrip("/"))
        with open(path, "r+b") as f:  # tamper with the block's bytes in the spare
            f.seek(8 + 100)
            f.write(b"X")
        head = f"head-{generation:03d}"[:8].encode()
        assert pub.publish_parts([head, part]) == generation
        snapshot = reader.poll()
        if accepted:
            assert snapshot.generation == generation
            assert bytes(snapshot.buffer) == head + block
        else:
            assert snapshot.generation == 1 and reader.stats.verify_failures == 1


def test_a_spare_removed_by_hand_is_not_published_into(shm_prefix: str, reader_of: Readers,
                                                       pubs: list) -> None:
    pub = Publisher(shm_prefix, grace_s=3600)
    pubs.append(pub)
    pub.publish(_blob(1))
    assert pub.prepare_spare()
    os.unlink(os.path.join(SHM_DIR, L.blob_name(shm_prefix, 2).lstrip("/")))  # rm by hand
    assert pub.publish(_blob(2)) == 2
    snapshot = reader_of(shm_prefix).poll()
    assert snapshot.generation == 2 and bytes(snapshot.buffer) == _blob(2)
