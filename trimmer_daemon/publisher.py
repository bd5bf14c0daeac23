"""Publish one immutable blob per generation in POSIX shared memory (daemon side).

Runs in the trimmer daemon only: one ``Publisher`` per shm prefix per host, single-threaded.
The layout, the write order and the read protocol are documented in
:mod:`flatbuffers_schema.shm_layout`; this module is the only writer of it.

Lifecycle contract (after CPython's ``multiprocessing.shared_memory``):

* ``Publisher(prefix)`` first takes an exclusive ``flock`` on the prefix's **lock file**
  (:func:`flatbuffers_schema.shm_layout.lock_file`, under ``lock_dir``, default
  ``/run/lock``) and writes its pid into it. The lock does not live in ``/dev/shm``, so an
  operator cleaning ``/dev/shm`` cannot free it while a daemon runs; the kernel drops it
  with the holder's last fd -- including on ``kill -9`` -- so a crashed daemon never blocks
  its successor, while a live one makes a second daemon fail with
  :class:`PublisherLockedError` naming the holder's pid. The lock belongs to the open file
  description: a child made by a bare ``fork()`` (no exec) shares it and keeps it held after
  the daemon dies -- fork+exec is safe (the fd is close-on-exec).
* It then opens (creating if needed) the control segment and also ``flock``-s it, for
  ``trimmer-inspect`` (which reports that lock from ``/proc/locks``). The generation
  sequence continues from the control segment; segments a crashed predecessor left
  half-made are removed, and generations older than the current one are reclaimed once the
  grace period has passed since the current one was published (not since this start: a
  daemon restarted in a loop still reclaims). If the control segment cannot be created
  (e.g. ``/dev/shm`` full) the publisher still starts; :meth:`publish` retries it.
* **Self-healing control**: :meth:`heartbeat` checks (``fstat`` link count, inode of the
  name) that the control segment is still the one at ``/dev/shm/<prefix>.ctl``; one that was
  removed or replaced is re-created with the current generation, so workers (which re-check
  the control's inode every second) find the map again. :meth:`blob_missing` says when the
  current generation's own segment was removed too (the daemon then publishes a new one).
* ``publish(blob)`` first reclaims superseded generations, before their grace period if
  needed, so that at most ``max_segments`` generation segments holding at most
  ``max_bytes_factor`` x the larger of the current and the new blob exist at any time (and,
  once the new one is current, at most that factor x the new current blob); then
  writes ``.g<N>`` completely through the fd (``pwrite``, never through a mapping, so a full
  ``/dev/shm`` is an ``OSError``, not a ``SIGBUS``), then flips the control block; on
  failure it removes the half-made segment and raises :class:`PublishError`.
* **Spare segment**: :meth:`prepare_spare` (the daemon calls it when its loop is idle)
  creates the *next* generation's segment ahead of time, sized like the current blob and
  filled with a copy of it (from this process's memory, never from the segment), so the
  next publication allocates nothing and, when the new blob has the same size, rewrites
  only the parts that changed: a ``bytes`` part given at the same offset as in the current
  blob is the same object, so the same bytes, already there (the assembler pads the head to
  the spare's size for that, see :mod:`trimmer_daemon.assemble`). It counts against both
  bounds (prepared only when it fits them), is never named by the control block before it
  is filled and flipped to (readers never see it), is trimmed or extended to the blob's
  exact size (then written whole), and is removed by ``close()``/``cleanup()``; a crashed
  daemon's spare is a generation above the current one, which a starting publisher removes
  like any unpublished segment. A spare that cannot be made (``/dev/shm`` full) is just no
  spare.
* ``close()`` releases the locks and leaves the control segment and the current blob for the
  workers (a daemon that exits or restarts must not take the map away); it removes the
  spare.
* ``cleanup()`` unlinks every segment of the prefix and the lock file. Only the owner
  unlinks; workers attach read-only and register nothing for cleanup (no
  ``resource_tracker``).
"""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import mmap
import os
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import posix_ipc

