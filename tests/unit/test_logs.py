import io
import json
import logging

from firezone import logs


def test_json_lines_with_fields_and_trace_level() -> None:
    buf = io.StringIO()
    logs.setup_logging(2, json_lines=True, stream=buf)
    log = logging.getLogger("firezone.test")
    log.info("connected", extra={"peer": "abc", "rtt_ms": 3})
    logs.trace(log, "packet", size=1280)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[0]["msg"] == "connected" and lines[0]["peer"] == "abc" and lines[0]["rtt_ms"] == 3
    assert lines[1]["level"] == "TRACE" and lines[1]["size"] == 1280


def test_trace_is_off_by_default() -> None:
    buf = io.StringIO()
    logs.setup_logging(0, json_lines=True, stream=buf)
    logs.trace(logging.getLogger("firezone.test"), "packet")
    logging.getLogger("firezone.test").debug("hidden")
    assert buf.getvalue() == ""
    assert logs.TRACE < logging.DEBUG


def test_rich_for_terminals() -> None:
    buf = io.StringIO()
    logs.setup_logging(0, json_lines=False, stream=buf)
    logging.getLogger("firezone.test").warning("degraded", extra={"reason": "slow"})
    out = buf.getvalue()
    assert "degraded" in out and "reason=slow" in out
