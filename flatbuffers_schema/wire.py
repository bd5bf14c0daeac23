"""The root <-> leaf HTTP contract: the one home of every name both sides spell.

Used by the root service (:mod:`root_worker.service`), the reference leaf
(:mod:`root_worker.leaf`) and any leaf written against ``docs/frame-format.md``. Standard
library only, so a leaf imports it without the root's world.

``POST /score?model=NAME[&version=V]`` (``SCORE_PATH``, ``QUERY_MODEL``, ``QUERY_VERSION``)
    body: one frame (``docs/frame-format.md``), ``Content-Type: application/x-ft-frame``,
    optionally compressed as an lz4 *frame* (``Content-Encoding: lz4``).
    ``X-FT-Trimmed-For: V`` says the root trimmed the frame to version V's allowlist.
    ``X-Request-Id`` carries the client's request id when it is header-safe.

Answers (``Content-Type: application/json``):
    200 ``{"scores": [...], "version": ..., ...}``: ``scores`` (a list) is required, every
    other field optional; ``version`` is the version the leaf actually served.
    409 (version skew): the frame was trimmed for another version and lacks
    features this leaf's version needs; the root re-sends it untrimmed. The body
    ``{"error": ..., "version": V}`` names the version V the leaf serves, and the root
    trims that leaf's version-less requests for V from then on (as it does from the
    ``version`` of a 200 answer).
    4xx / 5xx: ``{"error": "..."}``.
"""

from __future__ import annotations

SCORE_PATH = "/score"
QUERY_MODEL = "model"
QUERY_VERSION = "version"

FRAME_CONTENT_TYPE = "application/x-ft-frame"
JSON_CONTENT_TYPE = "application/json"

ENCODING_HEADER = "Content-Encoding"
ENCODING_IDENTITY = "identity"
ENCODING_LZ4 = "lz4"

TRIMMED_FOR_HEADER = "X-FT-Trimmed-For"
REQUEST_ID_HEADER = "X-Request-Id"

STATUS_SKEW = 409  # trimmed for another version, lacking features this version needs

REPLY_SCORES = "scores"  # required in a 200 answer
REPLY_VERSION = "version"  # optional: the version the leaf served
REPLY_ERROR = "error"  # every error answer


# Model names and versions travel as-is in the query (``?model=``, ``?target=MODEL@VERSION``)
# and in X-FT-Trimmed-For: the bundle validator accepts only this alphabet (RFC 3986
# "unreserved" characters), and the root re-checks what it sends.
NAME_ALPHABET = "A-Z a-z 0-9 . _ - ~"
NAME_PATTERN = r"[A-Za-z0-9._~-]+"
