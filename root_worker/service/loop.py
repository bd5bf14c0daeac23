"""A small epoll event loop with deadline timers (one per root worker process).

Runs in each root worker: the event worker (:mod:`root_worker.service.worker`) drives every
client connection and every leaf exchange of the process on one :class:`Loop`; a caller
outside it (the WSGI path under a threaded gunicorn worker, tests) drives a private loop
until its exchanges end (:func:`run_until`). Handlers are callables taking the ready event
mask; timers are cancellable and run in deadline order. Nothing here blocks longer than the
next timer.

The loop owns every transition: work that must follow the current handler (the next
pipelined request of a connection) is queued with :meth:`Loop.call_soon` and runs on the
next turn, after the I/O that is ready, never inside the code that finished the last one.
A handler that raises is contained: the exception and the handler go to
:attr:`Loop.on_error` (the worker logs and counts it and lets the handler's owner -- a
connection, a leaf call -- end itself) and the loop goes on; it never unwinds the loop.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import selectors
import time
from collections import deque
from collections.abc import Callable
from typing import Any

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
Handler = Callable[[int], None]
_EPOLL = {READ: select.EPOLLIN, WRITE: select.EPOLLOUT, READ | WRITE: select.EPOLLIN |
          select.EPOLLOUT}
# errors and hang-ups wake both directions: the handler's recv/send then sees them
_READABLE = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
_WRITABLE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
log = logging.getLogger(__name__)


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
    """epoll + timer heap. Not thread-safe: one loop is used by one thread.

    ``select.epoll`` directly rather than :mod:`selectors`: a watch is one ``epoll_ctl`` and
    one dict entry (selectors builds a key tuple and a mapping per change, several
    microseconds each, and a root worker changes watches several times per request).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._ep = select.epoll()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._handlers: dict[int, Handler] = {}   # fd -> handler
        self._events: dict[int, int] = {}         # fd -> registered epoll mask
        self._fds: dict[Any, int] = {}            # watched object -> its fd at watch time
        self._owner: dict[int, Any] = {}          # fd -> the object watched on it
        self._soon: deque[Callable[[], None]] = deque()
        self.on_error: Callable[[BaseException, Any], None] = _log_error

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the next turn of the loop (after this turn's ready I/O)."""
        self._soon.append(fn)

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        t = Timer(when, fn)
        heapq.heappush(self._timers, (when, next(self._seq), t))
        return t

    def watch(self, sock: Any, events: int, handler: Handler) -> None:
        """Call ``handler(mask)`` when ``sock`` is ready for ``events`` (replaces a watch)."""
        mask = _EPOLL[events]
        fd = self._fds.get(sock)
        if fd is None:
            fd = sock if isinstance(sock, int) else sock.fileno()
            stale = self._owner.get(fd)
            if stale is not None:  # its socket was closed unwatched and the fd reused
                del self._fds[stale]
            try:
                self._ep.register(fd, mask)
            except FileExistsError:  # the stale registration survived (a dup'd fd)
                self._ep.modify(fd, mask)
            self._fds[sock], self._owner[fd], self._events[fd] = fd, sock, mask
        elif self._events[fd] != mask:
            self._ep.modify(fd, mask)
            self._events[fd] = mask
        self._handlers[fd] = handler

    def unwatch(self, sock: Any) -> None:
        """Stop watching ``sock`` (call before closing it)."""
        fd = self._fds.pop(sock, None)
        if fd is not None and self._owner.get(fd) is sock:
            del self._handlers[fd], self._events[fd], self._owner[fd]
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):  # closed behind our back
                pass

    def watched(self) -> int:
        return len(self._fds)

    def run_once(self, max_wait: float) -> None:
        """Wait for I/O up to the next timer (at most ``max_wait`` s) and dispatch."""
        timeout = 0.0 if self._soon else max_wait
        if self._timers and timeout:
            timeout = min(timeout, max(0.0, self._timers[0][0] - self.clock()))
        try:
            ready = self._ep.poll(timeout)
        except InterruptedError:
            ready = []
        handlers = self._handlers
        for fd, ev in ready:
            handler = handlers.get(fd)  # an earlier handler may have unwatched it
            if handler is not None:
                try:
                    handler((READ if ev & _READABLE else 0) | (WRITE if ev & _WRITABLE else 0))
                except Exception as exc:
                    self.on_error(exc, handler)
        self._run_timers()
        soon = self._soon
        for _ in range(len(soon)):  # only what was queued before this turn
            fn = soon.popleft()
            try:
                fn()
            except Exception as exc:
                self.on_error(exc, fn)

    def _run_timers(self) -> None:
        now = self.clock()
        timers = self._timers
        while timers and timers[0][0] <= now:
            t = heapq.heappop(timers)[2]
            if not t.cancelled:
                try:
                    t.fn()
                except Exception as exc:
                    self.on_error(exc, t.fn)
        while timers and timers[0][2].cancelled:  # keep the heap from filling with husks
            heapq.heappop(timers)

    def close(self) -> None:
        self._ep.close()
        self._handlers.clear()
        self._events.clear()
        self._fds.clear()
        self._owner.clear()
        self._timers.clear()
        self._soon.clear()


def _log_error(exc: BaseException, handler: Any) -> None:
    log.error("loop handler %r failed: %s: %s", handler, type(exc).__name__, exc,
              exc_info=exc)


def run_until(loop: Loop, done: Callable[[], bool], deadline: float) -> None:
    """Drive ``loop`` until ``done()`` or ``deadline`` (every caller's timers end earlier)."""
    while not done():
        left = deadline - loop.clock()
        if left <= 0:
            return
        loop.run_once(min(left, 1.0))
