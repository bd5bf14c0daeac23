"""Leaf answers in, client answers out: the JSON at both ends of ``POST /score``.

Runs in each root worker (imported by the event worker, so no prometheus_client here).
:func:`leaf_reply` checks a leaf's answer (a JSON object whose ``scores`` are finite
numbers, the leaf contract) and keeps what the client gets. The common answer -- a flat
array of plain numbers first in the object, as the leaf SDK writes it -- is found by one
regular expression once the reply parsed, and its text is kept (:class:`RawJSON`), which
:func:`answer_body` splices into the client's answer unchanged: printing 64 floats per target
again costs more than everything else in the answer. Any other shape is re-encoded (strict
JSON either way).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from root_worker.service.fanout import LeafError
from root_worker.service.http1 import JSON, Answer, dumps_json, json_body


class RawJSON:
    """A JSON value with its text: :func:`answer_body` splices the text into the answer as
    the leaf wrote it (printing 64 floats per target again costs more than the rest of the
    answer); ``value`` is what it parsed to."""

    __slots__ = ("text", "value")

    def __init__(self, text: str, value: Any) -> None:
        self.text, self.value = text, value


# The text of a flat array of numbers that is the first member of the object, as the leaf
# SDK writes it. Only used once the whole reply parsed as strict JSON and is the only
# "scores" member, so the text is that member's value, and a valid JSON array.
_SCORES_TEXT = re.compile(rb'\s*\{\s*"scores"\s*:\s*(\[[-+.eE0-9,\s]*\])')


def leaf_reply(url: str, status: int, data: bytes, candidates: int | None = None
               ) -> dict[str, Any]:
    """The fields of a leaf's answer the client gets; raises LeafError if unusable.

    ``candidates``: the request's candidate count; a reply with more scores than that is
    ``bad_reply`` (what the client gets is bounded by what it asked for)."""
    try:  # C-speed parse; NaN/Infinity literals refused here, overflowed floats below
        doc = _DECODER.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        doc = None
    if status != 200:
        detail = doc.get("error") if isinstance(doc, dict) else data[:200].decode("utf-8",
                                                                                 "replace")
        raise LeafError("status", f"{url} answered {status}: {detail}", status)
    if not isinstance(doc, dict) or not isinstance(doc.get("scores"), list):
        raise LeafError("bad_reply", f"{url} answered 200 without a JSON object with scores")
    scores = doc["scores"]
    if candidates is not None and len(scores) > max(candidates, 1):
        raise LeafError("bad_reply", f"{url} answered {len(scores)} scores for "
                        f"{candidates} candidates")
    if not _finite(scores):  # 1e999 parses as inf: not re-encodable as strict JSON
        raise LeafError("bad_reply", f"{url} answered scores that are not finite numbers")
    reply: dict[str, Any] = {"scores": scores}
    m = _SCORES_TEXT.match(data)
    if m is not None and data.count(b'"scores"') == 1:
        reply["scores"] = RawJSON(m.group(1).decode("ascii"), scores)
    if "version" in doc:
        reply["leaf_version"] = doc["version"]
    return reply


def materialize(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with every target's :class:`RawJSON` scores parsed (the synchronous path)."""
    for t in doc.get("targets", ()):
        if isinstance(t.get("scores"), RawJSON):
            t["scores"] = t["scores"].value
    return doc


def answer_body(status: int, doc: dict[str, Any]) -> Answer:
    """The JSON answer of a ``/score`` document, raw scores spliced in as they came."""
    targets = doc.get("targets")
    if not targets or not any(isinstance(t.get("scores"), RawJSON) for t in targets):
        return json_body(status, doc)
    pieces = []
    for t in targets:
        raw = t.get("scores")
        if isinstance(raw, RawJSON):
            rest = dumps_json({k: v for k, v in t.items() if k != "scores"})
            pieces.append(f'{rest[:-1]}{"," if len(rest) > 2 else ""}"scores":{raw.text}}}')
        else:
            pieces.append(dumps_json(t))
    head = dumps_json({k: v for k, v in doc.items() if k != "targets"})
    text = f'{head[:-1]}{"," if len(head) > 2 else ""}"targets":[{",".join(pieces)}]}}'
    return status, [("Content-Type", JSON)], text.encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a score")


# one decoder (json.loads with arguments builds a new one per call); the bytes are decoded
# as json.loads decodes them (UTF-8, a BOM ignored, UTF-16/32 detected)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _finite(scores: list[Any]) -> bool:
    """Whether ``scores`` can be re-encoded as strict JSON (no inf from an overflow) and
    read back as doubles (an integer of 400 digits cannot)."""
    try:
        return all(map(math.isfinite, scores))  # the common case, flat numbers, at C speed
    except OverflowError:
        return False
    except TypeError:  # nested lists or other values: the strict encoder judges
        try:
            json.dumps(scores, allow_nan=False)
        except (ValueError, RecursionError):
            return False
        return True
