"""The ``POST /score`` pipeline of one worker: resolve, trim, fan out, collect.

Runs in each root worker (one :class:`Scorer` per process, built after fork). Per request:

1. read the frame's preamble and metadata (``peek_metadata``) and the targets
   (:mod:`root_worker.service.targets`); anything malformed is a :class:`BadRequest` (4xx);
2. per target, in the request thread: resolve the model's allowlist in the live map (SPEC
   §4) and trim into a buffer reused by this thread (one per target position) -- or pass the
   frame through (unknown model, no map, mode ``off``); mode ``shadow`` trims only to count
   what it would save and sends the original. A frame the trimmer finds malformed is a 400;
   any *other* trimmer failure sends that target untrimmed and is counted (the trimmer may
   cost bandwidth, never correctness);
3. send every target concurrently (:mod:`root_worker.service.fanout`), lz4-compressed if enabled,
   and wait until ``FT_LEAF_TIMEOUT``; a failed target carries its own error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import lz4.frame

from flatbuffers_schema.wire import (
    ENCODING_HEADER,
    ENCODING_LZ4,
    FRAME_CONTENT_TYPE,
    REQUEST_ID_HEADER,
    STATUS_SKEW,
    TRIMMED_FOR_HEADER,
)
from root_worker.featuremap.live_map import LiveMap
from root_worker.frame import FrameError, Trimmer, peek_metadata
from root_worker.service.fanout import Fanout, LeafError, LeafPool, post_to_replicas
from root_worker.service.metrics import ModelMetrics, RootMetrics
from root_worker.service.routing import Routing
from root_worker.service.settings import Settings
from root_worker.service.targets import BadTargets, Target, parse_targets

log = logging.getLogger(__name__)
DEADLINE_SLACK_S = 0.05  # let socket timeouts fire first: their errors are more precise
OUTCOME_OFF = "off"
_SAFE_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces or controls


class BadRequest(Exception):
    """The client's request is unusable; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(slots=True)
class Prepared:
    """One target, ready to send."""

    target: Target
    outcome: str
    version: str | None           # the version whose allowlist applied (or asked for)
    payload: Any                  # bytes or a memoryview on this thread's buffer
    bytes_untrimmed: int
    bytes_trimmed: int
    missing: int
    metrics: ModelMetrics
    untrimmed: Any = None         # the request body, kept to re-send on a version skew
    fallback: str | None = None


