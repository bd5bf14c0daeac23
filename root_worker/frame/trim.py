"""The trim engine: keep exactly the allowlisted columns of a frame, bytes unchanged.

Per request the work is: unpack the 64-byte preamble, look the plan up by
``(layout_hint, allowlist.digest)``, verify the layout bytes equal the plan's (memcmp), look
the size plan up by ``(n_candidates, meta_offset)`` and verify the block table bytes
(memcmp), then write the prebuilt output header, copy the kept byte runs and the metadata.

The hint is never trusted: a plan is always applied to exactly the layout and block table
bytes it was validated against.  Plans and parsed layouts are stored under the *true* layout
hash, so a frame with a forged, stale or zero hint costs one BLAKE2b of its layout per
request and can neither get a wrong trim nor evict a correctly hinted plan.  Plans hold no
reference to the allowlist's key array (it is usually a view on a shared-memory map that
must be free to go away).

Two cache levels, both bounded LRU:

* ``_Plan`` per (layout, allowlist): kept column indices, the output layout section and its
  hint, the missing-feature count.  Built once per layout and model version.
* ``_SizePlan`` per plan and block table: the full output header (preamble with the three
  per-request fields patched at write time, layout, block table, padding) and the coalesced
  copy runs.  Dense frames with a repeated candidate count always hit; ragged frames take
  the vectorised build (tens of microseconds for thousands of columns).

On the C backend a size plan hit a second time is also packed (``_copyruns.pack_plan``) into
``Trimmer._fast``, keyed by ``(layout_hint, allowlist digest, n_candidates, meta_offset)``;
from then on ``_copyruns.fast_trim`` serves the request in one C call: the preamble checks,
a ``memcmp`` of the layout section, the block table check (an arithmetic check when the
table is ``offset = base + i * stride, nbytes = constant``, as in a canonical frame whose
columns all have one size; a ``memcmp`` otherwise), the header, the runs and the metadata.
It returns ``None`` -- having written nothing -- whenever anything differs, and the general
path below takes over (and words the errors).  Consecutive fast calls copy the runs in
alternating order (first run first, then last run first), so that repeated trims of one
frame -- a fan-out to several targets -- start where the previous copy ended, in cache.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np

from flatbuffers_schema.keys import Allowlist
from root_worker.frame.backends import (
    BACKENDS,
    UniformRows,
    copy_runs_loop,
    fast_trim_c,
    pack_plan_c,
    same_bytes_c,
    same_bytes_py,
    uniform_rows,
    write_frame_c,
)
from root_worker.frame.codec import as_bytes_view
from root_worker.frame.format import (
    BLOCK_ALIGN,
    MAGIC,
    PREAMBLE,
    PREAMBLE_SIZE,
    TABLE_ALIGN,
    TABLE_ENTRY_SIZE,
    TAIL,
    TAIL_OFFSET,
    VERSION,
    ZERO_RESERVED,
    FrameError,
    Layout,
    LayoutCache,
    Preamble,
    align,
    check_table,
    layout_hint,
    lru_put,
    lru_touch,
    read_preamble,
)

_new_tuple = tuple.__new__  # builds a TrimResult without the Python-level __new__ frame
# Key of the C fast-path cache: layout hint, allowlist digest, n_candidates, meta_offset
# (the byte string _copyruns.fast_trim builds from a frame's preamble).
_FAST_KEY = struct.Struct("<QQQQ")
_U64_MAX = (1 << 64) - 1
_U64_ALIGN_MASK = np.uint64(~(BLOCK_ALIGN - 1) & 0xFFFF_FFFF_FFFF_FFFF)


class TrimResult(NamedTuple):
    """Outcome of one trim.  ``data`` views the output (the caller's ``out`` if given)."""

    data: memoryview
    bytes_in: int
    bytes_out: int
    n_kept: int
    n_missing: int


class _SizePlan:
    """Output of one (plan, block table): prebuilt header and copy runs.  ``runs_list`` and
    ``uniform`` serve only the numpy backend and are left empty for the C one."""

    __slots__ = ("table", "header", "out_meta_offset", "runs", "runs_list", "uniform",
                 "fast_entry")

    def __init__(self, table: bytes, header: bytes, out_meta_offset: int, runs: np.ndarray,
                 uniform: UniformRows | None, for_python: bool) -> None:
        self.table = table
        self.header = header
        self.out_meta_offset = out_meta_offset
        self.runs = runs
        self.runs_list: list[tuple[int, int, int]] = (
            [(s, d, n) for s, d, n in runs.tolist()] if for_python else [])
        self.uniform = uniform
        self.fast_entry: tuple[bytes, bytes] | None = None  # (layout, pack_plan blob)


class _Plan:
    """Kept columns of one layout under one allowlist, and the output layout section."""

    __slots__ = ("layout", "layout_raw", "n_columns", "layout_len", "table_offset", "kept",
                 "n_kept", "n_missing", "out_layout", "out_hint", "out_table_offset",
                 "out_table_end", "sizes")

    def __init__(self, layout: Layout, allowlist: Allowlist) -> None:
        self.layout = layout
        self.layout_raw = layout.raw
        self.n_columns = layout.n_columns
        self.layout_len = len(layout.raw)
        self.table_offset = align(PREAMBLE_SIZE + self.layout_len, TABLE_ALIGN)
        keys = layout.keys
        allowed = np.unique(np.asarray(allowlist.keys, dtype=np.uint64))
        self.kept = np.flatnonzero(np.isin(keys, allowed))
        self.n_kept = int(self.kept.size)
        self.n_missing = int(np.count_nonzero(~np.isin(allowed, keys)))
        raw = layout.raw
        records = layout.records[self.kept].tobytes()
        dims = b"".join(raw[a:b] for a, b in layout.dims_spans[self.kept].tolist())
        names = b"".join(raw[a:b] for a, b in layout.name_spans[self.kept].tolist())
        self.out_layout = records + dims + names
        self.out_hint = layout_hint(self.out_layout)
        self.out_table_offset = align(PREAMBLE_SIZE + len(self.out_layout), TABLE_ALIGN)
        self.out_table_end = self.out_table_offset + TABLE_ENTRY_SIZE * self.n_kept
        self.sizes: OrderedDict[tuple[int, int], _SizePlan] = OrderedDict()

    def size_plan(self, src: memoryview, pre: Preamble, for_python: bool) -> _SizePlan:
        """Validate this request's block table and build its output header and runs."""
        n_columns = self.layout.n_columns
        table_raw = src[pre.table_offset:pre.table_end].tobytes()
        table = np.frombuffer(table_raw, dtype="<u8").reshape(n_columns, 2)
        off, nb = check_table(self.layout, table, pre.n_candidates, pre.table_end,
                              pre.meta_offset)
        k_off, k_nb = off[self.kept], nb[self.kept]
        padded = (k_nb + np.uint64(BLOCK_ALIGN - 1)) & _U64_ALIGN_MASK
        data_start = align(self.out_table_end, BLOCK_ALIGN)
        out_off = np.zeros(self.n_kept, dtype=np.uint64)
        np.cumsum(padded[:-1], out=out_off[1:])
        out_off += np.uint64(data_start)
        if self.n_kept:
            out_meta = int(out_off[-1] + k_nb[-1])
            header_len = data_start
        else:
            out_meta = header_len = self.out_table_end
        out_table_arr = np.empty((self.n_kept, 2), dtype="<u8")
        out_table_arr[:, 0] = out_off
        out_table_arr[:, 1] = k_nb
        out_table = out_table_arr.tobytes()
        preamble = PREAMBLE.pack(MAGIC, VERSION, 0, self.n_kept, len(self.out_layout),
                                 self.out_hint, pre.n_candidates, 0, 0, out_meta, 0,
                                 ZERO_RESERVED)
        header = bytearray(header_len)
        header[:PREAMBLE_SIZE] = preamble
        header[PREAMBLE_SIZE:PREAMBLE_SIZE + len(self.out_layout)] = self.out_layout
        header[self.out_table_offset:self.out_table_end] = out_table
        runs = _coalesced_runs(k_off, k_nb, padded, out_off)
        uniform = (uniform_rows(self.kept, k_off, k_nb, data_start, BLOCK_ALIGN)
                   if for_python else None)
        return _SizePlan(table_raw, bytes(header), out_meta, runs, uniform, for_python)


def _coalesced_runs(k_off: np.ndarray, k_nb: np.ndarray, padded: np.ndarray,
                    out_off: np.ndarray) -> np.ndarray:
    """(src, dst, len) int64 runs: each kept block with its padding (none after the last),
    merged while consecutive kept blocks are contiguous in the input."""
    if k_off.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    starts = np.ones(k_off.size, dtype=bool)
    starts[1:] = k_off[1:] != k_off[:-1] + padded[:-1]
    first = np.flatnonzero(starts)
    runs = np.empty((first.size, 3), dtype=np.int64)
    runs[:, 0] = k_off[first]
    runs[:, 1] = out_off[first]
    # A run spans from its first block to the end of its last one (no padding after the
    # frame's last kept block): the next run's output offset, or the end of the data.
    ends = np.empty(first.size, dtype=np.int64)
    ends[:-1] = out_off[first[1:]]
    ends[-1] = int(out_off[-1] + k_nb[-1])
    runs[:, 2] = ends - runs[:, 1]
    return runs


class Trimmer:
    """Trims frames to allowlists with cached plans (one instance per worker process).

    ``backend`` is ``"c"`` (the ``_copyruns`` extension, default when built) or ``"numpy"``
    (pure fallback).  Thread-safe in the sense that concurrent calls never produce a wrong
    result; they may occasionally build the same plan twice.
    """

    def __init__(self, max_plans: int = 256, max_sizes_per_plan: int = 16,
                 backend: str | None = None) -> None:
        backend = backend or BACKENDS[0]
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not available (have {BACKENDS})")
        self.backend = backend
        self._use_c = backend == "c"
        self._same = same_bytes_c if self._use_c else same_bytes_py
        self._max_plans = max_plans
        self._max_sizes = max_sizes_per_plan
        self._plans: OrderedDict[tuple[int, int], _Plan] = OrderedDict()
        self._layouts = LayoutCache(max_plans)
        # C backend: _FAST_KEY bytes -> (layout bytes, pack_plan blob) for size plans seen
        # at least twice, served by _copyruns.fast_trim in one call.  Bounded, oldest out.
        self._fast: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()
        self._max_fast = max(1, max_plans * max_sizes_per_plan)

    def trim(self, buf: Any, allowlist: Allowlist, out: Any = None) -> TrimResult:
        """Return a frame with exactly the columns of ``buf`` whose name keys are in
        ``allowlist``, in their original order, block bytes and metadata unchanged.

        ``out``: a writable byte buffer (``bytearray``, ``np.uint8`` array, ...) to write
        into; the output is never longer than the input, so ``len(buf)`` bytes always
        suffice.  Without it a new buffer is allocated.  Raises :class:`FrameError` for a
        malformed frame, ``ValueError`` if ``out`` is too small.
        """
        if self._use_c:
            # Steady state: one C call verifies the preamble, the layout and the block table
            # against the cached plan and writes the output; None means "not that simple".
            res = fast_trim_c(self._fast, buf, out, allowlist.digest, TrimResult)
            if res is not None:
                return res  # type: ignore[no-any-return]
        return self._trim(buf, allowlist, out)

    def _trim(self, buf: Any, allowlist: Allowlist, out: Any) -> TrimResult:
        """The general path: every check with its worded error, plan (re)building."""
        src = buf if type(buf) is bytes else as_bytes_view(buf)
        n = len(src)
        if n < PREAMBLE_SIZE:
            read_preamble(as_bytes_view(src))
        (magic, version, flags, n_columns, layout_len, hint, n_cand, reserved0, frame_len,
         meta_off, meta_len, reserved1) = PREAMBLE.unpack_from(src, 0)
        if (magic != MAGIC or version != VERSION or flags or reserved0 or frame_len != n
                or meta_off + meta_len != n or reserved1 != ZERO_RESERVED):
            read_preamble(as_bytes_view(src))  # raises the precise error
        key = (hint, allowlist.digest)
        plan = self._plans.get(key)
        if (plan is not None and plan.n_columns == n_columns and plan.layout_len == layout_len
                and self._same(src, PREAMBLE_SIZE, plan.layout_raw)):
            lru_touch(self._plans, key)
        else:
            plan = self._new_plan(src, allowlist)
        sizes = plan.sizes.get((n_cand, meta_off))
        if sizes is None or not self._same(src, plan.table_offset, sizes.table):
            sizes = self._new_size_plan(plan, src)
        else:
            if len(plan.sizes) > 1:
                lru_touch(plan.sizes, (n_cand, meta_off))
            if self._use_c and hint == plan.layout.hint and 0 <= allowlist.digest <= _U64_MAX:
                # A repeated block table (dense frames): serve it from C from now on.  Only
                # under the true layout hint, so wrong hints never occupy fast slots.
                self._install_fast(_FAST_KEY.pack(hint, allowlist.digest, n_cand, meta_off),
                                   plan, sizes, n_cand, meta_off)
        out_meta = sizes.out_meta_offset
        out_len = out_meta + meta_len
        if out is None:
            dst = memoryview(bytearray(out_len))
        else:
            dst = memoryview(out)
            if dst.readonly or dst.nbytes < out_len or dst.format != "B" or dst.ndim != 1:
                dst = _output_view(dst, out_len)
        if self._use_c:
            write_frame_c(dst, src, sizes.header, sizes.runs, meta_off, meta_len, out_meta)
        else:
            _write_frame_py(dst, as_bytes_view(src), sizes, meta_off, meta_len)
        return _new_tuple(TrimResult, (dst[:out_len], n, out_len, plan.n_kept, plan.n_missing))

    def _new_plan(self, src: Any, allowlist: Allowlist) -> _Plan:
        """Plan for a frame whose preamble hint missed: find it under the true layout hint
        (a wrong hint costs one hash, and never evicts a correctly hinted plan), else build
        it."""
        src = as_bytes_view(src)
        pre = read_preamble(src)
        raw = src[PREAMBLE_SIZE:pre.layout_end].tobytes()
        layout = self._layouts.get(pre.hint, pre.n_columns, raw)
        key = (layout.hint, allowlist.digest)
        plan = self._plans.get(key)
        if plan is None or plan.layout is not layout:
            plan = _Plan(layout, allowlist)
            lru_put(self._plans, key, plan, self._max_plans)
        return plan

    def _new_size_plan(self, plan: _Plan, src: Any) -> _SizePlan:
        src = as_bytes_view(src)
        pre = read_preamble(src)
        sizes = plan.size_plan(src, pre, for_python=not self._use_c)
        lru_put(plan.sizes, (pre.n_candidates, pre.meta_offset), sizes, self._max_sizes)
        return sizes

    def _install_fast(self, key: bytes, plan: _Plan, sizes: _SizePlan, n_cand: int,
                      meta_off: int) -> None:
        entry = sizes.fast_entry
        if entry is None:
            try:
                blob = pack_plan_c(plan.n_columns, plan.layout_len, n_cand, meta_off,
                                   plan.table_offset, sizes.table, sizes.header,
                                   plan.out_table_offset, sizes.runs, sizes.out_meta_offset,
                                   plan.n_kept, plan.n_missing)
            except ValueError:  # e.g. a run of 4 GiB or more: stays on the general path
                blob = b""
            entry = sizes.fast_entry = (plan.layout_raw, blob)
        if not entry[1]:
            return
        fast = self._fast
        if fast.get(key) is entry:
            return
        fast[key] = entry
        while len(fast) > self._max_fast:
            try:
                fast.popitem(last=False)
            except KeyError:  # emptied concurrently
                break

    def clear(self) -> None:
        """Drop every cached plan and layout."""
        self._plans.clear()
        self._fast.clear()
        self._layouts = LayoutCache(self._max_plans)


def _write_frame_py(dst: memoryview, src: memoryview, sizes: _SizePlan, meta_off: int,
                    meta_len: int) -> None:
    """Pure-Python twin of ``_copyruns.write_frame``: header, patched tail, blocks, metadata."""
    out_meta = sizes.out_meta_offset
    dst[:len(sizes.header)] = sizes.header
    TAIL.pack_into(dst, TAIL_OFFSET, out_meta + meta_len, out_meta, meta_len)
    if sizes.uniform is not None:
        sizes.uniform.copy(dst, src)
    else:
        copy_runs_loop(dst, src, sizes.runs_list)
    dst[out_meta:out_meta + meta_len] = src[meta_off:meta_off + meta_len]


def _output_view(out: memoryview, out_len: int) -> memoryview:
    """Cast a caller's ``out`` to flat bytes, or say why it cannot hold the output."""
    dst = out
    if dst.format != "B" or dst.ndim != 1:
        dst = dst.cast("B")
    if dst.readonly:
        raise ValueError("out buffer is read-only")
    if dst.nbytes < out_len:
        raise ValueError(f"out buffer has {dst.nbytes} bytes, the trimmed frame needs "
                         f"{out_len}")
    return dst


_DEFAULT = Trimmer()


def trim(buf: Any, allowlist: Allowlist, out: Any = None) -> TrimResult:
    """Trim with the module's default :class:`Trimmer` (see :meth:`Trimmer.trim`)."""
    return _DEFAULT.trim(buf, allowlist, out)


__all__ = ["FrameError", "TrimResult", "Trimmer", "trim"]
