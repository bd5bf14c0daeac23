"""Map benchmarks: compile, attach and lookup of a production-sized consolidated map.

Section function for ``bench/trim_bench.py`` (and runnable alone). Sizes follow issue #2:
2000 models x 3 versions x 300 features drawn from a 20,000-feature universe.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flatbuffers_schema.fmap.BundleState import BundleState  # noqa: E402
from root_worker.featuremap.map_reader import FeatureMapView  # noqa: E402
from trimmer_daemon.bundle.parse import parse_bundle  # noqa: E402
from trimmer_daemon.compiler import BundleStatusRecord, compile_map  # noqa: E402
from trimmer_daemon.consolidate import KeyCache, consolidate, index_bundle  # noqa: E402

MODELS, VERSIONS, FEATURES, UNIVERSE = 2000, 3, 300, 20_000


def synthetic_bundle(models: int = MODELS, versions: int = VERSIONS,
                     features: int = FEATURES, universe: int = UNIVERSE,
                     seed: int = 7) -> bytes:
    rng = np.random.default_rng(seed)
    names = [f"feature_{i:06d}" for i in range(universe)]
    doc: dict[str, list[dict[str, Any]]] = {}
    for m in range(models):
        picked = rng.choice(universe, size=features, replace=False)
        inputs = [names[i] for i in picked]
        doc[f"model_{m:05d}"] = [{"version": str(v + 1), "input_names": inputs,
                                  "output_names": ["score"]} for v in range(versions)]
    return json.dumps(doc).encode()


def _timed(fn, repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def section_map(repeat: int = 5) -> dict[str, Any]:
    """2000 models x 3 versions x 300 features: compile, attach a generation, lookups."""
    data = synthetic_bundle()
    parse_s, parsed = _timed(lambda: parse_bundle(data, path="synthetic.json"), repeat)
    cache = KeyCache()
    index_bundle(parsed, cache)  # warm the name -> key memo as a running daemon has it
    index_s, indexed = _timed(lambda: index_bundle(parsed, cache), repeat)
    cons_s, cmap = _timed(lambda: consolidate([("synthetic", indexed)], cache), repeat)
    status = [BundleStatusRecord("synthetic", "synthetic.json", BundleState.Ok,
                                 model_count=MODELS, version_count=MODELS * VERSIONS)]
    compile_s, blob = _timed(lambda: compile_map(cmap, status, generation=1, built_at_ns=0,
                                                 daemon_pid=os.getpid(), cache=cache), repeat)
    crc_s, _ = _timed(lambda: zlib.crc32(blob), repeat)
    attach_s, view = _timed(lambda: FeatureMapView(blob), 50)
    names = [f"model_{m:05d}" for m in range(MODELS)]
    rng = np.random.default_rng(1)
    order = rng.permutation(MODELS)
    t0 = time.perf_counter()
    for i in order:
        view.resolve(names[i], "2")
    cold_us = (time.perf_counter() - t0) / MODELS * 1e6
    warm = []
    for _ in range(20):
        t0 = time.perf_counter()
        for i in order:
            view.resolve(names[i], "2")
        warm.append((time.perf_counter() - t0) / MODELS * 1e6)
    return {
        "map_shape": f"{MODELS} models x {VERSIONS} versions x {FEATURES} features",
        "bundle_json_mb": round(len(data) / 1e6, 2),
        "blob_mb": round(len(blob) / 1e6, 2),
        "parse_validate_ms": round(parse_s * 1e3, 1),
        "index_ms": round(index_s * 1e3, 1),
        "consolidate_ms": round(cons_s * 1e3, 1),
        "compile_ms": round(compile_s * 1e3, 1),
        "compile_target_ms": 300,
        "crc32_ms": round(crc_s * 1e3, 2),
        "attach_ms": round(attach_s * 1e3, 3),
        "attach_target_ms": 5,
        "lookup_cold_us": round(cold_us, 2),
        "lookup_us": round(statistics.median(warm), 3),
        "lookup_target_us": 2,
    }


if __name__ == "__main__":
    result = section_map()
    for k, v in result.items():
        print(f"{k:24s} {v}")


def section_per_target_with_map() -> dict[str, Any]:
    """16 x 300: the whole per-target cost a worker pays, map included: lock-free generation
    check + memoised resolve on a map published in real POSIX shm, then the trim."""
    import uuid
    from functools import partial

    from trim_bench import Trimmer, dense_frame, reps, timed_batches

    from root_worker.featuremap.live_map import LiveMap
    from trimmer_daemon.publisher import Publisher

    frame, names = dense_frame(16, 300, seed=2)
    rng = np.random.default_rng(3)
    kept = [n for n in names if rng.random() < 0.4]
    doc = {"model_small": [{"version": "1", "input_names": kept}]}
    cache = KeyCache()
    indexed = index_bundle(parse_bundle(json.dumps(doc).encode(), path="small.json"), cache)
    prefix = f"ftbench_{uuid.uuid4().hex[:10]}"
    pub = Publisher(prefix, grace_s=0.0)
    live = LiveMap(prefix)
    try:
        blob = compile_map(consolidate([("small", indexed)], cache),
                           [BundleStatusRecord("small", "small.json", BundleState.Ok)],
                           generation=pub.next_generation, built_at_ns=0,
                           daemon_pid=os.getpid(), cache=cache)
        pub.publish(blob)
        trimmer = Trimmer()
        out = np.zeros(len(frame), dtype=np.uint8)

        def per_target() -> Any:
            res = live.resolve("model_small", "1")
            return trimmer.trim(frame, res.allowlist, out=out)

        assert per_target().n_kept == len(kept)
        med = timed_batches({"lookup": partial(live.resolve, "model_small", "1"),
                             "lookup_and_trim": per_target}, batch=200, rounds=reps(200))
    finally:
        live.close()
        pub.cleanup()
    return {"shm_lookup_us": round(med["lookup"]["median"] * 1e6, 2),
            "shm_lookup_and_trim_us": round(med["lookup_and_trim"]["median"] * 1e6, 2),
            "target": "lookup <= 2 us; whole per-target cost <= 10 us"}
