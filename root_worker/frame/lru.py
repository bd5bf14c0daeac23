"""The one bounded LRU of the frame package (layouts, trim plans, size plans, C plans).

Runs in whichever process trims or decodes (root workers, leaves).  An :class:`LruCache` is
an ``OrderedDict`` (the C extension reads it with ``PyDict_GetItem``, so a hit from C costs
no Python call; such hits do not refresh the order).  Each method is a few steps that are
each atomic under the GIL, so concurrent callers can interleave without raising: at worst
an entry is evicted early and rebuilt.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LruCache(OrderedDict[K, V]):
    """An ``OrderedDict`` holding at most ``limit`` entries, the least recently used out."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"LRU limit must be at least 1, got {limit}")
        super().__init__()
        self.limit = limit

    def touch(self, key: K) -> None:
        """Mark ``key`` most recently used (no-op if a concurrent caller evicted it)."""
        try:
            self.move_to_end(key)
        except KeyError:
            pass

    def put(self, key: K, value: V) -> None:
        """Insert as most recent, then evict the oldest entries above the limit."""
        self.pop(key, None)
        self[key] = value
        while len(self) > self.limit:
            try:
                self.popitem(last=False)
            except KeyError:  # emptied concurrently
                break
