"""Signatures from NVIDIA Triton: model repositories and live servers' model metadata.

Runs in the deploy pipeline (``trimmer-bundle build --triton-repo`` / ``--triton-server``),
never on the request path. Each model version found becomes a
:class:`~trimmer_daemon.bundle.build.FoundVersion` whose signature carries the inputs'
names (the allowlist), their v2 datatypes and shapes and the model's ``max_batch_size``
(:class:`~flatbuffers_schema.oip.TensorSignature`).

Model repository (``--triton-repo REPO``)
    Every ``<REPO>/<model>/config.pbtxt`` is parsed with protobuf's text format into
    Triton's own ``ModelConfig`` message (``tritonclient``'s ``model_config_pb2``: install
    ``feature-trimmer[triton]``), so a field the server would refuse is refused here too.
    The model name is the directory's (a ``name:`` in the config must agree, as Triton
    requires). The versions are the numeric subdirectories the config's
    ``version_policy`` serves (default: the latest one; ``all``; ``specific``), the ones the
    server loads; the others are reported and left out. Triton keeps one input config for
    all versions of a model, so every version gets the same signature.
Live server (``--triton-server URL MODEL``)
    ``GET /v2/models/MODEL`` lists the versions ready on the server; for each,
    ``GET /v2/models/MODEL/versions/V`` (the v2 model metadata: inputs, datatypes, shapes)
    and, where the server has it (Triton), ``GET .../versions/V/config`` for
    ``max_batch_size`` and ``optional``. Without the config (other v2 servers) the first
    dimension is taken as the batch when it is ``-1`` and ``max_batch_size`` stays unknown.
    Every request has a timeout and every answer a size cap.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from flatbuffers_schema.oip import InputSpec, TensorSignature
from trimmer_daemon.bundle.build import BuildError, FoundVersion
from trimmer_daemon.bundle.parse import DEFAULT_LIMITS, Limits, Signature, read_file_bounded

__all__ = ["CONFIG_FILE", "read_repository", "read_server"]

CONFIG_FILE = "config.pbtxt"
HTTP_TIMEOUT = 10.0
MAX_ANSWER_BYTES = 16 << 20
_TYPE_PREFIX = "TYPE_"

Warn = Callable[[str], None]


def _model_config_class() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2  # the protos Triton itself reads
    except ImportError as exc:
        raise BuildError(f"reading Triton model configs needs tritonclient's protos "
                         f"(pip install 'feature-trimmer[triton]'): {exc}") from None
    return model_config_pb2.ModelConfig


def parse_config(data: bytes, path: str) -> Any:
    """``config.pbtxt`` bytes -> Triton's ``ModelConfig`` (protobuf text format)."""
    from google.protobuf import text_format

    config = _model_config_class()()
    try:
        text_format.Parse(data.decode("utf-8"), config)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise BuildError(f"{path}: not a valid Triton model config: {exc}") from None
    return config


def _signature_of_config(config: Any, path: str) -> Signature:
    from tritonclient.grpc import model_config_pb2

    specs = []
    for inp in config.input:
        dtype = model_config_pb2.DataType.Name(inp.data_type)
        if not inp.name or inp.data_type == model_config_pb2.TYPE_INVALID:
            raise BuildError(f"{path}: input {inp.name!r} has no name or no data_type")
        specs.append(InputSpec(inp.name, dtype.removeprefix(_TYPE_PREFIX),
                               tuple(int(d) for d in inp.dims), bool(inp.optional)))
    if not specs:
        raise BuildError(f"{path}: the model config declares no input")
    names = tuple(s.name for s in specs)
    if len(set(names)) != len(names):
        raise BuildError(f"{path}: an input is declared twice")
    return Signature(names, tuple(o.name for o in config.output),
                     tensors=TensorSignature(tuple(specs), int(config.max_batch_size)))


def _served_versions(config: Any, present: list[int]) -> list[int]:
    """The versions Triton's ``version_policy`` loads among ``present``."""
    policy = config.version_policy.WhichOneof("policy_choice")
    if policy == "all":
        return present
    if policy == "specific":
        wanted = set(config.version_policy.specific.versions)
        return [v for v in present if v in wanted]
    n = config.version_policy.latest.num_versions if policy == "latest" else 1
    return present[-max(n, 1):]


