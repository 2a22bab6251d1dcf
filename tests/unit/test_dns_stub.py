"""DnsStub: resource answers with proxy IPs, PTR, canary, search domain, forwarding, bad input."""

from __future__ import annotations

import ipaddress

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firezone.proto.dns.stub import (
    CANARY_DOMAIN,
    PROXY_V4,
    PROXY_V6,
    SENTINEL_V4,
    Answer,
    DnsStub,
    DomainResolved,
    Drop,
    Forward,
)

UP1 = ("192.0.2.53", 53)
UP2 = ("198.51.100.53", 5353)
S1 = "100.100.111.1"


def make_stub(resources: list[tuple[str, str]] | None = None, search: str | None = None) -> DnsStub:
    stub = DnsStub(search_domain=search)
    stub.set_upstreams([UP1, UP2])
    stub.set_resources(resources or [])
    return stub


def ask(stub: DnsStub, name: str, rdtype: str = "A", *, tcp: bool = False, sentinel: str = S1,
        **kw: object) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    r = stub.handle_query(q.to_wire(), sentinel=sentinel, tcp=tcp, now=0.0)
    assert isinstance(r, Answer), r
    resp = dns.message.from_wire(r.data)
    assert resp.id == q.id and resp.flags & dns.flags.QR
    return resp


def addresses(resp: dns.message.Message) -> list[str]:
    return sorted((rr.address for rrset in resp.answer for rr in rrset),
                  key=lambda a: ipaddress.ip_address(a))


def is_forwarded(stub: DnsStub, name: str, rdtype: str = "A") -> bool:
    q = dns.message.make_query(name, rdtype)
    return isinstance(stub.handle_query(q.to_wire(), sentinel=S1, tcp=False, now=0.0), Forward)


# --- sentinels and upstreams ----------------------------------------------------------------------------


def test_one_v4_and_one_v6_sentinel_per_upstream():
    stub = DnsStub()
    sentinels = stub.set_upstreams([UP1, UP2])
    assert sentinels == ["100.100.111.1", "100.100.111.2",
                         "fd00:2021:1111:8000:100:100:111:1", "fd00:2021:1111:8000:100:100:111:2"]


@pytest.mark.parametrize(("sentinel", "upstream"), [
    ("100.100.111.1", UP1), ("100.100.111.2", UP2),
    ("fd00:2021:1111:8000:100:100:111:1", UP1), ("fd00:2021:1111:8000:100:100:111:2", UP2),
    ("FD00:2021:1111:8000:100:100:111:2", UP2),
])
def test_sentinel_i_forwards_to_upstream_i(sentinel, upstream):
    stub = make_stub()
    q = dns.message.make_query("example.org", "A").to_wire()
    assert stub.handle_query(q, sentinel=sentinel, tcp=False, now=0.0) == Forward(upstream, q)


def test_unknown_sentinel_is_dropped():
    stub = make_stub()
    q = dns.message.make_query("example.org", "A").to_wire()
    assert stub.handle_query(q, sentinel="100.100.111.9", tcp=False, now=0.0) == Drop("unknown_sentinel")
    assert stub.handle_query(q, sentinel="nonsense", tcp=False, now=0.0) == Drop("unknown_sentinel")


def test_upstream_inside_our_ranges_is_refused_to_avoid_a_loop():
    stub = DnsStub()
    assert stub.set_upstreams([("100.100.111.1", 53), UP1]) == [
        "100.100.111.1", "fd00:2021:1111:8000:100:100:111:1"]
    q = dns.message.make_query("example.org", "A").to_wire()
    assert stub.handle_query(q, sentinel=S1, tcp=False, now=0.0) == Forward(UP1, q)
    assert stub.counters["upstream_loop"] == 1


def test_without_upstreams_resources_still_answer_and_others_get_servfail():
    stub = DnsStub()
    assert stub.set_upstreams([]) == ["100.100.111.1", "fd00:2021:1111:8000:100:100:111:1"]
    stub.set_resources([("r1", "app.corp.test")])
    assert len(addresses(ask(stub, "app.corp.test"))) == 4
    assert ask(stub, "example.org").rcode() == dns.rcode.SERVFAIL


