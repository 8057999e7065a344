"""Batched UDP I/O in dwcp._net (recvmmsg / sendmmsg / UDP GSO), over loopback."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest
from dwcp._net import ffi, lib

STRIDE = 2048


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _send(sock: socket.socket, dest: tuple[str, int], payloads: list[bytes], gso: bool) -> int:
    meta = ffi.new("dwcp_udp_meta[]", len(payloads))
    for m, p in zip(meta, payloads, strict=True):
        m.family = 4
        m.port = dest[1]
        ffi.memmove(m.addr, socket.inet_aton(dest[0]), 4)
        m.len = len(p)
    buf = b"".join(payloads)
    return int(lib.dwcp_udp_send_batch(sock.fileno(), buf, meta, len(payloads), int(gso)))


def _recv_all(sock: socket.socket, n: int) -> list[tuple[bytes, tuple[str, int]]]:
    buf = ffi.new("uint8_t[]", STRIDE * 64)
    meta = ffi.new("dwcp_udp_meta[]", 64)
    got: list[tuple[bytes, tuple[str, int]]] = []
    for _ in range(1000):  # bounded: each round waits at most 1 s
        if len(got) >= n:
            break
        select.select([sock], [], [], 1.0)
        k = lib.dwcp_udp_recv_batch(sock.fileno(), buf, STRIDE, 64, meta)
        assert k >= 0, os.strerror(-k)
        for i in range(k):
            m = meta[i]
            data = bytes(ffi.buffer(buf + i * STRIDE, m.len))
            host = socket.inet_ntoa(bytes(ffi.buffer(m.addr, 4)))
            assert m.family == 4
            got.append((data, (host, m.port)))
    return got


@pytest.mark.parametrize("gso", [False, True])
def test_batch_roundtrip_in_order(pair: tuple[socket.socket, socket.socket], gso: bool) -> None:
    a, b = pair
    # Runs of equal sizes (GSO candidates), a shorter tail, then other sizes.
    payloads = [bytes([i % 256]) * 1200 for i in range(40)] + [b"tail" * 10]
    payloads += [os.urandom(1 + 37 * i) for i in range(20)]
    sent = _send(a, b.getsockname(), payloads, gso)
    assert sent == len(payloads)
    got = _recv_all(b, len(payloads))
    assert [d for d, _ in got] == payloads
    assert {addr for _, addr in got} == {a.getsockname()}


def test_recv_on_an_empty_socket_returns_zero(pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    buf = ffi.new("uint8_t[]", STRIDE)
    meta = ffi.new("dwcp_udp_meta[]", 1)
    assert lib.dwcp_udp_recv_batch(b.fileno(), buf, STRIDE, 1, meta) == 0


def test_oversized_datagram_is_truncated_to_stride(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendto(b"x" * 3000, b.getsockname())
    select.select([b], [], [], 5.0)
    buf = ffi.new("uint8_t[]", STRIDE)
    meta = ffi.new("dwcp_udp_meta[]", 1)
    assert lib.dwcp_udp_recv_batch(b.fileno(), buf, STRIDE, 1, meta) == 1
    assert meta[0].len == STRIDE


def test_send_error_is_reported(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    meta = ffi.new("dwcp_udp_meta[]", 1)
    meta[0].len = 10  # family 0 on an unconnected socket: no destination
    assert lib.dwcp_udp_send_batch(a.fileno(), b"0123456789", meta, 1, 0) < 0
