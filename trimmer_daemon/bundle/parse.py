"""Bundle-level signature files: strict parsing and validation.

This is the one parser used by both the daemon (on every reload) and ``trimmer-bundle
validate``, so a file that validates on a laptop is exactly a file the daemon accepts.
It is pure: bytes in, :class:`ParsedBundle` or :class:`BundleError` out, no logging.

File format (one file per bundle)::

    {"model_A": [{"version": "1", "input_names": ["f1", "f2"], "output_names": ["score"]},
                 {"version": "2", "input_names": ["f1", "f3"]}],
     "model_B": [...]}

Rules; any violation rejects the whole file with one :class:`BundleError` naming the file,
a JSONPath-like location (``$["model_A"][2].input_names[5]``) and the reason:

- Encoding: UTF-8 only. A leading UTF-8 BOM is *accepted* (some editors add one; it carries
  no meaning) and reported as a warning; the sha256 still covers the exact bytes. Any other
  encoding (UTF-16/32, Latin-1 bytes) is an error. Empty and whitespace-only files are errors.
- Strict JSON: duplicate object keys anywhere (a model listed twice, ``version`` twice) and the
  non-standard literals ``NaN``, ``Infinity`` and ``-Infinity`` are errors. Syntax errors
  (including a truncated file) report line and column; nesting deep enough to exhaust the
  parser's recursion limit is an error, never a crash.
- The top level is an object mapping model names to non-empty arrays of version entries.
- Each entry is an object with ``version`` (a string; a JSON integer is normalised to its
  decimal string, ``-0`` to ``"0"``; booleans, floats, null, arrays and objects are errors),
  a non-empty ``input_names`` array of strings and an optional ``output_names`` array of
  strings. **Unknown extra keys in an entry (and at the top of a signature) are ignored**, for
  forward compatibility; they must still be strict JSON.
- An entry may carry ``"pending": true`` (:data:`PENDING_KEY`, a JSON boolean; ``false`` is
  the same as leaving it out): the version is shipped to roots ahead of its leaves and is
  never a model's "latest" until it is promoted (``trimmer-bundle promote``). Files without
  the key are valid as they were; a validator from before the key ignores it.
- Every name (model, version, feature, output) is a non-empty string of at most
  ``Limits.max_name_length`` UTF-8 bytes and must be encodable as UTF-8 (a lone surrogate
  written as a ``\\ud800`` escape is an error).
- Model names and versions must also travel as-is in an HTTP header and a URL query (the
  root sends them to leaves in ``?model=``/``?version=`` and ``X-FT-Trimmed-For``): they use
  only the alphabet ``A-Z a-z 0-9 . _ - ~`` (RFC 3986 unreserved characters,
  :data:`flatbuffers_schema.wire.NAME_PATTERN`); the error names the offending character.
  Feature and output names may be any Unicode.
- Optional, per entry, the model version's tensor signature as an Open Inference Protocol
  server (NVIDIA Triton, KServe) declares it -- what ``trimmer-bundle build --triton-repo``
  writes: ``inputs``, an array of ``{"name", "datatype", "shape", "optional"}`` (``name``
  one of ``input_names``, once; ``datatype`` a v2 datatype such as ``"FP32"``; ``shape``
  the dims without the batch dimension, integers >= -1, ``-1`` for any size, optional;
  ``optional`` a boolean, default false), and ``max_batch_size`` (an integer >= 0, as
  Triton's model config: 0 means no batch dimension). Files without them stay valid; the
  root uses them to refuse a column that cannot match (docs/triton.md).
- The same version twice in one model's list is an error. Duplicate feature names in one
  ``input_names`` are collapsed (first occurrence order kept) and reported as a warning;
  ``output_names`` are kept as written.
- :class:`Limits` bounds file size, model count, versions per model and names per list.

"Latest" version: see :func:`version_sort_key`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

from flatbuffers_schema.oip import DATATYPES, MAX_DIMS, InputSpec, TensorSignature
from flatbuffers_schema.settings import positive, setting
from flatbuffers_schema.wire import NAME_ALPHABET, NAME_PATTERN

__all__ = [
    "DEFAULT_LIMITS",
    "BundleError",
    "PENDING_KEY",
    "Limits",
    "ModelVersion",
    "ParsedBundle",
    "Signature",
    "latest_current",
    "latest_version",
    "load_bundle_file",
    "parse_bundle",
    "parse_signature",
    "read_file_bounded",
    "version_sort_key",
]

_UTF8_BOM = b"\xef\xbb\xbf"
#: At most this many warnings are kept per file; the rest are summarised in one line, so a
#: file with a million duplicate features cannot flood logs or the status blob.
MAX_WARNINGS = 100
_READ_CHUNK = 1 << 20
_PATH_KEY_CHARS = 64  # longer object keys are shortened in JSON paths
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_RUNS = re.compile(r"[0-9]+|[^0-9]+")
#: The version entry key that marks a version pending (a JSON boolean).
PENDING_KEY = "pending"


class BundleError(ValueError):
    """A bundle (or signature) file was rejected as a whole.

    ``str(err)`` is ``f"{path}: {json_path}: {reason}"``. ``json_path`` is ``"$"`` for errors
    about the file as a whole (I/O, size, encoding, JSON syntax).
    """

    def __init__(self, path: str, json_path: str, reason: str) -> None:
        super().__init__(path, json_path, reason)  # args kept so the error pickles
        self.path = path
        self.json_path = json_path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.json_path}: {self.reason}"


@dataclass(frozen=True)
class Limits:
    """Configurable bounds; exceeding any of them is an error for the whole file.

    Each field is a setting (:mod:`flatbuffers_schema.settings`): the same flag of
    ``trimmer-daemon`` and ``trimmer-bundle``, and the same key of the daemon's TOML file, so
    ``trimmer-bundle validate`` can apply exactly the limits the daemon applies.
    """

    max_file_bytes: int = setting(64 * 1024 * 1024, positive(int),
                                  "reject bundle files larger than this many bytes",
                                  flag="--max-file-bytes", metavar="N")
    max_models: int = setting(100_000, positive(int),
                              "reject bundle files with more models than this",
                              flag="--max-models", metavar="N")
    max_versions_per_model: int = setting(1_000, positive(int),
                                          "reject bundle files with more versions of one model "
                                          "than this", flag="--max-versions", metavar="N")
    max_features_per_version: int = setting(100_000, positive(int),
                                            "reject bundle files with more input (or output) "
                                            "names in one version than this",
                                            flag="--max-features", metavar="N")
    max_name_length: int = setting(1_024, positive(int),
                                   "reject names (models, versions, features) longer than "
                                   "this many UTF-8 bytes", flag="--max-name-length",
                                   metavar="N")

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ModelVersion:
    """One validated version entry of a model."""

    version: str
    input_names: tuple[str, ...]  # de-duplicated, first-occurrence order
    output_names: tuple[str, ...]
    tensors: TensorSignature | None = None  # the optional inputs / max_batch_size
    pending: bool = False  # shipped ahead of the leaves: never "latest" until promoted


@dataclass(frozen=True)
class ParsedBundle:
    """A whole validated bundle file."""

    path: str
    sha256: str  # hex sha256 of the exact file bytes
    models: Mapping[str, tuple[ModelVersion, ...]]  # model -> versions in file order
    warnings: tuple[str, ...] = field(default=())  # each "path: json_path: message"


@dataclass(frozen=True)
class Signature:
    """A validated per-model signature (``module_info.json``)."""

    input_names: tuple[str, ...]  # de-duplicated, first-occurrence order
    output_names: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())
    tensors: TensorSignature | None = None  # the optional inputs / max_batch_size


# ---------------------------------------------------------------------------------------------
# natural version order


def version_sort_key(version: str) -> tuple[tuple[tuple[int, int, str], ...], str]:
    """Sort key of the natural version order used to pick the *latest* version.

    The string is split into runs of ASCII digits and runs of other characters. A digit run
    compares as the integer it spells, a text run as a string, and a digit run sorts before a
    text run at the same position; a string that is a prefix (in runs) of another sorts first.
    So ``"2" < "10"``, ``"v9" < "v10"``, ``"1.9" < "1.10"``, and all-digit versions compare as
    integers. Versions that are equal this way (``"01"`` and ``"1"``) are ordered by the raw
    string, which makes this a total order consistent with string equality.

    Each run is ``(0, digit_count, digits)`` (leading zeros stripped: comparing length, then
    text, is integer comparison without ``int()``, so any length is safe) or ``(1, 0, text)``.
    """
    runs = []
    for run in _RUNS.findall(version):
        if run[0].isdigit():
            digits = run.lstrip("0") or "0"
            runs.append((0, len(digits), digits))
        else:
            runs.append((1, 0, run))
    return tuple(runs), version


def latest_version(versions: Iterable[str]) -> str:
    """The greatest version in :func:`version_sort_key` order; ValueError if there is none."""
    items = list(versions)
    if not items:
        raise ValueError("latest_version() of no versions")
    return max(items, key=version_sort_key)


def latest_current(versions: Iterable[ModelVersion]) -> ModelVersion | None:
    """The greatest version that is not pending (None: every version is pending)."""
    current = [mv for mv in versions if not mv.pending]
    return max(current, key=lambda mv: version_sort_key(mv.version)) if current else None


# ---------------------------------------------------------------------------------------------
# strict JSON


class _JsonInt:
    """A JSON integer kept as its literal text (no int() digit limit, no float confusion)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class _JsonConstant:
    """A non-standard NaN/Infinity literal; found and rejected with its JSON path."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _JsonObject(dict):  # type: ignore[type-arg]
    """A JSON object that remembers its first duplicated key (reported with its path)."""

    __slots__ = ("duplicate",)
    duplicate: str | None


def _object_pairs(pairs: list[tuple[str, object]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    obj.duplicate = None
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                obj.duplicate = key
                break
            seen.add(key)
    return obj


#: Types of decoded JSON values that cannot hide a duplicate key or a NaN/Infinity literal.
_PLAIN_SCALARS = frozenset({str, bool, float, type(None), _JsonInt})

_DECODER = json.JSONDecoder(object_pairs_hook=_object_pairs, parse_int=_JsonInt,
                            parse_constant=_JsonConstant)


def _type_name(value: object) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, _JsonInt):
        return "integer"
    if isinstance(value, float):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


def _quote(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


def _member(parent: str, key: str, *, top_brackets: bool = True) -> str:
    """JSON path of ``parent[key]``: ``.key`` for identifiers, else ``["key"]``.

    Keys of the top-level object are model names in a bundle: always bracketed there
    (``top_brackets``), so ``$["model_A"]`` reads the same for every name.
    Keys longer than ``_PATH_KEY_CHARS`` are shortened (``["abc…"]``) to keep messages and
    logs bounded; the reason of a "too long" error carries the real size.
    """
    if (not top_brackets or parent != "$") and _IDENTIFIER.match(key) \
            and len(key) <= _PATH_KEY_CHARS:
        return f"{parent}.{key}"
    if len(key) > _PATH_KEY_CHARS:
        key = key[:_PATH_KEY_CHARS] + "\u2026"
    return f"{parent}[{_quote(key)}]"


class _Context:
    """Per-file state: the file name for messages, the limits, collected warnings."""

    def __init__(self, path: str, limits: Limits, *, top_is_map: bool = True) -> None:
        self.path = path
        self.limits = limits
        self.top_is_map = top_is_map  # bundle: top-level keys are model names
        self._warnings: list[str] = []
        self._suppressed = 0

    def error(self, json_path: str, reason: str) -> BundleError:
        return BundleError(self.path, json_path, reason)

    def warn(self, json_path: str, message: str) -> None:
        if len(self._warnings) < MAX_WARNINGS:
            self._warnings.append(f"{self.path}: {json_path}: {message}")
        else:
            self._suppressed += 1

    def warnings(self) -> tuple[str, ...]:
        if not self._suppressed:
            return tuple(self._warnings)
        return (*self._warnings, f"{self.path}: $: {self._suppressed} more warnings suppressed")


def _decode_text(data: bytes, ctx: _Context) -> str:
    if len(data) > ctx.limits.max_file_bytes:
        raise ctx.error("$", f"file too large: {len(data)} bytes > limit "
                             f"{ctx.limits.max_file_bytes}")
    if not data:
        raise ctx.error("$", "empty file")
    skip = 0
    if data.startswith(_UTF8_BOM):
        ctx.warn("$", "UTF-8 byte order mark ignored")
        skip = len(_UTF8_BOM)
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise ctx.error("$", f"not valid UTF-8: byte 0x{data[offset]:02x} at offset {offset} "
                             f"(line {line})") from None
    if not text or text.isspace():  # isspace(): no 64 MiB copy as strip() would make
        raise ctx.error("$", "file contains only whitespace")
    return text


def _load_json(data: bytes, ctx: _Context) -> object:
    """Decode strictly; every failure becomes a BundleError at ``$``."""
    text = _decode_text(data, ctx)
    try:
        doc = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        # json's messages end with " at" for some errors ("Unterminated string starting at")
        msg = exc.msg.removesuffix(" at")
        raise ctx.error("$", f"invalid JSON: {msg} at line {exc.lineno} column "
                             f"{exc.colno}") from None
    except RecursionError:
        raise ctx.error("$", "invalid JSON: nested too deeply") from None
    except (ValueError, TypeError) as exc:  # defensive: no decoder error may escape
        raise ctx.error("$", f"invalid JSON: {exc}") from None
    _check_strict(doc, ctx)
    return doc


def _check_strict(doc: object, ctx: _Context) -> None:
    """Reject duplicate keys and NaN/Infinity anywhere, with their path.

    Iterative (no recursion limit); JSON paths are only built for containers, and arrays of
    plain scalars (the feature lists, i.e. almost all of a big file) are skipped at C speed.
    """
    stack: list[tuple[object, str]] = [(doc, "$")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _JsonConstant):
            raise ctx.error(path, f"{value.name} is not valid JSON (NaN/Infinity literals "
                                  "are not allowed)")
        if isinstance(value, _JsonObject):
            if value.duplicate is not None:
                raise ctx.error(_member(path, value.duplicate, top_brackets=ctx.top_is_map),
                                f"duplicate key {_quote(value.duplicate)}")
            for key, child in value.items():
                if type(child) not in _PLAIN_SCALARS:
                    stack.append((child, _member(path, key, top_brackets=ctx.top_is_map)))
        elif isinstance(value, list) and not _PLAIN_SCALARS.issuperset(map(type, value)):
            for i, child in enumerate(value):
                if type(child) not in _PLAIN_SCALARS:
                    stack.append((child, f"{path}[{i}]"))


# ---------------------------------------------------------------------------------------------
# structure


def _check_name(value: object, json_path: str, what: str, ctx: _Context) -> str:
    if not isinstance(value, str):
        raise ctx.error(json_path, f"{what} must be a string, got {_type_name(value)}")
    if not value:
        raise ctx.error(json_path, f"{what} must be a non-empty string")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ctx.error(json_path, f"{what} is not valid Unicode (lone surrogate)") from None
    if size > ctx.limits.max_name_length:
        raise ctx.error(json_path, f"{what} too long: {size} bytes > limit "
                                   f"{ctx.limits.max_name_length}")
    return value


_HEADER_SAFE = re.compile(NAME_PATTERN)
_NOT_HEADER_SAFE = re.compile(r"[^A-Za-z0-9._~-]")


def _check_header_safe(value: str, json_path: str, what: str, ctx: _Context) -> str:
    """A model name or version: also an HTTP header value and a URL query value as-is."""
    if _HEADER_SAFE.fullmatch(value):
        return value
    bad = _NOT_HEADER_SAFE.search(value)
    assert bad is not None
    char = bad.group()
    raise ctx.error(json_path, f"{what} {_quote(value[:64])} has character {char!r} "
                               f"(U+{ord(char):04X}) at index {bad.start()}: names and "
                               f"versions may only use {NAME_ALPHABET}")


def _parse_names(value: object, json_path: str, what: str, ctx: _Context, *,
                 required: bool) -> tuple[str, ...]:
    """A list of names; duplicates collapsed with a warning when ``required`` (inputs)."""
    if not isinstance(value, list):
        raise ctx.error(json_path, f"{what} must be an array of strings, got "
                                   f"{_type_name(value)}")
    if required and not value:
        raise ctx.error(json_path, f"{what} must not be empty")
    if len(value) > ctx.limits.max_features_per_version:
        raise ctx.error(json_path, f"too many {what}: {len(value)} > limit "
                                   f"{ctx.limits.max_features_per_version}")
    if _plain_names(value, ctx.limits.max_name_length):
        names = tuple(value) if not required else tuple(dict.fromkeys(value))
        if len(names) == len(value):
            return names  # the common case, checked at C speed
    # slow path: find the exact offending item (or collect the duplicate warnings)
    if not required:
        return tuple(_check_name(v, f"{json_path}[{i}]", "output name", ctx)
                     for i, v in enumerate(value))
    first: dict[str, int] = {}
    for i, item in enumerate(value):
        name = _check_name(item, f"{json_path}[{i}]", "feature name", ctx)
        index = first.setdefault(name, i)
        if index != i:
            ctx.warn(f"{json_path}[{i}]", f"duplicate feature {_quote(name)} collapsed "
                                          f"(first at index {index})")
    return tuple(first)


def _plain_names(value: list[object], max_bytes: int) -> bool:
    """Whether every item is a non-empty UTF-8-encodable str surely within ``max_bytes``.

    Only C-level operations (a 60 MiB bundle would otherwise spend seconds in
    :func:`_check_name`); False sends the caller to the exact per-item checks.
    """
    if not value:
        return True
    if set(map(type, value)) != {str} or "" in value:
        return False
    names = cast("list[str]", value)
    if max(map(len, names)) * 4 > max_bytes:  # UTF-8 needs at most 4 bytes per character
        return False
    joined = "".join(names)
    if joined.isascii():
        return True
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _parse_version(value: object, json_path: str, ctx: _Context) -> str:
    if isinstance(value, _JsonInt):
        value = "0" if value.text == "-0" else value.text
    elif not isinstance(value, str):
        raise ctx.error(json_path, f"version must be a string or an integer, got "
                                   f"{_type_name(value)}")
    return _check_header_safe(_check_name(value, json_path, "version", ctx), json_path,
                              "version", ctx)


def _require(obj: dict, key: str, json_path: str, ctx: _Context) -> object:  # type: ignore[type-arg]
    if key not in obj:
        raise ctx.error(json_path, f"missing required key {_quote(key)}")
    return obj[key]


def _parse_entry(entry: object, json_path: str, ctx: _Context) -> ModelVersion:
    if not isinstance(entry, dict):
        raise ctx.error(json_path, f"version entry must be an object, got {_type_name(entry)}")
    version = _parse_version(_require(entry, "version", json_path, ctx),
                             f"{json_path}.version", ctx)
    inputs = _parse_names(_require(entry, "input_names", json_path, ctx),
                          f"{json_path}.input_names", "input_names", ctx, required=True)
    outputs = _parse_names(entry.get("output_names", []), f"{json_path}.output_names",
                           "output_names", ctx, required=False)
    pending = entry.get(PENDING_KEY, False)
    if not isinstance(pending, bool):
        raise ctx.error(f"{json_path}.{PENDING_KEY}", f"{PENDING_KEY} must be true or false, "
                                                       f"got {_type_name(pending)}")
    return ModelVersion(version, inputs, outputs,
                        _parse_tensors(entry, inputs, json_path, ctx), pending)


_MAX_INT_DIGITS = 12


def _small_int(value: object, json_path: str, what: str, low: int, ctx: _Context) -> int:
    if not isinstance(value, _JsonInt):
        raise ctx.error(json_path, f"{what} must be an integer, got {_type_name(value)}")
    if len(value.text) > _MAX_INT_DIGITS or int(value.text) < low:
        raise ctx.error(json_path, f"{what} must be an integer >= {low} of at most "
                                   f"{_MAX_INT_DIGITS} digits, got {value.text[:20]}")
    return int(value.text)


def _parse_input_spec(item: object, at: str, known: set[str], ctx: _Context) -> InputSpec:
    if not isinstance(item, dict):
        raise ctx.error(at, f"an input must be an object, got {_type_name(item)}")
    name = _check_name(_require(item, "name", at, ctx), f"{at}.name", "input name", ctx)
    if name not in known:
        raise ctx.error(f"{at}.name", f"input {_quote(name)} is not in input_names")
    datatype = _require(item, "datatype", at, ctx)
    if datatype not in DATATYPES:
        raise ctx.error(f"{at}.datatype", f"datatype must be one of {', '.join(DATATYPES)}, "
                                          f"got {_quote(str(datatype))[:40]}")
    shape = None
    if "shape" in item:
        dims = item["shape"]
        if not isinstance(dims, list) or len(dims) > MAX_DIMS:
            raise ctx.error(f"{at}.shape", f"shape must be an array of at most {MAX_DIMS} "
                                           f"integers, got {_type_name(dims)}")
        shape = tuple(_small_int(d, f"{at}.shape[{k}]", "a dimension", -1, ctx)
                      for k, d in enumerate(dims))
    optional = item.get("optional", False)
    if not isinstance(optional, bool):
        raise ctx.error(f"{at}.optional", f"optional must be a boolean, got "
                                          f"{_type_name(optional)}")
    return InputSpec(name, str(datatype), shape, optional)


def _parse_tensors(entry: dict, inputs: tuple[str, ...], json_path: str,  # type: ignore[type-arg]
                   ctx: _Context) -> TensorSignature | None:
    """The optional ``inputs`` / ``max_batch_size`` of an entry (module docstring)."""
    if "inputs" not in entry and "max_batch_size" not in entry:
        return None
    mbs = -1
    if "max_batch_size" in entry:
        mbs = _small_int(entry["max_batch_size"], f"{json_path}.max_batch_size",
                         "max_batch_size", 0, ctx)
    raw = entry.get("inputs", [])
    where = f"{json_path}.inputs"
    if not isinstance(raw, list):
        raise ctx.error(where, f"inputs must be an array of objects, got {_type_name(raw)}")
    if len(raw) > ctx.limits.max_features_per_version:
        raise ctx.error(where, f"too many inputs: {len(raw)} > limit "
                               f"{ctx.limits.max_features_per_version}")
    known = set(inputs)
    specs: dict[str, InputSpec] = {}
    for i, item in enumerate(raw):
        spec = _parse_input_spec(item, f"{where}[{i}]", known, ctx)
        if spec.name in specs:
            raise ctx.error(f"{where}[{i}].name", f"input {_quote(spec.name)} is described "
                                                  "twice")
        specs[spec.name] = spec
    return TensorSignature(tuple(specs.values()), mbs)


def _parse_model(entries: object, json_path: str, ctx: _Context) -> tuple[ModelVersion, ...]:
    if not isinstance(entries, list):
        raise ctx.error(json_path, f"model must map to a non-empty array of version entries, "
                                   f"got {_type_name(entries)}")
    if not entries:
        raise ctx.error(json_path, "model has no versions (empty array)")
    if len(entries) > ctx.limits.max_versions_per_model:
        raise ctx.error(json_path, f"too many versions: {len(entries)} > limit "
                                   f"{ctx.limits.max_versions_per_model}")
    first: dict[str, int] = {}
    versions = []
    for i, entry in enumerate(entries):
        mv = _parse_entry(entry, f"{json_path}[{i}]", ctx)
        index = first.setdefault(mv.version, i)
        if index != i:
            raise ctx.error(f"{json_path}[{i}].version",
                            f"duplicate version {_quote(mv.version)} (first at index {index})")
        versions.append(mv)
    return tuple(versions)


def _parse_models(doc: object, ctx: _Context) -> dict[str, tuple[ModelVersion, ...]]:
    if not isinstance(doc, dict):
        raise ctx.error("$", f"top level must be an object mapping model names to version "
                             f"arrays, got {_type_name(doc)}")
    if len(doc) > ctx.limits.max_models:
        raise ctx.error("$", f"too many models: {len(doc)} > limit {ctx.limits.max_models}")
    if not doc:
        ctx.warn("$", "bundle defines no models")
    models = {}
    for name, entries in doc.items():
        json_path = _member("$", name)
        _check_header_safe(_check_name(name, json_path, "model name", ctx), json_path,
                           "model name", ctx)
        models[name] = _parse_model(entries, json_path, ctx)
    return models


# ---------------------------------------------------------------------------------------------
# public entry points


def parse_bundle(data: bytes, *, path: str, limits: Limits = DEFAULT_LIMITS) -> ParsedBundle:
    """Parse and validate the bytes of one bundle file (see the module docstring for rules).

    ``path`` is only used in messages. Raises :class:`BundleError` and nothing else for any
    content; warnings (BOM, duplicate features collapsed) are returned in the result.
    """
    ctx = _Context(path, limits)
    data = data if isinstance(data, bytes) else bytes(data)
    doc = _load_json(data, ctx)
    models = _parse_models(doc, ctx)
    return ParsedBundle(path=path, sha256=hashlib.sha256(data).hexdigest(),
                        models=types.MappingProxyType(models), warnings=ctx.warnings())


def parse_signature(data: bytes, *, path: str, limits: Limits = DEFAULT_LIMITS) -> Signature:
    """Parse one per-model signature, ``{"input_names": [...], "output_names": [...]}``.

    Same strictness as :func:`parse_bundle` (JSON, names, limits); other keys are ignored.
    """
    ctx = _Context(path, limits, top_is_map=False)
    doc = _load_json(data if isinstance(data, bytes) else bytes(data), ctx)
    if not isinstance(doc, dict):
        raise ctx.error("$", f"signature must be an object, got {_type_name(doc)}")
    inputs = _parse_names(_require(doc, "input_names", "$", ctx), "$.input_names",
                          "input_names", ctx, required=True)
    outputs = _parse_names(doc.get("output_names", []), "$.output_names", "output_names",
                           ctx, required=False)
    tensors = _parse_tensors(doc, inputs, "$", ctx)
    return Signature(inputs, outputs, ctx.warnings(), tensors)


def read_file_bounded(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """Read a regular file, refusing one larger than ``max_bytes`` before reading it all.

    At most ``max_bytes + 1`` bytes are read (so a file growing while read is caught too).
    Opens with O_NONBLOCK so a FIFO planted at the path cannot block the caller. Every
    failure is a :class:`BundleError` at ``$`` (``"file not found"``, ``"permission denied"``,
    ``"not a regular file"``, ``"file too large: ..."``).
    """
    name = os.fsdecode(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BundleError(name, "$", "file not found") from None
    except PermissionError:
        raise BundleError(name, "$", "permission denied") from None
    except OSError as exc:
        raise BundleError(name, "$", f"cannot open file: {exc.strerror or exc}") from None
    try:
        return _read_fd(fd, name, max_bytes)
    finally:
        os.close(fd)


def _read_fd(fd: int, name: str, max_bytes: int) -> bytes:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise BundleError(name, "$", f"not a regular file ({kind})")
        if st.st_size > max_bytes:
            raise BundleError(name, "$", f"file too large: {st.st_size} bytes > limit "
                                         f"{max_bytes}")
        chunks = []
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, _READ_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise BundleError(name, "$", f"cannot read file: {exc.strerror or exc}") from None
    if remaining <= 0:
        raise BundleError(name, "$", f"file too large: more than {max_bytes} bytes")
    return b"".join(chunks)


def load_bundle_file(path: str | os.PathLike[str], *,
                     limits: Limits = DEFAULT_LIMITS) -> ParsedBundle:
    """Read ``path`` (bounded by ``limits.max_file_bytes``) and :func:`parse_bundle` it.

    A missing or unreadable file raises :class:`BundleError` too (reason ``"file not
    found"``, ``"permission denied"``, ...), so callers handle exactly one error type.
    """
    name = os.fsdecode(path)
    return parse_bundle(read_file_bounded(name, limits.max_file_bytes), path=name,
                        limits=limits)
