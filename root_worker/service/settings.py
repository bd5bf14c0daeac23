"""Root service settings: one declarative registry of environment variables.

Read by the gunicorn master when it loads :mod:`root_worker.gunicorn_conf` (bind, workers,
run directory) and by each worker when it builds the app (everything else). The same
registry renders the table in ``docs/root-service.md`` (``python -m root_worker.service.settings``)
and a test keeps the two in sync. Reading settings has no side effects: it parses
``os.environ`` (or a mapping given for tests) and raises :class:`SettingsError` naming the
variable at fault.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flatbuffers_schema import settings as S
from flatbuffers_schema.settings import SettingsError, in_range, positive, setting
from flatbuffers_schema.shm_layout import DEFAULT_SHM_NAME, validate_prefix

MODES = ("trim", "shadow", "off")
WORKER_CLASSES = {  # FT_WORKER_CLASS -> gunicorn worker class
    "event": "root_worker.service.worker.RootWorker",
    "gthread": "gthread",
    "sync": "sync",
}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

__all__ = ["MODES", "SETTINGS", "WORKER_CLASSES", "Settings", "SettingsError", "load_settings",
           "markdown_table"]


def _prefix(raw: Any) -> str:
    return validate_prefix(S.text(raw))


def _bind(raw: Any) -> str:
    return S.host_port(raw, allow_unix=True)


def _default_run_dir() -> str:
    # systemd's RuntimeDirectory= exports RUNTIME_DIRECTORY; otherwise a per-user temp dir.
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return runtime or f"/tmp/feature-trimmer-{os.getuid()}"


@dataclass(frozen=True)
class Settings:
    """Every ``FT_*`` setting of the root service, typed; declared once, here."""

    shm_name: str = setting(
        DEFAULT_SHM_NAME, _prefix,
        "shared-memory prefix of the map; the same as trimmer-daemon's --shm-name",
        env="FT_SHM_NAME")
    routing: str = setting(
        "", S.text, "routing file: JSON object model -> leaf URL or list of URLs (`\"*\"`: "
        "default route); without it every target fails with `no_route`", env="FT_ROUTING")
    mode: str = setting(
        "trim", S.choice(*MODES),
        "`trim` (send each leaf its model's features), `shadow` (send untrimmed, count what "
        "trimming would save) or `off` (no lookup, no trimming)", env="FT_MODE")
    lz4: bool = setting(False, S.boolean,
                        "compress fan-out bodies with lz4 (frame format), sent with "
                        "`Content-Encoding: lz4`", env="FT_LZ4")
    leaf_timeout: float = setting(
        2.0, positive(float, 3600),
        "seconds a target may take (connect, send, answer) before it fails with `timeout`",
        env="FT_LEAF_TIMEOUT")
    max_request_bytes: int = setting(64 << 20, positive(int),
                                     "larger request bodies are refused with 413",
                                     env="FT_MAX_REQUEST_BYTES")
    max_targets: int = setting(64, positive(int, 4096),
                               "a request naming more targets is refused with 400",
                               env="FT_MAX_TARGETS")
    bind: str = setting(
        "127.0.0.1:8100", _bind,
        "listen address (`HOST:0` picks a free port; the bound address is written to "
        "`$FT_RUN_DIR/root.json`)", env="FT_BIND")
    workers: int = setting(2, positive(int, 1024), "gunicorn worker processes",
                           env="FT_WORKERS")
    worker_class: str = setting(
        "event", S.choice(*WORKER_CLASSES),
        "`event` (default: one event loop per worker multiplexes clients and leaf calls), "
        "`gthread` or `sync` (the WSGI path; slow clients then hold threads)",
        env="FT_WORKER_CLASS")
    threads: int = setting(4, positive(int, 1024),
                           "request threads per worker (`gthread` worker only)",
                           env="FT_THREADS")
    max_connections: int = setting(
        1000, positive(int, 1 << 20),
        "client connections per worker (`event` worker); beyond it the worker stops "
        "accepting until one closes", env="FT_MAX_CONNECTIONS")
    keepalive: float = setting(
        75.0, positive(float, 86400),
        "seconds an idle client keep-alive connection is kept (`event` worker: an idle "
        "connection costs a few hundred bytes and a timer, no thread)", env="FT_KEEPALIVE")
    header_timeout: float = setting(
        10.0, positive(float, 3600),
        "seconds a client may take to send a request head once its first byte came; then "
        "408 (JSON) and close", env="FT_HEADER_TIMEOUT")
    body_timeout: float = setting(
        30.0, positive(float, 3600),
        "seconds a client may take to send a request body, and to take the answer; then "
        "408 (JSON) and close", env="FT_BODY_TIMEOUT")
    max_header_bytes: int = setting(
        32 << 10, in_range(int, 1024, 1 << 20),
        "a larger request head is refused with 431 (a request line over 8190 bytes: 414)",
        env="FT_MAX_HEADER_BYTES")
    max_buffer_bytes: int = setting(
        512 << 20, positive(int),
        "per-worker cap on request-body and trimmed-output buffers: a body that does not fit "
        "is refused with 503, a trimmed output that does not fit is sent untrimmed (counted "
        "as a trim error); must hold one FT_MAX_REQUEST_BYTES body", env="FT_MAX_BUFFER_BYTES")
    max_candidates: int = setting(
        100_000, positive(int, 1 << 30),
        "a frame holding more candidates is refused with 413 (`too_many_candidates`)",
        env="FT_MAX_CANDIDATES")
    max_answer_scores: int = setting(
        1 << 20, positive(int, 1 << 34),
        "a request whose answer would hold more scores (targets x candidates) is refused "
        "with 413 (`answer_too_large`): the answer's size is bounded by settings",
        env="FT_MAX_ANSWER_SCORES")
    max_leaf_reply_bytes: int = setting(
        4 << 20, positive(int),
        "a leaf answer larger than this fails its target with `bad_reply`, read no further",
        env="FT_MAX_LEAF_REPLY_BYTES")
    run_dir: str = setting(
        None, S.text,
        "the only directory the service writes: `root.json`, `prometheus/` (wiped at start), "
        "`tmp/`; default `$RUNTIME_DIRECTORY` or `/tmp/feature-trimmer-$UID`",
        env="FT_RUN_DIR")
    ready_max_wait: float = setting(
        30.0, in_range(float, 0, 86400),
        "`/readyz` answers 503 until a map is attached, at most this many seconds after the "
        "worker started; then it is ready and serves untrimmed (0: ready at once)",
        env="FT_READY_MAX_WAIT")
    heartbeat_stale: float = setting(
        10.0, positive(float, 86400),
        "`/healthz` reports `degraded` when the daemon's heartbeat is older than this",
        env="FT_HEARTBEAT_STALE")
    timeout: int = setting(30, positive(int, 86400),
                           "gunicorn: a worker silent this many seconds is killed and replaced",
                           env="FT_TIMEOUT")
    log_level: str = setting("info", S.choice(*LOG_LEVELS),
                             "gunicorn and service log level (debug, info, warning, error, "
                             "critical)", env="FT_LOG_LEVEL")
    access_log: bool = setting(False, S.boolean,
                               "gunicorn access log (one line per request) on stdout",
                               env="FT_ACCESS_LOG")

    @property
    def prometheus_dir(self) -> str:
        return os.path.join(self.run_dir, "prometheus")

    @property
    def tmp_dir(self) -> str:
        return os.path.join(self.run_dir, "tmp")

    @property
    def address_file(self) -> str:
        return os.path.join(self.run_dir, "root.json")


SETTINGS: tuple[S.Spec, ...] = S.specs(Settings)
_BY_NAME = {s.name: s for s in SETTINGS}


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Parse every ``FT_*`` variable of ``environ`` (default ``os.environ``).

    ``overrides`` (by attribute name, already typed) win over the environment (tests).
    Raises :class:`SettingsError` naming the variable at fault.
    """
    env = os.environ if environ is None else environ
    unknown = set(overrides) - set(_BY_NAME)
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
    settings = S.load(Settings, [(env, S.env_spelling)], **overrides)
    run_dir = os.path.abspath(settings.run_dir or _default_run_dir())
    routing = os.path.abspath(settings.routing) if settings.routing else ""
    return dataclasses.replace(settings, run_dir=run_dir, routing=routing)


def markdown_table() -> str:
    """The settings as the Markdown table embedded in ``docs/root-service.md``."""
    return S.markdown_table([Settings], "env")


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
