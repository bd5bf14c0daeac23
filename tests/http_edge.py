"""The HTTP edge harness: a real one-worker root pool with a real leaf, raw request streams
sent in chosen TCP pieces, and answers read back by an independent, strict HTTP/1.1 parser.

Used by ``tests/test_http_conformance.py`` and ``tests/test_http_fuzz.py``. The answers are
parsed with ``h11`` (a well-kept client-side HTTP/1.1 implementation, not the root's own
parser), one answer per request in order; the request's method tells whether the answer has
a body (HEAD: never). Anything h11 refuses, a truncated answer, or bytes after an answer
that closed the connection is a :class:`Malformed` answer stream.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import numpy as np
from daemon_helpers import write_bundle
from root_helpers import LeafProc, PoolEnv, RootProc, Workload, pool_env

from root_worker.frame import encode
from root_worker.testing.workload import make_frame

# What a pool's log must never hold: a traceback, or a line logged at ERROR or above
# (gunicorn formats every record of the pool, the service's own too: "[ERROR]").
LOG_ERRORS = ("Traceback", "[ERROR]", "[CRITICAL]")


class Malformed(AssertionError):
    """The server's byte stream is not a sequence of well-formed HTTP/1.1 answers."""


class Incomplete(Malformed):
    """The stream ends inside an answer (more bytes may still come)."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-cased names; repeated fields joined with ", "
    body: bytes
    interim: list[int] = field(default_factory=list)  # 1xx answers before this one
    version: bytes = b"1.1"

    @property
    def closes(self) -> bool:
        return "close" in self.headers.get("connection", "").lower()

    def json(self) -> Any:
        return json.loads(self.body)


def parse_answers(data: bytes, methods: Sequence[str], closed: bool = True
                  ) -> tuple[list[Answer], bytes]:
    """The answers in ``data`` (every byte the server sent), one per entry of ``methods`` (the
    methods of the requests, in order), and the bytes left over once those are read (or
    that follow an answer that closed the connection). ``closed``: the server closed after
    ``data`` (an answer framed by the close is then complete). Raises :class:`Malformed`."""
    answers: list[Answer] = []
    rest = data
    for method in methods:
        if not rest:
            break
        if answers and answers[-1].closes:
            raise Malformed(f"{len(rest)} bytes after an answer with Connection: close: "
                            f"{rest[:80]!r}")
        answer, rest = _one_answer(rest, method, closed)
        answers.append(answer)
    return answers, rest


def _one_answer(data: bytes, method: str, closed: bool) -> tuple[Answer, bytes]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "edge")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    interim: list[int] = []
    answer: Answer | None = None
    body = bytearray()
    eof_sent = False
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise Malformed(f"not a well-formed HTTP/1.1 answer ({exc}): {data[:200]!r}"
                            ) from None
        if event is h11.NEED_DATA:
            if closed and not eof_sent:
                conn.receive_data(b"")
                eof_sent = True
                continue
            raise Incomplete(f"incomplete answer to {method}: {data[:200]!r}")
        if isinstance(event, h11.InformationalResponse):
            interim.append(event.status_code)
        elif isinstance(event, h11.Response):
            headers: dict[str, str] = {}
            for name, value in event.headers:
                key, text = name.decode().lower(), value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            answer = Answer(event.status_code, headers, b"", interim, event.http_version)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert answer is not None
            answer.body = bytes(body)
            if answer.version != b"1.1":
                raise Malformed(f"answer in HTTP/{answer.version.decode()}, not 1.1")
            return answer, conn.trailing_data[0]
        elif isinstance(event, h11.ConnectionClosed):
            raise Malformed(f"connection closed before an answer to {method}")


def check_error_body(answer: Answer) -> None:
    """A 4xx/5xx answer carries the one error shape ``{"error": {"code", "message"}}``."""
    assert answer.headers.get("content-type", "").startswith("application/json"), answer
    doc = answer.json()
    assert set(doc) == {"error"}, doc
    assert isinstance(doc["error"]["code"], str) and doc["error"]["code"], doc
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"], doc


def host_port(url: str) -> tuple[str, int]:
    host, port = url[len("http://"):].split(":")
    return host, int(port)


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(host_port(url), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def send_pieces(url: str, pieces: Sequence[bytes], timeout: float = 10.0,
                paced: bool = False) -> bytes:
    """Send ``pieces`` on a new connection (TCP_NODELAY, one ``sendall`` each, no pause),
    shut the write side and return every byte the server sends until it closes. A server
    that closes early (an error answer) may reset the rest: what it sent is still read.

    ``paced``: before each next piece, wait until the server has read every byte sent so
    far (or has answered, or :data:`PACE_S` passed), so that each piece really is one read
    of the server's (pause-free sends on loopback usually arrive merged)."""
    with connect(url, timeout) as s:
        try:
            sent = 0
            for piece in pieces:
                if paced and sent:
                    wait_server_read(s, sent)
                s.sendall(piece)
                sent += len(piece)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return recv_until_closed(s, timeout)


PACE_S = 2.0  # a server that neither reads nor answers this long gets the next piece anyway


# sock_diag (linux/inet_diag.h): one exact lookup of a TCP socket by its 4-tuple, answered
# with its receive queue and its tcp_info -- what `ss -ti` shows, in microseconds
_SOCK_DIAG_BY_FAMILY, _INET_DIAG_INFO, _TCPI_BYTES_RECEIVED = 20, 2, 128
_NOCOOKIE = 0xFFFFFFFF


