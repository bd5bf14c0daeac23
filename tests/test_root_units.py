"""Unit tier of the root service: settings, routing, targets, fan-out and the scorer.

Real pieces only: a real map published in real shared memory (``MapPublisher``), real leaf
servers on loopback threads, a real ``Trimmer`` (one test swaps in a subclass that fails, the
fault the fallback exists for).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from root_helpers import (
    DEADLINE_MARGIN,
    LeafThread,
    MapPublisher,
    Workload,
    reference_scores,
    trimmed_size,
)

from root_worker.featuremap.live_map import LiveMap
from root_worker.frame import Trimmer
from root_worker.leaf.model import ModelStore
from root_worker.service.fanout import LeafCall, LeafError, LeafPool, post_blocking
from root_worker.service.loop import Loop, run_until
from root_worker.service.metrics import RootMetrics
from root_worker.service.routing import Endpoint, Routing, RoutingError
from root_worker.service.score import BadRequest, Scorer
from root_worker.service.settings import SETTINGS, SettingsError, load_settings, markdown_table
from root_worker.service.targets import BadTargets, Target, parse_targets
from root_worker.testing.client import metric_value
from root_worker.testing.workload import make_frame

ROOT = Path(__file__).resolve().parent.parent


# -- settings --------------------------------------------------------------------------------
def test_settings_defaults_and_errors_name_the_variable() -> None:
    s = load_settings({})
    assert (s.mode, s.lz4, s.workers, s.shm_name) == ("trim", False, 2, "feature_trimmer")
    assert s.prometheus_dir.startswith(s.run_dir)
    s = load_settings({"FT_MODE": "Shadow", "FT_LZ4": "yes", "FT_RUN_DIR": "rel"})
    assert s.mode == "shadow" and s.lz4 and Path(s.run_dir).is_absolute()
    for env, value in [("FT_MODE", "fast"), ("FT_LZ4", "maybe"), ("FT_WORKERS", "0"),
                       ("FT_LEAF_TIMEOUT", "-1"), ("FT_BIND", "nowhere"),
                       ("FT_MAX_REQUEST_BYTES", "lots")]:
        with pytest.raises(SettingsError, match=env):
            load_settings({env: value})


def test_docs_carry_the_current_settings_table() -> None:
    doc = (ROOT / "docs" / "root-service.md").read_text()
    assert markdown_table() in doc, "regenerate with: python -m root_worker.service.settings"
    assert all(s.env in doc for s in SETTINGS)


# -- routing ---------------------------------------------------------------------------------
def test_routing_round_robin_default_route_and_errors(tmp_path: Path) -> None:
    r = Routing.from_doc({"a": ["http://h1:1", "http://h2:2/p/"], "b": "http://h3:3",
                          "*": "http://d:9"})
    firsts = [r.pick("a")[0].host for _ in range(4)]
    assert firsts == ["h1", "h2", "h1", "h2"]
    assert r.pick("a")[1].base_path in ("", "/p")
    assert [e.url for e in r.pick("zzz")] == ["http://d:9"]
    assert r.listed("a") and not r.listed("zzz") and not r.listed("*")
    assert Routing.empty().pick("a") == []
    assert Endpoint.parse("http://x:81/leaf/").base_path == "/leaf"
    bad = [([], "top level"), ({"a": []}, "non-empty"), ({"a": "https://x"}, "http://"),
           ({"a": "http://x:99999"}, "(?i)port"), ({"a": 5}, "URL"), ({"": "http://x"}, "empty"),
           ({"a": "http://x/?q=1"}, "query")]
    for doc, why in bad:
        with pytest.raises(RoutingError, match=why):
            Routing.from_doc(doc)
    path = tmp_path / "r.json"
    path.write_text("{not json")
    with pytest.raises(RoutingError, match="not valid JSON"):
        Routing.load(path)
    with pytest.raises(RoutingError, match="cannot read"):
        Routing.load(tmp_path / "missing.json")


# -- targets ---------------------------------------------------------------------------------
def test_targets_from_metadata_and_query() -> None:
    meta = {"targets": ["a", {"model": "b", "version": 3}, {"model": "c", "version": None}]}
    assert parse_targets(meta, "", 8) == [Target("a"), Target("b", "3"), Target("c")]
    assert parse_targets(meta, "target=x@2&target=y", 8) == [Target("x", "2"), Target("y")]
    assert parse_targets({}, "target=m@v@w", 8) == [Target("m", "v@w")]
    cases = [({}, "", "no targets"), ({"targets": []}, "", "empty"),
             ({"targets": {"a": 1}}, "", "must be a list"),
             ({"targets": [None]}, "", r"targets\[0\]"),
             ({"targets": [{"model": ""}]}, "", "non-empty"),
             ({"targets": [{"model": "a", "version": True}]}, "", "version"),
             ({"targets": ["a"] * 9}, "", "limit is 8"), ({}, "target=a@", "version"),
             ({"targets": ["x" * 2000]}, "", "longer than")]
    for metadata, query, why in cases:
        with pytest.raises(BadTargets, match=why):
            parse_targets(metadata, query, 8)


# -- fan-out ---------------------------------------------------------------------------------
class OneShotServer:
    """Answers each connection's first request as keep-alive, then closes it (as a leaf
    restarting or an idle timeout does): the next request on that connection finds it dead."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() would not
        self.sock.close()
        self._thread.join(5)
        assert not self._thread.is_alive()


