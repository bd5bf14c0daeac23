"""``trimmer-daemon``: the command-line entry point (see ``trimmer-daemon --help``)."""

from __future__ import annotations

import logging
import os
import sys

from trimmer_daemon.config import ConfigError, build_parser, resolve
from trimmer_daemon.daemon import Daemon, StartupError
from trimmer_daemon.publisher import PublisherLockedError

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_LOCKED = 3
EXIT_STARTUP = 4
"""Any other start-up failure (lock file or control segment unusable, watcher, signals):
one CRITICAL line saying what and where, no traceback."""


class JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority (``<3>``...), which journald parses."""

    PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
                logging.DEBUG: 7}

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{super().format(record)}"


def setup_logging(level: str) -> None:
    """One line per event; under journald no timestamp (it adds its own) but a priority."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve(args)
    except ConfigError as exc:
        print(f"trimmer-daemon: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level)
    if not config.bundles:
        logging.getLogger("trimmer_daemon").warning(
            "no bundles configured (--bundle NAME=PATH or [bundles] in --config): "
            "publishing an empty map")
    try:
        return Daemon(config, reload_config=lambda: resolve(args)).run()
    except PublisherLockedError as exc:
        logging.getLogger("trimmer_daemon").critical("%s", exc)
        return EXIT_LOCKED
    except StartupError as exc:
        logging.getLogger("trimmer_daemon").critical("cannot start: %s", exc)
        return EXIT_STARTUP


if __name__ == "__main__":
    sys.exit(main())
