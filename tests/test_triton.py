"""Open Inference Protocol leaves: a real NVIDIA Triton server behind a real root pool.

The module starts ``tritonserver`` (nvidia-pytriton's bundled binary, its own venv:
``make triton``) on the python-backend repository of :mod:`root_worker.testing.triton`,
builds the bundle from that repository with ``trimmer-bundle build --triton-repo``, runs a
real daemon and gunicorn root pool whose routing file says the models' leaves speak
``oip``, and puts a recording TCP relay between the root and Triton to see the bytes on the
wire. Without the server the server tests skip with the reason; ``FT_REQUIRE_TRITON=1``
(``.ci/run``) turns the skip into a failure. The request building and the routing/bundle
rules are also tested here without a server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_helpers import DaemonProc, remove_segments, wait_for
from root_helpers import RootProc, write_routing

from flatbuffers_schema.keys import Allowlist
from flatbuffers_schema.oip import HEADER_LENGTH, InputSpec, TensorSignature
from flatbuffers_schema.shm_layout import segment_files as shm_leftovers
from root_worker.frame import Ragged, encode
from root_worker.service import oip
from root_worker.service.routing import Routing, RoutingError
from root_worker.testing import triton as T
from trimmer_daemon.bundle.cli import main as bundle_main

C = 16
CTR_INPUTS, RANK_INPUTS = T.INPUTS["tr_ctr"], T.INPUTS["tr_rank"]


def union_columns(n: int = C, seed: int = 0) -> dict[str, Any]:
    """What a root holds: every model's inputs and a feature neither model uses."""
    return T.union_columns(n, seed)


def v2_body(columns: dict[str, Any], names: tuple[str, ...] | list[str],
            datatypes: dict[str, str] | None = None) -> tuple[bytes, int]:
    """A raw v2 binary request of ``names`` (the test's own, to talk to Triton directly)."""
    dt = {"float32": "FP32", "int64": "INT64", "float16": "FP16", "int32": "INT32"}
    inputs = [{"name": n, "datatype": (datatypes or {}).get(n, dt[columns[n].dtype.name]),
               "shape": list(columns[n].shape),
               "parameters": {"binary_data_size": columns[n].nbytes}} for n in names]
    header = json.dumps({"inputs": inputs}).encode()
    return header + b"".join(columns[n].tobytes() for n in names), len(header)


