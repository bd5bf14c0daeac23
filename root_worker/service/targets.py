"""Which models a score request asks for: parsed from the frame metadata or the query string.

A request names its targets either in the frame's JSON metadata (what a client library
does; trim keeps the metadata, so leaves see it too)::

    {"request_id": "r-17", "targets": ["ads_ctr", {"model": "ads_cvr", "version": "3"}]}

or, for ``curl`` and quick tests, in the query string, which then takes precedence::

    POST /score?target=ads_ctr&target=ads_cvr@3

A target is a model name and an optional version (a JSON integer is taken as its decimal
string; in the query string the version follows the first ``@``). Percent-escapes in the
query string must decode to UTF-8 (``%ff`` is an error, not U+FFFD). Every problem raises
:class:`BadTargets` with a message naming the offending entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs

MAX_NAME_BYTES = 1024  # the bundle validator's default name limit


class BadTargets(ValueError):
    """The request's targets are missing or malformed."""


@dataclass(frozen=True, slots=True)
class Target:
    model: str
    version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version}


def parse_targets(metadata: dict[str, Any], query: str, max_targets: int) -> list[Target]:
    """The request's targets, in order (duplicates are kept: each gets its own result)."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False,
                          max_num_fields=max_targets + 16, errors="strict")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start:exc.end]
        raise BadTargets(f"query string: percent-escaped bytes {bad!r} are not UTF-8 "
                         f"({exc.reason})") from None
    except ValueError as exc:
        raise BadTargets(f"query string: {exc}") from None
    if "target" in params:
        targets = [_from_query(raw) for raw in params["target"]]
        where = "query parameter 'target'"
    elif "targets" in metadata:
        targets = _from_metadata(metadata["targets"])
        where = "metadata 'targets'"
    else:
        raise BadTargets("no targets: put \"targets\": [\"model\", {\"model\": ..., "
                         "\"version\": ...}] in the frame metadata or ?target=MODEL[@VERSION] "
                         "in the query string")
    if not targets:
        raise BadTargets(f"{where} is empty")
    if len(targets) > max_targets:
        raise BadTargets(f"{where} names {len(targets)} targets, the limit is {max_targets}")
    return targets


def _from_query(raw: str) -> Target:
    model, sep, version = raw.partition("@")
    where = f"target={raw!r}"
    _check_name(model, where, "model")
    if sep:
        _check_name(version, where, "version")
    return Target(model, version if sep else None)


def _from_metadata(doc: Any) -> list[Target]:
    if not isinstance(doc, list):
        raise BadTargets(f"metadata 'targets' must be a list, got {type(doc).__name__}")
    out = []
    for i, entry in enumerate(doc):
        where = f"metadata targets[{i}]"
        if isinstance(entry, str):
            _check_name(entry, where, "model")
            out.append(Target(entry))
            continue
        if not isinstance(entry, dict):
            raise BadTargets(f"{where} must be a model name or an object {{\"model\", "
                             f"\"version\"}}, got {type(entry).__name__}")
        model = entry.get("model")
        version = entry.get("version")
        _check_name(model, where, "model")
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)
        if version is not None:
            _check_name(version, where, "version")
        out.append(Target(cast(str, model), cast("str | None", version)))  # checked above
    return out


def _check_name(value: Any, where: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise BadTargets(f"{where}: {what} must be a non-empty string, got {value!r}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadTargets(f"{where}: {what} is not valid Unicode (lone surrogate)") from None
    if size > MAX_NAME_BYTES:
        raise BadTargets(f"{where}: {what} is longer than {MAX_NAME_BYTES} bytes")
