"""SendBatcher: which datagrams go out together in one UDP GSO send (no sockets involved)."""

from __future__ import annotations

from firezone.runtime.udp import GSO_MAX_BYTES, UDP_MAX_SEGMENTS, SendBatcher

A, B = ("192.0.2.1", 1), ("192.0.2.2", 2)


class FakeUdp:
    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], int, tuple[str, int]]] = []

    def send_segments(self, parts: list[bytes], size: int, addr: tuple[str, int]) -> int:
        self.calls.append((list(parts), size, addr))
        return 0


def batch(
    items: list[tuple[bytes, tuple[str, int]]],
) -> list[tuple[list[bytes], int, tuple[str, int]]]:
    udp = FakeUdp()
    b = SendBatcher(udp)  # type: ignore[arg-type]
    for data, addr in items:
        b.add(data, addr)
    b.flush()
    sent = [p for parts, _, _ in udp.calls for p in parts]
    assert sent == [d for d, _ in items], "every datagram is sent once, in order"
    assert b.sent == len(items)
    return udp.calls


def test_equal_sizes_to_one_address_go_together() -> None:
    calls = batch([(bytes([i]) * 100, A) for i in range(5)])
    assert [(len(p), s, a) for p, s, a in calls] == [(5, 100, A)]


def test_a_shorter_datagram_ends_the_run() -> None:
    calls = batch([(b"x" * 100, A), (b"y" * 100, A), (b"z" * 40, A), (b"w" * 100, A)])
    assert [(len(p), s) for p, s, _ in calls] == [(3, 100), (1, 100)]


def test_a_longer_datagram_or_other_address_starts_a_new_run() -> None:
    calls = batch([(b"a" * 50, A), (b"b" * 100, A), (b"c" * 100, B), (b"d" * 100, B)])
    assert [(len(p), s, a) for p, s, a in calls] == [(1, 50, A), (1, 100, A), (2, 100, B)]


def test_runs_respect_segment_and_byte_limits() -> None:
    n = 1452
    per = min(UDP_MAX_SEGMENTS, GSO_MAX_BYTES // n)
    calls = batch([(b"q" * n, A)] * (per * 2 + 1))
    assert [len(p) for p, _, _ in calls] == [per, per, 1]
    small = batch([(b"s" * 32, A)] * (UDP_MAX_SEGMENTS + 3))
    assert [len(p) for p, _, _ in small] == [UDP_MAX_SEGMENTS, 3]
