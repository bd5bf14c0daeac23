"""Consolidation, compilation and the read side of the feature map."""

from __future__ import annotations

import json
import mmap
import os
import zlib
from collections.abc import Callable

import flatbuffers
import numpy as np
import pytest
from daemon_helpers import compile_as_the_daemon

from flatbuffers_schema.feature_map import FILE_IDENTIFIER
from flatbuffers_schema.fmap import FeatureMap as FbMapModule
from flatbuffers_schema.fmap import Model as FbModel
from flatbuffers_schema.fmap import Version as FbVersion
from flatbuffers_schema.fmap.BundleState import BundleState
from flatbuffers_schema.fmap.FeatureMap import FeatureMap as FbMap
from flatbuffers_schema.keys import Allowlist, keyset_digest, name_keys
from root_worker.featuremap.map_reader import FeatureMapView, MapError, Outcome, no_map
from trimmer_daemon.bundle.parse import ModelVersion, ParsedBundle, parse_bundle
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
    outcomes = {"error": 0, "same": 0, "passthrough": 0, "bundles_error": 0}
    for cut in range(len(blob)):
        try:
            view = FeatureMapView(blob[:cut])
            res = view.resolve("ctr")
        except MapError:
            outcomes["error"] += 1
            continue
        try:
            view.bundles()
        except MapError as exc:  # worded, never a bare accessor error
            assert str(exc).startswith("corrupt feature map blob (bundle status): "), exc
            outcomes["bundles_error"] += 1
        if res.allowlist is None:
            assert not res.trims and res.outcome is not Outcome.TRIMMED, cut
            outcomes["passthrough"] += 1
        else:
            assert (res.outcome, res.version) == (full.outcome, full.version), cut
            assert np.array_equal(res.allowlist.keys, full.allowlist.keys), cut
            assert res.allowlist.digest == full.allowlist.digest, cut
            outcomes["same"] += 1
    assert outcomes["error"] > 0, outcomes


def test_a_corrupt_bundle_or_model_table_is_a_worded_map_error(build: Build) -> None:
    """Each byte of the blob flipped in turn: resolve(), bundles() and models() either read
    or raise MapError saying what is corrupt -- never a bare accessor exception."""
    blob = build({"ads": ADS})
    worded = {"bundles": 0, "models": 0, "resolve": 0}
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0xFF
        try:
            view = FeatureMapView(bytes(bad))
        except MapError:
            continue
        try:
            view.resolve("ctr", "9")
        except MapError as exc:
            assert str(exc).startswith(f"corrupt feature map blob (generation "
                                       f"{view.generation}) while resolving model 'ctr': "), exc
            worded["resolve"] += 1
        try:
            view.bundles()
        except MapError as exc:
            assert str(exc).startswith("corrupt feature map blob (bundle status): "), exc
            worded["bundles"] += 1
            continue
        try:
            list(view.models())
        except MapError as exc:
            assert str(exc).startswith("corrupt feature map blob (models): "), exc
            worded["models"] += 1
    assert min(worded.values()) > 0, worded


def test_empty_map(build: Build) -> None:
    view = FeatureMapView(build({}))
    assert view.model_count == 0
    assert view.resolve("ctr").outcome is Outcome.PASSTHROUGH_UNKNOWN_MODEL


def test_allowlist_from_names_matches_compiled(build: Build) -> None:
    view = FeatureMapView(build({"ads": ADS}))
    compiled = view.resolve("cvr").allowlist
    assert compiled.digest == Allowlist.from_names(["y", "x", "x"]).digest


# --- everything the reader says, exactly ---------------------------------------------------
def _status_build(docs: dict[str, dict], statuses: list[BundleStatusRecord],
                  generation: int = 11) -> bytes:
    out = compile_as_the_daemon({n: parse_bundle(json.dumps(d).encode(), path=f"/b/{n}")
                                 for n, d in docs.items()}, generation=generation,
                                built_at_ns=4242, statuses=statuses)
    return b"".join(bytes(p) for p in out.parts)


