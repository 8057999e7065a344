"""Make the simulator helpers (``simnet``, ``checker``, ``simcluster``) importable by the tests.

Why: ``tests/`` is not a package; the helpers live next to the tests that use
them, and every test here imports them by their bare module names.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
