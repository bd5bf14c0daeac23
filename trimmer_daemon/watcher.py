"""Inotify watcher of bundle files, for the trimmer daemon's main loop.

Process/thread: a :class:`BundleWatcher` lives in the daemon process and every method runs
in the daemon's main thread (the one that also handles signals). It is not thread-safe and
starts no threads. It opens exactly one file descriptor (the inotify instance), created with
``O_CLOEXEC`` so it does not leak into children, and released by :meth:`BundleWatcher.close`.

What is watched
---------------
Files are never watched directly: every real way of replacing a file (``mv``, ``rsync``,
``sed -i``, editors, Kubernetes ConfigMap ``..data`` swaps) gives the path a new inode, and a
watch on the old inode would go quiet. Instead each bundle gets a set of *anchors*,
``(directory, entry name)`` pairs; the watcher holds one inotify watch per distinct
directory and an event is relevant to a bundle when it names one of the bundle's anchors:

1. ``(dir, basename)`` of the bundle path, and ``(dir, "..data")`` -- the ConfigMap symlink
   that kubelet's AtomicWriter replaces atomically (``..data_tmp`` renamed over ``..data``).
2. ``(parent, dirname)``: the bundle directory's own entry in its parent, so a directory
   that is removed, renamed away, replaced or recreated is noticed. When the bundle
   directory does not exist, the anchor is instead the next missing path component in its
   nearest existing ancestor, so ``mkdir -p`` of the tree is noticed at once.
3. When the bundle path is a symlink: every hop of the symlink chain and the final resolved
   target, so an in-place edit of the target in another directory is noticed too.

Any *structural* event on an anchor (create, delete, rename, attribute change, the watched
directory itself vanishing) re-resolves that bundle's anchors, and watches are added or
removed to match (e.g. the timestamped ConfigMap directory changes on every swap).
Directory-level symlink swaps further up the tree, and anything the kernel did not report,
are covered by the periodic rescan (every ``rescan_interval_s``) and by the rescan after an
inotify queue overflow; both re-resolve everything, refresh every watch and report every
bundle.

Reports are hints: :meth:`BundleWatcher.poll` returns the names of bundles that *may* have
changed; the caller re-reads and hashes the file to skip unchanged content.

Writers that still hold the file
--------------------------------
An in-place writer that does not truncate (``open("r+b")``, ``rsync --inplace``) leaves a
file that is valid JSON at every chunk boundary, half old and half new. So the watcher
tracks, per bundle, whether an ``IN_MODIFY`` on one of its anchors has not been followed by
an ``IN_CLOSE_WRITE`` (or by a structural event: a new inode replaced the held one):
:meth:`BundleWatcher.held_since` is then the monotonic time of the first such modification,
and :meth:`BundleWatcher.modifications` counts them, so the daemon can tell, after reading
the file and calling :meth:`BundleWatcher.sync`, whether a writer touched it meanwhile. The
daemon publishes no content of a held file (it still reports a held file that fails
validation, as for truncating writers). ``cp``, shell redirection and ``open("w")`` close
within the debounce window and so are never seen held; renames never modify in place.

Debounce
--------
After the first relevant event, :meth:`BundleWatcher.poll` keeps draining events until no
new relevant event arrives for ``debounce_s`` or ``max_delay_s`` has passed since the first
one, so a burst (an rsync, an editor save, a ConfigMap swap) becomes one report. Both are
small because the daemon's reload-latency budget (rename -> readers on the new generation)
is a median of 20 ms and a p99 of 50 ms. Waits use real time (``time.monotonic``); the
injectable ``clock`` drives only the rescan schedule.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from inotify_simple import INotify
from inotify_simple import flags as _f

log = logging.getLogger(__name__)

#: The events each directory watch asks for, and why:
WATCH_MASK = (
    _f.CLOSE_WRITE  # an in-place write finished (cp, open(..., "w"), shell redirection)
    | _f.MODIFY  # writers that never close, truncate(2) by path; coalesced by the kernel
    | _f.MOVED_TO  # renamed into place: mv, rsync, sed -i, the ConfigMap ..data swap
    | _f.MOVED_FROM  # renamed away: editor backups, a bundle directory moved away
    | _f.CREATE  # delete-and-recreate, editors writing a new file, mkdir of a missing dir
    | _f.DELETE  # file or directory removed: the bundle becomes missing
    | _f.ATTRIB  # chmod/chown can make a file (un)readable; `touch` forces a reload
    | _f.DELETE_SELF  # the watched directory itself was removed: re-anchor
    | _f.MOVE_SELF  # the watched directory was renamed: the watch follows the inode, drop it
    | _f.ONLYDIR  # never watch a file by accident if a race swapped the dir for a file
    | _f.EXCL_UNLINK  # no events from already-unlinked entries (e.g. old copy still open)
)
# Deliberately NOT watched: IN_OPEN, IN_ACCESS, IN_CLOSE_NOWRITE -- the daemon itself reads
# every reported file, so reader events would feed back into endless reports.
# IN_Q_OVERFLOW, IN_IGNORED and IN_UNMOUNT are always delivered by the kernel.

#: Events after which the anchors of the bundle are re-resolved (the entry may now be a
#: different inode, symlink target or directory). Pure content events are not structural.
_STRUCTURAL = (
    _f.MOVED_TO | _f.MOVED_FROM | _f.CREATE | _f.DELETE | _f.ATTRIB
    | _f.DELETE_SELF | _f.MOVE_SELF | _f.IGNORED | _f.UNMOUNT
)
#: Structural events after which the path may name another inode than a held one (not
#: IN_ATTRIB: a chmod does not end an in-place write).
_REPLACED = _STRUCTURAL & ~_f.ATTRIB
#: Events saying a watch no longer describes the directory at its path.
_WATCH_GONE = _f.DELETE_SELF | _f.MOVE_SELF | _f.IGNORED | _f.UNMOUNT

#: The entry kubelet's AtomicWriter atomically replaces in a ConfigMap/Secret volume.
CONFIGMAP_DATA_LINK = "..data"
#: Same bound as the kernel's own symlink-following limit (MAXSYMLINKS).
MAX_SYMLINK_HOPS = 40
#: Bounded retries when a directory vanishes between resolving anchors and adding its watch.
_RESOLVE_PASSES = 3
#: add_watch errors that mean "the path is gone or not a directory": re-anchor upwards.
_GONE_ERRNOS = (errno.ENOENT, errno.ENOTDIR)
#: Longest single poll(2) wait; callers' longer waits loop (poll's timeout is a C int, ms).
_MAX_WAIT_MS = 3_600_000
#: select(2) cannot take fds at or above this (glibc's fixed fd_set size).
_FD_SETSIZE = 1024

Anchor = tuple[str, str]
_K = TypeVar("_K")


@dataclass
class WatcherStats:
    """Counters for metrics; monotonically increasing except ``watched_dirs``."""

    events: int = 0  #: raw inotify events read
    relevant_events: int = 0  #: events that named a bundle anchor
    overflows: int = 0  #: IN_Q_OVERFLOW seen (each one forces a full rescan)
    rescans: int = 0  #: periodic + overflow rescans
    reports: int = 0  #: non-empty poll() results
    watch_errors: int = 0  #: add_watch failures other than "path is gone"
    watched_dirs: int = 0  #: gauge: directories currently watched


def resolve_anchors(path: str) -> frozenset[Anchor]:
    """Return the ``(directory, entry name)`` pairs whose changes may change ``path``.

    ``path`` must be absolute and normalised. Directories are given as real paths, which
    is what the watch table is keyed by. Only the current file system state is consulted.
    """
    anchors = _directory_anchors(path)
    anchors.update(_symlink_anchors(path))
    return frozenset(anchors)


def _directory_anchors(path: str) -> set[Anchor]:
    bundle_dir, name = os.path.split(path)
    cur, child = bundle_dir, name
    while not os.path.isdir(cur):
        parent = os.path.dirname(cur)
        if parent == cur:  # nothing exists, not even "/"
            return set()
        cur, child = parent, os.path.basename(cur)
    if cur != bundle_dir:  # wait for the next missing component to appear
        return {(os.path.realpath(cur), child)}
    real_dir = os.path.realpath(bundle_dir)
    anchors = {(real_dir, name), (real_dir, CONFIGMAP_DATA_LINK)}
    parent = os.path.dirname(bundle_dir)
    if parent != bundle_dir:
        anchors.add((os.path.realpath(parent), os.path.basename(bundle_dir)))
    return anchors


def _symlink_anchors(path: str) -> set[Anchor]:
    anchors: set[Anchor] = set()
    hop = path
    for _ in range(MAX_SYMLINK_HOPS):
        try:
            target = os.readlink(hop)
        except OSError:  # not a symlink, or gone: the chain ends here
            break
        hop = os.path.normpath(os.path.join(os.path.dirname(hop), target))
        _add_existing(anchors, hop)
    real = os.path.realpath(path)
    if real != path:
        _add_existing(anchors, real)
    return anchors


def _add_existing(anchors: set[Anchor], path: str) -> None:
    parent = os.path.dirname(path)
    if os.path.isdir(parent):
        anchors.add((os.path.realpath(parent), os.path.basename(path)))


def _discard(table: dict[_K, set[str]], key: _K, name: str) -> None:
    members = table.get(key)
    if members is not None:
        members.discard(name)
        if not members:
            del table[key]


class BundleWatcher:
    """Watch bundle files (name -> path) and report which bundles may have changed.

    All methods run in the daemon's main thread. Typical loop::

        with BundleWatcher(bundles) as watcher:
            while running:
                wait = min(HEARTBEAT_S, watcher.seconds_until_rescan())
                select.select([watcher, signal_wakeup_fd], [], [], wait)
                handle_signal_flags()  # SIGHUP -> watcher.set_bundles(new_bundles)
                for name in watcher.poll(0):
                    reload_if_content_changed(name)

    Call ``poll(0)`` on every iteration, not only when the fd is readable: bundles added by
    :meth:`set_bundles` and the periodic rescan make no inotify event. ``poll(0)`` with
    nothing to do costs one zero-timeout ``poll(2)``.

    The first :meth:`poll` reports every bundle: create the watcher *before* the initial
    load and do that load from the loop, so no change between load and watch is lost.

    Lifecycle: ``__init__`` opens the inotify fd and adds the watches; ``close()`` releases
    them (idempotent). Using a closed watcher raises ``ValueError``.
    """

    # Class-level defaults keep a half-built instance safe to close().
    _inotify: INotify | None = None
    _closed: bool = True

    def __init__(
        self,
        bundles: Mapping[str, str | os.PathLike[str]],
        *,
        debounce_s: float = 0.005,
        max_delay_s: float = 0.05,
        rescan_interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if debounce_s < 0 or max_delay_s < debounce_s:
            raise ValueError("need 0 <= debounce_s <= max_delay_s")
        if not rescan_interval_s > 0:
            raise ValueError("rescan_interval_s must be > 0 (math.inf disables it)")
        self._debounce_s = debounce_s
        self._max_delay_s = max_delay_s
        self._rescan_interval_s = rescan_interval_s
        self._clock = clock
        self.stats = WatcherStats()
        self._paths: dict[str, str] = {}  # bundle -> absolute path
        self._anchors: dict[str, frozenset[Anchor]] = {}  # bundle -> its anchors
        self._interest: dict[Anchor, set[str]] = {}  # anchor -> bundles
        self._dir_bundles: dict[str, set[str]] = {}  # watched dir -> bundles anchored there
        self._dir_wd: dict[str, int] = {}
        self._wd_dirs: dict[int, set[str]] = {}  # a wd can be reached by several paths
        self._failed_dirs: set[str] = set()  # add_watch errors already logged
        self._pending: set[str] = set()  # bundles to report at the next poll()
        self._held: dict[str, float] = {}  # bundle -> monotonic time of the unclosed write
        self._modifications: dict[str, int] = {}  # bundle -> IN_MODIFY events seen
        self._inotify = INotify(nonblocking=True)
        self._closed = False
        try:
            self._fd: int = self._inotify.fileno()
            self._poller = select.poll()
            self._poller.register(self._fd, select.POLLIN)
            self._next_rescan = clock() + rescan_interval_s
            self.set_bundles(bundles)  # the first poll() reports every bundle
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- public API

    def set_bundles(self, bundles: Mapping[str, str | os.PathLike[str]]) -> None:
        """Replace the watched set (SIGHUP reconfiguration; daemon main thread).

        Watches of removed bundles are dropped; new bundles, and bundles whose path changed,
        are reported by the next :meth:`poll`.
        """
        self._require_open()
        wanted = {name: os.path.abspath(os.fspath(p)) for name, p in bundles.items()}
        for name, path in wanted.items():  # check everything before changing anything
            if "\0" in path:
                raise ValueError(f"bundle {name!r}: path contains a NUL byte")
        for name in [n for n in self._paths if wanted.get(n) != self._paths[n]]:
            self._set_anchors(name, frozenset())
            del self._paths[name], self._anchors[name]
            self._pending.discard(name)
            self._held.pop(name, None)
        added = [n for n in wanted if n not in self._paths]
        self._paths.update((n, wanted[n]) for n in added)
        self._reresolve(added)
        self._sync_watches(refresh=())
        self._pending.update(added)
        log.info("watching bundles=%d dirs=%d added=%s", len(self._paths),
                 len(self._dir_wd), ",".join(sorted(added)) or "-")

    def fileno(self) -> int:
        """The inotify fd, readable when events are queued (for select() in the main loop)."""
        self._require_open()
        assert self._inotify is not None
        fd: int = self._inotify.fileno()
        return fd

    def seconds_until_rescan(self) -> float:
        """Seconds until the periodic rescan is due (0 if due, ``inf`` if disabled); a
        select() timeout for a main loop that waits on :meth:`fileno` itself."""
        return max(0.0, self._next_rescan - self._clock())

    @property
    def watched_dirs(self) -> frozenset[str]:
        """Real paths of the directories that currently hold an inotify watch."""
        return frozenset(self._dir_wd)

    @property
    def bundles(self) -> dict[str, str]:
        """A copy of the watched bundles, name -> absolute path."""
        return dict(self._paths)

    def poll(self, timeout: float | None) -> set[str]:
        """Wait up to ``timeout`` seconds (``None``: forever) and return bundles that may
        have changed (daemon main thread).

        Returns every bundle when the periodic rescan is due or after an inotify queue
        overflow, and an empty set on timeout. Once a relevant event has been seen it keeps
        draining for the debounce window, so it may block up to ``max_delay_s`` even with
        ``timeout=0``. Irrelevant events are consumed, so ``fileno()`` stops being readable.
        """
        self._require_open()
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while not self._pending:
            if self._rescan_due():
                return self._rescan()
            if not self._wait_readable(self._wait_budget(deadline)):
                if deadline is not None and time.monotonic() >= deadline:
                    return self._rescan() if self._rescan_due() else set()
                continue
            self._drain()
        self._debounce()
        report, self._pending = self._pending, set()
        self.stats.reports += 1
        log.debug("bundles may have changed bundles=%s", ",".join(sorted(report)))
        return report

    def held_since(self, name: str) -> float | None:
        """Monotonic time of the first ``IN_MODIFY`` of ``name`` not yet followed by an
        ``IN_CLOSE_WRITE`` (a writer may still hold the file), else ``None``."""
        return self._held.get(name)

    def modifications(self, name: str) -> int:
        """How many ``IN_MODIFY`` events named one of ``name``'s anchors so far."""
        return self._modifications.get(name, 0)

    def sync(self) -> None:
        """Read the events queued now, without waiting or debouncing (they are reported by
        the next :meth:`poll`): brings :meth:`held_since` / :meth:`modifications` up to
        date, e.g. right after the caller read a file."""
        self._require_open()
        if self._wait_readable(0):
            self._drain()

    def close(self) -> None:
        """Release the inotify fd and all its watches. Idempotent; never raises on a
        half-built instance."""
        inotify, self._inotify = self._inotify, None
        self._closed = True
        if inotify is not None:
            inotify.close()
            self._dir_wd.clear()
            self._wd_dirs.clear()
            self.stats.watched_dirs = 0

    def __enter__(self) -> BundleWatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- waiting

    def _require_open(self) -> None:
        if self._closed:
            raise ValueError("BundleWatcher is closed")

    def _rescan_due(self) -> bool:
        return self._clock() >= self._next_rescan

    def _wait_budget(self, deadline: float | None) -> float | None:
        """Seconds to block: until the caller's deadline or the next rescan, if sooner."""
        to_rescan = self._next_rescan - self._clock()
        budget = None if math.isinf(to_rescan) else max(0.0, to_rescan)
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            budget = left if budget is None else min(budget, left)
        return budget

    def _wait_readable(self, wait_s: float | None) -> bool:
        # poll(2) counts whole milliseconds, which would turn a 0.2 ms debounce into 1 ms:
        # sub-millisecond waits use select(2) (microseconds) while the fd fits in an fd_set.
        # Otherwise round up, so a sub-millisecond remainder blocks instead of spinning.
        # PEP 475: both retry on EINTR with the remaining time.
        if wait_s is not None and wait_s < 1e-3 and self._fd < _FD_SETSIZE:
            return bool(select.select([self._fd], [], [], wait_s)[0])
        ms = _MAX_WAIT_MS if wait_s is None else min(_MAX_WAIT_MS, math.ceil(wait_s * 1e3))
        return bool(self._poller.poll(ms))

    def _debounce(self) -> None:
        first = last = time.monotonic()
        while True:
            wait = min(last + self._debounce_s, first + self._max_delay_s) - time.monotonic()
            if wait <= 0 or not self._wait_readable(wait):
                return
            if self._drain():
                last = time.monotonic()

    # ----------------------------------------------------------------- events

    def _drain(self) -> bool:
        """Read and handle all queued events; True if any of them was relevant."""
        assert self._inotify is not None
        events = self._inotify.read(timeout=0)
        self.stats.events += len(events)
        dirty: set[str] = set()
        refresh: set[str] = set()
        relevant = False
        for ev in events:
            if ev.mask & _f.Q_OVERFLOW:
                self._overflow()
                relevant = True
                continue
            hit, structural = self._match(ev.wd, ev.mask, ev.name)
            if hit:
                relevant = True
                self.stats.relevant_events += 1
                self._pending.update(hit)
                self._track_writers(hit, ev.mask)
                if structural:
                    dirty.update(hit)
            if ev.mask & _WATCH_GONE:
                refresh.update(self._forget_wd(ev.wd, drop=bool(ev.mask & _f.MOVE_SELF)))
        if dirty:
            self._reresolve(dirty)
            refresh.update(d for name in dirty for d, _ in self._anchors[name])
        if refresh:
            self._sync_watches(refresh)
        return relevant

    def _track_writers(self, hit: set[str], mask: int) -> None:
        """IN_MODIFY opens a hold; IN_CLOSE_WRITE or a new inode at the path ends it."""
        if mask & _f.MODIFY:
            now = time.monotonic()
            for name in hit:
                self._held.setdefault(name, now)
                self._modifications[name] = self._modifications.get(name, 0) + 1
        elif mask & (_f.CLOSE_WRITE | _REPLACED):
            for name in hit:
                self._held.pop(name, None)

    def _match(self, wd: int, mask: int, name: str) -> tuple[set[str], bool]:
        """Bundles an event concerns, and whether it is structural."""
        dirs = self._wd_dirs.get(wd, ())
        hit: set[str] = set()
        for d in dirs:
            if mask & _WATCH_GONE:
                hit.update(self._dir_bundles.get(d, ()))
            elif name:
                hit.update(self._interest.get((d, name), ()))
        return hit, bool(mask & _STRUCTURAL)

    def _forget_wd(self, wd: int, *, drop: bool) -> set[str]:
        """The watch no longer describes its path(s): forget it; return the dirs."""
        dirs = self._wd_dirs.pop(wd, set())
        for d in dirs:
            del self._dir_wd[d]
            log.debug("watch gone dir=%s wd=%d", d, wd)
        if dirs and drop:  # IN_MOVE_SELF: the kernel keeps the watch on the moved inode
            self._rm_watch(wd)
        self.stats.watched_dirs = len(self._dir_wd)
        return dirs

    def _overflow(self) -> None:
        self.stats.overflows += 1
        log.warning("inotify queue overflow, rescanning all bundles overflows=%d "
                    "hint=raise fs.inotify.max_queued_events", self.stats.overflows)
        self._full_resync()
        self._pending.update(self._paths)

    def _rescan(self) -> set[str]:
        """Periodic rescan: re-resolve and refresh everything, report every bundle."""
        self.stats.rescans += 1
        self._next_rescan = self._clock() + self._rescan_interval_s
        if self._wait_readable(0):
            self._drain()
        self._full_resync()
        self._pending.clear()
        self.stats.reports += 1
        log.debug("rescan bundles=%d dirs=%d", len(self._paths), len(self._dir_wd))
        return set(self._paths)

    def _full_resync(self) -> None:
        self._reresolve(list(self._paths))
        self._sync_watches(refresh=list(self._dir_bundles))

    # ----------------------------------------------------------------- anchors and watches

    def _reresolve(self, names: Iterable[str]) -> None:
        for name in names:
            path = self._paths[name]
            anchors = resolve_anchors(path)
            if anchors != self._anchors.get(name) and not os.path.isdir(os.path.dirname(path)):
                log.info("bundle dir missing bundle=%s path=%s waiting_on=%s", name, path,
                         ",".join(sorted(os.path.join(*a) for a in anchors)) or "-")
            self._set_anchors(name, anchors)

    def _set_anchors(self, name: str, new: frozenset[Anchor]) -> None:
        old = self._anchors.get(name, frozenset())
        if new == old:
            return
        for anchor in old - new:
            _discard(self._interest, anchor, name)
            if not any(d == anchor[0] for d, _ in new):
                _discard(self._dir_bundles, anchor[0], name)
        for anchor in new - old:
            self._interest.setdefault(anchor, set()).add(name)
            self._dir_bundles.setdefault(anchor[0], set()).add(name)
        self._anchors[name] = new

    def _sync_watches(self, refresh: Iterable[str]) -> None:
        """Make the watch table match the anchors; re-add the watches of ``refresh``."""
        for _ in range(_RESOLVE_PASSES):
            for d in [d for d in self._dir_wd if d not in self._dir_bundles]:
                self._unwatch(d)
            todo = [d for d in self._dir_bundles if d not in self._dir_wd]
            todo.extend(d for d in refresh if d in self._dir_wd)
            vanished: set[str] = set()
            for d in todo:
                if not self._watch(d):
                    vanished.update(self._dir_bundles.get(d, ()))
            if not vanished:
                break
            self._reresolve(vanished)  # a dir vanished under us: anchor further up
            refresh = ()
        self.stats.watched_dirs = len(self._dir_wd)

    def _watch(self, d: str) -> bool:
        """Add or refresh the watch of ``d``; False if ``d`` no longer exists."""
        assert self._inotify is not None
        try:
            wd = self._inotify.add_watch(d, WATCH_MASK)
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                if d in self._dir_wd:
                    self._unwatch(d)
                return False
            self._watch_failed(d, exc)
            return True
        self._failed_dirs.discard(d)
        old = self._dir_wd.get(d)
        if old == wd:
            return True
        if old is not None:  # the path now names another directory
            self._unwatch(d)
        self._dir_wd[d] = wd
        self._wd_dirs.setdefault(wd, set()).add(d)
        log.debug("watch added dir=%s wd=%d bundles=%s", d, wd,
                  ",".join(sorted(self._dir_bundles.get(d, ()))))
        return True

    def _watch_failed(self, d: str, exc: OSError) -> None:
        self.stats.watch_errors += 1
        if d in self._failed_dirs:
            return
        self._failed_dirs.add(d)
        hint = " hint=raise fs.inotify.max_user_watches" if exc.errno == errno.ENOSPC else ""
        log.error("cannot watch dir=%s errno=%s error=%s, relying on periodic rescan%s",
                  d, errno.errorcode.get(exc.errno or 0, exc.errno), exc.strerror, hint)

    def _unwatch(self, d: str) -> None:
        wd = self._dir_wd.pop(d)
        dirs = self._wd_dirs.get(wd)
        if dirs is not None:
            dirs.discard(d)
            if not dirs:
                del self._wd_dirs[wd]
                self._rm_watch(wd)
        log.debug("watch removed dir=%s wd=%d", d, wd)

    def _rm_watch(self, wd: int) -> None:
        assert self._inotify is not None
        try:
            self._inotify.rm_watch(wd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: the kernel already dropped it
                raise
