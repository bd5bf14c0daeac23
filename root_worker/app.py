"""The root service's WSGI application: ``POST /score``, health, readiness and metrics.

``gunicorn -c python:root_worker.gunicorn_conf root_worker.app:app``. Importing this module
creates :data:`app` but touches no shared memory, socket or thread: each worker imports it
after fork, and the gunicorn ``post_worker_init`` hook calls :meth:`RootApp.start_worker`,
which attaches the map at once (a worker started any other way does so on its first
request). Routes:

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

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from root_worker.featuremap.live_map import LiveMap
from root_worker.service.metrics import RootMetrics
from root_worker.service.routing import Routing, RoutingError
from root_worker.service.score import BadRequest, Scorer
from root_worker.service.settings import Settings, load_settings

log = logging.getLogger("root_worker")
StartResponse = Callable[..., Any]
JSON = "application/json"
READ_CHUNK = 1 << 20
STATUS_TEXT = {200: "200 OK", 400: "400 Bad Request", 404: "404 Not Found",
               405: "405 Method Not Allowed", 411: "411 Length Required",
               413: "413 Content Too Large", 500: "500 Internal Server Error",
               502: "502 Bad Gateway", 503: "503 Service Unavailable"}


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

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "")
        handler = ROUTES.get(path)
        try:
            if handler is None:
                raise BadRequest(404, "not_found", f"no such path {path!r}; try POST /score, "
                                 "GET /healthz, /readyz or /metrics")
            if method not in handler[0]:
                raise BadRequest(405, "method_not_allowed",
                                 f"{path} accepts {' or '.join(handler[0])}, not {method}")
            status, headers, body = handler[1](self, environ)
        except BadRequest as exc:
            status, headers, body = _error(exc.status, exc.code, exc.message)
        except Exception:  # a bug: answer 500, keep the worker
            log.exception("unhandled error method=%s path=%s", method, path)
            status, headers, body = _error(500, "internal", "internal error (logged)")
        if path == "/score":
            self.state().metrics.requests.labels(str(status)).inc()
        headers.append(("Content-Length", str(len(body))))
        start_response(STATUS_TEXT.get(status, f"{status} Error"), headers)
        return [body]

    # -- handlers ------------------------------------------------------------------------
    def score(self, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
        state = self.state()
        body = _read_body(environ, state.settings.max_request_bytes)
        state.refresh_map()
        status, doc = state.scorer.score(body, environ.get("QUERY_STRING", ""))
        return _json(status, doc)

    def healthz(self, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
        return _json(200, self.health())

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
        return {
            "status": "degraded" if reasons else "ok", "reasons": reasons,
            "pid": os.getpid(), "generation": lm.generation,
            "map_age_seconds": (now_ns - lm.published_at_ns) / 1e9 if lm.generation else None,
            "heartbeat_age_seconds": beat_age,
            "daemon_pid": control.heartbeat_pid if control else None,
            "published_generation": control.generation if control else None,
            "mode": s.mode, "lz4": s.lz4, "shm_name": s.shm_name,
            "uptime_seconds": time.monotonic() - state.started,
            "map_errors": lm.map_errors,
            "reader": {"attaches": stats.attaches, "verify_failures": stats.verify_failures,
                       "attach_errors": stats.attach_errors, "last_error": stats.last_error},
            "leaf_connections_opened": state.scorer.pool.connects,
        }

    def readyz(self, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
        state = self.state()
        state.refresh_map()
        waited = time.monotonic() - state.started
        attached = state.live_map.generation > 0
        ready = attached or waited >= state.settings.ready_max_wait
        why = ("map attached" if attached else
               "no map after FT_READY_MAX_WAIT: serving untrimmed" if ready else
               "waiting for the daemon's map")
        return _json(200 if ready else 503, {"ready": ready, "reason": why,
                                             "generation": state.live_map.generation,
                                             "pid": os.getpid()})

    def metrics(self, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
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
        body = stream.read(length)
        if len(body) != length:
            raise BadRequest(400, "truncated", f"body ended after {len(body)} of {length} "
                             "bytes")
        return body
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        raise BadRequest(411, "length_required", "a Content-Length (or chunked body) is "
                         "required")
    chunks, total = [], 0
    while True:
        chunk = stream.read(min(READ_CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise BadRequest(413, "too_large", f"chunked body exceeds the limit of {limit} "
                             "bytes (FT_MAX_REQUEST_BYTES)")


def _json(status: int, doc: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    return status, [("Content-Type", JSON)], body


def _error(status: int, code: str, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    return _json(status, {"error": {"code": code, "message": message}})


app = RootApp()