STATUSES = [
    BundleStatusRecord(name="ads", path="/etc/ft/ads.json", state=BundleState.Stale,
                       sha256="aa" * 32, loaded_at_ns=17, checked_at_ns=19,
                       error="/etc/ft/ads.json: $: bad", current_sha256="cc" * 32,
                       model_count=2, version_count=4, warnings=("w1", "w2 ü")),
    BundleStatusRecord(name="feed", path="/etc/ft/feed.json", state=BundleState.Ok,
                       sha256="bb" * 32, loaded_at_ns=5, checked_at_ns=6, model_count=1,
                       version_count=1),
]


def test_the_dump_says_exactly_what_the_daemon_published() -> None:
    """Every field of bundles(), models() and to_dict(), against values set on purpose
    (a mutant that drops, swaps or defaults one field fails here)."""
    docs = {"ads": ADS, "feed": {"rank": [{"version": "v1", "input_names": ["q"]}]}}
    view = FeatureMapView(_status_build(docs, STATUSES))
    assert (view.generation, view.built_at_ns, view.daemon_pid) == (11, 4242, os.getpid())
    assert view.model_count == 3
    assert view.bundles() == [
        {"name": "ads", "path": "/etc/ft/ads.json", "state": "stale", "sha256": "aa" * 32,
         "loaded_at_ns": 17, "checked_at_ns": 19, "error": "/etc/ft/ads.json: $: bad",
         "current_sha256": "cc" * 32, "model_count": 2, "version_count": 4,
         "warnings": ["w1", "w2 ü"]},
        {"name": "feed", "path": "/etc/ft/feed.json", "state": "ok", "sha256": "bb" * 32,
         "loaded_at_ns": 5, "checked_at_ns": 6, "error": "", "current_sha256": "",
         "model_count": 1, "version_count": 1, "warnings": []}]
    models = list(view.models())
    assert [m["name"] for m in models] == ["ctr", "cvr", "rank"]
    ctr = models[0]
    assert ctr["latest"] == "10"
    v10 = view.resolve("ctr", "10").allowlist
    assert v10 is not None
    assert ctr["versions"] == [
        {"version": "2", "features": 1, "digest": f"{keyset_digest(keys(['z'])):016x}",
         "conflict": False, "bundles": ["ads"], "output_count": 0, "pending": False},
        {"version": "9", "features": 2, "digest": f"{keyset_digest(keys(['a', 'b'])):016x}",
         "conflict": False, "bundles": ["ads"], "output_count": 0, "pending": False},
        {"version": "10", "features": 3, "digest": f"{v10.digest:016x}", "conflict": False,
         "bundles": ["ads"], "output_count": 1, "pending": False}]
    assert models[2]["versions"][0]["bundles"] == ["feed"]
    dump = view.to_dict(with_features=True)
    assert set(dump) == {"generation", "built_at_ns", "daemon_pid", "bundles", "models",
                         "conflicts"}
    assert (dump["generation"], dump["built_at_ns"], dump["daemon_pid"]) == (
        11, 4242, os.getpid())
    assert dump["bundles"] == view.bundles() and dump["conflicts"] == []
    assert [sorted(v["input_names"]) for v in dump["models"][0]["versions"]] == [
        ["z"], ["a", "b"], ["a", "b", "c"]]
    assert "input_names" not in view.to_dict()["models"][0]["versions"][0]


def test_a_bundle_index_past_the_bundle_list_is_shown_as_a_number() -> None:
    """A version attributed to a bundle the status list does not name (an older daemon's
    map) shows the index itself."""
    view = FeatureMapView(_status_build({"ads": ADS}, []))
    assert view.bundles() == []
    assert [v["bundles"] for v in next(iter(view.models()))["versions"]] == [["0"]] * 3


