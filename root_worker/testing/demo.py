"""``make demo`` and ``make run``: the whole stack on loopback.

``python -m root_worker.testing.demo`` (``make demo``) starts, in a temporary directory
(:mod:`root_worker.testing.stack`):

* ``trimmer-daemon`` with a unique shm prefix (``ftdemo_<random>``) and ``--cleanup``,
  publishing copies of ``examples/bundles/{ads,homefeed}``;
* three ``trimmer-leaf`` processes (ads_ctr, ads_cvr, homefeed_rank) on free ports, and a
  routing file naming them;
* two gunicorn root pools of 2 workers each on the same map and leaves: ``trim``
  (``FT_MODE=trim``, what is being shown) and ``off`` (``FT_MODE=off``, the untrimmed
  reference).

It then sends ``--requests`` frames (several targets each, some with an absent version) to
the trim pool from a few client threads, and each frame again to the off pool with the
targets pinned to the version the leaf used for the trimmed copy, and compares the scores.
Half way through it hot-swaps the homefeed bundle to ``examples/bundles/homefeed-v2`` (write
a temp file, rename it over the old one) and shows every trim worker moving to the new
generation. It prints a table (bytes untrimmed vs trimmed per model from ``/metrics``,
outcomes, generations per worker, the checks), stops everything and removes its shm
segments and temp directory -- also on Ctrl-C, SIGTERM and failure. Exit status 0 only if
every check passed.

With the Triton server installed (``make triton``; ``--triton auto``, the default, uses it
when it is there, ``--triton on`` requires it) a real ``tritonserver`` joins as a fourth
leaf: the test model repository (:mod:`root_worker.testing.triton`), a bundle built from it
with ``trimmer-bundle build --triton-repo`` and routes ``"protocol": "oip"``. After the main
traffic a few union frames go to both pools: the trim pool's v2 requests are answered 200,
the off pool's (every column of the union) are refused 400 by Triton -- for such a server
the trim is what makes the call valid.

``python -m root_worker.testing.demo run`` (``make run``) starts the same stack and keeps it up
until Ctrl-C, printing the URLs and sample commands.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from root_worker.testing.client import Client, metric_samples
from root_worker.testing.stack import (
    EXAMPLES_DIR,
    CloseReport,
    Stack,
    StackError,
    shm_segments,
)
from root_worker.testing.workload import load_universe, make_frame

MODELS = ("ads_ctr", "ads_cvr", "homefeed_rank")
TARGET_SETS: tuple[list[Any], ...] = (  # what the demo's frames ask for (in their metadata)
    ["ads_ctr", "ads_cvr", "homefeed_rank"],
    ["ads_ctr", "homefeed_rank"],
    ["ads_cvr", {"model": "homefeed_rank", "version": "1"}, "ads_ctr"],
    ["homefeed_rank", {"model": "ads_cvr", "version": "7"}],  # absent version: latest
    ["ads_ctr", "ads_cvr", "homefeed_rank"],
    ["ads_cvr", "homefeed_rank"],
)
SWAP_BUNDLE, SWAP_SOURCE = "homefeed", Path("bundles/homefeed-v2/module_info.json")
RECONNECT_EVERY = 8  # client connections are renewed so that both workers get traffic
M = "feature_trimmer_root_"


@dataclass
class Exchange:
    """One frame sent to the trim pool and again, untrimmed, to the off pool."""

    index: int
    trim: dict[str, Any]
    off: dict[str, Any] | None
    done_at: float


@dataclass
class Traffic:
    """Client threads sending the demo's frames; the hot swap fires half way."""

    trim_url: str
    off_url: str
    frames: list[bytes]
    n_requests: int
    clients: int
    swap_at: int
    exchanges: list[Exchange] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    swap_due: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._done = 0
        self._threads = [threading.Thread(target=self._run, name=f"client-{i}", daemon=True)
                         for i in range(self.clients)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        trim, off = Client(self.trim_url), Client(self.off_url)
        try:
            for n in itertools.count():
                i = next(self._next)
                if i >= self.n_requests or self.stop.is_set():
                    return
                if n and n % RECONNECT_EVERY == 0:
                    trim.close()
                    off.close()
                self._exchange(i, trim, off)
        except Exception as exc:  # a dead stack: report, let the main thread decide
            with self._lock:
                self.errors.append(f"client thread: {type(exc).__name__}: {exc}")
        finally:
            trim.close()
            off.close()

    def _exchange(self, i: int, trim: Client, off: Client) -> None:
        frame = self.frames[i % len(self.frames)]
        status, doc = trim.score(frame)
        off_doc = None
        if status in (200, 502) and "targets" in doc:
            pinned = [(t["model"], t.get("leaf_version") or t["requested_version"])
                      for t in doc["targets"]]
            off_status, off_doc = off.score(frame, pinned)
            if off_status != 200:
                self._error(f"request {i}: off pool answered {off_status}: {off_doc}")
        if status != 200:
            self._error(f"request {i}: trim pool answered {status}: {doc}")
        with self._lock:
            self.exchanges.append(Exchange(i, doc, off_doc, time.monotonic()))
            self._done += 1
            if self._done >= self.swap_at:
                self.swap_due.set()

    def until(self, done: Any, timeout: float) -> None:
        """More requests from this thread until ``done(exchanges)`` or ``timeout`` (a slow
        machine may finish the traffic before the leaf rolled out the new version)."""
        deadline = time.monotonic() + timeout
        with Client(self.trim_url) as trim, Client(self.off_url) as off:
            while not done(self.exchanges) and time.monotonic() < deadline:
                self._exchange(len(self.exchanges), trim, off)

    def _error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    warning: bool = False  # shown as [warn] when not ok, does not fail the demo


@dataclass
class SwapTimes:
    at: float = 0.0
    at_request: int = 0
    old_generation: int = 0
    new_generation: int = 0
    published_after: float | None = None


# -- analysis -------------------------------------------------------------------------------
def compare_scores(exchanges: Sequence[Exchange]) -> tuple[int, list[str], list[bool]]:
    """(targets compared, mismatches, skew): ``skew`` has one entry per target the leaf
    scored with another version than the one the root trimmed for (the root attached the
    new map before the leaf re-read its bundle), True where the root re-sent it untrimmed
    because the leaf refused the trimmed frame. Their scores are compared like the rest."""
    compared, bad, skew = 0, [], []
    for ex in exchanges:
        off_targets = (ex.off or {}).get("targets", [])
        for k, t in enumerate(ex.trim.get("targets", [])):
            if t["status"] != "ok":
                bad.append(f"request {ex.index} {t['model']}: trim target failed: "
                           f"{t.get('error')}")
                continue
            o = off_targets[k] if k < len(off_targets) else None
            if o is None or o["status"] != "ok":
                bad.append(f"request {ex.index} {t['model']}: untrimmed target failed: "
                           f"{o and o.get('error')}")
            elif t["version"] != t.get("leaf_version") and o["scores"] == t["scores"]:
                skew.append(t.get("fallback") == "version_skew_resent_untrimmed")
                compared += 1
            elif o.get("leaf_version") != t["leaf_version"] or o["scores"] != t["scores"]:
                bad.append(f"request {ex.index} {t['model']}: scores differ (trimmed "
                           f"v{t['leaf_version']} {t['scores'][:2]}..., untrimmed "
                           f"v{o.get('leaf_version')} {o['scores'][:2]}...)")
            else:
                compared += 1
    return compared, bad, skew


def per_model_from_metrics(text: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"untrimmed": 0, "trimmed": 0, "sent": 0, "outcomes": Counter()})
    for name, lbl, value in metric_samples(text):
        model = lbl.get("model")
        if model is None:
            continue
        if name == M + "targets_total":
            out[model]["outcomes"][lbl["outcome"]] += int(value)
        for key in ("untrimmed", "trimmed", "sent"):
            if name == f"{M}{key}_bytes_total":
                out[model][key] += int(value)
    return dict(out)


