"""A real misbehaving leaf for the hostile-conditions tests and the bench (its own process).

    python tests/bad_leaf.py --port-file P [--slow-accept-port-file Q]

It reads each request like a leaf (head, then ``Content-Length`` body) and then behaves as
the ``model`` query parameter says, so one process serves every misbehaviour and a routing
file picks one per model:

============  =================================================================
model         behaviour
============  =================================================================
``drip``      ``200``, ``Content-Length: 400``, then one byte every 0.5 s
``hang``      never answers (keeps the connection open)
``slowhead``  the status line, then one header byte every 0.5 s
``huge``      ``200`` with ``Content-Length: 300000000`` and a fast endless body
``endless``   ``200`` without a length, body streamed fast until the peer closes
``chunky``    ``200`` chunked, 64 KiB chunks forever
``reset``     closes with a TCP reset after reading the request
``garbage``   a malformed status line
``badlength`` ``200`` with ``Content-Length: \xb2`` (a digit to ``str.isdigit``, not to int)
anything      ``200 {"scores": []}`` at once (a cheap healthy leaf; keep-alive)
============  =================================================================

``--slow-accept-port-file`` also opens a listener with backlog 0 that never accepts: once its
queue is full, connecting there hangs in the SYN retransmits (a leaf that accepts slowly).
Stops on SIGTERM/SIGINT. Counts requests per model in ``/stats``-less form: every request
line is appended to ``--log`` if given.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

DRIP_S = 0.5
BLOB = b"x" * (64 << 10)
_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


def read_request(conn: socket.socket) -> tuple[str, bytes] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = _LENGTH.search(head)
    length = int(m.group(1)) if m else 0
    while len(body) < length:
        chunk = conn.recv(1 << 20)
        if not chunk:
            return None
        body += chunk
    target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
    model = parse_qs(urlsplit(target).query).get("model", [""])[0]
    return model, body[length:]


def behave(conn: socket.socket, model: str) -> bool:
    """Act out ``model``; True if the connection may serve another request."""
    if model == "drip":
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n")
        for _ in range(400):
            time.sleep(DRIP_S)
            conn.sendall(b"{")
        return False
    if model == "hang":
        while conn.recv(65536):
            pass
        return False
    if model == "slowhead":
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for byte in b"X-Slow: " + b"y" * 400:
            time.sleep(DRIP_S)
            conn.sendall(bytes([byte]))
        return False
    if model in ("huge", "endless", "chunky"):
        head = {"huge": b"Content-Length: 300000000\r\n", "endless": b"Connection: close\r\n",
                "chunky": b"Transfer-Encoding: chunked\r\n"}[model]
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n")
        chunk = b"%x\r\n%s\r\n" % (len(BLOB), BLOB) if model == "chunky" else BLOB
        while True:
            conn.sendall(chunk)
    if model == "reset":
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False
    if model == "garbage":
        conn.sendall(b"HTTP/9 teapot\r\n\r\n")
        return False
    if model == "badlength":
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n{}")
        return False
    body = b'{"scores": []}'
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    return True


def serve(conn: socket.socket, log: Path | None) -> None:
    with conn:
        try:
            while True:
                req = read_request(conn)
                if req is None:
                    return
                if log is not None:
                    with log.open("a") as f:
                        f.write(req[0] + "\n")
                if not behave(conn, req[0]):
                    return
        except OSError:
            return


def _write(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)  # readers never see a half-written port


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port-file", type=Path, required=True)
    p.add_argument("--slow-accept-port-file", type=Path)
    p.add_argument("--log", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((args.host, 0))
    lsock.listen(256)
    if args.slow_accept_port_file is not None:
        slow = socket.socket()
        slow.bind((args.host, 0))
        slow.listen(0)
        _write(args.slow_accept_port_file, slow.getsockname()[1])
    _write(args.port_file, lsock.getsockname()[1])
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=serve, args=(conn, args.log), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
