"""Consolidation, compilation and the read side of the feature map (SPEC §4, §5)."""

from __future__ import annotations

import json
import mmap
import os
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from daemon_helpers import compile_as_the_daemon

from flatbuffers_schema.fmap.BundleState import BundleState
from flatbuffers_schema.keys import Allowlist, keyset_digest, name_keys
from root_worker.featuremap.map_reader import FeatureMapView, MapError, Outcome, no_map
from trimmer_daemon.bundle.parse import parse_bundle
from trimmer_daemon.compiler import BundleStatusRecord, compile_map
from trimmer_daemon.consolidate import KeyCache, consolidate, index_bundle


def bundle(path: str, doc: dict) -> bytes:
    return json.dumps(doc).encode()


def reference_build(docs: dict[str, dict], generation: int = 7) -> bytes:
    """The reference compile path (``consolidate`` + ``compile_map``)."""
    cache = KeyCache()
    indexed = [(name, index_bundle(parse_bundle(json.dumps(doc).encode(), path=f"/b/{name}"),
                                   cache)) for name, doc in docs.items()]
    cmap = consolidate(indexed, cache)
    statuses = [BundleStatusRecord(name=n, path=f"/b/{n}", state=BundleState.Ok,
                                   sha256="ab" * 32, model_count=len(docs[n]))
                for n in docs]
    return compile_map(cmap, statuses, generation=generation, built_at_ns=123,
                       daemon_pid=os.getpid(), cache=cache)


def daemon_build(docs: dict[str, dict], generation: int = 7) -> bytes:
    """The daemon's compile path (a part per bundle, spliced by the assembler)."""
    out = compile_as_the_daemon({n: parse_bundle(json.dumps(d).encode(), path=f"/b/{n}")
                                 for n, d in docs.items()}, generation=generation)
    blob = b"".join(bytes(p) for p in out.parts)
    assert zlib.crc32(blob) == out.crc
    return blob


Build = Callable[..., bytes]


@pytest.fixture(params=["daemon", "reference"])
def build(request: pytest.FixtureRequest) -> Build:
    """Every map test runs on the blob of the daemon's compile path (what it publishes)
    and of the reference path."""
    return daemon_build if request.param == "daemon" else reference_build


def keys(names: list[str]) -> np.ndarray:
    return np.unique(name_keys(names))


ADS = {"ctr": [{"version": "9", "input_names": ["a", "b"]},
               {"version": "10", "input_names": ["a", "b", "c"], "output_names": ["p"]},
               {"version": "2", "input_names": ["z"]}],
       "cvr": [{"version": "1", "input_names": ["x", "y"]}]}


def test_resolve_exact_version(build: Build) -> None:
    view = FeatureMapView(build({"ads": ADS}))
    res = view.resolve("ctr", "9")
    assert res.outcome is Outcome.TRIMMED and res.version == "9"
    assert np.array_equal(res.allowlist.keys, keys(["a", "b"]))
    assert res.allowlist.digest == keyset_digest(keys(["a", "b"]))
    assert res.generation == 7


def test_latest_is_natural_order_not_string_order(build: Build) -> None:
    view = FeatureMapView(build({"ads": ADS}))
    res = view.resolve("ctr")
    assert res.outcome is Outcome.TRIMMED and res.version == "10"
    assert np.array_equal(res.allowlist.keys, keys(["a", "b", "c"]))


def test_absent_version_falls_back_to_latest(build: Build) -> None:
    view = FeatureMapView(build({"ads": ADS}))
    res = view.resolve("ctr", "11")
    assert res.outcome is Outcome.VERSION_FALLBACK and res.version == "10"
    assert res.requested_version == "11"
    assert "falling back" in res.explain()


def test_unknown_model_passes_through(build: Build) -> None:
    view = FeatureMapView(build({"ads": ADS}))
    res = view.resolve("nope", "1")
    assert res.outcome is Outcome.PASSTHROUGH_UNKNOWN_MODEL and res.allowlist is None
    assert not res.trims


def test_no_map_resolution() -> None:
    res = no_map("ctr", "1")
    assert res.outcome is Outcome.PASSTHROUGH_NO_MAP and res.allowlist is None


def test_resolution_is_memoised_per_view(build: Build) -> None:
    view = FeatureMapView(build({"ads": ADS}))
    assert view.resolve("ctr", "9") is view.resolve("ctr", "9")