def per_model_from_responses(exchanges: Sequence[Exchange]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"untrimmed": 0, "trimmed": 0, "targets": 0, "versions": Counter()})
    for ex in exchanges:
        for t in ex.trim.get("targets", []):
            m = out[t["model"]]
            m["targets"] += 1
            m["untrimmed"] += t["bytes_untrimmed"]
            m["trimmed"] += t["bytes_trimmed"]
            if t.get("leaf_version") is not None:
                m["versions"][str(t["leaf_version"])] += 1
    return dict(out)


def generations_from_responses(exchanges: Sequence[Exchange]) -> dict[int, Counter[int]]:
    out: dict[int, Counter[int]] = defaultdict(Counter)
    for ex in exchanges:
        if "pid" in ex.trim:
            out[ex.trim["pid"]][ex.trim["generation"]] += 1
    return dict(out)


def _mb(n: float) -> str:
    return f"{n / 1e6:10.1f}"


def render_bytes_table(metrics: dict[str, dict[str, Any]],
                       responses: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"{'model':<15} {'targets':>7}  {'leaf versions':<14} {'untrimmed MB':>12} "
             f"{'trimmed MB':>10} {'reduction':>9}  outcomes"]
    total_u = total_t = total_n = 0
    for model in MODELS:
        m, r = metrics.get(model), responses.get(model)
        if m is None or r is None:
            lines.append(f"{model:<15} (no traffic)")
            continue
        n = sum(m["outcomes"].values())
        versions = " ".join(f"v{v}:{c}" for v, c in sorted(r["versions"].items()))
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(m["outcomes"].items()))
        red = 1 - m["trimmed"] / m["untrimmed"] if m["untrimmed"] else 0.0
        lines.append(f"{model:<15} {n:>7}  {versions:<14} {_mb(m['untrimmed']):>12} "
                     f"{_mb(m['trimmed']):>10} {red:>9.1%}  {outcomes}")
        total_u, total_t, total_n = total_u + m["untrimmed"], total_t + m["trimmed"], total_n + n
    red = 1 - total_t / total_u if total_u else 0.0
    lines.append(f"{'all models':<15} {total_n:>7}  {'':<14} {_mb(total_u):>12} "
                 f"{_mb(total_t):>10} {red:>9.1%}")
    return lines