def server_progress(s: socket.socket) -> tuple[int, int]:
    """``(received, unread)`` of the server's end of ``s`` (a loopback connection, so its
    socket is in this network namespace): the bytes its kernel received, and those its
    receive queue still holds unread by the server process; ``(-1, 0)`` once it closed."""
    (lhost, lport), (rhost, rport) = s.getsockname(), s.getpeername()
    sockid = struct.pack("!HH4s12x4s12x", rport, lport, socket.inet_aton(rhost),
                         socket.inet_aton(lhost)) + struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE)
    req = struct.pack("=BBBxI", socket.AF_INET, socket.IPPROTO_TCP,
                      1 << (_INET_DIAG_INFO - 1), 0xFFFFFFFF) + sockid
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # NETLINK_SOCK_DIAG
        nl.send(struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, 1, 1, 0) + req)
        msg = nl.recv(65536)
    length, kind = struct.unpack_from("=IH", msg)
    if kind != _SOCK_DIAG_BY_FAMILY:  # NLMSG_ERROR: the server's end is gone
        return -1, 0
    unread = struct.unpack_from("=I", msg, 16 + 4 + 48 + 4)[0]  # inet_diag_msg.idiag_rqueue
    at = 16 + 72  # the attributes after inet_diag_msg
    while at + 4 <= length:
        alen, atype = struct.unpack_from("=HH", msg, at)
        if atype == _INET_DIAG_INFO:
            return struct.unpack_from("=Q", msg, at + 4 + _TCPI_BYTES_RECEIVED)[0], unread
        at += (alen + 3) & ~3
    return -1, 0  # no tcp_info: closed (time-wait)


def wait_server_read(s: socket.socket, sent: int) -> None:
    """Wait until the server read the ``sent`` bytes sent on ``s`` so far, or sent something
    back (then it may not read again before its answer is taken), at most :data:`PACE_S`."""
    deadline = time.monotonic() + PACE_S
    while time.monotonic() < deadline:
        received, unread = server_progress(s)
        if received < 0 or (received >= sent and not unread):
            return
        if select.select([s], [], [], 0.0005)[0]:
            return


def recv_until_closed(s: socket.socket, timeout: float) -> bytes:
    """Every byte until the peer closes (a reset ends it too), within ``timeout`` overall."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the server did not close within {timeout} s "
                               f"(got {bytes(data[:200])!r})")
        s.settimeout(left)
        try:
            chunk = s.recv(1 << 16)
        except ConnectionResetError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def cut(data: bytes, at: Sequence[int]) -> list[bytes]:
    """``data`` in pieces split at the offsets ``at``."""
    edges = [0, *sorted(set(a for a in at if 0 < a < len(data))), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def request(method: str, target: str, headers: Sequence[tuple[str, str]] = (),
            body: bytes = b"", version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def post_score(frame: bytes, target: str = "ads_ctr", version: str = "1.1",
               extra: Sequence[tuple[str, str]] = ()) -> bytes:
    hdrs = [("Host", "edge")] if version == "1.1" else []
    return request("POST", f"/score?target={target}",
                   [*hdrs, ("Content-Length", str(len(frame))), *extra], frame, version)


def chunked(body: bytes, sizes: Sequence[int] = (1000,)) -> bytes:
    """``body`` as chunks of the given sizes (the last size repeats), then the last chunk."""
    out, at, i = bytearray(), 0, 0
    while at < len(body):
        n = sizes[min(i, len(sizes) - 1)]
        out += b"%x\r\n%s\r\n" % (len(body[at:at + n]), body[at:at + n])
        at, i = at + n, i + 1
    return bytes(out + b"0\r\n\r\n")


class EdgeStack(PoolEnv):
    """A published map (ads_ctr, ads_cvr), one real leaf serving both, a routing file."""

    ROOT_SETTINGS = {"FT_WORKERS": "1", "FT_LEAF_TIMEOUT": "5"}

    def frame(self, n: int = 4, request_id: str | None = None) -> bytes:
        return make_frame(self.wl.universe, n, request_id=request_id)

    def tiny_frame(self, request_id: str = "tiny") -> bytes:
        """A frame of two ads_ctr features and one candidate (~300 bytes)."""
        names = self.wl.models["ads_ctr"][:2]
        return encode({n: np.zeros(1, np.float32) for n in names}, {"request_id": request_id})


@contextlib.contextmanager
def edge_stack(tmp: Path) -> Iterator[EdgeStack]:
    ads = tmp / "bundles" / "ads" / "module_info.json"

    def leaf(wl: Workload) -> LeafProc:
        write_bundle(ads, wl.ads_doc())
        return LeafProc(["--bundle", str(ads)], tmp, "edge-leaf")
    with pool_env(EdgeStack, tmp, leaf, lambda wl: {"ads": wl.ads_doc()}) as st:
        yield st


@contextlib.contextmanager
def running(proc: RootProc) -> Iterator[RootProc]:
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def log_errors(text: str) -> list[str]:
    """The lines of a pool log that report an error or a traceback."""
    return [line for line in text.splitlines() if any(e in line for e in LOG_ERRORS)]