def test_conflicting_bundles_get_the_union_and_a_report(build: Build) -> None:
    other = {"ctr": [{"version": "10", "input_names": ["a", "d"]}]}
    view = FeatureMapView(build({"ads": ADS, "extra": other}))
    res = view.resolve("ctr", "10")
    assert np.array_equal(res.allowlist.keys, keys(["a", "b", "c", "d"]))
    (model,) = [m for m in view.models() if m["name"] == "ctr"]
    v10 = [v for v in model["versions"] if v["version"] == "10"][0]
    assert v10["conflict"] is True and v10["bundles"] == ["ads", "extra"]
    assert len(view.conflicts()) == 1 and "ads, extra" in view.conflicts()[0]


def test_identical_definitions_in_two_bundles_are_not_a_conflict(build: Build) -> None:
    view = FeatureMapView(build({"ads": ADS, "copy": {"cvr": ADS["cvr"]}}))
    assert view.conflicts() == []
    (model,) = [m for m in view.models() if m["name"] == "cvr"]
    assert model["versions"][0]["bundles"] == ["ads", "copy"]


def test_allowlist_is_a_zero_copy_view_of_the_blob(build: Build) -> None:
    blob = build({"ads": ADS})
    view = FeatureMapView(blob)
    arr = view.resolve("ctr", "10").allowlist.keys
    assert arr.base is not None and not arr.flags.owndata
    assert arr.ctypes.data - np.frombuffer(blob, np.uint8).ctypes.data in range(len(blob))


def test_reads_from_a_read_only_mmap(tmp_path, build: Build) -> None:
    blob = build({"ads": ADS})
    path = tmp_path / "map.ftmap"
    path.write_bytes(blob)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    view = FeatureMapView(mm)
    keys_view = view.resolve("cvr").allowlist.keys
    assert np.array_equal(keys_view, keys(["x", "y"]))
    with pytest.raises(ValueError):
        keys_view[0] = 1


def test_names_and_dump_round_trip(build: Build) -> None:
    blob = build({"ads": ADS})
    view = FeatureMapView(blob)
    dump = view.to_dict(with_features=True)
    ctr = [m for m in dump["models"] if m["name"] == "ctr"][0]
    assert [v["version"] for v in ctr["versions"]] == ["2", "9", "10"]
    assert ctr["latest"] == "10"
    v10 = ctr["versions"][2]
    assert sorted(v10["input_names"]) == ["a", "b", "c"] and v10["output_count"] == 1
    assert dump["bundles"][0]["state"] == "ok" and dump["generation"] == 7
    json.dumps(dump)  # plain data


@pytest.mark.parametrize("blob, message", [
    (b"", "too small"),
    (b"\x00" * 64, "not a feature map"),
    (b"\x08\x00\x00\x00FTMP\xff\xff\xff\x7f", "corrupt"),
])
def test_bad_blobs_raise_map_error(blob: bytes, message: str) -> None:
    with pytest.raises(MapError, match=message):
        FeatureMapView(blob)


def test_truncated_blob_raises_map_error_or_resolves_safely(build: Build) -> None:
    """Every cut of a blob either raises MapError or resolves *safely*: to what the whole
    blob resolves to, or to no allowlist (a pass-through) -- never a trim to other keys."""
    blob = build({"ads": ADS})
    full = FeatureMapView(blob).resolve("ctr")
    assert full.allowlist is not None
    outcomes = {"error": 0, "same": 0, "passthrough": 0}
    for cut in range(0, len(blob), max(1, len(blob) // 97)):
        try:
            res = FeatureMapView(blob[:cut]).resolve("ctr")
        except MapError:
            outcomes["error"] += 1
            continue
        if res.allowlist is None:
            assert not res.trims and res.outcome is not Outcome.TRIMMED, cut
            outcomes["passthrough"] += 1
        else:
            assert (res.outcome, res.version) == (full.outcome, full.version), cut
            assert np.array_equal(res.allowlist.keys, full.allowlist.keys), cut
            assert res.allowlist.digest == full.allowlist.digest, cut
            outcomes["same"] += 1
    assert outcomes["error"] > 0, outcomes


def test_empty_map(build: Build) -> None:
    view = FeatureMapView(build({}))
    assert view.model_count == 0
    assert view.resolve("ctr").outcome is Outcome.PASSTHROUGH_UNKNOWN_MODEL


def test_allowlist_from_names_matches_compiled(build: Build) -> None:
    view = FeatureMapView(build({"ads": ADS}))
    compiled = view.resolve("cvr").allowlist
    assert compiled.digest == Allowlist.from_names(["y", "x", "x"]).digest
