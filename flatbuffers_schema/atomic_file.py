"""How every process of the project replaces a file that another process reads.

One writer, many readers: the bundle build (``trimmer-bundle build``), the root master's
address file, the reference leaf's port file and the test harness all publish files this
way, and the daemon's watcher relies on it (a rename is one ``IN_MOVED_TO``, never a half
file). Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

DEFAULT_MODE = 0o644  # a new file is read by another process, possibly as another user


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, mode: int | None = None,
                 durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically: readers see the old or the new file, whole.

    Writes a temp file in the same directory (``.<name>.*.tmp``), fsyncs it, renames it over
    ``path`` and fsyncs the directory (``durable=False`` skips both fsyncs: run-time files
    that need no crash safety). The temp file is removed on any failure. ``mode``
    defaults to the mode of the file being replaced, else 0644.
    """
    target = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(target)
    if mode is None:
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = DEFAULT_MODE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
