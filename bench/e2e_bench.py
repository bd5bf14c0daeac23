"""End-to-end benchmark: the real pool vs a minimal root, off / lz4 / trim / trim+lz4, and a
shaped 1 Gbit/s link (issues #4, #9).

    python bench/e2e_bench.py [--candidates 64] [--clients 4] [--duration 4] [--rounds 3]
                              [--frames 32] [--configs off,lz4,...] [--shaped auto|off]
                              [--baseline TREE] [--strace]
    make bench-e2e                                # the same, with BENCH_ARGS="..." if wanted

The stack of ``make demo`` (:mod:`root_worker.testing.stack`): one ``trimmer-daemon``
publishing the example bundles, three ``trimmer-leaf`` processes (ads_ctr, ads_cvr,
homefeed_rank). The daemon and the leaves stay up for the whole run; the root is restarted
for every configuration:

    off       pool   FT_MODE=off  FT_LZ4=0  untrimmed frame to every leaf (the baseline)
    lz4       pool   FT_MODE=off  FT_LZ4=1  untrimmed, lz4-compressed (the article's lever)
    trim      pool   FT_MODE=trim FT_LZ4=0  each leaf gets its model's features only
    trim+lz4  pool   FT_MODE=trim FT_LZ4=1  both
    min-off   bench/minimal_root.py --mode off    the yardstick: a pre-forked raw-socket
    min-trim  bench/minimal_root.py --mode trim   root doing only the unavoidable work

"pool" is the real gunicorn pool (2 workers, ``--worker-class``, default the event worker).
The minimal root (2 forked workers) reads the body with ``recv_into`` into a reused buffer,
uses the project's own peek / map view / trim, sends with ``sendmsg`` on kept-alive sockets
and parses the leaves' JSON -- no deadlines, limits or metrics. The ratio of root CPU per
request, pool / minimal, is the HTTP-layer overhead the pool adds (target <= 1.2); trim / off
of the pool is what trimming saves the root (target <= 0.7).

Workload (production-shaped, ``examples/``): a 2000-feature union (55% float32 scalars, 15%
int64 ids, 15% float16 embeddings of 16 values, 15% ragged id lists); each of the three
models uses ~31% of it. Every request is one frame of ``--candidates`` candidates carrying
the whole union and naming all three models (one fan-out of 3). **Frames are distinct**:
``--frames`` (default 32) frames of different seeds, so the ragged columns' sizes -- and so
the block tables -- differ from request to request, more than the trimmer's size plans per
layout: every trim takes the per-request table path, as production traffic does (a bench
that cycles a handful of frames measures a cache hit).

Method: ``--clients`` closed-loop client threads (one kept-alive connection each) send
requests for ``--duration`` seconds after ``--warmup`` seconds, per configuration; the
configurations run ``--rounds`` times in rotated order (the machine is shared, so drift hits
all of them alike) and the rounds are pooled: throughput = requests / seconds measured,
p50/p99 over all measured latencies (client-side, whole request). Wire bytes per request are
root->leaf body bytes (``bytes_sent``), checked against the leaves' ``/stats``. Per-process
CPU time (``/proc/<pid>/stat``: utime + stime of the root's master and workers, of the
leaves, of the daemon, of this process for the client) over the measured windows gives CPU
per request. The root's share is also split into user and system time with its context
switches (``/proc/<pid>/status``), and ``--strace`` (a separate run: tracing slows the
workers) counts its system calls per request: where a pool's extra cost over the minimal
root lies, in the kernel or in its own Python.

Shaped link (``--shaped auto``, the default, when network namespaces work; root only): two
network namespaces with unique names and a veth pair between them, each end shaped with
``tc qdisc ... tbf rate 1gbit``; root pool, client and daemon in one, the leaves (bound to
the veth address) in the other; off and trim run again. Targets: trim/off throughput >= 0.95
of the byte bound (untrimmed / trimmed bytes per request), p99 trim/off <= 0.45. Both
namespaces (and so the veth pair and its qdiscs) are deleted at the end, also on Ctrl-C and
on failure; without namespaces the mode is skipped with a message.

Honest shape of this machine: client, root, leaves and daemon share the same cores (2 on
the reference machine), so on loopback throughput is bounded by the *total* CPU all of them
need per request, and the Python reference leaves take most of it; root CPU per request is
the figure the root controls. The shaped link makes the wire the bound, as in production.

Writes bench/results/e2e_bench.json. Every process, shm segment and namespace is removed at
exit (also on Ctrl-C and on failure).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lz4.frame

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report import RESULTS_DIR, write_results  # noqa: E402

from flatbuffers_schema.keys import Allowlist  # noqa: E402
from root_worker.frame import Trimmer, decode  # noqa: E402
from root_worker.leaf.model import LeafModel  # noqa: E402
from root_worker.testing.client import Client  # noqa: E402
from root_worker.testing.stack import (  # noqa: E402
    EXAMPLE_LEAVES,
    Proc,
    Stack,
    StackError,
    child_pids,
    shm_segments,
    wait_for,
)
from root_worker.testing.workload import load_universe, make_frame  # noqa: E402

RESULTS = RESULTS_DIR / "e2e_bench.json"
CONFIGS = {  # name -> (root, FT_MODE, FT_LZ4); root "pool" is gunicorn, "minimal" the yardstick
    "off": ("pool", "off", False),
    "lz4": ("pool", "off", True),
    "trim": ("pool", "trim", False),
    "trim+lz4": ("pool", "trim", True),
    "min-off": ("minimal", "off", False),
    "min-trim": ("minimal", "trim", False),
    "base-off": ("base", "off", False),     # only with --baseline: the same pool, run from
    "base-trim": ("base", "trim", False),   # another checkout (before/after in one run)
}
SHAPED_CONFIGS = ["off", "trim"]
TARGETS = ["ads_ctr", "ads_cvr", "homefeed_rank"]
N_FRAMES = 32  # distinct frames (seeds): more than the trimmer's size plans per layout
TICK = os.sysconf("SC_CLK_TCK")
TARGET_THROUGHPUT_X, TARGET_WIRE_REDUCTION = 1.5, 0.65
TARGET_POOL_VS_MINIMAL, TARGET_TRIM_VS_OFF_CPU = 1.2, 0.7
TARGET_SHAPED_BOUND, TARGET_SHAPED_P99 = 0.95, 0.45
SHAPED_RATE = "1gbit"


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_split(pids: Sequence[int]) -> dict[str, float]:
    """utime, stime (s) and voluntary / involuntary context switches summed over ``pids``
    (a process that is gone counts 0): where a root's CPU goes, kernel or Python."""
    out = {"user": 0.0, "sys": 0.0, "ctx_voluntary": 0.0, "ctx_involuntary": 0.0}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out["user"] += int(fields[11]) / TICK
        out["sys"] += int(fields[12]) / TICK
        for line in status:
            key, _, value = line.partition(":")
            if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                out["ctx_voluntary" if key[0] == "v" else "ctx_involuntary"] += int(value)
    return out


