"""Large images (issue 19, items 1 and 7): no message waits for more than the stream
window, and what an offer makes the destination hold is known, bounded and capped."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dwcp.identity import NodeKey, PublicKey
from dwcp.migrate import QuicChannel
from dwcp.migrate import messages as m
from dwcp.migrate import protocol as p
from dwcp.node.config import Address, Peer
from dwcp.node.sessions import PeerSessions
from dwcp.transport import Channel, Session
from node.cluster import NodeProc, free_udp_port, sha256_file

MiB = 1 << 20
PROBE = Path(__file__).with_name("planprobe.py")


def test_a_message_larger_than_the_stream_window_arrives() -> None:
    """readexactly(n) over QUIC waited for n bytes while credit came only as bytes were
    read: a 4 MiB message (the window is 3.125 MB) never arrived."""
    big = bytes(range(256)) * (4 * MiB // 256 + 7)

    async def main() -> None:
        ka, kb = NodeKey.generate(), NodeKey.generate()
        port = free_udp_port()
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def serve(peer: PublicKey, session: Session, chan: Channel) -> None:
            got.set_result(await QuicChannel(session, chan.reader, chan.writer).recv())

        b = PeerSessions(kb, Address("127.0.0.1", port), lambda: [ka.public])
        b.add_channel_handler("big", serve)
        await b.start()
        a = PeerSessions(ka, Address("127.0.0.1", 0), lambda: [])
        try:
            session = await a.checkout(Peer("b", Address("127.0.0.1", port), kb.public))
            chan = await session.open_channel("big")
            sender = QuicChannel(session, chan.reader, chan.writer)
            sender.limit = len(big)
            await asyncio.wait_for(sender.send(big), 60)
            assert await asyncio.wait_for(got, 60) == big
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def _probe(tmp_path: Path, size: int, block_size: int, data: int) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, str(PROBE), str(size), str(block_size), str(data), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["failed"] == [], out
    return out


def test_an_offer_of_a_20_gb_zero_image_with_512_byte_blocks_is_planned_in_little_memory(
    tmp_path: Path,
) -> None:
    """At 9038843 the 2.4 MB offer of this image made the destination expand 38.5 M
    blocks: its peak RSS went 196 MB -> 2.5 GB (3.0 GB for both sides in one process)."""
    out = _probe(tmp_path, 19_700_000_000, 512, 0)
    assert out["bytes_image"] == 19_700_000_000 and out["bytes_missing"] == 0
    grew = int(out["vm_hwm_after_kib"]) - int(out["vm_hwm_before_kib"])  # type: ignore[call-overload]
    assert grew < 64 * 1024, out


def test_an_offer_of_a_1_tib_sparse_image_is_planned_in_little_memory(tmp_path: Path) -> None:
    out = _probe(tmp_path, 1 << 40, 4096, 64 * MiB)
    assert out["bytes_image"] == 1 << 40 and out["bytes_missing"] == 64 * MiB
    grew = int(out["vm_hwm_after_kib"]) - int(out["vm_hwm_before_kib"])  # type: ignore[call-overload]
    assert grew < 64 * 1024, out


def _offer(key: NodeKey, nonzero: int, size: int = 1 << 40) -> m.Offer:
    from dwcp.delta.manifest import content_id_of

    root = b"r" * 16
    cid = content_id_of(size, 4096, nonzero, root)
    tid = p.transfer_id_for(key.public.raw, "vm", cid, size)
    fields = (tid, "vm", size, 4096, nonzero, 1, 1 << 18, root, cid, b"s" * 32)
    tail = (m.REFUSE, bytes(16), "")
    sig = key.sign(m.Offer(*fields, *tail, bytes(64)).signing_payload())
    return m.Offer(*fields, *tail, sig)


def test_an_offer_needing_more_memory_than_allowed_is_refused() -> None:
    key = NodeKey.generate()
    r = p.Receiver(key.public, max_image_bytes=1 << 50, max_transfer_memory=64 * MiB)
    actions = r.handle(p.MessageReceived(_offer(key, nonzero=1 << 28)))  # 1 TiB of data
    err = actions[0]
    assert isinstance(err, p.SendMessage) and isinstance(err.message, m.Error)
    assert err.message.code == "too_large"
    text = err.message.message
    assert "needs 4107.0 MiB of memory" in text and "[limits] transfer_memory" in text
    ok = p.Receiver(key.public, max_image_bytes=1 << 50, max_transfer_memory=64 * MiB)
    accepted = ok.handle(p.MessageReceived(_offer(key, nonzero=1 << 20)))
    assert isinstance(accepted[0], p.PrepareTransfer)


def test_inconsistent_offer_counts_are_a_protocol_error() -> None:
    key = NodeKey.generate()
    r = p.Receiver(key.public, max_image_bytes=1 << 50)
    bad = _offer(key, nonzero=(1 << 40) // 4096 + 1)  # more non-zero blocks than blocks
    actions = r.handle(p.MessageReceived(bad))
    assert isinstance(actions[-1], p.Failed) and "inconsistent" in str(actions[-1].error)


# --- real nodes ---------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[NodeProc, NodeProc]]:
    a, b = NodeProc(tmp_path, "a"), NodeProc(tmp_path, "b")
    a.trust(b)
    b.trust(a)
    a.start()
    b.start()
    try:
        yield a, b
    finally:
        for n in (a, b):
            if n.proc is not None:
                n.stop()


def test_a_cold_migration_whose_leaves_exceed_the_stream_window(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    """800 MiB of non-zero blocks: 3.2 MB of leaves. At 9038843 the destination waited
    for that one message forever (700 MiB worked). Compressible, so it is quick."""
    a, b = pair
    img = tmp_path / "wide.img"
    with open(img, "wb") as f:
        for i in range(800):
            f.write(bytes([1 + i % 251]) * MiB)
    r = a.cli("migrate", str(img), "--to", "b", "--json", timeout=240)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["bytes_missing"] == 800 * MiB
    assert sha256_file(b.images / "wide.img") == sha256_file(img) == res["sha256"]


def test_the_memory_limit_refuses_an_image_clearly(tmp_path: Path) -> None:
    a, b = NodeProc(tmp_path, "a"), NodeProc(tmp_path, "b")
    text = b.config.read_text().replace("[limits]\n", "[limits]\ntransfer_memory = 65536\n")
    b.config.write_text(text)
    a.trust(b)
    b.trust(a)
    a.start()
    b.start()
    try:
        img = tmp_path / "big.img"
        img.write_bytes(bytes(range(1, 256)) * (64 * MiB // 255))  # 16 Ki blocks: 256 KiB
        r = a.cli("migrate", str(img), "--to", "b", check=False)
        assert r.returncode != 0 and "too_large" in r.stderr and "transfer_memory" in r.stderr
        assert list(b.images.iterdir()) == [] and list(b.partial.iterdir()) == []
    finally:
        a.stop()
        b.stop()
