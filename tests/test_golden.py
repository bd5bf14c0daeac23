"""Golden frame vectors (tests/data/golden/): committed, reproduced exactly by
tests/make_golden.py, and decoded by the reference Python decoder exactly as the manifest
says. The C reader's test (test_c_reader.py) reads the same files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from make_golden import GOLDEN, build, invalid_frames, valid_frames

from flatbuffers_schema.keys import Allowlist, name_key
from root_worker.frame import BACKENDS, FrameError, Ragged, Trimmer, decode, peek_metadata

MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
KEYS = json.loads((GOLDEN / "name_keys.json").read_text())
VALID = sorted(MANIFEST["valid"])
INVALID = sorted(MANIFEST["invalid"])
TRIM_CHECKED = {"preamble", "layout", "table"}  # what the trimmer validates (frame-format.md)


def _b2b(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _read(kind: str, name: str) -> bytes:
    return (GOLDEN / kind / f"{name}.ftrm").read_bytes()


def test_committed_vectors_are_exactly_what_the_generator_writes() -> None:
    files = build()
    on_disk = {str(p.relative_to(GOLDEN)): p.read_bytes() for p in GOLDEN.rglob("*")
               if p.is_file()}
    assert sorted(on_disk) == sorted(files)
    differ = [k for k in files if files[k] != on_disk[k]]
    assert not differ, f"regenerate with: python tests/make_golden.py ({differ})"


def test_the_vectors_cover_what_the_format_promises() -> None:
    valid = MANIFEST["valid"]
    dtypes = {c["dtype"] for d in valid.values() for c in d["columns"]}
    assert len(dtypes) == 12
    ragged_dtypes = {c["dtype"] for d in valid.values() for c in d["columns"]
                     if c["kind"] == "ragged"}
    assert len(ragged_dtypes) == 12
    assert {d["n_candidates"] for d in valid.values()} >= {0, 1}
    assert any(not d["columns"] for d in valid.values())
    assert any(max(map(ord, c["name"])) > 127 for d in valid.values() for c in d["columns"])
    assert any(len(c["shape"]) == 4 for d in valid.values() for c in d["columns"])
    assert {v["class"] for v in MANIFEST["invalid"].values()} == {
        "preamble", "layout", "table", "ragged", "value", "metadata"}
    assert set(valid_frames()) == set(VALID) and set(invalid_frames()) == set(INVALID)


@pytest.mark.parametrize("name", VALID)
def test_valid_frame_decodes_as_the_manifest_says(name: str) -> None:
    frame, want = _read("valid", name), MANIFEST["valid"][name]
    f = decode(frame)
    assert f.n_candidates == want["n_candidates"] and len(frame) == want["frame_len"]
    assert f.metadata == want["metadata"] == peek_metadata(frame)
    assert [c["name"] for c in want["columns"]] == list(f.columns)
    for spec, col in zip(want["columns"], f.columns.values(), strict=True):
        values = col.values if isinstance(col, Ragged) else col
        assert values.dtype.name == spec["dtype"], spec["name"]
        assert list(values.shape[1:]) == spec["shape"], spec["name"]
        assert _b2b(values.tobytes()) == spec["values_b2b"], spec["name"]
        assert isinstance(col, Ragged) == (spec["kind"] == "ragged")
        if isinstance(col, Ragged):
            assert col.n_candidates == f.n_candidates
            assert values.shape[0] == spec["n_values"]
            assert _b2b(col.offsets.tobytes()) == spec["offsets_b2b"]
        else:
            assert values.shape[0] == f.n_candidates


@pytest.mark.parametrize("name", INVALID)
def test_invalid_frame_is_rejected_with_the_recorded_error(name: str) -> None:
    want = MANIFEST["invalid"][name]
    frame = _read("invalid", name)
    with pytest.raises(FrameError) as exc:
        decode(frame)
    assert str(exc.value) == want["python_error"]
    if want["class"] in TRIM_CHECKED:  # the trimmer refuses it too, whatever it keeps
        with pytest.raises(FrameError):
            Trimmer().trim(frame, Allowlist.from_names(["alpha"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [n for n in INVALID if MANIFEST["invalid"][n]["class"]
                                  == "ragged"])
def test_ragged_vectors_are_refused_by_every_backends_ragged_check(name: str,
                                                                   backend: str) -> None:
    """The ragged vectors (offsets_end_short among them) through ``trim`` and
    ``trim_parts`` with ``check_ragged=True`` keeping the bad column ``beta``: refused on
    every backend with the worded error ``decode`` gives; not checked when ``beta`` is
    dropped. Fails for offsets_end_short on the planted bug ``heads[:, -1] != n_values`` ->
    ``>`` in ``format.check_ragged_offsets`` (numpy) or the same in ``ragged_bad`` of
    _copyruns_plan.h (C): checked by planting each and reverting."""
    frame, want = _read("invalid", name), MANIFEST["invalid"][name]["python_error"]
    t = Trimmer(backend=backend)
    for _ in range(2):  # cold, then from the cached plan
        with pytest.raises(FrameError) as exc:
            t.trim(frame, Allowlist.from_names(["beta", "alpha"]), check_ragged=True)
        assert str(exc.value) == want
        with pytest.raises(FrameError, match="'beta': ragged offsets"):
            t.trim_parts(frame, Allowlist.from_names(["beta"]), check_ragged=True)
        kept = decode(t.trim(frame, Allowlist.from_names(["alpha", "gamma"]),
                             check_ragged=True).data)
        assert list(kept.columns) == ["alpha", "gamma"]


def test_the_trimmed_vector_is_what_the_trimmer_makes_and_is_idempotent() -> None:
    mixed, trimmed = _read("valid", "mixed"), _read("valid", "trimmed")
    allow = Allowlist.from_names(["ctr_7d", "last_pins", "is_new"])
    assert bytes(Trimmer().trim(mixed, allow).data) == trimmed
    assert bytes(Trimmer().trim(trimmed, allow).data) == trimmed
    full, kept = decode(mixed).columns, decode(trimmed).columns
    assert list(kept) == ["ctr_7d", "last_pins", "is_new"]
    for n, col in kept.items():
        assert (col == full[n]) if isinstance(col, Ragged) else np.array_equal(
            col.view(np.uint8), full[n].view(np.uint8))


@pytest.mark.parametrize("row", KEYS["keys"], ids=lambda r: r["key"])
def test_name_key_known_answers(row: dict) -> None:
    name = bytes.fromhex(row["utf8_hex"]).decode()
    assert name == row["name"]
    assert f"{name_key(name):016x}" == row["key"]
    assert bytes.fromhex(row["digest"]) == name_key(name).to_bytes(8, "little")


def test_name_key_is_not_truncated_blake2b_512() -> None:
    wrong = KEYS["counter_example"]
    assert f"{name_key(wrong['name']):016x}" == "658c2cd590d7a4de"
    assert wrong["blake2b_512_truncated_key"] == "0e62d942d5135f45" != "658c2cd590d7a4de"


def test_golden_files_are_small() -> None:
    total = sum(p.stat().st_size for p in Path(GOLDEN).rglob("*") if p.is_file())
    assert total < 1 << 20


def test_encode_refuses_metadata_outside_the_strict_dialect() -> None:
    from root_worker.frame import encode

    deep: dict = {}
    inner = deep
    for _ in range(127):  # the top-level object is depth 1: 128 in all is the limit
        inner["a"] = {}
        inner = inner["a"]
    assert decode(encode({}, deep)).metadata == deep
    inner["a"] = {}
    for bad in ({"x": float("nan")}, {"x": float("inf")}, {"x": "\ud800"}, deep):
        with pytest.raises(ValueError):
            encode({}, bad)
