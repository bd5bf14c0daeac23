"""Read side of the consolidated feature map: resolve (model, version) to an allowlist.

Runs in every root worker (and in ``trimmer-inspect``), read-only. A :class:`FeatureMapView`
wraps one generation's blob (``bytes``, ``memoryview`` or a read-only ``mmap``) without
copying it. Attaching costs O(1): two zero-copy numpy views of the blob's lookup index
(``model_keys`` sorted, ``model_slots``). A first lookup of a model bisects that index by the
model's stable key and reads one model table; the answer is memoised per generation, so the
hot path is one dictionary hit. Allowlists are zero-copy ``uint64`` views on the blob, so a
worker's memory for the map stays O(models it serves), not O(features).

Lookup semantics (README, "Lookup semantics"):

============================================  =============================================
request                                       outcome
============================================  =============================================
model unknown                                 ``passthrough_unknown_model`` (no allowlist)
model known, version given and present        ``trimmed`` with that version's allowlist
model known, version given but absent         ``version_fallback``: the latest version's
model known, no version                       ``trimmed`` with the latest version's
no map published / map unreadable             ``passthrough_no_map`` (:data:`NO_MAP`)
============================================  =============================================

"Latest" is the last version of the model in the blob that is not **pending**; the daemon
sorts versions in natural order (digit runs compare as integers, text runs as strings: "2" <
"10", "v9" < "v10"). A pending version (shipped to roots ahead of its leaves) is trimmed for
only when a request names it, or when a leaf is known to serve it. For a leaf whose version
is not known yet, :meth:`FeatureMapView.resolve_rollout` gives the union of the latest and
every pending version's allowlist: a frame no version the leaf may serve finds short.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np
from numpy.typing import ArrayLike

from flatbuffers_schema.feature_map import FILE_IDENTIFIER, state_name
from flatbuffers_schema.fmap.FeatureMap import FeatureMap as FbMap
from flatbuffers_schema.fmap.Model import Model as FbModel
from flatbuffers_schema.fmap.Version import Version as FbVersion
from flatbuffers_schema.keys import KEY_DTYPE, Allowlist, keyset_digest, name_key
from flatbuffers_schema.oip import TensorSignature
from flatbuffers_schema.tensor_specs import read_signature

#: Resolutions memoised per generation; bounded because clients choose the model names.
MEMO_MAX = 8192
_MIN_BLOB = 12  # root offset (4) + identifier (4) + at least a vtable offset (4)
#: What the generated accessors raise on a blob whose offsets point outside it.
_CORRUPT = (struct.error, IndexError, ValueError, TypeError, OverflowError, UnicodeDecodeError)


class MapError(ValueError):
    """The blob is not a readable feature map (wrong identifier, truncated, corrupt)."""


class Outcome(enum.StrEnum):
    TRIMMED = "trimmed"
    VERSION_FALLBACK = "version_fallback"
    PASSTHROUGH_UNKNOWN_MODEL = "passthrough_unknown_model"
    PASSTHROUGH_NO_MAP = "passthrough_no_map"


@dataclass(frozen=True, slots=True)
class Resolution:
    """Which allowlist applies to a request target, and why."""

    outcome: Outcome
    model: str
    requested_version: str | None
    version: str | None          # the version whose allowlist applies (None: pass through)
    allowlist: Allowlist | None  # None means: send untrimmed
    generation: int = 0
    tensors: TensorSignature | None = None  # the version's inputs, when the bundle says
    pending: tuple[str, ...] = ()  # the model's pending versions (never "latest")
    union: bool = False          # resolve_rollout: the union of ``version`` and ``pending``

    @property
    def trims(self) -> bool:
        return self.allowlist is not None

    def explain(self) -> str:
        """One sentence for people (trimmer-inspect lookup)."""
        asked = self.requested_version
        if self.outcome is Outcome.PASSTHROUGH_NO_MAP:
            return "no map is published: requests pass through untrimmed"
        if self.outcome is Outcome.PASSTHROUGH_UNKNOWN_MODEL:
            return f"model {self.model!r} is not in the map: requests pass through untrimmed"
        n = len(self.allowlist) if self.allowlist is not None else 0
        if self.outcome is Outcome.VERSION_FALLBACK:
            return (f"version {asked!r} of {self.model!r} is not in the map: falling back to "
                    f"the latest version {self.version!r} ({n} features)")
        if self.union:
            return (f"leaf version not known yet: union of the latest version "
                    f"{self.version!r} and pending {', '.join(map(repr, self.pending))} "
                    f"({n} features)")
        if asked is None:
            return f"no version requested: latest version {self.version!r} ({n} features)"
        kind = " (pending)" if self.version in self.pending else ""
        return f"exact match: version {self.version!r}{kind} ({n} features)"


def no_map(model: str, version: str | None = None) -> Resolution:
    """The resolution every target gets while no map is attached."""
    return Resolution(Outcome.PASSTHROUGH_NO_MAP, model, version, None, None, 0)


class FeatureMapView:
    """One generation of the map, read in place (never copied, never written)."""

    def __init__(self, buf: Any) -> None:
        if len(buf) < _MIN_BLOB:
            raise MapError(f"feature map blob too small ({len(buf)} bytes)")
        if not flatbuffers.util.BufferHasIdentifier(buf, 0, FILE_IDENTIFIER):
            raise MapError(f"not a feature map: identifier {bytes(buf[4:8])!r}, "
                           f"expected {FILE_IDENTIFIER!r}")
        try:
            self._root = FbMap.GetRootAs(buf, 0)
            self.generation: int = self._root.Generation()
            self.built_at_ns: int = self._root.BuiltAtNs()
            self.daemon_pid: int = self._root.DaemonPid()
            self._model_keys = _u64_view(self._root.ModelKeysAsNumpy())
            slots = self._root.ModelSlotsAsNumpy()
            self._model_slots = slots if isinstance(slots, np.ndarray) else np.empty(0, np.uint32)
            self.model_count: int = self._root.ModelsLength()
        except _CORRUPT as exc:
            raise MapError(f"corrupt feature map blob: {exc}") from exc
        if not self._model_keys.size == self._model_slots.size == self.model_count:
            raise MapError("corrupt feature map blob: model index does not match model count")
        self._memo: dict[tuple[str, str | None], Resolution] = {}
        self._rollout: dict[str, Resolution] = {}

    # -- hot path -------------------------------------------------------------------------
    def resolve(self, model: str, version: str | None = None) -> Resolution:
        """Return which allowlist applies to ``model`` / ``version`` (memoised)."""
        hit = self._memo.get((model, version))
        if hit is not None:
            return hit
        try:
            res = self._resolve_cold(model, version)
        except _CORRUPT as exc:
            raise MapError(f"corrupt feature map blob (generation {self.generation}) while "
                           f"resolving model {model!r}: {exc}") from exc
        if len(self._memo) >= MEMO_MAX:
            self._memo.clear()
        self._memo[(model, version)] = res
        return res

    def resolve_rollout(self, model: str) -> Resolution:
        """The allowlist for a leaf of ``model`` whose version is not known (yet): the union
        of the latest version's and every pending version's (memoised). Without pending
        versions this is :meth:`resolve` ``(model)``."""
        hit = self._rollout.get(model)
        if hit is not None:
            return hit
        res = self.resolve(model)
        if res.pending and res.allowlist is not None:
            # a corrupt pending version: resolve() raises the worded MapError
            lists = [res.allowlist.keys] + [
                k for v in res.pending if (k := self._keys_of(model, v)) is not None]
            keys = np.unique(np.concatenate(lists))
            res = dataclasses.replace(res, allowlist=Allowlist(keys, keyset_digest(keys)),
                                      union=True)
        if len(self._rollout) >= MEMO_MAX:
            self._rollout.clear()
        self._rollout[model] = res
        return res

    def _keys_of(self, model: str, version: str) -> np.ndarray | None:
        res = self.resolve(model, version)
        if res.outcome is not Outcome.TRIMMED or res.allowlist is None:
            return None
        return res.allowlist.keys

    def _resolve_cold(self, model: str, version: str | None) -> Resolution:
        table = self._find_model(model)
        if table is None:
            return Resolution(Outcome.PASSTHROUGH_UNKNOWN_MODEL, model, version, None, None,
                              self.generation)
        n = table.VersionsLength()
        if n == 0:  # never compiled (a model lists >= 1 version); Versions(-1) reads garbage
            raise ValueError("the model has no versions")
        pending = tuple(_text(table.Versions(i).Version()) for i in range(n)
                        if table.Versions(i).Pending())
        chosen, outcome = _latest(table, n), Outcome.TRIMMED
        if version is not None:
            wanted = version.encode("utf-8")
            for i in range(n - 1, -1, -1):
                if table.Versions(i).Version() == wanted:
                    chosen = i
                    break
            else:
                outcome = Outcome.VERSION_FALLBACK
        vt = table.Versions(chosen)
        allowlist = Allowlist(_u64_view(vt.FeatureKeysAsNumpy()), vt.Digest())
        return Resolution(outcome, model, version, _text(vt.Version()), allowlist,
                          self.generation, read_signature(vt), pending)

    def _find_model(self, model: str) -> FbModel | None:
        keys = self._model_keys
        key = name_key(model)
        i = int(np.searchsorted(keys, np.uint64(key)))
        wanted = model.encode("utf-8")
        while i < keys.size and int(keys[i]) == key:  # >1 only on a 64-bit collision
            table = self._root.Models(int(self._model_slots[i]))
            if table.Name() == wanted:
                return table
            i += 1
        return None

    # -- for people (trimmer-inspect) --------------------------------------------------------
    def bundles(self) -> list[dict[str, Any]]:
        """Per-bundle status as the daemon published it."""
        try:
            return self._bundles()
        except _CORRUPT as exc:
            raise MapError(f"corrupt feature map blob (bundle status): {exc}") from exc

    def _bundles(self) -> list[dict[str, Any]]:
        out = []
        for i in range(self._root.BundlesLength()):
            b = self._root.Bundles(i)
            out.append({
                "name": _text(b.Name()), "path": _text(b.Path()),
                "state": state_name(b.State()),
                "sha256": _text(b.Sha256()), "loaded_at_ns": b.LoadedAtNs(),
                "checked_at_ns": b.CheckedAtNs(), "error": _text(b.Error()),
                "current_sha256": _text(b.CurrentSha256()),
                "model_count": b.ModelCount(), "version_count": b.VersionCount(),
                "warnings": [_text(b.Warnings(j)) for j in range(b.WarningsLength())],
            })
        return out

    def models(self) -> Iterator[dict[str, Any]]:
        """Every model (sorted by name) with its versions, sizes and source bundles."""
        try:
            yield from self._models()
        except _CORRUPT as exc:
            raise MapError(f"corrupt feature map blob (models): {exc}") from exc

    def _models(self) -> Iterator[dict[str, Any]]:
        bundle_names = [b["name"] for b in self.bundles()]
        for i in range(self.model_count):
            m = self._root.Models(i)
            versions = []
            for j in range(m.VersionsLength()):
                v = m.Versions(j)
                versions.append({
                    "version": _text(v.Version()), "features": v.FeatureKeysLength(),
                    "digest": f"{v.Digest():016x}", "conflict": bool(v.Conflict()),
                    "bundles": [bundle_names[k] if k < len(bundle_names) else str(k)
                                for k in _u16_list(v)],
                    "output_count": v.OutputCount(), "pending": bool(v.Pending()),
                })
                sig = read_signature(v)
                if sig is not None:  # the Open Inference Protocol signature, when known
                    versions[-1]["max_batch_size"] = sig.max_batch_size
                    versions[-1]["inputs"] = [
                        {"name": s.name, "datatype": s.datatype, "shape": s.shape,
                         "optional": s.optional} for s in sig.inputs]
            n = len(versions)
            yield {"name": _text(m.Name()), "versions": versions,
                   "latest": versions[_latest(m, n)]["version"] if versions else None}

    def conflicts(self) -> list[str]:
        return [_text(self._root.Conflicts(i)) for i in range(self._root.ConflictsLength())]

    def feature_names(self, keys: ArrayLike) -> list[str]:
        """Names of ``keys`` (any integer array or list, read as uint64 keys) from the blob's
        name table (hex key when unnamed)."""
        table = _u64_view(self._root.FeatureKeysAsNumpy())
        offsets = self._root.NameOffsetsAsNumpy()
        blob = self._root.FeatureNamesAsNumpy()
        out = []
        for key in np.asarray(keys, dtype=KEY_DTYPE).tolist():
            i = int(np.searchsorted(table, np.uint64(key)))
            if i < table.size and int(table[i]) == key:
                out.append(bytes(blob[int(offsets[i]):int(offsets[i + 1])]).decode("utf-8"))
            else:
                out.append(f"<key {key:#018x}>")
        return out

    def to_dict(self, *, with_features: bool = False) -> dict[str, Any]:
        """The whole map as plain data (``trimmer-inspect dump``)."""
        models = list(self.models())
        if with_features:
            for model in models:
                for v in model["versions"]:
                    res = self.resolve(model["name"], v["version"])
                    assert res.allowlist is not None
                    v["input_names"] = self.feature_names(res.allowlist.keys)
        return {"generation": self.generation, "built_at_ns": self.built_at_ns,
                "daemon_pid": self.daemon_pid, "bundles": self.bundles(),
                "models": models, "conflicts": self.conflicts()}


def _latest(table: FbModel, n: int) -> int:
    """Index of the model's latest version: the last one that is not pending (the last one
    when every version is pending: a model no leaf serves yet)."""
    for i in range(n - 1, -1, -1):
        if not table.Versions(i).Pending():
            return i
    return n - 1


def _u64_view(arr: Any) -> np.ndarray:
    """Generated accessors return 0 for an absent vector; normalise to an empty array."""
    if isinstance(arr, np.ndarray):
        return arr
    return np.empty(0, dtype=KEY_DTYPE)


def _u16_list(v: FbVersion) -> list[int]:
    arr = v.BundlesAsNumpy()
    return arr.tolist() if isinstance(arr, np.ndarray) else []


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


def open_generation(blob: Any, generation: int) -> FeatureMapView:
    """The view of ``blob``, which the control block published as ``generation``; raises
    :class:`MapError` when it is not a feature map or says another generation."""
    view = FeatureMapView(blob)
    if view.generation != generation:
        raise MapError(f"blob says generation {view.generation}, control block says "
                       f"{generation}")
    return view
