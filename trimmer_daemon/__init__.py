"""The writer: ``trimmer-daemon``, one per host, and the bundle tools.

Runs in: the daemon process (``trimmer-daemon``; ``cli`` -> ``daemon`` main loop with
``watcher``, ``state``, ``consolidate``, ``compiler``, ``publisher``, ``metrics``,
``sdnotify``), and, for ``bundle``, deploy pipelines and the other tools.

May import: ``flatbuffers_schema``, numpy, flatbuffers, posix_ipc, inotify_simple,
prometheus_client. Never ``root_worker``.
"""
