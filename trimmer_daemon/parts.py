"""One bundle's compiled share of the map blob (a :class:`BundlePart`), built once per load.

Runs in the daemon's main loop for small files and in the parse worker process
(:mod:`trimmer_daemon.parse_worker`) for large ones; the result is plain bytes and numpy
arrays, so it pickles across the pipe at memcpy speed. :mod:`trimmer_daemon.assemble` then
splices the parts of every bundle into one blob, so a change re-does only the changed
bundle's share (a change costs in proportion to what changed).

The block
---------
``block`` is the tail of a FlatBuffers builder holding the bundle's ``Model`` tables and
everything below them (versions, allowlist vectors, strings), with no root. FlatBuffers
offsets are relative (``uoffset`` forward to the target, ``soffset`` from a table to its
vtable), so the block stays valid wherever it is copied, provided its *end* lands on an
8-byte boundary of the final buffer measured from the end (the builder's own alignment
rule); its length is a multiple of 8 so its start is aligned too. Its crc32 is kept
(``block_crc``): a publication combines it with the others' instead of re-reading it.
Positions in the block are given as offsets from its end (``model_offsets``,
``key_offsets``, ``index_pos``), the builder's own convention.

Every version of the bundle points at one shared ``[ushort]`` vector holding the bundle's
index in ``FeatureMap.bundles``; :meth:`BundlePart.with_index` patches those two bytes when
the bundle set changes (SIGHUP), instead of rebuilding.

Arrays kept beside the block let the assembler merge a model that several bundles define
(allowlist union, conflict report) and build the live name table (item 5 of issue #11: the
names of exactly the allowlists published) without parsing anything again.

A :class:`KeyMemo` per bundle (kept by the loader) carries the previous load's keys,
allowlists and name table into the next build, so a new version that repeats most names
hashes, sorts and encodes only what is new; the part is the same as one built without it.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

import flatbuffers
import numpy as np

from flatbuffers_schema.fmap import Model as FbModel
from flatbuffers_schema.fmap import Version as FbVersion
from flatbuffers_schema.keys import KEY_DTYPE, keyset_digest, name_key
from flatbuffers_schema.oip import TensorSignature
from flatbuffers_schema.shm_layout import checksum
from flatbuffers_schema.tensor_specs import add_signature, write_inputs
from trimmer_daemon.bundle.parse import Limits, ParsedBundle, parse_bundle, version_sort_key

_U32 = np.dtype("<u4")
_U16 = np.dtype("<u2")
_INDEX = struct.Struct("<H")
_ALIGN = 8
"""Alignment of the block's end and length (the widest scalar in it: uint64 keys)."""
_VECTOR_HEADER = 4
"""A FlatBuffers vector starts with its uint32 length; the elements follow."""


@dataclass(frozen=True)
class BundlePart:
    """A bundle's models compiled into a relocatable FlatBuffers block, plus its index."""

    sha256: str
    warnings: tuple[str, ...]
    bundle_index: int
    block: bytes
    block_crc: int  # checksum(block), so a publication never re-reads an unchanged block
    index_pos: int  # offset from the block's end of the ushort in the shared bundles vector
    model_names: tuple[str, ...]  # sorted by code point (= bytewise UTF-8)
    model_keys: np.ndarray  # uint64 key(name), parallel to model_names
    model_offsets: np.ndarray  # uint32 offset of each Model table from the block's end
    version_start: np.ndarray  # uint32, model i owns versions [start[i], start[i+1])
    versions: tuple[str, ...]  # natural order within each model
    key_offsets: np.ndarray  # uint32 offset from the block's end of each version's vector
    key_counts: np.ndarray  # uint32 number of keys of each version
    output_counts: np.ndarray  # uint32
    tensors: tuple[TensorSignature | None, ...]  # parallel to versions
    pending: np.ndarray  # bool per version: marked pending in the bundle
    feature_keys: np.ndarray  # sorted unique uint64 keys of every input name of the bundle
    name_offsets: np.ndarray  # uint32, len(feature_keys) + 1, into feature_names
    feature_names: bytes  # UTF-8 names parallel to feature_keys
    collisions: tuple[str, ...]  # two names of this bundle with one key

    @property
    def model_count(self) -> int:
        return len(self.model_names)

    @property
    def version_count(self) -> int:
        return len(self.versions)

    def keys_of(self, version: int) -> np.ndarray:
        """The allowlist of one version (index into ``versions``), a view of the block."""
        start = len(self.block) - int(self.key_offsets[version]) + _VECTOR_HEADER
        return np.frombuffer(self.block, dtype=KEY_DTYPE, count=int(self.key_counts[version]),
                             offset=start)

    def with_index(self, bundle_index: int) -> BundlePart:
        """The same part for another position in ``FeatureMap.bundles``."""
        if bundle_index == self.bundle_index:
            return self
        block = bytearray(self.block)
        at = len(block) - self.index_pos
        block[at : at + _INDEX.size] = _INDEX.pack(bundle_index)
        return dataclasses.replace(self, block=bytes(block), block_crc=checksum(block),
                                   bundle_index=bundle_index)


