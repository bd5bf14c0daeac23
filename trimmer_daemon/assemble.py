"""Assemble the bundles' compiled parts and a fresh root into one map blob (daemon main loop).

Runs in the daemon for every publication. The per-bundle work (parse, index, compile the
``Model`` tables) was done once per load (:mod:`trimmer_daemon.parts`); here only the
*head* is built: bundle statuses, the sorted ``models`` vector (offsets computed with
numpy), the ``model_keys``/``model_slots`` lookup index, the live name table and the report
list. The blob is the head followed by the parts' blocks, untouched:

    [ head: root table, vectors, merged models ][ block of part k-1 ] ... [ block of part 0 ]

The head is written by a FlatBuffers builder that never holds the blocks: they sit
*virtually* after it, at known offsets from the end of the blob (block 0 ends it), and every
offset from the head into a block is computed from those (uoffsets are relative; the
blocks' lengths are multiples of 8, so alignment measured from the end is preserved). The
blob's crc32 is combined from the head's and the blocks' cached crcs
(:func:`flatbuffers_schema.shm_layout.checksum_combine`), and the publisher writes the parts
with one ``pwrite`` each. So a change to one small bundle next to a big one costs neither a
re-compilation, nor a copy, nor a checksum of the big one (issue #11, item 6). Nor, most of
the time, the kernel copy into ``/dev/shm``: with ``pad_to`` (the size of the publisher's
spare segment, which already holds the current blob) the head is padded by a few zero
bytes right after the root offset so that the blob keeps that size, the unchanged blocks
keep their offsets, and the publisher skips them (:mod:`trimmer_daemon.publisher`).

Rules kept from :mod:`trimmer_daemon.consolidate` (README): a model defined by several
bundles is merged here version by version (union of differing allowlists, a conflict report,
natural version order) and written as a new ``Model`` table in the head; the blocks' own
tables of that model stay in the blob unreferenced. The name table covers exactly the keys
of the published allowlists (the union of the parts' names: every part is served), so names
of removed or changed bundles leave with them (item 5). Two different names with one key in
different bundles are reported as a key collision.

What a publication derives from the parts (the merged name table, the sorted model index)
is cached by :class:`_Cache`: kept while the parts are the same (status-only publications
cost only the root; the name table also while each part's name table is the same objects,
as when a new version of a bundle repeats its names), and, when exactly one part changed,
computed by merging that part into the cached value of all the others (``searchsorted`` +
insert, no sort of the whole), falling back to the full merge when a model is shared or a
key collision is involved. Blobs are byte-identical either way.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import flatbuffers
import numpy as np

from flatbuffers_schema.keys import KEY_DTYPE
from flatbuffers_schema.shm_layout import checksum_combine, checksum_continue
from trimmer_daemon.bundle.parse import version_sort_key
from trimmer_daemon.compiler import (
    BundleStatusRecord,
    RootHeader,
    _bundle,
    _model,
    _Shared,
    _string_vector,
    _table_vector,
    finish_root,
)
from trimmer_daemon.consolidate import IndexedVersion, VersionEntry, _merge
from trimmer_daemon.parts import BundlePart

_U32 = np.dtype("<u4")
_ROOT_BYTES_PER_MODEL = 64
"""Head-room estimate per model for the root's vectors (models, keys, slots)."""
_UOFFSET = struct.Struct("<I")
_ROOT_PREFIX = 8
"""A finished buffer starts with the root table's uoffset and the 4-byte file identifier."""
_PAD_ALIGN = 8
"""Padding keeps the blob a multiple of the widest alignment in it (uint64 keys)."""
_MAX_PAD_FRACTION = 64
"""Padding is at most 1/64 of the padded head (~1.5 %) or ``_MIN_PAD`` bytes: a blob keeps
a bigger predecessor's size only while the difference is small."""
_MIN_PAD = 4096


