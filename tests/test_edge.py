"""The HTTP edge: TLS in the loop, the handshake hook, origins, subprotocols,
the health check and plain pages."""

import gc
import logging
import socket
import ssl
import threading

import pytest
import trustme

import wsloop
from helpers import TIMEOUT, Client, Recorder, connected, http_get, request_bytes, running_server


@pytest.fixture(scope="module")
def tls():
    """A CA made for this test run, a server context, and a client context that trusts it."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context, ca, cert


def still_open(sock):
    """True if the peer has neither closed nor sent anything (checked without blocking)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True


# -- TLS ----------------------------------------------------------------------


def test_echo_over_tls_with_messages_larger_than_a_record(tls):
    server_context, client_context, _, _ = tls
    with running_server(ssl_context=server_context, max_size=2**22) as server:
        client = Client(server.port, ssl_context=client_context)
        big = bytes(range(256)) * 4096  # 1 MiB: many TLS records
        client.send_binary(big)
        assert client.recv_message() == big
        client.send_text("small")
        assert client.recv_message() == "small"


def test_silent_and_byte_by_byte_tls_clients_do_not_block_others(tls):
    server_context, client_context, _, _ = tls
    with running_server(ssl_context=server_context, open_timeout=30) as server:
        silent = socket.create_connection(("127.0.0.1", server.port))
        # A real ClientHello, made in memory, sent one byte at a time and never finished.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls_object = client_context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            tls_object.do_handshake()
        hello = outgoing.read()
        dribbler = socket.create_connection(("127.0.0.1", server.port))
        for byte in hello[: len(hello) // 2]:
            dribbler.send(bytes([byte]))
        client = Client(server.port, ssl_context=client_context)
        client.send_text("not held up")
        assert client.recv_message() == "not held up"
        assert still_open(silent)
        assert still_open(dribbler)
        silent.close()
        dribbler.close()


def test_plain_http_on_the_tls_port_is_closed_with_one_log_line(tls, caplog):
    server_context, client_context, _, _ = tls
    with caplog.at_level(logging.INFO, logger="wsloop"):
        with running_server(ssl_context=server_context) as server:
            plain = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            plain.sendall(request_bytes())
            try:
                assert plain.recv(100) == b""
            except ConnectionResetError:
                pass  # closed either way
            client = Client(server.port, ssl_context=client_context)
            client.send_text("fine")
            assert client.recv_message() == "fine"
    failures = [r for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is None
    assert "Traceback" not in caplog.text


def test_open_timeout_covers_the_tls_handshake(tls):
    server_context, _, _, _ = tls
    with running_server(ssl_context=server_context, open_timeout=0.3) as server:
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        assert silent.recv(100) == b""  # closed by the server


# -- the handshake hook -----------------------------------------------------------

def test_hook_refuses_with_401_and_accepts_with_headers():
    class Password(wsloop.Handler):
        def on_handshake(self, conn):
            if conn.query != "let-me-in":
                return wsloop.Response(401, "token required\n", [("WWW-Authenticate", "Bearer")])
            return wsloop.Response(101, headers=[("Set-Cookie", "session=ok; HttpOnly; Secure")])

        def on_message(self, conn, message):
            conn.send(message)

    with running_server(Password()) as server:
        refused = Client(server.port, handshake=False)
        refused.sock.sendall(request_bytes("/?wrong"))
        status, head, body = refused.read_http_response()
        assert status == 401
        assert body == b"token required\n"
        assert "\r\nWWW-Authenticate: Bearer" in head
        accepted = Client(server.port, path="/?let-me-in")
        assert b"\r\nSet-Cookie: session=ok; HttpOnly; Secure\r\n" in accepted.response_head
        accepted.send_text("in")
        assert accepted.recv_message() == "in"


def test_a_refusals_log_reason_reaches_the_log_escaped_and_never_the_wire(caplog):
    caplog.set_level(logging.INFO, logger="wsloop")

    class Tokens(wsloop.Handler):
        def on_handshake(self, conn):
            refusal = wsloop.Response(403, "no\n")
            if conn.query == "expired":
                refusal.log_reason = "token expired\r\nFAKE LINE"
            return refusal

    with running_server(Tokens()) as server:
        for query in ("expired", "other"):
            refused = Client(server.port, handshake=False)
            refused.sock.sendall(request_bytes("/?" + query))
            status, head, body = refused.read_http_response()
            assert status == 403
            assert "expired" not in head
            assert b"expired" not in body
    answered = [r.getMessage() for r in caplog.records if "answered 403" in r.getMessage()]
    assert len(answered) == 2, answered
    assert answered[0].endswith(": token expired\\x0d\\x0aFAKE LINE"), answered[0]
    assert answered[1].endswith(": refused by on_handshake"), answered[1]


def test_query_params_are_parsed_like_parse_qs():
    seen = []

    class Note(wsloop.Handler):
        def on_handshake(self, conn):
            seen.append((conn.query_params, conn.request.query_params))

    query = "a=1&a=2&b=&c=x+y&d=%2F%C3%A9&e"
    expected = {"a": ["1", "2"], "b": [""], "c": ["x y"], "d": ["/\u00e9"], "e": [""]}
    with running_server(Note()) as server:
        Client(server.port, path="/p?" + query)
        Client(server.port, path="/p")
    assert seen == [(expected, expected), ({}, {})]


def test_request_after_the_handshake_is_what_on_handshake_saw_from_any_thread_and_after_close():
    """An open connection keeps its request only as the head's bytes (and
    nothing else of its handshake) and builds conn.request, path, query,
    query_params and headers from them again: each equal to what
    on_handshake read, from another thread and after the close too (an
    absolute-form target, a repeated header, a Latin-1 value, a
    percent-encoded query)."""
    seen = []

    class Note(Recorder):
        def on_handshake(self, conn):
            seen.append(read(conn))

    def read(conn):
        request = conn.request
        return (request.method, request.target, request.version, request.path, request.query,
                request.headers.items(), conn.path, conn.query, conn.query_params, conn.headers.items())

    head = (request_bytes("ws://localhost:8765/chat?room=1&a=%20b&a=2")[:-2]
            + b"X-Twice: one \r\nX-Twice:two\r\nUser-Agent: caf\xe9\r\n\r\n")
    recorder = Note()
    with running_server(recorder) as server:
        client = Client(server.port, handshake=False)
        client.sock.sendall(head)
        assert client.read_head().startswith(b"HTTP/1.1 101 "), "not upgraded"
        conn = connected(recorder, 1)[0]
        expected = seen[0]
        assert expected[:3] == ("GET", "/chat?room=1&a=%20b&a=2", (1, 1)), expected
        assert expected[8] == {"room": ["1"], "a": [" b", "2"]}, expected
        assert expected[9][-3:] == [("X-Twice", "one"), ("X-Twice", "two"), ("User-Agent", "caf\xe9")], expected
        protocol = conn._protocol
        held = [item for item in gc.get_referents(protocol) if isinstance(item, (wsloop.Request, wsloop._Handshake))]
        assert held == [], "the open connection still holds its parsed request or handshake state"
        assert (protocol.opened, protocol.is_upgrade, protocol.handshake_error, protocol.response) == (True, True, None, None)
        assert read(conn) == expected, "rebuilt from another thread"
        assert conn.headers.get("x-twice") == "one, two"
        client.close()
        assert recorder.close_event.wait(TIMEOUT), "on_close did not run"
        assert read(conn) == expected, "rebuilt after the close"


def test_hook_that_raises_gets_500_and_the_server_goes_on(caplog):
    class Broken(wsloop.Handler):
        def on_handshake(self, conn):
            raise ValueError("hook bug")

    with caplog.at_level(logging.ERROR, logger="wsloop"):
        with running_server(Broken()) as server:
            client = Client(server.port, handshake=False)
            client.sock.sendall(request_bytes())
            assert client.read_http_response()[0] == 500
    assert caplog.text.count("ValueError: hook bug") == 1


def test_response_headers_on_every_101():
    with running_server(response_headers=[("X-Served-By", "wsloop")]) as server:
        assert b"\r\nX-Served-By: wsloop\r\n" in Client(server.port).response_head


# -- origins ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "allowed, origin, status",
    [
        (["https://app.example"], "https://app.example", 101),
        (["https://app.example"], "https://evil.example", 403),
        (["https://app.example"], None, 403),
        (["https://app.example", None], None, 101),
        (None, "https://anyone.example", 101),
    ],
)
def test_origin_allow_list(allowed, origin, status):
    with running_server(origins=allowed) as server:
        client = Client(server.port, handshake=False)
        client.sock.sendall(request_bytes(headers={"Origin": origin} if origin else None))
        head = client.read_head()
        assert int(head.split(b" ")[1]) == status


# -- subprotocols ------------------------------------------------------------------


def test_subprotocol_first_offered_that_the_server_speaks():
    seen = []

    class Note(wsloop.Handler):
        def on_connect(self, conn):
            seen.append(conn.subprotocol)

    with running_server(Note(), subprotocols=["chat.v2", "chat.v1"]) as server:
        client = Client(server.port, headers={"Sec-WebSocket-Protocol": "mqtt, chat.v1, chat.v2"})
        assert b"\r\nSec-WebSocket-Protocol: chat.v1\r\n" in client.response_head
        none = Client(server.port, headers={"Sec-WebSocket-Protocol": "mqtt"})
        assert b"Sec-WebSocket-Protocol" not in none.response_head
        plain = Client(server.port)
        assert b"Sec-WebSocket-Protocol" not in plain.response_head
    # on_connect runs before the 101 goes out, so all three are in.
    assert seen == ["chat.v1", None, None]


def test_subprotocol_chosen_by_a_function_must_be_offered():
    def choose(conn, offered):
        return "graphql-ws" if conn.path == "/graphql" else "not-offered"

    with running_server(select_subprotocol=choose) as server:
        client = Client(server.port, path="/graphql", headers={"Sec-WebSocket-Protocol": "graphql-ws"})
        assert b"\r\nSec-WebSocket-Protocol: graphql-ws\r\n" in client.response_head
        other = Client(server.port, path="/x", headers={"Sec-WebSocket-Protocol": "graphql-ws"})
        assert b"Sec-WebSocket-Protocol" not in other.response_head


# -- plain HTTP: health check and pages ---------------------------------------------


def test_health_check_and_pages_and_426_for_the_rest():
    pages = {"/": ("text/html; charset=utf-8", b"<h1>hi</h1>")}
    with running_server(health_path="/healthz", pages=pages) as server:
        assert http_get(server.port, "/healthz")[0::2] == (200, b"ok\n")
        status, head, body = http_get(server.port, "/")
        assert (status, body) == (200, b"<h1>hi</h1>")
        assert "text/html" in head
        assert http_get(server.port, "/other")[0] == 426


def test_health_check_says_503_during_shutdown():
    server = wsloop.Server(port=0, health_path="/healthz", close_timeout=1)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        waiting = Client(server.port, handshake=False)
        waiting.sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # and the rest later
        # The backlog is FIFO: once a later client is answered, "waiting" was accepted.
        assert http_get(server.port, "/healthz")[0::2] == (200, b"ok\n")
        server.shutdown()
        began = threading.Event()
        server.call_soon_threadsafe(began.set)  # runs after the shutdown began
        assert began.wait(TIMEOUT)
        waiting.sock.sendall(b"Host: x\r\n\r\n")
        assert waiting.read_http_response()[0] == 503
        with pytest.raises(OSError):  # and the port no longer accepts
            socket.create_connection(("127.0.0.1", server.port), timeout=1).recv(1)
        waiting.shutdown()  # the server reads to our EOF before it lets go: give it
    finally:
        server.shutdown()
        thread.join(10)
        server.close()


def header_values(head, name):
    """Every value of header ``name`` in a response head (str), in order."""
    values = []
    for line in head.split("\r\n")[1:]:
        field, colon, value = line.partition(":")
        if colon and field.strip().lower() == name.lower():
            values.append(value.strip())
    return values


def test_head_on_the_health_check_gets_the_headers_without_the_body():
    with running_server(health_path="/healthz") as server:
        status, head, body = http_get(server.port, "/healthz")
        assert (status, body) == (200, b"ok\n")
        client = Client(server.port, handshake=False)
        client.sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, head, body = client.read_http_response()  # reads to EOF
        assert status == 200, head
        assert header_values(head, "Content-Length") == [str(len(b"ok\n"))]
        assert body == b""


def test_426_for_a_plain_request_has_one_connection_header():
    with running_server(health_path="/healthz") as server:
        status, head, body = http_get(server.port, "/not-a-page")
    assert status == 426
    connection = header_values(head, "Connection")
    assert len(connection) == 1, head  # RFC 9110 5.3: one field line, or one list
    tokens = {token.strip().lower() for token in connection[0].split(",")}
    assert tokens == {"upgrade", "close"}, head
    assert [value.lower() for value in header_values(head, "Upgrade")] == ["websocket"], head


# -- what the operator sees in the log --------------------------------------------


def logged_after_loop_pass(server):
    """Wait until the loop has finished what it was doing (logging included)."""
    passed = threading.Event()
    server.call_soon_threadsafe(passed.set)
    assert passed.wait(5)


def info_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "wsloop" and r.levelno == logging.INFO]