class Strace:
    """``strace -c -f`` attached to a root's workers for one measured window (``--strace``):
    system calls by name. It slows what it traces: a window it watched measures calls,
    not CPU."""

    def __init__(self, pids: Sequence[int], path: Path) -> None:
        self.path = path
        cmd = ["strace", "-c", "-f", "-o", str(path)]
        for pid in pids:
            cmd += ["-p", str(pid)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> dict[str, int]:
        """Detach and return calls per syscall."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        calls: dict[str, int] = {}
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return calls
        for line in lines:  # % time, seconds, usecs/call, calls, [errors,] syscall
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                calls[parts[-1]] = calls.get(parts[-1], 0) + int(parts[3])
        return calls


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return total - idle, total


@dataclass
class Window:
    """What one configuration did in one measured window."""

    config: str
    seconds: float
    latencies: list[float] = field(default_factory=list)
    wire: list[int] = field(default_factory=list)   # root->leaf bytes per request
    errors: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # per target; +fallback
    leaf_bytes: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    busy: float = 0.0
    root_split: dict[str, float] = field(default_factory=dict)  # cpu_split of the root
    syscalls: dict[str, int] = field(default_factory=dict)      # --strace: the root's

    @property
    def requests(self) -> int:
        return len(self.latencies)


class Load:
    """``clients`` closed-loop threads; each records only while ``recording`` is set."""

    def __init__(self, url: str, frames: Sequence[bytes], clients: int) -> None:
        self.url, self.frames = url, frames
        self.recording = threading.Event()
        self.stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, k: int) -> None:
        with Client(self.url, timeout=30) as c:
            i = k
            while not self.stop.is_set():
                frame = self.frames[i % len(self.frames)]
                i += 1
                t0 = time.perf_counter()
                try:
                    status, doc = c.score(frame)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    status, doc = 0, {"error": f"{type(exc).__name__}: {exc}"}
                dt = time.perf_counter() - t0
                ok = status == 200 and all(t["status"] == "ok" for t in doc["targets"])
                if not self.recording.is_set():
                    continue
                with self._lock:
                    if ok:
                        self.samples.append((dt, sum(t["bytes_sent"] for t in doc["targets"])))
                        for t in doc["targets"]:
                            self.outcomes[t["outcome"]] += 1
                            if t.get("fallback"):  # trimmer failed, sent untrimmed
                                self.outcomes[f"fallback {t['fallback']}"] += 1
                    else:
                        self.errors.append(str(doc)[:300])

    def take(self) -> tuple[list[tuple[float, int]], list[str], Counter[str]]:
        with self._lock:
            out, errs, outcomes = self.samples, self.errors, self.outcomes
            self.samples, self.errors, self.outcomes = [], [], Counter()
        return out, errs, outcomes


def measure(stack: Stack, pool: Any, config: str, frames: Sequence[bytes],
            args: argparse.Namespace, leaves: Sequence[Any]) -> Window:
    procs = {"root": [pool.pid, *pool.worker_pids()],
             "leaves": [leaf.pid for leaf in leaves],
             "daemon": [stack.daemon.pid] if stack.daemon else []}
    with Load(pool.url, frames, args.clients) as load:
        time.sleep(args.warmup)
        stack.check_alive()
        leaf0 = sum(leaf.stats()["bytes_received"] for leaf in leaves)
        cpu0 = {k: sum(cpu_seconds(p) for p in pids) for k, pids in procs.items()}
        cpu0["client"] = self_cpu()
        split0 = cpu_split(procs["root"])
        busy0, total0 = machine_busy()
        tracer = Strace(procs["root"][1:], stack.workdir / f"strace-{config}-"
                        f"{secrets.token_hex(4)}.txt") if args.strace else None
        t0 = time.monotonic()
        load.recording.set()
        time.sleep(args.duration)
        load.recording.clear()
        seconds = time.monotonic() - t0
        syscalls = tracer.stop() if tracer is not None else {}
        busy1, total1 = machine_busy()
        cpu1 = {k: sum(cpu_seconds(p) for p in pids) for k, pids in procs.items()}
        cpu1["client"] = self_cpu()
        split1 = cpu_split(procs["root"])
        samples, errors, outcomes = load.take()
    # requests still in flight when recording stopped were not counted, but the leaves
    # saw their bytes: the leaf counter is read after the clients stopped, so it is a
    # cross-check (>=), not an exact figure
    leaf1 = sum(leaf.stats()["bytes_received"] for leaf in leaves)
    w = Window(config, seconds, [s[0] for s in samples], [s[1] for s in samples],
               len(errors), outcomes, leaf1 - leaf0,
               {k: cpu1[k] - cpu0[k] for k in cpu1},
               (busy1 - busy0) / max(1, total1 - total0),
               {k: split1[k] - split0[k] for k in split1}, syscalls)
    if errors:
        print(f"    {config}: {len(errors)} failed requests, e.g. {errors[0]}",
              file=sys.stderr)
    return w


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def summarize(windows: Sequence[Window]) -> dict[str, Any]:
    lat = [x for w in windows for x in w.latencies]
    wire = [x for w in windows for x in w.wire]
    secs = sum(w.seconds for w in windows)
    n = len(lat)
    cpu = {k: sum(w.cpu.get(k, 0.0) for w in windows) for k in ("client", "root", "leaves",
                                                              "daemon")}
    return {
        "requests": n, "seconds": round(secs, 3), "errors": sum(w.errors for w in windows),
        "target_outcomes": dict(sum((w.outcomes for w in windows), Counter())),
        "throughput_rps": n / secs if secs else 0.0,
        "p50_ms": pct(lat, 0.50) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
        "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"),
        "wire_bytes_per_request": statistics.fmean(wire) if wire else 0.0,
        "leaf_bytes_received": sum(w.leaf_bytes for w in windows),
        # the leaves' own count per measured request (includes requests in flight at the
        # window's edges, so slightly above wire_bytes_per_request)
        "leaf_bytes_per_request": sum(w.leaf_bytes for w in windows) / n if n else 0.0,
        "cpu_ms_per_request": {k: v / n * 1e3 if n else 0.0 for k, v in cpu.items()},
        # the root's CPU split: user (Python, numpy, the C engine) vs system (the kernel's
        # sends, receives, epoll), and context switches, per request
        "root_split_per_request": {
            k: (sum(w.root_split.get(k, 0.0) for w in windows) / n
                * (1e3 if k in ("user", "sys") else 1) if n else 0.0)
            for k in ("user", "sys", "ctx_voluntary", "ctx_involuntary")},
        "root_syscalls_per_request": {
            name: round(sum(w.syscalls.get(name, 0) for w in windows) / n, 2)
            for name in sorted({s for w in windows for s in w.syscalls},
                               key=lambda s: -sum(w.syscalls.get(s, 0) for w in windows))
        } if n and any(w.syscalls for w in windows) else {},
        "machine_busy": statistics.fmean(w.busy for w in windows),
        # CPU of processes that are not part of the benchmark (others sharing the machine)
        "other_load": max(0.0, statistics.fmean(w.busy for w in windows)
                          - sum(cpu.values()) / (secs * (os.cpu_count() or 1))),
        "rounds": [{"requests": w.requests, "seconds": round(w.seconds, 3),
                    "throughput_rps": round(w.requests / w.seconds, 2),
                    "p99_ms": round(pct(w.latencies, 0.99) * 1e3, 2),
                    "root_cpu_ms": round(w.cpu["root"] / max(1, w.requests) * 1e3, 3),
                    "other_load": round(max(0.0, w.busy - sum(w.cpu.values()) /
                                            (w.seconds * (os.cpu_count() or 1))), 3)}
                   for w in windows],
    }


def median_ms(fn: Any, n: int = 15) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def component_costs(frame: bytes, examples: Path) -> dict[str, float]:
    """In-process, one core, no HTTP: what one leaf request and one root trim cost for the
    ads_ctr leaf on this frame, untrimmed vs trimmed (a breakdown of the leaf CPU below)."""
    doc = json.loads((examples / "bundles" / "ads" / "module_info.json").read_text())
    names = doc["ads_ctr"][0]["input_names"]
    allowlist = Allowlist.from_names(names)
    trimmer, out = Trimmer(), bytearray(len(frame))
    trimmed = bytes(trimmer.trim(frame, allowlist, out=out).data)
    model = LeafModel.build("ads_ctr", "1", names)
    packed = lz4.frame.compress(frame)
    return {
        "leaf_decode_untrimmed_ms": median_ms(lambda: decode(frame)),
        "leaf_decode_trimmed_ms": median_ms(lambda: decode(trimmed)),
        "leaf_score_ms": median_ms(lambda: model.score(decode(trimmed)))
        - median_ms(lambda: decode(trimmed)),
        "leaf_lz4_decompress_untrimmed_ms": median_ms(lambda: lz4.frame.decompress(packed)),
        "root_lz4_compress_untrimmed_ms": median_ms(lambda: lz4.frame.compress(frame)),
        "root_trim_ms": median_ms(lambda: trimmer.trim(frame, allowlist, out=out)),
    }


def lz4_saving(frames: Sequence[bytes]) -> float:
    raw = sum(len(f) for f in frames)
    return 1 - sum(len(lz4.frame.compress(f)) for f in frames) / raw


def render(results: dict[str, dict[str, Any]]) -> list[str]:
    base = results["off"]
    lines = [f"{'config':<9} {'req/s':>7} {'x off':>6} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'p99/off':>7} {'wire KB/req':>11} {'wire -%':>7}   "
             f"{'CPU ms/req: client':>18} {'root':>6} {'leaves':>6}  {'busy':>4} {'other':>5}"]
    for name, r in results.items():
        c = r["cpu_ms_per_request"]
        x = r["throughput_rps"] / base["throughput_rps"]
        lines.append(
            f"{name:<9} {r['throughput_rps']:>7.1f} {x:>5.2f}x"
            f" {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['p99_ms'] / base['p99_ms']:>7.2f}"
            f" {r['wire_bytes_per_request'] / 1e3:>11.0f}"
            f" {1 - r['wire_bytes_per_request'] / base['wire_bytes_per_request']:>7.1%}   "
            f"{c['client']:>18.1f} {c['root']:>6.1f} {c['leaves']:>6.1f}  "
            f"{r['machine_busy']:>4.0%} {r['other_load']:>5.0%}")
    return lines


def cpu_per_request(r: dict[str, Any]) -> float:
    """CPU ms of all the benchmark's processes per request (client + root + leaves +
    daemon): on a machine where they share the cores this bounds the throughput, and unlike
    requests/s it does not move when other processes take CPU."""
    return float(sum(r["cpu_ms_per_request"].values()))


def root_cpu(r: dict[str, Any]) -> float:
    return float(r["cpu_ms_per_request"]["root"])


def round_ratios(a: dict[str, Any], b: dict[str, Any], key: str = "root_cpu_ms"
                 ) -> dict[str, float]:
    """Median and range of a/b over the rounds (round k of both ran in the same rotation,
    so drift of the shared machine hits them alike)."""
    ratios = [x[key] / y[key] for x, y in zip(a["rounds"], b["rounds"], strict=False)
              if y[key]]
    if not ratios:
        return {}
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3)}


def verdict(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    off, trim = results["off"], results["trim"]
    x = trim["throughput_rps"] / off["throughput_rps"]
    red = 1 - trim["wire_bytes_per_request"] / off["wire_bytes_per_request"]
    v: dict[str, Any] = {
        "trim_throughput_x": round(x, 3),
        "trim_p99_ratio": round(trim["p99_ms"] / off["p99_ms"], 3),
        "trim_wire_reduction": round(red, 4),
        "trim_cpu_capacity_x": round(cpu_per_request(off) / cpu_per_request(trim), 3),
        "throughput_target_met": x >= TARGET_THROUGHPUT_X,
        "p99_target_met": trim["p99_ms"] < off["p99_ms"],
        "wire_target_met": red >= TARGET_WIRE_REDUCTION,
        "root_cpu_ms": {k: round(root_cpu(r), 3) for k, r in results.items()},
        "root_cpu_trim_vs_off": round(root_cpu(trim) / root_cpu(off), 3),
        "root_cpu_trim_vs_off_rounds": round_ratios(trim, off),
    }
    v["root_cpu_trim_vs_off_target_met"] = v["root_cpu_trim_vs_off"] <= TARGET_TRIM_VS_OFF_CPU
    for mode in ("off", "trim"):
        if f"min-{mode}" in results:
            ratio = root_cpu(results[mode]) / root_cpu(results[f"min-{mode}"])
            v[f"pool_vs_minimal_root_cpu_{mode}"] = round(ratio, 3)
            v[f"pool_vs_minimal_root_cpu_{mode}_rounds"] = round_ratios(
                results[mode], results[f"min-{mode}"])
            v[f"pool_vs_minimal_{mode}_target_met"] = ratio <= TARGET_POOL_VS_MINIMAL
    for mode in ("off", "trim"):
        if f"base-{mode}" in results:  # this checkout / the --baseline checkout
            v[f"root_cpu_vs_baseline_{mode}"] = round(
                root_cpu(results[mode]) / root_cpu(results[f"base-{mode}"]), 3)
            v[f"root_cpu_vs_baseline_{mode}_rounds"] = round_ratios(results[mode],
                                                                    results[f"base-{mode}"])
    if "min-off" in results and "min-trim" in results:
        # The yardstick's own trim / off: what trimming saves a root that does only the
        # unavoidable work (receiving the frame, sending, parsing the answers): the floor
        # under the pool's ratio on this machine and link.
        mt, mo = results["min-trim"], results["min-off"]
        v["minimal_root_cpu_trim_vs_off"] = round(root_cpu(mt) / root_cpu(mo), 3)
        v["minimal_root_cpu_trim_vs_off_rounds"] = round_ratios(mt, mo)
    return v


def shaped_verdict(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    off, trim = results["off"], results["trim"]
    bound = off["wire_bytes_per_request"] / trim["wire_bytes_per_request"]
    x = trim["throughput_rps"] / off["throughput_rps"]
    p99 = trim["p99_ms"] / off["p99_ms"]
    return {"throughput_x_rounds": round_ratios(trim, off, "throughput_rps"),
            "p99_ratio_rounds": round_ratios(trim, off, "p99_ms"), "link": SHAPED_RATE,
            "byte_bound_x": round(bound, 3), "trim_throughput_x": round(x, 3),
            "throughput_of_bound": round(x / bound, 3),
            "throughput_target_met": x / bound >= TARGET_SHAPED_BOUND,
            "trim_p99_ratio": round(p99, 3), "p99_target_met": p99 <= TARGET_SHAPED_P99,
            # root CPU where the wire is the bound (sends go out in part, as in production)
            "root_cpu_ms": {k: round(root_cpu(r), 3) for k, r in results.items()},
            "root_cpu_trim_vs_off": round(root_cpu(trim) / root_cpu(off), 3),
            "root_cpu_trim_vs_off_rounds": round_ratios(trim, off),
            "link_mbit_s": {k: round(r["throughput_rps"] * r["wire_bytes_per_request"] * 8
                                     / 1e6, 1) for k, r in results.items()}}


def sanity(results: dict[str, dict[str, Any]]) -> list[str]:
    """Problems that make the figures meaningless: failed requests, trim configurations
    whose targets were not all trimmed (a trimmer fallback sends untrimmed)."""
    out = []
    for name, r in results.items():
        expected = "trimmed" if CONFIGS[name][1] == "trim" else "off"
        odd = {k: v for k, v in r["target_outcomes"].items() if k != expected}
        if odd or r["errors"]:
            out.append(f"WARNING {name}: {r['errors']} failed requests, unexpected target "
                       f"outcomes {odd or 'none'}: its figures do not measure what they claim")
    return out


def source_state() -> str:
    """The commit measured, and whether the trim engine had uncommitted changes."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def where_the_time_goes(results: dict[str, dict[str, Any]], v: dict[str, Any]) -> str:
    lines = ["where the time goes (CPU ms per request, all processes on the same "
             f"{os.cpu_count()} CPUs):"]
    for name, r in results.items():
        c, total = r["cpu_ms_per_request"], cpu_per_request(r)
        lines.append(f"  {name:<9} {total:6.1f} ms = leaves {c['leaves'] / total:.0%}, root "
                     f"{c['root'] / total:.0%}, client {c['client'] / total:.0%}, daemon "
                     f"{c['daemon'] / total:.0%}")
    lines.append(f"  CPU per request off / trim = {v['trim_cpu_capacity_x']:.2f}x: the "
                 "throughput ratio a CPU-bound machine reaches when nothing else runs on it")
    return "\n".join(lines)


