"""Fault injection for the tests of fault isolation: off unless ``FT_TEST_FAULTS=1``.

Runs in each root worker. With ``FT_TEST_FAULTS=1`` in the worker's environment, a request
carrying the header ``X-FT-Test-Fault: <phase>`` raises :class:`InjectedFault` at that phase
of its own handling (``head``, ``body``, ``dispatch``, ``trim``, ``leaf_answer``, ``write``),
so a test can show against a real pool that an unexpected exception costs only that
connection or that target. Without the variable :func:`check` is one attribute test.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENABLED = os.environ.get("FT_TEST_FAULTS") == "1"
HEADER = "x-ft-test-fault"
PHASES = ("head", "body", "dispatch", "trim", "leaf_answer", "write")


class InjectedFault(RuntimeError):
    """The exception a test asked for (never raised unless FT_TEST_FAULTS=1)."""


def phase_of(headers: Mapping[str, str]) -> str | None:
    """The phase a request asks to fail at, or None (always None unless enabled)."""
    return headers.get(HEADER) if ENABLED else None


def check(phase: str | None, here: str) -> None:
    if phase == here:
        raise InjectedFault(f"injected fault at {here} (FT_TEST_FAULTS)")
