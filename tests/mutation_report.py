"""Mutation score per module from mutmut's results, and the survivors (``make mutate``).

    python tests/mutation_report.py [--strict]

Reads ``mutmut results --all true`` (run it from the repository root after ``mutmut run``),
prints one line per mutated module -- mutants, killed (a timeout counts as killed: the
tests noticed), survived, with no covering test, the score -- then every survivor. A
survivor listed in docs/testing.md (its table of equivalent mutants: a backticked mutant
name in the first column) is marked ``equivalent``; any other is ``NEW``. A listed mutant
that was run and killed is printed as ``stale`` (a test now tells it apart: its row is to go).
``--strict`` exits 1 if a NEW survivor, a mutant with no test or a stale row is left (``make
mutate`` and the CI sample use it).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "testing.md"
CAUGHT = {"killed", "timeout", "segfault", "suspicious"}
_LINE = re.compile(r"^\s*(\S+?): (.+)$")
_MODULE = re.compile(r"^(.*?)\.x[_ǁ]")


def results() -> list[tuple[str, str]]:
    mutmut = Path(sys.executable).parent / "mutmut"
    out = subprocess.run([str(mutmut), "results", "--all", "true"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return [(m.group(1), m.group(2).strip()) for m in map(_LINE.match, out.splitlines()) if m]


def equivalents(doc: Path = DOC) -> set[str]:
    """Mutant names in the first column of docs/testing.md's tables."""
    if not doc.exists():
        return set()
    return set(re.findall(r"^\|\s*`([\w.ǁ]+__mutmut_\d+)`", doc.read_text(), re.M))


def main(argv: list[str]) -> int:
    strict = "--strict" in argv
    rows = [(name, status) for name, status in results() if status != "not checked"]
    known = equivalents()
    per: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[tuple[str, str]] = []
    for name, status in rows:
        m = _MODULE.match(name)
        module = m.group(1) if m else name
        kind = "killed" if status in CAUGHT else status
        per[module][kind] += 1
        if kind != "killed":
            survivors.append((name, status))
    print(f"{'module':45} {'mutants':>7} {'killed':>7} {'survived':>8} {'no test':>7} "
          f"{'score':>6}")
    for module in sorted(per):
        c = per[module]
        total = sum(c.values())
        print(f"{module:45} {total:7} {c['killed']:7} {c['survived']:8} {c['no tests']:7} "
              f"{100 * c['killed'] / total:5.1f}%")
    new = 0
    for name, status in survivors:
        mark = "equivalent" if name in known else "NEW"
        new += mark == "NEW"
        print(f"  {status:9} {mark:10} {name}")
    stale = sorted(name for name, status in rows if name in known and status in CAUGHT)
    for name in stale:
        print(f"  killed    stale      {name}  (listed as equivalent: remove its row)")
    print(f"{len(rows)} mutants checked, {len(survivors)} not killed "
          f"({len(survivors) - new} listed as equivalent in docs/testing.md, {new} new)"
          + (f", {len(stale)} stale rows" if stale else ""))
    return 1 if strict and (new or stale) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
