"""cffi builder for ``dwcp._hde``: the delta engine's per-byte loops (HDE).

The cdef is ``hde.h`` itself (single source of truth). Links the system's
libxxhash (Debian ``libxxhash-dev``) for XXH3-128.
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cffi_common import EXTRA_COMPILE_ARGS, read_cdef

ffi = FFI()
ffi.cdef(read_cdef("hde.h"))
ffi.set_source(
    "dwcp._hde",
    '#include "hde.h"',
    sources=["native/hde.c"],
    include_dirs=["native"],
    libraries=["xxhash"],
    extra_compile_args=EXTRA_COMPILE_ARGS,
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
