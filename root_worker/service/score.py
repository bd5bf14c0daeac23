"""The ``POST /score`` pipeline of one worker: resolve, trim, fan out, collect.

Runs in each root worker (one :class:`Scorer` per process, built after fork). Per request
(:meth:`Scorer.begin`):

1. read the frame's preamble and metadata (``peek_metadata``) and the targets
   (:mod:`root_worker.service.targets`); anything malformed is a :class:`BadRequest` (4xx),
   and so is a frame of more than ``FT_MAX_CANDIDATES`` candidates or an answer that
   would hold more than ``FT_MAX_ANSWER_SCORES`` scores (targets x candidates): the
   answer's size is bounded by settings, never by what a client asks for;
2. take **one** map view (one shared-memory poll) and resolve every target in it (SPEC §4);
   the answer reports that view's generation;
3. trim once per distinct allowlist: targets that resolve to the same allowlist share one
   output. Without lz4 the output is scatter-gather (``Trimmer.trim_parts``: a new header
   and views of the kept runs of the request buffer, sent with ``sendmsg``, no copy); with
   lz4 it is written into a buffer of the worker's :class:`BufferPool` (capped by
   ``FT_MAX_BUFFER_BYTES``; when the cap is reached the target is sent untrimmed and
   counted). The engine checks the kept ragged offsets (``check_ragged``). Mode ``off``
   and unknown models pass the frame through, ``shadow`` trims only to count what it would
   save. A frame passed through untrimmed is checked by
   :func:`root_worker.frame.check_frame` (block table, ragged offsets): a leaf never gets a
   frame the root could have rejected; a malformed frame is a 400 -- except in mode
   ``off``, the kill switch, where the root parses nothing but the metadata and the bytes
   pass as they came. Any *other* trimmer-side failure -- a trimmer bug, a version that
   could not travel in a header -- sends that target untrimmed and is counted (the trimmer
   may cost bandwidth, never correctness);
4. start one :class:`~root_worker.service.fanout.LeafCall` per target on the worker's event
   loop (lz4-compressed once per payload if enabled); each ends by ``FT_LEAF_TIMEOUT``. A leaf
   on another version that refuses a trimmed frame (409) gets it again untrimmed, within
   the same deadline. When the last call ends, the answer document is built and the
   request's buffers go back to the pool.

:meth:`Scorer.score` is the same pipeline driven to its end on a private loop (the WSGI
path under a threaded gunicorn worker, unit tests).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import lz4.frame

from flatbuffers_schema.wire import (
    ENCODING_HEADER,
    ENCODING_LZ4,
    FRAME_CONTENT_TYPE,
    NAME_PATTERN,
    QUERY_MODEL,
    QUERY_VERSION,
    REQUEST_ID_HEADER,
    SCORE_PATH,
    STATUS_SKEW,
    TRIMMED_FOR_HEADER,
)
from root_worker.featuremap.live_map import LiveMap
from root_worker.featuremap.map_reader import FeatureMapView
from root_worker.frame import FrameError, Trimmer, check_frame, peek_metadata
from root_worker.frame.format import read_preamble
from root_worker.frame.lru import LruCache
from root_worker.service import faults
from root_worker.service.buffers import BufferPool
from root_worker.service.fanout import LeafCall, LeafError, LeafPool
from root_worker.service.http1 import HttpError
from root_worker.service.loop import Loop, run_until
from root_worker.service.metrics import MAX_CACHED_MODELS, ModelMetrics, RootMetrics
from root_worker.service.replies import leaf_reply, materialize
from root_worker.service.routing import Routing
from root_worker.service.settings import Settings
from root_worker.service.targets import BadTargets, Target, parse_targets

log = logging.getLogger(__name__)
OUTCOME_OFF = "off"
_SAFE_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces or controls
_SAFE_NAME = re.compile(NAME_PATTERN)
FALLBACK_BUFFER_CAP = "buffer_cap_sent_untrimmed"
FALLBACK_UNSAFE_VERSION = "unsafe_version_sent_untrimmed"
FALLBACK_SKEW = "version_skew_resent_untrimmed"


BadRequest = HttpError  # the client's request is unusable: answer ``status`` (4xx), JSON


@dataclass(slots=True)
class Payload:
    """One distinct body a request sends (the frame, or one trimmed output)."""

    parts: list[Any]              # buffers whose concatenation is the frame: [body], the
    #                               trim engine's scatter-gather parts, or [pooled view]
    nbytes: int = 0               # their total length
    buffer: Any = None            # the pooled buffer to give back (None: nothing pooled)
    wire: Any = None              # the lz4 compression of the parts, when lz4 is on
    checked: bool = False


@dataclass(slots=True)
class Prepared:
    """One target, ready to send."""

    target: Target
    outcome: str
    version: str | None           # the version whose allowlist applied (or asked for)
    payload: Payload
    bytes_untrimmed: int
    bytes_trimmed: int
    missing: int
    metrics: ModelMetrics
    trimmed_for: str | None = None  # X-FT-Trimmed-For (None: the frame goes untrimmed)
    fallback: str | None = None
    result: Any = None
    t0: float = 0.0


@dataclass(slots=True)
class Request:
    """One ``POST /score`` in flight in this worker."""

    scorer: Scorer
    loop: Loop
    body: Any
    request_id: Any
    generation: int
    deadline: float
    headers: dict[str, str]
    on_done: Callable[[int, dict[str, Any]], None]
    untrimmed: Payload
    candidates: int = 0
    inject: str | None = None     # a test's fault injection phase (FT_TEST_FAULTS only)
    targets: list[Prepared] = field(default_factory=list)
    payloads: list[Payload] = field(default_factory=list)
    pending: int = 0

    def release(self) -> None:
        """Give every pooled buffer back (no leaf call reads them any more)."""
        for p in self.payloads:  # (views of the request body die with the request)
            if p.buffer is not None:
                p.parts[0].release()  # the one view of a pooled contiguous output
                self.scorer.buffers.give(p.buffer)
                p.buffer = None
        self.payloads.clear()


class Scorer:
    """Everything ``POST /score`` needs in one worker."""

    def __init__(self, settings: Settings, live_map: LiveMap, routing: Routing,
                 metrics: RootMetrics, trimmer: Trimmer | None = None,
                 buffers: BufferPool | None = None) -> None:
        self.settings = settings
        self.live_map = live_map
        self.routing = routing
        self.metrics = metrics
        self.trimmer = trimmer or Trimmer()
        self.pool = LeafPool()
        self.buffers = buffers or BufferPool(settings.max_buffer_bytes)
        self.pid = os.getpid()
        # leaf request path by (model, version); clients name the models: bounded
        self._paths: LruCache[tuple[str, str | None], str] = LruCache(MAX_CACHED_MODELS)

    # -- request -------------------------------------------------------------------------
    def score(self, body: Any, query: str) -> tuple[int, dict[str, Any]]:
        """Answer one request on a private loop: ``(status, document)``; raises BadRequest."""
        done: list[tuple[int, dict[str, Any]]] = []
        loop = Loop()
        try:
            self.begin(memoryview(body), query, loop, lambda s, d: done.append((s, d)))
            run_until(loop, lambda: bool(done), time.monotonic() +
                      self.settings.leaf_timeout + 5.0)
        finally:
            loop.close()
        if not done:  # pragma: no cover - every call ends by its own deadline
            raise RuntimeError("score request did not finish")
        status, doc = done[0]
        return status, materialize(doc)

    def begin(self, body: memoryview, query: str, loop: Loop,
              on_done: Callable[[int, dict[str, Any]], None],
              inject: str | None = None) -> Request:
        """Prepare every target and start its leaf call; ``on_done(status, doc)`` runs once
        when the last one ended. Raises :class:`BadRequest` before any leaf is contacted."""
        s = self.settings
        try:
            candidates = read_preamble(body).n_candidates
            metadata = peek_metadata(body)
        except FrameError as exc:
            raise BadRequest(400, "bad_frame", f"malformed frame: {exc}") from None
        if candidates > s.max_candidates:
            raise BadRequest(413, "too_many_candidates", f"the frame holds {candidates} "
                             f"candidates; the limit is {s.max_candidates} "
                             "(FT_MAX_CANDIDATES)")
        try:
            targets = parse_targets(metadata, query, s.max_targets)
        except BadTargets as exc:
            raise BadRequest(400, "bad_targets", str(exc)) from None
        if len(targets) * candidates > s.max_answer_scores:
            raise BadRequest(413, "answer_too_large", f"{len(targets)} targets x "
                             f"{candidates} candidates would answer "
                             f"{len(targets) * candidates} scores; the limit is "
                             f"{s.max_answer_scores} (FT_MAX_ANSWER_SCORES): split the "
                             "request")
        request_id = metadata.get("request_id")
        if not isinstance(request_id, str | int) or isinstance(request_id, bool):
            request_id = None  # echoed as given only when a string or integer
        view = self.live_map.current() if self.settings.mode != "off" else None
        lm = self.live_map
        self.metrics.set_map(lm.generation, lm.published_at_ns, time.time_ns(), lm.map_errors,
                             force=False)
        headers = {"Content-Type": FRAME_CONTENT_TYPE}
        if request_id is not None and _SAFE_ID.fullmatch(str(request_id)):
            headers[REQUEST_ID_HEADER] = str(request_id)  # only a header-safe id is forwarded
        req = Request(self, loop, body, request_id, view.generation if view else 0,
                      loop.clock() + self.settings.leaf_timeout, headers, on_done,
                      Payload([body], len(body)), candidates, inject)
        try:
            self._prepare_all(req, view, targets)
            for p in {id(p.payload): p.payload for p in req.targets}.values():
                self._check(p)
        except BaseException:
            req.release()
            raise
        for p in req.targets:
            self._count(p)
        req.pending = len(req.targets)
        for i in range(len(req.targets)):
            self._start(req, i, req.targets[i].payload, req.targets[i].trimmed_for)
        return req

    def _prepare_all(self, req: Request, view: FeatureMapView | None,
                     targets: list[Target]) -> None:
        outputs: dict[int, tuple[Payload, Any]] = {}
        n = len(req.body)
        for target in targets:
            mm = self.metrics.model(target.model)
            p = Prepared(target, OUTCOME_OFF, target.version, req.untrimmed, n, n, 0, mm)
            req.targets.append(p)
            if self.settings.mode == "off":
                continue
            res = self.live_map.resolve_in(view, target.model, target.version)
            p.outcome = res.outcome.value
            if res.version is not None:
                p.version = res.version
            if res.allowlist is not None:
                self._trim(req, p, res.allowlist, outputs)

    def _trim(self, req: Request, p: Prepared, allowlist: Any,
              outputs: dict[int, tuple[Payload, Any]]) -> None:
        shared = outputs.get(allowlist.digest)
        if shared is None:
            shared = self._trim_once(req, p, allowlist)
            if shared is None:
                return
            outputs[allowlist.digest] = shared
        payload, res = shared
        p.bytes_trimmed = res.bytes_out
        p.missing = res.n_missing
        if self.settings.mode != "trim":
            return
        if p.version is None or not _SAFE_NAME.fullmatch(p.version):
            # A map from before the validator's alphabet: never a broken header, never lost.
            p.metrics.trim_errors.inc()
            p.fallback = FALLBACK_UNSAFE_VERSION
            return
        p.payload, p.trimmed_for = payload, p.version

    def _trim_once(self, req: Request, p: Prepared, allowlist: Any
                   ) -> tuple[Payload, Any] | None:
        """Trim ``req.body`` for one allowlist, checking the kept ragged offsets.

        Without lz4 the output is scatter-gather (:meth:`Trimmer.trim_parts`: the new
        header plus views of the kept runs of the request buffer, sent as they are with
        ``sendmsg``; no buffer, no copy). lz4 needs contiguous bytes: a pooled buffer.
        """
        contiguous = self.settings.lz4
        buf = self.buffers.take(len(req.body)) if contiguous else None
        if contiguous and buf is None:
            p.metrics.trim_errors.inc()
            p.fallback = FALLBACK_BUFFER_CAP
            return None
        t0 = time.perf_counter()
        try:
            faults.check(req.inject, "trim")
            if contiguous:
                res = self.trimmer.trim(req.body, allowlist, out=buf, check_ragged=True)
                parts = [res.data]
            else:
                res = self.trimmer.trim_parts(req.body, allowlist, check_ragged=True)
                parts = res.parts
        except FrameError as exc:
            if buf is not None:
                self.buffers.give(buf)
            raise BadRequest(400, "bad_frame", f"malformed frame: {exc}") from None
        except Exception as exc:  # a trimmer bug must cost bandwidth, never the request
            if buf is not None:
                self.buffers.give(buf)
            log.exception("fault contained phase=trim request_id=%s: trim failed model=%s "
                          "version=%s; sending untrimmed", req.request_id, p.target.model,
                          p.version)
            self.metrics.faults.labels("trim").inc()
            p.metrics.trim_errors.inc()
            p.fallback = f"trim_error: {type(exc).__name__}"
            return None
        self.metrics.trim_seconds.observe(time.perf_counter() - t0)
        payload = Payload(parts, res.bytes_out, buf, checked=True)  # the engine checked it
        req.payloads.append(payload)
        return payload, res

    def _check(self, payload: Payload) -> None:
        """No leaf gets a frame the root could have rejected (400 naming the column)."""
        if payload.checked or self.settings.mode == "off":
            return  # mode off is the trimmer's kill switch: bytes pass as they came
        try:
            check_frame(payload.parts[0])  # only pass-through payloads get here: [body]
        except FrameError as exc:
            raise BadRequest(400, "bad_frame", f"malformed frame: {exc}") from None
        payload.checked = True

    @staticmethod
    def _count(p: Prepared) -> None:
        mm = p.metrics
        mm.outcome(p.outcome)
        mm.untrimmed.inc(p.bytes_untrimmed)
        mm.trimmed.inc(p.bytes_trimmed)
        if p.missing:
            mm.missing.inc(p.missing)

    # -- fan-out -------------------------------------------------------------------------
    def _start(self, req: Request, i: int, payload: Payload, trimmed_for: str | None) -> None:
        p = req.targets[i]
        headers = req.headers
        if trimmed_for is not None:
            headers = {**headers, TRIMMED_FOR_HEADER: trimmed_for}
        wire, nbytes = payload.parts, payload.nbytes
        if self.settings.lz4:
            if payload.wire is None:
                payload.wire = [lz4.frame.compress(payload.parts[0])]
            wire, nbytes = payload.wire, len(payload.wire[0])
            headers = {**headers, ENCODING_HEADER: ENCODING_LZ4}
        p.t0 = time.perf_counter()
        call = LeafCall(req.loop, self.pool, self.routing.pick(p.target.model),
                        self._leaf_path(p.target.model, p.version), headers, wire, req.deadline,
                        self.settings.max_leaf_reply_bytes,
                        lambda result: self._ended(req, i, call, trimmed_for, result), nbytes)
        call.start()

    def _leaf_path(self, model: str, version: str | None) -> str:
        """``/score?model=..&version=..`` for a leaf call (memoised)."""
        key = (model, version)
        path = self._paths.get(key)
        if path is None:
            query = {QUERY_MODEL: model} if version is None else \
                {QUERY_MODEL: model, QUERY_VERSION: version}
            path = SCORE_PATH + "?" + urlencode(query)
            self._paths.put(key, path)
        return path

    def _ended(self, req: Request, i: int, call: LeafCall, trimmed_for: str | None,
               result: Any) -> None:
        """One leaf call ended. An unexpected exception here fails this target alone
        (``internal``, logged once with the request id, counted); the request goes on."""
        p = req.targets[i]
        url = call.endpoint.url if call.endpoint else "leaf"
        try:
            if call.faults:
                self.metrics.faults.labels("leaf").inc()
            p.metrics.leaf_seconds.observe(time.perf_counter() - p.t0)
            if not isinstance(result, LeafError):
                p.metrics.sent.inc(call.body_bytes)
                status, data = result
                faults.check(req.inject, "leaf_answer")
                if status == STATUS_SKEW and trimmed_for is not None and \
                        self._resend(req, i):
                    return
                try:
                    result = leaf_reply(url, status, data, req.candidates)
                    result.update(leaf=url, bytes_sent=call.body_bytes)
                except LeafError as exc:
                    result = exc
        except Exception as exc:
            log.error("fault contained phase=leaf_answer request_id=%s model=%s url=%s: "
                      "%s: %s", req.request_id, p.target.model, url, type(exc).__name__, exc,
                      exc_info=exc)
            self.metrics.faults.labels("leaf_answer").inc()
            result = LeafError("internal", f"{url}: internal error (logged): "
                               f"{type(exc).__name__}")
        p.result = result
        req.pending -= 1
        if req.pending == 0:
            self._finish(req)

    def _resend(self, req: Request, i: int) -> bool:
        """A leaf on another version refused the trimmed frame: send it the whole frame."""
        p = req.targets[i]
        try:
            self._check(req.untrimmed)
        except BadRequest as exc:
            p.result = LeafError("bad_frame", f"re-sending untrimmed: {exc.message}")
            return False
        log.warning("version skew model=%s trimmed_for=%s: re-sending untrimmed",
                    p.target.model, p.version)
        p.fallback = FALLBACK_SKEW
        p.metrics.skew_resends.inc()
        self._start(req, i, req.untrimmed, None)
        return True

    def _finish(self, req: Request) -> None:
        req.release()
        out = [self._result(p) for p in req.targets]
        n_ok = sum(1 for r in out if r["status"] == "ok")
        doc = {"request_id": req.request_id, "mode": self.settings.mode,
               "lz4": self.settings.lz4, "generation": req.generation,
               "pid": self.pid, "ok": n_ok, "failed": len(out) - n_ok, "targets": out}
        req.on_done(200 if n_ok or not out else 502, doc)

    def _result(self, p: Prepared) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": p.target.model, "requested_version": p.target.version,
            "version": p.version, "outcome": p.outcome,
            "bytes_untrimmed": p.bytes_untrimmed, "bytes_trimmed": p.bytes_trimmed,
            "missing_required": p.missing}
        if p.fallback:
            out["fallback"] = p.fallback
        reply = p.result
        if isinstance(reply, LeafError):
            p.metrics.leaf_error(reply.kind)
            out.update(status="error", error=reply.to_dict())
            return out
        out.update(status="ok", **reply)
        return out

    def close(self) -> None:
        self.pool.close()
        self.buffers.shrink()
