"""HTTP/1.0 and 1.1 conformance of the root's event worker, black box, against the real pool.

Real parts only: a one-worker gunicorn pool (``FT_WORKERS=1``: every connection meets the same
event loop), a real leaf (``trimmer-leaf``), a map published in real shared memory; real
clients -- ApacheBench (``ab``, HTTP/1.0, with and without ``-k``), ``curl`` (``-0`` and
HTTP/1.1) and ``wrk`` (HTTP/1.1 keep-alive) -- and raw sockets for what a client library would
hide (HEAD, HTTP/1.0 keep-alive, Host rules, Transfer-Encoding and Expect in HTTP/1.0,
absolute-form targets, TCP segmentation, silent connections, deep pipelining). Answers are
read with h11 (``tests/http_edge.py``), never with the root's own parser.

The client tools come from apt (``apache2-utils``, ``wrk``, ``curl``; ``.ci/run`` installs
them and sets ``FT_REQUIRE_HTTP_TOOLS=1``, which turns a missing tool into a failure; elsewhere
a test without its tool is skipped, naming it). Most raw-socket cases are ones the
hand-written HTTP layer before llhttp failed (issue 17).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from http_edge import (
    Answer,
    EdgeStack,
    Incomplete,
    check_error_body,
    chunked,
    connect,
    cut,
    edge_stack,
    log_errors,
    parse_answers,
    post_score,
    recv_until_closed,
    request,
    running,
    send_pieces,
)
from root_helpers import RootProc

HEADER_TIMEOUT = 1.0  # FT_HEADER_TIMEOUT of the pool: short, for the silent-connection cases
MARGIN = 5.0  # generous: a shared 2-core machine (deadlines are asserted, never speed)
TOOLS = {"ab": "apache2-utils", "wrk": "wrk", "curl": "curl"}
HOST = ("Host", "edge")


def tool(name: str) -> str:
    """The path of a client tool; missing: skip naming it, or fail under FT_REQUIRE_HTTP_TOOLS."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (Debian package {TOOLS[name]})"
        if os.environ.get("FT_REQUIRE_HTTP_TOOLS") == "1":
            pytest.fail(f"{why}, and FT_REQUIRE_HTTP_TOOLS=1")
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeStack]:
    with edge_stack(tmp_path_factory.mktemp("conformance")) as st:
        yield st


@pytest.fixture(scope="module")
def pool(stack: EdgeStack) -> Iterator[RootProc]:
    with running(stack.root("root-conf", FT_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
                            FT_KEEPALIVE="30")) as proc:
        yield proc