# --- patterns -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "name", "hit"), [
    ("app.corp.test", "app.corp.test", True),
    ("app.corp.test", "APP.Corp.Test.", True),
    ("app.corp.test", "x.app.corp.test", False),
    ("*.corp.test", "corp.test", True),       # `*` also matches the apex
    ("*.corp.test", "a.corp.test", True),
    ("*.corp.test", "a.b.corp.test", False),  # exactly one label deep
    ("**.corp.test", "corp.test", True),
    ("**.corp.test", "a.b.c.corp.test", True),
    ("**.corp.test", "xcorp.test", False),
    ("us-east?.corp.test", "us-east1.corp.test", True),
    ("us-east?.corp.test", "us-east12.corp.test", False),
    ("us-east?.corp.test", "us-east.corp.test", False),
])
def test_patterns(pattern, name, hit):
    stub = make_stub([("r1", pattern)])
    assert is_forwarded(stub, name) is not hit


def test_most_specific_pattern_wins():
    stub = make_stub([("wide", "**.corp.test"), ("one", "*.corp.test"), ("exact", "db.corp.test")])
    for name, rid in [("db.corp.test", "exact"), ("web.corp.test", "one"), ("a.b.corp.test", "wide")]:
        ask(stub, name)
        ev = stub.poll_event()
        assert isinstance(ev, DomainResolved) and ev.resource_id == rid and ev.domain == name


def test_invalid_pattern_is_skipped_and_counted():
    stub = make_stub([("bad", "*.com"), ("ok", "app.corp.test")])
    assert stub.counters["bad_pattern"] == 1
    assert not is_forwarded(stub, "app.corp.test")


# --- proxy IPs ------------------------------------------------------------------------------------------


def test_a_and_aaaa_get_four_proxy_ips_each_with_ttl_1():
    stub = make_stub([("r1", "**.corp.test")])
    a = ask(stub, "app.corp.test", "A")
    aaaa = ask(stub, "app.corp.test", "AAAA")
    v4, v6 = addresses(a), addresses(aaaa)
    assert v4 == ["100.96.0.1", "100.96.0.2", "100.96.0.3", "100.96.0.4"]
    assert v6 == [f"fd00:2021:1111:8000::{i}" for i in range(1, 5)]
    assert all(ipaddress.ip_address(x) in PROXY_V6 for x in v6)
    for resp in (a, aaaa):
        assert resp.rcode() == dns.rcode.NOERROR and resp.flags & dns.flags.RA
        assert [rrset.ttl for rrset in resp.answer] == [1]
        assert resp.answer[0].name == resp.question[0].name


def test_proxy_ips_are_stable_and_sequential_per_name():
    stub = make_stub([("r1", "**.corp.test")])
    first = addresses(ask(stub, "a.corp.test"))
    second = addresses(ask(stub, "b.corp.test"))
    assert addresses(ask(stub, "A.corp.test.")) == first
    assert second == ["100.96.0.5", "100.96.0.6", "100.96.0.7", "100.96.0.8"]
    assert stub.proxy_ips_of("a.corp.test") == first + [f"fd00:2021:1111:8000::{i}" for i in range(1, 5)]
    assert stub.proxy_ips_of("unknown.corp.test") == []


def test_proxy_ips_survive_a_resource_update_and_follow_the_resource():
    stub = make_stub([("r1", "**.corp.test")])
    ips = addresses(ask(stub, "a.corp.test"))
    stub.set_resources([])
    assert stub.resolve_proxy_ip(ips[0]) is None
    assert is_forwarded(stub, "a.corp.test")
    stub.set_resources([("r2", "a.corp.test")])
    assert stub.resolve_proxy_ip(ips[0]) == ("r2", "a.corp.test")
    assert addresses(ask(stub, "a.corp.test")) == ips


def test_sentinel_range_is_never_handed_out():
    stub = make_stub([("r1", "**.corp.test")])
    # Jump the allocator right below the sentinel /24.
    stub._next_v4 = int(SENTINEL_V4.network_address) - 2
    ips = addresses(ask(stub, "a.corp.test"))
    assert ips == ["100.100.110.254", "100.100.110.255", "100.100.112.0", "100.100.112.1"]
    assert all(ipaddress.ip_address(i) not in SENTINEL_V4 for i in ips)


