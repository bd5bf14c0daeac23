"""Tests of trimmer_daemon.watcher on real inotify and real files (no mocks, no sleeps).

Synchronisation is always ``poll()`` with a deadline: ``wait_for`` loops ``poll(0.2)``
until the expected bundle is reported or ``DEADLINE_S`` passes. "Nothing is reported" is
checked with ``poll(QUIET_S)``, i.e. the watcher itself waits.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import select
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trimmer_daemon.watcher import BundleWatcher, resolve_anchors

DEADLINE_S = 5.0
QUIET_S = 0.2
FILE = "module_info.json"


def wait_for(watcher: BundleWatcher, name: str, deadline_s: float = DEADLINE_S) -> set[str]:
    """Poll until ``name`` is reported; return everything reported meanwhile."""
    seen: set[str] = set()
    deadline = time.monotonic() + deadline_s
    while name not in seen and time.monotonic() < deadline:
        seen |= watcher.poll(0.2)
    assert name in seen, f"{name!r} not reported within {deadline_s}s (saw {seen})"
    return seen


def assert_quiet(watcher: BundleWatcher) -> None:
    assert watcher.poll(QUIET_S) == set()


def write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def make_watcher() -> Iterator[Callable[..., BundleWatcher]]:
    made: list[BundleWatcher] = []

    def make(bundles: dict[str, Path], **kw: Any) -> BundleWatcher:
        kw.setdefault("rescan_interval_s", math.inf)  # prove inotify alone suffices
        w = BundleWatcher(bundles, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """Bundle ``a`` and an unrelated bundle ``b`` in sibling directories."""
    paths = {n: tmp_path / "bundles" / n / FILE for n in ("a", "b")}
    for path in paths.values():
        path.parent.mkdir(parents=True)
        write(path, '{"v": 0}')
    return paths


@pytest.fixture
def two(
    tree: dict[str, Path], make_watcher: Callable[..., BundleWatcher]
) -> tuple[BundleWatcher, Path]:
    """A watcher of ``tree`` whose first report was consumed; returns it and a's path."""
    w = make_watcher(tree)
    assert w.poll(0) == {"a", "b"}  # the first poll reports everything
    return w, tree["a"]


# ---------------------------------------------------------------- replacement styles


def _python_write(p: Path, tmp: Path) -> None:
    write(p, '{"v": 1}')


def _cp(p: Path, tmp: Path) -> None:
    write(tmp / "src.json", '{"v": 1}')
    subprocess.run(["cp", str(tmp / "src.json"), str(p)], check=True)


def _mv(p: Path, tmp: Path) -> None:
    write(tmp / "src.json", '{"v": 1}')
    subprocess.run(["mv", str(tmp / "src.json"), str(p)], check=True)


def _rsync(p: Path, tmp: Path) -> None:  # writes .module_info.json.XXXXXX, then renames
    # a different size than the original, or rsync's quick check (size+mtime) may skip it
    write(tmp / "src.json", '{"v": 12345}')
    subprocess.run(["rsync", "-a", str(tmp / "src.json"), str(p)], check=True)


def _rsync_like(p: Path, tmp: Path) -> None:  # what rsync does, for machines without it
    fd, t = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    os.write(fd, b'{"v": 1}')
    os.close(fd)
    os.rename(t, p)


def _sed_i(p: Path, tmp: Path) -> None:
    subprocess.run(["sed", "-i", "s/0/1/", str(p)], check=True)


def _delete_recreate(p: Path, tmp: Path) -> None:
    p.unlink()
    write(p, '{"v": 1}')


def _chmod(p: Path, tmp: Path) -> None:
    p.chmod(0o600)


def _vim_like(p: Path, tmp: Path) -> None:
    """vim's default save of a singly-linked file: probe file, backup rename, new file."""
    probe = p.parent / "4913"
    write(probe, "")
    probe.unlink()
    backup = p.with_name(p.name + "~")
    os.rename(p, backup)
    write(p, '{"v": 1}')
    backup.unlink()


def _vim(p: Path, tmp: Path) -> None:
    subprocess.run(
        ["vim", "-u", "NONE", "-i", "NONE", "-N", "-n", "-es", "-c", "%s/0/1/", "-c", "wq",
         str(p)],
        check=True, stdin=subprocess.DEVNULL, timeout=30,
    )


def _needs(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"`{tool}` is not installed")


