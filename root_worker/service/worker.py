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

Requests are framed by llhttp (:class:`~root_worker.service.http1.RequestStream`); this
module owns the connection: what is read when, where body bytes go, deadlines, answers.
A connection's life (every wait has a deadline):

=========  ==========================================================================
phase      deadline, and what happens when it passes
=========  ==========================================================================
head       ``FT_HEADER_TIMEOUT`` s from accept (a new connection) or from the first
           byte of a later request; head at most ``FT_MAX_HEADER_BYTES`` (431), request
           line at most 8190 bytes (414): 408, or a quiet close if nothing came
idle       ``FT_KEEPALIVE`` s between requests: closed quietly
body       ``FT_BODY_TIMEOUT`` s for the whole body. A Content-Length body is read with
           ``recv_into`` straight into a pooled buffer (:mod:`~root_worker.service.buffers`)
           that is counted as bytes arrive, never for what the head announced; a chunked
           body is de-chunked by llhttp into one. No room: 503. Deadline: 408
scoring    the request's leaf calls, each ending by ``FT_LEAF_TIMEOUT`` (a backstop
           timer answers 500 if the scorer ever failed to finish)
answer     ``FT_BODY_TIMEOUT`` s to take the answer: closed
linger     an error answered before the request was all read: ``LINGER_S`` s (and
           at most ``FT_MAX_REQUEST_BYTES``) to drop the rest, then closed -- so the
           client's last bytes never meet a reset that would destroy the answer
=========  ==========================================================================

Pipelined requests are answered in order, one at a time: the loop owns every transition
(the next request is started by :meth:`Loop.call_soon`, never from inside the code that
wrote the last answer) and a connection does a bounded amount of work per turn (one
``FEED_SLICE`` of bytes parsed, or one request started), so one connection cannot hold the
worker. Faults are contained: an unexpected exception while serving a connection closes
that connection (a 500 first if no answer had started), is logged once with its request id
and counted in ``feature_trimmer_root_faults_total{phase}``; the worker and its other
connections go on. HTTP/1.0 and 1.1 keep-alive follow RFC 9112 (an HTTP/1.0 client that asks
to keep the connection is told ``Connection: keep-alive``), HEAD is answered without a
body, ``Expect: 100-continue`` is answered in HTTP/1.1. At ``FT_MAX_CONNECTIONS`` the worker
closes its oldest silent connection (accepted or kept alive, no byte of a request yet) to
take a new one, so a flood of silent sockets cannot starve ``/healthz``; out of file
descriptors (EMFILE), it stops accepting for ``ACCEPT_PAUSE_S`` and logs once per pause.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gc
import logging
import os
import socket
import time
from typing import Any

from gunicorn.workers.base import Worker