def post(url: str, body: bytes, header_len: int) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={
        HEADER_LENGTH: str(header_len), "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -------------------------------------------------------------------------------------------
# without a server: request building, answers, routing, the repository reader


def test_v2_request_is_the_header_plus_views_of_the_kept_blocks() -> None:
    cols = union_columns()
    frame = encode(cols, {"request_id": "r-1"})
    body = memoryview(frame)
    fi = oip.index_frame(body)
    sig = TensorSignature((InputSpec("item_ids", "INT64", (4,)),
                           InputSpec("user_dense", "FP32", (-1,))), 256)
    built = oip.build_request(fi, "tr_ctr", sig, None, "r-1")
    header, *views = built.parts
    doc = json.loads(header)
    assert [i["name"] for i in doc["inputs"]] == ["item_ids", "user_dense"]  # declared order
    assert doc["id"] == "r-1" and doc["parameters"] == {"binary_data_output": True}
    assert doc["inputs"][0]["shape"] == [C, 4] and doc["inputs"][1]["datatype"] == "FP32"
    assert built.headers[HEADER_LENGTH] == str(len(header))
    # no copy: each tensor is a view into the request buffer, holding the column's bytes
    for view, name in zip(views, ["item_ids", "user_dense"], strict=True):
        assert isinstance(view, memoryview) and view.obj is body.obj
        assert bytes(view) == cols[name].tobytes()
    assert built.nbytes == len(header) + cols["item_ids"].nbytes + cols["user_dense"].nbytes


def test_without_a_signature_the_allowlist_picks_the_columns() -> None:
    cols = union_columns()
    fi = oip.index_frame(memoryview(encode(cols)))
    built = oip.build_request(fi, "m", None, Allowlist.from_names(["clicks", "query_emb"]), None)
    doc = json.loads(built.parts[0])
    assert [i["name"] for i in doc["inputs"]] == ["query_emb", "clicks"]  # frame order
    assert "id" not in doc


@pytest.mark.parametrize(("spec", "words"), [
    (InputSpec("user_dense", "FP64", (8,)), "float32 (FP32), the model declares FP64"),
    (InputSpec("user_dense", "FP32", (7,)), "shape [16, 8], the model declares [-1, 7]"),
    (InputSpec("absent", "FP32", (8,)), "no such column"),
])
def test_a_column_that_cannot_match_names_itself(spec: InputSpec, words: str) -> None:
    fi = oip.index_frame(memoryview(encode(union_columns())))
    with pytest.raises(oip.ColumnError, match=re.escape(words)) as err:
        oip.build_request(fi, "m", TensorSignature((spec,), 64), None, None)
    assert err.value.column == spec.name
    # an optional input the frame lacks is left out instead
    optional = InputSpec(spec.name, spec.datatype, spec.shape, optional=True)
    if spec.name == "absent":
        built = oip.build_request(fi, "m", TensorSignature((optional,), 64), None, None)
        assert json.loads(built.parts[0])["inputs"] == []


def test_scalar_columns_batch_limits_and_ragged_columns() -> None:
    cols = {"s": np.arange(C, dtype=np.int32),
            "r": Ragged.from_lists([[1, 2], [], [3]] * 5 + [[4]], np.int64)}
    fi = oip.index_frame(memoryview(encode(cols)))
    one = TensorSignature((InputSpec("s", "INT32", (1,)),), 32)
    assert json.loads(oip.build_request(fi, "m", one, None, None).parts[0])["inputs"][0][
        "shape"] == [C, 1]
    with pytest.raises(oip.BatchTooLarge, match="16 candidates, the model's max_batch_size is 8"):
        oip.build_request(fi, "m", TensorSignature(one.inputs, 8), None, None)
    batching = TensorSignature((InputSpec("r", "INT64", (-1,)),), 32)
    with pytest.raises(oip.ColumnError, match="'r.offsets'") as err:
        oip.build_request(fi, "m", batching, None, None)
    assert err.value.column == "r"
    whole = TensorSignature((InputSpec("r", "INT64", (-1,)),
                             InputSpec("r.offsets", "INT64", (C + 1,))), 0)
    built = oip.build_request(fi, "m", whole, None, None)
    doc = json.loads(built.parts[0])
    assert [(i["name"], i["shape"]) for i in doc["inputs"]] == [("r", [16]), ("r.offsets", [17])]
    assert np.array_equal(np.frombuffer(built.parts[1], np.int64), cols["r"].values)
    assert np.array_equal(np.frombuffer(built.parts[2], np.int64), cols["r"].offsets)


def test_the_blocks_a_v2_request_sends_are_checked() -> None:
    """A malformed block of a sent column is a FrameError (400 bad_frame at the root); a
    bool byte other than 0/1 too; a column no target sends is not read."""
    import struct

    from root_worker.frame import FrameError
    from root_worker.frame.format import read_preamble

    cols = {"a": np.ones((C, 2), np.float32), "flag": np.ones(C, bool),
            "other": np.zeros(C, np.float32)}
    frame = bytearray(encode(cols))
    pre = read_preamble(memoryview(frame))
    sig = TensorSignature((InputSpec("a", "FP32", (2,)), InputSpec("flag", "BOOL", ())), 64)
    other = pre.table_offset + 16 * 2  # column 2's (offset, nbytes)
    struct.pack_into("<Q", frame, other, 3)  # misaligned: never read by a v2 target of a
    oip.build_request(oip.index_frame(memoryview(frame)), "m", sig, None, None)
    struct.pack_into("<Q", frame, pre.table_offset, 3)  # column 0, sent: refused
    with pytest.raises(FrameError, match="column 0 'a': block at 3"):
        oip.build_request(oip.index_frame(memoryview(frame)), "m", sig, None, None)
    frame = bytearray(encode(cols))
    off = struct.unpack_from("<Q", frame, pre.table_offset + 16)[0]
    frame[off + 5] = 2
    with pytest.raises(FrameError, match="bool value byte 5 is not 0 or 1"):
        oip.build_request(oip.index_frame(memoryview(frame)), "m", sig, None, None)


def test_answers_are_read_as_scores() -> None:
    out = np.arange(C, dtype=np.float32).reshape(C, 1) / 3
    extra = np.ones((C, 2), np.float16)
    header = json.dumps({"model_name": "m", "model_version": "2", "outputs": [
        {"name": "score", "datatype": "FP32", "shape": [C, 1],
         "parameters": {"binary_data_size": out.nbytes}},
        {"name": "aux", "datatype": "FP16", "shape": [C, 2],
         "parameters": {"binary_data_size": extra.nbytes}}]}).encode()
    data = header + out.tobytes() + extra.tobytes()
    reply = oip.read_answer("u", 200, data, {HEADER_LENGTH.lower(): str(len(header))})
    assert np.array_equal(np.array(reply["scores"].value, np.float32), out.reshape(-1))
    assert np.array_equal(np.array(json.loads(reply["scores"].text), np.float32), out.reshape(-1))
    assert reply["outputs"]["aux"] == extra.tolist() and reply["leaf_version"] == "2"
    with pytest.raises(oip.LeafError, match="output 'score' has 16 rows for 8 candidates"):
        oip.read_answer("u", 200, data, {HEADER_LENGTH.lower(): str(len(header))}, 8)
    with pytest.raises(oip.LeafError, match="does not fit") as err:
        oip.read_answer("u", 200, data[:-4], {HEADER_LENGTH.lower(): str(len(header))})
    assert err.value.kind == "bad_reply"
    neg = json.dumps({"outputs": [{"name": "s", "datatype": "FP32", "shape": [-1],
                                   "parameters": {"binary_data_size": -4}}]}).encode()
    with pytest.raises(oip.LeafError, match="negative dimension"):
        oip.read_answer("u", 200, neg + out.tobytes(), {HEADER_LENGTH.lower(): str(len(neg))})
    with pytest.raises(oip.LeafError, match="answered 400: unexpected input") as err:
        oip.read_answer("u", 400, b'{"error":"unexpected input"}', {})
    assert err.value.kind == "status" and err.value.status == 400


def test_routing_says_which_protocol_a_model_speaks() -> None:
    r = Routing.from_doc({"a": "http://h:1", "b": {"urls": ["http://h:2"], "protocol": "oip"},
                          "*": {"url": "http://h:3", "protocol": "oip"}})
    assert [r.protocol(m) for m in ("a", "b", "other")] == ["frame", "oip", "oip"]
    assert r.to_dict()["b"] == {"urls": ["http://h:2"], "protocol": "oip"}
    for bad, words in (({"protocol": "grpc", "url": "http://h:1"}, "not one of frame, oip"),
                       ({"url": "http://h:1", "urls": ["http://h:1"]}, "exactly one"),
                       ({"url": "http://h:1", "proto": "oip"}, "unknown keys")):
        with pytest.raises(RoutingError, match=words):
            Routing.from_doc({"m": bad})


def test_bundle_from_a_model_repository(tmp_path: Path) -> None:
    """config.pbtxt through Triton's ModelConfig proto; versions as version_policy serves."""
    repo = T.write_model_repository(tmp_path / "repo")
    (repo / "tr_rank" / "2").mkdir()  # tr_rank has the default policy: the latest one only
    out = tmp_path / "bundle.json"
    assert bundle_main(["build", "-o", str(out), "--triton-repo", str(repo)]) == 0
    doc = json.loads(out.read_text())
    assert [e["version"] for e in doc["tr_ctr"]] == ["1", "2"]
    assert [e["version"] for e in doc["tr_rank"]] == ["2"]
    assert doc["tr_rank"][0]["inputs"] == [
        {"name": "query_emb", "datatype": "FP16", "shape": [8]},
        {"name": "clicks", "datatype": "INT32", "shape": [1]}]
    assert doc["tr_ctr"][0]["max_batch_size"] == 256
    (repo / "tr_ctr" / "config.pbtxt").write_text('backend: "python"\ninput [ { nme: "x" } ]\n')
    assert bundle_main(["build", "-o", str(out), "--triton-repo", str(repo)]) == 1


def test_a_v2_server_without_triton_s_config_endpoint(tmp_path: Path) -> None:
    """--triton-server on a v2 server that has model metadata but no /config (a KServe
    runtime): the leading -1 is the batch dimension, max_batch_size stays unknown."""
    import http.server

    meta = {"name": "km", "versions": ["7"], "platform": "x",
            "inputs": [{"name": "dense", "datatype": "FP32", "shape": [-1, 8]}],
            "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1, 1]}]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body = json.dumps(meta).encode()
            if self.path.endswith("/config"):
                self.send_response(404)
                body = b'{"error":"no config"}'
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "b.json"
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert bundle_main(["build", "-o", str(out), "--triton-server", url, "km"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    entry = json.loads(out.read_text())["km"][0]
    assert entry["version"] == "7" and "max_batch_size" not in entry
    assert entry["inputs"] == [{"name": "dense", "datatype": "FP32", "shape": [8]}]


# -------------------------------------------------------------------------------------------
# against the real server


class Relay:
    """A TCP relay in front of Triton that records what the root sends (one thread per
    direction per connection; closed with the module)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=30)
            self._socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if record:
                    with self._lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def request_with(self, marker: bytes) -> tuple[str, dict[str, str], bytes]:
        """The (request line, headers, body) of the recorded request whose body has
        ``marker``."""
        with self._lock:
            raw = bytes(self.sent)
        at = raw.index(marker)
        start = raw.rindex(b"POST ", 0, at)
        head_end = raw.index(b"\r\n\r\n", start)
        line, *fields = raw[start:head_end].decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
        n = int(headers["content-length"])
        return line, headers, raw[head_end + 4:head_end + 4 + n]

    def close(self) -> None:
        self.server.close()
        for s in self._socks:
            s.close()


@dataclass
class Env:
    tmp: Path
    inst: T.TritonInstall
    server: T.TritonServer
    relay: Relay
    bundle: Path
    daemon: DaemonProc
    root: RootProc

    def build_bundle(self) -> None:
        assert bundle_main(["build", "-o", str(self.bundle), "--triton-repo",
                            str(self.server.repo)]) == 0

    def direct(self, jobs: list[tuple[str, str, dict[str, Any]]]) -> list[Any]:
        """The first output of each (model, version, inputs) job, asked by tritonclient."""
        arrays: dict[str, Any] = {"jobs": np.array(json.dumps(
            [{"model": m, "version": v, "inputs": list(cols)} for m, v, cols in jobs]))}
        for k, (_, _, cols) in enumerate(jobs):
            arrays.update({f"{k}/{n}": a for n, a in cols.items()})
        src, dst = self.tmp / f"jobs-{uuid.uuid4().hex}.npz", self.tmp / "out.npz"
        np.savez(src, **arrays)
        subprocess.run([str(self.inst.python), str(Path(__file__).parent / "triton_direct.py"),
                        self.server.url, str(src), str(dst)], check=True, timeout=60,
                       env=self.inst.env())
        out = np.load(dst)
        return [out[str(k)] for k in range(len(jobs))]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    inst = T.find_install()
    if isinstance(inst, str):
        if os.environ.get("FT_REQUIRE_TRITON") == "1":
            pytest.fail(f"FT_REQUIRE_TRITON=1 but {inst}")
        pytest.skip(inst)
    tmp = tmp_path_factory.mktemp("triton")
    regions_before = set(os.listdir("/dev/shm"))
    server = T.TritonServer(inst, T.write_model_repository(tmp / "repo"), tmp)
    prefix = f"fttest_{uuid.uuid4().hex[:12]}"
    relay = daemon = root = None
    try:
        server.wait_ready()
        relay = Relay(server.port)
        bundle = tmp / "bundles" / "triton" / "module_info.json"
        bundle.parent.mkdir(parents=True)
        assert bundle_main(["build", "-o", str(bundle), "--triton-repo", str(server.repo)]) == 0
        route = {"urls": [f"http://127.0.0.1:{relay.port}"], "protocol": "oip"}
        routing = write_routing(tmp / "routing.json", {"tr_ctr": route, "tr_rank": route})
        daemon = DaemonProc(prefix, {"triton": bundle}, tmp / "daemon.log")
        daemon.wait_view(lambda v: v.model_count == 2, what="the first map")
        root = RootProc(tmp, {"FT_SHM_NAME": prefix, "FT_ROUTING": str(routing),
                              "FT_LEAF_TIMEOUT": "10"}).wait_ready()
        yield Env(tmp, inst, server, relay, bundle, daemon, root)
    finally:
        if root is not None:
            root.stop()
        if daemon is not None:
            daemon.stop()
            daemon.close()
        remove_segments(prefix)
        if relay is not None:
            relay.close()
        server.stop()
        assert not shm_leftovers(prefix)
        # the python backend's shared-memory regions go with the server
        assert not {r for r in set(os.listdir("/dev/shm")) - regions_before
                    if r.startswith("triton_python_backend")}


def test_the_union_frame_sent_straight_to_triton_is_refused(env: Env) -> None:
    cols = union_columns()
    status, answer = post(f"{env.server.url}/v2/models/tr_ctr/versions/2/infer",
                          *v2_body(cols, list(cols)))
    assert status == 400, answer
    assert b"expected 2 inputs but got 5 inputs" in answer
    status, answer = post(f"{env.server.url}/v2/models/tr_ctr/versions/2/infer",
                          *v2_body(cols, CTR_INPUTS))
    assert status == 200, answer  # exactly the model's inputs: served


def test_every_target_through_the_root_equals_a_direct_request(env: Env) -> None:
    cols = union_columns(seed=1)
    rid = f"r-{uuid.uuid4().hex[:8]}"
    frame = encode(cols, {"request_id": rid})
    status, doc = env.root.client().score(frame, ["tr_ctr@1", "tr_ctr@2", "tr_rank"])
    assert status == 200, doc
    assert [t["status"] for t in doc["targets"]] == ["ok"] * 3, doc
    assert [(t["version"], t["leaf_version"]) for t in doc["targets"]] == [
        ("1", "1"), ("2", "2"), ("1", "1")]
    direct = env.direct([("tr_ctr", "1", {n: cols[n] for n in CTR_INPUTS}),
                         ("tr_ctr", "2", {n: cols[n] for n in CTR_INPUTS}),
                         ("tr_rank", "1", {n: cols[n] for n in RANK_INPUTS})])
    for t, want in zip(doc["targets"], direct, strict=True):
        got = np.array(t["scores"], np.float32)
        assert got.tobytes() == want.reshape(-1).tobytes(), t["model"]  # bit-identical
    assert not np.array_equal(direct[0], direct[1])  # the versions differ: pinning matters

    # on the wire: the JSON header plus exactly the kept tensors, version pinned, id carried
    line, headers, body = env.relay.request_with(f'"id":"{rid}"'.encode())
    n = int(headers[HEADER_LENGTH.lower()])
    header = json.loads(body[:n])
    first = line.split()[1]
    model, version = first.split("/")[3], first.split("/")[5]
    names = CTR_INPUTS if model == "tr_ctr" else RANK_INPUTS
    assert first == f"/v2/models/{model}/versions/{version}/infer"
    assert header["id"] == rid and [i["name"] for i in header["inputs"]] == list(names)
    assert body[n:] == b"".join(cols[name].tobytes() for name in names)
    frame_bytes = len(frame)
    assert len(body) < frame_bytes / 2  # ctx_unused and the other model's columns stayed home
    # what the root reports matches the wire
    sent = {t["model"] + "@" + t["version"]: t["bytes_sent"] for t in doc["targets"]}
    assert sent[f"{model}@{version}"] == len(body)


def test_a_column_that_cannot_match_is_refused_by_the_root(env: Env) -> None:
    cols = union_columns()
    cols["user_dense"] = cols["user_dense"].astype(np.float64)
    status, doc = env.root.client().score(encode(cols), ["tr_rank", "tr_ctr"])
    assert status == 400, doc
    assert doc["error"]["code"] == "bad_column"
    assert "'tr_ctr' input 'user_dense'" in doc["error"]["message"]
    assert "float64 (FP64), the model declares FP32" in doc["error"]["message"]
    del cols["user_dense"]
    status, doc = env.root.client().score(encode(cols), ["tr_ctr"])
    assert status == 400 and "input 'user_dense': the frame has no such column" in \
        doc["error"]["message"], doc


def test_more_candidates_than_max_batch_size_fail_that_target_alone(env: Env) -> None:
    n = T.RANK_MAX_BATCH + 8
    status, doc = env.root.client().score(encode(union_columns(n)), ["tr_ctr", "tr_rank"])
    assert status == 200, doc
    ctr, rank = doc["targets"]
    assert ctr["status"] == "ok" and len(ctr["scores"]) == n
    assert rank["status"] == "error" and rank["error"]["kind"] == "batch_size"
    assert f"{n} candidates, the model's max_batch_size is {T.RANK_MAX_BATCH}" in \
        rank["error"]["message"]


def test_a_new_version_in_the_repository_reaches_the_bundle_and_the_root(env: Env) -> None:
    T.add_version(env.server.repo, "tr_ctr", 3)
    env.server.load("tr_ctr")
    env.server.wait_ready(versions=(("tr_ctr", "3"),))
    env.build_bundle()  # the deploy step: trimmer-bundle build, written atomically
    cols = union_columns(seed=3)
    frame = encode(cols)
    client = env.root.client()

    def latest_is_3() -> dict[str, Any] | None:
        status, doc = client.score(frame, ["tr_ctr"])
        t = doc["targets"][0]
        return t if status == 200 and t.get("version") == "3" else None
    t = wait_for(latest_is_3, 20.0, "the root to send tr_ctr's latest version 3")
    assert t["status"] == "ok" and t["leaf_version"] == "3" and t["outcome"] == "trimmed"
    want = env.direct([("tr_ctr", "3", {n: cols[n] for n in CTR_INPUTS})])[0]
    assert np.array(t["scores"], np.float32).tobytes() == want.reshape(-1).tobytes()


def test_the_published_map_shows_each_versions_signature(env: Env) -> None:
    """What trimmer-inspect models lists: the datatype and shape of every input."""
    view = env.daemon.view()
    assert view is not None
    rank = next(m for m in view.models() if m["name"] == "tr_rank")
    assert rank["versions"][0]["max_batch_size"] == T.RANK_MAX_BATCH
    assert rank["versions"][0]["inputs"] == [
        {"name": "query_emb", "datatype": "FP16", "shape": (8,), "optional": False},
        {"name": "clicks", "datatype": "INT32", "shape": (1,), "optional": False}]


def test_a_live_servers_metadata_gives_the_repositorys_signatures(env: Env) -> None:
    """--triton-server reads GET /v2/models/M/versions/V (+ config): the same entries as
    --triton-repo for the versions the server has loaded."""
    live, repo = env.tmp / "live.json", env.tmp / "repo.json"
    args = [a for m in T.MODELS for a in ("--triton-server", env.server.url, m)]
    assert bundle_main(["build", "-o", str(live), *args]) == 0
    assert bundle_main(["build", "-o", str(repo), "--triton-repo", str(env.server.repo)]) == 0
    live_doc, repo_doc = json.loads(live.read_text()), json.loads(repo.read_text())
    for model in T.MODELS:
        loaded = {e["version"] for e in live_doc[model]}
        assert loaded and loaded <= {e["version"] for e in repo_doc[model]}
        assert [e for e in repo_doc[model] if e["version"] in loaded] == live_doc[model]
    assert bundle_main(["build", "-o", str(live), "--triton-server", env.server.url,
                        "no_such_model"]) == 1
