"""Property tests of the replica network binding's framing and signed handshake (issue 19).

The handshake frames travel in the shared framing; every property feeds them through
``dwcp.framing.Decoder`` split at arbitrary points, as TCP may deliver them.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwcp import framing
from dwcp.consensus.config import ClusterConfig
from dwcp.consensus.handshake import (
    ROLE_CLIENTS,
    ROLE_REPLICA,
    DialerHandshake,
    ListenerHandshake,
    Peer,
    max_handshake_frame,
)
from dwcp.errors import AuthenticationError, ProtocolError
from dwcp.identity import NodeKey

RKEYS = [NodeKey(bytes([7, i]) * 16) for i in range(4)]
CKEYS = [NodeKey(bytes([8, i]) * 16) for i in range(3)]
CLUSTER = ClusterConfig(b"fuzz", tuple(k.public for k in RKEYS), tuple(k.public for k in CKEYS))
OUTSIDER = NodeKey(b"\x09\x09" * 16)
REJECT = (ProtocolError, AuthenticationError)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _through_framing(frame: bytes, cuts: list[int]) -> bytes:
    """``frame`` encoded, cut into pieces at ``cuts``, decoded again (exactly one frame)."""
    wire = framing.encode(frame)
    dec = framing.Decoder(max_handshake_frame(CLUSTER))
    points = [*sorted({c % (len(wire) + 1) for c in cuts}), len(wire)]
    got: list[bytes] = []
    start = 0
    for p in points:
        got.extend(dec.feed(wire[start:p]))
        start = p
    assert len(got) == 1 and dec.buffered == 0
    return got[0]


def _run(
    dialer: DialerHandshake,
    listener: ListenerHandshake,
    cuts: list[int],
    mutate: tuple[int, int, int] | None = None,
) -> Peer | None:
    """The three handshake frames, optionally one byte of one frame XORed (frame, pos, x)."""

    def wire(i: int, frame: bytes) -> bytes:
        if mutate is not None and mutate[0] == i and frame:
            pos = mutate[1] % len(frame)
            frame = frame[:pos] + bytes([frame[pos] ^ mutate[2]]) + frame[pos + 1 :]
        return _through_framing(frame, cuts)

    challenge = listener.receive(wire(0, dialer.hello()))
    assert challenge is not None
    proof = dialer.receive(wire(1, challenge))
    assert listener.receive(wire(2, proof)) is None
    return listener.peer


@FAST
@given(
    target=st.integers(0, 3),
    me=st.integers(0, 3),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_a_replica_proves_its_key_under_any_split(target: int, me: int, cuts: list[int]) -> None:
    d = DialerHandshake(CLUSTER, [RKEYS[me]], ROLE_REPLICA, target)
    peer = _run(d, ListenerHandshake(CLUSTER, RKEYS[target]), cuts)
    assert peer == Peer(me)


@FAST
@given(
    which=st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_a_client_pool_proves_every_key(which: list[int], cuts: list[int]) -> None:
    keys = [CKEYS[i] for i in which]
    peer = _run(
        DialerHandshake(CLUSTER, keys, ROLE_CLIENTS, 1), ListenerHandshake(CLUSTER, RKEYS[1]), cuts
    )
    assert peer == Peer(None, tuple(k.public.raw for k in keys))


@FAST
@given(
    frame_i=st.integers(0, 2),
    pos=st.integers(0, 10_000),
    xor=st.integers(1, 255),
    role_clients=st.booleans(),
)
def test_any_altered_byte_fails_the_handshake(
    frame_i: int, pos: int, xor: int, role_clients: bool
) -> None:
    """One flipped byte anywhere (nonce, key, signature, role, count) never authenticates."""
    if role_clients:
        d = DialerHandshake(CLUSTER, CKEYS[:2], ROLE_CLIENTS, 0)
    else:
        d = DialerHandshake(CLUSTER, [RKEYS[2]], ROLE_REPLICA, 0)
    with pytest.raises(REJECT):
        _run(d, ListenerHandshake(CLUSTER, RKEYS[0]), [], (frame_i, pos, xor))


@FAST
@given(frames=st.lists(st.binary(max_size=400), min_size=1, max_size=4))
def test_random_frames_never_authenticate(frames: list[bytes]) -> None:
    """A listener fed arbitrary frames rejects with a typed error and admits no one."""
    lst = ListenerHandshake(CLUSTER, RKEYS[0])
    try:
        for f in frames:
            lst.receive(f)
    except REJECT:
        pass
    assert lst.peer is None


@FAST
@given(cuts=st.lists(st.integers(0, 400), max_size=4))
def test_a_proof_is_good_for_its_connection_only(cuts: list[int]) -> None:
    """A recorded PROOF replayed on a new connection (fresh listener nonce) is refused."""
    d = DialerHandshake(CLUSTER, [CKEYS[0]], ROLE_CLIENTS, 0)
    first = ListenerHandshake(CLUSTER, RKEYS[0])
    challenge = first.receive(d.hello())
    assert challenge is not None
    proof = d.receive(challenge)
    second = ListenerHandshake(CLUSTER, RKEYS[0])
    assert second.receive(_through_framing(d.hello(), cuts)) is not None
    with pytest.raises(AuthenticationError):
        second.receive(_through_framing(proof, cuts))


def test_keys_the_cluster_does_not_list_are_refused() -> None:
    for role, key in ((ROLE_CLIENTS, OUTSIDER), (ROLE_REPLICA, OUTSIDER), (ROLE_REPLICA, CKEYS[0])):
        d = DialerHandshake(CLUSTER, [key], role, 0)
        with pytest.raises(AuthenticationError):
            _run(d, ListenerHandshake(CLUSTER, RKEYS[0]), [])


def test_the_dialer_refuses_a_listener_holding_another_key() -> None:
    """A process at replica 0's address with replica 1's key (or any other) is not replica 0."""
    d = DialerHandshake(CLUSTER, [CKEYS[0]], ROLE_CLIENTS, 0)
    with pytest.raises(AuthenticationError):
        _run(d, ListenerHandshake(CLUSTER, RKEYS[1]), [])


@FAST
@given(n=st.integers(max_handshake_frame(CLUSTER) + 1, (1 << 32) - 1), tail=st.binary(max_size=64))
def test_a_declared_length_over_the_handshake_cap_is_refused_unbuffered(
    n: int, tail: bytes
) -> None:
    """Before authentication a frame is at most a PROOF's size: a 16 MiB header is an error
    at once, holding none of what follows (issue 19 item 5)."""
    dec = framing.Decoder(max_handshake_frame(CLUSTER))
    with pytest.raises(ProtocolError):
        list(dec.feed(framing.header(n) + tail))
    assert dec.buffered == 0