REPLACEMENTS = [
    pytest.param(_python_write, id="python-open-w"),
    pytest.param(_cp, id="cp"),
    pytest.param(_mv, id="mv"),
    pytest.param(_rsync, id="rsync", marks=_needs("rsync")),
    pytest.param(_rsync_like, id="temp-and-rename"),
    pytest.param(_sed_i, id="sed-i", marks=_needs("sed")),
    pytest.param(_delete_recreate, id="delete-recreate"),
    pytest.param(_chmod, id="chmod"),
    pytest.param(_vim_like, id="vim-like"),
    pytest.param(_vim, id="vim", marks=_needs("vim")),
]


@pytest.mark.parametrize("replace", REPLACEMENTS)
def test_replacement_is_reported_for_its_bundle_only(
    two: tuple[BundleWatcher, Path], tmp_path: Path, replace: Callable[[Path, Path], None]
) -> None:
    w, path = two
    replace(path, tmp_path)
    assert wait_for(w, "a") == {"a"}
    # the watch survived the replacement: a later in-place write is still seen
    write(path, '{"v": 2}')
    assert wait_for(w, "a") == {"a"}


def test_delete_alone_is_reported(two: tuple[BundleWatcher, Path]) -> None:
    w, path = two
    path.unlink()
    assert wait_for(w, "a") == {"a"}
    write(path, "{}")
    assert wait_for(w, "a") == {"a"}


# ---------------------------------------------------------------- Kubernetes ConfigMap


class AtomicWriterLike:
    """A Python rendition of kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go):
    payload into a new ``..<timestamp>.<random>`` dir, symlink ``..data_tmp`` to it, rename
    it over ``..data``, create missing user-visible ``name -> ..data/name`` links, then
    remove the previous timestamped dir."""

    def __init__(self, target: Path) -> None:
        self.target = target
        target.mkdir(parents=True, exist_ok=True)

    def write(self, payload: dict[str, str], *, remove_old: bool = True) -> None:
        data = self.target / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        stamp = datetime.datetime.now(datetime.UTC).strftime("..%Y_%m_%d_%H_%M_%S.")
        ts_dir = Path(tempfile.mkdtemp(prefix=stamp, dir=self.target))
        ts_dir.chmod(0o755)
        for name, text in payload.items():
            write(ts_dir / name, text)
        tmp_link = self.target / "..data_tmp"
        os.symlink(ts_dir.name, tmp_link)
        os.rename(tmp_link, data)
        for name in payload:
            visible = self.target / name
            if not visible.is_symlink():
                os.symlink(os.path.join("..data", name), visible)
        if old is not None and remove_old:
            shutil.rmtree(self.target / old)


def test_configmap_data_swaps(tmp_path: Path, make_watcher: Callable[..., BundleWatcher]) -> None:
    cm_a, cm_b = AtomicWriterLike(tmp_path / "cm-a"), AtomicWriterLike(tmp_path / "cm-b")
    cm_a.write({FILE: '{"v": 0}'})
    cm_b.write({FILE: '{"v": 0}'})
    w = make_watcher({"a": cm_a.target / FILE, "b": cm_b.target / FILE})
    assert w.poll(0) == {"a", "b"}
    dirs_before = len(w.watched_dirs)
    for v in range(1, 4):
        cm_a.write({FILE: f'{{"v": {v}}}'})
        assert wait_for(w, "a") == {"a"}
        assert (cm_a.target / FILE).read_text() == f'{{"v": {v}}}'
    assert len(w.watched_dirs) == dirs_before, "a watch leaked per swap"
    live_ts = os.path.realpath(cm_a.target / "..data")
    assert live_ts in w.watched_dirs  # the current timestamped dir, not a removed one
    cm_b.write({FILE: '{"v": 9}'})
    assert wait_for(w, "b") == {"b"}


def test_configmap_swap_alone_is_reported(
    tmp_path: Path, make_watcher: Callable[..., BundleWatcher]
) -> None:
    """The ``..data`` rename itself is the signal, not the later cleanup (which kubelet may
    fail or delay): stop the writer right after step 9 of AtomicWriter."""
    cm = AtomicWriterLike(tmp_path / "cm")
    cm.write({FILE: '{"v": 0}'})
    w = make_watcher({"a": cm.target / FILE})
    assert w.poll(0) == {"a"}
    cm.write({FILE: '{"v": 1}'}, remove_old=False)
    assert wait_for(w, "a") == {"a"}
    assert (cm.target / FILE).read_text() == '{"v": 1}'


def test_configmap_volume_populated_after_start(
    tmp_path: Path, make_watcher: Callable[..., BundleWatcher]
) -> None:
    w = make_watcher({"a": tmp_path / "cm" / FILE})
    assert w.poll(0) == {"a"}
    AtomicWriterLike(tmp_path / "cm").write({FILE: "{}"})
    wait_for(w, "a")
    assert (tmp_path / "cm" / FILE).read_text() == "{}"


