"""The frame package imports and works with numpy alone (a leaf in any process can use it).

Runs a real interpreter in which every non-numpy dependency of the project is made
unimportable, then encodes, trims (both backends, contiguous and scatter-gather) and
decodes a frame there.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("gunicorn", "posix_ipc", "inotify_simple", "prometheus_client", "lz4",
             "flatbuffers", "zstandard", "hypothesis")

PROGRAM = textwrap.dedent("""
    import importlib.abc, sys
    FORBIDDEN = {forbidden!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"{{name}} is not available in this test")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    from flatbuffers_schema.keys import Allowlist
    from root_worker.frame import BACKENDS, Ragged, Trimmer, decode, encode
    frame = encode({{"a": np.arange(4.0), "r": Ragged.from_lengths(np.arange(3), [1, 2, 0, 0])}},
                   {{"request_id": "x"}})
    allow = Allowlist.from_names(["r"])
    for backend in BACKENDS:
        t = Trimmer(backend=backend)
        for _ in range(2):
            out = bytes(t.trim(frame, allow, check_ragged=True).data)
            assert b"".join(t.trim_parts(frame, allow).parts) == out
        assert list(decode(out).columns) == ["r"]
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & FORBIDDEN)
    assert not loaded, loaded
    print("ok", BACKENDS)
""")


def test_frame_package_needs_only_numpy() -> None:
    code = PROGRAM.format(forbidden=set(FORBIDDEN))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")
