"""``make demo`` / ``make run`` (``python -m root_worker.testing.demo``) end to end.

Each test runs the real entry point (daemon, 3 leaves, two gunicorn pools) with a small
request count, then checks the exit status, the printed table and that nothing is left
behind: no /dev/shm segment of the demo's prefix, no process that belongs to its stack, no
temporary directory. Deadlines everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import shm_leftovers
from daemon_helpers import ROOT, wait_for

from root_worker.testing.client import Client

DEMO = [sys.executable, "-m", "root_worker.testing.demo"]
RUN_TIMEOUT = 120


class DemoProc:
    """The demo in its own session; stdout collected line by line by a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*DEMO, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"demo exited ({self.proc.returncode}) before printing "
                                     f"{pattern!r}:\n{self.output}")
            return None
        return wait_for(found, timeout, f"the demo to print {pattern!r}", interval=0.05)

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"demo still running after {timeout}s:\n{self.output}"
                                 ) from None
        self._reader.join(10)
        return self.proc.returncode

    def close(self) -> None:
        """Kill the demo if it still runs (its stack follows, see the last test)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def prefix(self) -> str:
        return self.wait_line(r"shm prefix (ft\w+_[0-9a-f]{12})").group(1)

    def workdir(self) -> Path:
        return Path(self.wait_line(r"directory (/[^\s)]+)").group(1))


def processes_of(prefix: str) -> list[int]:
    """Live processes whose command line or environment names the stack's prefix (the daemon
    names it on its command line, the pools in FT_SHM_NAME, the leaves in their paths)."""
    found = []
    needle = prefix.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            data = Path(f"/proc/{entry}/cmdline").read_bytes()
            data += Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if needle in data and state != "Z":
            found.append(int(entry))
    return found


def assert_nothing_left(prefix: str, workdir: Path, timeout: float = 0.0) -> None:
    """No segment, no process, no directory (optionally waiting ``timeout`` for them)."""
    def gone() -> bool:
        return not (shm_leftovers(prefix) or processes_of(prefix) or workdir.exists())
    if timeout:
        wait_for(gone, timeout, f"the stack {prefix} to be gone", interval=0.1)
    assert not shm_leftovers(prefix), f"shm segments left: {shm_leftovers(prefix)}"
    assert not processes_of(prefix), f"processes left: {processes_of(prefix)}"
    assert not workdir.exists(), f"{workdir} left"


@pytest.fixture
def demos() -> Iterator[list[DemoProc]]:
    started: list[DemoProc] = []
    yield started
    for d in started:
        d.close()


def test_demo_passes_prints_the_table_and_leaves_nothing(demos: list[DemoProc]) -> None:
    demo = DemoProc("demo", "--requests", "40", "--clients", "2")
    demos.append(demo)
    rc = demo.wait()
    out = demo.output
    assert rc == 0, out
    prefix, workdir = demo.prefix(), demo.workdir()
    for model in ("ads_ctr", "ads_cvr", "homefeed_rank"):
        row = re.search(rf"^\s+{model}\s+(\d+)\s.*\s(\d+\.\d)%\s+trimmed=\d+", out, re.M)
        assert row, f"no table row for {model}:\n{out}"
        assert 50.0 < float(row.group(2)) < 90.0  # the example models use ~31% of the union
    assert re.search(r"^\s+all models\s+\d+", out, re.M)
    assert "version_fallback=" in out  # ads_cvr@7 falls back to the latest version
    compared = re.search(r"scores with trimming == scores without: yes \((\d+) targets", out)
    assert compared and int(compared.group(1)) > 0, out
    workers = re.findall(r"^\s+(\d+)\s+(?:g\d+: \d+.*|\(none\))\s+g(\d+)\s+g(\d+)$", out,
                         re.M)
    assert len(workers) == 2, out
    assert all(hz == metric == "2" for _, hz, metric in workers), workers
    assert re.search(r"daemon published generation 2 \(was 1\)", out)
    assert "[FAIL]" not in out and "demo passed" in out
    assert_nothing_left(prefix, workdir)


def test_ctrl_c_mid_traffic_stops_everything(demos: list[DemoProc]) -> None:
    demo = DemoProc("demo", "--requests", "100000", "--clients", "2")
    demos.append(demo)
    prefix, workdir = demo.prefix(), demo.workdir()
    demo.wait_line(r"^traffic: ")
    assert processes_of(prefix) and shm_leftovers(prefix)
    demo.proc.send_signal(signal.SIGINT)
    assert demo.wait(60) == 130, demo.output
    assert "interrupted" in demo.output
    assert_nothing_left(prefix, workdir)


def test_run_serves_until_sigterm_then_cleans_up(demos: list[DemoProc]) -> None:
    demo = DemoProc("run")
    demos.append(demo)
    prefix = demo.prefix()
    workdir = demo.workdir()
    url = demo.wait_line(r"root pool \(trim\): (http://\S+)").group(1)
    demo.wait_line(r"^Ctrl-C stops everything")
    sample = workdir / "sample.frame"
    with Client(url) as c:
        status, doc = c.score(sample.read_bytes(), ["ads_ctr", "homefeed_rank"])
    assert status == 200, doc
    assert [t["outcome"] for t in doc["targets"]] == ["trimmed", "trimmed"]
    demo.proc.send_signal(signal.SIGTERM)
    assert demo.wait(60) == 0, demo.output
    assert f"shm segments of {prefix} left: none" in demo.output
    assert_nothing_left(prefix, workdir)


def test_killed_demo_takes_its_stack_down(demos: list[DemoProc]) -> None:
    """kill -9 of the demo: its children get SIGTERM (PR_SET_PDEATHSIG) and stop; the daemon
    removes its segments (--cleanup). Only the temporary directory stays behind."""
    demo = DemoProc("demo", "--requests", "100000", "--clients", "1")
    demos.append(demo)
    prefix, workdir = demo.prefix(), demo.workdir()
    demo.wait_line(r"^traffic: ")
    demo.proc.kill()
    demo.wait(10)
    try:
        wait_for(lambda: not (shm_leftovers(prefix) or processes_of(prefix)), 30,
                 "the orphaned stack to stop", interval=0.1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
