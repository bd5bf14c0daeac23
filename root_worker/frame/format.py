"""Frame wire format: constants, structs, dtype codes, the error type and layout parsing.

The byte layout is specified in one place, ``docs/frame-format.md``; the constants below are
its names.  This module holds what both the codec (:mod:`root_worker.frame.codec`) and the
trim engine (:mod:`root_worker.frame.trim`) need to read a frame safely: the preamble
checks, the parser of the *layout* section (column names, dtypes, shapes) and the vectorised
validation of the per-request *block table*.  Every check raises :class:`FrameError` with a
message naming what is wrong and where; nothing here reads outside the buffer or allocates
in proportion to a declared (rather than actual) size.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Any

import numpy as np

from flatbuffers_schema.keys import name_keys

# --- sizes and alignment (see docs/frame-format.md) -------------------------------------
MAGIC = b"FTRM"
VERSION = 1
PREAMBLE_SIZE = 64
RECORD_SIZE = 8  # one column record in the layout section
DIM_SIZE = 4  # one uint32 dimension in the layout section
TABLE_ENTRY_SIZE = 16  # (offset u64, nbytes u64) per column in the block table
TABLE_ALIGN = 8
BLOCK_ALIGN = 64  # every data block starts at a multiple of this (relative to frame start)
RAGGED_OFFSET_SIZE = 8  # ragged offsets are int64

MAX_NDIM = 4  # per-candidate (dense) or per-value (ragged) dimensions
MAX_NAME_BYTES = 0xFFFF  # name_len is a uint16
MAX_ELEM_BYTES = (1 << 32) - 1  # itemsize * prod(shape): keeps n_candidates * elem < 2**64
MAX_CANDIDATES = (1 << 32) - 1  # n_candidates is a uint32

KIND_DENSE = 0
KIND_RAGGED = 1

# magic, version, flags, n_columns, layout_len, layout_hint, n_candidates, reserved0,
# frame_len, meta_offset, meta_len, reserved1 (12 bytes)
PREAMBLE = struct.Struct("<4sHHIIQIIQQI12s")
# The three per-request fields the trimmer patches into a prebuilt output preamble.
TAIL = struct.Struct("<QQI")
TAIL_OFFSET = 32
ZERO_RESERVED = bytes(12)
assert PREAMBLE.size == PREAMBLE_SIZE
assert PREAMBLE.size - TAIL_OFFSET - TAIL.size == len(ZERO_RESERVED)

RECORD_DTYPE = np.dtype(
    [("code", "u1"), ("kind", "u1"), ("ndim", "u1"), ("reserved0", "u1"),
     ("name_len", "<u2"), ("reserved1", "<u2")]
)
assert RECORD_DTYPE.itemsize == RECORD_SIZE

# Wire dtype codes.  All multi-byte types are little-endian on the wire.
DTYPE_BY_CODE: dict[int, np.dtype] = {
    1: np.dtype("?"),
    2: np.dtype("<i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<u1"),
    7: np.dtype("<u2"),
    8: np.dtype("<u4"),
    9: np.dtype("<u8"),
    10: np.dtype("<f2"),
    11: np.dtype("<f4"),
    12: np.dtype("<f8"),
}
CODE_BY_DTYPE: dict[np.dtype, int] = {dt: code for code, dt in DTYPE_BY_CODE.items()}
_ITEMSIZE_BY_CODE = np.zeros(256, dtype=np.uint64)
for _code, _dt in DTYPE_BY_CODE.items():
    _ITEMSIZE_BY_CODE[_code] = _dt.itemsize


class FrameError(ValueError):
    """A buffer is not a valid frame.  The message names the field or column at fault."""


def align(n: int, to: int) -> int:
    """Round ``n`` up to a multiple of ``to`` (a power of two)."""
    return (n + to - 1) & ~(to - 1)


def layout_hint(layout: bytes) -> int:
    """The layout fingerprint an encoder writes into the preamble (BLAKE2b-64, LE)."""
    return int.from_bytes(hashlib.blake2b(layout, digest_size=8).digest(), "little")


def ragged_head(n_candidates: int) -> int:
    """Bytes of a ragged block before its values: int64 offsets[C+1] padded to 64."""
    return align(RAGGED_OFFSET_SIZE * (n_candidates + 1), BLOCK_ALIGN)


# --- preamble ---------------------------------------------------------------------------
class Preamble:
    """The decoded fixed 64-byte preamble (see docs/frame-format.md, section 1)."""

    __slots__ = ("n_columns", "layout_len", "hint", "n_candidates", "frame_len",
                 "meta_offset", "meta_len")

    n_columns: int
    layout_len: int
    hint: int
    n_candidates: int
    frame_len: int
    meta_offset: int
    meta_len: int

    def __init__(self, fields: tuple[Any, ...]) -> None:
        (_, _, _, self.n_columns, self.layout_len, self.hint, self.n_candidates, _,
         self.frame_len, self.meta_offset, self.meta_len, _) = fields

    @property
    def layout_end(self) -> int:
        return PREAMBLE_SIZE + self.layout_len

    @property
    def table_offset(self) -> int:
        return align(self.layout_end, TABLE_ALIGN)

    @property
    def table_end(self) -> int:
        return self.table_offset + TABLE_ENTRY_SIZE * self.n_columns


def read_preamble(buf: memoryview) -> Preamble:
    """Unpack and check the preamble and the section bounds it declares."""
    size = buf.nbytes
    if size < PREAMBLE_SIZE:
        raise FrameError(f"truncated preamble: frame is {size} bytes, need {PREAMBLE_SIZE}")
    fields = PREAMBLE.unpack_from(buf, 0)
    magic, version, flags, reserved0, reserved1 = (fields[0], fields[1], fields[2],
                                                    fields[7], fields[11])
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r} at offset 0, expected {MAGIC!r}")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} at offset 4, expected {VERSION}")
    if flags != 0:
        raise FrameError(f"unknown flags {flags:#06x} at offset 6, expected 0")
    if reserved0 != 0 or reserved1 != ZERO_RESERVED:
        raise FrameError("reserved preamble bytes (offsets 28..32, 52..64) are not zero")
    pre = Preamble(fields)
    if pre.frame_len != size:
        raise FrameError(f"preamble frame_len {pre.frame_len} != buffer length {size}")
    if pre.layout_end > size:
        raise FrameError(
            f"layout section [offset {PREAMBLE_SIZE}, {pre.layout_end}) runs past end of "
            f"frame ({size} bytes)")
    if RECORD_SIZE * pre.n_columns > pre.layout_len:
        raise FrameError(
            f"n_columns {pre.n_columns} needs {RECORD_SIZE * pre.n_columns} bytes of column "
            f"records but the layout section is {pre.layout_len} bytes")
    if pre.table_end > size:
        raise FrameError(
            f"block table [offset {pre.table_offset}, {pre.table_end}) for {pre.n_columns} "
            f"columns runs past end of frame ({size} bytes)")
    meta_end = pre.meta_offset + pre.meta_len
    if pre.meta_offset < pre.table_end or meta_end != size:
        raise FrameError(
            f"metadata [offset {pre.meta_offset}, {meta_end}) must lie after the block table "
            f"(ends at {pre.table_end}) and end the frame ({size} bytes)")
    return pre


# --- layout section -----------------------------------------------------------------------
class Layout:
    """The parsed, validated layout section: what a frame's columns are, not their sizes.

    Immutable and shared (cached by :class:`LayoutCache`), so one parse serves every
    request that repeats the layout.  ``raw`` is the exact section bytes.
    """

    __slots__ = ("raw", "hint", "n_columns", "names", "records", "ragged", "ragged_idx", "dtypes",
                 "shapes",
                 "elem_size", "dims_spans", "name_spans", "_keys")

    def __init__(self, raw: bytes, n_columns: int) -> None:
        self.raw = raw
        self.hint = layout_hint(raw)  # the true fingerprint, whatever the preamble says
        self.n_columns = n_columns
        self._keys: np.ndarray | None = None
        self.records = np.frombuffer(raw, dtype=RECORD_DTYPE, count=n_columns)
        self._check_records()
        self._parse_variable_parts()

    def label(self, i: int) -> str:
        """``column 17 'feat_x'`` (or ``column 17`` before names are parsed)."""
        names = getattr(self, "names", None)
        return f"column {i} {names[i]!r}" if names is not None else f"column {i}"

    def _fail_first(self, bad: np.ndarray, why: str, values: np.ndarray) -> None:
        if bad.any():
            i = int(np.argmax(bad))
            raise FrameError(f"{self.label(i)}: {why} {int(values[i])}")

    def _check_records(self) -> None:
        rec = self.records
        self._fail_first(rec["kind"] > KIND_RAGGED, "unknown column kind", rec["kind"])
        self._fail_first(rec["ndim"] > MAX_NDIM, f"ndim above {MAX_NDIM}:", rec["ndim"])
        self._fail_first(rec["reserved0"] != 0, "reserved record byte is", rec["reserved0"])
        self._fail_first(rec["reserved1"] != 0, "reserved record field is", rec["reserved1"])
        self._fail_first(rec["name_len"] == 0, "empty name, name_len", rec["name_len"])
        dims_len = DIM_SIZE * int(rec["ndim"].sum(dtype=np.uint64))
        names_len = int(rec["name_len"].sum(dtype=np.uint64))
        declared = RECORD_SIZE * self.n_columns + dims_len + names_len
        if declared != len(self.raw):
            raise FrameError(
                f"layout section is {len(self.raw)} bytes but its {self.n_columns} column "
                f"records declare {declared} (records + {dims_len} dims + {names_len} names)")

    def _parse_variable_parts(self) -> None:
        rec, raw, n = self.records, self.raw, self.n_columns
        ndim = rec["ndim"].astype(np.int64)
        dims_start = RECORD_SIZE * n
        dim_ends = np.cumsum(ndim)
        dims = np.frombuffer(raw, dtype="<u4", count=int(dim_ends[-1]) if n else 0,
                             offset=dims_start)
        name_ends = np.cumsum(rec["name_len"].astype(np.int64)) + dims_start + dims.nbytes
        name_starts = name_ends - rec["name_len"]
        self.dims_spans = np.stack([dims_start + DIM_SIZE * (dim_ends - ndim),
                                    dims_start + DIM_SIZE * dim_ends], axis=1)
        self.name_spans = np.stack([name_starts, name_ends], axis=1)
        self.names = self._decode_names(name_starts.tolist(), name_ends.tolist())
        self.ragged = rec["kind"] == KIND_RAGGED
        self.ragged_idx = np.flatnonzero(self.ragged)
        self._parse_types(dims, (dim_ends - ndim).tolist(), dim_ends.tolist())

    def _decode_names(self, starts: list[int], ends: list[int]) -> tuple[str, ...]:
        names: list[str] = []
        seen: dict[str, int] = {}
        for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
            try:
                name = self.raw[a:b].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FrameError(f"column {i}: name bytes [layout offset {a}, {b}) are not "
                                 f"valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if name in seen:
                raise FrameError(f"column {i} {name!r}: duplicate name (also column "
                                 f"{seen[name]})")
            seen[name] = i
            names.append(name)
        return tuple(names)

    def _parse_types(self, dims: np.ndarray, d0: list[int], d1: list[int]) -> None:
        codes = self.records["code"]
        itemsize = _ITEMSIZE_BY_CODE[codes]
        self._fail_first(itemsize == 0, "unknown dtype code", codes)
        if dims.size and int(dims.min()) == 0:
            col = int(np.searchsorted(np.asarray(d1), int(np.argmin(dims)), side="right"))
            raise FrameError(f"{self.label(col)}: shape has a zero dimension")
        dims_list = dims.tolist()
        shapes = [tuple(dims_list[a:b]) for a, b in zip(d0, d1, strict=True)]
        elem = [int(s) for s in itemsize.tolist()]
        for i, shape in enumerate(shapes):
            for d in shape:
                elem[i] *= d
            if elem[i] > MAX_ELEM_BYTES:
                raise FrameError(f"{self.label(i)}: shape {shape} makes {elem[i]} bytes per "
                                 f"element, above the limit {MAX_ELEM_BYTES}")
        self.shapes = tuple(shapes)
        self.elem_size = np.asarray(elem, dtype=np.uint64)
        self.dtypes = tuple(DTYPE_BY_CODE[c] for c in codes.tolist())

    @property
    def keys(self) -> np.ndarray:
        """Stable 64-bit name keys (:func:`flatbuffers_schema.keys.name_key`), lazily."""
        if self._keys is None:
            self._keys = name_keys(self.names)
        return self._keys


class LayoutCache:
    """Bounded LRU of parsed layouts, keyed by the true layout hint, verified by content.

    A lookup first tries the preamble's hint (free); if that slot holds different bytes the
    hint is wrong (forged, stale, or an encoder that does not compute it), so the true hint
    is computed (one BLAKE2b over the layout) and used instead.  A wrong hint therefore costs
    a hash per request, never a re-parse, and can never evict the entry of a correct one.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self._max = max_entries
        self._entries: OrderedDict[int, Layout] = OrderedDict()

    def lookup(self, hint: int, n_columns: int, raw: bytes) -> Layout | None:
        entry = self._entries.get(hint)
        if entry is not None and entry.n_columns == n_columns and entry.raw == raw:
            lru_touch(self._entries, hint)
            return entry
        return None

    def get(self, hint: int, n_columns: int, raw: bytes) -> Layout:
        """The parsed layout of ``raw`` (parsing and validating it on a miss)."""
        layout = self.lookup(hint, n_columns, raw)
        if layout is None:
            true_hint = layout_hint(raw)
            layout = None if true_hint == hint else self.lookup(true_hint, n_columns, raw)
            if layout is None:
                layout = Layout(raw, n_columns)
                lru_put(self._entries, layout.hint, layout, self._max)
        return layout


