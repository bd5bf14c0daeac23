"""Fuzz target: the bundle parser -- ``parse_bundle`` and ``parse_signature``.

Input: one byte choosing the entry point, then the file's bytes. Only
:class:`~trimmer_daemon.bundle.parse.BundleError` may escape.
"""

from __future__ import annotations

import hashlib

import atheris

with atheris.instrument_imports(include=["trimmer_daemon", "flatbuffers_schema", "fuzz"]):
    from fuzz.harness import Finding, main
    from trimmer_daemon.bundle.parse import BundleError, parse_bundle, parse_signature


def test_one_input(data: bytes) -> None:
    if not data:
        return
    body = data[1:]
    try:
        if data[0] & 1:
            parse_signature(body, path="fuzz/signature.json")
            return
        parsed = parse_bundle(body, path="fuzz/module_info.json")
    except BundleError:
        return
    if parsed.sha256 != hashlib.sha256(body).hexdigest():
        raise Finding("sha256 does not cover the exact bytes")
    if any(not versions for versions in parsed.models.values()):
        raise Finding("a model without versions was accepted")


if __name__ == "__main__":
    main(test_one_input)
