"""The link emulator: its loss/queue model in isolation, and real namespaces when root."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from dwcp.errors import UsageError
from dwcp.identity import NodeKey
from dwcp.netemu import (
    Direction,
    Link,
    Shaper,
    Verdict,
    direction_seed,
    has_netem,
    unavailable_reason,
)
from dwcp.netemu.netns import PREFIX, list_ns

BULK_PEER = os.path.join(os.path.dirname(__file__), "netemu", "bulk_peer.py")
# The check: 1 GiB through the lossy link (88 s on a quiet machine with the BBR-style
# controller; 635 s before it). DWCP_NETEMU_BULK_BYTES=67108864 gives a quick local run.
BULK_BYTES = int(os.environ.get("DWCP_NETEMU_BULK_BYTES", 1 << 30))
BULK_TIMEOUT = 120 + BULK_BYTES * 8 / 5e6  # bounded, assuming at least 5 Mbit/s

# --- the model (no devices needed) -----------------------------------------


def _losses(loss: float, seed: int, n: int) -> list[int]:
    shaper = Shaper(Direction(rate_bps=0, delay_ms=0, loss=loss), seed)
    return [i for i in range(n) if shaper.admit(i, 100).verdict is Verdict.LOST]


def test_loss_rate_matches_configuration() -> None:
    n, p = 200_000, 0.01
    lost = len(_losses(p, seed=7, n=n))
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(lost - n * p) < 5 * sigma


def test_loss_pattern_is_reproducible_per_seed() -> None:
    assert _losses(0.05, seed=3, n=5000) == _losses(0.05, seed=3, n=5000)
    assert _losses(0.05, seed=3, n=5000) != _losses(0.05, seed=4, n=5000)


def test_loss_extremes() -> None:
    assert _losses(0.0, seed=1, n=1000) == []
    assert len(_losses(1.0, seed=1, n=1000)) == 1000


def test_delay_without_rate_limit() -> None:
    shaper = Shaper(Direction(rate_bps=0, delay_ms=25), seed=1)
    d = shaper.admit(1_000, 1500)
    assert d.verdict is Verdict.PASS
    assert d.deliver_ns == 1_000 + 25_000_000


def test_queue_is_drop_tail_and_drains_at_the_rate() -> None:
    # 8 Mbit/s = 1 byte/us; the queue holds 10 packets of 1000 bytes.
    shaper = Shaper(Direction(rate_bps=8e6, delay_ms=10, queue_bytes=10_000), seed=1)
    burst = [shaper.admit(0, 1000) for _ in range(20)]
    verdicts = [d.verdict for d in burst]
    assert verdicts == [Verdict.PASS] * 10 + [Verdict.QUEUE_FULL] * 10
    # Each packet leaves the bottleneck 1 ms after the previous one, then waits the delay.
    assert [d.deliver_ns for d in burst[:10]] == [
        (k + 1) * 1_000_000 + 10_000_000 for k in range(10)
    ]
    assert [d.backlog_bytes for d in burst[:10]] == [k * 1000 for k in range(10)]
    # After 4.5 ms, 4.5 packets have drained: room for exactly 4 more.
    later = [shaper.admit(4_500_000, 1000).verdict for _ in range(6)]
    assert later == [Verdict.PASS] * 4 + [Verdict.QUEUE_FULL] * 2


def test_lost_packets_do_not_use_the_queue() -> None:
    shaper = Shaper(Direction(rate_bps=8e6, delay_ms=0, loss=1.0, queue_bytes=2000), seed=1)
    assert {shaper.admit(0, 1000).verdict for _ in range(10)} == {Verdict.LOST}


def test_bad_parameters_are_refused() -> None:
    for kw in ({"loss": 1.5}, {"delay_ms": -1}, {"rate_bps": -5}, {"queue_bytes": 10}):
        with pytest.raises(UsageError):
            Direction(**kw)
    with pytest.raises(UsageError):
        Direction(queue_bytes=100_000, queue_ms=10)


def test_default_queue_is_one_round_trip_bdp() -> None:
    assert Direction(rate_bps=100e6, delay_ms=25).queue_limit == 625_000
    assert Direction(rate_bps=100e6, delay_ms=25, queue_ms=10).queue_limit == 125_000
    assert Direction(rate_bps=1e6, delay_ms=1).queue_limit == 64 * 1500


# --- real namespaces ---------------------------------------------------------

_REASON = unavailable_reason()
netns = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

UDP_SENDER = textwrap.dedent(
    """
    import socket, sys
    dst, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(n):
        s.sendto(i.to_bytes(4, "big") * (size // 4), (dst, 9))
    """
)


def _ours() -> set[str]:
    return {n for n in list_ns() if n.startswith(f"{PREFIX}-{os.getpid()}-")}


@pytest.mark.netns
@netns
def test_namespaces_are_built_and_torn_down() -> None:
    before = _ours()
    with Link(rate_bps=10e6, delay_ms=1, backend="tun") as link:
        assert {link.ns_a, link.ns_b} <= set(list_ns())
        assert link.run_in_a(["ip", "-4", "addr"], capture_output=True, text=True).stdout.count(
            link.addr_a
        )
        sleeper = link.popen_b(["sleep", "60"])
    assert _ours() == before
    assert sleeper.poll() is not None
    assert link._if_a not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout


@pytest.mark.netns
@netns
def test_teardown_on_exception() -> None:
    before = _ours()
    with pytest.raises(RuntimeError), Link(rate_bps=10e6, delay_ms=1) as link:
        names = {link.ns_a, link.ns_b}
        raise RuntimeError("boom")
    assert not names & set(list_ns())
    assert _ours() == before


@pytest.mark.netns
@netns
def test_teardown_on_sigterm() -> None:
    code = textwrap.dedent(
        """
        import sys, time
        from dwcp.netemu import Link
        with Link(rate_bps=10e6, delay_ms=1) as link:
            print(link.ns_a, link.ns_b, flush=True)
            time.sleep(60)
        """
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None
        names = p.stdout.readline().split()
        assert len(names) == 2 and set(names) <= set(list_ns())
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    assert not set(names) & set(list_ns())


@pytest.mark.netns
@netns
def test_ping_shows_the_configured_delay() -> None:
    with Link(rate_bps=10e6, delay_ms=20, backend="tun") as link:
        out = link.run_in_a(
            ["ping", "-c", "3", "-i", "0.2", "-W", "5", link.addr_b], capture_output=True, text=True
        ).stdout
        stats = link.stats()
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
    assert len(rtts) == 3, out
    assert min(rtts) >= 40.0
    assert stats.ab.tx_packets == stats.ba.tx_packets == 3


@pytest.mark.netns
@netns
def test_link_loss_follows_the_seeded_model() -> None:
    n, loss, seed = 3000, 0.02, 11
    with Link(rate_bps=0, delay_ms=1, loss=loss, seed=seed, backend="tun") as link:
        cp = link.run_in_a([sys.executable, "-c", UDP_SENDER, link.addr_b, str(n), "200"])
        assert cp.returncode == 0
        ab = link.stats().ab
    expected = len(_losses(loss, direction_seed(seed, "ab"), n))
    assert ab.rx_packets == n
    assert ab.lost == expected
    assert ab.queue_drops == ab.overflow_drops == 0


@pytest.mark.netns
@netns
def test_one_process_can_hold_both_ends() -> None:
    with Link(rate_bps=0, delay_ms=1, backend="tun") as link:
        with link.enter("b"):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rx.bind((link.addr_b, 9000))  # addr_b exists only inside namespace b
        with link.enter("a"):
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with rx, tx:
            tx.sendto(b"across", (link.addr_b, 9000))
            rx.settimeout(10)
            data, (host, _) = rx.recvfrom(100)
        assert (data, host) == (b"across", link.addr_a)
        assert link.stats().ab.tx_packets == 1
    # This thread is back home, where addr_b does not exist.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(OSError):
        s.bind((link.addr_b, 0))


@pytest.mark.netns
@netns
def test_link_queue_drops_at_the_tail() -> None:
    limit = 10_000
    with Link(rate_bps=1e6, delay_ms=1, queue_bytes=limit, backend="tun") as link:
        link.run_in_a([sys.executable, "-c", UDP_SENDER, link.addr_b, "100", "972"])
        ab = link.stats().ab
    assert ab.rx_packets == 100
    assert ab.queue_drops > 0
    assert ab.max_queue_bytes <= limit


@pytest.mark.netns
@pytest.mark.skipif(not has_netem(), reason="this kernel has no netem qdisc")
def test_netem_backend_applies_the_delay() -> None:
    with Link(rate_bps=10e6, delay_ms=20, backend="netem") as link:
        out = link.run_in_a(
            ["ping", "-c", "3", "-i", "0.2", "-W", "5", link.addr_b], capture_output=True, text=True
        ).stdout
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
    assert len(rtts) == 3 and min(rtts) >= 40.0, out


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.timeout(BULK_TIMEOUT + 120)
@netns
@pytest.mark.skipif(
    importlib.util.find_spec("dwcp.transport.api") is None, reason="dwcp.transport not there"
)
def test_bulk_transfer_through_a_lossy_link_arrives_intact(tmp_path: os.PathLike[str]) -> None:
    ka, kb = os.path.join(tmp_path, "a.key"), os.path.join(tmp_path, "b.key")
    NodeKey.generate().save(ka)
    NodeKey.generate().save(kb)
    rate, delay_ms = 500e6, 5.0
    with Link(rate_bps=rate, delay_ms=delay_ms, loss=0.005, seed=3, backend="tun") as link:
        peer = [sys.executable, BULK_PEER]
        server = link.popen_b(
            [*peer, "server", link.addr_b, "7000", kb, ka + ".pub"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        sizes = [str(BULK_BYTES), str(rate), str(2 * delay_ms / 1000)]
        client = link.run_in_a(
            [*peer, "client", link.addr_b, "7000", ka, kb + ".pub", *sizes],
            capture_output=True,
            text=True,
            timeout=BULK_TIMEOUT,
        )
        assert client.returncode == 0, client.stderr[-3000:]
        out, _ = server.communicate(timeout=60)
        lost = link.stats().ab.lost
    sent = json.loads(client.stdout.strip().splitlines()[-1])
    received = json.loads(out.strip().splitlines()[-1])
    assert received["bytes"] == sent["bytes"] == BULK_BYTES
    assert received["digest"] == sent["digest"]
    assert lost > 0  # the link did drop packets on the way
