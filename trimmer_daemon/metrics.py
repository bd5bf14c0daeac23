"""The daemon's Prometheus metrics (served by the daemon itself on --metrics-listen).

Runs in the daemon. The workers export their own view (generation served, map age) from
shared memory; these are the writer's facts: what it published, what failed, and each
bundle's state *now*.

=================================================  ======  ======================================
metric                                             type    meaning
=================================================  ======  ======================================
feature_trimmer_daemon_publish_total               counter generations published
feature_trimmer_daemon_publish_failures_total      counter publications that failed (e.g. shm full)
feature_trimmer_daemon_generation                  gauge   current generation
feature_trimmer_daemon_last_publish_timestamp_seconds gauge wall clock of the last publication
feature_trimmer_daemon_publish_duration_seconds    histo   consolidate + compile + publish
feature_trimmer_daemon_bundle_state{bundle,state}  gauge   1 for the bundle's current state
feature_trimmer_daemon_bundle_reloads_total{bundle} counter new content loaded
feature_trimmer_daemon_bundle_failures_total{bundle} counter validation / read failures
feature_trimmer_daemon_bundle_models{bundle}       gauge   models served from the bundle
feature_trimmer_daemon_heartbeat_timestamp_seconds gauge last heartbeat written to shm
feature_trimmer_daemon_conflicts                   gauge   conflicting definitions in the map
feature_trimmer_daemon_watch_rescans_total         counter full rescans (periodic + overflow)
feature_trimmer_daemon_watch_overflows_total       counter inotify queue overflows
feature_trimmer_daemon_shm_segments                gauge   generation segments kept (bounded)
feature_trimmer_daemon_shm_bytes                   gauge   bytes of those segments (bounded)
feature_trimmer_daemon_control_recreations_total   counter control segment removed and re-created
=================================================  ======  ======================================
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from flatbuffers_schema.feature_map import STATE_NAMES

log = logging.getLogger(__name__)
P = "feature_trimmer_daemon_"


class DaemonMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.publish = Counter(P + "publish", "Generations published", registry=r)
        self.publish_failures = Counter(P + "publish_failures", "Failed publications",
                                        registry=r)
        self.generation = Gauge(P + "generation", "Current generation", registry=r)
        self.last_publish = Gauge(P + "last_publish_timestamp_seconds",
                                  "Wall clock of the last successful publication", registry=r)
        self.publish_duration = Histogram(
            P + "publish_duration_seconds", "Consolidate + compile + publish time",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.bundle_state = Gauge(P + "bundle_state", "1 for the bundle's current state",
                                  ["bundle", "state"], registry=r)
        self.bundle_reloads = Counter(P + "bundle_reloads", "New bundle content loaded",
                                      ["bundle"], registry=r)
        self.bundle_failures = Counter(P + "bundle_failures",
                                       "Bundle validation or read failures", ["bundle"],
                                       registry=r)
        self.bundle_models = Gauge(P + "bundle_models", "Models served from the bundle",
                                   ["bundle"], registry=r)
        self.heartbeat = Gauge(P + "heartbeat_timestamp_seconds",
                               "Wall clock of the last heartbeat written to shm", registry=r)
        self.conflicts = Gauge(P + "conflicts", "Conflicting definitions in the map",
                               registry=r)
        self.rescans = Counter(P + "watch_rescans", "Full rescans of every bundle", registry=r)
        self.overflows = Counter(P + "watch_overflows", "inotify queue overflows", registry=r)
        self.shm_segments = Gauge(P + "shm_segments", "Generation segments kept", registry=r)
        self.shm_bytes = Gauge(P + "shm_bytes", "Bytes of the generation segments kept",
                               registry=r)
        self.control_recreations = Counter(P + "control_recreations",
                                           "Control segment removed and re-created", registry=r)
        self._followed: dict[Counter, int] = {}  # counter -> the total it last followed
        self.parse_worker_restarts = Counter(
            P + "parse_worker_restarts", "Parse worker processes killed (a parse past its "
            "deadline, a dead or stopped worker); each failed only its own file", registry=r)

    def follow(self, counter: Counter, total: int) -> None:
        """Advance ``counter`` to a running ``total`` kept elsewhere (the publisher's,
        watcher's or parse worker's own count): increments by what it grew since the last
        call; a total that restarted from zero counts from there."""
        seen = self._followed.get(counter, 0)
        if total > seen:
            counter.inc(total - seen)
        self._followed[counter] = total

    def set_bundle_state(self, bundle: str, state: int) -> None:
        for value, name in STATE_NAMES.items():
            self.bundle_state.labels(bundle, name).set(1 if value == state else 0)

    def forget_bundle(self, bundle: str) -> None:
        for name in STATE_NAMES.values():
            _remove(self.bundle_state, bundle, name)
        for metric in (self.bundle_reloads, self.bundle_failures, self.bundle_models):
            _remove(metric, bundle)

    def serve(self, listen: str) -> None:
        if not listen:
            return
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
        log.info("metrics listening addr=%s", listen)


def _remove(metric: Gauge | Counter, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass
