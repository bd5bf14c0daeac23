"""Leaves that speak the Open Inference Protocol (NVIDIA Triton, KServe): request and answer.

Runs in each root worker, for the targets whose route says ``"protocol": "oip"``
(:mod:`root_worker.service.routing`). :func:`build_request` turns the request's frame into
one v2 inference request per target -- **without copying a column**: the body is the small
JSON header built here plus views of the kept blocks of the request buffer, which
``sendmsg`` sends as they are; :func:`read_answer` turns the server's answer into the same
``scores`` a native leaf answers. The rules (docs/triton.md has the user's version):

Which inputs
    With a tensor signature in the map (``trimmer-bundle build --triton-repo``): exactly the
    model's declared inputs, in their declared order; a missing optional input is left out,
    a missing required one is a 400 naming it. Without one (a bundle from
    ``module_info.json``): the frame's columns the allowlist keeps, in frame order. A model
    the map does not know (or mode ``off``) gets every column: the server judges.
Datatypes
    The column's dtype as the v2 datatype of
    :data:`flatbuffers_schema.oip.DATATYPE_BY_DTYPE`, never converted (a conversion would be
    a copy); a declared datatype that differs is a 400 naming the column.
Shapes
    The candidate axis is the batch dimension: a dense column of ``C`` candidates with
    element shape ``E`` is the tensor ``[C, *E]`` (a scalar column is ``[C, 1]`` when the
    model declares ``[1]``). It must fit the declared shape (``[-1, *dims]`` for a batching
    model, ``dims`` for ``max_batch_size: 0``; ``-1`` matches any size), else a 400 naming
    the column and both shapes. ``C`` above the model's ``max_batch_size`` fails that target
    alone (``kind: batch_size``, the server is not called; no split: one request, one
    answer per target).
Ragged columns
    A ragged column ``x`` travels as two inputs: ``x``, its values ``[n_values, *E]``, and
    ``x.offsets``, the ``C + 1`` row offsets as INT64 (row ``i`` is
    ``values[offsets[i]:offsets[i+1]]``), both views of the frame's block. Only a model
    without a batch dimension (``max_batch_size: 0``) that declares both can take them;
    otherwise a 400 names the column.
Checks
    The frame's preamble and layout as for every frame; of the block table, the blocks a v2
    request sends (alignment, bounds, size, ragged offsets, bool bytes -- what the frame
    check checks), each once per request; a malformed one is a 400 ``bad_frame``. The
    columns sent and the JSON header (but its ``id``) are cached per layout, signature and
    candidate count: a request builds only the ``id`` and the views.
The request
    ``POST /v2/models/M/versions/V/infer`` (the version whose allowlist applied, pinned: the
    server never runs a version the request was not shaped for), the binary tensor data
    extension (``Inference-Header-Content-Length``), ``"id"`` = the request id when
    header-safe, every output asked as binary data.
The answer
    Read under the leaf caps and deadline like any leaf's (``FT_MAX_LEAF_REPLY_BYTES``,
    ``FT_LEAF_TIMEOUT``). The first output tensor becomes ``scores`` (one number per
    candidate when its elements are single values, else one list per candidate); further
    outputs are returned under ``outputs``; ``model_version`` as ``leaf_version``. A non-200
    is ``kind: status`` with the server's error message; a malformed answer ``bad_reply``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flatbuffers_schema.keys import Allowlist
from flatbuffers_schema.oip import (
    CONTENT_TYPE,
    DATATYPE_BY_DTYPE,
    DTYPE_BY_DATATYPE,
    HEADER_LENGTH,
    RAGGED_OFFSETS_SUFFIX,
    TensorSignature,
)
from root_worker.frame import FrameError
from root_worker.frame.format import (
    BLOCK_ALIGN,
    OFFSETS_DTYPE,
    PREAMBLE_SIZE,
    TABLE_ENTRY,
    Layout,
    LayoutCache,
    align,
    explain_ragged,
    ragged_head,
    read_preamble,
)
from root_worker.frame.lru import LruCache
from root_worker.service.fanout import LeafError
from root_worker.service.replies import RawJSON

OFFSETS_DATATYPE = "INT64"
_LAYOUTS = LayoutCache(64)
# per layout: column index by name, v2 datatype per column
_NAMES: LruCache[int, tuple[Layout, dict[str, int], tuple[str, ...]]] = LruCache(64)
# per (layout, signature or allowlist, candidates): the columns sent and the JSON header
# without its id, when no column is ragged (sizes then depend only on these)
_PLANS: LruCache[tuple[int, int, int], tuple[Layout, Any, list[int], bytes]] = LruCache(256)
_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class ColumnError(ValueError):
    """A column cannot be what the model declares: a 400 naming ``model`` and ``column``."""

    def __init__(self, model: str, column: str, message: str) -> None:
        super().__init__(f"model {model!r} input {column!r}: {message}")
        self.model, self.column = model, column


@dataclass(slots=True)
class FrameIndex:
    """One request's frame for all its v2 targets: the layout (cached), and each sent
    column's block checked once, when first sent -- the rest of the frame is not read."""

    body: memoryview
    layout: Layout
    names: dict[str, int]
    datatypes: tuple[str, ...]
    n_candidates: int
    table_offset: int
    data_start: int
    data_end: int
    _blocks: dict[int, tuple[int, int]]

    def block(self, i: int) -> tuple[int, int]:
        """``(offset, nbytes)`` of column ``i``'s block, checked as the frame check would
        check it (alignment, bounds, size; ragged offsets; bool bytes); FrameError."""
        known = self._blocks.get(i)
        if known is not None:
            return known
        layout, c = self.layout, self.n_candidates
        off, nb = TABLE_ENTRY.unpack_from(self.body, self.table_offset + TABLE_ENTRY.size * i)
        elem = int(layout.elem_size[i])
        where = layout.label(i)
        if off % BLOCK_ALIGN or off < self.data_start or off + nb > self.data_end:
            raise FrameError(f"{where}: block at {off} (+{nb}) is not a {BLOCK_ALIGN}-byte "
                             f"aligned block inside the data [{self.data_start}, "
                             f"{self.data_end})")
        if layout.ragged[i]:
            head = ragged_head(c)
            if nb < head or (nb - head) % elem:
                raise FrameError(f"{where}: ragged block of {nb} bytes is not the offsets "
                                 f"head ({head}) plus whole values of {elem} bytes")
            explain_ragged(where, np.frombuffer(self.body, OFFSETS_DTYPE, c + 1, off),
                           (nb - head) // elem)
        elif nb != c * elem:
            raise FrameError(f"{where}: dense block of {nb} bytes, expected {c} x {elem}")
        if self.datatypes[i] == "BOOL" and nb:
            data = np.frombuffer(self.body, np.uint8, nb, off)
            if layout.ragged[i]:
                data = data[ragged_head(c):]
            if data.size and int(data.max()) > 1:
                raise FrameError(f"{where}: bool value byte {int(np.argmax(data > 1))} is "
                                 "not 0 or 1")
        self._blocks[i] = (off, nb)
        return off, nb

    def column(self, i: int) -> memoryview:
        off, nb = self.block(i)
        return self.body[off:off + nb]


def index_frame(body: memoryview) -> FrameIndex:
    """Read the frame's preamble and layout (cached per layout); raises FrameError."""
    pre = read_preamble(body)
    layout = _LAYOUTS.get(pre.hint, pre.n_columns,
                          body[PREAMBLE_SIZE:pre.layout_end].tobytes())
    known = _NAMES.get(layout.hint)
    if known is None or known[0] is not layout:
        known = (layout, {n: i for i, n in enumerate(layout.names)},
                 tuple(DATATYPE_BY_DTYPE[d.name] for d in layout.dtypes))
        _NAMES.put(layout.hint, known)
    return FrameIndex(body, layout, known[1], known[2], pre.n_candidates, pre.table_offset,
                      align(pre.table_end, BLOCK_ALIGN), pre.meta_offset, {})


@dataclass(slots=True)
class Built:
    """One target's v2 request: buffers to send back to back, and their headers."""

    parts: list[Any]
    nbytes: int
    headers: dict[str, str]
    inputs: int


class BatchTooLarge(Exception):
    """More candidates than the model's ``max_batch_size`` (a per-target error)."""


def _datatype(fi: FrameIndex, i: int) -> str:
    return fi.datatypes[i]


def _fit(model: str, name: str, shape: list[int], declared: Sequence[int] | None,
         batching: bool) -> list[int]:
    if declared is None:
        return shape
    want = [-1, *declared] if batching else list(declared)
    tries = [shape] + ([[shape[0], 1]] if len(shape) == 1 else [])
    for got in tries:
        if len(got) == len(want) and all(w in (-1, g) for w, g in zip(want, got, strict=True)):
            return got
    raise ColumnError(model, name, f"the frame gives shape {shape}, the model declares "
                                   f"{want} (-1: any size)")


def _dense(fi: FrameIndex, model: str, name: str, i: int, sig: TensorSignature | None,
           datatype: str | None, declared: Sequence[int] | None) -> tuple[dict[str, Any], Any]:
    have = _datatype(fi, i)
    if datatype is not None and datatype != have:
        raise ColumnError(model, name, f"the frame's column is {fi.layout.dtypes[i].name} "
                                       f"({have}), the model declares {datatype}")
    batching = sig is None or sig.max_batch_size != 0
    shape = _fit(model, name, [fi.n_candidates, *fi.layout.shapes[i]], declared, batching)
    view = fi.column(i)
    return {"name": name, "datatype": have, "shape": shape,
            "parameters": {"binary_data_size": view.nbytes}}, view


def _ragged(fi: FrameIndex, model: str, name: str, i: int, sig: TensorSignature | None
            ) -> list[tuple[dict[str, Any], Any]]:
    offsets_name = name + RAGGED_OFFSETS_SUFFIX
    if sig is not None and (sig.max_batch_size != 0 or sig.spec(offsets_name) is None):
        raise ColumnError(model, name, f"a ragged column travels as {name!r} (values) and "
                                       f"{offsets_name!r} (row offsets) to a model with "
                                       f"max_batch_size 0 that declares both; this one has "
                                       f"max_batch_size {sig.max_batch_size} and "
                                       f"{'declares' if sig.spec(offsets_name) else 'lacks'} "
                                       f"{offsets_name!r}")
    c = fi.n_candidates
    block = fi.column(i)
    head = ragged_head(c)
    values = block[head:]
    elem = fi.layout.shapes[i]
    n_values = values.nbytes // int(fi.layout.elem_size[i])
    return [({"name": name, "datatype": _datatype(fi, i), "shape": [n_values, *elem],
              "parameters": {"binary_data_size": values.nbytes}}, values),
            ({"name": offsets_name, "datatype": OFFSETS_DATATYPE, "shape": [c + 1],
              "parameters": {"binary_data_size": 8 * (c + 1)}}, block[:8 * (c + 1)])]


def build_request(fi: FrameIndex, model: str, sig: TensorSignature | None,
                  allowlist: Allowlist | None, request_id: str | None) -> Built:
    """The v2 request of one target (module docstring); raises :class:`ColumnError`,
    :class:`BatchTooLarge` or FrameError."""
    if sig is not None and sig.max_batch_size > 0 and fi.n_candidates > sig.max_batch_size:
        raise BatchTooLarge(f"{fi.n_candidates} candidates, the model's max_batch_size is "
                            f"{sig.max_batch_size} (send at most that many per request)")
    what = sig if sig is not None else allowlist
    key = (fi.layout.hint, id(what), fi.n_candidates)
    plan = _PLANS.get(key)
    if plan is not None and plan[0] is fi.layout and plan[1] is what:
        views = [fi.column(i) for i in plan[2]]  # each block checked once per request
        head = plan[3]
    else:
        pieces, columns = _pieces(fi, model, sig, allowlist)
        views = [p[1] for p in pieces]
        doc: dict[str, Any] = {"inputs": [p[0] for p in pieces],
                               "parameters": {"binary_data_output": True}}
        head = _DUMPS(doc).encode("utf-8")[:-1]
        if columns is not None:  # no ragged column: the same header for every such frame
            _PLANS.put(key, (fi.layout, what, columns, head))
    header = head + (b',"id":' + _DUMPS(request_id).encode("utf-8") + b"}"
                     if request_id is not None else b"}")
    return Built([header, *views], len(header) + sum(v.nbytes for v in views),
                 {"Content-Type": CONTENT_TYPE, HEADER_LENGTH: str(len(header))}, len(views))


def _pieces(fi: FrameIndex, model: str, sig: TensorSignature | None,
            allowlist: Allowlist | None) -> tuple[list[tuple[dict[str, Any], Any]],
                                                  list[int] | None]:
    """The inputs (header entry, view) in order, and the columns they are when none is
    ragged (None otherwise)."""
    pieces: list[tuple[dict[str, Any], Any]] = []
    columns: list[int] | None = []
    if sig is not None:
        ragged_done: set[str] = set()
        for spec in sig.inputs:
            i = fi.names.get(spec.name)
            if i is None:
                if spec.name in ragged_done or spec.optional:
                    continue
                raise ColumnError(model, spec.name, "the frame has no such column and the "
                                                    "model requires it")
            if fi.layout.ragged[i]:
                pieces += _ragged(fi, model, spec.name, i, sig)
                ragged_done.add(spec.name + RAGGED_OFFSETS_SUFFIX)
                columns = None
            else:
                pieces.append(_dense(fi, model, spec.name, i, sig, spec.datatype, spec.shape))
                if columns is not None:
                    columns.append(i)
        return pieces, columns
    if allowlist is None:
        cols = list(range(fi.layout.n_columns))
    else:
        cols = np.flatnonzero(np.isin(fi.layout.keys, allowlist.keys)).tolist()
    for i in cols:
        name = fi.layout.names[i]
        if fi.layout.ragged[i]:
            pieces += _ragged(fi, model, name, i, None)
            columns = None
        else:
            pieces.append(_dense(fi, model, name, i, None, None, None))
            if columns is not None:
                columns.append(i)
    return pieces, columns


# -------------------------------------------------------------------------------------------
# the answer


def _bad(url: str, why: str) -> LeafError:
    return LeafError("bad_reply", f"{url}: v2 answer {why}")


def read_answer(url: str, status: int, data: bytes, headers: dict[str, str],
                candidates: int | None = None) -> dict[str, Any]:
    """The client-facing fields of a v2 answer (module docstring); raises LeafError.
    ``candidates``: the request's candidate count; an output with more rows is refused
    (as a leaf's answer with more scores than candidates)."""
    raw = headers.get(HEADER_LENGTH.lower())
    try:
        n = len(data) if raw is None else int(raw)
    except ValueError:
        raise _bad(url, f"with {HEADER_LENGTH}: {str(raw)[:40]!r}") from None
    if not 0 < n <= len(data):
        raise _bad(url, f"with {HEADER_LENGTH} {n} outside its {len(data)} bytes")
    try:
        doc = json.loads(data[:n])
    except (ValueError, RecursionError):
        doc = None
    if status != 200:
        detail = doc.get("error") if isinstance(doc, dict) else \
            data[:200].decode("utf-8", "replace")
        raise LeafError("status", f"{url} answered {status}: {detail}", status)
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise _bad(url, "without outputs")
    arrays = _outputs(url, outputs, memoryview(data)[n:])
    for name, arr in arrays:
        rows = arr.shape[0] if arr.ndim else 1
        if candidates is not None and rows > max(candidates, 1):
            raise _bad(url, f"output {name!r} has {rows} rows for {candidates} candidates")
    first, *rest = arrays
    reply: dict[str, Any] = {"scores": _values(first[1])}
    if rest:
        reply["outputs"] = {name: _values(a) for name, a in rest}
    if "model_version" in doc:
        reply["leaf_version"] = doc["model_version"]
    return reply


def _outputs(url: str, outputs: list[Any], binary: memoryview) -> list[tuple[str, Any]]:
    at, out = 0, []
    for o in outputs:
        try:
            name, shape = str(o["name"]), [int(d) for d in o["shape"]]
            dtype = np.dtype(DTYPE_BY_DATATYPE[o["datatype"]]).newbyteorder("<")
        except (KeyError, TypeError, ValueError):
            raise _bad(url, f"output {str(o)[:120]}: no name, shape or known datatype") \
                from None
        if any(d < 0 for d in shape):
            raise _bad(url, f"output {name!r}: shape {shape[:8]} has a negative dimension")
        count = math.prod(shape)
        params = o.get("parameters") or {}
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or size != count * dtype.itemsize or \
                    at + size > len(binary):
                raise _bad(url, f"output {name!r}: binary_data_size {size!r} does not fit "
                                f"shape {shape} {o['datatype']} and the body")
            arr = np.frombuffer(binary, dtype, count, at).reshape(shape)
            at += size
        else:
            try:
                arr = np.asarray(o["data"], dtype=dtype).reshape(shape)
            except (KeyError, TypeError, ValueError):
                raise _bad(url, f"output {name!r}: no data of shape {shape}") from None
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise _bad(url, f"output {name!r}: values that are not finite numbers")
        out.append((name, arr))
    if at != len(binary):
        raise _bad(url, f"body holds {len(binary) - at} bytes past its outputs")
    return out


# printf formats that round-trip each float width (the client reads the same value back)
_FLOAT_FORMAT = {2: "%.5g", 4: "%.9g", 8: "%.17g"}


def _values(arr: Any) -> Any:
    """One number per candidate when each element is a single value (its JSON text kept,
    :class:`RawJSON`, printed once with the digits its width needs), else nested lists."""
    if arr.ndim >= 1 and arr.size == arr.shape[0]:
        flat = arr.reshape(-1).tolist()
        fmt = _FLOAT_FORMAT.get(arr.dtype.itemsize) if arr.dtype.kind == "f" else None
        if fmt is None:
            return flat
        return RawJSON("[" + ",".join(map(fmt.__mod__, flat)) + "]", flat)
    return arr.tolist()
