"""`fz relay` command line: option parsing, credentials, secret files, one-line errors."""

from __future__ import annotations

import itertools
import json
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest

from firezone.cli.main import cli
from firezone.cli.relay import HostPort, PortRange
from firezone.metrics import CallbackCollector, MetricSpec, new_registry
from firezone.proto.rng import SeededRng
from firezone.proto.turn import credentials as creds
from firezone.roles import relay as role

KEY = "dGVzdC1rZXktMDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI="


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    p = tmp_path / "relay.secret"
    p.write_text("ab" * 32 + "\n")
    return p


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


# ---------------------------------------------------------------------------- credentials


def test_credentials_print_username_and_password(secret_file: Path) -> None:
    before = int(time.time())
    r = invoke(
        "relay",
        "credentials",
        "--secret-file",
        str(secret_file),
        "--public-key",
        KEY,
        "--ttl",
        "600",
    )
    assert r.exit_code == 0, r.output
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    expiry, salt = lines["username"].split(":")
    assert before + 600 <= int(expiry) <= int(time.time()) + 600
    assert salt == creds.salt_for(KEY)
    assert lines["password"] == creds.password_for(bytes.fromhex("ab" * 32), lines["username"])


@pytest.mark.parametrize("flags", [["--json"], []])
def test_credentials_json(secret_file: Path, flags: list[str]) -> None:
    pre = ["--json"] if not flags else []
    r = invoke(
        *pre, "relay", "credentials", "--secret-file", str(secret_file), "--public-key", KEY, *flags
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["realm"] == "firezone"
    assert data["password"] == creds.password_for(bytes.fromhex("ab" * 32), data["username"])
    assert data["expires_at"] >= int(time.time()) + role_default_ttl() - 5


def role_default_ttl() -> int:
    from firezone.cli.relay import DEFAULT_TTL

    return DEFAULT_TTL


def test_credentials_missing_secret_file_is_usage_error(tmp_path: Path) -> None:
    r = invoke("relay", "credentials", "--secret-file", str(tmp_path / "nope"), "--public-key", KEY)
    assert r.exit_code == 2
    assert "does not exist" in r.stderr


@pytest.mark.parametrize("key,msg", [("not base64!", "not base64"), ("QUJD", "decodes to 3 bytes")])
def test_credentials_bad_public_key(secret_file: Path, key: str, msg: str) -> None:
    r = invoke("relay", "credentials", "--secret-file", str(secret_file), "--public-key", key)
    assert r.exit_code == 2
    assert msg in r.stderr


def test_credentials_corrupt_secret_file_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.secret"
    p.write_text("this is not hex at all, not even close to it......\n")
    r = invoke("relay", "credentials", "--secret-file", str(p), "--public-key", KEY)
    assert r.exit_code == 1
    assert one_error_line(r).startswith("fz: error: ")
    assert "not a relay secret" in r.stderr


def test_credentials_zero_ttl_rejected(secret_file: Path) -> None:
    r = invoke(
        "relay", "credentials", "--secret-file", str(secret_file), "--public-key", KEY, "--ttl", "0"
    )
    assert r.exit_code == 2


# ---------------------------------------------------------------------------- run: bad input


def test_run_without_secret_file_is_one_line() -> None:
    r = invoke("relay", "run")
    assert r.exit_code == 1
    assert "--secret-file" in one_error_line(r)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--listen", "localhost:3478"], "not an IP address"),
        (["--listen", "127.0.0.1:99999"], "port must be"),
        (["--listen", "::1:3478"], "[ADDR]:PORT"),
        (["--relay-ports", "60000-50000"], "LOW <= HIGH"),
        (["--relay-ports", "abc"], "LOW-HIGH"),
        (["--public-ip4", "::1"], "not an IPv4 address"),
        (["--public-ip6", "192.0.2.1"], "not an IPv6 address"),
        (["--health-listen", "127.0.0.1"], "HOST:PORT"),
    ],
)
def test_run_bad_options_are_usage_errors(tmp_path: Path, args: list[str], msg: str) -> None:
    r = invoke("relay", "run", "--secret-file", str(tmp_path / "s"), *args)
    assert r.exit_code == 2
    assert msg in r.stderr
    assert "Traceback" not in r.output
    assert not (tmp_path / "s").exists()


def test_run_public_ip_for_a_family_not_listened_on(tmp_path: Path) -> None:
    r = invoke(
        "relay",
        "run",
        "--secret-file",
        str(tmp_path / "s"),
        "--listen",
        "127.0.0.1:3478",
        "--public-ip6",
        "2001:db8::5",
    )
    assert r.exit_code == 1
    assert "does not listen on that address family" in one_error_line(r)


def test_help_lists_commands() -> None:
    r = invoke("relay", "--help")
    assert r.exit_code == 0
    assert "run" in r.stdout and "credentials" in r.stdout


# ---------------------------------------------------------------------------- parameter types


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:3478", ("127.0.0.1", 3478)),
        ("[::1]:5000", ("::1", 5000)),
        ("[::]", ("::", 3478)),
        ("0.0.0.0", ("0.0.0.0", 3478)),
        ("[2001:DB8::1]:1", ("2001:db8::1", 1)),
    ],
)
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert HostPort(3478).convert(text, None, None) == expected


