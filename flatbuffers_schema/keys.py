"""Stable 64-bit keys for feature and model names: a contract shared by every process.

Python's ``hash()`` is salted per process, so the daemon (writer) and the gunicorn workers
(readers) agree on names through this function instead:

    key(name) = little-endian uint64 of BLAKE2b(name.encode("utf-8"), digest_size=8)

Any language can compute it (BLAKE2b is in libsodium, Go's x/crypto, Java's BouncyCastle).
Allowlists are stored in the map blob as sorted ``uint64`` arrays of these keys, so a worker
can test a frame's columns against an allowlist with one vectorised ``np.isin`` and keep
per-worker memory O(models).

A 64-bit collision between two names of one feature universe is improbable (~n^2 / 2^65) but
is detected by the compiler; its only effect is that both columns are kept (over-send, never
under-send).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

KEY_DTYPE = np.dtype("<u8")
_DIGEST_SIZE = 8


def name_key(name: str) -> int:
    """Return the stable 64-bit key of one feature or model name."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=_DIGEST_SIZE).digest()
    return int.from_bytes(digest, "little")


def name_keys(names: Iterable[str]) -> np.ndarray:
    """Return the keys of ``names`` as a ``uint64`` array, in the order given (not sorted)."""
    return np.fromiter((name_key(n) for n in names), dtype=KEY_DTYPE)


def keyset_digest(sorted_keys: np.ndarray) -> int:
    """Return a stable 64-bit identity for a sorted, de-duplicated key array.

    Two allowlists with the same digest are the same set; trim plans are cached by it, so a
    plan survives generation flips that do not change a model's allowlist.
    """
    data = np.ascontiguousarray(sorted_keys, dtype=KEY_DTYPE).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=_DIGEST_SIZE).digest(), "little")


class Allowlist:
    """A feature allowlist as the trim engine consumes it.

    ``keys`` is a sorted, de-duplicated ``uint64`` array of :func:`name_key` values (often a
    zero-copy view on the shared-memory blob); ``digest`` is :func:`keyset_digest` of it and is
    what trim plans are cached by.
    """

    __slots__ = ("keys", "digest")

    def __init__(self, keys: np.ndarray, digest: int) -> None:
        self.keys = keys
        self.digest = digest

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Allowlist:
        keys = np.unique(name_keys(names))
        return cls(keys, keyset_digest(keys))

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def __repr__(self) -> str:
        return f"Allowlist(n={len(self)}, digest={self.digest:#018x})"
