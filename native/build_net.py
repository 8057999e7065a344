"""cffi builder for ``dwcp._net``: batched UDP I/O and the link emulator's forwarding loop.

The cdef is ``net.h`` itself (single source of truth).
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cffi_common import EXTRA_COMPILE_ARGS, read_cdef

ffi = FFI()
ffi.cdef(read_cdef("net.h"))
ffi.set_source(
    "dwcp._net",
    '#include "net.h"',
    sources=["native/net.c"],
    include_dirs=["native"],
    extra_compile_args=EXTRA_COMPILE_ARGS,
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
