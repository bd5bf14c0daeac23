"""A whole-frame check at numpy speed: block table and every ragged column's offsets.

Runs in the root workers, once per frame they pass through untrimmed (the service's last
check before a leaf gets it), and anywhere a frame must be validated without decoding its
columns. An untrimmed pass-through is otherwise only peeked (preamble
and metadata); a leaf would then refuse a frame the root could have rejected
(``offsets[0] != 0``, decreasing offsets, an end beyond the block). This check is
vectorised: one gather of every ragged column's ``C + 1`` offsets (blocks are 64-byte
aligned, so the offsets are aligned int64s) and three comparisons -- the trim engine's
:func:`~root_worker.frame.format.check_ragged_offsets`, over every ragged column.

Trimmed outputs are checked by the trim engine itself (``check_ragged=True``, on the kept
columns, in C); this module serves the frames a root passes through untrimmed (unknown model,
no map, shadow mode, a skew re-send), which the engine never walks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from root_worker.frame.codec import as_bytes_view
from root_worker.frame.format import (
    PREAMBLE_SIZE,
    LayoutCache,
    check_ragged_offsets,
    check_table,
    read_preamble,
)

_LAYOUTS = LayoutCache(256)


def check_frame(buf: Any) -> None:
    """Raise :class:`FrameError` naming the column unless every block and every ragged
    column's offsets of ``buf`` are well formed (``0 = o[0] <= o[1] <= ... = n_values``),
    with the words :func:`~root_worker.frame.decode` uses for the same fault."""
    mv = as_bytes_view(buf)
    pre = read_preamble(mv)
    layout = _LAYOUTS.get(pre.hint, pre.n_columns, mv[PREAMBLE_SIZE:pre.layout_end].tobytes())
    if not pre.n_columns:
        return
    table = np.frombuffer(mv, dtype="<u8", count=2 * pre.n_columns,
                          offset=pre.table_offset).reshape(pre.n_columns, 2)
    off, nb = check_table(layout, table, pre.n_candidates, pre.table_end, pre.meta_offset)
    # the trim engine's own check of kept ragged columns, here over every ragged column
    check_ragged_offsets(layout, mv, off, nb, pre.n_candidates, layout.ragged_idx)
