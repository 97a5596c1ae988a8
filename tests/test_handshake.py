"""The opening handshake, fed as bytes to the socket-free protocol (RFC 6455 4.2)."""

import pytest

import wsloop
from helpers import KEY, client_frame, make_gate, request_bytes


def feed(data, chunks=None):
    """Feed a request to a new Protocol; return (protocol, events)."""
    protocol = wsloop.Protocol()
    events = []
    pieces = [data] if chunks is None else [data[i : i + chunks] for i in range(0, len(data), chunks)]
    for piece in pieces:
        protocol.receive_data(piece)
        events.extend(protocol.events())
    return protocol, events


def status_of(protocol):
    head = bytes(protocol.outgoing).split(b"\r\n", 1)[0]
    return int(head.split(b" ")[1])


def test_accept_key_matches_rfc_example():
    assert wsloop.accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_valid_request_yields_request_and_101_on_accept():
    protocol, events = feed(request_bytes("/chat?room=1", {"X-Custom": "yes"}))
    assert [kind for kind, _ in events] == [wsloop.Event.REQUEST]
    request = events[0][1]
    assert (request.method, request.path, request.query) == ("GET", "/chat", "room=1")
    assert request.headers.get("x-custom") == "yes"
    assert protocol.state is wsloop.State.CONNECTING
    protocol.accept([("Set-Cookie", "a=b")], subprotocol="chat")
    response = protocol.data_to_send()
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert b"\r\nSet-Cookie: a=b\r\n" in response
    assert b"\r\nSec-WebSocket-Protocol: chat\r\n" in response
    assert protocol.subprotocol == "chat"
    assert response.endswith(b"\r\n\r\n")
    assert protocol.state is wsloop.State.OPEN


def test_request_fed_one_byte_at_a_time():
    protocol, events = feed(request_bytes(), chunks=1)
    assert [kind for kind, _ in events] == [wsloop.Event.REQUEST]


def test_frames_in_the_same_segment_as_the_request_are_kept():
    protocol = wsloop.Protocol()
    protocol.receive_data(request_bytes() + client_frame(1, "early") + client_frame(2, b"bird"))
    events = protocol.events()
    kind, _ = next(events)
    assert kind is wsloop.Event.REQUEST
    protocol.accept()
    assert list(events) == [(wsloop.Event.TEXT, "early"), (wsloop.Event.BINARY, b"bird")]


def test_connection_header_is_a_token_list_in_any_case():
    _, events = feed(request_bytes(headers={"Connection": "keep-alive, UPGRADE", "Upgrade": "WebSocket"}))
    assert events and events[0][0] is wsloop.Event.REQUEST


@pytest.mark.parametrize(
    "data, status",
    [
        (request_bytes(method="POST"), 405),
        (request_bytes(version="HTTP/1.0"), 505),
        (request_bytes(version="HTTP/x.y"), 400),
        (request_bytes(version="HTTP/1.1 extra"), 400),
        (request_bytes(omit=["Host"]), 400),
        (request_bytes(headers={"Upgrade": "h2c"}), 400),
        (request_bytes(omit=["Connection"]), 400),
        (request_bytes(headers={"Connection": "keep-alive"}), 400),
        (request_bytes(headers={"Sec-WebSocket-Version": "8"}), 426),
        (request_bytes(omit=["Sec-WebSocket-Version"]), 426),
        (request_bytes(omit=["Sec-WebSocket-Key"]), 400),
        (request_bytes(headers={"Sec-WebSocket-Key": "not base64 at all!!!!!!!"}), 400),
        (request_bytes(headers={"Sec-WebSocket-Key": "AAAAAAAAAAAAAAAAAAAAAA=="}), 101),  # any 16 bytes do
        (request_bytes(headers={"Sec-WebSocket-Key": "AAAAAAAAAAAAAAAAAAAA"}), 400),  # 15 bytes
        (request_bytes(path="relative"), 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),  # space before the colon
        (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),  # obsolete line folding
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n", 400),  # control character
        (b"GET /\r\n\r\n", 400),
    ],
)
def test_bad_requests_get_the_right_status(data, status):
    protocol, events = feed(data)
    if status == 101:
        assert events[0][0] is wsloop.Event.REQUEST
        return
    assert events == []
    assert status_of(protocol) == status
    assert protocol.state is wsloop.State.CLOSED
    assert protocol.handshake_error.status == status


