"""A minimal pre-forked raw-socket root: the yardstick for the real pool's CPU per request.

    python bench/minimal_root.py --shm-name P --routing R.json --mode trim|off \
        --address-file A.json [--bind 127.0.0.1:0] [--workers 2]

Not a product: no deadlines, no limits, no metrics, no error handling beyond "close the
connection". What it keeps is the work a root cannot avoid, done the cheapest plain way:
a master binds, forks ``--workers`` workers and waits; each worker multiplexes its client
connections with a selector and, per request, reads the head, reads the body with
``recv_into`` into one reused buffer, peeks the metadata, takes one map view, resolves and
trims each target with the project's own :meth:`~root_worker.frame.Trimmer.trim_parts`
(scatter-gather views of the body; mode ``off``: the body), sends every target with ``sendmsg`` on a
kept-alive blocking socket per leaf, then reads every answer (``Content-Length``) and parses
its JSON, and answers the client. The bench (``bench/e2e_bench.py``) runs it side by side
with the real pool and reports the CPU ratio.

The answer has the shape the bench's load reads: ``{"targets": [{"model", "status",
"outcome", "bytes_sent", "scores"}]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import signal
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flatbuffers_schema.atomic_file import write_atomic  # noqa: E402
from root_worker.featuremap.live_map import LiveMap  # noqa: E402
from root_worker.frame import Trimmer, peek_metadata  # noqa: E402

_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


class Leaves:
    """One kept-alive blocking socket per leaf URL."""

    def __init__(self, routing: dict[str, Any]) -> None:
        self.urls = {m: (u if isinstance(u, str) else u[0]) for m, u in routing.items()}
        self.socks: dict[str, socket.socket] = {}

    def sock(self, url: str) -> socket.socket:
        s = self.socks.get(url)
        if s is None:
            parts = urlsplit(url)
            s = socket.create_connection((parts.hostname, parts.port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks[url] = s
        return s


def recv_head(sock: socket.socket, rx: bytearray) -> tuple[bytes, int] | None:
    """Read until the blank line; return (head, Content-Length); extra bytes stay in rx."""
    while True:
        end = rx.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(rx[:end + 4])
            del rx[:end + 4]
            m = _LENGTH.search(head)
            return head, int(m.group(1)) if m else 0
        data = sock.recv(65536)
        if not data:
            return None
        rx += data


def recv_exact_into(sock: socket.socket, view: memoryview, rx: bytearray) -> bool:
    """Fill ``view``: what ``rx`` already holds, then blocking ``recv_into`` with
    MSG_WAITALL (the kernel returns once all is there: for a 2.8 MB body ~0.75x the CPU of
    plain reads on loopback, near the pool's SO_RCVLOWAT wake-ups; bench/send_bench.py)."""
    got = min(len(rx), len(view))
    view[:got] = rx[:got]
    del rx[:got]
    while got < len(view):
        n = sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
        if not n:
            return False
        got += n
    return True


def send_all(sock: socket.socket, parts: list[Any], total: int) -> None:
    """Blocking ``sendmsg`` of byte buffers of ``total`` bytes (usually one call; a partial
    send resumes)."""
    sent = sock.sendmsg(parts[:1024])  # IOV_MAX
    while sent < total:
        rest = memoryview(b"".join(parts))[sent:]  # rare: the kernel took part of it
        sent += sock.send(rest)


class Worker:
    def __init__(self, args: argparse.Namespace, lsock: socket.socket) -> None:
        self.mode = args.mode
        self.live = LiveMap(args.shm_name)
        self.trimmer = Trimmer()
        self.leaves = Leaves(json.loads(Path(args.routing).read_text()))
        self.body = bytearray()
        self.lsock = lsock
        self.sel = selectors.DefaultSelector()
        self.pid = os.getpid()

    def run(self) -> None:
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        while True:
            for key, _ in self.sel.select():
                if key.data is None:
                    self.accept()
                else:
                    self.serve(key.fileobj, key.data)  # type: ignore[arg-type]

    def accept(self) -> None:
        try:
            sock, _ = self.lsock.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sel.register(sock, selectors.EVENT_READ, bytearray())

    def serve(self, sock: socket.socket, rx: bytearray) -> None:
        try:
            got = recv_head(sock, rx)
            if got is None:
                raise ConnectionResetError
            if len(self.body) < got[1]:
                self.body = bytearray(max(got[1], 2 * len(self.body)))
            view = memoryview(self.body)[:got[1]]
            if not recv_exact_into(sock, view, rx):
                raise ConnectionResetError
            body = json.dumps(self.score(view), separators=(",", ":")).encode()
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body))
            send_all(sock, [head, body], len(head) + len(body))
        except OSError:
            self.sel.unregister(sock)
            sock.close()

    def score(self, body: memoryview) -> dict[str, Any]:
        targets = peek_metadata(body)["targets"]
        view = self.live.current() if self.mode != "off" else None
        sends = []
        for model in targets:
            parts, n, outcome = [body], len(body), "off"
            if self.mode != "off":
                res = self.live.resolve_in(view, model)
                outcome = res.outcome.value
                if res.allowlist is not None:
                    trimmed = self.trimmer.trim_parts(body, res.allowlist)
                    parts, n = trimmed.parts, trimmed.bytes_out
            url = self.leaves.urls[model]
            sock = self.leaves.sock(url)
            head = (f"POST /score?model={model} HTTP/1.1\r\nHost: leaf\r\nContent-Type: "
                    f"application/x-ft-frame\r\nContent-Length: {n}\r\n\r\n").encode()
            send_all(sock, [head, *parts], len(head) + n)
            sends.append((model, outcome, n, sock))
        out = []
        for model, outcome, n, sock in sends:
            rx = bytearray()
            head, length = recv_head(sock, rx) or (b"", 0)
            data = bytearray(length)
            recv_exact_into(sock, memoryview(data), rx)
            doc = json.loads(data)
            out.append({"model": model, "status": "ok", "outcome": outcome, "bytes_sent": n,
                        "scores": doc["scores"]})
        return {"pid": self.pid, "generation": view.generation if view else 0,
                "targets": out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bind", default="127.0.0.1:0")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shm-name", required=True)
    p.add_argument("--routing", required=True)
    p.add_argument("--mode", choices=("trim", "off"), default="trim")
    p.add_argument("--address-file", type=Path, required=True)
    args = p.parse_args()
    host, _, port = args.bind.rpartition(":")
    lsock = socket.create_server((host, int(port)), backlog=1024)
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - worker process
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
            Worker(args, lsock).run()
            os._exit(0)
        children.append(pid)
    addr = lsock.getsockname()
    write_atomic(str(args.address_file), json.dumps(
        {"pid": os.getpid(), "addresses": [f"http://{addr[0]}:{addr[1]}"]}), durable=False)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in children:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main())
