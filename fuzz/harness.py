"""What every fuzz target shares: reading cut points off the input, and starting libFuzzer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class Finding(AssertionError):
    """An invariant a target checks does not hold (a finding, like an escaped exception)."""


def split(data: bytes) -> tuple[bytes, list[bytes]]:
    """``data`` read as ``[k][k cut bytes][payload]``: the payload and the payload in pieces
    cut at those offsets (each byte scaled to the payload's length), as TCP reads would."""
    if not data:
        return b"", [b""]
    k = data[0] % 8
    cuts, payload = data[1:1 + k], data[1 + k:]
    n = len(payload)
    at = sorted({c * n // 256 for c in cuts} - {0})
    edges = [0, *at, n]
    return payload, [payload[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def unsplit(payload: bytes) -> bytes:
    """A seed: ``payload`` read back by :func:`split` as one piece."""
    return b"\x00" + payload


def same_in_pieces(parse: Callable[[list[bytes]], Any],
                   errors: tuple[type[BaseException], ...],
                   key: Callable[[Any], object] = lambda result: result
                   ) -> Callable[[bytes], None]:
    """A target: ``parse`` must raise nothing but ``errors``, and give for the payload read in
    pieces what it gives read whole (the same ``key`` of its result, or an error of the same
    type)."""
    def outcome(pieces: list[bytes]) -> tuple[str, object]:
        try:
            return "ok", key(parse(pieces))
        except errors as exc:
            return "error", type(exc).__name__

    def test_one_input(data: bytes) -> None:
        payload, pieces = split(data)
        whole = outcome([payload])
        if len(pieces) > 1:
            cut = outcome(pieces)
            if cut != whole:
                raise Finding(f"read in {len(pieces)} pieces {cut!r:.300} != read whole "
                              f"{whole!r:.300}")
    return test_one_input


def main(test_one_input: Callable[[bytes], None]) -> None:
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
