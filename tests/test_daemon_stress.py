"""Daemon stress: continuous publication vs. reader processes, and kill -9 at any moment."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import ROOT, DaemonProc, remove_segments, replace_bundle, wait_for
from stress_reader import stress_doc

STRESS_GENERATIONS = int(os.environ.get("FT_STRESS_GENERATIONS", "2000"))
KILL_ROUNDS = int(os.environ.get("FT_KILL_ROUNDS", "20"))
FAST = ["--debounce-ms", "0.2", "--max-delay-ms", "2"]


def _newer(d: DaemonProc, gen: int) -> int:
    snap = d.live.reader.poll()
    assert d.proc.poll() is None, d.log()
    return snap.generation if snap is not None and snap.generation > gen else 0


class Readers:
    def __init__(self, prefix: str, tmp: Path, n: int = 2) -> None:
        self.stop_file = tmp / "stop-readers"
        self.procs = [subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "stress_reader.py"), prefix,
             str(self.stop_file)], stdout=subprocess.PIPE, text=True, start_new_session=True)
            for _ in range(n)]

    def wait_ready(self) -> None:
        for p in self.procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"

    def finish(self) -> list[dict]:
        self.stop_file.touch()
        results = []
        for p in self.procs:
            out, _ = p.communicate(timeout=60)
            assert p.stdout is not None
            p.stdout.close()
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()


@pytest.mark.slow
def test_readers_never_see_a_torn_generation(shm_prefix: str, tmp_path: Path) -> None:
    bundle = tmp_path / "b" / "module_info.json"
    replace_bundle(bundle, stress_doc(0))
    with DaemonProc(shm_prefix, {"b": bundle}, tmp_path / "d.log",
                    extra=FAST + ["--grace-seconds", "0.05"]) as d:
        readers = None
        try:
            first = d.wait_view(lambda v: v.resolve("m").version == "0").generation
            readers = Readers(shm_prefix, tmp_path)
            readers.wait_ready()
            k, gen, target = 0, first, first + STRESS_GENERATIONS
            while gen < target:  # one rename per generation, as fast as the daemon publishes
                k += 1
                replace_bundle(bundle, stress_doc(k))
                gen = wait_for(lambda g=gen: _newer(d, g), timeout=15,
                               what=f"a generation after {gen} (daemon log: {d.log_path})")
            results = readers.finish()
            readers = None
        finally:
            if readers is not None:
                readers.kill()
    for r in results:
        assert r["n_errors"] == 0, r["errors"]
        assert r["verify_failures"] == 0 and r["map_errors"] == 0
        assert r["order_violations"] == 0, r["errors"]
        assert r["generations"] >= 50, r  # the readers really raced many generations
        assert r["max_generation"] >= target - 1


@pytest.mark.slow
def test_kill_9_at_any_moment_never_tears_the_map(shm_prefix: str, tmp_path: Path) -> None:
    bundle = tmp_path / "b" / "module_info.json"
    replace_bundle(bundle, stress_doc(0))
    rng = random.Random(1234)
    readers = Readers(shm_prefix, tmp_path)
    last_generation, k = 0, 0
    try:
        for round_no in range(KILL_ROUNDS):
            d = DaemonProc(shm_prefix, {"b": bundle}, tmp_path / f"d{round_no}.log",
                           extra=FAST)
            try:  # close() alone: the segments stay for the next round's daemon
                view = d.wait_view(lambda v, d=d: v.daemon_pid == d.proc.pid,
                                   what=f"round {round_no}: the restarted daemon's map")
                assert view.generation > last_generation, "sequence must continue"
                if round_no == 0:
                    readers.wait_ready()
                # keep it publishing, and kill it at a random point of that
                goal = view.generation + rng.randint(1, 6)
                while (d.live.reader.poll().generation < goal  # type: ignore[union-attr]
                       and d.proc.poll() is None):
                    k += 1
                    replace_bundle(bundle, stress_doc(k))
                for _ in range(rng.randint(0, 3)):
                    k += 1
                    replace_bundle(bundle, stress_doc(k))
                d.kill()
                last_generation = wait_for(lambda d=d: d.live.reader.poll(),
                                           what="a map after kill -9").generation
            finally:
                d.close()
        results = readers.finish()
    finally:
        readers.kill()
        remove_segments(shm_prefix)
    for r in results:  # no reader ever used an inconsistent generation
        assert r["n_errors"] == 0, r["errors"]
        assert r["verify_failures"] == 0 and r["map_errors"] == 0
        assert r["order_violations"] == 0, r["errors"]
        assert r["generations"] >= KILL_ROUNDS
