"""``trimmer-inspect``: the on-call view of the feature map a host serves (read-only).

Runs as its own short-lived process, on the host of the daemon and the root workers (as
root or as a member of the segments' group). It never writes, creates, locks or unlinks
shared memory: everything goes through the workers' own read-only reader. ``main(argv)``
returns the exit code instead of exiting, so tests call it in-process.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import posix_ipc

from flatbuffers_schema.settings import add_version_flag
from flatbuffers_schema.shm_layout import DEFAULT_SHM_NAME, validate_prefix
from root_worker.featuremap.map_reader import FeatureMapView, MapError
from root_worker.oncall import format as fmt
from root_worker.oncall import render as render
from root_worker.oncall.diff import IN_SYNC, diff_bundles
from root_worker.oncall.state import Level, MapState, Thresholds, evaluate, read_state
from trimmer_daemon.bundle.parse import DEFAULT_LIMITS, Limits
from trimmer_daemon.config import ConfigError, load_config

__all__ = ["EXIT_CRITICAL", "EXIT_OK", "EXIT_UNKNOWN", "EXIT_WARNING", "main"]

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_CRITICAL = 2
EXIT_UNKNOWN = 3  # bad command line or configuration: the check itself could not run

PROG = "trimmer-inspect"
SHM_ENV = "FT_SHM_NAME"

_EPILOG = """\
exit codes (monitoring-plugin convention; the first line of `status` is the check summary):
  0  OK        status: map published and verified, daemon alive, heartbeat fresh, every
               bundle ok.  diff: every file equals what is served.  models/lookup/dump:
               the map was read.
  1  WARNING   status: a bundle is stale or missing (last-known-good served), the daemon is not
               running, the heartbeat is older than --heartbeat-warn, the map is older
               than --age-warn, or no bundle is configured.  Workers still trim with the
               last good map.  diff: at least one file differs from what is served.
  2  CRITICAL  every verb: no map was ever published, the control segment is unreadable,
               the blob fails its checksum or is not a feature map (workers pass requests
               through untrimmed, or keep an older generation).  status also: heartbeat
               older than --heartbeat-crit, map older than --age-crit, a bundle never
               loaded (init-time failure: its models pass through untrimmed).
  3  UNKNOWN   bad command line or unreadable --config: the check did not run.

