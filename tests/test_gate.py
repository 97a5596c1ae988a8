"""The admission gate (wsloop._Gate), socket-free: the real gate a Server
builds, fed parsed requests and transport facts, answering who the client
is and whether it gets in.  Its counts are driven by arrive / opened /
leave exactly as a Server drives them."""

import pytest

import wsloop
from helpers import make_gate, request_bytes

PROXY = ("127.0.0.1", 50000)  # a trusted proxy's connection
OUTSIDER = ("192.0.2.9", 50001)  # a peer nobody trusts
UNIX_PEER = "unix:/run/wsloop/wsloop.sock"


def parsed(data):
    protocol = wsloop.Protocol()
    protocol.receive_data(data)
    events = list(protocol.events())
    assert len(events) == 1, "the request itself must be valid here: %r" % (events,)
    return events[0][1], protocol.is_upgrade


def upgrade(headers=None, path="/"):
    return parsed(request_bytes(path, headers))


def plain(path, headers=None):
    lines = ["GET %s HTTP/1.1" % path, "Host: example.com"] + ["%s: %s" % item for item in (headers or {}).items()]
    return parsed(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def decide(gate, request, who=None, peer=PROXY, tls=False, shutting_down=False):
    request, is_upgrade = request
    return gate.decide(who if who is not None else object(), request, is_upgrade, peer, tls, shutting_down)


def status(admission):
    return None if admission.response is None else admission.response.status


# -- which header is believed ------------------------------------------------------


def test_by_default_only_x_forwarded_for_is_believed():
    gate = make_gate(forwarded_allow_ips=["127.0.0.1"])
    seen = decide(gate, upgrade({"X-Forwarded-For": "203.0.113.50", "Forwarded": "for=198.51.100.1;proto=https"}))
    assert (seen.address, seen.scheme) == (("203.0.113.50", 0), "http")
    # A client's own Forwarded, passed through by a proxy that sets only
    # X-Forwarded-For, names no one.
    alone = decide(gate, upgrade({"Forwarded": "for=198.51.100.1"}))
    assert alone.address == PROXY


def test_with_forwarded_header_forwarded_only_forwarded_is_believed():
    gate = make_gate(forwarded_allow_ips=["127.0.0.1"], forwarded_header="forwarded")
    seen = decide(gate, upgrade({"Forwarded": "for=203.0.113.50;proto=https", "X-Forwarded-For": "198.51.100.1",
                                 "X-Forwarded-Proto": "http"}))
    assert (seen.address, seen.scheme) == (("203.0.113.50", 0), "https")
    assert decide(gate, upgrade({"X-Forwarded-For": "198.51.100.1"})).address == PROXY


def test_forwarded_header_must_be_one_the_gate_knows():
    with pytest.raises(ValueError, match="forwarded_header"):
        make_gate(forwarded_header="x-real-ip")


def test_x_real_ip_is_never_believed():
    gate = make_gate(forwarded_allow_ips=["127.0.0.1"])
    assert decide(gate, upgrade({"X-Real-IP": "198.51.100.1"})).address == PROXY


@pytest.mark.parametrize(
    "header, value",
    [
        ("x-forwarded-for", "not-an-address, 127.0.0.1"),
        ("x-forwarded-for", "unknown"),
        ("x-forwarded-for", ""),
        ("forwarded", "for=unknown"),
        ("forwarded", "for=_hidden, for=127.0.0.1"),
        ("forwarded", "proto=https"),  # an element without for=
        ("forwarded", 'for="[fe80::1%\x85\x9b]"'),  # a zone is free text
        ("x-forwarded-for", "fe80::1%eth0"),
    ],
)
def test_a_hop_that_is_not_an_address_never_becomes_a_trusted_address(header, value):
    """The walk from the right stops at the first hop that does not parse:
    the client is "unknown", not the trusted hop to its right nor the proxy
    itself, so it is not let into /metrics as the proxy would be."""
    gate = make_gate(forwarded_allow_ips=["127.0.0.1"], forwarded_header=header, metrics_path="/metrics")
    name = "X-Forwarded-For" if header == "x-forwarded-for" else "Forwarded"
    seen = decide(gate, plain("/metrics", {name: value}))
    assert seen.address == ("unknown", 0)
    assert status(seen) == 403


def test_an_untrusted_peer_is_the_client_whatever_it_says():
    gate = make_gate(forwarded_allow_ips=["127.0.0.1"], forwarded_header="forwarded")
    seen = decide(gate, upgrade({"Forwarded": "for=127.0.0.1;proto=https"}), peer=OUTSIDER, tls=False)
    assert (seen.address, seen.scheme) == (OUTSIDER, "http")


def test_the_metrics_allow_list_checks_the_forwarded_client_not_the_proxy():
    """The issue's bypass: the proxy marked the request X-Forwarded-For:
    203.0.113.50 and the client added Forwarded: for=127.0.0.1."""
    gate = make_gate(forwarded_allow_ips=["127.0.0.1"], metrics_path="/metrics")
    forged = decide(gate, plain("/metrics", {"X-Forwarded-For": "203.0.113.50", "Forwarded": "for=127.0.0.1"}))
    assert status(forged) == 403
    assert status(decide(gate, plain("/metrics"))) == 200  # the proxy's own scrape (no hop named)


# -- Unix sockets ----------------------------------------------------------------------


@pytest.mark.parametrize("trusted, believed", [(None, False), (["127.0.0.1"], False), (["unix"], True),
                                               (["*"], True), (["10.0.0.0/8, unix"], True)])
def test_a_unix_socket_peer_is_trusted_only_when_told(trusted, believed):
    gate = make_gate(forwarded_allow_ips=trusted)
    seen = decide(gate, upgrade({"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}), peer=UNIX_PEER)
    if believed:
        assert (seen.address, seen.scheme) == (("203.0.113.7", 0), "https")
    else:
        assert (seen.address, seen.scheme) == (UNIX_PEER, "http")


def test_star_trusts_every_tcp_peer_and_unix_trusts_none():
    request = upgrade({"X-Forwarded-For": "203.0.113.7"})
    assert decide(make_gate(forwarded_allow_ips=["*"]), request, peer=OUTSIDER).address == ("203.0.113.7", 0)
    assert decide(make_gate(forwarded_allow_ips=["unix"]), request, peer=OUTSIDER).address == OUTSIDER


def test_the_per_address_limit_counts_clients_behind_a_unix_socket_proxy():
    gate = make_gate(forwarded_allow_ips=["unix"], max_connections_per_ip=1)
    first = object()
    gate.arrive(first)
    admitted = decide(gate, upgrade({"X-Forwarded-For": "203.0.113.7"}), who=first, peer=UNIX_PEER)
    assert status(admitted) is None
    gate.opened(first, admitted.address)
    assert status(decide(gate, upgrade({"X-Forwarded-For": "203.0.113.7"}), peer=UNIX_PEER)) == 429
    assert status(decide(gate, upgrade({"X-Forwarded-For": "203.0.113.8"}), peer=UNIX_PEER)) is None
    gate.leave(first)
    assert status(decide(gate, upgrade({"X-Forwarded-For": "203.0.113.7"}), peer=UNIX_PEER)) is None


# -- limits and what is exempt -----------------------------------------------------------


def test_per_address_limit_refuses_upgrades_only_and_releases_on_leave():
    gate = make_gate(max_connections_per_ip=2, health_path="/healthz", metrics_path="/metrics")
    holders = [object(), object()]
    for who in holders:
        gate.arrive(who)
        admitted = decide(gate, upgrade(), who=who)
        assert status(admitted) is None
        gate.opened(who, admitted.address)
    refused = decide(gate, upgrade())
    assert status(refused) == 429 and ("Retry-After", "5") in refused.response.headers
    assert status(decide(gate, plain("/healthz"))) == 200
    assert status(decide(gate, plain("/metrics"))) == 200
    gate.leave(holders[0])
    assert status(decide(gate, upgrade())) is None


def test_past_max_connections_only_the_health_check_and_metrics_are_answered():
    gate = make_gate(max_connections=1, health_path="/healthz", metrics_path="/metrics")
    inside, past = object(), object()
    assert not gate.at_capacity()
    assert gate.arrive(inside) is None
    assert gate.at_capacity()
    assert gate.arrive(past) is None and gate.waiting(past)
    assert status(decide(gate, upgrade(), who=past)) == 503
    assert status(decide(gate, plain("/healthz"), who=past)) == 200
    assert status(decide(gate, plain("/metrics"), who=past)) == 200
    # An upgrade to the metrics path is a WebSocket, not the operator's view.
    assert status(decide(gate, upgrade(path="/metrics"), who=past)) == 503
    gate.leave(inside)
    gate.leave(past)
    assert not gate.at_capacity()
    later = object()
    assert gate.arrive(later) is None and not gate.waiting(later)


def test_the_oldest_waiter_makes_room_when_the_waiting_room_is_full():
    gate = make_gate(max_connections=4)  # 16 + 4 // 4 = 17 may wait
    inside = [object() for _ in range(4)]
    waiting = [object() for _ in range(17)]
    for who in inside + waiting:
        assert gate.arrive(who) is None
    newcomer = object()
    assert gate.arrive(newcomer) is waiting[0]
    gate.leave(waiting[0])  # the caller closed it
    assert gate.waiting(newcomer) and not gate.waiting(waiting[0])
    for who in inside:  # leaving frees places for the next arrivals, not the waiters
        gate.leave(who)
    assert gate.held == 0


def test_counts_return_to_zero_with_and_without_limits():
    for limits in ({}, {"max_connections": 2, "max_connections_per_ip": 1}):
        gate = make_gate(**limits)
        people = [object() for _ in range(5)]
        for who in people:
            gate.arrive(who)
            admitted = decide(gate, upgrade(), who=who)
            if admitted.response is None:
                gate.opened(who, admitted.address)
        for who in people:
            gate.leave(who)
        assert gate.held == 0 and not gate.waiting(people[-1]) and not gate.at_capacity(), limits
        assert status(decide(gate, upgrade())) is None  # the per-address count was released too


def test_during_shutdown_everything_gets_503():
    gate = make_gate(health_path="/healthz", metrics_path="/metrics")
    for request in (upgrade(), plain("/healthz"), plain("/metrics")):
        assert status(decide(gate, request, shutting_down=True)) == 503


def test_the_gate_chooses_the_subprotocol():
    gate = make_gate(subprotocols=["chat.v2", "chat.v1"])
    assert decide(gate, upgrade({"Sec-WebSocket-Protocol": "chat.v1, chat.v2"})).subprotocol == "chat.v1"

    def chooser(who, offered):
        return offered[-1]

    chosen = decide(make_gate(select_subprotocol=chooser), upgrade({"Sec-WebSocket-Protocol": "a, b"}))
    assert (status(chosen), chosen.subprotocol) == (None, "b")

    def failing(who, offered):
        raise RuntimeError("boom")

    assert status(decide(make_gate(select_subprotocol=failing), upgrade({"Sec-WebSocket-Protocol": "a"}))) == 500


# -- what reaches a log ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, logged",
    [
        ("plain /path?q=1 é", "plain /path?q=1 é"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("\x1b[31m\x00\x7f", "\\x1b[31m\\x00\\x7f"),
        ("\u0085\u009b", "\\x85\\x9b"),
        ("\u2028\u2029\u202e", "\\u2028\\u2029\\u202e"),
        ('say "hi" \\n', 'say \\"hi\\" \\\\n'),
        ("\U000e0001", "\\U000e0001"),
    ],
)
def test_client_text_is_escaped_for_the_log(text, logged):
    assert wsloop._printable(text) == logged
    assert wsloop._printable(text).isprintable()
