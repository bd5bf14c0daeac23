"""Rollout rehearsal across root hosts (``make bench-rollout``): does trimming keep working,
byte for byte, while a model version rolls out and back?

Three root hosts -- each its own ``trimmer-daemon``, shm name and gunicorn pool, in its own
network namespace (joined to a "fabric" namespace of leaves and clients by a veth pair) and
mount namespaces (the host's directory bind-mounted at ``/dev/shm``) where ``ip netns`` and
``unshare -m`` work, else on loopback -- and two leaf replicas per model, under steady
traffic of version-less (``homefeed_rank``) and versioned (``ads_ctr@1``) requests, driven
through the article's sequence (``root_worker.testing.rollout.article_stages``): root
configs to the canary host; v2 to one leaf replica; a canary decision from the canary
root's metrics; root configs to the other hosts; v2 to every replica; a rollback of both.
The canary host routes ``homefeed_rank`` to both replicas, the other hosts to the second
one (the first replica is the canary leaf). v2 swaps ``--swapped`` of ``--inputs`` inputs.

Then the issue's single-root sequence: one root, one leaf: v2 pending while the leaf
serves v1; the leaf moves to v2; the root promotes v2; the rollback (v2 demoted to pending,
then the leaf back to v1).

Per stage: requests, errors, under-sent frames (scored by a leaf although inputs of its
version were missing), skew round trips, learned leaf-version changes, bytes sent /
untrimmed (and vs the steady state), p99. Targets, every stage: 0 errors, 0 under-sent,
skew round trips <= learned changes and <= the leaf endpoints changed (over every host and
worker: inside the rollout window version-less frames carry the union of the versions, so a
replica's move costs none), bytes within 10 % of the steady state. Results:
``bench/results/rollout_bench.json`` (bench/report.py). Namespaces are deleted at the end,
whatever happens; every shm segment is checked for and removed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report import RESULTS_DIR, write_results  # noqa: E402

from root_worker.testing import rollout as R  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=3, help="root hosts (default 3)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers per host")
    p.add_argument("--stage-requests", type=int, default=300,
                   help="requests (all hosts) after each stage's action (default 300)")
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--inputs", type=int, default=618, help="inputs of homefeed_rank v1")
    p.add_argument("--swapped", type=int, default=60, help="inputs v2 swaps")
    p.add_argument("--features", type=int, default=2000, help="features in a frame")
    p.add_argument("--isolate", choices=("auto", "on", "off"), default="auto",
                   help="namespaces per root host (auto: where they work)")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "rollout_bench.json")
    p.add_argument("--inner", metavar="JSON", help=argparse.SUPPRESS)  # in the fabric netns
    p.add_argument("--inner-output", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_inner(args: argparse.Namespace, network: R.Network | None) -> dict[str, Any]:
    sigs = R.Signatures.make(args.inputs, args.swapped, args.features)
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    with R.rehearsal(hosts=args.hosts, workers=args.workers, network=network, sigs=sigs,
                     candidates=args.candidates, stage_requests=args.stage_requests) as r:
        rows = r.run(R.article_stages(r))
        out["article"] = {"rows": rows, "verdict": R.verdict(rows),
                          "canary_decision": r.decision,  # type: ignore[attr-defined]
                          "learned_at_end": r.learned(), "pipeline": r.pipeline.commands,
                          "seconds": round(time.monotonic() - t0, 1)}
    t0 = time.monotonic()
    with R.rehearsal(hosts=1, workers=args.workers, sigs=sigs, candidates=args.candidates,
                     stage_requests=args.stage_requests,
                     canary_routes_all=False) as r:
        rows = r.run(R.single_root_stages(r))
        out["single_root"] = {"rows": rows, "verdict": R.verdict(rows),
                              "seconds": round(time.monotonic() - t0, 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inner is not None:  # the orchestrator, inside the fabric namespace
        doc = run_inner(args, R.Network(args.hosts, attach=json.loads(args.inner)))
        args.inner_output.write_text(json.dumps(doc))
        return 0
    why = R.namespaces_work() if args.isolate != "off" else "--isolate off"
    if why is not None and args.isolate == "on":
        print(f"namespaces unavailable: {why}", file=sys.stderr)
        return 2
    isolation: dict[str, Any] = {"namespaces": why is None, "why_not": why}
    if why is None:
        network = R.Network(args.hosts)
        try:
            tmp = args.output.with_name(f".rollout-{network.fabric}.json")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            cmd = ["ip", "netns", "exec", network.fabric, sys.executable,
                   str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:]),
                   "--inner", json.dumps(network.describe()), "--inner-output", str(tmp)]
            rc = subprocess.run(cmd, cwd=ROOT).returncode
            if rc != 0 or not tmp.exists():
                print(f"the rehearsal failed (exit {rc})", file=sys.stderr)
                return 1
            doc = json.loads(tmp.read_text())
            tmp.unlink()
            isolation.update(network.describe())
        finally:
            network.close()
    else:
        print(f"on loopback (no namespaces: {why})")
        doc = run_inner(args, None)
    ok = True
    for key, title in (("article", f"article sequence, {args.hosts} root hosts x "
                                    f"{args.workers} workers"),
                       ("single_root", "single root, one leaf (the issue's four stages)")):
        part = doc[key]
        print(f"\n{title} ({part['seconds']} s; bytes = sent / untrimmed, all targets):")
        print(R.table(part["rows"], part["verdict"]))
        for s in part["verdict"]["stages"]:
            if not s["met"]:
                print(f"  NOT met in {s['stage']}: {s['checks']}")
        ok = ok and part["verdict"]["all_met"]
    print(f"\ncanary decision: {doc['article']['canary_decision']}")
    print(f"targets {'met' if ok else 'NOT met'} in every stage")
    write_results(args.output, "rollout_bench", {
        "isolation": isolation, "parameters": {k: v for k, v in vars(args).items()
                                               if k not in ("inner", "inner_output", "output")},
        **doc, "all_targets_met": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
