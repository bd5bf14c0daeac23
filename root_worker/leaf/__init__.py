"""``trimmer-leaf``: the reference leaf partition (demo, tests, benchmarks).

Runs in: its own process (``trimmer-leaf`` or ``python -m root_worker.leaf``). ``server`` is
the HTTP server, ``model`` the deterministic scoring model.

May import: ``frame``, ``flatbuffers_schema`` (the wire contract), the bundle parser; never
the root service, the harness or the map reader.
"""