def build_part(data: bytes, *, path: str, limits: Limits, bundle_index: int,
               memo: KeyMemo | None = None) -> BundlePart:
    """Parse, validate and compile one bundle file (raises ``BundleError`` like the parser).

    ``memo``: what the bundle's previous load computed (see :class:`KeyMemo`); it is
    updated in place to hold exactly this load, and only if the build succeeds.
    """
    return compile_part(parse_bundle(data, path=path, limits=limits), bundle_index, memo)


class _Keys(NamedTuple):
    """One allowlist's keys: parallel to its names, sorted unique, and their digest."""

    parallel: list[int]
    keys: np.ndarray
    digest: int


_Table = tuple[np.ndarray, np.ndarray, bytes, tuple[str, ...]]
"""A part's name table: sorted unique keys, name offsets, UTF-8 names, collision reports."""


@dataclass
class KeyMemo:
    """What one bundle's previous load computed, so that its next load need not: name ->
    key (hashing costs ~1 µs a name), allowlist -> its keys, and the name table (a new
    version of a bundle mostly repeats its names and allowlists).

    One per bundle, owned by the loader (:mod:`trimmer_daemon.loader`). Each successful
    build replaces the whole content by its own, so it never holds more than one load of one
    bundle (no daemon-wide name memory: item 5 of issue #11).
    """

    names: dict[str, int] = field(default_factory=dict)
    lists: dict[tuple[str, ...], _Keys] = field(default_factory=dict)
    table: _Table | None = None


class _Names:
    """This build's allowlists and names, reusing the previous load's (a :class:`KeyMemo`).

    Per-name work stays in C (``map`` over dict lookups, ``dict.update`` of a ``zip``,
    numpy sorts); only names new to the bundle are hashed, in a Python loop over just them,
    and collisions are found once, by numpy, when the name table is built.
    """

    def __init__(self, previous: KeyMemo | None) -> None:
        self.previous = previous or KeyMemo()
        self.used: dict[tuple[str, ...], _Keys] = {}  # this load's allowlists
        self.fresh: dict[str, int] = {}  # names hashed by this build
        self.keys: dict[str, int] = {}  # this load's names (set by table())

    def list_keys(self, names: tuple[str, ...]) -> _Keys:
        known = self.used.get(names)
        if known is None:
            known = self.previous.lists.get(names)
            if known is None:
                known = self._compute(names)
            self.used[names] = known
        return known

    def _compute(self, names: tuple[str, ...]) -> _Keys:
        got = list(map(self.previous.names.get, names))
        if None in got:  # names new to the bundle: hash each once
            fresh = self.fresh
            for i in [i for i, k in enumerate(got) if k is None]:
                key = fresh.get(names[i])
                if key is None:
                    key = fresh[names[i]] = name_key(names[i])
                got[i] = key
        keys = np.array(got, dtype=KEY_DTYPE)
        keys.sort()
        if keys.size > 1 and not bool((keys[1:] != keys[:-1]).all()):
            keys = np.unique(keys)  # two names with one key (duplicates are parsed away)
        return _Keys(got, keys, keyset_digest(keys))  # type: ignore[arg-type]

    def table(self) -> _Table:
        """The name table of this load's names; the previous one when the allowlists are
        the same (same names, so the same table)."""
        previous = self.previous
        if previous.table is not None and self.used.keys() == previous.lists.keys():
            self.keys = previous.names
            return previous.table
        memo: dict[str, int] = {}
        for names, known in self.used.items():
            memo.update(zip(names, known.parallel, strict=True))
        self.keys = memo
        return _name_table(memo)

    def remember(self, memo: KeyMemo | None, table: _Table) -> None:
        """Make ``memo`` hold exactly this load (after a successful build)."""
        if memo is not None:
            memo.names, memo.lists, memo.table = self.keys, self.used, table


def _name_table(memo: dict[str, int]) -> _Table:
    """Sorted unique keys of ``memo``'s names, their offsets and UTF-8 bytes; collisions."""
    names = list(memo)
    keys = np.fromiter(memo.values(), dtype=KEY_DTYPE, count=len(names))
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    ordered = _gather(names, order)
    collisions: list[str] = []
    if keys.size > 1:
        same = np.flatnonzero(keys[1:] == keys[:-1])
        for i in same.tolist():
            collisions.append(
                f"feature key collision {int(keys[i]):#018x}: {ordered[i]}, "
                f"{ordered[i + 1]} (both are kept wherever either is allowed)")
        if same.size:  # keep the first name of each key: the table is keyed by key
            keep = np.ones(keys.size, dtype=bool)
            keep[same + 1] = False
            keys = keys[keep]
            ordered = _gather(ordered, np.flatnonzero(keep))
    joined = "".join(ordered)
    if joined.isascii():  # byte lengths are character lengths: no per-name encode
        lengths = np.fromiter(map(len, ordered), dtype=np.int64, count=len(ordered))
        blob = joined.encode("ascii")
    else:
        encoded = [n.encode("utf-8") for n in ordered]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        blob = b"".join(encoded)
    offsets = np.zeros(len(ordered) + 1, dtype=_U32)
    np.cumsum(lengths, out=offsets[1:], dtype=_U32)
    return keys, offsets, blob, tuple(collisions)