def root_breakdown(results: dict[str, dict[str, Any]]) -> str:
    """The root's CPU per request split into user and system time, its context switches
    and (``--strace``) its system calls: where a pool's extra cost over the minimal root
    lies, the kernel's or its own Python."""
    lines = ["root CPU split per request (user: Python, numpy and the C engine; sys: the "
             "kernel's sends, receives and polls):"]
    for name, r in results.items():
        s = r["root_split_per_request"]
        lines.append(f"  {name:<9} user {s['user']:5.2f} ms  sys {s['sys']:5.2f} ms  "
                     f"context switches {s['ctx_voluntary']:5.2f} voluntary, "
                     f"{s['ctx_involuntary']:5.2f} involuntary")
    for name, r in results.items():
        calls = r["root_syscalls_per_request"]
        if calls:
            top = ", ".join(f"{k} {v:g}" for k, v in list(calls.items())[:10])
            lines.append(f"  {name:<9} syscalls per request (strace -c): {top}")
    return "\n".join(lines)


class MinimalRoot(Proc):
    """``bench/minimal_root.py`` on a free port, with the interface measure() uses."""

    def __init__(self, name: str, stack: Stack, mode: str, routing: Path) -> None:
        self.address_file = stack.workdir / f"minimal-{name}-{secrets.token_hex(4)}.json"
        cmd = [sys.executable, str(ROOT / "bench" / "minimal_root.py"), "--shm-name",
               stack.prefix, "--routing", str(routing), "--mode", mode, "--address-file",
               str(self.address_file), "--workers", "2"]
        super().__init__(f"minimal root {name}", cmd, stack.workdir / f"minimal-{name}.log")
        self.url = ""

    def wait_ready(self) -> MinimalRoot:
        wait_for(lambda: (self.check_alive() or True) and self.address_file.exists() and
                 len(self.worker_pids()) == 2, 30, f"{self.name} to listen")
        self.url = json.loads(self.address_file.read_text())["addresses"][0]
        return self

    def worker_pids(self) -> set[int]:
        return child_pids(self.pid)


