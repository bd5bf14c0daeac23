"""Synthetic, production-shaped workloads for the demo, the tests and the benchmarks.

Nothing here runs in the serving path. It builds, deterministically from a seed:

* a *feature universe* -- what the root fetches per candidate: scalar floats (``num``),
  integer ids and counts (``cat``), float16 embeddings (``emb``, 16 values per candidate) and
  variable-length id lists (``seq``, ragged), named ``<group>_<kind>_<index>``;
* a *model set* over it: every feature has one primary user (one of the models, or a model
  served elsewhere) and, with a small probability, each other model, so each of three
  models uses ~31% of the union;
* *frames* for N candidates carrying the whole universe (what an untrimmed root sends).

Values are calibrated so that lz4 saves roughly a fifth of a frame, as the article reports
for production traffic: most columns are dense random values, a ``sparsity`` fraction of
candidates holds zeros (missing features), user-level features (``user_*``) repeat one
value for every candidate of the request (a request scores many items for one user).

``python -m root_worker.testing.workload write-examples examples`` regenerates ``examples/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flatbuffers_schema.atomic_file import write_atomic
from root_worker.frame import Column, Ragged, encode

KINDS = (  # kind, dtype, per-candidate shape, ragged, share of the universe
    ("num", "<f4", (), False, 0.55),
    ("cat", "<i8", (), False, 0.15),
    ("emb", "<f2", (16,), False, 0.15),
    ("seq", "<i8", (), True, 0.15),
)
GROUPS = ("user", "pin", "ctx", "cross")
USER_PREFIX = "user_"  # user-level features hold one value repeated for every candidate
SEQ_MAX_LEN = 24
DEFAULT_SPARSITY = 0.05
EXAMPLE_MODELS = ("ads_ctr", "ads_cvr", "homefeed_rank")


@dataclass(frozen=True)
class FeatureSpec:
    """One feature column: name, wire dtype, per-candidate shape, ragged or dense."""

    name: str
    dtype: str
    shape: tuple[int, ...] = ()
    ragged: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "ragged": self.ragged}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> FeatureSpec:
        return cls(str(doc["name"]), str(doc["dtype"]), tuple(doc.get("shape", ())),
                   bool(doc.get("ragged", False)))


def make_universe(n_features: int = 2000, seed: int = 0) -> list[FeatureSpec]:
    """``n_features`` feature specs with the kind mix of :data:`KINDS`, in a stable order."""
    rng = np.random.default_rng(seed)
    shares = np.array([k[4] for k in KINDS])
    kinds = rng.choice(len(KINDS), size=n_features, p=shares / shares.sum())
    out = []
    for i, k in enumerate(kinds.tolist()):
        kind, dtype, shape, ragged, _ = KINDS[k]
        out.append(FeatureSpec(f"{GROUPS[i % len(GROUPS)]}_{kind}_{i:04d}", dtype, shape,
                               ragged))
    return out


def assign_models(universe: Sequence[FeatureSpec], models: Sequence[str] = EXAMPLE_MODELS,
                  extra_share: float = 0.04, elsewhere_share: float = 0.15,
                  seed: int = 1) -> dict[str, list[str]]:
    """Give each feature one primary user and, with ``extra_share``, each other model too.

    The primary user is one of ``models`` or, with ``elsewhere_share``, a model served by
    other roots (the union a root fetches is wider than any one partition's needs). With
    three models each uses ~31% of the universe.
    """
    rng = np.random.default_rng(seed)
    n, k = len(universe), len(models)
    shares = np.full(k + 1, (1.0 - elsewhere_share) / k)
    shares[k] = elsewhere_share
    primary = rng.choice(k + 1, size=n, p=shares)
    extra = rng.random((n, k)) < extra_share
    return {m: [f.name for i, f in enumerate(universe) if primary[i] == j or extra[i, j]]
            for j, m in enumerate(models)}


def next_version(features: Sequence[str], universe: Sequence[FeatureSpec], seed: int = 2,
                 churn: float = 0.1) -> list[str]:
    """A retrained model's inputs: drop ``churn`` of the features, add as many others."""
    rng = np.random.default_rng(seed)
    kept = [f for f in features if rng.random() >= churn]
    used = set(features)
    pool = [f.name for f in universe if f.name not in used]
    added = rng.choice(len(pool), size=min(len(pool), len(features) - len(kept)),
                       replace=False)
    chosen = set(kept) | {pool[i] for i in added.tolist()}
    return [f.name for f in universe if f.name in chosen]


def make_columns(universe: Iterable[FeatureSpec], n_candidates: int, seed: int = 0,
                 sparsity: float = DEFAULT_SPARSITY) -> dict[str, Column]:
    """One column per feature for ``n_candidates`` candidates (random but reproducible)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, Column] = {}
    for spec in universe:
        zero = rng.random(n_candidates) < sparsity
        if spec.ragged:
            cols[spec.name] = _ragged_ids(rng, spec, n_candidates, zero)
            continue
        # one user per request: a user-level feature repeats one value
        arr = _values(rng, spec, 1 if spec.name.startswith(USER_PREFIX) else n_candidates)
        if arr.shape[0] != n_candidates:
            arr = np.repeat(arr, n_candidates, axis=0)
        arr[zero] = 0
        cols[spec.name] = arr
    return cols


def _ragged_ids(rng: np.random.Generator, spec: FeatureSpec, n_candidates: int,
                zero: np.ndarray) -> Ragged:
    """Lists of random values (63-bit ids for integer columns); a user-level list is the
    same for every candidate."""
    if spec.name.startswith(USER_PREFIX):
        one = _values(rng, spec, int(rng.integers(0, SEQ_MAX_LEN // 2 + 1)))
        lengths = np.full(n_candidates, one.shape[0])
        lengths[zero] = 0
        values = np.concatenate([one[:n] for n in lengths.tolist()] or [one[:0]])
    else:
        lengths = rng.integers(0, SEQ_MAX_LEN + 1, size=n_candidates)
        lengths[zero] = 0
        values = _values(rng, spec, int(lengths.sum()))
    return Ragged.from_lengths(values, lengths)


def _values(rng: np.random.Generator, spec: FeatureSpec, n: int) -> np.ndarray:
    shape = (n, *spec.shape)
    kind = np.dtype(spec.dtype).kind
    if kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if kind == "b":
        return rng.random(shape) < 0.5
    return rng.integers(0, 1 << 63, size=shape, dtype=np.int64).astype(spec.dtype)


def make_frame(universe: Sequence[FeatureSpec], n_candidates: int, *, seed: int = 0,
               targets: Sequence[Any] | None = None, request_id: str | None = None,
               sparsity: float = DEFAULT_SPARSITY) -> bytes:
    """An encoded frame of the whole universe; ``targets`` goes into the metadata."""
    meta: dict[str, Any] = {"request_id": request_id or f"req-{seed}"}
    if targets is not None:
        meta["targets"] = list(targets)
    return encode(make_columns(universe, n_candidates, seed, sparsity), meta,
                  n_candidates=n_candidates)


def load_universe(path: str | os.PathLike[str]) -> list[FeatureSpec]:
    """Read a ``features.json`` written by :func:`write_examples`."""
    doc = json.loads(Path(path).read_text())
    return [FeatureSpec.from_json(d) for d in doc["features"]]


def bundle_doc(models: Mapping[str, Mapping[str, Sequence[str]]]) -> dict[str, Any]:
    """``{model: {version: features}}`` as a bundle-level ``module_info.json`` document."""
    return {m: [{"version": v, "input_names": list(f), "output_names": ["score"]}
                for v, f in versions.items()] for m, versions in models.items()}


def write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc, indent=1) + "\n", durable=False)


def write_examples(out: Path, n_features: int = 2000) -> dict[str, Path]:
    """Write the demo's inputs under ``out``: ``features.json``, the bundles, ``routing.json``.

    Bundles: ``bundles/ads/module_info.json`` (ads_ctr v1, ads_cvr v1),
    ``bundles/homefeed/module_info.json`` (homefeed_rank v1) and the hot-swap replacement
    ``bundles/homefeed-v2/module_info.json`` (homefeed_rank v1 and v2).
    """
    universe = make_universe(n_features)
    models = assign_models(universe)
    v2 = next_version(models["homefeed_rank"], universe)
    paths = {
        "features": out / "features.json",
        "ads": out / "bundles" / "ads" / "module_info.json",
        "homefeed": out / "bundles" / "homefeed" / "module_info.json",
        "homefeed-v2": out / "bundles" / "homefeed-v2" / "module_info.json",
        "routing": out / "routing.json",
    }
    write_json(paths["features"], {"features": [f.to_json() for f in universe]})
    write_json(paths["ads"], bundle_doc({"ads_ctr": {"1": models["ads_ctr"]},
                                         "ads_cvr": {"1": models["ads_cvr"]}}))
    write_json(paths["homefeed"], bundle_doc({"homefeed_rank": {"1": models["homefeed_rank"]}}))
    write_json(paths["homefeed-v2"], bundle_doc(
        {"homefeed_rank": {"1": models["homefeed_rank"], "2": v2}}))
    write_json(paths["routing"], {
        "ads_ctr": ["http://127.0.0.1:8101"],
        "ads_cvr": ["http://127.0.0.1:8102"],
        "homefeed_rank": ["http://127.0.0.1:8103"],
    })
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m root_worker.testing.workload")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("write-examples", help="regenerate the example bundles and routing")
    ex.add_argument("out", type=Path)
    ex.add_argument("--features", type=int, default=2000)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for name, path in write_examples(args.out, args.features).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
