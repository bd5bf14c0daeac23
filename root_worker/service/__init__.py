"""The root service's request path: ``POST /score`` from body to fan-out to answer.

Runs in: the gunicorn root workers (``root_worker.app`` builds it after fork; settings are
validated in the gunicorn master first). ``worker`` is the event-loop gunicorn worker class
(``loop`` its selector loop, ``http1`` the bounded request parser); ``score`` drives a
request; ``targets`` parses what it asks for; ``routing`` maps models to leaves; ``fanout``
talks to leaves (``keepalive``: the one stale-connection retry); ``buffers`` is the capped
per-worker buffer pool; ``settings`` holds every
``FT_*`` setting; ``metrics`` the Prometheus counters.

May import: ``frame``, ``featuremap``, ``flatbuffers_schema`` (the wire contract), gunicorn,
prometheus_client, lz4. Never ``leaf``, ``testing``, ``oncall`` or ``trimmer_daemon``.
"""