class ShapedLeaf(Proc):
    """A reference leaf inside the bench's leaf network namespace."""

    def __init__(self, name: str, netns: str, host: str, bundle: Path,
                 models: Sequence[str] | None, workdir: Path) -> None:
        self.port_file = workdir / f"shaped-leaf-{name}.port"
        cmd = ["ip", "netns", "exec", netns, sys.executable, "-m", "root_worker.leaf.server",
               "--bundle", str(bundle), "--host", host, "--port", "0", "--port-file",
               str(self.port_file), "--log-level", "WARNING"]
        for m in models or ():
            cmd += ["--model", m]
        super().__init__(f"shaped leaf {name}", cmd, workdir / f"shaped-leaf-{name}.log")
        self.host, self.url = host, ""

    def wait_ready(self) -> ShapedLeaf:
        wait_for(lambda: (self.check_alive() or True) and self.port_file.exists(), 30,
                 f"{self.name} to listen")
        self.url = f"http://{self.host}:{int(self.port_file.read_text())}"
        return self

    def stats(self) -> dict[str, Any]:
        with Client(self.url, timeout=10) as c:
            return c.json("GET", "/stats")[1]  # type: ignore[no-any-return]


def run_configs(stack: Stack, names: Sequence[str], frames: Sequence[bytes],
                args: argparse.Namespace, routing: Path, leaves: Sequence[Any],
                tag: str = "") -> dict[str, list[Window]]:
    """``args.rounds`` rounds of every configuration, in rotated order."""
    windows: dict[str, list[Window]] = {name: [] for name in names}
    names = list(names)
    for rnd in range(args.rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            kind, mode, lz4_on = CONFIGS[name]
            if kind == "minimal":
                root: Any = MinimalRoot(name, stack, mode, routing).wait_ready()
            else:
                # the other checkout first on sys.path (PYTHONSAFEPATH: -m must not put
                # the working directory, this checkout, before it)
                extra = {"PYTHONPATH": str(args.baseline), "PYTHONSAFEPATH": "1"} \
                    if kind == "base" else {}
                root = stack.start_pool(name, mode=mode, lz4=lz4_on, FT_ROUTING=str(routing),
                                        FT_THREADS=str(args.threads),
                                        FT_WORKER_CLASS=args.worker_class, **extra)
            try:
                w = measure(stack, root, name, frames, args, leaves)
            finally:
                if kind == "minimal":
                    root.stop()
                else:
                    stack.stop_pool(name)
            windows[name].append(w)
            print(f"  {tag}round {rnd + 1} {name:<9} {w.requests / w.seconds:7.1f} req/s  "
                  f"p99 {pct(w.latencies, 0.99) * 1e3:7.1f} ms  root CPU "
                  f"{w.cpu['root'] / max(1, w.requests) * 1e3:5.2f} ms/req  busy {w.busy:.0%}",
                  flush=True)
    return windows


def make_frames(args: argparse.Namespace) -> list[bytes]:
    universe = load_universe(args.examples / "features.json")
    return [make_frame(universe, args.candidates, seed=1000 + k, targets=TARGETS,
                       request_id=f"bench-{k}") for k in range(args.frames)]


def run_inner_shaped(args: argparse.Namespace) -> int:
    """Inside the root namespace: daemon + pools here, leaves in the leaf namespace."""
    frames = make_frames(args)
    stack = Stack.create("ftbshaped", args.examples)
    leaves: list[ShapedLeaf] = []
    try:
        for name, bundle, models in EXAMPLE_LEAVES:
            leaves.append(ShapedLeaf(name, args.leaf_netns, args.leaf_host,
                                     stack.bundles[bundle], models, stack.workdir))
        for leaf in leaves:
            leaf.wait_ready()
        routing = stack.workdir / "shaped-routing.json"
        routing.write_text(json.dumps({leaf.name.split()[-1]: [leaf.url] for leaf in leaves}))
        windows = run_configs(stack, args.configs, frames, args, routing, leaves, "shaped ")
    finally:
        for leaf in leaves:
            leaf.stop()
        stack.close()
    results = {name: summarize(ws) for name, ws in windows.items()}
    args.output.write_text(json.dumps({"results": results}) + "\n")
    return 0


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=30)


