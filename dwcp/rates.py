"""One rate parser for every command and the config (issue 16), read the way rsync reads
``--bwlimit``.

A bare number is KiB/s on the command line (rsync's unit) and bytes/s for a TOML
integer in node.toml (what that file always meant). Suffixes without ``b`` or with
``B`` are bytes: ``K``/``M``/``G``/``T`` and ``KiB``... are binary (1024), ``KB``,
``MB``... are decimal (1000), as in rsync. A lowercase ``b``, ``bit`` or ``bps`` means
bits with decimal prefixes, as network people write them: ``100mbit``, ``100Mb/s``
= 12,500,000 bytes/s. (``10Mb/s`` used to mean 10 MiB/s, 84 Mbit/s.) ``0`` is no limit.
"""

from __future__ import annotations

import argparse
import re

KIB = 1024
_RE = re.compile(
    r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([kKmMgGtT])(i?))?(B|b|bits?|bps)?(/s|ps)?\s*$"
)
_POW = {"k": 1, "m": 2, "g": 3, "t": 4}

EXAMPLES = "e.g. 500 (KiB/s), 10M (MiB/s), 10MB (10^6 B/s), 100mbit"


def parse_rate(value: str | int | float, *, bare: int = KIB) -> int:
    """Bytes per second from ``value``; ``bare`` is the unit of a number without suffix.

    Raises ValueError with the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a rate ({EXAMPLES}), got a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"expected a rate >= 0, got {value}")
        return int(value * bare)
    m = _RE.match(value)
    if not m:
        raise ValueError(f"expected a rate ({EXAMPLES}), got {value!r}")
    number, prefix, binary, unit, per_s = m.groups()
    n = float(number)
    if unit in ("b", "bit", "bits", "bps"):
        # bits: decimal prefixes (binary only when spelled "Kibit")
        scale = (1024 if binary else 1000) ** _POW[prefix.lower()] if prefix else 1
        return int(n * scale / 8)
    if prefix is None:
        if unit == "B" or per_s:
            return int(n)  # "500B", "500B/s": plain bytes
        return int(n * bare)
    base = 1000 if unit == "B" and not binary else 1024
    return int(n * base ** _POW[prefix.lower()])


def rate_arg(text: str) -> int:
    """argparse ``type=`` for a rate: bytes/s, with the parse error as the usage error."""
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
