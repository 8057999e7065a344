"""Shared helpers for the cffi builders: read a header as the cdef, set flags."""

from __future__ import annotations

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))

EXTRA_COMPILE_ARGS = ["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]


def read_cdef(header: str) -> str:
    """Return the declarations of ``header`` that cffi can parse.

    Preprocessor lines and ``extern "C"`` guards are stripped; everything else
    in the header is the API and goes to ``ffi.cdef`` verbatim.
    """
    with open(os.path.join(HERE, header), encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)
