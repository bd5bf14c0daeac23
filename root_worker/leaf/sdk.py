"""The leaf SDK: what a leaf server needs to serve frames from a feature-trimmer root.

Runs in the leaf process (any web framework; the reference leaf,
:mod:`root_worker.leaf.server`, uses exactly this API). Imports need numpy alone (and the
standard library); lz4 and torch are used only when installed and asked for. The HTTP
contract it implements is :mod:`flatbuffers_schema.wire`; the bytes are specified in
``docs/frame-format.md``; the guide is ``docs/leaf-sdk.md``.

Per request::

    frame = read_frame(body, headers.get(wire.ENCODING_HEADER))       # FrameError -> 400
    inputs = converter(frame)               # the model's inputs, in signature order
    refusal = check_skew(headers.get(wire.TRIMMED_FOR_HEADER), served_version, inputs)
    if refusal:                             # 409: the root re-sends the frame untrimmed
        return refusal.status, refusal.body
    scores = model(*inputs.arrays)  # or inputs.to_torch()
    return 200, score_reply(scores, served_version)

where ``converter = InputConverter.from_signature(path)`` was built once from the model's
signature (a per-model or per-bundle ``module_info.json``, a ``.pt`` archive: read by the
same code as ``trimmer-bundle``). Dense inputs are zero-copy numpy views of shape ``(C, *dims)`` on
the request body; ragged inputs are :class:`~root_worker.frame.Ragged` (``values`` of shape
``(n_values, *dims)`` and int64 ``offsets`` of length ``C + 1``), also views; a missing
input is ``None`` and named in ``inputs.missing``.
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flatbuffers_schema.wire import (
    ENCODING_IDENTITY,
    ENCODING_LZ4,
    REPLY_ERROR,
    REPLY_SCORES,
    REPLY_VERSION,
    STATUS_SKEW,
)
from root_worker.frame import Column, Frame, FrameError, Ragged, decode
from trimmer_daemon.bundle.build import BuildError, read_signature
from trimmer_daemon.bundle.parse import DEFAULT_LIMITS, BundleError, Limits

__all__ = ["BuildError", "BundleError", "Column", "Frame", "FrameError", "InputConverter",
           "Inputs", "Ragged", "Refusal", "UnsupportedEncoding", "check_skew", "read_frame",
           "score_reply"]

DEFAULT_MAX_FRAME_BYTES = 256 << 20
MAX_LAYOUTS = 64  # frame layouts (column name tuples) a converter remembers


class UnsupportedEncoding(FrameError):
    """The body's ``Content-Encoding`` is neither identity nor lz4 (answer 415)."""


