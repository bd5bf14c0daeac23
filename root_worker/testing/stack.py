"""Start and stop the whole stack on loopback: daemon, leaves, gunicorn root pools.

Used by ``python -m root_worker.testing.demo`` (``make demo`` / ``make run``) and
``bench/e2e_bench.py``; the tests have their own copy in ``tests/root_helpers.py``. Not used
by the service itself.

Everything lives in one temporary directory (:attr:`Stack.workdir`): a copy of the bundles
(the hot-swap edits the copy), the routing file, the leaves' port files, every process's log
and each pool's ``$FT_RUN_DIR``. The shared-memory prefix is unique per stack
(``<tag>_<random>``).

Processes:

* each child runs in its own session (``start_new_session``), so a Ctrl-C in the terminal
  reaches only this process, which then stops the children in order; each child also gets
  ``PR_SET_PDEATHSIG = SIGTERM``, so if this process dies without cleaning up (``kill -9``)
  the children still stop (and the daemon, started with ``--cleanup``, removes its segments);
* :meth:`Proc.stop` sends SIGTERM, waits up to :data:`STOP_TIMEOUT` seconds, then SIGKILLs
  the child's whole process group (gunicorn workers included);
* every wait polls with a deadline (:func:`wait_for`); nothing sleeps unbounded.

:meth:`Stack.close` stops the pools, the leaves and the daemon (in that order), checks
``/dev/shm`` for segments of the prefix (the daemon's ``--cleanup`` should have removed them;
leftovers are removed as their owner would and reported), then removes the directory.

    with Stack.create("ftdemo", Path("examples")) as stack:
        pool = stack.start_pool("trim", mode="trim")
        Client(pool.url).score(frame)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from flatbuffers_schema.atomic_file import write_atomic
from flatbuffers_schema.shm_layout import SHM_DIR, segment_files
from root_worker.featuremap.shm_reader import ShmReader
from root_worker.testing.client import Client, metric_samples

T = TypeVar("T")
STOP_TIMEOUT = 10.0
"""Seconds a process gets to exit after SIGTERM before its process group is SIGKILLed."""
START_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1
EXAMPLE_LEAVES = (  # leaf name, bundle, models served (None: all of the bundle's)
    ("ads_ctr", "ads", ("ads_ctr",)),
    ("ads_cvr", "ads", ("ads_cvr",)),
    ("homefeed_rank", "homefeed", None),
)
GENERATION_METRIC = "feature_trimmer_root_map_generation"
# The directory that holds the root_worker package: children run from here so that
# ``python -m`` finds the project even from a source checkout that is not installed.
PROJECT_DIR = Path(__file__).resolve().parents[2]
# The example bundles, features and routing the demo and the harness start from: in a
# checkout a link to examples/, in a wheel a copy (package data of root_worker.testing).
EXAMPLES_DIR = Path(__file__).resolve().parent / "example-data"


class StackError(RuntimeError):
    """A process of the stack failed to start or died."""


def wait_for(cond: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``cond`` until it returns a truthy value; :class:`StackError` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _libc_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """preexec_fn: SIGTERM this child when the process that started it dies."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl: nobody will signal us
            os.kill(os.getpid(), signal.SIGTERM)


