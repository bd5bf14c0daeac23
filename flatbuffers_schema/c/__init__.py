"""Data only: ``ft_frame.h``, the single-header C99 frame reader (and name key) for C/C++
leaves, and ``ft_frame_dump.c``, its example program (docs/leaf-sdk.md). A package so that
an installed copy is found with ``importlib.resources.files("flatbuffers_schema.c")``.

Runs in: nothing (no Python code). May import: nothing.
"""
