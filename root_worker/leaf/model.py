"""The reference leaf's "models": signatures and a deterministic scoring function.

A :class:`LeafModel` is one model version: its ``input_names`` (from a signature or a bundle
file) and one weight per input, seeded by a stable hash of ``model`` and the feature name.
It gets its inputs from a decoded frame through the leaf SDK's
:class:`~root_worker.leaf.sdk.InputConverter` (signature order, missing ones reported), as
any leaf would (docs/leaf-sdk.md), and :meth:`LeafModel.score` returns, per candidate::

    score = sum over inputs f of  w_f * sum over the candidate's elements x of g(x)

with ``g`` a bounded transform per dtype (floats: ``tanh``; integers: the low 20 bits
scaled to [0, 1); booleans: 0/1) and, for ragged columns, ``+ 0.01`` per list item. Every
input contributes (change any value of any required feature and the score moves); columns
the model does not name are never looked at, so a trimmed frame and the untrimmed frame
give bit-identical scores. A missing input contributes 0 and is reported. Which columns of
a frame layout go into which vectorised group is worked out once per (layout, model
version) and cached (``_Plan``), so a request costs a few numpy calls per group, not Python
work per column (the reference leaf's CPU should go to receiving and decoding frames).

:class:`ModelStore` holds the served models and re-reads the bundle file they came from
when it changes (so a demo's bundle hot-swap also "rolls out" the new leaf version).
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from root_worker.frame import Column, Frame, Ragged
from root_worker.leaf.sdk import InputConverter, Inputs
from trimmer_daemon.bundle.build import read_signature
from trimmer_daemon.bundle.parse import BundleError, latest_version, load_bundle_file

log = logging.getLogger(__name__)
INT_BITS = 20
RAGGED_ITEM_WEIGHT = 0.01
RELOAD_CHECK_S = 0.2
MAX_PLANS = 64  # frame layouts remembered per model version


def feature_weight(model: str, feature: str) -> float:
    """A stable weight in [-1, 1) for ``feature`` in ``model`` (same in every process)."""
    digest = hashlib.blake2b(f"{model}\0{feature}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 63 - 1.0


def _transform(values: np.ndarray, kind: str) -> np.ndarray:
    """Bounded float64 image of values of one kind (see the module docstring); ``values``
    is a fresh float64 (kinds ``f``, ``b``) or int64 (kind ``i``) array, reused in place."""
    if kind == "f":
        if not np.isfinite(values).all():  # rare: skip nan_to_num's three passes
            np.nan_to_num(values, copy=False, posinf=1.0, neginf=-1.0)
        return np.tanh(values, out=values)
    if kind == "b":
        return values
    np.bitwise_and(values, (1 << INT_BITS) - 1, out=values)
    out = values.astype(np.float64)
    out /= float(1 << INT_BITS)
    return out


def _width(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _getter(positions: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``inputs -> tuple of inputs[i]`` in one C call (``itemgetter``)."""
    if len(positions) == 1:
        i = positions[0]
        return lambda arrays: (arrays[i],)
    return operator.itemgetter(*positions)


_KIND = {"f": "f", "b": "b", "i": "i", "u": "i"}
_CONCAT = {"f": np.float64, "b": np.float64, "i": np.int64}
_DTYPES = operator.attrgetter("dtype")
_NDIM = operator.attrgetter("ndim")
_SHAPE = operator.attrgetter("shape")
_VALUES = operator.attrgetter("values")
_OFFSETS = operator.attrgetter("offsets")


@dataclass(frozen=True)
class _Group:
    """Same-kind, same-inner-shape columns of one frame layout, scored together: dense ones
    as one ``(n, columns * width)`` matrix, ragged ones as one flat array + offsets."""

    kind: str
    width: int                # elements per candidate (dense) or per list item (ragged)
    get: Callable[[Sequence[Any]], tuple[Any, ...]]
    shape: tuple[int, ...]    # inner shape of every column (dense) or list item (ragged)
    dtypes: tuple[np.dtype, ...]  # the layout the plan was made for (checked on use) ...
    ndims: tuple[int, ...]        # ... with the arrays' ndim (dense, or ragged values)
    weights: np.ndarray       # per column; dense and not scalar: per element of a row
    scalar: bool              # dense columns of shape (n,)

    def matches(self, arrays: tuple[np.ndarray, ...]) -> bool:
        """Whether these arrays (dense columns or ragged values) are still of the dtypes
        and inner shape the group was made for."""
        if (tuple(map(_DTYPES, arrays)) != self.dtypes
                or tuple(map(_NDIM, arrays)) != self.ndims):
            return False
        shape = self.shape
        if not shape:
            return True
        shapes = set(map(_SHAPE, arrays))
        if len(shapes) == 1:  # dense columns (n rows each), ragged ones of one length
            return next(iter(shapes))[1:] == shape
        return all(a.shape[1:] == shape for a in arrays)