@dataclass(frozen=True)
class Assembled:
    """One blob, as the parts :meth:`Publisher.publish_parts` writes back to back."""

    parts: tuple[bytes | memoryview, ...]
    crc: int  # checksum of the whole blob
    models: int
    versions: int
    conflicts: int  # model conflicts and key collisions (not daemon problems)

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)


class Assembler:
    """Builds blobs from parts. Keeps what the last publication computed from its parts
    (the merged name table and model index), and the same of every part but the one that
    changed, so that the next change of that part merges only its own share into it."""

    def __init__(self) -> None:
        self._names = _Cache[_NameTable](_name_table_of)
        self._index = _Cache[_ModelIndex | None]()

    def assemble(self, parts: Sequence[BundlePart | None],
                 statuses: Sequence[BundleStatusRecord], *, generation: int,
                 built_at_ns: int, daemon_pid: int,
                 problems: Sequence[str] = (), pad_to: int = 0) -> Assembled:
        """The blob of ``parts`` (position i = bundle i of ``statuses``; None = no content).

        ``pad_to``: make the blob exactly this size when it is a little smaller (see
        :func:`_padded`), e.g. the publisher's spare segment, so that the parts that did not
        change stay at their offsets and are not written again."""
        live = [p for p in parts if p is not None]
        n_models = sum(p.model_count for p in live)
        names_bytes = sum(len(p.feature_names) + 12 * p.feature_keys.size for p in live)
        b = flatbuffers.Builder(n_models * _ROOT_BYTES_PER_MODEL + names_bytes + 4096)
        ends = np.cumsum([0] + [len(p.block) for p in live]).tolist()
        tail = ends.pop()  # the blocks' total length: the head's offsets are shifted by it
        index = self._index.get(live, _model_index, _merge_model_index)
        if index is not None:  # no model defined by two bundles
            n_names, offsets, keys = len(index.names), index.offsets(ends), index.keys
            versions, conflicts = sum(p.version_count for p in live), list[str]()
        else:
            merged, offsets, keys, versions, conflicts = _models(b, live, ends, tail, statuses)
            n_names = len(merged)
        feat_keys, name_offsets, feat_names, collisions = self._names.get(
            live, _merge_names, _merge_names_into)
        reports = [*conflicts, *collisions]
        bundles_vec = _table_vector(b, [_bundle(b, s) for s in statuses])
        models_vec = _offset_vector(b, offsets, tail)
        order = np.argsort(keys, kind="stable")
        keys_vec = b.CreateNumpyVector(keys[order])
        slots_vec = b.CreateNumpyVector(order.astype(_U32))
        feat_vec, off_vec = b.CreateNumpyVector(feat_keys), b.CreateNumpyVector(name_offsets)
        names_vec = b.CreateByteVector(feat_names)
        conflicts_vec = _string_vector(b, [*reports, *problems])
        finish_root(b, RootHeader(generation, built_at_ns, daemon_pid),
                    (bundles_vec, models_vec, keys_vec, slots_vec, feat_vec, off_vec,
                     names_vec, conflicts_vec))
        head = _padded(memoryview(b.Bytes)[b.Head():], pad_to - tail)
        crc = 0
        for piece in head:
            crc = checksum_continue(piece, crc)
        for part in reversed(live):  # the last spliced block comes right after the head
            crc = checksum_combine(crc, part.block_crc, len(part.block))
        blocks = tuple(p.block for p in reversed(live))
        return Assembled((*head, *blocks), crc, n_names, versions, len(reports))


_T = TypeVar("_T")


_Token = tuple[object, ...]
"""What a cached value depends on in one part: objects compared by identity (held)."""


def _whole(part: BundlePart) -> _Token:
    return (part,)


def _name_table_of(part: BundlePart) -> _Token:
    """A part's name table: the same objects when a load reused the previous one
    (:class:`~trimmer_daemon.parts.KeyMemo`), so a new version with the same names leaves
    the merged table as it was."""
    return (part.feature_keys, part.name_offsets, part.feature_names, part.collisions)


