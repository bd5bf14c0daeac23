"""The parse worker: big bundle files are parsed and compiled in a child process.

The daemon's main loop (parent) owns a :class:`ParseWorker`; the child runs
:func:`_serve`. A 60 MB file of a million tiny models takes seconds of pure-Python and
GIL-holding C work and hundreds of MB: in the main loop it would stop the heartbeat, the
watchdog and every other bundle's updates (issue #11, item 4). In the child it stops
nothing, and its memory has a hard bound: the child sets ``RLIMIT_DATA`` to
``max_parse_memory`` on itself, so a file that needs more fails with a clear
:class:`BundleError` (the child's ``MemoryError``) instead of swapping the host or waking
the OOM killer.

Protocol (one job at a time): the child first says ``"ready"`` (its imports take a second
or two on a busy host); then the parent sends ``(job_id, path, limits, bundle_index)`` and
the file bytes, and the child answers ``(job_id, BundlePart | BundleError)``. The parent's
main loop never touches the pipe: each job's traffic (waiting for "ready", sending up to
64 MB, receiving a result of hundreds of MB) runs in a :class:`_Transfer` thread, which ends
by writing a byte to a wake pipe. The main loop waits on :meth:`fileno` (that wake pipe) in
its ``select()`` and calls :meth:`collect`, which never blocks. Every job has a deadline
(``timeout_s``): a child that exceeds it -- busy, stopped, or wedged half-way through a pipe
copy -- or dies is killed and the job fails with an error naming the file; the child's death
ends the transfer's blocking send or receive, and the next job starts a fresh child. The
child is started lazily with the ``spawn`` method (a clean interpreter: no inherited locks,
fds or threads of the daemon).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any

from trimmer_daemon.bundle.parse import BundleError, Limits
from trimmer_daemon.parts import BundlePart, build_part

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
"""A parse that takes longer than this is killed (far beyond the 64 MB file limit's ~10 s)."""
_JOIN_S = 2.0
"""How long a stopped child may take to exit before it is killed."""


@dataclass(frozen=True)
class Job:
    job_id: int
    name: str
    path: str
    started: float  # monotonic


class _Transfer(threading.Thread):
    """One job's pipe traffic, off the main loop: wait for the child's ``"ready"`` (a new
    child), send the job and the file bytes, receive the answer; then write a byte to the
    wake pipe. Only the kill of the child (at the job's deadline) ends a blocked send or
    receive, so the parent closes the pipe only after this thread is gone."""

    def __init__(self, conn: multiprocessing.connection.Connection, header: tuple[Any, ...],
                 data: bytes, need_ready: bool, wake_w: int) -> None:
        super().__init__(name="trimmer-parse-transfer", daemon=True)
        self.conn, self.header, self.data = conn, header, data
        self.need_ready, self.wake_w = need_ready, wake_w
        self.answer: Any = None
        self.error: BaseException | None = None
        self.delivered = False  # the child got the whole job (a failure after is the job's)

    def run(self) -> None:
        try:
            if self.need_ready and self.conn.recv() != "ready":
                raise EOFError("the parse worker did not start with 'ready'")
            self.conn.send(self.header)
            self.conn.send_bytes(self.data)
            self.delivered = True
            self.data = b""  # kept only for a re-send: up to max_file_bytes, not held longer
            self.answer = self.conn.recv()
        except BaseException as exc:  # noqa: BLE001 - handed to collect() on the main loop
            self.error = exc
        finally:
            try:
                os.write(self.wake_w, b"!")
            except OSError:  # the worker was closed meanwhile: nobody waits
                pass


class ParseWorker:
    """Parent side of the parse worker. Main loop only; not thread-safe."""

    def __init__(self, max_memory: int, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.max_memory = max_memory
        self.timeout_s = timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._job: Job | None = None
        self._ready = False  # the child's "ready" was received
        self._xfer: _Transfer | None = None
        self._retried = False  # the job in flight was re-sent to a fresh worker once
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._next_id = 0
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """The child's pid while one runs (logs, on-call)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def busy(self) -> Job | None:
        """The job in flight, if any."""
        return self._job

    def fileno(self) -> int:
        """Readable when the job's transfer ended; -1 when no job is in flight."""
        return self._wake_r if self._job is not None else -1

    def deadline(self) -> float | None:
        return self._job.started + self.timeout_s if self._job else None

    def submit(self, name: str, data: bytes, *, path: str, limits: Limits,
               bundle_index: int) -> Job:
        """Start parsing ``data`` (the bytes of ``path``); one job at a time. Never blocks
        on the pipe (the transfer thread does)."""
        assert self._job is None, "one parse job at a time"
        self._ensure_child()
        assert self._conn is not None
        self._next_id += 1
        job = Job(self._next_id, name, path, time.monotonic())
        self._job, self._retried = job, False
        self._start_transfer((job.job_id, path, limits, bundle_index), data)
        return job

    def _start_transfer(self, header: tuple[Any, ...], data: bytes) -> None:
        assert self._conn is not None
        self._xfer = _Transfer(self._conn, header, data, not self._ready, self._wake_w)
        self._xfer.start()

    def collect(self) -> tuple[Job, BundlePart | BundleError] | None:
        """The finished job and its result, or None if not finished (never blocks: call
        when :meth:`fileno` is readable or the deadline passed)."""
        job, xfer = self._job, self._xfer
        if job is None or xfer is None:
            return None
        if xfer.is_alive():
            if time.monotonic() < job.started + self.timeout_s:
                return None
            self._kill(f"parse of {job.path} exceeded {self.timeout_s:.0f}s")
            return job, BundleError(job.path, "$", f"parse took longer than "
                                    f"{self.timeout_s:.0f}s; the parse worker was killed")
        self._drain_wake()
        if xfer.error is not None and not xfer.delivered and not self._retried:
            # The worker was gone before the job reached it (it died between jobs): once
            # more on a fresh one. A file that kills the worker fails below, parsed once.
            self._kill(f"found dead: {xfer.error!r}")
            self._ensure_child()
            self._job, self._retried = job, True
            self._start_transfer(xfer.header, xfer.data)
            return None
        self._job = self._xfer = None
        if xfer.error is not None:
            code = self._proc.exitcode if self._proc is not None else None
            self._kill(f"died: {xfer.error!r}")
            return job, BundleError(job.path, "$", f"parse worker died (exit code {code}); "
                                    "memory bound max_parse_memory or a crash")
        self._ready = True
        try:
            job_id, result = xfer.answer
        except (TypeError, ValueError):
            job_id, result = None, None
        if job_id != job.job_id or not isinstance(result, (BundlePart, BundleError)):
            self._kill("answered the wrong job")  # cannot happen; never trust it
            return job, BundleError(job.path, "$", "parse worker answered the wrong job")
        return job, result

    def close(self) -> None:
        """Stop the child (if any) and free the wake pipe. Idempotent."""
        if self._proc is not None or self._conn is not None:
            self._stop_child()
        stuck = self._xfer is not None and self._xfer.is_alive()
        self._job = self._xfer = None
        self._ready = False
        if stuck:  # (see _join_transfer) it may still write the wake byte: keep the pipe
            return
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- child lifecycle ------------------------------------------------------------------

    def _ensure_child(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._kill("not running")
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_serve, args=(child, self.max_memory),
                                 name="trimmer-parse-worker", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn, self._ready = proc, parent, False
        log.info("parse worker started pid=%d max_memory=%d", proc.pid, self.max_memory)

    def _stop_child(self) -> None:
        """A graceful stop: closing the pipe gives the child's recv() EOF (the transfer
        thread is gone or blocked only on a child we then kill)."""
        proc, xfer = self._proc, self._xfer
        if xfer is not None and xfer.is_alive() and proc is not None:
            proc.kill()  # mid-job: nothing to finish gracefully
        self._join_transfer()  # (leaves _conn None rather than close it under the thread)
        conn, self._conn, self._proc = self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.join(_JOIN_S)
            if proc.is_alive():
                proc.kill()
                proc.join(_JOIN_S)

    def _kill(self, why: str) -> None:
        if self._proc is not None:
            log.warning("parse worker pid=%s stopped: %s", self._proc.pid, why)
            self.restarts += 1
            self._proc.kill()
            self._proc.join(_JOIN_S)
        self._join_transfer()
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self._job = self._xfer = None
        self._ready = False
        self._drain_wake()

    def _join_transfer(self) -> None:
        """Wait for the transfer thread, which the child's death has unblocked; the pipe's
        fd must not be closed (and reused) under a thread still using it."""
        xfer = self._xfer
        if xfer is not None:
            xfer.join(_JOIN_S)
            if xfer.is_alive():  # cannot happen once the child is dead; never reuse its fd
                log.error("parse transfer thread still blocked after the child's kill; "
                          "leaking its pipe rather than closing it under the thread")
                self._conn = None

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except (BlockingIOError, OSError):
            pass


def _serve(conn: multiprocessing.connection.Connection, max_memory: int) -> None:
    """Child process: parse jobs until the parent closes the pipe."""
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (max_memory, max_memory))
        refusal = ""
    except (OSError, ValueError) as exc:  # e.g. a seccomp filter without setrlimit
        refusal = (f"the parse memory bound (max_parse_memory={max_memory}) cannot be "
                   f"enforced: setrlimit(RLIMIT_DATA) failed: {exc}; not parsing")
    conn.send("ready")  # our imports are done
    while True:
        try:
            job_id, path, limits, bundle_index = conn.recv()
            data = conn.recv_bytes()
        except EOFError:
            return
        result: BundlePart | BundleError
        try:
            if refusal:
                raise BundleError(path, "$", refusal)
            result = build_part(data, path=path, limits=limits, bundle_index=bundle_index)
        except BundleError as exc:
            result = exc
        except MemoryError:
            result = BundleError(path, "$", f"parsing needs more memory than the parse memory "
                                 f"limit of {max_memory} bytes (max_parse_memory)")
        del data
        conn.send((job_id, result))
