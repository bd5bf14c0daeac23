"""A small selector event loop with deadline timers (one per root worker process).

Runs in each root worker: the event worker (:mod:`root_worker.service.worker`) drives every
client connection and every leaf exchange of the process on one :class:`Loop`; a caller
outside it (the WSGI path under a threaded gunicorn worker, tests) drives a private loop
until its exchanges end (:func:`run_until`). Handlers are callables taking the ready event
mask; timers are cancellable and run in deadline order. Nothing here blocks longer than the
next timer.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import time
from collections.abc import Callable
from typing import Any

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
Handler = Callable[[int], None]


class Timer:
    """A scheduled call; :meth:`cancel` makes it a no-op."""

    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """Selector + timer heap. Not thread-safe: one loop is used by one thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        # what is registered, by object: selectors' own KeyError paths format repr(sock),
        # which costs more than the whole modify
        self._watched: set[Any] = set()

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        t = Timer(when, fn)
        heapq.heappush(self._timers, (when, next(self._seq), t))
        return t

    def watch(self, sock: Any, events: int, handler: Handler) -> None:
        """Call ``handler(mask)`` when ``sock`` is ready for ``events`` (replaces a watch)."""
        if sock in self._watched:
            self._sel.modify(sock, events, handler)
        else:
            self._sel.register(sock, events, handler)
            self._watched.add(sock)

    def unwatch(self, sock: Any) -> None:
        """Stop watching ``sock`` (call before closing it)."""
        if sock in self._watched:
            self._watched.discard(sock)
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):  # closed behind our back (fd -1)
                pass

    def watched(self) -> int:
        return len(self._watched)

    def run_once(self, max_wait: float) -> None:
        """Wait for I/O up to the next timer (at most ``max_wait`` s) and dispatch."""
        timeout = max_wait
        if self._timers:
            timeout = min(timeout, max(0.0, self._timers[0][0] - self.clock()))
        for key, mask in self._sel.select(timeout):
            key.data(mask)
        self._run_timers()

    def _run_timers(self) -> None:
        now = self.clock()
        timers = self._timers
        while timers and timers[0][0] <= now:
            t = heapq.heappop(timers)[2]
            if not t.cancelled:
                t.fn()
        while timers and timers[0][2].cancelled:  # keep the heap from filling with husks
            heapq.heappop(timers)

    def close(self) -> None:
        self._sel.close()
        self._watched.clear()
        self._timers.clear()


def run_until(loop: Loop, done: Callable[[], bool], deadline: float) -> None:
    """Drive ``loop`` until ``done()`` or ``deadline`` (every caller's timers end earlier)."""
    while not done():
        left = deadline - loop.clock()
        if left <= 0:
            return
        loop.run_once(min(left, 1.0))
