"""trimmer-inspect against real maps published by a real daemon.

Every verb is run in-process through ``main(argv)`` (and the installed console script at
least once), on the healthy path and on the warning and critical ones: stale / missing /
never-loaded bundles, a dead daemon, an aged heartbeat, no map at all, a corrupt control
block, a blob that fails its checksum, a blob that is not a feature map.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import (
    F1,
    F3,
    ROOT,
    DaemonProc,
    bundle_state,
    model_doc,
    replace_bundle,
    write_bundle,
)

from flatbuffers_schema import shm_layout as L
from root_worker.oncall import format as fmt
from root_worker.oncall.cli import main
from trimmer_daemon.publisher import Publisher

SHM = Path("/dev/shm")
CTR = {"ctr": [{"version": "1", "input_names": F1},
               {"version": "10", "input_names": ["a", "b", "c"]}]}
VENV_BIN = Path(sys.executable).parent


# -- fixtures and helpers -----------------------------------------------------------------------

@pytest.fixture
def ctr10_bundles(bundles: dict[str, Path]) -> dict[str, Path]:
    """conftest's ``bundles`` (ads: ctr/1 = F1, feed: rank/1 = F3) with a second version of
    ``ctr`` in ``ads``: "10" (a, b, c), the latest in natural order, for the version verbs."""
    write_bundle(bundles["ads"], CTR)
    return bundles


@pytest.fixture
def daemon(shm_prefix: str, ctr10_bundles: dict[str, Path], tmp_path: Path) -> Iterator[DaemonProc]:
    with DaemonProc(shm_prefix, ctr10_bundles, tmp_path / "daemon.log") as d:
        d.wait_view(lambda v: v.model_count == 2)
        yield d


def run(capsys: pytest.CaptureFixture[str], prefix: str, *argv: str) -> tuple[int, str, str]:
    rc = main(["--shm-name", prefix, *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def run_json(capsys: pytest.CaptureFixture[str], prefix: str, *argv: str) -> tuple[int, dict]:
    rc, out, _ = run(capsys, prefix, *argv, "--json")
    doc = json.loads(out)
    assert doc["exit_code"] == rc and doc["shm_name"] == prefix
    return rc, doc


def codes(doc: dict) -> dict[str, str]:
    return {f["code"]: f["level"] for f in doc["findings"]}


def shm_files(prefix: str) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, content) of every segment of ``prefix``."""
    out = {}
    for p in SHM.glob(f"{prefix}.*"):
        out[p.name] = (p.stat().st_mode, p.read_bytes())
    return out


def stop_leaving_map(d: DaemonProc) -> int:
    """SIGTERM the daemon; its last generation stays published. Returns that generation."""
    view = d.view()
    assert view is not None
    assert d.stop() == 0
    return view.generation


