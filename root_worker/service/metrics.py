"""The root workers' Prometheus metrics, merged across workers (multiprocess mode).

Runs in each worker, created after fork. When ``PROMETHEUS_MULTIPROC_DIR`` is set (the
gunicorn configuration sets it to ``$FT_RUN_DIR/prometheus`` and wipes it at start) every
value lives in a per-process mmap'd file there and ``/metrics`` on any worker merges all of
them; the ``child_exit`` hook removes a dead worker's live gauges. Without it (a single
process, e.g. in unit tests) the values stay in this process.

``model`` labels are the models named in the routing file; any other model is counted as
``_other`` so clients cannot grow the label set.

==================================================  =======  =================================
metric                                              type     meaning
==================================================  =======  =================================
feature_trimmer_root_targets_total{model,outcome}   counter  targets by lookup outcome
                                                             (``off`` in mode off)
feature_trimmer_root_untrimmed_bytes_total{model}   counter  frame bytes before trimming
feature_trimmer_root_trimmed_bytes_total{model}     counter  frame bytes after trimming (in
                                                             shadow mode: what would be sent)
feature_trimmer_root_sent_bytes_total{model}        counter  body bytes sent to leaves (after
                                                             lz4 when on)
feature_trimmer_root_missing_required_total{model}  counter  allowlisted features absent from
                                                             the frame
feature_trimmer_root_trim_errors_total{model}       counter  trimmer failures (sent untrimmed)
feature_trimmer_root_leaf_errors_total{model,kind}  counter  failed targets by kind (fanout.py)
feature_trimmer_root_skew_resends_total{model}      counter  leaf on another version refused a
                                                             trimmed frame: re-sent untrimmed
feature_trimmer_root_leaf_version{model,endpoint,   gauge    1: the version this worker learned
  version,pid}                                               that the leaf endpoint serves for
                                                             version-less requests (0: no
                                                             longer); read by trimmer-inspect
                                                             lookup --root
feature_trimmer_root_leaf_version_changes_total     counter  learned versions that replaced
  {model}                                                    another (a leaf rolled over)
feature_trimmer_root_trim_seconds                   histo    one trim (per target)
feature_trimmer_root_leaf_seconds{model}            histo    leaf round trip per target
feature_trimmer_root_requests_total{code}           counter  /score answers by HTTP status
feature_trimmer_root_map_generation{pid}            gauge    generation each live worker
                                                             serves (0: none)
feature_trimmer_root_map_published_timestamp_seconds{pid} gauge  publish time of that map
feature_trimmer_root_map_age_seconds                gauge    age of the stalest live worker's
                                                             map (updated per request/scrape)
feature_trimmer_root_map_errors_total               counter  map generations refused/corrupt
feature_trimmer_root_info{mode,lz4}                 gauge    1: the configured mode
feature_trimmer_root_trim_backend_info{backend,kernel} gauge 1: the trim backend serving
                                                             (``c`` or ``numpy``; kernel:
                                                             the C copy kernel, or none)
==================================================  =======  =================================
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

P = "feature_trimmer_root_"
OTHER_MODEL = "_other"
MAX_CACHED_MODELS = 4096  # model name -> bound children; clients choose the names
MAX_LEAF_VERSION_SERIES = 1024  # (model, endpoint, version) series one worker exports
OTHER_VERSION = "_other"  # a leaf version past that bound
TRIM_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2)
MAP_AGE_EVERY_NS = 100_000_000  # per-request map age updates: at most every 0.1 s
LEAF_BUCKETS = (5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ModelMetrics:
    """The label children of one model, bound once (``.labels()`` costs microseconds)."""

    __slots__ = ("untrimmed", "trimmed", "sent", "missing", "trim_errors", "leaf_seconds",
                 "skew_resends", "_root", "_label", "_outcomes", "_errors")

    def __init__(self, root: RootMetrics, label: str) -> None:
        self._root, self._label = root, label
        self.untrimmed = root.bytes_untrimmed.labels(label)
        self.trimmed = root.bytes_trimmed.labels(label)
        self.sent = root.bytes_sent.labels(label)
        self.missing = root.missing.labels(label)
        self.trim_errors = root.trim_errors.labels(label)
        self.leaf_seconds = root.leaf_seconds.labels(label)
        self.skew_resends = root.skew_resends.labels(label)
        self._outcomes: dict[str, Any] = {}
        self._errors: dict[str, Any] = {}

    def outcome(self, outcome: str) -> None:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self._root.targets.labels(self._label, outcome)
        child.inc()

    def leaf_error(self, kind: str) -> None:
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self._root.leaf_errors.labels(self._label, kind)
        child.inc()


class RootMetrics:
    """All metrics of one worker process."""

    def __init__(self, listed: Any = None) -> None:
        """``listed(model) -> bool`` says which models get their own label."""
        self._listed = listed or (lambda model: False)
        self._models: dict[str, ModelMetrics] = {}
        r = self.registry = CollectorRegistry(auto_describe=True)
        by_model = ["model"]
        self.targets = Counter(P + "targets", "Targets by lookup outcome",
                               ["model", "outcome"], registry=r)
        self.bytes_untrimmed = Counter(P + "untrimmed_bytes", "Frame bytes before trimming",
                                       by_model, registry=r)
        self.bytes_trimmed = Counter(P + "trimmed_bytes",
                                     "Frame bytes after trimming (shadow: would-be)",
                                     by_model, registry=r)
        self.bytes_sent = Counter(P + "sent_bytes", "Body bytes sent to leaves", by_model,
                                  registry=r)
        self.missing = Counter(P + "missing_required",
                               "Allowlisted features absent from the frame", by_model,
                               registry=r)
        self.trim_errors = Counter(P + "trim_errors", "Trimmer failures, sent untrimmed",
                                   by_model, registry=r)
        self.leaf_errors = Counter(P + "leaf_errors", "Failed targets by kind",
                                   ["model", "kind"], registry=r)
        self.skew_resends = Counter(
            P + "skew_resends", "Trimmed frames a leaf refused (it serves another version "
            "and lacks features), re-sent untrimmed", by_model, registry=r)
        self.trim_seconds = Histogram(P + "trim_seconds", "Time to trim one target's frame",
                                      buckets=TRIM_BUCKETS, registry=r)
        self.leaf_seconds = Histogram(P + "leaf_seconds", "Leaf round trip per target",
                                      by_model, buckets=LEAF_BUCKETS, registry=r)
        self.requests = Counter(P + "requests", "/score answers by HTTP status", ["code"],
                                registry=r)
        self.generation = Gauge(P + "map_generation", "Map generation this worker serves",
                                registry=r, multiprocess_mode="liveall")
        self.published = Gauge(P + "map_published_timestamp_seconds",
                               "Publish time of the map this worker serves",
                               registry=r, multiprocess_mode="liveall")
        self.map_age = Gauge(P + "map_age_seconds", "Age of the stalest live worker's map",
                             registry=r, multiprocess_mode="livemax")
        self.map_errors = Counter(P + "map_errors", "Map generations refused or corrupt",
                                  registry=r)
        self.faults = Counter(
            P + "faults", "Unexpected exceptions contained to one connection or one target, "
            "by phase (each is a bug: it is logged with its request id)", ["phase"],
            registry=r)
        self.accept_pauses = Counter(
            P + "accept_pauses", "Times a worker stopped accepting for a moment because the "
            "process ran out of file descriptors (EMFILE/ENFILE)", registry=r)
        self.info = Gauge(P + "info", "The configured mode", ["mode", "lz4"], registry=r,
                          multiprocess_mode="liveall")
        self.trim_backend = Gauge(P + "trim_backend_info",
                                  "The trim backend serving (c: the C accelerator, numpy: "
                                  "the fallback)", ["backend", "kernel"], registry=r,
                                  multiprocess_mode="liveall")
        self.leaf_version = Gauge(P + "leaf_version", "1: the version this worker learned "
                                  "that a leaf endpoint serves for version-less requests",
                                  ["model", "endpoint", "version"], registry=r,
                                  multiprocess_mode="liveall")
        self.leaf_version_changes = Counter(P + "leaf_version_changes",
                                            "Learned leaf versions that replaced another",
                                            by_model, registry=r)
        self._leaf_series: set[tuple[str, str, str]] = set()
        self._map_errors_seen = 0
        self._map_seen = (-1, -1)
        self._age_set_ns = 0
        self._labels: dict[str, ModelMetrics] = {}
        self._answers: dict[int, Any] = {}  # status -> bound child (our own few codes)

    def model(self, model: str) -> ModelMetrics:
        mm = self._models.get(model)
        if mm is None:
            label = model if self._listed(model) else OTHER_MODEL
            mm = self._labels.get(label)
            if mm is None:
                mm = self._labels[label] = ModelMetrics(self, label)
            if len(self._models) < MAX_CACHED_MODELS:
                self._models[model] = mm
        return mm

    def leaf_version_changed(self, url: str, model: str, old: str | None,
                             new: str | None) -> None:
        """Export what a worker learned (:class:`~root_worker.service.leafversions.
        LeafVersions` calls it): the old version's series to 0, the new one's to 1."""
        label = model if self._listed(model) else OTHER_MODEL
        if old is not None:
            self.leaf_version.labels(label, url, self._version_label(label, url, old)).set(0)
            if new is not None:
                self.leaf_version_changes.labels(label).inc()
        if new is not None:
            self.leaf_version.labels(label, url, self._version_label(label, url, new)).set(1)

    def _version_label(self, model: str, url: str, version: str) -> str:
        """``version``, or ``_other`` once this worker exports too many series (a leaf that
        reports ever new versions must not grow the scrape without bound)."""
        key = (model, url, version)
        if key in self._leaf_series:
            return version
        if len(self._leaf_series) >= MAX_LEAF_VERSION_SERIES:
            return OTHER_VERSION
        self._leaf_series.add(key)
        return version

    def answered(self, status: int) -> None:
        """Count one ``/score`` answer (the label child bound once per status code)."""
        child = self._answers.get(status)
        if child is None:
            child = self._answers[status] = self.requests.labels(str(status))
        child.inc()

    def set_mode(self, mode: str, lz4: bool) -> None:
        self.info.labels(mode, "1" if lz4 else "0").set(1)

    def set_trim_backend(self, backend: str, kernel: str | None) -> None:
        self.trim_backend.labels(backend, kernel or "none").set(1)

    def set_map(self, generation: int, published_at_ns: int, now_ns: int,
                map_errors: int, *, force: bool = True) -> None:
        """Export the served map's generation and age (called per scrape, and per request
        with ``force=False``: the age then moves at most every ``MAP_AGE_EVERY_NS``)."""
        changed = (generation, published_at_ns) != self._map_seen
        if changed:
            self._map_seen = (generation, published_at_ns)
            self.generation.set(generation)
            self.published.set(published_at_ns / 1e9)
        if force or changed or now_ns - self._age_set_ns >= MAP_AGE_EVERY_NS:
            self._age_set_ns = now_ns
            self.map_age.set(max(0.0, (now_ns - published_at_ns) / 1e9) if generation
                             else 0.0)
        if map_errors > self._map_errors_seen:
            self.map_errors.inc(map_errors - self._map_errors_seen)
            self._map_errors_seen = map_errors

    def render(self) -> tuple[bytes, str]:
        """The exposition of every worker (multiprocess) or of this process."""
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if path and os.path.isdir(path):
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry, path=path)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
