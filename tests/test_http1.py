"""The HTTP framing of root_worker.service.http1 on real bytes: llhttp's framing plus this
service's policy (limits, Host and Transfer-Encoding rules, absolute-form targets), the
same answer whatever the segmentation, and leaf answers under caps.

The pool-level behaviour (answers, connections, faults) is in test_root_edge.py and
test_root_hostile.py; these tests pin the parser contract the worker and the fuzz targets
rely on.
"""

from __future__ import annotations

import random

import pytest

from root_worker.service.http1 import (
    MAX_SMALL_PIECES,
    MIN_PIECE_BYTES,
    HttpError,
    Message,
    ReplyParser,
    RequestStream,
)

MAX_HEAD = 32 << 10
MAX_BODY = 1 << 20


def _stream() -> RequestStream:
    return RequestStream(MAX_HEAD, MAX_BODY)


def _parse(data: bytes, cuts: list[int] | None = None) -> tuple[list[Message], HttpError | None]:
    """Feed ``data`` cut at ``cuts``; every completed request and the refusal (if any)."""
    s = _stream()
    bounds = [0, *(cuts or []), len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    err = None
    try:
        for p in pieces:
            s.feed(p)
    except HttpError as exc:
        err = exc
    return list(s.done), err


def _outcome(data: bytes, cuts: list[int] | None = None) -> tuple[list[tuple[str, bytes]],
                                                                  tuple[int, str] | None]:
    done, err = _parse(data, cuts)
    return ([(m.method + " " + m.target, bytes(m.store or b"")) for m in done],
            (err.status, err.code) if err else None)


CASES = {
    "get": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "post": b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    "chunked": b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: 1\r\n\r\n",
    "pipelined": b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
    "bare_lf": b"GET /healthz HTTP/1.1\nHost: x\n\n",
    "unicode_digit": "POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n"
                     .encode("latin-1"),
    "cl_and_te": b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "conflicting_cl": b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                      b"Content-Length: 4\r\n\r\nabcd",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
    "bad_chunk": b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_outcome_does_not_depend_on_segmentation(name: str) -> None:
    data = CASES[name]
    whole = _outcome(data)
    for cut in range(1, len(data)):
        assert _outcome(data, [cut]) == whole, (name, cut)
    rng = random.Random(name)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), min(5, len(data) - 1)))
        assert _outcome(data, cuts) == whole, (name, cuts)


def test_what_llhttp_refuses_is_a_400_naming_it() -> None:
    expect = {"bare_lf": "bad_request_line", "unicode_digit": "bad_length",
              "cl_and_te": "bad_length", "conflicting_cl": "bad_length",
              "obs_fold": "bad_header", "bad_chunk": "bad_chunked"}
    for name, code in expect.items():
        done, err = _parse(CASES[name])
        assert err is not None and (err.status, err.code) == (400, code), (name, err)
        assert err.message.startswith("malformed"), err.message


def test_requests_are_framed_with_their_bodies() -> None:
    done, err = _parse(CASES["chunked"] + CASES["post"] + CASES["pipelined"])
    assert err is None
    assert [(m.method, m.path, bytes(m.store or b"")) for m in done] == [
        ("POST", "/score", b"hello!"), ("POST", "/score", b"hello"),
        ("GET", "/a", b""), ("GET", "/b", b"")]
    assert all(m.keep_alive and m.minor == 1 and m.complete for m in done)