# ---------------------------------------------------------------- symlinks


def _swap_symlink(link: Path, target: str) -> None:
    """ln -sfn done atomically: new link beside the old one, renamed over it."""
    tmp = link.with_name(link.name + ".tmp")
    os.symlink(target, tmp)
    os.rename(tmp, link)


def test_symlinked_bundle_file_in_other_dir(
    tmp_path: Path, make_watcher: Callable[..., BundleWatcher]
) -> None:
    for rel in ("r1", "r2", "bundles"):
        (tmp_path / rel).mkdir()
    write(tmp_path / "r1" / FILE, "1")
    write(tmp_path / "r2" / FILE, "2")
    link = tmp_path / "bundles" / FILE
    os.symlink(tmp_path / "r1" / FILE, link)
    w = make_watcher({"a": link})
    assert w.poll(0) == {"a"}
    write(tmp_path / "r1" / FILE, "1b")  # in-place edit of the target, in another dir
    assert wait_for(w, "a") == {"a"}
    _swap_symlink(link, str(tmp_path / "r2" / FILE))
    assert wait_for(w, "a") == {"a"}
    write(tmp_path / "r1" / FILE, "1c")  # the old target no longer matters
    assert_quiet(w)
    assert str(tmp_path / "r1") not in w.watched_dirs
    write(tmp_path / "r2" / FILE, "2b")
    assert wait_for(w, "a") == {"a"}


def test_bundle_dir_symlink_swap(
    tmp_path: Path, make_watcher: Callable[..., BundleWatcher]
) -> None:
    """Release-style deploys: bundles/a -> releases/v1, atomically re-pointed to v2."""
    for rel in ("releases/v1", "releases/v2", "bundles"):
        (tmp_path / rel).mkdir(parents=True)
    write(tmp_path / "releases/v1" / FILE, "1")
    write(tmp_path / "releases/v2" / FILE, "2")
    os.symlink(tmp_path / "releases/v1", tmp_path / "bundles/a")
    w = make_watcher({"a": tmp_path / "bundles/a" / FILE})
    assert w.poll(0) == {"a"}
    _swap_symlink(tmp_path / "bundles/a", str(tmp_path / "releases/v2"))
    assert wait_for(w, "a") == {"a"}
    write(tmp_path / "releases/v2" / FILE, "2b")
    assert wait_for(w, "a") == {"a"}


# ---------------------------------------------------------------- filtering


def test_two_bundles_in_one_dir_are_distinguished(
    tmp_path: Path, make_watcher: Callable[..., BundleWatcher]
) -> None:
    write(tmp_path / "a.json", "{}")
    write(tmp_path / "b.json", "{}")
    w = make_watcher({"a": tmp_path / "a.json", "b": tmp_path / "b.json"})
    assert w.poll(0) == {"a", "b"}
    assert len(w.watched_dirs) == 2  # tmp_path and its parent, one watch each
    write(tmp_path / "a.json", "1")
    assert wait_for(w, "a") == {"a"}
    write(tmp_path / "b.json", "1")
    assert wait_for(w, "b") == {"b"}


def test_unrelated_files_are_ignored(two: tuple[BundleWatcher, Path]) -> None:
    w, path = two
    events_before = w.stats.events
    write(path.parent / "other.json", "{}")
    write(path.parent / (FILE + ".bak"), "{}")
    (path.parent / "sub").mkdir()
    write(path.parent / "sub" / FILE, "{}")  # same name, deeper: not the bundle
    os.rename(path.parent / "other.json", path.parent / "other2.json")
    path.read_text()  # reading the bundle (as the daemon does) must not feed back
    assert_quiet(w)
    assert w.stats.events > events_before  # events did arrive and were filtered


# ---------------------------------------------------------------- debounce and latency


def test_burst_of_50_writes_is_one_report(
    tmp_path: Path, make_watcher: Callable[..., BundleWatcher]
) -> None:
    write(tmp_path / FILE, "0")
    w = make_watcher({"a": tmp_path / FILE}, debounce_s=0.1, max_delay_s=2.0)
    assert w.poll(0) == {"a"}
    proc = subprocess.Popen(
        ["sh", "-c", 'i=0; while [ $i -lt 50 ]; do echo "$i" > "$1"; i=$((i+1)); done',
         "sh", str(tmp_path / FILE)])
    try:
        assert w.poll(DEADLINE_S) == {"a"}
    finally:
        assert proc.wait(timeout=30) == 0
    assert_quiet(w)
    assert w.stats.relevant_events > 50  # 50 writes = 100+ events, coalesced into one report
    assert w.stats.reports == 2


