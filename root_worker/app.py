"""The root service's WSGI application: ``POST /score``, health, readiness and metrics.

``gunicorn -c python:root_worker.gunicorn_conf root_worker.app:app``. Importing this module
creates :data:`app` but touches no shared memory, socket or thread: each worker imports it
after fork, and the gunicorn ``post_worker_init`` hook calls :meth:`RootApp.start_worker`,
which attaches the map at once (a worker started any other way does so on its first
request). The default worker class (:mod:`root_worker.service.worker`) calls
:meth:`RootApp.route` / :meth:`RootApp.serve` and drives ``POST /score`` on its event loop;
under ``FT_WORKER_CLASS=gthread`` or ``sync`` the same handlers answer through WSGI
(:meth:`RootApp.__call__`). Routes:

``POST /score``   a frame (body) and its targets -> per-target scores or errors (JSON)
``GET /healthz``  liveness, always 200: pid, generation served, map and heartbeat age,
                  ``status`` ``ok`` or ``degraded`` (no map, stale daemon heartbeat, routing
                  unusable) with the reasons
``GET /readyz``   200 once a map is attached, or once ``FT_READY_MAX_WAIT`` seconds passed
                  since the worker started (it then serves untrimmed); 503 before
``GET /metrics``  Prometheus text merged from all workers

Request and response formats: ``docs/root-service.md``. Every error answer is JSON
``{"error": {"code": ..., "message": ...}}``; an unexpected exception is a 500 for that
request, never a dead worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from root_worker.featuremap.live_map import LiveMap
from root_worker.frame.backends import describe_backend
from root_worker.service.http1 import Answer, error_body, json_body, status_text
from root_worker.service.metrics import RootMetrics
from root_worker.service.routing import Routing, RoutingError
from root_worker.service.score import BadRequest, Scorer
from root_worker.service.settings import Settings, load_settings

log = logging.getLogger("root_worker")
StartResponse = Callable[..., Any]
READ_CHUNK = 1 << 20


class WorkerState:
    """Per-process state, built after fork (see :meth:`RootApp.state`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.monotonic()
        self.routing_error: str | None = None
        try:
            routing = Routing.load(settings.routing) if settings.routing else Routing.empty()
        except RoutingError as exc:
            log.critical("routing unusable, every target will fail: %s", exc)
            self.routing_error, routing = str(exc), Routing.empty()
        self.live_map = LiveMap(settings.shm_name)
        self.metrics = RootMetrics(routing.listed)
        self.metrics.set_mode(settings.mode, settings.lz4)
        self.scorer = Scorer(settings, self.live_map, routing, self.metrics)
        self.trim_backend = describe_backend(self.scorer.trimmer.backend)
        if self.trim_backend["backend"] != "c":
            log.warning("trim backend: %s", self.trim_backend["reason"])
        self.metrics.set_trim_backend(self.trim_backend["backend"], self.trim_backend["kernel"])
        self.connections: Callable[[], int] | None = None  # set by the event worker

    def refresh_map(self) -> None:
        lm = self.live_map
        lm.current()
        self.metrics.set_map(lm.generation, lm.published_at_ns, time.time_ns(), lm.map_errors)


class RootApp:
    """The WSGI callable. ``settings`` default to the environment (read on first use)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._state: WorkerState | None = None
        self._lock = threading.Lock()

    def state(self) -> WorkerState:
        state = self._state
        if state is None:
            with self._lock:
                if self._state is None:
                    self._state = WorkerState(self._settings or load_settings())
                state = self._state
        return state

    def start_worker(self) -> None:
        """Build the worker's state and attach the map now (gunicorn post_worker_init)."""
        state = self.state()
        state.refresh_map()
        log.info("root worker ready pid=%d generation=%d mode=%s lz4=%s", os.getpid(),
                 state.live_map.generation, state.settings.mode, state.settings.lz4)

    @staticmethod
    def route(method: str, path: str) -> Callable[..., Answer]:
        """The handler of ``method path``; raises BadRequest 404/405."""
        handler = ROUTES.get(path)
        if handler is None:
            raise BadRequest(404, "not_found", f"no such path {path[:200]!r}; try POST "
                             "/score, GET /healthz, /readyz or /metrics")
        if method not in handler[0]:
            raise BadRequest(405, "method_not_allowed",
                             f"{path} accepts {' or '.join(handler[0])}, not {method[:20]}")
        return handler[1]

    def serve(self, method: str, path: str, query: str) -> Answer:
        """Answer a bodiless request (the event worker's health, readiness and metrics)."""
        return self.route(method, path)(self, {"REQUEST_METHOD": method, "PATH_INFO": path,
                                               "QUERY_STRING": query})

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "")
        try:
            status, headers, body = self.route(method, path)(self, environ)
        except BadRequest as exc:
            status, headers, body = error_body(exc.status, exc.code, exc.message)
        except Exception:  # a bug: answer 500, keep the worker
            log.exception("unhandled error method=%s path=%s", method, path)
            status, headers, body = error_body(500, "internal", "internal error (logged)")
        if path == "/score":
            self.state().metrics.answered(status)
        headers.append(("Content-Length", str(len(body))))
        start_response(f"{status} {status_text(status)}", headers)
        return [body]

    # -- handlers ------------------------------------------------------------------------
    def score(self, environ: dict[str, Any]) -> Answer:
        state = self.state()
        body = _read_body(environ, state.settings.max_request_bytes)
        status, doc = state.scorer.score(body, environ.get("QUERY_STRING", ""))
        return json_body(status, doc)

    def healthz(self, environ: dict[str, Any]) -> Answer:
        return json_body(200, self.health())

    def health(self) -> dict[str, Any]:
        state = self.state()
        state.refresh_map()
        lm, s = state.live_map, state.settings
        now_ns = time.time_ns()
        control = lm.reader.control()
        beat_age = (now_ns - control.heartbeat_ns) / 1e9 if control and control.heartbeat_ns \
            else None
        reasons = []
        if lm.generation == 0:
            reasons.append("no map attached: targets pass through untrimmed")
        if beat_age is None or beat_age > s.heartbeat_stale:
            reasons.append("daemon heartbeat missing or stale")
        if state.routing_error:
            reasons.append(f"routing: {state.routing_error}")
        stats = lm.reader.stats
        bufs = state.scorer.buffers
        return {
            "status": "degraded" if reasons else "ok", "reasons": reasons,
            "pid": os.getpid(), "generation": lm.generation,
            "map_age_seconds": (now_ns - lm.published_at_ns) / 1e9 if lm.generation else None,
            "heartbeat_age_seconds": beat_age,
            "daemon_pid": control.heartbeat_pid if control else None,
            "published_generation": control.generation if control else None,
            "mode": s.mode, "lz4": s.lz4, "shm_name": s.shm_name,
            "trim_backend": state.trim_backend,
            "uptime_seconds": time.monotonic() - state.started,
            "map_errors": lm.map_errors,
            "reader": {"attaches": stats.attaches, "verify_failures": stats.verify_failures,
                       "attach_errors": stats.attach_errors, "last_error": stats.last_error},
            "leaf_connections_opened": state.scorer.pool.connects,
            "client_connections": state.connections() if state.connections else None,
            "buffers": {"cap": bufs.cap, "in_use": bufs.in_use, "kept": bufs.kept,
                        "peak": bufs.peak, "refused": bufs.refused},
        }

    def readyz(self, environ: dict[str, Any]) -> Answer:
        state = self.state()
        state.refresh_map()
        waited = time.monotonic() - state.started
        attached = state.live_map.generation > 0
        ready = attached or waited >= state.settings.ready_max_wait
        why = ("map attached" if attached else
               "no map after FT_READY_MAX_WAIT: serving untrimmed" if ready else
               "waiting for the daemon's map")
        return json_body(200 if ready else 503, {"ready": ready, "reason": why,
                                             "generation": state.live_map.generation,
                                             "pid": os.getpid()})

    def metrics(self, environ: dict[str, Any]) -> Answer:
        state = self.state()
        state.refresh_map()
        body, content_type = state.metrics.render()
        return 200, [("Content-Type", content_type)], body


