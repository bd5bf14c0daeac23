"""Per-worker byte buffers with a total cap: request bodies and trimmed outputs.

Runs in each root worker. Every large buffer the request path uses comes from one
:class:`BufferPool`: an anonymous ``mmap`` rounded up to a power of two (at least
``MIN_BUFFER``). The pool counts every byte it has handed out *and* every byte it keeps
for reuse against ``cap`` (``FT_MAX_BUFFER_BYTES``); :meth:`BufferPool.take` returns None
rather than exceed it, and the caller answers 503 (a request body) or sends untrimmed (a
trimmed output). Freed buffers are kept for reuse up to half the cap and
:meth:`BufferPool.shrink` (called when the worker is idle) unmaps them all: memory goes back
to the kernel (``munmap``), it does not stay in the allocator's heap.

A request body is *charged* as its bytes arrive, not when its Content-Length is announced:
the worker takes the mapping with ``charge=0`` and calls :meth:`BufferPool.charge` ahead of
each read. A fresh anonymous mapping costs no memory until written, so what the cap counts
is what the worker's memory holds, and a client that only announces a large body holds
nothing healthy requests need.
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

    def take(self, n: int, charge: int | None = None) -> mmap.mmap | None:
        """A writable buffer of at least ``n`` bytes, or None if the cap would be passed.

        ``charge``: the bytes to count now (default: the whole buffer); the rest is counted
        by :meth:`charge` as it is written, and :meth:`give` must be told the total."""
        size = self.size_class(n)
        with self._lock:
            return self._take(size, size if charge is None else charge)

    def _take(self, size: int, charge: int) -> mmap.mmap | None:
        free = self._free.get(size)
        if free:
            buf = free.pop()
            self.kept -= size
        else:
            if self.in_use + self.kept + charge > self.cap:
                self._shrink()
            if self.in_use + charge > self.cap:
                self.refused += 1
                return None
            buf = mmap.mmap(-1, size)
        self.in_use += charge
        self.peak = max(self.peak, self.in_use)
        return buf

    def charge(self, n: int) -> bool:
        """Count ``n`` more bytes of a buffer taken with a partial charge; False (nothing
        counted) if the cap would be passed."""
        with self._lock:
            if self.in_use + self.kept + n > self.cap:
                self._shrink()
            if self.in_use + n > self.cap:
                self.refused += 1
                return False
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
            return True

    def give(self, buf: mmap.mmap, charged: int | None = None, reuse: bool = True) -> None:
        """Give ``buf`` back; ``charged``: what was counted for it (default: its size);
        ``reuse=False``: never hand it out again (someone may still read it)."""
        size = len(buf)
        with self._lock:
            self._give(buf, size, size if charged is None else charged, reuse)

    def _give(self, buf: mmap.mmap, size: int, charged: int, reuse: bool = True) -> None:
        self.in_use -= charged
        if reuse and self.kept + size <= self.cap // 2:
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
