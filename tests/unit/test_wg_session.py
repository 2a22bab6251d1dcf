"""The anti-replay window against a set-based reference model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from firezone.proto.wireguard.session import REPLAY_WINDOW, Session


def session() -> Session:
    return Session(
        local_index=1, remote_index=2, send_key=bytes(32), recv_key=bytes(32),
        is_initiator=True, now=0.0,
    )  # fmt: skip


def accept(s: Session, counter: int) -> bool:
    if not s.replay_check(counter):
        return False
    s.replay_mark(counter)
    return True


def test_window_is_at_least_2048() -> None:
    assert REPLAY_WINDOW >= 2048


def test_in_order_duplicates_and_edges() -> None:
    s = session()
    assert all(accept(s, c) for c in range(100))
    assert not accept(s, 50)
    assert accept(s, 100 + REPLAY_WINDOW)  # big jump
    assert not accept(s, 100)  # now exactly WINDOW behind: too old
    assert accept(s, 101 + 0)  # 101 is WINDOW - 1 behind and unseen
    assert not accept(s, 101)


def test_jump_beyond_window_resets_history() -> None:
    s = session()
    accept(s, 5)
    accept(s, 5 + 3 * REPLAY_WINDOW)
    assert not accept(s, 5)
    assert accept(s, 5 + 3 * REPLAY_WINDOW - 1)


@settings(max_examples=200)
@given(
    st.lists(
        st.one_of(st.integers(0, 3 * REPLAY_WINDOW), st.integers(0, 200), st.integers(0, 1 << 64)),
        max_size=300,
    )
)
def test_matches_reference_model(counters: list[int]) -> None:
    s = session()
    seen: set[int] = set()
    highest = -1
    for c in counters:
        expected = c not in seen and (c > highest or highest - c < REPLAY_WINDOW)
        assert accept(s, c) == expected
        if expected:
            seen.add(c)
            highest = max(highest, c)


def test_ring_words_stay_64_bit() -> None:
    s = session()
    for c in range(0, 3 * REPLAY_WINDOW, 7):
        accept(s, c)
    assert all(0 <= w < 1 << 64 for w in s.rx_words)


@settings(max_examples=200)
@given(st.lists(st.integers(-300, 400), max_size=400))
def test_mostly_increasing_counters_match_reference(deltas: list[int]) -> None:
    s = session()
    seen: set[int] = set()
    highest = -1
    c = 0
    for d in deltas:
        c = max(0, c + d)
        expected = c not in seen and (c > highest or highest - c < REPLAY_WINDOW)
        assert accept(s, c) == expected
        if expected:
            seen.add(c)
            highest = max(highest, c)