def read_frame(body: bytes | bytearray | memoryview, content_encoding: str | None = None,
               *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """Decode one request body (``Content-Encoding: lz4`` bodies are decompressed first,
    never beyond ``max_bytes``). Raises :class:`FrameError` for anything malformed -- answer
    400 with ``{"error": str(exc)}`` -- and :class:`UnsupportedEncoding` for an encoding the
    contract does not define (answer 415). Pass a ``bytearray`` to get writable arrays
    (what :meth:`Inputs.to_torch` needs to share memory instead of copying)."""
    return decode(decompress(body, content_encoding, max_bytes=max_bytes))


def decompress(body: bytes | bytearray | memoryview, content_encoding: str | None, *,
               max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes | bytearray | memoryview:
    """The frame bytes of a body: itself, or its lz4 frame decompressed (bounded)."""
    encoding = (content_encoding or ENCODING_IDENTITY).strip().lower()
    if encoding == ENCODING_IDENTITY:
        return body
    if encoding != ENCODING_LZ4:
        raise UnsupportedEncoding(f"unsupported Content-Encoding {encoding!r}")
    try:
        import lz4.frame  # only a leaf that receives lz4 needs it
    except ImportError:
        raise UnsupportedEncoding("Content-Encoding lz4 needs the 'lz4' package") from None
    dec = lz4.frame.LZ4FrameDecompressor()
    try:
        out = dec.decompress(bytes(body), max_length=max_bytes)
    except RuntimeError as exc:
        raise FrameError(f"malformed lz4 body: {exc}") from None
    if not dec.eof:
        raise FrameError(f"lz4 body is truncated or decompresses beyond {max_bytes} bytes")
    return out


@dataclass(frozen=True)
class Inputs:
    """One frame's inputs for one model, in the order of its ``input_names``."""

    names: tuple[str, ...]
    arrays: tuple[Column | None, ...]  # np.ndarray (dense), Ragged, or None when missing
    missing: tuple[str, ...]
    n_candidates: int
    layout: tuple[str, ...]  # the frame's column names in wire order (a per-layout cache key)

    def __getitem__(self, name: str) -> Column | None:
        return self.arrays[self.names.index(name)]

    def to_torch(self) -> tuple[Any, ...]:
        """The same inputs as torch tensors (``torch.from_numpy``): a tensor per dense
        input, a ``(values, offsets)`` pair per ragged one (``offsets`` has ``C + 1``
        entries: ``nn.EmbeddingBag(..., include_last_offset=True)``), ``None`` when missing.
        Memory is shared when the array is writable and native-endian (decode from a
        ``bytearray``); a read-only array (decoded from ``bytes``, what most web frameworks
        hand a leaf) is copied once, so an in-place tensor op never writes into immutable
        memory. torch is imported only here."""
        try:
            import torch  # noqa: F401  (optional: never a dependency of the project)
        except ImportError:
            raise ImportError("Inputs.to_torch() needs torch (pip install torch)") from None
        return tuple(_torch_input(a) for a in self.arrays)


def _torch_ready(a: np.ndarray) -> np.ndarray:
    """``a`` itself when torch can share it, else a native, writable, contiguous copy
    (``np.array`` copies always; ``ascontiguousarray`` would hand back a read-only ``a``)."""
    if a.flags.writeable and a.dtype.isnative and a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.array(a, dtype=a.dtype.newbyteorder("="), order="C", copy=True)


def _torch_input(a: Column | None) -> Any:
    import torch

    if a is None:
        return None
    if isinstance(a, Ragged):
        return (torch.from_numpy(_torch_ready(a.values)),
                torch.from_numpy(_torch_ready(a.offsets)))
    return torch.from_numpy(_torch_ready(a))


class _LayoutPlan:
    """Where this model's inputs are in one frame layout (its column names, in order)."""

    __slots__ = ("get", "positions", "missing")

    def __init__(self, names: tuple[str, ...], columns: Mapping[str, Column]) -> None:
        present = [i for i, n in enumerate(names) if n in columns]
        self.missing = tuple(n for n in names if n not in columns)
        self.positions = None if len(present) == len(names) else present
        kept = [names[i] for i in present]
        self.get: Callable[[Mapping[str, Column]], tuple[Column, ...]]
        if not kept:
            self.get = lambda _columns: ()
        elif len(kept) == 1:
            self.get = lambda columns, n=kept[0]: (columns[n],)
        else:
            self.get = operator.itemgetter(*kept)


class InputConverter:
    """Turns decoded frames into one model's inputs, in signature order.

    Built once per model version from its ``input_names`` (each name once: a repeated name
    is a ``ValueError`` here; :meth:`from_signature` collapses repeats as the daemon does, with
    a warning in :attr:`warnings`); thread-safe. The column lookup
    is planned once per frame layout (the tuple of column names, which a root repeats
    request after request) and then costs one C-level ``itemgetter`` call.
    """

    def __init__(self, input_names: Iterable[str]) -> None:
        names = tuple(input_names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError("input_names must be a non-empty list of non-empty strings")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"input_names lists {dup} more than once")
        self.input_names = names
        self.version: str | None = None  # from_signature: the version read, when known
        self.origin: str | None = None  # from_signature: where the signature was read
        self.warnings: tuple[str, ...] = ()
        self._plans: dict[tuple[str, ...], _LayoutPlan] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_signature(cls, source: str | os.PathLike[str] | bytes, *,
                       model: str | None = None, version: str | None = None,
                       limits: Limits = DEFAULT_LIMITS) -> InputConverter:
        """From a model's signature (a path, or the file's bytes), read by the code
        ``trimmer-bundle`` uses (:func:`trimmer_daemon.bundle.build.read_signature`): a
        per-model ``module_info.json`` (``{"input_names": [...]}``), a per-bundle one
        (``{"MODEL": [{"version": ..., "input_names": [...]}]}``: pass ``model``; ``version``
        defaults to the latest), a ``.pt`` archive or a ``<model>/<version>/`` directory.
        ``input_names`` in order, validated as strictly as the daemon does (``BundleError``
        names the file, the JSON path and the reason; ``BuildError`` a broken archive);
        duplicate names are collapsed and reported in :attr:`warnings`. :attr:`version` is
        the version read (a bundle's entry, a version directory's name, else ``version``)."""
        found = read_signature(source, model=model, version=version, limits=limits)
        conv = cls(found.signature.input_names)
        conv.version, conv.origin = found.version, found.origin
        conv.warnings = found.signature.warnings
        return conv

    def _plan(self, key: tuple[str, ...], columns: Mapping[str, Column]) -> _LayoutPlan:
        plan = _LayoutPlan(self.input_names, columns)
        with self._lock:
            if len(self._plans) >= MAX_LAYOUTS:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def __call__(self, frame: Frame) -> Inputs:
        columns = frame.columns
        key = tuple(columns)
        plan = self._plans.get(key) or self._plan(key, columns)
        found = plan.get(columns)
        if plan.positions is None:
            arrays: tuple[Column | None, ...] = found
        else:
            slots: list[Column | None] = [None] * len(self.input_names)
            for i, col in zip(plan.positions, found, strict=True):
                slots[i] = col
            arrays = tuple(slots)
        return Inputs(self.input_names, arrays, plan.missing, frame.n_candidates, key)


@dataclass(frozen=True)
class Refusal:
    """An answer the leaf must send instead of scores: ``status`` and JSON ``body``."""

    status: int
    body: dict[str, Any]


def check_skew(trimmed_for: str | None, served_version: str,
               missing: Inputs | Sequence[str], *, model: str = "") -> Refusal | None:
    """The rollout-skew rule of the root <-> leaf contract (``flatbuffers_schema.wire``).

    ``trimmed_for`` is the request's ``X-FT-Trimmed-For`` header (``None`` when absent: the
    frame is untrimmed). If the root trimmed the frame for another version than the one this
    leaf serves and the frame lacks inputs of the served version, answer 409
    (``STATUS_SKEW``) with the served ``version`` in the body: the root re-sends the frame
    untrimmed, so scores never depend on trimming, and trims for that version from then on.
    Otherwise (``None``) score it; missing inputs of an untrimmed frame or of a frame
    trimmed for this very version are the payload's own gaps, not a skew.
    """
    names = missing.missing if isinstance(missing, Inputs) else tuple(missing)
    if trimmed_for is None or trimmed_for == served_version or not names:
        return None
    which = f" of {model!r}" if model else ""
    return Refusal(STATUS_SKEW, {REPLY_ERROR: (
        f"frame trimmed for version {trimmed_for!r}{which}, this leaf serves version "
        f"{served_version!r} and lacks {len(names)} of its features (e.g. {names[0]!r})"),
        REPLY_VERSION: served_version})


def score_reply(scores: Sequence[float] | np.ndarray, version: str | None = None,
                **extra: Any) -> dict[str, Any]:
    """The JSON document of a 200 answer: ``scores`` (required, finite numbers), the
    served ``version`` (optional), and any extra fields. The root keeps only ``scores`` and
    ``version`` (as ``leaf_version``) of a leaf's answer: extra fields are for your own
    callers and logs, and never reach the root's client (docs/leaf-sdk.md says why)."""
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        raise ValueError("scores must be finite numbers (the root refuses NaN/Infinity)")
    doc: dict[str, Any] = {REPLY_SCORES: values.tolist()}
    if version is not None:
        doc[REPLY_VERSION] = version
    doc.update(extra)
    return doc