def child_pids(pid: int) -> set[int]:
    """Live children of process ``pid`` (a pre-forked master's workers); empty once it exited."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(p) for p in text.split()}


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment minus anything that would leak into a child's configuration."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FT_") and k not in ("PROMETHEUS_MULTIPROC_DIR",)}
    env.update(extra or {})
    return env


class Proc:
    """A child process in its own session, logging to a file."""

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "ab")  # closed in stop()
        try:
            self.proc = subprocess.Popen(
                list(cmd), cwd=PROJECT_DIR, stdin=subprocess.DEVNULL, stdout=self._log,
                stderr=subprocess.STDOUT, start_new_session=True,
                env=child_env() if env is None else dict(env),
                preexec_fn=die_with_parent)  # spawned before any thread starts
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise StackError(f"{self.name} exited with status {self.proc.returncode}; "
                             f"last lines of {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """SIGTERM, wait, then SIGKILL the process group. True if it exited on SIGTERM."""
        clean = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                clean = False
                print(f"{self.name}: no exit {timeout:g}s after SIGTERM; killing its process "
                      "group", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left in its group
        self.proc.wait()
        self._log.close()
        return clean


class Leaf(Proc):
    """``trimmer-leaf`` on a free loopback port."""

    def __init__(self, name: str, bundle: Path, models: Sequence[str] | None, workdir: Path
                 ) -> None:
        self.port_file = workdir / f"leaf-{name}.port"
        cmd = [sys.executable, "-m", "root_worker.leaf.server", "--bundle", str(bundle),
               "--port", "0", "--port-file", str(self.port_file), "--log-level", "WARNING"]
        for m in models or ():
            cmd += ["--model", m]
        super().__init__(f"leaf {name}", cmd, workdir / f"leaf-{name}.log")
        self.url = ""

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Leaf:
        def ready() -> bool:
            self.check_alive()
            return self.port_file.exists()
        wait_for(ready, timeout, f"{self.name} to listen")
        self.url = f"http://127.0.0.1:{int(self.port_file.read_text())}"
        return self

    def stats(self) -> dict[str, Any]:
        with Client(self.url, timeout=10) as c:
            status, doc = c.json("GET", "/stats")
        if status != 200:
            raise StackError(f"{self.name}: GET /stats answered {status}")
        return doc


class Daemon(Proc):
    """``trimmer-daemon --cleanup`` publishing the stack's bundles under its prefix."""

    def __init__(self, prefix: str, bundles: Mapping[str, Path], workdir: Path) -> None:
        cmd = [sys.executable, "-m", "trimmer_daemon.cli", "--shm-name", prefix,
               "--metrics-listen", "", "--cleanup", "--grace-seconds", "1",
               "--heartbeat-interval", "0.5", "--log-level", "INFO"]
        for name, path in bundles.items():
            cmd += ["--bundle", f"{name}={path}"]
        super().__init__("trimmer-daemon", cmd, workdir / "daemon.log")
        self.reader = ShmReader(prefix)

    def published_generation(self) -> int:
        """The generation the control block names now (0: nothing published yet)."""
        self.check_alive()
        control = self.reader.control()
        return control.generation if control is not None else 0

    def wait_generation(self, above: int = 0, timeout: float = START_TIMEOUT) -> int:
        return wait_for(lambda: (g := self.published_generation()) > above and g, timeout,
                        f"the daemon to publish a generation above {above}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        self.reader.close()
        return super().stop(timeout)


class Pool(Proc):
    """A gunicorn root pool (``root_worker.gunicorn_conf``) on a free port."""

    def __init__(self, name: str, workdir: Path, settings: Mapping[str, str]) -> None:
        self.run_dir = workdir / f"pool-{name}"
        self.home = workdir / f"pool-{name}-home"  # gunicorn must not write into $HOME
        self.home.mkdir(parents=True, exist_ok=True)
        env = child_env({"FT_BIND": "127.0.0.1:0", "FT_WORKERS": "2",
                         "FT_RUN_DIR": str(self.run_dir), "HOME": str(self.home),
                         "FT_LOG_LEVEL": "info"})
        env.pop("XDG_RUNTIME_DIR", None)
        env.update(settings)
        self.settings = dict(settings)
        self.workers = int(env["FT_WORKERS"])
        cmd = [sys.executable, "-m", "gunicorn", "-c", "python:root_worker.gunicorn_conf",
               "root_worker.app:app"]
        super().__init__(f"pool {name}", cmd, workdir / f"pool-{name}.log", env)
        self.url = ""

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Pool:
        address = self.run_dir / "root.json"

        def listening() -> bool:
            self.check_alive()
            return address.exists()
        wait_for(listening, timeout, f"{self.name} to listen")
        self.url = json.loads(address.read_text())["addresses"][0]
        wait_for(lambda: (self.check_alive() or True) and
                 len(self.worker_pids()) == self.workers and
                 self.log().count("root worker ready") >= self.workers,
                 timeout, f"{self.name}: {self.workers} workers to start")
        return self

    def worker_pids(self) -> set[int]:
        """Live children of the gunicorn master."""
        return child_pids(self.pid)

    def health_by_worker(self, cond: Callable[[dict[str, Any]], bool] | None = None,
                         timeout: float = 20.0) -> dict[int, dict[str, Any]]:
        """Poll ``/healthz`` on fresh connections until every live worker answered with a
        document satisfying ``cond`` (which worker accepts a connection is up to the
        kernel)."""
        seen: dict[int, dict[str, Any]] = {}
        with Client(self.url, timeout=10) as c:
            def done() -> bool:
                self.check_alive()
                status, doc = c.json("GET", "/healthz", fresh=True)
                if status == 200 and (cond is None or cond(doc)):
                    seen[doc["pid"]] = doc
                return self.worker_pids() <= set(seen)
            wait_for(done, timeout, f"{self.name}: every worker to report via /healthz",
                     interval=0.005)
        live = self.worker_pids()
        return {pid: doc for pid, doc in seen.items() if pid in live}

    def metrics(self) -> str:
        with Client(self.url, timeout=10) as c:
            return c.metrics()

    def generation_by_pid(self) -> dict[int, int]:
        """``feature_trimmer_root_map_generation{pid}``: what each live worker serves."""
        return {int(lbl["pid"]): int(v) for n, lbl, v in metric_samples(self.metrics())
                if n == GENERATION_METRIC}


shm_segments = segment_files  # the demo and tests list what a stack left in /dev/shm


def copy_bundle_atomically(src: Path, dst: Path) -> None:
    """Replace ``dst`` with ``src``'s content the way a deploy tool does: write a temp file
    beside it, then rename it over the old one."""
    write_atomic(dst, src.read_bytes(), durable=False)


@dataclass
class CloseReport:
    """What :meth:`Stack.close` found: processes that ignored SIGTERM, shm leftovers."""

    killed: list[str] = field(default_factory=list)
    leftover_segments: list[str] = field(default_factory=list)
    remaining_segments: list[str] = field(default_factory=list)
    lingering_pids: list[int] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.killed or self.leftover_segments or self.remaining_segments
                    or self.lingering_pids)


