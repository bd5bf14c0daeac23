"""A rollout skew: the root trims for a version the leaf does not serve yet.

Roots receive new allowlists before leaves roll the version out (docs/kubernetes.md, the article's
"root configs lead"). If a request reaches a leaf still on the old version and the trimmed
frame lacks features that version needs, the leaf refuses it (409) and the root re-sends the
frame untrimmed: trimming costs bandwidth, never scores. Real daemon, gunicorn and leaf.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from conftest import shm_leftovers
from daemon_helpers import DaemonProc, remove_segments, write_bundle
from root_helpers import LeafProc, RootProc, Workload, reference_scores, write_routing

from root_worker.testing.client import metric_value
from root_worker.testing.workload import make_frame


def test_leaf_on_another_version_gets_the_frame_untrimmed(tmp_path: Path) -> None:
    wl = Workload()
    names = [f.name for f in wl.universe]
    old, new = names[:60], names[40:120]          # v1 (leaf) and v2 (root) differ
    prefix = f"fttest_{uuid.uuid4().hex[:12]}"
    bundle = tmp_path / "b" / "module_info.json"
    write_bundle(bundle, {"skew": [{"version": "1", "input_names": old},
                                   {"version": "2", "input_names": new}]})
    sig = tmp_path / "v1.json"
    sig.write_text(json.dumps({"input_names": old}))
    leaf = LeafProc(["--signature", f"skew@1={sig}"], tmp_path, "leaf")
    daemon = DaemonProc(prefix, {"b": bundle}, tmp_path / "daemon.log")
    root = None
    try:
        leaf.wait_ready()
        routing = write_routing(tmp_path / "routing.json", {"skew": [leaf.url]})
        daemon.wait_view(lambda v: v.resolve("skew").version == "2")
        root = RootProc(tmp_path, {"FT_SHM_NAME": prefix, "FT_ROUTING": str(routing)},
                        "root").wait_ready()
        frame = make_frame(wl.universe, 8, seed=5)
        client = root.client()
        # latest is v2 on the root; the leaf serves v1 and lacks 40 of v1's features
        status, doc = client.score(frame, ["skew"])
        t = doc["targets"][0]
        assert status == 200 and t["status"] == "ok", doc
        assert t["version"] == "2" and t["leaf_version"] == "1"
        assert t["fallback"] == "version_skew_resent_untrimmed"
        assert t["bytes_sent"] == len(frame)
        assert t["scores"] == reference_scores(frame, "skew", "1", old)
        # asking for the version the leaf serves: trimmed, no re-send
        status, doc = client.score(frame, [("skew", "1")])
        t = doc["targets"][0]
        assert t["version"] == "1" and "fallback" not in t
        assert t["bytes_sent"] < len(frame)
        assert t["scores"] == reference_scores(frame, "skew", "1", old)
        text = client.metrics()
        assert metric_value(text, "feature_trimmer_root_skew_resends_total", model="skew") == 1
    finally:
        if root is not None:
            root.stop()
        leaf.stop()
        daemon.close()
        remove_segments(prefix)
        assert not shm_leftovers(prefix)



def test_version_less_requests_follow_the_version_the_leaf_reports(tmp_path: Path) -> None:
    """One re-send teaches the worker what a leaf serves: from then on its frames are
    trimmed for that version, or (a version no bundle lists) sent untrimmed without a round
    trip -- never a re-send per request."""
    wl = Workload()
    names = [f.name for f in wl.universe]
    v1, v2, v3 = names[:60], names[40:120], names[100:160]
    prefix = f"fttest_{uuid.uuid4().hex[:12]}"
    bundle = tmp_path / "b" / "module_info.json"
    both = [{"version": "1", "input_names": v1}, {"version": "2", "input_names": v2}]
    write_bundle(bundle, {"skew": both, "other": both})
    sig1, sig3 = tmp_path / "v1.json", tmp_path / "v3.json"
    sig1.write_text(json.dumps({"input_names": v1}))
    sig3.write_text(json.dumps({"input_names": v3}))
    leaves = [LeafProc(["--signature", f"skew@1={sig1}"], tmp_path, "leaf1"),
              LeafProc(["--signature", f"other@3={sig3}"], tmp_path, "leaf3")]
    daemon = DaemonProc(prefix, {"b": bundle}, tmp_path / "daemon.log")
    root = None
    try:
        for leaf in leaves:
            leaf.wait_ready()
        routing = write_routing(tmp_path / "routing.json",
                                {"skew": [leaves[0].url], "other": [leaves[1].url]})
        daemon.wait_view(lambda v: v.resolve("other").version == "2")
        root = RootProc(tmp_path, {"FT_SHM_NAME": prefix, "FT_ROUTING": str(routing),
                                   "FT_WORKERS": "1"}, "root").wait_ready()
        frame = make_frame(wl.universe, 8, seed=5)
        client = root.client()
        skew = [client.score(frame, ["skew"])[1]["targets"][0] for _ in range(3)]
        assert skew[0]["fallback"] == "version_skew_resent_untrimmed"  # learns v1
        for t in skew[1:]:  # then trimmed for v1, no re-send
            assert t["version"] == "1" and t["leaf_choice"] == "learned", t
            assert "fallback" not in t and t["bytes_sent"] < len(frame)
            assert t["scores"] == reference_scores(frame, "skew", "1", v1)
        other = [client.score(frame, ["other"])[1]["targets"][0] for _ in range(3)]
        assert other[0]["fallback"] == "version_skew_resent_untrimmed"  # learns v3
        for t in other[1:]:  # v3 is in no bundle: untrimmed at once, no 409 round trip
            assert t["leaf_choice"] == "not_in_map" and t["outcome"] == "version_fallback"
            assert t["fallback"] == "leaf_version_not_in_map_sent_untrimmed"
            assert t["bytes_sent"] == len(frame) and t["leaf_version"] == "3"
            assert t["scores"] == reference_scores(frame, "other", "3", v3)
        text = client.metrics()
        for model in ("skew", "other"):
            assert metric_value(text, "feature_trimmer_root_skew_resends_total",
                                model=model) == 1
        assert "version skew model=other" in root.log()
    finally:
        if root is not None:
            root.stop()
        for leaf in leaves:
            leaf.stop()
        daemon.close()
        remove_segments(prefix)
        assert not shm_leftovers(prefix)