class _Cache(Generic[_T]):
    """One value computed from a list of parts, kept with what it depends on in each part
    (``token``: objects held, so compared by identity), plus the value of the same list but
    one part (the "rest"): when exactly one part's token differs from the last list's, the
    value is that part merged into the rest's value (computed once, then kept while the
    same part keeps changing)."""

    def __init__(self, token: Callable[[BundlePart], _Token] = _whole) -> None:
        self._token = token
        self._tokens: tuple[_Token, ...] | None = None
        self._value: _T | None = None
        self._rest: tuple[_Token, ...] | None = None
        self._rest_value: _T | None = None

    def get(self, live: list[BundlePart], full: Callable[[list[BundlePart]], _T],
            merge: Callable[[_T, BundlePart, int], _T | None]) -> _T:
        tokens = tuple(self._token(p) for p in live)
        if self._tokens is not None and _same(tokens, self._tokens):
            return self._value  # type: ignore[return-value]
        changed = _one_changed(self._tokens, tokens) if self._tokens is not None \
            and len(tokens) > 1 else None  # (one part: its own value is at hand)
        value = None
        if changed is not None:
            rest = tokens[:changed] + tokens[changed + 1:]
            if self._rest is None or not _same(rest, self._rest):
                self._rest = rest
                self._rest_value = full(live[:changed] + live[changed + 1:])
            value = merge(self._rest_value, live[changed], changed)  # type: ignore[arg-type]
        if value is None:  # no single change, or the merge needs the full path
            value = full(live)
        self._tokens, self._value = tokens, value
        return value


def _same(a: tuple[_Token, ...], b: tuple[_Token, ...]) -> bool:
    return len(a) == len(b) and all(_same_token(x, y) for x, y in zip(a, b, strict=True))


def _same_token(a: _Token, b: _Token) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _one_changed(old: tuple[_Token, ...], new: tuple[_Token, ...]) -> int | None:
    """The position of the one part whose token differs between ``old`` and ``new``."""
    if len(old) != len(new):
        return None
    diff = [i for i, (x, y) in enumerate(zip(old, new, strict=True)) if not _same_token(x, y)]
    return diff[0] if len(diff) == 1 else None


@dataclass(frozen=True)
class _ModelIndex:
    """Models of parts that share none, sorted by name: each one's part (its position in
    the list of parts), Model table offset from that part's block end, and key."""

    names: list[str]
    owner: np.ndarray  # int64
    raw: np.ndarray  # int64
    keys: np.ndarray

    def offsets(self, ends: list[int]) -> np.ndarray:
        """Offsets from the blob's end (``ends``: each part's block end, from the blob's)."""
        if not self.names:
            return np.zeros(0, np.int64)
        return self.raw + np.asarray(ends, dtype=np.int64)[self.owner]


def _model_index(live: list[BundlePart]) -> _ModelIndex | None:
    """The sorted models of ``live``; None when a model is defined by two of them."""
    names = [n for p in live for n in p.model_names]
    order = sorted(range(len(names)), key=names.__getitem__)
    sorted_names = [names[i] for i in order]
    if len(set(sorted_names)) != len(sorted_names):
        return None
    idx = np.array(order, dtype=np.int64)
    owner = np.repeat(np.arange(len(live), dtype=np.int64), [p.model_count for p in live])
    raw = np.concatenate([np.zeros(0, np.int64)]
                         + [p.model_offsets.astype(np.int64) for p in live])
    keys = np.concatenate([np.zeros(0, KEY_DTYPE)] + [p.model_keys for p in live])
    return _ModelIndex(sorted_names, owner[idx], raw[idx], keys[idx])


