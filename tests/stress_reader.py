"""A reader process for the daemon stress tests: poll the live map and check invariants.

    python tests/stress_reader.py PREFIX STOP_FILE

Every generation it sees must be a whole, verified map whose content matches what the
writer encodes for step k (see :func:`stress_doc`). Prints ``ready`` once attached to a
first generation, then on exit one JSON line: generations seen, checks made, errors. It
stops when STOP_FILE appears, or after ``DEADLINE_S`` if it never does (a test that died),
so a reader is never left polling.
"""

from __future__ import annotations

import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from shm_helpers import OrderWatch  # noqa: E402

from root_worker.featuremap.live_map import LiveMap  # noqa: E402
from root_worker.featuremap.map_reader import FeatureMapView  # noqa: E402

DEADLINE_S = 300.0  # the stress tests stop their readers within a minute or two


def stress_features(k: int) -> list[str]:
    return sorted(f"f{k}_{i}" for i in range(1 + k % 7))


def stress_doc(k: int) -> dict:
    """Bundle content at writer step ``k``: model 'm' has exactly one version, str(k)."""
    return {"m": [{"version": str(k), "input_names": stress_features(k)}],
            "static": [{"version": "1", "input_names": ["s1", "s2"]}]}


def check(view: FeatureMapView) -> str | None:
    res = view.resolve("m")
    if res.allowlist is None or res.version is None:
        return f"gen {view.generation}: model m missing"
    k = int(res.version)
    names = sorted(view.feature_names(res.allowlist.keys))
    if names != stress_features(k):
        return f"gen {view.generation}: m@{k} has {names}"
    static = view.resolve("static")
    static_names = sorted(view.feature_names(static.allowlist.keys)) if static.allowlist else []
    if static_names != ["s1", "s2"]:
        return f"gen {view.generation}: static model wrong"
    states = [b["state"] for b in view.bundles()]
    if states != ["ok"]:
        return f"gen {view.generation}: bundle states {states}"
    return None


def main(prefix: str, stop_file: str) -> int:
    live = LiveMap(prefix)
    seen: set[int] = set()
    errors: list[str] = []
    checks = 0
    announced = False
    order = OrderWatch(prefix)  # beside the worker's own reads: never another generation's slot
    deadline = time.monotonic() + DEADLINE_S
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        problem = order.step()
        if problem:
            errors.append(problem)
        view = live.current()
        if view is None:
            continue
        if not announced:
            print("ready", flush=True)
            announced = True
        if view.generation in seen:
            continue
        seen.add(view.generation)
        checks += 1
        problem = check(view)
        if problem:
            errors.append(problem)
    stats = live.reader.stats
    print(json.dumps({"generations": len(seen), "checks": checks, "errors": errors[:20],
                      "n_errors": len(errors), "verify_failures": stats.verify_failures,
                      "order_violations": order.violations,
                      "map_errors": live.map_errors, "max_generation": max(seen, default=0)}),
          flush=True)
    live.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
