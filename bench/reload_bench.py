"""Reload latency and publication cost of the trimmer daemon (issue #3).

    python bench/reload_bench.py [--rounds 200] [--readers 8]

1. Reload latency: a real ``trimmer-daemon`` subprocess watches one bundle; 8 reader
   processes poll the live map every millisecond (a worker checks the generation on every
   request). Each round renames a new bundle file into place and measures, on the shared
   CLOCK_MONOTONIC, the time from just before ``os.replace`` until the *last* of the 8
   readers serves the new generation. Debounce and inotify are included.
2. Compile + publish of a 2000 models x 3 versions x 300 features map (in process):
   consolidate + compile + Publisher.publish into a fresh shm prefix.

Writes bench/results/reload_bench.json. Every shm segment and process is removed at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

READER = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from root_worker.featuremap.live_map import LiveMap
live = LiveMap(sys.argv[1])
last = -1
print("up", flush=True)
while True:
    view = live.current()
    gen = view.generation if view is not None else 0
    if gen != last:
        last = gen
        print(gen, time.monotonic(), flush=True)
    time.sleep(0.001)
"""


def _doc(k: int) -> dict:
    return {"ctr": [{"version": str(k), "input_names": [f"f{i}" for i in range(300)]}],
            "cvr": [{"version": "1", "input_names": [f"g{i}" for i in range(300)]}]}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def reload_latency(rounds: int, n_readers: int) -> dict:
    import selectors

    from trimmer_daemon.publisher import Publisher
    prefix = f"ftbench_{uuid.uuid4().hex[:10]}"
    tmp = Path(tempfile.mkdtemp(prefix="ftbench-"))
    bundle = tmp / "ads" / "module_info.json"
    bundle.parent.mkdir()
    bundle.write_text(json.dumps(_doc(0)))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "trimmer_daemon.cli", "--shm-name", prefix, "--bundle",
         f"ads={bundle}", "--metrics-listen", "", "--log-level", "WARNING"],
        cwd=ROOT, start_new_session=True)
    readers = [subprocess.Popen([sys.executable, "-c", READER, prefix, str(ROOT)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
               for _ in range(n_readers)]
    sel = selectors.DefaultSelector()
    latest: dict[int, tuple[int, float]] = {}
    partial = {i: "" for i in range(n_readers)}
    for i, r in enumerate(readers):
        assert r.stdout is not None
        assert r.stdout.readline().strip() == "up"
        os.set_blocking(r.stdout.fileno(), False)
        sel.register(r.stdout, selectors.EVENT_READ, i)
        latest[i] = (0, 0.0)

    def pump(until_gen: int, deadline: float) -> None:
        while any(g < until_gen for g, _ in latest.values()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"readers stuck below generation {until_gen}: {latest}")
            for key, _ in sel.select(0.05):
                chunk = key.fileobj.read() or ""  # type: ignore[union-attr]
                *lines, partial[key.data] = (partial[key.data] + chunk).split("\n")
                for line in lines:
                    gen, ts = line.split()
                    latest[key.data] = (int(gen), float(ts))

    latencies: list[float] = []
    try:
        pump(1, time.monotonic() + 30)
        gen = max(g for g, _ in latest.values())
        for k in range(1, rounds + 1):
            staged = bundle.with_name(".staged")
            staged.write_text(json.dumps(_doc(k)))
            t0 = time.monotonic()
            os.replace(staged, bundle)
            gen += 1
            pump(gen, time.monotonic() + 10)
            latencies.append(max(ts for _, ts in latest.values()) - t0)
    finally:
        for p in readers + [daemon]:
            p.terminate()
        for p in readers + [daemon]:
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
        sel.close()
        Publisher(prefix).cleanup()
        for f in bundle.parent.iterdir():
            f.unlink()
        bundle.parent.rmdir()
        tmp.rmdir()
    ms = [x * 1e3 for x in latencies]
    return {"rounds": rounds, "readers": n_readers,
            "reload_median_ms": round(statistics.median(ms), 2),
            "reload_p99_ms": round(_percentile(ms, 0.99), 2),
            "reload_max_ms": round(max(ms), 2),
            "targets": "median <= 20 ms, p99 <= 50 ms"}


def compile_publish(repeat: int = 5) -> dict:
    from map_bench import FEATURES, MODELS, VERSIONS, synthetic_bundle

    from flatbuffers_schema.fmap.BundleState import BundleState
    from trimmer_daemon.bundle.parse import parse_bundle
    from trimmer_daemon.compiler import BundleStatusRecord, compile_map
    from trimmer_daemon.consolidate import KeyCache, consolidate, index_bundle
    from trimmer_daemon.publisher import Publisher
    cache = KeyCache()
    indexed = index_bundle(parse_bundle(synthetic_bundle(), path="synthetic.json"), cache)
    status = [BundleStatusRecord("synthetic", "synthetic.json", BundleState.Ok)]
    prefix = f"ftbench_{uuid.uuid4().hex[:10]}"
    pub = Publisher(prefix, grace_s=0.0)
    compile_s, publish_s, total_s, size = [], [], [], 0
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            cmap = consolidate([("synthetic", indexed)], cache)
            blob = compile_map(cmap, status, generation=pub.next_generation, built_at_ns=0,
                               daemon_pid=os.getpid(), cache=cache)
            t1 = time.perf_counter()
            pub.publish(blob)
            t2 = time.perf_counter()
            compile_s.append(t1 - t0)
            publish_s.append(t2 - t1)
            total_s.append(t2 - t0)
            size = len(blob)
    finally:
        pub.cleanup()
    return {"map_shape": f"{MODELS} models x {VERSIONS} versions x {FEATURES} features",
            "blob_mb": round(size / 1e6, 2),
            "consolidate_compile_ms": round(statistics.median(compile_s) * 1e3, 1),
            "publish_ms": round(statistics.median(publish_s) * 1e3, 1),
            "compile_publish_ms": round(statistics.median(total_s) * 1e3, 1),
            "target_ms": 300}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "reload_bench.json"))
    args = parser.parse_args(argv)
    result = {"reload": reload_latency(args.rounds, args.readers),
              "compile_publish": compile_publish()}
    for section, values in result.items():
        print(f"[{section}]")
        for k, v in values.items():
            print(f"  {k:26s} {v}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