def shaped_run(args: argparse.Namespace) -> dict[str, Any]:
    """Leaves behind a veth pair shaped to 1 Gbit/s (tbf), root + client in their own
    namespace; both namespaces (and so the veth pair) are removed at the end, whatever
    happens. Returns the results, or {"skipped": why}."""
    if args.shaped == "off":
        return {"skipped": "--shaped off"}
    tag = secrets.token_hex(3)
    ns_root, ns_leaf = f"ftb{tag}r", f"ftb{tag}l"
    net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    created: list[str] = []
    try:
        try:
            for ns in (ns_root, ns_leaf):
                _ip("netns", "add", ns)
                created.append(ns)
        except (OSError, subprocess.SubprocessError) as exc:
            why = getattr(exc, "stderr", "") or str(exc)
            print(f"shaped-link mode skipped: cannot create network namespaces ({why.strip()})")
            return {"skipped": f"network namespaces unavailable: {why.strip()}"}
        _setup_link(ns_root, ns_leaf, f"ftb{tag}a", f"ftb{tag}b", net)
        out = args.output.with_name(f".shaped-{tag}.json")
        inner = [sys.executable, str(Path(__file__).resolve()), "--inner-shaped",
                 "--leaf-netns", ns_leaf, "--leaf-host", f"{net}.2", "--output", str(out),
                 "--configs", ",".join(SHAPED_CONFIGS), "--rounds", str(args.rounds),
                 "--duration", str(args.duration), "--warmup", str(args.warmup),
                 "--clients", str(args.clients), "--candidates", str(args.candidates),
                 "--frames", str(args.frames), "--worker-class", args.worker_class,
                 "--examples", str(args.examples)]
        print(f"shaped link: {SHAPED_RATE} tbf on veth {ns_root} <-> {ns_leaf} ({net}.0/30)",
              flush=True)
        rc = subprocess.run(["ip", "netns", "exec", ns_root, *inner], cwd=ROOT).returncode
        if rc != 0 or not out.exists():
            return {"skipped": f"the shaped run failed (exit {rc})"}
        results = json.loads(out.read_text())["results"]
        out.unlink()
        return {"results": results, "verdict": shaped_verdict(results),
                "link": {"rate": SHAPED_RATE, "qdisc": "tbf", "namespaces": [ns_root, ns_leaf]}}
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _setup_link(ns_root: str, ns_leaf: str, veth_root: str, veth_leaf: str,
                net: str) -> None:
    _ip("link", "add", veth_root, "netns", ns_root, "type", "veth", "peer", "name",
        veth_leaf, "netns", ns_leaf)
    for ns, dev, addr in ((ns_root, veth_root, f"{net}.1/30"), (ns_leaf, veth_leaf,
                                                                 f"{net}.2/30")):
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", addr, "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", ns, "link", "set", dev, "mtu", "1500")
        _ip("netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
            SHAPED_RATE, "burst", "1mb", "latency", "50ms")


