"""HTTP/1.1 framing of untrusted bytes: llhttp (through ``httptools``) under limits.

Runs in each root worker: the event worker (:mod:`root_worker.service.worker`) reads client
requests with :class:`RequestStream`, the leaf client (:mod:`root_worker.service.fanout`)
reads leaf answers with :class:`ReplyParser`. The grammar -- request and status lines, header
fields, Content-Length and chunked framing, chunk extensions, trailers -- is llhttp's, the
parser Node.js runs, fuzzed continuously; nothing here parses HTTP syntax by hand. What this
module adds is policy, applied once llhttp has framed a message:

* limits: request line (414), head bytes and header fields (431), trailer fields and bytes
  (431), body bytes (413), chunks of a few bytes each (400: each costs a callback); every
  limit is checked while bytes arrive, so nothing here holds more than the caller's limits
  allow;
* RFC 9112 rules llhttp leaves to the server: HTTP/1.0 or 1.1 only (505); exactly one
  ``Host`` in HTTP/1.1 (400); ``Transfer-Encoding`` in HTTP/1.0 is faulty framing (400, and
  the connection closes); only the ``chunked`` coding (501); ``Expect: 100-continue`` only in
  HTTP/1.1; absolute-form targets served as their path and query;
* llhttp's own refusals -- both Content-Length and Transfer-Encoding, conflicting or
  non-numeric Content-Length, obsolete line folding, control characters, a bare LF -- are a
  400 naming llhttp's reason. A bare LF is refused wherever it falls, so the answer does not
  depend on how TCP cut the bytes.

Every refusal raises :class:`HttpError` carrying the status to answer and a message that
names what is wrong.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools

MAX_REQUEST_LINE = 8190  # gunicorn's limit_request_line default
MAX_HEADER_FIELDS = 100  # gunicorn's limit_request_fields default (also for trailers)
MAX_REPLY_HEAD = 16 << 10  # a leaf answer's head
_FIELD_OVERHEAD = 4  # ": " and CRLF around each field, counted against the head's size
# A chunked body of many tiny chunks costs a Python callback per chunk (llhttp de-chunks in
# C, the data arrives one callback per piece): past MAX_SMALL_PIECES pieces, a body whose
# pieces average under MIN_PIECE_BYTES is refused (400) rather than burning the worker's CPU.
MAX_SMALL_PIECES = 4096
MIN_PIECE_BYTES = 64
# llhttp's refusals (its reason text) sorted into this service's error codes, first match
_REFUSAL_CODES = (("chunk", "bad_chunked"), ("content-length", "bad_length"),
                  ("transfer-encoding", "bad_framing"), ("header", "bad_header"))


class HttpError(Exception):
    """A malformed or unacceptable message: answer ``status`` with ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Message:
    """One request as llhttp framed it: its head, and how much of its body arrived.

    ``store`` belongs to the consumer (where the body bytes went)."""

    __slots__ = ("method", "target", "path", "query", "minor", "headers", "hosts",
                 "content_length", "chunked", "keep_alive", "expect_continue", "headed",
                 "complete", "received", "pieces", "head_bytes", "fields", "store")

    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.path = ""
        self.query = ""
        self.minor = 1
        self.headers: dict[str, str] = {}
        self.hosts = 0
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = False
        self.expect_continue = False
        self.headed = False       # the head is parsed and accepted
        self.complete = False     # the whole body arrived
        self.received = 0         # body bytes so far
        self.pieces = 0           # body pieces llhttp delivered (chunks, or parts of one)
        self.head_bytes = 0       # request line + fields (+ trailers), as llhttp saw them
        self.fields = 0
        self.store: Any = None

    @property
    def is_head(self) -> bool:
        return self.method == "HEAD"

    @property
    def body_rest(self) -> int:
        """Content-Length body bytes still to come (0 for chunked or no body)."""
        if self.content_length is None:
            return 0
        return self.content_length - self.received

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")


def _accumulate(msg: Message, data: bytes) -> None:
    """The default body sink: the body in ``msg.store`` (a bytearray)."""
    if msg.store is None:
        msg.store = bytearray()
    msg.store += data


