"""The root's half of the root <-> leaf contract, as a library: what to send, what came back.

This module is the **one home** of that half. The gunicorn event worker's
:class:`~root_worker.service.score.Scorer` is a :class:`Contract` that runs the leaf calls
on its own event loop; an asyncio or threaded root of your own uses the same class and does
the HTTP itself (``examples/asyncio_root.py`` is a complete one). What a request goes
through:

1. :meth:`Contract.prepare` -- ``frame`` (bytes, bytearray, memoryview: not copied) and
   its targets (a query string such as ``"target=ads_ctr&target=ads_cvr@3"``, or a list
   of :class:`Target`; None or ``""``: the frame metadata's ``"targets"``): reads the
   preamble and metadata, applies the caps (candidates, targets, answer size), takes
   **one** map view and resolves every target in it, picks each target's replicas
   (:meth:`Routing.pick`), and trims once per distinct allowlist. A version-less target is
   trimmed for the version its replica serves, as learned from that replica's answers
   (:mod:`root_worker.service.leafversions`); an Open Inference Protocol target gets a v2
   request (:mod:`root_worker.service.oip`). A frame that goes untrimmed is checked first
   (no leaf gets a frame the root could have rejected). Raises :class:`BadRequest`
   (``.status`` 4xx, ``.code``, ``.message``: the client's mistake) before anything is
   sent. Returns a :class:`Plan`.
2. :meth:`Contract.request` -- per target, the :class:`LeafRequest` to send: the replicas
   to try in order (``endpoints``; ``url(endpoint)`` is the full URL), the ``path`` with
   ``?model=`` and ``?version=`` (or the v2 ``/v2/models/M/versions/V/infer``), the
   ``headers`` (``Content-Type``, ``X-Request-Id`` when header-safe, ``X-FT-Trimmed-For``
   when trimmed, ``Content-Encoding: lz4`` when on) and the body as ``parts``: buffers to
   send back to back (the new header and views of the kept runs of ``frame``; write them
   with ``sendmsg``/``writelines``, or ``b"".join`` them if your client needs one buffer).
   None: the target already failed (e.g. ``batch_size``) -- nothing to send.
3. :meth:`Contract.answer` -- the leaf's ``status`` and body (and, for v2 targets, its
   headers): stores the target's scores or its error, learns the version the replica
   serves, and on the version-skew 409 to a trimmed frame returns the **untrimmed**
   :class:`LeafRequest` to send instead (within your deadline; the frame is checked
   first). :meth:`Contract.fail` records a failure of your own (timeout, connection
   refused) as a :class:`LeafError`.
4. :meth:`Contract.finish` -- ``(status, document)``: the same answer document the root
   serves (200 when a target succeeded or none was asked, 502 when all failed); gives the
   plan's pooled buffers back. Call it exactly once per plan, also on your error paths;
   ``frame`` must stay alive and unchanged until then (the parts are views of it).

Metrics are the root's (:class:`~root_worker.service.metrics.RootMetrics`: pass yours to
export them, else the contract keeps a private registry).

Threads and asyncio
    A :class:`Contract` may be shared by any number of threads and coroutines: each call
    works on its own :class:`Plan`, and nothing is written into a buffer shared between
    calls -- trimmed frames are scatter-gather views (no buffer at all) or, with lz4, a
    buffer of the contract's capped :class:`~root_worker.service.buffers.BufferPool` that
    belongs to one plan until :meth:`finish`. The shared caches (trim plans, layouts,
    leaf paths, learned leaf versions) tolerate concurrent callers. A :class:`Plan` is
    **not** thread-safe: drive one request from one thread (or one task) at a time.
    Attaching a new map generation maps the segment and checks its checksum (a few ms for
    a map of thousands of models, more for larger ones): an event loop passes
    ``attach=False`` to :meth:`prepare`, which then serves the map already attached
    (never waiting), and runs :meth:`refresh` in a thread when ``plan.map_stale`` says a
    newer generation or a due recheck is waiting (``await asyncio.to_thread(...)``).
    Threaded roots keep the default (``attach=True``): a thread attaching never blocks the
    others, which serve the previous generation meanwhile.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlencode

import lz4.frame

from flatbuffers_schema.oip import infer_path
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
from root_worker.frame import FrameError, Trimmer, check_frame
from root_worker.frame.codec import peek
from root_worker.frame.lru import LruCache
from root_worker.service import faults, oip
from root_worker.service.buffers import BufferPool
from root_worker.service.fanout import LeafError
from root_worker.service.http1 import HttpError
from root_worker.service.leafversions import (
    LEAF_NOT_IN_MAP,
    LeafVersions,
    LogLimiter,
    choose,
    refusal_version,
    valid_version,
)
from root_worker.service.metrics import MAX_CACHED_MODELS, ModelMetrics, RootMetrics
from root_worker.service.replies import leaf_reply, materialize
from root_worker.service.routing import PROTOCOL_OIP, Endpoint, Routing
from root_worker.service.settings import Settings, load_settings
from root_worker.service.targets import BadTargets, Target, parse_targets

__all__ = ["BadRequest", "Contract", "Endpoint", "LeafError", "LeafRequest", "Plan",
           "Routing", "Target"]

log = logging.getLogger("root_worker.service.score")  # one logger for the root's contract
OUTCOME_OFF = "off"
_SAFE_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces or controls
_SAFE_NAME = re.compile(NAME_PATTERN)
FALLBACK_BUFFER_CAP = "buffer_cap_sent_untrimmed"
FALLBACK_UNSAFE_VERSION = "unsafe_version_sent_untrimmed"
FALLBACK_SKEW = "version_skew_resent_untrimmed"
FALLBACK_LEAF_VERSION = "leaf_version_not_in_map_sent_untrimmed"


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
    endpoints: Any = None           # the replicas, in the order the call tries them
    leaf: str | None = None         # version-less target: how its allowlist was chosen
    oip: bool = False               # the leaves speak the Open Inference Protocol (oip.py)
    path: str | None = None         # the v2 request's path and headers
    headers: dict[str, str] | None = None
    sending: Payload | None = None  # what the latest LeafRequest sends (a re-send: untrimmed)


@dataclass(slots=True)
class LeafRequest:
    """One leaf call to make: POST ``path`` with ``headers`` and the body ``parts``."""

    endpoints: list[Endpoint]     # the replicas, in the order to try them (empty: no route)
    path: str                     # "/score?model=..&version=.." or the v2 infer path
    headers: dict[str, str]
    parts: list[Any]              # buffers to send back to back (views: no copy)
    nbytes: int                   # their total length (the Content-Length)
    trimmed: bool                 # the body is a trimmed frame (X-FT-Trimmed-For sent)

    def url(self, endpoint: Endpoint) -> str:
        """The full URL of this call to ``endpoint`` (one of :attr:`endpoints`)."""
        return endpoint.url + self.path


@dataclass(slots=True)
class Plan:
    """One request being answered: its targets (:class:`Prepared`) and what they share."""

    body: Any
    request_id: Any
    generation: int
    headers: dict[str, str]
    untrimmed: Payload
    candidates: int = 0
    inject: str | None = None     # a test's fault injection phase (FT_TEST_FAULTS only)
    targets: list[Prepared] = field(default_factory=list)
    payloads: list[Payload] = field(default_factory=list)
    frame_index: Any = None       # oip.FrameIndex, built by the first v2 target
    map_stale: bool = False       # prepare(attach=False): a refresh() is due
    releaser: BufferPool | None = None

    def release(self) -> None:
        """Give every pooled buffer back (no leaf call reads them any more)."""
        for p in self.payloads:  # (views of the request body die with the request)
            if p.buffer is not None:
                p.parts[0].release()  # the one view of a pooled contiguous output
                if self.releaser is not None:
                    self.releaser.give(p.buffer)
                p.buffer = None
        self.payloads.clear()


class Contract:
    """The root's half of the contract for one process (module docstring): share it."""

    plan_type: type[Plan] = Plan  # what prepare() returns (the event worker's: its Request)

    def __init__(self, settings: Settings | None, live_map: LiveMap, routing: Routing,
                 metrics: RootMetrics | None = None, trimmer: Trimmer | None = None,
                 buffers: BufferPool | None = None) -> None:
        """``settings``: the root's (None: the ``FT_*`` environment, :func:`load_settings`);
        mode, lz4 and the caps apply as in the root."""
        self.settings = settings = settings if settings is not None else load_settings()
        self.live_map = live_map
        self.routing = routing
        self.metrics = metrics if metrics is not None else RootMetrics(routing.listed)
        self.trimmer = trimmer or Trimmer()
        self.buffers = buffers or BufferPool(settings.max_buffer_bytes)
        self.pid = os.getpid()
        # leaf request path by (model, version); clients name the models: bounded
        self._paths: LruCache[tuple[str, str | None], str] = LruCache(MAX_CACHED_MODELS)
        self.versions = LeafVersions(on_change=self.metrics.leaf_version_changed)
        self.limiter = LogLimiter(log)
        self._learning = threading.Lock()  # (endpoint, model) -> version: one writer at once

    # -- the map -------------------------------------------------------------------------
    def refresh(self) -> FeatureMapView | None:
        """Attach the newest generation if there is one (blocking: run it in a thread from
        an event loop); returns the view now served."""
        return self.live_map.current()

    # -- 1. prepare ----------------------------------------------------------------------
    def prepare(self, frame: Any, targets: str | Sequence[Target] | None = None, *,
                attach: bool = True, inject: str | None = None) -> Plan:
        """Resolve, trim and check every target of one request (module docstring, 1.);
        raises :class:`BadRequest` before anything is sent."""
        body = frame if isinstance(frame, memoryview) else memoryview(frame)
        s = self.settings
        try:
            pre, metadata = peek(body)
            candidates = pre.n_candidates
        except FrameError as exc:
            raise BadRequest(400, "bad_frame", f"malformed frame: {exc}") from None
        if candidates > s.max_candidates:
            raise BadRequest(413, "too_many_candidates", f"the frame holds {candidates} "
                             f"candidates; the limit is {s.max_candidates} "
                             "(FT_MAX_CANDIDATES)")
        wanted = self._targets(metadata, targets, candidates)
        request_id = metadata.get("request_id")
        if not isinstance(request_id, str | int) or isinstance(request_id, bool):
            request_id = None  # echoed as given only when a string or integer
        lm = self.live_map
        stale = False
        if s.mode == "off":
            view = None
        elif attach:
            view = lm.current()
        else:
            view, stale = lm.current_nowait()
        self.metrics.set_map(lm.generation, lm.published_at_ns, time.time_ns(), lm.map_errors,
                             force=False)
        headers = {"Content-Type": FRAME_CONTENT_TYPE}
        if request_id is not None and _SAFE_ID.fullmatch(str(request_id)):
            headers[REQUEST_ID_HEADER] = str(request_id)  # only a header-safe id is forwarded
        plan = self.plan_type(body, request_id, view.generation if view else 0, headers,
                    Payload([body], len(body)), candidates, inject, map_stale=stale,
                    releaser=self.buffers)
        try:
            self._prepare_all(plan, view, wanted)
            for payload in {id(t.payload): t.payload for t in plan.targets}.values():
                self._check(payload)
        except BaseException:
            plan.release()
            raise
        for p in plan.targets:
            self._count(p)
            p.sending = p.payload
        return plan

    def _targets(self, metadata: dict[str, Any], targets: str | Sequence[Target] | None,
                 candidates: int) -> list[Target]:
        s = self.settings
        if targets is None or isinstance(targets, str):
            try:
                wanted = parse_targets(metadata, targets or "", s.max_targets)
            except BadTargets as exc:
                raise BadRequest(400, "bad_targets", str(exc)) from None
        else:
            wanted = list(targets)
            if not wanted or len(wanted) > s.max_targets:
                raise BadRequest(400, "bad_targets", f"{len(wanted)} targets given; between "
                                 f"1 and {s.max_targets} (FT_MAX_TARGETS) are served")
        if len(wanted) * candidates > s.max_answer_scores:
            raise BadRequest(413, "answer_too_large", f"{len(wanted)} targets x "
                             f"{candidates} candidates would answer "
                             f"{len(wanted) * candidates} scores; the limit is "
                             f"{s.max_answer_scores} (FT_MAX_ANSWER_SCORES): split the "
                             "request")
        return wanted

    def _prepare_all(self, req: Plan, view: FeatureMapView | None,
                     targets: list[Target]) -> None:
        outputs: dict[int, tuple[Payload, Any]] = {}
        n = len(req.body)
        for target in targets:
            mm = self.metrics.model(target.model)
            p = Prepared(target, OUTCOME_OFF, target.version, req.untrimmed, n, n, 0, mm)
            p.endpoints = self.routing.pick(target.model)  # the replica before the trim
            req.targets.append(p)
            v2 = self.routing.protocol(target.model) == PROTOCOL_OIP
            if self.settings.mode == "off":
                if v2:
                    self._oip(req, p, None, None)
                continue
            if target.version is None and not v2:  # v2 (OIP) servers: oip.py's versions
                url = p.endpoints[0].url if p.endpoints else ""
                choice = choose(self.live_map, view, target.model,
                                self.versions.get(url, target.model))
                res, p.leaf = choice.resolution, choice.how
                if choice.how == LEAF_NOT_IN_MAP:
                    p.fallback = FALLBACK_LEAF_VERSION
                    self.limiter.log(logging.WARNING, "leaf_version", target.model,
                                     "leaf serves a version no bundle lists model=%s "
                                     "leaf=%s version=%s: sending untrimmed", target.model,
                                     url, choice.leaf_version)
            else:
                res = self.live_map.resolve_in(view, target.model, target.version)
            p.outcome = res.outcome.value
            if res.version is not None:
                p.version = res.version
            if v2:
                self._oip(req, p, res.tensors, res.allowlist)
            elif res.allowlist is not None:
                self._trim(req, p, res.allowlist, outputs)

    def _trim(self, req: Plan, p: Prepared, allowlist: Any,
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

    def _trim_once(self, req: Plan, p: Prepared, allowlist: Any
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
        res: Any
        try:
            faults.check(req.inject, "trim")
            if contiguous:
                res = self.trimmer.trim(req.body, allowlist, out=cast(Any, buf),
                                        check_ragged=True)
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

    def _oip(self, req: Plan, p: Prepared, tensors: Any, allowlist: Any) -> None:
        """A v2 request for a target whose leaves speak the Open Inference Protocol: the
        model's inputs as views of the request body (oip.py; a column that cannot match is
        a 400 naming it; too many candidates fail this target alone)."""
        p.oip = True
        try:
            if req.frame_index is None:
                req.frame_index = oip.index_frame(req.body)
            built = oip.build_request(req.frame_index, p.target.model, tensors, allowlist,
                                      req.headers.get(REQUEST_ID_HEADER))
        except FrameError as exc:
            raise BadRequest(400, "bad_frame", f"malformed frame: {exc}") from None
        except oip.ColumnError as exc:
            raise BadRequest(400, "bad_column", str(exc)) from None
        except oip.BatchTooLarge as exc:
            p.result = LeafError("batch_size", f"model {p.target.model!r}: {exc}")
            p.bytes_trimmed = 0  # nothing is sent
            return
        p.payload = Payload(built.parts, built.nbytes, checked=True)
        p.bytes_trimmed = built.nbytes
        p.path, p.headers = infer_path(p.target.model, p.version), built.headers

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

    # -- 2. request ----------------------------------------------------------------------
    def request(self, plan: Plan, i: int) -> LeafRequest | None:
        """What to send for target ``i`` now (module docstring, 2.); None: it already
        failed, nothing is sent. Starts the target's leaf clock."""
        p = plan.targets[i]
        p.t0 = time.perf_counter()
        if p.result is not None:  # failed before any leaf call (e.g. batch_size)
            return None
        if p.oip:
            assert p.path is not None and p.headers is not None
            return LeafRequest(p.endpoints, p.path, p.headers, p.payload.parts,
                               p.payload.nbytes, False)
        payload = p.sending if p.sending is not None else p.payload
        trimmed_for = p.trimmed_for if payload is p.payload else None
        headers = plan.headers
        if trimmed_for is not None:
            headers = {**headers, TRIMMED_FOR_HEADER: trimmed_for}
        wire, nbytes = payload.parts, payload.nbytes
        if self.settings.lz4:
            if payload.wire is None:
                payload.wire = [lz4.frame.compress(payload.parts[0])]
            wire, nbytes = payload.wire, len(payload.wire[0])
            headers = {**headers, ENCODING_HEADER: ENCODING_LZ4}
        # a version-less target asks the leaf for no version: it serves its own, which is
        # what the root learns (the version trimmed for travels in X-FT-Trimmed-For only)
        asked = None if p.target.version is None else p.version
        return LeafRequest(p.endpoints, self._leaf_path(p.target.model, asked), headers,
                           wire, nbytes, trimmed_for is not None)

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

    # -- 3. answer -----------------------------------------------------------------------
    def answer(self, plan: Plan, i: int, url: str, status: int, body: bytes,
               headers: dict[str, str] | None = None, sent_bytes: int | None = None,
               learn: bool = True) -> LeafRequest | None:
        """Read the answer of the replica at ``url`` (its base URL, ``Endpoint.url``) to
        target ``i``: stores its scores or its error in the plan and returns None, or
        returns the untrimmed :class:`LeafRequest` to send instead (the version-skew 409 to
        a trimmed frame). ``headers``: the answer's, lower-case names (v2 targets read
        one); ``sent_bytes``: the body bytes sent (default: the request's)."""
        p = plan.targets[i]
        p.metrics.leaf_seconds.observe(time.perf_counter() - p.t0)
        sending = p.sending if p.sending is not None else p.payload
        if sent_bytes is None:
            sent_bytes = len(sending.wire[0]) if sending.wire is not None and not p.oip \
                else sending.nbytes
        p.metrics.sent.inc(sent_bytes)
        faults.check(plan.inject, "leaf_answer")
        learns = learn and p.target.version is None and not p.oip
        trimmed = not p.oip and sending is p.payload and p.trimmed_for is not None
        if status == STATUS_SKEW and trimmed:
            if learns:
                self._learn(p, url, refusal_version(body))
            if self._resend(plan, i):
                return self.request(plan, i)
        try:
            result = oip.read_answer(url, status, body, headers or {}, plan.candidates) \
                if p.oip else leaf_reply(url, status, body, plan.candidates)
            result.update(leaf=url, bytes_sent=sent_bytes)
        except LeafError as exc:
            p.result = exc
        else:
            if learns:
                self._learn(p, url, result.get("leaf_version"))
            p.result = result
        return None

    def fail(self, plan: Plan, i: int, error: LeafError) -> None:
        """Target ``i`` failed without an answer to read (timeout, connection refused, no
        route: your transport's failure, as a :class:`LeafError` with a short ``kind``)."""
        p = plan.targets[i]
        p.metrics.leaf_seconds.observe(time.perf_counter() - p.t0)
        p.result = error

    def _learn(self, p: Prepared, url: str, reported: Any) -> None:
        """Remember what the replica at ``url`` serves for version-less requests."""
        version = valid_version(reported)
        if version is None:
            return
        with self._learning:
            old = self.versions.learn(url, p.target.model, version)
        if old is not None:
            self.limiter.log(logging.INFO, "leaf_version_change", p.target.model,
                             "leaf version changed model=%s leaf=%s version=%s (was %s)",
                             p.target.model, url, version, old)

    def _resend(self, req: Plan, i: int) -> bool:
        """A leaf on another version refused the trimmed frame: send it the whole frame."""
        p = req.targets[i]
        try:
            self._check(req.untrimmed)
        except BadRequest as exc:
            p.result = LeafError("bad_frame", f"re-sending untrimmed: {exc.message}")
            return False
        self.limiter.log(logging.WARNING, "skew", p.target.model,
                         "version skew model=%s trimmed_for=%s: re-sending untrimmed",
                         p.target.model, p.version)
        p.fallback = FALLBACK_SKEW
        p.metrics.skew_resends.inc()
        p.sending = req.untrimmed
        return True

    # -- 4. finish -----------------------------------------------------------------------
    def finish(self, plan: Plan, raw: bool = False) -> tuple[int, dict[str, Any]]:
        """``(status, document)`` of the request; gives the plan's pooled buffers back.
        ``raw``: keep scores as :class:`~root_worker.service.replies.RawJSON` (their text
        as the leaf wrote it, for :func:`~root_worker.service.replies.answer_body`)."""
        plan.release()
        out = [self._result(p) for p in plan.targets]
        n_ok = sum(1 for r in out if r["status"] == "ok")
        doc = {"request_id": plan.request_id, "mode": self.settings.mode,
               "lz4": self.settings.lz4, "generation": plan.generation,
               "pid": self.pid, "ok": n_ok, "failed": len(out) - n_ok, "targets": out}
        return 200 if n_ok or not out else 502, doc if raw else materialize(doc)

    def _result(self, p: Prepared) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": p.target.model, "requested_version": p.target.version,
            "version": p.version, "outcome": p.outcome,
            "bytes_untrimmed": p.bytes_untrimmed, "bytes_trimmed": p.bytes_trimmed,
            "missing_required": p.missing}
        if p.fallback:
            out["fallback"] = p.fallback
        if p.leaf is not None:
            out["leaf_choice"] = p.leaf
        reply = p.result
        if reply is None:
            reply = LeafError("internal", "no answer was recorded for this target")
        if isinstance(reply, LeafError):
            p.metrics.leaf_error(reply.kind)
            out.update(status="error", error=reply.to_dict())
            return out
        out.update(status="ok", **reply)
        return out
