"""Build a bundle-level signature file from model directories and ``.pt`` archives.

Runs in the deploy pipeline (``trimmer-bundle build``), never on the request path.

How model name and version are derived:

``MODEL_DIR`` (a positional or ``--pending`` source that is a directory)
    The directory's own name is the model name; each subdirectory is one version, named
    after it: ``<model>/<version>/``. A version's signature is
    ``<model>/<version>/module_info.json`` (the standalone artifact, preferred), otherwise
    the ``*/extra/module_info.json`` member of the single ``*.pt`` archive in that directory.
    Names starting with ``.`` (temp files, ConfigMap ``..data`` links) and plain files
    directly in the model directory are ignored.
``ARCHIVE.pt`` (a positional or ``--pending`` source that is a file)
    Must sit at ``<model>/<version>/<any name>.pt``: version = parent directory name,
    model = grandparent directory name.
``--entry MODEL VERSION PATH`` / ``--pending-entry MODEL VERSION PATH``
    Explicit names for any other layout; PATH is a ``module_info.json``, a ``.pt`` archive
    or a version directory as above.

A ``.pt`` archive is a zip (``torch.jit.save(..., _extra_files=...)`` writes the signature to
``<archive-root>/extra/module_info.json``; the root folder name varies, so any single
``*/extra/module_info.json`` is accepted).

A model version without a signature is skipped with a warning (signature publishing may not
be rolled out everywhere yet); a signature that exists but is broken, an unreadable or corrupt
archive, or the same model+version found twice with different signatures is an error.

Pending versions (``--pending``) are merged with the current ones so that roots receive the
allowlists before the new leaf version rolls out; the output holds both, each pending one
marked ``"pending": true`` (a version that is also current is current). A pending version
never becomes a model's "latest" on a root; :func:`promote_bundle` (``trimmer-bundle
promote``) clears the mark once every leaf serves it, and puts it back for a rollback. A
signature may change between versions: roots trim each request for the version its leaf
serves (docs/operations.md, "Rolling out a model version"). Output is
deterministic (models sorted, versions in natural order, ``json.dumps(sort_keys=True,
indent=2)`` plus a newline), re-validated with :func:`~trimmer_daemon.bundle.parse.parse_bundle`,
and written atomically (temp file in the same directory, fsync, ``os.replace``, fsync of the
directory).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from trimmer_daemon.bundle.parse import (
    DEFAULT_LIMITS,
    PENDING_KEY,
    BundleError,
    Limits,
    Signature,
    latest_version,
    parse_bundle,
    parse_signature,
    read_file_bounded,
    version_sort_key,
)

__all__ = [
    "SIGNATURE_FILE",
    "BuildError",
    "BundleError",  # re-exported: build_bundle raises it for an invalid signature file
    "BuildResult",
    "FoundVersion",
    "LocatedSignature",
    "Promotion",
    "Source",
    "build_bundle",
    "collect_source",
    "promote_bundle",
    "read_archive_signature",
    "read_signature",
    "serialise",
]

SIGNATURE_FILE = "module_info.json"
ARCHIVE_SUFFIX = ".pt"
_ZIP_MAGIC = b"PK\x03\x04"
_ARCHIVE_SIGNATURE = re.compile(r"[^/]+/extra/module_info\.json\Z")
# What a damaged or unsupported zip can raise from zipfile (beyond OSError).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, RuntimeError,
               NotImplementedError, ValueError, zlib.error)

Warn = Callable[[str], None]


class BuildError(Exception):
    """The build cannot produce a trustworthy bundle; the message names the file."""


class _ArchiveProblem(Exception):
    """Raised inside the zip reader; reported as a BuildError naming the archive."""


@dataclass(frozen=True)
class Source:
    """One build input: a model directory or archive, or an explicit model+version path."""

    path: str
    model: str | None = None  # both set: explicit --entry
    version: str | None = None
    pending: bool = False


@dataclass(frozen=True)
class FoundVersion:
    """A model version with its signature and where it came from."""

    model: str
    version: str
    signature: Signature
    origin: str  # the signature file, or "archive.pt!member"
    pending: bool


@dataclass(frozen=True)
class BuildResult:
    """The serialised bundle and what went into it."""

    data: bytes
    models: int
    versions: int
    pending_versions: int  # versions that only came from pending sources
    warnings: tuple[str, ...]
    notes: tuple[str, ...] = ()  # signature changes between versions (informational)


# ---------------------------------------------------------------------------------------------
# reading signatures


def read_archive_signature(path: str | bytes, limits: Limits = DEFAULT_LIMITS
                           ) -> tuple[bytes, str] | None:
    """The signature bytes and member name in a ``.pt`` zip (a path, or the archive's
    bytes), or None if it has none.

    Raises :class:`BuildError` for an unreadable or corrupt archive, several signature
    members, or a member larger than ``limits.max_file_bytes``.
    """
    if isinstance(path, bytes):
        try:
            return _read_archive_signature(io.BytesIO(path), limits.max_file_bytes)
        except _ArchiveProblem as exc:
            raise BuildError(f"<archive>: {exc}") from None
        except _ZIP_ERRORS as exc:
            raise BuildError(f"<archive>: not a valid .pt (zip) archive: {exc}") from None
    try:
        return _read_archive_signature(path, limits.max_file_bytes)
    except _ArchiveProblem as exc:
        raise BuildError(f"{path}: {exc}") from None
    except FileNotFoundError:
        raise BuildError(f"{path}: archive not found") from None
    except OSError as exc:
        raise BuildError(f"{path}: cannot read archive: {exc.strerror or exc}") from None
    except _ZIP_ERRORS as exc:
        raise BuildError(f"{path}: not a valid .pt (zip) archive: {exc}") from None


def _read_archive_signature(path: str | io.BytesIO, max_bytes: int
                            ) -> tuple[bytes, str] | None:
    with zipfile.ZipFile(path) as archive:
        members = [i for i in archive.infolist() if _ARCHIVE_SIGNATURE.match(i.filename)]
        if not members:
            return None
        if len(members) > 1:
            names = ", ".join(sorted(i.filename for i in members))
            raise _ArchiveProblem(f"several signatures in archive: {names}")
        member = members[0]
        if member.file_size > max_bytes:
            raise _ArchiveProblem(f"{member.filename}: {member.file_size} bytes > limit "
                                  f"{max_bytes}")
        with archive.open(member) as fh:
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise _ArchiveProblem(f"{member.filename}: more than {max_bytes} bytes")
        return data, member.filename


def _signature_from_file(path: str, limits: Limits) -> Signature:
    data = read_file_bounded(path, limits.max_file_bytes)
    return parse_signature(data, path=path, limits=limits)


def _signature_from_archive(path: str, limits: Limits) -> tuple[Signature, str] | None:
    found = read_archive_signature(path, limits)
    if found is None:
        return None
    data, member = found
    origin = f"{path}!{member}"
    return parse_signature(data, path=origin, limits=limits), origin


def _signature_from_version_dir(path: str, limits: Limits) -> tuple[Signature, str] | None:
    standalone = os.path.join(path, SIGNATURE_FILE)
    if os.path.lexists(standalone):
        return _signature_from_file(standalone, limits), standalone
    archives = sorted(e.name for e in os.scandir(path)
                      if e.name.endswith(ARCHIVE_SUFFIX) and not e.name.startswith(".")
                      and e.is_file())
    if len(archives) > 1:
        raise BuildError(f"{path}: several {ARCHIVE_SUFFIX} archives ({', '.join(archives)}) "
                         f"and no {SIGNATURE_FILE}: cannot tell which one to use")
    if not archives:
        return None
    return _signature_from_archive(os.path.join(path, archives[0]), limits)


def _signature_at(path: str, limits: Limits) -> tuple[Signature, str] | None:
    """Signature of an explicit entry path: a version directory, a .json file or an archive."""
    if os.path.isdir(path):
        return _signature_from_version_dir(path, limits)
    if path.endswith(".json"):
        return _signature_from_file(path, limits), path
    return _signature_from_archive(path, limits)


class LocatedSignature(NamedTuple):
    """One model version's signature, where it was read, and the version it is (``None``
    when a per-model file was read and no version was given)."""

    signature: Signature
    origin: str
    version: str | None


def read_signature(source: str | os.PathLike[str] | bytes, *, model: str | None = None,
                   version: str | None = None, limits: Limits = DEFAULT_LIMITS
                   ) -> LocatedSignature:
    """One model version's signature from anything ``trimmer-bundle`` reads: a leaf's and a
    tool's one way in (``InputConverter.from_signature`` uses it).

    ``source`` is a path or the file's bytes:

    - a **per-model** ``module_info.json``, ``{"input_names": [...], "output_names": [...]}``
      (what a model artifact ships; ``model`` and ``version`` are not needed),
    - a **per-bundle** ``module_info.json``, ``{"MODEL": [{"version": ..., "input_names":
      [...]}, ...], ...}`` (what ``trimmer-bundle build`` writes and the daemon watches):
      ``model`` is required, ``version`` defaults to the model's latest (natural order),
    - a ``.pt`` archive (its ``*/extra/module_info.json``, per model),
    - a version directory ``<model>/<version>/`` (its ``module_info.json``, else its single
      ``.pt``), as ``trimmer-bundle build`` reads it.

    Raises :class:`BundleError` (invalid JSON or names; model or version not in the bundle)
    or :class:`BuildError` (archive problems, no signature found).
    """
    if isinstance(source, bytes):
        if source.startswith(_ZIP_MAGIC):
            return _from_archive_found(read_archive_signature(source, limits), "<archive>",
                                       version, limits)
        return _from_json(source, "<module_info.json>", model, version, limits)
    path = os.fsdecode(source)
    if os.path.isdir(path):
        found = _signature_from_version_dir(path, limits)
        if found is None:
            raise BuildError(f"{path}: no signature ({SIGNATURE_FILE} or a {ARCHIVE_SUFFIX} "
                             "archive holding one)")
        # as trimmer-bundle reads it: the directory's name is the version
        return LocatedSignature(found[0], found[1],
                                version or os.path.basename(os.path.abspath(path)))
    data = read_file_bounded(path, limits.max_file_bytes)
    if path.endswith(ARCHIVE_SUFFIX) or data.startswith(_ZIP_MAGIC):
        return _from_archive_found(read_archive_signature(path, limits), path, version, limits)
    return _from_json(data, path, model, version, limits)


def _from_archive_found(found: tuple[bytes, str] | None, name: str, version: str | None,
                        limits: Limits) -> LocatedSignature:
    if found is None:
        raise BuildError(f"{name}: no */extra/{SIGNATURE_FILE} in the archive")
    data, member = found
    origin = f"{name}!{member}"
    return LocatedSignature(parse_signature(data, path=origin, limits=limits), origin, version)


def _is_per_model(doc: object) -> bool:
    """A per-model signature has ``input_names`` holding names; a bundle's values hold
    version objects (a model may even be called ``input_names``)."""
    if not isinstance(doc, dict) or "input_names" not in doc:
        return False
    names = doc["input_names"]
    return not (isinstance(names, list) and names and all(isinstance(e, dict) for e in names))


def _from_json(data: bytes, path: str, model: str | None, version: str | None,
               limits: Limits) -> LocatedSignature:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None  # the strict parser below reports it with line and column
    if doc is None or _is_per_model(doc):
        return LocatedSignature(parse_signature(data, path=path, limits=limits), path, version)
    bundle = parse_bundle(data, path=path, limits=limits)
    known = ", ".join(sorted(bundle.models)) or "none"
    if model is None:
        raise BundleError(path, "$", f"a per-bundle file: name the model to read (it "
                                     f"defines: {known})")
    entries = bundle.models.get(model)
    if entries is None:
        raise BundleError(path, "$", f"no model {model!r} in this bundle (it defines: "
                                     f"{known})")
    by_version = {e.version: e for e in entries}
    chosen = latest_version(by_version) if version is None else version
    entry = by_version.get(chosen)
    if entry is None:
        raise BundleError(path, f"$[{json.dumps(model)}]",
                          f"no version {chosen!r} of model {model!r} (it has: "
                          f"{', '.join(sorted(by_version, key=version_sort_key))})")
    sig = Signature(entry.input_names, entry.output_names, bundle.warnings)
    return LocatedSignature(sig, f"{path}: {model} version {chosen}", chosen)


# ---------------------------------------------------------------------------------------------
# collecting sources


def collect_source(source: Source, limits: Limits, warn: Warn) -> list[FoundVersion]:
    """All model versions with a signature that ``source`` provides (see module docstring).

    Versions without a signature are reported through ``warn`` and left out.
    """
    path = source.path
    if source.model is not None and source.version is not None:
        return _found(source, source.model, source.version, _signature_at(path, limits), warn)
    if os.path.isdir(path):
        return _collect_model_dir(source, limits, warn)
    if not os.path.lexists(path):
        raise BuildError(f"{path}: no such file or directory")
    if not path.endswith(ARCHIVE_SUFFIX):
        raise BuildError(f"{path}: not a model directory or a {ARCHIVE_SUFFIX} archive "
                         "(use --entry MODEL VERSION PATH for other files)")
    version_dir = os.path.dirname(os.path.abspath(path))
    version = os.path.basename(version_dir)
    model = os.path.basename(os.path.dirname(version_dir))
    if not model or not version:
        raise BuildError(f"{path}: cannot derive model and version from the path (expected "
                         "<model>/<version>/<file>.pt; use --entry MODEL VERSION PATH)")
    return _found(source, model, version, _signature_from_archive(path, limits), warn)


def _found(source: Source, model: str, version: str, found: tuple[Signature, str] | None,
           warn: Warn) -> list[FoundVersion]:
    kind = "pending " if source.pending else ""
    if found is None:
        warn(f"{source.path}: {kind}model {model!r} version {version!r} has no signature "
             f"({SIGNATURE_FILE} or */extra/{SIGNATURE_FILE} in a {ARCHIVE_SUFFIX}); skipped")
        return []
    signature, origin = found
    for message in signature.warnings:
        warn(message)
    return [FoundVersion(model, version, signature, origin, source.pending)]


def _collect_model_dir(source: Source, limits: Limits, warn: Warn) -> list[FoundVersion]:
    model = os.path.basename(os.path.abspath(source.path))
    try:
        entries = sorted((e for e in os.scandir(source.path) if not e.name.startswith(".")),
                         key=lambda e: e.name)
    except OSError as exc:
        raise BuildError(f"{source.path}: cannot list directory: {exc.strerror or exc}") from None
    versions = [e for e in entries if e.is_dir()]
    if not versions:
        hint = (f" (it holds {SIGNATURE_FILE} itself: pass its parent, the model directory, "
                "or use --entry)" if any(e.name == SIGNATURE_FILE for e in entries) else "")
        warn(f"{source.path}: no version directories (<model>/<version>/) found{hint}; "
             "skipped")
        return []
    found: list[FoundVersion] = []
    for entry in versions:
        signature = _signature_from_version_dir(entry.path, limits)
        found += _found(Source(entry.path, pending=source.pending), model, entry.name,
                        signature, warn)
    return found


# ---------------------------------------------------------------------------------------------
# merging and serialising


def _merge(found: Iterable[FoundVersion]) -> dict[str, dict[str, FoundVersion]]:
    models: dict[str, dict[str, FoundVersion]] = {}
    for fv in found:
        versions = models.setdefault(fv.model, {})
        prev = versions.get(fv.version)
        if prev is None:
            versions[fv.version] = fv
            continue
        same = (prev.signature.input_names, prev.signature.output_names,
                prev.signature.tensors) == (fv.signature.input_names,
                                            fv.signature.output_names, fv.signature.tensors)
        if not same:
            raise BuildError(f"model {fv.model!r} version {fv.version!r} is defined twice with "
                             f"different signatures: {prev.origin} and {fv.origin}")
        if prev.pending and not fv.pending:  # also current: not only pending
            versions[fv.version] = fv
    return models


def _signature_changes(model: str, ordered: list[FoundVersion]) -> list[str]:
    """One note per version whose inputs differ from the version before it. Not a problem:
    roots trim for the version each leaf serves, and send leaves whose version they do not
    know yet the union of the current and pending inputs."""
    notes = []
    for older, newer in itertools.pairwise(ordered):
        old, new = set(older.signature.input_names), set(newer.signature.input_names)
        if old != new:
            kind = " (pending)" if newer.pending else ""
            notes.append(f"model {model!r}: version {newer.version!r}{kind} adds "
                         f"{len(new - old)} and drops {len(old - new)} of the "
                         f"{len(old)} inputs of version {older.version!r}")
    return notes


def serialise(doc: object) -> bytes:
    """The bytes of a bundle document as every writer here spells it (deterministic)."""
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode("utf-8")


def _entry(fv: FoundVersion) -> dict[str, object]:
    """One version entry of the bundle file (tensor signature fields only when known, the
    pending mark only when pending)."""
    sig = fv.signature
    out: dict[str, object] = {"version": fv.version, "input_names": list(sig.input_names),
                              "output_names": list(sig.output_names)}
    if sig.tensors is not None:
        if sig.tensors.max_batch_size >= 0:
            out["max_batch_size"] = sig.tensors.max_batch_size
        specs = []
        for spec in sig.tensors.inputs:
            item: dict[str, object] = {"name": spec.name, "datatype": spec.datatype}
            if spec.shape is not None:
                item["shape"] = list(spec.shape)
            if spec.optional:
                item["optional"] = True
            specs.append(item)
        out["inputs"] = specs
    if fv.pending:  # only then: a build without pending sources writes what it always did
        out[PENDING_KEY] = True
    return out


def build_bundle(sources: Iterable[Source], *, limits: Limits = DEFAULT_LIMITS,
                 output_name: str = "<bundle>", warn: Warn | None = None,
                 found_elsewhere: Iterable[FoundVersion] = ()) -> BuildResult:
    """Collect, merge and serialise; the bytes are validated with ``parse_bundle``.

    Warnings go to ``warn`` as they happen (so they are seen even if the build then fails)
    and are also returned in the result. Raises :class:`BuildError` when nothing usable was
    found or an input is broken, and :class:`~trimmer_daemon.bundle.parse.BundleError` when a
    signature file is invalid (it names that file) or the result breaks a limit.
    """
    warnings: list[str] = []

    def report(message: str) -> None:
        warnings.append(message)
        if warn is not None:
            warn(message)

    found: list[FoundVersion] = list(found_elsewhere)  # e.g. Triton repositories, servers
    for source in sources:
        found += collect_source(source, limits, report)
    models = _merge(found)
    if not models:
        raise BuildError("nothing usable: no model version with a signature was found")
    doc: dict[str, list[dict[str, object]]] = {}
    notes: list[str] = []
    for model in sorted(models):
        ordered = [models[model][v] for v in sorted(models[model], key=version_sort_key)]
        notes += _signature_changes(model, ordered)
        doc[model] = [_entry(fv) for fv in ordered]
    data = serialise(doc)
    parse_bundle(data, path=output_name, limits=limits)  # the daemon must accept what we write
    versions = [fv for by_version in models.values() for fv in by_version.values()]
    return BuildResult(data=data, models=len(models), versions=len(versions),
                       pending_versions=sum(fv.pending for fv in versions),
                       warnings=tuple(warnings), notes=tuple(notes))


# ---------------------------------------------------------------------------------------------
# promoting


@dataclass(frozen=True)
class Promotion:
    """A bundle with pending marks cleared (or set again) and what changed."""

    data: bytes
    changed: tuple[str, ...]  # "model@version" whose mark changed
    warnings: tuple[str, ...]


def promote_bundle(data: bytes, targets: Iterable[str] = (), *, path: str = "<bundle>",
                   limits: Limits = DEFAULT_LIMITS, demote: bool = False) -> Promotion:
    """Clear the pending mark of ``targets`` (``MODEL`` or ``MODEL@VERSION``; none: every
    pending version), or with ``demote`` set it again (a rollback; targets required).

    The file is validated first (:class:`BundleError`); unknown models or versions are a
    :class:`BuildError`. Every other byte of meaning is kept (unknown keys included); the
    output is re-validated.
    """
    parse_bundle(data, path=path, limits=limits)
    doc = json.loads(data.decode("utf-8-sig"))  # validated: strict JSON, an object
    wanted = [_target(t, doc, path) for t in targets]
    if demote and not wanted:
        raise BuildError("demote needs MODEL@VERSION (which version to mark pending again)")
    changed, warnings = [], []
    for model, entries in doc.items():
        for entry in entries:
            version = str(entry["version"])
            if wanted and not any(m == model and v in (None, version) for m, v in wanted):
                continue
            if bool(entry.get(PENDING_KEY, False)) == demote:
                continue
            if demote:
                entry[PENDING_KEY] = True
            else:
                entry.pop(PENDING_KEY, None)
            changed.append(f"{model}@{version}")
        if all(e.get(PENDING_KEY) is True for e in entries):
            warnings.append(f"model {model!r}: every version is pending: roots send its "
                            "leaves the union of their inputs until they learn a version")
    out = serialise(doc)
    parse_bundle(out, path=path, limits=limits)
    return Promotion(out, tuple(changed), tuple(warnings))


def _target(spec: str, doc: dict[str, list[dict[str, object]]],
            path: str) -> tuple[str, str | None]:
    model, sep, version = spec.partition("@")
    entries = doc.get(model)
    if entries is None:
        raise BuildError(f"{path}: no model {model!r} (target {spec!r})")
    if sep and not any(str(e["version"]) == version for e in entries):
        raise BuildError(f"{path}: model {model!r} has no version {version!r}")
    return model, version if sep else None
