"""Fuzz target: the score request's targets -- ``parse_targets(metadata, query, max)``.

Input: one byte for the limit, the query string (latin-1, as the worker hands it over) up
to the first newline, then the metadata as JSON (an input whose JSON is not an object
fuzzes the query alone). Only :class:`~root_worker.service.targets.BadTargets` may escape;
what is accepted is a non-empty list within the limit of non-empty names.
"""

from __future__ import annotations

import json
from typing import Any

import atheris

with atheris.instrument_imports(include=["root_worker.service.targets", "fuzz"]):
    from fuzz.harness import Finding, main
    from root_worker.service.targets import BadTargets, parse_targets


def test_one_input(data: bytes) -> None:
    if not data:
        return
    limit = 1 + data[0] % 70
    query, _, meta_raw = data[1:].partition(b"\n")
    metadata: Any = {}
    try:
        metadata = json.loads(meta_raw)
    except (ValueError, RecursionError):
        pass
    if not isinstance(metadata, dict):
        metadata = {}
    try:
        targets = parse_targets(metadata, query.decode("latin-1"), limit)
    except BadTargets:
        return
    if not 0 < len(targets) <= limit:
        raise Finding(f"{len(targets)} targets accepted, the limit is {limit}")
    for t in targets:
        if not (isinstance(t.model, str) and t.model) or \
                not (t.version is None or (isinstance(t.version, str) and t.version)):
            raise Finding(f"accepted {t!r}")


if __name__ == "__main__":
    main(test_one_input)
