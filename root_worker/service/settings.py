"""Root service settings: one declarative registry of environment variables.

Read by the gunicorn master when it loads :mod:`root_worker.gunicorn_conf` (bind, workers,
run directory) and by each worker when it builds the app (everything else). The same
registry renders the table in ``docs/root-service.md`` (``python -m root_worker.service.settings``)
and a test keeps the two in sync. Reading settings has no side effects: it parses
``os.environ`` (or a mapping given for tests) and raises :class:`SettingsError` naming the
variable at fault.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flatbuffers_schema.shm_layout import DEFAULT_SHM_NAME, validate_prefix

MODES = ("trim", "shadow", "off")
WORKER_CLASSES = {  # FT_WORKER_CLASS -> gunicorn worker class
    "event": "root_worker.service.worker.RootWorker",
    "gthread": "gthread",
    "sync": "sync",
}


class SettingsError(ValueError):
    """A setting is unusable; the message names the environment variable and why."""


@dataclass(frozen=True)
class Setting:
    env: str                      # environment variable
    name: str                     # attribute of Settings
    default: Any
    parse: Callable[[str], Any]
    help: str


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise ValueError("must be > 0")
        return value
    parse.__name__ = kind.__name__
    return parse


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be >= 0")
    return value


def _mode(text: str) -> str:
    low = text.strip().lower()
    if low not in MODES:
        raise ValueError(f"expected one of {', '.join(MODES)}")
    return low


def _worker_class(text: str) -> str:
    low = text.strip().lower()
    if low not in WORKER_CLASSES:
        raise ValueError(f"expected one of {', '.join(WORKER_CLASSES)}")
    return low


def _shm_name(text: str) -> str:
    return validate_prefix(text)


def _log_level(text: str) -> str:
    low = text.strip().lower()
    if low not in ("debug", "info", "warning", "error", "critical"):
        raise ValueError("expected debug, info, warning, error or critical")
    return low


def _bind(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if text.startswith("unix:"):
        return text
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected HOST:PORT (port 0: any free port) or unix:PATH")
    return text


def _default_run_dir() -> str:
    # systemd's RuntimeDirectory= exports RUNTIME_DIRECTORY; otherwise a per-user temp dir.
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return runtime or f"/tmp/feature-trimmer-{os.getuid()}"


SETTINGS: tuple[Setting, ...] = (
    Setting("FT_SHM_NAME", "shm_name", DEFAULT_SHM_NAME, _shm_name,
            "shared-memory prefix of the map; the same as trimmer-daemon's --shm-name"),
    Setting("FT_ROUTING", "routing", "", str,
            "routing file: JSON object model -> leaf URL or list of URLs (`\"*\"`: default "
            "route); without it every target fails with `no_route`"),
    Setting("FT_MODE", "mode", "trim", _mode,
            "`trim` (send each leaf its model's features), `shadow` (send untrimmed, count "
            "what trimming would save) or `off` (no lookup, no trimming)"),
    Setting("FT_LZ4", "lz4", False, _bool,
            "compress fan-out bodies with lz4 (frame format), sent with "
            "`Content-Encoding: lz4`"),
    Setting("FT_LEAF_TIMEOUT", "leaf_timeout", 2.0, _positive(float),
            "seconds a target may take (connect, send, answer) before it fails with "
            "`timeout`"),
    Setting("FT_MAX_REQUEST_BYTES", "max_request_bytes", 64 << 20, _positive(int),
            "larger request bodies are refused with 413"),
    Setting("FT_MAX_TARGETS", "max_targets", 64, _positive(int),
            "a request naming more targets is refused with 400"),
    Setting("FT_BIND", "bind", "127.0.0.1:8100", _bind,
            "listen address (`HOST:0` picks a free port; the bound address is written to "
            "`$FT_RUN_DIR/root.json`)"),
    Setting("FT_WORKERS", "workers", 2, _positive(int), "gunicorn worker processes"),
    Setting("FT_WORKER_CLASS", "worker_class", "event", _worker_class,
            "`event` (default: one event loop per worker multiplexes clients and leaf "
            "calls), `gthread` or `sync` (the WSGI path; slow clients then hold threads)"),
    Setting("FT_THREADS", "threads", 4, _positive(int),
            "request threads per worker (`gthread` worker only)"),
    Setting("FT_FANOUT_THREADS", "fanout_threads", 8, _positive(int),
            "unused since the event-loop fan-out (kept so old environments still start)"),
    Setting("FT_MAX_CONNECTIONS", "max_connections", 1000, _positive(int),
            "client connections per worker (`event` worker); beyond it the worker stops "
            "accepting until one closes"),
    Setting("FT_KEEPALIVE", "keepalive", 75.0, _positive(float),
            "seconds an idle client keep-alive connection is kept (`event` worker: an idle "
            "connection costs a few KB, no thread)"),
    Setting("FT_HEADER_TIMEOUT", "header_timeout", 10.0, _positive(float),
            "seconds a client may take to send a request's head once its first byte came; "
            "then 408 and close"),
    Setting("FT_BODY_TIMEOUT", "body_timeout", 30.0, _positive(float),
            "seconds a client may take to send a request's body (and to take the answer); "
            "then 408 and close"),
    Setting("FT_MAX_HEADER_BYTES", "max_header_bytes", 32 << 10, _positive(int),
            "a larger request head is refused with 431 (a longer request line: 414)"),
    Setting("FT_MAX_BUFFER_BYTES", "max_buffer_bytes", 512 << 20, _positive(int),
            "per-worker cap on request-body and trimmed-output buffers; a body that does not "
            "fit is refused with 503, a trimmed output that does not fit is sent untrimmed "
            "(counted as a trim error)"),
    Setting("FT_MAX_LEAF_REPLY_BYTES", "max_leaf_reply_bytes", 4 << 20, _positive(int),
            "a leaf answer larger than this fails its target with `bad_reply`, read no "
            "further"),
    Setting("FT_RUN_DIR", "run_dir", None, str,
            "the only directory the service writes: `root.json`, `prometheus/` (wiped at "
            "start), `tmp/`; default `$RUNTIME_DIRECTORY` or `/tmp/feature-trimmer-$UID`"),
    Setting("FT_READY_MAX_WAIT", "ready_max_wait", 30.0, _non_negative_float,
            "`/readyz` answers 503 until a map is attached, at most this many seconds after "
            "the worker started; then it is ready and serves untrimmed (0: ready at once)"),
    Setting("FT_HEARTBEAT_STALE", "heartbeat_stale", 10.0, _positive(float),
            "`/healthz` reports `degraded` when the daemon's heartbeat is older than this"),
    Setting("FT_TIMEOUT", "timeout", 30, _positive(int),
            "gunicorn: a worker silent this many seconds is killed and replaced"),
    Setting("FT_LOG_LEVEL", "log_level", "info", _log_level,
            "gunicorn and service log level (debug, info, warning, error, critical)"),
    Setting("FT_ACCESS_LOG", "access_log", False, _bool,
            "gunicorn access log (one line per request) on stdout"),
)
_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Settings:
    shm_name: str
    routing: str
    mode: str
    lz4: bool
    leaf_timeout: float
    max_request_bytes: int
    max_targets: int
    bind: str
    workers: int
    worker_class: str
    threads: int
    fanout_threads: int
    max_connections: int
    keepalive: float
    header_timeout: float
    body_timeout: float
    max_header_bytes: int
    max_buffer_bytes: int
    max_leaf_reply_bytes: int
    run_dir: str
    ready_max_wait: float
    heartbeat_stale: float
    timeout: int
    log_level: str
    access_log: bool

    @property
    def prometheus_dir(self) -> str:
        return os.path.join(self.run_dir, "prometheus")

    @property
    def tmp_dir(self) -> str:
        return os.path.join(self.run_dir, "tmp")

    @property
    def address_file(self) -> str:
        return os.path.join(self.run_dir, "root.json")


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Parse every ``FT_*`` variable of ``environ`` (default ``os.environ``).

    ``overrides`` (by attribute name, already typed) win over the environment (tests).
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = env.get(s.env)
        try:
            values[s.name] = s.default if raw is None else s.parse(raw)
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{s.env}={raw!r}: {exc}") from None
    unknown = set(overrides) - set(_BY_NAME)
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
    values.update(overrides)
    if values["run_dir"] is None:
        values["run_dir"] = _default_run_dir()
    values["run_dir"] = os.path.abspath(values["run_dir"])
    if values["routing"]:
        values["routing"] = os.path.abspath(values["routing"])
    return Settings(**values)


def markdown_table() -> str:
    """The settings as the Markdown table embedded in ``docs/root-service.md``."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = "(see meaning)" if s.default is None else _show(s.default)
        rows.append(f"| `{s.env}` | {default} | {s.help} |")
    return "\n".join(rows) + "\n"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if value == "":
        return "(empty)"
    return f"`{value}`"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
