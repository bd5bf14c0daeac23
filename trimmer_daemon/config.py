"""trimmer-daemon settings: one declarative registry feeds --help, the TOML file and docs.

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
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flatbuffers_schema.shm_layout import DEFAULT_SHM_NAME, LOCK_DIR
from trimmer_daemon.bundle.parse import Limits

BUNDLE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class ConfigError(ValueError):
    """The configuration is unusable; the message names the option or file and why."""


@dataclass(frozen=True)
class Setting:
    name: str                 # attribute and TOML key
    flag: str                 # command-line flag
    default: Any
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None


def _octal(text: str) -> int:
    return int(str(text), 8)


def _listen(text: str) -> str:
    text = str(text)
    if text and not re.match(r"^[^\s:]*:\d{1,5}$", text):
        raise ValueError("expected HOST:PORT, or '' to disable")
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("shm_name", "--shm-name", DEFAULT_SHM_NAME, str,
            "prefix of every shared-memory segment (/dev/shm/NAME.ctl, NAME.g<generation>); "
            "the root workers must use the same name"),
    Setting("shm_mode", "--shm-mode", 0o640, _octal,
            "octal mode of the segments (workers need read access only)", "OCTAL"),
    Setting("shm_group", "--shm-group", "", str,
            "group owning the segments, usually the root workers' group (default: ours)"),
    Setting("grace_seconds", "--grace-seconds", 10.0, float,
            "keep a superseded generation this long before unlinking it (a worker that still "
            "maps it keeps reading it after the unlink)"),
    Setting("heartbeat_interval", "--heartbeat-interval", 1.0, float,
            "seconds between heartbeats in the control segment"),
    Setting("debounce_ms", "--debounce-ms", 5.0, float,
            "after a file event, wait until the directory is quiet this long before reloading"),
    Setting("max_delay_ms", "--max-delay-ms", 50.0, float,
            "never delay a reload longer than this after the first event of a burst"),
    Setting("rescan_interval", "--rescan-interval", 30.0, float,
            "re-read every bundle this often even without events (safety net)"),
    Setting("retry_interval", "--retry-interval", 1.0, float,
            "after a failed publication (e.g. /dev/shm full), retry this often"),
    Setting("max_file_bytes", "--max-file-bytes", Limits().max_file_bytes, int,
            "reject bundle files larger than this"),
    Setting("max_models", "--max-models", Limits().max_models, int,
            "reject bundle files with more models than this"),
    Setting("max_versions_per_model", "--max-versions", Limits().max_versions_per_model, int,
            "reject bundle files with more versions of one model than this"),
    Setting("max_features_per_version", "--max-features",
            Limits().max_features_per_version, int,
            "reject bundle files with more input features in one version than this"),
    Setting("metrics_listen", "--metrics-listen", "127.0.0.1:9469", _listen,
            "serve Prometheus metrics on HOST:PORT ('' disables)", "HOST:PORT"),
    Setting("log_level", "--log-level", "INFO", str.upper, "DEBUG, INFO, WARNING or ERROR"),
    Setting("lock_dir", "--lock-dir", LOCK_DIR, str,
            "directory of the single-instance lock file feature-trimmer.<shm name>.lock; "
            "never /dev/shm (cleaning it must not free the lock)", "DIR"),
    Setting("max_generations", "--max-generations", 8, int,
            "at most this many generation segments exist at once (older ones are unlinked "
            "before their grace period if needed; at least 2)"),
    Setting("max_generation_bytes_factor", "--max-generation-bytes-factor", 4.0, float,
            "generation segments hold at most this multiple of the larger of the current "
            "and the new blob (at least 2)"),
    Setting("status_interval", "--status-interval", 1.0, float,
            "publish status-only changes (a bundle's error text, stale/ok) at most this often; "
            "map changes are published at once"),
    Setting("writer_hold_seconds", "--writer-hold-seconds", 5.0, float,
            "after an in-place modification, wait this long for the writer to close the file "
            "before reporting the bundle stale (its content is never published while held)"),
    Setting("inline_parse_bytes", "--inline-parse-bytes", 1 << 20, int,
            "parse files up to this size in the main loop; larger ones in the parse worker "
            "process, so the heartbeat and other bundles never wait for them"),
    Setting("max_parse_memory", "--max-parse-memory", 2 << 30, int,
            "memory limit (bytes, RLIMIT_DATA) of the parse worker process; a bundle that "
            "needs more is rejected with a clear error (about 20x the file size for a file "
            "of tiny models)"),
)


@dataclass(frozen=True)
class DaemonConfig:
    bundles: dict[str, str] = field(default_factory=dict)
    config_file: str | None = None
    cleanup: bool = False
    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def limits(self) -> Limits:
        v = self.values
        return Limits(max_file_bytes=v["max_file_bytes"], max_models=v["max_models"],
                      max_versions_per_model=v["max_versions_per_model"],
                      max_features_per_version=v["max_features_per_version"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trimmer-daemon",
        description="Watch each bundle's module_info.json, keep every bundle's last-known-good "
                    "allowlists, and publish the consolidated model -> version -> allowlist "
                    "map to POSIX shared memory for the root workers (one daemon per host).",
        epilog="Signals: SIGHUP re-reads the configuration and rescans every bundle; "
               "SIGTERM/SIGINT stop, leaving the current map in place for the workers. "
               "Exit codes: 0 stopped, 2 bad configuration, 3 another daemon holds the "
               "shared-memory name.")
    parser.add_argument("--bundle", action="append", default=[], metavar="NAME=PATH",
                        help="a bundle and its module_info.json (repeatable)")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file with any of the settings below and a [bundles] table")
    parser.add_argument("--cleanup", action="store_true",
                        help="on exit, remove every shared-memory segment of --shm-name "
                             "(default: leave the current map for the workers)")
    for s in SETTINGS:
        parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.metavar,
                            help=f"{s.help} (default: {_show(s)})")
    return parser


def _show(s: Setting) -> str:
    if s.parse is _octal:
        return f"{s.default:o}"
    return repr(s.default) if s.default == "" else str(s.default)


def load_config(argv: list[str]) -> DaemonConfig:
    """Parse ``argv`` (and the TOML file it names); raise :class:`ConfigError` when unusable."""
    args = build_parser().parse_args(argv)
    return resolve(args)


def resolve(args: argparse.Namespace) -> DaemonConfig:
    """Combine parsed flags with the TOML file (re-run on SIGHUP to pick up file edits)."""
    file_values, file_bundles = _read_toml(args.config) if args.config else ({}, {})
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = getattr(args, s.name)
        source = s.flag
        if raw is None and s.name in file_values:
            raw, source = file_values.pop(s.name), f"{args.config}: {s.name}"
        try:
            values[s.name] = s.default if raw is None else s.parse(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: invalid value {raw!r}: {exc}") from None
    if file_values:
        raise ConfigError(f"{args.config}: unknown settings: {', '.join(sorted(file_values))}")
    bundles = dict(file_bundles)
    bundles.update(_parse_bundle_flags(args.bundle))
    if values["log_level"] not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"--log-level: unknown level {values['log_level']!r}")
    try:
        Limits(max_file_bytes=values["max_file_bytes"], max_models=values["max_models"],
               max_versions_per_model=values["max_versions_per_model"],
               max_features_per_version=values["max_features_per_version"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"limits: {exc}") from None
    return DaemonConfig(bundles=bundles, config_file=args.config, cleanup=args.cleanup,
                        values=values)


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
