"""Fuzz target: the root's leaf-answer parser (through :mod:`fuzz.http_adapter`).

Input: cut points and a leaf's answer bytes (:func:`fuzz.harness.split`). Only
:data:`~fuzz.http_adapter.RESPONSE_ERRORS` may escape, and the answer read in pieces must
give what it gives read whole: the same status, headers and body. (Whether the connection
is kept may differ: bytes after the answer are seen only when the same read holds them.)
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["root_worker", "fuzz"]):
    from fuzz.harness import main, same_in_pieces
    from fuzz.http_adapter import RESPONSE_ERRORS, parse_response

test_one_input = same_in_pieces(parse_response, RESPONSE_ERRORS,
                                key=lambda m: m and m._replace(keep_alive=None))

if __name__ == "__main__":
    main(test_one_input)