class Stack:
    """Daemon + one leaf per example model + any number of root pools, on loopback."""

    def __init__(self, tag: str, examples: Path, keep_workdir: bool = False,
                 triton: Any = None) -> None:
        self.examples = examples
        self.triton_install = triton  # a triton.TritonInstall: add a Triton leaf
        self.triton: Any = None  # its triton.TritonServer, once started
        self.prefix = f"{tag}_{secrets.token_hex(6)}"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.keep_workdir = keep_workdir
        self.bundles = {"ads": self.workdir / "bundles" / "ads" / "module_info.json",
                        "homefeed": self.workdir / "bundles" / "homefeed" / "module_info.json"}
        self.routing = self.workdir / "routing.json"
        self.daemon: Daemon | None = None
        self.leaves: dict[str, Leaf] = {}
        self.pools: dict[str, Pool] = {}
        self.close_report: CloseReport | None = None

    # -- starting -------------------------------------------------------------------------
    @classmethod
    def create(cls, tag: str, examples: Path, keep_workdir: bool = False,
               triton: Any = None) -> Stack:
        """Copy the bundles, start the daemon and the leaves, write the routing file and
        wait for the first map. On failure everything started so far is stopped.
        ``triton`` (a :class:`root_worker.testing.triton.TritonInstall`): also start a
        tritonserver on the test model repository, a bundle built from it and routes
        ``"protocol": "oip"`` to it."""
        stack = cls(tag, examples, keep_workdir, triton)
        try:
            stack._start_backend()
        except BaseException:
            stack.close()
            raise
        return stack

    def _start_backend(self) -> None:
        for name, dst in self.bundles.items():
            dst.parent.mkdir(parents=True)
            shutil.copyfile(self.examples / "bundles" / name / "module_info.json", dst)
        oip_routes = self._start_triton() if self.triton_install is not None else {}
        self.daemon = Daemon(self.prefix, self.bundles, self.workdir)
        for name, bundle, models in EXAMPLE_LEAVES:
            self.leaves[name] = Leaf(name, self.bundles[bundle], models, self.workdir)
        for leaf in self.leaves.values():
            leaf.wait_ready()
        routes: dict[str, Any] = {name: [leaf.url] for name, leaf in self.leaves.items()}
        routes.update(oip_routes)
        self.routing.write_text(json.dumps(routes, indent=1) + "\n")
        self.daemon.wait_generation()

    def _start_triton(self) -> dict[str, Any]:
        from root_worker.testing import triton
        from trimmer_daemon.bundle.cli import main as bundle_main

        repo = triton.write_model_repository(self.workdir / "triton-repo")
        self.triton = triton.TritonServer(self.triton_install, repo, self.workdir)
        self.triton.wait_ready()
        bundle = self.bundles["triton"] = self.workdir / "bundles" / "triton" / \
            "module_info.json"
        bundle.parent.mkdir(parents=True)
        if bundle_main(["build", "-o", str(bundle), "--triton-repo", str(repo)]) != 0:
            raise StackError(f"trimmer-bundle build --triton-repo {repo} failed")
        return {m: {"url": self.triton.url, "protocol": "oip"} for m in triton.MODELS}

    def start_pool(self, name: str, mode: str = "trim", lz4: bool = False,
                   **settings: str) -> Pool:
        """Start a gunicorn pool on the stack's map and leaves and wait for its workers."""
        env = {"FT_SHM_NAME": self.prefix, "FT_ROUTING": str(self.routing), "FT_MODE": mode,
               "FT_LZ4": "1" if lz4 else "0"}
        env.update(settings)
        pool = self.pools[name] = Pool(name, self.workdir, env)
        return pool.wait_ready()

    def stop_pool(self, name: str) -> bool:
        return self.pools.pop(name).stop()

    def check_alive(self) -> None:
        for proc in self.processes():
            proc.check_alive()

    def processes(self) -> list[Proc]:
        daemon = [self.daemon] if self.daemon is not None else []
        server = [self.triton] if self.triton is not None else []
        return [*self.pools.values(), *self.leaves.values(), *server, *daemon]

    def hot_swap(self, bundle: str, source: Path) -> None:
        copy_bundle_atomically(source, self.bundles[bundle])

    # -- stopping -------------------------------------------------------------------------
    def close(self) -> CloseReport:
        """Stop pools, leaves and daemon; check and clean /dev/shm; remove the directory.
        Safe to call twice and on a half-started stack."""
        if self.close_report is not None:
            return self.close_report
        report = self.close_report = CloseReport()
        procs = self.processes()
        workers = {pid for pool in self.pools.values() for pid in pool.worker_pids()}
        for proc in procs:
            try:
                if not proc.stop():
                    report.killed.append(proc.name)
            except Exception as exc:  # keep stopping the others
                report.killed.append(f"{proc.name} ({exc})")
        self.pools.clear()
        self.leaves.clear()
        report.lingering_pids = sorted(pid for pid in {p.pid for p in procs} | workers
                                       if _pid_exists(pid))
        report.leftover_segments = shm_segments(self.prefix)
        if report.leftover_segments:  # the daemon died before --cleanup could run
            from trimmer_daemon.publisher import Publisher

            Publisher(self.prefix).cleanup()
            for name in shm_segments(self.prefix):  # anything the owner did not know about
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(SHM_DIR, name))
        report.remaining_segments = shm_segments(self.prefix)
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return report

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pid_exists(pid: int) -> bool:
    """True if ``pid`` still exists and is not a zombie of ours (reaped children are gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state != "Z"
