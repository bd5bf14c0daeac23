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
re-compilation, nor a copy, nor a checksum of the big one (issue #11, item 6); the kernel
copy into ``/dev/shm`` remains.

Rules kept from :mod:`trimmer_daemon.consolidate` (SPEC §4): a model defined by several
bundles is merged here version by version (union of differing allowlists, a conflict report,
natural version order) and written as a new ``Model`` table in the head; the blocks' own
tables of that model stay in the blob unreferenced. The name table covers exactly the keys
of the published allowlists (the union of the parts' names: every part is served), so names
of removed or changed bundles leave with them (item 5). Two different names with one key in
different bundles are reported as a key collision. The name table merge is cached per
combination of parts, so status-only publications cost only the root.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import flatbuffers
import numpy as np

from flatbuffers_schema.keys import KEY_DTYPE
from flatbuffers_schema.shm_layout import checksum, checksum_combine
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
    """Builds blobs from parts; keeps the merged name table of the last combination."""

    def __init__(self) -> None:
        self._names_key: tuple[int, ...] = ()
        self._names: tuple[np.ndarray, np.ndarray, bytes, list[str]] | None = None

    def assemble(self, parts: Sequence[BundlePart | None],
                 statuses: Sequence[BundleStatusRecord], *, generation: int,
                 built_at_ns: int, daemon_pid: int,
                 problems: Sequence[str] = ()) -> Assembled:
        """The blob of ``parts`` (position i = bundle i of ``statuses``; None = no content)."""
        live = [p for p in parts if p is not None]
        n_models = sum(p.model_count for p in live)
        names_bytes = sum(len(p.feature_names) + 12 * p.feature_keys.size for p in live)
        b = flatbuffers.Builder(n_models * _ROOT_BYTES_PER_MODEL + names_bytes + 4096)
        ends = np.cumsum([0] + [len(p.block) for p in live]).tolist()
        tail = ends.pop()  # the blocks' total length: the head's offsets are shifted by it
        names, offsets, keys, versions, conflicts = _models(b, live, ends, tail, statuses)
        feat_keys, name_offsets, feat_names, collisions = self._name_table(live)
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
        head = memoryview(b.Bytes)[b.Head():]
        crc = checksum(head)
        for part in reversed(live):  # the last spliced block comes right after the head
            crc = checksum_combine(crc, part.block_crc, len(part.block))
        blocks = tuple(p.block for p in reversed(live))
        return Assembled((head, *blocks), crc, len(names), versions, len(reports))

    def _name_table(self, live: list[BundlePart]
                    ) -> tuple[np.ndarray, np.ndarray, bytes, list[str]]:
        key = tuple(id(p) for p in live)
        if self._names is None or key != self._names_key:
            self._names, self._names_key = _merge_names(live), key
        return self._names


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
    """Merge one model's versions across the bundles that define it (SPEC §4)."""
    per_version: dict[str, list[tuple[int, IndexedVersion]]] = {}
    for part in defs:
        i = _index_of(part, model)
        for v in range(int(part.version_start[i]), int(part.version_start[i + 1])):
            iv = IndexedVersion(part.versions[v], part.keys_of(v), int(part.output_counts[v]))
            per_version.setdefault(iv.version, []).append((part.bundle_index, iv))
    digests: dict[int, int] = {}
    return [_merge(model, version, per_version[version], bundle_names,  # type: ignore[arg-type]
                   conflicts, digests)
            for version in sorted(per_version, key=version_sort_key)]


def _merge_names(live: list[BundlePart]) -> tuple[np.ndarray, np.ndarray, bytes, list[str]]:
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
        same = keys[1:] == keys[:-1]
        keep[1:] = ~same
        for i in np.flatnonzero(same) + 1:
            a = blob[starts[i - 1] : starts[i - 1] + lengths[i - 1]].tobytes()
            z = blob[starts[i] : starts[i] + lengths[i]].tobytes()
            if a != z:
                collisions.append(
                    f"feature key collision {int(keys[i]):#018x}: {a.decode()}, {z.decode()} "
                    "(both are kept wherever either is allowed)")
    keys, starts, lengths = keys[keep], starts[keep], lengths[keep]
    offsets = np.zeros(keys.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    gather = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, lengths)
    return keys, offsets.astype(_U32), blob[gather].tobytes(), collisions
