"""Consolidation: per-bundle last-known-good maps -> one model -> version -> allowlist map.

Runs in the daemon (the single writer). Each bundle is indexed once when its file is
(re)loaded (:func:`index_bundle`: names -> sorted uint64 key arrays); consolidation then only
merges arrays, so a reload of one bundle costs O(that bundle) + a cheap merge of the others.

Rules (README, "Lookup semantics"):
- a model's versions are kept in natural order
  (:func:`trimmer_daemon.bundle.parse.version_sort_key`); the last one is "latest";
- a version marked pending is never "latest" (the last version that is not pending is); one
  that several bundles define is pending only if every one of them marks it so;
- the same model+version defined by several bundles with *different* inputs gets the union of
  the allowlists (never under-send) and a conflict report naming the bundles;
- two different feature names with the same 64-bit key are reported as a key collision (both
  columns are then kept wherever either is allowed: over-send, never under-send).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from flatbuffers_schema.keys import KEY_DTYPE, keyset_digest, name_key
from flatbuffers_schema.oip import TensorSignature
from trimmer_daemon.bundle.parse import ParsedBundle, version_sort_key

log = logging.getLogger(__name__)

#: Upper bound of the daemon's name -> key memo; past it the memo is cleared and rebuilt.
KEY_CACHE_MAX = 2_000_000


class KeyCache:
    """Memo of :func:`name_key` per feature name, and the key -> name table of the universe.

    Hashing costs ~1 µs per name; a bundle of 6000 versions x 300 features has far fewer
    distinct names than entries, so the memo turns indexing into dictionary lookups.
    """

    def __init__(self) -> None:
        self._keys: dict[str, int] = {}
        self.collisions: dict[int, set[str]] = {}
        self._names: dict[int, str] = {}
        self._table: tuple[np.ndarray, np.ndarray, bytes] | None = None

    def keys_of(self, names: Sequence[str]) -> np.ndarray:
        """Return the sorted unique keys of ``names``."""
        memo, learn = self._keys, self._learn
        out = np.array([memo.get(n) or learn(n) for n in names], dtype=KEY_DTYPE)
        out.sort()
        return _unique(out)

    def name_table(self) -> tuple[np.ndarray, np.ndarray, bytes]:
        """The blob's name table of every name learned so far (cached until one is learned).

        Returns sorted keys, offsets (n + 1, uint32) into the UTF-8 names blob, and the blob.
        Names of bundles that were since removed stay in it: harmless, and bounded by
        :data:`KEY_CACHE_MAX`.
        """
        if self._table is None:
            keys = sorted(self._names)
            encoded = [self._names[k].encode("utf-8") for k in keys]
            offsets = np.zeros(len(encoded) + 1, dtype=np.uint32)
            np.cumsum(np.fromiter(map(len, encoded), dtype=np.uint32, count=len(encoded)),
                      out=offsets[1:])
            self._table = (np.array(keys, dtype=KEY_DTYPE), offsets, b"".join(encoded))
        return self._table

    def _learn(self, name: str) -> int:
        if len(self._keys) >= KEY_CACHE_MAX:
            self._keys.clear()
            self._names.clear()
        key = name_key(name)
        self._keys[name] = key
        self._table = None
        other = self._names.setdefault(key, name)
        if other != name:
            self.collisions.setdefault(key, {other}).add(name)
            log.error("feature key collision key=%#018x names=%s", key,
                      sorted(self.collisions[key]))
        return key

    def name_of(self, key: int) -> str | None:
        return self._names.get(key)


@dataclass(frozen=True)
class IndexedVersion:
    version: str
    keys: np.ndarray  # sorted unique uint64
    output_count: int
    tensors: TensorSignature | None = None
    pending: bool = False


@dataclass(frozen=True)
class IndexedBundle:
    """One bundle's models with allowlists as key arrays (the daemon's per-bundle LKG map)."""

    parsed: ParsedBundle
    models: Mapping[str, tuple[IndexedVersion, ...]]

    @property
    def version_count(self) -> int:
        return sum(len(v) for v in self.models.values())


def index_bundle(parsed: ParsedBundle, cache: KeyCache) -> IndexedBundle:
    """Turn a validated bundle into key arrays (once per load of that bundle)."""
    # Versions of a model usually share one signature: index each distinct list once and let
    # them share the array (the compiler then writes it once too).
    seen: dict[tuple[str, ...], np.ndarray] = {}
    models = {}
    for model, versions in parsed.models.items():
        indexed = []
        for mv in versions:
            keys = seen.get(mv.input_names)
            if keys is None:
                keys = seen[mv.input_names] = cache.keys_of(mv.input_names)
            indexed.append(IndexedVersion(mv.version, keys, len(mv.output_names),
                                          mv.tensors, mv.pending))
        models[model] = tuple(indexed)
    return IndexedBundle(parsed, models)


def _unique(sorted_keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size < 2:
        return sorted_keys
    keep = np.empty(sorted_keys.size, dtype=bool)
    keep[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=keep[1:])
    return sorted_keys if keep.all() else sorted_keys[keep]


@dataclass(frozen=True)
class VersionEntry:
    """One model version of the consolidated map."""

    version: str
    keys: np.ndarray
    digest: int
    bundles: tuple[int, ...]  # indices into the bundle list given to consolidate()
    conflict: bool
    output_count: int
    tensors: TensorSignature | None = None  # the first defining bundle's
    pending: bool = False


@dataclass
class ConsolidatedMap:
    models: dict[str, list[VersionEntry]] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)

    @property
    def version_count(self) -> int:
        return sum(len(v) for v in self.models.values())



def consolidate(bundles: Sequence[tuple[str, IndexedBundle | None]],
                cache: KeyCache | None = None) -> ConsolidatedMap:
    """Merge the last-known-good maps of ``bundles`` (name, indexed or None) in order.

    Bundle indices in the result refer to positions in ``bundles``.
    """
    defs: dict[str, dict[str, list[tuple[int, IndexedVersion]]]] = {}
    for index, (_, indexed) in enumerate(bundles):
        if indexed is None:
            continue
        for model, versions in indexed.models.items():
            per_version = defs.setdefault(model, {})
            for iv in versions:
                per_version.setdefault(iv.version, []).append((index, iv))
    result = ConsolidatedMap()
    digests: dict[int, int] = {}
    for model in sorted(defs):
        per_version = defs[model]
        entries = [_merge(model, version, per_version[version], bundles, result.conflicts,
                          digests)
                   for version in sorted(per_version, key=version_sort_key)]
        result.models[model] = entries
    if cache is not None:
        for key, names in sorted(cache.collisions.items()):
            result.conflicts.append(
                f"feature key collision {key:#018x}: {', '.join(sorted(names))} "
                "(both are kept wherever either is allowed)")
    return result


def _merge(model: str, version: str, defs: list[tuple[int, IndexedVersion]],
           bundles: Sequence[tuple[str, IndexedBundle | None]],
           conflicts: list[str], digests: dict[int, int]) -> VersionEntry:
    first = defs[0][1]
    keys, conflict = first.keys, False
    for _, other in defs[1:]:
        if not np.array_equal(other.keys, keys):
            conflict = True
            keys = np.union1d(keys, other.keys)
    indices = tuple(index for index, _ in defs)
    if conflict:
        names = ", ".join(bundles[i][0] for i in indices)
        sizes = ", ".join(str(iv.keys.size) for _, iv in defs)
        conflicts.append(f"model {model!r} version {version!r} is defined differently by "
                         f"bundles {names} (features {sizes}); serving the union of "
                         f"{keys.size} features")
        log.warning("allowlist conflict model=%s version=%s bundles=%s union=%d",
                    model, version, names, keys.size)
    output_count = max(iv.output_count for _, iv in defs)
    tensors = first.tensors
    if any(iv.tensors != tensors for _, iv in defs[1:]):
        names = ", ".join(bundles[i][0] for i, _ in defs)
        conflicts.append(f"model {model!r} version {version!r}: bundles {names} declare "
                         f"different tensor signatures; the root uses the first one's")
    digest = digests.get(id(keys)) if not conflict else None
    if digest is None:
        digest = keyset_digest(keys)
        if not conflict:  # ``keys`` is a bundle's array, alive as long as the bundle
            digests[id(keys)] = digest
    pending = all(iv.pending for _, iv in defs)  # current in any bundle: current
    return VersionEntry(version, keys, digest, indices, conflict, output_count, tensors,
                        pending)

