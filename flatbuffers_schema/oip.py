"""The Open Inference Protocol (KServe v2) as this project speaks it: the one home of its names.

Used by ``trimmer-bundle`` (Triton model repositories and live model metadata), the daemon
(the optional tensor signature of a model version, carried into the map) and the root
(:mod:`root_worker.service.oip`, which sends v2 inference requests to leaves that speak it:
NVIDIA Triton, KServe runtimes). Standard library only.

``POST /v2/models/{model}/versions/{version}/infer`` with the binary tensor data extension:
the body is a JSON header of ``Inference-Header-Content-Length`` bytes naming each input
(``name``, ``datatype``, ``shape``, ``parameters.binary_data_size``), then the tensors' raw
bytes back to back, in the header's order. Answers the same way (or all JSON).

Datatypes: a frame column's numpy dtype travels as the v2 datatype in
:data:`DATATYPE_BY_DTYPE` (little-endian, C order; no conversion, so no copy). ``BYTES``
(strings) and ``BF16`` have no frame dtype: an input declared with them cannot be fed from a
frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

HEADER_LENGTH = "Inference-Header-Content-Length"
CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"

# frame dtype name (numpy) -> v2 datatype; the table docs/triton.md shows
DATATYPE_BY_DTYPE = {
    "bool": "BOOL", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
DTYPE_BY_DATATYPE = {v: k for k, v in DATATYPE_BY_DTYPE.items()}
#: every datatype a signature may name (the v2 set); the last two cannot come from a frame
DATATYPES = (*DATATYPE_BY_DTYPE.values(), "BYTES", "BF16")
MAX_DIMS = 8
#: the suffix of the second input a ragged column travels as (see docs/triton.md)
RAGGED_OFFSETS_SUFFIX = ".offsets"


def infer_path(model: str, version: str | None) -> str:
    """The inference path; the version is pinned whenever it is known."""
    if version is None:
        return f"/v2/models/{quote(model, safe='')}/infer"
    return f"/v2/models/{quote(model, safe='')}/versions/{quote(version, safe='')}/infer"


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One declared input: its v2 datatype and its shape *without* the batch dimension
    (``-1``: any size; ``None``: not known)."""

    name: str
    datatype: str
    shape: tuple[int, ...] | None = None
    optional: bool = False


@dataclass(frozen=True, slots=True)
class TensorSignature:
    """A model version's inputs as the server declares them, and its batching.

    ``max_batch_size``: as Triton's model config (``0``: the model takes no batch dimension,
    the shapes are whole; ``N > 0``: the first dimension is the batch, at most N); ``-1``:
    not known.
    """

    inputs: tuple[InputSpec, ...]
    max_batch_size: int = -1

    def spec(self, name: str) -> InputSpec | None:
        for s in self.inputs:
            if s.name == name:
                return s
        return None
