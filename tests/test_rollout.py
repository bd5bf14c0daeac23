"""Rollouts: the root trims each version-less request for the version its leaf replica
serves, learned from the leaves' answers; a pending version is never "latest".

The rehearsals are real: per root host a daemon, an shm name and a gunicorn pool; leaf
replicas are ``trimmer-leaf`` processes whose bundle files are replaced as a deploy does;
the root bundles are built and promoted with ``trimmer-bundle``
(:mod:`root_worker.testing.rollout`; the long version with namespaces per host is
``bench/rollout_bench.py``).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from root_worker.featuremap.live_map import LiveMap
from root_worker.featuremap.map_reader import FeatureMapView
from root_worker.oncall.cli import main as inspect_main
from root_worker.service.leafversions import (
    LEAF_LEARNED,
    LEAF_NOT_IN_MAP,
    LEAF_ROLLOUT,
    LEAF_UNKNOWN,
    LeafVersions,
    LogLimiter,
    choose,
    refusal_version,
    valid_version,
)
from root_worker.service.metrics import MAX_LEAF_VERSION_SERIES, OTHER_VERSION, RootMetrics
from root_worker.testing import rollout as R
from root_worker.testing.client import metric_samples, metric_value
from trimmer_daemon.bundle.parse import parse_bundle
from trimmer_daemon.compiler import BundleStatusRecord, compile_map
from trimmer_daemon.consolidate import KeyCache, consolidate, index_bundle

# -- the per-worker table and the log limiter --------------------------------------------------


def test_learned_versions_are_a_bounded_lru_that_reports_changes() -> None:
    seen: list[tuple[str, str, str | None, str | None]] = []
    table = LeafVersions(limit=2, on_change=lambda *a: seen.append(a))
    assert table.get("http://a", "m") is None
    assert table.learn("http://a", "m", "1") is None
    assert table.learn("http://a", "m", "1") is None  # the same: no change, no callback
    assert table.learn("http://a", "m", "2") == "1" and table.changes == 1
    table.learn("http://b", "m", "1")
    assert table.get("http://a", "m") == "2"  # a hit refreshes: b is now the oldest
    table.learn("http://c", "m", "1")           # evicts b, reported with new=None
    assert table.get("http://b", "m") is None and len(table) == 2
    assert seen == [("http://a", "m", None, "1"), ("http://a", "m", "1", "2"),
                    ("http://b", "m", None, "1"), ("http://b", "m", "1", None),
                    ("http://c", "m", None, "1")]


def test_versions_a_leaf_reports_are_checked() -> None:
    assert valid_version("2") == "2" and valid_version("v1.2-rc_3~x") == "v1.2-rc_3~x"
    for bad in (None, 2, "", "a b", "x" * 2000, "v\n1"):
        assert valid_version(bad) is None
    assert refusal_version(b'{"error": "short", "version": "7"}') == "7"
    for bad in (b'{"error": "short"}', b"not json", b'["7"]', b'{"version": "a/b"}',
                b'{"version": "' + b"7" * (70 << 10) + b'"}'):
        assert refusal_version(bad) is None


def test_log_limiter_folds_events_into_one_line_per_model_and_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limiter = LogLimiter(logging.getLogger("ft.test"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="ft.test"):
        assert limiter.log(logging.WARNING, "skew", "m", "skew model=%s", "m")
        for _ in range(5):
            assert not limiter.log(logging.WARNING, "skew", "m", "skew model=%s", "m")
        assert limiter.log(logging.WARNING, "skew", "other", "skew model=%s", "other")
        now[0] += 10.0
        assert limiter.log(logging.WARNING, "skew", "m", "skew model=%s", "m")
    assert [r.getMessage() for r in caplog.records] == [
        "skew model=m", "skew model=other", "skew model=m (5 more since the last line)"]


def test_learned_versions_are_exported_with_a_bounded_label_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = RootMetrics(lambda model: model == "m")
    table = LeafVersions(on_change=metrics.leaf_version_changed)
    table.learn("http://a", "m", "1")
    table.learn("http://a", "m", "2")
    table.learn("http://a", "x", "5")  # a model the routing file does not list: _other
    samples = {(lbl["model"], lbl["endpoint"], lbl["version"]): v
               for n, lbl, v in metric_samples(metrics.render()[0].decode())
               if n == "feature_trimmer_root_leaf_version"}
    assert samples == {("m", "http://a", "1"): 0.0, ("m", "http://a", "2"): 1.0,
                       ("_other", "http://a", "5"): 1.0}
    assert metric_value(metrics.render()[0].decode(),
                        "feature_trimmer_root_leaf_version_changes_total", model="m") == 1
    for i in range(MAX_LEAF_VERSION_SERIES + 50):  # a leaf reporting ever new versions
        table.learn("http://b", "m", f"v{i}")
    versions = {lbl["version"] for n, lbl, _ in metric_samples(metrics.render()[0].decode())
                if n == "feature_trimmer_root_leaf_version"}
    assert len(versions) <= MAX_LEAF_VERSION_SERIES + 1 and OTHER_VERSION in versions


def _view(doc: dict) -> FeatureMapView:
    cache = KeyCache()
    indexed = [("b", index_bundle(parse_bundle(json.dumps(doc).encode(), path="/b"), cache))]
    return FeatureMapView(compile_map(consolidate(indexed, cache),
                                      [BundleStatusRecord(name="b", path="/b")],
                                      generation=1, built_at_ns=1, daemon_pid=1, cache=cache))


def test_choose_the_allowlist_for_what_the_replica_serves() -> None:
    view = _view({"m": [{"version": "1", "input_names": ["a", "b"]},
                        {"version": "2", "input_names": ["a", "c"], "pending": True}]})
    live = LiveMap("ft_unused_name")  # resolve_in / resolve_rollout_in take the view given
    try:
        unknown = choose(live, view, "m", None)
        assert unknown.how == LEAF_UNKNOWN and unknown.resolution.version == "1"
        assert sorted(view.feature_names(unknown.resolution.allowlist.keys)) == ["a", "b", "c"]
        for served in ("1", "2"):  # a replica on either version of the rollout: the union,
            during = choose(live, view, "m", served)  # so its move costs no round trip
            assert during.how == LEAF_ROLLOUT, served
            assert np.array_equal(during.resolution.allowlist.keys,
                                  unknown.resolution.allowlist.keys)
        other = choose(live, view, "m", "3")  # no bundle lists it: untrimmed, no 409 loop
        assert other.how == LEAF_NOT_IN_MAP and other.resolution.allowlist is None
        assert other.resolution.outcome.value == "version_fallback"
        assert np.array_equal(choose(live, view, "m", None).resolution.allowlist.keys,
                              unknown.resolution.allowlist.keys)
        # no rollout under way (v2 promoted): each replica gets exactly its version's list
        done = _view({"m": [{"version": "1", "input_names": ["a", "b"]},
                            {"version": "2", "input_names": ["a", "c"]}]})
        lagging = choose(live, done, "m", "1")  # a replica that has not moved yet
        assert lagging.how == LEAF_LEARNED and lagging.resolution.version == "1"
        assert lagging.resolution.requested_version is None
        assert sorted(done.feature_names(lagging.resolution.allowlist.keys)) == ["a", "b"]
        moved = choose(live, done, "m", "2")
        assert moved.how == LEAF_LEARNED
        assert sorted(done.feature_names(moved.resolution.allowlist.keys)) == ["a", "c"]
    finally:
        live.close()


# -- rehearsals on real processes --------------------------------------------------------------

SIGS = R.Signatures.make(n_inputs=200, swapped=20, n_features=600)


def _check(rows: list[dict]) -> dict:
    verdict = R.verdict(rows)
    assert verdict["all_met"], R.table(rows, verdict) + "\n" + json.dumps(
        [(s["stage"], s["checks"]) for s in verdict["stages"] if not s["met"]]) + \
        "\n" + json.dumps([r["error_samples"] for r in rows])
    return verdict


def test_single_root_sequence_pending_leaf_change_promote_rollback(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The four stages that used to cost a re-send per request: v2 pending while the leaf
    serves v1, the leaf moves to v2, the root promotes v2, the leaf rolls back to v1 (after
    a demotion: v2 pending again). While v2 is pending every version-less frame carries the
    union, so no stage costs a re-send. After each stage ``trimmer-inspect lookup --root``
    shows the pending versions and what each worker learned."""
    looked: dict[str, dict] = {}
    with R.rehearsal(hosts=1, workers=2, sigs=SIGS, candidates=16, stage_requests=100,
                     canary_routes_all=False) as r:
        def inspect(stage: str) -> None:
            capsys.readouterr()
            code = inspect_main(["--shm-name", r.prefixes[0], "lookup", R.MODEL, "--json",
                                 "--root", r.hosts[0].url])
            looked[stage.split()[0]] = json.loads(capsys.readouterr().out)
            assert code == 0
        rows = r.run(R.single_root_stages(r), settle=inspect)
        learned = r.learned()
    _check(rows)
    assert [row["skew_round_trips"] for row in rows] == [0] * len(rows)
    # back on v1 (a worker the kernel gave no connection in the last stage keeps what it
    # learned before; the traffic's connections reach at least one)
    assert any(line.endswith(" 1") for line in learned)
    a, b, c = looked["a"], looked["b"], looked["c"]
    assert a["pending_versions"] == ["2"] and a["version"] == "1"  # pending is not latest
    assert a["unknown_leaf_features"] == len(set(SIGS.v1) | set(SIGS.v2))
    assert {x["version"] for x in a["leaf_versions"]} == {"1"}
    on_v2 = [x for x in b["leaf_versions"] if x["version"] == "2"]  # v2 still pending:
    assert on_v2 and all(x["outcome"] == "rollout union" and  # the union, no round trip
                         x["features"] == len(set(SIGS.v1) | set(SIGS.v2)) for x in on_v2)
    assert c["pending_versions"] == [] and c["version"] == "2"  # promoted


def test_rehearsal_across_three_root_hosts() -> None:
    """The article's sequence across three root hosts (own daemon, shm name and pool each),
    two replicas per model, version-less and versioned traffic: no error, no under-sent
    frame, skew round trips at most the endpoints changed (none: every move happens inside
    the rollout window, where version-less frames carry the union), bytes within 10 % of the
    steady state in every stage."""
    with R.rehearsal(hosts=3, workers=1, sigs=SIGS, candidates=16, stage_requests=90) as r:
        rows = r.run(R.article_stages(r))
        decision = r.decision  # type: ignore[attr-defined]
    _check(rows)
    assert decision["go"] and decision["leaf_errors"] == 0
    assert sum(row["learned_changes"] for row in rows) >= 1  # the changes were seen
    assert [row["skew_round_trips"] for row in rows] == [0] * len(rows)
