"""Per-bundle compiled parts spliced into one blob (issue #11, items 5 and 6).

The spliced blob must read exactly like the one the reference path builds
(``consolidate`` + ``compile_map``): same models in the same order, same allowlists and
digests, same bundle attributions and conflicts; and its name table holds only live names.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from flatbuffers_schema.fmap.BundleState import BundleState
from flatbuffers_schema.fmap.FeatureMap import FeatureMap
from flatbuffers_schema.shm_layout import checksum
from root_worker.featuremap.map_reader import FeatureMapView
from trimmer_daemon.assemble import Assembler
from trimmer_daemon.bundle.parse import BundleError, Limits, parse_bundle
from trimmer_daemon.compiler import BundleStatusRecord, compile_map
from trimmer_daemon.consolidate import KeyCache, consolidate, index_bundle
from trimmer_daemon.parts import KeyMemo, build_part

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
            assert x.tensors == y.tensors, (model, version)
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


def _doc(k: int, *, shared: bool = False, version: str = "") -> dict:
    """Round k of a changing bundle: new versions, some names kept, some new, some ADS's."""
    doc = {f"small_{m}": [{"version": version or str(k),
                           "input_names": [f"s{m}_{i}" for i in range(k % 3, 20 + k)]
                           + ["a", "x"]}]  # names ADS/FEED have
           for m in range(4)}
    if shared:
        doc["cvr"] = [{"version": "7", "input_names": ["x", f"s0_{k}"]}]  # a model ADS has
    return doc


RANK = {"rank": FEED["rank"]}  # no model shared with ADS


def test_incremental_assembly_is_byte_identical_to_a_fresh_one() -> None:
    """One assembler across changes (one bundle changing, then another, a shared model, a
    bundle gone) builds exactly the blob a fresh assembler builds from the same parts."""
    assembler, memo = Assembler(), KeyMemo()
    fixed = {name: build_part(json.dumps(d).encode(), path=f"/b/{name}", limits=Limits(),
                              bundle_index=i) for i, (name, d) in ((0, ("ads", ADS)),
                                                                   (2, ("feed", RANK)))}
    rounds = [(k, "small", k >= 6) for k in range(9)] + [
        (8, "bump", True), (9, "ads", False), (10, "small", False), (10, "bump", False),
        (11, "gone", False)]  # bump: a new version, the same names (the same name table)
    for k, changing, shared in rounds:
        if changing == "ads":
            fixed["ads"] = build_part(json.dumps({**ADS, "new": [{"version": "1",
                                                                  "input_names": ["n"]}]})
                                      .encode(), path="/b/ads", limits=Limits(), bundle_index=0)
        else:
            doc = _doc(k, shared=shared, version="bump" if changing == "bump" else "")
            small = build_part(json.dumps(doc).encode(), path="/b/small", limits=Limits(),
                               bundle_index=1, memo=memo)
        parts = [fixed["ads"], None if changing == "gone" else small, fixed["feed"]]
        statuses = _statuses({"ads": ADS, "small": {}, "feed": RANK})
        args = {"generation": k, "built_at_ns": 1, "daemon_pid": 1}
        got = assembler.assemble(parts, statuses, **args)
        want = Assembler().assemble(parts, statuses, **args)
        blob = b"".join(bytes(p) for p in got.parts)
        assert blob == b"".join(bytes(p) for p in want.parts), (k, changing)
        assert (got.crc, got.models, got.versions, got.conflicts) == \
            (want.crc, want.models, want.versions, want.conflicts)
        assert checksum(blob) == got.crc
        view = FeatureMapView(blob)
        if changing in ("small", "bump"):
            names = view.feature_names(view.resolve("small_1").allowlist.keys)
            assert sorted(names) == sorted([f"s1_{i}" for i in range(k % 3, 20 + k)] + ["a", "x"])


def test_key_memo_holds_exactly_the_last_load_and_changes_nothing() -> None:
    """A build that reuses the previous load's keys, lists and name table makes the same
    part as a build from scratch; the memo then holds only the new load's names."""
    memo = KeyMemo()
    for k in (0, 1, 1, 4, 5):  # 1 twice: same lists, a new version only
        data = json.dumps(_doc(k)).encode()
        with_memo = build_part(data, path="/b/s", limits=Limits(), bundle_index=0, memo=memo)
        fresh = build_part(data, path="/b/s", limits=Limits(), bundle_index=0)
        assert with_memo.block == fresh.block and with_memo.collisions == fresh.collisions
        assert with_memo.feature_names == fresh.feature_names
        assert np.array_equal(with_memo.feature_keys, fresh.feature_keys)
        assert np.array_equal(with_memo.name_offsets, fresh.name_offsets)
        names = {n for m in _doc(k).values() for v in m for n in v["input_names"]}
        assert set(memo.names) == names and len(memo.lists) == 4
    broken = b'{"small_0": []}'
    with pytest.raises(BundleError, match=r"small_0.*model has no versions"):
        build_part(broken, path="/b/s", limits=Limits(), bundle_index=0, memo=memo)
    assert set(memo.names) == names  # a failed build leaves the memo as it was


