"""The trimmer daemon's main loop: watch -> reload bundle -> assemble the blob -> publish.

Runs in the daemon process, single-threaded (the metrics HTTP server is prometheus_client's
own thread; big bundle files are parsed in the parse worker *process*, see
:mod:`trimmer_daemon.loader`). Signal handlers only set flags and wake the loop through
``signal.set_wakeup_fd``; the loop does the work (``handle_hup`` / ``handle_term``). The loop
waits in one ``select()`` on the inotify fd, the wake-up pipe and the parse worker's pipe,
with a timeout to the next heartbeat, hold deadline or due publication.

Each bundle's share of the map is compiled once per load (:mod:`trimmer_daemon.parts`);
a publication only writes the root and references the unchanged parts
(:mod:`trimmer_daemon.assemble`), so its cost follows what changed. When nothing is to be
read, the loop has the publisher prepare the next generation's segment (its *spare*, a copy
of the current blob), so the next publication writes only the changed parts into it.

Guarantees (docs/daemon.md, docs/operations.md):
- start is never blocked: the first generation is published even if every bundle is broken
  (a broken bundle logs CRITICAL and shows its error in the map's bundle status); a metrics
  port that is taken is logged, shown in the status line and the map, and retried;
- a bundle that fails validation keeps its last-known-good map; the others still update;
- a failed publication (e.g. /dev/shm full, also at start) keeps the current generation and
  is retried every ``retry_interval`` seconds;
- map changes are published at once; status-only changes (a new error text, stale <-> ok)
  at most every ``status_interval`` seconds, so a flapping file cannot fill /dev/shm;
- every heartbeat checks the control segment (re-created if removed or replaced) and the
  current generation's segment (a new generation is published if it was removed);
- on SIGTERM the current generation stays in place for the workers (``--cleanup`` removes it).
"""

from __future__ import annotations

import logging
import math
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from flatbuffers_schema.feature_map import STATE_NAMES
from flatbuffers_schema.fmap.BundleState import BundleState
from trimmer_daemon.assemble import Assembler
from trimmer_daemon.config import DaemonConfig
from trimmer_daemon.loader import Loader
from trimmer_daemon.metrics import DaemonMetrics
from trimmer_daemon.publisher import (
    Publisher,
    PublisherError,
    PublisherLockedError,
    PublishError,
)
from trimmer_daemon.sdnotify import Notifier
from trimmer_daemon.state import BundleTracker, RefreshResult
from trimmer_daemon.watcher import BundleWatcher

log = logging.getLogger(__name__)

METRICS_RETRY_S = 10.0
"""How often a metrics endpoint that could not bind (port taken) is retried."""
STARTUP_PARSE_WAIT_S = 10.0
"""At start, the first publication waits at most this long for bundles parsing in the
worker (well inside the unit's TimeoutStartSec=30s: READY=1 follows the first publication)."""
DAEMON_PROBLEM = "daemon: "
"""Prefix of daemon-level problems in the map's report list (``trimmer-inspect`` shows it)."""


class StartupError(Exception):
    """The daemon cannot start; the message says what and where."""