@pytest.fixture(scope="module")
def frame_file(stack: EdgeStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("frames") / "frame.bin"
    path.write_bytes(stack.frame(4, request_id="tool"))
    return path


def _one(url: str, data: bytes, method: str = "GET") -> Answer:
    answers, rest = parse_answers(send_pieces(url, [data]), [method])
    assert len(answers) == 1 and not rest, (answers, rest[:200])
    return answers[0]


def _read_one(s: socket.socket, method: str = "GET", timeout: float = 10.0) -> Answer:
    """One answer from a kept-alive connection: read until h11 has a whole answer."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        with contextlib.suppress(Incomplete):
            answers, rest = parse_answers(data, [method], closed=False)
            if answers:
                assert not rest, f"bytes after the answer to {method}: {rest[:200]!r}"
                return answers[0]
        left = deadline - time.monotonic()
        assert left > 0, f"no whole answer within {timeout} s: {data[:300]!r}"
        s.settimeout(left)
        chunk = s.recv(1 << 16)
        assert chunk, f"closed after {data[:300]!r}"
        data += chunk


# -- real clients -----------------------------------------------------------------------------
def _ab(url: str, *args: str) -> dict[str, int]:
    out = subprocess.run([tool("ab"), "-q", "-l", "-s", "3", *args, url], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    figures = {}
    for key, label in (("complete", "Complete requests"), ("failed", "Failed requests"),
                       ("non2xx", "Non-2xx responses"), ("keepalive", "Keep-Alive requests")):
        m = re.search(rf"^{label}:\s+(\d+)", text, re.M)
        figures[key] = int(m.group(1)) if m else 0
    rate = re.search(r"^Requests per second:\s+([\d.]+)", text, re.M)
    print(f"ab {' '.join(args)} {url}: {figures}, {rate.group(1) if rate else '?'} req/s")
    return figures


def test_ab_keepalive_healthz_and_score(pool: RootProc, frame_file: Path) -> None:
    for args in (("-k", "-n", "500", "-c", "4"),
                 ("-k", "-n", "100", "-c", "2", "-p", str(frame_file), "-T",
                  "application/octet-stream")):
        path = "/score?target=ads_ctr" if "-p" in args else "/healthz"
        got = _ab(pool.url + path, *args)
        n = int(args[2])
        assert got["complete"] == n and got["failed"] == 0 and got["non2xx"] == 0, got
        assert got["keepalive"] == n, got  # every request on a kept-alive connection


def test_ab_without_keepalive_healthz_and_score(pool: RootProc, frame_file: Path) -> None:
    for args in (("-n", "300", "-c", "4"),
                 ("-n", "100", "-c", "2", "-p", str(frame_file), "-T",
                  "application/octet-stream")):
        path = "/score?target=ads_ctr" if "-p" in args else "/healthz"
        got = _ab(pool.url + path, *args)
        n = int(args[1])
        assert got["complete"] == n and got["failed"] == 0 and got["non2xx"] == 0, got
        assert got["keepalive"] == 0, got


def _curl(*args: str, urls: list[str]) -> list[tuple[int, int]]:
    """``(status, connections opened)`` per transfer of one curl run (one per URL)."""
    out = subprocess.run([tool("curl"), "-sS", "--max-time", "20",
                          "-w", "%{http_code} %{num_connects}\\n", *args,
                          *[a for url in urls for a in ("-o", "/dev/null", url)]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [(int(a), int(b)) for a, b in (line.split() for line in out.stdout.splitlines())]


@pytest.mark.parametrize("flags", [["-0"], ["-0", "-H", "Connection: keep-alive"], ["--http1.1"]],
                         ids=["http1.0", "http1.0-keepalive", "http1.1"])
def test_curl_healthz_and_score(pool: RootProc, frame_file: Path, flags: list[str]) -> None:
    health = _curl(*flags, urls=[pool.url + "/healthz"] * 3)
    assert [s for s, _ in health] == [200] * 3, health
    post = [*flags, "--data-binary", f"@{frame_file}", "-H",
            "Content-Type: application/octet-stream"]
    scores = _curl(*post, urls=[pool.url + "/score?target=ads_ctr"] * 3)
    assert [s for s, _ in scores] == [200] * 3, scores
    if flags != ["-0"]:  # a kept-alive connection is reused for the next transfers
        assert sum(c for _, c in health) == 1 and sum(c for _, c in scores) == 1, \
            (health, scores)


@pytest.mark.parametrize("extra", [["-H", "Transfer-Encoding: chunked"],
                                   ["-H", "Expect: 100-continue"]], ids=["chunked", "expect"])
def test_curl_chunked_and_expect_uploads(pool: RootProc, frame_file: Path,
                                         extra: list[str]) -> None:
    got = _curl("--http1.1", "--data-binary", f"@{frame_file}", *extra,
                urls=[pool.url + "/score?target=ads_ctr"] * 2)
    assert [s for s, _ in got] == [200, 200], got


def _wrk(url: str, script: Path | None = None) -> str:
    args = [tool("wrk"), "-t1", "-c4", "-d2s", "--timeout", "5s"]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"wrk {url}:\n{out.stdout}")
    return out.stdout


def test_wrk_healthz_and_score(pool: RootProc, frame_file: Path, tmp_path: Path) -> None:
    script = tmp_path / "post.lua"
    script.write_text(f'wrk.method = "POST"\nlocal f = io.open("{frame_file}", "rb")\n'
                      'wrk.body = f:read("*a")\nf:close()\n'
                      'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    for url, lua in ((pool.url + "/healthz", None),
                     (pool.url + "/score?target=ads_ctr", script)):
        text = _wrk(url, lua)
        done = re.search(r"^\s*(\d+) requests in", text, re.M)
        assert done and int(done.group(1)) > 0, text
        assert "Non-2xx" not in text and "Socket errors" not in text, text


# -- raw sockets: what a client library would hide ----------------------------------------------
def test_head_has_no_body_and_the_next_request_is_answered(pool: RootProc) -> None:
    with connect(pool.url) as s:
        s.sendall(request("HEAD", "/healthz", [HOST]))
        head = _read_one(s, "HEAD")
        s.sendall(request("GET", "/healthz", [HOST]))
        s.shutdown(socket.SHUT_WR)
        rest = recv_until_closed(s, 10)
    assert head.status == 200 and head.body == b"", head
    answers, left = parse_answers(rest, ["GET"])
    assert len(answers) == 1 and not left, (answers, left[:200])
    assert answers[0].status == 200 and "pid" in answers[0].json()


def test_http10_keepalive_is_answered_keepalive_and_kept_open(pool: RootProc) -> None:
    keep = request("GET", "/healthz", [("Connection", "keep-alive")], version="1.0")
    with connect(pool.url) as s:
        s.sendall(keep)
        first = _read_one(s)
        assert first.status == 200
        assert "keep-alive" in first.headers.get("connection", "").lower(), first.headers
        s.sendall(keep)  # the same connection, still open
        second = _read_one(s)
    assert second.status == 200 and "pid" in second.json()


@pytest.mark.parametrize("headers", [[], [HOST, ("Host", "other")]], ids=["none", "two"])
def test_http11_host_missing_or_repeated_is_400_json(pool: RootProc,
                                                     headers: list[tuple[str, str]]) -> None:
    answer = _one(pool.url, request("GET", "/healthz", headers))
    assert answer.status == 400, answer
    check_error_body(answer)


def test_http10_without_host_is_served(pool: RootProc) -> None:
    answer = _one(pool.url, request("GET", "/healthz", version="1.0"))
    assert answer.status == 200 and "pid" in answer.json()


def test_transfer_encoding_in_http10_is_400_and_closes(pool: RootProc, stack: EdgeStack
                                                       ) -> None:
    data = request("POST", "/score?target=ads_ctr", [("Transfer-Encoding", "chunked"),
                                                     ("Connection", "keep-alive")],
                   chunked(stack.tiny_frame()), version="1.0")
    with connect(pool.url) as s:
        s.sendall(data)  # no half close: the server must close by itself
        got = recv_until_closed(s, MARGIN)
    answers, rest = parse_answers(got, ["POST"])
    assert len(answers) == 1 and not rest, (answers, rest[:200])
    assert answers[0].status == 400, answers[0]
    check_error_body(answers[0])


def test_expect_in_http10_gets_no_interim_100(pool: RootProc, stack: EdgeStack) -> None:
    frame = stack.tiny_frame()
    answer = _one(pool.url, post_score(frame, version="1.0",
                                       extra=[("Expect", "100-continue")]), "POST")
    assert answer.interim == [] and answer.status == 200, answer


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_absolute_form_targets_are_served_like_origin_form(pool: RootProc, stack: EdgeStack,
                                                           method: str) -> None:
    frame = stack.tiny_frame("absolute")
    if method == "GET":
        data = request("GET", "http://edge/healthz", [HOST])
    else:
        data = request("POST", "http://edge/score?target=ads_ctr",
                       [HOST, ("Content-Length", str(len(frame)))], frame)
    answer = _one(pool.url, data, method)
    assert answer.status == 200, answer
    doc = answer.json()
    assert "pid" in doc and (method == "GET" or doc["request_id"] == "absolute"), doc


# -- one answer whatever the TCP segmentation ---------------------------------------------------
def _segmentation_cases(stack: EdgeStack) -> dict[str, bytes]:
    tiny = stack.tiny_frame("seg")
    chunked_head = [HOST, ("Transfer-Encoding", "chunked")]
    return {
        "valid_post": post_score(tiny),
        # bare-LF lines end the head; a CRLF request pipelined behind it
        "bare_lf_head": b"GET /healthz HTTP/1.1\nHost: edge\n\n" +
                        request("GET", "/healthz", [HOST]),
        "bad_chunked_body": request("POST", "/score?target=ads_ctr", chunked_head,
                                    b"5\r\nhello\r\nzz\r\nabc\r\n0\r\n\r\n"),
        # a chunked POST answered at once (its body is no frame: 400), then a Content-Length
        # POST pipelined behind its last chunk
        "chunked_then_post": request("POST", "/score?target=ads_ctr", chunked_head,
                                     b"5\r\nhello\r\n0\r\n\r\n") + post_score(tiny),
    }


def _statuses(url: str, pieces: list[bytes], n_requests: int, paced: bool) -> list[int]:
    """The statuses answered (room for more answers than requests: a request answered
    twice shows as a longer list)."""
    answers, rest = parse_answers(send_pieces(url, pieces, paced=paced),
                                 ["POST"] * (n_requests + 2))
    assert not rest, rest[:200]
    return [a.status for a in answers]


@pytest.mark.parametrize("case", ["valid_post", "bare_lf_head", "bad_chunked_body",
                                  "chunked_then_post"])
def test_one_answer_whatever_the_segmentation(pool: RootProc, stack: EdgeStack,
                                              case: str) -> None:
    data = _segmentation_cases(stack)[case]
    n = data.count(b" HTTP/1.1")
    whole = _statuses(pool.url, [data], n, False)
    assert whole and all(s < 500 for s in whole), whole
    rng = random.Random(17)
    # every boundary (two pieces, the server made to read the first alone), then one byte
    # per segment and random cuts, sent back to back (however the kernel merges them)
    splits: list[tuple[list[int], bool]] = [([i], True) for i in range(1, len(data))]
    splits.append((list(range(1, len(data))), False))
    splits += [(sorted(rng.sample(range(1, len(data)), rng.randint(2, 12))), False)
               for _ in range(40)]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda sp: (sp[0], _statuses(pool.url, cut(data, sp[0]), n, sp[1])),
                          splits))
    differ = [(at if len(at) < 8 else f"{len(at)} cuts", s) for at, s in got if s != whole]
    assert not differ, f"whole: {whole}; {len(differ)} of {len(splits)} splits differ, e.g. " \
                       f"{differ[:5]}"


# -- silent connections -----------------------------------------------------------------------
def test_a_silent_connection_is_closed_by_the_header_deadline(pool: RootProc) -> None:
    t0 = time.monotonic()
    with connect(pool.url) as s:
        got = recv_until_closed(s, HEADER_TIMEOUT + MARGIN)
    elapsed = time.monotonic() - t0
    # quietly, or with a JSON 408; either way once FT_HEADER_TIMEOUT passed, not before
    # (and within the margin: the deadline counts from accept, not from a first byte)
    assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert elapsed >= HEADER_TIMEOUT * 0.9, elapsed
    print(f"silent connection closed after {elapsed:.2f} s (FT_HEADER_TIMEOUT={HEADER_TIMEOUT})")


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_flood_of_silent_connections_leaves_healthz_answerable(pool: RootProc,
                                                                 many_fds: None) -> None:
    flood: list[socket.socket] = []
    try:
        for _ in range(1500):
            flood.append(connect(pool.url))
        t0 = time.monotonic()
        with connect(pool.url, timeout=HEADER_TIMEOUT + MARGIN) as s:
            s.sendall(request("GET", "/healthz", [HOST]))
            answer = _read_one(s, timeout=HEADER_TIMEOUT + MARGIN)
        assert answer.status == 200
        print(f"/healthz under 1500 silent connections: {time.monotonic() - t0:.2f} s")
    finally:
        for s in flood:
            s.close()


# -- deep pipelining --------------------------------------------------------------------------
def test_ten_thousand_pipelined_requests_in_order_while_another_connection_is_served(
        pool: RootProc, record_property: Callable[[str, object], None]) -> None:
    n = 10_000
    log_at = len(pool.log())
    one = request("GET", "/healthz", [HOST])
    latencies: list[float] = []
    stop = threading.Event()

    def other() -> None:  # a second connection's requests, one at a time
        with connect(pool.url, timeout=MARGIN) as s:
            while not stop.is_set():
                t0 = time.monotonic()
                s.sendall(one)
                assert _read_one(s, timeout=MARGIN).status == 200
                latencies.append(time.monotonic() - t0)

    pids: set[int] = set()
    # (the socket closes first on a failure: a sender blocked on a stalled server ends)
    with ThreadPoolExecutor(2) as ex, connect(pool.url, timeout=30) as s:
        sender = ex.submit(s.sendall, one * n)
        prober = ex.submit(other)
        try:
            data = b""
            got = 0
            while got < n:
                chunk = s.recv(1 << 20)
                assert chunk, f"closed after {got} answers"
                data += chunk
                answers, data = _whole_answers(data)
                for a in answers:
                    assert a.status == 200, (got, a)
                    pids.add(a.json()["pid"])
                got += len(answers)
        finally:
            stop.set()
        sender.result(30)
        prober.result(30)
    assert len(pids) == 1 and got == n
    assert latencies, "the second connection was never answered"
    median = sorted(latencies)[len(latencies) // 2]
    print(f"second connection: {len(latencies)} requests, max latency "
          f"{max(latencies) * 1e3:.1f} ms, median {median * 1e3:.1f} ms")
    record_property("second_connection_requests", len(latencies))
    record_property("second_connection_max_latency_ms", round(max(latencies) * 1e3, 1))
    record_property("second_connection_median_latency_ms", round(median * 1e3, 1))
    assert max(latencies) < MARGIN
    assert not log_errors(pool.log()[log_at:])


def _whole_answers(data: bytes) -> tuple[list[Answer], bytes]:
    """The whole answers (to GETs) at the start of ``data``, and the partial rest (each
    parsed from a window of ``data``, so a long stream costs linear time)."""
    out: list[Answer] = []
    at, window = 0, 8192
    while at < len(data):
        piece = data[at:at + window]
        try:
            answers, rest = parse_answers(piece, ["GET"], closed=False)
        except Incomplete:
            if at + window >= len(data):
                break
            window *= 2
            continue
        out += answers
        at += len(piece) - len(rest)
    return out, data[at:]
