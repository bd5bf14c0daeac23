"""The seed corpus of every fuzz target: valid inputs of each shape the entry point takes,
and the regression inputs of known faults (issue 17's), run first on every fuzz run.

Written as files by :mod:`fuzz.run`; nothing here imports atheris.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from fuzz.harness import unsplit
from root_worker.frame import Column, Ragged, encode

FRAME_NAMES = ("alpha", "beta", "gamma", "delta", "flag")


def _frames() -> list[bytes]:
    n = 5
    cols: dict[str, Column] = {
        "alpha": np.arange(n, dtype=np.float32),
        "beta": np.arange(2 * n, dtype=np.int16).reshape(n, 2),
        "gamma": Ragged.from_lengths(np.arange(7, dtype=np.int64), [2, 0, 3, 1, 1]),
        "delta": Ragged.from_lengths(np.arange(4, dtype=np.float64), [0, 0, 4, 0, 0]),
        "flag": np.array([True, False, True, True, False]),
    }
    meta = {"request_id": "fz-1", "targets": ["ads_ctr", {"model": "m", "version": "2"}]}
    return [
        encode(cols, meta),
        encode({k: cols[k] for k in ("alpha", "gamma")}, {"request_id": 7}),
        encode({"alpha": np.zeros(0, np.float32)}, {}),
        encode({}, {"a": [1, 2.5, None, True, "x"]}, n_candidates=3),
    ]


def _req(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body


def http_request() -> list[bytes]:
    get = _req("GET /healthz HTTP/1.1\nHost: x\n")
    post = _req("POST /score?target=a HTTP/1.1\nHost: x\nContent-Length: 5\n", b"hello")
    chunked = _req("POST /score HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n",
                   b"5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n")
    seeds = [get, post, chunked, get + post + chunked + get,
             _req("GET /healthz HTTP/1.0\nConnection: keep-alive\n"),
             _req("POST /score HTTP/1.1\nHost: x\nExpect: 100-continue\nContent-Length: 2\n",
                  b"ab"),
             _req("HEAD /healthz HTTP/1.1\nHost: x\nConnection: close\n")]
    regressions = [  # issue 17
        unsplit(b"POST /score?target=ads_ctr HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2"
                b"\r\n\r\n"),
        # a bare-LF head, then a CRLF request, cut after the first head (byte 31 of 65)
        b"\x01\x7b" + b"GET /healthz HTTP/1.1\nHost: x\n\n" + get,
    ]
    return [unsplit(s) for s in seeds] + regressions


def http_response() -> list[bytes]:
    body = json.dumps({"scores": [0.5, 0.25], "model": "m"}).encode()
    seeds = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(body), body),
        b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ]
    regressions = [b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n"]  # issue 17
    return [unsplit(s) for s in seeds + regressions]


def frame_codec() -> list[bytes]:
    return _frames()


def trim_checks() -> list[bytes]:
    return [bytes([i]) + f for i, f in enumerate(_frames() * 3)]


def bundle_parser() -> list[bytes]:
    bundle = {"ads_ctr": [{"version": "1", "input_names": ["f1", "f2"],
                           "output_names": ["score"]},
                          {"version": 2, "input_names": ["f1", "f3", "f1"]}],
              "feed.rank-v2": [{"version": "10", "input_names": ["\u00e9t\u00e9"]}]}
    signature = {"input_names": ["f1", "f2"], "output_names": ["score"], "extra": {}}
    return [b"\x00" + json.dumps(bundle).encode(), b"\x00\xef\xbb\xbf{}",
            b"\x01" + json.dumps(signature).encode()]


def targets_parser() -> list[bytes]:
    meta = json.dumps({"targets": ["a", {"model": "b", "version": 3},
                                   {"model": "c", "version": "v1"}]}).encode()
    return [b"\x10target=ads_ctr&target=ads_cvr%401\n{}",
            b"\x02\n" + meta, b"\x40target=a@&x=1\n" + meta, b"\x05target=%ff\n{}"]


SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "http_request": http_request,
    "http_response": http_response,
    "frame_codec": frame_codec,
    "trim_checks": trim_checks,
    "bundle_parser": bundle_parser,
    "targets_parser": targets_parser,
}
