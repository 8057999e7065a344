"""Round trips and rejections of the signed canonical PBFT encoding."""

from __future__ import annotations

import msgpack
import pytest

from dwcp.consensus import ClusterConfig
from dwcp.consensus.messages import (
    Checkpoint,
    Codec,
    Commit,
    FetchState,
    Kind,
    Message,
    NewView,
    Prepare,
    PreparedProof,
    PrePrepare,
    Replies,
    Reply,
    Request,
    State,
    Status,
    StatusQuery,
    ViewChange,
)
from dwcp.errors import AuthenticationError, ConfigError, ProtocolError
from dwcp.identity import NodeKey

RKEYS = [NodeKey(bytes([7, i]) * 16) for i in range(4)]
CKEYS = [NodeKey(bytes([8, i]) * 16) for i in range(2)]


def _config(cluster: bytes = b"c1", version: int = 1) -> ClusterConfig:
    return ClusterConfig(
        cluster,
        tuple(k.public for k in RKEYS),
        tuple(k.public for k in CKEYS),
        protocol_version=version,
        max_message_bytes=1 << 16,
        max_request_bytes=4096,
    )


D = b"\x11" * 32
SAMPLES: list[Message] = [
    Request(5, b"op"),
    PrePrepare(0, 1, (b"r1", b"r2")),
    PrePrepare(3, 9, ()),
    Prepare(1, 2, D),
    Commit(1, 2, D),
    Checkpoint(128, D),
    ViewChange(2, 0, (), (PreparedProof(b"pp", (b"a", b"b")),)),
    NewView(2, (b"vc1", b"vc2", b"vc3"), (b"pp",)),
    Reply(0, 1, 5, b"result"),
    Replies(0, ((1, 5, b"result"), (0, 9, b""))),
    FetchState(7),
    State(8, b"blob", (b"c1", b"c2", b"c3")),
    StatusQuery(b"nonce"),
    Status(b"nonce", 1, 2, 0),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    codec = _config_codec()
    sender = 1
    key = CKEYS[1] if msg.KIND is Kind.REQUEST else RKEYS[1]
    raw = codec.encode(msg, sender, key)
    fresh = Codec(codec.config)  # no cached verification
    s = fresh.open(raw)
    assert s.msg == msg and s.sender == sender and s.kind is msg.KIND
    assert fresh.verifications == 1
    fresh.open(raw)
    assert fresh.verifications == 1  # cached


def _config_codec() -> Codec:
    return Codec(_config())


def test_tampered_body_and_signature_fail() -> None:
    codec = _config_codec()
    raw = codec.encode(Prepare(0, 1, D), 2, RKEYS[2])
    kind, sender, body, sig = msgpack.unpackb(raw)
    for bad in (
        msgpack.packb([kind, sender, Prepare(0, 2, D).body(), sig]),
        msgpack.packb([kind, sender, body, bytes(64)]),
        msgpack.packb([kind, 3, body, sig]),  # claims another sender
        msgpack.packb([int(Kind.COMMIT), sender, body, sig]),  # reinterpreted as COMMIT
    ):
        with pytest.raises(AuthenticationError):
            Codec(codec.config).open(bad)


def test_forged_with_wrong_key() -> None:
    codec = _config_codec()
    raw = codec.encode(Prepare(0, 1, D), 2, RKEYS[3])
    with pytest.raises(AuthenticationError):
        Codec(codec.config).open(raw)


@pytest.mark.parametrize(
    "other", [_config(b"c2"), _config(version=2)], ids=["other-cluster", "other-version"]
)
def test_replay_into_another_cluster_or_version_fails(other: ClusterConfig) -> None:
    raw = _config_codec().encode(Commit(0, 1, D), 1, RKEYS[1])
    with pytest.raises(AuthenticationError):
        Codec(other).open(raw)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"a": 1}),
        msgpack.packb([99, 0, b"", bytes(64)]),  # unknown kind
        msgpack.packb([3, 9, msgpack.packb([0, 1, D]), bytes(64)]),  # unknown sender
        msgpack.packb([3, -1, msgpack.packb([0, 1, D]), bytes(64)]),
        msgpack.packb([3, 0, msgpack.packb([0, 1, D]), bytes(63)]),  # short signature
        msgpack.packb([3, 0, msgpack.packb([0, 1, b"short"]), bytes(64)]),
        msgpack.packb([3, 0, msgpack.packb([0, 1, D, 4]), bytes(64)]),  # extra field
        msgpack.packb([3, 0, msgpack.packb(["0", 1, D]), bytes(64)]),  # str where int
        msgpack.packb([3, 0, msgpack.packb([0, 1.0, D]), bytes(64)]),  # float
        msgpack.packb([3, 0, msgpack.packb([0, 2**64 - 1, D]), bytes(64)]),  # huge int
        msgpack.packb([2, 0, msgpack.packb([0, 0, []]), bytes(64)]),  # seq 0
        msgpack.packb([3, 0, msgpack.packb([0, 1, D]), bytes(64), 5]),  # extra element
    ],
)
def test_malformed_is_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        _config_codec().decode(data)


def test_non_canonical_encoding_rejected() -> None:
    codec = _config_codec()
    body = Prepare(0, 1, D).body()
    # The same integer 0 encoded with a wider msgpack type is not canonical.
    wide = b"\x93\xcd\x00\x00" + body[2:]
    assert msgpack.unpackb(wide) == msgpack.unpackb(body)
    raw = msgpack.packb([int(Kind.PREPARE), 1, wide, bytes(64)])
    with pytest.raises(ProtocolError, match="canonical"):
        codec.decode(raw)
    env = codec.encode(Prepare(0, 1, D), 1, RKEYS[1])
    padded = b"\x94\xcd\x00\x03" + env[2:]  # kind as uint16
    with pytest.raises(ProtocolError):
        codec.decode(padded)


def test_size_caps() -> None:
    codec = _config_codec()
    big = codec.encode(PrePrepare(0, 1, (b"x" * 70000,)), 0, RKEYS[0])
    with pytest.raises(ProtocolError, match="exceeds"):
        codec.decode(big)
    req = codec.encode(Request(1, b"y" * 5000), 0, CKEYS[0])
    with pytest.raises(ProtocolError, match="max_request_bytes"):
        codec.decode(req)


def test_validated_construction() -> None:
    with pytest.raises(ProtocolError):
        Prepare(-1, 1, D)
    with pytest.raises(ProtocolError):
        Commit(0, 1, b"short")
    with pytest.raises(ProtocolError):
        PrePrepare(0, 1, (b"a", b"a"))  # the same request twice
    with pytest.raises(ProtocolError):
        Request(1, "text")  # type: ignore[arg-type]
    assert PrePrepare(0, 1, ()).digest != PrePrepare(0, 1, (b"a",)).digest


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        ClusterConfig(b"c", tuple(k.public for k in RKEYS[:3]), (CKEYS[0].public,))
    with pytest.raises(ConfigError):
        ClusterConfig(
            b"c",
            tuple(k.public for k in RKEYS),
            (CKEYS[0].public,),
            checkpoint_interval=4,
            watermark_window=6,
        )
    cfg = _config()
    assert (cfg.n, cfg.f, cfg.quorum, cfg.weak_quorum, cfg.primary(5)) == (4, 1, 3, 2, 1)
