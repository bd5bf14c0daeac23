"""trimmer-daemon end to end: real subprocess, real inotify, real POSIX shm."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import (
    F1,
    F2,
    F3,
    ROOT,
    DaemonProc,
    bundle_state,
    features_of,
    free_port,
    model_doc,
    replace_bundle,
    wait_for,
    write_bundle,
)


@pytest.fixture
def daemon(shm_prefix: str, bundles: dict[str, Path], tmp_path: Path) -> Iterator[DaemonProc]:
    with DaemonProc(shm_prefix, bundles, tmp_path / "daemon.log") as d:
        yield d


def has(model: str, version: str, features: list[str]):
    return lambda v: (v.resolve(model, version).version == version
                      and features_of(v, model, version) == sorted(features))


def test_publishes_every_bundle_with_status(daemon: DaemonProc) -> None:
    view = daemon.wait_view(lambda v: v.model_count == 2)
    assert features_of(view, "ctr") == F1 and features_of(view, "rank") == F3
    for name in ("ads", "feed"):
        st = bundle_state(view, name)
        assert st["state"] == "ok" and len(st["sha256"]) == 64 and st["loaded_at_ns"] > 0
        assert st["error"] == ""
    assert view.daemon_pid == daemon.proc.pid


def _cp(path: Path, doc: dict, tmp: Path) -> None:
    src = tmp / "src.json"
    write_bundle(src, doc)
    subprocess.run(["cp", str(src), str(path)], check=True)


def _mv(path: Path, doc: dict, tmp: Path) -> None:
    src = tmp / "staged.json"
    write_bundle(src, doc)
    subprocess.run(["mv", str(src), str(path)], check=True)


def _delete_recreate(path: Path, doc: dict, tmp: Path) -> None:
    path.unlink()
    write_bundle(path, doc)


def _sed_i(path: Path, doc: dict, tmp: Path) -> None:
    # turn version "1" with F1 into version "2" with F2 via sed -i (temp file + rename)
    subprocess.run(["sed", "-i", 's/"1"/"2"/; s/"b"\\]/"c", "d"]/', str(path)], check=True)


@pytest.mark.parametrize("replace", [_cp, _mv, _delete_recreate, _sed_i],
                         ids=["cp-in-place", "mv-rename", "delete-recreate", "sed-i"])
def test_each_replacement_style_is_published(daemon: DaemonProc, bundles: dict[str, Path],
                                             tmp_path: Path, replace) -> None:
    first = daemon.wait_view(has("ctr", "1", F1))
    replace(bundles["ads"], model_doc("ctr", "2", F2), tmp_path)
    view = daemon.wait_view(has("ctr", "2", F2), what="the replaced bundle")
    assert view.generation > first.generation
    assert bundle_state(view, "ads")["state"] == "ok"
    assert features_of(view, "rank") == F3  # the other bundle is untouched


def test_configmap_symlink_swap(shm_prefix: str, tmp_path: Path) -> None:
    cm = tmp_path / "configmap"
    (cm / "..v1").mkdir(parents=True)
    write_bundle(cm / "..v1" / "module_info.json", model_doc("ctr", "1", F1))
    os.symlink("..v1", cm / "..data")
    os.symlink("..data/module_info.json", cm / "module_info.json")
    with DaemonProc(shm_prefix, {"cm": cm / "module_info.json"}, tmp_path / "d.log") as d:
        d.wait_view(has("ctr", "1", F1))
        (cm / "..v2").mkdir()
        write_bundle(cm / "..v2" / "module_info.json", model_doc("ctr", "2", F2))
        os.symlink("..v2", cm / "..data_tmp")
        os.rename(cm / "..data_tmp", cm / "..data")  # kubelet's atomic swap
        shutil.rmtree(cm / "..v1")
        view = d.wait_view(has("ctr", "2", F2), what="the ConfigMap swap")
        assert bundle_state(view, "cm")["state"] == "ok"


def test_slowly_written_file_is_never_published_half_written(
        daemon: DaemonProc, bundles: dict[str, Path]) -> None:
    daemon.wait_view(has("ctr", "1", F1))
    text = '{"ctr": [{"version": "2", "input_names": ["a", "c", "d"]}]}'
    with open(bundles["ads"], "w") as f:
        f.write(text[:25])
        f.flush()
        os.fsync(f.fileno())
        # The daemon sees the half file, keeps the last-known-good map and says why.
        stale = daemon.wait_view(lambda v: bundle_state(v, "ads")["state"] == "stale",
                                 what="the half-written file to be reported")
        assert features_of(stale, "ctr", "1") == F1
        assert stale.resolve("ctr").version == "1"
        assert str(bundles["ads"]) in bundle_state(stale, "ads")["error"]
        f.write(text[25:])
    view = daemon.wait_view(has("ctr", "2", F2), what="the completed file")
    st = bundle_state(view, "ads")
    assert st["state"] == "ok" and st["error"] == ""


def test_corrupt_bundle_keeps_last_known_good_and_others_update(
        daemon: DaemonProc, bundles: dict[str, Path]) -> None:
    daemon.wait_view(lambda v: v.model_count == 2)
    replace_bundle(bundles["ads"], {"ctr": [{"version": "2", "input_names": []}]})
    view = daemon.wait_view(lambda v: bundle_state(v, "ads")["state"] == "stale")
    err = bundle_state(view, "ads")["error"]
    assert str(bundles["ads"]) in err and "input_names" in err
    assert features_of(view, "ctr") == F1  # last-known-good still served
    replace_bundle(bundles["feed"], model_doc("rank", "2", F2))
    view = daemon.wait_view(has("rank", "2", F2), what="the healthy bundle to update")
    assert bundle_state(view, "ads")["state"] == "stale" and features_of(view, "ctr") == F1
    replace_bundle(bundles["ads"], model_doc("ctr", "3", F2))
    view = daemon.wait_view(has("ctr", "3", F2), what="the fixed bundle")
    assert bundle_state(view, "ads") | {"error": ""} == bundle_state(view, "ads")
    assert bundle_state(view, "ads")["state"] == "ok"


def test_reverting_a_bad_write_makes_status_ok_again(
        daemon: DaemonProc, bundles: dict[str, Path]) -> None:
    daemon.wait_view(has("ctr", "1", F1))
    good = bundles["ads"].read_bytes()
    bundles["ads"].write_text("{ not json")
    daemon.wait_view(lambda v: bundle_state(v, "ads")["state"] == "stale")
    bundles["ads"].write_bytes(good)  # same content as loaded: no reload, but status now ok
    view = daemon.wait_view(lambda v: bundle_state(v, "ads")["state"] == "ok",
                            what="status to follow the file back to ok")
    assert bundle_state(view, "ads")["error"] == "" and features_of(view, "ctr") == F1


def test_deleted_bundle_is_missing_but_still_served(
        daemon: DaemonProc, bundles: dict[str, Path]) -> None:
    daemon.wait_view(has("ctr", "1", F1))
    bundles["ads"].unlink()
    view = daemon.wait_view(lambda v: bundle_state(v, "ads")["state"] == "missing")
    assert features_of(view, "ctr") == F1
    assert "file not found" in bundle_state(view, "ads")["error"]


def test_broken_bundle_at_start_logs_critical_and_publishes_the_rest(
        shm_prefix: str, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad" / "module_info.json"
    write_bundle(good, model_doc("ctr", "1", F1))
    bad.parent.mkdir()
    bad.write_bytes(b'{"m": [{"version": 1.5, "input_names": ["a"]}]}')
    with DaemonProc(shm_prefix, {"good": good, "bad": bad}, tmp_path / "d.log") as d:
        view = d.wait_view(lambda v: v.model_count == 1)
        assert features_of(view, "ctr") == F1
        st = bundle_state(view, "bad")
        assert st["state"] == "never_loaded" and "version" in st["error"]
        wait_for(lambda: "CRITICAL" in d.log(), what="a CRITICAL log line")
        assert any("CRITICAL" in line and "bad" in line for line in d.log().splitlines())


def test_second_instance_is_refused(daemon: DaemonProc, shm_prefix: str,
                                    bundles: dict[str, Path]) -> None:
    daemon.wait_view(lambda v: v.model_count == 2)
    second = subprocess.run(
        [sys.executable, "-m", "trimmer_daemon.cli", "--shm-name", shm_prefix,
         "--metrics-listen", "", "--bundle", f"ads={bundles['ads']}"],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert second.returncode == 3
    assert shm_prefix in second.stderr and str(daemon.proc.pid) in second.stderr
    assert daemon.proc.poll() is None  # the first one is unharmed


def test_sighup_adds_and_removes_bundles(shm_prefix: str, tmp_path: Path,
                                         bundles: dict[str, Path]) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text(f'[bundles]\nads = "{bundles["ads"]}"\n')
    with DaemonProc(shm_prefix, {}, tmp_path / "d.log", config=config) as d:
        d.wait_view(lambda v: v.model_count == 1 and features_of(v, "ctr") == F1)
        config.write_text(f'[bundles]\nfeed = "{bundles["feed"]}"\n')
        d.signal(signal.SIGHUP)
        view = d.wait_view(lambda v: [b["name"] for b in v.bundles()] == ["feed"],
                           what="the reloaded configuration")
        assert features_of(view, "rank") == F3
        assert view.resolve("ctr").allowlist is None  # removed with its bundle
        # the new bundle is watched
        replace_bundle(bundles["feed"], model_doc("rank", "2", F2))
        d.wait_view(has("rank", "2", F2))


def test_sigterm_leaves_the_map_and_restart_continues_the_sequence(
        shm_prefix: str, bundles: dict[str, Path], tmp_path: Path) -> None:
    d = DaemonProc(shm_prefix, bundles, tmp_path / "d1.log")
    try:  # close() alone: the segments stay for the restarted daemon
        view = d.wait_view(lambda v: v.model_count == 2)
        last = view.generation
        assert d.stop() == 0
        assert "stays in place" in d.log()
        # a fresh reader (a worker started later) still gets the whole map
        from root_worker.featuremap.live_map import LiveMap
        fresh = LiveMap(shm_prefix)
        kept = fresh.current()
        assert kept is not None and kept.generation == last
        assert features_of(kept, "ctr") == F1
        fresh.close()
    finally:
        d.close()
    with DaemonProc(shm_prefix, bundles, tmp_path / "d2.log") as d2:
        view = d2.wait_view(lambda v: v.daemon_pid == d2.proc.pid)
        assert view.generation > last


def test_cleanup_flag_removes_every_segment(shm_prefix: str, bundles: dict[str, Path],
                                            tmp_path: Path) -> None:
    from conftest import shm_leftovers
    d = DaemonProc(shm_prefix, bundles, tmp_path / "d.log", extra=["--cleanup"])
    try:  # close() alone: the daemon's own --cleanup must have removed every segment
        d.wait_view(lambda v: v.model_count == 2)
        assert shm_leftovers(shm_prefix)
        d.live.close()
        assert d.stop() == 0
        assert shm_leftovers(shm_prefix) == []
    finally:
        d.close()


def test_bad_configuration_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trimmer_daemon.cli", "--bundle", "no-equals-sign"],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "expected NAME=PATH" in result.stderr


def test_help_explains_every_option() -> None:
    result = subprocess.run([sys.executable, "-m", "trimmer_daemon.cli", "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for flag in ("--bundle", "--config", "--shm-name", "--grace-seconds", "--debounce-ms",
                 "--max-file-bytes", "--metrics-listen", "--cleanup", "SIGHUP"):
        assert flag in result.stdout


def test_metrics_endpoint_reports_generation_and_bundle_states(
        shm_prefix: str, bundles: dict[str, Path], tmp_path: Path) -> None:
    import urllib.request
    port = free_port()
    bundles["ads"].write_text("{ broken")
    with DaemonProc(shm_prefix, bundles, tmp_path / "d.log",
                    extra=["--metrics-listen", f"127.0.0.1:{port}"]) as d:
        view = d.wait_view(lambda v: v.model_count == 1)

        def scrape() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                return ""
        text = wait_for(lambda: (t := scrape()) and "heartbeat_timestamp" in t and t,
                        what="the metrics endpoint")
        assert f"feature_trimmer_daemon_generation {float(view.generation)}" in text
        assert 'feature_trimmer_daemon_bundle_state{bundle="ads",state="never_loaded"} 1.0' in text
        assert 'feature_trimmer_daemon_bundle_state{bundle="feed",state="ok"} 1.0' in text
        assert 'feature_trimmer_daemon_bundle_failures_total{bundle="ads"} 1.0' in text
        assert "feature_trimmer_daemon_publish_total" in text


def test_systemd_notify_ready_status_and_watchdog(
        shm_prefix: str, bundles: dict[str, Path], tmp_path: Path) -> None:
    import socket
    sock_path = tmp_path / "notify.sock"
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(10)
        with DaemonProc(shm_prefix, bundles, tmp_path / "d.log", env=env) as d:
            messages: list[str] = []
            while not ("READY=1" in "\n".join(messages) and "WATCHDOG=1" in messages):
                messages.append(sock.recv(4096).decode())  # times out (fails) after 10 s
            ready = next(m for m in messages if "READY=1" in m)
            view = d.wait_view(lambda v: v.model_count == 2)
            assert f"STATUS=generation {view.generation}, 2 bundles, 0 not ok" in ready
            d.signal(signal.SIGHUP)
            while "RELOADING=1" not in messages:
                messages.append(sock.recv(4096).decode())
            assert d.stop() == 0
            while "STOPPING=1" not in messages:
                messages.append(sock.recv(4096).decode())


def test_a_fifo_at_the_bundle_path_never_blocks_the_daemon(
        shm_prefix: str, bundles: dict[str, Path], tmp_path: Path) -> None:
    bundles["ads"].unlink()
    os.mkfifo(bundles["ads"])  # nobody writes: a blocking open/read would hang the loop
    with DaemonProc(shm_prefix, bundles, tmp_path / "d.log") as d:
        view = d.wait_view(lambda v: v.model_count == 1)
        st = bundle_state(view, "ads")
        assert st["state"] == "never_loaded" and "not a regular file" in st["error"]
        replace_bundle(bundles["feed"], model_doc("rank", "2", F2))
        d.wait_view(has("rank", "2", F2), what="the other bundle to keep updating")
