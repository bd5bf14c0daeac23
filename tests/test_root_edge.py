"""The HTTP edge against the real gunicorn pool: faults contained, memory that follows bytes,
bounded answers, descriptors and connection slots that a flood cannot exhaust.

Real parts only: the event-worker pool (one worker, so "the worker survived" means one pid),
a real leaf process (``tests/bad_leaf.py``), a real map in shared memory, raw client
sockets. Faults are injected with ``FT_TEST_FAULTS=1`` and the ``X-FT-Test-Fault`` header
(:mod:`root_worker.service.faults`): the worker raises an unexpected exception at that phase
of that one request.
"""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import wait_for
from root_helpers import (
    BadLeafProc,
    PoolEnv,
    RootProc,
    pool_env,
    raw_post,
    read_answer,
    read_until_closed,
)

from root_worker.service.faults import PHASES
from root_worker.testing.client import Client, metric_value
from root_worker.testing.workload import make_frame

MAX_CANDIDATES = 64
MAX_ANSWER_SCORES = 256


class Env(PoolEnv):
    ROOT_SETTINGS = {"FT_WORKERS": "1", "FT_LEAF_TIMEOUT": "2", "FT_HEADER_TIMEOUT": "5",
                     "FT_BODY_TIMEOUT": "5"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("edge")
    with pool_env(Env, tmp, lambda wl: BadLeafProc(tmp),
                  lambda wl: {"ads": wl.ads_doc(), "hf": wl.homefeed_doc()}) as e:
        yield e


@pytest.fixture(scope="module")
def root(env: Env) -> Iterator[RootProc]:
    """One worker, fault injection on, small answer caps."""
    proc = env.root("root-edge", FT_TEST_FAULTS="1", FT_MAX_CANDIDATES=str(MAX_CANDIDATES),
                    FT_MAX_ANSWER_SCORES=str(MAX_ANSWER_SCORES))
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def _frame(env: Env, n: int = 8, seed: int = 0) -> bytes:
    return make_frame(env.wl.universe, n, seed=seed)  # type: ignore[arg-type]


def _host_port(root: RootProc) -> tuple[str, int]:
    host, port = root.url[len("http://"):].split(":")
    return host, int(port)


def _pid(root: RootProc) -> int:
    (pid,) = root.worker_pids()
    return pid


def _healthy_in_background(root: RootProc, frame: bytes, n: int) -> tuple[list[int],
                                                                           threading.Thread]:
    """``n`` healthy POSTs on their own connections, in a thread; their statuses."""
    statuses: list[int] = []

    def run() -> None:
        c = Client(root.url, timeout=30)
        for _ in range(n):
            statuses.append(c.score(frame, ["healthy"], fresh=True)[0])
    t = threading.Thread(target=run)
    t.start()
    return statuses, t


def _answers(data: bytes) -> list[tuple[int, bytes]]:
    """Every complete answer in ``data`` (Content-Length framed), in order."""
    out = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        head = data[:end]
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        length = int(m.group(1)) if m else 0
        out.append((int(head.split(b" ", 2)[1]), data[end + 4:end + 4 + length]))
        data = data[end + 4 + length:]
    return out


# -- 2. fault isolation ---------------------------------------------------------------------------
def test_a_non_ascii_digit_length_costs_one_connection(env: Env, root: RootProc) -> None:
    """The 60-byte request that killed a worker (``'²'.isdigit()`` is True, ``int('²')``
    raises): now a 400 for that connection; ten healthy requests in flight on the same
    worker are all answered and the worker is the same process."""
    pid = _pid(root)
    statuses, t = _healthy_in_background(root, _frame(env), 10)
    bad = "POST /score?target=ads_ctr HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n"
    host, port = _host_port(root)
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(bad.encode("latin-1") + b"\r\n")
        answer = read_until_closed(s)
    t.join(60)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    doc = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert doc["error"]["code"] == "bad_length" and "Content-Length" in doc["error"]["message"]
    assert statuses == [200] * 10
    assert _pid(root) == pid


def test_a_leaf_answer_with_a_non_ascii_digit_length_fails_its_target(env: Env,
                                                                      root: RootProc) -> None:
    pid = _pid(root)
    status, doc = root.client().score(_frame(env), ["badlength", "healthy"])
    assert status == 200, doc
    got = {t["model"]: t for t in doc["targets"]}
    assert got["healthy"]["status"] == "ok"
    assert got["badlength"]["error"]["kind"] == "bad_reply"
    assert "Content-Length" in got["badlength"]["error"]["message"]
    assert _pid(root) == pid


@pytest.mark.parametrize("phase", PHASES)
def test_an_exception_at_any_phase_costs_only_its_connection_or_target(
        env: Env, root: RootProc, phase: str) -> None:
    """An unexpected exception injected at ``phase`` of one request: that connection gets a
    500 (or is closed, once its answer had started), or that target fails with
    ``internal`` (trim falls back to untrimmed); it is logged once with the request id and
    counted; a concurrent healthy request is answered by the same worker process."""
    pid = _pid(root)
    c = root.client()
    before = metric_value(c.metrics(fresh=True), "feature_trimmer_root_faults_total")
    log_before = root.log().count("fault contained")
    frame = make_frame(env.wl.universe, 8, seed=3,  # type: ignore[arg-type]
                       request_id=f"inject-{phase}")
    statuses, t = _healthy_in_background(root, _frame(env, seed=1), 3)
    head = (f"POST /score?target=healthy&target=ads_ctr HTTP/1.1\r\nHost: x\r\n"
            f"X-FT-Test-Fault: {phase}\r\nContent-Length: {len(frame)}\r\n")
    answer = raw_post(root.url, head, frame, half_close=True)
    t.join(60)
    assert statuses == [200] * 3
    assert _pid(root) == pid
    answers = _answers(answer)
    if phase == "write":
        assert answers == [], answer[:200]  # the answer could not be written: closed
    elif phase in ("trim", "leaf_answer"):
        # every target failed: 502 (the leaves' side), the connection kept
        assert len(answers) == 1 and answers[0][0] == (200 if phase == "trim" else 502), \
            answer[:300]
        doc = json.loads(answers[0][1])
        got = {x["model"]: x for x in doc["targets"]}
        if phase == "trim":  # the trimmer's failure costs bandwidth, never the target
            assert all(x["status"] == "ok" for x in doc["targets"]), doc
            assert got["ads_ctr"]["fallback"].startswith("trim_error"), got["ads_ctr"]
        else:
            assert all(x["error"]["kind"] == "internal" for x in doc["targets"]), doc
    else:
        assert [a[0] for a in answers] == [500], answer[:300]
        assert json.loads(answers[0][1])["error"]["code"] == "internal"
    wait_for(lambda: metric_value(c.metrics(fresh=True), "feature_trimmer_root_faults_total")
             > before, 10, "the fault to be counted")
    lines = [ln for ln in root.log().splitlines() if "fault contained" in ln][log_before:]
    assert lines, "the fault was not logged"
    if phase in ("trim", "leaf_answer"):
        assert all(f"inject-{phase}" in ln for ln in lines), lines
    assert "Worker exiting" not in root.log()


# -- 3. pipelining: by iteration, in order, from the loop -----------------------------------------
def test_pipelined_requests_are_answered_in_order_without_recursion(env: Env,
                                                                    root: RootProc) -> None:
    """1,500 pipelined requests in one packet (200 of them used to end in a RecursionError):
    every one answered, in order, no traceback; another connection is served meanwhile."""
    n = 1500
    paths = ["/nope" if i % 3 else "/healthz" for i in range(n)]
    data = "".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n" for p in paths).encode()
    host, port = _host_port(root)
    tracebacks = root.log().count("Traceback")
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(data + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        side = root.client().json("GET", "/healthz", fresh=True)
        raw = read_until_closed(s)
    statuses = [a[0] for a in _answers(raw)]
    assert statuses == [404 if p == "/nope" else 200 for p in paths] + [200]
    assert side[0] == 200
    assert root.log().count("Traceback") == tracebacks


def test_a_chunked_body_ending_in_a_later_packet_is_dispatched_once(env: Env,
                                                                   root: RootProc) -> None:
    """A chunked head and a first chunk, then -- in a later packet -- the last chunk and a
    complete pipelined POST: two requests, two answers, the leaf gets the second once."""
    frame = _frame(env, seed=5)
    host, port = _host_port(root)
    before = env.leaf.requests().count("healthy")
    with socket.create_connection((host, port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"POST /score?target=healthy HTTP/1.1\r\nHost: x\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        wait_for(lambda: root.client().json("GET", "/healthz", fresh=True)[0] == 200, 5,
                 "the first packet to be read")
        s.sendall(b"0\r\n\r\n" + f"POST /score?target=healthy HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Length: {len(frame)}\r\nConnection: close\r\n\r\n".encode()
                  + frame)
        raw = read_until_closed(s)
    answers = _answers(raw)
    assert [a[0] for a in answers] == [400, 200], raw[:400]
    assert json.loads(answers[0][1])["error"]["code"] == "bad_frame"
    assert env.leaf.requests().count("healthy") == before + 1


# -- 4. memory follows bytes that arrived; answers are bounded ------------------------------------
def test_announced_bodies_hold_no_memory(env: Env, root: RootProc) -> None:
    """24 connections that send only a head announcing 64 MiB hold no buffer; a healthy POST
    is answered 200 meanwhile (it used to get 503)."""
    host, port = _host_port(root)
    c = root.client()
    socks = []
    try:
        for _ in range(24):
            s = socket.create_connection((host, port), timeout=30)
            s.sendall(b"POST /score?target=healthy HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 67108864\r\n\r\n")
            socks.append(s)
        wait_for(lambda: c.json("GET", "/healthz", fresh=True)[1]["client_connections"] >= 25,
                 10, "the announcing connections to be accepted")
        health = c.json("GET", "/healthz", fresh=True)[1]
        assert health["buffers"]["in_use"] == 0, health["buffers"]
        assert c.score(_frame(env), ["healthy"], fresh=True)[0] == 200
    finally:
        for s in socks:
            s.close()


def test_candidates_and_answer_size_are_capped_by_settings(env: Env, root: RootProc) -> None:
    c = root.client()
    status, doc = c.score(_frame(env, n=MAX_CANDIDATES + 1), ["healthy"])
    assert status == 413 and doc["error"]["code"] == "too_many_candidates", doc
    assert "FT_MAX_CANDIDATES" in doc["error"]["message"]
    n = 16
    targets = ["healthy"] * (MAX_ANSWER_SCORES // n + 1)
    status, doc = c.score(_frame(env, n=n), targets)
    assert status == 413 and doc["error"]["code"] == "answer_too_large", doc
    assert "FT_MAX_ANSWER_SCORES" in doc["error"]["message"]
    assert c.score(_frame(env, n=n), targets[:MAX_ANSWER_SCORES // n])[0] == 200


def _rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"\nRss:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def test_worker_memory_returns_to_idle_after_large_bodies(env: Env) -> None:
    """After bodies of tens of MB, the worker's resident memory returns to its idle figure
    within the shrink interval (kept buffers unmapped, the heap trimmed)."""
    proc = env.root("root-memory")
    try:
        proc.wait_ready()
        c = proc.client()
        pid = _pid(proc)
        c.score(_frame(env), ["healthy"], fresh=True)
        idle = wait_for(lambda: _rss(pid) if c.json("GET", "/healthz", fresh=True)[1]
                        ["buffers"]["kept"] == 0 else 0, 15, "the idle figure", interval=0.2)
        big = make_frame(env.wl.universe, 8000, seed=9)  # type: ignore[arg-type] (38 MB)
        for _ in range(3):
            assert c.score(big, ["healthy", "ads_ctr"], fresh=True)[0] == 200
        peak = _rss(pid)
        assert peak > idle + len(big) // 2, (idle, peak, len(big))  # the bodies were resident
        wait_for(lambda: _rss(pid) < idle + (8 << 20), 20,
                 f"RSS back near idle ({idle >> 20} MiB, peak {peak >> 20} MiB)", interval=0.2)
    finally:
        proc.stop()


# -- 5. descriptors and connection slots --------------------------------------------------------
def test_silent_connections_cannot_starve_healthz(env: Env) -> None:
    """With FT_MAX_CONNECTIONS=32, 300 connections that never send a byte: the worker closes
    the oldest silent ones to take new connections, so /healthz is still answered; and a
    silent connection is closed by the head deadline counted from accept."""
    proc = env.root("root-silent", FT_MAX_CONNECTIONS="32", FT_HEADER_TIMEOUT="1",
                    FT_KEEPALIVE="60")
    host, port = _host_port(proc.wait_ready())
    pid = _pid(proc)
    socks = []
    try:
        lone = socket.create_connection((host, port), timeout=10)
        t0 = time.monotonic()
        assert lone.recv(1) == b""  # closed by the server, quietly: nothing was sent
        assert time.monotonic() - t0 < 1 + 4.0  # FT_HEADER_TIMEOUT, not FT_KEEPALIVE
        lone.close()
        for _ in range(300):
            socks.append(socket.create_connection((host, port), timeout=10))
        status, doc = proc.client().json("GET", "/healthz", fresh=True)
        assert status == 200 and doc["pid"] == pid
    finally:
        for s in socks:
            s.close()
        proc.stop()


def test_out_of_descriptors_pauses_accepting_and_recovers(env: Env) -> None:
    """The worker's RLIMIT_NOFILE lowered under it (prlimit): accepts fail with EMFILE. The
    worker stops accepting for a moment, logs once per pause (not tens of thousands of lines
    a second), does not spin, and serves again once descriptors are free."""
    proc = env.root("root-emfile", FT_HEADER_TIMEOUT="30")
    host, port = _host_port(proc.wait_ready())
    pid = _pid(proc)
    socks = []
    try:
        open_fds = len(os.listdir(f"/proc/{pid}/fd"))
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds + 4, hard))
        cpu0 = _cpu_seconds(pid)
        t0 = time.monotonic()
        for _ in range(40):
            s = socket.socket()
            s.settimeout(10)
            s.connect((host, port))  # completes in the backlog whether accepted or not
            socks.append(s)
        wait_for(lambda: "accept failed" in proc.log(), 10, "the EMFILE to be logged")
        time.sleep(2.0)  # a window to measure: the worker must not spin in it
        spent = _cpu_seconds(pid) - cpu0
        window = time.monotonic() - t0
        lines = proc.log().count("accept failed")
        assert lines <= window / 0.5 + 3, lines  # one per ACCEPT_PAUSE_S at most
        assert spent < 0.5 * window, (spent, window)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        for s in socks:
            s.close()
        socks.clear()
        wait_for(lambda: Client(proc.url, timeout=5).json("GET", "/healthz",
                                                          fresh=True)[0] == 200,
                 20, "healthz after the descriptors came back")
        assert _pid(proc) == pid
        assert metric_value(proc.client().metrics(fresh=True),
                            "feature_trimmer_root_accept_pauses_total") >= 1
    finally:
        for s in socks:
            s.close()
        proc.stop()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_head_and_http10_keep_alive(env: Env, root: RootProc) -> None:
    """HEAD is answered without a body on a kept-alive connection, and an HTTP/1.0 client
    that asks to keep the connection is told so (what ``ab -k`` waits for)."""
    host, port = _host_port(root)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n"), head
        assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) > 0  # type: ignore
        s.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        answer = read_answer(s)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
        assert b"\r\nConnection: keep-alive\r\n" in answer
        s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        last = read_until_closed(s)
        assert last.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in last