Durations: 500ms, 5s, 2m, 1h, 1d or a number of seconds; 0 or "off" disables a threshold.
Runbook: docs/operations.md.
"""


#: What reading a checksum-valid but malformed FlatBuffers blob can raise (map_reader wraps
#: these in MapError on the hot path only).
_CORRUPT = (MapError, struct.error, IndexError, TypeError, UnicodeDecodeError, OverflowError)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: error: {message}")


def _duration(text: str) -> float:
    try:
        return fmt.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    default = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    parser.add_argument("--shm-name", default=default(None), metavar="NAME",
                        help=f"shared-memory prefix the daemon publishes under (default: "
                             f"${SHM_ENV}, else {DEFAULT_SHM_NAME})")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print one JSON document instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Inspect the feature-trimmer map in shared memory "
                                 "(read-only; usable as a monitoring check).")
    _common(parser, top=True)
    add_version_flag(parser)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True,
                                  parser_class=_Parser)
    p = verbs.add_parser("status", help="health check: generation, ages, daemon, bundles",
                         epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heartbeat-warn", type=_duration, default=5.0, metavar="DURATION",
                   help="WARNING when the last daemon heartbeat is older (default: 5s)")
    p.add_argument("--heartbeat-crit", type=_duration, default=30.0, metavar="DURATION",
                   help="CRITICAL when the last daemon heartbeat is older (default: 30s)")
    p.add_argument("--age-warn", type=_duration, default=0.0, metavar="DURATION",
                   help="WARNING when the map was published longer ago (default: off; the "
                        "daemon only publishes on change)")
    p.add_argument("--age-crit", type=_duration, default=0.0, metavar="DURATION",
                   help="CRITICAL when the map was published longer ago (default: off)")
    p.add_argument("--liveness", action="store_true",
                   help="count only what restarting the daemon can fix (no map, an "
                        "unreadable or corrupt map, a stale heartbeat); bundle states are "
                        "listed but never change the exit code: a liveness probe that "
                        "restarts the daemon for a bad bundle file would loop and lose "
                        "last-known-good content")
    p = verbs.add_parser("models", help="models, versions, allowlist sizes, source bundles")
    p.add_argument("pattern", nargs="?", default="*", metavar="PATTERN",
                   help="only models whose name matches this glob (default: all)")
    p = verbs.add_parser("lookup", help="which allowlist applies to MODEL [VERSION], and why")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("version", nargs="?", default=None, metavar="VERSION")
    p.add_argument("--features", action="store_true", help="list the allowlist's feature names")
    p.add_argument("--root", action="append", default=[], metavar="URL",
                   help="a root pool (http://HOST:PORT, repeatable): also show the version "
                        "each of its workers learned that each leaf endpoint serves, and the "
                        "allowlist a request naming no version gets there")
    p = verbs.add_parser("diff", help="bundle files on disk vs. what is published")
    p.add_argument("--config", metavar="FILE",
                   help="the daemon's TOML config: also compare the configured bundle list "
                        "and use its --max-* limits")
    p.add_argument("--models", action="store_true",
                   help="also list model/version differences of each valid file")
    p = verbs.add_parser("dump", help="the whole map as JSON")
    p.add_argument("--no-features", action="store_true",
                   help="leave out the feature names of each allowlist")
    for sub in verbs.choices.values():
        _common(sub, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; return its exit code (see ``trimmer-inspect --help``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_UNKNOWN
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    prefix = args.shm_name or os.environ.get(SHM_ENV) or DEFAULT_SHM_NAME
    try:
        validate_prefix(prefix)
    except ValueError as exc:
        print(f"{PROG}: error: --shm-name: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    try:
        state = read_state(prefix)
        return int(_VERBS[args.verb](state, args))
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_UNKNOWN
    except BrokenPipeError:  # `trimmer-inspect dump | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (OSError, posix_ipc.Error) as exc:
        return _critical(args, prefix, "shm_unreadable",
                         f"cannot read shared memory {prefix!r}: {exc}")
    except _CORRUPT as exc:  # a verified blob whose FlatBuffers offsets are still wrong
        return _critical(args, prefix, "map_corrupt", f"the published map {prefix!r} is "
                                                      f"corrupt: {type(exc).__name__}: {exc}")


def _critical(args: argparse.Namespace, prefix: str, code: str, message: str) -> int:
    """A verb that could not run: the message on stderr, or with ``--json`` the envelope
    every verb prints (status, exit code, one finding) on stdout, so a consumer of
    ``--json`` always gets a document."""
    if args.json:
        state = MapState(prefix, time.time_ns())
        state.add(Level.CRITICAL, code, message)
        render.print_json(render.envelope(state))
    else:
        print(f"CRITICAL: {message}", file=sys.stderr)
    return EXIT_CRITICAL


# -- verbs ------------------------------------------------------------------------------------

def cmd_status(state: MapState, args: argparse.Namespace) -> Level:
    evaluate(state, Thresholds(args.heartbeat_warn, args.heartbeat_crit, args.age_warn,
                               args.age_crit, liveness=args.liveness))
    if args.json:
        doc = render.envelope(state)
        doc.update(render.status_facts(state))
        doc["thresholds_s"] = {"heartbeat_warn": args.heartbeat_warn,
                               "heartbeat_crit": args.heartbeat_crit,
                               "age_warn": args.age_warn, "age_crit": args.age_crit}
        render.print_json(doc)
        return state.level
    print(render.summary(state))
    facts = render.status_lines(state)
    if facts:
        print(fmt.key_values(facts))
    if state.view is not None:
        print()
        print(render.bundle_table(state.view, state.now_ns))
    if state.findings:
        print()
        print(fmt.table(["LEVEL", "CODE", "MESSAGE"],
                        [(f.level.name if f.level else "NOTE", f.code, f.message)
                         for f in state.findings]))
    return state.level


def cmd_models(state: MapState, args: argparse.Namespace) -> Level:
    view = _need_view(state, args)
    if view is None:
        return state.level
    models = [m for m in view.models() if fnmatch.fnmatchcase(m["name"], args.pattern)]
    if args.json:
        doc = render.envelope(state)
        doc.update(generation=view.generation, models=models)
        render.print_json(doc)
        return state.level
    rows = []
    for m in models:
        for v in m["versions"]:
            rows.append((m["name"], v["version"], v["version"] == m["latest"], v["pending"],
                         v["features"], ",".join(v["bundles"]), v["conflict"]))
    if rows:
        print(fmt.table(["MODEL", "VERSION", "LATEST", "PENDING", "FEATURES", "BUNDLES",
                         "CONFLICT"], rows))
    print(f"{len(models)} models, {len(rows)} versions (generation {view.generation})"
          + ("" if args.pattern == "*" else f" matching {args.pattern!r}"))
    return state.level


def cmd_lookup(state: MapState, args: argparse.Namespace) -> Level:
    view = _need_view(state, args, model=args.model, version=args.version)
    if view is None:
        return state.level
    res = view.resolve(args.model, args.version)
    info = next((m for m in view.models() if m["name"] == args.model), None)
    vinfo = next((v for v in info["versions"] if v["version"] == res.version), None) \
        if info else None
    names = sorted(view.feature_names(res.allowlist.keys)) if res.allowlist is not None \
        else None
    doc: dict[str, Any] = {
        "model": args.model, "requested_version": args.version, "outcome": res.outcome.value,
        "trims": res.trims, "version": res.version, "explanation": res.explain(),
        "latest": info["latest"] if info else None,
        "known_versions": [v["version"] for v in info["versions"]] if info else [],
        "pending_versions": list(res.pending),
        "features": len(names) if names is not None else None,
        "digest": vinfo["digest"] if vinfo else None,
        "bundles": vinfo["bundles"] if vinfo else [],
        "conflict": vinfo["conflict"] if vinfo else False, "generation": view.generation}
    if res.pending and args.version is None:  # what a leaf of unknown version gets
        doc["unknown_leaf_features"] = len(view.resolve_rollout(args.model).allowlist or ())
    if args.root:
        doc["leaf_versions"], errors = _learned(view, args.model, args.root)
        if errors:
            doc["leaf_versions_errors"] = errors
    if args.json:
        if args.features:
            doc["feature_names"] = names
        render.print_json({**render.envelope(state), **doc})
        return state.level
    print(res.explain())
    learned = doc.pop("leaf_versions", None)
    print(fmt.key_values([(k, render.show(v)) for k, v in doc.items() if k != "explanation"]))
    if learned:
        print()
        print(fmt.table(["ROOT", "PID", "LEAF", "SERVES", "GETS", "FEATURES"],
                        [(x["root"], x["pid"], x["endpoint"], x["version"], x["outcome"],
                          x["features"]) for x in learned]))
    if args.features and names is not None:
        print()
        print("\n".join(names))
    return state.level


def cmd_diff(state: MapState, args: argparse.Namespace) -> Level:
    view = _need_view(state, args)
    if view is None:
        return state.level
    limits, configured = _daemon_config(args.config)
    diffs = diff_bundles(view, limits=limits, configured=configured, models=args.models)
    for d in diffs:
        if d.status != IN_SYNC or d.models:
            state.add(Level.WARNING, f"diff_{d.status}", f"bundle {d.name!r}: {d.status}")
    if args.json:
        doc = render.envelope(state)
        doc.update(generation=view.generation, bundles=[d.to_dict() for d in diffs])
        render.print_json(doc)
        return state.level
    print(render.diff_text(diffs))
    changed = sum(1 for d in diffs if d.status != IN_SYNC or d.models)
    print(f"{len(diffs)} bundles, {changed} differ from generation {view.generation}")
    return state.level


def cmd_dump(state: MapState, args: argparse.Namespace) -> Level:
    view = _need_view(state, args)
    if view is None:
        return state.level
    doc = render.envelope(state)
    doc.update(render.status_facts(state))
    doc["map"] = view.to_dict(with_features=not args.no_features)
    render.print_json(doc)
    return state.level


_VERBS = {"status": cmd_status, "models": cmd_models, "lookup": cmd_lookup, "diff": cmd_diff,
          "dump": cmd_dump}


# -- helpers ----------------------------------------------------------------------------------

def _learned(view: FeatureMapView, model: str, roots: list[str]
             ) -> tuple[list[dict[str, Any]], list[str]]:
    """Per root worker and leaf endpoint: the version learned and what a version-less
    request to it gets (``trimmed`` for that version; ``rollout union`` while that version
    takes part in a rollout; or untrimmed when no bundle lists it)."""
    from root_worker.oncall.learned import LearnedError, learned_versions
    from root_worker.service.leafversions import in_rollout

    rows, errors = [], []
    rollout = view.resolve_rollout(model)
    for root in roots:
        try:
            found = learned_versions(root, model)
        except LearnedError as exc:
            errors.append(str(exc))
            print(f"WARNING: {exc}", file=sys.stderr)
            continue
        for x in found:
            union = in_rollout(rollout, x.version)
            res = rollout if union else view.resolve(model, x.version)
            known = res.outcome.value == "trimmed"
            rows.append({"root": x.root, "pid": x.pid, "endpoint": x.endpoint,
                         "version": x.version,
                         "outcome": "rollout union" if union else "trimmed" if known else
                         "untrimmed (not in the map)",
                         "features": len(res.allowlist) if known and res.allowlist is not None
                         else None})
    return rows, errors


def _need_view(state: MapState, args: argparse.Namespace, **extra: Any) -> FeatureMapView | None:
    """The map, or (after reporting why there is none: CRITICAL) ``None``."""
    if state.view is not None:
        return state.view
    if args.json:
        doc = render.envelope(state)
        if "model" in extra:
            doc.update(extra, outcome="passthrough_no_map", trims=False,
                       explanation="no usable map: requests pass through untrimmed")
        render.print_json(doc)
    else:
        for f in state.findings:
            print(f"{f.level.name}: {f.message}", file=sys.stderr)
    return None


def _daemon_config(path: str | None) -> tuple[Limits, dict[str, str] | None]:
    if path is None:
        return DEFAULT_LIMITS, None
    try:
        config = load_config(["--config", path])
    except ConfigError as exc:
        raise _UsageError(f"{PROG}: --config: {exc}") from None
    return config.limits, dict(config.bundles)


if __name__ == "__main__":
    sys.exit(main())
