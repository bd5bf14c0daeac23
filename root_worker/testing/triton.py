"""A real NVIDIA Triton server as a leaf: its install, a model repository, the process.

Used by the Triton tests (``tests/test_triton.py``), ``make demo --triton`` and
``bench/e2e_bench.py --triton``; never by the service. The server is the ``tritonserver``
binary that the ``nvidia-pytriton`` wheel bundles, installed in **its own venv** (it pins
``numpy<2``), by default ``<project>/.triton/venv`` (``make triton`` creates it; ``$FT_TRITON_VENV``
names another). :func:`find_install` says whether it is there, or why not.

What running the bundled server takes on a CPU-only machine (each is a silent hang or a
failed model load otherwise):

* a backend directory holding the python backend (``libtriton_python.so``,
  ``triton_python_backend_utils.py``) and the stub built for the venv's Python;
* ``LD_LIBRARY_PATH``: the venv interpreter's own ``LIBDIR`` first (the stub links
  ``libpython3.X.so`` by soname and must get the one matching the venv's stdlib), then the
  wheel's ``nvidia_pytriton.libs`` (else the stub dies on ``libcudart`` and the server stays
  "loading" forever: :meth:`TritonServer.wait_ready` waits with a deadline);
* the venv's ``bin`` first on ``PATH`` (the stub's interpreter then takes the venv's
  site-packages, numpy<2 for ``model.py``) and **no** ``PYTHONPATH``: with the venv's
  site-packages on ``PYTHONPATH`` the stub answers every output tensor empty
  (``binary_data_size: 0``, or a 500 "output tensor shape does not match size" in JSON).

The server binds 127.0.0.1 only, HTTP alone (no gRPC, no metrics port), loads every model
of the repository at start and stops on SIGTERM. Model control is explicit: a new version
directory is served after :meth:`TritonServer.load` (``POST /v2/repository/models/M/load``,
what an operator or a deploy tool does). Not polling: the python backend writes
``__pycache__`` into the version directory, which a poll takes for a change (a reload).

:func:`write_model_repository` writes the repository the tests and the demo use: two
python-backend numpy models whose inputs overlap only in part, so the union frame carries
columns each of them refuses:

============  =====================================================  ===============
model         inputs (per candidate)                                  versions
============  =====================================================  ===============
``tr_ctr``    ``user_dense`` FP32 [8], ``item_ids`` INT64 [4]         1, 2 (all served)
              (ids into an embedding table)
``tr_rank``   ``query_emb`` FP16 [8], ``clicks`` INT32 [1]            1
============  =====================================================  ===============

Each answers one output ``score`` FP32 [1] per candidate; every version computes something
different (its weights are seeded by the version number).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from root_worker.testing.stack import PROJECT_DIR, Proc, StackError, child_env

DEFAULT_VENV = PROJECT_DIR / ".triton" / "venv"
VENV_ENV = "FT_TRITON_VENV"
PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
READY_TIMEOUT = 60.0
"""Seconds the server gets to answer ready with every model loaded (~2 s here)."""
MODELS = ("tr_ctr", "tr_rank")

_PROBE = textwrap.dedent("""\
    import json, os, sys, sysconfig
    import pytriton
    print(json.dumps({"server": os.path.join(os.path.dirname(pytriton.__file__), "tritonserver"),
                      "libdir": sysconfig.get_config_var("LIBDIR"),
                      "site": sysconfig.get_paths()["purelib"],
                      "py": "%d.%d" % sys.version_info[:2]}))