def test_plain_http_get_is_an_event_the_application_answers():
    protocol, events = feed(b"GET /page?x=1 HTTP/1.1\r\nHost: example\r\n\r\n")
    assert [kind for kind, _ in events] == [wsloop.Event.HTTP_REQUEST]
    assert events[0][1].path == "/page"
    with pytest.raises(RuntimeError):
        protocol.accept()  # not an upgrade: nothing to accept
    with pytest.raises(wsloop.InvalidState):  # the same error, by its name
        protocol.accept()
    protocol.respond(200, [("Content-Type", "text/html")], b"<p>hi</p>")
    response = protocol.data_to_send()
    assert response.startswith(b"HTTP/1.1 200 OK\r\n") and response.endswith(b"\r\n\r\n<p>hi</p>")
    assert b"\r\nContent-Length: 9\r\n" in response
    assert protocol.state is wsloop.State.CLOSED


def test_426_for_wrong_version_names_13():
    protocol, _ = feed(request_bytes(headers={"Sec-WebSocket-Version": "8"}))
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in bytes(protocol.outgoing)


def test_tls_client_hello_gets_400_without_waiting_for_more():
    protocol, _ = feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert status_of(protocol) == 400


def test_request_line_limit():
    ok_line = "/" + "a" * (wsloop.MAX_REQUEST_LINE - len("GET / HTTP/1.1") - 0)
    protocol, events = feed(request_bytes(path=ok_line))
    assert len(b"GET %s HTTP/1.1" % ok_line.encode()) == wsloop.MAX_REQUEST_LINE
    assert events and events[0][0] is wsloop.Event.REQUEST
    protocol, _ = feed(request_bytes(path=ok_line + "a"))
    assert status_of(protocol) == 414
    # Also while the line is still arriving, before any CRLF:
    protocol, _ = feed(b"GET /" + b"a" * wsloop.MAX_REQUEST_LINE)
    assert status_of(protocol) == 414


def test_header_line_limit():
    filler = "x" * (wsloop.MAX_HEADER_LINE - len("X-Big: "))
    _, events = feed(request_bytes(headers={"X-Big": filler}))
    assert events and events[0][0] is wsloop.Event.REQUEST
    protocol, _ = feed(request_bytes(headers={"X-Big": filler + "x"}))
    assert status_of(protocol) == 431
    protocol, _ = feed(request_bytes()[:-4] + b"\r\nX-Big: " + b"x" * wsloop.MAX_HEADER_LINE)
    assert status_of(protocol) == 431


def test_header_count_limit():
    base = 5  # the handshake's own headers
    fits = {"X-%d" % i: "v" for i in range(wsloop.MAX_HEADERS - base)}
    _, events = feed(request_bytes(headers=fits))
    assert events and events[0][0] is wsloop.Event.REQUEST
    fits["X-one-more"] = "v"
    protocol, _ = feed(request_bytes(headers=fits))
    assert status_of(protocol) == 431
    # Enforced before the head ends, too:
    partial = request_bytes(headers=fits)[:-2]
    protocol, _ = feed(partial, chunks=100)
    assert status_of(protocol) == 431


def test_whole_head_limit():
    headers = {"X-%d" % i: "v" * 600 for i in range(110)}  # 110 lines of ~610 bytes > 64 KiB
    protocol, _ = feed(request_bytes(headers=headers))
    assert status_of(protocol) == 431
    protocol, _ = feed(request_bytes(headers=headers)[: wsloop.MAX_REQUEST_HEAD + 10], chunks=4096)
    assert status_of(protocol) == 431


