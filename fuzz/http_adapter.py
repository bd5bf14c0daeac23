"""The one coupling between the HTTP fuzz targets and the root's HTTP/1.1 layer.

:func:`parse_requests` reads a client's byte stream and :func:`parse_response` a leaf's
answer the way the root does (the stream arriving in ``pieces``: one piece per read), through
the public API of :mod:`root_worker.service.http1`, and return neutral records. When the HTTP
layer changes, only this module changes: its two functions, and the error tuples the
parsers document (:data:`REQUEST_ERRORS`, :data:`RESPONSE_ERRORS`). The fuzz targets
(:mod:`fuzz.http_request`, :mod:`fuzz.http_response`) call nothing else of the HTTP layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from root_worker.service.http1 import (
    ChunkedDecoder,
    HttpError,
    find_head_end,
    parse_request,
)
from root_worker.service.http1 import (
    parse_response as parse_response_head,
)

#: What a malformed request stream may raise (each carries a status and a message).
REQUEST_ERRORS: tuple[type[BaseException], ...] = (HttpError,)
#: What a malformed leaf answer may raise.
RESPONSE_ERRORS: tuple[type[BaseException], ...] = (HttpError,)
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


def parse_requests(pieces: Sequence[bytes], max_body: int = MAX_BODY) -> list[Message]:
    """The complete requests of a pipelined client stream that arrived in ``pieces`` (a last
    incomplete request is not returned). Raises one of :data:`REQUEST_ERRORS`."""
    out: list[Message] = []
    rx = bytearray()
    head = None
    chunks: ChunkedDecoder | None = None
    body = bytearray()
    for piece in pieces:
        rx += piece
        while len(out) < MAX_REQUESTS:
            if head is None:
                end = find_head_end(rx)
                if end < 0:
                    break
                head = parse_request(bytes(rx[:end]))
                del rx[:end]
                if head.chunked:
                    chunks = ChunkedDecoder(body.extend, max_body)
                elif (head.content_length or 0) > max_body:
                    raise HttpError(413, "too_large", "body exceeds the limit")
            if chunks is not None:
                used = chunks.feed(memoryview(bytes(rx)))
                del rx[:used]
                if not chunks.done:
                    break
            else:
                need = (head.content_length or 0) - len(body)
                body += rx[:need]
                del rx[:need]
                if len(body) < (head.content_length or 0):
                    break
            out.append(Message(head.method, head.target, 0, head.minor,
                               tuple(head.headers.items()), bytes(body)))
            head, chunks, body = None, None, bytearray()
    return out


def parse_response(pieces: Sequence[bytes], max_body: int = MAX_BODY) -> Message | None:
    """A leaf's answer that arrived in ``pieces``, or None while it is incomplete. Raises one
    of :data:`RESPONSE_ERRORS`."""
    rx = bytearray()
    head = None
    chunks: ChunkedDecoder | None = None
    body = bytearray()
    for piece in pieces:
        if head is None:
            rx += piece
            end = find_head_end(rx)
            if end < 0:
                continue
            head = parse_response_head(bytes(rx[:end]))
            if head.content_length is not None and head.content_length > max_body:
                raise HttpError(502, "bad_reply", "answer exceeds the limit")
            if head.chunked:
                chunks = ChunkedDecoder(body.extend, max_body)
            piece = bytes(rx[end:])
        if chunks is not None:
            if not chunks.done:
                chunks.feed(memoryview(piece))
            continue
        body += piece
        if head.content_length is not None and len(body) > head.content_length:
            raise HttpError(502, "bad_reply", "more bytes than its Content-Length")
    if head is None or (chunks is not None and not chunks.done) or \
            (chunks is None and len(body) < (head.content_length or 0)):
        return None
    return Message("", "", head.status, head.minor, tuple(head.headers.items()), bytes(body))
