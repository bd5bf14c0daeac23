"""Build hook for the optional C accelerator; all other metadata lives in setup.cfg (and, for
feature-trimmer-lean, whose lean/setup.py links here, in lean/pyproject.toml)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("root_worker.frame._copyruns", ["root_worker/frame/_copyruns.c"],
                  depends=[f"root_worker/frame/{h}.h" for h in (
                      "_frame_layout", "_copyruns_kernels", "_copyruns_plan",
                      "_copyruns_request", "_copyruns_parts")],
                  optional=True),
    ],
)
