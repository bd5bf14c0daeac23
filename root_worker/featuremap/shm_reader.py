"""Lock-free reader of the map the daemon publishes in POSIX shared memory (worker side).

Runs in every pre-forked root worker. Construct a :class:`ShmReader` anywhere (it touches no
shared memory before the first :meth:`ShmReader.poll`, so constructing it pre-fork is inert)
and call ``poll()`` on every request: when nothing changed it costs one 8-byte read of the
control block's active word and a compare; when the daemon flipped to a new generation it
attaches the new blob read-only, verifies its size and checksum once, and only then serves it.
The protocol is documented in :mod:`flatbuffers_schema.shm_layout`.

The reader never takes a lock shared with the daemon or other workers, never waits and never
spins: every retry loop is bounded, and whatever goes wrong (torn control read, segment
unlinked under us, checksum mismatch, no daemon yet) leaves it serving the generation it had
(or ``None``: the caller then passes requests through untrimmed). It registers nothing with
``multiprocessing.resource_tracker`` and never unlinks: only the daemon owns the segments.

Lifetime: a :class:`Snapshot`'s ``buffer`` is a read-only ``memoryview`` of its own mapping.
Views taken on it (``np.frombuffer``, FlatBuffers accessors) keep the mapping alive; the
reader never calls ``mmap.close()`` on a blob — it only drops its reference, and the mapping
goes away with the last view. An unlinked generation stays readable for as long as it is
mapped.

Trust boundary: the reader checks the segment size -- both its length and its allocated
blocks, so a sparse segment declaring a huge size is rejected before it is mapped -- and the
checksum before use, so a torn, short, sparse or corrupt blob is rejected. It cannot defend
against a process with write access truncating an already-mapped segment (touching the lost
pages raises SIGBUS); segments are immutable by contract and writable only by the daemon's
user (mode 0640).
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import posix_ipc

from flatbuffers_schema import shm_layout as L

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 4
"""Bounded retries for a torn control read or a segment unlinked while attaching."""
RECHECK_INTERVAL_S = 1.0
"""How often the slow path runs even when the active word is unchanged: detects a control
segment that was unlinked or replaced (by its inode) and retries failed attaches."""

_BLOCK_BYTES = 512
"""Unit of ``st_blocks`` (POSIX; Linux tmpfs included)."""

_unpack_active = L.ACTIVE_STRUCT.unpack_from
_OFF_ACTIVE = L.OFF_ACTIVE


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One verified, immutable generation of the map, mapped read-only (zero-copy)."""

    generation: int
    buffer: memoryview  # read-only, exactly ``size`` bytes
    size: int
    checksum: int
    published_at_ns: int
    publisher_pid: int
    segment: str


@dataclass(frozen=True, slots=True)
class ControlInfo:
    """What the control block says now (for ``/healthz`` and ``trimmer-inspect``).

    ``generation`` is 0 (and the blob fields 0) when nothing was published yet;
    ``heartbeat_ns``/``heartbeat_pid`` are 0 if no valid heartbeat was read.
    """

    generation: int
    blob_size: int
    blob_checksum: int
    published_at_ns: int
    publisher_pid: int
    heartbeat_ns: int
    heartbeat_pid: int


@dataclass
class ReaderStats:
    """Counters of one reader (one worker process)."""

    attaches: int = 0
    verify_failures: int = 0
    attach_errors: int = 0
    inconsistent_reads: int = 0
    control_opens: int = 0
    last_error: str | None = None
    last_error_generation: int = 0


class _Inconsistent(Exception):
    def __init__(self, word: int, stable: bool) -> None:
        super().__init__(word, stable)
        self.word = word
        self.stable = stable  # the word did not move: a corrupt slot, not a race


class _VerifyError(Exception):
    pass