def patch_shm(name: str, offset: int, data: bytes) -> None:
    """Overwrite bytes of a segment as root would (tests only: inspect never writes)."""
    fd = os.open(SHM / name, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


# -- healthy map: every verb ---------------------------------------------------------------------

def test_status_ok(daemon: DaemonProc, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, daemon.prefix, "status")
    assert rc == 0, out + err
    first, *rest = out.splitlines()
    assert first.startswith(f"OK - feature-trimmer shm={daemon.prefix} generation=")
    assert f"pid {daemon.proc.pid} alive, writer lock held by pid {daemon.proc.pid}" in out
    assert "verified" in out
    header = next(line for line in rest if line.startswith("BUNDLE"))
    assert header.split() == ["BUNDLE", "STATE", "MODELS", "VERSIONS", "LOADED", "SHA256",
                              "ERROR", "/", "PATH"]
    rows = {line.split()[0]: line for line in rest[rest.index(header) + 1:] if line}
    assert rows["ads"].split()[1:4] == ["ok", "1", "2"]
    assert rows["feed"].split()[1:4] == ["ok", "1", "1"]
    # aligned: the STATE column starts at the same offset on every row
    assert {row.index(" ok ") for row in rows.values()} == {header.index("STATE") - 1}

    rc, doc = run_json(capsys, daemon.prefix, "status")
    view = daemon.view()
    assert rc == 0 and doc["status"] == "ok" and doc["findings"] == []
    assert doc["generation"] == view.generation and doc["models"] == 2
    assert doc["daemon"] == {"pid": daemon.proc.pid, "alive": True, "writer_lock_held": True,
                             "writer_lock_pid": daemon.proc.pid}
    assert doc["blob"]["verified"] and doc["blob"]["segment"] == f"/{daemon.prefix}.g" \
        f"{view.generation}"
    assert 0 <= doc["heartbeat_age_s"] < 5 and doc["map_age_s"] >= 0
    assert [b["state"] for b in doc["bundles"]] == ["ok", "ok"]


def test_models(daemon: DaemonProc, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, daemon.prefix, "models")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "LATEST", "PENDING", "FEATURES", "BUNDLES",
                                "CONFLICT"]
    assert [line.split() for line in lines[1:4]] == [
        ["ctr", "1", "no", "no", "2", "ads", "no"],
        ["ctr", "10", "yes", "no", "3", "ads", "no"],  # natural order: "10" is the latest
        ["rank", "1", "yes", "no", "3", "feed", "no"]]
    assert lines[4].startswith("2 models, 3 versions")

    rc, out, _ = run(capsys, daemon.prefix, "models", "r*")
    assert rc == 0 and "ctr" not in out and "rank" in out

    rc, doc = run_json(capsys, daemon.prefix, "models")
    assert rc == 0
    ctr = doc["models"][0]
    assert ctr["name"] == "ctr" and ctr["latest"] == "10"
    assert [(v["version"], v["features"], v["bundles"]) for v in ctr["versions"]] == [
        ("1", 2, ["ads"]), ("10", 3, ["ads"])]


def test_models_conflict(daemon: DaemonProc, ctr10_bundles: dict[str, Path],
                         capsys: pytest.CaptureFixture[str]) -> None:
    replace_bundle(ctr10_bundles["feed"],
                   {"ctr": [{"version": "1", "input_names": ["a", "q"]}],
                    **model_doc("rank", "1", F3)})
    daemon.wait_view(lambda v: bool(v.conflicts()), what="a conflict")
    rc, doc = run_json(capsys, daemon.prefix, "models", "ctr")
    v1 = doc["models"][0]["versions"][0]
    assert rc == 0 and v1["conflict"] is True and v1["features"] == 3  # union a, b, q
    assert v1["bundles"] == ["ads", "feed"]
    rc, out, _ = run(capsys, daemon.prefix, "models", "ctr")
    assert out.splitlines()[1].split() == ["ctr", "1", "no", "no", "3", "ads,feed", "yes"]
    # a conflict is a note in status, not a warning (the union never under-sends)
    rc, doc = run_json(capsys, daemon.prefix, "status")
    assert rc == 0 and codes(doc) == {"conflict": "ok"}


@pytest.mark.parametrize("argv, outcome, version, explain", [
    (["ctr", "1"], "trimmed", "1", "exact match: version '1'"),
    (["ctr"], "trimmed", "10", "no version requested: latest version '10'"),
    (["ctr", "7"], "version_fallback", "10", "falling back to the latest version '10'"),
    (["nope", "1"], "passthrough_unknown_model", None, "pass through untrimmed"),
])
def test_lookup(daemon: DaemonProc, capsys: pytest.CaptureFixture[str], argv: list[str],
                outcome: str, version: str | None, explain: str) -> None:
    rc, out, _ = run(capsys, daemon.prefix, "lookup", *argv)
    assert rc == 0
    assert explain in out.splitlines()[0]
    assert f"outcome            {outcome}" in out

    rc, doc = run_json(capsys, daemon.prefix, "lookup", *argv, "--features")
    assert rc == 0 and doc["outcome"] == outcome and doc["version"] == version
    assert explain in doc["explanation"]
    if version is None:
        assert doc["trims"] is False and doc["feature_names"] is None
    else:
        expected = F1 if version == "1" else ["a", "b", "c"]
        assert doc["feature_names"] == expected and doc["features"] == len(expected)
        assert doc["bundles"] == ["ads"] and doc["latest"] == "10"
        assert doc["known_versions"] == ["1", "10"] and len(doc["digest"]) == 16