""")


@dataclass(frozen=True)
class TritonInstall:
    """Where the bundled server and what it needs live."""

    venv: Path
    python: Path
    server_dir: Path   # <site-packages>/pytriton/tritonserver
    libdir: str        # the venv interpreter's LIBDIR
    site: str          # the venv's site-packages
    py: str            # "3.11"

    @property
    def binary(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    def env(self) -> dict[str, str]:
        libs = [self.libdir, os.path.join(self.site, "nvidia_pytriton.libs")]
        old = os.environ.get("LD_LIBRARY_PATH")
        env = child_env({"LD_LIBRARY_PATH": ":".join(libs + ([old] if old else []))})
        env.pop("PYTHONPATH", None)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def backend_dir(self, into: Path) -> Path:
        """A backend directory (``python/`` with the backend and this Python's stub)."""
        python = into / "python"
        python.mkdir(parents=True, exist_ok=True)
        src = self.server_dir / "backends" / "python"
        for name, origin in (("libtriton_python.so", src),
                             ("triton_python_backend_utils.py", src),
                             ("triton_python_backend_stub",
                              self.server_dir / "python_backend_stubs" / self.py)):
            dst = python / name
            if not dst.exists():
                dst.write_bytes((origin / name).read_bytes())
                dst.chmod(0o755)
        return into


def venv_path() -> Path:
    return Path(os.environ.get(VENV_ENV) or DEFAULT_VENV)


def find_install(venv: Path | None = None) -> TritonInstall | str:
    """The server install in ``venv`` (default :func:`venv_path`), or why it is unusable."""
    import subprocess

    venv = venv or venv_path()
    python = venv / "bin" / "python"
    if not python.exists():
        return (f"no Triton venv at {venv} (create it with 'make triton', or set "
                f"{VENV_ENV}): {PYTRITON_REQUIREMENT} bundles tritonserver")
    try:
        out = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True,
                             timeout=60, check=True, env=child_env()).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        return f"{python} cannot import pytriton: {exc}"
    info = json.loads(out)
    inst = TritonInstall(venv, python, Path(info["server"]), info["libdir"], info["site"],
                         info["py"])
    if not inst.binary.exists():
        return f"{inst.binary}: missing (is {PYTRITON_REQUIREMENT} installed?)"
    return inst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -------------------------------------------------------------------------------------------
# the model repository

_MODEL_PY = '''\
"""{model} version {version}: a small numpy model (python backend)."""
import numpy as np
import triton_python_backend_utils as pb_utils

VERSION = {version}


class TritonPythonModel:
    def initialize(self, args):
        rng = np.random.default_rng(VERSION)
        self.table = rng.standard_normal((1000, 8)).astype(np.float32)
        self.w = rng.standard_normal(8).astype(np.float32)

    def execute(self, requests):
        out = []
        for r in requests:
{body}
            out.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("score", score.reshape(-1, 1).astype(np.float32))]))
        return out
'''

_BODIES = {
    "tr_ctr": """\
            dense = pb_utils.get_input_tensor_by_name(r, "user_dense").as_numpy()
            ids = pb_utils.get_input_tensor_by_name(r, "item_ids").as_numpy()
            emb = self.table[ids % 1000].mean(axis=1)
            score = (dense * emb).sum(axis=1) + dense @ self.w * VERSION""",
    "tr_rank": """\
            q = pb_utils.get_input_tensor_by_name(r, "query_emb").as_numpy().astype(np.float32)
            clicks = pb_utils.get_input_tensor_by_name(r, "clicks").as_numpy()
            score = q @ self.w + np.log1p(clicks[:, 0].astype(np.float32))""",
}

_CONFIGS = {
    "tr_ctr": """\
backend: "python"
max_batch_size: 256
version_policy: {{ all {{ }} }}
input [
  {{ name: "user_dense" data_type: TYPE_FP32 dims: [ 8 ] }},
  {{ name: "item_ids" data_type: TYPE_INT64 dims: [ 4 ] }}
]
output [ {{ name: "score" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
""",
    "tr_rank": """\
backend: "python"
max_batch_size: {rank_batch}
input [
  {{ name: "query_emb" data_type: TYPE_FP16 dims: [ 8 ] }},
  {{ name: "clicks" data_type: TYPE_INT32 dims: [ 1 ] }}
]
output [ {{ name: "score" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
""",
}
RANK_MAX_BATCH = 64
INPUTS = {"tr_ctr": ("user_dense", "item_ids"), "tr_rank": ("query_emb", "clicks")}