# -- the demo -------------------------------------------------------------------------------
def build_frames(examples: Path, candidates: int) -> list[bytes]:
    universe = load_universe(examples / "features.json")
    return [make_frame(universe, candidates, seed=100 + k, targets=targets,
                       request_id=f"demo-{k}")
            for k, targets in enumerate(TARGET_SETS)]


def run_traffic(stack: Stack, traffic: Traffic, swap: SwapTimes, examples: Path,
                timeout: float) -> None:
    """Drive the traffic; hot-swap the homefeed bundle once half of it is done."""
    assert stack.daemon is not None
    swap.old_generation = stack.daemon.published_generation()
    traffic.start()
    deadline = time.monotonic() + timeout
    while not traffic.swap_due.wait(0.1):
        stack.check_alive()
        if not traffic.running() or time.monotonic() > deadline:
            raise StackError("the traffic stopped before the hot swap: "
                             + "; ".join(traffic.errors[:3]))
    swap.at_request = len(traffic.exchanges)
    swap.at = time.monotonic()
    stack.hot_swap(SWAP_BUNDLE, examples / SWAP_SOURCE)
    swap.new_generation = stack.daemon.wait_generation(above=swap.old_generation,
                                                       timeout=15)
    swap.published_after = time.monotonic() - swap.at
    if not traffic.join(max(1.0, deadline - time.monotonic())):
        traffic.stop.set()
        raise StackError(f"traffic did not finish within {timeout:g}s")
    traffic.until(lambda exchanges: any(
        t["model"] == "homefeed_rank" and t.get("leaf_version") == "2"
        for ex in exchanges[swap.at_request:] for t in ex.trim.get("targets", [])), 10.0)
    stack.check_alive()


def swap_report(traffic: Traffic, swap: SwapTimes) -> list[str]:
    first_new = min((ex.done_at for ex in traffic.exchanges
                     if ex.trim.get("generation", 0) >= swap.new_generation), default=None)
    first_v2 = min((ex.done_at for ex in traffic.exchanges for t in ex.trim.get("targets", [])
                    if t["model"] == "homefeed_rank" and t.get("leaf_version") == "2"),
                   default=None)

    def after(t: float | None) -> str:
        return "never" if t is None else f"{(t - swap.at) * 1e3:.0f} ms"
    return [f"hot swap after {swap.at_request} requests: bundle '{SWAP_BUNDLE}' replaced by "
            f"{SWAP_SOURCE.parent} (temp file + rename)",
            f"  daemon published generation {swap.new_generation} (was "
            f"{swap.old_generation}) {after(swap.at + (swap.published_after or 0))} later; "
            f"first answer on it {after(first_new)} later; the homefeed leaf scored "
            f"v2 {after(first_v2)} later"]


