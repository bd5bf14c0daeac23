"""The per-bundle state machine (trimmer_daemon/state.py), unit by unit: a real
:class:`BundleTracker` on real files, parsed by the daemon's own ``build_part``.

    never_loaded --valid--> ok --invalid--> stale --fixed (or reverted)--> ok
                            ok --deleted--> missing --recreated--> ok
                            ok --held too long (a writer keeps it open)--> stale

Status means *now*: content equal to the loaded content is ``ok`` whatever failed before; a
failing bundle keeps its last-known-good part; ``failures`` counts each new failure once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from flatbuffers_schema.fmap.BundleState import BundleState
from trimmer_daemon.bundle.parse import BundleError, Limits
from trimmer_daemon.parts import build_part
from trimmer_daemon.state import BundleTracker, RefreshResult

GOOD = json.dumps({"ctr": [{"version": "1", "input_names": ["a", "b"]},
                           {"version": "2", "input_names": ["a"]}],
                   "cvr": [{"version": "1", "input_names": ["x"]}]}).encode()
GOOD2 = json.dumps({"ctr": [{"version": "3", "input_names": ["c"]}]}).encode()
BAD = b'{"ctr": []}'  # valid JSON, invalid bundle: a model with no versions


class Clock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        self.now += 1_000
        return self.now


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ads" / "module_info.json"


@pytest.fixture
def tracker(path: Path) -> BundleTracker:
    path.parent.mkdir(parents=True, exist_ok=True)
    return BundleTracker("ads", str(path), limits=Limits(), clock_ns=Clock())


def refresh(t: BundleTracker, *, held: bool = False) -> tuple[RefreshResult, bool]:
    """One refresh as the daemon makes it; also says whether the file was parsed."""
    got = t.read()
    if isinstance(got, RefreshResult):
        return got, False
    assert isinstance(got, bytes)
    try:
        outcome: object = build_part(got, path=t.path, limits=t.limits, bundle_index=0)
    except BundleError as exc:
        outcome = exc
    return t.install(outcome, held=held), True  # type: ignore[arg-type]


def test_a_new_tracker_has_never_loaded(tracker: BundleTracker) -> None:
    s = tracker.status()
    assert (s.name, s.state, s.sha256, s.error, s.model_count, s.version_count) == (
        "ads", BundleState.NeverLoaded, "", "", 0, 0)
    assert tracker.part is None and tracker.failures == 0


def test_missing_then_invalid_then_valid_from_never_loaded(tracker: BundleTracker,
                                                           path: Path) -> None:
    r, parsed = refresh(tracker)
    assert not parsed and r.state == BundleState.Missing and r.changed and not r.loaded
    assert "file not found" in r.error and tracker.failures == 1
    path.write_bytes(BAD)
    r, parsed = refresh(tracker)
    assert parsed and r.state == BundleState.NeverLoaded and r.changed and not r.loaded
    assert "model has no versions" in r.error and tracker.failures == 2
    assert tracker.current_sha256 == sha(BAD) and tracker.part is None
    path.write_bytes(GOOD)
    r, parsed = refresh(tracker)
    assert parsed and r.state == BundleState.Ok and r.changed and r.loaded and r.error == ""
    assert r.duration_s >= 0 and not r.held and r.bundle == "ads"
    s = tracker.status()
    assert (s.state, s.sha256, s.error, s.current_sha256) == (BundleState.Ok, sha(GOOD), "", "")
    assert (s.model_count, s.version_count) == (2, 3)
    assert s.loaded_at_ns == s.checked_at_ns > 0 and tracker.failures == 2


def test_unchanged_content_is_not_parsed_again(tracker: BundleTracker, path: Path) -> None:
    path.write_bytes(GOOD)
    refresh(tracker)
    part, loaded_at = tracker.part, tracker.loaded_at_ns
    r, parsed = refresh(tracker)
    assert not parsed and r.state == BundleState.Ok and not r.changed and not r.loaded
    assert tracker.part is part and tracker.loaded_at_ns == loaded_at
    assert tracker.checked_at_ns > loaded_at  # checked again, at a later time


def test_invalid_content_goes_stale_and_keeps_the_last_good_part(tracker: BundleTracker,
                                                                 path: Path) -> None:
    path.write_bytes(GOOD)
    refresh(tracker)
    part = tracker.part
    path.write_bytes(BAD)
    r, _ = refresh(tracker)
    assert r.state == BundleState.Stale and r.changed and not r.loaded
    assert tracker.part is part and tracker.loaded_sha256 == sha(GOOD)
    assert tracker.current_sha256 == sha(BAD) and tracker.failures == 1
    assert tracker.status().model_count == 2  # still serving the last good content
    r, _ = refresh(tracker)  # the same failure again: no change, not counted again
    assert r.state == BundleState.Stale and not r.changed and tracker.failures == 1
    path.write_bytes(GOOD)  # reverted: ok *now*, without a parse or a new load
    r, parsed = refresh(tracker)
    assert not parsed and r.state == BundleState.Ok and r.changed and not r.loaded
    assert (tracker.error, tracker.current_sha256) == ("", "") and tracker.part is part
    path.write_bytes(BAD)
    refresh(tracker)
    path.write_bytes(GOOD2)  # fixed with new content: loaded
    r, parsed = refresh(tracker)
    assert parsed and r.state == BundleState.Ok and r.changed and r.loaded
    assert tracker.part is not part and tracker.loaded_sha256 == sha(GOOD2)
    assert tracker.failures == 2


def test_deleted_goes_missing_and_recreated_comes_back(tracker: BundleTracker,
                                                       path: Path) -> None:
    path.write_bytes(GOOD)
    refresh(tracker)
    part = tracker.part
    path.unlink()
    r, _ = refresh(tracker)
    assert r.state == BundleState.Missing and r.changed and tracker.part is part
    assert "file not found" in r.error and tracker.current_sha256 == ""
    path.write_bytes(GOOD)
    r, parsed = refresh(tracker)
    assert not parsed and r.state == BundleState.Ok and r.changed and r.error == ""


def test_an_unreadable_kind_of_file_is_stale_not_missing(tracker: BundleTracker,
                                                         path: Path) -> None:
    path.write_bytes(GOOD)
    refresh(tracker)
    path.unlink()
    path.mkdir()  # a directory where the file was
    r, _ = refresh(tracker)
    assert r.state == BundleState.Stale and "not a regular file" in r.error


def test_held_content_is_never_loaded(tracker: BundleTracker, path: Path) -> None:
    path.write_bytes(GOOD)
    refresh(tracker)
    part = tracker.part
    path.write_bytes(GOOD2)
    r, parsed = refresh(tracker, held=True)
    assert parsed and r.held and not r.loaded and not r.changed
    assert r.state == BundleState.Ok and tracker.part is part
    assert tracker.loaded_sha256 == sha(GOOD)
    r, parsed = refresh(tracker)  # the writer closed it: read again, now loaded
    assert parsed and r.loaded and tracker.loaded_sha256 == sha(GOOD2)


def test_a_hold_past_its_bound_turns_stale(tracker: BundleTracker, path: Path) -> None:
    r = tracker.hold_expired(2.46)  # nothing loaded yet: stays never_loaded, with a reason
    assert r.state == BundleState.NeverLoaded and r.changed
    assert "still being written in place: modified 2.5s ago" in r.error
    path.write_bytes(GOOD)
    refresh(tracker)
    r = tracker.hold_expired(7.0)
    assert r.state == BundleState.Stale and r.changed and not r.loaded
    assert str(path) in r.error and "7.0s" in r.error and tracker.failures == 2
    assert tracker.part is not None


def test_install_needs_a_read_and_discard_forgets_it(tracker: BundleTracker,
                                                     path: Path) -> None:
    path.write_bytes(GOOD)
    with pytest.raises(AssertionError, match="without read"):
        tracker.install(BundleError(str(path), "$", "x"), held=False)
    assert isinstance(tracker.read(), bytes)
    tracker.discard_read()
    with pytest.raises(AssertionError, match="without read"):
        tracker.install(BundleError(str(path), "$", "x"), held=False)
    assert tracker.state == BundleState.NeverLoaded


def test_warnings_of_the_loaded_part_are_in_its_status(tracker: BundleTracker,
                                                       path: Path) -> None:
    path.write_bytes(json.dumps({"m": [{"version": "1", "input_names": ["a", "a"]}]}).encode())
    r, _ = refresh(tracker)
    assert r.loaded
    (warning,) = tracker.status().warnings
    assert "duplicate feature" in warning and str(path) in warning
