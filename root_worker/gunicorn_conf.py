"""gunicorn configuration of the root service: ``gunicorn -c python:root_worker.gunicorn_conf
root_worker.app:app``. Settings come from ``FT_*`` environment variables
(:mod:`root_worker.service.settings`).

Which process runs what:

* importing this module (the master, at start and on SIGHUP) reads and validates *every*
  setting: a bad one prints ``feature-trimmer root: FT_X='...': why`` and exits 2 before
  anything binds or forks (a worker never discovers a bad setting);
* ``on_starting`` (master, before binding and forking): checks the routing file (a bad one
  stops the start with a clear message), creates ``$FT_RUN_DIR`` and wipes its
  ``prometheus/`` directory, exports ``PROMETHEUS_MULTIPROC_DIR`` for the workers;
* ``when_ready`` (master, listening): writes ``$FT_RUN_DIR/root.json`` with its pid and the
  bound address (``FT_BIND=127.0.0.1:0`` picks a free port; tests read it there);
* ``post_worker_init`` (each worker, after fork and app import): builds the worker's state and
  attaches the shared-memory map; a failure there is logged at CRITICAL and the worker goes
  on serving (untrimmed if it has no map) -- it can never halt the pool;
* ``child_exit`` (master): removes the dead worker's live gauges (prometheus multiprocess);
* ``on_exit`` (master): removes ``root.json``.

Nothing is written outside ``$FT_RUN_DIR``: gunicorn 27's control socket (by default
``~/.gunicorn/gunicorn.ctl``) is disabled, worker heartbeat files go to ``$FT_RUN_DIR/tmp``,
no pid file is written by gunicorn itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from flatbuffers_schema.atomic_file import write_atomic
from root_worker.service.buffers import BufferPool
from root_worker.service.settings import WORKER_CLASSES, Settings, SettingsError
from root_worker.service.settings import load_settings as _load_settings

EXIT_BAD_SETTING = 2


def _validated() -> Settings:
    try:
        settings = _load_settings()
    except SettingsError as exc:
        sys.stderr.write(f"feature-trimmer root: {exc}\n")
        raise SystemExit(EXIT_BAD_SETTING) from None
    need = BufferPool.size_class(settings.max_request_bytes)
    if need > settings.max_buffer_bytes:
        sys.stderr.write(f"feature-trimmer root: FT_MAX_BUFFER_BYTES={settings.max_buffer_bytes}"
                         f" cannot hold one body of FT_MAX_REQUEST_BYTES="
                         f"{settings.max_request_bytes} ({need} bytes once rounded up)\n")
        raise SystemExit(EXIT_BAD_SETTING)
    return settings


_settings = _validated()

bind = [_settings.bind]
workers = _settings.workers
worker_class = WORKER_CLASSES[_settings.worker_class]
threads = _settings.threads
worker_connections = _settings.max_connections
timeout = _settings.timeout
graceful_timeout = 10
keepalive = int(_settings.keepalive)  # gthread/sync; the event worker reads the setting
loglevel = _settings.log_level
errorlog = "-"
accesslog = "-" if _settings.access_log else None
proc_name = "feature-trimmer-root"
preload_app = False  # the app is imported in each worker, after fork
control_socket_disable = True
worker_tmp_dir = _settings.tmp_dir


def on_starting(server: Any) -> None:
    from root_worker.service.routing import Routing, RoutingError

    if _settings.routing:
        try:
            Routing.load(_settings.routing)
        except RoutingError as exc:
            server.log.critical("FT_ROUTING: %s", exc)
            raise SystemExit(EXIT_BAD_SETTING) from None
    else:
        server.log.warning("FT_ROUTING is not set: every target will fail with no_route")
    os.makedirs(_settings.run_dir, mode=0o750, exist_ok=True)
    os.makedirs(_settings.tmp_dir, mode=0o700, exist_ok=True)
    shutil.rmtree(_settings.prometheus_dir, ignore_errors=True)
    os.makedirs(_settings.prometheus_dir, mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _settings.prometheus_dir
    server.log.info("root service shm=%s mode=%s lz4=%s routing=%s run_dir=%s",
                    _settings.shm_name, _settings.mode, _settings.lz4,
                    _settings.routing or "-", _settings.run_dir)


def when_ready(server: Any) -> None:
    doc = {"pid": os.getpid(), "addresses": [str(lnr) for lnr in server.LISTENERS]}
    path = _settings.address_file
    write_atomic(path, json.dumps(doc), durable=False)


def post_worker_init(worker: Any) -> None:
    import logging

    ours = logging.getLogger("root_worker")  # log through gunicorn's error log
    ours.handlers[:] = worker.log.error_log.handlers
    ours.setLevel(_settings.log_level.upper())
    ours.propagate = False
    start = getattr(worker.wsgi, "start_worker", None)
    if start is None:
        return
    try:
        start()
    except Exception:  # never a boot error: gunicorn would halt the whole pool
        ours.critical("worker start failed pid=%d; serving on, map attach retried per "
                      "request", os.getpid(), exc_info=True)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _settings.prometheus_dir)


def on_exit(server: Any) -> None:
    try:
        os.unlink(_settings.address_file)
    except FileNotFoundError:
        pass