def union_columns(n: int, seed: int = 0, extra: int = 0) -> dict[str, Any]:
    """What a root holds for ``n`` candidates: both models' inputs, ``ctx_unused`` (16
    float32 per candidate, no model uses it) and ``extra`` more unused columns (60% float32
    scalars, 20% float16 embeddings of 16, 20% int64 ids): a union neither model accepts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cols: dict[str, Any] = {
        "user_dense": rng.standard_normal((n, 8)).astype(np.float32),
        "ctx_unused": rng.standard_normal((n, 16)).astype(np.float32),
        "item_ids": rng.integers(0, 5000, (n, 4), dtype=np.int64),
        "query_emb": rng.standard_normal((n, 8)).astype(np.float16),
        "clicks": rng.integers(0, 100, (n, 1), dtype=np.int32)}
    for i in range(extra):
        kind = i % 5
        if kind < 3:
            cols[f"x_f32_{i:05d}"] = rng.standard_normal(n).astype(np.float32)
        elif kind == 3:
            cols[f"x_emb_{i:05d}"] = rng.standard_normal((n, 16)).astype(np.float16)
        else:
            cols[f"x_ids_{i:05d}"] = rng.integers(0, 1 << 40, n, dtype=np.int64)
    return cols


def write_model_repository(repo: Path) -> Path:
    """Write the repository described in the module docstring under ``repo``."""
    for model, versions in (("tr_ctr", (1, 2)), ("tr_rank", (1,))):
        (repo / model).mkdir(parents=True, exist_ok=True)
        (repo / model / "config.pbtxt").write_text(
            _CONFIGS[model].format(rank_batch=RANK_MAX_BATCH))
        for v in versions:
            add_version(repo, model, v)
    return repo


def add_version(repo: Path, model: str, version: int) -> Path:
    """A new version directory of ``model`` (written whole, then renamed into place, so the
    server's repository poll never sees half of it)."""
    final = repo / model / str(version)
    tmp = repo / model / f".tmp-{version}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "model.py").write_text(_MODEL_PY.format(model=model, version=version,
                                                   body=_BODIES[model]))
    tmp.rename(final)
    return final


# -------------------------------------------------------------------------------------------
# the server


class TritonServer(Proc):
    """``tritonserver`` on a loopback port over ``repo`` (see the module docstring)."""

    def __init__(self, inst: TritonInstall, repo: Path, workdir: Path,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.repo = repo
        backends = inst.backend_dir(workdir / "triton-backends")
        cmd = [str(inst.binary), f"--model-repository={repo}",
               f"--backend-directory={backends}", "--http-address=127.0.0.1",
               f"--http-port={self.port}", "--allow-grpc=false", "--allow-metrics=false",
               "--pinned-memory-pool-byte-size=0", "--model-control-mode=explicit",
               "--load-model=*", "--log-verbose=0"]
        super().__init__("tritonserver", cmd, workdir / "tritonserver.log", env=inst.env())

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                body = r.read()
                return r.status, json.loads(body) if body else None
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, None

    def load(self, model: str, timeout: float = READY_TIMEOUT) -> None:
        """(Re)load ``model`` from the repository (new version directories included)."""
        req = urllib.request.Request(f"{self.url}/v2/repository/models/{model}/load",
                                     data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                r.read()
        except urllib.error.HTTPError as exc:
            raise StackError(f"loading {model}: {exc.code} {exc.read()[:300]!r}") from None

    def model_ready(self, model: str, version: str | None = None) -> bool:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
        return self.get(path)[0] == 200

    def wait_ready(self, models: tuple[str, ...] = MODELS, timeout: float = READY_TIMEOUT,
                   versions: tuple[tuple[str, str], ...] = ()) -> TritonServer:
        """Until the server and every model (and model version) answer ready."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if self.get("/v2/health/ready")[0] == 200 and \
                    all(self.model_ready(m) for m in models) and \
                    all(self.model_ready(m, v) for m, v in versions):
                return self
            if time.monotonic() > deadline:
                raise StackError(f"tritonserver not ready after {timeout:g}s; last lines of "
                                 f"{self.log_path}:\n{self.log_tail()}")
            time.sleep(0.1)


def install(venv: Path | None = None) -> Path:
    """Create the server's venv (``make triton``): nothing outside it, nothing cached."""
    import subprocess
    import venv as venv_module

    venv = venv or venv_path()
    if not (venv / "bin" / "python").exists():
        venv_module.EnvBuilder(with_pip=True).create(venv)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--no-cache-dir", PYTRITON_REQUIREMENT], check=True, env=child_env())
    return venv


def main(argv: list[str] | None = None) -> int:
    """``python -m root_worker.testing.triton install | serve REPO``."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help=f"create {DEFAULT_VENV} (or ${VENV_ENV}) with "
                                   f"{PYTRITON_REQUIREMENT}")
    serve = sub.add_parser("serve", help="write the test model repository and serve it")
    serve.add_argument("repo", type=Path, help="model repository to write and serve")
    serve.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "install":
        t0 = time.monotonic()
        print(f"Triton server installed in {install()} in {time.monotonic() - t0:.0f} s")
        return 0
    inst = find_install()
    if isinstance(inst, str):
        print(inst, file=sys.stderr)
        return 1
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop and clean up, as ^C
    write_model_repository(args.repo)
    with tempfile.TemporaryDirectory() as work:
        server = TritonServer(inst, args.repo, Path(work), args.port or None)
        try:
            server.wait_ready()
            print(f"tritonserver ready at {server.url}", flush=True)
            server.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
