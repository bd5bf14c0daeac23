"""The reference leaf's "models": signatures and a deterministic scoring function.

A :class:`LeafModel` is one model version: its ``input_names`` (from a signature or a bundle
file) and one weight per input, seeded by a stable hash of ``model`` and the feature name.
:meth:`LeafModel.score` turns exactly those features of a decoded frame into arrays and
returns, per candidate::

    score = sum over inputs f of  w_f * sum over the candidate's elements x of g(x)

with ``g`` a bounded transform per dtype (floats: ``tanh``; integers: the low 20 bits
scaled to [0, 1); booleans: 0/1) and, for ragged columns, ``+ 0.01`` per list item. Every
input contributes (change any value of any required feature and the score moves); columns
the model does not name are never looked at, so a trimmed frame and the untrimmed frame
give bit-identical scores. A missing input contributes 0 and is reported.

:class:`ModelStore` holds the served models and re-reads the bundle file they came from
when it changes (so a demo's bundle hot-swap also "rolls out" the new leaf version).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from root_worker.frame import Frame, Ragged
from trimmer_daemon.bundle import (
    BundleError,
    latest_version,
    load_bundle_file,
    parse_signature,
    read_file_bounded,
)

log = logging.getLogger(__name__)
INT_BITS = 20
RAGGED_ITEM_WEIGHT = 0.01
RELOAD_CHECK_S = 0.2


def feature_weight(model: str, feature: str) -> float:
    """A stable weight in [-1, 1) for ``feature`` in ``model`` (same in every process)."""
    digest = hashlib.blake2b(f"{model}\0{feature}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 63 - 1.0


def _transform(values: np.ndarray, kind: str) -> np.ndarray:
    """Bounded float64 image of values of one kind (see the module docstring)."""
    if kind == "f":
        return np.tanh(np.nan_to_num(values.astype(np.float64, copy=False), posinf=1.0,
                                     neginf=-1.0))
    if kind == "b":
        return values.astype(np.float64)
    low = values.astype(np.int64, casting="unsafe", copy=False) & ((1 << INT_BITS) - 1)
    return low.astype(np.float64) / float(1 << INT_BITS)


def _width(arr: np.ndarray) -> int:
    return math.prod(arr.shape[1:])


class _Groups:
    """The model's columns of one frame, grouped by dense/ragged and value kind, so each
    group is transformed and weighted with a few vectorised operations."""

    def __init__(self, n_candidates: int) -> None:
        self.n = n_candidates
        # kind -> (2-D arrays (n, width), weights, widths)
        self.dense: dict[str, tuple[list[np.ndarray], list[float], list[int]]] = {}
        # kind -> (flat values, weights, offsets (n + 1), elements per list item)
        self.ragged: dict[str, tuple[list[np.ndarray], list[float], list[np.ndarray],
                                     list[int]]] = {}

    def add(self, col: np.ndarray | Ragged, weight: float) -> None:
        if isinstance(col, Ragged):
            values = col.values
            group = self.ragged.get(_KIND[values.dtype.kind])
            if group is None:
                group = self.ragged[_KIND[values.dtype.kind]] = ([], [], [], [])
            group[0].append(values.reshape(-1))
            group[1].append(weight)
            group[2].append(col.offsets)
            group[3].append(1 if values.ndim == 1 else _width(values))
            return
        dense = self.dense.get(_KIND[col.dtype.kind])
        if dense is None:
            dense = self.dense[_KIND[col.dtype.kind]] = ([], [], [])
        width = 1 if col.ndim == 1 else _width(col)
        dense[0].append(col.reshape(self.n, width))
        dense[1].append(weight)
        dense[2].append(width)

    def scores(self) -> np.ndarray:
        total = np.zeros(self.n, dtype=np.float64)
        for kind, (arrs, ws, widths) in sorted(self.dense.items()):
            values = _transform(np.concatenate(arrs, axis=1, dtype=_CONCAT[kind],
                                               casting="unsafe"), kind)
            total += (values * np.repeat(np.asarray(ws), widths)).sum(axis=1)
        for kind, (flats, ws, offs, widths) in sorted(self.ragged.items()):
            total += self._ragged_scores(kind, flats, np.asarray(ws), np.stack(offs),
                                         np.asarray(widths, dtype=np.int64))
        return total

    def _ragged_scores(self, kind: str, flats: list[np.ndarray], ws: np.ndarray,
                       offsets: np.ndarray, widths: np.ndarray) -> np.ndarray:
        """Per candidate: sum over columns of w * (sum of its items' values + 0.01 * items).

        Each list is summed on its own (``reduceat``), so a candidate's score depends only
        on its own values."""
        flat = _transform(np.concatenate(flats, dtype=_CONCAT[kind], casting="unsafe"), kind)
        sizes = np.array([a.size for a in flats], dtype=np.int64)
        bases = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        counts = np.diff(offsets, axis=1)                      # list items, (columns, n)
        starts = (offsets[:, :-1] * widths[:, None] + bases[:, None]).ravel()
        filled = (counts > 0).ravel()  # a non-empty list ends where the next one starts
        sums = np.zeros(starts.size, dtype=np.float64)
        if filled.any():
            sums[filled] = np.add.reduceat(flat, starts[filled])
        per_col = sums.reshape(counts.shape) + RAGGED_ITEM_WEIGHT * counts
        return (per_col * ws[:, None]).sum(axis=0)


_KIND = {"f": "f", "b": "b", "i": "i", "u": "i"}
_CONCAT = {"f": np.float64, "b": np.float64, "i": np.int64}


@dataclass(frozen=True)
class LeafModel:
    """One model version as the leaf runs it."""

    model: str
    version: str
    input_names: tuple[str, ...]
    weights: np.ndarray = field(repr=False, compare=False)

    @classmethod
    def build(cls, model: str, version: str, input_names: Iterable[str]) -> LeafModel:
        names = tuple(input_names)
        weights = np.array([feature_weight(model, f) for f in names], dtype=np.float64)
        return cls(model, version, names, weights)

    def score(self, frame: Frame) -> tuple[list[float], list[str]]:
        """``(scores, missing input names)`` for a decoded frame."""
        groups = _Groups(frame.n_candidates)
        missing: list[str] = []
        columns = frame.columns
        for name, w in zip(self.input_names, self.weights.tolist(), strict=True):
            col = columns.get(name)
            if col is None:
                missing.append(name)
            else:
                groups.add(col, w)
        return groups.scores().tolist(), missing


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
            sig = parse_signature(read_file_bounded(path, 64 << 20), path=path)
            self._fixed.setdefault(model, {})[version] = LeafModel.build(
                model, version, sig.input_names)
        self._stamps: dict[str, tuple[int, int, int]] = {}
        self._from_bundles: dict[str, dict[str, dict[str, LeafModel]]] = {}
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
        self._latest = {m: latest_version(vs) for m, vs in models.items() if vs}
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