# -- the server's handshake policy, socket-free ---------------------------------


def answer(data, gate, shutting_down=False, peer=("127.0.0.1", 40000), tls=False):
    """The gate's answer to a request given as bytes: a Response or None."""
    protocol, events = feed(data)
    assert len(events) == 1, "the request itself must be valid here"
    return gate.decide(object(), events[0][1], protocol.is_upgrade, peer, tls, shutting_down).response


PLAIN_GET = b"GET %s HTTP/1.1\r\nHost: example.com:8765\r\n\r\n"


def test_policy_lets_a_plain_upgrade_go_on():
    assert answer(request_bytes(), make_gate()) is None


@pytest.mark.parametrize("data", [request_bytes(), PLAIN_GET % b"/healthz"])
def test_policy_answers_503_to_everything_while_shutting_down(data):
    response = answer(data, make_gate(health_path="/healthz"), shutting_down=True)
    assert response.status == 503 and ("Retry-After", "5") in response.headers


@pytest.mark.parametrize(
    "origin, allowed, expected",
    [
        ("https://app.example", ["https://app.example"], None),
        ("https://evil.example", ["https://app.example"], 403),
        (None, ["https://app.example"], 403),
        (None, ["https://app.example", None], None),
        ("https://evil.example", None, None),  # no list: every origin
    ],
)
def test_policy_checks_the_origin_of_upgrades(origin, allowed, expected):
    headers = {"Origin": origin} if origin else {}
    response = answer(request_bytes(headers=headers), make_gate(origins=allowed))
    assert (response and response.status) == expected
    if expected:
        assert (origin or "(none)") in response.body.decode()


def test_policy_answers_the_health_check_pages_and_426():
    pages = {"/": ("text/html", b"<p>hi</p>")}
    options = make_gate(health_path="/healthz", pages=pages)
    health = answer(PLAIN_GET % b"/healthz", options)
    assert (health.status, health.body) == (200, b"ok\n")
    page = answer(PLAIN_GET % b"/", options)
    assert (page.status, page.body) == (200, b"<p>hi</p>")
    assert ("Content-Type", "text/html") in page.headers
    other = answer(PLAIN_GET % b"/nothing", options)
    assert other.status == 426 and ("Upgrade", "websocket") in other.headers


@pytest.mark.parametrize(
    "allowed, secure, expected",
    [
        (["http://example.com:8765"], False, 200),
        (["https://example.com:8765"], True, 200),
        (["https://example.com:8765"], False, 403),  # the page's origin is http://
        (["https://other.example"], False, 403),
    ],
)
def test_policy_serves_a_page_only_where_its_own_origin_is_allowed(allowed, secure, expected):
    gate = make_gate(pages={"/": ("text/html", b"page")}, origins=allowed)
    response = answer(PLAIN_GET % b"/", gate, tls=secure)
    assert response.status == expected
    if expected == 403:
        assert b"example.com:8765" in response.body


def test_head_gets_the_headers_of_get_and_no_body():
    protocol, events = feed(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [kind for kind, _ in events] == [wsloop.Event.HTTP_REQUEST]
    protocol.respond(200, [("Cache-Control", "no-store")], b"ok\n")
    data = protocol.data_to_send()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nContent-Length: 3\r\n" in head + b"\r\n" and body == b""


def test_a_head_upgrade_is_refused_405():
    protocol, events = feed(request_bytes(method="HEAD"))
    assert events == [] and status_of(protocol) == 405


def test_one_connection_header_when_a_response_names_one():
    protocol, _ = feed(PLAIN_GET % b"/")
    protocol.respond(426, [("Upgrade", "websocket"), ("Connection", "Upgrade")])
    head = protocol.data_to_send().split(b"\r\n\r\n")[0].split(b"\r\n")
    assert [line for line in head if line.lower().startswith(b"connection:")] == [b"Connection: Upgrade, close"]
