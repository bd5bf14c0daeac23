"""Run a real trimmer-daemon subprocess for tests and wait on what it publishes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from flatbuffers_schema.atomic_file import write_atomic
from root_worker.featuremap.live_map import LiveMap
from root_worker.featuremap.map_reader import FeatureMapView
from root_worker.testing import stack
from trimmer_daemon.publisher import Publisher

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def run_threads(work: Callable[[int], None], n: int, timeout: float = 120.0) -> None:
    """Run ``work(i)`` for i in range(n) on n threads at once; fail if any is still running
    after ``timeout`` (the caller asserts what they found)."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout} s"


def wait_for(cond: Callable[[], T], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.005) -> T:
    """Poll ``cond`` until it returns a truthy value or ``timeout`` passes (then fail)."""
    try:
        return stack.wait_for(cond, timeout, what, interval)
    except stack.StackError as exc:
        raise AssertionError(str(exc)) from None


def compile_as_the_daemon(parsed: Mapping[str, Any], *, generation: int,
                          built_at_ns: int = 123, sha256: str = "ab" * 32,
                          statuses: Any = None) -> Any:
    """The daemon's own compile path for parsed bundles (name -> ParsedBundle, in bundle
    order): one part per bundle (``parts.compile_part``) spliced by an ``Assembler``, as
    ``daemon.py`` publishes; returns the ``Assembled`` (``.parts``, ``.crc``).
    ``statuses``: the bundles' BundleStatusRecords (default: each ok, with ``sha256``)."""
    from flatbuffers_schema.fmap.BundleState import BundleState
    from trimmer_daemon.assemble import Assembler
    from trimmer_daemon.compiler import BundleStatusRecord
    from trimmer_daemon.parts import compile_part

    parts = [compile_part(p, i) for i, p in enumerate(parsed.values())]
    if statuses is None:
        statuses = [BundleStatusRecord(name=n, path=f"/b/{n}", state=BundleState.Ok,
                                       sha256=sha256, model_count=len(p.models))
                    for n, p in parsed.items()]
    return Assembler().assemble(parts, statuses, generation=generation,
                                built_at_ns=built_at_ns, daemon_pid=os.getpid())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process to listen on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_bundle(path: Path, doc: dict) -> None:
    """Write a bundle file in place (open + truncate + write), as `cp` does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def replace_bundle(path: Path, doc: dict) -> None:
    """Write a temp file beside ``path`` and rename it over ``path`` (mv / rsync style)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc), durable=False)


def model_doc(model: str, version: str, features: list[str]) -> dict:
    return {model: [{"version": version, "input_names": features}]}


F1, F2, F3 = ["a", "b"], ["a", "c", "d"], ["x", "y", "z"]
"""The allowlists of conftest's ``bundles`` fixture (``ads``: ctr/1 = F1, ``feed``: rank/1 = F3)."""


class DaemonProc:
    """A trimmer-daemon in its own process group, logging to a file.

    As a context manager it owns the whole lifetime: at exit (also when the body raised) it
    is killed and every segment of its prefix removed (:meth:`close`, :func:`remove_segments`).
    A test that must keep the segments (a restart continues the sequence, ``--cleanup``
    removes them itself) calls :meth:`close` alone instead.
    """

    def __init__(self, prefix: str, bundles: dict[str, Path], log_path: Path, *,
                 extra: list[str] | None = None, config: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.prefix, self.log_path = prefix, log_path
        cmd = [sys.executable, "-m", "trimmer_daemon.cli", "--shm-name", prefix,
               "--metrics-listen", "", "--grace-seconds", "0.2", "--heartbeat-interval", "0.2",
               "--log-level", "DEBUG"]
        for name, path in bundles.items():
            cmd += ["--bundle", f"{name}={path}"]
        if config is not None:
            cmd += ["--config", str(config)]
        cmd += extra or []
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})},
                                     preexec_fn=stack.die_with_parent)  # no orphan daemons
        self.live = LiveMap(prefix)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def view(self) -> FeatureMapView | None:
        return self.live.current()

    def wait_view(self, cond: Callable[[FeatureMapView], bool], timeout: float = 10.0,
                  what: str = "a map generation") -> FeatureMapView:
        def check() -> FeatureMapView | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            view = self.view()
            return view if view is not None and cond(view) else None
        return wait_for(check, timeout, what)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"daemon ignored SIGTERM:\n{self.log()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        self.live.close()
        self._log.close()

    def __enter__(self) -> DaemonProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        remove_segments(self.prefix)


def remove_segments(prefix: str) -> None:
    """Remove every segment of ``prefix`` as the owner would (the daemon must be gone)."""
    Publisher(prefix).cleanup()


def bundle_state(view: FeatureMapView, name: str) -> dict:
    return next(b for b in view.bundles() if b["name"] == name)


def features_of(view: FeatureMapView, model: str, version: str | None = None) -> list[str]:
    res = view.resolve(model, version)
    if res.allowlist is None:
        return []
    return sorted(view.feature_names(res.allowlist.keys))
