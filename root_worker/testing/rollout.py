"""A model rollout rehearsed on real processes: root hosts, leaf replicas, steady traffic.

Used by ``bench/rollout_bench.py`` (``make bench-rollout``) and ``tests/test_rollout.py``.
Not used by the service itself.

Each **root host** has its own ``trimmer-daemon``, shm name and gunicorn pool. Given a
:class:`Network` (the bench, where ``ip netns`` and ``unshare -m`` work; the process that
drives the rehearsal then runs in its "fabric" namespace, with the leaves and the traffic),
each host's two processes run in the host's own network namespace, joined to the fabric by
a veth pair, and in their own mount namespaces with the host's directory bind-mounted at
``/dev/shm``, as the Kubernetes pod shares a memory ``emptyDir`` between its two
containers; without one (the test) everything is on loopback and the hosts differ by shm
name. The canary host routes ``homefeed_rank`` to both of its replicas, the others to the
second one (the first is the canary leaf).

Each **model** has two leaf replicas (``trimmer-leaf``, one bundle file each: the version the
replica serves); ``homefeed_rank`` rolls from v1 to v2 (v2 swaps ``swapped`` of its inputs),
``ads_ctr`` stays on v1 and is asked for by version. One traffic thread per host sends
``[homefeed_rank, ads_ctr@1]`` requests back to back (at most one request in flight per host).

The deploy pipeline's commands are the real ones: ``trimmer-bundle build`` writes the root
bundle (``--pending-entry`` for v2), a deploy copies it over each host's bundle file (temp
file + rename), ``trimmer-bundle promote`` promotes; a leaf rolls out by the same replacement
of its bundle file. Per stage the rehearsal counts, from the client, the roots' ``/metrics``
and the leaves' ``/stats``: requests, errors, under-sent frames (scored although inputs of the
leaf's version were missing), skew round trips, learned leaf-version changes (the bound of
skew round trips: one per worker, endpoint and change), bytes sent / untrimmed, p99.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flatbuffers_schema.shm_layout import SHM_DIR, segment_files
from root_worker.testing.client import Client, metric_samples
from root_worker.testing.stack import Proc, StackError, child_env, copy_bundle_atomically, wait_for
from root_worker.testing.workload import make_frame, make_universe
from trimmer_daemon.bundle import cli as bundle_cli

MODEL = "homefeed_rank"  # rolled from v1 to v2 (requests name no version)
STEADY = "ads_ctr"       # stays on v1 (requests name version 1)
M = "feature_trimmer_root_"
START_TIMEOUT = 60.0
BYTES_TOLERANCE = 0.10   # bytes sent / untrimmed within 10 % of the steady state
P99 = 0.99


@dataclass(frozen=True)
class Signatures:
    """The feature universe and the inputs of each model version."""

    universe: Any
    v1: list[str]
    v2: list[str]
    ads: list[str]

    @classmethod
    def make(cls, n_inputs: int = 618, swapped: int = 60, n_features: int = 2000,
             seed: int = 11) -> Signatures:
        universe = make_universe(n_features, seed=seed)
        names = [f.name for f in universe]
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(names)).tolist()
        v1 = [names[i] for i in sorted(order[:n_inputs])]
        dropped = set(rng.choice(v1, size=swapped, replace=False).tolist())
        added = [names[i] for i in order[n_inputs:n_inputs + swapped]]
        v2 = sorted(set(v1) - dropped | set(added), key=names.index)
        ads = [names[i] for i in sorted(order[n_inputs + swapped:][:n_inputs // 2])]
        return cls(universe, v1, v2, ads)

    def inputs(self, model: str, version: str) -> list[str]:
        if model == STEADY:
            return self.ads
        return self.v2 if version == "2" else self.v1


# ---------------------------------------------------------------------------------------------
# the deploy pipeline's files


class Pipeline:
    """Model directories as a model registry lays them out, and the bundles built from them
    with ``trimmer-bundle`` (the commands a deploy pipeline runs)."""

    def __init__(self, workdir: Path, sigs: Signatures) -> None:
        self.dir = workdir / "pipeline"
        self.sigs = sigs
        self.paths: dict[tuple[str, str], Path] = {}
        for model, version in ((MODEL, "1"), (MODEL, "2"), (STEADY, "1")):
            path = self.dir / "models" / model / version / "module_info.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"input_names": sigs.inputs(model, version),
                                        "output_names": ["score"]}))
            self.paths[(model, version)] = path
        self.commands: list[str] = []

    def _run(self, argv: list[str]) -> None:
        self.commands.append("trimmer-bundle " + " ".join(argv))
        with contextlib.redirect_stdout(sys.stderr):
            code = bundle_cli.main(argv)
        if code != 0:
            raise StackError(f"trimmer-bundle {' '.join(argv)} exited with {code}")

    def build(self, name: str, *, current: Sequence[tuple[str, str]],
              pending: Sequence[tuple[str, str]] = ()) -> Path:
        """``trimmer-bundle build -o NAME --entry ... --pending-entry ...``."""
        out = self.dir / "bundles" / name / "module_info.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = ["build", "-o", str(out)]
        for model, version in current:
            argv += ["--entry", model, version, str(self.paths[(model, version)])]
        for model, version in pending:
            argv += ["--pending-entry", model, version, str(self.paths[(model, version)])]
        self._run(argv)
        return out

    def promote(self, bundle: Path, name: str) -> Path:
        """``trimmer-bundle promote -o NAME BUNDLE``."""
        out = self.dir / "bundles" / name / "module_info.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        self._run(["promote", "-o", str(out), str(bundle)])
        return out


# ---------------------------------------------------------------------------------------------
# processes


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=30)


def namespaces_work() -> str | None:
    """None when ``ip netns`` and ``unshare -m`` work here, else why not."""
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "ip or unshare not installed"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare -m: {probe.stderr.strip() or probe.returncode}"
    name = f"ftp{secrets.token_hex(4)}"
    try:
        _ip("netns", "add", name)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"ip netns add: {getattr(exc, 'stderr', '') or exc}".strip()
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


class Network:
    """Per host a network namespace joined to the fabric namespace by a veth pair
    (``10.<a>.<b>.{4i+1, 4i+2}/30``); :meth:`close` deletes every namespace (and so every
    veth pair) it created."""

    def __init__(self, hosts: int, *, attach: dict[str, Any] | None = None) -> None:
        """Create the namespaces, or (``attach``: :meth:`describe` of the creator) name
        those another process created (then :meth:`close` leaves them)."""
        tag = secrets.token_hex(3)
        self.fabric = f"ftr{tag}f"
        self.hosts = [f"ftr{tag}h{i}" for i in range(hosts)]
        self.net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        self.created: list[str] = []
        if attach is not None:
            self.fabric, self.hosts, self.net = attach["fabric"], attach["hosts"], attach["net"]
            return
        try:
            for ns in (self.fabric, *self.hosts):
                _ip("netns", "add", ns)
                self.created.append(ns)
            _ip("-n", self.fabric, "link", "set", "lo", "up")
            for i, ns in enumerate(self.hosts):
                a, b = f"ftr{tag}a{i}", f"ftr{tag}b{i}"
                _ip("link", "add", a, "netns", ns, "type", "veth", "peer", "name", b,
                    "netns", self.fabric)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{self.host_addr(i)}/30", "dev", a)
                _ip("-n", ns, "link", "set", a, "up")
                _ip("-n", self.fabric, "addr", "add", f"{self.fabric_addr(i)}/30", "dev", b)
                _ip("-n", self.fabric, "link", "set", b, "up")
        except BaseException:
            self.close()
            raise

    def describe(self) -> dict[str, Any]:
        return {"fabric": self.fabric, "hosts": self.hosts, "net": self.net}

    def host_addr(self, i: int) -> str:
        return f"{self.net}.{4 * i + 1}"

    def fabric_addr(self, i: int) -> str:
        return f"{self.net}.{4 * i + 2}"

    def close(self) -> None:
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.created.clear()


class Leaf(Proc):
    """A ``trimmer-leaf`` replica serving the versions of its own bundle file."""

    def __init__(self, name: str, bundle: Path, workdir: Path, wrap: Sequence[str],
                 host: str) -> None:
        self.port_file = workdir / f"leaf-{name}.port"
        self.bundle = bundle
        cmd = [*wrap, sys.executable, "-m", "root_worker.leaf.server", "--bundle", str(bundle),
               "--host", host, "--port", "0", "--port-file", str(self.port_file),
               "--log-level", "WARNING"]
        super().__init__(f"leaf {name}", cmd, workdir / f"leaf-{name}.log")
        self.port = 0

    def wait_ready(self) -> Leaf:
        wait_for(lambda: (self.check_alive() or True) and self.port_file.exists(),
                 START_TIMEOUT, f"{self.name} to listen")
        self.port = int(self.port_file.read_text())
        return self

    def url_from(self, addr: str) -> str:
        return f"http://{addr}:{self.port}"

    def stats(self, addr: str) -> dict[str, Any]:
        with Client(self.url_from(addr), timeout=10) as c:
            status, doc = c.json("GET", "/stats")
        if status != 200:
            raise StackError(f"{self.name}: GET /stats answered {status}")
        return doc

    def serves(self, addr: str, model: str) -> str | None:
        return self.stats(addr)["models"].get(model, {}).get("latest")


class RootHost:
    """One root host: its daemon and its gunicorn pool (in its namespaces when isolated)."""

    def __init__(self, name: str, workdir: Path, prefix: str, bundles: dict[str, Path],
                 routing: dict[str, list[str]], workers: int, wrap: Sequence[str],
                 bind: str, addr: str) -> None:
        self.name, self.prefix, self.addr = name, prefix, addr
        self.bundles = bundles
        self.routing_path = workdir / f"{name}-routing.json"
        self.routing_path.write_text(json.dumps(routing))
        daemon = [*wrap, sys.executable, "-m", "trimmer_daemon.cli", "--shm-name", prefix,
                  "--metrics-listen", "", "--cleanup", "--grace-seconds", "1",
                  "--heartbeat-interval", "0.5", "--log-level", "INFO"]
        for bundle, path in bundles.items():
            daemon += ["--bundle", f"{bundle}={path}"]
        self.daemon = Proc(f"{name} daemon", daemon, workdir / f"{name}-daemon.log")
        self.run_dir = workdir / f"{name}-run"
        home = workdir / f"{name}-home"
        home.mkdir(parents=True, exist_ok=True)
        env = child_env({"FT_BIND": f"{bind}:0", "FT_WORKERS": str(workers),
                         "FT_RUN_DIR": str(self.run_dir), "HOME": str(home),
                         "FT_LOG_LEVEL": "info", "FT_SHM_NAME": prefix,
                         "FT_ROUTING": str(self.routing_path), "FT_READY_MAX_WAIT": "20"})
        env.pop("XDG_RUNTIME_DIR", None)
        self.workers = workers
        self.pool = Proc(f"{name} pool", [*wrap, sys.executable, "-m", "gunicorn", "-c",
                                          "python:root_worker.gunicorn_conf",
                                          "root_worker.app:app"],
                         workdir / f"{name}-pool.log", env)
        self.url = ""
        self.client: Client | None = None

    def wait_ready(self) -> RootHost:
        address = self.run_dir / "root.json"
        wait_for(lambda: (self.pool.check_alive() or self.daemon.check_alive() or True)
                 and address.exists(), START_TIMEOUT, f"{self.name} to listen")
        port = json.loads(address.read_text())["addresses"][0].rsplit(":", 1)[1]
        self.url = f"http://{self.addr}:{port}"
        self.wait_generation(0)
        return self

    def generations(self) -> dict[int, int]:
        with Client(self.url, timeout=10) as c:
            text = c.metrics()
        return {int(lbl["pid"]): int(v) for n, lbl, v in metric_samples(text)
                if n == M + "map_generation"}

    def wait_generation(self, above: int) -> int:
        """Every live worker serves a generation above ``above``; returns the lowest."""
        def ready() -> int:
            self.pool.check_alive()
            self.daemon.check_alive()
            with Client(self.url, timeout=10) as c:
                for _ in range(4 * self.workers):  # new connections reach every worker
                    c.json("GET", "/healthz", fresh=True)
            gens = self.generations()
            low = min(gens.values()) if len(gens) >= self.workers else 0
            return low if low > above else 0
        return wait_for(ready, START_TIMEOUT, f"{self.name}: workers on a generation above "
                        f"{above}", interval=0.05)

    def deploy(self, bundle: str, source: Path) -> None:
        """What a deploy tool does: the new file beside the old one, then a rename."""
        gen = min(self.generations().values())
        copy_bundle_atomically(source, self.bundles[bundle])
        self.wait_generation(gen)

    def metrics(self) -> dict[str, float]:
        """Sums over workers and models of the counters a stage reports."""
        with Client(self.url, timeout=10) as c:
            text = c.metrics()
        out: dict[str, float] = {}
        for name, labels, value in metric_samples(text):
            if name.endswith("_total") or name == M + "leaf_version":
                key = name.removeprefix(M).removesuffix("_total")
                if name == M + "leaf_version":
                    if value != 1:
                        continue
                    key = f"leaf_version:pid={labels.get('pid', '-')} {labels['model']} " \
                          f"{labels['endpoint']} {labels['version']}"
                elif "model" in labels:
                    per_model = f"{key}:{labels['model']}"
                    out[per_model] = out.get(per_model, 0.0) + value
                if "outcome" in labels:
                    per_outcome = f"{key}:outcome={labels['outcome']}"
                    out[per_outcome] = out.get(per_outcome, 0.0) + value
                out[key] = out.get(key, 0.0) + value
        return out

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.pool.stop()
        self.daemon.stop()


# ---------------------------------------------------------------------------------------------
# traffic and stages


@dataclass
class Tally:
    """What the clients saw in one stage."""

    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


class Traffic:
    """One thread per host: ``[MODEL, STEADY@1]`` requests back to back, tallied per stage."""

    def __init__(self, hosts: Sequence[RootHost], frames: Sequence[bytes]) -> None:
        self.hosts, self.frames = hosts, frames
        self.stage = ""
        self.tallies: dict[str, Tally] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(h,), daemon=True,
                                          name=f"traffic {h.name}") for h in hosts]

    def start(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, host: RootHost) -> None:
        # one keep-alive connection per worker, used in turn (one request in flight per
        # host): which worker accepts each is the kernel's choice, as in production
        clients = [Client(host.url, timeout=30) for _ in range(host.workers)]
        i = 0
        try:
            while not self._stop.is_set():
                stage = self.stage
                frame = self.frames[i % len(self.frames)]
                client = clients[i % len(clients)]
                i += 1
                t0 = time.perf_counter()
                try:
                    status, doc = client.score(frame, [MODEL, (STEADY, "1")])
                    bad = [t for t in doc.get("targets", ()) if t.get("status") != "ok"]
                    error = f"{status}: {bad[:1]}" if status != 200 or bad else None
                except (OSError, ValueError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                dt = time.perf_counter() - t0
                with self._lock:
                    tally = self.tallies.setdefault(stage, Tally())
                    tally.requests += 1
                    tally.latencies.append(dt)
                    if error is not None:
                        tally.errors += 1
                        if len(tally.error_samples) < 3:
                            tally.error_samples.append(f"{host.name}: {error}")
        finally:
            for client in clients:
                client.close()

    def count(self, stage: str) -> int:
        with self._lock:
            tally = self.tallies.get(stage)
            return tally.requests if tally else 0


@dataclass
class Stage:
    name: str
    command: str             # what the deploy pipeline runs (for the table and the docs)
    action: Callable[[], None]
    changed: int = 0         # leaf endpoints whose version this stage changes


class Rehearsal:
    """Hosts, leaves and traffic; :meth:`run` drives the stages and returns one row each."""

    def __init__(self, workdir: Path, *, hosts: int = 3, workers: int = 2,
                 network: Network | None = None, sigs: Signatures | None = None,
                 candidates: int = 64, stage_requests: int = 60,
                 canary_routes_all: bool = True) -> None:
        self.workdir = workdir
        self.sigs = sigs or Signatures.make()
        self.pipeline = Pipeline(workdir, self.sigs)
        self.stage_requests = stage_requests
        self.network = network  # this process runs in its fabric namespace
        self.leaves: dict[str, Leaf] = {}
        self.hosts: list[RootHost] = []
        self.leaf_bundles: dict[str, Path] = {}
        tag = secrets.token_hex(4)
        self.prefixes = [f"ftroll_{tag}_{i}" for i in range(hosts)]
        self.v1 = self.pipeline.build("root-v1", current=[(MODEL, "1")])
        self.ads = self.pipeline.build("root-ads", current=[(STEADY, "1")])
        self.leaf_v1 = self.pipeline.build("leaf-v1", current=[(MODEL, "1")])
        self.leaf_v2 = self.pipeline.build("leaf-v2", current=[(MODEL, "2")])
        self.frames = [make_frame(self.sigs.universe, candidates, seed=s) for s in range(4)]
        self.traffic: Traffic | None = None
        self.rows: list[dict[str, Any]] = []
        self._hosts_n, self._workers = hosts, workers
        self._canary_routes_all = canary_routes_all

    # -- set-up ---------------------------------------------------------------------------
    def _host_wrap(self, i: int) -> list[str]:
        if self.network is None:
            return []
        shm = self.workdir / f"h{i}-shm"
        shm.mkdir(exist_ok=True)
        shm.chmod(0o1777)
        return ["ip", "netns", "exec", self.network.hosts[i], "unshare", "-m", "--propagation",
                "private", "sh", "-c", f"mount --bind '{shm}' {SHM_DIR} && exec \"$@\"", "sh"]

    def start(self) -> Rehearsal:
        leaf_host = "0.0.0.0" if self.network else "127.0.0.1"
        for name, model in (("hf-a", MODEL), ("hf-b", MODEL), ("ads-a", STEADY),
                            ("ads-b", STEADY)):
            bundle = self.workdir / "leaves" / name / "module_info.json"
            bundle.parent.mkdir(parents=True, exist_ok=True)
            copy_bundle_atomically(self.leaf_v1 if model == MODEL else self.ads, bundle)
            self.leaf_bundles[name] = bundle
            self.leaves[name] = Leaf(name, bundle, self.workdir, [], leaf_host)
        for leaf in self.leaves.values():
            leaf.wait_ready()
        for i in range(self._hosts_n):
            addr = self.network.fabric_addr(i) if self.network else "127.0.0.1"
            hf = ["hf-a", "hf-b"] if i == 0 and self._canary_routes_all else ["hf-b"]
            routing = {MODEL: [self.leaves[n].url_from(addr) for n in hf],
                       STEADY: [self.leaves[n].url_from(addr) for n in ("ads-a", "ads-b")]}
            hdir = self.workdir / f"h{i}-bundles"
            bundles = {"homefeed": hdir / "homefeed" / "module_info.json",
                       "ads": hdir / "ads" / "module_info.json"}
            for bundle, src in (("homefeed", self.v1), ("ads", self.ads)):
                bundles[bundle].parent.mkdir(parents=True, exist_ok=True)
                copy_bundle_atomically(src, bundles[bundle])
            self.hosts.append(RootHost(
                f"root{i}", self.workdir, self.prefixes[i], bundles, routing, self._workers,
                self._host_wrap(i), "0.0.0.0" if self.network else "127.0.0.1",
                self.network.host_addr(i) if self.network else "127.0.0.1"))
        for host in self.hosts:
            host.wait_ready()
        self.traffic = Traffic(self.hosts, self.frames).start()
        return self

    def close(self) -> list[str]:
        """Stop everything; returns shm segments that were left (and removes them)."""
        if self.traffic is not None:
            self.traffic.stop()
        for host in self.hosts:
            host.stop()
        for leaf in self.leaves.values():
            leaf.stop()
        left = [str(p) for prefix in self.prefixes for p in segment_files(prefix)]
        for path in left:
            with contextlib.suppress(OSError):
                Path(path).unlink()
        return left

    # -- stage actions --------------------------------------------------------------------
    def leaf_addr(self) -> str:
        return self.network.fabric_addr(0) if self.network else "127.0.0.1"

    def roll_leaf(self, name: str, version: str) -> None:
        """Replace the replica's bundle (the new leaf version) and wait until it serves it."""
        copy_bundle_atomically(self.leaf_v2 if version == "2" else self.leaf_v1,
                               self.leaf_bundles[name])
        leaf = self.leaves[name]
        wait_for(lambda: leaf.serves(self.leaf_addr(), MODEL) == version, START_TIMEOUT,
                 f"{leaf.name} to serve v{version}", interval=0.05)

    def deploy(self, hosts: Sequence[int], source: Path) -> None:
        for i in hosts:
            self.hosts[i].deploy("homefeed", source)

    def canary_decision(self) -> dict[str, Any]:
        """Go / no-go from the canary root's own metrics (errors, skews, outcomes, bytes)."""
        m = self.hosts[0].metrics()
        errors = m.get("leaf_errors", 0.0)
        outcomes = {k.split("=", 1)[1]: v for k, v in m.items()
                    if k.startswith("targets:outcome=")}
        return {"go": errors == 0 and not outcomes.get("version_fallback"),
                "leaf_errors": errors, "outcomes": outcomes,
                "skew_resends": m.get("skew_resends", 0.0),
                "trimmed_vs_untrimmed": m.get("trimmed_bytes", 0.0) /
                max(1.0, m.get("untrimmed_bytes", 0.0))}

    # -- measuring ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for host in self.hosts:
            for k, v in host.metrics().items():
                if not k.startswith("leaf_version:"):
                    total[k] = total.get(k, 0.0) + v
        for leaf in self.leaves.values():
            stats = leaf.stats(self.leaf_addr())
            for k in ("scored_with_missing", "refused_skew"):
                total["leaf_" + k] = total.get("leaf_" + k, 0.0) + stats[k]
        return total

    def learned(self) -> list[str]:
        """Every worker's learned leaf versions, ``host model endpoint version``."""
        out = []
        for host in self.hosts:
            for key in host.metrics():
                if key.startswith("leaf_version:"):
                    out.append(f"{host.name} {key.removeprefix('leaf_version:')}")
        return sorted(out)

    def run(self, stages: Sequence[Stage], settle: Callable[[str], None] | None = None
            ) -> list[dict[str, Any]]:
        assert self.traffic is not None, "start() first"
        for stage in stages:
            before = self.snapshot()
            self.traffic.stage = stage.name
            t0 = time.monotonic()
            stage.action()
            self._wait_requests(stage.name)
            self.traffic.stage = f"{stage.name} (end)"
            after = self.snapshot()
            self.rows.append(self._row(stage, before, after, time.monotonic() - t0))
            if settle is not None:
                settle(stage.name)
        return self.rows

    def _wait_requests(self, stage: str) -> None:
        traffic = self.traffic
        assert traffic is not None
        wait_for(lambda: traffic.count(stage) >= self.stage_requests, START_TIMEOUT,
                 f"{self.stage_requests} requests in stage {stage}")

    def _row(self, stage: Stage, before: dict[str, float], after: dict[str, float],
             seconds: float) -> dict[str, Any]:
        assert self.traffic is not None
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        tally = self.traffic.tallies.get(stage.name, Tally())
        lat = sorted(tally.latencies)
        p99 = lat[min(len(lat) - 1, int(P99 * len(lat)))] * 1e3 if lat else 0.0
        untrimmed = d.get("untrimmed_bytes", 0.0)
        model_untrimmed = d.get(f"untrimmed_bytes:{MODEL}", 0.0)
        return {"stage": stage.name, "command": stage.command, "requests": tally.requests,
                "errors": tally.errors, "error_samples": tally.error_samples,
                "under_sent": int(d.get("leaf_scored_with_missing", 0)),
                "skew_round_trips": int(d.get("skew_resends", 0)),
                "learned_changes": int(d.get("leaf_version_changes", 0)),
                "endpoints_changed": stage.changed,
                "bytes_sent": int(d.get("sent_bytes", 0)), "bytes_untrimmed": int(untrimmed),
                "sent_vs_untrimmed": d.get("sent_bytes", 0.0) / untrimmed if untrimmed else 0.0,
                f"{MODEL}_sent_vs_untrimmed": d.get(f"sent_bytes:{MODEL}", 0.0) /
                model_untrimmed if model_untrimmed else 0.0,
                "p99_ms": round(p99, 2), "seconds": round(seconds, 2)}


