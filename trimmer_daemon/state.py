"""Per-bundle last-known-good state: what the daemon serves and what it says about each file.

Runs in the daemon's main loop (single thread). :class:`BundleTracker` owns one bundle.
A refresh is two steps, so that parsing can happen elsewhere (inline for small files, in the
parse worker for big ones): :meth:`BundleTracker.read` looks at the file *now* (cheap when
the content is what is loaded), then :meth:`BundleTracker.install` takes the outcome of
parsing it. The state machine:

    never_loaded --valid--> ok --invalid--> stale --fixed (or reverted)--> ok
                            ok --deleted--> missing --recreated--> ok
                            ok --held too long (a writer keeps it open)--> stale

Status means *now*, not *the last event*: a file whose current content equals the
loaded content is ``ok`` even if an earlier write failed. A bundle that fails validation, or
disappears, keeps serving its last-known-good map; only a configuration change (SIGHUP)
removes a bundle from the map. Content a writer still holds (see
:mod:`trimmer_daemon.watcher`) is never loaded: the state stays as it was until the writer
closes the file, or turns ``stale`` with a clear reason once the hold lasted too long.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from flatbuffers_schema.fmap.BundleState import BundleState
from trimmer_daemon.bundle.parse import BundleError, Limits, read_file_bounded
from trimmer_daemon.compiler import BundleStatusRecord
from trimmer_daemon.parts import BundlePart

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefreshResult:
    """What one refresh found. ``changed``: the bundle's status changed; ``loaded``: new
    content became last-known-good (the map itself must change)."""

    bundle: str
    state: int
    changed: bool
    loaded: bool
    error: str
    duration_s: float
    held: bool = False  # valid new content, not loaded: a writer still holds the file


class BundleTracker:
    """One bundle file and its last-known-good content (as a compiled :class:`BundlePart`)."""

    def __init__(self, name: str, path: str, *, limits: Limits,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.name, self.path = name, path
        self.limits, self._clock_ns = limits, clock_ns
        self.part: BundlePart | None = None
        self.state: int = BundleState.NeverLoaded
        self.error = ""
        self.loaded_sha256 = ""
        self.current_sha256 = ""
        self.loaded_at_ns = 0
        self.checked_at_ns = 0
        self.failures = 0  # validation/read failures since start (a metric)
        self._pending: tuple[str, tuple[int, str, str], float] | None = None

    def read(self) -> bytes | RefreshResult:
        """Read the file now. Returns its bytes when they differ from the loaded content
        (parse them, then call :meth:`install`), else the finished result."""
        t0 = time.perf_counter()
        before = self._snapshot()
        self.checked_at_ns = self._clock_ns()
        try:
            data = read_file_bounded(self.path, self.limits.max_file_bytes)
        except BundleError as exc:  # missing, unreadable, a FIFO, too large
            missing = exc.reason == "file not found"
            self._fail(BundleState.Missing if missing else self._stale_state(), str(exc), "")
            return self._result(before, t0)
        sha = hashlib.sha256(data).hexdigest()
        if sha == self.loaded_sha256:
            self.state, self.error, self.current_sha256 = BundleState.Ok, "", ""
            return self._result(before, t0)
        self._pending = (sha, before, t0)
        return data

    def install(self, outcome: BundlePart | BundleError, *, held: bool) -> RefreshResult:
        """Take the outcome of parsing what :meth:`read` returned. ``held``: a writer still
        held the file when it was read, so valid content is not loaded."""
        assert self._pending is not None, "install() without read()"
        sha, before, t0 = self._pending
        self._pending = None
        if isinstance(outcome, BundleError):
            self._fail(self._stale_state(), str(outcome), sha)
            return self._result(before, t0)
        if held:
            return self._result(before, t0, held=True)
        for warning in outcome.warnings:
            log.warning("bundle warning bundle=%s %s", self.name, warning)
        self.part = outcome
        self.state, self.error, self.current_sha256 = BundleState.Ok, "", ""
        self.loaded_sha256, self.loaded_at_ns = sha, self.checked_at_ns
        return self._result(before, t0, loaded=True)

    def discard_read(self) -> None:
        """Forget what :meth:`read` returned (it will be read again later)."""
        self._pending = None

    def hold_expired(self, held_s: float) -> RefreshResult:
        """A writer kept the file open past the bounded wait: report it, publish nothing."""
        t0 = time.perf_counter()
        before = self._snapshot()
        self._fail(self._stale_state(), str(BundleError(
            self.path, "$", f"still being written in place: modified {held_s:.1f}s ago and "
            "not closed (no IN_CLOSE_WRITE); not published until the writer closes it")), "")
        return self._result(before, t0)

    def _snapshot(self) -> tuple[int, str, str]:
        return (self.state, self.error, self.loaded_sha256)

    def _result(self, before: tuple[int, str, str], t0: float, *, loaded: bool = False,
                held: bool = False) -> RefreshResult:
        return RefreshResult(self.name, self.state, self._snapshot() != before, loaded,
                             self.error, time.perf_counter() - t0, held)

    def _stale_state(self) -> int:
        return BundleState.Stale if self.part is not None else BundleState.NeverLoaded

    def _fail(self, state: int, error: str, current_sha: str) -> None:
        if (state, error) != (self.state, self.error):
            self.failures += 1
        self.state, self.error, self.current_sha256 = state, error, current_sha

    def status(self) -> BundleStatusRecord:
        part = self.part
        return BundleStatusRecord(
            name=self.name, path=os.fspath(self.path), state=self.state,
            sha256=self.loaded_sha256, loaded_at_ns=self.loaded_at_ns,
            checked_at_ns=self.checked_at_ns, error=self.error,
            current_sha256=self.current_sha256,
            model_count=part.model_count if part else 0,
            version_count=part.version_count if part else 0,
            warnings=part.warnings if part else ())
