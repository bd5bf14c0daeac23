"""The parse worker: big bundle files are parsed and compiled in a child process.

The daemon's main loop (parent) owns a :class:`ParseWorker`; the child runs
:func:`_serve`. A 60 MB file of a million tiny models takes seconds of pure-Python and
GIL-holding C work and hundreds of MB: in the main loop it would stop the heartbeat, the
watchdog and every other bundle's updates (issue #11, item 4). In the child it stops
nothing, and its memory has a hard bound: the child sets ``RLIMIT_DATA`` to
``max_parse_memory`` on itself, so a file that needs more fails with a clear
:class:`BundleError` (the child's ``MemoryError``) instead of swapping the host or waking
the OOM killer.

Protocol (one job at a time, parent side non-blocking except for the pipe copies): the
child first says ``"ready"`` (its imports take a second or two on a busy host: the parent
must not block on a pipe nobody reads meanwhile, so a job submitted before that waits in
the parent); then ``submit()`` sends ``(job_id, path, limits, bundle_index)`` and the file
bytes, and the child answers ``(job_id, BundlePart | BundleError)``. The parent waits on
:meth:`fileno` in its ``select()`` and calls :meth:`collect`. Every job has a deadline
(``timeout_s``): a child that exceeds it, or dies, is killed and the job fails with an error
naming the file; the next job starts a fresh child. The child is started lazily with the
``spawn`` method (a clean interpreter: no inherited locks, fds or threads of the daemon).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import resource
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


class ParseWorker:
    """Parent side of the parse worker. Main loop only; not thread-safe."""

    def __init__(self, max_memory: int, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.max_memory = max_memory
        self.timeout_s = timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._job: Job | None = None
        self._ready = False  # the child said "ready": sending cannot block on its imports
        self._unsent: tuple[tuple[int, str, Limits, int], bytes] | None = None
        self._next_id = 0
        self.restarts = 0

    @property
    def busy(self) -> Job | None:
        """The job in flight, if any."""
        return self._job

    def fileno(self) -> int:
        """Readable when the job's answer arrived; -1 when no job is in flight."""
        return self._conn.fileno() if self._conn is not None and self._job else -1

    def deadline(self) -> float | None:
        return self._job.started + self.timeout_s if self._job else None

    def submit(self, name: str, data: bytes, *, path: str, limits: Limits,
               bundle_index: int) -> Job:
        """Start parsing ``data`` (the bytes of ``path``); one job at a time."""
        assert self._job is None, "one parse job at a time"
        self._ensure_child()
        assert self._conn is not None
        self._next_id += 1
        job = Job(self._next_id, name, path, time.monotonic())
        self._job, self._unsent = job, ((job.job_id, path, limits, bundle_index), data)
        if self._ready:
            self._send()
        return job

    def _send(self) -> None:
        assert self._conn is not None and self._unsent is not None and self._job is not None
        (header, data), self._unsent = self._unsent, None
        try:
            self._conn.send(header)
            self._conn.send_bytes(data)
        except OSError as exc:
            path = self._job.path
            self._kill(f"send failed: {exc}")
            raise BundleError(path, "$", f"parse worker unavailable: {exc}") from None

    def collect(self) -> tuple[Job, BundlePart | BundleError] | None:
        """The finished job and its result, or None if not finished (never blocks long:
        call when :meth:`fileno` is readable or the deadline passed)."""
        job, conn = self._job, self._conn
        if job is None or conn is None:
            return None
        if time.monotonic() >= job.started + self.timeout_s:
            self._kill(f"parse of {job.path} exceeded {self.timeout_s:.0f}s")
            return job, BundleError(job.path, "$", f"parse took longer than "
                                    f"{self.timeout_s:.0f}s; the parse worker was killed")
        if not conn.poll(0):
            return None
        try:
            message = conn.recv()
            if message == "ready":
                self._ready = True
                if self._unsent is not None:
                    self._send()
                return None
            job_id, result = message
        except BundleError as exc:  # _send() failed: the job is over
            return job, exc
        except (EOFError, OSError) as exc:
            code = self._proc.exitcode if self._proc is not None else None
            self._kill(f"died: {exc!r}")
            return job, BundleError(job.path, "$", f"parse worker died (exit code {code}); "
                                    "memory bound max_parse_memory or a crash")
        self._job = None
        if job_id != job.job_id:  # cannot happen with one job at a time; never trust it
            self._kill("answered the wrong job")
            return job, BundleError(job.path, "$", "parse worker answered the wrong job")
        return job, result

    def close(self) -> None:
        """Stop the child (if any). Idempotent."""
        self._job, self._unsent, self._ready = None, None, False
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            conn.close()  # the child's recv() gets EOF and it exits
        if proc is not None:
            proc.join(_JOIN_S)
            if proc.is_alive():
                proc.kill()
                proc.join(_JOIN_S)

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

    def _kill(self, why: str) -> None:
        if self._proc is not None:
            log.warning("parse worker pid=%s stopped: %s", self._proc.pid, why)
            self.restarts += 1
            self._proc.kill()
            self._proc.join(_JOIN_S)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self._job, self._unsent, self._ready = None, None, False


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
