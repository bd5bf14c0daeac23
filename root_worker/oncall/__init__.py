"""``trimmer-inspect``: the on-call engineer's read-only view of a host's map.

Runs in: a shell or a monitoring check (Nagios exit codes), never inside the service.
``cli`` is the entry point; ``state`` reads the control block and judges it; ``diff``
compares bundle files on disk with what is published; ``render`` and ``format`` print.

May import: ``featuremap``, ``flatbuffers_schema`` and the bundle parser
(``trimmer_daemon.bundle``, to read files on disk as the daemon would); never the service.
"""