def test_exhausted_proxy_range_answers_servfail():
    stub = make_stub([("r1", "**.corp.test")])
    stub._next_v4 = int(PROXY_V4.broadcast_address) - 2
    assert ask(stub, "a.corp.test").rcode() == dns.rcode.SERVFAIL
    assert stub.counters["proxy_ips_exhausted"] == 1


def test_domain_resolved_on_first_query_and_every_requery():
    stub = make_stub([("r1", "**.corp.test")])
    assert stub.poll_event() is None
    for rdtype in ("A", "AAAA", "A"):
        ask(stub, "App.corp.test", rdtype)
        ev = stub.poll_event()
        assert ev == DomainResolved("r1", "app.corp.test", stub.proxy_ips_of("app.corp.test"))
        assert len(ev.proxy_ips) == 8
    assert stub.poll_event() is None


def test_resolve_proxy_ip():
    stub = make_stub([("r1", "**.corp.test")])
    ask(stub, "app.corp.test", "AAAA")
    assert stub.resolve_proxy_ip("100.96.0.3") == ("r1", "app.corp.test")
    assert stub.resolve_proxy_ip("fd00:2021:1111:8000:0::4") == ("r1", "app.corp.test")
    assert stub.resolve_proxy_ip("100.96.0.9") is None
    assert stub.resolve_proxy_ip("not an ip") is None


def test_other_types_for_a_resource_name_get_no_data_and_no_leak():
    stub = make_stub([("r1", "app.corp.test")])
    for rdtype in ("MX", "TXT", "HTTPS"):
        resp = ask(stub, "app.corp.test", rdtype)
        assert resp.rcode() == dns.rcode.NOERROR and resp.answer == []
    assert stub.poll_event() is None


# --- PTR, canary, search domain -------------------------------------------------------------------------


@pytest.mark.parametrize("rdtype", ["A", "AAAA"])
def test_ptr_for_proxy_ips(rdtype):
    stub = make_stub([("r1", "**.corp.test")])
    for ip in addresses(ask(stub, "app.corp.test", rdtype)):
        resp = ask(stub, dns.reversename.from_address(ip).to_text(), "PTR")
        assert [rr.target.to_text() for rrset in resp.answer for rr in rrset] == ["app.corp.test."]
        assert resp.answer[0].ttl == 1


def test_ptr_for_unassigned_proxy_ip_is_nxdomain_and_others_are_forwarded():
    stub = make_stub([("r1", "**.corp.test")])
    assert ask(stub, "7.7.96.100.in-addr.arpa", "PTR").rcode() == dns.rcode.NXDOMAIN
    assert is_forwarded(stub, "1.2.0.192.in-addr.arpa", "PTR")
    assert is_forwarded(stub, "in-addr.arpa", "PTR")


@pytest.mark.parametrize("rdtype", ["A", "AAAA", "TXT"])
def test_firefox_canary_is_nxdomain(rdtype):
    stub = make_stub([("r1", "app.corp.test")])
    assert ask(stub, CANARY_DOMAIN, rdtype).rcode() == dns.rcode.NXDOMAIN
    assert ask(stub, CANARY_DOMAIN.upper() + ".", rdtype).rcode() == dns.rcode.NXDOMAIN


def test_search_domain_is_appended_to_single_label_names():
    stub = make_stub([("r1", "wiki.corp.test")], search="Corp.Test.")
    resp = ask(stub, "wiki")
    assert len(addresses(resp)) == 4 and resp.answer[0].name.to_text() == "wiki."
    assert stub.poll_event() == DomainResolved("r1", "wiki.corp.test", stub.proxy_ips_of("wiki.corp.test"))
    assert addresses(ask(stub, "wiki.corp.test")) == addresses(resp)
    assert is_forwarded(stub, "wiki.other")  # not a single label
    assert is_forwarded(stub, "intranet")    # appended name is no resource
    stub.set_search_domain(None)
    assert is_forwarded(stub, "wiki")


# --- forwarding -----------------------------------------------------------------------------------------


