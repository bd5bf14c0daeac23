"""Run real leaves and a real gunicorn root pool for tests (own process groups, free ports).

Every process is started with ``start_new_session=True`` and stopped with SIGTERM, then
SIGKILL to its group after a deadline; every wait polls with a deadline (``wait_for``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from daemon_helpers import ROOT, compile_as_the_daemon, wait_for

from flatbuffers_schema.keys import Allowlist
from root_worker.frame import Trimmer, decode
from root_worker.leaf.model import LeafModel
from root_worker.testing import stack
from root_worker.testing.client import Client
from root_worker.testing.workload import FeatureSpec, assign_models, bundle_doc, make_universe

STOP_TIMEOUT = 10.0
DEADLINE_MARGIN = 0.5
"""How long after its leaf deadline a timed-out call or request may end in a test: a few
hundred ms for the loop's wake-up and the answer on a shared 2-core machine -- far less than
a timer armed late could hide in (every slow-leaf test asserts elapsed time with it)."""


class Proc:
    """A subprocess in its own session, logging to a file; it gets SIGTERM if we die (so a
    killed test run or benchmark leaves no pool behind)."""

    def __init__(self, cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
                 ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(list(cmd), cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(env) if env is not None else None,
                                     preexec_fn=stack.die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{what} exited with {self.proc.returncode}:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # whatever the leader left in its group (gunicorn workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        return self.proc.returncode


class LeafProc(Proc):
    """``trimmer-leaf`` on a free port."""

    def __init__(self, args: Sequence[str], tmp: Path, name: str) -> None:
        self.port_file = tmp / f"{name}.port"
        cmd = [sys.executable, "-m", "root_worker.leaf.server", "--port", "0",
               "--port-file", str(self.port_file), "--log-level", "WARNING", *args]
        super().__init__(cmd, tmp / f"{name}.log")
        self.name = name
        self._port = 0

    def wait_ready(self, timeout: float = 20.0) -> LeafProc:
        def ready() -> bool:
            self.check_alive(f"leaf {self.name}")
            return self.port_file.exists()
        wait_for(ready, timeout, f"leaf {self.name} to listen")
        self._port = int(self.port_file.read_text())
        return self

    @property
    def url(self) -> str:
        assert self._port, "wait_ready() first"
        return f"http://127.0.0.1:{self._port}"

    def stats(self) -> dict[str, Any]:
        with Client(self.url) as c:
            status, doc = c.json("GET", "/stats")
        assert status == 200
        return doc


class RootProc(Proc):
    """The gunicorn root pool, configured through FT_* variables."""

    def __init__(self, tmp: Path, settings: Mapping[str, str], name: str = "root") -> None:
        self.run_dir = tmp / f"{name}-run"
        self.home = tmp / f"{name}-home"
        self.home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("FT_") and k not in ("XDG_RUNTIME_DIR",
                                                       "PROMETHEUS_MULTIPROC_DIR")}
        env.update({"FT_BIND": "127.0.0.1:0", "FT_WORKERS": "2", "FT_RUN_DIR": str(self.run_dir),
                    "HOME": str(self.home), "FT_LOG_LEVEL": "info"})
        env.update(settings)
        cmd = [sys.executable, "-m", "gunicorn", "-c", "python:root_worker.gunicorn_conf",
               "root_worker.app:app"]
        super().__init__(cmd, tmp / f"{name}.log", env)
        self.workers = int(env["FT_WORKERS"])
        self.url = ""
        self._clients: list[Client] = []

    def wait_ready(self, timeout: float = 30.0) -> RootProc:
        address_file = self.run_dir / "root.json"

        def listening() -> bool:
            self.check_alive("gunicorn")
            return address_file.exists()
        wait_for(listening, timeout, "gunicorn to listen")
        self.url = json.loads(address_file.read_text())["addresses"][0]
        wait_for(lambda: len(self.worker_pids()) == self.workers and
                 self.log().count("root worker ready") >= self.workers,
                 timeout, "gunicorn workers to start")
        return self

    def worker_pids(self) -> set[int]:
        """Live children of the gunicorn master."""
        return stack.child_pids(self.pid)

    def client(self) -> Client:
        """A keep-alive client, closed by :meth:`stop`."""
        c = Client(self.url)
        self._clients.append(c)
        return c

    def stop(self, sig: int = signal.SIGTERM) -> int:
        for c in self._clients:
            c.close()
        return super().stop(sig)

    def health_by_worker(self, want: set[int], timeout: float = 20.0,
                         cond: Any = None) -> dict[int, dict[str, Any]]:
        """Poll /healthz on fresh connections until every pid in ``want`` answered with a
        document satisfying ``cond`` (reaching each worker is up to the kernel)."""
        seen: dict[int, dict[str, Any]] = {}
        c = self.client()

        def done() -> bool:
            self.check_alive("gunicorn")
            status, doc = c.json("GET", "/healthz", fresh=True)
            assert status == 200, doc
            if cond is None or cond(doc):
                seen[doc["pid"]] = doc
            return want <= set(seen)
        wait_for(done, timeout, f"workers {sorted(want)} to report via /healthz")
        return seen


# -- a small production-shaped workload for the tests -------------------------------------
class Workload:
    """A feature universe, three models over it and the bundle documents."""

    def __init__(self, n_features: int = 240) -> None:
        self.universe: list[FeatureSpec] = make_universe(n_features, seed=3)
        self.models = assign_models(self.universe, seed=4)
        self.v2 = sorted(set(self.models["homefeed_rank"][10:]) |
                         {f.name for f in self.universe[:12]})

    def ads_doc(self) -> dict[str, Any]:
        return bundle_doc({"ads_ctr": {"1": self.models["ads_ctr"]},
                           "ads_cvr": {"1": self.models["ads_cvr"]}})

    def homefeed_doc(self, with_v2: bool = False) -> dict[str, Any]:
        versions = {"1": self.models["homefeed_rank"]}
        if with_v2:
            versions["2"] = self.v2
        return bundle_doc({"homefeed_rank": versions})

    def features(self, model: str, version: str = "1") -> list[str]:
        if model == "homefeed_rank" and version == "2":
            return self.v2
        return self.models[model]


@dataclass
class PoolEnv:
    """What a root test starts pools on: a published map (``prefix``), its workload, a leaf
    process and a routing file. Subclasses set the settings their pools start with."""

    tmp: Path
    prefix: str
    wl: Workload
    leaf: Any
    routing: Path
    ROOT_SETTINGS: ClassVar[Mapping[str, str]] = {}

    def root(self, name: str, **settings: str) -> RootProc:
        env = {"FT_SHM_NAME": self.prefix, "FT_ROUTING": str(self.routing),
               **self.ROOT_SETTINGS, **settings}
        return RootProc(self.tmp, env, name)


E = TypeVar("E", bound=PoolEnv)


@contextlib.contextmanager
def pool_env(env_cls: type[E], tmp: Path, make_leaf: Callable[[Workload], Any],
             docs: Callable[[Workload], Mapping[str, dict[str, Any]]]) -> Iterator[E]:
    """A fresh workload's bundles ``docs(wl)`` published under a unique shm prefix, the leaf
    ``make_leaf(wl)`` ready, and a routing file sending every model to it; at exit the leaf
    and the map are stopped and no segment of the prefix may be left."""
    from conftest import shm_leftovers

    prefix = f"fttest_{uuid.uuid4().hex[:12]}"
    wl = Workload()
    pub = MapPublisher(prefix)
    leaf = make_leaf(wl)
    try:
        pub.publish(docs(wl))
        leaf.wait_ready()
        routing = write_routing(tmp / "routing.json", {"*": leaf.url})
        yield env_cls(tmp, prefix, wl, leaf, routing)
    finally:
        leaf.stop()
        pub.close()
        assert not shm_leftovers(prefix)


def reference_scores(frame: bytes, model: str, version: str, features: list[str]
                     ) -> list[float]:
    """What the leaf must answer, computed here on the whole, untrimmed frame."""
    scores, _ = LeafModel.build(model, version, features).score(decode(frame))
    return scores


def trimmed_size(frame: bytes, features: list[str]) -> int:
    return Trimmer().trim(frame, Allowlist.from_names(features)).bytes_out


def kept_bytes(frame: bytes, features: list[str]) -> int:
    """Bytes of the kept columns' data blocks (no padding, no header)."""
    cols = decode(frame).columns
    total = 0
    for name in features:
        col = cols.get(name)
        if col is None:
            continue
        if hasattr(col, "offsets"):
            total += col.offsets.nbytes + col.values.nbytes
        else:
            total += col.nbytes
    return total