def test_pool_keeps_connections_alive_and_retries_a_stale_one() -> None:
    store = ModelStore.from_inputs({})
    leaf = LeafThread(store)
    pool = LeafPool()
    ep = Endpoint.parse(leaf.url)
    try:
        for _ in range(5):
            _, status, _ = post_blocking(pool, [ep], "/nowhere", b"x", {}, deadline=_far())
            assert status == 404
        assert pool.connects == 1
    finally:
        pool.close()
        leaf.close()
    srv = OneShotServer()
    ep = Endpoint.parse(f"http://127.0.0.1:{srv.port}")
    pool = LeafPool()
    try:
        for _ in range(3):
            assert post_blocking(pool, [ep], "/", b"abc", {}, deadline=_far())[1:] == (200, b"ok")
        assert srv.accepted == 3 and pool.connects == 3  # each stale reuse retried fresh
    finally:
        pool.close()
        srv.close()


def _far() -> float:
    return time.monotonic() + 30


def test_calls_on_one_loop_keep_their_own_results_and_deadlines() -> None:
    store = ModelStore.from_inputs({})
    leaf = LeafThread(store)
    hung = socket.socket()  # accepts (backlog) but never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    pool, loop, results = LeafPool(), Loop(), {}
    ok, silent = Endpoint.parse(leaf.url), Endpoint.parse(f"http://127.0.0.1:"
                                                          f"{hung.getsockname()[1]}")
    deadline = time.monotonic() + 1.0
    try:
        ended: dict[str, float] = {}

        def done(name: str, r: Any) -> None:
            results[name], ended[name] = r, time.monotonic()

        for name, eps in (("ok", [ok]), ("hung", [silent]), ("none", [])):
            LeafCall(loop, pool, eps, "/nowhere", {}, [b"x"], deadline, 1 << 20,
                     lambda r, name=name: done(name, r)).start()
        run_until(loop, lambda: len(results) == 3, time.monotonic() + 30)
        # the hung call ends at its deadline: not before, nor later than a wake-up's margin
        late = ended["hung"] - deadline
        assert 0 <= late < DEADLINE_MARGIN, late
        assert results["ok"][0] == 404
        assert isinstance(results["hung"], LeafError) and results["hung"].kind == "timeout"
        assert isinstance(results["none"], LeafError) and results["none"].kind == "no_route"
    finally:
        loop.close()
        pool.close()
        hung.close()
        leaf.close()