class RequestStream:
    """The requests of one client connection, framed by llhttp as bytes are fed.

    ``feed(data)`` parses; each request whose body is complete is appended to :attr:`done`
    (in order); the one still arriving is :attr:`msg`. ``on_head(msg)`` runs when a head is
    accepted, ``on_body(msg, data)`` receives body bytes (de-chunked by llhttp). A refusal
    raises :class:`HttpError`; the requests completed before it stay in :attr:`done`, and the
    stream takes no more bytes. A Content-Length body may be read by the caller straight
    from the socket instead (:meth:`body_arrived`).
    """

    def __init__(self, max_head: int, max_body: int,
                 on_body: Callable[[Message, bytes], None] = _accumulate,
                 on_head: Callable[[Message], None] | None = None,
                 max_line: int = MAX_REQUEST_LINE, max_fields: int = MAX_HEADER_FIELDS) -> None:
        self.max_head, self.max_body = max_head, max_body
        self.max_line, self.max_fields = max_line, max_fields
        self._sink, self._on_head = on_body, on_head  # (not on_*: llhttp's callback names)
        self.done: deque[Message] = deque()
        self.msg: Message | None = None
        self.closed = False       # no more requests on this connection (error or upgrade)
        self._unheaded = 0        # bytes fed since the current head began
        self._error: BaseException | None = None
        self._hp = httptools.HttpRequestParser(self)

    # -- feeding -------------------------------------------------------------------------
    def feed(self, data: Any) -> None:
        """Parse ``data`` (bytes or a memoryview); raises HttpError."""
        if self.closed:
            return
        msg = self.msg
        if msg is None or not msg.headed:  # (the head may end inside this piece: counted
            if self._unheaded > self.max_head + MAX_REQUEST_LINE:  # after the check)
                self.closed = True
                raise HttpError(431, "header_too_large", "request head exceeds "
                                f"{self.max_head} bytes (FT_MAX_HEADER_BYTES)")
            self._unheaded += len(data)
        self._error = None
        try:
            self._hp.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgraded()
        except httptools.HttpParserError as exc:
            self.closed = True
            err = self._error
            if isinstance(err, HttpError):
                raise err from None
            if err is not None:  # not a refusal: a fault of the consumer's callback
                raise err from None
            raise self._refusal(exc) from None

    def _refusal(self, exc: Exception) -> HttpError:
        """llhttp's refusal as an answer: its reason, sorted into our error codes."""
        reason = str(exc) or type(exc).__name__
        msg = self.msg
        where = f"{msg.method} {msg.path[:80]}" if msg is not None and msg.headed else \
            "request head"
        low = reason.lower()
        if "transfer-encoding" in low and "invalid" in low:
            return HttpError(501, "unsupported_encoding", f"{where}: {reason}: only chunked "
                             "is supported")
        code = next((c for key, c in _REFUSAL_CODES if key in low), "bad_request_line")
        if isinstance(exc, httptools.HttpParserInvalidURLError):
            code = "bad_request_line"
        return HttpError(400, code, f"malformed {where}: {reason}")

    def _upgraded(self) -> None:
        """An Upgrade or CONNECT request: served as a plain request (this root switches no
        protocol), and nothing after it is read."""
        self.closed = True
        msg = self.msg
        if msg is not None:  # CONNECT: llhttp stops at its head
            self.msg = None
            msg.complete = True
            self.done.append(msg)
        if self.done:
            self.done[-1].keep_alive = False

    def body_arrived(self, n: int) -> None:
        """The caller put ``n`` more body bytes of :attr:`msg` (a Content-Length body) in
        place itself, straight from the socket; llhttp never sees them, so once the body is
        complete the next request starts on a fresh parser."""
        msg = self.msg
        assert msg is not None and msg.content_length is not None and n <= msg.body_rest
        msg.received += n
        if not msg.body_rest:
            self._hp = httptools.HttpRequestParser(self)
            self._complete()

    # -- llhttp callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.msg = Message()

    def on_url(self, url: bytes) -> None:
        msg = self.msg
        assert msg is not None
        msg.target += url.decode("latin-1")  # llhttp refused anything but visible ASCII
        msg.head_bytes += len(url)
        if len(msg.target) > self.max_line:
            self._fail(HttpError(414, "uri_too_long", f"request target exceeds "
                                 f"{self.max_line} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        msg = self.msg
        assert msg is not None
        msg.fields += 1
        msg.head_bytes += len(name) + len(value) + _FIELD_OVERHEAD
        if msg.fields > self.max_fields:
            what = "trailer" if msg.headed else "header"
            self._fail(HttpError(431, "too_many_headers", f"more than {self.max_fields} "
                                 f"{what} fields"))
        if msg.head_bytes > self.max_head:
            what = "trailers" if msg.headed else "request head"
            self._fail(HttpError(431, "header_too_large", f"{what} exceed {self.max_head} "
                                 "bytes (FT_MAX_HEADER_BYTES)"))
        if msg.headed:
            return  # a trailer field: counted, not kept
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key == "host":
            msg.hosts += 1
        old = msg.headers.get(key)
        msg.headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        try:
            self._accept_head()
        except BaseException as exc:  # a refusal, or a fault of the consumer's on_head
            self._fail(exc)

    def _accept_head(self) -> None:
        msg = self.msg
        assert msg is not None
        hp = self._hp
        version = hp.get_http_version()
        if version not in ("1.1", "1.0"):
            raise HttpError(505, "bad_version", f"unsupported protocol HTTP/{version[:8]} "
                            "(HTTP/1.0 or 1.1)")
        msg.minor = 1 if version == "1.1" else 0
        msg.method = hp.get_method().decode("ascii")
        msg.keep_alive = hp.should_keep_alive()
        self._target(msg)
        headers = msg.headers
        if msg.minor == 1 and msg.hosts != 1:
            raise HttpError(400, "bad_host", "an HTTP/1.1 request needs exactly one Host "
                            f"header, not {msg.hosts}")
        te = headers.get("transfer-encoding")
        if te is not None:
            if msg.minor == 0:
                raise HttpError(400, "bad_framing", "Transfer-Encoding in an HTTP/1.0 request")
            if te.strip().lower() != "chunked":
                raise HttpError(501, "unsupported_encoding", f"Transfer-Encoding {te[:40]!r}: "
                                "only chunked is supported")
            msg.chunked = True
        cl = headers.get("content-length")
        if cl is not None:
            msg.content_length = int(cl)  # llhttp accepted only digits, one value
            if msg.content_length > self.max_body:
                raise HttpError(413, "too_large", f"body of {msg.content_length} bytes "
                                f"exceeds the limit of {self.max_body} bytes "
                                "(FT_MAX_REQUEST_BYTES)")
        msg.expect_continue = msg.minor == 1 and \
            "100-continue" in headers.get("expect", "").lower()
        if self._on_head is not None:
            self._on_head(msg)
        msg.headed = True
        self._unheaded = 0

    @staticmethod
    def _target(msg: Message) -> None:
        target = msg.target
        if target[:1] != "/":
            if target[:7].lower() == "http://" or target[:8].lower() == "https://":
                try:  # absolute-form: served as its path and query
                    url = httptools.parse_url(target.encode("latin-1"))
                except httptools.HttpParserInvalidURLError:
                    raise HttpError(400, "bad_request_line", "malformed absolute-form "
                                    f"target {target[:80]!r}") from None
                msg.path = (url.path or b"/").decode("latin-1")
                msg.query = (url.query or b"").decode("latin-1")
                return
            if target != "*":
                raise HttpError(400, "bad_request_line", "request target must be a path or "
                                f"an absolute URL, not {target[:80]!r}")
        path, _, query = target.partition("?")
        msg.path, msg.query = path, query.partition("#")[0]

    def on_body(self, data: bytes) -> None:
        msg = self.msg
        assert msg is not None
        msg.received += len(data)
        msg.pieces += 1
        if msg.received > self.max_body:
            self._fail(HttpError(413, "too_large", f"chunked body exceeds the limit of "
                                 f"{self.max_body} bytes (FT_MAX_REQUEST_BYTES)"))
        if msg.pieces > MAX_SMALL_PIECES and msg.received < msg.pieces * MIN_PIECE_BYTES:
            self._fail(HttpError(400, "bad_chunked", f"chunked body of {msg.pieces} chunks "
                                 f"averaging under {MIN_PIECE_BYTES} bytes: send larger "
                                 "chunks (or a Content-Length)"))
        try:
            self._sink(msg, data)
        except BaseException as exc:
            self._fail(exc)

    def on_message_complete(self) -> None:
        self._complete()

    def _complete(self) -> None:
        msg, self.msg = self.msg, None
        assert msg is not None
        msg.complete = True
        self.done.append(msg)

    def _fail(self, exc: BaseException) -> None:
        """Stop llhttp from a callback: ``feed`` raises ``exc``."""
        self._error = exc
        raise exc


class ReplyParser:
    """A leaf's answer, framed by llhttp: status, headers, body under ``max_body``.

    ``feed(data)`` returns True once the answer is complete (:attr:`status`,
    :attr:`headers`, :attr:`body`, :attr:`keep_alive`); ``eof()`` at the peer's close
    returns whether the answer was complete by then (an answer delimited by the close).
    Interim 1xx answers are skipped. Every fault raises HttpError 502 ``bad_reply``.
    """

    def __init__(self, max_body: int, max_head: int = MAX_REPLY_HEAD) -> None:
        self.max_body, self.max_head = max_body, max_head
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.keep_alive = False
        self.complete = False
        self.headed = False
        self.head_bytes = 0
        self._delimited_by_close = False
        self._more = False  # bytes of a second answer followed
        self._error: HttpError | None = None
        self._hp = httptools.HttpResponseParser(self)

    def feed(self, data: Any) -> bool:
        if self.complete:  # bytes after the answer: the connection is not reusable
            self.keep_alive = False
            return True
        if not self.headed:  # bytes fed before the head ended (at most one read over)
            if self.head_bytes > self.max_head:
                raise HttpError(502, "bad_reply", f"answer head exceeds {self.max_head} bytes")
            self.head_bytes += len(data)
        self._error = None
        try:
            self._hp.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise HttpError(502, "bad_reply", "the leaf switched protocols") from None
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            if self.complete:  # garbage after a complete answer: not reusable, answer kept
                self.keep_alive = False
                return True
            raise HttpError(502, "bad_reply", f"malformed answer: {exc}") from None
        if self.complete and self._more:
            self.keep_alive = False
        return self.complete

    def eof(self) -> bool:
        """The peer closed: whether the answer is complete (delimited by the close)."""
        if not self.complete and self._delimited_by_close:
            self.complete = True
            self.keep_alive = False
        return self.complete

    # -- llhttp callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:
            self._more = True  # a second answer: only one was asked for

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        if not self.headed:
            self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")
            if len(self.headers) > MAX_HEADER_FIELDS:
                self._fail(f"more than {MAX_HEADER_FIELDS} header fields")

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self._hp.get_status_code()
        if 100 <= status < 200:  # interim (100 Continue): the real answer follows
            self.headers = {}
            return
        self.status = status
        self.headed = True
        self.keep_alive = self._hp.should_keep_alive()
        h = self.headers
        cl = h.get("content-length")
        if cl is not None and int(cl) > self.max_body:
            self._fail(f"answer of {cl} bytes exceeds FT_MAX_LEAF_REPLY_BYTES={self.max_body}")
        self._delimited_by_close = cl is None and "transfer-encoding" not in h

    def on_body(self, data: bytes) -> None:
        if self.complete:
            return
        self.body += data
        if len(self.body) > self.max_body:
            self._fail(f"answer exceeds FT_MAX_LEAF_REPLY_BYTES={self.max_body}")

    def on_message_complete(self) -> None:
        if self.headed and not self.complete:
            self.complete = True

    def _fail(self, message: str) -> None:
        self._error = HttpError(502, "bad_reply", message)
        raise self._error


def response_head(status: int, reason: str, headers: list[tuple[str, str]],
                  length: int, keep_alive: bool, minor: int = 1) -> bytes:
    """A response head with Content-Length and Connection set (an HTTP/1.0 client that
    asked to keep the connection is told it is kept)."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {length}")
    if not keep_alive:
        lines.append("Connection: close")
    elif minor == 0:
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


STATUS_TEXT = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
               408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
               414: "URI Too Long", 431: "Request Header Fields Too Large",
               500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
               503: "Service Unavailable", 504: "Gateway Timeout",
               505: "HTTP Version Not Supported"}
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
