"""Generate the golden frame vectors under ``tests/data/golden/`` (run by hand, committed).

``python tests/make_golden.py`` rewrites ``tests/data/golden/``; ``python tests/make_golden.py
--check`` only compares (``tests/test_golden.py`` runs that check, so the committed vectors are
always exactly what this script produces). Deterministic: no clock, no random state.

What it writes (every reader's tests consume the same files):

``valid/<case>.ftrm``
    frames every conforming reader must accept.
``invalid/<case>.ftrm``
    frames every conforming reader must reject, each at one known stage.
``manifest.json``
    for each valid frame: ``n_candidates``, the metadata (its exact bytes' checksum and the
    decoded JSON value) and per column ``name``, ``dtype``, ``kind``, ``shape`` (per element),
    ``n_values`` (ragged) and ``values_b2b`` / ``offsets_b2b``: BLAKE2b (8-byte digest, hex)
    of the column's value bytes / ragged offsets bytes exactly as on the wire.
    For each invalid frame: ``class`` (the stage that rejects it: ``preamble``, ``layout``,
    ``table``, ``ragged``, ``value``, ``metadata``) and ``python_error``, the reference
    decoder's exact message.
``name_keys.json``
    known answers of ``flatbuffers_schema.keys.name_key`` (``key`` as the little-endian u64
    in hex, ``digest`` as the 8 digest bytes in hex), plus the BLAKE2b-512-truncated value a
    wrong implementation gets, as a counter-example.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flatbuffers_schema.keys import Allowlist, name_key  # noqa: E402
from root_worker.frame import FrameError, Ragged, Trimmer, decode, encode  # noqa: E402
from root_worker.frame.format import PREAMBLE, PREAMBLE_SIZE  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
DTYPES = ["?", "<i1", "<i2", "<i4", "<i8", "<u1", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8"]
# preamble field offsets (docs/frame-format.md, section 1)
OFF_VERSION, OFF_FLAGS, OFF_NCOL, OFF_LAYOUT_LEN, OFF_NCAND = 4, 6, 8, 12, 24
OFF_RESERVED0, OFF_FRAME_LEN, OFF_META_OFF, OFF_META_LEN = 28, 32, 40, 48


def b2b(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _values(dtype: str, n: int, seed: int) -> np.ndarray:
    """Deterministic values of ``dtype``: extremes first, then a pattern."""
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return (np.arange(n) * 7 + seed) % 3 == 0
    if dt.kind == "f":
        base = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 65504.0], dtype=dt)
        extra = (np.arange(n, dtype=np.float64) * 0.37 + seed).astype(dt)
        return np.concatenate([base, extra])[:n]
    info = np.iinfo(dt)
    base = np.array([info.min, info.max, 0, 1], dtype=dt)
    extra = ((np.arange(n, dtype=np.uint64) * 2654435761 + seed) % (1 << 31)).astype(dt)
    return np.concatenate([base, extra])[:n]


def _dense(dtype: str, n: int, shape: tuple[int, ...] = (), seed: int = 0) -> np.ndarray:
    size = n * int(np.prod(shape, dtype=np.int64))
    return _values(dtype, size, seed).reshape((n, *shape))


def _ragged(dtype: str, lengths: list[int], shape: tuple[int, ...] = (), seed: int = 0
            ) -> Ragged:
    total = sum(lengths) * int(np.prod(shape, dtype=np.int64))
    values = _values(dtype, total, seed).reshape((sum(lengths), *shape))
    return Ragged.from_lengths(values, lengths)


# --- valid frames ---------------------------------------------------------------------------
def _mixed() -> bytes:
    return encode({"ctr_7d": _dense("<f4", 4, seed=1),
                   "emb": _dense("<f2", 4, (8,), seed=2),
                   "last_pins": _ragged("<i8", [3, 0, 1, 2], seed=3),
                   "country": _dense("<u2", 4, seed=4),
                   "is_new": _dense("?", 4, seed=5),
                   "boxes": _ragged("<f4", [1, 2, 0, 0], (2, 2), seed=6)},
                  {"request_id": "golden-mixed", "targets": ["ads_ctr"]})


def _non_canonical() -> bytes:
    """Blocks placed with gaps (one extra 64-byte slot before each block and before the
    metadata): valid, since readers must not assume canonical placement."""
    canon = encode({"a": _dense("<i4", 3, seed=7), "b": _ragged("<u1", [2, 0, 1], seed=8)},
                   {"request_id": "golden-gaps"})
    pre = list(PREAMBLE.unpack_from(canon, 0))
    n_col = pre[3]
    table_off = (PREAMBLE_SIZE + pre[4] + 7) & ~7
    table = np.frombuffer(canon, "<u8", 2 * n_col, table_off).reshape(n_col, 2).copy()
    meta = canon[pre[9]:]
    out = bytearray(canon[:table_off + 16 * n_col])
    for i in range(n_col):
        start = ((len(out) + 63) & ~63) + 64
        block = canon[int(table[i, 0]):int(table[i, 0] + table[i, 1])]
        out += bytes(start - len(out)) + block
        table[i, 0] = start
    out += bytes(64)
    meta_off = len(out)
    out += meta
    out[table_off:table_off + table.nbytes] = table.tobytes()
    pre[8], pre[9] = len(out), meta_off
    out[:PREAMBLE_SIZE] = PREAMBLE.pack(*pre)
    return bytes(out)


def valid_frames() -> dict[str, bytes]:
    n = 5
    mixed = _mixed()
    trimmed = bytes(Trimmer().trim(mixed, Allowlist.from_names(
        ["ctr_7d", "last_pins", "is_new", "not_in_frame"])).data)
    return {
        "dense_every_dtype": encode({f"d_{np.dtype(d).name}": _dense(d, n, seed=i)
                                     for i, d in enumerate(DTYPES)},
                                    {"request_id": "golden-dense"}),
        "ragged_every_dtype": encode({f"r_{np.dtype(d).name}": _ragged(d, [2, 0, 3, 1, 0],
                                                                       seed=i)
                                      for i, d in enumerate(DTYPES)},
                                     {"request_id": "golden-ragged"}),
        "embeddings": encode({"emb_f32": _dense("<f4", 3, (16,), seed=1),
                              "emb_f16": _dense("<f2", 3, (4, 2), seed=2),
                              "cube_u8": _dense("<u1", 3, (2, 3, 2, 2), seed=3),
                              "seq_emb": _ragged("<f4", [2, 1, 0], (4,), seed=4)},
                             {"request_id": "golden-emb"}),
        "mixed": mixed,
        "trimmed": trimmed,
        "candidates_0": encode({"x": _dense("<f8", 0), "ids": _ragged("<i8", []),
                                "emb": _dense("<f4", 0, (3,))}, {"request_id": "c0"}),
        "candidates_1": encode({"x": _dense("<f8", 1, seed=9), "ids": _ragged("<i8", [4]),
                                "flag": _dense("?", 1, seed=2)}, {"request_id": "c1"}),
        "columns_0": encode({}, {"request_id": "f0"}, n_candidates=7),
        "columns_0_candidates_0": encode({}, {}),
        "non_ascii_names": encode({"café_ctr": _dense("<f4", 2, seed=1),
                                   "日本語_ids": _ragged("<i4", [1, 2], seed=2),
                                   "emoji 😀 name": _dense("<u1", 2, seed=3),
                                   "x" * 300: _dense("<i2", 2, seed=4)},
                                  {"request_id": "naïve-☃", "note": "ünïcödé 😀"}),
        "non_canonical_placement": _non_canonical(),
        "metadata_edges": with_metadata(
            _base(), '{"request_id":"edges","pair":"\\ud83d\\ude00","escaped":"\\\\ud800",'
                     '"nul":"\\u0000","tiny":1e-400,"neg":-0.0,"exp":1E+308,'
                     '"big":' + "9" * 4300 + ',"deep":' + "[" * 126 + "]" * 126
                     + ',"esc":"\\"\\\\\\/\\b\\f\\n\\r\\t","ws":[ 1 ,\t2\r\n],'
                       '"café":1,"cafe":2,"caf\\u00e8":3,"😀":4,"\\ud83d\\ude01":5,"日本":6}'),
    }


# --- invalid frames -------------------------------------------------------------------------
def _base() -> bytes:
    return encode({"alpha": _dense("<f4", 3, seed=1), "beta": _ragged("<i8", [1, 0, 2], seed=2),
                   "gamma": _dense("?", 3, seed=3)}, {"request_id": "bad"})


def with_metadata(frame: bytes, meta: str | bytes) -> bytes:
    raw = meta.encode("utf-8", "surrogatepass") if isinstance(meta, str) else meta
    pre = list(PREAMBLE.unpack_from(frame, 0))
    body = frame[:pre[9]] + raw
    pre[8], pre[10] = len(body), len(raw)
    return PREAMBLE.pack(*pre) + body[PREAMBLE_SIZE:]


def _patch(frame: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(frame)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _layout_at(frame: bytes) -> tuple[int, int, int]:
    """(layout offset, n_columns, table offset) of a frame."""
    pre = PREAMBLE.unpack_from(frame, 0)
    return PREAMBLE_SIZE, pre[3], (PREAMBLE_SIZE + pre[4] + 7) & ~7


def _table_entry(frame: bytes, col: int, field: int) -> int:
    return _layout_at(frame)[2] + 16 * col + 8 * field


def _block(frame: bytes, col: int) -> int:
    return struct.unpack_from("<Q", frame, _table_entry(frame, col, 0))[0]


def _names_offset(frame: bytes) -> int:
    lay, n, _ = _layout_at(frame)
    recs = [struct.unpack_from("<BBBBHH", frame, lay + 8 * i) for i in range(n)]
    return lay + 8 * n + 4 * sum(r[2] for r in recs)


def _preamble_cases(b: bytes) -> dict[str, bytes]:
    return {
        "empty": b"",
        "truncated_preamble": b[:40],
        "bad_magic": b"FTRX" + b[4:],
        "version_2": _patch(b, OFF_VERSION, "<H", 2),
        "flags_set": _patch(b, OFF_FLAGS, "<H", 1),
        "reserved_set": _patch(b, OFF_RESERVED0, "<I", 1),
        "reserved_tail_set": _patch(b, 60, "<B", 1),
        "frame_len_short": _patch(b, OFF_FRAME_LEN, "<Q", len(b) - 1),
        "trailing_byte": b + b"\0",
        "truncated_frame": b[:-10],
        "layout_past_end": _patch(b, OFF_LAYOUT_LEN, "<I", len(b)),
        "columns_exceed_layout": _patch(b, OFF_NCOL, "<I", 1000),
        "meta_offset_in_table": _patch(b, OFF_META_OFF, "<Q", 80),
        "meta_len_short": _patch(b, OFF_META_LEN, "<I", 1),
        "meta_offset_huge": _patch(b, OFF_META_OFF, "<Q", (1 << 64) - 8),
    }


def _layout_cases(b: bytes) -> dict[str, bytes]:
    lay, _, _ = _layout_at(b)
    names = _names_offset(b)
    dup2 = bytearray(b)  # names "alpha" "beta" "gamma": rename "gamma" to "alpha"
    dup2[names + 9:names + 14] = b"alpha"
    return {
        "dtype_0": _patch(b, lay, "<B", 0),
        "dtype_13": _patch(b, lay, "<B", 13),
        "kind_2": _patch(b, lay + 1, "<B", 2),
        "ndim_5": _patch(b, lay + 2, "<B", 5),
        "record_reserved": _patch(b, lay + 3, "<B", 1),
        "record_reserved16": _patch(b, lay + 6, "<H", 1),
        "name_len_0": _patch(b, lay + 4, "<H", 0),
        "layout_len_mismatch": _patch(b, lay + 4, "<H", 4),
        "name_not_utf8": _patch(b, names, "<B", 0xFF),
        "name_surrogate_utf8": bytes(b[:names]) + b"\xed\xa0\x80" + bytes(b[names + 3:]),
        "duplicate_name": bytes(dup2),
        "zero_dim": _zero_dim(),
    }


def _zero_dim() -> bytes:
    f = encode({"emb": _dense("<f4", 2, (3,))}, {})
    return _patch(f, PREAMBLE_SIZE + 8, "<I", 0)


def _table_cases(b: bytes) -> dict[str, bytes]:
    o0, o1, o2 = _block(b, 0), _block(b, 1), _block(b, 2)
    e = _table_entry
    return {
        "block_misaligned": _patch(b, e(b, 0, 0), "<Q", o0 + 8),
        "block_in_header": _patch(b, e(b, 0, 0), "<Q", 64),
        "block_overlap": _patch(b, e(b, 1, 0), "<Q", o0),
        "block_out_of_order": _patch(_patch(b, e(b, 1, 0), "<Q", o2), e(b, 2, 0), "<Q", o1),
        "block_past_metadata": _patch(b, e(b, 2, 0), "<Q", o2 + 64),
        "block_huge_offset": _patch(b, e(b, 2, 0), "<Q", (1 << 64) - 64),
        "block_huge_size": _patch(b, e(b, 2, 1), "<Q", (1 << 64) - 1),
        "dense_size_wrong": _patch(b, e(b, 0, 1), "<Q", 8),
        "ragged_smaller_than_head": _patch(b, e(b, 1, 1), "<Q", 32),
        "ragged_partial_value": _patch(b, e(b, 1, 1), "<Q", 64 + 3 * 8 - 4),
    }


def _ragged_cases(b: bytes) -> dict[str, bytes]:
    o1 = _block(b, 1)
    return {
        "offsets_start_nonzero": _patch(b, o1, "<q", 1),
        "offsets_decrease": _patch(b, o1 + 8, "<q", 3),
        "offsets_end_short": _patch(b, o1 + 24, "<q", 2),
        "offsets_negative": _patch(b, o1 + 8, "<q", -1),
    }


def _value_cases(b: bytes) -> dict[str, bytes]:
    ragged_bool = encode({"flags": _ragged("?", [2, 1])}, {})
    vals = _block(ragged_bool, 0) + 64
    return {
        "bool_byte_2": _patch(b, _block(b, 2) + 1, "<B", 2),
        "bool_byte_255": _patch(b, _block(b, 2), "<B", 255),
        "ragged_bool_byte_2": _patch(ragged_bool, vals + 2, "<B", 2),
    }


METADATA_CASES: dict[str, str | bytes] = {
    "not_utf8": b'{"a":"\xff"}',
    "overlong_utf8": b'{"a":"\xc0\xaf"}',
    "encoded_surrogate": b'{"a":"\xed\xa0\x80"}',
    "not_json": '{"request_id": ',
    "empty": "",
    "array": "[1,2]",
    "string": '"x"',
    "nan": '{"a":NaN}',
    "infinity": '{"a":Infinity}',
    "minus_infinity": '{"a":-Infinity}',
    "overflow_float": '{"a":1e400}',
    "overflow_negative": '{"a":-1.8e308}',
    "duplicate_key": '{"a":1,"b":2,"a":3}',
    "duplicate_key_escaped": '{"a":1,"\\u0061":2}',
    "duplicate_key_nested": '{"x":{"k":1,"k":2}}',
    "duplicate_key_non_ascii": '{"caf\\u00e9":1,"café":2}',
    "duplicate_key_pair": '{"😀":1,"z":0,"\\ud83d\\ude00":2}',
    "lone_high_surrogate": '{"a":"\\ud800"}',
    "lone_low_surrogate": '{"a":"\\udc00x"}',
    "reversed_pair": '{"a":"\\ude00\\ud83d"}',
    "single_quotes": "{'a':1}",
    "trailing_comma": '{"a":1,}',
    "trailing_garbage": '{"a":1} x',
    "two_values": '{"a":1}{}',
    "raw_control_char": '{"a":"\x01"}',
    "bad_escape": '{"a":"\\x41"}',
    "leading_zero": '{"a":01}',
    "plus_sign": '{"a":+1}',
    "bare_dot": '{"a":1.}',
    "hex_number": '{"a":0x10}',
    "comment": '{"a":1 /* c */}',
    "too_deep": '{"a":' + "[" * 128 + "]" * 128 + "}",
    "integer_too_long": '{"a":' + "1" * 4301 + "}",
    "bom": "\ufeff{}",
    "true_capital": '{"a":True}',
}


def invalid_frames() -> dict[str, tuple[str, bytes]]:
    b = _base()
    out: dict[str, tuple[str, bytes]] = {}
    groups: list[tuple[str, Callable[[bytes], dict[str, bytes]]]] = [
        ("preamble", _preamble_cases), ("layout", _layout_cases), ("table", _table_cases),
        ("ragged", _ragged_cases), ("value", _value_cases)]
    for cls, make in groups:
        for name, frame in make(b).items():
            out[f"{cls}_{name}"] = (cls, frame)
    for name, meta in METADATA_CASES.items():
        out[f"metadata_{name}"] = ("metadata", with_metadata(b, meta))
    return out


# --- name keys ------------------------------------------------------------------------------
KEY_NAMES = ["ads_ctr", "", "a", "ctr_7d", "last_pins", "café", "日本語", "emoji 😀",
             "x" * 127, "x" * 128, "x" * 129, "y" * 256, "z" * 1000]


def name_key_vectors() -> dict[str, object]:
    rows = []
    for name in KEY_NAMES:
        key = name_key(name)
        rows.append({"name": name, "utf8_hex": name.encode().hex(), "key": f"{key:016x}",
                     "digest": key.to_bytes(8, "little").hex()})
    wrong = hashlib.blake2b(b"ads_ctr").digest()[:8]
    return {"algorithm": "BLAKE2b with digest_size=8 (not BLAKE2b-512 truncated); key = the "
                         "8 digest bytes read as a little-endian uint64",
            "keys": rows,
            "counter_example": {"name": "ads_ctr", "blake2b_512_truncated_key":
                                f"{int.from_bytes(wrong, 'little'):016x}"}}


# --- manifest -------------------------------------------------------------------------------
def _describe(frame: bytes) -> dict[str, object]:
    f = decode(frame)
    pre = PREAMBLE.unpack_from(frame, 0)
    cols = []
    for name, col in f.columns.items():
        if isinstance(col, Ragged):
            cols.append({"name": name, "dtype": col.values.dtype.name, "kind": "ragged",
                         "shape": list(col.values.shape[1:]), "n_values": col.values.shape[0],
                         "values_b2b": b2b(col.values.tobytes()),
                         "offsets_b2b": b2b(col.offsets.tobytes())})
        else:
            cols.append({"name": name, "dtype": col.dtype.name, "kind": "dense",
                         "shape": list(col.shape[1:]), "values_b2b": b2b(col.tobytes())})
    return {"n_candidates": f.n_candidates, "frame_len": len(frame),
            "metadata_b2b": b2b(frame[pre[9]:]), "metadata": f.metadata, "columns": cols}


def build() -> dict[str, bytes]:
    """Every file of the golden directory: relative path -> bytes."""
    files: dict[str, bytes] = {}
    manifest: dict[str, dict[str, object]] = {"valid": {}, "invalid": {}}
    for name, frame in valid_frames().items():
        files[f"valid/{name}.ftrm"] = frame
        manifest["valid"][name] = _describe(frame)
    for name, (cls, frame) in invalid_frames().items():
        try:
            decode(frame)
        except FrameError as exc:
            message = str(exc)
        else:
            raise AssertionError(f"invalid frame {name} decodes")
        files[f"invalid/{name}.ftrm"] = frame
        manifest["invalid"][name] = {"class": cls, "python_error": message}
    files["manifest.json"] = _json(manifest)
    files["name_keys.json"] = _json(name_key_vectors())
    return files


def _json(doc: object) -> bytes:
    return (json.dumps(doc, indent=1, ensure_ascii=False, sort_keys=True) + "\n").encode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare, do not write")
    p.add_argument("--dir", type=Path, default=GOLDEN)
    args = p.parse_args(argv)
    files = build()
    if args.check:
        on_disk = {str(q.relative_to(args.dir)): q.read_bytes()
                   for q in args.dir.rglob("*") if q.is_file()}
        diff = sorted(k for k in set(files) | set(on_disk) if files.get(k) != on_disk.get(k))
        for k in diff:
            print(f"golden: {k} differs from what make_golden.py writes", file=sys.stderr)
        return 1 if diff else 0
    for rel, data in files.items():
        path = args.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for q in args.dir.rglob("*.ftrm"):
        if str(q.relative_to(args.dir)) not in files:
            q.unlink()
    print(f"wrote {len(files)} files under {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