def test_continuous_writer_is_reported_within_max_delay(
    tmp_path: Path, make_watcher: Callable[..., BundleWatcher]
) -> None:
    write(tmp_path / FILE, "0")
    w = make_watcher({"a": tmp_path / FILE}, debounce_s=0.05, max_delay_s=0.1)
    assert w.poll(0) == {"a"}
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            write(tmp_path / FILE, "x")

    t = threading.Thread(target=writer)
    t.start()
    try:
        started = time.monotonic()
        assert w.poll(DEADLINE_S) == {"a"}
        assert time.monotonic() - started < 1.0  # max_delay_s caps the debounce
    finally:
        stop.set()
        t.join()


def test_rename_latency(tmp_path: Path, make_watcher: Callable[..., BundleWatcher]) -> None:
    write(tmp_path / FILE, "0")
    w = make_watcher({"a": tmp_path / FILE})
    assert w.poll(0) == {"a"}
    samples = []
    for i in range(20):
        write(tmp_path / "new", str(i))
        t0 = time.monotonic()
        os.rename(tmp_path / "new", tmp_path / FILE)
        assert w.poll(DEADLINE_S) == {"a"}
        samples.append(time.monotonic() - t0)
    # default debounce is 5 ms; generous bounds so a loaded CI box does not flake
    assert statistics.median(samples) < 0.05, samples
    assert max(samples) < 1.0, samples


# ---------------------------------------------------------------- directories come and go


def test_bundle_dir_created_after_start(
    tmp_path: Path, make_watcher: Callable[..., BundleWatcher]
) -> None:
    path = tmp_path / "bundles" / "x" / "a" / FILE
    w = make_watcher({"a": path})
    assert w.poll(0) == {"a"}
    assert w.watched_dirs == {str(tmp_path)}  # nearest existing ancestor only
    path.parent.mkdir(parents=True)
    wait_for(w, "a")
    write(path, "{}")
    assert wait_for(w, "a") == {"a"}
    assert str(path.parent) in w.watched_dirs
    assert str(tmp_path) not in w.watched_dirs  # the ancestor watch is gone again


def test_bundle_dir_removed_and_recreated(two: tuple[BundleWatcher, Path]) -> None:
    w, path = two
    shutil.rmtree(path.parent)
    assert wait_for(w, "a") == {"a"}
    assert str(path.parent) not in w.watched_dirs
    path.parent.mkdir()
    write(path, "{}")
    assert wait_for(w, "a") == {"a"}
    write(path, "{1}")  # the new directory is watched
    assert wait_for(w, "a") == {"a"}
    assert str(path.parent) in w.watched_dirs


def test_bundle_dir_moved_away_and_replaced(two: tuple[BundleWatcher, Path]) -> None:
    w, path = two
    staged = path.parent.with_name("a.new")
    staged.mkdir()
    write(staged / FILE, "{}")
    os.rename(path.parent, path.parent.with_name("a.old"))
    os.rename(staged, path.parent)
    assert wait_for(w, "a") == {"a"}
    write(path.parent.with_name("a.old") / FILE, "{old}")  # the moved-away dir is not watched
    assert_quiet(w)
    write(path, "{2}")
    assert wait_for(w, "a") == {"a"}


# ---------------------------------------------------------------- reconfiguration


def test_set_bundles_adds_and_removes(
    two: tuple[BundleWatcher, Path], tmp_path: Path
) -> None:
    w, path_a = two
    c = tmp_path / "other" / FILE
    c.parent.mkdir()
    write(c, "{}")
    w.set_bundles({"b": tmp_path / "bundles" / "b" / FILE, "c": c})
    assert w.bundles == {"b": str(tmp_path / "bundles" / "b" / FILE), "c": str(c)}
    assert w.poll(0) == {"c"}  # newly added bundles are reported at once
    assert str(path_a.parent) not in w.watched_dirs
    write(path_a, "{1}")
    assert_quiet(w)
    write(c, "{1}")
    assert wait_for(w, "c") == {"c"}
    w.set_bundles({})
    assert w.watched_dirs == frozenset()