def write_routing(path: Path, routes: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(routes))
    return path


# -- in-process pieces for unit tests -------------------------------------------------------
class MapPublisher:
    """Publish feature maps from bundle documents in this process through the daemon's own
    compile path (a part per bundle spliced by the assembler, ``publish_parts``) minus the
    watcher, for tests of the readers."""

    def __init__(self, prefix: str) -> None:
        from trimmer_daemon.publisher import Publisher

        self.publisher = Publisher(prefix, grace_s=0.0)

    def publish(self, docs: Mapping[str, dict[str, Any]]) -> int:
        from trimmer_daemon.bundle.parse import parse_bundle

        return self.publish_parsed({name: parse_bundle(json.dumps(doc).encode(),
                                                       path=f"/b/{name}")
                                    for name, doc in docs.items()})

    def publish_parsed(self, parsed: Mapping[str, Any]) -> int:
        """Publish already parsed bundles (a test may hand-build one the validator refuses,
        as a map compiled by an older daemon could hold)."""
        out = compile_as_the_daemon(parsed, generation=self.publisher.next_generation,
                                    built_at_ns=time.time_ns())
        return self.publisher.publish_parts(out.parts, out.crc)

    def close(self) -> None:
        self.publisher.cleanup()


class LeafThread:
    """A reference leaf server in a thread of this process (unit tests)."""

    def __init__(self, store: Any, delay_s: float = 0.0, max_body: int = 64 << 20) -> None:
        import threading

        from root_worker.leaf.server import LeafServer

        self.server = LeafServer(("127.0.0.1", 0), store, max_body, delay_s)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


