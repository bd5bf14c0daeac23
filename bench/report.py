"""What every benchmark in bench/ writes: one JSON document in bench/results/ with the
benchmark's name, the command that ran it and the machine it ran on (results are
gitignored; the closing notes quote them)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}


def write_results(path: Path | str, benchmark: str, doc: dict[str, Any]) -> Path:
    """Write ``doc`` (after the name, command and machine) to ``path`` as indented JSON,
    making the directory, and say so."""
    path = Path(path)
    head = {"benchmark": benchmark, "command": " ".join(["python", *sys.argv]),
            "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(head | doc, indent=2) + "\n")
    print(f"wrote {path}")
    return path
