"""The leaf SDK (root_worker.leaf.sdk): numpy-only import, inputs in signature order as
zero-copy views, missing inputs, the skew rule, lz4 bodies, torch tensors that never alias
read-only memory, signatures in every format trimmer-bundle reads, and the "Bring your own
leaf" example of docs/leaf-sdk.md run as a real HTTP server.

Also one of the lean install's test files (.ci/lean-test runs it with feature-trimmer-lean,
numpy and pytest alone, on the oldest and newest Python): what needs lz4 or torch skips
there and runs in the main suite, where both are test dependencies."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from lean_helpers import LEAN, optional

from flatbuffers_schema import wire
from flatbuffers_schema.keys import Allowlist
from root_worker.frame import FrameError, Ragged, Trimmer, encode
from root_worker.leaf.sdk import (
    BuildError,
    InputConverter,
    Refusal,
    UnsupportedEncoding,
    check_skew,
    read_frame,
    score_reply,
)
from trimmer_daemon.bundle.parse import BundleError

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "leaf-sdk.md"
# what a leaf must not need: everything of the root's and daemon's world, and the options
NOT_NEEDED = ("lz4", "torch", "flatbuffers", "posix_ipc", "inotify_simple", "gunicorn",
              "prometheus_client", "root_worker.service", "root_worker.featuremap",
              "trimmer_daemon.daemon", "trimmer_daemon.publisher")


def _frame(**meta: object) -> bytes:
    return encode({"ctr": np.arange(4, dtype=np.float32),
                   "emb": np.arange(12, dtype=np.float16).reshape(4, 3),
                   "ids": Ragged.from_lists([[1, 2], [], [3], [4, 5, 6]], np.int64),
                   "unused": np.ones(4, np.float64)}, {"request_id": "r", **meta})


def test_sdk_imports_and_works_with_numpy_alone() -> None:
    blocker = (
        "import sys\n"
        f"BLOCKED = {NOT_NEEDED!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if any(name == b or name.startswith(b + '.') for b in BLOCKED):\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "from root_worker.leaf.sdk import InputConverter, read_frame, check_skew\n"
        "from root_worker.frame import encode, Ragged\n"
        "f = read_frame(encode({'a': np.arange(3.0), 'r': Ragged.from_lists([[1],[],[2]],"
        " np.int64)}))\n"
        "inp = InputConverter(['r', 'a', 'b'])(f)\n"
        "assert inp.missing == ('b',) and inp.arrays[2] is None\n"
        "assert check_skew('1', '2', inp).status == 409\n"
        "try:\n"
        "    read_frame(b'x', 'lz4')\n"
        "except Exception as exc:\n"
        "    assert type(exc).__name__ == 'UnsupportedEncoding', exc\n"
        "else:\n"
        "    raise AssertionError('an lz4 body was accepted without the lz4 module')\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr


def test_inputs_come_in_signature_order_as_zero_copy_views() -> None:
    body = bytearray(_frame())
    frame = read_frame(body)
    conv = InputConverter(["ids", "ctr", "absent", "emb"])
    inputs = conv(frame)
    assert inputs.names == ("ids", "ctr", "absent", "emb")
    assert inputs.missing == ("absent",) and inputs["absent"] is None
    ids, ctr, _, emb = inputs.arrays
    assert isinstance(ids, Ragged) and ids.offsets.tolist() == [0, 2, 2, 3, 6]
    assert ids.values.tolist() == [1, 2, 3, 4, 5, 6]
    assert ctr.tolist() == [0, 1, 2, 3] and emb.shape == (4, 3) and emb.dtype == np.float16
    buf = np.frombuffer(body, np.uint8)
    for arr in (ctr, emb, ids.values, ids.offsets):
        assert np.shares_memory(arr, buf)  # views on the request body, no copy
        assert arr.flags.writeable  # a bytearray body gives writable arrays
    ctr[0] = 42.0
    assert conv(read_frame(body)).arrays[1][0] == 42.0
    assert inputs.n_candidates == 4 and inputs.layout == ("ctr", "emb", "ids", "unused")


def test_the_converter_replans_per_layout() -> None:
    conv = InputConverter(["a", "b"])
    one = conv(read_frame(encode({"a": np.zeros(2), "b": np.ones(2)})))
    two = conv(read_frame(encode({"b": np.full(3, 7.0), "c": np.zeros(3)})))
    three = conv(read_frame(encode({"a": np.zeros(2), "b": np.ones(2)})))
    assert one.missing == () and two.missing == ("a",) and two.arrays[1].tolist() == [7.0] * 3
    assert three.arrays[1].tolist() == [1.0, 1.0]
    assert conv(read_frame(encode({}, n_candidates=5))).missing == ("a", "b")


def test_converter_from_signature_is_strict(tmp_path: Path) -> None:
    sig = tmp_path / "module_info.json"
    sig.write_text(json.dumps({"input_names": ["x", "y", "x"], "output_names": ["s"]}))
    conv = InputConverter.from_signature(str(sig))
    assert conv.input_names == ("x", "y") and conv.version is None
    assert len(conv.warnings) == 1 and "duplicate" in conv.warnings[0]
    assert InputConverter.from_signature(b'{"input_names": ["q"]}').input_names == ("q",)
    for bad in (b'{"input_names": []}', b'{"input_names": ["a", NaN]}', b"[1]",
                b'{"input_names": ["a"], "input_names": ["b"]}'):
        with pytest.raises(BundleError):
            InputConverter.from_signature(bad)
    with pytest.raises(ValueError, match="more than once"):
        InputConverter(["a", "a"])
    with pytest.raises(ValueError):
        InputConverter([])


@pytest.mark.parametrize(("trimmed_for", "missing", "refused"), [
    (None, ("f",), False),          # untrimmed: the payload's own gap, score it
    ("2", ("f",), False),           # trimmed for the version served
    ("1", (), False),               # trimmed for another version, nothing lacking
    ("1", ("f", "g"), True),        # trimmed for another version, lacking features: 409
])
def test_check_skew_is_the_wire_rule(trimmed_for: str | None, missing: tuple[str, ...],
                                     refused: bool) -> None:
    got = check_skew(trimmed_for, "2", missing, model="m")
    if not refused:
        assert got is None
        return
    assert isinstance(got, Refusal) and got.status == wire.STATUS_SKEW == 409
    assert set(got.body) == {wire.REPLY_ERROR, wire.REPLY_VERSION}
    assert got.body[wire.REPLY_VERSION] == "2"  # the served version: the root learns it
    assert "'1'" in got.body[wire.REPLY_ERROR] and "'f'" in got.body[wire.REPLY_ERROR]


def test_check_skew_takes_inputs() -> None:
    inputs = InputConverter(["ctr", "lost"])(read_frame(_frame()))
    assert check_skew("9", "1", inputs) is not None and check_skew("1", "1", inputs) is None


def test_read_frame_lz4_bounded_and_encoding_errors() -> None:
    lz4_frame = optional("lz4.frame")
    frame = _frame()
    assert read_frame(lz4_frame.compress(frame), " LZ4 ").n_candidates == 4
    assert read_frame(frame, "identity").n_candidates == 4
    with pytest.raises(UnsupportedEncoding, match="gzip"):
        read_frame(frame, "gzip")
    bomb = lz4_frame.compress(b"\0" * (4 << 20))
    with pytest.raises(FrameError, match="beyond 1048576 bytes"):
        read_frame(bomb, wire.ENCODING_LZ4, max_bytes=1 << 20)
    with pytest.raises(FrameError, match="lz4"):
        read_frame(lz4_frame.compress(frame)[:-9], wire.ENCODING_LZ4)
    with pytest.raises(FrameError, match="lz4"):
        read_frame(b"not lz4 at all", wire.ENCODING_LZ4)
    with pytest.raises(FrameError, match="bad magic"):
        read_frame(b"x" * 64)


def test_score_reply() -> None:
    assert score_reply(np.array([1.5, 2.0]), "3", missing=[]) == {
        wire.REPLY_SCORES: [1.5, 2.0], wire.REPLY_VERSION: "3", "missing": []}
    assert score_reply([1]) == {"scores": [1.0]}
    with pytest.raises(ValueError, match="finite"):
        score_reply([1.0, float("nan")])


def test_to_torch_without_torch_says_so() -> None:
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import numpy as np\n"
            "from root_worker.frame import encode\n"
            "from root_worker.leaf.sdk import InputConverter, read_frame\n"
            "inputs = InputConverter(['a'])(read_frame(encode({'a': np.zeros(2)})))\n"
            "try:\n"
            "    inputs.to_torch()\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.stdout == "Inputs.to_torch() needs torch (pip install torch)\n", out.stderr


def test_to_torch_shares_memory_of_a_writable_body() -> None:
    torch = optional("torch")
    body = bytearray(_frame())
    inputs = InputConverter(["ctr", "ids", "nope"])(read_frame(body))
    ctr, (values, offsets), nope = inputs.to_torch()
    assert nope is None and ctr.dtype == torch.float32 and offsets.tolist() == [0, 2, 2, 3, 6]
    ctr[1] = 9.0
    assert inputs["ctr"][1] == 9.0
    values.add_(100)  # in place, through the tensor: the body itself changes
    assert read_frame(body).columns["ids"].values.tolist() == [101, 102, 103, 104, 105, 106]


def test_to_torch_never_writes_into_a_read_only_body() -> None:
    """A ``bytes`` body -- what FastAPI, aiohttp and Flask hand a leaf -- is immutable:
    the tensors are copies, and an in-place op changes the tensor, never the bytes."""
    optional("torch")
    body = _frame()
    before = bytes(body)  # an independent copy to compare with
    inputs = InputConverter(["ctr", "emb", "ids"])(read_frame(body))
    assert not inputs["ctr"].flags.writeable
    ctr, emb, (values, offsets) = inputs.to_torch()
    for t in (ctr, emb, values, offsets):
        t.add_(41)
    assert body == before
    assert ctr.tolist() == [41.0, 42.0, 43.0, 44.0] and inputs["ctr"].tolist() == [0, 1, 2, 3]
    assert values.tolist() == [42, 43, 44, 45, 46, 47]
    assert read_frame(body).columns["ids"].offsets.tolist() == [0, 2, 2, 3, 6]


# --- signatures: every format trimmer-bundle reads, by the same code ---------------------------
BUNDLE = {"ads_ctr": [{"version": "2", "input_names": ["ctr", "emb"]},
                      {"version": "10", "input_names": ["ctr", "ids", "ctr"]}],
          "ads_cvr": [{"version": "1", "input_names": ["emb"]}]}


def test_from_signature_reads_a_per_bundle_file(tmp_path: Path) -> None:
    path = tmp_path / "bundles" / "ads" / "module_info.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(BUNDLE))
    latest = InputConverter.from_signature(path, model="ads_ctr")
    assert latest.input_names == ("ctr", "ids") and latest.version == "10"  # natural order
    assert latest.warnings and "duplicate" in latest.warnings[0]
    two = InputConverter.from_signature(str(path), model="ads_ctr", version="2")
    assert two.input_names == ("ctr", "emb") and two.version == "2"
    assert InputConverter.from_signature(path.read_bytes(), model="ads_cvr").input_names == (
        "emb",)
    with pytest.raises(BundleError, match=r"name the model to read \(it defines: ads_ctr, "
                                          r"ads_cvr\)"):
        InputConverter.from_signature(path)
    with pytest.raises(BundleError, match="no model 'ghost'"):
        InputConverter.from_signature(path, model="ghost")
    with pytest.raises(BundleError, match=r"no version '3' of model 'ads_ctr' \(it has: 2, "
                                          r"10\)"):
        InputConverter.from_signature(path, model="ads_ctr", version="3")
    path.write_text('{"ads_ctr": [{"version": "1", "input_names": ["a", 7]}]}')
    with pytest.raises(BundleError, match=r'input_names\[1\]'):
        InputConverter.from_signature(path, model="ads_ctr")


def test_a_model_named_input_names_is_still_a_bundle(tmp_path: Path) -> None:
    doc = {"input_names": [{"version": "1", "input_names": ["a"]}]}
    conv = InputConverter.from_signature(json.dumps(doc).encode(), model="input_names")
    assert conv.input_names == ("a",) and conv.version == "1"


def _pt_archive(path: Path, signature: dict[str, object]) -> None:
    """A real TorchScript archive with its signature as an extra file (what a model
    pipeline ships), or -- in the lean venv, without torch -- the same zip layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"module_info.json": json.dumps(signature)}
    if LEAN:  # no torch in the lean venv
        import zipfile
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("model/extra/module_info.json", extra["module_info.json"])
            zf.writestr("model/data.pkl", b"\x80\x02N.")
        return
    torch = optional("torch")
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; archives remain
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), str(path), _extra_files=extra)


