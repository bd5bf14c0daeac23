"""``trimmer-bundle``: build and validate bundle-level signature files.

``main(argv)`` returns the exit code instead of exiting, so tests call it in-process.
Exit codes: 0 ok, 1 error (invalid file, nothing usable, I/O failure), 2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from flatbuffers_schema import settings as S
from flatbuffers_schema.atomic_file import write_atomic
from trimmer_daemon.bundle.build import (
    ARCHIVE_SUFFIX,
    SIGNATURE_FILE,
    BuildError,
    Source,
    build_bundle,
    promote_bundle,
)
from trimmer_daemon.bundle.parse import (
    DEFAULT_LIMITS,
    BundleError,
    Limits,
    ParsedBundle,
    load_bundle_file,
    read_file_bounded,
)

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_ERROR = 1  # invalid input, nothing usable, I/O failure
EXIT_USAGE = 2  # bad command line (argparse's own convention)

PROG = "trimmer-bundle"

_BUILD_HELP = f"""\
Write one bundle-level signature file from model directories and {ARCHIVE_SUFFIX} archives.

How model name and version are derived:
  MODEL_DIR             <model>/<version>/ : the directory name is the model, each
                        subdirectory a version; its signature is <version>/{SIGNATURE_FILE},
                        else */extra/{SIGNATURE_FILE} inside the single <version>/*.pt
  ARCHIVE.pt            must sit at <model>/<version>/<name>.pt
  --entry M V PATH      explicit model M, version V; PATH is a {SIGNATURE_FILE},
                        a .pt archive or a version directory
  --triton-repo REPO    a Triton model repository: <REPO>/<model>/config.pbtxt (parsed
                        as Triton's ModelConfig protobuf) and the numeric version
                        directories its version_policy serves; the entries also carry
                        each input's datatype and shape and max_batch_size
  --triton-server URL M the versions of model M a live v2 server lists, from its model
                        metadata (and, on Triton, its model config)

A version without a signature is skipped with a warning. A broken signature, a corrupt
archive, or one model+version with two different signatures is an error. Output: models
sorted, versions in natural order ("2" < "10", "v9" < "v10"), sorted keys, indent 2;
written atomically (temp file + fsync + rename), and only if it validates.

Pending versions (--pending, --pending-entry) are merged into the same output, marked
"pending": true, so roots receive the allowlists before the new leaf version rolls out. A
pending version is never a model's "latest" on the roots: a request that names no version
is trimmed for the version its leaf serves (learned from the leaves' answers), and until
that is known, for the union of the current and pending inputs. Once every leaf serves it:
'trimmer-bundle promote FILE'. A version's inputs may differ from the previous version's
(printed as a note); see docs/operations.md, "Rolling out a model version".

Note: --pending takes several values; put positional SOURCEs before it.

exit codes: 0 written, 1 nothing usable or error (output left untouched), 2 usage error
"""

_PROMOTE_HELP = """\
Clear the pending mark of model versions in a bundle file (the last stage of a rollout:
every leaf serves them), or set it again with --demote (a rollback after promotion).

TARGET is MODEL (all its versions) or MODEL@VERSION; no TARGET promotes every pending
version. The file is validated first and written atomically (in place, or to --output);
nothing is written when nothing changes.

exit codes: 0 written or nothing to change, 1 invalid file or unknown target, 2 usage error
"""

_VALIDATE_HELP = """\
Validate bundle files with exactly the parser the daemon uses.

Prints "FILE: ok (N models, M versions, K features)" per valid file (K = distinct
input feature names) and warnings (e.g. duplicate features collapsed) on stderr; for an
invalid file prints "FILE: JSON_PATH: REASON" on stderr. All files are checked.

exit codes: 0 all valid, 1 at least one invalid, 2 usage error
"""


def _limits_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "limits", "The daemon's defaults unless --config names a daemon config file (its\n"
                  "limits then apply, as on that host); single flags override either.")
    group.add_argument("--config", metavar="FILE", help="trimmer-daemon config file (TOML)")
    S.add_arguments(group, Limits)  # the daemon's own flags, from the one declaration
    return parent


def _limits(args: argparse.Namespace) -> Limits:
    """The limits to apply; raises ConfigError for an unusable --config file."""
    limits = DEFAULT_LIMITS
    if args.config is not None:
        from trimmer_daemon.config import load_config  # only needed with --config
        limits = load_config(["--config", args.config]).limits
    return dataclasses.replace(limits, **S.present(Limits, [(vars(args), S.flag_spelling)]))


def _make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Build and validate feature-trimmer bundle signature files.",
        epilog="Run 'trimmer-bundle COMMAND --help' for details.")
    S.add_version_flag(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    limits = _limits_parent()

    build = commands.add_parser(
        "build", help="write a bundle file from model directories / .pt archives",
        description=_BUILD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[limits])
    build.add_argument("-o", "--output", required=True, metavar="FILE",
                       help="bundle file to write (replaced atomically)")
    build.add_argument("sources", nargs="*", metavar="SOURCE",
                       help="model directory (<model>/<version>/...) or "
                            "<model>/<version>/*.pt archive")
    build.add_argument("--pending", nargs="+", action="extend", default=[], metavar="SOURCE",
                       help="pending (not yet rolled out) model directories or archives")
    build.add_argument("--entry", nargs=3, action="append", default=[],
                       metavar=("MODEL", "VERSION", "PATH"),
                       help="explicit model version (repeatable)")
    build.add_argument("--pending-entry", nargs=3, action="append", default=[],
                       metavar=("MODEL", "VERSION", "PATH"),
                       help="explicit pending model version (repeatable)")
    build.add_argument("--triton-repo", action="append", default=[], metavar="REPO",
                       help="a Triton model repository: every <REPO>/<model>/config.pbtxt "
                            "and the versions its version_policy serves, with each input's "
                            "datatype and shape (repeatable; needs feature-trimmer[triton])")
    build.add_argument("--triton-server", nargs=2, action="append", default=[],
                       metavar=("URL", "MODEL"),
                       help="a live v2 server (Triton, KServe): every version of MODEL it "
                            "lists, from GET /v2/models/MODEL/versions/V (repeatable)")
    build.set_defaults(func=_cmd_build, parser=build)

    promote = commands.add_parser(
        "promote", help="clear (or, with --demote, set) the pending mark of versions",
        description=_PROMOTE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[limits])
    promote.add_argument("file", metavar="FILE", help="bundle file to change")
    promote.add_argument("targets", nargs="*", metavar="TARGET",
                         help="MODEL or MODEL@VERSION (default: every pending version)")
    promote.add_argument("--demote", action="store_true",
                         help="mark the targets pending again (rollback)")
    promote.add_argument("-o", "--output", metavar="FILE",
                         help="write here instead of replacing FILE")
    promote.set_defaults(func=_cmd_promote, parser=promote)

    validate = commands.add_parser(
        "validate", help="check bundle files as the daemon would",
        description=_VALIDATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[limits])
    validate.add_argument("files", nargs="+", metavar="FILE", help="bundle file(s) to check")
    validate.add_argument("--json", action="store_true",
                          help="print one JSON document on stdout instead of text")
    validate.set_defaults(func=_cmd_validate, parser=validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trimmer-bundle``; returns the exit code."""
    parser = _make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        args.limits = _limits(args)
    except ValueError as exc:  # ConfigError, or limits the daemon would refuse too
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    code: int = args.func(args)
    return code


# ---------------------------------------------------------------------------------------------
# build


def _sources(args: argparse.Namespace) -> list[Source]:
    sources = [Source(p) for p in args.sources]
    sources += [Source(p, pending=True) for p in args.pending]
    sources += [Source(p, model=m, version=v) for m, v, p in args.entry]
    sources += [Source(p, model=m, version=v, pending=True) for m, v, p in args.pending_entry]
    return sources


def _print_warning(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _cmd_build(args: argparse.Namespace) -> int:
    sources = _sources(args)
    if not sources and not args.triton_repo and not args.triton_server:
        try:
            args.parser.error("no SOURCE given (model directories, archives, --entry, "
                              "--triton-repo or --triton-server)")
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        found = []
        if args.triton_repo or args.triton_server:
            from trimmer_daemon.bundle import triton  # protobuf and tritonclient: only here
            for repo in args.triton_repo:
                found += triton.read_repository(repo, limits=args.limits, warn=_print_warning)
            for url, model in args.triton_server:
                found += triton.read_server(url, model, warn=_print_warning)
        result = build_bundle(sources, limits=args.limits, output_name=args.output,
                              warn=_print_warning, found_elsewhere=found)
    except (BuildError, BundleError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        write_atomic(args.output, result.data)
    except OSError as exc:
        print(f"{PROG}: error: cannot write {args.output}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_ERROR
    for note in result.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    print(f"{args.output}: wrote {result.models} models, {result.versions} versions "
          f"({result.pending_versions} pending)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# promote


def _cmd_promote(args: argparse.Namespace) -> int:
    output = args.output or args.file
    try:
        data = read_file_bounded(args.file, args.limits.max_file_bytes)
        result = promote_bundle(data, args.targets, path=args.file, limits=args.limits,
                                demote=args.demote)
    except (BuildError, BundleError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for warning in result.warnings:
        _print_warning(warning)
    what = "pending again" if args.demote else "promoted"
    if not result.changed and output == args.file:
        print(f"{args.file}: nothing to change (no version {what})")
        return EXIT_OK
    try:
        write_atomic(output, result.data)
    except OSError as exc:
        print(f"{PROG}: error: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{output}: {what}: {', '.join(result.changed) or 'none'}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# validate


def _summary(parsed: ParsedBundle) -> dict[str, object]:
    versions = [mv for mvs in parsed.models.values() for mv in mvs]
    features = {name for mv in versions for name in mv.input_names}
    return {"path": parsed.path, "ok": True, "sha256": parsed.sha256,
            "models": len(parsed.models), "versions": len(versions),
            "features": len(features), "warnings": list(parsed.warnings)}


def _cmd_validate(args: argparse.Namespace) -> int:
    reports: list[dict[str, object]] = []
    for name in args.files:
        try:
            parsed = load_bundle_file(name, limits=args.limits)
        except BundleError as exc:
            print(str(exc), file=sys.stderr)
            reports.append({"path": exc.path, "ok": False, "json_path": exc.json_path,
                            "reason": exc.reason, "error": str(exc)})
            continue
        report = _summary(parsed)
        reports.append(report)
        for warning in parsed.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if not args.json:
            print(f"{name}: ok ({report['models']} models, {report['versions']} versions, "
                  f"{report['features']} features)")
    ok = all(r["ok"] for r in reports)
    if args.json:
        print(json.dumps({"ok": ok, "files": reports}, indent=2, sort_keys=True))
    return EXIT_OK if ok else EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
