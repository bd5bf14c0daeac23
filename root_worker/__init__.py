"""The readers: everything that runs beside the gunicorn root service, one package per role.

Runs in: see each package. ``app`` (the WSGI app) and ``gunicorn_conf`` (gunicorn's config
hooks) are the thin entry points of the root service (``gunicorn -c
python:root_worker.gunicorn_conf root_worker.app:app``); the packages are

- ``frame``: codec + trim engine (root workers and leaves; numpy only),
- ``featuremap``: the lock-free shared-memory map reader (root workers, ``trimmer-inspect``),
- ``service``: the request path of ``POST /score`` (root workers),
- ``oncall``: ``trimmer-inspect`` (an on-call engineer's shell, monitoring checks),
- ``leaf``: ``trimmer-leaf``, the reference leaf (its own process),
- ``testing``: the harness that runs the whole stack (``make demo``, tests, benchmarks).

May import: the root service (``app``, ``gunicorn_conf``, ``service``) never imports
``leaf``, ``testing``, ``oncall`` or ``trimmer_daemon`` (``tests/test_rooms.py``).
"""
