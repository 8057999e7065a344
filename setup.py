"""Build the C hot paths (cffi, API mode) from ``native/``.

Each ``native/build_*.py`` exposes an ``ffi`` whose cdef is read from the
header next to it, so the headers are the single source of truth.
"""

from setuptools import setup

setup(
    cffi_modules=[
        "native/build_hde.py:ffi",
        "native/build_net.py:ffi",
    ],
)