def test_padding_to_a_spare_size_keeps_the_blob_readable() -> None:
    """pad_to (the publisher's spare size): a slightly smaller blob is padded after its root
    offset to exactly that size and reads exactly like the unpadded one; a blob too much
    smaller, or off the 8-byte grid, is left as it is."""
    docs = {"ads": ADS, "feed": RANK}
    parts = [build_part(json.dumps(d).encode(), path=f"/b/{n}", limits=Limits(),
                        bundle_index=i) for i, (n, d) in enumerate(docs.items())]
    args = {"generation": 3, "built_at_ns": 1, "daemon_pid": 1}
    plain = Assembler().assemble(parts, _statuses(docs), **args)
    for pad, padded in ((8, True), (4000, True), (4, False), (8192, False)):
        out = Assembler().assemble(parts, _statuses(docs), pad_to=plain.size + pad, **args)
        blob = b"".join(bytes(p) for p in out.parts)
        assert checksum(blob) == out.crc and out.size == len(blob)
        assert len(blob) == (plain.size + pad if padded else plain.size), pad
        assert out.parts[-len(parts):] == plain.parts[-len(parts):]  # the blocks, untouched
        _same(FeatureMapView(blob), FeatureMapView(b"".join(bytes(p) for p in plain.parts)))


TRITON = {"tr_ctr": [{"version": "1", "input_names": ["d", "ids"], "max_batch_size": 64,
                      "inputs": [{"name": "d", "datatype": "FP32", "shape": [8]},
                                 {"name": "ids", "datatype": "INT64", "shape": [-1],
                                  "optional": True}]},
                     {"version": "2", "input_names": ["d"]}],
          "shared": [{"version": "1", "input_names": ["s1"], "max_batch_size": 0,
                      "inputs": [{"name": "s1", "datatype": "BOOL", "shape": []}]}]}


def test_tensor_signatures_travel_both_compile_paths() -> None:
    """The optional tensor signature reaches the map the same way through the spliced parts
    and the whole-map compiler, alone or merged with another bundle (the first one's)."""
    from flatbuffers_schema.oip import InputSpec, TensorSignature

    for docs in ({"triton": TRITON}, {"triton": TRITON, "ads": ADS, "feed": FEED}):
        ref, spliced = FeatureMapView(_reference(docs)), FeatureMapView(_spliced(docs))
        _same(spliced, ref)
        got = spliced.resolve("tr_ctr", "1").tensors
        assert got == TensorSignature((InputSpec("d", "FP32", (8,)),
                                       InputSpec("ids", "INT64", (-1,), True)), 64)
        assert spliced.resolve("tr_ctr", "2").tensors is None
        assert spliced.resolve("ctr", "9").tensors is None
        assert spliced.resolve("shared", "1").tensors == (
            TensorSignature((InputSpec("s1", "BOOL", ()),), 0))


def test_pending_versions_in_both_compilers() -> None:
    """A pending version is never latest; a version two bundles define is pending only when
    both say so; the spliced blob (one bundle, and merged across bundles) and the reference
    blob agree."""
    one = {"m": [{"version": "1", "input_names": ["a", "b"]},
                 {"version": "2", "input_names": ["a", "c"], "pending": True}],
           "new": [{"version": "1", "input_names": ["n"], "pending": True}]}
    other = {"m": [{"version": "2", "input_names": ["a", "c"], "pending": True},
                   {"version": "3", "input_names": ["d"], "pending": True}]}
    for docs in ({"one": one}, {"one": one, "other": other}):
        spliced, reference = FeatureMapView(_spliced(docs)), FeatureMapView(_reference(docs))
        _same(spliced, reference)
        for view in (spliced, reference):
            res = view.resolve("m")
            assert res.version == "1"
            assert set(res.pending) == ({"2"} if len(docs) == 1 else {"2", "3"})
            union = view.resolve_rollout("m")
            assert union.union and union.version == "1"
            names = set(view.feature_names(union.allowlist.keys))
            assert names == ({"a", "b", "c"} if len(docs) == 1 else {"a", "b", "c", "d"})
            assert view.resolve("m", "2").outcome.value == "trimmed"  # named: exact
            m = next(x for x in view.models() if x["name"] == "m")
            assert m["latest"] == "1" and [v["pending"] for v in m["versions"]][:2] == \
                [False, True]
            new = view.resolve("new")  # every version pending: the last one, no union needed
            assert new.version == "1" and new.pending == ("1",)
    # current in one bundle, pending in another: current
    mixed = {"one": one, "cur": {"m": [{"version": "2", "input_names": ["a", "c"]}]}}
    for blob in (_spliced(mixed), _reference(mixed)):
        assert FeatureMapView(blob).resolve("m").version == "2"
