"""Retry once on a stale keep-alive connection: the one rule the root and the harness share.

Runs in each root worker (the leaf client, :mod:`root_worker.service.fanout`) and in the test
and demo client (:mod:`root_worker.testing.client`). A kept-alive connection may have been
closed by the peer while idle (its idle timeout, a restart); the first use then fails before
any answer byte with one of :data:`STALE_ERRORS`. Such a request is retried once on a fresh
connection -- safe because scoring is idempotent. A fresh connection that fails is a real
failure and is never retried.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
STALE_ERRORS: tuple[type[BaseException], ...] = (
    http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
    http.client.BadStatusLine)


class StaleConnection(Exception):
    """Raised by an attempt that reused a kept-alive connection and found it dead."""


def should_retry(exc: BaseException, reused: bool, attempt: int) -> bool:
    """The rule: the first attempt, on a reused connection, failed as a stale one does."""
    return reused and attempt == 0 and isinstance(exc, STALE_ERRORS)


def retry_stale_once(attempt: Callable[[int], T]) -> T:
    """Run ``attempt(0)``; if it raises :class:`StaleConnection`, run ``attempt(1)`` (which
    must use a fresh connection). ``attempt(n)`` raises StaleConnection only when
    :func:`should_retry` says so, with the original error as ``__cause__``."""
    try:
        return attempt(0)
    except StaleConnection:
        return attempt(1)
