"""Shared helpers for the cffi builders: read a header as the cdef, set flags."""

from __future__ import annotations

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))

EXTRA_COMPILE_ARGS = ["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]

# Opt-in CPU baseline, e.g. DWCP_MARCH=x86-64-v3 or native: XXH3 then uses AVX2.
# The default builds for the compiler's generic target so the module runs on any
# CPU of the architecture; results (chunk cut points, fingerprints) never depend on it.
_MARCH = os.environ.get("DWCP_MARCH", "").strip()
if _MARCH:
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", _MARCH):
        raise ValueError(f"DWCP_MARCH={_MARCH!r} is not a valid -march value")
    EXTRA_COMPILE_ARGS.append(f"-march={_MARCH}")


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