def report_ratios(v: dict[str, Any]) -> None:
    for mode in ("off", "trim"):
        key = f"pool_vs_minimal_root_cpu_{mode}"
        if key in v:
            print(f"root CPU per request, pool / minimal root ({mode}): {v[key]:.2f}x pooled, "
                  f"per round {_range(v[key + '_rounds'])} (target <= "
                  f"{TARGET_POOL_VS_MINIMAL}: "
                  f"{'met' if v[f'pool_vs_minimal_{mode}_target_met'] else 'NOT met'})")
    print(f"root CPU per request, trim / off (pool): {v['root_cpu_trim_vs_off']:.2f} pooled, "
          f"per round {_range(v['root_cpu_trim_vs_off_rounds'])} (target "
          f"<= {TARGET_TRIM_VS_OFF_CPU}: "
          f"{'met' if v['root_cpu_trim_vs_off_target_met'] else 'NOT met'})")
    for mode in ("off", "trim"):
        key = f"root_cpu_vs_baseline_{mode}"
        if key in v:
            print(f"root CPU per request, this checkout / --baseline ({mode}): {v[key]:.2f}x "
                  f"pooled, per round {_range(v[key + '_rounds'])}")
    if "minimal_root_cpu_trim_vs_off" in v:
        print(f"root CPU per request, trim / off (minimal root, the floor): "
              f"{v['minimal_root_cpu_trim_vs_off']:.2f} pooled, per round "
              f"{_range(v['minimal_root_cpu_trim_vs_off_rounds'])}")


