"""The read side of the shared-memory map: attach, verify, resolve — lock-free.

Runs in: every root worker (after fork, in ``post_worker_init``) and ``trimmer-inspect``.
``shm_reader`` maps the control segment and the current generation read-only and verifies
it once; ``map_reader`` resolves model/version lookups on one immutable blob; ``live_map``
follows the generations for a worker.

May import: ``frame`` is not needed; ``flatbuffers_schema`` (layout, generated code, keys),
numpy, flatbuffers, posix_ipc. Never the service, the leaf, the harness or the daemon.
"""