def test_close_is_logged_with_address_and_both_codes_and_reasons(caplog):
    class Bye(wsloop.Handler):
        def __init__(self):
            self.closed = threading.Event()

        def on_message(self, conn, message):
            conn.close(4000, "server says bye")

        def on_close(self, conn, code, reason):
            self.closed.set()

    handler = Bye()
    with caplog.at_level(logging.INFO, logger="wsloop"):
        with running_server(handler) as server:
            client = Client(server.port)
            client_port = client.sock.getsockname()[1]
            client.send_text("bye?")
            assert client.expect_close() == (4000, "server says bye")
            client.close(4001, b"client says bye")
            assert handler.closed.wait(5)  # on_close runs after the line is logged
    lines = [line for line in info_lines(caplog) if "4000" in line and "4001" in line]
    assert len(lines) == 1, info_lines(caplog)
    line = lines[0]
    assert "127.0.0.1" in line, line
    assert str(client_port) in line, line
    assert "server says bye" in line, line
    assert "client says bye" in line, line


def test_refused_origin_is_logged_with_the_origin(caplog):
    with caplog.at_level(logging.INFO, logger="wsloop"):
        with running_server(origins=["https://a.example"]) as server:
            client = Client(server.port, handshake=False)
            client.sock.sendall(request_bytes(headers={"Origin": "https://evil.example"}))
            assert client.read_http_response()[0] == 403  # to EOF: the server is done with it
            logged_after_loop_pass(server)
            lines = [line for line in info_lines(caplog) if "https://evil.example" in line]
    assert len(lines) == 1, info_lines(caplog)


def test_open_timeout_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="wsloop"):
        with running_server(open_timeout=0.3) as server:
            silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            assert silent.recv(100) == b""  # dropped by the server
            logged_after_loop_pass(server)
            lines = [line for line in info_lines(caplog) if "timed out" in line or "timeout" in line]
    assert len(lines) == 1, info_lines(caplog)
