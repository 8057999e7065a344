"""The BBR-style controller on a simulated bottleneck: fills the pipe, shrugs off random loss."""

from __future__ import annotations

import random

from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch

from dwcp.transport.bbr import BbrCongestionControl

MSS = 1452


def _packet(n: int, t: float) -> QuicSentPacket:
    return QuicSentPacket(
        epoch=Epoch.ONE_RTT,
        in_flight=True,
        is_ack_eliciting=True,
        is_crypto_packet=False,
        packet_number=n,
        packet_type=0,  # type: ignore[arg-type]
        sent_time=t,
        sent_bytes=MSS,
    )


def _simulate(loss: float, rounds: int = 60) -> tuple[BbrCongestionControl, float]:
    """A fluid bottleneck of ``rate`` with ``rtt`` propagation; returns cc and mean goodput."""
    rate, rtt = 100e6 / 8, 0.05  # 100 Mbit/s, 50 ms: BDP = 625 kB
    cc = BbrCongestionControl(max_datagram_size=MSS)
    rng = random.Random(1)
    t, n, delivered = 0.0, 0, 0
    for _ in range(rounds):
        count = max(1, cc.congestion_window // MSS)
        packets = [_packet(n + i, t) for i in range(count)]
        n += count
        for p in packets:
            cc.on_packet_sent(packet=p)
        # The bottleneck serialises the round; acks come back one RTT after each departure.
        lost = []
        for i, p in enumerate(packets):
            ack_time = t + rtt + (i + 1) * MSS / rate
            if rng.random() < loss:
                lost.append(p)
                continue
            cc.on_rtt_measurement(now=ack_time, rtt=ack_time - t - i * MSS / rate / 2)
            cc.on_packet_acked(now=ack_time, packet=p)
            delivered += MSS
        if lost:
            cc.on_packets_lost(now=t + rtt, packets=lost)
        t += max(rtt, count * MSS / rate)
    return cc, delivered / t


def test_fills_the_pipe_without_loss() -> None:
    cc, goodput = _simulate(loss=0.0)
    bdp = 100e6 / 8 * 0.05
    assert cc.congestion_window >= bdp
    assert goodput > 0.8 * 100e6 / 8
    assert cc.bytes_in_flight == 0


def test_random_loss_does_not_collapse_the_window() -> None:
    cc, goodput = _simulate(loss=0.01)
    assert cc.congestion_window >= 100e6 / 8 * 0.05
    assert goodput > 0.75 * 100e6 / 8


def test_persistent_congestion_restarts_small() -> None:
    cc, _ = _simulate(loss=0.0, rounds=20)
    cc.on_persistent_congestion()
    assert cc.congestion_window <= 10 * MSS
    assert cc.bandwidth == 0.0