ROUTES: dict[str, tuple[tuple[str, ...], Callable[..., Any]]] = {
    "/score": (("POST",), RootApp.score),
    "/healthz": (("GET",), RootApp.healthz),
    "/readyz": (("GET",), RootApp.readyz),
    "/metrics": (("GET",), RootApp.metrics),
}


def _read_body(environ: dict[str, Any], limit: int) -> bytes:
    stream = environ["wsgi.input"]
    raw = environ.get("CONTENT_LENGTH") or ""
    if raw:
        if not raw.isdigit():
            raise BadRequest(400, "bad_length", f"Content-Length {raw!r} is not a number")
        length = int(raw)
        if length > limit:
            raise BadRequest(413, "too_large", f"body of {length} bytes exceeds the limit of "
                             f"{limit} bytes (FT_MAX_REQUEST_BYTES)")
        body = _read(stream, length)
        if len(body) != length:
            raise BadRequest(400, "truncated", f"body ended after {len(body)} of {length} "
                             "bytes")
        return body
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        raise BadRequest(411, "length_required", "a Content-Length (or chunked body) is "
                         "required")
    chunks, total = [], 0
    while True:
        chunk = _read(stream, min(READ_CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise BadRequest(413, "too_large", f"chunked body exceeds the limit of {limit} "
                             "bytes (FT_MAX_REQUEST_BYTES)")


def _read(stream: Any, n: int) -> bytes:
    """Read from gunicorn's body reader; its framing errors are the client's (400)."""
    try:
        return stream.read(n)  # type: ignore[no-any-return]
    except Exception as exc:
        if type(exc).__module__.startswith("gunicorn.http"):
            raise BadRequest(400, "bad_body", f"malformed request body: "
                             f"{type(exc).__name__}: {exc}") from None
        raise


app = RootApp()
