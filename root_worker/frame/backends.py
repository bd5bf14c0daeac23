"""Byte-run copy and region compare for the trim engine: C accelerator or numpy fallback.

The optional extension ``root_worker.frame._copyruns`` (built by ``setup.py`` when a
compiler is present) copies an int64 ``(n, 3)`` array of ``(src_offset, dst_offset,
length)`` runs with bounds-checked copies (an AVX-512/AVX2 kernel where the CPU has one),
releasing the GIL for large copies, and runs the trimmer's whole request for any block table
in one call (``plan_trim`` / ``plan_parts`` over opaque ``make_plan`` plans, see
:mod:`root_worker.frame.trim`). Without it, the fallback copies uniform dense frames with
one ``np.take`` over a 2-D row view (one row = one block plus its padding) and anything else
with a slice loop. Measured on a 2-core VM: a Python slice assignment costs ~0.3 us, so ~800
runs take ~300 us in the loop, ~36 us with ``np.take`` on contiguous rows, and ~385 us with
``np.take`` into a *strided* ``out`` (numpy then copies byte by byte) -- hence rows that
include the padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from root_worker.frame.format import TAIL, TAIL_OFFSET

_copyruns: Any
#: Why the C accelerator cannot be imported ("" when it can): what status output quotes.
C_IMPORT_ERROR = ""
try:
    from root_worker.frame import _copyruns  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # pragma: no cover - depends on the build
    _copyruns = None
    C_IMPORT_ERROR = str(exc) or type(exc).__name__

HAVE_C = _copyruns is not None
BACKENDS = ("c", "numpy") if HAVE_C else ("numpy",)
#: The backend a default ``Trimmer()`` serves with: "c" when the extension is built.
BACKEND = BACKENDS[0]


class UniformRows:
    """Fallback copy plan when every kept block has the same size and stride.

    Rows ``rows`` (column indices) of the input's block grid (``stride`` bytes per column
    from ``src_base``) go to consecutive output rows from ``dst_base``; the last kept block
    is copied alone (``last_len`` bytes) because its trailing padding may be absent.
    """

    __slots__ = ("src_base", "dst_base", "stride", "rows", "n_src_rows", "last_src",
                 "last_dst", "last_len")

    def __init__(self, src_base: int, dst_base: int, stride: int, kept: np.ndarray,
                 last_len: int) -> None:
        self.src_base, self.dst_base, self.stride = src_base, dst_base, stride
        self.rows = np.ascontiguousarray(kept[:-1], dtype=np.intp)
        self.n_src_rows = int(kept[-1])
        self.last_src = src_base + int(kept[-1]) * stride
        self.last_dst = dst_base + (kept.size - 1) * stride
        self.last_len = last_len

    def copy(self, dst: memoryview, src: memoryview) -> None:
        if self.rows.size:
            s2 = np.frombuffer(src, np.uint8, count=self.n_src_rows * self.stride,
                               offset=self.src_base).reshape(self.n_src_rows, self.stride)
            d2 = np.frombuffer(dst, np.uint8, count=self.rows.size * self.stride,
                               offset=self.dst_base).reshape(self.rows.size, self.stride)
            np.take(s2, self.rows, axis=0, out=d2, mode="clip")
        dst[self.last_dst:self.last_dst + self.last_len] = \
            src[self.last_src:self.last_src + self.last_len]


def uniform_rows(kept: np.ndarray, src_off: np.ndarray, nbytes: np.ndarray, dst_base: int,
                 block_align: int) -> UniformRows | None:
    """Return a :class:`UniformRows` plan if the kept blocks form a regular grid."""
    if kept.size == 0 or nbytes[0] == 0 or np.any(nbytes != nbytes[0]):
        return None
    size = int(nbytes[0])
    stride = (size + block_align - 1) & ~(block_align - 1)
    base = int(src_off[0]) - int(kept[0]) * stride
    if base < 0 or np.any(src_off != base + kept.astype(np.uint64) * np.uint64(stride)):
        return None
    return UniformRows(base, dst_base, stride, kept, size)


def copy_runs_loop(dst: memoryview, src: memoryview, runs: Sequence[Sequence[int]]) -> None:
    """Pure-Python twin of ``_copyruns.copy_runs``: one slice assignment per run (a memmove
    when ``dst`` and ``src`` view one buffer)."""
    for s, d, n in runs:
        dst[d:d + n] = src[s:s + n]


def write_frame_py(dst: memoryview, src: memoryview, header: bytes | bytearray | memoryview,
                   runs: Sequence[Sequence[int]], meta_off: int, meta_len: int,
                   out_meta: int, uniform: UniformRows | None = None) -> None:
    """Pure-Python twin of ``_copyruns.write_frame``, in its order: the header, the patched
    tail, the blocks (``uniform`` copies them when given, else ``runs``), the metadata.
    (No bounds checks: the caller's plan is valid.)"""
    dst[:len(header)] = header
    TAIL.pack_into(dst, TAIL_OFFSET, out_meta + meta_len, out_meta, meta_len)
    if uniform is not None:
        uniform.copy(dst, src)
    else:
        copy_runs_loop(dst, src, runs)
    dst[out_meta:out_meta + meta_len] = src[meta_off:meta_off + meta_len]


def same_bytes_py(buf: Any, offset: int, expected: bytes) -> bool:
    """``buf[offset:offset + len(expected)] == expected`` via one copy + memcmp.

    (``bytes(view) == other`` costs ~7 us for 100 KB; ``view == other`` ~375 us.)
    """
    end = offset + len(expected)
    if offset < 0 or end > len(buf):
        return False
    return bytes(buf[offset:end]) == expected


write_frame_c: Any = _copyruns.write_frame if HAVE_C else None
same_bytes_c: Any = _copyruns.same_bytes if HAVE_C else None
make_plan_c: Any = _copyruns.make_plan if HAVE_C else None
plan_trim_c: Any = _copyruns.plan_trim if HAVE_C else None
plan_parts_c: Any = _copyruns.plan_parts if HAVE_C else None
trim_entry_c: Any = _copyruns.trim_entry if HAVE_C else None
#: The C copy kernel in use ("avx512", "avx2", "movsb" or "memcpy"), or None without C.
KERNEL: str | None = _copyruns.KERNEL if HAVE_C else None


def describe_backend(backend: str = BACKEND) -> dict[str, str | None]:
    """Which trim backend serves and why, as ``/healthz``, ``/metrics`` and ``trimmer-inspect
    status`` report it: ``{"backend": "c" | "numpy", "reason": ..., "kernel": ...}``, e.g.
    ``reason`` "C accelerator (avx512 copy kernel)" or "numpy: C accelerator not built
    (<the import error>)"."""
    if backend == "c" and HAVE_C:
        return {"backend": "c", "reason": f"C accelerator ({KERNEL} copy kernel)",
                "kernel": KERNEL}
    if HAVE_C:
        reason = "numpy: chosen explicitly (the C accelerator is built)"
    else:
        reason = (f"numpy: C accelerator not built ({C_IMPORT_ERROR}); reinstall with a C "
                  f"compiler (gcc) to build it")
    return {"backend": "numpy", "reason": reason, "kernel": None}