def test_set_bundles_new_path_for_same_name(
    two: tuple[BundleWatcher, Path], tmp_path: Path
) -> None:
    w, path_a = two
    moved = tmp_path / "elsewhere" / FILE
    moved.parent.mkdir()
    write(moved, "{}")
    w.set_bundles({"a": moved, "b": tmp_path / "bundles" / "b" / FILE})
    assert w.poll(0) == {"a"}
    write(path_a, "{1}")
    assert_quiet(w)
    write(moved, "{1}")
    assert wait_for(w, "a") == {"a"}


# ---------------------------------------------------------------- overflow and rescan


def test_queue_overflow_reports_everything(
    two: tuple[BundleWatcher, Path], caplog: pytest.LogCaptureFixture
) -> None:
    w, path = two
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events={limit} is too large to overflow quickly")
    # Irrelevant names still queue events, and the kernel merges an event only with the
    # identical one at the tail of the queue: alternating chmod of two files fills it fast.
    noise = [path.parent / "x", path.parent / "y"]
    for p in noise:
        write(p, "")
    for _ in range(limit // 2 + 100):
        for p in noise:
            os.chmod(p, 0o644)
    assert w.poll(DEADLINE_S) == {"a", "b"}
    assert w.stats.overflows == 1
    assert [r.levelno for r in caplog.records if "overflow" in r.getMessage()] == [
        logging.WARNING
    ]
    write(path, "{}")  # watches are intact after the overflow
    assert wait_for(w, "a") == {"a"}


def test_periodic_rescan_via_injected_clock(
    tree: dict[str, Path], make_watcher: Callable[..., BundleWatcher]
) -> None:
    now = [1000.0]
    w = make_watcher(tree, rescan_interval_s=30.0, clock=lambda: now[0])
    assert w.poll(0) == {"a", "b"}
    assert w.poll(0) == set()
    now[0] += 29.9
    assert w.poll(0) == set()
    now[0] += 0.1
    assert w.poll(0) == {"a", "b"}
    assert w.stats.rescans == 1
    assert w.poll(0) == set()  # rescheduled 30 s from now
    assert w.seconds_until_rescan() == 30.0
    now[0] += 30.0
    assert w.seconds_until_rescan() == 0.0
    assert w.poll(None) == {"a", "b"}  # a blocking poll also honours the schedule
    assert w.stats.rescans == 2


def test_rescan_disabled(two: tuple[BundleWatcher, Path]) -> None:
    w, _ = two
    assert w.seconds_until_rescan() == math.inf
    assert w.poll(0) == set()


# ---------------------------------------------------------------- lifecycle


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_close_is_idempotent_and_leaks_no_fd(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    before = _open_fds()
    with BundleWatcher({"a": tmp_path / "a" / FILE, "b": tmp_path / "nope" / FILE}) as w:
        fd = w.fileno()
        assert str(fd) in _open_fds()
        assert not os.get_inheritable(fd)
        assert w.poll(0) == {"a", "b"}
        w.close()
        w.close()
        with pytest.raises(ValueError):
            w.poll(0)
        with pytest.raises(ValueError):
            w.fileno()
    w.close()
    assert _open_fds() == before


def test_fileno_is_selectable(two: tuple[BundleWatcher, Path]) -> None:
    w, path = two
    assert select.select([w.fileno()], [], [], 0)[0] == []
    write(path, "{1}")
    assert select.select([w.fileno()], [], [], DEADLINE_S)[0] == [w.fileno()]
    assert wait_for(w, "a") == {"a"}
    write(path.parent / "unrelated", "")
    assert select.select([w.fileno()], [], [], DEADLINE_S)[0] == [w.fileno()]
    assert w.poll(0) == set()  # consumes irrelevant events, so select() will not spin
    assert select.select([w.fileno()], [], [], 0)[0] == []


def test_huge_timeout_is_fine(two: tuple[BundleWatcher, Path]) -> None:
    w, path = two
    write(path, "{1}")
    assert w.poll(1e12) == {"a"}  # longer than poll(2)'s int milliseconds


def test_bad_path_leaves_state_unchanged(two: tuple[BundleWatcher, Path]) -> None:
    w, path = two
    before = (w.bundles, w.watched_dirs)
    with pytest.raises(ValueError, match="NUL"):
        w.set_bundles({"x": "/tmp/bad\0path"})
    assert (w.bundles, w.watched_dirs) == before


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        BundleWatcher({}, debounce_s=0.1, max_delay_s=0.05)
    with pytest.raises(ValueError):
        BundleWatcher({}, rescan_interval_s=0)


def test_resolve_anchors_of_missing_tree(tmp_path: Path) -> None:
    anchors = resolve_anchors(str(tmp_path / "x" / "y" / FILE))
    assert anchors == {(str(tmp_path), "x")}