class _Plan:
    """How a model scores one frame layout (which of its inputs the frame has, of what
    kind), computed once per (layout, model version) so :meth:`LeafModel.score` does a few
    vectorised operations per group instead of Python work per column. It works on the
    leaf SDK's :class:`~root_worker.leaf.sdk.Inputs` (signature order, ``None`` missing)."""

    def __init__(self, weights: Sequence[float], arrays: Sequence[Column | None]) -> None:
        dense: dict[tuple[str, tuple[int, ...]], tuple[list[int], list[float]]] = {}
        ragged: dict[tuple[str, tuple[int, ...]], tuple[list[int], list[float]]] = {}
        for i, (col, w) in enumerate(zip(arrays, weights, strict=True)):
            if col is None:
                continue
            arr, into = (col.values, ragged) if isinstance(col, Ragged) else (col, dense)
            positions, ws = into.setdefault((_KIND[arr.dtype.kind], arr.shape[1:]), ([], []))
            positions.append(i)
            ws.append(w)
        self.dense = [self._group(kind, shape, pos, ws, arrays, repeat=True)
                      for (kind, shape), (pos, ws) in sorted(dense.items())]
        self.ragged = [self._group(kind, shape, pos, ws, arrays, repeat=False)
                       for (kind, shape), (pos, ws) in sorted(ragged.items())]

    @staticmethod
    def _group(kind: str, shape: tuple[int, ...], positions: list[int], ws: list[float],
               arrays: Sequence[Column | None], repeat: bool) -> _Group:
        width = _width(shape)
        get = _getter(positions)
        cols = get(arrays)
        arrays = cols if repeat else tuple(map(_VALUES, cols))
        weights = np.asarray(ws, dtype=np.float64)
        scalar = repeat and not shape
        return _Group(kind, width, get, shape, tuple(map(_DTYPES, arrays)),
                      tuple(map(_NDIM, arrays)),
                      np.repeat(weights, width) if repeat and not scalar else weights,
                      scalar)

    def matches(self, arrays: Sequence[Column | None]) -> bool:
        """Whether ``arrays`` (same layout) are still of the dense/ragged kind, dtypes and
        inner shapes this plan was made for."""
        try:
            for g in self.dense:
                if not g.matches(g.get(arrays)):
                    return False
            for g in self.ragged:
                if not g.matches(tuple(map(_VALUES, g.get(arrays)))):
                    return False
        except AttributeError:  # a dense column became ragged or vice versa
            return False
        return True

    def scores(self, arrays: Sequence[Column | None], n: int) -> np.ndarray:
        total = np.zeros(n, dtype=np.float64)
        for g in self.dense:
            cols = g.get(arrays)
            dtype = _CONCAT[g.kind]
            if g.scalar:  # (n,) columns, concatenated column-major: (columns, n)
                values = _transform(np.concatenate(cols, dtype=dtype, casting="unsafe")
                                    .reshape(len(cols), n), g.kind)
                values *= g.weights[:, None]
                total += values.sum(axis=0)
            else:         # (n, *shape) columns side by side: (n, columns * width)
                values = _transform(np.concatenate(cols, axis=1, dtype=dtype,
                                                   casting="unsafe")
                                    .reshape(n, g.weights.size), g.kind)
                values *= g.weights
                total += values.sum(axis=1)
        for g in self.ragged:
            total += self._ragged_scores(g, g.get(arrays), n)
        return total

    @staticmethod
    def _ragged_scores(g: _Group, cols: tuple[Ragged, ...], n: int) -> np.ndarray:
        """Per candidate: sum over columns of w * (sum of its items' values + 0.01 * items).

        Each list is summed on its own (``reduceat``), so a candidate's score depends only
        on its own values."""
        flat = _transform(np.concatenate(tuple(map(_VALUES, cols)), dtype=_CONCAT[g.kind],
                                         casting="unsafe").reshape(-1), g.kind)
        offsets = np.concatenate(tuple(map(_OFFSETS, cols))).reshape(len(cols), n + 1)
        sizes = offsets[:, -1] * g.width                       # elements per column
        bases = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        counts = np.diff(offsets, axis=1)                      # list items, (columns, n)
        starts = (offsets[:, :-1] * g.width + bases[:, None]).ravel()
        filled = (counts > 0).ravel()  # a non-empty list ends where the next one starts
        sums = np.zeros(starts.size, dtype=np.float64)
        if filled.any():
            sums[filled] = np.add.reduceat(flat, starts[filled])
        per_col = sums.reshape(counts.shape) + RAGGED_ITEM_WEIGHT * counts
        return (per_col * g.weights[:, None]).sum(axis=0)


