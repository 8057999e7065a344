"""A session on a known path over loopback: who resumes what, and when the level opens."""

from __future__ import annotations

import asyncio

from dwcp.transport import Session, TransportConfig, connect, serve

from .helpers import run, two_keys

RATE = 80e6


def test_a_known_path_opens_its_level_at_connect_and_jumps_once_for_the_session() -> None:
    """Before any bulk byte, the session's three connections come up; the first resumes
    the whole stored rate and, together, the connections never jump above it."""
    a, b = two_keys()
    cold = TransportConfig(idle_timeout=10.0, policy="fixed")

    async def echo(_session: Session, body: bytes) -> bytes:
        return body

    async def main() -> None:
        server = await serve("127.0.0.1", 0, a, [b.public], config=cold, on_request=echo)
        try:
            probe = await connect(*server.address, b, [a.public], config=cold)
            await probe.request(b"rtt")
            rtt = max(probe.stats().rtt_ms / 1000, 1e-4)  # loopback's, as a history has it
            await probe.close()
            warm = TransportConfig(
                idle_timeout=10.0,
                policy="fixed",
                initial_connections=3,
                resume_bps=RATE,
                resume_rtt=rtt,
            )
            session = await connect(*server.address, b, [a.public], config=warm)
            try:
                async with asyncio.timeout(15):  # a deadline on the wait, not a threshold
                    while len(session.conns) < 3:
                        await asyncio.sleep(0.01)
                assert session.stats().bulk_bytes_acked == 0  # no transfer opened them
                states = [c.quic.resume_state for c in session.conns]
                assert states[0] is not None and states[0]["rate_bps"] == RATE
                jumped = [
                    float(s["rate_bps"])
                    for s in states
                    if s is not None and not str(s["reason"]).startswith("rtt ")
                ]
                assert sum(jumped) <= RATE
            finally:
                await session.close()
        finally:
            server.close()
            await server.wait_closed()

    run(main(), timeout=60)
