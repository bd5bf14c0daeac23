"""The one settings registry of every process: a setting is declared once, as a typed field.

A settings class is a frozen dataclass whose fields are declared with :func:`setting`::

    @dataclass(frozen=True)
    class RootSettings:
        leaf_timeout: float = setting(2.0, positive(float), "seconds a target may take",
                                      env="FT_LEAF_TIMEOUT")

That one declaration gives the typed attribute (``settings.leaf_timeout: float``), its
validator, its default, its help text and its spellings: an environment variable (``env``,
the root service), a command-line flag (``flag``, the daemon and ``trimmer-bundle``) and a TOML
key (the field name, the daemon's ``--config`` file). :func:`specs` lists them for ``--help``
(:func:`add_arguments`) and the docs tables (:func:`markdown_table`, kept in sync by a test);
:func:`load` builds the typed object from any mix of sources, naming the spelling at fault in
a :class:`SettingsError`. Fields declared without :func:`setting` are not settings.

Used by the daemon (``trimmer_daemon.config``), the bundle parser's ``Limits``
(``trimmer_daemon.bundle.parse``) and the root service (``root_worker.service.settings``).
Standard library only; no side effects at import.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

_KEY = "feature_trimmer.setting"
T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is unusable; the message names its spelling (variable, flag or key) and why."""


@dataclass(frozen=True)
class Spec:
    """One setting: its attribute, default, validator, help and spellings."""

    name: str                       # attribute, and the TOML key
    default: Any
    parse: Callable[[Any], Any]     # str (env, flag) or a TOML value -> typed value
    help: str
    env: str | None = None          # environment variable
    flag: str | None = None         # command-line flag
    metavar: str | None = None
    show: Callable[[Any], str] | None = None  # how --help and the docs print the default

    def shown_default(self) -> str:
        if self.show is not None:
            return self.show(self.default)
        if isinstance(self.default, bool):
            return "1" if self.default else "0"
        return "''" if self.default == "" else str(self.default)


def setting(default: Any, parse: Callable[[Any], Any], help: str, *, env: str | None = None,
            flag: str | None = None, metavar: str | None = None,
            show: Callable[[Any], str] | None = None) -> Any:
    """Declare a dataclass field as a setting (see the module docstring)."""
    spec = {"default": default, "parse": parse, "help": help, "env": env, "flag": flag,
            "metavar": metavar, "show": show}
    return dataclasses.field(default=default, metadata={_KEY: spec})


def specs(cls: type) -> tuple[Spec, ...]:
    """The settings of ``cls`` in declaration order."""
    return tuple(Spec(name=f.name, **f.metadata[_KEY])
                 for f in dataclasses.fields(cls) if _KEY in f.metadata)


Source = tuple[Mapping[str, Any], Callable[["Spec"], tuple[str, str]]]
"""``(values, spelling)``: ``values`` maps a key to a raw value (``None``: absent);
``spelling(spec)`` gives ``(key to look up, name for error messages)``, key ``""`` to skip."""


def load(cls: type[T], sources: Iterable[Source], **fixed: Any) -> T:
    """Build ``cls`` from ``sources``, highest precedence first.

    ``fixed`` are typed values for non-setting fields (or already-typed overrides). Raises
    :class:`SettingsError` naming the spelling at fault and the reason.
    """
    sources = list(sources)
    values: dict[str, Any] = {}
    for spec in specs(cls):
        if spec.name in fixed:
            continue
        values[spec.name] = _first(spec, sources)
    try:
        return cls(**values, **fixed)
    except (TypeError, ValueError) as exc:
        raise SettingsError(str(exc)) from None


def present(cls: type, sources: Iterable[Source]) -> dict[str, Any]:
    """The settings of ``cls`` that ``sources`` give, parsed (for ``dataclasses.replace``)."""
    sources = list(sources)
    out: dict[str, Any] = {}
    for spec in specs(cls):
        value = _first(spec, sources, missing=_MISSING)
        if value is not _MISSING:
            out[spec.name] = value
    return out


_MISSING = object()


def _first(spec: Spec, sources: list[Source], missing: Any = None) -> Any:
    for values, spelling in sources:
        key, label = spelling(spec)
        raw = values.get(key) if key else None
        if raw is None:
            continue
        try:
            return spec.parse(raw)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SettingsError(f"{label}={raw!r}: {exc}") from None
    return spec.default if missing is None else missing


def env_spelling(spec: Spec) -> tuple[str, str]:
    """Environment variables (the root service)."""
    return spec.env or "", spec.env or ""


