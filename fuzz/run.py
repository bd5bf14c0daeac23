"""Run the fuzz targets for a bounded time: ``python -m fuzz.run [--seconds N] [TARGET ...]``.

Each target runs in its own process (``python -m fuzz.<target>``, libFuzzer flags:
``-max_total_time``, a per-input ``-timeout``, an ``-rss_limit_mb``) on a corpus directory
under ``--workdir`` that first receives the target's seeds (:mod:`fuzz.seeds`), so a corpus
grows across runs of ``make fuzz``. A finding is an escaped exception, a broken invariant,
a timeout or an out-of-memory: libFuzzer writes the input to ``<workdir>/<target>/crash-*``
(or ``timeout-*``, ``oom-*``) and exits non-zero. Prints one line per target (inputs run,
corpus size, seconds, findings) and exits 1 if any target found something.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from fuzz.seeds import SEEDS

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 10  # one input taking longer is a finding
RSS_LIMIT_MB = 2048


def write_seeds(target: str, corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in SEEDS[target]():
        (corpus / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}").write_bytes(seed)


def run_target(target: str, workdir: Path, seconds: int, runs: int | None = None
               ) -> tuple[int, str]:
    """Fuzz ``target``; returns libFuzzer's exit status and a one-line summary."""
    base = workdir / target
    corpus = base / "corpus"
    write_seeds(target, corpus)
    cmd = [sys.executable, "-m", f"fuzz.{target}", f"-max_total_time={seconds}",
           f"-timeout={TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}", "-print_final_stats=1",
           f"-artifact_prefix={base}/", str(corpus)]
    if runs is not None:
        cmd.insert(3, f"-runs={runs}")
    log = base / "fuzz.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              timeout=seconds + 120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    text = log.read_text(errors="replace")
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    findings = sorted(p.name for p in base.iterdir()
                      if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    summary = (f"{target}: exit {proc.returncode}, {execs[-1] if execs else '?'} inputs, "
               f"corpus {len(list(corpus.iterdir()))}, {time.monotonic() - t0:.0f} s, "
               f"findings {findings or 'none'} (log {log})")
    return proc.returncode, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    ap.add_argument("targets", nargs="*", metavar="TARGET",
                    help=f"targets to run (default: all of {', '.join(SEEDS)})")
    ap.add_argument("--seconds", type=int, default=300, help="per target (default 300)")
    ap.add_argument("--runs", type=int, default=None, help="stop a target after N inputs")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".fuzz",
                    help="corpora, logs and findings (default .fuzz/)")
    args = ap.parse_args(argv)
    unknown = set(args.targets) - set(SEEDS)
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(SEEDS)}")
    failed = 0
    for target in args.targets or list(SEEDS):
        status, summary = run_target(target, args.workdir, args.seconds, args.runs)
        print(summary, flush=True)
        if status != 0:
            failed += 1
            log = (args.workdir / target / "fuzz.log").read_text(errors="replace")
            print("\n".join(log.splitlines()[-40:]), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