def article_stages(r: Rehearsal) -> list[Stage]:
    """The article's sequence across root hosts: root configs to the canary host, v2 to one
    leaf replica, a canary decision, root configs to the other hosts, v2 to every replica,
    then a rollback of both (leaves first, then root configs)."""
    pending = r.pipeline.build("root-v1-v2pending", current=[(MODEL, "1")],
                               pending=[(MODEL, "2")])
    others = list(range(1, len(r.hosts)))
    decision: dict[str, Any] = {}

    def decide() -> None:
        decision.update(r.canary_decision())
        if not decision["go"]:
            raise StackError(f"canary says no-go: {decision}")
    stages = [
        Stage("steady", "-", lambda: None),
        Stage("1 root configs -> canary host",
              f"trimmer-bundle build -o homefeed.json --entry {MODEL} 1 ... --pending-entry "
              f"{MODEL} 2 ...; deploy to root0",
              lambda: r.deploy([0], pending)),
        Stage("2 v2 -> one leaf replica", "deploy leaf hf-a at v2",
              lambda: r.roll_leaf("hf-a", "2"), changed=1),
        Stage("3 canary decision", "read root0 /metrics: leaf errors, skews, bytes", decide),
        Stage("4 root configs -> other hosts", "deploy homefeed.json to root1, root2",
              lambda: r.deploy(others, pending)),
        Stage("5 v2 -> every replica", "deploy leaf hf-b at v2",
              lambda: r.roll_leaf("hf-b", "2"), changed=1),
        Stage("6 rollback: leaves -> v1", "deploy leaves hf-a, hf-b at v1",
              lambda: [r.roll_leaf(n, "1") for n in ("hf-a", "hf-b")], changed=2),
        Stage("7 rollback: root configs", "deploy the previous homefeed.json (v1) to every "
              "root", lambda: r.deploy(range(len(r.hosts)), r.v1)),
    ]
    r.decision = decision  # type: ignore[attr-defined]
    return stages