def read_repository(repo: str, *, limits: Limits = DEFAULT_LIMITS, warn: Warn,
                    pending: bool = False) -> list[FoundVersion]:
    """Every served model version of a Triton model repository (module docstring)."""
    try:
        models = [e for e in os.scandir(repo) if e.is_dir() and not e.name.startswith(".")]
    except OSError as exc:
        raise BuildError(f"{repo}: cannot list the model repository: "
                         f"{exc.strerror or exc}") from None
    found: list[FoundVersion] = []
    for entry in sorted(models, key=lambda e: e.name):
        path = os.path.join(entry.path, CONFIG_FILE)
        if not os.path.lexists(path):
            warn(f"{entry.path}: no {CONFIG_FILE}; skipped")
            continue
        try:
            data = read_file_bounded(path, limits.max_file_bytes)
        except ValueError as exc:  # BundleError: unreadable, too large
            raise BuildError(str(exc)) from None
        config = parse_config(data, path)
        if config.name and config.name != entry.name:
            raise BuildError(f"{path}: name {config.name!r} differs from the model "
                             f"directory {entry.name!r} (Triton refuses such a model)")
        signature = _signature_of_config(config, path)
        present = sorted(int(v.name) for v in os.scandir(entry.path)
                         if v.is_dir() and v.name.isdigit())
        served = _served_versions(config, present)
        for v in sorted(set(present) - set(served)):
            warn(f"{entry.path}/{v}: not served under the config's version_policy; skipped")
        if not served:
            warn(f"{entry.path}: no version directory the server would load; skipped")
        found += [FoundVersion(entry.name, str(v), signature, path, pending) for v in served]
    return found


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as r:
            body = r.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise BuildError(f"GET {url}: {exc.code} {exc.read(300)!r}") from None
    except OSError as exc:
        raise BuildError(f"GET {url}: {exc}") from None
    if len(body) > MAX_ANSWER_BYTES:
        raise BuildError(f"GET {url}: answer larger than {MAX_ANSWER_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BuildError(f"GET {url}: not JSON: {exc}") from None


def _signature_of_metadata(meta: Any, config: Any, where: str) -> Signature:
    if not isinstance(meta, dict) or not isinstance(meta.get("inputs"), list):
        raise BuildError(f"{where}: model metadata without an inputs list")
    cfg_inputs = {i.get("name"): i for i in config.get("input", [])} if config else {}
    mbs = int(config.get("max_batch_size", 0)) if config else -1
    specs = []
    for inp in meta["inputs"]:
        try:
            name, datatype, shape = inp["name"], inp["datatype"], [int(d) for d in inp["shape"]]
        except (KeyError, TypeError, ValueError):
            raise BuildError(f"{where}: malformed input {str(inp)[:200]}") from None
        if mbs > 0 or (mbs < 0 and shape[:1] == [-1]):
            shape = shape[1:]  # the batch dimension
        optional = bool(cfg_inputs.get(name, {}).get("optional", False))
        specs.append(InputSpec(str(name), str(datatype), tuple(shape), optional))
    outputs = tuple(str(o.get("name")) for o in meta.get("outputs", []) if isinstance(o, dict))
    return Signature(tuple(s.name for s in specs), outputs,
                     tensors=TensorSignature(tuple(specs), mbs))


def read_server(url: str, model: str, *, warn: Warn, pending: bool = False
                ) -> list[FoundVersion]:
    """Every version of ``model`` a live v2 server lists (module docstring)."""
    base = url.rstrip("/")
    quoted = urllib.parse.quote(model, safe="")
    listing = _get_json(f"{base}/v2/models/{quoted}")
    versions = listing.get("versions") if isinstance(listing, dict) else None
    if not versions:
        raise BuildError(f"{base}: model {model!r} lists no version")
    found = []
    for version in versions:
        where = f"{base}/v2/models/{quoted}/versions/{version}"
        meta = _get_json(where)
        try:
            config = _get_json(f"{where}/config")
        except BuildError as exc:
            warn(f"{where}/config: {exc}; max_batch_size unknown (a v2 server that is not "
                 "Triton)")
            config = None
        found.append(FoundVersion(model, str(version),
                                  _signature_of_metadata(meta, config, where), where, pending))
    return found
