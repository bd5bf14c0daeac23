"""Build hook for the optional C accelerator; all other metadata lives in setup.cfg."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("root_worker.frame._copyruns", ["root_worker/frame/_copyruns.c"],
                  depends=["root_worker/frame/_frame_layout.h"], optional=True),
    ],
)
