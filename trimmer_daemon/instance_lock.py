"""The daemon's single-instance lock: an ``flock`` on a file outside ``/dev/shm``.

Runs in the daemon (via :class:`trimmer_daemon.publisher.Publisher`). The lock file is
:func:`flatbuffers_schema.shm_layout.lock_file` (default ``/run/lock/feature-trimmer.<shm
name>.lock``); it holds the holder's pid, for the message a second daemon prints. The kernel
drops the lock with the holder's last fd -- ``kill -9`` included -- so a crashed daemon never
blocks its successor. The lock belongs to the open file description: a child made by a bare
``fork()`` (no exec) shares it; fork+exec does not (the fd is close-on-exec).

Removing a held lock file (``remove()``, for ``--cleanup``) is safe: whoever opened the old
inode and then got its lock sees, by comparing inodes, that the path now names another file
and starts over (bounded attempts).
"""

from __future__ import annotations

import fcntl
import os

from flatbuffers_schema import shm_layout as L

LOCK_FILE_MODE = 0o644
"""Anyone may read the holder's pid from the lock file; only the daemon's user writes it."""
_ATTEMPTS = 3
"""Bounded retries when a predecessor's ``remove()`` unlinks the lock file under us."""
_PID_BYTES = 32


class LockHeld(Exception):
    """Another live process holds the lock."""

    def __init__(self, path: str, holder_pid: int | None) -> None:
        super().__init__(path, holder_pid)
        self.path, self.holder_pid = path, holder_pid


class LockUnusable(Exception):
    """The lock file cannot be opened or keeps being replaced; the message says why."""


class InstanceLock:
    """An exclusive, non-blocking ``flock`` on one prefix's lock file. Not thread-safe."""

    _fd: int = -1  # half-built objects are safe to release()

    def __init__(self, prefix: str, lock_dir: str = L.LOCK_DIR) -> None:
        self.path = L.lock_file(L.validate_prefix(prefix), lock_dir)

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self, pid: int) -> None:
        """Take the lock and write ``pid`` into the file, or raise :class:`LockHeld` /
        :class:`LockUnusable`."""
        for _ in range(_ATTEMPTS):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise LockHeld(self.path, holder) from None
            if _same_file(fd, self.path):
                self._fd = fd
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{pid}\n".encode(), 0)
                return
            os.close(fd)  # the predecessor's remove() unlinked it between open and flock
        raise LockUnusable(f"lock file {self.path} keeps being replaced; is another daemon "
                           "starting and cleaning up in a loop?")

    def release(self) -> None:
        """Drop the lock (idempotent); the file stays."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def remove(self) -> None:
        """Unlink the lock file while still holding it (``--cleanup``)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                           LOCK_FILE_MODE)
        except OSError as exc:
            raise LockUnusable(
                f"cannot open lock file {self.path}: {exc.strerror or exc} (set lock_dir to a "
                "writable directory that nobody cleans while the daemon runs)") from None


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, _PID_BYTES, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