def test_every_explanation_says_what_happened() -> None:
    view = FeatureMapView(_status_build({"ads": ADS}, STATUSES[:1]))
    assert view.resolve("ctr", "9").explain() == "exact match: version '9' (2 features)"
    assert view.resolve("ctr").explain() == (
        "no version requested: latest version '10' (3 features)")
    assert view.resolve("ctr", "7").explain() == (
        "version '7' of 'ctr' is not in the map: falling back to the latest version '10' "
        "(3 features)")
    assert view.resolve("nope", "1").explain() == (
        "model 'nope' is not in the map: requests pass through untrimmed")
    none = no_map("ctr", "3")
    assert (none.outcome, none.model, none.requested_version, none.version, none.allowlist,
            none.generation) == (Outcome.PASSTHROUGH_NO_MAP, "ctr", "3", None, None, 0)
    assert none.explain() == "no map is published: requests pass through untrimmed"
    assert no_map("m").requested_version is None and not no_map("m").trims
    exact = view.resolve("ctr", "9")
    assert (exact.model, exact.requested_version, exact.generation) == ("ctr", "9", 11)
    latest = view.resolve("ctr")
    assert latest.requested_version is None and latest.outcome is Outcome.TRIMMED
    unknown = view.resolve("nope", "1")
    assert (unknown.version, unknown.requested_version, unknown.generation) == (None, "1", 11)


def test_a_version_is_matched_exactly_and_the_last_match_wins() -> None:
    """'1' does not match '10' or '01'; with no version the last (latest) is used."""
    doc = {"m": [{"version": "01", "input_names": ["a"]},
                 {"version": "1", "input_names": ["b"]},
                 {"version": "10", "input_names": ["c"]}]}
    view = FeatureMapView(_status_build({"x": doc}, []))
    for version, name in (("01", "a"), ("1", "b"), ("10", "c"), (None, "c")):
        res = view.resolve("m", version)
        assert res.allowlist is not None
        assert view.feature_names(res.allowlist.keys) == [name], version
        assert res.outcome is Outcome.TRIMMED and res.version == (version or "10")


def test_feature_names_of_unknown_keys_are_hex_and_order_is_kept() -> None:
    view = FeatureMapView(_status_build({"ads": ADS}, []))
    known = name_keys(["b", "a"])
    assert view.feature_names(known) == ["b", "a"]
    assert view.feature_names(np.array([1, int(known[0])], dtype=np.uint64)) == [
        "<key 0x0000000000000001>", "b"]
    assert view.feature_names(np.array([2**64 - 1], dtype=np.uint64)) == [
        "<key 0xffffffffffffffff>"]
    assert view.feature_names(np.array([], dtype=np.uint64)) == []


def test_the_memo_is_bounded_and_cleared_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    from root_worker.featuremap import map_reader

    monkeypatch.setattr(map_reader, "MEMO_MAX", 4)
    view = FeatureMapView(_status_build({"ads": ADS}, []))
    first = view.resolve("ctr", "9")
    for i in range(3):
        view.resolve(f"unknown{i}")
    assert view.resolve("ctr", "9") is first  # 4 entries: still memoised
    view.resolve("one_more")  # the 5th clears the memo first
    again = view.resolve("ctr", "9")
    assert again is not first and (again.outcome, again.version) == ("trimmed", "9")
    assert again.allowlist is not None and first.allowlist is not None
    assert again.allowlist.digest == first.allowlist.digest


def test_a_blob_of_another_generation_is_refused() -> None:
    from root_worker.featuremap.map_reader import open_generation

    blob = _status_build({"ads": ADS}, [], generation=5)
    assert open_generation(blob, 5).generation == 5
    with pytest.raises(MapError, match="blob says generation 5, control block says 6"):
        open_generation(blob, 6)
    with pytest.raises(MapError, match=r"not a feature map: identifier b'\\x00\\x00\\x00"
                                        r"\\x00', expected b'FTMP'"):
        FeatureMapView(b"\x00" * 64)
    with pytest.raises(MapError, match=r"feature map blob too small \(11 bytes\)"):
        FeatureMapView(blob[:11])


