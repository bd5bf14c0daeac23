"""The parse worker's parent side (trimmer_daemon/parse_worker.py) never blocks the daemon's
main loop on the pipe: a stopped or wedged child costs only its own job, which fails at its
deadline naming the file; the next job runs on a fresh child.

A real spawned child and real pipes; the child is stopped with a real SIGSTOP, and a real
daemon's parse worker is killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import (
    DaemonProc,
    bundle_state,
    features_of,
    free_port,
    model_doc,
    replace_bundle,
    wait_for,
)

from root_worker.testing.client import metric_value
from trimmer_daemon.bundle.parse import BundleError, Limits
from trimmer_daemon.parse_worker import ParseWorker
from trimmer_daemon.parts import BundlePart

TIMEOUT_S = 3.0  # the job deadline under test
RETURNS_S = 10.0  # a call that blocks on the stopped child would never return


def _returns(fn: Callable[[], Any]) -> tuple[bool, Any]:
    """Whether ``fn()`` returns within RETURNS_S (run in a thread: if it blocks forever,
    the test fails instead of hanging), and what it returned."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(RETURNS_S)
    return not t.is_alive(), out[0] if out else None


@pytest.fixture
def worker() -> Any:
    w = ParseWorker(1 << 30, timeout_s=TIMEOUT_S)
    try:
        yield w
    finally:
        if w.pid is not None:
            try:
                os.kill(w.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        w.close()


def _bundle(tmp_path: Path, name: str) -> tuple[str, bytes]:
    path = tmp_path / f"{name}.json"
    data = json.dumps(model_doc(f"m_{name}", "1", ["a", "b", "c"])).encode()
    path.write_bytes(data)
    return str(path), data


def _finish(w: ParseWorker) -> tuple[Any, BundlePart | BundleError]:
    return wait_for(w.collect, timeout=TIMEOUT_S + RETURNS_S, what="the parse job to end")


def test_a_stopped_child_blocks_neither_submit_nor_collect_and_fails_its_job_at_the_deadline(
        worker: ParseWorker, tmp_path: Path) -> None:
    path, data = _bundle(tmp_path, "first")
    worker.submit("first", data, path=path, limits=Limits(), bundle_index=0)
    job, result = _finish(worker)
    assert job.name == "first" and isinstance(result, BundlePart)
    first_pid = worker.pid
    assert first_pid is not None

    # The child stops; the next job is far larger than a pipe's buffer, so sending it (or
    # reading an answer) on the main loop would block until the child reads.
    os.kill(first_pid, signal.SIGSTOP)
    big_path = str(tmp_path / "big.json")
    big = b"[" + b"0," * (16 << 20) + b"0]"
    done, _ = _returns(lambda: worker.submit("big", big, path=big_path, limits=Limits(),
                                             bundle_index=1))
    assert done, "submit() blocked on the stopped child"
    done, polled = _returns(worker.collect)
    assert done and polled is None, "collect() blocked, or the job ended with the child stopped"
    assert worker.busy is not None and worker.busy.name == "big"

    job, result = _finish(worker)
    assert job.name == "big" and isinstance(result, BundleError)
    assert result.path == big_path and f"longer than {TIMEOUT_S:.0f}s" in result.reason
    assert worker.busy is None and worker.restarts == 1

    # The next job runs on a fresh child.
    path, data = _bundle(tmp_path, "after")
    worker.submit("after", data, path=path, limits=Limits(), bundle_index=2)
    job, result = _finish(worker)
    assert job.name == "after" and isinstance(result, BundlePart)
    assert worker.pid is not None and worker.pid != first_pid


def _dead(pid: int) -> bool:
    """Every thread of the process has exited (a zombie, or reaped): its end of the pipe is
    closed. The leader turns zombie first; the worker's other threads (numpy's) follow."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return True  # reaped
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # this thread is gone
        if state not in ("Z", "X"):
            return False
    return True


def _first_job(worker: ParseWorker, tmp_path: Path) -> int:
    path, data = _bundle(tmp_path, "one")
    worker.submit("one", data, path=path, limits=Limits(), bundle_index=0)
    assert isinstance(_finish(worker)[1], BundlePart)
    assert worker.pid is not None
    return worker.pid


def test_a_worker_killed_while_parsing_fails_only_that_job(worker: ParseWorker,
                                                           tmp_path: Path) -> None:
    pid = _first_job(worker, tmp_path)
    os.kill(pid, signal.SIGSTOP)  # the next job is delivered into the pipe, then the
    path, data = _bundle(tmp_path, "victim")  # worker dies before answering it
    worker.submit("victim", data, path=path, limits=Limits(), bundle_index=1)
    # the job is in the stopped child's pipe before it dies (the transfer thread may not have
    # run yet; killed before that, the job never reached it and is re-sent, by design)
    wait_for(lambda: worker._xfer is not None and worker._xfer.delivered, 10,
             "the job to be delivered into the worker's pipe")
    os.kill(pid, signal.SIGKILL)
    job, result = _finish(worker)
    assert job.name == "victim" and isinstance(result, BundleError)
    assert result.path == path and "parse worker died" in result.reason
    path, data = _bundle(tmp_path, "two")
    worker.submit("two", data, path=path, limits=Limits(), bundle_index=2)
    assert isinstance(_finish(worker)[1], BundlePart)


def test_a_worker_that_died_between_jobs_is_replaced_for_the_next_one(
        worker: ParseWorker, tmp_path: Path) -> None:
    pid = _first_job(worker, tmp_path)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _dead(pid), what="the worker to exit")
    path, data = _bundle(tmp_path, "next")
    worker.submit("next", data, path=path, limits=Limits(), bundle_index=1)
    job, result = _finish(worker)
    assert job.name == "next" and isinstance(result, BundlePart)  # not lost to the corpse
    assert worker.pid not in (None, pid) and worker.restarts == 1


def _parse_worker_pid(daemon_pid: int) -> int | None:
    """The daemon's parse worker: its child running multiprocessing's spawn_main (its other
    child, if any, is multiprocessing's resource tracker)."""
    for task in Path(f"/proc/{daemon_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                return int(pid)
    return None


def test_the_daemon_counts_a_killed_parse_worker_and_parses_on_with_a_fresh_one(
        shm_prefix: str, bundles: dict[str, Path], tmp_path: Path) -> None:
    import urllib.request

    port = free_port()
    with DaemonProc(shm_prefix, bundles, tmp_path / "d.log",
                    extra=["--inline-parse-bytes", "1",  # every file in the parse worker
                           "--metrics-listen", f"127.0.0.1:{port}"]) as d:
        d.wait_view(lambda v: v.model_count == 2)
        first = wait_for(lambda: _parse_worker_pid(d.proc.pid), what="the parse worker")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: _dead(first), what="the parse worker to exit")
        replace_bundle(bundles["ads"], model_doc("ctr", "2", ["a", "b", "z"]))
        view = d.wait_view(lambda v: features_of(v, "ctr") == ["a", "b", "z"], timeout=20)
        assert bundle_state(view, "ads")["state"] == "ok"  # not stale: the job was re-sent
        assert _parse_worker_pid(d.proc.pid) not in (None, first)

        def restarts() -> float | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                return None
            return metric_value(text, "feature_trimmer_daemon_parse_worker_restarts_total")

        assert wait_for(restarts, what="the metrics endpoint") == 1.0
        assert d.proc.poll() is None and "parse worker pid=" in d.log()
