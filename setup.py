"""Build hook for the optional C accelerator; all other metadata lives in setup.cfg (and, for
feature-trimmer-lean, whose lean/setup.py links here, in lean/pyproject.toml).

Without a working C compiler the install still succeeds: the trim engine falls back to its
numpy backend, and this build says so in a warning (shown by ``pip install -v`` and in build
logs; at run time ``trimmer-inspect status``, ``/healthz`` and ``/metrics`` name the backend
serving and why).
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXTENSION = "root_worker.frame._copyruns"
FALLBACK_WARNING = f"""
******************************************************************************************
WARNING: feature-trimmer's optional C accelerator ({EXTENSION}) was not built:
    {{error}}
The trim engine will use its numpy fallback (same output, slower). To build the
accelerator, install a C compiler (e.g. gcc) and the Python headers, then reinstall.
******************************************************************************************
"""


class BuildOptional(build_ext):
    """build_ext that turns a failed build of the accelerator into a loud warning."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - no compiler at all: still installable
            self._fallback(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - compile or link failure: still installable
            self._fallback(exc)

    @staticmethod
    def _fallback(exc: BaseException) -> None:
        error = " ".join(str(exc).split()) or type(exc).__name__
        sys.stderr.write(FALLBACK_WARNING.format(error=error))
        sys.stderr.flush()


setup(
    ext_modules=[
        Extension(EXTENSION, ["root_worker/frame/_copyruns.c"],
                  depends=[f"root_worker/frame/{h}.h" for h in (
                      "_frame_layout", "_copyruns_kernels", "_copyruns_plan",
                      "_copyruns_request", "_copyruns_parts")],
                  optional=True),
    ],
    cmdclass={"build_ext": BuildOptional},
)
