"""``trimmer-leaf``: the reference leaf server (demo, tests, benchmarks).

It plays a leaf partition: it decodes each frame the root sends (lz4 if the request says
``Content-Encoding: lz4``), converts the features its model signature names into arrays and
returns deterministic scores (:mod:`root_worker.leaf.model`), so the system can show that
trimming changes the bytes on the wire, never the scores. It counts what it receives. The
frame side goes through the leaf SDK (:mod:`root_worker.leaf.sdk`: ``decompress``,
``read_frame``, ``InputConverter``, ``check_skew``, ``score_reply``), exactly as a leaf of
your own would (docs/leaf-sdk.md).

HTTP/1.1 with keep-alive, one thread per connection (``ThreadingHTTPServer``):

``POST /score?model=NAME[&version=V]``
    body: a frame. 200 ``{"model", "version", "requested_version", "scores": [...],
    "n_candidates", "n_columns", "missing": [...], "bytes_received", "frame_bytes"}``;
    409 when the root marked the frame ``X-FT-Trimmed-For: V`` (trimmed for version V), this
    leaf serves another version and the frame lacks features that version needs: a rollout
    skew, the root then re-sends the frame untrimmed (scores never change because of trimming);
    400 for a malformed frame or lz4 body, 404 for a model it does not serve, 411 without
    Content-Length, 413 above ``--max-body-bytes``. Errors are ``{"error": "..."}``.
``GET /stats``
    counters since start: requests, errors, bytes received (on the wire) and decoded frame
    bytes, in total and per model, plus the models served.
``GET /healthz``
    ``{"status": "ok", "pid": ...}``.

Example: ``trimmer-leaf --bundle examples/bundles/ads/module_info.json --model ads_ctr
--port 0 --port-file /tmp/leaf.port`` (``--port 0`` binds a free port, printed and written
to ``--port-file``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

from flatbuffers_schema.atomic_file import write_atomic
from flatbuffers_schema.settings import add_version_flag
from flatbuffers_schema.wire import (
    ENCODING_HEADER,
    REPLY_ERROR,
    STATUS_SKEW,
    TRIMMED_FOR_HEADER,
)
from root_worker.frame import FrameError
from root_worker.leaf.model import ModelStore
from root_worker.leaf.sdk import (
    DEFAULT_MAX_FRAME_BYTES,
    BuildError,
    UnsupportedEncoding,
    check_skew,
    decompress,
    read_frame,
    score_reply,
)
from trimmer_daemon.bundle.parse import BundleError

log = logging.getLogger("trimmer_leaf")
DEFAULT_MAX_BODY = DEFAULT_MAX_FRAME_BYTES
MAX_PORT = 65535
MAX_DELAY_MS = 3_600_000.0
EXIT_OK, EXIT_USAGE = 0, 2
_DATE: tuple[int, str] = (0, "")  # (second, its HTTP Date header value), for all threads


class LeafStats:
    """Thread-safe counters (``GET /stats``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # scored_with_missing: frames scored although inputs of the served version were
        # missing (an under-sent frame the 409 rule let through: untrimmed, or trimmed for
        # this very version); refused_skew: 409s (trimmed for another version, short)
        self.totals = {"requests": 0, "errors": 0, "bytes_received": 0, "frame_bytes": 0,
                       "scored_with_missing": 0, "refused_skew": 0}
        self.by_model: dict[str, dict[str, int]] = {}

    def record(self, model: str | None, wire: int, frame: int, columns: int,
               ok: bool, missing: int = 0, skew: bool = False) -> None:
        with self._lock:
            t = self.totals
            t["requests"] += 1
            t["errors"] += 0 if ok else 1
            t["scored_with_missing"] += 1 if ok and missing else 0
            t["refused_skew"] += 1 if skew else 0
            t["bytes_received"] += wire
            t["frame_bytes"] += frame
            if model is not None and ok:
                m = self.by_model.setdefault(model, {"requests": 0, "bytes_received": 0,
                                                     "frame_bytes": 0, "columns": 0})
                m["requests"] += 1
                m["bytes_received"] += wire
                m["frame_bytes"] += frame
                m["columns"] += columns

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.totals, "by_model": {k: dict(v) for k, v in self.by_model.items()}}