class SlowReader:
    """A leaf that takes one request slowly (small receive buffer, 4 KB reads) and answers
    with the SHA-256 of the body it got: the sender sees many partial ``sendmsg`` calls."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import hashlib
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore
            digest = hashlib.sha256(body)
            got = len(body)
            while got < length:
                chunk = conn.recv(4096)
                assert chunk
                digest.update(chunk)
                got += len(chunk)
            answer = digest.hexdigest().encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer),
                                                                                 answer))

    def close(self) -> None:
        self.thread.join(30)
        self.sock.close()


def test_a_scatter_gather_body_survives_many_partial_sends() -> None:
    """More parts than IOV_MAX, odd sizes, to a slow reader: every byte arrives in order."""
    import hashlib
    import random
    rnd = random.Random(7)
    src = memoryview(bytes(rnd.getrandbits(8) for _ in range(1 << 16)) * 48)  # 3 MB
    parts, pos = [], 0
    while pos < len(src) - 4096:
        size = rnd.randint(1, 3000)
        parts.append(src[pos:pos + size])
        pos += size + rnd.randint(0, 64)
    assert len(parts) > 1024  # more than one sendmsg's IOV_MAX
    srv, pool, loop, results = SlowReader(), LeafPool(), Loop(), []
    try:
        LeafCall(loop, pool, [Endpoint.parse(f"http://127.0.0.1:{srv.port}")], "/score", {},
                 parts, time.monotonic() + 30, 1 << 20, results.append).start()
        run_until(loop, lambda: bool(results), time.monotonic() + 40)
        assert results and not isinstance(results[0], LeafError), results
        assert results[0] == (200, hashlib.sha256(b"".join(parts)).hexdigest().encode())
    finally:
        loop.close()
        pool.close()
        srv.close()


# -- the scorer over a real map and real leaves ------------------------------------------------
class FailingTrimmer(Trimmer):
    """The fault the fallback exists for: a trimmer bug (not a malformed frame)."""

    def trim(self, buf: Any, allowlist: Any, out: Any = None, check_ragged: bool = False
             ) -> Any:
        raise RuntimeError("simulated trimmer bug")

    def trim_parts(self, buf: Any, allowlist: Any, check_ragged: bool = False) -> Any:
        raise RuntimeError("simulated trimmer bug")


@pytest.fixture
def stack(shm_prefix: str) -> Iterator[dict[str, Any]]:
    wl = Workload(120)
    pub = MapPublisher(shm_prefix)
    pub.publish({"ads": wl.ads_doc(), "hf": wl.homefeed_doc()})
    leaf = LeafThread(_store(wl))
    live = LiveMap(shm_prefix)
    scorers: list[Scorer] = []

    def scorer(trimmer: Trimmer | None = None, **settings: Any) -> Scorer:
        s = load_settings({}, shm_name=shm_prefix, **settings)
        routing = Routing.from_doc({"*": leaf.url})
        sc = Scorer(s, live, routing, RootMetrics(routing.listed), trimmer)
        scorers.append(sc)
        return sc
    try:
        yield {"wl": wl, "scorer": scorer, "pub": pub, "leaf": leaf}
    finally:
        for sc in scorers:
            sc.close()
        leaf.close()
        live.close()
        pub.close()


def _store(wl: Workload) -> ModelStore:
    return ModelStore.from_inputs({m: {"1": f} for m, f in wl.models.items()})


def test_trimmer_failure_falls_back_to_untrimmed_and_is_counted(stack: dict) -> None:
    wl = stack["wl"]
    frame = make_frame(wl.universe, 4, seed=1, targets=["ads_ctr", "ads_cvr"])
    good = stack["scorer"]()
    status, doc = good.score(frame, "")
    assert status == 200 and [t["outcome"] for t in doc["targets"]] == ["trimmed"] * 2
    assert doc["targets"][0]["bytes_sent"] == trimmed_size(frame, wl.models["ads_ctr"])
    bad = stack["scorer"](FailingTrimmer())
    status, doc2 = bad.score(frame, "")
    assert status == 200 and doc2["ok"] == 2
    for t, t_good in zip(doc2["targets"], doc["targets"], strict=True):
        assert t["fallback"].startswith("trim_error") and t["bytes_sent"] == len(frame)
        assert t["scores"] == t_good["scores"]  # bandwidth lost, correctness kept
    text = bad.metrics.render()[0].decode()
    assert metric_value(text, "feature_trimmer_root_trim_errors_total") == 2


def test_scorer_modes_buffers_and_bad_frames(stack: dict) -> None:
    wl = stack["wl"]
    sc = stack["scorer"]()
    frames = [make_frame(wl.universe, n, seed=n, targets=["ads_ctr", "homefeed_rank"])
              for n in (8, 2, 16, 0)]
    for frame in frames:  # buffers are reused and grow; every answer stays exact
        status, doc = sc.score(frame, "")
        assert status == 200
        for t in doc["targets"]:
            assert t["scores"] == reference_scores(frame, t["model"], "1", wl.models[t["model"]])
    shadow = stack["scorer"](mode="shadow", lz4=True)
    status, doc = shadow.score(frames[0], "")
    t = doc["targets"][0]
    assert t["bytes_trimmed"] < t["bytes_untrimmed"] and 0 < t["bytes_sent"] < len(frames[0])
    off = stack["scorer"](mode="off")
    status, doc = off.score(frames[0], "target=ads_ctr")
    assert doc["targets"][0]["outcome"] == "off" and doc["generation"] >= 0
    with pytest.raises(BadRequest, match="malformed frame"):
        sc.score(frames[0][:-1], "")
    table_off = (64 + int.from_bytes(frames[0][12:16], "little") + 7) & ~7
    broken = bytearray(frames[0])
    broken[table_off:table_off + 8] = (1).to_bytes(8, "little")  # column 0 misaligned
    with pytest.raises(BadRequest, match="column 0"):
        sc.score(bytes(broken), "")


def test_no_map_then_map_then_retired(shm_prefix: str) -> None:
    wl = Workload(60)
    leaf = LeafThread(_store(wl))
    live = LiveMap(shm_prefix)
    routing = Routing.from_doc({"*": leaf.url})
    sc = Scorer(load_settings({}, shm_name=shm_prefix), live, routing, RootMetrics())
    frame = make_frame(wl.universe, 3, targets=["ads_ctr"])
    pub = None
    try:
        assert sc.score(frame, "")[1]["targets"][0]["outcome"] == "passthrough_no_map"
        pub = MapPublisher(shm_prefix)
        gen = pub.publish({"ads": wl.ads_doc()})
        doc = sc.score(frame, "")[1]
        assert doc["generation"] == gen and doc["targets"][0]["outcome"] == "trimmed"
    finally:
        sc.close()
        leaf.close()
        live.close()
        if pub is not None:
            pub.close()


def test_latest_version_is_the_natural_order_latest_of_the_published_map(
        shm_prefix: str) -> None:
    """The root resolves a target that names no version to the latest in natural order
    ("10" after "9") of the map the daemon's own compile path publishes (MapPublisher: a
    part per bundle, spliced by the assembler), trims to that version's features and the
    leaf serving both versions scores it. Fails on the planted bug of sorting versions by
    raw string in ``parts.compile_part`` (latest becomes "9"): checked by planting it."""
    wl = Workload(60)
    names = sorted(wl.models["ads_ctr"])
    v9, v10 = names[:3], names[:6]
    leaf = LeafThread(ModelStore.from_inputs({"ads_ctr": {"9": v9, "10": v10}}))
    live = LiveMap(shm_prefix)
    pub = MapPublisher(shm_prefix)
    sc = None
    try:
        pub.publish({"ads": {"ads_ctr": [{"version": "9", "input_names": v9},
                                         {"version": "10", "input_names": v10},
                                         {"version": "2", "input_names": names[:1]}]}})
        sc = Scorer(load_settings({}, shm_name=shm_prefix), live,
                    Routing.from_doc({"*": leaf.url}), RootMetrics())
        frame = make_frame(wl.universe, 3, targets=["ads_ctr"])
        status, doc = sc.score(frame, "")
        assert status == 200 and doc["ok"] == 1, doc
        (target,) = doc["targets"]
        assert (target["outcome"], target["version"]) == ("trimmed", "10"), target
        assert target["bytes_sent"] == trimmed_size(frame, v10)
    finally:
        if sc is not None:
            sc.close()
        leaf.close()
        live.close()
        pub.close()


def test_request_ids_reach_leaves_only_when_header_safe(stack: dict) -> None:
    wl = stack["wl"]
    sc = stack["scorer"]()
    for rid in ("r-1", 17, "evil\r\nX-Injected: 1", "x" * 500, "sp ace"):
        frame = make_frame(wl.universe, 2, targets=["ads_ctr"], request_id=rid)
        status, doc = sc.score(frame, "")
        assert status == 200 and doc["ok"] == 1, rid
        assert doc["request_id"] == rid
    # NaN is not JSON (metadata is strict RFC 8259, docs/frame-format.md): a client's mistake
    frame = make_frame(wl.universe, 2, targets=["ads_ctr"], request_id="NANPLACEHOLDER")
    frame = frame.replace(b'"NANPLACEHOLDER"', b'NaN' + b" " * 13)
    with pytest.raises(BadRequest) as bad:
        sc.score(frame, "")
    assert bad.value.status == 400 and "NaN is not a JSON number" in bad.value.message


def _scores_of(reply: dict) -> Any:
    from root_worker.service.replies import RawJSON

    scores = reply["scores"]
    return scores.value if isinstance(scores, RawJSON) else scores


def test_leaf_replies_must_be_json_objects_with_finite_scores() -> None:
    from root_worker.service.replies import RawJSON, leaf_reply

    fast = leaf_reply("u", 200, b'{"scores": [1.5, -2], "version": "3"}')
    assert isinstance(fast["scores"], RawJSON)  # the SDK's shape: kept as text
    assert _scores_of(fast) == [1.5, -2] and fast["leaf_version"] == "3"
    accepted = [  # kept as text or not, the scores are what json.loads reads
        b'{"scores": []}', b' {\n "scores" : [ 0 , 1e5 ,-0.0, 1E-07 ] , "model": "m"}\n',
        b'{"scores": [1e300, 5]}', b'{"version": "2", "scores": [1]}',
        b'{"scores": [[1.0, 2.0]], "missing": ["a", "b"]}', b'{"scores": [1, 2]}  ',
        b'\xef\xbb\xbf{"scores": [3]}', '{"scores": [4]}'.encode("utf-16")]  # as json.loads
    for body in accepted:
        reply = leaf_reply("u", 200, body)
        assert _scores_of(reply) == json.loads(body)["scores"], body
        assert reply.get("leaf_version") == json.loads(body).get("version"), body
    rejected = [b'{"scores": [1e999]}', b'{"scores": [[1.0, -1e999]]}', b'{"scores": [NaN]}',
                b"[]", b"\xff", b"{}", b'{"scores": [1, 2], }', b'{"scores": [1, 2]} x',
                b'{"scores": [1, 2], "scores": "x"}', b'{"scores": [1,, 2]}',
                b'{"scores": [1' + b"0" * 400 + b"]}", b'{"scores": [01]}',
                b'{"scores": [1, 2],, "a": 1}', b'{"scores": [1, Infinity]}']
    for body in rejected:
        with pytest.raises(LeafError) as err:
            leaf_reply("u", 200, body)
        assert err.value.kind == "bad_reply", body
    with pytest.raises(LeafError) as err:
        leaf_reply("u", 404, b'{"error": "model m is not served here"}')
    assert err.value.kind == "status" and err.value.status == 404
    assert "not served here" in err.value.message


def test_raw_scores_are_spliced_into_the_answer_as_strict_json() -> None:
    import copy

    from root_worker.service.replies import answer_body, leaf_reply, materialize

    replies = [leaf_reply("u", 200, b'{"scores": [0.1, 2e-05, -3]}'),
               leaf_reply("u", 200, b'{"scores": [[1, 2]]}')]  # general path: a list
    doc = {"request_id": "r\u00e9", "generation": 3, "targets": [
        {"model": "a", "status": "ok", **replies[0]}, {"model": "b", "status": "ok",
                                                         **replies[1]},
        {"model": "c", "status": "error", "error": {"kind": "timeout"}}]}
    status, headers, body = answer_body(200, copy.deepcopy(doc))
    assert status == 200 and headers == [("Content-Type", "application/json")]
    assert json.loads(body) == materialize(doc)
    assert b'"scores":[0.1, 2e-05, -3]' in body  # as the leaf wrote them


def test_one_map_view_per_request_reports_the_generation_that_served_it(stack: dict) -> None:
    wl, pub = stack["wl"], stack["pub"]
    sc = stack["scorer"]()
    first = sc.live_map.current().generation  # type: ignore[union-attr]
    frame = make_frame(wl.universe, 2, targets=["ads_ctr", "ads_cvr", "homefeed_rank"])
    done: list[dict] = []
    loop = Loop()
    try:
        sc.begin(memoryview(frame), "", loop, lambda status, doc: done.append(doc))
        # a new generation lands while the request's leaf calls are in flight
        second = pub.publish({"ads": wl.ads_doc()})  # homefeed_rank now unknown
        run_until(loop, lambda: bool(done), time.monotonic() + 30)
    finally:
        loop.close()
    doc = done[0]
    assert second > first and doc["generation"] == first
    assert [t["outcome"] for t in doc["targets"]] == ["trimmed"] * 3  # all from `first`
    doc2 = sc.score(frame, "")[1]
    assert doc2["generation"] == second
    assert doc2["targets"][2]["outcome"] == "passthrough_unknown_model"


def test_a_version_that_cannot_travel_in_a_header_is_sent_untrimmed(stack: dict) -> None:
    """A map compiled before the validator's alphabet (or by a buggy daemon) must never
    produce a broken header or lose a target: it sends untrimmed and counts it."""
    import dataclasses

    from trimmer_daemon.bundle.parse import parse_bundle

    wl, pub = stack["wl"], stack["pub"]
    parsed = parse_bundle(json.dumps(wl.ads_doc()).encode(), path="/b/ads")
    evil = "1\r\nX-Injected: yes"
    models = {m: tuple(dataclasses.replace(v, version=evil) for v in vs)
              for m, vs in parsed.models.items()}
    pub.publish_parsed({"ads": dataclasses.replace(parsed, models=models)})
    sc = stack["scorer"]()
    frame = make_frame(wl.universe, 2, targets=["ads_ctr"])
    status, doc = sc.score(frame, "")
    t = doc["targets"][0]
    assert status == 200 and t["status"] == "ok", t
    assert t["version"] == evil and t["fallback"] == "unsafe_version_sent_untrimmed"
    assert t["bytes_sent"] == len(frame) and t["bytes_trimmed"] < len(frame)
    text = sc.metrics.render()[0].decode()
    assert metric_value(text, "feature_trimmer_root_trim_errors_total", model="_other") >= 1


def test_leaf_paths_are_encoded_and_their_memo_is_bounded(stack: dict) -> None:
    from urllib.parse import parse_qs, urlsplit

    from root_worker.service.metrics import MAX_CACHED_MODELS

    sc = stack["scorer"]()
    path = sc._leaf_path("a b&c=d", "1.2+x")
    assert urlsplit(path).path == "/score"
    assert parse_qs(urlsplit(path).query) == {"model": ["a b&c=d"], "version": ["1.2+x"]}
    assert parse_qs(urlsplit(sc._leaf_path("m", None)).query) == {"model": ["m"]}
    for k in range(MAX_CACHED_MODELS + 10):  # clients choose the names
        assert sc._leaf_path(f"m{k}", None).endswith(f"model=m{k}")
    assert len(sc._paths) <= MAX_CACHED_MODELS