def worker_report(stack: Stack, traffic: Traffic, swap: SwapTimes
                  ) -> tuple[list[str], Check]:
    pool = stack.pools["trim"]
    try:
        health = pool.health_by_worker(lambda d: d["generation"] >= swap.new_generation)
        health_ok = True
    except StackError:
        health, health_ok = pool.health_by_worker(), False
    metric = pool.generation_by_pid()
    seen = generations_from_responses(traffic.exchanges)
    lines = [f"{'worker pid':>10}  {'answers by generation':<28} {'/healthz now':>12} "
             f"{'metric now':>10}"]
    for pid in sorted(set(health) | set(metric) | set(seen)):
        by_gen = "  ".join(f"g{g}: {n}" for g, n in sorted(seen.get(pid, Counter()).items()))
        hz = health.get(pid, {}).get("generation", "-")
        lines.append(f"{pid:>10}  {by_gen or '(none)':<28} {'g' + str(hz):>12} "
                     f"{'g' + str(metric.get(pid, '-')):>10}")
    live = pool.worker_pids()
    moved = (health_ok and live and set(health) >= live and set(metric) >= live
             and all(metric[p] == swap.new_generation for p in live)
             and all(health[p]["generation"] == swap.new_generation for p in live))
    return lines, Check(f"every worker moved to generation {swap.new_generation}",
                        bool(moved), f"{len(live)} workers, /healthz and per-pid metric")