from root_worker.service import faults
from root_worker.service.buffers import MIN_BUFFER
from root_worker.service.http1 import (
    HttpError,
    Message,
    RequestStream,
    error_body,
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
ACCEPT_PAUSE_S = 0.5  # out of file descriptors: stop accepting this long
HEAD_RECV = 64 << 10
FEED_SLICE = 16 << 10  # bytes parsed per connection per loop turn (pipelining fairness)
NOTIFY_EVERY_S = 1.0
SHRINK_IDLE_S = 2.0  # no /score for this long: give kept buffers back to the kernel
SCORE_GRACE_S = 5.0  # the scoring backstop: FT_LEAF_TIMEOUT + this
CHARGE_STEP = 1 << 20  # a body buffer is counted against the cap in steps of this
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LINGER_S = 5.0  # after an early answer, drop the rest of the request this long at most
# A Content-Length body is read in wake-ups of at least this many bytes (SO_RCVLOWAT, never
# more than the rest of the body): a 2.8 MB body then takes ~5 reads instead of ~35, about
# 45% less receive CPU on loopback (bench/send_bench.py); bodies up to HEAD_RECV take none.
BODY_RCVLOWAT = 512 << 10
_SCRATCH = memoryview(bytearray(HEAD_RECV))  # where lingering connections drop their bytes
Answer = tuple[int, list[tuple[str, str]], bytes]
_GET_LIKE = {"HEAD": "GET"}  # routed as: HEAD is GET without the body


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim(0)`` (return freed heap pages to the kernel), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


class RootWorker(Worker):
    """gunicorn worker: accept, read, score and answer on one non-blocking loop."""

    def init_process(self) -> None:
        self.loop = Loop()
        self.loop.on_error = self._loop_fault
        self.conns: set[Conn] = set()
        self.silent: dict[Conn, None] = {}  # oldest first: no byte of a request yet
        self._accepting = False
        self._paused: Timer | None = None
        self._last_notify = 0.0
        self.last_request = time.monotonic()
        self._trimmed = True
        super().init_process()

    def run(self) -> None:
        app = self.wsgi
        self.state = app.state()
        s = self.state.settings
        self.settings = s
        self.deadlines = {"head": s.header_timeout, "idle": s.keepalive, "body": s.body_timeout,
                          "answer": s.body_timeout, "linger": LINGER_S,
                          "scoring": s.leaf_timeout + SCORE_GRACE_S}  # seconds, by phase
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
            if now - self.last_request > SHRINK_IDLE_S:
                self._shrink()

    def _shrink(self) -> None:
        """Idle: give kept buffers and the allocator's free pages back to the kernel."""
        if self.buffers.kept:
            self.buffers.shrink()
            self._trimmed = False
        if not self._trimmed:
            self._trimmed = True
            gc.collect()
            if _MALLOC_TRIM is not None:
                _MALLOC_TRIM(0)

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

    # -- faults --------------------------------------------------------------------------
    def fault(self, exc: BaseException, phase: str, request_id: Any = None) -> None:
        """One unexpected exception, contained: logged once, counted."""
        log.error("fault contained phase=%s request_id=%s: %s: %s", phase, request_id,
                  type(exc).__name__, exc, exc_info=exc)
        try:
            self.state.metrics.faults.labels(phase).inc()
        except Exception:  # pragma: no cover - metrics are best effort here
            pass

    def _loop_fault(self, exc: BaseException, handler: Any) -> None:
        """A loop handler raised: its owner (a connection, a leaf call) ends itself."""
        owner = getattr(handler, "__self__", None)
        contain = getattr(owner, "contain", None)
        if contain is None:
            self.fault(exc, "loop")
            return
        try:
            contain(exc)
        except Exception as again:  # pragma: no cover - containment itself failed
            self.fault(again, "loop")

    # -- accepting -----------------------------------------------------------------------
    def _accept_on(self) -> None:
        if not self._accepting and self._paused is None:
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
            if len(self.conns) >= self.settings.max_connections and not self._evict():
                self._accept_off()  # resumed when a connection closes
                return
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accept(exc)
                    return
                if exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                    raise
                continue
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(self, sock)
            self.conns.add(conn)
            conn.start()

    def _evict(self) -> bool:
        """Close the oldest silent connection to make room; False if there is none."""
        for conn in self.silent:
            conn.close()
            return True
        return False

    def _pause_accept(self, exc: OSError) -> None:
        """Out of descriptors or memory: stop accepting for a moment (the pending
        connection stays in the backlog), log once per pause, free a silent socket."""
        self.state.metrics.accept_pauses.inc()
        log.warning("accept failed (%s): not accepting for %.1f s; %d connections open",
                    exc.strerror or exc, ACCEPT_PAUSE_S, len(self.conns))
        self._evict()
        self._accept_off()
        self._paused = self.loop.call_at(self.loop.clock() + ACCEPT_PAUSE_S, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self.alive:
            self._accept_on()

    def closed(self, conn: Conn) -> None:
        self.conns.discard(conn)
        self.silent.pop(conn, None)
        if self.alive and not self._accepting and \
                len(self.conns) < self.settings.max_connections:
            self._accept_on()


def _bind_accept(worker: RootWorker, sock: Any) -> Any:
    return lambda mask: worker.accept(sock)


class Body:
    """Where one request's body goes: a pooled mapping, counted as its bytes arrive."""

    __slots__ = ("buf", "view", "got", "charged")

    def __init__(self) -> None:
        self.buf: Any = None
        self.view: memoryview | None = None
        self.got = 0
        self.charged = 0


class Conn:
    """One client connection (see the module docstring for its phases)."""

    def __init__(self, worker: RootWorker, sock: socket.socket) -> None:
        self.w = worker
        self.loop: Loop = worker.loop
        self.sock: socket.socket | None = sock
        s = worker.settings
        self.stream = RequestStream(s.max_header_bytes, s.max_request_bytes,
                                    on_body=self._sink, on_head=self._on_head)
        self.rx = bytearray()         # received, not yet parsed
        self.current: Message | None = None  # the request being served
        self.error: HttpError | None = None  # the stream's refusal, answered in its turn
        self.out: list[memoryview] = []
        self.keep = True
        self.phase = ""
        self.timer: Timer | None = None
        self.reader: Any = None       # the READ handler armed, or None
        self.soon = False             # a pump is queued on the loop
        self.served = 0
        self.scoring = False
        self.lingered = 0
        self.lowat = 1  # the socket's SO_RCVLOWAT: 1 except while a large body is read

    # -- deadlines -----------------------------------------------------------------------
    def _expect(self, phase: str) -> None:
        """Enter ``phase``: its deadline starts now (re-entering it keeps the deadline)."""
        if phase == self.phase:
            return
        self.phase = phase
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(self.loop.clock() + self.w.deadlines[phase],
                                       self._expired)
        if phase == "idle" or (phase == "head" and not self.served and not self.rx):
            self.w.silent[self] = None
        else:
            self.w.silent.pop(self, None)

    def _expired(self) -> None:
        self.timer = None
        phase = self.phase
        if self.sock is None:
            return
        if phase in ("idle", "answer", "linger") or (phase == "head" and self._silent()):
            self.close()
            return
        if phase == "scoring":  # the scorer never called back: a bug, contained
            self.scoring = False
            self._fault(RuntimeError("scoring did not finish by its backstop deadline"),
                        "scoring", abandon=True)
            return
        setting = "FT_HEADER_TIMEOUT" if phase == "head" else "FT_BODY_TIMEOUT"
        self._refuse(HttpError(408, "timeout", f"request {phase} not received within "
                               f"{setting}"))

    def _silent(self) -> bool:
        return self.stream.msg is None and not self.rx

    # -- reading -------------------------------------------------------------------------
    def start(self) -> None:
        self._expect("head")  # the head deadline runs from accept
        self._arm(self._read)

    def _arm(self, reader: Any) -> None:
        if self.reader is not reader and self.sock is not None:
            self.loop.watch(self.sock, READ, reader)
            self.reader = reader

    def _disarm(self) -> None:
        if self.reader is not None and self.sock is not None:
            self.loop.unwatch(self.sock)
        self.reader = None

    def _read(self, mask: int) -> None:
        sock = self.sock
        assert sock is not None
        try:
            data = sock.recv(HEAD_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        except Exception as exc:
            self._fault(exc, "read")
            return
        if not data:
            self._eof()
            return
        self.rx += data
        self.w.silent.pop(self, None)
        self._disarm()  # parsed in slices from the loop; read again once they are done
        self._pump()

    def _eof(self) -> None:
        """The client closed its side: what is half-sent is a truncated request."""
        if self._silent() and not self.stream.done:
            self.close()
            return
        msg = self.stream.msg
        if msg is not None and msg.headed:
            what = (f"body ended after {msg.received} of {msg.content_length} bytes"
                    if msg.content_length is not None else
                    f"chunked body ended after {msg.received} bytes without its last chunk")
        else:
            what = "connection closed in the middle of a request head"
        self.rx.clear()
        self.error = HttpError(400, "truncated", what)
        self.stream.closed = True
        self._pump()

    def _pump(self) -> None:
        """One bounded step of a connection's work, always started by the loop: parse one
        slice of the bytes received, or start one request, or wait for bytes."""
        self.soon = False
        if self.sock is None or self.current is not None:
            return
        try:
            self._step()
        except Exception as exc:
            self._fault(exc, "pump")

    def _step(self) -> None:
        stream = self.stream
        if self.rx and not stream.done and self.error is None:
            try:
                if not self._body_from_rx():
                    with memoryview(self.rx) as view, view[:FEED_SLICE] as piece:
                        stream.feed(piece)
                    del self.rx[:FEED_SLICE]
                    self._body_from_rx()
            except HttpError as exc:
                self.error = exc
                self.rx.clear()
            except Exception as exc:  # a fault of on_head or of the body sink
                msg = stream.msg
                self._fault(exc, "body" if msg is not None and msg.headed else "head")
                return
        if stream.done:
            self._serve(stream.done.popleft())
            return
        if self.error is not None:
            self._refuse(self.error)
            return
        if self.rx:
            self._again()
            return
        if stream.closed:  # an upgrade request was answered: nothing more is read
            self.close()
            return
        msg = stream.msg
        if msg is not None and msg.headed:
            self._expect("body")
            if msg.body_rest:
                self._rcvlowat(self._body_lowat(msg))
                self._arm(self._read_direct)
                return
        else:
            self._expect("idle" if msg is None and self.served else "head")
        self._arm(self._read)

    def _again(self) -> None:
        if not self.soon:
            self.soon = True
            self.loop.call_soon(self._pump)

    def _on_head(self, msg: Message) -> None:
        """llhttp accepted a head (called while parsing)."""
        faults.check(faults.phase_of(msg.headers), "head")
        if msg.expect_continue and not self.stream.done and self.sock is not None:
            try:  # only the request at the front may be told to go on
                self.sock.send(CONTINUE)
            except OSError:
                pass

    # -- bodies --------------------------------------------------------------------------
    def _body(self, msg: Message, need: int) -> Body:
        """``msg``'s body buffer, holding at least ``need`` bytes (mapped, not counted:
        a fresh mapping costs no memory until written)."""
        body = msg.store
        if body is None:
            body = msg.store = Body()
        if body.buf is not None and len(body.buf) >= need:
            return body
        cl = msg.content_length
        old = len(body.buf) if body.buf is not None else 0
        size = cl if cl is not None else min(max(need, 2 * old, MIN_BUFFER),
                                             self.w.settings.max_request_bytes)
        new = self.w.buffers.take(max(size, need), charge=0)
        if new is None:
            self._no_room(need)
        if body.buf is not None:
            assert body.view is not None
            new[:body.got] = body.view[:body.got]
            self._give(body)
        body.buf, body.view = new, memoryview(new)
        return body

    def _count(self, body: Body) -> None:
        """Count the bytes written so far against the cap (in steps)."""
        if body.got <= body.charged:
            return
        target = min(len(body.buf), -(-body.got // CHARGE_STEP) * CHARGE_STEP)
        if not self.w.buffers.charge(target - body.charged):
            self._no_room(body.got)
        body.charged = target

    def _no_room(self, need: int) -> None:
        raise HttpError(503, "overloaded", f"no buffer for a {need}-byte body: the worker "
                        "holds FT_MAX_BUFFER_BYTES already; retry later")

    def _sink(self, msg: Message, data: bytes | memoryview) -> None:
        """Body bytes llhttp framed (the first bytes of a body, or a chunked body)."""
        faults.check(faults.phase_of(msg.headers), "body")
        store = msg.store
        got = store.got if store is not None else 0
        body = self._body(msg, got + len(data))
        assert body.view is not None
        body.view[got:got + len(data)] = data
        body.got = got + len(data)
        self._count(body)

    def _body_from_rx(self) -> bool:
        """The bytes received with a head that belong to its Content-Length body: copied
        into the body buffer in one move (llhttp need not see them); False if the stream is
        not inside such a body."""
        msg = self.stream.msg
        if msg is None or not msg.headed or not msg.body_rest or not self.rx:
            return False
        take = min(len(self.rx), msg.body_rest)
        with memoryview(self.rx) as view, view[:take] as piece:
            self._sink(msg, piece)
        del self.rx[:take]
        self.stream.body_arrived(take)
        return True

    def _read_direct(self, mask: int) -> None:
        """The rest of a Content-Length body, straight from the socket into its buffer."""
        sock, msg = self.sock, self.stream.msg
        assert sock is not None and msg is not None and msg.content_length is not None
        try:
            body = self._body(msg, msg.content_length)
            assert body.view is not None
            n = sock.recv_into(body.view[body.got:msg.content_length])
            if n:
                body.got += n
                faults.check(faults.phase_of(msg.headers), "body")
                self._count(body)  # counted as it arrived (HttpError 503 past the cap)
        except (BlockingIOError, InterruptedError):
            return
        except HttpError as exc:
            self._refuse(exc)
            return
        except OSError:
            self.close()
            return
        except Exception as exc:
            self._fault(exc, "body")
            return
        if not n:
            self._eof()
            return
        self.stream.body_arrived(n)
        if msg.complete:
            self._rcvlowat(1)
            self._disarm()
            self._pump()
        else:
            self._rcvlowat(self._body_lowat(msg))

    @staticmethod
    def _body_lowat(msg: Message) -> int:
        """The SO_RCVLOWAT for the rest of a Content-Length body: BODY_RCVLOWAT, never more
        than the rest (the kernel must report the last bytes); 1 for a rest of at most
        HEAD_RECV."""
        rest = msg.body_rest
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

    def _give(self, body: Body, reuse: bool = True) -> None:
        if body.view is not None:
            body.view.release()
            body.view = None
        if body.buf is not None:
            self.w.buffers.give(body.buf, body.charged, reuse)
            body.buf = None
            body.charged = 0

    def _release(self, msg: Message | None, reuse: bool = True) -> None:
        if msg is not None and isinstance(msg.store, Body):
            self._give(msg.store, reuse)

    # -- serving -------------------------------------------------------------------------
    def _serve(self, msg: Message) -> None:
        self.current = msg
        self.keep = msg.keep_alive
        self._disarm()
        method = _GET_LIKE.get(msg.method, msg.method)
        try:
            inject = faults.phase_of(msg.headers)
            faults.check(inject, "dispatch")
            self.w.wsgi.route(method, msg.path)  # raises BadRequest (404/405)
            if method == "POST":
                if msg.content_length is None and not msg.chunked:
                    raise HttpError(411, "length_required", "a Content-Length (or chunked "
                                    "body) is required")
            elif msg.chunked or msg.content_length:
                raise HttpError(400, "unexpected_body", f"{msg.method} {msg.path} takes no "
                                "body")
            if msg.path == "/score":
                self.w.last_request = time.monotonic()  # (health checks keep nothing)
                body = msg.store
                view = body.view[:body.got] if isinstance(body, Body) and \
                    body.view is not None else memoryview(b"")
                self.scoring = True
                self._expect("scoring")
                self.w.scorer.begin(view, msg.query, self.loop,
                                    lambda status, doc: self._scored(msg, status, doc),
                                    inject=inject)
                return
            self._answer(*self.w.wsgi.serve(method, msg.path, msg.query))
        except BadRequest as exc:
            self.scoring = False
            self._answer(*error_body(exc.status, exc.code, exc.message))
        except Exception as exc:
            started = self.scoring
            self.scoring = False
            self._fault(exc, "dispatch", abandon=started)

    def _scored(self, msg: Message, status: int, doc: dict[str, Any]) -> None:
        if msg is not self.current or not self.scoring:
            return  # abandoned (its backstop fired): the connection answered already
        self.scoring = False
        try:
            answer = answer_body(status, doc)
        except Exception as exc:
            self._fault(exc, "answer")
            return
        self._answer(*answer)

    def _refuse(self, exc: HttpError) -> None:
        """Answer the stream's refusal (or a deadline): the connection then closes."""
        self.error = None
        self.stream.closed = True
        self.keep = False
        self.current = self.stream.msg or Message()
        self.stream.msg = None
        self._answer(*error_body(exc.status, exc.code, exc.message))

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        msg = self.current
        if msg is not None and msg.path == "/score":
            self.w.state.metrics.answered(status)
        self._release(msg)
        if self.sock is None:
            return
        minor = msg.minor if msg is not None else 1
        head = response_head(status, status_text(status), headers, len(body), self.keep,
                             minor)
        self.out = [memoryview(head)] if msg is not None and msg.is_head else \
            [memoryview(head), memoryview(body)]
        self._expect("answer")
        self._write(WRITE)

    def _write(self, mask: int) -> None:
        sock = self.sock
        if sock is None:
            return
        out = self.out
        try:
            if self.current is not None:
                faults.check(faults.phase_of(self.current.headers), "write")
            while out:
                try:
                    n = sock.sendmsg(out)
                except (BlockingIOError, InterruptedError):
                    self.loop.watch(sock, WRITE, self._write)
                    self.reader = self._write
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
        except Exception as exc:
            self.out = []
            self._fault(exc, "write", answered=True)
            return
        self._written()

    def _written(self) -> None:
        if self.reader is self._write:
            self._disarm()
        self.current = None
        self.served += 1
        if not self.keep:
            self._linger() if self._partial() else self.close()
            return
        self._again()  # the next request starts from the loop, not from here

    def _partial(self) -> bool:
        """Request bytes may still be on their way (the answer went out early)."""
        return bool(self.rx) or self.stream.msg is not None or self.error is not None or \
            (self.stream.closed and not self.stream.done)

    def _fault(self, exc: BaseException, phase: str, answered: bool = False,
               abandon: bool = False) -> None:
        """An unexpected exception while serving this connection: log and count it once,
        answer 500 if no answer had started, then close. Nothing else is touched."""
        msg = self.current or self.stream.msg
        self.w.fault(exc, phase, msg.request_id if msg is not None else None)
        if self.sock is None:
            return
        if abandon:  # leaf calls may still read the body: never reuse its buffer
            self._release(msg, reuse=False)
        if answered or self.phase == "answer":
            self.close()
            return
        self.keep = False
        self.stream.closed = True
        self.current = msg or Message()
        try:
            self._answer(*error_body(500, "internal", "internal error (logged)"))
        except Exception:
            self.close()

    def contain(self, exc: BaseException) -> None:
        """An exception escaped one of this connection's handlers (the loop's backstop)."""
        self._fault(exc, self.phase or "loop", abandon=self.scoring)

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
        self._release(self.stream.msg)
        self._expect("linger")  # expiry closes
        self._arm(self._drop_input)

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
        self.reader = None
        if not self.scoring:  # leaf calls in flight still read the body: they drop it
            self._release(self.current)
        self._release(self.stream.msg)
        for msg in self.stream.done:
            self._release(msg)
        self.stream.done.clear()
        self.w.closed(self)