def _range(r: dict[str, float]) -> str:
    return f"median {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]" if r else "n/a"


def report_shaped(shaped: dict[str, Any]) -> None:
    if "results" not in shaped:
        print(f"shaped link: skipped ({shaped.get('skipped')})")
        return
    print(f"\nshaped link ({SHAPED_RATE} tbf between root and leaves):")
    print("\n".join(render(shaped["results"])))
    sv = shaped["verdict"]
    print(f"trim/off throughput {sv['trim_throughput_x']:.2f}x = {sv['throughput_of_bound']:.2f}"
          f" of the byte bound {sv['byte_bound_x']:.2f}x (target >= {TARGET_SHAPED_BOUND}: "
          f"{'met' if sv['throughput_target_met'] else 'NOT met'}); p99 trim/off "
          f"{sv['trim_p99_ratio']:.2f} (target <= {TARGET_SHAPED_P99}: "
          f"{'met' if sv['p99_target_met'] else 'NOT met'}); per round: throughput x "
          f"{_range(sv['throughput_x_rounds'])}, p99 ratio {_range(sv['p99_ratio_rounds'])}; "
          f"link use {sv['link_mbit_s']} Mbit/s")
    print(f"root CPU per request on the shaped link: {sv['root_cpu_ms']} ms; trim / off "
          f"{sv['root_cpu_trim_vs_off']:.2f}, per round "
          f"{_range(sv['root_cpu_trim_vs_off_rounds'])}")