from flatbuffers_schema import shm_layout as L
from trimmer_daemon.instance_lock import InstanceLock, LockHeld, LockUnusable

log = logging.getLogger(__name__)

DEFAULT_MODE = 0o640
"""Owner read-write, group (the worker user's) read-only, others nothing."""
DEFAULT_GRACE_S = 10.0
"""How long a superseded generation stays linked so a slow worker can still attach it."""
DEFAULT_MAX_SEGMENTS = 8
"""Generation segments that may exist at once (current + new + superseded ones)."""
DEFAULT_MAX_BYTES_FACTOR = 4.0
"""Generation bytes that may exist at once, as a multiple of the larger of the current and
the new blob."""
_FATAL_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
"""Control-segment errors that retrying cannot fix: refuse to start."""

class PublisherError(Exception):
    """Base class of the publisher's errors."""


class PublisherLockedError(PublisherError):
    """Another live publisher holds the prefix."""

    def __init__(self, prefix: str, holder_pid: int | None, lock_path: str = "") -> None:
        who = f"pid {holder_pid}" if holder_pid else "an unknown process"
        where = lock_path or L.lock_file(prefix)
        super().__init__(
            f"shm prefix {prefix!r} is already published by {who} "
            f"(lock file {where} held); refusing to start a second publisher"
        )
        self.prefix = prefix
        self.holder_pid = holder_pid
        self.lock_path = where


class PublishError(PublisherError):
    """A generation could not be published; the current generation is unchanged."""


class _Retired(NamedTuple):
    generation: int
    retired_at: float  # clock() seconds when it stopped being current
    size: int


class _Spare(NamedTuple):
    """The next generation's segment, created and filled ahead of the publication."""

    generation: int
    fd: int
    size: int
    holds: tuple[tuple[int, bytes], ...]  # (offset, part) it already holds (immutable parts)


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


def _pwrite_all(fd: int, data: memoryview, offset: int = 0) -> None:
    done = 0
    while done < len(data):
        written = os.pwrite(fd, data[done:], offset + done)
        if written <= 0:
            raise OSError(errno.EIO, "pwrite made no progress")
        done += written


