"""The BBR-style controller on a simulated drop-tail bottleneck: fills the pipe, shrugs off
random loss, keeps the queue short, and shares the link between connections without overflow.

Everything is simulated time (a deterministic event loop over packets), so no assertion
depends on the machine's speed.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch

from dwcp.transport import bbr
from dwcp.transport.bbr import BbrCongestionControl

MSS = 1452
RATE = 100e6 / 8  # bytes/s
RTT = 0.05
BDP = RATE * RTT


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


@dataclass
class Flow:
    cc: BbrCongestionControl = field(
        default_factory=lambda: BbrCongestionControl(max_datagram_size=MSS)
    )
    next_pn: int = 0
    next_send: float = 0.0
    outstanding: dict[int, QuicSentPacket] = field(default_factory=dict)
    delivered: list[tuple[float, int]] = field(default_factory=list)
    gains: set[float] = field(default_factory=set)


@dataclass
class Result:
    flows: list[Flow]
    queue_drops: list[float]  # times

    def goodput(self, start: float, end: float) -> float:
        total = sum(b for f in self.flows for t, b in f.delivered if start <= t < end)
        return total / (end - start)

    def drops(self, start: float) -> int:
        return sum(1 for t in self.queue_drops if t >= start)


def _simulate(
    *,
    flows: int = 1,
    loss: float = 0.0,
    seconds: float = 6.0,
    queue: float = BDP,
    rate: float = RATE,
    rtt: float = RTT,
    resume: tuple[float, float] | None = None,
    ack_every: float = 0.0,
    ack_hold: float = 0.0,
) -> Result:
    """Paced senders through one drop-tail bottleneck (``queue`` bytes) and ``RTT``.

    Each flow sends when its pacer and its window allow; the bottleneck serialises
    packets at ``RATE``; random loss drops packets before the queue; a packet is
    declared lost once a packet sent 3 after it is acknowledged (QUIC's threshold).
    ``ack_every`` > 0: the receiver acknowledges only on ticks that far apart (aioquic
    acks 1 ms after the first unacknowledged packet), so ACKs arrive in clumps.
    """
    rng = random.Random(1)
    bbr.restart_phase_stagger()  # the same cycle phases whatever ran before in the process
    fl = [Flow() for _ in range(flows)]
    if resume is not None:
        for f in fl:
            f.cc.careful_resume(*resume)
    if ack_hold > 0:
        for f in fl:
            f.cc.on_rtt_measurement(now=0.0, rtt=rtt)
            f.cc.ack_delay = ack_hold
    acks: list[tuple[float, int, int]] = []  # (arrival time, flow, packet number)
    link_free = 0.0
    drops: list[float] = []
    t = 0.0
    while t < seconds:
        # Next event: an ACK arriving, or the earliest flow allowed to send.
        senders = [
            (max(f.next_send, t), i)
            for i, f in enumerate(fl)
            if f.cc.bytes_in_flight + MSS <= f.cc.congestion_window
        ]
        next_send = min(senders) if senders else (float("inf"), -1)
        if acks and acks[0][0] <= next_send[0]:
            t, i, pn = heapq.heappop(acks)
            f = fl[i]
            packet = f.outstanding.pop(pn, None)
            if packet is None:
                continue
            f.cc.on_packet_acked(now=t, packet=packet)
            assert packet.sent_time is not None
            f.cc.on_rtt_measurement(now=t, rtt=t - packet.sent_time)
            f.delivered.append((t, MSS))
            lost = [p for n, p in f.outstanding.items() if n < pn - 3]
            for p in lost:
                del f.outstanding[p.packet_number]
            if lost:
                f.cc.on_packets_lost(now=t, packets=lost)
            continue
        t, i = next_send
        if i < 0:
            break
        f = fl[i]
        packet = _packet(f.next_pn, t)
        f.next_pn += 1
        f.cc.on_packet_sent(packet=packet)
        f.outstanding[packet.packet_number] = packet
        f.gains.add(f.cc.pacing_gain)
        pace = f.cc.pacing_rate or f.cc.congestion_window / rtt
        f.next_send = t + MSS / pace
        if rng.random() < loss:
            continue
        start = max(t, link_free)
        if (start - t) * rate > queue:
            drops.append(t)
            continue
        link_free = start + MSS / rate
        acked = link_free + rtt
        if ack_every > 0:
            at_receiver = link_free + rtt / 2
            acked = (at_receiver // ack_every + 1) * ack_every + rtt / 2
        heapq.heappush(acks, (acked + ack_hold, i, packet.packet_number))
    return Result(fl, drops)


def test_fills_the_pipe_with_a_short_queue() -> None:
    res = _simulate()
    assert res.goodput(2.0, 6.0) > 0.95 * RATE
    assert res.drops(2.0) == 0  # after startup the sender never overflows a 1-BDP queue
    cc = res.flows[0].cc
    assert 0.9 * RATE < cc.bandwidth <= 1.01 * RATE
    assert abs(cc.min_rtt - RTT) < 0.01 * RTT
    assert cc.mode == bbr.PROBE_BW


def test_fills_a_sub_millisecond_path_whose_receiver_acks_every_millisecond() -> None:
    """Loopback or a datacenter: RTT 0.25 ms, but the receiver acknowledges once per
    ms, so a window of 2 x bandwidth x min-RTT (under 4 packets) cannot cover one ACK
    interval and the estimate spirals down to what that window delivers (measured:
    14 Mbit/s on loopback where Reno ran at 56). The send-quantum budget fixes it."""
    rate = 200e6 / 8
    res = _simulate(seconds=2.0, rate=rate, rtt=0.00025, queue=rate * 0.005, ack_every=0.001)
    assert res.goodput(1.0, 2.0) > 0.9 * rate


def test_the_ack_delay_the_peer_reports_is_not_a_queue() -> None:
    """A receiver that holds ACKs (and says so, as QUIC's ACK delay) adds to every RTT
    sample; taken as a standing queue, it scaled the estimate down every cycle."""
    res = _simulate(seconds=4.0, rtt=0.01, ack_hold=0.01)
    assert res.goodput(2.0, 4.0) > 0.9 * RATE
    assert res.flows[0].cc.bw_scale == 1.0


def test_probe_bw_cycles_its_pacing_gain() -> None:
    res = _simulate(seconds=3.0)
    assert {1.25, 0.75, 1.0} <= res.flows[0].gains
    assert bbr.STARTUP_GAIN in res.flows[0].gains


def test_random_loss_does_not_collapse_the_rate() -> None:
    res = _simulate(loss=0.01)
    assert res.goodput(2.0, 6.0) > 0.9 * RATE
    assert res.drops(2.0) == 0


def test_two_connections_share_without_overflowing_the_queue() -> None:
    res = _simulate(flows=2, loss=0.005, seconds=8.0)
    assert res.goodput(3.0, 8.0) > 0.9 * RATE
    # Queue overflow after startup stays a small fraction of the packets sent. Two
    # BBR v1 flows each probing at 1.25x with a 2-BDP cap do overflow a 1-BDP queue
    # now and then (Hock et al., ICNP'17): 0-0.8% of the packets over the six
    # possible phase offsets of the two cycles (0.002 held only for one of them,
    # which an earlier test's connection count happened to pick).
    assert res.drops(3.0) < 0.01 * 5.0 * RATE / MSS
    shares = [sum(b for t, b in f.delivered if t >= 3.0) for f in res.flows]
    assert min(shares) > 0.2 * sum(shares)


def test_delivery_rate_ignores_ack_bursts() -> None:
    """Packets sent at R and acked all at once later must not make the estimate exceed R."""
    cc = BbrCongestionControl(max_datagram_size=MSS)
    rate = 1e6  # bytes/s
    cc.on_rtt_measurement(now=0.0, rtt=RTT)
    for rnd in range(5):
        base = rnd * 0.2
        packets = [_packet(rnd * 100 + k, base + k * MSS / rate) for k in range(100)]
        for p in packets:
            cc.on_packet_sent(packet=p)
        burst_at = base + 100 * MSS / rate + RTT  # every ACK arrives in one burst
        for p in packets:
            cc.on_packet_acked(now=burst_at, packet=p)
    assert 0 < cc.bandwidth <= 1.01 * rate


def test_min_rtt_expires_without_probe_rtt() -> None:
    cc = BbrCongestionControl(max_datagram_size=MSS)
    cc.on_rtt_measurement(now=0.0, rtt=0.05)
    cc.on_rtt_measurement(now=1.0, rtt=0.08)
    assert cc.min_rtt == 0.05
    cc.on_rtt_measurement(now=1.0 + bbr.MIN_RTT_WINDOW, rtt=0.08)
    assert cc.min_rtt == 0.08  # the path got longer: the old minimum aged out


def test_persistent_congestion_restarts_small() -> None:
    res = _simulate(seconds=1.0)
    cc = res.flows[0].cc
    cc.on_persistent_congestion()
    assert cc.congestion_window <= 10 * MSS
    assert cc.bandwidth == 0.0
    assert cc.mode == bbr.STARTUP


def _messages(cc: BbrCongestionControl, rounds: int, *, t0: float, pn0: int, rtt: float) -> float:
    """An app-limited sender: one 2-packet message per round trip, each acked after ``rtt``."""
    t = t0
    for r in range(rounds):
        packets = [_packet(pn0 + 2 * r + k, t + k * 1e-4) for k in range(2)]
        for p in packets:
            cc.on_packet_sent(packet=p)
        cc.mark_app_limited()  # nothing more to send
        t += rtt
        cc.on_rtt_measurement(now=t, rtt=rtt)
        for p in packets:
            cc.on_packet_acked(now=t, packet=p)
        t += 0.01
    return t


def test_an_app_limited_sender_stays_in_startup_and_paces_at_least_the_initial_window() -> None:
    """A receiver answering with small messages while the other direction's data queues
    its RTT samples: neither its message rate nor that queue may become its model."""
    cc = BbrCongestionControl(max_datagram_size=MSS)
    cc.on_rtt_measurement(now=0.0, rtt=RTT)
    _messages(cc, 30, t0=0.0, pn0=0, rtt=2.5 * RTT)  # queued behind the reverse data
    assert cc.mode == bbr.STARTUP
    assert cc.pacing_rate >= bbr.STARTUP_GAIN * 10 * MSS / RTT


def test_app_limited_samples_neither_lower_nor_age_a_measured_estimate() -> None:
    res = _simulate(seconds=3.0, loss=0.0)
    cc = res.flows[0].cc
    measured = cc.bandwidth
    assert cc.mode == bbr.PROBE_BW and measured > 0.8 * RATE
    _messages(cc, 3 * bbr.BW_ROUNDS, t0=4.0, pn0=10**6, rtt=RTT)
    assert cc.bandwidth >= 0.99 * measured


def test_a_connection_is_app_limited_only_when_the_application_has_nothing_more() -> None:
    """Lanes are kept short, so a bulk sender's buffers run empty between chunks: that is
    not app-limited while its writer still has data (else STARTUP never sees its queue)."""
    from aioquic.quic.configuration import QuicConfiguration

    from dwcp.transport.quic import DwcpQuicConnection

    def marked(has_more: bool) -> bool:
        conf = QuicConfiguration(is_client=True, congestion_control_algorithm="dwcp-bbr")
        conn = DwcpQuicConnection(configuration=conf, trusted=[])
        conn.app_has_more = lambda: has_more
        conn.connect(("127.0.0.1", 9), now=0.0)
        conn.datagrams_to_send(0.0)  # the handshake; no stream holds data
        assert conn._bbr is not None
        return conn._bbr._app_limited_until > 0

    assert marked(has_more=False)
    assert not marked(has_more=True)


# --- careful resume (dwcp.transport.resume) -------------------------------------------


def _first_time(res: Result, share: float, rate: float = RATE, step: float = 0.05) -> float:
    """The start of the first ``step`` interval whose goodput reached ``share`` x rate."""
    t = 0.0
    while t < 6.0:
        if res.goodput(t, t + step) >= share * rate:
            return t
        t += step
    return float("inf")


def test_careful_resume_reaches_the_rate_sooner_and_is_validated() -> None:
    cold = _simulate(seconds=3.0)
    warm = _simulate(seconds=3.0, resume=(0.9 * RATE, RTT))
    cc = warm.flows[0].cc
    assert cc.resume is not None and cc.resume.validated and cc.resume.phase == "normal"
    t_cold, t_warm = _first_time(cold, 0.85), _first_time(warm, 0.85)
    assert t_warm < t_cold
    assert warm.goodput(1.0, 3.0) > 0.95 * RATE  # still fills the pipe after validating
    assert warm.drops(0.0) <= cold.drops(0.0)  # and overflows the queue no more than cold


def test_careful_resume_finds_a_faster_path_than_stored() -> None:
    res = _simulate(seconds=4.0, resume=(0.3 * RATE, RTT))
    assert res.flows[0].cc.resume is not None and res.flows[0].cc.resume.validated
    assert res.goodput(2.0, 4.0) > 0.95 * RATE


def test_careful_resume_retreats_when_the_path_got_slower() -> None:
    """Stored 100 Mbit/s, the link now carries 20: the jump overflows the queue, the
    controller retreats to what was delivered and the queue stops overflowing."""
    slow = RATE / 5
    res = _simulate(seconds=5.0, rate=slow, queue=slow * RTT, resume=(0.9 * RATE, RTT))
    cc = res.flows[0].cc
    assert cc.resume is not None and cc.resume.phase == "retreat" and not cc.resume.validated
    assert cc.bandwidth < 1.1 * slow
    assert res.drops(2.0) == 0
    assert res.goodput(2.0, 5.0) > 0.9 * slow


def test_careful_resume_retreats_on_a_queue_without_loss() -> None:
    """A deep buffer hides the overshoot from loss; the RTT growth shows it."""
    slow = RATE / 4
    res = _simulate(seconds=4.0, rate=slow, queue=20 * slow * RTT, resume=(0.9 * RATE, RTT))
    cc = res.flows[0].cc
    assert cc.resume is not None and cc.resume.phase == "retreat"
    assert "queue" in cc.resume.reason or "lost" in cc.resume.reason
    assert cc.bandwidth < 1.1 * slow


def test_careful_resume_skips_a_path_with_another_rtt() -> None:
    """The stored path had 5 ms; this one has 50: not the same path, no jump at all."""
    res = _simulate(seconds=2.0, resume=(0.9 * RATE, 0.005))
    cc = res.flows[0].cc
    assert cc.resume is not None and cc.resume.phase == "normal"
    assert not cc.resume.validated and "rtt" in cc.resume.reason
    assert bbr.STARTUP_GAIN in res.flows[0].gains  # a cold startup


def test_careful_resume_ignores_random_loss() -> None:
    res = _simulate(seconds=3.0, loss=0.005, resume=(0.9 * RATE, RTT))
    cc = res.flows[0].cc
    assert cc.resume is not None and cc.resume.validated
    assert res.goodput(1.0, 3.0) > 0.9 * RATE