def run(args: argparse.Namespace) -> int:
    frames = make_frames(args)
    saving = lz4_saving(frames[:4])
    shape = {"features": 2000, "candidates": args.candidates,
             "targets_per_request": len(TARGETS), "frame_bytes": len(frames[0]),
             "distinct_frames": len(frames), "lz4_saving_of_frame": round(saving, 4),
             "clients": args.clients, "root_workers": 2, "worker_class": args.worker_class,
             "leaves": 3, "duration_s": args.duration, "warmup_s": args.warmup,
             "rounds": args.rounds, "cpus": os.cpu_count()}
    print(f"workload: frame {len(frames[0]) / 1e6:.2f} MB ({args.candidates} candidates), "
          f"{len(frames)} distinct frames cycled, 3 targets per request; lz4 saves "
          f"{saving:.1%} of a frame")
    print(f"load: {args.clients} client threads, {args.rounds} x {args.duration:g} s per "
          f"configuration after {args.warmup:g} s warm-up; {os.cpu_count()} CPUs shared by "
          "client, root (2 workers), 3 leaves and the daemon")
    costs = component_costs(frames[0], args.examples)
    shape["component_costs_ms"] = {k: round(v, 3) for k, v in costs.items()}
    stack = Stack.create("ftbench", args.examples)
    try:
        windows = run_configs(stack, args.configs, frames, args, stack.routing,
                              list(stack.leaves.values()))
    finally:
        closed = stack.close()
    left = shm_segments(stack.prefix)
    shaped = shaped_run(args)
    results = {name: summarize(ws) for name, ws in windows.items()}
    print()
    print("\n".join(render(results)))
    v = verdict(results)
    print(f"\ntrim vs off: {v['trim_throughput_x']:.2f}x throughput, p99 ratio "
          f"{v['trim_p99_ratio']:.2f}, wire bytes -{v['trim_wire_reduction']:.1%}")
    report_ratios(v)
    print(where_the_time_goes(results, v))
    print(root_breakdown(results))
    if args.strace:
        print("note: --strace slows the traced workers: this run's CPU figures and ratios "
              "are not comparable with an untraced run")
    report_shaped(shaped)
    problems = sanity(results) + (sanity(shaped["results"]) if "results" in shaped else [])
    for line in problems:
        print(line)
    print(f"cleanup: shm segments of {stack.prefix} left: {left or 'none'}; processes "
          f"killed after the SIGTERM deadline: {closed.killed or 'none'}")
    doc = {"source": source_state(), "problems": problems,
           "shape": shape, "results": results, "verdict": v, "shaped": shaped,
           "note": "client, root, leaves and daemon share the machine's CPUs; root CPU per "
                   "request is from /proc/<pid>/stat of the root's master and workers"}
    write_results(args.output, "e2e", doc)
    return 0 if not left and not problems else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/e2e_bench.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--frames", type=int, default=N_FRAMES,
                   help="distinct frames cycled by the clients (default %(default)s)")
    p.add_argument("--threads", type=int, default=4, help="FT_THREADS (gthread pools)")
    p.add_argument("--worker-class", default="event", choices=("event", "gthread", "sync"))
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per window")
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default=",".join(c for c in CONFIGS if CONFIGS[c][0] != "base"),
                   help="comma-separated subset of %(default)s (must include off and trim)")
    p.add_argument("--shaped", choices=("auto", "off"), default="auto",
                   help="also run off/trim behind a 1 Gbit/s shaped veth (auto: when network "
                        "namespaces are available)")
    p.add_argument("--examples", type=Path, default=ROOT / "examples")
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--baseline", type=Path, metavar="TREE",
                   help="also run the pool from this checkout of another commit (its C "
                        "accelerator built in place), as base-off and base-trim: root CPU "
                        "before/after a change in one run. E.g. git worktree add /tmp/base "
                        "<commit> && (cd /tmp/base && python setup.py build_ext --inplace)")
    p.add_argument("--strace", action="store_true",
                   help="count each root's system calls per request (strace -c on its "
                        "workers during every measured window); slows them, so use a "
                        "separate run for CPU figures")
    p.add_argument("--inner-shaped", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--leaf-netns", help=argparse.SUPPRESS)
    p.add_argument("--leaf-host", help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    args.configs = [c for c in args.configs.split(",") if c]
    if args.strace and shutil.which("strace") is None:
        p.error("--strace needs strace (apt-get install strace)")
    if args.baseline is not None:
        args.configs += [c for c in ("base-off", "base-trim") if c not in args.configs]
    elif any(CONFIGS.get(c, ("",))[0] == "base" for c in args.configs):
        p.error("base-off and base-trim need --baseline TREE")
    if not {"off", "trim"} <= set(args.configs) or not set(args.configs) <= set(CONFIGS):
        p.error(f"--configs: a subset of {','.join(CONFIGS)} with off and trim")
    for sig in (signal.SIGINT, signal.SIGTERM):  # both unwind through the finally blocks
        signal.signal(sig, signal.default_int_handler)
    try:
        return run_inner_shaped(args) if args.inner_shaped else run(args)
    except StackError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; everything was stopped and cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
