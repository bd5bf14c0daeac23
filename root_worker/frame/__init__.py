"""Numpy-packed candidate payloads ("frames"): codec and trim engine, public API.

A frame carries, for C candidates, F named feature columns (dense numpy arrays or
:class:`Ragged` lists) plus a JSON metadata object (``request_id`` and whatever the caller
adds).  It is feature-major and 64-byte aligned, so :func:`decode` returns zero-copy numpy
views, and :func:`trim` keeps exactly the columns a model's allowlist names by copying
whole blocks verbatim.  The binary layout, for readers in any language, is specified in
``docs/frame-format.md``.

Runs in: the root workers (they receive frames and call :meth:`Trimmer.trim`, or
:meth:`Trimmer.trim_parts` for ``sendmsg``, once per fan-out target), leaves (they call
:func:`decode`), the test harness and benchmarks.  A
:class:`Trimmer` holds only in-process caches, so creating one before fork is harmless and
each worker warms its own.

May import: numpy, the standard library, :mod:`flatbuffers_schema.keys` and its own modules —
nothing else (``tests/test_frame_imports.py`` runs it with gunicorn, posix_ipc, inotify_simple,
prometheus_client, lz4 and flatbuffers made unimportable), so a leaf needs numpy alone.

Example::

    frame = encode({"ctr": np.zeros(16, np.float32)}, {"request_id": "r1"})
    res = trim(frame, Allowlist.from_names(["ctr"]), out=buffer, check_ragged=True)
    decode(res.data).columns["ctr"]
    sock.sendmsg(Trimmer().trim_parts(frame, allowlist).parts)  # no copy of kept blocks
"""

from __future__ import annotations

from root_worker.frame.backends import BACKENDS
from root_worker.frame.check import check_frame
from root_worker.frame.codec import Column, Frame, Ragged, decode, encode, peek_metadata
from root_worker.frame.format import DTYPE_BY_CODE, FrameError
from root_worker.frame.trim import IOV_MAX, Trimmer, TrimParts, TrimResult, trim

__all__ = [
    "BACKENDS",
    "Column",
    "DTYPE_BY_CODE",
    "Frame",
    "FrameError",
    "IOV_MAX",
    "Ragged",
    "TrimParts",
    "TrimResult",
    "Trimmer",
    "check_frame",
    "decode",
    "encode",
    "peek_metadata",
    "trim",
]