# --- the rollout union, what people see, and maps the daemon does not write -----------------
ROLLOUT = {"m": [{"version": "1", "input_names": ["a", "b"]},
                 {"version": "2", "input_names": ["a", "c"], "pending": True},
                 {"version": "3", "input_names": ["d"], "pending": True}],
           "plain": [{"version": "1", "input_names": ["x"]}]}


def test_the_rollout_union_is_digested_explained_and_memoised(build: Build) -> None:
    """A leaf of unknown version gets the union of the latest and every pending version,
    with that union's own digest (the trim-plan cache key: the latest's digest would reuse
    a plan for fewer columns), an explanation naming each version, and the same Resolution
    object on the next request (the hot path is one dictionary hit). A model with nothing
    pending gets plain resolve()'s answer, not a one-version "union"."""
    view = FeatureMapView(build({"ads": ROLLOUT}))
    union = view.resolve_rollout("m")
    assert union.union and union.outcome is Outcome.TRIMMED and union.version == "1"
    assert union.pending == ("2", "3") and union.allowlist is not None
    assert np.array_equal(union.allowlist.keys, keys(["a", "b", "c", "d"]))
    assert union.allowlist.digest == keyset_digest(keys(["a", "b", "c", "d"]))
    assert union.explain() == ("leaf version not known yet: union of the latest version '1' "
                               "and pending '2', '3' (4 features)")
    assert view.resolve_rollout("m") is union
    assert view.resolve("m", "2").explain() == "exact match: version '2' (pending) (2 features)"
    plain = view.resolve_rollout("plain")
    assert plain is view.resolve("plain") and not plain.union
    assert plain.explain() == "no version requested: latest version '1' (1 features)"
    assert view.resolve_rollout("nope").outcome is Outcome.PASSTHROUGH_UNKNOWN_MODEL


