"""Root CPU and wire bytes of a v2 (Open Inference Protocol) target vs a native-frame target.

    python bench/triton_bench.py [--candidates 64] [--extra 1200] [--requests 300]
                                 [--rounds 3] [--frames 16]
    make bench-triton

Needs the Triton server (``make triton``). One ``trimmer-daemon`` publishes the bundle
built from the test model repository (:mod:`root_worker.testing.triton`: ``tr_ctr``,
``tr_rank``) with ``trimmer-bundle build --triton-repo``. Two gunicorn root pools (2 workers
each) run side by side on the same map and differ only in their routing file:

    v2       tr_ctr, tr_rank -> tritonserver (``"protocol": "oip"``: a v2 binary-tensor
             request per target, the JSON header + views of the kept blocks)
    native   tr_ctr, tr_rank -> a ``trimmer-leaf`` serving both models from the same bundle
             (the trimmed frame, scatter-gather)

Every request is one frame of ``--candidates`` candidates carrying the union
(:func:`root_worker.testing.triton.union_columns`): the two models' four inputs plus
``--extra`` columns neither uses (60% float32 scalars, 20% float16 embeddings of 16 values,
20% int64 ids), naming both models (a fan-out of 2). ``--frames``
distinct frames (seeds) are cycled. Per round the configurations run in rotated order, each
for ``--requests`` sequential requests on one kept-alive connection; root CPU is the CPU
time of the pool's master and workers over that window (``/proc/PID/task/*/schedstat``,
nanoseconds), per request. Reported:
root CPU per request (median and range over rounds), the v2/native ratio per round (target
<= 1.2), wire bytes per request (root -> leaf bodies, from ``bytes_sent``), p50 latency.
Writes bench/results/triton_bench.json; every process and shm segment is removed at exit.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import RESULTS_DIR, write_results

from root_worker.frame import encode
from root_worker.testing import triton as T
from root_worker.testing.client import Client
from root_worker.testing.stack import Daemon, Leaf, Pool, shm_segments
from trimmer_daemon.bundle.cli import main as bundle_main

TARGETS = ["tr_ctr", "tr_rank"]


def make_frame(n: int, extra: int, seed: int) -> bytes:
    return encode(T.union_columns(n, seed, extra), {"request_id": f"bench-{seed}",
                                                    "targets": TARGETS})


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` in ns (``/proc/PID/task/*/schedstat``: not the
    10 ms ticks of ``/proc/PID/stat``); 0 once it is gone."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def pool_cpu(pool: Pool) -> float:
    return sum(cpu_ns(p) for p in (pool.pid, *pool.worker_pids())) / 1e9


def window(pool: Pool, frames: list[bytes], n: int) -> dict[str, Any]:
    lat, wire = [], []
    with Client(pool.url, timeout=30) as c:
        c.score(frames[0])  # warm the connection and the caches
        cpu0, t0 = pool_cpu(pool), time.monotonic()
        for k in range(n):
            s0 = time.perf_counter()
            status, doc = c.score(frames[k % len(frames)])
            lat.append(time.perf_counter() - s0)
            if status != 200 or doc["failed"]:
                raise RuntimeError(f"{pool.name}: {status} {json.dumps(doc)[:600]}")
            wire.append(sum(t["bytes_sent"] for t in doc["targets"]))
        cpu = pool_cpu(pool) - cpu0
        seconds = time.monotonic() - t0
    return {"root_cpu_ms": 1e3 * cpu / n, "wire_bytes": statistics.median(wire),
            "p50_ms": 1e3 * statistics.median(lat), "rps": n / seconds}


def run(args: argparse.Namespace) -> int:
    inst = T.find_install()
    if isinstance(inst, str):
        print(f"triton_bench: {inst}", file=sys.stderr)
        return 2
    prefix = f"fttriton_{secrets.token_hex(6)}"
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="ft-triton-bench-") as tmp:
        work = Path(tmp)
        try:
            server = T.TritonServer(inst, T.write_model_repository(work / "repo"), work)
            procs.append(server)
            server.wait_ready()
            bundle = work / "bundles" / "triton" / "module_info.json"
            bundle.parent.mkdir(parents=True)
            assert bundle_main(["build", "-o", str(bundle), "--triton-repo",
                                str(server.repo)]) == 0
            daemon = Daemon(prefix, {"triton": bundle}, work)
            procs.append(daemon)
            daemon.wait_generation()
            leaf = Leaf("native", bundle, None, work)
            procs.append(leaf)
            leaf.wait_ready()
            routes = {"v2": {m: {"url": server.url, "protocol": "oip"} for m in TARGETS},
                      "native": {m: leaf.url for m in TARGETS}}
            pools = {}
            for name, doc in routes.items():
                (work / f"routing-{name}.json").write_text(json.dumps(doc))
                pools[name] = Pool(name, work, {"FT_SHM_NAME": prefix, "FT_MODE": "trim",
                                                "FT_ROUTING": str(work / f"routing-{name}.json"),
                                                "FT_MAX_REQUEST_BYTES": str(64 << 20)})
                procs.append(pools[name])
            for p in pools.values():
                p.wait_ready()
            frames = [make_frame(args.candidates, args.extra, s) for s in range(args.frames)]
            rounds: list[dict[str, dict[str, Any]]] = []
            order = list(pools)
            for r in range(args.rounds):
                res = {}
                for name in order[r % 2:] + order[:r % 2]:
                    try:
                        res[name] = window(pools[name], frames, args.requests)
                    except RuntimeError:
                        print(f"daemon alive: {daemon.alive()}; its log:\n"
                              f"{daemon.log_tail()}", file=sys.stderr)
                        raise
                rounds.append(res)
                print(f"round {r + 1}: " + "  ".join(
                    f"{n} {v['root_cpu_ms']:.3f} ms CPU, {v['wire_bytes']:.0f} B wire"
                    for n, v in res.items()), flush=True)
        finally:
            for p in reversed(procs):
                p.stop()
    left = shm_segments(prefix)
    summary = summarize(rounds, len(frames[0]))
    print_summary(summary)
    write_results(RESULTS_DIR / "triton_bench.json", "triton_bench",
                  {"args": vars(args), "frame_bytes": len(frames[0]), "rounds": rounds,
                   "summary": summary, "shm_left": left})
    return 0 if not left else 1


def summarize(rounds: list[dict[str, dict[str, Any]]], frame_bytes: int) -> dict[str, Any]:
    out: dict[str, Any] = {"frame_bytes": frame_bytes}
    for name in rounds[0]:
        cpu = [r[name]["root_cpu_ms"] for r in rounds]
        out[name] = {"root_cpu_ms_median": statistics.median(cpu),
                     "root_cpu_ms_range": [min(cpu), max(cpu)],
                     "wire_bytes": statistics.median(r[name]["wire_bytes"] for r in rounds),
                     "p50_ms": statistics.median(r[name]["p50_ms"] for r in rounds)}
    ratios = [r["v2"]["root_cpu_ms"] / r["native"]["root_cpu_ms"] for r in rounds]
    out["cpu_ratio_v2_over_native"] = {"median": statistics.median(ratios),
                                       "range": [min(ratios), max(ratios)], "target": 1.2}
    out["wire_ratio_v2_over_native"] = out["v2"]["wire_bytes"] / out["native"]["wire_bytes"]
    return out


def print_summary(s: dict[str, Any]) -> None:
    print(f"frame {s['frame_bytes']} bytes, 2 targets per request")
    for name in ("native", "v2"):
        v = s[name]
        lo, hi = v["root_cpu_ms_range"]
        print(f"  {name:7s} root CPU {v['root_cpu_ms_median']:.3f} ms/request "
              f"[{lo:.3f}..{hi:.3f}]  wire {v['wire_bytes']:.0f} B/request  "
              f"p50 {v['p50_ms']:.2f} ms")
    r = s["cpu_ratio_v2_over_native"]
    print(f"  root CPU v2/native: {r['median']:.2f} (range {r['range'][0]:.2f}.."
          f"{r['range'][1]:.2f}; target <= 1.2)   wire v2/native: "
          f"{s['wire_ratio_v2_over_native']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--extra", type=int, default=1200, help="columns no model uses")
    parser.add_argument("--requests", type=int, default=300, help="per window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
