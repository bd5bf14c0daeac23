"""Bundle files: parse + validate (``parse``), build (``build``), ``trimmer-bundle`` (``cli``).

Runs in: the daemon (every reload), ``trimmer-bundle build|validate`` in deploy pipelines,
``trimmer-inspect diff`` and the reference leaf (they read files as the daemon does).

May import: the standard library and ``flatbuffers_schema`` (settings, atomic writes) only —
usable without the daemon.
"""
