"""Fuzz target: the frame codec -- :func:`decode`, :func:`peek_metadata`, :func:`check_frame`.

Input: frame bytes. Only :class:`~root_worker.frame.FrameError` may escape any of the three,
and they agree: a frame ``decode`` accepts passes ``check_frame``, and ``peek_metadata``
gives its metadata.
"""

from __future__ import annotations

from typing import Any

import atheris

with atheris.instrument_imports(include=["root_worker", "fuzz"]):
    from fuzz.harness import Finding, main
    from root_worker.frame import FrameError, check_frame, decode, peek_metadata


def _try(fn: Any, data: bytes) -> Any:
    try:
        return fn(data)
    except FrameError:
        return FrameError


def test_one_input(data: bytes) -> None:
    frame = _try(decode, data)
    meta = _try(peek_metadata, data)
    checked = _try(check_frame, data)
    if frame is FrameError:
        return
    if checked is FrameError:
        raise Finding("check_frame refuses a frame decode accepts")
    if meta != frame.metadata:
        raise Finding(f"peek_metadata {meta!r:.200} != decode's {frame.metadata!r:.200}")


if __name__ == "__main__":
    main(test_one_input)
