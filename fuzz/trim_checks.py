"""Fuzz target: the trim engine's checks -- ``Trimmer.trim(..., check_ragged=True)`` and
``trim_parts`` on mutated frames, every backend (C and numpy) side by side.

Input: one byte choosing the allowlist, then frame bytes. Only
:class:`~root_worker.frame.FrameError` may escape; the backends and ``trim_parts`` agree
(the same output bytes, or all refuse); and a frame that ``decode`` accepts is trimmed to a
frame that decodes to exactly its allowed columns, in order, unchanged.
"""

from __future__ import annotations

import itertools

import atheris
import numpy as np

with atheris.instrument_imports(include=["root_worker", "flatbuffers_schema", "fuzz"]):
    from flatbuffers_schema.keys import Allowlist
    from fuzz.harness import Finding, main
    from fuzz.seeds import FRAME_NAMES
    from root_worker.frame import BACKENDS, FrameError, Ragged, Trimmer, decode

SUBSETS = [list(c) for r in range(len(FRAME_NAMES) + 1)
           for c in itertools.combinations(FRAME_NAMES, r)]
ALLOWLISTS = [(names, Allowlist.from_names(names)) for names in SUBSETS]
TRIMMERS = [Trimmer(backend=b) for b in BACKENDS]  # kept: their plan caches see every input


def _trim(t: Trimmer, frame: bytes, allow: Allowlist) -> bytes | None:
    try:
        return bytes(t.trim(frame, allow, check_ragged=True).data)
    except FrameError:
        return None


def _parts(t: Trimmer, frame: bytes, allow: Allowlist) -> bytes | None:
    try:
        return b"".join(bytes(p) for p in t.trim_parts(frame, allow, check_ragged=True).parts)
    except FrameError:
        return None


def _same(a: object, b: object) -> bool:
    """The same column, byte for byte (NaN payloads included)."""
    if isinstance(a, Ragged) and isinstance(b, Ragged):
        return _same(a.values, b.values) and _same(a.offsets, b.offsets)
    return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and \
        a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    names, allow = ALLOWLISTS[data[0] % len(ALLOWLISTS)]
    frame = data[1:]
    outs = [_trim(t, frame, allow) for t in TRIMMERS]
    outs += [_parts(t, frame, allow) for t in TRIMMERS]
    if any(o != outs[0] for o in outs):
        raise Finding(f"backends {BACKENDS} (trim, then trim_parts) disagree: "
                      f"{[None if o is None else len(o) for o in outs]}")
    try:
        src = decode(frame)
    except FrameError:
        return
    if outs[0] is None:
        raise Finding("trim refuses a frame decode accepts")
    try:
        got = decode(outs[0])
    except FrameError as exc:
        raise Finding(f"trim's output does not decode: {exc}") from None
    want = [n for n in src.columns if n in names]
    if list(got.columns) != want or got.metadata != src.metadata or \
            got.n_candidates != src.n_candidates:
        raise Finding(f"trimmed to {list(got.columns)}, expected {want}")
    for n in want:
        if not _same(got.columns[n], src.columns[n]):
            raise Finding(f"column {n!r} changed by trim")


if __name__ == "__main__":
    main(test_one_input)
