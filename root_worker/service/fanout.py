"""Fan-out to leaves: kept-alive HTTP/1.1 connections and concurrent sends with a deadline.

Runs in each root worker, created lazily after fork (no sockets or threads exist before the
first request). :class:`LeafPool` keeps idle connections per leaf endpoint and reuses them;
a reused connection that turns out to have been closed by the leaf (idle timeout, restart)
is retried once on a fresh one, which is safe because scoring is idempotent. Every failure
becomes a :class:`LeafError` with a ``kind`` that metrics and responses use:

==============  ==============================================================
kind            meaning
==============  ==============================================================
``no_route``    the routing file has no leaf for the model
``connect``     no leaf replica accepted a connection
``timeout``     the target took longer than ``FT_LEAF_TIMEOUT``
``io``          the connection broke while sending or receiving
``status``      the leaf answered with a non-2xx status (its message is kept)
``bad_reply``   the leaf's answer is not the JSON object expected
==============  ==============================================================

:class:`Fanout` runs one job per target on a small per-worker thread pool and waits for all
of them until a deadline; a job still running then yields a ``timeout`` error for its
target while the others' results are returned.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from root_worker.service.routing import Endpoint

T = TypeVar("T")
MAX_IDLE_PER_ENDPOINT = 16
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
          http.client.BadStatusLine)


class LeafError(Exception):
    """One target failed; ``kind`` is a short stable label (see the module docstring)."""

    def __init__(self, kind: str, message: str, status: int = 0,
                 abandoned: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.abandoned = abandoned  # the job still runs: its body buffer is still in use

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "message": self.message}
        if self.status:
            out["status"] = self.status
        return out


class LeafPool:
    """Idle keep-alive connections per endpoint (thread-safe; one pool per worker)."""

    def __init__(self, max_idle: int = MAX_IDLE_PER_ENDPOINT) -> None:
        self._idle: dict[tuple[str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._max_idle = max_idle
        self.connects = 0  # new connections opened (a keep-alive health figure)

    def _take(self, ep: Endpoint, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get((ep.host, ep.port))
            conn = idle.pop() if idle else None
        if conn is not None and conn.sock is not None:
            conn.sock.settimeout(timeout)
            return conn, True
        self.connects += 1
        return http.client.HTTPConnection(ep.host, ep.port, timeout=timeout), False

    def _give(self, ep: Endpoint, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault((ep.host, ep.port), [])
            if len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()

    def post(self, ep: Endpoint, path: str, body: Any, headers: Mapping[str, str],
             deadline: float) -> tuple[int, bytes]:
        """POST ``body`` to ``ep`` and return ``(status, response body)``.

        ``deadline`` is a ``time.monotonic()`` instant. Raises :class:`LeafError`.
        """
        for attempt in (0, 1):
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise LeafError("timeout", f"{ep.url}: deadline passed before sending")
            conn, reused = self._take(ep, timeout)
            try:
                conn.request("POST", ep.base_path + path, body=body, headers=dict(headers))
                resp = conn.getresponse()
                data = resp.read()
            except _STALE as exc:
                conn.close()
                if reused and attempt == 0:
                    continue  # the leaf closed an idle keep-alive connection: retry fresh
                raise LeafError("io", f"{ep.url}: connection lost: {_describe(exc)}") from None
            except TimeoutError:
                conn.close()
                raise LeafError("timeout", f"{ep.url}: no answer within "
                                f"{timeout:.3g}s") from None
            except ConnectionRefusedError as exc:
                conn.close()
                raise LeafError("connect", f"{ep.url}: {_describe(exc)}") from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise LeafError("io", f"{ep.url}: {_describe(exc)}") from None
            if resp.will_close:
                conn.close()
            else:
                self._give(ep, conn)
            return resp.status, data
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


def post_to_replicas(pool: LeafPool, endpoints: Sequence[Endpoint], path: str, body: Any,
                     headers: Mapping[str, str], deadline: float) -> tuple[Endpoint, int, bytes]:
    """Try the replicas in order, moving on only when one refuses the connection."""
    if not endpoints:
        raise LeafError("no_route", "no leaf is routed for this model")
    last: LeafError | None = None
    for ep in endpoints:
        try:
            status, data = pool.post(ep, path, body, headers, deadline)
        except LeafError as exc:
            if exc.kind != "connect":
                raise
            last = exc
            continue
        return ep, status, data
    assert last is not None
    raise last


class Fanout:
    """Run per-target jobs concurrently on a lazily created per-worker thread pool."""

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self._threads,
                                                        thread_name_prefix="fanout")
        return self._executor

    def run(self, jobs: Sequence[Callable[[], T]],
            timeout: float) -> list[T | BaseException]:
        """Each job's result or exception, in order; jobs not done by ``timeout`` seconds
        yield a ``LeafError('timeout')`` (they finish in the background)."""
        if len(jobs) == 1:  # no thread hop for the common single-target request
            return [_call(jobs[0])]
        futures: list[Future[T]] = [self._pool().submit(job) for job in jobs]
        wait(futures, timeout=timeout)
        out: list[T | BaseException] = []
        for fut in futures:
            if fut.done():
                exc = fut.exception()
                out.append(exc if exc is not None else fut.result())
            else:
                out.append(LeafError("timeout", f"no answer within {timeout:.3g}s",
                                     abandoned=not fut.cancel()))
        return out

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _call(job: Callable[[], T]) -> T | BaseException:
    try:
        return job()
    except Exception as exc:  # the caller turns it into a per-target error
        return exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