def test_forwarded_bytes_are_unchanged_with_edns():
    stub = make_stub([("r1", "**.corp.test")])
    q = dns.message.make_query("example.org", "TXT", use_edns=0, payload=4096, want_dnssec=True,
                               options=[dns.edns.GenericOption(65001, b"xyz")])
    wire = q.to_wire()
    r = stub.handle_query(wire, sentinel=S1, tcp=True, now=0.0)
    assert r == Forward(UP1, wire)
    back = dns.message.from_wire(r.data)
    assert back.payload == 4096 and back.ednsflags & dns.flags.DO


def test_non_in_class_and_non_ascii_names_are_forwarded():
    stub = make_stub([("r1", "**.corp.test")])
    q = dns.message.make_query("app.corp.test", "TXT", rdclass="CH").to_wire()
    assert isinstance(stub.handle_query(q, sentinel=S1, tcp=False, now=0.0), Forward)
    q = dns.message.make_query(dns.name.Name([b"a.b", b"corp", b"test", b""]), "A").to_wire()
    assert isinstance(stub.handle_query(q, sentinel=S1, tcp=False, now=0.0), Forward)


def test_local_answer_carries_edns_when_the_query_did():
    stub = make_stub([("r1", "app.corp.test")])
    resp = ask(stub, "app.corp.test", use_edns=0, payload=4096)
    assert resp.edns == 0 and resp.payload == 1232
    assert ask(stub, "app.corp.test").edns == -1


# --- bad input ------------------------------------------------------------------------------------------


def test_garbage():
    stub = make_stub([("r1", "**.corp.test")])
    assert stub.handle_query(b"", sentinel=S1, tcp=False, now=0.0) == Drop("short")
    assert stub.handle_query(b"\x00" * 11, sentinel=S1, tcp=False, now=0.0) == Drop("short")
    resp = dns.message.make_response(dns.message.make_query("example.org", "A")).to_wire()
    assert stub.handle_query(resp, sentinel=S1, tcp=False, now=0.0) == Drop("not_a_query")


@pytest.mark.parametrize("tail", [b"", b"\x05abc", b"\xc0\x0c\x00\x01\x00\x01", b"\x03abc\x00\x00"])
def test_malformed_question_is_formerr(tail):
    stub = make_stub()
    data = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + tail
    r = stub.handle_query(data, sentinel=S1, tcp=False, now=0.0)
    assert isinstance(r, Answer)
    resp = dns.message.from_wire(r.data)
    assert resp.id == 0x1234 and resp.rcode() == dns.rcode.FORMERR and resp.flags & dns.flags.RD


def test_two_questions_is_formerr_and_update_is_notimp():
    stub = make_stub()
    two = b"\x00\x01\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00" + (b"\x01a\x00\x00\x01\x00\x01" * 2)
    r = stub.handle_query(two, sentinel=S1, tcp=False, now=0.0)
    assert isinstance(r, Answer) and dns.message.from_wire(r.data).rcode() == dns.rcode.FORMERR
    upd = dns.message.make_query("example.org", "SOA")
    upd.set_opcode(dns.opcode.UPDATE)
    r = stub.handle_query(upd.to_wire(), sentinel=S1, tcp=False, now=0.0)
    assert isinstance(r, Answer) and dns.message.from_wire(r.data).rcode() == dns.rcode.NOTIMP


def test_resource_query_with_garbage_after_question_is_formerr_not_an_exception():
    stub = make_stub([("r1", "app.corp.test")])
    q = dns.message.make_query("app.corp.test", "A").to_wire()
    bad = q[:10] + b"\x00\x01" + q[12:]  # claims one additional record that is not there
    r = stub.handle_query(bad, sentinel=S1, tcp=False, now=0.0)
    assert isinstance(r, Answer) and dns.message.from_wire(r.data).rcode() == dns.rcode.FORMERR


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300), tcp=st.booleans())
def test_arbitrary_bytes_never_raise(data, tcp):
    stub = make_stub([("r1", "**.corp.test"), ("r2", "x?.corp.test")], search="corp.test")
    r = stub.handle_query(data, sentinel=S1, tcp=tcp, now=0.0)
    assert isinstance(r, (Answer, Forward, Drop))
    if isinstance(r, Forward):
        assert r.data == data


