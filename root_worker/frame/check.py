"""A whole-frame check at numpy speed: block table and every ragged column's offsets.

Runs in the root workers, once per frame they pass through untrimmed (the service's last
check before a leaf gets it), and anywhere a frame must be validated without decoding its
columns. An untrimmed pass-through is otherwise only peeked (preamble
and metadata); a leaf would then refuse a frame the root could have rejected
(``offsets[0] != 0``, decreasing offsets, an end beyond the block). This check is
vectorised: one gather of every ragged column's ``C + 1`` offsets (blocks are 64-byte
aligned, so the offsets are aligned int64s) and three comparisons.

Trimmed outputs are checked by the trim engine itself (``check_ragged=True``, on the kept
columns, in C); this module serves the frames a root passes through untrimmed (unknown model,
no map, shadow mode, a skew re-send), which the engine never walks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from root_worker.frame.codec import as_bytes_view, decode
from root_worker.frame.format import (
    PREAMBLE_SIZE,
    RAGGED_OFFSET_SIZE,
    FrameError,
    LayoutCache,
    check_table,
    ragged_head,
    read_preamble,
)

_LAYOUTS = LayoutCache(256)


def check_frame(buf: Any) -> None:
    """Raise :class:`FrameError` naming the column unless every block and every ragged
    column's offsets of ``buf`` are well formed (``0 = o[0] <= o[1] <= ... = n_values``)."""
    mv = as_bytes_view(buf)
    pre = read_preamble(mv)
    layout = _LAYOUTS.get(pre.hint, pre.n_columns, mv[PREAMBLE_SIZE:pre.layout_end].tobytes())
    if not pre.n_columns:
        return
    table = np.frombuffer(mv, dtype="<u8", count=2 * pre.n_columns,
                          offset=pre.table_offset).reshape(pre.n_columns, 2)
    off, nb = check_table(layout, table, pre.n_candidates, pre.table_end, pre.meta_offset)
    idx = layout.ragged_idx
    if not idx.size:
        return
    n_cand = pre.n_candidates
    words = np.frombuffer(mv, dtype="<i8", count=len(mv) // RAGGED_OFFSET_SIZE)
    starts = (off[idx] // RAGGED_OFFSET_SIZE).astype(np.int64)
    offsets = words[starts[:, None] + np.arange(n_cand + 1, dtype=np.int64)]
    n_values = ((nb[idx] - np.uint64(ragged_head(n_cand))) //
                layout.elem_size[idx]).astype(np.int64)
    bad_first = offsets[:, 0] != 0
    bad_down = (offsets[:, 1:] < offsets[:, :-1]).any(axis=1) if n_cand else bad_first & False
    bad_end = offsets[:, -1] != n_values
    bad = bad_first | bad_down | bad_end
    if bad.any():  # word the error with the codec's own checks (the slow path)
        decode(mv)
        k = int(np.argmax(bad))
        raise FrameError(f"{layout.label(int(idx[k]))}: malformed ragged offsets")
