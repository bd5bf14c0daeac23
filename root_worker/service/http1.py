"""HTTP/1.1 message heads and chunked bodies, parsed from untrusted bytes under limits.

Runs in each root worker: the event worker (:mod:`root_worker.service.worker`) parses client
requests with it, the leaf client (:mod:`root_worker.service.fanout`) parses leaf answers.
Every problem raises :class:`HttpError` carrying the status to answer and a message that
names what is wrong; nothing here allocates more than the caller's limits allow.

Accepted: ``METHOD SP TARGET SP HTTP/1.x CRLF`` (a bare LF is tolerated as line end),
header fields ``name: value`` (no obsolete line folding, no space before the colon, no
control characters), ``Content-Length`` (digits only; repeated values must agree) or
``Transfer-Encoding: chunked`` (not both; any other coding is 501). Chunked bodies: hex
size, optional ``;extensions`` ignored, CRLF after each chunk's data, trailers skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_REQUEST_LINE = 8190  # gunicorn's limit_request_line default
MAX_HEADER_FIELDS = 100  # gunicorn's limit_request_fields default
MAX_CHUNK_LINE = 1024  # a chunk-size line with extensions
HEAD_END = b"\r\n\r\n"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/1\.([01])")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?")


class HttpError(Exception):
    """A malformed or unacceptable message: answer ``status`` with ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(slots=True)
class Head:
    """A parsed request or response head (header names lower-cased)."""

    method: str          # request: the method; response: ""
    target: str          # request: the raw request target; response: ""
    status: int          # response: the status code; request: 0
    minor: int           # HTTP/1.<minor>
    headers: dict[str, str]
    content_length: int | None
    chunked: bool

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.minor == 0:
            return "keep-alive" in conn
        return "close" not in conn

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


def find_head_end(buf: Any, start: int = 0) -> int:
    """Index just past the blank line ending a head in ``buf``, or -1."""
    i = buf.find(HEAD_END, start)
    if i >= 0:
        return i + 4
    j = buf.find(b"\n\n", start)  # bare-LF heads (tolerated)
    return j + 2 if j >= 0 else -1


def parse_request(raw: bytes, max_fields: int = MAX_HEADER_FIELDS,
                  max_line: int = MAX_REQUEST_LINE) -> Head:
    """Parse a request head (``raw`` ends with the blank line)."""
    lines = raw.rstrip(b"\r\n").replace(b"\r\n", b"\n").split(b"\n")
    first = lines[0]
    if len(first) > max_line:
        raise HttpError(414, "uri_too_long", f"request line of {len(first)} bytes exceeds "
                        f"{max_line}")
    parts = first.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise HttpError(400, "bad_request_line", f"malformed request line {first[:80]!r}")
    version = _VERSION.fullmatch(parts[2])
    if version is None:
        raise HttpError(505 if parts[2].startswith(b"HTTP/") else 400, "bad_version",
                        f"unsupported protocol {parts[2][:20]!r} (HTTP/1.0 or 1.1)")
    if _BAD_VALUE.search(parts[1]) or parts[1][:1] not in (b"/", b"*"):
        raise HttpError(400, "bad_request_line", "request target must be an origin form "
                        "path without control characters")
    headers = _fields(lines[1:], max_fields, 431)
    length, chunked = _framing(headers)
    return Head(parts[0].decode("ascii"), parts[1].decode("latin-1"), 0,
                int(version.group(1)), headers, length, chunked)


def parse_response(raw: bytes, max_fields: int = MAX_HEADER_FIELDS) -> Head:
    """Parse a response head; a malformed one raises HttpError with status 502."""
    lines = raw.rstrip(b"\r\n").replace(b"\r\n", b"\n").split(b"\n")
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise HttpError(502, "bad_reply", f"malformed status line {lines[0][:80]!r}")
    try:
        headers = _fields(lines[1:], max_fields, 502)
        length, chunked = _framing(headers)
    except HttpError as exc:
        raise HttpError(502, "bad_reply", exc.message) from None
    return Head("", "", int(m.group(2)), int(m.group(1)), headers, length, chunked)


def _fields(lines: list[bytes], max_fields: int, too_many: int) -> dict[str, str]:
    if len(lines) > max_fields:
        raise HttpError(too_many, "too_many_headers", f"{len(lines)} header fields exceed "
                        f"the limit of {max_fields}")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "bad_header", f"malformed header line {line[:80]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise HttpError(400, "bad_header", f"header {name.decode()!r} holds a control "
                            "character")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise HttpError(400, "bad_length", "conflicting Content-Length headers")
            text = headers[key] if key == "content-length" else f"{headers[key]}, {text}"
        headers[key] = text
    return headers


