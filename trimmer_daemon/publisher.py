"""Publish one immutable blob per generation in POSIX shared memory (daemon side).

Runs in the trimmer daemon only: one ``Publisher`` per shm prefix per host, single-threaded.
The layout, the write order and the read protocol are documented in
:mod:`flatbuffers_schema.shm_layout`; this module is the only writer of it.

Lifecycle contract (after CPython's ``multiprocessing.shared_memory``):

* ``Publisher(prefix)`` opens (creating if needed) the control segment and takes an exclusive
  ``flock`` on it. The kernel drops the lock when the holder's last fd closes — including on
  ``kill -9`` — so a crashed daemon never blocks its successor, while a live one makes a
  second daemon fail with :class:`PublisherLockedError`. The generation sequence continues
  from the control segment; segments a crashed predecessor left half-made are removed.
  The lock belongs to the open file description: a child made by a bare ``fork()`` (no
  exec) shares it and keeps it held after the daemon dies — fork+exec is safe (the fd is
  close-on-exec).
* ``publish(blob)`` writes ``.g<N>`` completely through the fd (``posix_fallocate`` +
  ``pwrite``, so a full ``/dev/shm`` is an ``OSError``, not a ``SIGBUS``), then flips the
  control block; on failure it removes the half-made segment and raises :class:`PublishError`.
* ``close()`` releases the lock and leaves the control segment and the current blob for the
  workers (a daemon that exits or restarts must not take the map away).
* ``cleanup()`` unlinks every segment of the prefix. Only the owner unlinks; workers attach
  read-only and register nothing for cleanup (no ``resource_tracker``).
"""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import mmap
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import posix_ipc

from flatbuffers_schema import shm_layout as L

log = logging.getLogger(__name__)

DEFAULT_MODE = 0o640
"""Owner read-write, group (the worker user's) read-only, others nothing."""
DEFAULT_GRACE_S = 10.0
"""How long a superseded generation stays linked so a slow worker can still attach it."""
"""Where Linux exposes POSIX shm names as files; used to find leftovers of a crashed run."""


class PublisherError(Exception):
    """Base class of the publisher's errors."""


class PublisherLockedError(PublisherError):
    """Another live publisher holds the prefix."""

    def __init__(self, prefix: str, holder_pid: int | None) -> None:
        who = f"pid {holder_pid}" if holder_pid else "an unknown process"
        super().__init__(
            f"shm prefix {prefix!r} is already published by {who} "
            f"(flock held on {L.control_name(prefix)}); refusing to start a second publisher"
        )
        self.prefix = prefix
        self.holder_pid = holder_pid


class PublishError(PublisherError):
    """A generation could not be published; the current generation is unchanged."""


class _Retired(NamedTuple):
    generation: int
    retired_at: float  # clock() seconds when it stopped being current


