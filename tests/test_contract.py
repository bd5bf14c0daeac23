"""The root's half of the contract as a library (root_worker/contract.py).

An asyncio root built on it (examples/asyncio_root.py) answers the same per-target scores as
the gunicorn pool for the same frames -- a real daemon-published map, real trimmer-leaf
processes, one of them on another version (the 409 re-send) -- and the library never
attaches a map generation where an event loop would wait for it.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import shm_leftovers
from daemon_helpers import ROOT, DaemonProc, remove_segments, run_threads, wait_for, write_bundle
from root_helpers import LeafProc, Proc, RootProc, Workload, reference_scores, write_routing

from root_worker.contract import Contract, Routing, Target
from root_worker.featuremap.live_map import LiveMap
from root_worker.service.settings import load_settings
from root_worker.testing.client import Client
from root_worker.testing.workload import make_frame


class AsyncRootProc(Proc):
    """examples/asyncio_root.py on a free port."""

    def __init__(self, tmp: Path, prefix: str, routing: Path) -> None:
        self.address_file = tmp / "asyncio-root.address"
        cmd = [sys.executable, str(ROOT / "examples" / "asyncio_root.py"), "--shm-name",
               prefix, "--routing", str(routing), "--bind", "127.0.0.1:0",
               "--address-file", str(self.address_file)]
        super().__init__(cmd, tmp / "asyncio-root.log")

    def wait_ready(self, timeout: float = 20.0) -> str:
        def ready() -> bool:
            self.check_alive("asyncio root")
            return self.address_file.exists()
        wait_for(ready, timeout, "the asyncio root to listen")
        return self.address_file.read_text().strip()


@contextmanager
def ads_daemon(tmp_path: Path) -> Iterator[tuple[Workload, str, Path, DaemonProc, LiveMap]]:
    """A real daemon publishing the workload's ads bundle under a unique prefix, and a
    LiveMap on it; everything removed (and checked gone) at the end."""
    wl = Workload()
    prefix = f"fttest_{uuid.uuid4().hex[:12]}"
    ads = tmp_path / "ads" / "module_info.json"
    write_bundle(ads, wl.ads_doc())
    daemon = DaemonProc(prefix, {"ads": ads}, tmp_path / "daemon.log")
    live = LiveMap(prefix)
    try:
        yield wl, prefix, ads, daemon, live
    finally:
        live.close()
        daemon.close()
        remove_segments(prefix)
        assert not shm_leftovers(prefix)


def _by_model(doc: dict[str, Any]) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(t["model"], t["requested_version"]): t for t in doc["targets"]}


def test_asyncio_root_answers_as_the_gunicorn_pool(tmp_path: Path) -> None:
    wl = Workload()
    names = [f.name for f in wl.universe]
    old, new = names[:60], names[40:120]  # skew: the leaf serves v1, the map's latest is v2
    prefix = f"fttest_{uuid.uuid4().hex[:12]}"
    ads = tmp_path / "ads" / "module_info.json"
    skew = tmp_path / "skew" / "module_info.json"
    write_bundle(ads, wl.ads_doc())
    write_bundle(skew, {"skew": [{"version": "1", "input_names": old},
                                 {"version": "2", "input_names": new}]})
    sig = tmp_path / "v1.json"
    sig.write_text(json.dumps({"input_names": old}))
    leaves = {"ads_ctr": LeafProc(["--bundle", str(ads), "--model", "ads_ctr"], tmp_path,
                                  "l-ctr"),
              "ads_cvr": LeafProc(["--bundle", str(ads), "--model", "ads_cvr"], tmp_path,
                                  "l-cvr"),
              "skew": LeafProc(["--signature", f"skew@1={sig}"], tmp_path, "l-skew")}
    daemon = DaemonProc(prefix, {"ads": ads, "skew": skew}, tmp_path / "daemon.log")
    pool = aroot = None
    try:
        for leaf in leaves.values():
            leaf.wait_ready()
        routing = write_routing(tmp_path / "routing.json",
                                {m: [leaf.url] for m, leaf in leaves.items()})
        daemon.wait_view(lambda v: v.resolve("skew").version == "2" and
                         v.resolve("ads_ctr").allowlist is not None)
        pool = RootProc(tmp_path, {"FT_SHM_NAME": prefix, "FT_ROUTING": str(routing)},
                        "root").wait_ready()
        aroot = AsyncRootProc(tmp_path, prefix, routing)
        url = aroot.wait_ready()
        targets = ["ads_ctr", ("ads_cvr", "1"), "skew"]
        with Client(url) as ac:
            pc = pool.client()
            for seed in range(3):
                frame = make_frame(wl.universe, 8 + seed, seed=seed)
                a_status, a_doc = ac.score(frame, targets)
                p_status, p_doc = pc.score(frame, targets)
                assert a_status == p_status == 200, (a_doc, p_doc)
                assert a_doc["generation"] == p_doc["generation"] > 0
                mine, theirs = _by_model(a_doc), _by_model(p_doc)
                assert mine.keys() == theirs.keys()
                for key, t in mine.items():
                    assert t["status"] == "ok", t
                    assert t["scores"] == theirs[key]["scores"], key
                    for field in ("version", "outcome", "bytes_trimmed", "leaf_version"):
                        assert t[field] == theirs[key][field], (key, field)
                assert mine[("ads_ctr", None)]["scores"] == reference_scores(
                    frame, "ads_ctr", "1", wl.features("ads_ctr"))
                assert mine[("ads_ctr", None)]["bytes_sent"] < len(frame)  # trimmed
                s = mine[("skew", None)]
                assert s["scores"] == reference_scores(frame, "skew", "1", old)
                if seed == 0:  # the 409 re-send teaches v1; then trimmed for v1
                    assert s["fallback"] == "version_skew_resent_untrimmed", s
                    assert s["bytes_sent"] == len(frame)
                else:
                    assert "fallback" not in s and s["leaf_choice"] == "learned", s
                    assert s["bytes_sent"] < len(frame)
            # a client's mistake is the root's 4xx, with the same JSON error
            a_status, a_doc = ac.score(b"not a frame", ["ads_ctr"])
            p_status, p_doc = pc.score(b"not a frame", ["ads_ctr"])
            assert a_status == p_status == 400
            assert a_doc["error"]["code"] == p_doc["error"]["code"] == "bad_frame"
            status, _, text = ac.request("GET", "/metrics")
            assert status == 200
            assert b'feature_trimmer_root_skew_resends_total{model="skew"} 1.0' in text
    finally:
        for proc in (aroot, pool, *leaves.values()):
            if proc is not None:
                proc.stop()
        daemon.close()
        remove_segments(prefix)
        assert not shm_leftovers(prefix)


def test_a_new_generation_is_attached_off_the_event_loop(tmp_path: Path) -> None:
    """prepare(attach=False) serves the generation already attached while a newer one
    waits (plan.map_stale), and never attaches it; refresh() does."""
    with ads_daemon(tmp_path) as (wl, prefix, ads, daemon, live):
        first = daemon.wait_view(lambda v: v.generation > 0).generation
        contract = Contract(load_settings({}, shm_name=prefix), live, Routing.empty())
        frame = make_frame(wl.universe, 4, seed=1)
        plan = contract.prepare(frame, [Target("ads_ctr")], attach=False)
        contract.finish(plan)
        assert plan.map_stale and plan.generation == 0  # nothing attached on the loop
        assert contract.refresh() is not None and live.generation == first
        plan = contract.prepare(frame, [Target("ads_ctr")], attach=False)
        contract.finish(plan)
        assert not plan.map_stale and plan.generation == first
        assert plan.targets[0].outcome == "trimmed"
        write_bundle(ads, {**wl.ads_doc(), "ads_new": [{"version": "1",
                                                         "input_names": ["a"]}]})
        def published() -> bool:
            control = live.reader.control()
            return control is not None and control.generation > first
        wait_for(published, 20, "the daemon to publish")
        plan = contract.prepare(frame, [Target("ads_ctr")], attach=False)
        contract.finish(plan)
        assert plan.map_stale and plan.generation == first  # the old one, not waited for
        contract.refresh()
        assert live.generation > first


def test_threads_share_one_contract_with_lz4_and_the_pool_comes_back(tmp_path: Path) -> None:
    """4 threads, one Contract in mode trim with lz4 (pooled contiguous outputs): every
    body is its own frame trimmed then compressed, a 409 to a trimmed frame gives the whole
    frame compressed, and every pooled buffer is back once each plan finished."""

    import lz4.frame

    from root_worker.frame import Trimmer

    with ads_daemon(tmp_path) as (wl, prefix, _ads, daemon, live):
        daemon.wait_view(lambda v: v.resolve("ads_ctr").allowlist is not None)
        contract = Contract(load_settings({}, shm_name=prefix, lz4=True), live,
                            Routing.from_doc({"*": "http://127.0.0.1:9"}))
        allowlist = live.resolve("ads_ctr", "1").allowlist
        errors: list[str] = []

        def worker(t: int) -> None:
            for k in range(60):
                frame = make_frame(wl.universe, 1 + (t * 7 + k) % 16, seed=t * 1000 + k)
                plan = contract.prepare(frame, [Target("ads_ctr", "1")])
                try:
                    req = contract.request(plan, 0)
                    assert req is not None and req.trimmed
                    want = Trimmer().trim(frame, allowlist).data
                    if lz4.frame.decompress(b"".join(req.parts)) != bytes(want) or \
                            req.headers.get("Content-Encoding") != "lz4" or \
                            req.headers.get("X-FT-Trimmed-For") != "1":
                        errors.append(f"{t}/{k}: not its own trimmed frame")
                    again = contract.answer(plan, 0, "http://127.0.0.1:9", 409,
                                            b'{"error": "skew", "version": "0"}')
                    if again is None or again.trimmed or \
                            lz4.frame.decompress(b"".join(again.parts)) != frame:
                        errors.append(f"{t}/{k}: the re-send is not the whole frame")
                    contract.answer(plan, 0, "http://127.0.0.1:9", 200, b'{"scores": []}')
                finally:
                    status, doc = contract.finish(plan)
                if doc["targets"][0].get("fallback") != "version_skew_resent_untrimmed":
                    errors.append(f"{t}/{k}: {doc['targets'][0]}")

        run_threads(worker, 4)
        assert not errors, errors[:5]
        assert contract.buffers.in_use == 0