def test_the_rollout_memo_is_bounded_and_cleared_when_full(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients choose the model names: the rollout memo holds at most MEMO_MAX entries."""
    from root_worker.featuremap import map_reader

    monkeypatch.setattr(map_reader, "MEMO_MAX", 4)
    view = FeatureMapView(daemon_build({"ads": ROLLOUT}))
    first = view.resolve_rollout("m")
    for i in range(3):
        view.resolve_rollout(f"unknown{i}")
    assert view.resolve_rollout("m") is first  # 4 entries: still memoised
    view.resolve_rollout("one_more")  # the 5th clears the memo first
    again = view.resolve_rollout("m")
    assert again is not first and again.union and again.allowlist is not None
    assert first.allowlist is not None and again.allowlist.digest == first.allowlist.digest


def _vector_at(blob: bytes, arr: np.ndarray) -> int:
    """Where the zero-copy ``arr`` starts in ``blob`` (its length word is just before)."""
    return int(arr.ctypes.data - np.frombuffer(blob, np.uint8).ctypes.data)


def test_a_corrupt_pending_version_fails_the_rollout_with_one_worded_error() -> None:
    """A pending version whose allowlist points past the blob: resolve() of the model (the
    latest version) still reads, resolve_rollout() raises MapError saying which generation
    and model, once (the worker counts it and passes the request through untrimmed)."""
    blob = daemon_build({"ads": ROLLOUT})
    pending = FeatureMapView(blob).resolve("m", "3").allowlist
    assert pending is not None
    bad = bytearray(blob)
    at = _vector_at(blob, pending.keys) - 4
    bad[at:at + 4] = (0x0FFFFFFF).to_bytes(4, "little")
    view = FeatureMapView(bytes(bad))
    assert view.resolve("m").version == "1"
    with pytest.raises(MapError, match=r"^corrupt feature map blob \(generation 7\) while "
                                       r"resolving model 'm': ") as err:
        view.resolve_rollout("m")
    assert str(err.value).count("corrupt feature map blob") == 1


def test_models_show_each_versions_tensor_signature() -> None:
    """trimmer-inspect shows the Open Inference Protocol signature a bundle declares for a
    version (inputs and max_batch_size), and nothing for a version that declares none."""
    doc = {"m": [{"version": "1", "input_names": ["a", "b"]},
                 {"version": "2", "input_names": ["a", "ids"], "max_batch_size": 8,
                  "inputs": [{"name": "a", "datatype": "FP32", "shape": [4]},
                             {"name": "ids", "datatype": "INT64", "shape": [-1],
                              "optional": True}]}]}
    (model,) = FeatureMapView(daemon_build({"sig": doc})).models()
    v1, v2 = model["versions"]
    assert "inputs" not in v1 and "max_batch_size" not in v1
    assert v2["max_batch_size"] == 8
    assert v2["inputs"] == [
        {"name": "a", "datatype": "FP32", "shape": (4,), "optional": False},
        {"name": "ids", "datatype": "INT64", "shape": (-1,), "optional": True}]


def test_a_model_without_versions_is_a_map_error_not_an_empty_allowlist() -> None:
    """The validator refuses a model with no versions, but a map can still hold one (an
    older or damaged writer). Resolving it used to read the version table at index -1 --
    bytes of the blob taken for a table -- and trimmed requests to nothing; now it is a
    worded MapError (the worker passes the request through) and trimmer-inspect shows the
    model with no latest version."""
    parsed = ParsedBundle("/b/old", "ab" * 32, {
        "empty": (), "m": (ModelVersion("1", ("a",), ()),)})
    out = compile_as_the_daemon({"old": parsed}, generation=3)
    view = FeatureMapView(b"".join(bytes(p) for p in out.parts))
    for version in (None, "1"):
        with pytest.raises(MapError, match=r"^corrupt feature map blob \(generation 3\) while "
                                           r"resolving model 'empty': the model has no "
                                           r"versions$"):
            view.resolve("empty", version)
    assert list(view.models())[0] == {"name": "empty", "versions": [], "latest": None}
    assert view.resolve("m").version == "1"


def test_the_model_index_must_match_the_model_count() -> None:
    """A model index shorter than the model list (a damaged blob) is refused at attach."""
    blob = daemon_build({"ads": ROLLOUT})
    slots = FbMap.GetRootAs(blob).ModelSlotsAsNumpy()
    assert isinstance(slots, np.ndarray) and slots.size == 2
    bad = bytearray(blob)
    at = _vector_at(blob, slots) - 4
    bad[at:at + 4] = (1).to_bytes(4, "little")
    with pytest.raises(MapError, match=r"^corrupt feature map blob: model index does not "
                                       r"match model count$"):
        FeatureMapView(bytes(bad))


def _sparse_map(*, with_model: bool) -> bytes:
    """A map written with the schema's own builder, leaving out what FlatBuffers lets a
    writer leave out (an absent vector reads as empty): every vector when not
    ``with_model``; else one model "m" whose current version "1" has no ``feature_keys``
    and whose pending version "2" lists feature "a"."""
    b = flatbuffers.Builder(256)
    model = index = slots = 0
    if with_model:
        versions = []
        for name, pending in (("1", False), ("2", True)):
            vname = b.CreateString(name)
            fkeys = b.CreateNumpyVector(keys(["a"])) if pending else 0
            FbVersion.Start(b)
            FbVersion.AddVersion(b, vname)
            if fkeys:
                FbVersion.AddFeatureKeys(b, fkeys)
                FbVersion.AddDigest(b, keyset_digest(keys(["a"])))
            FbVersion.AddPending(b, pending)
            versions.append(FbVersion.End(b))
        b.StartVector(4, len(versions), 4)
        for off in reversed(versions):
            b.PrependUOffsetTRelative(off)
        vvec = b.EndVector()
        mname = b.CreateString("m")
        FbModel.Start(b)
        FbModel.AddName(b, mname)
        FbModel.AddVersions(b, vvec)
        one = FbModel.End(b)
        b.StartVector(4, 1, 4)
        b.PrependUOffsetTRelative(one)
        model = b.EndVector()
        index = b.CreateNumpyVector(name_keys(["m"]))
        slots = b.CreateNumpyVector(np.array([0], np.uint32))
    FbMapModule.Start(b)
    FbMapModule.AddGeneration(b, 9)
    if with_model:
        FbMapModule.AddModels(b, model)
        FbMapModule.AddModelKeys(b, index)
        FbMapModule.AddModelSlots(b, slots)
    b.Finish(FbMapModule.End(b), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def test_a_map_without_its_optional_vectors_reads_as_empty() -> None:
    """FlatBuffers reads an absent vector as empty: a map with none is an empty map (every
    model passes through, nothing to show), not an error; a version without feature keys
    has an empty uint64 allowlist, and the rollout union with a pending version is exactly
    that version's keys (still uint64: a float array would corrupt the keys and digest)."""
    view = FeatureMapView(_sparse_map(with_model=False))
    assert (view.generation, view.model_count) == (9, 0)
    assert view.resolve("m").outcome is Outcome.PASSTHROUGH_UNKNOWN_MODEL
    assert view.feature_names(np.array([1], np.uint64)) == ["<key 0x0000000000000001>"]
    assert (list(view.models()), view.bundles(), view.conflicts()) == ([], [], [])
    view = FeatureMapView(_sparse_map(with_model=True))
    latest = view.resolve("m")
    assert latest.version == "1" and latest.allowlist is not None
    assert latest.allowlist.keys.dtype == np.uint64 and latest.allowlist.keys.size == 0
    union = view.resolve_rollout("m")
    assert union.union and union.allowlist is not None
    assert union.allowlist.keys.dtype == np.uint64
    assert np.array_equal(union.allowlist.keys, keys(["a"]))
    assert union.allowlist.digest == keyset_digest(keys(["a"]))


def test_a_damaged_string_reads_with_replacement_characters() -> None:
    """A string of the blob that is not valid UTF-8 (a damaged map, as trimmer-inspect may
    be pointed at) reads with U+FFFD in its place; the rest of the status stays readable."""
    blob = _status_build({"ads": ADS}, STATUSES[:1])
    at = blob.index("w2 ü".encode())
    bad = bytearray(blob)
    bad[at + 3] = 0xFF  # the first byte of the two-byte "ü"
    (status,) = FeatureMapView(bytes(bad)).bundles()
    assert status["warnings"] == ["w1", "w2 \ufffd\ufffd"]
    assert status["error"] == "/etc/ft/ads.json: $: bad"


def test_model_names_sharing_a_64_bit_key_are_told_apart_by_name() -> None:
    """Two model names whose keys collide share a key in the lookup index (the daemon keeps
    both, in key order); the reader walks that run of equal keys comparing names, so each
    name still gets its own model. Simulated on a daemon-built map by giving the model just
    before "m2" in the index m2's key (a run of two, not at the start of the index)."""
    docs = {"ads": {f"m{i}": [{"version": "1", "input_names": [f"f{i}"]}] for i in range(5)}}
    blob = daemon_build(docs)
    index = FbMap.GetRootAs(blob).ModelKeysAsNumpy()
    assert isinstance(index, np.ndarray) and index.size == 5
    j = int(np.searchsorted(index, name_keys(["m2"])[0]))
    assert j >= 2  # else the run would start at index 0 or 1
    bad = bytearray(blob)
    at = _vector_at(blob, index) + 8 * (j - 1)
    bad[at:at + 8] = bytes(bad[at + 8:at + 16])
    view = FeatureMapView(bytes(bad))
    res = view.resolve("m2")
    assert res.outcome is Outcome.TRIMMED and res.allowlist is not None
    assert view.feature_names(res.allowlist.keys) == ["f2"]


def test_feature_names_read_a_list_of_keys_as_uint64() -> None:
    """Keys may be given as a list of Python ints (trimmer-inspect diff builds one); keys
    above 2**63 next to small ones are still read exactly as uint64 keys."""
    view = FeatureMapView(daemon_build({"ads": {"m": [{"version": "1",
                                                       "input_names": ["a", "m0"]}]}}))
    big, small = (int(k) for k in name_keys(["m0", "a"]))
    assert big >= 2**63 > small
    assert view.feature_names([small, big]) == ["a", "m0"]
