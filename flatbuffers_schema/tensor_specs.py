"""A model version's tensor signature in the map blob: written by the daemon, read by roots.

``Version.inputs`` (a vector of ``TensorSpec``) and ``Version.max_batch_size`` of
``feature_map.fbs`` hold a :class:`~flatbuffers_schema.oip.TensorSignature`. Both compile
paths of the daemon (the per-bundle parts and the whole-map compiler) write them with
:func:`write_inputs` + :func:`add_signature`; the map reader rebuilds the signature with
:func:`read_signature`. A map written before these fields reads as "no signature".
"""

from __future__ import annotations

from typing import Any

import flatbuffers
import numpy as np

from flatbuffers_schema.fmap import TensorSpec as FbSpec
from flatbuffers_schema.fmap import Version as FbVersion
from flatbuffers_schema.oip import InputSpec, TensorSignature


def write_inputs(b: flatbuffers.Builder, sig: TensorSignature | None) -> int:
    """Write the ``TensorSpec`` vector of ``sig`` (before ``Version.Start``); 0 for none."""
    if sig is None:
        return 0
    tables = []
    for spec in sig.inputs:
        name, datatype = b.CreateString(spec.name), b.CreateString(spec.datatype)
        shape = b.CreateNumpyVector(np.asarray(spec.shape, dtype=np.int64)) \
            if spec.shape is not None else 0
        FbSpec.Start(b)
        FbSpec.AddName(b, name)
        FbSpec.AddDatatype(b, datatype)
        if shape:
            FbSpec.AddShape(b, shape)
        if spec.optional:
            FbSpec.AddOptional(b, True)
        tables.append(FbSpec.End(b))
    b.StartVector(4, len(tables), 4)
    for off in reversed(tables):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def add_signature(b: flatbuffers.Builder, sig: TensorSignature | None, inputs: int) -> None:
    """Add the fields to the ``Version`` table being built (``inputs``: :func:`write_inputs`)."""
    if sig is None:
        return
    FbVersion.AddInputs(b, inputs)
    if sig.max_batch_size != -1:
        FbVersion.AddMaxBatchSize(b, sig.max_batch_size)


def _text(raw: Any) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else ""


def read_signature(vt: Any) -> TensorSignature | None:
    """The signature of one ``Version`` table, or None when the map has none for it."""
    if vt.InputsIsNone():
        return None
    specs = []
    for i in range(vt.InputsLength()):
        s = vt.Inputs(i)
        shape = None if s.ShapeIsNone() else tuple(int(d) for d in s.ShapeAsNumpy())
        specs.append(InputSpec(_text(s.Name()), _text(s.Datatype()), shape, bool(s.Optional())))
    return TensorSignature(tuple(specs), int(vt.MaxBatchSize()))