class Publisher:
    """Single writer of one shm prefix. Runs in the daemon process only; not thread-safe."""

    _lock: InstanceLock | None = None  # half-built objects are safe to close()
    _ctl_fd: int = -1
    _ctl: mmap.mmap | None = None
    _spare: _Spare | None = None
    _spare_tried = 0  # the generation a spare was last attempted for (one try each)
    _written: tuple[tuple[int, bytes | memoryview], ...] = ()  # the current blob's parts

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
        lock_dir: str = L.LOCK_DIR,
        max_segments: int = DEFAULT_MAX_SEGMENTS,
        max_bytes_factor: float = DEFAULT_MAX_BYTES_FACTOR,
    ) -> None:
        """Take the prefix's single-instance lock and open its control segment.

        Raises :class:`PublisherLockedError` if another live publisher holds it, and
        :class:`PublisherError` if the lock file or the control segment cannot be used at
        all (permissions). ``clock`` (seconds since the epoch) and ``pid`` are injectable
        for tests.
        """
        self.prefix = L.validate_prefix(prefix)
        if max_segments < 2 or max_bytes_factor < 2:
            raise ValueError("need max_segments >= 2 and max_bytes_factor >= 2 (the current "
                             "and the new generation exist together during a publication)")
        self.mode = mode
        self.grace_s = grace_s
        self.max_segments = max_segments
        self.max_bytes_factor = max_bytes_factor
        self._lock = InstanceLock(self.prefix, lock_dir)
        self.lock_path = self._lock.path
        self._gid = _resolve_gid(group)
        self._clock = clock
        self._pid = os.getpid() if pid is None else pid
        self._shm_dir = shm_dir
        self._generation = 0
        self._record: L.SlotRecord | None = None  # the current generation's slot
        self._floor = 0  # highest generation number known to be taken
        self._retired: list[_Retired] = []
        self._ctl_id: tuple[int, int] = (0, 0)
        self._ctl_problem = ""  # why the control segment is unavailable ("" = fine)
        self.control_recreations = 0
        self.forced_reclaims = 0
        self._started = False
        try:
            self._take_lock()
            self._start_control()
            self._started = True
            self._recover()
            self.heartbeat()
        except BaseException:
            self.close()
            raise
        log.info("publisher started prefix=%s generation=%d pid=%d lock=%s", prefix,
                 self._generation, self._pid, self.lock_path)

    # -- public API ---------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """The last published generation (0 if this prefix never published)."""
        return self._generation

    @property
    def next_generation(self) -> int:
        """The number the next successful :meth:`publish` will return (to embed in the blob)."""
        return max(self._generation, self._floor) + 1

    @property
    def control_problem(self) -> str:
        """Why the control segment is unavailable right now ("" when it is fine)."""
        return self._ctl_problem

    def live_segments(self) -> list[tuple[int, int]]:
        """``(generation, size)`` of every generation segment this publisher keeps (the
        spare included)."""
        live = [(r.generation, r.size) for r in self._retired]
        if self._record is not None:
            live.append((self._record.generation, self._record.blob_size))
        if self._spare is not None:
            live.append((self._spare.generation, self._spare.size))
        return live

    @property
    def spare_size(self) -> int:
        """Size of the prepared spare segment (0: none): a blob of exactly this size is
        published by rewriting only its changed parts."""
        return self._spare.size if self._spare is not None else 0

    @property
    def wants_spare(self) -> bool:
        """Whether :meth:`prepare_spare` has something to try (cheap; call it often)."""
        return (self._spare is None and self._record is not None
                and self._spare_tried != self.next_generation)

    def prepare_spare(self) -> bool:
        """Create the next generation's segment now, sized like the current blob and holding
        a copy of it, so the next publication allocates nothing and rewrites only what
        changed (call when idle: ~0.7 ms a MB).

        Only when it fits the bounds without reclaiming anything (a publication leaves
        room for one more blob of its size); tried once per generation. Any failure
        (``/dev/shm`` full) leaves no spare and nothing behind, and is not an error.
        """
        self._require_open()
        if not self.wants_spare:
            return False
        assert self._record is not None
        generation, size = self.next_generation, self._record.blob_size
        self._spare_tried = generation
        written, self._written = self._written, ()  # not held past this (callers' buffers)
        if not self._room_for(size):
            return False
        name = L.blob_name(self.prefix, generation)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=self.mode)
        except (posix_ipc.Error, OSError) as exc:
            log.debug("no spare segment prefix=%s name=%s error=%s", self.prefix, name, exc)
            return False
        fd = os.dup(shm.fd)
        shm.close_fd()
        try:
            self._restrict(fd)
            holds = self._fill_spare(fd, size, written)
        except OSError as exc:
            os.close(fd)
            _unlink(name)
            log.debug("no spare segment prefix=%s name=%s error=%s", self.prefix, name, exc)
            return False
        self._spare = _Spare(generation, fd, size, holds)
        return True

    @staticmethod
    def _fill_spare(fd: int, size: int, written: tuple[tuple[int, bytes | memoryview], ...]
                    ) -> tuple[tuple[int, bytes], ...]:
        """Copy the current blob's parts into a new spare (every page allocated, as by
        ``posix_fallocate`` when they are not at hand); returns its immutable parts."""
        if not written or written[-1][0] + len(written[-1][1]) != size:
            os.posix_fallocate(fd, 0, size)
            return ()
        for offset, part in written:
            _pwrite_all(fd, memoryview(part).cast("B"), offset)
        return tuple((o, p) for o, p in written if isinstance(p, bytes))

    def publish(self, blob: bytes | bytearray | memoryview) -> int:
        """Publish ``blob`` as the next generation and return its number.

        The blob is written completely into a new segment before the control block flips to
        it. Raises :class:`PublishError` (nothing left behind, current generation kept) when
        the segment cannot be created or filled, e.g. ``/dev/shm`` full. Also reclaims
        superseded generations whose grace period expired, and older ones when the bounds
        (``max_segments``, ``max_bytes_factor``) require it.
        """
        data = memoryview(blob).cast("B")
        return self.publish_parts([data], L.checksum(data))

    def publish_parts(self, parts: Sequence[bytes | memoryview], crc: int | None = None) -> int:
        """Like :meth:`publish` for a blob given as consecutive ``parts`` (never joined in
        memory) whose concatenation has crc32 ``crc`` (computed here when ``None``)."""
        self._require_open()
        views = [memoryview(p).cast("B") for p in parts]
        offsets = [0]
        for view in views:
            offsets.append(offsets[-1] + len(view))
        size = offsets.pop()
        if crc is None:
            crc = 0
            for view in views:
                crc = L.checksum_continue(view, crc)
        if size == 0:
            raise ValueError("cannot publish an empty blob")
        ctl = self._ensure_control()
        generation = self.next_generation
        self._make_room(size)
        self._write_blob(generation, list(zip(offsets, parts, views, strict=True)), size)
        now = self._clock()
        record = L.SlotRecord(generation, size, int(now * 1e9), crc, self._pid)
        self._flip(ctl, record)
        previous = self._record
        self._generation, self._record, self._floor = generation, record, generation
        self._written = tuple(zip(offsets, parts, strict=True))  # for the next spare
        if previous is not None:
            self._retired.append(_Retired(previous.generation, now, previous.blob_size))
        # The bounds hold relative to the new current blob too; and make room for a next
        # blob of the same size now, after the flip, so the next publication rarely has to
        # unlink (~2 ms for a 5 MB segment) before its own flip.
        self._make_room(size)
        self._write_heartbeat(now)
        log.info("published prefix=%s generation=%d size=%d", self.prefix, generation, size)
        self.reclaim()
        return generation

    def heartbeat(self) -> bool:
        """Stamp the control block with the clock and this pid (call every second or so).

        Re-creates a control segment that was removed or replaced. Returns ``False`` (and
        logs once) when the control segment cannot be written right now.
        """
        self._require_open()
        if self._ctl is not None and self._control_lost():
            log.error("control segment %s was removed or replaced; re-creating it with "
                      "generation %d", L.control_name(self.prefix), self._generation)
            self._drop_control()
            self.control_recreations += 1
        try:
            self._ensure_control()
        except PublishError:
            return False
        self._write_heartbeat(self._clock())
        return True

    def blob_missing(self) -> bool:
        """Whether the current generation's segment is gone (removed by hand): the caller
        should publish a new generation."""
        if not self._generation:
            return False
        name = L.blob_name(self.prefix, self._generation).lstrip("/")
        return not os.path.exists(os.path.join(self._shm_dir, name))

    def reclaim(self, *, keep_previous: bool = True) -> list[str]:
        """Unlink superseded generations older than the grace period; return their names.

        The current generation and (``keep_previous``) the one just before it are kept,
        unless the bounds force them out at the next publication. A worker that still maps
        an unlinked generation keeps reading it: the kernel frees the memory only when the
        last mapping goes.
        """
        self._require_open()
        deadline = self._clock() - self.grace_s
        keep_from = self._generation - 1 if keep_previous else self._generation
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
        """Release the locks and unmap; the control and current blob stay for the workers
        (the spare goes)."""
        self._drop_spare(unlink=True)
        self._drop_control()
        if self._lock is not None:
            self._lock.release()

    def cleanup(self) -> None:
        """Unlink every segment of this prefix (blobs and control) and the lock file, then
        close.

        Workers are told first (the active word becomes ``RETIRED``) so they drop the map at
        once instead of on their next periodic re-check.
        """
        self._require_open()
        if self._ctl is not None:
            self._ctl[L.OFF_ACTIVE : L.OFF_ACTIVE + L.ACTIVE_STRUCT.size] = \
                L.encode_active(L.RETIRED)
        self._drop_spare(unlink=True)
        generations = {self._generation, *(r.generation for r in self._retired)}
        generations.update(self._scan_blobs())
        for generation in sorted(generations - {0}):
            _unlink(L.blob_name(self.prefix, generation))
        _unlink(L.control_name(self.prefix))
        if self._lock is not None:
            self._lock.remove()  # still held: a starting successor re-checks the inode
        log.info("cleaned up prefix=%s", self.prefix)
        self._retired = []
        self.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the lock -----------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._lock is None or not self._lock.held:
            raise PublisherError(f"publisher for shm prefix {self.prefix!r} is closed")

    def _take_lock(self) -> None:
        assert self._lock is not None
        try:
            self._lock.acquire(self._pid)
        except LockHeld as exc:
            raise PublisherLockedError(self.prefix, exc.holder_pid, exc.path) from None
        except LockUnusable as exc:
            raise PublisherError(str(exc)) from None

    # -- the control segment ------------------------------------------------------------

    def _restrict(self, fd: int) -> None:
        """Apply mode and group exactly: shm_open's mode is filtered by the umask."""
        os.fchmod(fd, self.mode)
        if self._gid is not None:
            os.fchown(fd, -1, self._gid)

    def _start_control(self) -> None:
        """Open the control at start; only errors retrying cannot fix are raised."""
        try:
            self._ensure_control()
        except PublishError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno in _FATAL_ERRNOS:
                raise PublisherError(str(exc)) from cause

    def _ensure_control(self) -> mmap.mmap:
        """The control mapping, (re-)creating the segment if needed; PublishError if not."""
        if self._ctl is not None:
            return self._ctl
        name = L.control_name(self.prefix)
        try:
            self._open_control(name)
        except PublisherLockedError as exc:
            if not self._started:
                raise  # at start: refuse to run beside whoever locks the control segment
            raise self._control_failed(f"cannot re-create control segment {name}: {exc}") \
                from exc
        except (posix_ipc.Error, OSError) as exc:
            raise self._control_failed(f"cannot open control segment {name}: {exc}") from exc
        if self._ctl_problem:
            log.info("control segment %s available again", name)
        self._ctl_problem = ""
        assert self._ctl is not None
        return self._ctl

    def _control_failed(self, problem: str) -> PublishError:
        """Forget the half-opened control, log the problem once, return the error."""
        self._drop_control()
        if problem != self._ctl_problem:
            log.error("%s; retrying", problem)
        self._ctl_problem = problem
        return PublishError(problem)

    def _open_control(self, name: str) -> None:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREAT, mode=self.mode)
        self._ctl_fd = os.dup(shm.fd)
        shm.close_fd()
        try:
            fcntl.flock(self._ctl_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Our lock file is held, so this is a bare-forked child of a dead daemon or an
            # older daemon build that locks only the control segment.
            holder = self._holder_pid()
            raise PublisherLockedError(self.prefix, holder, f"{L.SHM_DIR}{name}") from None
        self._restrict(self._ctl_fd)
        try:
            L.check_header(os.pread(self._ctl_fd, L.CTL_SIZE, 0))
        except L.LayoutError as exc:
            if os.fstat(self._ctl_fd).st_size:
                log.warning("reinitialising control prefix=%s reason=%s", self.prefix, exc)
            # Overwrite in place, never truncate: a truncated file that a worker still maps
            # would SIGBUS it. Writing every byte also allocates the page now (no SIGBUS
            # later, and a full /dev/shm is an error here, not in a worker).
            _pwrite_all(self._ctl_fd, memoryview(L.encode_header()))
        st = os.fstat(self._ctl_fd)
        self._ctl = mmap.mmap(self._ctl_fd, L.CTL_SIZE)
        self._ctl_id = (st.st_dev, st.st_ino)
        if self._record is not None and L.read_active(self._ctl) != self._record.generation:
            self._flip(self._ctl, self._record)  # a re-created control: restore the map

    def _control_lost(self) -> bool:
        """Was our control segment unlinked, or does its name now lead to another file?"""
        try:
            if os.fstat(self._ctl_fd).st_nlink == 0:
                return True
            st = os.stat(os.path.join(self._shm_dir, L.control_name(self.prefix).lstrip("/")))
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._ctl_id

    def _drop_control(self) -> None:
        ctl, self._ctl = self._ctl, None
        if ctl is not None:
            ctl.close()
        fd, self._ctl_fd = self._ctl_fd, -1
        if fd >= 0:
            os.close(fd)

    def _flip(self, ctl: mmap.mmap, record: L.SlotRecord) -> None:
        offset = L.slot_offset(record.generation)
        ctl[offset : offset + L.SLOT_SIZE] = L.encode_slot(record)
        # The flip: the last write of a publication (see shm_layout).
        ctl[L.OFF_ACTIVE : L.OFF_ACTIVE + L.ACTIVE_STRUCT.size] = \
            L.encode_active(record.generation)

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

    # -- recovery and reclaim -----------------------------------------------------------

    def _recover(self) -> None:
        """Continue the sequence; forget half-made blobs; schedule stale ones for reclaim."""
        ctl = self._ctl
        active = L.read_active(ctl) if ctl is not None else L.NONE_PUBLISHED
        record = None
        if active not in (L.NONE_PUBLISHED, L.RETIRED):
            assert ctl is not None
            offset = L.slot_offset(active)
            record = L.decode_slot(bytes(ctl[offset : offset + L.SLOT_SIZE]))
        if record is not None and record.generation == active:
            self._generation, self._record = active, record
        elif active != L.NONE_PUBLISHED:
            assert ctl is not None
            log.warning("control has no valid active slot prefix=%s word=%d", self.prefix, active)
            ctl[L.OFF_ACTIVE : L.OFF_ACTIVE + 8] = L.encode_active(L.NONE_PUBLISHED)
        # Older generations were superseded when the current one was published: their grace
        # runs from then, so a daemon restarted faster than the grace still reclaims them.
        retired_at = record.published_at_ns / 1e9 if record is not None else self._clock()
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
                self._retired.append(_Retired(generation, retired_at, self._blob_size(generation)))
        self._retired.sort()
        self.reclaim(keep_previous=False)  # a predecessor's: no reader needs them after grace

    def _blob_size(self, generation: int) -> int:
        name = L.blob_name(self.prefix, generation).lstrip("/")
        try:
            return os.stat(os.path.join(self._shm_dir, name)).st_size
        except OSError:
            return 0

    def _room_for(self, size: int) -> bool:
        """Would the kept segments plus a new one of ``size`` bytes fit the bounds: segments
        (the superseded ones, the current one and the new one) <= max_segments, bytes <=
        max_bytes_factor x the larger of the current and the new blob? Asked only while a
        generation is current (there are superseded ones, or a spare is wanted)."""
        assert self._record is not None
        current = self._record.blob_size
        live = current + sum(r.size for r in self._retired)
        return (len(self._retired) + 2 <= self.max_segments
                and live + size <= self.max_bytes_factor * max(size, current))

    def _drop_spare(self, *, unlink: bool) -> _Spare | None:
        """Forget the spare (closing its fd unless it is returned, unlinking it if asked)."""
        spare, self._spare = self._spare, None
        if spare is not None and unlink:
            os.close(spare.fd)
            _unlink(L.blob_name(self.prefix, spare.generation))
            return None
        return spare

    def _make_room(self, size: int) -> None:
        """Unlink the oldest superseded generations until a new blob of ``size`` bytes fits
        the bounds: segments <= max_segments, bytes <= max_bytes_factor x the larger of the
        current and the new blob."""
        while self._retired and not self._room_for(size):
            oldest = self._retired.pop(0)
            _unlink(L.blob_name(self.prefix, oldest.generation))
            self.forced_reclaims += 1
            log.debug("reclaimed early prefix=%s generation=%d (bounds: %d segments, "
                      "%g x the blob)", self.prefix, oldest.generation, self.max_segments,
                      self.max_bytes_factor)

    def _scan_blobs(self) -> list[int]:
        """Generations of this prefix present in ``shm_dir`` (empty if not listable)."""
        pattern = L.blob_pattern(self.prefix)
        try:
            names = os.listdir(self._shm_dir)
        except OSError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := pattern.fullmatch(n)))

    # -- blobs --------------------------------------------------------------------------

    def _write_blob(self, generation: int,
                    parts: list[tuple[int, bytes | memoryview, memoryview]], size: int) -> None:
        """Write ``(offset, part, its bytes)`` into the new segment (the spare if any)."""
        name = L.blob_name(self.prefix, generation)
        spare = self._drop_spare(unlink=False)
        if spare is not None and (spare.generation != generation
                                  or os.fstat(spare.fd).st_nlink == 0):  # removed by hand
            os.close(spare.fd)
            _unlink(L.blob_name(self.prefix, spare.generation))
            spare = None
        fd = spare.fd if spare is not None else self._create_blob(name)
        held: dict[int, bytes] = dict(spare.holds) if spare and spare.size == size else {}
        try:
            if spare is not None and spare.size > size:
                os.ftruncate(fd, size)  # never mapped by anyone yet: safe to shrink
            # No posix_fallocate on this path: writing every byte through the fd already
            # allocates every page (a full /dev/shm is an OSError here, never a SIGBUS in a
            # worker); a spare was filled ahead, off the publication's path. A blob larger
            # than the spare extends it as it is written.
            for offset, part, view in parts:
                if held.get(offset) is not part:  # the same bytes object: already there
                    _pwrite_all(fd, view, offset)
        except BaseException as exc:
            _unlink(name)
            if isinstance(exc, OSError):
                raise PublishError(
                    f"cannot write {size} bytes to shm segment {name}: "
                    f"{exc.strerror or exc} (errno {exc.errno}); "
                    f"generation {self._generation} stays current"
                ) from exc
            raise
        finally:
            os.close(fd)

    def _create_blob(self, name: str) -> int:
        """A new segment's fd (mode and group applied); PublishError if it cannot be made."""
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=self.mode)
        except posix_ipc.ExistentialError:
            # Only the lock holder creates blobs, so this one is a crashed run's leftover.
            _unlink(name)
            shm = self._create_exclusive(name)
        except (posix_ipc.Error, OSError) as exc:
            raise PublishError(f"cannot create shm segment {name}: {exc}") from exc
        fd = os.dup(shm.fd)
        shm.close_fd()
        try:
            self._restrict(fd)
        except OSError as exc:
            os.close(fd)
            _unlink(name)
            raise PublishError(f"cannot set the mode of shm segment {name}: {exc}") from exc
        return fd

    def _create_exclusive(self, name: str) -> posix_ipc.SharedMemory:
        try:
            return posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=self.mode)
        except (posix_ipc.Error, OSError) as exc:
            raise PublishError(f"cannot create shm segment {name}: {exc}") from exc

    def _write_heartbeat(self, now: float) -> None:
        ctl = self._ctl
        if ctl is None:
            return
        raw = L.encode_heartbeat(int(now * 1e9), self._pid)
        ctl[L.OFF_HEARTBEAT : L.OFF_HEARTBEAT + L.HEARTBEAT_STRUCT.size] = raw
