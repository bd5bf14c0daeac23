"""The root's gunicorn worker class: one event loop per pre-forked worker process.

``worker_class = "root_worker.service.worker.RootWorker"`` (``FT_WORKER_CLASS=event``, the
default). Runs in each root worker process, after fork: gunicorn's arbiter still forks,
supervises, replaces and reloads the workers; inside each one a single thread runs a
:class:`~root_worker.service.loop.Loop` that multiplexes every client connection *and*
every leaf exchange of the process. Why this and not gthread: a thread per connection
means a slow or idle client holds a thread (eight clients sending a byte a second stall a
2x4 pool) and every target costs a thread hop; here a connection waiting for bytes costs a
few hundred bytes of state and a timer, and a request waits for its leaves without holding
anything but its buffers.

A connection's life (every wait has a deadline):

=========  ==========================================================================
phase      deadline, and what happens when it passes
=========  ==========================================================================
idle       ``FT_KEEPALIVE`` s between requests: closed quietly
head       ``FT_HEADER_TIMEOUT`` s from the first byte; head at most
           ``FT_MAX_HEADER_BYTES`` (431), request line at most 8190 bytes (414): 408
body       ``FT_BODY_TIMEOUT`` s for the whole body, read with ``recv_into`` straight
           into a pooled buffer (:mod:`root_worker.service.buffers`; no room: 503): 408
scoring    the request's leaf calls, each ending by ``FT_LEAF_TIMEOUT``
answer     ``FT_BODY_TIMEOUT`` s to take the answer: closed
linger     an error answered before the request was all read: ``LINGER_S`` s (and
           at most ``FT_MAX_REQUEST_BYTES``) to drop the rest, then closed -- so the
           client's last bytes never meet a reset that would destroy the answer
=========  ==========================================================================

Every error answer, including the HTTP layer's own (400 malformed request line or header,
bad chunked framing, 413, 414, 431, 501, 505), is JSON ``{"error": {"code", "message"}}``.
``Expect: 100-continue`` is answered. Pipelined requests are served in order.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import socket
import time
from typing import Any

from gunicorn.workers.base import Worker

from root_worker.service.http1 import (
    MAX_HEADER_FIELDS,
    MAX_REQUEST_LINE,
    ChunkedDecoder,
    Head,
    HttpError,
    error_body,
    find_head_end,
    parse_request,
    response_head,
    status_text,
)
from root_worker.service.loop import READ, WRITE, Loop, Timer
from root_worker.service.replies import answer_body

BadRequest = HttpError  # score.BadRequest: this module must not import prometheus_client
# (the gunicorn master imports the worker class before on_starting exports
# PROMETHEUS_MULTIPROC_DIR; prometheus_client picks its value class at import)

log = logging.getLogger(__name__)
ACCEPT_BATCH = 64
HEAD_RECV = 64 << 10
NOTIFY_EVERY_S = 1.0
SHRINK_IDLE_S = 2.0  # no request for this long: give kept buffers back to the kernel
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LINGER_S = 5.0  # after an early answer, drop the rest of the request this long at most
# A Content-Length body is read in wake-ups of at least this many bytes (SO_RCVLOWAT, never
# more than the rest of the body): a 2.8 MB body then takes ~5 reads instead of ~35, about
# 45% less receive CPU on loopback (bench/send_bench.py); bodies up to HEAD_RECV take none.
BODY_RCVLOWAT = 512 << 10
_SCRATCH = memoryview(bytearray(HEAD_RECV))  # where lingering connections drop their bytes
Answer = tuple[int, list[tuple[str, str]], bytes]


class RootWorker(Worker):
    """gunicorn worker: accept, read, score and answer on one non-blocking loop."""

    def init_process(self) -> None:
        self.loop = Loop()
        self.conns: set[Conn] = set()
        self._accepting = False
        self._last_notify = 0.0
        self.last_request = time.monotonic()
        super().init_process()

    def run(self) -> None:
        app = self.wsgi
        self.state = app.state()
        s = self.state.settings
        self.settings = s
        self.scorer = self.state.scorer
        self.buffers = self.scorer.buffers
        self.state.connections = lambda: len(self.conns)
        for sock in self.sockets:
            sock.setblocking(False)
        self.loop.watch(self.PIPE[0], READ, self._wakeup)
        self._accept_on()
        # Everything built so far (modules, the app, the map view) lives as long as the
        # worker: move it out of the collector's generations, so the periodic full
        # collections traverse only what requests allocate.
        gc.collect()
        gc.freeze()
        try:
            while self.alive:
                self._tick()
                self.loop.run_once(NOTIFY_EVERY_S)
            self._drain()
        finally:
            for conn in list(self.conns):
                conn.close()
            self.scorer.close()

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_notify >= NOTIFY_EVERY_S:
            self._last_notify = now
            self.notify()
            if self.ppid != os.getppid():
                self.log.info("parent changed, shutting down: %s", self)
                self.alive = False
            if now - self.last_request > SHRINK_IDLE_S and self.buffers.kept:
                self.buffers.shrink()

    def _drain(self) -> None:
        """Graceful stop: no new connections; requests in flight finish (bounded)."""
        self._accept_off()
        for sock in self.sockets:
            sock.close()
        deadline = time.monotonic() + self.cfg.graceful_timeout
        for conn in list(self.conns):
            if not conn.scoring:  # idle, or a request still arriving: nothing to finish
                conn.close()
        while any(c.scoring for c in self.conns) and time.monotonic() < deadline:
            self.notify()
            self.loop.run_once(min(1.0, max(0.0, deadline - time.monotonic())))

    def _wakeup(self, mask: int) -> None:
        try:
            while os.read(self.PIPE[0], 64):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # -- accepting -----------------------------------------------------------------------
    def _accept_on(self) -> None:
        if not self._accepting:
            for sock in self.sockets:
                self.loop.watch(sock, READ, _bind_accept(self, sock))
            self._accepting = True

    def _accept_off(self) -> None:
        if self._accepting:
            for sock in self.sockets:
                self.loop.unwatch(sock)
            self._accepting = False

    def accept(self, listener: Any) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self.conns) >= self.settings.max_connections:
                self._accept_off()  # resumed when a connection closes
                return
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE,
                                     errno.ENOBUFS, errno.ENOMEM, errno.EPROTO):
                    raise
                log.warning("accept failed error=%s", exc)
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(self, sock)
            self.conns.add(conn)
            conn.start()

    def closed(self, conn: Conn) -> None:
        self.conns.discard(conn)
        if self.alive and not self._accepting and \
                len(self.conns) < self.settings.max_connections:
            self._accept_on()


def _bind_accept(worker: RootWorker, sock: Any) -> Any:
    return lambda mask: worker.accept(sock)


class Conn:
    """One client connection (see the module docstring for its phases)."""

    def __init__(self, worker: RootWorker, sock: socket.socket) -> None:
        self.w = worker
        self.loop: Loop = worker.loop
        self.sock: socket.socket | None = sock
        self.rx = bytearray()
        self.idle = True
        self.timer: Timer | None = None
        self.head: Head | None = None
        self.buf: Any = None          # pooled body buffer
        self.view: memoryview | None = None
        self.got = 0
        self.chunks: ChunkedDecoder | None = None
        self.out: list[memoryview] = []
        self.keep = True
        self.linger = False  # the answer is sent before the request was all read
        self.lingered = 0
        self.scoring = False
        self.lowat = 1  # the socket's SO_RCVLOWAT: 1 except while a large body is read

    # -- timers --------------------------------------------------------------------------
    def _deadline(self, seconds: float, why: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(self.loop.clock() + seconds, lambda: self._expired(why))

    def _expired(self, why: str) -> None:
        self.timer = None
        if why == "idle" or why == "answer" or self.sock is None:
            self.close()
            return
        self._fail(HttpError(408, "timeout", f"request {why} not received within "
                             f"{'FT_HEADER_TIMEOUT' if why == 'head' else 'FT_BODY_TIMEOUT'}"))

    # -- reading -------------------------------------------------------------------------
    def start(self) -> None:
        self.idle = True
        self._rcvlowat(1)
        self._deadline(self.w.settings.keepalive, "idle")
        if self.sock is not None:
            self.loop.watch(self.sock, READ, self._read_head)
        if self.rx:
            self._on_head_bytes()  # a pipelined request already arrived

    def _read_head(self, mask: int) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(HEAD_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.rx += data
        self._on_head_bytes()

    def _on_head_bytes(self) -> None:
        if self.idle:
            self.idle = False
            self._deadline(self.w.settings.header_timeout, "head")
        limit = self.w.settings.max_header_bytes
        end = find_head_end(self.rx)
        try:
            if end < 0:
                first_line = self.rx.find(b"\n")
                if first_line < 0 and len(self.rx) > MAX_REQUEST_LINE:
                    raise HttpError(414, "uri_too_long", f"request line exceeds "
                                    f"{MAX_REQUEST_LINE} bytes")
                if len(self.rx) > limit:
                    raise HttpError(431, "header_too_large", f"request head exceeds "
                                    f"{limit} bytes (FT_MAX_HEADER_BYTES)")
                return
            if end > limit + 4:
                raise HttpError(431, "header_too_large", f"request head of {end} bytes "
                                f"exceeds {limit} (FT_MAX_HEADER_BYTES)")
            head = parse_request(bytes(self.rx[:end]), MAX_HEADER_FIELDS)
            del self.rx[:end]
            self._on_head(head)
        except HttpError as exc:
            self._fail(exc)

    def _on_head(self, head: Head) -> None:
        self.head = head
        self.keep = head.keep_alive
        self.w.last_request = time.monotonic()
        self.w.wsgi.route(head.method, head.path)  # raises BadRequest (404/405)
        if head.method == "POST":
            self._start_body(head)
            return
        if head.chunked or head.content_length:
            raise HttpError(400, "unexpected_body", f"{head.method} {head.path} takes no body")
        self._dispatch()

    def _start_body(self, head: Head) -> None:
        s = self.w.settings
        if head.content_length is None and not head.chunked:
            raise HttpError(411, "length_required", "a Content-Length (or chunked body) is "
                            "required")
        size = head.content_length if head.content_length is not None else 64 << 10
        if head.content_length is not None and size > s.max_request_bytes:
            self.keep = False
            raise HttpError(413, "too_large", f"body of {size} bytes exceeds the limit of "
                            f"{s.max_request_bytes} bytes (FT_MAX_REQUEST_BYTES)")
        if not self._grow(max(size, 1)):
            return
        if head.chunked:
            self.chunks = ChunkedDecoder(self._sink, s.max_request_bytes)
        self._deadline(s.body_timeout, "body")
        if "100-continue" in head.headers.get("expect", "").lower() and self.sock is not None:
            try:
                self.sock.send(CONTINUE)
            except OSError:
                pass
        pending, self.rx = bytes(self.rx), bytearray()
        self._body_bytes(memoryview(pending))

    def _grow(self, need: int) -> bool:
        """Make the pooled body buffer hold ``need`` bytes (copying what it has)."""
        if self.buf is not None and len(self.buf) >= need:
            return True
        new = self.w.buffers.take(need)
        if new is None:
            self.keep = False
            self._fail(HttpError(503, "overloaded", f"no buffer for a {need}-byte body: the "
                                 "worker holds FT_MAX_BUFFER_BYTES already; retry later"))
            return False
        if self.buf is not None:
            assert self.view is not None
            new[:self.got] = self.view[:self.got]
            self._give_buf()
        self.buf, self.view = new, memoryview(new)
        return True

    def _give_buf(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.buf is not None:
            self.w.buffers.give(self.buf)
            self.buf = None

    def _sink(self, data: memoryview) -> None:
        end = self.got + len(data)
        size = len(self.buf) if self.buf is not None else 0
        if end > size and not self._grow(
                min(max(end, 2 * size), self.w.settings.max_request_bytes)):
            raise _Stop()
        assert self.view is not None
        self.view[self.got:end] = data
        self.got = end

    def _read_body(self, mask: int) -> None:
        sock, head = self.sock, self.head
        assert sock is not None and head is not None and self.view is not None
        try:
            if self.chunks is None:
                n = sock.recv_into(self.view[self.got:head.content_length])
                if n:
                    self.got += n
            else:
                data = sock.recv(HEAD_RECV)
                n = len(data)
                if n:
                    self._body_bytes(memoryview(data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not n:
            self.keep = False
            self._fail(HttpError(400, "truncated", self._truncated()))
            return
        if self.chunks is None:
            if self._body_done():
                self._dispatch()
            else:
                self._rcvlowat(self._body_lowat())

    def _truncated(self) -> str:
        head = self.head
        if head is not None and head.chunked:
            return f"chunked body ended after {self.got} bytes without its last chunk"
        return f"body ended after {self.got} of {head.content_length if head else '?'} bytes"

    def _body_bytes(self, data: memoryview) -> None:
        head = self.head
        assert head is not None
        try:
            if self.chunks is not None:
                used = self.chunks.feed(data)
                if self.chunks.done:
                    self.rx += data[used:]
            else:
                assert self.view is not None and head.content_length is not None
                take = min(len(data), head.content_length - self.got)
                self.view[self.got:self.got + take] = data[:take]
                self.got += take
                self.rx += data[take:]
        except _Stop:
            return
        except HttpError as exc:
            self.keep = False
            self._fail(exc)
            return
        if self._body_done():
            self._dispatch()
        elif self.sock is not None:
            self._rcvlowat(self._body_lowat())
            self.loop.watch(self.sock, READ, self._read_body)

    def _body_lowat(self) -> int:
        """The SO_RCVLOWAT for the rest of a Content-Length body: BODY_RCVLOWAT, never more
        than the rest (the kernel must report the last bytes); 1 for a chunked body or a
        rest of at most HEAD_RECV."""
        head = self.head
        if self.chunks is not None or head is None or head.content_length is None:
            return 1
        rest = head.content_length - self.got
        return min(rest, BODY_RCVLOWAT) if rest > HEAD_RECV else 1

    def _rcvlowat(self, n: int) -> None:
        """Have the kernel report the socket readable once ``n`` bytes are queued (or at
        its end). Non-blocking reads still return what is there; deadlines are timers."""
        if n == self.lowat or self.sock is None:
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
        except OSError:
            return  # the close that follows an error is reported where it happens
        self.lowat = n

    def _body_done(self) -> bool:
        head = self.head
        if head is None:
            return False
        if self.chunks is not None:
            return self.chunks.done
        return self.got >= (head.content_length or 0)

    # -- serving -------------------------------------------------------------------------
    def _dispatch(self) -> None:
        head = self.head
        assert head is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.loop.unwatch(self.sock)
        try:
            if head.path == "/score" and head.method == "POST":
                body = self.view[:self.got] if self.view is not None else memoryview(b"")
                self.scoring = True
                self.w.scorer.begin(body, head.query, self.loop, self._scored)
                return
            self._answer(*self.w.wsgi.serve(head.method, head.path, head.query))
        except BadRequest as exc:
            self._answer(*error_body(exc.status, exc.code, exc.message))
        except Exception:  # a bug: answer 500, keep the worker
            log.exception("unhandled error method=%s path=%s", head.method, head.path)
            self._answer(*error_body(500, "internal", "internal error (logged)"))

    def _scored(self, status: int, doc: dict[str, Any]) -> None:
        self.scoring = False
        try:
            answer = answer_body(status, doc)
        except Exception:
            log.exception("answer not encodable")
            answer = error_body(500, "internal", "internal error (logged)")
        self._answer(*answer)

    def _fail(self, exc: HttpError) -> None:
        head = self.head
        if exc.status not in (404, 405) or head is None or head.chunked or \
                head.content_length:
            self.keep = False  # the rest of this request's bytes would be misread
        self.scoring = False
        self._answer(*error_body(exc.status, exc.code, exc.message))

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        if self.head is not None and self.head.path == "/score":
            self.w.state.metrics.answered(status)
        # closing with request bytes still coming: drain them after the answer (below)
        self.linger = not self.keep and (self.head is None or not self._body_done())
        self._give_buf()
        self.chunks = None
        if self.sock is None:
            return
        head = response_head(status, status_text(status), headers, len(body), self.keep)
        self.out = [memoryview(head), memoryview(body)]
        self._deadline(self.w.settings.body_timeout, "answer")
        self._write(WRITE)

    def _write(self, mask: int) -> None:
        sock = self.sock
        if sock is None:
            return
        out = self.out
        while out:
            try:
                n = sock.sendmsg(out)
            except (BlockingIOError, InterruptedError):
                self.loop.watch(sock, WRITE, self._write)
                return
            except OSError:
                self.close()
                return
            while n and out:
                if n >= len(out[0]):
                    n -= len(out.pop(0))
                else:
                    out[0] = out[0][n:]
                    n = 0
        if not self.keep:
            self._linger() if self.linger else self.close()
            return
        self.head, self.got = None, 0
        self.loop.unwatch(sock)
        self.start()

    def _linger(self) -> None:
        """Lingering close (as nginx's ``lingering_close``): the answer went out before
        the request was all read, and closing now would make the kernel answer the
        client's next bytes with a reset that can destroy the answer in flight (the client
        of a 503 or 413 is usually still sending its body). So: no more writes, read and
        drop what comes for at most ``LINGER_S`` and ``FT_MAX_REQUEST_BYTES``, then close."""
        sock = self.sock
        assert sock is not None
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.lingered = 0
        self._rcvlowat(1)
        self._deadline(LINGER_S, "idle")  # expiry closes
        self.loop.watch(sock, READ, self._drop_input)

    def _drop_input(self, mask: int) -> None:
        sock = self.sock
        assert sock is not None
        try:
            n = sock.recv_into(_SCRATCH)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        self.lingered += n
        if not n or self.lingered > self.w.settings.max_request_bytes:
            self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        sock, self.sock = self.sock, None
        if sock is not None:
            self.loop.unwatch(sock)
            sock.close()
        if not self.scoring:  # leaf calls in flight still read the body: they drop it
            self._give_buf()
        self.idle = True
        self.w.closed(self)


class _Stop(Exception):
    """The body sink could not grow (the error answer is already on its way)."""
