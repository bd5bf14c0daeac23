"""The one coupling between the HTTP fuzz targets and the root's HTTP/1.1 layer.

:func:`parse_requests` reads a client's byte stream and :func:`parse_response` a leaf's
answer the way the root does (the stream arriving in ``pieces``: one piece per read), through
the public API of :mod:`root_worker.service.http1` (llhttp through httptools:
:class:`~root_worker.service.http1.RequestStream` and
:class:`~root_worker.service.http1.ReplyParser`), and return neutral records. When the HTTP
layer changes, only this module changes: its two functions, and the error tuples the parsers
document (:data:`REQUEST_ERRORS`, :data:`RESPONSE_ERRORS`). The fuzz targets
(:mod:`fuzz.http_request`, :mod:`fuzz.http_response`) call nothing else of the HTTP layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from root_worker.service.http1 import HttpError, ReplyParser, RequestStream

#: What a malformed request stream may raise (each carries a status and a message).
REQUEST_ERRORS: tuple[type[BaseException], ...] = (HttpError,)
#: What a malformed leaf answer may raise (502 bad_reply).
RESPONSE_ERRORS: tuple[type[BaseException], ...] = (HttpError,)
MAX_HEAD = 32 << 10  # FT_MAX_HEADER_BYTES's default
MAX_BODY = 1 << 20  # the fuzz run's FT_MAX_REQUEST_BYTES / FT_MAX_LEAF_REPLY_BYTES
MAX_REQUESTS = 256


class Message(NamedTuple):
    """A parsed request (``status`` 0) or answer (``method``/``target`` empty)."""

    method: str
    target: str
    status: int
    minor: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    keep_alive: bool


def parse_requests(pieces: Sequence[bytes], max_body: int = MAX_BODY) -> list[Message]:
    """The complete requests of a pipelined client stream that arrived in ``pieces`` (a last
    incomplete request is not returned). Raises one of :data:`REQUEST_ERRORS`."""
    stream = RequestStream(MAX_HEAD, max_body)
    out: list[Message] = []
    for piece in pieces:
        stream.feed(piece)
        while stream.done and len(out) < MAX_REQUESTS:
            m = stream.done.popleft()
            out.append(Message(m.method, m.target, 0, m.minor, tuple(m.headers.items()),
                               bytes(m.store or b""), m.keep_alive))
    return out


def parse_response(pieces: Sequence[bytes], max_body: int = MAX_BODY) -> Message | None:
    """A leaf's answer that arrived in ``pieces`` (read as the root reads it: until the answer
    is complete, or the leaf closed after the last piece), or None if it is incomplete.
    Raises one of :data:`RESPONSE_ERRORS`."""
    reply = ReplyParser(max_body)
    if not any(reply.feed(piece) for piece in pieces) and not reply.eof():
        return None
    return Message("", "", reply.status, 1, tuple(reply.headers.items()), bytes(reply.body),
                   reply.keep_alive)