class ShmReader:
    """Read side of one shm prefix. One per worker process; ``poll()`` may be called from
    several threads (a concurrent refresh is never waited for: the caller gets the current
    snapshot)."""

    def __init__(
        self,
        prefix: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        recheck_interval_s: float = RECHECK_INTERVAL_S,
    ) -> None:
        """Remember the prefix only; shared memory is first touched by ``poll()``."""
        self.prefix = L.validate_prefix(prefix)
        self.stats = ReaderStats()
        self.recheck_interval_s = recheck_interval_s
        self._clock = clock
        self._ctl: mmap.mmap | None = None  # holds its own fd; no other fd is kept open
        self._ctl_id: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the mapped control
        self._seen: int | None = None  # active word whose outcome is settled
        self._snapshot: Snapshot | None = None
        self._rejected: tuple[int, int, int] | None = None  # (generation, size, checksum)
        self._next_recheck = 0.0
        self._refreshing = threading.Lock()

    @property
    def generation(self) -> int:
        """The generation this worker serves (0 if none)."""
        snapshot = self._snapshot
        return snapshot.generation if snapshot is not None else 0

    def poll(self) -> Snapshot | None:
        """Return the current verified snapshot, attaching a new generation if one appeared.

        ``None`` means no usable map (nothing published, or the control segment is gone).
        """
        if not self.due():
            return self._snapshot
        if not self._refreshing.acquire(blocking=False):
            return self._snapshot
        try:
            return self._refresh()
        finally:
            self._refreshing.release()

    def due(self) -> bool:
        """Would :meth:`poll` do more than return the current snapshot (a new generation to
        attach, a periodic recheck, no control block yet)? Lock-free, never waits."""
        ctl = self._ctl
        return not (
            ctl is not None
            and _unpack_active(ctl, _OFF_ACTIVE)[0] == self._seen
            and self._clock() < self._next_recheck
        )

    def control(self) -> ControlInfo | None:
        """Read the control block (no attach, no verify); ``None`` if there is none."""
        with self._refreshing:
            if self._ctl is None and not self._open_control():
                return None
            try:
                word, record = self._read_slot()
            except _Inconsistent:
                return None
            beat = self._read_heartbeat()
        if word == L.RETIRED:
            return None
        return ControlInfo(
            generation=record.generation if record else 0,
            blob_size=record.blob_size if record else 0,
            blob_checksum=record.blob_checksum if record else 0,
            published_at_ns=record.published_at_ns if record else 0,
            publisher_pid=record.publisher_pid if record else 0,
            heartbeat_ns=beat.heartbeat_ns if beat else 0,
            heartbeat_pid=beat.pid if beat else 0,
        )

    def close(self) -> None:
        """Forget the control block and the current snapshot.

        Mappings are not closed explicitly: views may still exist; each goes with its last
        reference.
        """
        with self._refreshing:
            self._drop_control()

    # -- slow path ----------------------------------------------------------------------

    def _refresh(self) -> Snapshot | None:
        now = self._clock()
        if now >= self._next_recheck:
            self._next_recheck = now + self.recheck_interval_s
            if self._ctl is not None and self._control_replaced():
                self._record_error("control segment was unlinked or replaced; re-opening", 0)
                self._drop_control()
        if self._ctl is None and not self._open_control():
            return None
        for _ in range(MAX_ATTEMPTS):
            try:
                word, record = self._read_slot()
            except _Inconsistent as exc:
                self._record_error(f"control slot unreadable (active word {exc.word})", exc.word)
                if exc.stable:
                    self._seen = exc.word
                return self._snapshot
            if word == L.RETIRED:
                self._drop_control()
                return None
            if record is None:
                self._snapshot, self._seen = None, word
                return None
            if self._settle(word, record):
                return self._snapshot
        self._seen = word  # the segment kept vanishing; retry at the next change or recheck
        return self._snapshot

    def _settle(self, word: int, record: L.SlotRecord) -> bool:
        """Make ``record`` current if possible; ``False`` means re-read the control block."""
        current = self._snapshot
        key = (record.generation, record.blob_size, record.blob_checksum)
        if current is not None and key == (current.generation, current.size, current.checksum):
            self._seen = word
            return True
        if key == self._rejected:
            self._seen = word
            return True
        try:
            snapshot = self._attach(record)
        except FileNotFoundError:
            # Unlinked between our control read and shm_open: the daemon moved on again.
            self.stats.attach_errors += 1
            self._record_error(
                f"segment {L.blob_name(self.prefix, record.generation)} vanished",
                record.generation,
            )
            return False
        except _VerifyError as exc:
            self.stats.verify_failures += 1
            self._rejected = key
            self._record_error(str(exc), record.generation)
            log.error("map verify failed prefix=%s error=%s", self.prefix, exc)
        except OSError as exc:
            self.stats.attach_errors += 1
            self._record_error(f"cannot attach generation {record.generation}: {exc}", word)
        else:
            self._snapshot = snapshot
            self.stats.attaches += 1
            log.debug("attached prefix=%s generation=%d", self.prefix, snapshot.generation)
        self._seen = word
        return True

    def _attach(self, record: L.SlotRecord) -> Snapshot:
        name = L.blob_name(self.prefix, record.generation)
        try:
            shm = posix_ipc.SharedMemory(name, read_only=True)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(name) from None
        except posix_ipc.PermissionsError as exc:
            raise PermissionError(f"{name}: {exc}") from None
        try:
            st = os.fstat(shm.fd)
            if record.blob_size <= 0 or st.st_size != record.blob_size:
                raise _VerifyError(
                    f"generation {record.generation}: segment {name} holds {st.st_size} "
                    f"bytes, control says {record.blob_size}"
                )
            if st.st_blocks * _BLOCK_BYTES < record.blob_size:
                # The daemon writes (so allocates) every page before it flips; a sparse
                # segment is not one of its blobs, and mapping + checksumming it would cost
                # its whole declared size.
                raise _VerifyError(
                    f"generation {record.generation}: segment {name} is sparse "
                    f"({st.st_blocks * _BLOCK_BYTES} of {record.blob_size} bytes allocated)"
                )
            mapping = mmap.mmap(shm.fd, record.blob_size, prot=mmap.PROT_READ)
        finally:
            shm.close_fd()
        buffer = memoryview(mapping)
        actual = L.checksum(buffer)
        if actual != record.blob_checksum:
            raise _VerifyError(
                f"generation {record.generation}: checksum mismatch in {name} "
                f"(crc32 {actual:#010x}, control says {record.blob_checksum:#010x})"
            )
        return Snapshot(
            generation=record.generation,
            buffer=buffer,
            size=record.blob_size,
            checksum=record.blob_checksum,
            published_at_ns=record.published_at_ns,
            publisher_pid=record.publisher_pid,
            segment=name,
        )

    # -- control block ------------------------------------------------------------------

    def _open_control(self) -> bool:
        name = L.control_name(self.prefix)
        try:
            shm = posix_ipc.SharedMemory(name, read_only=True)
        except posix_ipc.ExistentialError:
            return False
        except posix_ipc.PermissionsError as exc:
            self._record_error(f"cannot open {name}: {exc}", 0)
            return False
        try:
            st = os.fstat(shm.fd)
            if st.st_size < L.CTL_SIZE:
                return False  # a publisher is initialising it right now
            ctl = mmap.mmap(shm.fd, L.CTL_SIZE, prot=mmap.PROT_READ)
            L.check_header(ctl)
        except (OSError, L.LayoutError) as exc:
            self._record_error(f"cannot use {name}: {exc}", 0)
            return False
        finally:
            shm.close_fd()
        self._ctl, self._ctl_id = ctl, (st.st_dev, st.st_ino)
        self._seen, self._snapshot, self._rejected = None, None, None
        self.stats.control_opens += 1
        return True

    def _control_replaced(self) -> bool:
        """Is the name no longer the segment we map (cleanup, or removed and re-created)?"""
        try:
            shm = posix_ipc.SharedMemory(L.control_name(self.prefix), read_only=True)
        except posix_ipc.ExistentialError:
            return True
        except posix_ipc.Error:
            return False
        try:
            st = os.fstat(shm.fd)
        finally:
            shm.close_fd()
        return (st.st_dev, st.st_ino) != self._ctl_id

    def _drop_control(self) -> None:
        # No ctl.close(): a concurrent fast path may hold a reference; GC unmaps it.
        self._ctl = None
        self._seen, self._snapshot, self._rejected = None, None, None

    def _read_slot(self) -> tuple[int, L.SlotRecord | None]:
        """Copy the active slot consistently: ``(word, record)``; record ``None`` if the word
        says nothing is published (or retired). Raises ``_Inconsistent`` after bounded
        retries."""
        ctl = self._ctl
        assert ctl is not None
        first = second = 0
        for _ in range(MAX_ATTEMPTS):
            first = L.read_active(ctl)
            if first in (L.NONE_PUBLISHED, L.RETIRED):
                return first, None
            offset = L.slot_offset(first)
            raw = ctl[offset : offset + L.SLOT_SIZE]
            second = L.read_active(ctl)
            record = L.decode_slot(raw) if first == second else None
            if record is not None and record.generation == first:
                return first, record
            self.stats.inconsistent_reads += 1
        raise _Inconsistent(first, stable=first == second)

    def _read_heartbeat(self) -> L.Heartbeat | None:
        ctl = self._ctl
        assert ctl is not None
        end = L.OFF_HEARTBEAT + L.HEARTBEAT_STRUCT.size
        for _ in range(MAX_ATTEMPTS):
            beat = L.decode_heartbeat(ctl[L.OFF_HEARTBEAT : end])
            if beat is not None:
                return beat
        return None

    def _record_error(self, message: str, generation: int) -> None:
        self.stats.last_error = message
        self.stats.last_error_generation = generation
