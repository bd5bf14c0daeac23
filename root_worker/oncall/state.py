"""What ``trimmer-inspect`` reads from shared memory, and how healthy it is.

Runs in the ``trimmer-inspect`` process only (on-call, monitoring checks). Strictly
read-only: segments are opened through :class:`~root_worker.featuremap.shm_reader.ShmReader`, which
maps them ``O_RDONLY`` / ``PROT_READ`` and never creates, writes, locks or unlinks anything.
Liveness of the daemon is judged from the outside: ``kill(pid, 0)`` on the pid the control
block names, and ``/proc/locks`` for who holds the writer ``flock`` on the control segment
(read-only; taking the lock ourselves could make a starting daemon refuse to start).

Health levels are the monitoring-plugin exit codes: 0 OK, 1 WARNING, 2 CRITICAL. Each
:class:`Finding` carries a stable ``code`` (for ``--json`` consumers and the runbook,
``docs/operations.md``) and a message that says what it means for the workers.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field
from typing import Any

from flatbuffers_schema.shm_layout import SHM_DIR
from root_worker.featuremap.map_reader import FeatureMapView, MapError, open_generation
from root_worker.featuremap.shm_reader import ControlInfo, ShmReader, Snapshot

PROC_LOCKS = "/proc/locks"


class Level(enum.IntEnum):
    """Exit codes, worst wins. ``OK`` findings are notes (they never change the code)."""

    OK = 0
    WARNING = 1
    CRITICAL = 2


@dataclass(frozen=True)
class Finding:
    level: Level
    code: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level.name.lower(), "code": self.code, "message": self.message}


@dataclass(frozen=True)
class Thresholds:
    """Seconds; 0 disables a threshold."""

    heartbeat_warn: float = 5.0
    heartbeat_crit: float = 30.0
    age_warn: float = 0.0
    age_crit: float = 0.0
    #: ``status --liveness``: bundle states (stale, missing, never loaded, none configured)
    #: are reported as notes and never change the exit code -- a restart of the daemon
    #: cannot fix a bad file and would throw away last-known-good content.
    liveness: bool = False


@dataclass(frozen=True)
class DaemonInfo:
    """The daemon as seen from outside. ``alive``/``lock_held`` are ``None`` when unknown."""

    pid: int
    alive: bool | None
    lock_held: bool | None
    lock_pid: int  # 0 if unknown or not visible from our pid namespace

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "alive": self.alive, "writer_lock_held": self.lock_held,
                "writer_lock_pid": self.lock_pid}


@dataclass
class MapState:
    """One consistent read of the prefix: control block, verified blob, decoded map."""

    prefix: str
    now_ns: int
    control: ControlInfo | None = None
    snapshot: Snapshot | None = None
    view: FeatureMapView | None = None
    daemon: DaemonInfo | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def level(self) -> Level:
        return max((f.level for f in self.findings), default=Level.OK)

    def add(self, level: Level, code: str, message: str) -> None:
        self.findings.append(Finding(level, code, message))

    def heartbeat_age_s(self) -> float | None:
        c = self.control
        if c is None or c.heartbeat_ns <= 0:
            return None
        return (self.now_ns - c.heartbeat_ns) / 1e9

    def map_age_s(self) -> float | None:
        c = self.control
        if c is None or c.published_at_ns <= 0:
            return None
        return (self.now_ns - c.published_at_ns) / 1e9


def read_state(prefix: str, *, now_ns: int | None = None) -> MapState:
    """Read the prefix once. Problems that make the map unusable are CRITICAL findings;
    nothing here raises for bad shared memory."""
    state = MapState(prefix, time.time_ns() if now_ns is None else now_ns)
    reader = ShmReader(prefix)
    try:
        snapshot = reader.poll()
        control = reader.control()
    finally:
        reader.close()  # a Snapshot's buffer keeps its own mapping alive
    state.control = control
    if control is None:
        _explain_no_control(state, reader.stats.last_error)
        return state
    state.daemon = daemon_info(prefix, control)
    if control.generation == 0:
        state.add(Level.CRITICAL, "no_map",
                  f"the control segment {_ctl_file(prefix)} exists but no map was ever "
                  "published (daemon starting, or it failed before its first publication): "
                  "workers pass every request through untrimmed")
        return state
    if snapshot is None:
        code = "verify_failed" if reader.stats.verify_failures else "map_unreadable"
        state.add(Level.CRITICAL, code,
                  f"generation {control.generation} cannot be used: "
                  f"{reader.stats.last_error or 'segment not attachable'}; workers keep the "
                  "generation they had (a worker that starts now has none)")
        return state
    state.snapshot = snapshot
    try:
        view = open_generation(snapshot.buffer, snapshot.generation)
    except MapError as exc:
        state.add(Level.CRITICAL, "map_unreadable",
                  f"generation {snapshot.generation} is not a readable feature map: {exc}")
        return state
    state.view = view
    return state


def _explain_no_control(state: MapState, reader_error: str | None) -> None:
    path = _ctl_file(state.prefix)
    if reader_error:
        state.add(Level.CRITICAL, "control_unreadable",
                  f"the control segment {path} is unreadable: {reader_error}")
    elif os.path.exists(path):
        state.add(Level.CRITICAL, "control_unreadable",
                  f"the control segment {path} exists but has no consistent record "
                  "(corrupt slot, being initialised, or being removed by --cleanup)")
    else:
        state.add(Level.CRITICAL, "no_map",
                  f"no map was ever published under shm name {state.prefix!r} (no {path}): "
                  "is trimmer-daemon running with the same --shm-name? Workers pass every "
                  "request through untrimmed")


def _ctl_file(prefix: str) -> str:
    return os.path.join(SHM_DIR, f"{prefix}.ctl")


# -- the daemon, from outside -----------------------------------------------------------------

def daemon_info(prefix: str, control: ControlInfo) -> DaemonInfo:
    pid = control.heartbeat_pid or control.publisher_pid
    held, lock_pid = writer_lock(prefix)
    return DaemonInfo(pid, pid_alive(pid), held, lock_pid)


def pid_alive(pid: int) -> bool | None:
    """``kill(pid, 0)``: EPERM means it exists (another user's process); a zombie is dead."""
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    # "pid (comm) S ...": the state follows the last ')' (comm may contain ')').
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def writer_lock(prefix: str) -> tuple[bool | None, int]:
    """Is the control segment's writer ``flock`` held, and by which pid (per /proc/locks)?

    ``(None, 0)`` if that cannot be told (no /proc, segment gone). The pid is 0 when the
    holder is not visible from our pid namespace.
    """
    try:
        st = os.stat(_ctl_file(prefix))
        with open(PROC_LOCKS, encoding="ascii", errors="replace") as locks:
            text = locks.read()
    except OSError:
        return None, 0
    # "1: FLOCK  ADVISORY  WRITE 8806 00:1b:27466 0 EOF"; waiters have "->" after "1:".
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 6 and cols[1] == "FLOCK" and cols[3] == "WRITE" and cols[5] == want:
            return True, int(cols[4]) if cols[4].isdigit() else 0
    return False, 0


# -- health -----------------------------------------------------------------------------------

def evaluate(state: MapState, limits: Thresholds) -> None:
    """Add the WARNING/CRITICAL findings of ``status`` (the map-level ones are already in)."""
    if state.control is None or state.control.generation == 0:
        return
    _check_daemon(state, limits)
    _check_age(state, limits)
    if state.view is not None:
        _check_bundles(state, state.view, liveness=limits.liveness)


def _check_daemon(state: MapState, limits: Thresholds) -> None:
    d, gen = state.daemon, state.control.generation if state.control else 0
    if d is not None:
        _check_pid(state, d, gen)
    age = state.heartbeat_age_s()
    if age is None:
        state.add(Level.WARNING, "heartbeat_missing",
                  "the control segment carries no valid heartbeat")
    else:
        _threshold(state, "heartbeat_stale", age, limits.heartbeat_warn, limits.heartbeat_crit,
                   f"last daemon heartbeat {age:.1f}s ago")


def _check_pid(state: MapState, d: DaemonInfo, gen: int) -> None:
    if d.alive is False:
        state.add(Level.WARNING, "daemon_dead",
                  f"daemon pid {d.pid} is not running: workers keep serving generation {gen}, "
                  "bundle changes are not picked up; restart trimmer-daemon")
    elif d.alive and d.lock_held is False:
        state.add(Level.WARNING, "daemon_dead",
                  f"pid {d.pid} exists but nobody holds the writer lock on the control "
                  "segment: no daemon is running (the pid was reused)")
    elif d.lock_held and d.lock_pid and d.lock_pid != d.pid:
        state.add(Level.OK, "daemon_replaced",
                  f"the writer lock is held by pid {d.lock_pid}, not by pid {d.pid} that "
                  "wrote the last heartbeat (a new daemon starting?)")


def _check_age(state: MapState, limits: Thresholds) -> None:
    age = state.map_age_s()
    if age is not None:
        _threshold(state, "map_old", age, limits.age_warn, limits.age_crit,
                   f"generation {state.control.generation if state.control else 0} was "
                   f"published {age:.1f}s ago")


def _threshold(state: MapState, code: str, value: float, warn: float, crit: float,
               what: str) -> None:
    if crit > 0 and value > crit:
        state.add(Level.CRITICAL, code, f"{what} (critical above {crit:g}s)")
    elif warn > 0 and value > warn:
        state.add(Level.WARNING, code, f"{what} (warning above {warn:g}s)")


_BUNDLE_MEANING = {
    "stale": "the file on disk is invalid; its last-known-good content is still served",
    "missing": "the file is gone; its last-known-good content is still served",
    "never_loaded": "no valid content was ever loaded: its models pass through untrimmed",
}


def _check_bundles(state: MapState, view: FeatureMapView, *, liveness: bool = False) -> None:
    bundles = view.bundles()
    if not bundles:
        state.add(Level.OK if liveness else Level.WARNING, "no_bundles",
                  "the map has no bundles configured: every request passes through untrimmed")
    for b in bundles:
        if b["state"] != "ok":
            meaning = _BUNDLE_MEANING.get(b["state"], "unknown state")
            error = f": {b['error']}" if b["error"] else ""
            # never_loaded is an init-time failure: it alerts as critical, and never blocks
            # the host: the daemon still started and serves every other bundle (so a
            # liveness check, which restarts, only notes it).
            level = Level.CRITICAL if b["state"] == "never_loaded" else Level.WARNING
            if liveness:
                level = Level.OK
            state.add(level, f"bundle_{b['state']}",
                      f"bundle {b['name']!r} is {b['state']} ({meaning}){error}")
        for warning in b["warnings"]:
            state.add(Level.OK, "bundle_warning", f"bundle {b['name']!r}: {warning}")
    for conflict in view.conflicts():
        state.add(Level.OK, "conflict", f"conflict (union of allowlists sent): {conflict}")