class Scorer:
    """Everything ``POST /score`` needs in one worker."""

    def __init__(self, settings: Settings, live_map: LiveMap, routing: Routing,
                 metrics: RootMetrics, trimmer: Trimmer | None = None) -> None:
        self.settings = settings
        self.live_map = live_map
        self.routing = routing
        self.metrics = metrics
        self.trimmer = trimmer or Trimmer()
        self.pool = LeafPool()
        self.fanout = Fanout(settings.fanout_threads)
        self._local = threading.local()
        self.pid = os.getpid()

    # -- request -------------------------------------------------------------------------
    def score(self, body: bytes, query: str) -> tuple[int, dict[str, Any]]:
        """Answer one request: ``(HTTP status, JSON document)``; raises BadRequest."""
        try:
            metadata = peek_metadata(body)
        except FrameError as exc:
            raise BadRequest(400, "bad_frame", f"malformed frame: {exc}") from None
        try:
            targets = parse_targets(metadata, query, self.settings.max_targets)
        except BadTargets as exc:
            raise BadRequest(400, "bad_targets", str(exc)) from None
        request_id = metadata.get("request_id")
        if not isinstance(request_id, str | int) or isinstance(request_id, bool):
            request_id = None  # echoed as given only when a string or integer
        prepared = [self._prepare(i, t, body) for i, t in enumerate(targets)]
        deadline = time.monotonic() + self.settings.leaf_timeout
        headers = {"Content-Type": FRAME_CONTENT_TYPE}
        if request_id is not None and _SAFE_ID.fullmatch(str(request_id)):
            headers[REQUEST_ID_HEADER] = str(request_id)  # only a header-safe id is forwarded
        jobs: list[Callable[[], dict[str, Any]]] = [
            _bind(self._send, p, headers, deadline) for p in prepared]
        results = self.fanout.run(jobs, self.settings.leaf_timeout + DEADLINE_SLACK_S)
        out = [self._result(p, r) for p, r in zip(prepared, results, strict=True)]
        if any(isinstance(r, LeafError) and r.abandoned for r in results):
            self._local.bufs = []  # a late send still reads them: never reuse them
        n_ok = sum(1 for r in out if r["status"] == "ok")
        doc = {"request_id": request_id, "mode": self.settings.mode,
               "lz4": self.settings.lz4, "generation": self.live_map.generation,
               "pid": self.pid, "ok": n_ok, "failed": len(out) - n_ok, "targets": out}
        return (200 if n_ok or not out else 502), doc

    # -- per target ----------------------------------------------------------------------
    def _prepare(self, i: int, target: Target, body: bytes) -> Prepared:
        mm = self.metrics.model(target.model)
        n = len(body)
        p = Prepared(target, OUTCOME_OFF, target.version, body, n, n, 0, mm, body)
        if self.settings.mode != "off":
            res = self.live_map.resolve(target.model, target.version)
            p.outcome = res.outcome.value
            if res.version is not None:
                p.version = res.version
            if res.allowlist is not None:
                self._trim(i, p, body, res.allowlist)
        mm.outcome(p.outcome)
        mm.untrimmed.inc(p.bytes_untrimmed)
        mm.trimmed.inc(p.bytes_trimmed)
        if p.missing:
            mm.missing.inc(p.missing)
        return p

    def _trim(self, i: int, p: Prepared, body: bytes, allowlist: Any) -> None:
        t0 = time.perf_counter()
        try:
            res = self.trimmer.trim(body, allowlist, out=self._buffer(i, len(body)))
        except FrameError as exc:
            raise BadRequest(400, "bad_frame", f"malformed frame: {exc}") from None
        except Exception as exc:  # a trimmer bug must cost bandwidth, never the request
            log.exception("trim failed model=%s version=%s; sending untrimmed",
                          p.target.model, p.version)
            p.metrics.trim_errors.inc()
            p.fallback = f"trim_error: {type(exc).__name__}"
            return
        self.metrics.trim_seconds.observe(time.perf_counter() - t0)
        p.bytes_trimmed = res.bytes_out
        p.missing = res.n_missing
        if self.settings.mode == "trim":
            p.payload = res.data

    def _buffer(self, i: int, size: int) -> bytearray:
        bufs: list[bytearray] | None = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = []
        while len(bufs) <= i:
            bufs.append(bytearray())
        if len(bufs[i]) < size:
            bufs[i] = bytearray(max(size, 2 * len(bufs[i])))
        return bufs[i]

    def _send(self, p: Prepared, headers: dict[str, str], deadline: float) -> dict[str, Any]:
        if p.payload is p.untrimmed or p.version is None:
            return self._post(p, p.payload, headers, deadline)
        try:
            return self._post(p, p.payload, {**headers, TRIMMED_FOR_HEADER: p.version},
                              deadline)
        except LeafError as exc:
            if exc.status != STATUS_SKEW:
                raise
        # The leaf serves another version than the root trimmed for (a rollout skew) and
        # the trimmed frame lacks features it needs: trimming costs bandwidth, never scores.
        log.warning("version skew model=%s trimmed_for=%s: re-sending untrimmed",
                    p.target.model, p.version)
        p.fallback = "version_skew_resent_untrimmed"
        p.metrics.skew_resends.inc()
        return self._post(p, p.untrimmed, headers, deadline)

    def _post(self, p: Prepared, body: Any, headers: dict[str, str],
              deadline: float) -> dict[str, Any]:
        if self.settings.lz4:
            body = lz4.frame.compress(body)
            headers = {**headers, ENCODING_HEADER: ENCODING_LZ4}
        query = {"model": p.target.model}
        if p.version is not None:
            query["version"] = p.version
        t0 = time.perf_counter()
        endpoints = self.routing.pick(p.target.model)
        ep, status, data = post_to_replicas(self.pool, endpoints, "/score?" + urlencode(query),
                                            body, headers, deadline)
        p.metrics.leaf_seconds.observe(time.perf_counter() - t0)
        p.metrics.sent.inc(len(body))
        reply = _leaf_reply(ep.url, status, data)
        reply.update(leaf=ep.url, bytes_sent=len(body))
        return reply

    def _result(self, p: Prepared, reply: dict[str, Any] | BaseException) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": p.target.model, "requested_version": p.target.version,
            "version": p.version, "outcome": p.outcome,
            "bytes_untrimmed": p.bytes_untrimmed, "bytes_trimmed": p.bytes_trimmed,
            "missing_required": p.missing}
        if p.fallback:
            out["fallback"] = p.fallback
        if isinstance(reply, BaseException):
            err = reply if isinstance(reply, LeafError) else LeafError(
                "internal", f"{type(reply).__name__}: {reply}")
            if not isinstance(reply, LeafError):
                log.error("target failed model=%s", p.target.model, exc_info=reply)
            p.metrics.leaf_error(err.kind)
            out.update(status="error", error=err.to_dict())
            return out
        out.update(status="ok", **reply)
        return out

    def close(self) -> None:
        self.fanout.close()
        self.pool.close()


def _bind(fn: Callable[..., dict[str, Any]], *args: Any) -> Callable[[], dict[str, Any]]:
    return lambda: fn(*args)


def _leaf_reply(url: str, status: int, data: bytes) -> dict[str, Any]:
    """The fields of a leaf's answer the client gets; raises LeafError if unusable."""
    try:
        doc = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError):
        doc = None
    if status != 200:
        detail = doc.get("error") if isinstance(doc, dict) else data[:200].decode("utf-8",
                                                                                 "replace")
        raise LeafError("status", f"{url} answered {status}: {detail}", status)
    if not isinstance(doc, dict) or not isinstance(doc.get("scores"), list):
        raise LeafError("bad_reply", f"{url} answered 200 without a JSON object with scores")
    reply = {"scores": doc["scores"]}
    if "version" in doc:
        reply["leaf_version"] = doc["version"]
    return reply


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a score")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: the answer could not be re-encoded as JSON
        raise ValueError(f"{text} is not a finite number")
    return value