def single_root_stages(r: Rehearsal) -> list[Stage]:
    """The issue's four stages on one root and one leaf: v2 pending while the leaf serves
    v1; the leaf moves to v2; the root promotes v2; the rollback (as the runbook orders it
    after a promotion: the root demotes v2 -- pending again -- then the leaf goes back to
    v1)."""
    pending = r.pipeline.build("root-v1-v2pending", current=[(MODEL, "1")],
                               pending=[(MODEL, "2")])
    promoted = r.pipeline.promote(pending, "root-v1-v2")
    return [
        Stage("steady (v1)", "-", lambda: None),
        Stage("a v2 pending, leaf v1", "trimmer-bundle build --entry ... --pending-entry "
              f"{MODEL} 2 ...", lambda: r.deploy([0], pending)),
        Stage("b leaf -> v2", "deploy the leaf at v2", lambda: r.roll_leaf("hf-b", "2"),
              changed=1),
        Stage("c root promotes v2", "trimmer-bundle promote homefeed.json",
              lambda: r.deploy([0], promoted)),
        Stage("d rollback: demote v2, leaf -> v1", "trimmer-bundle promote --demote "
              f"homefeed.json {MODEL}@2; deploy the leaf at v1",
              lambda: (r.deploy([0], pending), r.roll_leaf("hf-b", "1")), changed=1),
    ]


