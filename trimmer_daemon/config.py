"""trimmer-daemon settings: typed fields of the one registry (:mod:`flatbuffers_schema.settings`).

Each setting is declared once below (or, for the bundle limits, in
:class:`trimmer_daemon.bundle.parse.Limits`) and is at once an attribute of
:class:`DaemonConfig`, a ``--flag``, a TOML key and a row of the table in
``docs/operations.md`` (``python -m trimmer_daemon.config``; a test keeps it in sync).

Runs in the daemon at start-up and on SIGHUP. Precedence: command-line flags, then the TOML
file given with ``--config``, then the defaults below. Bundles are the union of every
``--bundle NAME=PATH`` and the file's ``[bundles]`` table (a name given in both takes the
command line's path).

Example ``/etc/feature-trimmer/daemon.toml``::

    shm_name = "feature_trimmer"
    shm_group = "ml-serving"
    metrics_listen = "127.0.0.1:9469"

    [bundles]
    ads = "/etc/feature-trimmer/bundles/ads/module_info.json"
    homefeed = "/etc/feature-trimmer/bundles/homefeed/module_info.json"
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from typing import Any

from flatbuffers_schema import settings as S
from flatbuffers_schema.settings import SettingsError, in_range, positive, setting
from flatbuffers_schema.shm_layout import DEFAULT_SHM_NAME, LOCK_DIR, validate_prefix
from trimmer_daemon.bundle.parse import Limits

BUNDLE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(SettingsError):
    """The configuration is unusable; the message names the option or file and why."""


def _prefix(raw: Any) -> str:
    return validate_prefix(S.text(raw))


def _listen(raw: Any) -> str:
    return S.host_port(raw, allow_empty=True)


def _octal_show(value: int) -> str:
    return f"{value:o}"


@dataclass(frozen=True)
class DaemonConfig:
    """What the daemon runs with: every setting typed, plus bundles and the limits."""

    shm_name: str = setting(
        DEFAULT_SHM_NAME, _prefix,
        "prefix of every shared-memory segment (/dev/shm/NAME.ctl, NAME.g<generation>); "
        "the root workers must use the same name", flag="--shm-name")
    shm_mode: int = setting(0o640, S.octal,
                            "octal mode of the segments (workers need read access only)",
                            flag="--shm-mode", metavar="OCTAL", show=_octal_show)
    shm_group: str = setting("", S.text, "group owning the segments, usually the root "
                             "workers' group (default: ours)", flag="--shm-group")
    grace_seconds: float = setting(
        10.0, in_range(float, 0, 86400),
        "keep a superseded generation this long before unlinking it (a worker that still maps "
        "it keeps reading it after the unlink)", flag="--grace-seconds")
    heartbeat_interval: float = setting(1.0, positive(float, 3600),
                                        "seconds between heartbeats in the control segment",
                                        flag="--heartbeat-interval")
    debounce_ms: float = setting(
        2.0, in_range(float, 0, 60_000),
        "after a file event, wait until the directory is quiet this long before reloading",
        flag="--debounce-ms")
    max_delay_ms: float = setting(
        50.0, in_range(float, 0, 600_000),
        "never delay a reload longer than this after the first event of a burst",
        flag="--max-delay-ms")
    rescan_interval: float = setting(30.0, positive(float, 86400),
                                     "re-read every bundle this often even without events "
                                     "(safety net)", flag="--rescan-interval")
    retry_interval: float = setting(1.0, positive(float, 3600),
                                    "after a failed publication (e.g. /dev/shm full), retry "
                                    "this often", flag="--retry-interval")
    metrics_listen: str = setting("127.0.0.1:9469", _listen,
                                  "serve Prometheus metrics on HOST:PORT ('' disables)",
                                  flag="--metrics-listen", metavar="HOST:PORT")
    log_level: str = setting("INFO", S.choice(*LOG_LEVELS), ", ".join(LOG_LEVELS),
                             flag="--log-level")
    lock_dir: str = setting(
        LOCK_DIR, S.text, "directory of the single-instance lock file "
        "feature-trimmer.<shm name>.lock; never /dev/shm (cleaning it must not free the lock)",
        flag="--lock-dir", metavar="DIR")
    max_generations: int = setting(
        8, in_range(int, 2, 4096), "at most this many generation segments exist at once "
        "(older ones are unlinked before their grace period if needed; at least 2)",
        flag="--max-generations")
    max_generation_bytes_factor: float = setting(
        4.0, in_range(float, 2, 1000), "generation segments hold at most this multiple of the "
        "larger of the current and the new blob (at least 2)",
        flag="--max-generation-bytes-factor")
    status_interval: float = setting(
        1.0, in_range(float, 0, 3600), "publish status-only changes (a bundle's error text, "
        "stale/ok) at most this often; map changes are published at once",
        flag="--status-interval")
    writer_hold_seconds: float = setting(
        5.0, in_range(float, 0, 3600), "after an in-place modification, wait this long for "
        "the writer to close the file before reporting the bundle stale (its content is never "
        "published while held)", flag="--writer-hold-seconds")
    inline_parse_bytes: int = setting(
        1 << 20, in_range(int, 0, 1 << 40), "parse files up to this size in the main loop; "
        "larger ones in the parse worker process, so the heartbeat and other bundles never "
        "wait for them", flag="--inline-parse-bytes")
    max_parse_memory: int = setting(
        2 << 30, in_range(int, 64 << 20, 1 << 44), "memory limit (bytes, RLIMIT_DATA) of the "
        "parse worker process; a bundle that needs more is rejected with a clear error "
        "(about 20x the file size for a file of tiny models)", flag="--max-parse-memory")

    limits: Limits = field(default_factory=Limits)
    bundles: dict[str, str] = field(default_factory=dict)
    config_file: str | None = None
    cleanup: bool = False


SETTING_CLASSES = (DaemonConfig, Limits)  # every flag and TOML key of the daemon
SETTINGS: tuple[S.Spec, ...] = tuple(spec for cls in SETTING_CLASSES for spec in S.specs(cls))


def setting_values(config: DaemonConfig) -> dict[str, Any]:
    """Every setting of ``config`` by TOML key (the limits included), e.g. for logs."""
    out = {spec.name: getattr(config, spec.name) for spec in S.specs(DaemonConfig)}
    out.update((spec.name, getattr(config.limits, spec.name)) for spec in S.specs(Limits))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trimmer-daemon",
        description="Watch each bundle's module_info.json, keep every bundle's last-known-good "
                    "allowlists, and publish the consolidated model -> version -> allowlist "
                    "map to POSIX shared memory for the root workers (one daemon per host).",
        epilog="Every setting is also a key of the --config TOML file (the flag's name with "
               "'_' for '-', e.g. grace_seconds = 5.0; the limits: max_file_bytes, "
               "max_models, max_versions_per_model, max_features_per_version, "
               "max_name_length), next to a [bundles] table of NAME = PATH. "
               "Signals: SIGHUP re-reads the configuration and rescans every bundle; "
               "SIGTERM/SIGINT stop, leaving the current map in place for the workers. "
               "Exit codes: 0 stopped, 2 bad configuration, 3 another daemon holds the "
               "shared-memory name (the message names it), 4 any other start-up failure "
               "(one line says what and where).")
    S.add_version_flag(parser)
    parser.add_argument("--bundle", action="append", default=[], metavar="NAME=PATH",
                        help="a bundle and its module_info.json (repeatable)")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file with any of the settings below and a [bundles] table")
    parser.add_argument("--cleanup", action="store_true",
                        help="on exit, remove every shared-memory segment of --shm-name "
                             "(default: leave the current map for the workers)")
    for cls in SETTING_CLASSES:
        S.add_arguments(parser, cls)
    return parser


def load_config(argv: list[str]) -> DaemonConfig:
    """Parse ``argv`` (and the TOML file it names); raise :class:`ConfigError` when unusable."""
    args = build_parser().parse_args(argv)
    return resolve(args)


def resolve(args: argparse.Namespace) -> DaemonConfig:
    """Combine parsed flags with the TOML file (re-run on SIGHUP to pick up file edits)."""
    file_values, file_bundles = _read_toml(args.config) if args.config else ({}, {})
    known = {spec.name for spec in SETTINGS}
    unknown = set(file_values) - known
    if unknown:
        raise ConfigError(f"{args.config}: unknown settings: {', '.join(sorted(unknown))}")
    flags = vars(args)
    sources: list[S.Source] = [(flags, S.flag_spelling),
                               (file_values, S.toml_spelling(args.config))]
    bundles = dict(file_bundles)
    bundles.update(_parse_bundle_flags(args.bundle))
    try:
        limits = S.load(Limits, sources)
        return S.load(DaemonConfig, sources, limits=limits, bundles=bundles,
                      config_file=args.config, cleanup=args.cleanup)
    except SettingsError as exc:
        raise ConfigError(str(exc)) from None


def _parse_bundle_flags(flags: list[str]) -> dict[str, str]:
    bundles: dict[str, str] = {}
    for flag in flags:
        name, sep, path = flag.partition("=")
        if not sep or not path:
            raise ConfigError(f"--bundle {flag!r}: expected NAME=PATH")
        bundles[_check_name(name, f"--bundle {flag!r}")] = os.path.abspath(path)
    return bundles


def _check_name(name: str, where: str) -> str:
    if not BUNDLE_NAME_RE.match(name):
        raise ConfigError(f"{where}: bundle name {name!r} must match {BUNDLE_NAME_RE.pattern}")
    return name


def _read_toml(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    bundles_doc = doc.pop("bundles", {})
    if not isinstance(bundles_doc, dict):
        raise ConfigError(f"{path}: [bundles] must be a table of NAME = PATH")
    bundles: dict[str, str] = {}
    base = os.path.dirname(os.path.abspath(path))
    for name, bpath in bundles_doc.items():
        if not isinstance(bpath, str) or not bpath:
            raise ConfigError(f"{path}: bundles.{name}: expected a path string")
        bundles[_check_name(name, f"{path}: bundles")] = os.path.join(base, bpath)
    return doc, bundles


def markdown_table() -> str:
    """The daemon's settings as the table in ``docs/operations.md``."""
    rows = ["| flag | TOML key | default | meaning |", "|---|---|---|---|"]
    for spec in SETTINGS:
        rows.append(f"| `{spec.flag}` | `{spec.name}` | `{spec.shown_default()}` | "
                    f"{spec.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