def _merge_model_index(rest: _ModelIndex | None, part: BundlePart,
                       at: int) -> _ModelIndex | None:
    """``rest`` (every part but the one at position ``at``) with ``part`` merged in; None
    when a model is shared (the full path merges it)."""
    if rest is None:
        return None
    names = rest.names
    pos = [bisect.bisect_left(names, n) for n in part.model_names]
    if any(i < len(names) and names[i] == n for i, n in zip(pos, part.model_names,
                                                            strict=True)):
        return None
    where = np.array(pos, dtype=np.int64)
    merged = sorted([*names, *part.model_names])  # two sorted runs: a linear merge
    owner = rest.owner + (rest.owner >= at)  # the parts after ``at`` move one on
    return _ModelIndex(merged, _insert(owner, where, np.full(where.size, at, np.int64)),
                       _insert(rest.raw, where, part.model_offsets.astype(np.int64)),
                       _insert(rest.keys, where, part.model_keys))


def _padded(head: memoryview, size: int) -> tuple[bytes | memoryview, ...]:
    """The head as pieces of exactly ``size`` bytes when it is shorter by a multiple of 8
    and small (see ``_MAX_PAD_FRACTION``): zeros after the root offset and the file
    identifier, the root offset moved past them. Every other offset in the blob is
    relative and lies after the zeros, and alignment is measured from the blob's end, so
    the blob reads exactly as without them (the gap is never referenced)."""
    pad = size - len(head)
    if pad <= 0 or pad % _PAD_ALIGN or pad > max(_MIN_PAD, size // _MAX_PAD_FRACTION):
        return (head,)
    root = _UOFFSET.unpack_from(head, 0)[0] + pad
    return (_UOFFSET.pack(root) + bytes(head[_UOFFSET.size : _ROOT_PREFIX]), bytes(pad),
            head[_ROOT_PREFIX:])


def _offset_vector(b: flatbuffers.Builder, offsets: np.ndarray, tail: int) -> int:
    """A vector of uoffsets to tables at blob offsets (from the end) ``offsets``; the head
    builder's own offsets are ``tail`` short of the blob's. Written with numpy
    (``PrependUOffsetTRelative`` per element costs ~1 µs each: seconds for a million)."""
    n = len(offsets)
    base = b.StartVector(4, n, 4) + tail
    # element i ends up at offset base + 4 * (n - i); uoffset = its offset - the target's
    values = (base + 4 * (n - np.arange(n, dtype=np.int64))) - offsets.astype(np.int64)
    b.head -= 4 * n
    b.Bytes[b.head : b.head + 4 * n] = values.astype(_U32).tobytes()
    return int(b.EndVector())


def _models(b: flatbuffers.Builder, live: list[BundlePart], ends: list[int], tail: int,
            statuses: Sequence[BundleStatusRecord]
            ) -> tuple[list[str], np.ndarray, np.ndarray, int, list[str]]:
    """Sorted model names, their Model table offsets (from the blob's end) and keys; merges
    shared models (their new tables are in the head: offset + ``tail``)."""
    names = [n for p in live for n in p.model_names]
    offsets = np.concatenate([np.zeros(0, np.int64)]
                             + [p.model_offsets.astype(np.int64) + end
                                for p, end in zip(live, ends, strict=True)])
    keys = np.concatenate([np.zeros(0, KEY_DTYPE)] + [p.model_keys for p in live])
    owners = np.repeat(np.arange(len(live)), [p.model_count for p in live])
    order = sorted(range(len(names)), key=names.__getitem__)
    sorted_names = [names[i] for i in order]
    idx = np.array(order, dtype=np.int64)
    offsets, keys, owners = offsets[idx], keys[idx], owners[idx]
    versions = sum(p.version_count for p in live)
    conflicts: list[str] = []
    dup = [i for i in range(1, len(sorted_names)) if sorted_names[i] == sorted_names[i - 1]] \
        if len(sorted_names) != len(set(sorted_names)) else []
    if not dup:
        return sorted_names, offsets, keys, versions, conflicts
    # models defined by several bundles: one merged table each, the duplicates dropped
    drop = set(dup)
    groups: dict[int, list[int]] = {}
    first = 0
    for i in range(len(sorted_names)):
        if i not in drop:
            first = i
        groups.setdefault(first, []).append(i)
    shared = _Shared(b)
    bundle_names = [(s.name, None) for s in statuses]
    for head, members in groups.items():
        if len(members) < 2:
            continue
        entries = _merge_model(sorted_names[head], [live[owners[i]] for i in members],
                               bundle_names, conflicts)
        offsets[head] = _model(b, shared, sorted_names[head], entries) + tail
        versions -= sum(_count(live[owners[i]], sorted_names[head]) for i in members)
        versions += len(entries)
    keep = np.array([i not in drop for i in range(len(sorted_names))], dtype=bool)
    kept_names = [n for n, k in zip(sorted_names, keep, strict=True) if k]
    return kept_names, offsets[keep], keys[keep], versions, conflicts


def _count(part: BundlePart, model: str) -> int:
    i = _index_of(part, model)
    return int(part.version_start[i + 1] - part.version_start[i])


def _index_of(part: BundlePart, model: str) -> int:
    return bisect.bisect_left(part.model_names, model)


def _merge_model(model: str, defs: list[BundlePart], bundle_names: list[tuple[str, None]],
                 conflicts: list[str]) -> list[VersionEntry]:
    """Merge one model's versions across the bundles that define it (README, "Lookup semantics")."""
    per_version: dict[str, list[tuple[int, IndexedVersion]]] = {}
    for part in defs:
        i = _index_of(part, model)
        for v in range(int(part.version_start[i]), int(part.version_start[i + 1])):
            iv = IndexedVersion(part.versions[v], part.keys_of(v), int(part.output_counts[v]),
                                part.tensors[v], bool(part.pending[v]))
            per_version.setdefault(iv.version, []).append((part.bundle_index, iv))
    digests: dict[int, int] = {}
    return [_merge(model, version, per_version[version], bundle_names,  # type: ignore[arg-type]
                   conflicts, digests)
            for version in sorted(per_version, key=version_sort_key)]


_NameTable = tuple[np.ndarray, np.ndarray, bytes, list[str]]
"""A merged name table: sorted unique keys, uint32 offsets, UTF-8 names, collision reports."""


def _merge_names(live: list[BundlePart]) -> _NameTable:
    """Union of the parts' name tables (sorted unique keys), with cross-part collisions."""
    collisions = [c for p in live for c in p.collisions]
    if len(live) == 1:
        p = live[0]
        return p.feature_keys, p.name_offsets, p.feature_names, collisions
    if not live:
        return np.zeros(0, KEY_DTYPE), np.zeros(1, _U32), b"", collisions
    keys = np.concatenate([p.feature_keys for p in live])
    blob = np.frombuffer(b"".join(p.feature_names for p in live), dtype=np.uint8)
    bases = np.cumsum([0] + [len(p.feature_names) for p in live[:-1]])
    starts = np.concatenate([p.name_offsets[:-1].astype(np.int64) + base
                             for p, base in zip(live, bases, strict=True)])
    lengths = np.concatenate([np.diff(p.name_offsets).astype(np.int64) for p in live])
    order = np.argsort(keys, kind="stable")
    keys, starts, lengths = keys[order], starts[order], lengths[order]
    keep = np.ones(keys.size, dtype=bool)
    if keys.size > 1:
        same = np.flatnonzero(keys[1:] == keys[:-1]) + 1
        keep[same] = False
        differ = same[_differing(blob, starts[same - 1], lengths[same - 1],
                                 blob, starts[same], lengths[same])]
        for i in differ.tolist():
            a = blob[starts[i - 1] : starts[i - 1] + lengths[i - 1]].tobytes()
            z = blob[starts[i] : starts[i] + lengths[i]].tobytes()
            collisions.append(
                f"feature key collision {int(keys[i]):#018x}: {a.decode()}, {z.decode()} "
                "(both are kept wherever either is allowed)")
    keys, starts, lengths = keys[keep], starts[keep], lengths[keep]
    offsets = np.zeros(keys.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return keys, offsets.astype(_U32), _gather_bytes(blob, starts, lengths).tobytes(), collisions


def _merge_names_into(rest: _NameTable, part: BundlePart, at: int) -> _NameTable | None:
    """``rest`` (the table of every part but ``part``) with ``part``'s names merged in:
    keys placed with ``searchsorted``, name bytes with one ``np.insert``, no sort of the
    whole. None when a collision is involved (the full path reports it in its order)."""
    keys_a, off_a, names_a, reports = rest
    if reports or part.collisions:
        return None
    blob_a = np.frombuffer(names_a, dtype=np.uint8)
    blob_b = np.frombuffer(part.feature_names, dtype=np.uint8)
    keys_b, off_b = part.feature_keys, part.name_offsets.astype(np.int64)
    starts_b, lengths_b = off_b[:-1], np.diff(off_b)
    pos = np.searchsorted(keys_a, keys_b)
    hit = np.flatnonzero(pos < keys_a.size)
    hit = hit[keys_a[pos[hit]] == keys_b[hit]]  # names both sides have (one key each)
    if hit.size:
        ia = pos[hit]
        starts_a, lengths_a = off_a[ia].astype(np.int64), np.diff(off_a)[ia].astype(np.int64)
        if _differing(blob_a, starts_a, lengths_a, blob_b, starts_b[hit], lengths_b[hit]).any():
            return None
        new = np.ones(keys_b.size, dtype=bool)
        new[hit] = False
        keys_b, pos, starts_b, lengths_b = keys_b[new], pos[new], starts_b[new], lengths_b[new]
        blob_b = _gather_bytes(blob_b, starts_b, lengths_b)
    keys = _insert(keys_a, pos, keys_b)
    offsets = np.zeros(keys.size + 1, dtype=_U32)
    np.cumsum(_insert(np.diff(off_a), pos, lengths_b), out=offsets[1:], dtype=_U32)
    at_bytes = np.repeat(off_a[pos].astype(np.int64), lengths_b)
    return keys, offsets, _insert(blob_a, at_bytes, blob_b).tobytes(), []


def _insert(a: np.ndarray, where: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.insert(a, where, values)`` for a non-decreasing ``where`` (no sort of it)."""
    out = np.empty(a.size + values.size, dtype=a.dtype)
    at = where + np.arange(values.size, dtype=np.int64)
    rest = np.ones(out.size, dtype=bool)
    rest[at] = False
    out[at] = values
    out[rest] = a
    return out


def _gather_bytes(blob: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The byte ranges ``[starts[i], starts[i] + lengths[i])`` of ``blob``, concatenated."""
    out = np.cumsum(lengths) - lengths  # where each range starts in the result
    total = int(lengths.sum())
    return blob[np.arange(total, dtype=np.int64) - np.repeat(out - starts, lengths)]


def _differing(a: np.ndarray, a_starts: np.ndarray, a_lengths: np.ndarray, b: np.ndarray,
               b_starts: np.ndarray, b_lengths: np.ndarray) -> np.ndarray:
    """Per pair i: do name i of ``a`` and name i of ``b`` differ (names are non-empty)?"""
    differ = a_lengths != b_lengths
    same = np.flatnonzero(~differ)
    if same.size:
        lengths = a_lengths[same]
        unequal = _gather_bytes(a, a_starts[same], lengths) != _gather_bytes(
            b, b_starts[same], lengths)
        differ[same] = np.logical_or.reduceat(unequal, np.cumsum(lengths) - lengths)
    return differ
