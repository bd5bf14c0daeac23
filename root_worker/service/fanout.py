"""Fan-out to leaves: non-blocking HTTP/1.1 exchanges on an event loop, each with a deadline.

Runs in each root worker, created lazily after fork. One :class:`LeafCall` is one target's
exchange with its leaf replicas: connect (non-blocking), send the head and the body
buffers with ``sendmsg`` (scatter-gather, no copy of the body), read the answer under a
size cap, parse it. Every call owns one timer at its deadline: whatever the leaf does --
accept slowly, drip its answer, send forever, never answer -- the call ends by then with a
``timeout`` error and its socket is closed, so a hung leaf holds no thread, no buffer and
no socket past the deadline. :class:`LeafPool` keeps idle kept-alive sockets per endpoint; a
reused one that turns out closed by the leaf is retried once on a fresh one
(:mod:`root_worker.service.keepalive`). Every failure is a :class:`LeafError` with a
``kind`` that metrics and responses use:

==============  ==============================================================
kind            meaning
==============  ==============================================================
``no_route``    the routing file has no leaf for the model
``connect``     no leaf replica accepted a connection
``timeout``     the target took longer than ``FT_LEAF_TIMEOUT``
``io``          the connection broke while sending or receiving
``status``      the leaf answered with a non-2xx status (its message is kept)
``bad_reply``   the leaf's answer is malformed, not the JSON object expected, or larger
                than ``FT_MAX_LEAF_REPLY_BYTES`` (read no further)
``internal``    an unexpected exception while handling this target (a bug: logged once,
                counted in ``feature_trimmer_root_faults_total``); other targets go on
==============  ==============================================================
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from root_worker.service.http1 import HttpError, ReplyParser
from root_worker.service.keepalive import should_retry
from root_worker.service.loop import READ, WRITE, Loop, Timer, run_until
from root_worker.service.routing import Endpoint

MAX_IDLE_PER_ENDPOINT = 16
MAX_IDLE_S = 30.0  # an idle kept-alive socket older than this is closed, not reused
RECV_CHUNK = 64 << 10
IOV_MAX = 1024
SEND_BUDGET_MIN = 64 << 10  # after a partial send, offer at least this many bytes per call
log = logging.getLogger(__name__)
_REFUSED = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL)


class LeafError(Exception):
    """One target failed; ``kind`` is a short stable label (see the module docstring)."""

    def __init__(self, kind: str, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "message": self.message}
        if self.status:
            out["status"] = self.status
        return out


class LeafPool:
    """Idle keep-alive sockets per endpoint (thread-safe; one pool per worker)."""

    def __init__(self, max_idle: int = MAX_IDLE_PER_ENDPOINT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._idle: dict[tuple[str, int], list[tuple[float, socket.socket]]] = {}
        self._lock = threading.Lock()
        self._max_idle = max_idle
        self._clock = clock
        self.connects = 0  # new connections opened (a keep-alive health figure)

    def take(self, ep: Endpoint) -> socket.socket | None:
        now = self._clock()
        while True:
            with self._lock:
                idle = self._idle.get((ep.host, ep.port))
                if not idle:
                    return None
                since, sock = idle.pop()
            if now - since < MAX_IDLE_S:
                return sock
            sock.close()

    def give(self, ep: Endpoint, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault((ep.host, ep.port), [])
            if len(idle) < self._max_idle:
                idle.append((self._clock(), sock))
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            socks = [s for idle in self._idle.values() for _, s in idle]
            self._idle.clear()
        for sock in socks:
            sock.close()


Done = Callable[[Any], None]  # receives (status, body bytes) or a LeafError


class LeafCall:
    """One POST to the first replica of ``endpoints`` that accepts a connection."""

    def __init__(self, loop: Loop, pool: LeafPool, endpoints: Sequence[Endpoint],
                 path: str, headers: Mapping[str, str], body: Sequence[Any], deadline: float,
                 max_reply: int, on_done: Done, body_bytes: int | None = None) -> None:
        """``body``: byte buffers sent back to back (``sendmsg``, no copy; a trimmed frame
        is hundreds of views); ``body_bytes``: their total length, when the caller knows
        it."""
        self._loop, self._pool, self._eps = loop, pool, list(endpoints)
        self._path, self._headers, self._body = path, headers, body
        self._deadline, self._max_reply, self._on_done = deadline, max_reply, on_done
        self._i = 0
        self._attempt = 0
        self._sock: socket.socket | None = None
        self._reused = False
        self._out: list[Any] = []
        self._ends: list[int] = []
        self._total = -1  # bytes to send (head + body); -1: not connected yet
        self._budget = SEND_BUDGET_MIN  # bytes offered per sendmsg after a partial one
        self._sent = 0
        self._first = 0
        self._reply: ReplyParser | None = None
        self._timer: Timer | None = None
        self.endpoint: Endpoint | None = None
        self.reply_headers: dict[str, str] = {}  # the answer's head (names lower-cased)
        self.body_bytes = body_bytes if body_bytes is not None else \
            sum(memoryview(b).nbytes for b in body)
        self.done = False
        self.faults = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> LeafCall:
        if not self._eps:
            self._finish(LeafError("no_route", "no leaf is routed for this model"))
            return self
        if self._loop.clock() >= self._deadline:
            self._finish(LeafError("timeout", "deadline passed before sending"))
            return self
        self._timer = self._loop.call_at(self._deadline, self._on_deadline)
        self._connect()
        return self

    def _on_deadline(self) -> None:
        ep = self.endpoint.url if self.endpoint else "leaf"
        stage = "connecting" if self._total < 0 else "sending" if self._out else \
            "reading the answer"
        self._fail(LeafError("timeout", f"{ep}: no complete answer by the deadline "
                             f"(FT_LEAF_TIMEOUT) while {stage}"))

    def _finish(self, result: Any) -> None:
        if self.done:
            return
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
        self._out, self._body = [], ()
        self._on_done(result)

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._loop.unwatch(sock)
            sock.close()

    def _fail(self, err: LeafError) -> None:
        self._drop_socket()
        self._finish(err)

    def contain(self, exc: BaseException) -> None:
        """An exception escaped one of this call's handlers (the loop's backstop): the
        target fails with ``internal``; the exception is logged once, with its URL."""
        log.error("leaf call fault contained url=%s: %s: %s", self._url, type(exc).__name__,
                  exc, exc_info=exc)
        self.faults += 1
        self._fail(LeafError("internal", f"{self._url}: internal error (logged): "
                             f"{type(exc).__name__}"))

    # -- connect ---------------------------------------------------------------------------
    def _connect(self) -> None:
        ep = self.endpoint = self._eps[self._i]
        sock = self._pool.take(ep) if self._attempt == 0 else None
        self._reused = sock is not None
        self._reply = None
        self._ends = []
        self._total = -1
        if sock is not None:
            self._sock = sock
            self._start_send()
            return
        self._pool.connects += 1
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in ep.host else socket.AF_INET,
                                 socket.SOCK_STREAM)
        except OSError as exc:
            self._finish(LeafError("connect", f"{ep.url}: {_describe(exc)}"))
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        try:
            err = sock.connect_ex((ep.host, ep.port))
        except OSError as exc:  # e.g. a name that does not resolve
            err = exc.errno or errno.EHOSTUNREACH
        if err in (0, errno.EISCONN):
            self._start_send()
        elif err == errno.EINPROGRESS:
            self._loop.watch(sock, WRITE, self._on_connected)
        else:
            self._connect_failed(err)

    def _on_connected(self, mask: int) -> None:
        assert self._sock is not None
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(err)
        else:
            self._start_send()

    def _connect_failed(self, err: int) -> None:
        ep = self.endpoint
        assert ep is not None
        self._drop_socket()
        last = LeafError("connect", f"{ep.url}: {errno.errorcode.get(err, err)}: "
                         f"{_strerror(err)}")
        if err in _REFUSED and self._i + 1 < len(self._eps):
            self._i += 1  # the next replica
            self._attempt = 0
            self._connect()
            return
        self._finish(last)

    # -- send ------------------------------------------------------------------------------
    def _start_send(self) -> None:
        ep = self.endpoint
        assert ep is not None
        head = [f"POST {ep.base_path}{self._path} HTTP/1.1", f"Host: {ep.host}:{ep.port}",
                f"Content-Length: {self.body_bytes}"]
        head += [f"{k}: {v}" for k, v in self._headers.items()]
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        self._out = [raw, *self._body]  # flat byte buffers (the caller's contract)
        self._total = len(raw) + self.body_bytes
        self._ends = []  # cumulative ends, built on the first partial send only
        self._sent = self._first = 0
        self._send(WRITE)

    def _send(self, mask: int) -> None:
        sock, out = self._sock, self._out
        assert sock is not None
        total = self._total
        while self._sent < total:
            k = self._first
            if k or self._sent:
                ends = self._ends
                start = ends[k - 1] if k else 0
                # after a partial send, offer about what the kernel takes: a slow link
                # must not cost converting hundreds of buffers per call
                stop = bisect.bisect_left(ends, self._sent + self._budget, lo=k) + 1
                batch = out[k:min(stop, k + IOV_MAX)]
                if self._sent > start:  # the first buffer went out in part
                    batch[0] = memoryview(batch[0])[self._sent - start:]
            else:
                batch = out if len(out) <= IOV_MAX else out[:IOV_MAX]
            try:
                n = sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                self._loop.watch(sock, WRITE, self._send)
                return
            except OSError as exc:
                self._io_error(exc, "sending")
                return
            self._sent += n
            if self._sent < total:  # partial: find the place by bisection, at C speed
                self._budget = max(SEND_BUDGET_MIN, 2 * n)
                if not self._ends:
                    self._ends = list(itertools.accumulate(map(len, out)))
                self._first = bisect.bisect_right(self._ends, self._sent, lo=k)
        self._out = []
        self._loop.watch(sock, READ, self._read)

    # -- receive ---------------------------------------------------------------------------
    def _read(self, mask: int) -> None:
        sock = self._sock
        assert sock is not None
        try:
            data = sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._io_error(exc, "reading the answer")
            return
        reply = self._reply
        if reply is None:
            reply = self._reply = ReplyParser(self._max_reply)
        try:
            if not data:
                if reply.eof():
                    self._complete(reply)
                else:
                    self._eof(reply)
            elif reply.feed(data):
                self._complete(reply)
        except HttpError as exc:
            self._fail(LeafError("bad_reply", f"{self._url}: {exc.message}"))

    @property
    def _url(self) -> str:
        return self.endpoint.url if self.endpoint else "leaf"

    def _eof(self, reply: ReplyParser) -> None:
        if not reply.headed:
            exc = ConnectionResetError("closed before answering")
            if should_retry(exc, self._reused, self._attempt) and not reply.head_bytes:
                self._retry()
                return
            self._fail(LeafError("io", f"{self._url}: connection closed before the answer "
                                 f"was complete ({reply.head_bytes} head bytes)"))
        else:
            self._fail(LeafError("io", f"{self._url}: connection closed after "
                                 f"{len(reply.body)} body bytes"))

    def _io_error(self, exc: OSError, stage: str) -> None:
        if should_retry(exc, self._reused, self._attempt) and self._reply is None:
            self._retry()
            return
        self._fail(LeafError("io", f"{self._url}: connection lost while {stage}: "
                             f"{_describe(exc)}"))

    def _retry(self) -> None:
        self._drop_socket()
        self._attempt = 1
        self._connect()

    def _complete(self, reply: ReplyParser) -> None:
        sock, self._sock = self._sock, None
        assert sock is not None and self.endpoint is not None
        self._loop.unwatch(sock)
        if reply.keep_alive:
            self._pool.give(self.endpoint, sock)
        else:
            sock.close()
        self.reply_headers = reply.headers
        self._finish((reply.status, bytes(reply.body)))


def post_blocking(pool: LeafPool, endpoints: Sequence[Endpoint], path: str, body: Any,
                  headers: Mapping[str, str], deadline: float,
                  max_reply: int = 4 << 20) -> tuple[Endpoint, int, bytes]:
    """One exchange driven to its end on a private loop; raises :class:`LeafError`."""
    results: list[Any] = []
    loop = Loop()
    try:
        call = LeafCall(loop, pool, endpoints, path, headers, [body], deadline, max_reply,
                        results.append).start()
        run_until(loop, lambda: bool(results), deadline + 1.0)
    finally:
        loop.close()
    res = results[0]
    if isinstance(res, LeafError):
        raise res
    assert call.endpoint is not None
    return call.endpoint, res[0], res[1]


def _strerror(err: int) -> str:
    try:
        import os

        return os.strerror(err)
    except ValueError:
        return "error"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
