"""The Phoenix channel client in virtual time: join, heartbeats, backoff, fatal errors."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from firezone.proto import phoenix
from firezone.proto.rng import SeededRng


def frames(ch: phoenix.PhoenixChannel) -> list[dict]:
    out = []
    while (f := ch.poll_transmit()) is not None:
        out.append(json.loads(f))
    return out


def events(ch: phoenix.PhoenixChannel) -> list[phoenix.ChannelEvent]:
    out = []
    while (e := ch.poll_event()) is not None:
        out.append(e)
    return out


def actions(ch: phoenix.PhoenixChannel) -> list[object]:
    out = []
    while (a := ch.poll_action()) is not None:
        out.append(a)
    return out


def reply(ref: str, ok: bool = True, response: object = None, topic: str = "client") -> str:
    return json.dumps(
        {
            "topic": topic,
            "event": "phx_reply",
            "ref": ref,
            "payload": {"status": "ok" if ok else "error", "response": response or {}},
        }
    )


def joined_channel(now: float = 0.0) -> phoenix.PhoenixChannel:
    ch = phoenix.PhoenixChannel("client", {"hello": 1}, SeededRng(1), now)
    ch.handle_timeout(now)
    assert actions(ch) == [phoenix.Connect()]
    ch.handle_connected(now)
    (join,) = frames(ch)
    assert (
        join["event"] == "phx_join"
        and join["topic"] == "client"
        and join["payload"] == {"hello": 1}
    )
    ch.handle_text(reply(join["ref"], response={"x": 1}), now)
    assert events(ch) == [phoenix.Joined({"x": 1})]
    assert ch.state is phoenix.State.JOINED
    return ch


def test_join_then_messages_and_replies() -> None:
    ch = joined_channel()
    ch.handle_text(
        json.dumps({"topic": "client", "event": "init", "payload": {"a": 1}, "ref": None}), 1.0
    )
    ref = ch.send("request_authorization", {"resource_id": "r"})
    (f,) = frames(ch)
    assert f == {
        "topic": "client",
        "event": "request_authorization",
        "payload": {"resource_id": "r"},
        "ref": ref,
    }
    ch.handle_text(reply(ref, ok=False, response={"reason": "nope"}), 1.5)
    assert events(ch) == [
        phoenix.Message("init", {"a": 1}),
        phoenix.Reply(ref, False, {"reason": "nope"}),
    ]


def test_messages_sent_before_join_wait_for_it() -> None:
    ch = phoenix.PhoenixChannel("gateway", {}, SeededRng(2), 0.0)
    ref = ch.send("authorization_created", {"ref": "x"})
    ch.handle_timeout(0.0)
    actions(ch)
    ch.handle_connected(0.0)
    (join,) = frames(ch)
    ch.handle_text(reply(join["ref"], topic="gateway"), 0.1)
    assert [f["ref"] for f in frames(ch)] == [ref]


def test_heartbeats_every_10s_and_timeout_after_three_missed() -> None:
    ch = joined_channel()
    assert ch.poll_timeout() == phoenix.HEARTBEAT_INTERVAL
    ch.handle_timeout(10.0)
    (hb,) = frames(ch)
    assert (hb["topic"], hb["event"]) == ("phoenix", "heartbeat")
    ch.handle_text(reply(hb["ref"], topic="phoenix"), 10.1)
    assert events(ch) == []  # heartbeat replies are not surfaced
    for t in (20.0, 30.0, 40.0, 50.0):  # the heartbeats sent at 20, 30 and 40 s go unanswered
        ch.handle_timeout(t)
        frames(ch)
    assert ch.state is phoenix.State.DISCONNECTED
    assert isinstance(actions(ch)[-1], phoenix.Close)
    (ev,) = events(ch)
    assert isinstance(ev, phoenix.Disconnected) and "heartbeat" in ev.reason


def test_join_timeout_reconnects() -> None:
    ch = phoenix.PhoenixChannel("relay", {}, SeededRng(3), 0.0)
    ch.handle_timeout(0.0)
    actions(ch)
    ch.handle_connected(0.0)
    frames(ch)
    ch.handle_timeout(phoenix.JOIN_TIMEOUT)
    assert ch.state is phoenix.State.DISCONNECTED
    assert any(isinstance(e, phoenix.Disconnected) and "join" in e.reason for e in events(ch))


def test_backoff_grows_by_1_5_with_jitter_and_caps_at_60s() -> None:
    ch = phoenix.PhoenixChannel("client", {}, SeededRng(4), 0.0)
    now = 0.0
    delays = []
    for _ in range(25):
        ch.handle_timeout(now)
        assert actions(ch) == [phoenix.Connect()]
        ch.handle_connect_failed(now, status=502)
        (ev,) = events(ch)
        assert isinstance(ev, phoenix.Disconnected)
        delays.append(ev.retry_in)
        now += ev.retry_in
    for i, d in enumerate(delays):
        base = min(60.0, 0.5 * 1.5**i)
        assert 0.5 * base <= d <= min(60.0, 1.5 * base) + 1e-9
    assert max(delays) <= 60.0 and delays[-1] > 25


def test_successful_join_resets_backoff() -> None:
    ch = phoenix.PhoenixChannel("client", {}, SeededRng(5), 0.0)
    now = 0.0
    for _ in range(8):
        ch.handle_timeout(now)
        actions(ch)
        ch.handle_connect_failed(now)
        now += events(ch)[0].retry_in  # type: ignore[attr-defined]
    ch.handle_timeout(now)
    actions(ch)
    ch.handle_connected(now)
    (join,) = frames(ch)
    ch.handle_text(reply(join["ref"]), now)
    events(ch)
    ch.handle_closed(now, "network")
    (ev,) = events(ch)
    assert isinstance(ev, phoenix.Disconnected) and ev.retry_in <= 0.75


def test_retry_after_is_honoured() -> None:
    ch = phoenix.PhoenixChannel("client", {}, SeededRng(6), 0.0)
    ch.handle_timeout(0.0)
    actions(ch)
    ch.handle_connect_failed(0.0, status=503, retry_after=42.0)
    (ev,) = events(ch)
    assert ev == phoenix.Disconnected("HTTP 503", 42.0)
    assert ch.poll_timeout() == 42.0


def test_401_and_403_are_fatal() -> None:
    for status in (401, 403):
        ch = phoenix.PhoenixChannel("client", {}, SeededRng(7), 0.0)
        ch.handle_timeout(0.0)
        actions(ch)
        ch.handle_connect_failed(0.0, status=status, reason="invalid token")
        (ev,) = events(ch)
        assert isinstance(ev, phoenix.Stopped) and str(status) in ev.reason
        assert ch.poll_timeout() is None
        ch.handle_timeout(1000.0)
        assert actions(ch) == []


def test_disconnect_frame_is_fatal() -> None:
    ch = joined_channel()
    ch.handle_text(
        json.dumps(
            {"topic": "client", "event": "disconnect", "payload": {"reason": "token_expired"}}
        ),
        3.0,
    )
    evs = events(ch)
    assert evs == [phoenix.Stopped("token_expired")]
    assert isinstance(actions(ch)[0], phoenix.Close)


def test_max_partition_time_gives_up() -> None:
    ch = phoenix.PhoenixChannel("gateway", {}, SeededRng(8), 0.0, max_partition_time=30.0)
    now = 0.0
    while ch.state is not phoenix.State.STOPPED:
        ch.handle_timeout(now)
        if actions(ch):
            ch.handle_connect_failed(now)
        for e in events(ch):
            if isinstance(e, phoenix.Disconnected):
                now += e.retry_in
        assert now < 200
    assert now > 30.0


def test_reconnect_request_is_immediate() -> None:
    ch = joined_channel()
    ch.reconnect(5.0, "SIGHUP")
    assert isinstance(actions(ch)[0], phoenix.Close)
    assert ch.poll_timeout() == 5.0
    ch.handle_timeout(5.0)
    assert actions(ch) == [phoenix.Connect()]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_garbage_frames_never_raise(text: str) -> None:
    ch = joined_channel()
    ch.handle_text(text, 1.0)
    ch.handle_text(json.dumps({"event": "phx_reply", "ref": text, "payload": text}), 1.0)
    ch.handle_text(json.dumps({"topic": "client", "event": text, "payload": [text]}), 1.0)
