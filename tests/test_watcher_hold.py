"""The watcher's hold tracking, unit by unit: :meth:`BundleWatcher.held_since` and
:meth:`BundleWatcher.modifications` on real inotify and real files.

An ``IN_MODIFY`` opens a hold at its monotonic time (the first one: later writes do not move
it) and counts; ``IN_CLOSE_WRITE`` or a new inode at the path ends it; an ``IN_ATTRIB``
(chmod) does not. ``sync()`` reads what is queued without waiting, so every check here is
deterministic: the kernel queues the event before ``write(2)`` returns.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trimmer_daemon.watcher import BundleWatcher

FILE = "module_info.json"


@pytest.fixture
def bundles(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("ads", "feed"):
        (tmp_path / name).mkdir()
        out[name] = tmp_path / name / FILE
        out[name].write_text('{"m": []}')
    # a third bundle in the same directory as "ads": its events must stay its own
    out["ads_b"] = tmp_path / "ads" / "other.json"
    out["ads_b"].write_text('{"m": []}')
    return out


@pytest.fixture
def watcher(bundles: dict[str, Path]) -> Iterator[BundleWatcher]:
    w = BundleWatcher(bundles, rescan_interval_s=math.inf)
    try:
        assert w.poll(0) == set(bundles)  # the first poll reports every bundle
        yield w
    finally:
        w.close()


def _write_held(path: Path) -> int:
    """Open ``path`` for an in-place write (no truncation) and write once; keep it open."""
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, b'{"m": []} ', 0)
    return fd


def test_a_write_that_is_not_closed_holds_from_its_first_modification(
        watcher: BundleWatcher, bundles: dict[str, Path]) -> None:
    """Fails if the hold's time moves with later writes (``setdefault`` -> assignment), if
    modifications are not counted per event, or if a hold leaks to the other bundles."""
    assert watcher.held_since("ads") is None and watcher.modifications("ads") == 0
    before = time.monotonic()
    fd = _write_held(bundles["ads"])
    try:
        watcher.sync()  # the hold is timed when its event is read
        after = time.monotonic()
        since = watcher.held_since("ads")
        assert since is not None and before <= since <= after
        assert watcher.modifications("ads") == 1
        for n in (2, 3):  # each write read by its own sync() is its own event
            os.pwrite(fd, b" ", 9)
            watcher.sync()
            assert watcher.held_since("ads") == since  # the first modification's time
            assert watcher.modifications("ads") == n
        for other in ("feed", "ads_b", "nope"):
            assert watcher.held_since(other) is None and watcher.modifications(other) == 0
        os.chmod(bundles["ads"], 0o640)  # IN_ATTRIB: not a new inode, the writer still holds
        watcher.sync()
        assert watcher.held_since("ads") == since
    finally:
        os.close(fd)
    watcher.sync()  # IN_CLOSE_WRITE ends the hold; the count stays
    assert watcher.held_since("ads") is None
    assert watcher.modifications("ads") == 3
    assert watcher.poll(0) == {"ads"}  # and the change is reported, once


def test_a_write_closed_at_once_is_never_seen_held(watcher: BundleWatcher,
                                                   bundles: dict[str, Path]) -> None:
    with open(bundles["feed"], "w") as f:  # cp, shell redirection: modify + close
        f.write('{"m": [], "x": []}')
    watcher.sync()
    assert watcher.held_since("feed") is None
    assert watcher.modifications("feed") >= 1


def test_a_new_inode_at_the_path_ends_the_hold(watcher: BundleWatcher,
                                               bundles: dict[str, Path]) -> None:
    """A rename over the held file (mv, a ConfigMap swap) ends the hold even though the old
    inode's writer never closed. Fails if only IN_CLOSE_WRITE ends a hold."""
    fd = _write_held(bundles["ads"])
    try:
        watcher.sync()
        assert watcher.held_since("ads") is not None
        fresh = bundles["ads"].with_name("fresh.tmp")
        fresh.write_text('{"m": [1]}')
        watcher.sync()
        assert watcher.held_since("ads") is not None  # another name: no effect
        os.rename(fresh, bundles["ads"])
        watcher.sync()
        assert watcher.held_since("ads") is None
        os.pwrite(fd, b"x", 0)  # the old inode is no longer at the path: no new hold
        watcher.sync()
        assert watcher.held_since("ads") is None
    finally:
        os.close(fd)


def test_a_bundle_dropped_by_set_bundles_loses_its_hold(watcher: BundleWatcher,
                                                        bundles: dict[str, Path]) -> None:
    fd = _write_held(bundles["feed"])
    try:
        watcher.sync()
        assert watcher.held_since("feed") is not None
        watcher.set_bundles({n: p for n, p in bundles.items() if n != "feed"})
        assert watcher.held_since("feed") is None
        watcher.set_bundles(bundles)  # back: nothing held until it is written again
        assert watcher.held_since("feed") is None
        os.pwrite(fd, b" ", 9)
        watcher.sync()
        assert watcher.held_since("feed") is not None
    finally:
        os.close(fd)


def test_sync_without_events_changes_nothing_and_a_closed_watcher_refuses(
        bundles: dict[str, Path]) -> None:
    w = BundleWatcher(bundles, rescan_interval_s=math.inf)
    w.sync()
    assert w.held_since("ads") is None and w.modifications("ads") == 0
    w.close()
    with pytest.raises(ValueError):
        w.sync()
