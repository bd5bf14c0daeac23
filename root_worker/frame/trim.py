"""The trim engine: keep exactly the allowlisted columns of a frame, bytes unchanged.

Runs in the root workers (one :class:`Trimmer` per process; creating it before fork is
harmless, each worker warms its own caches).

Per request on the C backend the work is one C call -- :meth:`Trimmer.trim` is then the
``_copyruns.trim_entry`` callable itself (no Python frame, argument tuple or keyword
dict), doing ``_copyruns.plan_trim``'s work (``plan_parts`` for
:meth:`Trimmer.trim_parts`) -- over the cached plan of the frame's ``(layout_hint,
allowlist.digest)``: check the preamble, ``memcmp`` the layout section against the
plan's, validate *this request's* block table for every column (alignment, order,
overlap, bounds, exact sizes -- block tables change with every request's ragged lengths
and ``n_candidates``, so they are never cached), optionally the offsets head of every
kept ragged column, then write the canonical output header and copy the coalesced kept
runs and the metadata.  It returns ``None`` -- having written nothing -- whenever there
is no plan yet or anything is invalid or odd, and the general path below takes over: it
re-validates in numpy, words the error, and builds and installs the plan.

The hint is never trusted: a plan is applied only to exactly the layout bytes it was
built from.  Plans and parsed layouts are stored under the *true* layout hash, so a frame
with a forged, stale or zero hint costs one BLAKE2b of its layout per request (on the
general path) and can neither get a wrong trim nor evict a correctly hinted plan.  Plans
hold no reference to the allowlist's key array (it is usually a view on a shared-memory
map that must be free to go away).

Cache levels, all bounded LRU (:class:`~root_worker.frame.lru.LruCache`):

* ``_Plan`` per (layout, allowlist): kept column indices, the output layout section and its
  hint, the missing-feature count; on the C backend also an opaque ``_copyruns.Plan``
  (``make_plan``) in ``Trimmer._fast``, which the C calls read (they refuse anything else
  there).

Aliasing: ``out`` may share memory with ``buf`` (``out=buf`` trims in place, a shifted view
of one buffer works too); the output is then exactly what a separate ``out`` would get, on
both backends, because the input is copied whole before anything is written.
* ``_SizePlan`` per plan and block table, for the general path and the numpy backend: the
  full output header and the coalesced copy runs (dense frames with a repeated candidate
  count always hit; ragged frames take the vectorised build).

Consecutive C calls copy the runs in alternating order (first run first, then last run
first), so that repeated trims of one frame -- a fan-out to several targets -- start where
the previous copy ended, in cache.
"""

from __future__ import annotations

import os
import struct
from types import MethodType
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from flatbuffers_schema.keys import Allowlist
from root_worker.frame.backends import (
    BACKENDS,
    UniformRows,
    make_plan_c,
    plan_parts_c,
    plan_trim_c,
    same_bytes_c,
    same_bytes_py,
    trim_entry_c,
    uniform_rows,
    write_frame_c,
    write_frame_py,
)
from root_worker.frame.codec import Buffer, as_bytes_view
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
    check_ragged_offsets,
    check_table,
    layout_hint,
    read_preamble,
)
from root_worker.frame.lru import LruCache

_new_tuple = tuple.__new__  # builds a TrimResult without the Python-level __new__ frame
# Key of the C plan cache: layout hint, allowlist digest (the byte string
# _copyruns.plan_trim builds from a frame's preamble and the digest).
_PLAN_KEY = struct.Struct("<QQ")
_U64_MAX = (1 << 64) - 1
_U64_ALIGN_MASK = np.uint64(~(BLOCK_ALIGN - 1) & 0xFFFF_FFFF_FFFF_FFFF)
_IOV_MAX_FALLBACK = 1024  # Linux's UIO_MAXIOV, where sysconf cannot say


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        return _IOV_MAX_FALLBACK
    return value if value > 0 else _IOV_MAX_FALLBACK


#: The most buffers one ``sendmsg`` accepts on this host: the default bound of
#: :meth:`Trimmer.trim_parts` lists.
IOV_MAX = _iov_max()


class TrimResult(NamedTuple):
    """Outcome of one trim.  ``data`` views the output (the caller's ``out`` if given)."""

    data: memoryview
    bytes_in: int
    bytes_out: int
    n_kept: int
    n_missing: int


class TrimParts(NamedTuple):
    """Outcome of :meth:`Trimmer.trim_parts`: the trimmed frame as ``parts`` (header bytes,
    views of the input's kept runs, a view of its metadata; or one contiguous copy), whose
    concatenation is ``bytes_out`` bytes.  The views are valid while the input buffer is."""

    parts: list[Buffer]
    bytes_in: int
    bytes_out: int
    n_kept: int
    n_missing: int