def test_from_signature_reads_pt_archives_and_version_dirs_as_trimmer_bundle(
        tmp_path: Path) -> None:
    from trimmer_daemon.bundle.build import Source, build_bundle

    pt = tmp_path / "models" / "ads_ctr" / "7" / "model.pt"
    _pt_archive(pt, {"input_names": ["ctr", "ids"], "output_names": ["p"]})
    from_pt = InputConverter.from_signature(pt)
    assert from_pt.input_names == ("ctr", "ids") and from_pt.origin.startswith(f"{pt}!")
    assert InputConverter.from_signature(pt.read_bytes()).input_names == ("ctr", "ids")
    from_dir = InputConverter.from_signature(pt.parent)
    assert from_dir.input_names == ("ctr", "ids") and from_dir.version == "7"
    # trimmer-bundle, fed the same model directory, finds the same inputs
    built = json.loads(build_bundle([Source(str(tmp_path / "models" / "ads_ctr"))]).data)
    assert built == {"ads_ctr": [{"version": "7", "input_names": ["ctr", "ids"],
                                  "output_names": ["p"]}]}
    empty = tmp_path / "models" / "ads_ctr" / "8"
    empty.mkdir()
    with pytest.raises(BuildError, match="no signature"):
        InputConverter.from_signature(empty)
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(BuildError, match="not a valid .pt"):
        InputConverter.from_signature(tmp_path / "broken.pt")