@dataclass(frozen=True)
class LeafModel:
    """One model version as the leaf runs it."""

    model: str
    version: str
    input_names: tuple[str, ...]
    weights: np.ndarray = field(repr=False, compare=False)
    #: the leaf SDK's converter: frame -> this version's inputs in signature order
    converter: InputConverter = field(repr=False, compare=False)
    #: frame layout (its column names) -> :class:`_Plan`, shared by the request threads
    _plans: dict[tuple[str, ...], _Plan] = field(default_factory=dict, init=False,
                                                 repr=False, compare=False)

    @classmethod
    def build(cls, model: str, version: str, input_names: Iterable[str]) -> LeafModel:
        names = tuple(input_names)
        weights = np.array([feature_weight(model, f) for f in names], dtype=np.float64)
        return cls(model, version, names, weights, InputConverter(names))

    def score(self, frame: Frame) -> tuple[list[float], list[str]]:
        """``(scores, missing input names)`` for a decoded frame."""
        inputs = self.converter(frame)
        return self.score_inputs(inputs).tolist(), list(inputs.missing)

    def score_inputs(self, inputs: Inputs) -> np.ndarray:
        """Per-candidate scores of this version's inputs (from :attr:`converter`)."""
        arrays = inputs.arrays
        plan = self._plans.get(inputs.layout)
        if plan is None or not plan.matches(arrays):
            plan = _Plan(self.weights.tolist(), arrays)
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[inputs.layout] = plan
        return plan.scores(arrays, inputs.n_candidates)


class ModelStore:
    """The models a leaf serves: from bundle files and/or single signatures.

    Bundle files are re-read when their (inode, size, mtime) changes, checked at most every
    ``RELOAD_CHECK_S``; a file that fails to parse keeps the previous models (logged).
    """

    def __init__(self, bundles: Sequence[str] = (), only: Sequence[str] = (),
                 signatures: Sequence[tuple[str, str, str]] = ()) -> None:
        """``only``: restrict bundle models to these names; ``signatures``: (model,
        version, path) of module_info.json files."""
        self._bundles = [os.path.abspath(p) for p in bundles]
        self._only = set(only)
        self._fixed: dict[str, dict[str, LeafModel]] = {}
        for model, version, path in signatures:
            sig = read_signature(path, model=model, version=version).signature
            self._fixed.setdefault(model, {})[version] = LeafModel.build(
                model, version, sig.input_names)
        self._stamps: dict[str, tuple[int, int, int]] = {}
        self._from_bundles: dict[str, dict[str, dict[str, LeafModel]]] = {}
        self._pending: dict[str, set[tuple[str, str]]] = {}  # per bundle: marked pending
        self._models: dict[str, dict[str, LeafModel]] = {}
        self._latest: dict[str, str] = {}
        self._lock = threading.Lock()
        self._next_check = 0.0
        self.reloads = 0
        self._reload(force=True)

    @classmethod
    def from_inputs(cls, models: Mapping[str, Mapping[str, Sequence[str]]]) -> ModelStore:
        """A store of ``{model: {version: input_names}}`` given in memory (tests)."""
        store = cls()
        store._fixed = {m: {v: LeafModel.build(m, v, names) for v, names in vs.items()}
                        for m, vs in models.items()}
        store._publish()
        return store

    def _reload(self, force: bool = False) -> None:
        changed = False
        for path in self._bundles:
            try:
                st = os.stat(path)
            except OSError as exc:
                log.warning("leaf bundle unreadable path=%s error=%s", path, exc)
                continue
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if not force and self._stamps.get(path) == stamp:
                continue
            try:
                parsed = load_bundle_file(path)
            except BundleError as exc:
                log.error("leaf bundle rejected, keeping previous models: %s", exc)
                self._stamps[path] = stamp
                continue
            self._stamps[path] = stamp
            self._from_bundles[path] = {
                m: {v.version: LeafModel.build(m, v.version, v.input_names) for v in versions}
                for m, versions in parsed.models.items()
                if not self._only or m in self._only}
            self._pending[path] = {(m, v.version) for m, versions in parsed.models.items()
                                   for v in versions if v.pending}
            changed = True
        if changed or force:
            self._publish()

    def _publish(self) -> None:
        models: dict[str, dict[str, LeafModel]] = {}
        for per_bundle in self._from_bundles.values():
            for m, versions in per_bundle.items():
                models.setdefault(m, {}).update(versions)
        for m, versions in self._fixed.items():
            models.setdefault(m, {}).update(versions)
        self._models = models
        # a version a bundle marks pending is the default only once no other is left (as on
        # the roots: "latest" is the greatest version that is not pending)
        pending = set().union(*self._pending.values()) if self._pending else set()
        self._latest = {m: latest_version([v for v in vs if (m, v) not in pending] or vs)
                        for m, vs in models.items() if vs}
        self.reloads += 1
        log.info("leaf models: %s", {m: sorted(vs) for m, vs in models.items()})

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check or not self._bundles:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + RELOAD_CHECK_S
            self._reload()

    def get(self, model: str, version: str | None) -> LeafModel | None:
        """The requested version, else the latest; ``None`` for an unknown model."""
        self.maybe_reload()
        versions = self._models.get(model)
        if not versions:
            return None
        if version is not None and version in versions:
            return versions[version]
        return versions[self._latest[model]]

    def describe(self) -> dict[str, Any]:
        return {m: {"versions": sorted(vs), "latest": self._latest.get(m),
                    "inputs": {v: len(lm.input_names) for v, lm in vs.items()}}
                for m, vs in sorted(self._models.items())}
