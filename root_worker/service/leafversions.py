"""Which version each leaf endpoint serves, learned from its answers (one table per worker).

Runs in each root worker (created with the :class:`~root_worker.service.score.Scorer`).
During a rollout, replicas of one model serve different versions, and a version may be
*pending* on the roots (shipped ahead of its leaves, never "latest"). A request that names
no version is trimmed for the version its destination replica serves: the replica is chosen
first (:meth:`~root_worker.service.routing.Routing.pick`), then :func:`choose` picks the
allowlist:

==================================  ========================================================
what the worker knows of the leaf   the frame it sends
==================================  ========================================================
nothing yet (first contact, or the  the union of the latest and every pending version's
entry was evicted)                  allowlist (:meth:`FeatureMapView.resolve_rollout`): no
                                    version the leaf may serve finds it short
it serves V, the latest or a        the same union (``rollout``): a rollout is under way
pending version of the model, and   and the replica may move to the other version (or
a version is pending                back) at any moment -- it then finds no frame short,
                                    and the move costs no round trip
it serves version V, in the map     V's allowlist, marked ``X-FT-Trimmed-For: V``
(no rollout of V under way)
it serves V, which no bundle lists  the frame untrimmed (``version_fallback``): a trimmed
                                    frame would be refused on every request
==================================  ========================================================

Why the union through the whole rollout window rather than V's allowlist: every root worker
learns on its own, so trimming for V would cost each worker on each root host one 409 round
trip per replica that moves -- workers x hosts per change, not one. The union costs bytes
instead, only for the model under rollout and only while a version is pending: the features
the versions do not share (the 60 of 618 inputs of the rehearsal: under 10 % of that
model's trimmed bytes). Once the pipeline promotes (or drops) the pending version the
window closes, and each replica gets exactly its version's allowlist again.

What a leaf serves is learned from every answer to a version-less request: the ``version``
of a 200 answer and of a 409 refusal (the leaf SDK puts it in both; a leaf that reports
nothing keeps getting the union). A leaf that moves between the versions of a rollout
costs nothing (it was sent the union); one that moves to any other version the map lists
costs at most one version-skew round trip per worker (the 409 that teaches the new version,
plus any request already in flight to it then). The table is an LRU of :data:`MAX_LEARNED`
(endpoint, model) entries; an evicted entry is learned again from the next answer.

Requests that name a version are trimmed for it as before (README, "Lookup semantics") and
teach nothing: a leaf may serve a named version that is not its default.

:class:`LogLimiter` keeps skew and fallback log lines to one per (kind, model) and
:data:`LOG_INTERVAL_S`, with the count of the events folded into it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flatbuffers_schema.wire import NAME_PATTERN, REPLY_VERSION
from root_worker.featuremap.live_map import LiveMap
from root_worker.featuremap.map_reader import FeatureMapView, Outcome, Resolution
from root_worker.frame.lru import LruCache

MAX_LEARNED = 4096  # (endpoint, model) pairs a worker remembers
MAX_VERSION_BYTES = 1024  # the bundle validator's default name limit
LOG_INTERVAL_S = 10.0
MAX_LOG_KEYS = 1024  # (kind, model) pairs the log limiter tracks
MAX_VERSION_REPLY = 64 << 10  # a 409 body larger than this is not parsed for its version
_VERSION = re.compile(NAME_PATTERN)

# how a version-less target's allowlist was chosen (the target's "leaf_version" field)
LEAF_UNKNOWN = "unknown"   # union of the latest and the pending versions
LEAF_LEARNED = "learned"   # the version the replica reported
LEAF_ROLLOUT = "rollout"   # it reported a version of a rollout under way: the union
LEAF_NOT_IN_MAP = "not_in_map"  # the replica serves a version no bundle lists: untrimmed


@dataclass(frozen=True, slots=True)
class Choice:
    """The allowlist for one version-less target and why."""

    resolution: Resolution
    how: str                # LEAF_UNKNOWN / LEAF_LEARNED / LEAF_NOT_IN_MAP
    leaf_version: str | None  # what the replica serves, when known


def valid_version(value: Any) -> str | None:
    """``value`` when it can be a version a root trims for (a header-safe name), else None."""
    if isinstance(value, str) and 0 < len(value) <= MAX_VERSION_BYTES \
            and _VERSION.fullmatch(value):
        return value
    return None


def refusal_version(data: bytes) -> str | None:
    """The ``version`` a 409 refusal reports (the leaf SDK's ``check_skew`` adds it)."""
    if len(data) > MAX_VERSION_REPLY:
        return None
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return valid_version(doc.get(REPLY_VERSION)) if isinstance(doc, dict) else None


class LeafVersions:
    """(endpoint URL, model) -> the version that endpoint serves for version-less requests."""

    def __init__(self, limit: int = MAX_LEARNED,
                 on_change: Callable[[str, str, str | None, str | None], None] | None = None
                 ) -> None:
        """``on_change(url, model, old, new)`` runs when an entry is learned, changes or is
        evicted (``new`` None)."""
        self._table: LruCache[tuple[str, str], str] = LruCache(limit)
        self._on_change = on_change
        self.changes = 0  # learned versions that replaced another one

    def get(self, url: str, model: str) -> str | None:
        key = (url, model)
        version = self._table.get(key)
        if version is not None:
            self._table.touch(key)
        return version

    def learn(self, url: str, model: str, version: str) -> str | None:
        """Record what ``url`` serves; returns the version it replaced (None: none or the
        same)."""
        key = (url, model)
        old = self._table.get(key)
        if old == version:
            self._table.touch(key)
            return None
        evicted = next(iter(self._table.items())) \
            if old is None and len(self._table) >= self._table.limit else None
        self._table.put(key, version)
        if self._on_change is not None:
            if evicted is not None:
                self._on_change(evicted[0][0], evicted[0][1], evicted[1], None)
            self._on_change(url, model, old, version)
        if old is not None:
            self.changes += 1
        return old

    def items(self) -> Iterator[tuple[str, str, str]]:
        """(url, model, version), least recently used first."""
        for (url, model), version in list(self._table.items()):
            yield url, model, version

    def __len__(self) -> int:
        return len(self._table)


def in_rollout(rollout: Resolution, leaf_version: str) -> bool:
    """Whether a replica serving ``leaf_version`` takes part in the rollout ``rollout``
    (:meth:`FeatureMapView.resolve_rollout` of its model) is under way: it then gets the
    union."""
    return rollout.union and (leaf_version == rollout.version or
                              leaf_version in rollout.pending)


def choose(live_map: LiveMap, view: FeatureMapView | None, model: str,
           leaf_version: str | None) -> Choice:
    """The allowlist for a version-less target whose replica serves ``leaf_version``
    (None: not known)."""
    rollout = live_map.resolve_rollout_in(view, model)
    if leaf_version is None:
        return Choice(rollout, LEAF_UNKNOWN, None)
    if in_rollout(rollout, leaf_version):
        return Choice(rollout, LEAF_ROLLOUT, leaf_version)
    res = live_map.resolve_in(view, model, leaf_version)
    if res.outcome is Outcome.VERSION_FALLBACK:
        untrimmed = dataclasses.replace(res, requested_version=None, version=leaf_version,
                                        allowlist=None, tensors=None)
        return Choice(untrimmed, LEAF_NOT_IN_MAP, leaf_version)
    if res.outcome is Outcome.TRIMMED:
        res = dataclasses.replace(res, requested_version=None)
    return Choice(res, LEAF_LEARNED, leaf_version)


class LogLimiter:
    """One log line per (kind, model) and ``interval``; the events in between are counted
    and reported with the next line (``... (N more since the last line)``)."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic,
                 max_keys: int = MAX_LOG_KEYS) -> None:
        self._log, self._interval, self._clock = logger, interval, clock
        self._state: LruCache[tuple[str, str], list[float]] = LruCache(max_keys)

    def log(self, level: int, kind: str, model: str, message: str, *args: Any) -> bool:
        """Log ``message % args`` unless a line for (kind, model) was logged within the
        interval (then count it); True when logged."""
        now = self._clock()
        key = (kind, model)
        state = self._state.get(key)
        if state is not None and now - state[0] < self._interval:
            state[1] += 1
            return False
        folded = int(state[1]) if state is not None else 0
        self._state.put(key, [now, 0])
        if folded:
            message += " (%d more since the last line)"
            args = (*args, folded)
        self._log.log(level, message, *args)
        return True