def _framing(headers: dict[str, str]) -> tuple[int | None, bool]:
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    if te is not None:
        if cl is not None:
            raise HttpError(400, "bad_framing", "both Content-Length and Transfer-Encoding")
        if te.strip().lower() != "chunked":
            raise HttpError(501, "unsupported_encoding", f"Transfer-Encoding {te[:40]!r}: "
                            "only chunked is supported")
        return None, True
    if cl is None:
        return None, False
    if not cl.isdigit() or len(cl) > 19:
        raise HttpError(400, "bad_length", f"Content-Length {cl[:40]!r} is not a number")
    return int(cl), False


class ChunkedDecoder:
    """Incremental chunked-body decoder writing the data into a caller's buffer.

    ``feed(data)`` consumes bytes and returns how many it used (the rest belongs to the next
    message once ``done``); decoded bytes go to ``sink(view)``. ``limit`` caps the decoded
    size (413). Malformed framing raises HttpError 400 naming the fault.
    """

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self, sink: Any, limit: int) -> None:
        self._sink = sink
        self._limit = limit
        self._state = self._SIZE
        self._line = bytearray()
        self._left = 0
        self.total = 0
        self.done = False

    def feed(self, data: memoryview) -> int:
        pos, n = 0, len(data)
        while pos < n and not self.done:
            if self._state == self._DATA:
                take = min(self._left, n - pos)
                self._sink(data[pos:pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state = self._DATA_END
                continue
            pos = self._line_step(data, pos, n)
        return pos

    def _line_step(self, data: memoryview, pos: int, n: int) -> int:
        end = bytes(data[pos:min(n, pos + MAX_CHUNK_LINE + 2)]).find(b"\n")
        if end < 0:
            self._line += data[pos:n]
            if len(self._line) > MAX_CHUNK_LINE:
                raise HttpError(400, "bad_chunked", "chunk line longer than "
                                f"{MAX_CHUNK_LINE} bytes")
            return n
        self._line += data[pos:pos + end]
        line = bytes(self._line).rstrip(b"\r")
        self._line.clear()
        self._on_line(line)
        return pos + end + 1

    def _on_line(self, line: bytes) -> None:
        if self._state == self._DATA_END:
            if line:
                raise HttpError(400, "bad_chunked", "chunk data not followed by CRLF")
            self._state = self._SIZE
        elif self._state == self._SIZE:
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 16 or \
                    not re.fullmatch(rb"[0-9A-Fa-f]+", size_text):
                raise HttpError(400, "bad_chunked", f"bad chunk size {line[:40]!r}")
            size = int(size_text, 16)
            if self.total + size > self._limit:
                raise HttpError(413, "too_large", f"chunked body exceeds the limit of "
                                f"{self._limit} bytes (FT_MAX_REQUEST_BYTES)")
            self.total += size
            self._left = size
            self._state = self._DATA if size else self._TRAILER
        elif not line:  # _TRAILER: the blank line ends the message
            self.done = True


def response_head(status: int, reason: str, headers: list[tuple[str, str]],
                  length: int, keep_alive: bool) -> bytes:
    """A response head with Content-Length and Connection set."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {length}")
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


STATUS_TEXT = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
               408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
               414: "URI Too Long", 431: "Request Header Fields Too Large",
               500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
               503: "Service Unavailable", 505: "HTTP Version Not Supported"}
JSON = "application/json"
Answer = tuple[int, list[tuple[str, str]], bytes]


def status_text(status: int) -> str:
    return STATUS_TEXT.get(status, "Error")


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def dumps_json(doc: Any) -> str:
    """The one encoding of every JSON answer: compact, strict (no NaN or Infinity)."""
    return _ENCODER.encode(doc)


def json_body(status: int, doc: Any) -> Answer:
    """``(status, headers, body)`` of a JSON answer (strict JSON: no NaN)."""
    return status, [("Content-Type", JSON)], dumps_json(doc).encode()


def error_body(status: int, code: str, message: str) -> Answer:
    """The one error shape: ``{"error": {"code": ..., "message": ...}}``."""
    return json_body(status, {"error": {"code": code, "message": message}})
