"""The harness: the whole stack on loopback, for ``make demo``, the tests and benchmarks.

Runs in: a developer's shell (``make demo``, ``make run``), pytest and ``bench/``. ``stack``
starts and stops daemon, leaves and gunicorn pools as real processes; ``workload`` makes
frames and bundles; ``client`` talks to a root; ``demo`` is ``make demo``/``make run``.

May import: anything in the project (it runs every process); nothing imports it but tests,
benchmarks and the demo.
"""