# --- the documented leaf, run as it is written ---------------------------------------------
def _doc_leaf_source() -> str:
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    leaf = [b for b in blocks if "def make_server" in b]
    assert len(leaf) == 1, "docs/leaf-sdk.md must hold one complete leaf example"
    return leaf[0]


@pytest.fixture
def doc_leaf(tmp_path: Path) -> Iterator[tuple[str, int]]:
    sig = tmp_path / "module_info.json"
    sig.write_text(json.dumps({"input_names": ["ctr", "ids", "emb"]}))
    namespace: dict[str, object] = {"__name__": "doc_leaf"}
    exec(compile(_doc_leaf_source(), str(DOC), "exec"), namespace)  # noqa: S102
    server = namespace["make_server"]("ads_ctr", "2", str(sig))  # type: ignore[operator]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _post(addr: tuple[str, int], body: bytes, path: str = "/score?model=ads_ctr",
          **headers: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*addr, timeout=10)
    try:
        conn.request("POST", path, body, {"Content-Type": wire.FRAME_CONTENT_TYPE,
                                          **{k.replace("_", "-"): v for k, v in headers.items()}})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_the_documented_leaf_serves_the_contract(doc_leaf: tuple[str, int]) -> None:
    frame = _frame()
    status, doc = _post(doc_leaf, frame)
    assert status == 200 and doc["version"] == "2" and doc["missing"] == []
    # ctr + emb row sums + list lengths, per candidate
    emb = np.arange(12, dtype=np.float64).reshape(4, 3).sum(axis=1)
    assert doc["scores"] == (np.arange(4) + emb + [2, 0, 1, 3]).tolist()
    if not LEAN:  # the lean install: lz4 is its optional extra
        lz4_frame = optional("lz4.frame")
        status, lz = _post(doc_leaf, lz4_frame.compress(frame), Content_Encoding="lz4")
        assert (status, lz["scores"]) == (200, doc["scores"])
    # trimmed for version 1 (no emb): this leaf serves 2 and needs emb -> 409
    trimmed = bytes(Trimmer().trim(frame, Allowlist.from_names(["ctr", "ids"])).data)
    status, skew = _post(doc_leaf, trimmed, X_FT_Trimmed_For="1")
    assert status == wire.STATUS_SKEW and "'emb'" in skew[wire.REPLY_ERROR]
    # trimmed for version 2 itself: scored as it is
    full = bytes(Trimmer().trim(frame, Allowlist.from_names(["ctr", "ids", "emb"])).data)
    assert _post(doc_leaf, full, X_FT_Trimmed_For="2") == (200, doc)
    status, bad = _post(doc_leaf, frame[:-3])
    assert status == 400 and "malformed frame" in bad["error"]
    assert _post(doc_leaf, frame, Content_Encoding="br")[0] == 415
    assert _post(doc_leaf, frame, "/score?model=other")[0] == 404
