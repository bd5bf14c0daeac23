"""Per-bundle last-known-good state: what the daemon serves and what it says about each file.

Runs in the daemon's main loop (single thread). :class:`BundleTracker` owns one bundle:
``refresh()`` looks at the file *now* and updates the state machine

    never_loaded --valid--> ok --invalid--> stale --fixed (or reverted)--> ok
                            ok --deleted--> missing --recreated--> ok

Status means *now*, not *the last event* (SPEC §9): a file whose current content equals the
loaded content is ``ok`` even if an earlier write failed. A bundle that fails validation, or
disappears, keeps serving its last-known-good map; only a configuration change (SIGHUP)
removes a bundle from the map.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from flatbuffers_schema.fmap.BundleState import BundleState
from trimmer_daemon.bundle.parse import BundleError, Limits, parse_bundle, read_file_bounded
from trimmer_daemon.compiler import BundleStatusRecord
from trimmer_daemon.consolidate import IndexedBundle, KeyCache, index_bundle

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RefreshResult:
    """What one refresh found. ``changed`` is true when the published map must change."""

    bundle: str
    state: int
    changed: bool
    loaded: bool          # new content was parsed and became last-known-good
    error: str
    duration_s: float


class BundleTracker:
    """One bundle file and its last-known-good content."""

    def __init__(self, name: str, path: str, *, limits: Limits, cache: KeyCache,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.name, self.path = name, path
        self.limits, self.cache, self._clock_ns = limits, cache, clock_ns
        self.indexed: IndexedBundle | None = None
        self.state: int = BundleState.NeverLoaded
        self.error = ""
        self.loaded_sha256 = ""
        self.current_sha256 = ""
        self.loaded_at_ns = 0
        self.checked_at_ns = 0
        self.failures = 0  # validation/read failures since start (a metric)

    def refresh(self) -> RefreshResult:
        """Re-read the file and update the state; cheap when the content is unchanged."""
        t0 = time.perf_counter()
        before = (self.state, self.error, self.loaded_sha256)
        loaded = False
        self.checked_at_ns = self._clock_ns()
        try:
            data = read_file_bounded(self.path, self.limits.max_file_bytes)
        except BundleError as exc:  # missing, unreadable, a FIFO, too large
            missing = exc.reason == "file not found"
            self._fail(BundleState.Missing if missing else self._stale_state(), str(exc), "")
        else:
            sha = hashlib.sha256(data).hexdigest()
            if sha == self.loaded_sha256:
                self.state, self.error, self.current_sha256 = BundleState.Ok, "", ""
            else:
                loaded = self._load(data, sha)
        changed = (self.state, self.error, self.loaded_sha256) != before
        return RefreshResult(self.name, self.state, changed, loaded, self.error,
                             time.perf_counter() - t0)

    def _load(self, data: bytes, sha: str) -> bool:
        try:
            parsed = parse_bundle(data, path=self.path, limits=self.limits)
        except BundleError as exc:
            self._fail(self._stale_state(), str(exc), sha)
            return False
        for warning in parsed.warnings:
            log.warning("bundle warning bundle=%s %s", self.name, warning)
        self.indexed = index_bundle(parsed, self.cache)
        self.state, self.error, self.current_sha256 = BundleState.Ok, "", ""
        self.loaded_sha256, self.loaded_at_ns = sha, self.checked_at_ns
        return True

    def _stale_state(self) -> int:
        return BundleState.Stale if self.indexed is not None else BundleState.NeverLoaded

    def _fail(self, state: int, error: str, current_sha: str) -> None:
        if (state, error) != (self.state, self.error):
            self.failures += 1
        self.state, self.error, self.current_sha256 = state, error, current_sha

    def status(self) -> BundleStatusRecord:
        indexed = self.indexed
        return BundleStatusRecord(
            name=self.name, path=os.fspath(self.path), state=self.state,
            sha256=self.loaded_sha256, loaded_at_ns=self.loaded_at_ns,
            checked_at_ns=self.checked_at_ns, error=self.error,
            current_sha256=self.current_sha256,
            model_count=len(indexed.models) if indexed else 0,
            version_count=indexed.version_count if indexed else 0,
            warnings=indexed.parsed.warnings if indexed else ())