class _SizePlan:
    """Output of one (plan, block table): prebuilt header and copy runs.  ``uniform`` serves
    only the numpy backend and is left empty for the C one."""

    __slots__ = ("table", "header", "out_meta_offset", "runs", "runs_list", "uniform")

    def __init__(self, table: bytes, header: bytes, out_meta_offset: int,
                 runs: NDArray[np.int64], uniform: UniformRows | None) -> None:
        self.table = table
        self.header = header
        self.out_meta_offset = out_meta_offset
        self.runs = runs
        self.runs_list: list[tuple[int, int, int]] = [(s, d, n) for s, d, n in runs.tolist()]
        self.uniform = uniform


class _Request(NamedTuple):
    """One validated request on the general path."""

    src: Buffer
    bytes_in: int
    plan: _Plan
    sizes: _SizePlan
    meta_offset: int
    meta_len: int


class _Plan:
    """Kept columns of one layout under one allowlist, and the output layout section."""

    __slots__ = ("layout", "layout_raw", "n_columns", "layout_len", "table_offset", "kept",
                 "n_kept", "n_missing", "out_layout", "out_hint", "out_table_offset",
                 "out_table_end", "out_prefix", "sizes", "c_entry")

    def __init__(self, layout: Layout, allowlist: Allowlist, max_sizes: int) -> None:
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
        # The output header up to its block table; n_candidates and the tail are per request.
        prefix = bytearray(self.out_table_offset)
        PREAMBLE.pack_into(prefix, 0, MAGIC, VERSION, 0, self.n_kept, len(self.out_layout),
                           self.out_hint, 0, 0, 0, 0, 0, ZERO_RESERVED)
        prefix[PREAMBLE_SIZE:PREAMBLE_SIZE + len(self.out_layout)] = self.out_layout
        self.out_prefix = bytes(prefix)
        self.sizes: LruCache[tuple[int, int], _SizePlan] = LruCache(max_sizes)
        # the _copyruns.Plan the C calls read from Trimmer._fast
        self.c_entry: Any = None

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
        header[:self.out_table_offset] = self.out_prefix
        header[:PREAMBLE_SIZE] = preamble
        header[self.out_table_offset:self.out_table_end] = out_table
        runs = _coalesced_runs(k_off, k_nb, padded, out_off)
        uniform = (uniform_rows(self.kept, k_off, k_nb, data_start, BLOCK_ALIGN)
                   if for_python else None)
        return _SizePlan(table_raw, bytes(header), out_meta, runs, uniform)


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
    (pure fallback).  ``max_parts`` bounds the list :meth:`trim_parts` returns (default: the
    host's ``IOV_MAX``, the most buffers one ``sendmsg`` takes).  Thread-safe in the sense
    that concurrent calls never produce a wrong result; they may occasionally build the
    same plan twice.
    """

    def __init__(self, max_plans: int = 256, max_sizes_per_plan: int = 16,
                 backend: str | None = None, max_parts: int = IOV_MAX) -> None:
        backend = backend or BACKENDS[0]
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not available (have {BACKENDS})")
        if max_parts < 1:
            raise ValueError(f"max_parts must be at least 1, got {max_parts}")
        self.backend = backend
        self.max_parts = max_parts
        self._use_c = backend == "c"
        self._same = same_bytes_c if self._use_c else same_bytes_py
        self._plan_trim = plan_trim_c if self._use_c else _declined
        self._max_plans = max_plans
        self._max_sizes = max_sizes_per_plan
        self._plans: LruCache[tuple[int, int], _Plan] = LruCache(max_plans)
        self._layouts = LayoutCache(max_plans)
        # C backend: _PLAN_KEY bytes -> _copyruns.Plan, read by _copyruns.plan_trim /
        # plan_parts, which serve any valid block table in one call.
        self._fast: LruCache[bytes, Any] = LruCache(max_plans)
        self._entry: Any = None
        if self._use_c and type(self).trim is Trimmer.trim:  # (a subclass's own trim wins)
            # The C backend's trim is one C call (_copyruns.trim_entry): the same signature
            # and results as the method below, which it calls for anything it cannot parse
            # and whose general path (_trim) it calls when plan_trim declines.  It keeps its
            # last plan (the common case: the same layout and allowlist again) by key.
            self._entry = trim_entry_c(self._fast, TrimResult, self._trim,
                                       MethodType(Trimmer.trim, self))
            self.__dict__["trim"] = self._entry

    def trim(self, buf: Buffer, allowlist: Allowlist, out: Buffer | None = None,
             check_ragged: bool = False) -> TrimResult:
        """Return a frame with exactly the columns of ``buf`` whose name keys are in
        ``allowlist``, in their original order, block bytes and metadata unchanged.

        ``out``: a writable byte buffer (``bytearray``, ``np.uint8`` array, ...) to write
        into; the output is never longer than the input, so ``len(buf)`` bytes always
        suffice, and ``out`` may be ``buf`` itself (a trim in place) or overlap it: the
        result is the same as with a separate buffer.  Without it a new buffer is
        allocated.  ``check_ragged``: also check the
        offsets head of every *kept* ragged column (``offsets[0] == 0``, non-decreasing,
        ``offsets[C] == n_values``), so a malformed list is refused here rather than by the
        receiver's :func:`~root_worker.frame.decode`.  Raises :class:`FrameError` for a
        malformed frame, ``ValueError`` if ``out`` is too small, ``TypeError`` if
        ``allowlist.digest`` is not an ``int`` (:func:`~flatbuffers_schema.keys.keyset_digest`).
        """
        # One C call validates the preamble, the layout and this request's block table
        # against the cached (layout, allowlist) plan and writes the output; None means "no
        # plan yet, or something to word" (always None on the numpy backend).
        res = self._plan_trim(self._fast, buf, out, allowlist.digest, check_ragged, TrimResult)
        if res is not None:
            return res  # type: ignore[no-any-return]
        return self._trim(buf, allowlist, out, check_ragged)

    def trim_parts(self, buf: Buffer, allowlist: Allowlist,
                   check_ragged: bool = False) -> TrimParts:
        """The trimmed frame of :meth:`trim` as a short list of buffers, for
        ``socket.sendmsg``: ``b"".join(res.parts)`` is byte for byte the output of
        :meth:`trim`, without copying the kept blocks.

        ``parts`` is ``[header, run, ..., run, metadata]``: the new output header
        (``bytes``), one ``memoryview`` of ``buf`` per coalesced run of kept blocks (each
        block with its input padding to 64 bytes, none after the last), and a
        ``memoryview`` of ``buf``'s metadata.  **Lifetime**: the views are valid while
        ``buf`` is alive and unchanged -- send them before reusing or mutating the input
        (a ``bytearray`` cannot be resized while they exist).  If the list would be longer
        than ``max_parts``, ``parts`` is instead ``[memoryview of one new contiguous
        copy]``.  Errors as :meth:`trim`.
        """
        if self._use_c:
            res = plan_parts_c(self._fast, buf, allowlist.digest, check_ragged,
                               self.max_parts, TrimParts)
            if res is not None:
                return res  # type: ignore[no-any-return]
        return self._trim_parts(buf, allowlist, check_ragged)

    def _trim(self, buf: Buffer, allowlist: Allowlist, out: Buffer | None,
              check_ragged: bool) -> TrimResult:
        """The general path: every check with its worded error, plan (re)building."""
        req = self._prepare(buf, allowlist, check_ragged)
        sizes, meta_off, meta_len = req.sizes, req.meta_offset, req.meta_len
        out_len = sizes.out_meta_offset + meta_len
        if out is None:
            dst = memoryview(bytearray(out_len))
        else:
            dst = memoryview(out)  # type: ignore[arg-type]  # (ndarray: see as_bytes_view)
            if dst.readonly or dst.nbytes < out_len or dst.format != "B" or dst.ndim != 1:
                dst = _output_view(dst, out_len)
        src = req.src
        if out is not None and type(src) is not bytes and _overlaps(dst, src):
            src = bytes(src)  # read the input whole before writing (out=buf, in place)
        if self._use_c:
            write_frame_c(dst, src, sizes.header, sizes.runs, meta_off, meta_len,
                          sizes.out_meta_offset)
        else:
            _write_frame_py(dst, as_bytes_view(src), sizes, meta_off, meta_len)
        return _new_tuple(TrimResult, (dst[:out_len], req.bytes_in, out_len,
                                       req.plan.n_kept, req.plan.n_missing))

    def _trim_parts(self, buf: Buffer, allowlist: Allowlist, check_ragged: bool) -> TrimParts:
        req = self._prepare(buf, allowlist, check_ragged)
        sizes, plan = req.sizes, req.plan
        out_len = sizes.out_meta_offset + req.meta_len
        if len(sizes.runs_list) + 2 > self.max_parts:
            data = self._trim(buf, allowlist, None, False).data
            return TrimParts([data], req.bytes_in, out_len, plan.n_kept, plan.n_missing)
        src = as_bytes_view(req.src).toreadonly()
        header = bytearray(sizes.header)
        TAIL.pack_into(header, TAIL_OFFSET, out_len, sizes.out_meta_offset, req.meta_len)
        parts: list[Buffer] = [bytes(header)]
        parts += [src[s:s + n] for s, _, n in sizes.runs_list]
        parts.append(src[req.meta_offset:req.meta_offset + req.meta_len])
        return TrimParts(parts, req.bytes_in, out_len, plan.n_kept, plan.n_missing)

    def _prepare(self, buf: Buffer, allowlist: Allowlist, check_ragged: bool) -> _Request:
        """Validate one request completely (worded errors) and find or build its plans."""
        digest = allowlist.digest
        if not isinstance(digest, int):
            raise TypeError(f"Allowlist.digest must be an int (keyset_digest of its keys), "
                            f"got {type(digest).__name__}")
        src = buf if type(buf) is bytes else as_bytes_view(buf)
        n = len(src)
        if n < PREAMBLE_SIZE:
            read_preamble(as_bytes_view(src))
        (magic, version, flags, n_columns, layout_len, hint, n_cand, reserved0, frame_len,
         meta_off, meta_len, reserved1) = PREAMBLE.unpack_from(src, 0)
        if (magic != MAGIC or version != VERSION or flags or reserved0 or frame_len != n
                or meta_off + meta_len != n or reserved1 != ZERO_RESERVED):
            read_preamble(as_bytes_view(src))  # raises the precise error
        key = (hint, digest)
        plan = self._plans.get(key)
        if (plan is not None and plan.n_columns == n_columns and plan.layout_len == layout_len
                and self._same(src, PREAMBLE_SIZE, plan.layout_raw)):
            self._plans.touch(key)
        else:
            plan = self._new_plan(src, allowlist)
        if self._use_c and hint == plan.layout.hint and 0 <= digest <= _U64_MAX:
            # From now on the C path serves this (layout, allowlist), whatever the block
            # table.  Only under the true layout hint: wrong hints never occupy C slots.
            self._install_c(_PLAN_KEY.pack(hint, digest), plan)
        sizes = plan.sizes.get((n_cand, meta_off))
        if sizes is None or not self._same(src, plan.table_offset, sizes.table):
            sizes = self._new_size_plan(plan, src)
        elif len(plan.sizes) > 1:
            plan.sizes.touch((n_cand, meta_off))
        if check_ragged:
            table = np.frombuffer(sizes.table, dtype="<u8").reshape(-1, 2)
            check_ragged_offsets(plan.layout, as_bytes_view(src), table[:, 0], table[:, 1],
                                 n_cand, plan.kept)
        return _Request(src, n, plan, sizes, meta_off, meta_len)

    def _new_plan(self, src: Buffer, allowlist: Allowlist) -> _Plan:
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
            plan = _Plan(layout, allowlist, self._max_sizes)
            self._plans.put(key, plan)
        else:
            self._plans.touch(key)  # found under a wrong hint: used all the same
        return plan

    def _new_size_plan(self, plan: _Plan, src: Buffer) -> _SizePlan:
        src = as_bytes_view(src)
        pre = read_preamble(src)
        sizes = plan.size_plan(src, pre, for_python=not self._use_c)
        plan.sizes.put((pre.n_candidates, pre.meta_offset), sizes)
        return sizes

    def _install_c(self, key: bytes, plan: _Plan) -> None:
        entry = plan.c_entry
        if entry is None:
            entry = plan.c_entry = make_plan_c(
                plan.layout_raw, plan.n_columns, plan.layout.elem_size,
                plan.layout.ragged.astype(np.uint8), plan.kept.astype(np.int64),
                plan.out_prefix, plan.n_missing)
        if self._fast.get(key) is not entry:
            self._fast.put(key, entry)

    def clear(self) -> None:
        """Drop every cached plan and layout."""
        self._plans.clear()
        self._fast.clear()
        if self._entry is not None:
            self._entry.forget()
        self._layouts = LayoutCache(self._max_plans)


def _declined(*_args: object) -> None:
    """The numpy backend's stand-in for ``plan_trim``: never a fast result."""
    return None


def _write_frame_py(dst: memoryview, src: memoryview, sizes: _SizePlan, meta_off: int,
                    meta_len: int) -> None:
    """The numpy backend's output step (``write_frame_py`` with the size plan's copy)."""
    write_frame_py(dst, src, sizes.header, sizes.runs_list, meta_off, meta_len,
                   sizes.out_meta_offset, sizes.uniform)


def _overlaps(dst: memoryview, src: Buffer) -> bool:
    """Whether the output and input buffers share any byte (by address range)."""
    return bool(np.may_share_memory(np.frombuffer(dst, np.uint8),
                                    np.frombuffer(src, np.uint8)))


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


def trim(buf: Buffer, allowlist: Allowlist, out: Buffer | None = None,
         check_ragged: bool = False) -> TrimResult:
    """Trim with the module's default :class:`Trimmer` (see :meth:`Trimmer.trim`)."""
    return _DEFAULT.trim(buf, allowlist, out, check_ragged)


__all__ = ["IOV_MAX", "FrameError", "TrimParts", "TrimResult", "Trimmer", "trim"]