class Daemon:
    def __init__(self, config: DaemonConfig, *,
                 reload_config: Callable[[], DaemonConfig] | None = None) -> None:
        self.config = config
        self._reload_config = reload_config
        self.assembler = Assembler()
        self.loader = Loader(limits=config.limits, inline_bytes=config.inline_parse_bytes,
                             hold_s=config.writer_hold_seconds,
                             max_parse_memory=config.max_parse_memory, on_result=self._record)
        self.metrics = DaemonMetrics()
        self.notifier = Notifier()
        self.trackers: dict[str, BundleTracker] = {}
        self.publisher: Publisher | None = None
        self.watcher: BundleWatcher | None = None
        self._dirty = True          # the published map is out of date
        self._status_dirty = False  # only bundle statuses changed since the last publication
        self._retry_at = 0.0
        self._last_publish = -math.inf  # monotonic time of the last publication
        self._metrics_problem = ""
        self._metrics_retry_at = math.inf
        self._ready_sent = False
        self._first_publish_at = 0.0
        self._stop = False
        self._hup = False
        self._wake_r = self._wake_w = -1
        self._last_heartbeat = 0.0
        self._last_watchdog = 0.0

    # -- lifecycle ------------------------------------------------------------------------
    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop. Returns the process exit code.

        Raises :class:`PublisherLockedError` (another daemon holds the name) and
        :class:`StartupError` (anything else that prevents starting, in one line).
        """
        try:
            self._start()
            while not self._stop:
                self._step()
        finally:
            self._shutdown()
        return 0

    def _start(self) -> None:
        cfg = self.config
        try:
            self.publisher = Publisher(
                cfg.shm_name, mode=cfg.shm_mode, group=cfg.shm_group or None,
                grace_s=cfg.grace_seconds, lock_dir=cfg.lock_dir,
                max_segments=cfg.max_generations,
                max_bytes_factor=cfg.max_generation_bytes_factor)
            self._install_signals()
            self._set_bundles(cfg.bundles)
            self.watcher = BundleWatcher(cfg.bundles, debounce_s=cfg.debounce_ms / 1e3,
                                         max_delay_s=cfg.max_delay_ms / 1e3,
                                         rescan_interval_s=cfg.rescan_interval)
            self.loader.watcher = self.watcher
        except PublisherLockedError:
            raise
        except (PublisherError, OSError, ValueError) as exc:
            raise StartupError(f"shm={cfg.shm_name}: {exc}") from exc
        self._serve_metrics()
        self.loader.refresh(set(self.trackers), startup=True)
        if self.loader.pending():
            # Big bundles parse in the worker: the first map waits for them (a bounded
            # while; the previous daemon's generation keeps serving), so a restart does not
            # publish a map without them. The loop, heartbeat and watchdog run meanwhile.
            self._first_publish_at = time.monotonic() + STARTUP_PARSE_WAIT_S
            log.info("waiting up to %.0fs for bundles parsing in the worker before the first "
                     "publication", STARTUP_PARSE_WAIT_S)
        self._publish_if_dirty()

    def _ready(self) -> None:
        """READY=1 once, after the first publication attempt (never blocked by bundles)."""
        if self._ready_sent or self.publisher is None:
            return
        self._ready_sent = True
        self.notifier.notify("READY=1", self._status_line())
        log.info("daemon ready shm=%s generation=%d bundles=%d", self.config.shm_name,
                 self.publisher.generation, len(self.trackers))

    def _step(self) -> None:
        assert self.watcher is not None
        timeout = self._next_timeout()
        fds = [self.watcher.fileno(), self._wake_r]
        if self.loader.fileno() >= 0:
            fds.append(self.loader.fileno())
        if timeout > 0 and self._idle_work(fds):
            timeout = self._next_timeout()
        readable, _, _ = select.select(fds, [], [], timeout)
        if self._wake_r in readable:
            self._drain_wakeup()
        if self._stop:
            return
        if self._hup:
            self._hup = False
            self.handle_hup()
        self.loader.poll()
        changed = self.watcher.poll(0)
        self._count_stats()
        if changed:
            self.loader.refresh(changed)
        self._publish_if_dirty()
        self._tick()

    def _idle_work(self, fds: list[int]) -> bool:
        """When nothing is to be read right now: prepare the next generation's segment
        (the next publication then only copies into it). Returns whether it ran."""
        assert self.publisher is not None
        if not self.publisher.wants_spare or select.select(fds, [], [], 0)[0]:
            return False
        self.publisher.prepare_spare()
        return True

    def _next_timeout(self) -> float:
        now = time.monotonic()
        timeout = max(0.0, self._last_heartbeat + self.config.heartbeat_interval - now)
        for due in (self._publish_due(), self.loader.next_deadline()):
            if due is not None:
                timeout = min(timeout, max(0.0, due - now))
        return timeout

    def _publish_due(self) -> float | None:
        """Monotonic time the next publication is due, ``None`` if nothing is pending."""
        if not self._ready_sent and self.loader.pending():
            return self._first_publish_at
        if self._dirty:
            return self._retry_at
        if self._status_dirty:
            return max(self._retry_at, self._last_publish + self.config.status_interval)
        return None

    def _tick(self) -> None:
        """Heartbeat, watchdog and reclaim, at most once per heartbeat interval."""
        assert self.publisher is not None
        now = time.monotonic()
        if now - self._last_heartbeat >= self.config.heartbeat_interval:
            self._last_heartbeat = now
            if self.publisher.heartbeat():
                self.metrics.heartbeat.set(time.time())
            if self.publisher.blob_missing():
                log.error("segment of generation %d was removed; publishing a new generation",
                          self.publisher.generation)
                self._dirty = True
            self.publisher.reclaim()
            self._count_segments()
            if now >= self._metrics_retry_at:
                self._serve_metrics()
        wd = self.notifier.watchdog_s
        if wd and now - self._last_watchdog >= wd / 2:
            self._last_watchdog = now
            self.notifier.notify("WATCHDOG=1")

    def _shutdown(self) -> None:
        self.loader.close()
        if self.watcher is not None:
            self.watcher.close()
        if self.publisher is not None:
            if self.config.cleanup:
                self.publisher.cleanup()
                log.info("stopped; removed every segment of shm=%s", self.config.shm_name)
            else:
                log.info("stopped; generation %d stays in place for the workers",
                         self.publisher.generation)
                self.publisher.close()
        self.notifier.notify("STOPPING=1")
        self.notifier.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- signals: handlers only set flags; the loop acts -----------------------------------
    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum: int, frame: Any) -> None:
        self._stop = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        self._hup = True

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def handle_hup(self) -> None:
        """Re-read the configuration (bundles added/removed) and rescan every bundle."""
        self.notifier.notify("RELOADING=1")
        if self._reload_config is not None:
            try:
                self.config = self._reload_config()
            except ValueError as exc:
                log.error("reload failed, keeping the previous configuration: %s", exc)
        self._set_bundles(self.config.bundles)
        assert self.watcher is not None
        self.watcher.set_bundles(self.config.bundles)
        self.loader.refresh(set(self.trackers))
        self._publish_if_dirty()
        self.notifier.notify("READY=1", self._status_line())
        log.info("reloaded configuration bundles=%s", ",".join(sorted(self.trackers)) or "-")

    # -- bundles --------------------------------------------------------------------------
    def _set_bundles(self, bundles: dict[str, str]) -> None:
        for name in list(self.trackers):
            if name not in bundles or self.trackers[name].path != bundles[name]:
                del self.trackers[name]
                self.metrics.forget_bundle(name)
                self._dirty = True
                log.info("bundle removed bundle=%s", name)
        for name, path in sorted(bundles.items()):
            if name not in self.trackers:
                self.trackers[name] = BundleTracker(name, path, limits=self.config.limits)
                self._dirty = True
                log.info("bundle added bundle=%s path=%s", name, path)
        self.loader.set_trackers(self.trackers)

    def _record(self, tracker: BundleTracker, r: RefreshResult, startup: bool) -> None:
        m = self.metrics
        m.set_bundle_state(r.bundle, r.state)
        part = tracker.part
        m.bundle_models.labels(r.bundle).set(part.model_count if part else 0)
        if r.loaded:
            m.bundle_reloads.labels(r.bundle).inc()
        if r.error and r.changed:
            m.bundle_failures.labels(r.bundle).inc()
        if r.loaded:
            self._dirty = True
        elif r.changed:
            self._status_dirty = True
        state = STATE_NAMES[r.state]
        if r.error and (r.changed or startup):
            level = logging.CRITICAL if startup else logging.ERROR
            log.log(level, "bundle %s bundle=%s serving=%s error=%s", state, r.bundle,
                    "last-known-good" if part else "nothing", r.error)
        elif r.loaded and part is not None:
            log.info("bundle loaded bundle=%s models=%d versions=%d sha256=%s duration_ms=%.1f",
                     r.bundle, part.model_count, part.version_count,
                     tracker.loaded_sha256[:12], r.duration_s * 1e3)
        elif r.changed and r.state == BundleState.Ok:
            log.info("bundle ok again bundle=%s (file matches the loaded content)", r.bundle)

    # -- publication ----------------------------------------------------------------------
    def _publish_if_dirty(self) -> None:
        due = self._publish_due()
        if due is None or time.monotonic() < due:
            return
        assert self.publisher is not None
        t0 = time.perf_counter()
        trackers = [self.trackers[n] for n in sorted(self.trackers)]
        generation = self.publisher.next_generation
        blob = self.assembler.assemble([t.part for t in trackers], [t.status() for t in trackers],
                                       generation=generation, built_at_ns=time.time_ns(),
                                       daemon_pid=os.getpid(), problems=self._problems(),
                                       pad_to=self.publisher.spare_size)
        try:
            published = self.publisher.publish_parts(blob.parts, blob.crc)
        except PublishError as exc:
            self.metrics.publish_failures.inc()
            self._retry_at = time.monotonic() + self.config.retry_interval
            log.error("publish failed generation=%d size=%d error=%s; generation %d stays, "
                      "retrying in %.1fs", generation, blob.size, exc,
                      self.publisher.generation, self.config.retry_interval)
            self._ready()
            return
        duration = time.perf_counter() - t0
        self._dirty = self._status_dirty = False
        self._last_publish = time.monotonic()
        m = self.metrics
        m.publish.inc()
        m.generation.set(published)
        m.last_publish.set(time.time())
        m.publish_duration.observe(duration)
        m.conflicts.set(blob.conflicts)
        states = {STATE_NAMES[t.state] for t in trackers}
        log.info("published generation=%d models=%d versions=%d size=%d bundles=%d "
                 "states=%s duration_ms=%.1f", published, blob.models,
                 blob.versions, blob.size, len(trackers), ",".join(sorted(states)) or "-",
                 duration * 1e3)
        self.notifier.notify(self._status_line())
        self._ready()

    def _status_line(self) -> str:
        gen = self.publisher.generation if self.publisher else 0
        bad = sum(1 for t in self.trackers.values() if t.state != BundleState.Ok)
        problems = "".join(f"; {p}" for p in self._problems())
        return f"STATUS=generation {gen}, {len(self.trackers)} bundles, {bad} not ok{problems}"

    def _problems(self) -> list[str]:
        """Daemon-level conditions an operator must see (status line, the map's reports)."""
        problems = [self._metrics_problem] if self._metrics_problem else []
        if self.publisher is not None and self.publisher.control_problem:
            problems.append(self.publisher.control_problem)
        return problems

    def _serve_metrics(self) -> None:
        """Start the metrics endpoint; a taken port is reported and retried, never fatal."""
        listen = self.config.metrics_listen
        try:
            self.metrics.serve(listen)
        except OSError as exc:
            problem = (f"{DAEMON_PROBLEM}metrics endpoint {listen} unavailable: "
                       f"{exc.strerror or exc} (retrying every {METRICS_RETRY_S:.0f}s)")
            if problem != self._metrics_problem:
                log.error("cannot serve metrics addr=%s error=%s; trimming goes on, retrying "
                          "every %.0fs", listen, exc.strerror or exc, METRICS_RETRY_S)
                self._status_dirty = True
            self._metrics_problem = problem
            self._metrics_retry_at = time.monotonic() + METRICS_RETRY_S
            return
        if self._metrics_problem:
            log.info("metrics endpoint up again addr=%s", listen)
            self._status_dirty = True
        self._metrics_problem, self._metrics_retry_at = "", math.inf

    def _count_segments(self) -> None:
        assert self.publisher is not None
        live = self.publisher.live_segments()
        m = self.metrics
        m.shm_segments.set(len(live))
        m.shm_bytes.set(sum(size for _, size in live))
        m.follow(m.control_recreations, self.publisher.control_recreations)

    def _count_stats(self) -> None:
        assert self.watcher is not None
        m, stats = self.metrics, self.watcher.stats
        m.follow(m.rescans, stats.rescans)
        m.follow(m.overflows, stats.overflows)
        m.follow(m.parse_worker_restarts, self.loader.worker.restarts)
