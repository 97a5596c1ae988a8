"""The HTTP edge: TLS in the loop, the handshake hook, origins, subprotocols,
the health check and plain pages."""

import importlib.util
import logging
import os
import socket
import ssl
import threading

import pytest
import trustme

import wsloop
from helpers import Client, request_bytes, running_server


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
        assert still_open(silent) and still_open(dribbler)
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
    assert len(failures) == 1 and failures[0].exc_info is None
    assert "Traceback" not in caplog.text


def test_open_timeout_covers_the_tls_handshake(tls):
    server_context, _, _, _ = tls
    with running_server(ssl_context=server_context, open_timeout=0.3) as server:
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        assert silent.recv(100) == b""  # closed by the server


# -- the handshake hook -----------------------------------------------------------

def load_example(name):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", name + ".py")
    spec = importlib.util.spec_from_file_location("example_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its serve() call is behind __main__
    return module


token_auth = load_example("token_auth")  # the README's example, as it stands
TokenAuth, TOKEN = token_auth.TokenAuth, token_auth.TOKEN.decode()


def test_hook_refuses_with_401_and_accepts_with_headers():
    with running_server(TokenAuth()) as server:
        refused = Client(server.port, path="/?token=wrong", handshake=False)
        refused.sock.sendall(request_bytes("/?token=wrong"))
        status, head, body = refused.read_http_response()
        assert status == 401 and body == b"token required\n"
        assert "\r\nWWW-Authenticate: Bearer" in head
        accepted = Client(server.port, path="/?token=" + TOKEN)
        assert b"\r\nSet-Cookie: session=ok; HttpOnly; Secure\r\n" in accepted.response_head
        accepted.send_text("in")
        assert accepted.recv_message() == "in"


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


def http_get(port, path):
    client = Client(port, handshake=False)
    client.sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    return client.read_http_response()


def test_health_check_and_pages_and_426_for_the_rest():
    pages = {"/": ("text/html; charset=utf-8", b"<h1>hi</h1>")}
    with running_server(health_path="/healthz", pages=pages) as server:
        assert http_get(server.port, "/healthz")[0::2] == (200, b"ok\n")
        status, head, body = http_get(server.port, "/")
        assert (status, body) == (200, b"<h1>hi</h1>") and "text/html" in head
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
        assert began.wait(5)
        waiting.sock.sendall(b"Host: x\r\n\r\n")
        assert waiting.read_http_response()[0] == 503
        with pytest.raises(OSError):  # and the port no longer accepts
            socket.create_connection(("127.0.0.1", server.port), timeout=1).recv(1)
    finally:
        server.shutdown()
        thread.join(10)
        server.close()
