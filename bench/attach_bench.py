"""What attaching a new map generation costs the thread that does it, and what an event loop
pays instead with ``LiveMap.current_nowait`` (root_worker/contract.py, "Threads and asyncio").

A production-sized map (bench/map_bench.py's 2000 models x 3 versions x 300 features) is
published through the daemon's own path (parts compiled once, spliced per generation by the
assembler, real POSIX shared memory); then, per new generation, one side by side:

* ``attach_ms``: ``LiveMap.current()`` that attaches it (map, checksum, open the view) --
  what a request would wait for if the loop attached inline;
* ``nowait_us``: ``LiveMap.current_nowait()`` while that generation waits (the loop's cost:
  one read of the control word, the old view served);
* ``steady_us``: ``LiveMap.current()`` when nothing changed (every request's poll).

Writes bench/results/attach_bench.json. Every segment is removed at exit::

    python bench/attach_bench.py [--generations 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from map_bench import MODELS, VERSIONS, synthetic_bundle  # noqa: E402
from report import RESULTS_DIR, write_results  # noqa: E402

from flatbuffers_schema.fmap.BundleState import BundleState  # noqa: E402
from root_worker.featuremap.live_map import LiveMap  # noqa: E402
from trimmer_daemon.assemble import Assembler  # noqa: E402
from trimmer_daemon.bundle.parse import parse_bundle  # noqa: E402
from trimmer_daemon.compiler import BundleStatusRecord  # noqa: E402
from trimmer_daemon.parts import compile_part  # noqa: E402
from trimmer_daemon.publisher import Publisher  # noqa: E402


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def run(generations: int) -> dict[str, Any]:
    parsed = parse_bundle(synthetic_bundle(), path="/b/synthetic")
    parts = [compile_part(parsed, 0)]
    status = [BundleStatusRecord(name="synthetic", path="/b/synthetic", state=BundleState.Ok,
                                 sha256="ab" * 32, model_count=MODELS)]
    prefix = f"ftbench_{uuid.uuid4().hex[:10]}"
    publisher = Publisher(prefix, grace_s=0.0)
    live = LiveMap(prefix)
    attach, nowait, steady, size = [], [], [], 0
    try:
        for _ in range(generations):
            out = Assembler().assemble(parts, status, generation=publisher.next_generation,
                                       built_at_ns=time.time_ns(), daemon_pid=os.getpid())
            generation = publisher.publish_parts(out.parts, out.crc)
            size = sum(len(p) for p in out.parts)
            t0 = time.perf_counter()
            view, stale = live.current_nowait()
            nowait.append((time.perf_counter() - t0) * 1e6)
            assert stale, "a new generation must be seen as waiting"
            t0 = time.perf_counter()
            view = live.current()
            attach.append((time.perf_counter() - t0) * 1e3)
            assert view is not None and view.generation == generation
            for _ in range(1000):
                t0 = time.perf_counter()
                live.current()
                steady.append((time.perf_counter() - t0) * 1e6)
    finally:
        live.close()
        publisher.cleanup()
    return {"map": {"models": MODELS, "versions": VERSIONS, "bytes": size},
            "generations": generations, "attach_ms": _stats(attach),
            "nowait_us": _stats(nowait), "steady_us": _stats(steady)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--output", default=str(RESULTS_DIR / "attach_bench.json"))
    args = parser.parse_args()
    doc = run(args.generations)
    print(f"map {doc['map']['bytes'] / 1e6:.1f} MB ({MODELS} models x {VERSIONS} versions): "
          f"attach {doc['attach_ms']['median']} ms (range {doc['attach_ms']['min']}-"
          f"{doc['attach_ms']['max']}), current_nowait while one waits "
          f"{doc['nowait_us']['median']} us, steady poll {doc['steady_us']['median']} us")
    write_results(args.output, "attach_bench", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