def _resolve_gid(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {group!r} for shm segments") from None


def _unlink(name: str) -> bool:
    """Unlink one segment; ``False`` if it was already gone."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True


def _pwrite_all(fd: int, data: memoryview) -> None:
    offset = 0
    while offset < len(data):
        written = os.pwrite(fd, data[offset:], offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwrite made no progress")
        offset += written


class Publisher:
    """Single writer of one shm prefix. Runs in the daemon process only; not thread-safe."""

    _ctl_fd: int = -1  # half-built objects are safe to close()
    _ctl: mmap.mmap | None = None

    def __init__(
        self,
        prefix: str,
        *,
        mode: int = DEFAULT_MODE,
        group: str | int | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        clock: Callable[[], float] = time.time,
        pid: int | None = None,
        shm_dir: str = L.SHM_DIR,
    ) -> None:
        """Open the prefix and take its single-instance lock.

        Raises :class:`PublisherLockedError` if another live publisher holds it. ``clock``
        (seconds since the epoch) and ``pid`` are injectable for tests.
        """
        self.prefix = L.validate_prefix(prefix)
        self.mode = mode
        self.grace_s = grace_s
        self._gid = _resolve_gid(group)
        self._clock = clock
        self._pid = os.getpid() if pid is None else pid
        self._shm_dir = shm_dir
        self._generation = 0
        self._floor = 0  # highest generation number known to be taken
        self._retired: list[_Retired] = []
        try:
            self._open_control()
            self._recover()
            self.heartbeat()
        except BaseException:
            self.close()
            raise
        log.info(
            "publisher started prefix=%s generation=%d pid=%d",
            prefix,
            self._generation,
            self._pid,
        )

    # -- public API ---------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """The last published generation (0 if this prefix never published)."""
        return self._generation

    @property
    def next_generation(self) -> int:
        """The number the next successful :meth:`publish` will return (to embed in the blob)."""
        return max(self._generation, self._floor) + 1

    def publish(self, blob: bytes | bytearray | memoryview) -> int:
        """Publish ``blob`` as the next generation and return its number.

        The blob is written completely into a new segment before the control block flips to
        it. Raises :class:`PublishError` (nothing left behind, current generation kept) when
        the segment cannot be created or filled, e.g. ``/dev/shm`` full. Also reclaims
        superseded generations whose grace period expired.
        """
        ctl = self._require_open()
        data = memoryview(blob).cast("B")
        if len(data) == 0:
            raise ValueError("cannot publish an empty blob")
        generation = self.next_generation
        crc = L.checksum(data)
        self._write_blob(generation, data)
        now = self._clock()
        record = L.SlotRecord(generation, len(data), int(now * 1e9), crc, self._pid)
        offset = L.slot_offset(generation)
        ctl[offset : offset + L.SLOT_SIZE] = L.encode_slot(record)
        # The flip: the last write of a publication (see shm_layout).
        ctl[L.OFF_ACTIVE : L.OFF_ACTIVE + L.ACTIVE_STRUCT.size] = L.encode_active(generation)
        previous, self._generation = self._generation, generation
        self._floor = generation
        if previous:
            self._retired.append(_Retired(previous, now))
        self._write_heartbeat(now)
        log.info("published prefix=%s generation=%d size=%d", self.prefix, generation, len(data))
        self.reclaim()
        return generation

    def heartbeat(self) -> None:
        """Stamp the control block with the clock and this pid (call every second or so)."""
        self._require_open()
        self._write_heartbeat(self._clock())

    def reclaim(self) -> list[str]:
        """Unlink superseded generations older than the grace period; return their names.

        The current generation and the one just before it are always kept. A worker that
        still maps an unlinked generation keeps reading it: the kernel frees the memory only
        when the last mapping goes.
        """
        self._require_open()
        deadline = self._clock() - self.grace_s
        keep_from = self._generation - 1
        removed: list[str] = []
        kept: list[_Retired] = []
        for item in self._retired:
            if item.generation < keep_from and item.retired_at <= deadline:
                name = L.blob_name(self.prefix, item.generation)
                if _unlink(name):
                    removed.append(name)
            else:
                kept.append(item)
        self._retired = kept
        if removed:
            log.debug("reclaimed prefix=%s segments=%s", self.prefix, ",".join(removed))
        return removed

    def close(self) -> None:
        """Release the lock and unmap; the control and current blob stay for the workers."""
        ctl, self._ctl = self._ctl, None
        if ctl is not None:
            ctl.close()
        fd, self._ctl_fd = self._ctl_fd, -1
        if fd >= 0:
            os.close(fd)  # drops the flock

    def cleanup(self) -> None:
        """Unlink every segment of this prefix (blobs and control), then close.

        Workers are told first (the active word becomes ``RETIRED``) so they drop the map at
        once instead of on their next periodic re-check.
        """
        ctl = self._require_open()
        ctl[L.OFF_ACTIVE : L.OFF_ACTIVE + L.ACTIVE_STRUCT.size] = L.encode_active(L.RETIRED)
        generations = {self._generation, *(r.generation for r in self._retired)}
        generations.update(self._scan_blobs())
        for generation in sorted(generations - {0}):
            _unlink(L.blob_name(self.prefix, generation))
        _unlink(L.control_name(self.prefix))
        log.info("cleaned up prefix=%s", self.prefix)
        self._retired = []
        self.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _require_open(self) -> mmap.mmap:
        if self._ctl is None:
            raise PublisherError(f"publisher for shm prefix {self.prefix!r} is closed")
        return self._ctl

    def _restrict(self, fd: int) -> None:
        """Apply mode and group exactly: shm_open's mode is filtered by the umask."""
        os.fchmod(fd, self.mode)
        if self._gid is not None:
            os.fchown(fd, -1, self._gid)

    def _open_control(self) -> None:
        name = L.control_name(self.prefix)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREAT, mode=self.mode)
        except (posix_ipc.Error, OSError) as exc:
            raise PublisherError(f"cannot open control segment {name}: {exc}") from exc
        self._ctl_fd = os.dup(shm.fd)
        shm.close_fd()
        try:
            fcntl.flock(self._ctl_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder_pid()
            raise PublisherLockedError(self.prefix, holder) from None
        try:
            self._restrict(self._ctl_fd)
        except OSError as exc:
            raise PublisherError(
                f"cannot set mode {self.mode:#o} / gid {self._gid} on {name}: {exc}"
            ) from exc
        try:
            L.check_header(os.pread(self._ctl_fd, L.CTL_SIZE, 0))
        except L.LayoutError as exc:
            if os.fstat(self._ctl_fd).st_size:
                log.warning("reinitialising control prefix=%s reason=%s", self.prefix, exc)
            # Overwrite in place, never truncate: a truncated file that a worker still maps
            # would SIGBUS it. One pwrite also allocates the page now (no SIGBUS later).
            os.pwrite(self._ctl_fd, L.encode_header(), 0)
        self._ctl = mmap.mmap(self._ctl_fd, L.CTL_SIZE)

    def _holder_pid(self) -> int | None:
        """The pid in the holder's heartbeat (it writes one right after taking the lock)."""
        try:
            raw = os.pread(self._ctl_fd, L.HEARTBEAT_STRUCT.size, L.OFF_HEARTBEAT)
        except OSError:
            return None
        if len(raw) != L.HEARTBEAT_STRUCT.size:
            return None
        beat = L.decode_heartbeat(raw)
        return beat.pid if beat else None

    def _recover(self) -> None:
        """Continue the sequence; forget half-made blobs; schedule stale ones for reclaim."""
        ctl = self._require_open()
        active = L.read_active(ctl)
        record = None
        if active not in (L.NONE_PUBLISHED, L.RETIRED):
            offset = L.slot_offset(active)
            record = L.decode_slot(bytes(ctl[offset : offset + L.SLOT_SIZE]))
        if record is not None and record.generation == active:
            self._generation = active
        elif active != L.NONE_PUBLISHED:
            log.warning("control has no valid active slot prefix=%s word=%d", self.prefix, active)
            ctl[L.OFF_ACTIVE : L.OFF_ACTIVE + 8] = L.encode_active(L.NONE_PUBLISHED)
        now = self._clock()
        for generation in self._scan_blobs():
            if not self._generation:
                # No usable control: numbers still on disk stay used (the sequence never
                # goes back, so a worker never mistakes a new map for one it verified).
                self._floor = max(self._floor, generation)
            if generation > self._generation:
                # Never flipped to (a crash mid-publish): no reader will attach it.
                _unlink(L.blob_name(self.prefix, generation))
                log.info(
                    "removed unpublished segment prefix=%s generation=%d", self.prefix, generation
                )
            elif generation < self._generation:
                self._retired.append(_Retired(generation, now))
        self._retired.sort()

    def _scan_blobs(self) -> list[int]:
        """Generations of this prefix present in ``shm_dir`` (empty if not listable)."""
        pattern = L.blob_pattern(self.prefix)
        try:
            names = os.listdir(self._shm_dir)
        except OSError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := pattern.fullmatch(n)))

    def _write_blob(self, generation: int, data: memoryview) -> None:
        name = L.blob_name(self.prefix, generation)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=self.mode)
        except posix_ipc.ExistentialError:
            # Only the lock holder creates blobs, so this one is a crashed run's leftover.
            _unlink(name)
            shm = self._create_exclusive(name)
        except (posix_ipc.Error, OSError) as exc:
            raise PublishError(f"cannot create shm segment {name}: {exc}") from exc
        try:
            self._restrict(shm.fd)
            os.posix_fallocate(shm.fd, 0, len(data))
            _pwrite_all(shm.fd, data)
        except BaseException as exc:
            _unlink(name)
            if isinstance(exc, OSError):
                raise PublishError(
                    f"cannot write {len(data)} bytes to shm segment {name}: "
                    f"{exc.strerror or exc} (errno {exc.errno}); "
                    f"generation {self._generation} stays current"
                ) from exc
            raise
        finally:
            shm.close_fd()

    def _create_exclusive(self, name: str) -> posix_ipc.SharedMemory:
        try:
            return posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=self.mode)
        except (posix_ipc.Error, OSError) as exc:
            raise PublishError(f"cannot create shm segment {name}: {exc}") from exc

    def _write_heartbeat(self, now: float) -> None:
        ctl = self._require_open()
        raw = L.encode_heartbeat(int(now * 1e9), self._pid)
        ctl[L.OFF_HEARTBEAT : L.OFF_HEARTBEAT + L.HEARTBEAT_STRUCT.size] = raw