def test_pending_version(daemon: DaemonProc, ctr10_bundles: dict[str, Path],
                         capsys: pytest.CaptureFixture[str]) -> None:
    """A version the bundle marks pending is shown as such and is never the latest."""
    write_bundle(ctr10_bundles["ads"], {"ctr": [
        {"version": "1", "input_names": F1},
        {"version": "10", "input_names": ["a", "b", "c"], "pending": True}]})
    daemon.wait_view(lambda v: v.resolve("ctr").pending == ("10",), what="ctr 10 pending")
    rc, out, _ = run(capsys, daemon.prefix, "models", "ctr")
    assert rc == 0 and [line.split() for line in out.splitlines()[1:3]] == [
        ["ctr", "1", "yes", "no", "2", "ads", "no"],
        ["ctr", "10", "no", "yes", "3", "ads", "no"]]
    rc, doc = run_json(capsys, daemon.prefix, "lookup", "ctr")
    assert rc == 0 and doc["version"] == "1" and doc["latest"] == "1"
    assert doc["pending_versions"] == ["10"]
    assert doc["unknown_leaf_features"] == len(set(F1) | {"a", "b", "c"})
    rc, doc = run_json(capsys, daemon.prefix, "lookup", "ctr", "10")
    assert rc == 0 and doc["outcome"] == "trimmed" and "(pending)" in doc["explanation"]


def test_lookup_features_text(daemon: DaemonProc, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, daemon.prefix, "lookup", "rank", "--features")
    assert rc == 0 and out.split("\n\n")[-1].split() == F3
    rc, out, _ = run(capsys, daemon.prefix, "lookup", "rank")
    assert "\n\nx\n" not in out


def test_dump(daemon: DaemonProc, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, daemon.prefix, "dump")  # JSON with or without --json
    doc = json.loads(out)
    view = daemon.view()
    assert rc == 0 and doc["map"] == json.loads(json.dumps(view.to_dict(with_features=True)))
    ctr = doc["map"]["models"][0]
    assert sorted(ctr["versions"][0]["input_names"]) == F1
    assert doc["generation"] == view.generation and doc["daemon"]["alive"] is True
    rc, doc = run_json(capsys, daemon.prefix, "dump", "--no-features")
    assert rc == 0 and "input_names" not in doc["map"]["models"][0]["versions"][0]


# -- diff ------------------------------------------------------------------------------------------

def test_diff_in_sync(daemon: DaemonProc, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, daemon.prefix, "diff", "--models")
    assert rc == 0, out
    assert [line.split()[:3] for line in out.splitlines()[1:3]] == [
        ["ads", "in_sync", "ok"], ["feed", "in_sync", "ok"]]
    assert "2 bundles, 0 differ" in out
    rc, doc = run_json(capsys, daemon.prefix, "diff")
    assert rc == 0 and {b["status"] for b in doc["bundles"]} == {"in_sync"}
    assert doc["bundles"][0]["disk_sha256"] == doc["bundles"][0]["published_sha256"]


def test_diff_invalid_file(daemon: DaemonProc, ctr10_bundles: dict[str, Path],
                           capsys: pytest.CaptureFixture[str]) -> None:
    ctr10_bundles["ads"].write_text('{"ctr": [')
    daemon.wait_view(lambda v: bundle_state(v, "ads")["state"] == "stale")
    rc, doc = run_json(capsys, daemon.prefix, "diff")
    ads = doc["bundles"][0]
    assert rc == 1 and ads["status"] == "invalid" and ads["published_state"] == "stale"
    assert "invalid JSON" in ads["detail"] and "has seen this content" in ads["detail"]
    assert codes(doc) == {"diff_invalid": "warning"}


