"""Per-worker byte buffers with a total cap: request bodies and trimmed outputs.

Runs in each root worker. Every large buffer the request path uses comes from one
:class:`BufferPool`: an anonymous ``mmap`` rounded up to a power of two (at least
``MIN_BUFFER``). The pool counts every byte it has handed out *and* every byte it keeps
for reuse against ``cap`` (``FT_MAX_BUFFER_BYTES``); :meth:`BufferPool.take` returns None
rather than exceed it, and the caller answers 503 (a request body) or sends untrimmed (a
trimmed output). Freed buffers are kept for reuse up to half the cap and
:meth:`BufferPool.shrink` (called when the worker is idle) unmaps them all: memory goes back
to the kernel (``munmap``), it does not stay in the allocator's heap.
"""

from __future__ import annotations

import mmap
import threading

MIN_BUFFER = 64 << 10


class BufferPool:
    """Size-classed anonymous mappings under one byte cap (one pool per worker, one thread)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.in_use = 0          # bytes handed out and not yet given back
        self.kept = 0            # bytes of free buffers kept for reuse
        self.refused = 0         # take() calls answered None (a metric)
        self.peak = 0
        self._free: dict[int, list[mmap.mmap]] = {}
        self._lock = threading.Lock()  # the WSGI path under a threaded worker shares it

    @staticmethod
    def size_class(n: int) -> int:
        return max(MIN_BUFFER, 1 << max(0, n - 1).bit_length())

    def take(self, n: int) -> mmap.mmap | None:
        """A writable buffer of at least ``n`` bytes, or None if the cap would be passed."""
        size = self.size_class(n)
        with self._lock:
            return self._take(size)

    def _take(self, size: int) -> mmap.mmap | None:
        free = self._free.get(size)
        if free:
            buf = free.pop()
            self.kept -= size
        else:
            if self.in_use + self.kept + size > self.cap:
                self._shrink()
            if self.in_use + size > self.cap:
                self.refused += 1
                return None
            buf = mmap.mmap(-1, size)
        self.in_use += size
        self.peak = max(self.peak, self.in_use)
        return buf

    def give(self, buf: mmap.mmap) -> None:
        size = len(buf)
        with self._lock:
            self._give(buf, size)

    def _give(self, buf: mmap.mmap, size: int) -> None:
        self.in_use -= size
        if self.kept + size <= self.cap // 2:
            self._free.setdefault(size, []).append(buf)
            self.kept += size
        else:
            _unmap(buf)

    def shrink(self) -> None:
        """Unmap every kept buffer."""
        with self._lock:
            self._shrink()

    def _shrink(self) -> None:
        for bufs in self._free.values():
            for buf in bufs:
                _unmap(buf)
        self._free.clear()
        self.kept = 0


def _unmap(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:  # a memoryview still exports it: the last release unmaps it
        pass