def demo(args: argparse.Namespace, examples: Path) -> int:
    t0 = time.monotonic()
    frames = build_frames(examples, args.candidates)
    inst = triton_install(args.triton)
    stack = Stack.create("ftdemo", examples, keep_workdir=args.keep_workdir, triton=inst)
    checks: list[Check] = []
    try:
        print(f"stack: shm prefix {stack.prefix}, directory {stack.workdir}")
        trim = stack.start_pool("trim", mode="trim")
        off = stack.start_pool("off", mode="off")
        for name, leaf in stack.leaves.items():
            print(f"  leaf {name:<14} {leaf.url}")
        if stack.triton is not None:
            print(f"  leaf tritonserver {stack.triton.url} (tr_ctr, tr_rank: Open Inference "
                  "Protocol)")
        print(f"  root pool trim  {trim.url} (FT_MODE=trim, 2 workers)\n"
              f"  root pool off   {off.url} (FT_MODE=off: the untrimmed reference)")
        print(f"traffic: {args.requests} requests x {len(frames[0]) / 1e6:.2f} MB frames "
              f"({args.candidates} candidates, 2000 features), {args.clients} clients, "
              "each frame to both pools ...")
        traffic = Traffic(trim.url, off.url, frames, args.requests, args.clients,
                          swap_at=max(1, args.requests // 2))
        swap = SwapTimes()
        t_traffic = time.monotonic()
        run_traffic(stack, traffic, swap, examples, args.timeout)
        elapsed = time.monotonic() - t_traffic
        print(f"  done in {elapsed:.1f} s ({len(traffic.exchanges) / elapsed:.0f} frame pairs/s)"
              "\n")
        checks += report(stack, traffic, swap)
        if stack.triton is not None:
            checks += triton_phase(trim.url, off.url, args.candidates)
    finally:
        closed = stack.close()
    checks += cleanup_checks(stack, closed)
    return finish(checks, time.monotonic() - t0)


def report(stack: Stack, traffic: Traffic, swap: SwapTimes) -> list[Check]:
    checks = [Check("every request answered 200 by both pools", not traffic.errors,
                    "; ".join(traffic.errors[:3]))]
    metrics_text = stack.pools["trim"].metrics()
    metrics = per_model_from_metrics(metrics_text)
    responses = per_model_from_responses(traffic.exchanges)
    print("bytes sent to the leaves by the trim pool (from its /metrics):")
    print("\n".join("  " + line for line in render_bytes_table(metrics, responses)))
    same = all(metrics.get(m, {}).get(k) == responses.get(m, {}).get(k)
               for m in responses for k in ("untrimmed", "trimmed"))
    checks.append(Check("/metrics byte counters == sums of the responses", same))
    leaf_wire = sum(leaf.stats()["bytes_received"] for leaf in stack.leaves.values())
    root_sent = sum(m["sent"] for pool in ("trim", "off")
                    for m in per_model_from_metrics(stack.pools[pool].metrics()).values())
    checks.append(Check("bytes the leaves received == bytes both pools sent",
                        leaf_wire == root_sent, f"{leaf_wire / 1e6:.1f} MB"))
    reduced = all(metrics[m]["trimmed"] < metrics[m]["untrimmed"] for m in MODELS
                  if m in metrics)
    checks.append(Check("every model got fewer bytes trimmed than untrimmed",
                        reduced and set(MODELS) <= set(metrics)))
    print()
    print("\n".join(swap_report(traffic, swap)))
    lines, moved = worker_report(stack, traffic, swap)
    print("generations per trim worker:")
    print("\n".join("  " + line for line in lines))
    checks.append(moved)
    v2 = responses.get("homefeed_rank", {}).get("versions", {}).get("2", 0)
    checks.append(Check("homefeed_rank scored with v2 after the swap", v2 > 0, f"{v2} targets"))
    compared, bad, skew = compare_scores(traffic.exchanges)
    print()
    print(f"scores with trimming == scores without: {'yes' if not bad and compared else 'NO'}"
          f" ({compared} targets compared)")
    for msg in bad[:5]:
        print(f"  mismatch: {msg}")
    if skew:
        print(f"  of those, {len(skew)} homefeed_rank targets were answered during the leaf's "
              f"v2 rollout (the root already trimmed for v2, the leaf still served v1; it "
              f"re-reads its bundle every 0.2 s): {sum(skew)} were refused by the leaf and "
              "re-sent untrimmed, so their scores still match")
    checks.append(Check("scores with trimming == scores without", not bad and compared > 0,
                        f"{compared} targets"))
    return checks


def triton_install(mode: str) -> Any:
    """The Triton install to add (None: none), per ``--triton auto|on|off``."""
    if mode == "off":
        return None
    from root_worker.testing import triton

    inst = triton.find_install()
    if isinstance(inst, str):
        if mode == "on":
            raise StackError(inst)
        print(f"(no Triton leaf: {inst})")
        return None
    return inst


def triton_phase(trim_url: str, off_url: str, candidates: int, n: int = 8) -> list[Check]:
    """Union frames to both pools: v2 requests answered by Triton when trimmed, refused
    when they carry the whole union (mode off)."""
    from root_worker.frame import encode
    from root_worker.testing import triton

    ok = refused = total = 0
    wire: list[int] = []
    frame_bytes = 0
    with Client(trim_url, timeout=30) as trim, Client(off_url, timeout=30) as off:
        for seed in range(n):
            frame = encode(triton.union_columns(candidates, seed, extra=200),
                           {"targets": list(triton.MODELS)})
            frame_bytes = len(frame)
            _, doc = trim.score(frame)
            for t in doc.get("targets", ()):
                total += 1
                ok += t.get("status") == "ok"
                wire.append(t.get("bytes_sent", 0))
            _, doc = off.score(frame)
            refused += sum(t.get("error", {}).get("status") == 400
                           for t in doc.get("targets", ()))
    print(f"\nTriton leaf ({', '.join(triton.MODELS)}, Open Inference Protocol), {n} union "
          f"frames of {frame_bytes / 1e3:.0f} KB:\n"
          f"  trim pool: {ok}/{total} targets answered 200, "
          f"{sum(wire) / max(len(wire), 1):.0f} bytes per v2 request (header + the model's "
          f"inputs)\n"
          f"  off pool (the whole union as inputs): {refused}/{total} refused 400 by Triton")
    return [Check("Triton answered every trimmed v2 request", ok == total > 0,
                  f"{ok}/{total}"),
            Check("Triton refused every untrimmed (union) v2 request with 400",
                  refused == total > 0, f"{refused}/{total}")]


def cleanup_checks(stack: Stack, closed: CloseReport) -> list[Check]:
    left = shm_segments(stack.prefix)
    detail = (f"the daemon left {closed.leftover_segments}, removed by the demo"
              if closed.leftover_segments else "")
    return [
        Check("every process exited on SIGTERM", not closed.killed and not closed.lingering_pids,
              ", ".join(closed.killed + [str(p) for p in closed.lingering_pids])),
        Check(f"no /dev/shm segment of {stack.prefix} left (daemon --cleanup)",
              not left and not closed.leftover_segments, detail),
        Check("temporary directory removed",
              stack.keep_workdir or not stack.workdir.exists(), str(stack.workdir)),
    ]


def finish(checks: Sequence[Check], elapsed: float) -> int:
    print("\nchecks:")
    for c in checks:
        mark = "ok" if c.ok else "warn" if c.warning else "FAIL"
        detail = f" ({c.detail})" if c.detail and not (c.ok and c.warning) else ""
        print(f"  [{mark}] {c.name}{detail}")
    ok = all(c.ok or c.warning for c in checks)
    print(f"\ndemo {'passed' if ok else 'FAILED'} in {elapsed:.1f} s")
    return 0 if ok else 1


# -- make run -------------------------------------------------------------------------------
def run(args: argparse.Namespace, examples: Path) -> int:
    stack = Stack.create("ftrun", examples, keep_workdir=args.keep_workdir,
                         triton=triton_install(args.triton))
    try:
        trim = stack.start_pool("trim", mode="trim")
        off = stack.start_pool("off", mode="off")
        sample = stack.workdir / "sample.frame"
        sample.write_bytes(build_frames(examples, args.candidates)[0])
        py = sys.executable
        print(f"""feature-trimmer stack is up (shm prefix {stack.prefix}, directory {stack.workdir})
  root pool (trim): {trim.url}
  root pool (off):  {off.url}
  leaves:           {', '.join(f'{n}={leaf.url}' for n, leaf in stack.leaves.items())}
  routing file:     {stack.routing}
  bundles:          {stack.bundles['ads'].parent.parent}/  (edit or replace a module_info.json
                    there; the daemon publishes it and the workers attach it)

try:
  {py} -m root_worker.testing.client {trim.url} --features {examples / 'features.json'}
  curl -s --data-binary @{sample} -H 'Content-Type: application/x-ft-frame' \\
       '{trim.url}/score?target=ads_ctr&target=homefeed_rank'
  curl -s {trim.url}/healthz
  curl -s {trim.url}/metrics | grep '^feature_trimmer_root_.*_bytes_total'
  {Path(py).parent / 'trimmer-inspect'} --shm-name {stack.prefix} status
  {Path(py).parent / 'trimmer-inspect'} --shm-name {stack.prefix} lookup ads_ctr
  cp {examples / SWAP_SOURCE} {stack.bundles['homefeed']}   # hot swap

Ctrl-C stops everything and removes the shm segments.""", flush=True)
        while True:
            stack.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...")
        return_code = 0
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return_code = 1
    finally:
        closed = stack.close()
        left = shm_segments(stack.prefix)
        print(f"stopped; shm segments of {stack.prefix} left: {left or 'none'}"
              + (f"; killed after the SIGTERM deadline: {closed.killed}" if closed.killed
                 else ""))
    return return_code if not left else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m root_worker.testing.demo",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=("demo", "run"), default="demo",
                   help="demo: traffic, hot swap, table, checks (default); run: keep the "
                        "stack up until Ctrl-C")
    p.add_argument("--requests", type=int, default=300, help="frames sent (default 300)")
    p.add_argument("--candidates", type=int, default=16, help="candidates per frame")
    p.add_argument("--clients", type=int, default=3, help="client threads")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="give up on the traffic after this many seconds")
    p.add_argument("--examples", type=Path, default=EXAMPLES_DIR,
                   help="directory with features.json and bundles/ (default: the examples "
                        "installed with the package, examples/ in a checkout)")
    p.add_argument("--triton", choices=("auto", "on", "off"), default="auto",
                   help="add a real tritonserver leaf (make triton installs it): auto = when "
                        "installed (default), on = required, off = never")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the temporary directory (logs) after stopping")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.requests < 2:
        p.error("--requests must be at least 2 (the hot swap happens half way)")
    needed = ["features.json", "bundles/ads/module_info.json",
              "bundles/homefeed/module_info.json", str(SWAP_SOURCE)]
    lacking = [n for n in needed if not (args.examples / n).is_file()]
    if lacking:
        p.error(f"--examples {args.examples}: no {', '.join(lacking)} there (the demo starts "
                "from the example bundles: a checkout's examples/ directory, or the copy "
                "installed with the package)")
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process; SIGINT too,
    # even when started in the background by a shell that set it to "ignore"
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        if args.command == "run":
            return run(args, args.examples.resolve())
        return demo(args, args.examples.resolve())
    except KeyboardInterrupt:
        print("\ninterrupted; everything was stopped and cleaned up", file=sys.stderr)
        return 130
    except StackError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
