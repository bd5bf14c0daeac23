"""The ``POST /score`` pipeline of one worker: resolve, trim, fan out, collect.

Runs in each root worker (one :class:`Scorer` per process, built after fork). A
:class:`Scorer` is a :class:`root_worker.contract.Contract` -- the one home of the root's
half of the root <-> leaf contract, which roots of other teams use as a library -- that
runs the leaf calls on the worker's event loop. Per request (:meth:`Scorer.begin`; steps
1 to 3 are :meth:`Contract.prepare`, the answer is read by :meth:`Contract.answer`):

1. read the frame's preamble and metadata (``peek_metadata``) and the targets
   (:mod:`root_worker.service.targets`); anything malformed is a :class:`BadRequest` (4xx),
   and so is a frame of more than ``FT_MAX_CANDIDATES`` candidates or an answer that
   would hold more than ``FT_MAX_ANSWER_SCORES`` scores (targets x candidates): the
   answer's size is bounded by settings, never by what a client asks for;
2. take **one** map view (one shared-memory poll) and resolve every target in it (README: lookup);
   the answer reports that view's generation. A target that names no version gets its
   replica first (``Routing.pick``) and the allowlist of the version that replica serves,
   as this worker learned it from its answers (:mod:`root_worker.service.leafversions`;
   while unknown: the union of the latest and the pending versions);
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from root_worker.contract import (  # noqa: F401 - re-exported: the names this module had
    FALLBACK_BUFFER_CAP,
    FALLBACK_LEAF_VERSION,
    FALLBACK_SKEW,
    FALLBACK_UNSAFE_VERSION,
    OUTCOME_OFF,
    BadRequest,
    Contract,
    LeafRequest,
    Payload,
    Plan,
    Prepared,
)
from root_worker.featuremap.live_map import LiveMap
from root_worker.frame import Trimmer
from root_worker.service.buffers import BufferPool
from root_worker.service.fanout import LeafCall, LeafError, LeafPool
from root_worker.service.loop import Loop, run_until
from root_worker.service.metrics import RootMetrics
from root_worker.service.replies import materialize
from root_worker.service.routing import Routing
from root_worker.service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Request(Plan):
    """One ``POST /score`` in flight in this worker: its :class:`Plan` and its calls."""

    loop: Loop | None = None
    deadline: float = 0.0
    on_done: Callable[[int, dict[str, Any]], None] | None = None
    pending: int = 0


class Scorer(Contract):
    """Everything ``POST /score`` needs in one worker."""

    plan_type = Request

    def __init__(self, settings: Settings, live_map: LiveMap, routing: Routing,
                 metrics: RootMetrics, trimmer: Trimmer | None = None,
                 buffers: BufferPool | None = None) -> None:
        super().__init__(settings, live_map, routing, metrics, trimmer, buffers)
        self.pool = LeafPool()

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
        req = self.prepare(body, query, inject=inject)
        assert isinstance(req, Request)
        req.loop, req.on_done, req.pending = loop, on_done, len(req.targets)
        req.deadline = loop.clock() + self.settings.leaf_timeout
        for i in range(len(req.targets)):
            self._start(req, i)
        return req

    # -- fan-out -------------------------------------------------------------------------
    def _start(self, req: Request, i: int, sent: LeafRequest | None = None) -> None:
        """Start target ``i``'s leaf call (``sent``: the re-send to make)."""
        out = sent if sent is not None else self.request(req, i)
        if out is None:  # failed before any leaf call (e.g. batch_size)
            self._ended(req, i, None, req.targets[i].result)
            return
        assert req.loop is not None
        call = LeafCall(req.loop, self.pool, out.endpoints, out.path, out.headers, out.parts,
                        req.deadline, self.settings.max_leaf_reply_bytes,
                        lambda result: self._ended(req, i, call, result), out.nbytes)
        call.start()

    def _ended(self, req: Request, i: int, call: LeafCall | None, result: Any) -> None:
        """One leaf call ended. An unexpected exception here fails this target alone
        (``internal``, logged once with the request id, counted); the request goes on."""
        p = req.targets[i]
        url = call.endpoint.url if call is not None and call.endpoint else "leaf"
        try:
            if call is not None and call.faults:
                self.metrics.faults.labels("leaf").inc()
            if isinstance(result, LeafError):
                self.fail(req, i, result)
            else:
                assert call is not None  # only a v2 target fails before a call
                status, data = result
                again = self.answer(req, i, url, status, data, call.reply_headers,
                                    call.body_bytes, learn=call.endpoint is not None)
                if again is not None:
                    self._start(req, i, again)
                    return
        except Exception as exc:
            log.error("fault contained phase=leaf_answer request_id=%s model=%s url=%s: "
                      "%s: %s", req.request_id, p.target.model, url, type(exc).__name__, exc,
                      exc_info=exc)
            self.metrics.faults.labels("leaf_answer").inc()
            p.result = LeafError("internal", f"{url}: internal error (logged): "
                                 f"{type(exc).__name__}")
        req.pending -= 1
        if req.pending == 0:
            self._finish(req)

    def _finish(self, req: Request) -> None:
        status, doc = self.finish(req, raw=True)
        assert req.on_done is not None
        req.on_done(status, doc)

    def close(self) -> None:
        self.pool.close()
        self.buffers.shrink()