def test_diff_daemon_down(daemon: DaemonProc, ctr10_bundles: dict[str, Path],
                          capsys: pytest.CaptureFixture[str]) -> None:
    """Files changed while no daemon runs: valid-but-not-loaded, per-model, missing."""
    stop_leaving_map(daemon)
    write_bundle(ctr10_bundles["ads"],
                 {"ctr": [{"version": "10", "input_names": ["a", "c", "d"]},
                          {"version": "11", "input_names": ["e"]}]})
    ctr10_bundles["feed"].unlink()
    rc, doc = run_json(capsys, daemon.prefix, "diff", "--models")
    ads, feed = doc["bundles"]
    assert rc == 1
    assert ads["status"] == "not_loaded" and ads["published_state"] == "ok"
    assert ads["disk_sha256"] != ads["published_sha256"]
    assert [(c["model"], c["version"], c["change"], c["only_on_disk"], c["only_published"])
            for c in ads["models"]] == [
        ("ctr", "1", "removed", [], ["a", "b"]),
        ("ctr", "10", "features_changed", ["d"], ["b"]),
        ("ctr", "11", "added", ["e"], [])]
    assert feed["status"] == "missing" and "file not found" in feed["detail"]
    rc, out, _ = run(capsys, daemon.prefix, "diff", "--models")
    assert rc == 1 and "ads: ctr 10: features differ (+d, -b)" in out
    assert "2 bundles, 2 differ" in out


def test_diff_pending_mark(daemon: DaemonProc, ctr10_bundles: dict[str, Path],
                           capsys: pytest.CaptureFixture[str]) -> None:
    """A file whose only change is the pending mark (a promotion or a demotion the daemon
    has not loaded) is reported per version."""
    stop_leaving_map(daemon)
    write_bundle(ctr10_bundles["ads"], {"ctr": [
        {"version": "1", "input_names": F1},
        {"version": "10", "input_names": ["a", "b", "c"], "pending": True}]})
    rc, doc = run_json(capsys, daemon.prefix, "diff", "--models")
    ads = doc["bundles"][0]
    assert rc == 1 and [(c["model"], c["version"], c["change"]) for c in ads["models"]] == [
        ("ctr", "10", "pending_on_disk")]
    rc, out, _ = run(capsys, daemon.prefix, "diff", "--models")
    assert "ads: ctr 10: pending on disk, current in the map" in out


