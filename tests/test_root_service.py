"""Integration: real trimmer-daemon + real gunicorn root pool (2 workers) + real leaves.

One module-scoped backend (daemon, bundles, six leaves) is shared; the trim-mode root pool
is module-scoped too, other modes start their own pool. Deadlines everywhere, no sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import shm_leftovers
from daemon_helpers import DaemonProc, remove_segments, replace_bundle, wait_for, write_bundle
from root_helpers import (
    DEADLINE_MARGIN,
    LeafProc,
    RootProc,
    Workload,
    kept_bytes,
    raw_post,
    reference_scores,
    trimmed_size,
    write_routing,
)

from flatbuffers_schema.keys import Allowlist
from root_worker.frame import Trimmer, decode, encode
from root_worker.frame.backends import BACKEND, KERNEL, describe_backend
from root_worker.testing.client import Client, metric_samples, metric_value
from root_worker.testing.workload import make_columns, make_frame

MODELS = ("ads_ctr", "ads_cvr", "homefeed_rank")
M = "feature_trimmer_root_"
LEAF_TIMEOUT = 2.0  # the slow leaf answers after 6 s


@dataclass
class Backend:
    tmp: Path
    prefix: str
    wl: Workload
    daemon: DaemonProc
    leaves: dict[str, LeafProc]
    routing: Path
    homefeed_bundle: Path


def _dead_url() -> str:
    with socket.socket() as s:  # bind, learn the port, close: nothing listens there now
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    tmp = tmp_path_factory.mktemp("root")
    wl = Workload()
    prefix = f"fttest_{uuid.uuid4().hex[:12]}"
    ads, homefeed = tmp / "bundles/ads/module_info.json", tmp / "bundles/hf/module_info.json"
    write_bundle(ads, wl.ads_doc())
    write_bundle(homefeed, wl.homefeed_doc())
    newsig = tmp / "newmodel.json"
    newsig.write_text(json.dumps({"input_names": wl.models["ads_cvr"][:40]}))
    leaves = {
        "ads_ctr": LeafProc(["--bundle", str(ads), "--model", "ads_ctr"], tmp, "l-ctr"),
        "ads_cvr": LeafProc(["--bundle", str(ads), "--model", "ads_cvr"], tmp, "l-cvr"),
        "homefeed_rank": LeafProc(["--bundle", str(homefeed)], tmp, "l-hf"),
        "newmodel": LeafProc(["--signature", f"newmodel={newsig}"], tmp, "l-new"),
        "slowmodel": LeafProc(["--signature", f"slowmodel={newsig}", "--delay-ms", "6000"],
                              tmp, "l-slow"),
    }
    daemon = DaemonProc(prefix, {"ads": ads, "homefeed": homefeed}, tmp / "daemon.log")
    try:
        for leaf in leaves.values():
            leaf.wait_ready()
        routes = {m: [leaf.url] for m, leaf in leaves.items()}
        routes["ghost"] = [_dead_url()]
        routes["ads_ctr"].append(_dead_url())  # a dead replica: round-robin must skip it
        routing = write_routing(tmp / "routing.json", routes)
        daemon.wait_view(lambda v: v.model_count == 3, what="the first map")
        yield Backend(tmp, prefix, wl, daemon, leaves, routing, homefeed)
    finally:
        for leaf in leaves.values():
            leaf.stop()
        daemon.stop()
        daemon.close()
        remove_segments(prefix)
        assert not shm_leftovers(prefix)


def _root(backend: Backend, name: str, **settings: str) -> RootProc:
    env = {"FT_SHM_NAME": backend.prefix, "FT_ROUTING": str(backend.routing),
           "FT_LEAF_TIMEOUT": str(LEAF_TIMEOUT), "FT_MAX_REQUEST_BYTES": str(4 << 20)}
    env.update(settings)
    return RootProc(backend.tmp, env, name)


@pytest.fixture(scope="module")
def root(backend: Backend) -> Iterator[RootProc]:
    proc = _root(backend, "root-trim")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()
        assert not list(proc.home.iterdir()), "gunicorn wrote into $HOME"


def _frame(backend: Backend, seed: int = 0, n: int = 8, **kw: object) -> bytes:
    return make_frame(backend.wl.universe, n, seed=seed, **kw)  # type: ignore[arg-type]


def _frame_meta(backend: Backend, metadata: dict, seed: int = 0, n: int = 4) -> bytes:
    return encode(make_columns(backend.wl.universe[:20], n, seed), metadata)


def _max_overhead(frame: bytes, n_kept: int) -> int:
    """Header + padding + metadata bytes a frame of ``n_kept`` columns may add to its data:
    preamble, layout (<= the original's), block table, <64 B padding per block, metadata."""
    layout_len = int.from_bytes(frame[12:16], "little")
    meta_len = int.from_bytes(frame[48:52], "little")
    return 64 + layout_len + 8 + 16 * n_kept + 64 * (n_kept + 1) + meta_len


def _by_model(doc: dict) -> dict[str, dict]:
    return {t["model"]: t for t in doc["targets"]}


def _leaf_bytes(backend: Backend) -> dict[str, int]:
    return {m: leaf.stats()["bytes_received"] for m, leaf in backend.leaves.items()}


# -- trimming changes bytes, never scores ---------------------------------------------------
def test_scores_equal_and_leaves_receive_only_kept_columns(backend: Backend,
                                                            root: RootProc) -> None:
    wl, client = backend.wl, root.client()
    frame = _frame(backend, seed=1, targets=list(MODELS))
    before = _leaf_bytes(backend)
    status, doc = client.score(frame)
    after = _leaf_bytes(backend)
    assert status == 200, doc
    assert doc["ok"] == 3 and doc["failed"] == 0
    results = _by_model(doc)
    for model in MODELS:
        r, features = results[model], wl.features(model)
        assert r["status"] == "ok" and r["outcome"] == "trimmed" and r["version"] == "1"
        assert r["scores"] == reference_scores(frame, model, "1", features)
        size = trimmed_size(frame, features)
        assert r["bytes_trimmed"] == r["bytes_sent"] == size < len(frame)
        assert after[model] - before[model] == size
        # exactly the kept columns, their bytes plus the header, padding and metadata
        assert set(decode(Trimmer().trim(frame, Allowlist.from_names(features)).data)
                   .columns) == set(features)
        kept = kept_bytes(frame, features)
        assert kept < size <= kept + _max_overhead(frame, len(features))
    # the same frame untrimmed, straight to the leaves: the very same scores
    for model in MODELS:
        with Client(backend.leaves[model].url) as leaf:
            status, direct = leaf.json("POST", f"/score?model={model}", frame)
        assert status == 200 and direct["scores"] == results[model]["scores"]
        assert direct["n_columns"] == len(wl.universe)


def test_missing_features_are_counted_and_scores_still_match(backend: Backend,
                                                              root: RootProc) -> None:
    wl, client = backend.wl, root.client()
    drop = set(wl.models["ads_cvr"][:5])
    full = _frame(backend, seed=2)
    cols = {k: v for k, v in decode(full).columns.items() if k not in drop}
    frame = encode(cols, {"targets": ["ads_cvr"]})
    text0 = client.metrics()
    status, doc = client.score(frame)
    r = doc["targets"][0]
    assert status == 200 and r["missing_required"] == 5
    assert r["scores"] == reference_scores(frame, "ads_cvr", "1", wl.models["ads_cvr"])
    delta = metric_value(client.metrics(), M + "missing_required_total", model="ads_cvr") - \
        metric_value(text0, M + "missing_required_total", model="ads_cvr")
    assert delta == 5


# -- lookup outcomes (README, "Lookup semantics") ------------------------------------------
def test_unknown_model_passes_through_and_absent_version_falls_back(backend: Backend,
                                                                     root: RootProc) -> None:
    client = root.client()
    frame = _frame(backend, seed=3)
    text0 = client.metrics()
    before = _leaf_bytes(backend)
    status, doc = client.score(frame, ["newmodel", ("ads_cvr", "7"), ("ads_ctr", "1")])
    assert status == 200 and doc["ok"] == 3, doc
    new, cvr, ctr = doc["targets"]
    assert new["outcome"] == "passthrough_unknown_model"
    assert new["bytes_sent"] == new["bytes_trimmed"] == len(frame)
    assert _leaf_bytes(backend)["newmodel"] - before["newmodel"] == len(frame)
    assert new["scores"] == reference_scores(frame, "newmodel", "1",
                                             backend.wl.models["ads_cvr"][:40])
    assert cvr["outcome"] == "version_fallback" and cvr["version"] == "1"
    assert cvr["requested_version"] == "7"
    assert ctr["outcome"] == "trimmed"
    text = client.metrics()

    def delta(**labels: str) -> float:
        return (metric_value(text, M + "targets_total", **labels)
                - metric_value(text0, M + "targets_total", **labels))
    assert delta(model="newmodel", outcome="passthrough_unknown_model") == 1
    assert delta(model="ads_cvr", outcome="version_fallback") == 1
    assert delta(model="ads_ctr", outcome="trimmed") == 1


def test_unrouted_models_share_one_metric_label(backend: Backend, root: RootProc) -> None:
    client = root.client()
    status, doc = client.score(_frame(backend, seed=4), ["nobody_routes_me", "ads_ctr"])
    assert status == 200 and doc["ok"] == 1
    assert doc["targets"][0]["error"]["kind"] == "no_route"
    text = client.metrics()
    assert metric_value(text, M + "leaf_errors_total", model="_other", kind="no_route") >= 1
    assert not any(lbl.get("model") == "nobody_routes_me" for _, lbl, _ in
                   metric_samples(text))


# -- failing leaves --------------------------------------------------------------------------
def test_dead_and_slow_leaves_fail_only_their_targets(backend: Backend, root: RootProc) -> None:
    client = root.client()
    frame = _frame(backend, seed=5)
    t0 = time.monotonic()
    status, doc = client.score(frame, ["ghost", "slowmodel", "ads_cvr", "homefeed_rank"])
    elapsed = time.monotonic() - t0
    assert status == 200, doc
    # the slow leaf (6 s) ends the request at FT_LEAF_TIMEOUT, not later
    assert LEAF_TIMEOUT <= elapsed < LEAF_TIMEOUT + DEADLINE_MARGIN, elapsed
    r = _by_model(doc)
    assert r["ghost"]["status"] == "error" and r["ghost"]["error"]["kind"] == "connect"
    assert r["slowmodel"]["status"] == "error" and r["slowmodel"]["error"]["kind"] == "timeout"
    assert r["ads_cvr"]["status"] == "ok" and r["homefeed_rank"]["status"] == "ok"
    assert doc["ok"] == 2 and doc["failed"] == 2
    # only failing targets: 502, still one answer per target
    status, doc = client.score(frame, ["ghost"])
    assert status == 502 and doc["targets"][0]["error"]["kind"] == "connect"
    text = client.metrics()
    assert metric_value(text, M + "leaf_errors_total", model="ghost", kind="connect") >= 2
    assert metric_value(text, M + "leaf_errors_total", model="slowmodel", kind="timeout") >= 1


def test_round_robin_skips_a_dead_replica(backend: Backend, root: RootProc) -> None:
    client = root.client()
    frame = _frame(backend, seed=6)
    for _ in range(4):  # ads_ctr has a live and a dead replica
        status, doc = client.score(frame, ["ads_ctr"])
        assert status == 200 and doc["targets"][0]["leaf"] == backend.leaves["ads_ctr"].url


# -- bad input -------------------------------------------------------------------------------

def _bad_frames(frame: bytes) -> dict[str, tuple[bytes, str]]:
    meta_off = int.from_bytes(frame[40:48], "little")
    table_off = ((64 + int.from_bytes(frame[12:16], "little")) + 7) & ~7
    broken_table = bytearray(frame)
    broken_table[table_off + 16:table_off + 24] = (64).to_bytes(8, "little")  # col 1 at 64
    bad_meta = bytearray(frame)
    bad_meta[meta_off] = ord("[")
    return {
        "garbage": (b"not a frame at all", "truncated preamble"),
        "empty": (b"", "truncated preamble"),
        "truncated": (frame[:-100], "frame_len"),
        "bad_magic": (b"XXXX" + frame[4:], "magic"),
        "metadata_not_json": (bytes(bad_meta), "metadata"),
        "block_table": (bytes(broken_table), "column 1"),
    }


def test_malformed_frames_and_targets_are_4xx_and_the_worker_survives(
        backend: Backend, root: RootProc) -> None:
    client = root.client()
    frame = _frame(backend, seed=7, targets=["ads_ctr"])
    pids = root.worker_pids()
    status, health = client.json("GET", "/healthz")
    pid = health["pid"]
    cases = {name: (body, "/score", want) for name, (body, want) in _bad_frames(frame).items()}
    cases.update({
        "no_targets": (_frame_meta(backend, {}), "/score", "no targets"),
        "targets_not_list": (_frame_meta(backend, {"targets": "ads_ctr"}), "/score",
                             "must be a list"),
        "target_bad_type": (_frame_meta(backend, {"targets": [17]}), "/score", "targets[0]"),
        "target_bad_version": (_frame_meta(backend, {"targets": [{"model": "a",
                                                                  "version": 1.5}]}),
                               "/score", "version"),
        "empty_query_target": (frame, "/score?target=", "model must be a non-empty"),
        "lone_surrogate": (_frame_meta(backend, {"targets": ["XXXXXX"]}).replace(
            b"XXXXXX", b"\\ud800"), "/score", "surrogate"),
    })
    for name, (body, path, want) in cases.items():
        status, doc = client.json("POST", path, body)
        assert status == 400, (name, doc)
        assert want in doc["error"]["message"], (name, doc)
        # the same keep-alive connection reaches the same, living worker
        status, health = client.json("GET", "/healthz")
        assert status == 200 and health["pid"] == pid, name
    status, doc = client.json("GET", "/score")
    assert status == 405
    status, doc = client.json("POST", "/nowhere", b"x")
    assert status == 404
    assert root.worker_pids() == pids


def _chunked(body: bytes, size: int = 65536) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
             for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_request_size_limit_is_413(backend: Backend, root: RootProc) -> None:
    pids = root.worker_pids()
    limit = 4 << 20
    # decided from Content-Length alone, before reading the body
    answer = raw_post(root.url, f"POST /score HTTP/1.1\r\nHost: x\r\n"
                                 f"Content-Length: {limit + 1}\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"FT_MAX_REQUEST_BYTES" in answer
    chunked_head = "POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    answer = raw_post(root.url, chunked_head, _chunked(b"\0" * (limit + 1)))
    assert answer.startswith(b"HTTP/1.1 413")
    frame = _frame(backend, seed=8, targets=["ads_ctr"])
    assert raw_post(root.url, chunked_head, _chunked(frame)).startswith(b"HTTP/1.1 200")
    with root.client() as client:
        status, doc = client.score(frame)
    assert status == 200
    assert root.worker_pids() == pids


# -- health, metrics, generations --------------------------------------------------------------
def test_health_readiness_and_metrics_per_worker(backend: Backend, root: RootProc) -> None:
    pids = root.worker_pids()
    gen = backend.daemon.view().generation
    seen = root.health_by_worker(pids, cond=lambda d: d["generation"] == gen)
    for doc in seen.values():
        assert doc["status"] == "ok" and doc["reasons"] == []
        assert doc["map_age_seconds"] >= 0 and doc["heartbeat_age_seconds"] < 10
        assert doc["trim_backend"] == describe_backend()  # the workers trim as this install
    status, ready = root.client().json("GET", "/readyz")
    assert status == 200 and ready["ready"]
    text = root.client().metrics()
    served = {lbl["pid"]: v for n, lbl, v in metric_samples(text)
              if n == M + "map_generation"}
    assert {int(p) for p in served} >= pids and set(served.values()) == {gen}
    assert metric_value(text, M + "map_age_seconds") >= 0
    assert metric_value(text, M + "info", mode="trim", lz4="0") == len(pids)
    assert metric_value(text, M + "trim_backend_info", backend=BACKEND,
                        kernel=KERNEL or "none") == len(pids)


def test_bundle_update_reaches_every_worker_and_the_leaf(backend: Backend,
                                                         root: RootProc) -> None:
    wl = backend.wl
    old = backend.daemon.view().generation
    replace_bundle(backend.homefeed_bundle, wl.homefeed_doc(with_v2=True))
    new = backend.daemon.wait_view(lambda v: v.generation > old, what="v2 published")
    seen = root.health_by_worker(root.worker_pids(),
                                 cond=lambda d: d["generation"] >= new.generation)
    assert len(seen) == 2
    frame = _frame(backend, seed=9)
    client = root.client()

    def v2_scored() -> dict | None:
        status, doc = client.score(frame, ["homefeed_rank"])
        r = doc["targets"][0]
        # a worker that learned v1 pays one skew re-send for the change, then trims for v2
        return r if r.get("leaf_version") == "2" and "fallback" not in r else None
    r = wait_for(v2_scored, 10, "the leaf to roll out v2")
    assert r["version"] == "2" and r["outcome"] == "trimmed"
    assert r["bytes_sent"] == trimmed_size(frame, wl.v2)
    assert r["scores"] == reference_scores(frame, "homefeed_rank", "2", wl.v2)
    status, doc = client.score(frame, [("homefeed_rank", "1")])
    r1 = doc["targets"][0]
    assert r1["version"] == "1" and r1["leaf_version"] == "1"
    assert r1["scores"] == reference_scores(frame, "homefeed_rank", "1",
                                            wl.models["homefeed_rank"])


def test_killed_worker_is_replaced_and_attaches_at_once(backend: Backend,
                                                         root: RootProc) -> None:
    pids = root.worker_pids()
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    fresh = wait_for(lambda: (p := root.worker_pids()) and len(p) == 2 and victim not in p
                     and p, 20, "gunicorn to replace the worker")
    gen = backend.daemon.view().generation
    new_pid = (fresh - pids).pop()
    wait_for(lambda: root.log().count("root worker ready") >= 3, 20, "the new worker")
    seen = root.health_by_worker({new_pid}, cond=lambda d: d["generation"] == gen)
    assert seen[new_pid]["generation"] == gen
    text = root.client().metrics()
    live = {int(lbl["pid"]) for n, lbl, _ in metric_samples(text) if n == M + "map_generation"}
    assert victim not in live  # child_exit removed the dead worker's live gauges


# -- modes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,lz4", [("shadow", "0"), ("off", "0"), ("trim", "1")])
def test_modes_and_lz4(backend: Backend, mode: str, lz4: str) -> None:
    wl = backend.wl
    proc = _root(backend, f"root-{mode}-{lz4}", FT_MODE=mode, FT_LZ4=lz4, FT_WORKERS="2")
    try:
        client = proc.wait_ready().client()
        frame = _frame(backend, seed=10)
        before = {m: backend.leaves[m].stats() for m in MODELS}
        status, doc = client.score(frame, list(MODELS))
        assert status == 200 and doc["ok"] == 3 and doc["mode"] == mode, doc
        text = client.metrics()
        for m, r in _by_model(doc).items():
            stats = backend.leaves[m].stats()
            wire = stats["bytes_received"] - before[m]["bytes_received"]
            decoded = stats["frame_bytes"] - before[m]["frame_bytes"]
            leaf_features = wl.features(m, r["leaf_version"])  # homefeed may be at v2
            assert r["scores"] == reference_scores(frame, m, r["leaf_version"], leaf_features)
            assert wire == r["bytes_sent"]
            trimmed = trimmed_size(frame, wl.features(m, r["version"] or "1"))
            if mode == "shadow":
                assert r["outcome"] == "trimmed" and r["bytes_trimmed"] == trimmed
                assert decoded == len(frame) == r["bytes_sent"]
            elif mode == "off":
                assert r["outcome"] == "off" and r["bytes_trimmed"] == len(frame)
                assert decoded == len(frame) == r["bytes_sent"]
            else:
                assert decoded == trimmed and r["bytes_sent"] < trimmed
            assert metric_value(text, M + "sent_bytes_total", model=m) == r["bytes_sent"]
            assert metric_value(text, M + "trimmed_bytes_total", model=m) == r["bytes_trimmed"]
            assert metric_value(text, M + "targets_total", model=m,
                                outcome=r["outcome"]) == 1
        assert metric_value(text, M + "info", mode=mode, lz4=lz4) == 2
        assert metric_value(text, M + "requests_total", code="200") == 1  # this pool's one
    finally:
        proc.stop()


# -- no map, daemon gone ----------------------------------------------------------------------
def test_no_map_passes_through_then_daemon_death_keeps_the_last_map(
        backend: Backend, tmp_path: Path, shm_prefix: str) -> None:
    wl = backend.wl
    ads = tmp_path / "ads.json"
    write_bundle(ads, wl.ads_doc())
    proc = _root(backend, "root-nomap", FT_SHM_NAME=shm_prefix, FT_HEARTBEAT_STALE="0.5",
                 FT_READY_MAX_WAIT="600")
    daemon = None
    try:
        client = proc.wait_ready().client()
        frame = _frame(backend, seed=11)
        status, doc = client.score(frame, ["ads_ctr"])
        r = doc["targets"][0]
        assert status == 200 and r["outcome"] == "passthrough_no_map"
        assert r["bytes_sent"] == len(frame)
        assert metric_value(client.metrics(), M + "targets_total", model="ads_ctr",
                            outcome="passthrough_no_map") == 1
        status, health = client.json("GET", "/healthz")
        assert status == 200 and health["status"] == "degraded" and health["generation"] == 0
        assert client.json("GET", "/readyz")[0] == 503

        daemon = DaemonProc(shm_prefix, {"ads": ads}, tmp_path / "daemon.log")
        gen = daemon.wait_view(lambda v: v.model_count == 2).generation
        proc.health_by_worker(proc.worker_pids(), cond=lambda d: d["generation"] == gen)
        assert client.json("GET", "/readyz")[0] == 200

        daemon.kill()  # SIGKILL: the map stays, the heartbeat stops
        proc.health_by_worker(proc.worker_pids(), cond=lambda d: d["status"] == "degraded"
                              and d["generation"] == gen)
        status, doc = client.score(frame, ["ads_ctr"])
        r = doc["targets"][0]
        assert r["outcome"] == "trimmed" and r["bytes_sent"] == trimmed_size(
            frame, wl.models["ads_ctr"])
        assert r["scores"] == reference_scores(frame, "ads_ctr", "1", wl.models["ads_ctr"])
    finally:
        proc.stop()
        if daemon is not None:
            daemon.close()
        remove_segments(shm_prefix)
