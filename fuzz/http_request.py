"""Fuzz target: the root's request parser (through :mod:`fuzz.http_adapter`).

Input: cut points and a client byte stream (:func:`fuzz.harness.split`). Only
:data:`~fuzz.http_adapter.REQUEST_ERRORS` may escape, and the stream read in pieces must
give what it gives read whole: the same requests, or an error both ways.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["root_worker", "fuzz"]):
    from fuzz.harness import main, same_in_pieces
    from fuzz.http_adapter import REQUEST_ERRORS, parse_requests

test_one_input = same_in_pieces(parse_requests, REQUEST_ERRORS)

if __name__ == "__main__":
    main(test_one_input)