_label = st.text(alphabet="abcxyz019-", min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(labels=st.lists(_label, min_size=1, max_size=4), rdtype=st.sampled_from(["A", "AAAA"]))
def test_names_under_a_double_star_zone_always_answer_from_the_proxy_range(labels, rdtype):
    stub = make_stub([("r1", "**.corp.test")])
    name = ".".join([*labels, "corp", "test"])
    ips = addresses(ask(stub, name, rdtype))
    net = PROXY_V4 if rdtype == "A" else PROXY_V6
    assert len(ips) == 4 and all(ipaddress.ip_address(i) in net for i in ips)
    assert all(stub.resolve_proxy_ip(i) == ("r1", name) for i in ips)


def test_do_bit_is_echoed_and_edns_options_are_skipped():
    stub = make_stub([("r1", "app.corp.test")])
    resp = ask(stub, "app.corp.test", use_edns=0, want_dnssec=True,
               options=[dns.edns.GenericOption(10, b"12345678")])
    assert resp.ednsflags & dns.flags.DO and len(addresses(resp)) == 4


@pytest.mark.parametrize("shape", ["edns1", "extra_record", "tsig_like"])
def test_unusual_query_shapes_take_the_slow_path_with_the_same_answer(shape):
    stub = make_stub([("r1", "app.corp.test")])
    q = dns.message.make_query("app.corp.test", "AAAA", use_edns=1 if shape == "edns1" else 0)
    if shape == "extra_record":
        q.authority.append(dns.rrset.from_text("corp.test.", 60, "IN", "NS", "ns.corp.test."))
    if shape == "tsig_like":
        q.additional.append(dns.rrset.from_text("x.corp.test.", 60, "IN", "A", "192.0.2.1"))
    r = stub.handle_query(q.to_wire(), sentinel=S1, tcp=False, now=0.0)
    assert isinstance(r, Answer)
    resp = dns.message.from_wire(r.data)
    assert resp.id == q.id and resp.rcode() == dns.rcode.NOERROR
    assert addresses(resp) == [f"fd00:2021:1111:8000::{i}" for i in range(1, 5)]
    assert resp.answer[0].ttl == 1


def test_error_response_echoes_the_question():
    from firezone.proto.dns.stub import error_response
    q = dns.message.make_query("example.org", "A", use_edns=0)
    resp = dns.message.from_wire(error_response(q.to_wire(), dns.rcode.SERVFAIL))
    assert resp.id == q.id and resp.rcode() == dns.rcode.SERVFAIL and resp.question == q.question


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["app.corp.test", "APP.corp.TEST.", "x.svc.test", "wiki"]),
       rdtype=st.sampled_from(["A", "AAAA", "TXT", "MX"]), rd=st.booleans(), cd=st.booleans(),
       edns=st.sampled_from([-1, 0]), payload=st.integers(512, 65535), do=st.booleans(),
       cookie=st.booleans(), tcp=st.booleans())
def test_local_answers_mirror_the_query(name, rdtype, rd, cd, edns, payload, do, cookie, tcp):
    stub = make_stub([("r1", "app.corp.test"), ("r2", "**.svc.test"), ("r3", "wiki.corp.test")],
                     search="corp.test")
    q = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload,
                               want_dnssec=do and edns == 0,
                               options=[dns.edns.GenericOption(10, b"c" * 8)] if cookie else None)
    q.flags = (dns.flags.RD if rd else 0) | (dns.flags.CD if cd else 0)
    r = stub.handle_query(q.to_wire(), sentinel=S1, tcp=tcp, now=0.0)
    assert isinstance(r, Answer)
    resp = dns.message.from_wire(r.data)
    assert resp.id == q.id and resp.question == q.question and resp.rcode() == dns.rcode.NOERROR
    assert bool(resp.flags & dns.flags.RD) == rd and resp.flags & dns.flags.RA
    assert resp.edns == q.edns
    if q.edns == 0:
        assert bool(resp.ednsflags & dns.flags.DO) == bool(q.ednsflags & dns.flags.DO)
    if rdtype in ("A", "AAAA"):
        assert len(addresses(resp)) == 4 and resp.answer[0].name == q.question[0].name
    else:
        assert resp.answer == []