def test_diff_with_config(daemon: DaemonProc, ctr10_bundles: dict[str, Path], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    extra = tmp_path / "extra.json"
    write_bundle(extra, model_doc("new", "1", ["n"]))
    config = tmp_path / "daemon.toml"
    config.write_text(f'max_file_bytes = 10\n[bundles]\nads = "{ctr10_bundles["ads"]}"\n'
                      f'extra = "{extra}"\n')
    rc, doc = run_json(capsys, daemon.prefix, "diff", "--config", str(config))
    by_name = {b["name"]: b for b in doc["bundles"]}
    assert rc == 1
    assert by_name["extra"]["status"] == "not_published"
    assert by_name["feed"]["status"] == "not_configured"
    # the config's limits are the ones applied: the file is too large for max_file_bytes=10
    assert by_name["ads"]["status"] == "invalid" and "file too large" in by_name["ads"]["detail"]
    config.write_text("[bundles\n")
    rc, out, err = run(capsys, daemon.prefix, "diff", "--config", str(config))
    assert rc == 3 and "invalid TOML" in err


# -- warnings ----------------------------------------------------------------------------------

def test_stale_bundle_warns(daemon: DaemonProc, ctr10_bundles: dict[str, Path],
                            capsys: pytest.CaptureFixture[str]) -> None:
    ctr10_bundles["feed"].write_text('{"rank": [{"version": "1", "input_names": []}]}')
    daemon.wait_view(lambda v: bundle_state(v, "feed")["state"] == "stale")
    rc, out, _ = run(capsys, daemon.prefix, "status")
    assert rc == 1
    assert out.startswith("WARNING - ") and "bundle 'feed' is stale" in out.splitlines()[0]
    assert "input_names" in out  # the validator's error text is shown
    rc, doc = run_json(capsys, daemon.prefix, "status")
    assert rc == 1 and codes(doc) == {"bundle_stale": "warning"}
    # the other verbs still answer from the last-known-good map, exit 0
    rc, doc = run_json(capsys, daemon.prefix, "lookup", "rank")
    assert rc == 0 and "feature_names" not in doc and doc["features"] == 3
    # fixing the file makes it ok again: status means *now*
    write_bundle(ctr10_bundles["feed"], model_doc("rank", "1", F3))
    daemon.wait_view(lambda v: bundle_state(v, "feed")["state"] == "ok")
    assert run(capsys, daemon.prefix, "status")[0] == 0


def test_missing_bundle_warns(daemon: DaemonProc, ctr10_bundles: dict[str, Path],
                              capsys: pytest.CaptureFixture[str]) -> None:
    ctr10_bundles["ads"].unlink()
    daemon.wait_view(lambda v: bundle_state(v, "ads")["state"] == "missing")
    rc, doc = run_json(capsys, daemon.prefix, "status")
    assert rc == 1 and codes(doc) == {"bundle_missing": "warning"}
    assert "last-known-good" in doc["findings"][0]["message"]


def test_never_loaded_and_empty(shm_prefix: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad" / "module_info.json"
    write_bundle(bad, {"m": []})
    with DaemonProc(shm_prefix, {"bad": bad}, tmp_path / "d.log") as d:
        d.wait_view(lambda v: bool(v.bundles()))
        rc, doc = run_json(capsys, shm_prefix, "status")
        assert rc == 2 and codes(doc) == {"bundle_never_loaded": "critical"}
        assert "pass through untrimmed" in doc["findings"][0]["message"]
        # a liveness probe restarts: a bad file is noted, never a reason (it would loop)
        rc, doc = run_json(capsys, shm_prefix, "status", "--liveness")
        assert rc == 0 and codes(doc) == {"bundle_never_loaded": "ok"}
        rc, doc = run_json(capsys, shm_prefix, "diff")
        assert rc == 1 and doc["bundles"][0]["status"] == "invalid"
    with DaemonProc(shm_prefix, {}, tmp_path / "d2.log") as d:
        d.wait_view(lambda v: True)
        rc, doc = run_json(capsys, shm_prefix, "status")
        assert rc == 1 and codes(doc) == {"no_bundles": "warning"}
        assert run(capsys, shm_prefix, "status", "--liveness")[0] == 0


def test_dead_daemon(daemon: DaemonProc, capsys: pytest.CaptureFixture[str]) -> None:
    pid = daemon.proc.pid
    daemon.kill()  # SIGKILL: no goodbye, the map and the last heartbeat stay
    rc, doc = run_json(capsys, daemon.prefix, "status", "--heartbeat-warn", "off",
                       "--heartbeat-crit", "off")
    assert rc == 1 and codes(doc) == {"daemon_dead": "warning"}
    assert doc["daemon"] == {"pid": pid, "alive": False, "writer_lock_held": False,
                             "writer_lock_pid": 0}
    assert f"pid {pid} is not running" in doc["findings"][0]["message"]
    rc, out, _ = run(capsys, daemon.prefix, "status", "--heartbeat-warn", "1ms",
                     "--heartbeat-crit", "1h")
    assert rc == 1 and "heartbeat_stale" in out and f"pid {pid} NOT RUNNING" in out
    rc, doc = run_json(capsys, daemon.prefix, "status", "--heartbeat-crit", "1ms")
    assert rc == 2 and codes(doc) == {"daemon_dead": "warning", "heartbeat_stale": "critical"}
    # the map is still served: lookups work and exit 0
    rc, doc = run_json(capsys, daemon.prefix, "lookup", "ctr", "1")
    assert rc == 0 and doc["outcome"] == "trimmed"


def test_graceful_stop_and_restart(daemon: DaemonProc, ctr10_bundles: dict[str, Path],
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen = stop_leaving_map(daemon)
    rc, doc = run_json(capsys, daemon.prefix, "status")
    assert rc == 1 and "daemon_dead" in codes(doc) and doc["generation"] == gen
    d2 = DaemonProc(daemon.prefix, ctr10_bundles, tmp_path / "d2.log")
    try:
        d2.wait_view(lambda v: v.generation > gen)
        rc, doc = run_json(capsys, daemon.prefix, "status")
        assert rc == 0 and doc["daemon"]["pid"] == d2.proc.pid and doc["generation"] > gen
    finally:
        d2.close()


def test_reused_pid(daemon: DaemonProc, capsys: pytest.CaptureFixture[str]) -> None:
    """The heartbeat names a live pid (ours) that does not hold the writer lock."""
    stop_leaving_map(daemon)
    patch_shm(f"{daemon.prefix}.ctl", L.OFF_HEARTBEAT,
              L.encode_heartbeat(time.time_ns(), os.getpid()))
    rc, doc = run_json(capsys, daemon.prefix, "status")
    assert rc == 1 and codes(doc) == {"daemon_dead": "warning"}
    assert "pid was reused" in doc["findings"][0]["message"]
    assert doc["daemon"]["alive"] is True and doc["daemon"]["writer_lock_held"] is False


def test_map_age_thresholds(daemon: DaemonProc, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = run_json(capsys, daemon.prefix, "status", "--age-warn", "1ms")
    assert rc == 1 and codes(doc) == {"map_old": "warning"}
    rc, doc = run_json(capsys, daemon.prefix, "status", "--age-crit", "0.001")
    assert rc == 2 and codes(doc) == {"map_old": "critical"}


# -- critical: no usable map -------------------------------------------------------------------

VERBS = [["status"], ["models"], ["lookup", "ctr", "1"], ["diff"], ["dump"]]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v[0])
def test_no_map(shm_prefix: str, capsys: pytest.CaptureFixture[str], verb: list[str]) -> None:
    rc, out, err = run(capsys, shm_prefix, *verb)
    assert rc == 2
    assert f"no map was ever published under shm name '{shm_prefix}'" in out + err
    rc, doc = run_json(capsys, shm_prefix, *verb)
    assert rc == 2 and doc["status"] == "critical" and codes(doc) == {"no_map": "critical"}
    if verb[0] == "lookup":
        assert doc["outcome"] == "passthrough_no_map" and doc["trims"] is False
    assert not list(SHM.glob(f"{shm_prefix}.*"))  # read-only: nothing was created


def test_control_but_nothing_published(shm_prefix: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    pub = Publisher(shm_prefix)
    try:
        rc, doc = run_json(capsys, shm_prefix, "status")
        assert rc == 2 and codes(doc) == {"no_map": "critical"}
        assert "exists but no map was ever published" in doc["findings"][0]["message"]
    finally:
        pub.cleanup()


def _flip_blob_byte(prefix: str, gen: int) -> None:
    name = f"{prefix}.g{gen}"
    byte = (SHM / name).read_bytes()[100:101]
    patch_shm(name, 100, bytes([byte[0] ^ 0xFF]))


def _lying_slot(prefix: str, gen: int) -> None:
    ctl = (SHM / f"{prefix}.ctl").read_bytes()
    off = L.slot_offset(gen)
    record = L.decode_slot(ctl[off:off + L.SLOT_SIZE])
    assert record is not None
    patch_shm(f"{prefix}.ctl", off,
              L.encode_slot(record._replace(blob_checksum=record.blob_checksum ^ 1)))


def _lying_size(prefix: str, gen: int) -> None:
    ctl = (SHM / f"{prefix}.ctl").read_bytes()
    off = L.slot_offset(gen)
    record = L.decode_slot(ctl[off:off + L.SLOT_SIZE])
    assert record is not None
    patch_shm(f"{prefix}.ctl", off,
              L.encode_slot(record._replace(blob_size=record.blob_size + 8)))


@pytest.mark.parametrize("corrupt, text", [
    (_flip_blob_byte, "checksum mismatch"), (_lying_slot, "checksum mismatch"),
    (_lying_size, "control says"),
], ids=["flipped-blob-byte", "lying-checksum", "lying-size"])
def test_bad_checksum(daemon: DaemonProc, capsys: pytest.CaptureFixture[str], corrupt,
                      text: str) -> None:
    gen = stop_leaving_map(daemon)
    corrupt(daemon.prefix, gen)
    rc, out, err = run(capsys, daemon.prefix, "status", "--heartbeat-crit", "off")
    assert rc == 2 and out.startswith("CRITICAL - ") and text in out.splitlines()[0]
    rc, doc = run_json(capsys, daemon.prefix, "status")
    assert rc == 2 and codes(doc)["verify_failed"] == "critical" and doc["blob"] is None
    for verb in VERBS[1:]:
        rc, out, err = run(capsys, daemon.prefix, *verb)
        assert rc == 2 and out == "" and err.startswith("CRITICAL: ") and text in err


@pytest.mark.parametrize("where, data, text", [
    ("magic", b"NOTMAGIC", "bad control magic"),
    ("version", L.encode_active(0)[:4].replace(b"\0", b"\x09", 1), "unsupported control layout"),
    ("active-slot", b"\xff" * 8, "control slot unreadable"),
])
def test_control_unreadable(daemon: DaemonProc, capsys: pytest.CaptureFixture[str],
                            where: str, data: bytes, text: str) -> None:
    gen = stop_leaving_map(daemon)
    offset = {"magic": 0, "version": 8, "active-slot": L.slot_offset(gen)}[where]
    patch_shm(f"{daemon.prefix}.ctl", offset, data)
    rc, doc = run_json(capsys, daemon.prefix, "status")
    assert rc == 2 and codes(doc) == {"control_unreadable": "critical"}
    assert text in doc["findings"][0]["message"]
    rc, out, err = run(capsys, daemon.prefix, "models")
    assert rc == 2 and "CRITICAL: the control segment" in err and text in err


@pytest.mark.parametrize("corrupt", ["blob-byte", "control-magic"])
def test_restart_repairs_what_inspect_reports(daemon: DaemonProc, ctr10_bundles: dict[str, Path],
                                              tmp_path: Path, corrupt: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The runbook's remedy for a CRITICAL map: restart the daemon (docs/operations.md)."""
    gen = stop_leaving_map(daemon)
    if corrupt == "blob-byte":
        _flip_blob_byte(daemon.prefix, gen)
    else:
        patch_shm(f"{daemon.prefix}.ctl", 0, b"NOTMAGIC")
    assert run(capsys, daemon.prefix, "status")[0] == 2
    d2 = DaemonProc(daemon.prefix, ctr10_bundles, tmp_path / "d2.log")
    try:
        d2.wait_view(lambda v: v.model_count == 2 and v.daemon_pid == d2.proc.pid)
        rc, doc = run_json(capsys, daemon.prefix, "status")
        assert rc == 0, doc["findings"]
        assert doc["daemon"]["pid"] == d2.proc.pid
    finally:
        d2.close()


def test_blob_not_a_feature_map(shm_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    pub = Publisher(shm_prefix)
    try:
        pub.publish(b"definitely not a flatbuffer" * 4)
        pub.heartbeat()
        rc, doc = run_json(capsys, shm_prefix, "status")
        assert rc == 2 and codes(doc)["map_unreadable"] == "critical"
        assert "not a feature map" in doc["findings"][0]["message"]
    finally:
        pub.cleanup()


def test_liveness_still_fails_on_what_a_restart_fixes(daemon: DaemonProc,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    gen = stop_leaving_map(daemon)
    _flip_blob_byte(daemon.prefix, gen)
    rc, doc = run_json(capsys, daemon.prefix, "status", "--liveness", "--heartbeat-crit", "off")
    assert rc == 2 and codes(doc)["verify_failed"] == "critical"


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v[0])
def test_json_verbs_print_json_when_shared_memory_cannot_be_read(
        shm_prefix: str, capsys: pytest.CaptureFixture[str], verb: list[str]) -> None:
    """A control segment that cannot be opened (here a symlink loop planted at its path):
    CRITICAL, and with --json still one document on stdout, nothing on stderr."""
    ctl = SHM / f"{shm_prefix}.ctl"
    ctl.symlink_to(ctl)
    try:
        rc, out, err = run(capsys, shm_prefix, *verb, "--json")
        doc = json.loads(out)
        assert rc == doc["exit_code"] == 2 and err == ""
        assert codes(doc) == {"shm_unreadable": "critical"} and doc["status"] == "critical"
        assert "Too many levels of symbolic links" in doc["findings"][0]["message"]
        rc, out, err = run(capsys, shm_prefix, *verb)
        assert rc == 2 and out == "" and err.startswith("CRITICAL: cannot read shared memory")
    finally:
        ctl.unlink()


# -- read-only, console script, usage ------------------------------------------------------------

def test_console_script_is_read_only(daemon: DaemonProc) -> None:
    """The installed script, as a process: JSON out, exit code, and no byte of shm changed."""
    script = VENV_BIN / "trimmer-inspect"
    assert script.exists(), f"console script not installed: {script}"
    assert stop_leaving_map(daemon)  # freeze the segments so any change would be ours
    before = shm_files(daemon.prefix)
    env = {**os.environ, "FT_SHM_NAME": daemon.prefix}
    for verb in (["status", "--heartbeat-crit", "off"], ["models"], ["lookup", "ctr"],
                 ["diff", "--models"], ["dump"]):
        proc = subprocess.run([str(script), *verb, "--json"], env=env, capture_output=True,
                              text=True, timeout=60, cwd=ROOT)
        doc = json.loads(proc.stdout)
        assert proc.returncode == doc["exit_code"] in (0, 1), proc.stderr
        assert proc.stderr == ""
    assert shm_files(daemon.prefix) == before


def test_never_imports_the_publisher(daemon: DaemonProc) -> None:
    code = ("import sys; from root_worker.oncall.cli import main; "
            f"rc = main(['--shm-name', {daemon.prefix!r}, 'dump']); "
            "assert 'trimmer_daemon.publisher' not in sys.modules, 'publisher imported'; "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def _without_privileges() -> list[str]:
    """A command prefix that runs a program with no capabilities at all (as root: through
    setpriv, so even root cannot override file modes; as another user: nothing to drop)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop capabilities")
    return [setpriv, "--bounding-set", "-all", "--inh-caps", "-all", "--"]


def test_works_without_write_access(daemon: DaemonProc) -> None:
    """Segments made read-only (0400) and every capability dropped: every verb still works,
    so inspect never asks for write access."""
    drop = _without_privileges()
    stop_leaving_map(daemon)
    for path in SHM.glob(f"{daemon.prefix}.*"):
        path.chmod(0o400)
    for verb in (["status", "--heartbeat-crit", "off"], ["models"], ["lookup", "ctr"],
                 ["diff"], ["dump"]):
        proc = subprocess.run(
            [*drop, sys.executable, "-m", "root_worker.oncall.cli", "--shm-name",
             daemon.prefix, *verb, "--json"], capture_output=True, text=True, timeout=60,
            cwd=ROOT)
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["generation"] == daemon.live.generation
    # sanity: so restricted, a write to those segments is really refused
    proc = subprocess.run(
        [*drop, sys.executable, "-c", f"open('/dev/shm/{daemon.prefix}.ctl', 'r+b')"],
        capture_output=True, timeout=60)
    assert proc.returncode != 0 and b"PermissionError" in proc.stderr


def test_env_and_usage(daemon: DaemonProc, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FT_SHM_NAME", daemon.prefix)
    assert main(["status"]) == 0 and capsys.readouterr().out.startswith("OK - ")
    assert main(["--json", "models"]) == 0 and json.loads(capsys.readouterr().out)["models"]
    assert main(["status", "--heartbeat-warn", "soon"]) == 3
    assert "invalid duration 'soon'" in capsys.readouterr().err
    assert main(["--shm-name", "no/slash", "status"]) == 3
    assert "invalid shm prefix" in capsys.readouterr().err
    assert main([]) == 3
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for line in ("0  OK", "1  WARNING", "2  CRITICAL", "3  UNKNOWN", "--heartbeat-crit"):
        assert line in out


# -- text helpers ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("5s", 5.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("1d", 86400.0),
    ("30", 30.0), ("0.25", 0.25), (".5s", 0.5), ("off", 0.0), ("0", 0.0), (" 5 s ", 5.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert fmt.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "5x", "-1s", "1e3", "5 s s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        fmt.parse_duration(text)


def test_format_helpers() -> None:
    assert [fmt.format_duration(s) for s in (0.42, 12.9, 192, 18120, 273600, None)] == [
        "0.4s", "12s", "3m12s", "5h02m", "3d04h", "?"]
    assert fmt.iso_utc(0) == "-" and fmt.iso_utc(1_700_000_000_123_456_789) == \
        "2023-11-14T22:13:20.123Z"
    assert fmt.table(["A", "LONG"], [("xyz", 1), (None, True)]) == \
        "A    LONG\nxyz  1\n-    yes"
