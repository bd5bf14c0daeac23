"""Per-bundle compiled parts spliced into one blob (issue #11, items 5 and 6).

The spliced blob must read exactly like the one the reference path builds
(``consolidate`` + ``compile_map``): same models in the same order, same allowlists and
digests, same bundle attributions and conflicts; and its name table holds only live names.
"""

from __future__ import annotations

import json
import os

import numpy as np

from flatbuffers_schema.fmap.BundleState import BundleState
from flatbuffers_schema.fmap.FeatureMap import FeatureMap
from flatbuffers_schema.shm_layout import checksum
from root_worker.featuremap.map_reader import FeatureMapView
from trimmer_daemon.assemble import Assembler
from trimmer_daemon.bundle.parse import Limits, parse_bundle
from trimmer_daemon.compiler import BundleStatusRecord, compile_map
from trimmer_daemon.consolidate import KeyCache, consolidate, index_bundle
from trimmer_daemon.parts import build_part

ADS = {"ctr": [{"version": "9", "input_names": ["a", "b"]},
               {"version": "10", "input_names": ["a", "b", "c"], "output_names": ["p"]},
               {"version": "2", "input_names": ["z"]}],
       "cvr": [{"version": "1", "input_names": ["x", "y"]}],
       "shared": [{"version": "1", "input_names": ["s1"]}, {"version": "3", "input_names": ["s3"]}]}
FEED = {"rank": [{"version": "1", "input_names": ["x", "q", "ü-名前"]}],
        "shared": [{"version": "1", "input_names": ["s1", "s2"]},  # a conflict: union
                   {"version": "2", "input_names": ["s2"]}]}
EMPTY: dict = {}


def _statuses(docs: dict[str, dict]) -> list[BundleStatusRecord]:
    return [BundleStatusRecord(name=n, path=f"/b/{n}", state=BundleState.Ok, sha256="ab" * 32,
                               model_count=len(d)) for n, d in docs.items()]


def _reference(docs: dict[str, dict]) -> bytes:
    cache = KeyCache()
    indexed = [(n, index_bundle(parse_bundle(json.dumps(d).encode(), path=f"/b/{n}"), cache))
               for n, d in docs.items()]
    return compile_map(consolidate(indexed, cache), _statuses(docs), generation=3,
                       built_at_ns=1, daemon_pid=os.getpid(), cache=cache)


def _spliced(docs: dict[str, dict], assembler: Assembler | None = None) -> bytes:
    parts = [build_part(json.dumps(d).encode(), path=f"/b/{n}", limits=Limits(),
                        bundle_index=i) for i, (n, d) in enumerate(docs.items())]
    out = (assembler or Assembler()).assemble(parts, _statuses(docs), generation=3,
                                              built_at_ns=1, daemon_pid=os.getpid())
    blob = b"".join(bytes(p) for p in out.parts)
    assert checksum(blob) == out.crc
    return blob


def _same(a: FeatureMapView, b: FeatureMapView) -> None:
    assert list(a.models()) == list(b.models())
    assert a.conflicts() == b.conflicts() and a.bundles() == b.bundles()
    for model in [m["name"] for m in b.models()] + ["unknown"]:
        for version in (None, "1", "2", "3", "9", "10", "404"):
            x, y = a.resolve(model, version), b.resolve(model, version)
            assert (x.outcome, x.version) == (y.outcome, y.version), (model, version)
            if y.allowlist is not None:
                assert x.allowlist is not None
                assert np.array_equal(x.allowlist.keys, y.allowlist.keys)
                assert x.allowlist.digest == y.allowlist.digest
                assert a.feature_names(x.allowlist.keys) == b.feature_names(y.allowlist.keys)


def test_spliced_blob_reads_like_the_reference_blob() -> None:
    docs = {"ads": ADS, "empty": EMPTY, "feed": FEED}
    spliced, reference = FeatureMapView(_spliced(docs)), FeatureMapView(_reference(docs))
    _same(spliced, reference)
    shared = next(m for m in spliced.models() if m["name"] == "shared")
    assert [v["version"] for v in shared["versions"]] == ["1", "2", "3"]  # natural order
    assert any("'shared' version '1'" in c for c in spliced.conflicts())


def test_bundle_positions_are_patched_not_rebuilt() -> None:
    """SIGHUP can move a bundle in FeatureMap.bundles: its part is patched in place."""
    part = build_part(json.dumps(FEED).encode(), path="/b/feed", limits=Limits(),
                      bundle_index=0)
    moved = part.with_index(1)
    assert moved.block != part.block and len(moved.block) == len(part.block)
    statuses = _statuses({"ads": ADS, "feed": FEED})
    out = Assembler().assemble([None, moved], statuses, generation=1, built_at_ns=1,
                               daemon_pid=1)
    view = FeatureMapView(b"".join(bytes(p) for p in out.parts))
    rank = next(m for m in view.models() if m["name"] == "rank")
    assert rank["versions"][0]["bundles"] == ["feed"]


def test_name_table_holds_only_live_names() -> None:
    """After 200 rounds of churned feature names only the published ones are in the blob."""
    assembler = Assembler()
    sizes = []
    for k in range(200):
        inputs = [f"churn_{k:04d}_{i:03d}" for i in range(50)]
        doc = {"m": [{"version": "1", "input_names": inputs}]}
        blob = _spliced({"ads": ADS, "churn": doc}, assembler)
        root = FeatureMap.GetRootAs(blob, 0)
        sizes.append(len(blob))
        assert root.FeatureKeysLength() == 8 + 50  # ADS's 8 distinct names + this round's
    assert max(sizes) - min(sizes) < 64  # the blob does not grow with the churn
    view = FeatureMapView(blob)
    names = view.feature_names(view.resolve("m").allowlist.keys)
    assert sorted(names) == sorted(f"churn_0199_{i:03d}" for i in range(50))