def lru_touch(cache: OrderedDict[Any, Any], key: Any) -> None:
    """Mark ``key`` most recently used (no-op if a concurrent caller evicted it)."""
    try:
        cache.move_to_end(key)
    except KeyError:
        pass


def lru_put(cache: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """Insert as most recent and evict the oldest; each step is atomic under the GIL, so
    concurrent callers can interleave without raising (at worst an entry is rebuilt)."""
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > limit:
        try:
            cache.popitem(last=False)
        except KeyError:  # emptied concurrently
            break


def check_table(layout: Layout, table: np.ndarray, n_candidates: int, data_start: int,
                data_end: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate the block table (F x 2 uint64: offset, nbytes) against a layout.

    Blocks must be 64-byte aligned, in column order, non-overlapping, inside
    ``[data_start, data_end)``, and exactly as large as the layout and ``n_candidates``
    imply (ragged: the offsets head plus a whole number of values).  Returns
    ``(offsets, nbytes)`` as uint64 arrays.  Vectorised; the first bad column is then
    re-checked in Python to word the error.
    """
    off, nb = table[:, 0], table[:, 1]
    bad = _bad_blocks(layout, off, nb, n_candidates, data_start, data_end)
    if bad.any():
        _explain_block(layout, off, nb, n_candidates, data_start, data_end,
                       int(np.argmax(bad)))
    return off, nb


def _bad_blocks(layout: Layout, off: np.ndarray, nb: np.ndarray, n_candidates: int,
                data_start: int, data_end: int) -> np.ndarray:
    cap = np.uint64(data_end + 1)  # clip before adding: no uint64 wrap-around
    end = np.minimum(off, cap) + np.minimum(nb, cap)
    bad = (off & np.uint64(BLOCK_ALIGN - 1)) != 0
    bad |= off < data_start
    bad |= end > data_end
    bad[1:] |= off[1:] < end[:-1]
    size_ok = nb == np.uint64(n_candidates) * layout.elem_size  # right for dense columns
    r = layout.ragged_idx
    if r.size:
        head = np.uint64(ragged_head(n_candidates))
        nb_r = nb[r]
        values_nb = nb_r - np.minimum(nb_r, head)
        size_ok[r] = (nb_r >= head) & (values_nb % layout.elem_size[r] == 0)
    bad |= ~size_ok
    return np.asarray(bad, dtype=bool)


def _explain_block(layout: Layout, off: np.ndarray, nb: np.ndarray, n_candidates: int,
                   data_start: int, data_end: int, i: int) -> None:
    o, n, label = int(off[i]), int(nb[i]), layout.label(i)
    span = f"block [offset {o}, {o + n})"
    if o % BLOCK_ALIGN:
        raise FrameError(f"{label}: {span} is not aligned to {BLOCK_ALIGN} bytes")
    if o < data_start:
        raise FrameError(f"{label}: {span} starts inside the header (data starts at "
                         f"{data_start})")
    if o + n > data_end:
        raise FrameError(f"{label}: {span} runs past end of data (metadata starts at "
                         f"{data_end})")
    if i and o < int(off[i - 1]) + int(nb[i - 1]):
        raise FrameError(f"{label}: {span} overlaps or precedes the block of "
                         f"{layout.label(i - 1)}, which ends at {int(off[i - 1]) + int(nb[i - 1])}")
    elem = int(layout.elem_size[i])
    if not layout.ragged[i]:
        raise FrameError(f"{label}: dense {span} is {n} bytes, expected {n_candidates * elem} "
                         f"({n_candidates} candidates x {elem} bytes)")
    head = ragged_head(n_candidates)
    if n < head:
        raise FrameError(f"{label}: ragged {span} is {n} bytes, smaller than its "
                         f"{head}-byte offsets head ({n_candidates} candidates)")
    raise FrameError(f"{label}: ragged {span} holds {n - head} value bytes, not a multiple "
                     f"of the {elem}-byte element")
