"""The map a worker serves right now: shared-memory snapshot + FeatureMapView per generation.

Runs in each root worker (after fork) and in ``trimmer-inspect``. The request path takes
one view per request -- :meth:`LiveMap.current`, one lock-free poll of the control block
(~1 µs when nothing changed) -- and resolves every target of that request in it with
:meth:`LiveMap.resolve_in` (a memoised lookup), so a multi-target request never straddles
two generations and reports the one that served it. :meth:`LiveMap.resolve` is the
one-target shorthand (poll + lookup). A new generation that is not a readable feature map
is refused and the previous one kept; with no map at all every target resolves to
``passthrough_no_map``.

Threads: a LiveMap may be shared; :meth:`current` from several threads never waits (one
attaches, the others serve the generation attached before). Attaching a generation maps it
and checks its checksum: an event loop calls :meth:`current_nowait` and runs
:meth:`current` in a thread when it says ``stale``.
"""

from __future__ import annotations

import logging

from root_worker.featuremap.map_reader import (
    FeatureMapView,
    MapError,
    Resolution,
    no_map,
    open_generation,
)
from root_worker.featuremap.shm_reader import ShmReader, Snapshot

log = logging.getLogger(__name__)


class LiveMap:
    """One worker's view of the published map. Constructing it touches no shared memory."""

    def __init__(self, prefix: str) -> None:
        self.reader = ShmReader(prefix)
        self._view: FeatureMapView | None = None
        self._snapshot: Snapshot | None = None
        self._refused_generation = 0
        self.map_errors = 0  # blobs refused + lookups that hit a corrupt map (a metric)

    def current(self) -> FeatureMapView | None:
        """The FeatureMapView of the newest usable generation, or None."""
        snap = self.reader.poll()
        if snap is self._snapshot:
            return self._view
        if snap is None:
            self._snapshot, self._view = None, None
            return None
        if snap.generation == self._refused_generation:
            return self._view
        try:
            view = open_generation(snap.buffer, snap.generation)
        except MapError as exc:
            self.map_errors += 1
            self._refused_generation = snap.generation
            log.error("refusing map generation=%d error=%s; keeping generation %d",
                      snap.generation, exc, self.generation)
            return self._view
        self._snapshot, self._view = snap, view
        log.info("attached map generation=%d models=%d", view.generation, view.model_count)
        return view

    def current_nowait(self) -> tuple[FeatureMapView | None, bool]:
        """``(view, stale)`` without attaching: when a new generation (or a periodic
        recheck) is waiting, the view already attached and ``stale`` True -- then call
        :meth:`current` in a thread (it maps the segment and checks its checksum). For an
        event loop; never waits, never reads more than the control block's active word."""
        if self.reader.due():
            return self._view, True
        return self.current(), False

    @property
    def generation(self) -> int:
        """The generation this worker serves (0: none)."""
        return self._view.generation if self._view is not None else 0

    @property
    def published_at_ns(self) -> int:
        return self._snapshot.published_at_ns if self._snapshot is not None else 0

    def resolve(self, model: str, version: str | None = None) -> Resolution:
        """Which allowlist applies to a target now; never raises for a bad map."""
        return self.resolve_in(self.current(), model, version)

    def resolve_in(self, view: FeatureMapView | None, model: str,
                   version: str | None = None) -> Resolution:
        """Which allowlist ``view`` (one request's :meth:`current`) gives a target; never
        raises for a bad map."""
        if view is None:
            return no_map(model, version)
        try:
            return view.resolve(model, version)
        except MapError as exc:
            self.map_errors += 1
            log.error("map lookup failed generation=%d model=%r error=%s", view.generation,
                      model, exc)
            return no_map(model, version)

    def resolve_rollout_in(self, view: FeatureMapView | None, model: str) -> Resolution:
        """:meth:`FeatureMapView.resolve_rollout` (a leaf whose version is not known yet: the
        union of the latest and the pending versions); never raises for a bad map."""
        if view is None:
            return no_map(model)
        try:
            return view.resolve_rollout(model)
        except MapError as exc:
            self.map_errors += 1
            log.error("map lookup failed generation=%d model=%r error=%s", view.generation,
                      model, exc)
            return no_map(model)

    def close(self) -> None:
        self._view = self._snapshot = None
        self.reader.close()