def test_a_chunked_end_in_a_later_feed_completes_one_request_only() -> None:
    """The double dispatch: the last chunk and a pipelined request arrive together later."""
    s = _stream()
    s.feed(b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert not s.done and s.msg is not None and s.msg.headed
    s.feed(b"0\r\n\r\nPOST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert [bytes(m.store) for m in s.done] == [b"hello", b"hi"]
    assert s.msg is None


@pytest.mark.parametrize("head,status,code", [
    (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_host"),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_framing"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501,
     "unsupported_encoding"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
     "unsupported_encoding"),
    (b"GET / HTTP/2.0\r\n\r\n", 505, "bad_version"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413, "too_large"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 414, "uri_too_long"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431,
     "too_many_headers"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n", 431,
     "header_too_large"),
    (b"GET host:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request_line"),
])
def test_rfc_9112_rules_and_limits(head: bytes, status: int, code: str) -> None:
    done, err = _parse(head)
    assert not done
    assert err is not None and (err.status, err.code) == (status, code), err


def test_a_head_is_capped_while_it_arrives() -> None:
    """An endless header value is refused once the bytes fed pass the cap, before llhttp
    (or httptools, which accumulates a value across feeds) holds much more."""
    s = _stream()
    s.feed(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    with pytest.raises(HttpError) as info:
        for _ in range(1000):
            s.feed(b"a" * 4096)
    assert info.value.status == 431
    assert s.closed


def test_trailers_are_counted_against_the_limits() -> None:
    body = b"0\r\n" + b"T: x\r\n" * 101 + b"\r\n"
    done, err = _parse(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert err is not None and (err.status, err.code) == (431, "too_many_headers")
    assert "trailer" in err.message


def test_a_chunked_body_is_capped() -> None:
    s = RequestStream(MAX_HEAD, 10)
    with pytest.raises(HttpError) as info:
        s.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
    assert (info.value.status, info.value.code) == (413, "too_large")


def test_a_body_of_tiny_chunks_is_refused() -> None:
    """Each chunk costs the worker a callback: 1-byte chunks past MAX_SMALL_PIECES are a 400,
    while the same count of ordinary chunks is served."""
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    tiny = b"1\r\nx\r\n" * (MAX_SMALL_PIECES + 10) + b"0\r\n\r\n"
    done, err = _parse(head + tiny)
    assert err is not None and (err.status, err.code) == (400, "bad_chunked"), err
    assert "larger" in err.message
    fine = (b"%x\r\n" % MIN_PIECE_BYTES + b"y" * MIN_PIECE_BYTES + b"\r\n") * \
        (MAX_SMALL_PIECES + 10) + b"0\r\n\r\n"
    s = RequestStream(MAX_HEAD, 1 << 30)
    s.feed(head + fine)
    assert len(s.done) == 1 and len(s.done[0].store) == MIN_PIECE_BYTES * (MAX_SMALL_PIECES + 10)


def test_absolute_form_http10_keep_alive_expect_and_head() -> None:
    done, err = _parse(b"GET http://example:80/healthz?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                       b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue"
                       b"\r\n\r\nHEAD /b HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                       b"Connection: close\r\n\r\n")
    assert err is None
    a, b, c = done
    assert (a.path, a.query) == ("/healthz", "x=1")
    assert b.minor == 0 and b.keep_alive and not b.expect_continue  # ignored in HTTP/1.0
    assert c.is_head and c.expect_continue and not c.keep_alive


def test_an_upgrade_request_ends_the_stream() -> None:
    s = _stream()
    s.feed(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
           b"\x00\x01binary")
    assert len(s.done) == 1 and not s.done[0].keep_alive and s.closed


def test_a_body_read_by_the_caller_restarts_the_parser() -> None:
    s = _stream()
    s.feed(b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    msg = s.msg
    assert msg is not None and msg.body_rest == 7
    s.body_arrived(7)  # the caller put the rest in place itself
    assert list(s.done) == [msg] and msg.complete
    s.feed(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.done[-1].path == "/next"


def test_a_sink_fault_is_not_a_client_error() -> None:
    def sink(msg: Message, data: bytes) -> None:
        raise KeyError("a bug in the consumer")

    s = RequestStream(MAX_HEAD, MAX_BODY, on_body=sink)
    with pytest.raises(KeyError):
        s.feed(CASES["post"])


# -- leaf answers ---------------------------------------------------------------------------
def _reply(data: bytes, max_body: int = 1000, eof: bool = False) -> ReplyParser:
    r = ReplyParser(max_body)
    done = r.feed(data)
    if eof and not done:
        r.eof()
    return r


def test_leaf_answers_framed_and_capped() -> None:
    r = _reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert (r.complete, r.status, bytes(r.body), r.keep_alive) == (True, 200, b"hi", True)
    r = _reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert (r.status, bytes(r.body)) == (200, b"x")
    r = _reply(b"HTTP/1.1 200 OK\r\n\r\nuntil close", eof=True)
    assert r.complete and bytes(r.body) == b"until close" and not r.keep_alive
    r = _reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK\r\n")
    assert r.complete and not r.keep_alive  # more than one answer: not reusable
    for bad, words in [
            ("HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "Content-Length"),
            ("HTTP/9 teapot\r\n\r\n", "malformed"),
            ("HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", "FT_MAX_LEAF_REPLY_BYTES"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n" + "a" * 2000,
             "FT_MAX_LEAF_REPLY_BYTES")]:
        with pytest.raises(HttpError) as info:
            _reply(bad.encode("latin-1"))
        assert info.value.status == 502 and words in info.value.message, (bad, info.value)


def test_a_leaf_answer_head_is_capped() -> None:
    r = ReplyParser(1000, max_head=100)
    with pytest.raises(HttpError, match="head exceeds"):
        r.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200)
        r.feed(b"a")
