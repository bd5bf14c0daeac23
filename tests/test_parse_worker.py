"""The parse worker's parent side (trimmer_daemon/parse_worker.py) never blocks the daemon's
main loop on the pipe: a stopped or wedged child costs only its own job, which fails at its
deadline naming the file; the next job runs on a fresh child.

A real spawned child and real pipes; the child is stopped with a real SIGSTOP.
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
from daemon_helpers import model_doc, wait_for

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


def test_a_child_killed_mid_job_fails_only_that_job(worker: ParseWorker,
                                                    tmp_path: Path) -> None:
    path, data = _bundle(tmp_path, "one")
    worker.submit("one", data, path=path, limits=Limits(), bundle_index=0)
    assert isinstance(_finish(worker)[1], BundlePart)
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # hold it mid-job, then kill it there
    big = b"[" + b"0," * (16 << 20) + b"0]"
    worker.submit("big", big, path=str(tmp_path / "big.json"), limits=Limits(),
                  bundle_index=1)
    os.kill(pid, signal.SIGKILL)
    job, result = _finish(worker)
    assert job.name == "big" and isinstance(result, BundleError)
    assert "parse worker died" in result.reason
    path, data = _bundle(tmp_path, "two")
    worker.submit("two", data, path=path, limits=Limits(), bundle_index=2)
    assert isinstance(_finish(worker)[1], BundlePart)