class LeafReplyError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra  # more fields of the error answer (a 409's served version)


class LeafServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], store: ModelStore, max_body: int,
                 delay_s: float = 0.0) -> None:
        super().__init__(address, LeafHandler)
        self.store = store
        self.max_body = max_body
        self.delay_s = delay_s
        self.stats = LeafStats()
        self.started = time.time()


class LeafHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LeafServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as two writes: without this, Nagle holds the body until
        # the client's delayed ACK (~40 ms per kept-alive request).
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        log.debug("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, doc: Any) -> None:
        """Status line, headers and body in one buffer and one write (the stdlib's
        ``send_response``/``send_header`` path formats and logs eagerly and writes twice)."""
        body = json.dumps(doc, separators=(",", ":")).encode()
        if log.isEnabledFor(logging.DEBUG):
            self.log_request(status, len(body))
        global _DATE
        now = int(time.time())
        if now != _DATE[0]:
            _DATE = (now, self.date_time_string(now))
        reason = self.responses.get(status, ("",))[0]
        close = "Connection: close\r\n" if self.close_connection else ""
        head = (f"{self.protocol_version} {status} {reason}\r\n"
                f"Server: {self.version_string()}\r\nDate: {_DATE[1]}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"{close}\r\n")
        self.wfile.write(head.encode("latin-1") + body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = urlsplit(self.path).path
        if path == "/stats":
            doc = self.server.stats.snapshot()
            doc.update(pid=os.getpid(), models=self.server.store.describe())
            self._send_json(200, doc)
        elif path == "/healthz":
            self._send_json(200, {"status": "ok", "pid": os.getpid()})
        else:
            self._send_json(404, {"error": f"no such path {path!r}"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        url = urlsplit(self.path)
        if url.path != "/score":
            self._discard_body()
            self._send_json(404, {"error": f"no such path {url.path!r}"})
            return
        query = parse_qs(url.query)
        model = (query.get("model") or [None])[0]
        wire = frame_len = columns = 0
        try:
            body = self._read_body()
            wire = len(body)
            doc, frame_len, columns = self._score(model, (query.get("version") or [None])[0],
                                                  body)
        except LeafReplyError as exc:
            self.server.stats.record(model, wire, frame_len, columns, ok=False,
                                     skew=exc.status == STATUS_SKEW)
            self._send_json(exc.status, {"error": str(exc), **exc.extra})
            return
        except Exception as exc:  # a bug: answer 500, keep serving
            log.exception("scoring failed model=%s", model)
            self.server.stats.record(model, wire, frame_len, columns, ok=False)
            self._send_json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
            return
        self.server.stats.record(model, wire, frame_len, columns, ok=True,
                                 missing=len(doc["missing"]))
        if self.server.delay_s:
            time.sleep(self.server.delay_s)  # a deliberately slow leaf (tests)
        self._send_json(200, doc)

    def _discard_body(self) -> None:
        try:
            self._read_body()
        except LeafReplyError:
            pass

    def _read_body(self) -> bytes:
        raw = self.headers.get("Content-Length")
        if raw is None or not raw.isdigit():
            self.close_connection = True
            raise LeafReplyError(411, "a Content-Length header is required")
        length = int(raw)
        if length > self.server.max_body:
            self.close_connection = True
            raise LeafReplyError(413, f"body of {length} bytes exceeds {self.server.max_body}")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise LeafReplyError(400, f"body truncated: {len(body)} of {length} bytes")
        return body

    def _score(self, model: str | None, version: str | None,
               body: bytes) -> tuple[dict[str, Any], int, int]:
        if not model:
            raise LeafReplyError(400, "query parameter 'model' is required")
        lm = self.server.store.get(model, version)
        if lm is None:
            raise LeafReplyError(404, f"model {model!r} is not served here")
        # the leaf SDK (root_worker.leaf.sdk) end to end: body -> frame -> inputs -> skew
        # rule -> scores -> reply
        try:
            frame_bytes = decompress(body, self.headers.get(ENCODING_HEADER),
                                     max_bytes=self.server.max_body)
            frame = read_frame(frame_bytes)
        except UnsupportedEncoding as exc:
            raise LeafReplyError(415, str(exc)) from None
        except FrameError as exc:
            raise LeafReplyError(400, f"malformed frame: {exc}") from None
        inputs = lm.converter(frame)
        refusal = check_skew(self.headers.get(TRIMMED_FOR_HEADER), lm.version, inputs,
                             model=model)
        if refusal is not None:
            raise LeafReplyError(refusal.status, refusal.body[REPLY_ERROR],
                                 **{k: v for k, v in refusal.body.items() if k != REPLY_ERROR})
        doc = score_reply(lm.score_inputs(inputs), lm.version, model=model,
                          requested_version=version, n_candidates=frame.n_candidates,
                          n_columns=len(frame.columns), missing=list(inputs.missing),
                          bytes_received=len(body), frame_bytes=len(frame_bytes))
        return doc, len(frame_bytes), len(frame.columns)


class _Parser(argparse.ArgumentParser):
    """One line on stderr for a bad command line (argparse adds the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _ranged(kind: Callable[[str], Any], lo: float, hi: float | None = None
            ) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` within ``[lo, hi]`` (``hi`` None: unbounded)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not (value >= lo and (hi is None or value <= hi)):
            bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{text} is out of range {bound}")
        return value
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="trimmer-leaf",
        description="Reference leaf: decode frames, score the features a model's signature "
                    "names, count received bytes.")
    add_version_flag(p)
    p.add_argument("--bundle", action="append", default=[], metavar="PATH",
                   help="bundle-level module_info.json; serves its models (re-read on change)")
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="serve only these models of the bundles (repeatable)")
    p.add_argument("--signature", action="append", default=[], metavar="MODEL[@VERSION]=PATH",
                   help="the model's signature: a per-model module_info.json, a .pt archive "
                        "or a version directory, read as trimmer-bundle reads them "
                        "(version defaults to 1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_ranged(int, 0, MAX_PORT), default=8101,
                   help="0 picks a free port")
    p.add_argument("--port-file", type=Path,
                   help="write the bound port here (atomically) once listening")
    p.add_argument("--max-body-bytes", type=_ranged(int, 1), default=DEFAULT_MAX_BODY)
    p.add_argument("--delay-ms", type=_ranged(float, 0.0, MAX_DELAY_MS), default=0.0,
                   help="answer every score request this much later (to simulate a slow leaf)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    return p


def _signatures(specs: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for spec in specs:
        target, sep, path = spec.partition("=")
        model, _, version = target.partition("@")
        if not sep or not model or not path:
            raise ValueError(f"--signature {spec!r}: expected MODEL[@VERSION]=PATH")
        out.append((model, version or "1", path))
    return out


def _write_port(path: Path, port: int) -> None:
    write_atomic(path, f"{port}\n", durable=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.bundle and not args.signature:
        print("trimmer-leaf: give at least one --bundle or --signature", file=sys.stderr)
        return EXIT_USAGE
    try:
        store = ModelStore(args.bundle, args.model, _signatures(args.signature))
    except (ValueError, BundleError, BuildError) as exc:
        print(f"trimmer-leaf: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        server = LeafServer((args.host, args.port), store, args.max_body_bytes,
                            args.delay_ms / 1000.0)
    except OSError as exc:  # address in use, no permission, unknown host
        print(f"trimmer-leaf: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_USAGE
    port = server.server_address[1]
    # Block the stop signals in every thread (threads inherit the mask) and take them with
    # sigwait in the main thread: no Python-level handler, so no lock a handler could
    # deadlock on, and a signal that arrives at any moment is never lost.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    thread = threading.Thread(target=server.serve_forever, name="leaf-http", daemon=True)
    thread.start()
    if args.port_file:
        _write_port(args.port_file, port)
    print(f"trimmer-leaf listening on http://{args.host}:{port} models="
          f"{','.join(store.describe())}", flush=True)
    sig = signal.sigwait(stop_signals)
    log.info("stopping on %s", signal.Signals(sig).name)
    server.shutdown()
    server.server_close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