def read_until_closed(sock: socket.socket) -> bytes:
    """Every byte the peer sends until it closes (the socket's timeout bounds each recv)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def raw_post(url: str, head: str, body: bytes = b"", *, half_close: bool = False) -> bytes:
    """Send a request by hand (``head``, the blank line, ``body``) and return the answer, even
    if the server answers (and closes) before the whole body is sent.

    Without ``half_close`` reading stops at the end of the first answer (its Content-Length:
    a keep-alive server does not close). With it the write side is shut after the request, so
    the server sees the end of the stream, and every byte is read until it closes (an interim
    ``100 Continue`` and the final answer both come back)."""
    host, port = url[len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        try:
            s.sendall(head.encode() + b"\r\n" + body)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed (or reset) before the end
            pass
        return read_until_closed(s) if half_close else read_answer(s)


def read_answer(sock: socket.socket) -> bytes:
    """The first answer: its head and Content-Length body, or every byte until the peer
    closes (the socket's timeout bounds each recv)."""
    answer = b""
    while True:
        end = answer.find(b"\r\n\r\n")
        if end >= 0:
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", answer[:end])
            if length is None or len(answer) >= end + 4 + int(length.group(1)):
                return answer
        chunk = sock.recv(65536)
        if not chunk:
            return answer
        answer += chunk


class BadLeafProc(Proc):
    """``tests/bad_leaf.py``: one process acting out every leaf misbehaviour by model name."""

    def __init__(self, tmp: Path, name: str = "bad-leaf") -> None:
        self.port_file = tmp / f"{name}.port"
        self.slow_file = tmp / f"{name}.slow.port"
        self.requests_log = tmp / f"{name}.requests"
        cmd = [sys.executable, str(Path(__file__).with_name("bad_leaf.py")), "--port-file",
               str(self.port_file), "--slow-accept-port-file", str(self.slow_file),
               "--log", str(self.requests_log)]
        super().__init__(cmd, tmp / f"{name}.log")
        self.name = name

    def wait_ready(self, timeout: float = 20.0) -> BadLeafProc:
        def ready() -> bool:
            self.check_alive(self.name)
            return self.port_file.exists() and self.slow_file.exists()
        wait_for(ready, timeout, f"{self.name} to listen")
        self.url = f"http://127.0.0.1:{int(self.port_file.read_text())}"
        self.slow_accept_url = f"http://127.0.0.1:{int(self.slow_file.read_text())}"
        return self

    def requests(self) -> list[str]:
        """The model of every request received so far."""
        try:
            return self.requests_log.read_text().split()
        except FileNotFoundError:
            return []


def uss_bytes(pid: int) -> int:
    """Unique set size of a process (Private_Clean + Private_Dirty of smaps_rollup)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"]


@contextlib.contextmanager
def idle_and_slow_clients(url: str, n_idle: int, n_slow: int, head: bytes,
                          interval: float = 0.5) -> Iterator[tuple[list[socket.socket],
                                                                   list[socket.socket]]]:
    """``n_idle`` connections to ``url`` that send nothing and ``n_slow`` that each send
    ``head`` one byte per ``interval`` (real sockets, a real drip); all closed at exit."""
    host, port = url[len("http://"):].split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(n_idle)]
    slow = [socket.create_connection((host, int(port))) for _ in range(n_slow)]
    stop = threading.Event()

    def drip() -> None:
        for byte in head:
            for s in slow:
                with contextlib.suppress(OSError):  # the root may have closed it (408)
                    s.send(bytes([byte]))
            if stop.wait(interval):
                return

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    try:
        yield idle, slow
    finally:
        stop.set()
        t.join(10)
        for s in idle + slow:
            s.close()