def flag_spelling(spec: Spec) -> tuple[str, str]:
    """Parsed ``--flags`` (argparse dest = the field name)."""
    return (spec.name, spec.flag) if spec.flag else ("", "")


def toml_spelling(path: str | None) -> Callable[[Spec], tuple[str, str]]:
    """Keys of the TOML file ``path``; errors say ``PATH: key``."""
    return lambda spec: (spec.name, f"{path}: {spec.name}")


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type) -> None:
    """One ``--flag`` per setting of ``cls`` that has one (dest: the field name)."""
    for spec in specs(cls):
        if spec.flag:
            parser.add_argument(spec.flag, dest=spec.name, default=None,
                                metavar=spec.metavar,
                                help=f"{spec.help} (default: {spec.shown_default()})")


def markdown_table(classes: Iterable[type], spelling: str) -> str:
    """A Markdown table of the settings of ``classes`` by ``spelling`` (env, flag or toml)."""
    head = {"env": "variable", "flag": "flag", "toml": "TOML key"}[spelling]
    rows = [f"| {head} | default | meaning |", "|---|---|---|"]
    for cls in classes:
        for spec in specs(cls):
            key = spec.name if spelling == "toml" else getattr(spec, spelling)
            if key:
                rows.append(f"| `{key}` | {_md_default(spec)} | {spec.help} |")
    return "\n".join(rows) + "\n"


def _md_default(spec: Spec) -> str:
    if spec.default is None:
        return "(see meaning)"
    if spec.default == "" and not isinstance(spec.default, bool):
        return "(empty)"
    return f"`{spec.shown_default()}`"


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """``--version``: the installed package's version (every console script has it)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("feature-trimmer", "feature-trimmer-lean"):  # the full or the lean install
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "(not installed)"  # a source tree that was never installed


# -- validators: each takes a str (env/flag) or a TOML value and returns the typed value ------

def boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    low = str(raw).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _number(kind: Callable[[Any], Any], raw: Any) -> Any:
    if isinstance(raw, bool):
        raise ValueError(f"expected a number, got {raw!r}")
    value = kind(raw.strip() if isinstance(raw, str) else raw)
    if isinstance(value, float) and value != value:  # NaN passes every comparison below
        raise ValueError("must be a number, not NaN")
    return value


def in_range(kind: Callable[[Any], Any], low: float | None = None, high: float | None = None,
             ) -> Callable[[Any], Any]:
    """``kind`` (int or float) within ``[low, high]`` (either end open when ``None``)."""
    def parse(raw: Any) -> Any:
        value = _number(kind, raw)
        if low is not None and value < low:
            raise ValueError(f"must be >= {low}")
        if high is not None and value > high:
            raise ValueError(f"must be <= {high}")
        return value
    parse.__name__ = getattr(kind, "__name__", "number")
    return parse


def positive(kind: Callable[[Any], Any], high: float | None = None) -> Callable[[Any], Any]:
    """``kind`` > 0 (and <= ``high`` when given)."""
    def parse(raw: Any) -> Any:
        value = _number(kind, raw)
        if not value > 0:
            raise ValueError("must be > 0")
        if high is not None and value > high:
            raise ValueError(f"must be <= {high}")
        return value
    parse.__name__ = getattr(kind, "__name__", "number")
    return parse


def choice(*allowed: str, upper: bool = False) -> Callable[[Any], str]:
    """One of ``allowed`` (case-insensitive; returned in the case of ``allowed``)."""
    by_low = {a.lower(): a for a in allowed}

    def parse(raw: Any) -> str:
        value = by_low.get(str(raw).strip().lower())
        if value is None:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value
    return parse


def octal(raw: Any) -> int:
    value = raw if isinstance(raw, int) and not isinstance(raw, bool) else int(str(raw), 8)
    if not 0 <= value <= 0o7777:
        raise ValueError("expected an octal file mode (0..7777)")
    return value


def text(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {type(raw).__name__}")
    return raw


_HOST_PORT = re.compile(r"^([^\s]*):(\d{1,5})$")


def host_port(raw: Any, *, allow_empty: bool = False, allow_unix: bool = False) -> str:
    """``HOST:PORT`` with a port in 0..65535 (optionally ``''`` or ``unix:PATH``)."""
    value = text(raw)
    if allow_empty and value == "":
        return value
    if allow_unix and value.startswith("unix:") and len(value) > 5:
        return value
    m = _HOST_PORT.match(value)
    if not m or int(m.group(2)) > 65535:
        extra = " or unix:PATH" if allow_unix else ""
        extra += ", or '' to disable" if allow_empty else ""
        raise ValueError(f"expected HOST:PORT with a port 0..65535{extra}")
    return value
