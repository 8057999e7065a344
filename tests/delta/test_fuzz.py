"""The fuzz target over generated inputs: decoders only raise PeerError."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz_decoders import one_input

MAGICS = [b"DF\x01\x01", b"DWCPMAN\x01", b"DWCPMAN\x02", b"DWCPEND\x01"]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    one_input(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MAGICS), st.binary(max_size=512))
def test_valid_magic_then_garbage(magic: bytes, rest: bytes) -> None:
    one_input(magic + rest)


def test_headers_with_extreme_fields() -> None:
    rng = random.Random(0)
    for _ in range(300):
        fields = [rng.choice([0, 1, 2**31 - 1, 2**32 - 1, rng.getrandbits(32)]) for _ in range(6)]
        one_input(b"DF\x01\x01" + struct.pack("<IIIQ", *fields[:3], fields[3]))
        one_input(
            b"DWCPMAN\x01" + struct.pack("<HHIQQ", 1, 0, 4096, fields[4], fields[5]) + bytes(60)
        )
        one_input(
            b"DWCPMAN\x02" + struct.pack("<IQQQ", 4096, fields[4], fields[5], fields[0]) + bytes(60)
        )
