"""Compile a consolidated map into the immutable FlatBuffers blob (feature_map.fbs).

Runs in the daemon. The blob is self-indexed so a worker can attach a new generation in O(1):
``model_keys``/``model_slots`` let it bisect for a model by its stable key without walking the
map, and every allowlist is a ``[ulong]`` vector a worker takes as a zero-copy numpy view.

Bulk vectors are written with ``CreateNumpyVector`` (one memcpy each); tables are written
bottom-up as FlatBuffers requires (children before parents).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import flatbuffers
import numpy as np

from flatbuffers_schema.feature_map import FILE_IDENTIFIER
from flatbuffers_schema.fmap import BundleStatus as FbBundle
from flatbuffers_schema.fmap import FeatureMap as FbMap
from flatbuffers_schema.fmap import Model as FbModel
from flatbuffers_schema.fmap import Version as FbVersion
from flatbuffers_schema.fmap.BundleState import BundleState
from flatbuffers_schema.keys import KEY_DTYPE, name_key
from flatbuffers_schema.tensor_specs import add_signature, write_inputs
from trimmer_daemon.consolidate import ConsolidatedMap, KeyCache, VersionEntry

_U32 = np.dtype("<u4")
_U16 = np.dtype("<u2")


@dataclass(frozen=True)
class BundleStatusRecord:
    """What the blob says about one bundle (what trimmer-inspect and the workers report)."""

    name: str
    path: str
    state: int = BundleState.NeverLoaded
    sha256: str = ""
    loaded_at_ns: int = 0
    checked_at_ns: int = 0
    error: str = ""
    current_sha256: str = ""
    model_count: int = 0
    version_count: int = 0
    warnings: tuple[str, ...] = ()


def compile_map(cmap: ConsolidatedMap, bundles: Sequence[BundleStatusRecord], *,
                generation: int, built_at_ns: int, daemon_pid: int,
                cache: KeyCache | None = None) -> bytes:
    """Return the FlatBuffers blob of ``cmap`` (immutable once published)."""
    n_keys = sum(e.keys.size for entries in cmap.models.values() for e in entries)
    b = flatbuffers.Builder(max(1024, n_keys * 8 + len(cmap.models) * 256))
    bundles_vec = _table_vector(b, [_bundle(b, s) for s in bundles])
    names = sorted(cmap.models)
    shared = _Shared(b)
    models_vec = _table_vector(b, [_model(b, shared, n, cmap.models[n]) for n in names])
    model_keys = np.fromiter((name_key(n) for n in names), dtype=KEY_DTYPE, count=len(names))
    order = np.argsort(model_keys, kind="stable")
    keys_vec = b.CreateNumpyVector(model_keys[order])
    slots_vec = b.CreateNumpyVector(order.astype(_U32))
    feat_keys, offsets, blob = _name_table(cache)
    feat_vec, off_vec = b.CreateNumpyVector(feat_keys), b.CreateNumpyVector(offsets)
    names_vec = b.CreateByteVector(blob)
    conflicts_vec = _string_vector(b, cmap.conflicts)
    finish_root(b, RootHeader(generation, built_at_ns, daemon_pid),
                (bundles_vec, models_vec, keys_vec, slots_vec, feat_vec, off_vec, names_vec,
                 conflicts_vec))
    return bytes(b.Output())


@dataclass(frozen=True)
class RootHeader:
    generation: int
    built_at_ns: int
    daemon_pid: int


def finish_root(b: flatbuffers.Builder, header: RootHeader, vectors: tuple[int, ...]) -> None:
    """Write the FeatureMap root and finish the buffer. ``vectors``: the offsets of bundles,
    models, model_keys, model_slots, feature_keys, name_offsets, feature_names, conflicts."""
    bundles, models, keys, slots, feat_keys, offsets, names, conflicts = vectors
    FbMap.Start(b)
    FbMap.AddGeneration(b, header.generation)
    FbMap.AddBuiltAtNs(b, header.built_at_ns)
    FbMap.AddDaemonPid(b, header.daemon_pid)
    FbMap.AddBundles(b, bundles)
    FbMap.AddModels(b, models)
    FbMap.AddModelKeys(b, keys)
    FbMap.AddModelSlots(b, slots)
    FbMap.AddFeatureKeys(b, feat_keys)
    FbMap.AddNameOffsets(b, offsets)
    FbMap.AddFeatureNames(b, names)
    FbMap.AddConflicts(b, conflicts)
    b.Finish(FbMap.End(b), file_identifier=FILE_IDENTIFIER)


class _Shared:
    """Deduplicates vectors and strings: FlatBuffers lets many tables point at one vector.

    A model's signature is stable across versions, so most versions of a model share
    one allowlist; writing it once keeps both compile time and blob size O(distinct lists).
    """

    def __init__(self, b: flatbuffers.Builder) -> None:
        self.b = b
        self.keys: dict[int, int] = {}
        self.bundles: dict[tuple[int, ...], int] = {}
        self.strings: dict[str, int] = {}

    def keys_vector(self, e: VersionEntry) -> int:
        off = self.keys.get(e.digest)
        if off is None:
            off = self.keys[e.digest] = self.b.CreateNumpyVector(e.keys)
        return off

    def bundles_vector(self, indices: tuple[int, ...]) -> int:
        off = self.bundles.get(indices)
        if off is None:
            arr = np.asarray(indices, dtype=_U16)
            off = self.bundles[indices] = self.b.CreateNumpyVector(arr)
        return off

    def string(self, text: str) -> int:
        off = self.strings.get(text)
        if off is None:
            off = self.strings[text] = self.b.CreateString(text)
        return off


def _model(b: flatbuffers.Builder, shared: _Shared, name: str,
           entries: Sequence[VersionEntry]) -> int:
    versions = _table_vector(b, [_version(b, shared, e) for e in entries])
    name_off = b.CreateString(name)
    FbModel.Start(b)
    FbModel.AddName(b, name_off)
    FbModel.AddVersions(b, versions)
    return FbModel.End(b)


def _version(b: flatbuffers.Builder, shared: _Shared, e: VersionEntry) -> int:
    keys = shared.keys_vector(e)
    srcs = shared.bundles_vector(e.bundles)
    version = shared.string(e.version)
    inputs = write_inputs(b, e.tensors)
    FbVersion.Start(b)
    FbVersion.AddVersion(b, version)
    FbVersion.AddFeatureKeys(b, keys)
    FbVersion.AddDigest(b, e.digest)
    FbVersion.AddBundles(b, srcs)
    if e.conflict:
        FbVersion.AddConflict(b, True)
    FbVersion.AddOutputCount(b, e.output_count)
    add_signature(b, e.tensors, inputs)
    if e.pending:
        FbVersion.AddPending(b, True)
    return FbVersion.End(b)


def _bundle(b: flatbuffers.Builder, s: BundleStatusRecord) -> int:
    strings = [b.CreateString(x) for x in (s.name, s.path, s.sha256, s.error, s.current_sha256)]
    warnings = _string_vector(b, s.warnings)
    FbBundle.Start(b)
    FbBundle.AddName(b, strings[0])
    FbBundle.AddPath(b, strings[1])
    FbBundle.AddState(b, s.state)
    FbBundle.AddSha256(b, strings[2])
    FbBundle.AddLoadedAtNs(b, s.loaded_at_ns)
    FbBundle.AddCheckedAtNs(b, s.checked_at_ns)
    FbBundle.AddError(b, strings[3])
    FbBundle.AddCurrentSha256(b, strings[4])
    FbBundle.AddModelCount(b, s.model_count)
    FbBundle.AddVersionCount(b, s.version_count)
    FbBundle.AddWarnings(b, warnings)
    return FbBundle.End(b)


def _table_vector(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _string_vector(b: flatbuffers.Builder, strings: Sequence[str]) -> int:
    return _table_vector(b, [b.CreateString(s) for s in strings])


def _name_table(cache: KeyCache | None) -> tuple[np.ndarray, np.ndarray, bytes]:
    if cache is None:
        return np.empty(0, KEY_DTYPE), np.zeros(1, _U32), b""
    return cache.name_table()
