"""Refreshing bundles without ever stalling the daemon's main loop (issue #11, items 1, 4).

Runs in the daemon's main loop. :class:`Loader` turns "bundle X may have changed" into a
:class:`~trimmer_daemon.state.RefreshResult` handed to the daemon's callback:

- read the file and hash it (cheap when unchanged); then ask the watcher whether a writer
  touched the file while it was read (:meth:`BundleWatcher.sync`), or still holds it;
- parse + compile the new content into a :class:`~trimmer_daemon.parts.BundlePart`: inline
  when the file is at most ``inline_parse_bytes``, else in the parse worker process, one
  file at a time, with later requests queued by name (each re-reads the file when its turn
  comes, so it parses the newest content); a bundle refreshed while its parse runs is
  refreshed again when that parse ends;
- content a writer still holds is never loaded: the hold gets a deadline
  (``writer_hold_seconds`` after the first unclosed ``IN_MODIFY``), after which the bundle
  is reported stale with the reason. The ``IN_CLOSE_WRITE`` that ends the hold makes the
  watcher report the bundle again, and that refresh loads it.

Everything here has a bound: one parse job in flight with a timeout, a queue of at most one
entry per bundle, a deadline per hold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from trimmer_daemon.bundle.parse import BundleError, Limits
from trimmer_daemon.parse_worker import ParseWorker
from trimmer_daemon.parts import BundlePart, KeyMemo, build_part
from trimmer_daemon.state import BundleTracker, RefreshResult
from trimmer_daemon.watcher import BundleWatcher

log = logging.getLogger(__name__)

OnResult = Callable[[BundleTracker, RefreshResult, bool], None]


class Loader:
    """Schedules bundle refreshes: inline, in the parse worker, or held for a writer."""

    def __init__(self, *, limits: Limits, inline_bytes: int, hold_s: float,
                 max_parse_memory: int, on_result: OnResult) -> None:
        self.limits, self.inline_bytes, self.hold_s = limits, inline_bytes, hold_s
        self.worker = ParseWorker(max_parse_memory)
        self._on_result = on_result
        self.watcher: BundleWatcher | None = None
        self.trackers: dict[str, BundleTracker] = {}
        self.index: dict[str, int] = {}  # bundle -> position in FeatureMap.bundles
        self._queue: dict[str, bool] = {}  # bundle -> startup flag, in arrival order
        self._again: set[str] = set()  # refresh once the running parse ends
        self._holds: dict[str, float] = {}  # bundle -> monotonic deadline
        self._memos: dict[str, KeyMemo] = {}  # bundle -> its last inline build's work
        self._job_held = False
        self._job_startup = False

    # -- the daemon's side ----------------------------------------------------------------

    def set_trackers(self, trackers: dict[str, BundleTracker]) -> None:
        """The bundle set changed (start, SIGHUP): new positions, forget removed bundles."""
        self.trackers = trackers
        self.index = {name: i for i, name in enumerate(sorted(trackers))}
        for name, tracker in trackers.items():
            if tracker.part is not None:
                tracker.part = tracker.part.with_index(self.index[name])
        for table in (self._queue, self._holds, self._memos):
            for name in [n for n in table if n not in trackers]:
                del table[name]
        self._again &= set(trackers)

    def refresh(self, names: set[str], *, startup: bool = False) -> None:
        for name in sorted(names):
            if name not in self.trackers:
                continue
            job = self.worker.busy
            if job is not None and job.name == name:
                self._again.add(name)
            elif name in self._queue:
                continue
            else:
                self._refresh_one(self.trackers[name], startup)

    def pending(self) -> bool:
        """Whether a parse runs in the worker or waits for it."""
        return self.worker.busy is not None or bool(self._queue)

    def fileno(self) -> int:
        """The parse worker's answer fd (-1 when no parse runs), for select()."""
        return self.worker.fileno()

    def next_deadline(self) -> float | None:
        """The earliest monotonic time :meth:`poll` has something to do without an fd."""
        deadlines = [*self._holds.values()]
        worker = self.worker.deadline()
        if worker is not None:
            deadlines.append(worker)
        return min(deadlines) if deadlines else None

    def poll(self) -> None:
        """Collect a finished parse, expire holds, start the next queued parse."""
        done = self.worker.collect()
        if done is not None:
            job, outcome = done
            tracker = self.trackers.get(job.name)
            if tracker is not None and tracker.path == job.path:
                self._install(tracker, outcome, self._job_held, self._job_startup)
            if job.name in self._again:
                self._again.discard(job.name)
                self._queue.setdefault(job.name, False)
        self._expire_holds()
        while self._queue and self.worker.busy is None:
            name = next(iter(self._queue))
            startup = self._queue.pop(name)
            if name in self.trackers:
                self._refresh_one(self.trackers[name], startup)

    def close(self) -> None:
        self.worker.close()

    # -- internals ------------------------------------------------------------------------

    def _refresh_one(self, tracker: BundleTracker, startup: bool) -> None:
        name = tracker.name
        before = self.watcher.modifications(name) if self.watcher is not None else 0
        got = tracker.read()
        if isinstance(got, RefreshResult):
            self._holds.pop(name, None)
            self._on_result(tracker, got, startup)
            return
        held = self._held(name, before)
        if len(got) <= self.inline_bytes:
            self._install(tracker, self._build(tracker, got), held, startup)
            return
        if self.worker.busy is not None:
            tracker.discard_read()  # re-read when its turn comes: the newest content
            self._queue.setdefault(name, startup)
            return
        try:
            self.worker.submit(name, got, path=tracker.path, limits=self.limits,
                               bundle_index=self.index[name])
        except BundleError as exc:
            self._install(tracker, exc, held, startup)
            return
        self._job_held, self._job_startup = held, startup
        log.info("parsing in the parse worker bundle=%s size=%d", name, len(got))

    def _held(self, name: str, before: int) -> bool:
        """Did a writer modify the file in place without closing it (before or while we
        read it)?"""
        watcher = self.watcher
        if watcher is None:
            return False
        watcher.sync()
        return watcher.held_since(name) is not None or watcher.modifications(name) != before

    def _build(self, tracker: BundleTracker, data: bytes) -> BundlePart | BundleError:
        memo = self._memos.setdefault(tracker.name, KeyMemo())  # changed only on success
        try:
            return build_part(data, path=tracker.path, limits=self.limits,
                              bundle_index=self.index[tracker.name], memo=memo)
        except BundleError as exc:
            return exc

    def _install(self, tracker: BundleTracker, outcome: BundlePart | BundleError,
                 held: bool, startup: bool) -> None:
        result = tracker.install(outcome, held=held)
        name = tracker.name
        if result.held:
            since = self.watcher.held_since(name) if self.watcher is not None else None
            deadline = (since if since is not None else time.monotonic()) + self.hold_s
            if name not in self._holds:
                log.info("bundle held bundle=%s: modified in place and not closed yet; waiting "
                         "up to %.1fs for the writer to close it", name, self.hold_s)
            self._holds[name] = deadline
        else:
            self._holds.pop(name, None)
        self._on_result(tracker, result, startup)

    def _expire_holds(self) -> None:
        now = time.monotonic()
        for name, deadline in list(self._holds.items()):
            tracker = self.trackers.get(name)
            since = self.watcher.held_since(name) if self.watcher is not None else None
            if tracker is None or since is None:
                del self._holds[name]  # closed or replaced: the watcher reports it again
            elif now >= deadline:
                del self._holds[name]
                self._on_result(tracker, tracker.hold_expired(now - since), False)
