"""The reference leaf: deterministic scores that depend on every required feature and never
on trimming; its HTTP server (lz4, errors, stats, keep-alive); its model store; its CLI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import lz4.frame
import numpy as np
import pytest
from daemon_helpers import replace_bundle, wait_for, write_bundle
from root_helpers import LeafThread, Workload, raw_post

from flatbuffers_schema.keys import Allowlist
from root_worker.frame import Ragged, Trimmer, decode, encode
from root_worker.leaf.model import LeafModel, ModelStore, feature_weight
from root_worker.leaf.server import main as leaf_main
from root_worker.testing.client import Client
from root_worker.testing.workload import FeatureSpec, make_columns, make_frame

ROOT = Path(__file__).resolve().parent.parent
SPECS = [FeatureSpec("f32", "<f4"), FeatureSpec("f16v", "<f2", (3,)),
         FeatureSpec("i64", "<i8"), FeatureSpec("u8m", "<u1", (2, 2)),
         FeatureSpec("flag", "?"), FeatureSpec("ids", "<i8", (), True),
         FeatureSpec("vecs", "<f4", (2,), True), FeatureSpec("unused", "<f8")]


def _scores(frame: bytes, names: list[str], model: str = "m") -> list[float]:
    return LeafModel.build(model, "1", names).score(decode(frame))[0]


def test_scores_are_identical_trimmed_or_not_for_every_example_model() -> None:
    wl = Workload(400)
    frame = make_frame(wl.universe, 16, seed=5)
    trimmer = Trimmer()
    for model, names in wl.models.items():
        trimmed = trimmer.trim(frame, Allowlist.from_names(names)).data
        assert len(trimmed) < len(frame)
        full = _scores(frame, names, model)
        assert _scores(bytes(trimmed), names, model) == full
        assert len(set(full)) > 1  # candidates get different scores


def test_every_required_feature_moves_the_score_and_others_do_not() -> None:
    cols = make_columns(SPECS, 4, seed=2)
    names = [s.name for s in SPECS if s.name != "unused"]
    base = _scores(encode(cols), names)
    for name in [*names, "unused"]:
        changed = dict(cols)
        col = cols[name]
        owner = 0  # the candidate whose value is changed
        if isinstance(col, Ragged):
            owner = int(np.searchsorted(col.offsets, 0, side="right")) - 1
            values = col.values.copy()
            values[0] = values[0] + 1 if values.dtype.kind != "f" else values[0] + 0.5
            changed[name] = Ragged(values, col.offsets)
        else:
            arr = col.copy()
            arr[0] = ~arr[0] if arr.dtype == bool else arr[0] + (1 if arr.dtype.kind in "iu"
                                                                  else 0.5)
            changed[name] = arr
        moved = _scores(encode(changed), names)
        if name == "unused":
            assert moved == base
        else:
            others = [i for i in range(len(base)) if i != owner]
            assert moved[owner] != base[owner], name
            assert [moved[i] for i in others] == [base[i] for i in others], name
    # a list's length counts too, even with the same values
    ids = cols["ids"]
    longer = Ragged(np.concatenate([ids.values[:1], ids.values]),
                    np.concatenate([[0], ids.offsets[1:] + 1]))
    assert _scores(encode({**cols, "ids": longer}), names)[0] != base[0]


def test_missing_features_are_reported_and_contribute_nothing() -> None:
    cols = make_columns(SPECS, 3, seed=4)
    present = [s.name for s in SPECS[:3]]
    scores, missing = LeafModel.build("m", "1", [*present, "ghost"]).score(
        decode(encode(cols)))
    assert missing == ["ghost"] and scores == _scores(encode(cols), present)
    empty, missing = LeafModel.build("m", "1", ["ghost"]).score(decode(encode(cols)))
    assert empty == [0.0, 0.0, 0.0] and missing == ["ghost"]
    assert LeafModel.build("m", "1", ["f32", "ids"]).score(
        decode(make_frame(SPECS, 0)))[0] == []


def test_a_model_scores_each_frame_layout_as_a_fresh_model_would() -> None:
    """The per-layout plan a model caches never leaks into a frame of another layout, even
    one with the same column names but other dtypes, shapes or ragged-ness."""
    names = [s.name for s in SPECS if s.name != "unused"]
    model = LeafModel.build("m", "1", [*names, "ghost"])
    variants = [SPECS, [FeatureSpec("f32", "<i4"), *SPECS[1:]],          # float -> int
                [SPECS[0], FeatureSpec("f16v", "<f2", (4,)), *SPECS[2:]],  # other width
                [SPECS[0], FeatureSpec("f16v", "<f2", (2, 2)), *SPECS[2:]],  # same width
                [*SPECS[:2], FeatureSpec("i64", "<i8", (), True), *SPECS[3:]],  # ragged
                [*SPECS[:5], FeatureSpec("ids", "<i8"), *SPECS[6:]],     # dense
                [s for s in SPECS if s.name != "flag"]]                  # one missing
    for rnd in range(2):  # the second round uses the cached plans
        for i, specs in enumerate(variants):
            for n in (0, 1, 6):
                frame = decode(make_frame(specs, n, seed=i))
                fresh = LeafModel.build("m", "1", [*names, "ghost"]).score(frame)
                assert model.score(frame) == fresh, (rnd, i, n)
                assert fresh[1] == [s for s in [*names, "ghost"]
                                    if s not in {x.name for x in specs}]


def test_weights_are_stable_and_model_specific() -> None:
    w = feature_weight("m", "f")
    assert -1.0 <= w < 1.0 and w == feature_weight("m", "f")
    assert w != feature_weight("n", "f")
    out = subprocess.run([sys.executable, "-c",
                          "from root_worker.leaf.model import feature_weight as f;"
                          "print(repr(f('m', 'f')))"], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert float(out.stdout) == w  # no per-process hash salt


@pytest.fixture
def leaf() -> LeafThread:
    store = ModelStore.from_inputs({"m": {"1": ["f32", "ids"], "10": ["f32"], "9": ["i64"]}})
    srv = LeafThread(store, max_body=1 << 20)
    yield srv
    srv.close()


def test_leaf_http_scores_lz4_errors_and_stats(leaf: LeafThread) -> None:
    frame = make_frame(SPECS, 5, seed=1)
    with Client(leaf.url) as c:
        status, doc = c.json("POST", "/score?model=m&version=1", frame)
        assert status == 200 and doc["version"] == "1" and doc["n_candidates"] == 5
        assert doc["scores"] == _scores(frame, ["f32", "ids"])
        assert doc["bytes_received"] == doc["frame_bytes"] == len(frame)
        packed = lz4.frame.compress(frame)
        status, doc2 = c.json("POST", "/score?model=m&version=1", packed,
                              headers={"Content-Encoding": "lz4"})
        assert status == 200 and doc2["scores"] == doc["scores"]
        assert doc2["bytes_received"] == len(packed) and doc2["frame_bytes"] == len(frame)
        # unknown version -> latest in natural order ("10" > "9")
        status, doc3 = c.json("POST", "/score?model=m&version=77", frame)
        assert status == 200 and doc3["version"] == "10"
        errors = [("/score?model=zzz", frame, {}, 404), ("/score", frame, {}, 400),
                  ("/score?model=m", frame[:-3], {}, 400),
                  ("/score?model=m", packed[:-5], {"Content-Encoding": "lz4"}, 400),
                  ("/score?model=m", b"junk", {"Content-Encoding": "lz4"}, 400),
                  ("/score?model=m", frame, {"Content-Encoding": "gzip"}, 415),
                  ("/nowhere", frame, {}, 404)]
        for path, body, headers, want in errors:
            status, err = c.json("POST", path, body, headers=headers)
            assert status == want and err["error"], (path, err)
        bomb = lz4.frame.compress(b"\0" * (2 << 20))  # decompresses past --max-body-bytes
        status, err = c.json("POST", "/score?model=m", bomb,
                             headers={"Content-Encoding": "lz4"})
        assert status == 400 and "beyond" in err["error"]
        status, stats = c.json("GET", "/stats")
        scored_errors = len(errors) - 1 + 1  # POST /nowhere is not a score request; + bomb
        assert stats["requests"] == 3 + scored_errors and stats["errors"] == scored_errors
        assert stats["by_model"]["m"]["requests"] == 3
        assert stats["by_model"]["m"]["bytes_received"] == 2 * len(frame) + len(packed)
        assert stats["models"]["m"]["latest"] == "10"
        status, health = c.json("GET", "/healthz")
        assert status == 200 and health["status"] == "ok"
    answer = raw_post(leaf.url, f"POST /score?model=m HTTP/1.1\r\nHost: x\r\n"
                                f"Content-Length: {2 << 20}\r\n")
    assert answer.startswith(b"HTTP/1.1 413")


def test_store_reloads_a_changed_bundle_and_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    write_bundle(path, {"a": [{"version": "1", "input_names": ["x"]}],
                        "b": [{"version": "1", "input_names": ["y"]}]})
    store = ModelStore([str(path)], only=["a"])
    assert store.get("a", None).input_names == ("x",) and store.get("b", None) is None
    replace_bundle(path, {"a": [{"version": "1", "input_names": ["x"]},
                                {"version": "2", "input_names": ["x", "z"]}]})
    lm = wait_for(lambda: (m := store.get("a", None)) and m.version == "2" and m, 5,
                  "the store to reload")
    assert lm.input_names == ("x", "z")
    path.write_text("{broken")
    reloads = store.reloads
    wait_for(lambda: store.get("a", "1") is not None and
             path.stat().st_mtime_ns in [s[2] for s in store._stamps.values()], 5,
             "the store to look at the broken file")
    assert store.reloads == reloads and store.get("a", None).version == "2"


def test_cli_port_file_and_usage_errors(tmp_path: Path) -> None:
    assert leaf_main([]) == 2
    assert leaf_main(["--signature", "nonsense"]) == 2
    sig = tmp_path / "sig.json"
    sig.write_text(json.dumps({"input_names": ["f32"]}))
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "root_worker.leaf.server", "--signature",
                             f"m@3={sig}", "--port", "0", "--port-file", str(port_file)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        wait_for(port_file.exists, 20, "the leaf's port file")
        with Client(f"http://127.0.0.1:{int(port_file.read_text())}") as c:
            status, doc = c.json("POST", "/score?model=m", make_frame(SPECS, 2))
            assert status == 200 and doc["version"] == "3"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "listening on http://127.0.0.1:" in out


def test_trimmer_leaf_rejects_out_of_range_values_in_one_line() -> None:
    for args, what in ((["--port", "99999"], "--port: 99999 is out of range [0, 65535]"),
                       (["--port", "x"], "--port: 'x' is not a valid int"),
                       (["--max-body-bytes", "0"], "--max-body-bytes: 0 is out of range"),
                       (["--delay-ms", "-5"], "--delay-ms: -5 is out of range"),
                       (["--log-level", "loud"], "--log-level: invalid choice")):
        out = subprocess.run([str(Path(sys.executable).parent / "trimmer-leaf"),
                              "--bundle", str(ROOT / "examples/bundles/ads/module_info.json"),
                              *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out
        assert out.stderr.count("\n") == 1 and what in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_trimmer_leaf_says_in_one_line_when_it_cannot_listen() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([str(Path(sys.executable).parent / "trimmer-leaf"), "--bundle",
                              str(ROOT / "examples/bundles/ads/module_info.json"),
                              "--port", str(port), "--log-level", "error"],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == f"trimmer-leaf: cannot listen on 127.0.0.1:{port}: Address already " \
                         "in use\n"


def test_trimmer_leaf_signature_reads_what_trimmer_bundle_reads(tmp_path: Path) -> None:
    """--signature takes a .pt archive (read by trimmer-bundle's code); a broken one is one
    line on stderr, exit 2."""
    import zipfile
    pt = tmp_path / "ads_ctr" / "3" / "model.pt"
    pt.parent.mkdir(parents=True)
    with zipfile.ZipFile(pt, "w") as zf:
        zf.writestr("model/extra/module_info.json", json.dumps({"input_names": ["f32"]}))
    store = ModelStore(signatures=[("ads_ctr", "3", str(pt))])
    assert store.get("ads_ctr", "3").input_names == ("f32",)
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 broken")
    out = subprocess.run([str(Path(sys.executable).parent / "trimmer-leaf"), "--signature",
                          f"m@1={tmp_path / 'bad.pt'}"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out
    assert "not a valid .pt (zip) archive" in out.stderr and "Traceback" not in out.stderr


def test_store_default_skips_pending_versions(tmp_path: Path) -> None:
    """A leaf given a bundle with a pending version serves it when asked by name, and by
    default only once it is promoted (the roots' rule for "latest")."""
    path = tmp_path / "b.json"
    write_bundle(path, {"a": [{"version": "1", "input_names": ["x"]},
                              {"version": "2", "input_names": ["z"], "pending": True}],
                        "n": [{"version": "1", "input_names": ["y"], "pending": True}]})
    store = ModelStore([str(path)])
    assert store.get("a", None).version == "1" and store.get("a", "2").version == "2"
    assert store.get("n", None).version == "1"  # every version pending: still served
    replace_bundle(path, {"a": [{"version": "1", "input_names": ["x"]},
                                {"version": "2", "input_names": ["z"]}]})
    wait_for(lambda: store.get("a", None).version == "2", 5, "the promotion to reach the leaf")
