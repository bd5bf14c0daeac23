"""The contracts between the processes, and nothing else.

Runs in: every process (daemon, root workers, leaves, tools). ``feature_map.fbs`` + the
generated ``fmap/`` (the map blob) and ``feature_map`` (its shared constants); ``shm_layout``
(the control block); ``keys`` (stable name keys); ``wire`` (the root <-> leaf HTTP contract);
``settings`` (how a setting is declared and spelt: env, flag, TOML); ``atomic_file`` (how a
file another process reads is replaced).

May import: the standard library; numpy (``keys``) and flatbuffers (the generated code).
Never ``root_worker`` or ``trimmer_daemon``.
"""