def _gather(items: list[str], order: np.ndarray) -> list[str]:
    """``[items[i] for i in order]`` with the loop in C."""
    return list(map(items.__getitem__, order.tolist()))


class _Compiler:
    """Writes the Model tables of one bundle bottom-up into its own builder."""

    def __init__(self, parsed: ParsedBundle, bundle_index: int,
                 memo: KeyMemo | None) -> None:
        n_inputs = sum(len(mv.input_names) for vs in parsed.models.values() for mv in vs)
        self.b = flatbuffers.Builder(max(1024, n_inputs * 8 + len(parsed.models) * 128))
        self.names = _Names(memo)
        self.lists: dict[tuple[str, ...], tuple[int, int, int]] = {}  # -> vec, count, digest
        self.strings: dict[str, int] = {}
        index_vec = self.b.CreateNumpyVector(np.array([bundle_index], dtype=_U16))
        self.index_vec = index_vec
        self.index_pos = index_vec - _VECTOR_HEADER  # the one element, just after the length
        self.versions: list[str] = []
        self.key_offsets: list[int] = []
        self.key_counts: list[int] = []
        self.outputs: list[int] = []
        self.tensors: list[TensorSignature | None] = []
        self.pending: list[bool] = []

    def model(self, name: str, entries: list) -> int:  # type: ignore[type-arg]
        b = self.b
        tables = [self._version(mv) for mv in entries]
        b.StartVector(4, len(tables), 4)
        for off in reversed(tables):
            b.PrependUOffsetTRelative(off)
        versions = b.EndVector()
        name_off = b.CreateString(name)
        FbModel.Start(b)
        FbModel.AddName(b, name_off)
        FbModel.AddVersions(b, versions)
        return int(FbModel.End(b))

    def _version(self, mv) -> int:  # type: ignore[no-untyped-def]
        b = self.b
        known = self.lists.get(mv.input_names)
        if known is None:
            keys = self.names.list_keys(mv.input_names)
            known = self.lists[mv.input_names] = (b.CreateNumpyVector(keys.keys),
                                                  keys.keys.size, keys.digest)
        vec, count, digest = known
        version = self.strings.get(mv.version)
        if version is None:
            version = self.strings[mv.version] = b.CreateString(mv.version)
        self.versions.append(mv.version)
        self.key_offsets.append(vec)
        self.key_counts.append(count)
        self.outputs.append(len(mv.output_names))
        self.tensors.append(mv.tensors)
        inputs = write_inputs(b, mv.tensors)
        self.pending.append(mv.pending)
        FbVersion.Start(b)
        FbVersion.AddVersion(b, version)
        FbVersion.AddFeatureKeys(b, vec)
        FbVersion.AddDigest(b, digest)
        FbVersion.AddBundles(b, self.index_vec)
        FbVersion.AddOutputCount(b, len(mv.output_names))
        add_signature(b, mv.tensors, inputs)
        if mv.pending:
            FbVersion.AddPending(b, True)
        return int(FbVersion.End(b))


def compile_part(parsed: ParsedBundle, bundle_index: int,
                 memo: KeyMemo | None = None) -> BundlePart:
    """Compile a validated bundle into its :class:`BundlePart` (``memo``: see
    :func:`build_part`)."""
    c = _Compiler(parsed, bundle_index, memo)
    names = sorted(parsed.models)
    offsets, starts = [], [0]
    for name in names:
        entries = sorted(parsed.models[name], key=lambda mv: version_sort_key(mv.version))
        offsets.append(c.model(name, entries))
        starts.append(len(c.versions))
    c.b.Prep(_ALIGN, 0)
    block = bytes(c.b.Bytes[c.b.Head():])
    table = c.names.table()
    feat_keys, name_offsets, feat_names, collisions = table
    c.names.remember(memo, table)
    return BundlePart(
        sha256=parsed.sha256, warnings=parsed.warnings, bundle_index=bundle_index,
        block=block, block_crc=checksum(block), index_pos=c.index_pos, model_names=tuple(names),
        model_keys=np.fromiter((name_key(n) for n in names), dtype=KEY_DTYPE,
                               count=len(names)),
        model_offsets=np.array(offsets, dtype=_U32),
        version_start=np.array(starts, dtype=_U32), versions=tuple(c.versions),
        key_offsets=np.array(c.key_offsets, dtype=_U32),
        key_counts=np.array(c.key_counts, dtype=_U32),
        output_counts=np.array(c.outputs, dtype=_U32), tensors=tuple(c.tensors),
        pending=np.array(c.pending, dtype=bool),
        feature_keys=feat_keys, name_offsets=name_offsets, feature_names=feat_names,
        collisions=collisions)