def test_port_range() -> None:
    assert PortRange().convert("49152-65535", None, None) == (49152, 65535)


# ---------------------------------------------------------------------------- secret files


def test_secret_file_created_0600_and_reused(tmp_path: Path) -> None:
    p = tmp_path / "relay.secret"
    secret, created = role.load_or_create_secret(p, SeededRng(1))
    assert created and len(secret) == 32
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert p.read_text().strip() == creds.secret_text(secret)
    again, created2 = role.load_or_create_secret(p, SeededRng(2))
    assert again == secret and not created2


def test_secret_file_unreadable_text(tmp_path: Path) -> None:
    p = tmp_path / "relay.secret"
    p.write_text("zz" * 32)
    with pytest.raises(role.RelayError, match="not a relay secret"):
        role.load_or_create_secret(p)


# ---------------------------------------------------------------------------- addresses


def test_addresses_from_specific_listen() -> None:
    cfg = role.RelayConfig(listen=[("127.0.0.1", 3478), ("::1", 3478)])
    assert role.resolve_addresses(cfg) == ("127.0.0.1", "::1", "127.0.0.1", "::1")


def test_addresses_public_flag_wins() -> None:
    cfg = role.RelayConfig(listen=[("0.0.0.0", 3478)], public_ip4="203.0.113.7")
    assert role.resolve_addresses(cfg) == ("203.0.113.7", None, "0.0.0.0", None)


# ---------------------------------------------------------------------------- metrics


def test_callback_collector_renders_counters_and_labels() -> None:
    state = {"n": 3, "drops": {"bad_channel": 2, "no_permission": 5}}
    reg = new_registry(
        [
            MetricSpec("fz_test_packets", "packets", "counter", lambda: state["n"]),
            MetricSpec(
                "fz_test_drops", "drops", "counter", lambda: state["drops"], labels=("reason",)
            ),
            MetricSpec("fz_test_allocs", "allocations", "gauge", lambda: 7),
        ]
    )
    text = generate_latest(reg).decode()
    assert "fz_test_packets_total 3.0" in text
    assert 'fz_test_drops_total{reason="no_permission"} 5.0' in text
    assert "fz_test_allocs 7.0" in text
    state["n"] = 4
    assert "fz_test_packets_total 4.0" in generate_latest(reg).decode()


def test_metric_spec_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="counter or gauge"):
        MetricSpec("x", "x", "histogram", lambda: 0)
    assert CallbackCollector([]).describe() == []


def test_relay_metrics_before_start_are_zero() -> None:
    relay = role.Relay(role.RelayConfig(), b"\x01" * 32)
    text = generate_latest(relay.registry).decode()
    assert "fz_relay_up 0.0" in text
    assert "fz_relay_allocations 0.0" in text


# ---------------------------------------------------------------------------- workers


def test_split_ports_disjoint_and_covering() -> None:
    slices = role.split_ports((49152, 65535), 3)
    assert slices[0][0] == 49152 and slices[-1][1] == 65535
    for (_, hi), (lo2, _) in itertools.pairwise(slices):
        assert lo2 == hi + 1


def test_split_ports_too_small() -> None:
    with pytest.raises(role.RelayError, match="too small for 4 workers"):
        role.split_ports((50000, 50002), 4)


def test_run_workers_need_enough_ports(tmp_path: Path) -> None:
    r = invoke("relay", "run", "--secret-file", str(tmp_path / "s"), "--listen", "127.0.0.1:3478",
               "--relay-ports", "50000-50001", "--workers", "3")
    assert r.exit_code == 1
    assert "too small for 3 workers" in one_error_line(r)


def test_merge_snapshots_sums_counters_and_drops() -> None:
    a = {"allocations": 2, "packets_client_to_peer": 10, "drops": {"no_permission": 1}}
    b = {"allocations": 3, "packets_client_to_peer": 5, "drops": {"no_permission": 2, "x": 1}}
    m = role.merge_snapshots([a, b, {}])
    assert m["allocations"] == 5 and m["packets_client_to_peer"] == 15
    assert m["drops"] == {"no_permission": 3, "x": 1}
    assert m["auth_failures"] == 0


def test_local_snapshot_reads_core_stats() -> None:
    from firezone.proto.turn.server import TurnServer

    srv = TurnServer(secret=b"\x02" * 32, public_ip4="192.0.2.1", public_ip6=None,
                     rng=SeededRng(3), now=0.0, unix_time=1_700_000_000.0)
    srv.handle_client_datagram(b"\x99garbage", ("192.0.2.9", 5000), 1.0)
    snap = role.local_snapshot(srv, None)
    assert snap["allocations"] == 0
    assert sum(snap["drops"].values()) == 1


def test_run_two_listen_addresses_of_one_family(tmp_path: Path) -> None:
    r = invoke("relay", "run", "--secret-file", str(tmp_path / "s"), "--listen", "127.0.0.1:3478",
               "--listen", "127.0.0.2:3478")
    assert r.exit_code == 1
    assert "at most once per address family" in one_error_line(r)