def verdict(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The targets, per stage: 0 errors, 0 under-sent frames, skew round trips <= the
    learned changes (each costs at most one) and <= the leaf endpoints changed (over every
    root host and worker), bytes sent / untrimmed within 10 % of the steady state."""
    steady = rows[0]["sent_vs_untrimmed"]
    out = []
    for row in rows:
        bound = row["endpoints_changed"]
        checks = {
            "errors": row["errors"] == 0,
            "under_sent": row["under_sent"] == 0,
            "skew_le_changes": row["skew_round_trips"] <= row["learned_changes"],
            "skew_le_endpoints": row["skew_round_trips"] <= bound,
            "bytes": abs(row["sent_vs_untrimmed"] / steady - 1) <= BYTES_TOLERANCE
            if steady else False,
        }
        out.append({"stage": row["stage"], "bytes_vs_steady": round(
            row["sent_vs_untrimmed"] / steady, 3) if steady else None,
            "skew_bound": bound, "met": all(checks.values()), "checks": checks})
    return {"stages": out, "all_met": all(s["met"] for s in out)}


def table(rows: Sequence[dict[str, Any]], checks: dict[str, Any] | None = None) -> str:
    """The per-stage table (plain text, for people)."""
    head = ("stage", "requests", "errors", "under-sent", "skew RTs", "changes",
            "sent/untrimmed", "vs steady", f"{MODEL} only", "p99 ms")
    lines = [head]
    for i, row in enumerate(rows):
        vs = checks["stages"][i]["bytes_vs_steady"] if checks else None
        lines.append((row["stage"], str(row["requests"]), str(row["errors"]),
                      str(row["under_sent"]), str(row["skew_round_trips"]),
                      str(row["learned_changes"]), f"{row['sent_vs_untrimmed']:.3f}",
                      f"{vs:.3f}" if vs is not None else "-",
                      f"{row[f'{MODEL}_sent_vs_untrimmed']:.3f}", f"{row['p99_ms']:.1f}"))
    widths = [max(len(line[c]) for line in lines) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(line, widths, strict=True)))
                     for line in lines)


@contextlib.contextmanager
def rehearsal(**kwargs: Any) -> Iterator[Rehearsal]:
    """A started :class:`Rehearsal` in a fresh directory; everything stopped and removed on
    exit (a leftover shm segment raises :class:`StackError`)."""
    workdir = Path(tempfile.mkdtemp(prefix="ftrollout-"))
    r = None
    try:
        r = Rehearsal(workdir, **kwargs)
        r.start()
        yield r
    finally:
        left = r.close() if r is not None else []
        shutil.rmtree(workdir, ignore_errors=True)
        if left:
            raise StackError(f"shared-memory segments left behind: {left}")
