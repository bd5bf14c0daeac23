"""Constants of the feature-map blob (``feature_map.fbs``) that writer and readers share.

The compiler (:mod:`trimmer_daemon.compiler`) writes them and the map reader
(:mod:`root_worker.featuremap.map_reader`), ``trimmer-inspect`` and the daemon's metrics read
them; ``tests/test_schema.py`` checks them against the ``.fbs`` file.
"""

from __future__ import annotations

from flatbuffers_schema.fmap.BundleState import BundleState

#: ``file_identifier`` of ``feature_map.fbs``: bytes 4..8 of every blob.
FILE_IDENTIFIER = b"FTMP"

#: Bundle states as spelt in logs, metrics labels, ``trimmer-inspect`` and its JSON.
STATE_NAMES: dict[int, str] = {
    BundleState.NeverLoaded: "never_loaded",
    BundleState.Ok: "ok",
    BundleState.Stale: "stale",
    BundleState.Missing: "missing",
}


def state_name(state: int) -> str:
    """The spelling of ``state``; an unknown value (a newer writer) as ``unknown(N)``."""
    return STATE_NAMES.get(state, f"unknown({state})")
