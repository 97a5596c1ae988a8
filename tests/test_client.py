"""The client role: ``Protocol(client=True)`` without sockets, and ``connect()``
over loopback.

Socket-free tests feed a client Protocol handcrafted server bytes (every way
a 101 can be wrong, refusals, bad frames, a stream split at every byte) and
decode what it sends by hand, so that masking is checked against RFC 6455
rather than against wsloop's own codec.  Loopback tests run ``connect()``
against wsloop's server, against small raw-socket fake servers written here
(for what wsloop's server never does: fragments, silence, a slow close), and
against the ``websockets`` package's server for interop.

Every wait is bounded: socket timeouts, ``recv(timeout=...)``, joins with a
timeout, and events rather than sleeps.
"""

import base64
import collections
import contextlib
import socket
import select
import selectors
import ssl
import struct
import threading
import time
import zlib
from contextlib import contextmanager

import pytest
import trustme

import wsloop
from helpers import TIMEOUT, TIMEOUT_SCALE, Recorder, Worker, client_frame, close_payload, connected, mask_bytes, running_server

Event = wsloop.Event
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10
RSV1 = 4  # the RSV bits as helpers.client_frame takes them: RSV1 << 4 == 0x40


# -- helpers: handshake bytes -------------------------------------------------


def new_client(compression=None, max_size=wsloop.DEFAULT_MAX_SIZE, **request):
    """A client Protocol that has queued its request: (protocol, request bytes)."""
    client = wsloop.Protocol(max_size=max_size, compression=compression, client=True)
    client.request_upgrade(request.pop("host", "example.com"), request.pop("target", "/"), **request)
    return client, client.data_to_send()


def request_fields(request):
    """(request line, {lowercased name: value}) of request bytes, parsed by hand."""
    head = request.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.lower()] = value.strip()
    return head[0], fields


def switching(request, changes=None, extra=()):
    """A 101 answer to ``request``: the valid fields updated by ``changes``
    (a value of None removes the field), then the ``extra`` (name, value) lines."""
    key = request_fields(request)[1]["sec-websocket-key"]
    fields = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Accept": wsloop.accept_key(key)}
    for name, value in (changes or {}).items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    lines = ["HTTP/1.1 101 Switching Protocols"] + ["%s: %s" % item for item in list(fields.items()) + list(extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def feed(protocol, data=b""):
    """Give ``protocol`` bytes and return every event they complete."""
    if data:
        protocol.receive_data(data)
    return list(protocol.events())


def opened_client(max_size=wsloop.DEFAULT_MAX_SIZE, extensions=None):
    """A client Protocol that a handcrafted 101 opened (``extensions``: the
    server's Sec-WebSocket-Extensions answer; compression is offered if given)."""
    compression = wsloop.Deflate() if extensions else None
    client, request = new_client(compression, max_size)
    changes = {"Sec-WebSocket-Extensions": extensions} if extensions else None
    assert [kind for kind, _ in feed(client, switching(request, changes))] == [Event.RESPONSE]
    return client


def connected_pair(compression=None):
    """A client and a server Protocol that completed the handshake with each other."""
    client, request = new_client(compression)
    server = wsloop.Protocol(compression=compression)
    [(kind, _)] = feed(server, request)
    assert kind is Event.REQUEST
    server.accept()
    assert [kind for kind, _ in feed(client, server.data_to_send())] == [Event.RESPONSE]
    return client, server


# -- helpers: frames ----------------------------------------------------------


def server_frame(opcode, payload=b"", fin=True, rsv=0):
    """An unmasked (server-to-client) frame, built the slow, obvious way."""
    return client_frame(opcode, payload, fin=fin, rsv=rsv, masked=False)


Frame = collections.namedtuple("Frame", "fin rsv opcode mask payload")


def parse_client_frame(data):
    """One client frame from the start of ``data``: (Frame, size), or None if
    incomplete.  Fails the test if the frame is not masked (RFC 6455 5.3)."""
    if len(data) < 2:
        return None
    first, second = data[0], data[1]
    assert second & 0x80, "client frame not masked: %r" % data[:16]
    length, head = second & 0x7F, 2
    if length == 126:
        if len(data) < 4:
            return None
        length, head = struct.unpack_from("!H", data, 2)[0], 4
    elif length == 127:
        if len(data) < 10:
            return None
        length, head = struct.unpack_from("!Q", data, 2)[0], 10
    end = head + 4 + length
    if len(data) < end:
        return None
    mask = bytes(data[head : head + 4])
    payload = mask_bytes(data[head + 4 : end], mask)
    return Frame(bool(first & 0x80), (first >> 4) & 7, first & 0x0F, mask, payload), end


def client_frames(data):
    """Every frame in ``data``, which must hold whole client frames only."""
    frames = []
    while data:
        parsed = parse_client_frame(data)
        assert parsed is not None, "partial frame at the end: %r" % data[:16]
        frames.append(parsed[0])
        data = data[parsed[1] :]
    return frames


def close_code(frame):
    assert frame.opcode == CLOSE
    return struct.unpack("!H", frame.payload[:2])[0]


# -- helpers: fake servers and threads ----------------------------------------


class RawPeer:
    """The server's end of one TCP connection, spoken byte by byte."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    def _read_more(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the client closed TCP")
        self.buffer += chunk

    def read_request(self):
        while b"\r\n\r\n" not in self.buffer:
            self._read_more()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"

    def accept(self, extra=()):
        """Read the request, answer a valid 101; return the request bytes."""
        request = self.read_request()
        self.sock.sendall(switching(request, extra=extra))
        return request

    def send(self, data):
        self.sock.sendall(data)

    def recv_frame(self):
        while True:
            parsed = parse_client_frame(self.buffer)
            if parsed is not None:
                self.buffer = self.buffer[parsed[1] :]
                return parsed[0]
            self._read_more()

    def recv_frame_skipping_pings(self):
        while True:
            frame = self.recv_frame()
            if frame.opcode not in (PING, PONG):
                return frame

    def read_until_eof(self):
        """What the client sends until it ends its side of TCP."""
        data = self.buffer
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def finish_close(self):
        """Wait for the client's close frame and echo its code (the script
        then returns, which closes TCP from the server's side)."""
        frame = self.recv_frame_skipping_pings()
        assert frame.opcode == CLOSE, frame
        self.send(server_frame(CLOSE, frame.payload[:2]))
        return frame


class FakeServer:
    """A listening socket whose connections, one after another, each run
    the next of ``scripts(RawPeer)`` on a thread; leaving the ``with`` block
    joins it and re-raises its failure."""

    def __init__(self, *scripts):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.url = "ws://127.0.0.1:%d/" % self.port
        self.error = None
        self._scripts = scripts
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            for script in self._scripts:
                sock, _ = self.listener.accept()
                with sock:
                    sock.settimeout(TIMEOUT)
                    script(RawPeer(sock))
        except BaseException as exc:  # re-raised in the test's thread by __exit__
            self.error = exc

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._thread.join(3 * TIMEOUT)
        self.listener.close()
        assert not self._thread.is_alive(), "fake server script did not finish"
        if self.error is not None and exc_info[0] is None:
            raise self.error


def run_threads(*targets):
    """Run each function on its own thread; join them all (bounded) and
    re-raise the first exception any of them raised."""
    errors = []

    def run(target):
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(target,), daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(6 * TIMEOUT)
        assert not thread.is_alive(), "thread did not finish"
    if errors:
        raise errors[0]


def ws_url(server, target="/"):
    return "ws://127.0.0.1:%d%s" % (server.port, target)


class CloseOnRequest(wsloop.Handler):
    """Closes with the code and reason a message asks for: "4001 reason"."""

    def on_message(self, conn, message):
        code, _, reason = message.partition(" ")
        conn.close(int(code), reason)


# =============================================================================
# The request (socket-free)
# =============================================================================


def test_request_is_an_upgrade_that_wsloops_server_accepts():
    client, request = new_client(
        wsloop.Deflate(),
        target="/chat?x=1",
        headers=[("X-Token", "abc"), ("User-Agent", "test/1")],
        subprotocols=["chat", "superchat"],
        origin="https://example.com",
    )
    server = wsloop.Protocol(compression=wsloop.Deflate())
    [(kind, parsed)] = feed(server, request)
    assert kind is Event.REQUEST
    assert (parsed.method, parsed.target, parsed.path, parsed.query) == ("GET", "/chat?x=1", "/chat", "x=1")
    headers = parsed.headers
    assert headers.get("Host") == "example.com"
    assert headers.get("Origin") == "https://example.com"
    assert headers.get("Sec-WebSocket-Protocol") == "chat, superchat"
    assert headers.get("Sec-WebSocket-Extensions") == "permessage-deflate; client_max_window_bits"
    assert headers.get("Sec-WebSocket-Version") == "13"
    assert headers.get("X-Token") == "abc"
    assert headers.get("User-Agent") == "test/1"
    # ...and the server's answer opens the client with what was negotiated.
    server.accept(subprotocol="superchat")
    assert [kind for kind, _ in feed(client, server.data_to_send())] == [Event.RESPONSE]
    assert client.state is wsloop.State.OPEN
    assert client.subprotocol == "superchat"
    assert client.extension is not None


def test_key_is_16_random_bytes_in_base64():
    keys = [request_fields(new_client()[1])[1]["sec-websocket-key"] for _ in range(2)]
    for key in keys:
        assert len(key) == 24
        assert len(base64.b64decode(key, validate=True)) == 16
    assert keys[0] != keys[1]


def test_request_without_options_has_no_optional_headers():
    line, fields = request_fields(new_client(target="/")[1])
    assert line == "GET / HTTP/1.1"
    assert fields["upgrade"] == "websocket"
    assert fields["connection"] == "Upgrade"
    for name in ("origin", "sec-websocket-protocol", "sec-websocket-extensions"):
        assert name not in fields


@pytest.mark.parametrize(
    "request_options",
    [
        {"headers": [("X-A", "a\r\nEvil: 1")]},
        {"headers": [("X-A", "a\nb")]},
        {"headers": [("X-A", "a\rb")]},
        {"headers": [("X-A", "a\0b")]},
        {"headers": [("Bad Name", "v")]},
        {"headers": [("Bad:Name", "v")]},
        {"headers": [("", "v")]},
        {"origin": "https://a.example\r\nX-Evil: 1"},
        {"subprotocols": ["chat\r\nX-Evil: 1"]},
        {"host": "example.com\r\nX-Evil: 1"},
    ],
    ids=lambda options: repr(options)[:40],
)
def test_header_injection_is_refused(request_options):
    client = wsloop.Protocol(client=True)
    with pytest.raises(ValueError):
        client.request_upgrade(request_options.pop("host", "example.com"), "/", **request_options)
    assert client.data_to_send() == b""


@pytest.mark.parametrize("target", ["", "chat", "http://example.com/", "/a b", "/a\r\nX: 1", "/caf\u00e9"])
def test_target_must_be_a_path_and_query(target):
    with pytest.raises(ValueError):
        wsloop.Protocol(client=True).request_upgrade("example.com", target)


def test_request_only_once_and_only_from_a_client():
    client, _ = new_client()
    with pytest.raises(RuntimeError):
        client.request_upgrade("example.com", "/")
    with pytest.raises(RuntimeError):
        wsloop.Protocol().request_upgrade("example.com", "/")
    with pytest.raises(wsloop.InvalidState):  # the same error, by its name
        client.request_upgrade("example.com", "/")
    with pytest.raises(wsloop.InvalidState):
        wsloop.Protocol().request_upgrade("example.com", "/")


# =============================================================================
# Masking (socket-free): every frame a client sends
# =============================================================================


def test_messages_are_masked_with_a_fresh_key_each():
    client, server = connected_pair()
    client.send("same text")
    client.send("same text")
    client.send(b"\x00same bytes")
    client.send(b"\x00same bytes")
    client.send(b"x" * 70000)  # a 64-bit length
    data = client.data_to_send()
    frames = client_frames(data)
    assert [(f.fin, f.rsv, f.opcode, f.payload) for f in frames] == [
        (True, 0, TEXT, b"same text"),
        (True, 0, TEXT, b"same text"),
        (True, 0, BINARY, b"\x00same bytes"),
        (True, 0, BINARY, b"\x00same bytes"),
        (True, 0, BINARY, b"x" * 70000),
    ]
    assert len({frame.mask for frame in frames}) == len(frames)
    # Same message, different bytes on the wire.
    assert data[:15] != data[15:30]
    # wsloop's server (which refuses unmasked frames) reads them too.
    assert [value for _, value in feed(server, data)] == ["same text", "same text", b"\x00same bytes",
                                                         b"\x00same bytes", b"x" * 70000]


def test_ping_and_close_are_masked():
    client, _ = connected_pair()
    client.ping(b"are you there")
    client.ping(b"are you there")
    client.close(4000, "bye")
    frames = client_frames(client.data_to_send())
    assert [(f.opcode, f.payload) for f in frames] == [
        (PING, b"are you there"),
        (PING, b"are you there"),
        (CLOSE, close_payload(4000, b"bye")),
    ]
    assert len({frame.mask for frame in frames}) == 3
    assert client.state is wsloop.State.CLOSING


def test_pong_reply_is_masked():
    client = opened_client()
    events = feed(client, server_frame(PING, b"1") + server_frame(PING, b"1"))
    assert events == [(Event.PING, b"1"), (Event.PING, b"1")]
    pongs = client_frames(client.data_to_send())
    assert [(f.opcode, f.payload) for f in pongs] == [(PONG, b"1"), (PONG, b"1")]
    assert pongs[0].mask != pongs[1].mask


def test_close_reply_is_masked_and_the_client_half_closes():
    client = opened_client()
    assert feed(client, server_frame(CLOSE, close_payload(1001, b"going"))) == [(Event.CLOSE, (1001, "going"))]
    [reply] = client_frames(client.data_to_send())
    assert close_code(reply) == 1001
    assert client.state is wsloop.State.CLOSED
    # RFC 6455 7.1.1: the server closes TCP first; the client half-closes and waits.
    assert client.end_of_output == wsloop.SHUT_WR


def test_compressed_messages_are_masked_and_marked_rsv1():
    client, server = connected_pair(wsloop.Deflate())
    text = "compress me please " * 50
    client.send(text)
    client.send(text)
    client.send("short")  # under Deflate's threshold: sent plain
    data = client.data_to_send()
    frames = client_frames(data)
    assert [(f.rsv, f.opcode) for f in frames] == [(RSV1, TEXT), (RSV1, TEXT), (0, TEXT)]
    assert len(frames[0].payload) < len(text) // 5
    assert len({frame.mask for frame in frames}) == 3
    assert [value for _, value in feed(server, data)] == [text, text, "short"]


def test_compressed_messages_from_the_server_are_inflated():
    client, server = connected_pair(wsloop.Deflate())
    text = "server says " * 100
    server.send(text)
    server.send(text.encode())
    data = server.data_to_send()
    assert data[0] & 0x40, "the server's first message is compressed"
    assert feed(client, data) == [(Event.TEXT, text), (Event.BINARY, text.encode())]


# =============================================================================
# The server's answer (socket-free): every way a 101 can be wrong
# =============================================================================

SUBPROTOCOLS = ["chat", "superchat"]


@pytest.mark.parametrize(
    "compression, changes, extra, why",
    [
        (None, {"Sec-WebSocket-Accept": wsloop.accept_key("AAAAAAAAAAAAAAAAAAAAAA==")}, (), "Accept"),
        (None, {"Sec-WebSocket-Accept": None}, (), "Accept"),
        (None, {"Upgrade": None}, (), "Upgrade"),
        (None, {"Upgrade": "h2c"}, (), "Upgrade"),
        (None, {"Connection": None}, (), "Connection"),
        (None, {"Connection": "keep-alive"}, (), "Connection"),
        (None, {"Sec-WebSocket-Extensions": "permessage-deflate"}, (), "not offered"),
        (True, {"Sec-WebSocket-Extensions": "permessage-deflate; foo"}, (), "unknown parameter foo"),
        (True, {"Sec-WebSocket-Extensions": "permessage-deflate; server_no_context_takeover; "
                                            "server_no_context_takeover"}, (), "repeated"),
        (True, {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits=16"}, (), "=16"),
        (True, {"Sec-WebSocket-Extensions": "permessage-deflate; server_max_window_bits=7"}, (), "=7"),
        (True, {"Sec-WebSocket-Extensions": "permessage-deflate; server_max_window_bits"}, (), "=None"),
        (True, {"Sec-WebSocket-Extensions": "permessage-deflate, permessage-deflate"}, (), "only one"),
        (True, {"Sec-WebSocket-Extensions": "permessage-deflate"},
         [("Sec-WebSocket-Extensions", "permessage-deflate")], "only one"),
        (True, {"Sec-WebSocket-Extensions": "x-webkit-deflate-frame"}, (), "only one"),
        (None, {"Sec-WebSocket-Protocol": "other"}, (), "not offered"),
        (None, {"Sec-WebSocket-Protocol": "chat, superchat"}, (), "not offered"),
        (None, {"Sec-WebSocket-Protocol": "chat"}, [("Sec-WebSocket-Protocol", "superchat")], "not offered"),
    ],
    ids=lambda value: repr(value)[:50] if isinstance(value, (dict, str)) else None,
)
def test_bad_switching_protocols_fails_the_handshake(compression, changes, extra, why):
    client, request = new_client(wsloop.Deflate() if compression else None, subprotocols=SUBPROTOCOLS)
    assert feed(client, switching(request, changes, extra) + server_frame(TEXT, "never seen")) == []
    error = client.handshake_error
    assert isinstance(error, wsloop.HandshakeError)
    assert isinstance(error, wsloop.InvalidUpgrade), error
    assert error.status is None
    assert why in error.reason
    assert client.state is wsloop.State.CLOSED
    assert not client.opened
    assert client.data_to_send() == b""  # nothing more goes to such a server


def test_a_subprotocol_nobody_offered_fails_the_handshake():
    client, request = new_client()
    feed(client, switching(request, {"Sec-WebSocket-Protocol": "chat"}))
    assert isinstance(client.handshake_error, wsloop.InvalidUpgrade), client.handshake_error
    assert client.state is wsloop.State.CLOSED


def test_server_must_confirm_server_no_context_takeover_when_asked():
    client, request = new_client(wsloop.Deflate(client_no_context_takeover=True))
    assert "server_no_context_takeover" in request_fields(request)[1]["sec-websocket-extensions"]
    feed(client, switching(request, {"Sec-WebSocket-Extensions": "permessage-deflate"}))
    assert isinstance(client.handshake_error, wsloop.InvalidUpgrade), client.handshake_error
    assert "server_no_context_takeover" in client.handshake_error.reason


def test_malformed_extensions_header_in_a_101_is_reported_as_a_bad_101():
    # A syntax error in the 101's Sec-WebSocket-Extensions is still a bad
    # 101 (InvalidUpgrade), not an answer that is not HTTP (InvalidResponse).
    client, request = new_client(wsloop.Deflate())
    feed(client, switching(request, {"Sec-WebSocket-Extensions": 'permessage-deflate; client_max_window_bits="9'}))
    assert client.state is wsloop.State.CLOSED
    assert isinstance(client.handshake_error, wsloop.InvalidUpgrade), client.handshake_error
    assert not isinstance(client.handshake_error, wsloop.InvalidResponse)


def test_valid_deflate_answers_are_accepted():
    for answer in ("permessage-deflate",
                   "permessage-deflate; client_max_window_bits=10; server_max_window_bits=11",
                   'permessage-deflate; server_no_context_takeover; client_max_window_bits="9"',
                   "PerMessage-Deflate; client_no_context_takeover"):
        client = opened_client(extensions=answer)
        assert client.extension is not None, answer


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 1O1 Switching Protocols\r\n\r\n",
        b"HTTP/2 101\r\n\r\n",
        b"HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade : websocket\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: web\x01socket\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n folded: line\r\n\r\n",
    ],
)
def test_an_answer_that_is_not_http_is_an_invalid_response(answer):
    client, _ = new_client()
    assert feed(client, answer) == []
    assert isinstance(client.handshake_error, wsloop.InvalidResponse), client.handshake_error
    assert client.handshake_error.status is None
    assert client.state is wsloop.State.CLOSED


def test_a_response_head_over_64_kib_is_refused_before_its_end():
    client, _ = new_client()
    head = b"HTTP/1.1 101 Switching Protocols\r\n" + b"X-Filler: " + b"a" * 4000 + b"\r\n"
    sent = 0
    while client.handshake_error is None:
        feed(client, head if sent == 0 else b"X-Filler: " + b"a" * 4000 + b"\r\n")
        sent += 1
        assert sent < 20, "64 KiB crossed without an error"
    assert isinstance(client.handshake_error, wsloop.InvalidResponse), client.handshake_error
    assert "too large" in client.handshake_error.reason
    assert client.state is wsloop.State.CLOSED


def test_a_header_line_over_8_kib_is_refused():
    client, _ = new_client()
    feed(client, b"HTTP/1.1 101 Switching Protocols\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n")
    assert isinstance(client.handshake_error, wsloop.InvalidResponse), client.handshake_error


def test_refusal_with_content_length_keeps_status_headers_and_body():
    client, _ = new_client()
    head = (b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\n"
            b"Content-Length: 12\r\n\r\n")
    assert feed(client, head + b"login ") == []
    assert client.handshake_error is None, "the body is not whole yet"
    assert client.state is wsloop.State.CONNECTING
    feed(client, b"first\n" + b"trailing bytes are not the body")
    error = client.handshake_error
    assert (error.status, error.reason, error.body) == (401, "Unauthorized", b"login first\n")
    assert isinstance(error.headers, wsloop.Headers)
    assert error.headers.get("www-authenticate") == "Bearer"
    assert client.state is wsloop.State.CLOSED


def test_refusal_without_content_length_ends_with_the_connection():
    client, _ = new_client()
    feed(client, b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n\r\nback ")
    feed(client, b"soon\n")
    assert client.handshake_error is None
    client.receive_eof()
    error = client.handshake_error
    assert (error.status, error.reason, error.body) == (503, "Service Unavailable", b"back soon\n")
    assert error.headers.get("Retry-After") == "5"
    assert client.state is wsloop.State.CLOSED


def test_a_refusals_body_is_kept_up_to_64_kib():
    client, _ = new_client()
    feed(client, b"HTTP/1.1 500 Oops\r\n\r\n" + b"x" * (wsloop.MAX_REQUEST_HEAD + 1000))
    error = client.handshake_error
    assert error is not None, "a body without length must not be buffered without bound"
    assert (error.status, len(error.body)) == (500, wsloop.MAX_REQUEST_HEAD)


def test_redirect_is_a_refusal_with_its_location():
    client, _ = new_client()
    feed(client, b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n")
    assert client.handshake_error.status == 302
    assert client.handshake_error.headers.get("Location") == "/elsewhere"


def test_eof_before_any_answer_is_an_invalid_response():
    client, _ = new_client()
    feed(client, b"HTTP/1.1 101 Swi")
    client.receive_eof()
    assert isinstance(client.handshake_error, wsloop.InvalidResponse), client.handshake_error
    assert client.state is wsloop.State.CLOSED


def answer_and_frames(request):
    return (switching(request) + server_frame(TEXT, "h\u00e9llo") + server_frame(PING, b"p")
            + server_frame(BINARY, bytes(range(200))) + server_frame(TEXT, "frag", fin=False)
            + server_frame(CONTINUATION, "ment"))


EXPECTED_AFTER_RESPONSE = [(Event.TEXT, "h\u00e9llo"), (Event.PING, b"p"),
                           (Event.BINARY, bytes(range(200))), (Event.TEXT, "fragment")]


def test_answer_and_frames_split_at_every_byte():
    for split in range(len(answer_and_frames(new_client()[1])) + 1):
        client, request = new_client()
        stream = answer_and_frames(request)
        events = feed(client, stream[:split]) + feed(client, stream[split:])
        assert [kind for kind, _ in events[:1]] == [Event.RESPONSE], split
        assert events[1:] == EXPECTED_AFTER_RESPONSE, split


def test_answer_and_frames_one_byte_at_a_time():
    client, request = new_client()
    events = []
    for byte in answer_and_frames(request):
        events += feed(client, bytes([byte]))
    assert events[0][0] is Event.RESPONSE
    assert events[0][1].status == 101
    assert events[1:] == EXPECTED_AFTER_RESPONSE
    assert [(f.opcode, f.payload) for f in client_frames(client.data_to_send())] == [(PONG, b"p")]


# =============================================================================
# Bad frames from the server (socket-free): the client fails the connection
# =============================================================================


@pytest.mark.parametrize(
    "frames, code",
    [
        (client_frame(TEXT, "masked"), 1002),  # RFC 6455 5.1: a masked server frame
        (client_frame(PING, b"masked"), 1002),
        (server_frame(TEXT, "x", rsv=RSV1), 1002),  # compressed, but nothing negotiated
        (server_frame(TEXT, "x", rsv=2), 1002),
        (server_frame(3, b""), 1002),
        (server_frame(PING, b"x" * 126), 1002),
        (server_frame(PING, b"", fin=False), 1002),
        (server_frame(CONTINUATION, b"x"), 1002),
        (server_frame(TEXT, "a", fin=False) + server_frame(TEXT, "b"), 1002),
        (server_frame(CLOSE, close_payload(1005)), 1002),
        (server_frame(CLOSE, b"\x03"), 1002),
        (server_frame(TEXT, b"\xff"), 1007),
        (server_frame(TEXT, b"ok \xc3", fin=False) + server_frame(CONTINUATION, b"\x28"), 1007),
        (server_frame(TEXT, b"\xed\xa0\x80"), 1007),  # a UTF-16 surrogate
        (server_frame(CLOSE, close_payload(1000, b"\xff")), 1007),
        (server_frame(BINARY, b"x" * 101), 1009),  # max_size is 100 here
        (server_frame(BINARY, b"x" * 60, fin=False) + server_frame(CONTINUATION, b"x" * 60), 1009),
    ],
)
def test_bad_server_frames_fail_with_a_masked_close(frames, code):
    client = opened_client(max_size=100)
    events = feed(client, server_frame(TEXT, "before") + frames + server_frame(TEXT, "after"))
    assert events[0] == (Event.TEXT, "before")
    assert (Event.TEXT, "after") not in events
    assert client.state is wsloop.State.CLOSED
    assert client.close_sent == code
    [close] = client_frames(client.data_to_send())  # parse_client_frame checks the mask
    assert close_code(close) == code
    assert client.end_of_output == wsloop.SHUT_WR


def test_a_message_of_exactly_max_size_is_delivered():
    client = opened_client(max_size=100)
    assert feed(client, server_frame(BINARY, b"x" * 100)) == [(Event.BINARY, b"x" * 100)]


def deflated(data, final=False):
    """``data`` as one raw DEFLATE stream, as a permessage-deflate peer sends it."""
    compressor = zlib.compressobj(wbits=-15)
    if final:  # a final block (BFINAL), which RFC 7692 7.2.3.4 allows
        return compressor.compress(data) + compressor.flush(zlib.Z_FINISH)
    body = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(b"\x00\x00\xff\xff")
    return body[:-4]


def test_compressed_frames_with_and_without_bfinal_are_inflated():
    client = opened_client(extensions="permessage-deflate; server_no_context_takeover")
    text = "tiny" * 100
    events = feed(client, server_frame(TEXT, deflated(text.encode(), final=True), rsv=RSV1)
                  + server_frame(TEXT, deflated(text.encode()), rsv=RSV1))
    assert events == [(Event.TEXT, text), (Event.TEXT, text)]


def test_a_compressed_message_over_max_size_once_inflated_fails_with_1009():
    client = opened_client(max_size=1000, extensions="permessage-deflate")
    bomb = deflated(b"\0" * 100000)
    assert len(bomb) < 1000
    feed(client, server_frame(BINARY, bomb, rsv=RSV1))
    assert client.close_sent == 1009
    [close] = client_frames(client.data_to_send())
    assert close_code(close) == 1009


def test_garbage_in_a_compressed_frame_fails_with_1007():
    client = opened_client(extensions="permessage-deflate")
    feed(client, server_frame(BINARY, b"\xff\xff\xff\xff not deflate", rsv=RSV1))
    assert client.close_sent == 1007


# =============================================================================
# connect() against wsloop's server (loopback)
# =============================================================================


def test_echo_text_and_binary():
    with running_server(wsloop.Echo()) as server, wsloop.connect(ws_url(server)) as ws:
        assert ws.state is wsloop.State.OPEN
        ws.send("hello \u2713")
        assert ws.recv(timeout=TIMEOUT) == "hello \u2713"
        ws.send(b"\x00\x01\xfe\xff")
        assert ws.recv(timeout=TIMEOUT) == b"\x00\x01\xfe\xff"
        ws.send(bytearray(b"bytearray"))
        assert ws.recv(timeout=TIMEOUT) == b"bytearray"


def test_a_3_mib_message_each_way():
    payload = bytes(range(256)) * (3 * 2**20 // 256)
    with running_server(wsloop.Echo(), max_size=4 * 2**20) as server:
        with wsloop.connect(ws_url(server), max_size=4 * 2**20) as ws:
            ws.send(payload)
            assert ws.recv(timeout=TIMEOUT) == payload


def test_a_message_over_the_clients_max_size_closes_with_1009():
    with running_server(wsloop.Echo(), max_size=4 * 2**20) as server:
        with wsloop.connect(ws_url(server), max_size=2**20, compression=False) as ws:
            ws.send(b"x" * (2**20 + 1))  # the server takes it, the client not its echo
            with pytest.raises(wsloop.ConnectionClosed):
                ws.recv(timeout=TIMEOUT)
            assert ws._connection.close_sent == 1009  # private: the code the client sent


def test_a_client_never_sheds_itself_at_the_servers_total_output_bound(monkeypatch):
    # max_total_pending bounds what a server holds for all its peers; a
    # client has one peer and waits at write_high_water instead.  A small
    # default stands in for "a quarter of physical memory".
    monkeypatch.setattr(wsloop, "_default_max_total_pending", lambda: 2**20)
    message = bytes(range(256)) * (4 * 2**12)  # 4 MiB
    with running_server(wsloop.Echo(), max_size=None, max_pending_output=2**30, max_total_pending=2**30) as server:
        with wsloop.connect(ws_url(server), max_size=None, compression=False) as ws:
            ws.send(message)
            assert ws.recv(timeout=TIMEOUT) == message


def test_compression_is_negotiated_by_default_and_can_be_refused():
    with running_server(wsloop.Echo()) as server:
        with wsloop.connect(ws_url(server)) as ws:
            assert ws.response_headers.get("Sec-WebSocket-Extensions", "").startswith("permessage-deflate")
            ws.send("compressible " * 1000)
            assert ws.recv(timeout=TIMEOUT) == "compressible " * 1000
        with wsloop.connect(ws_url(server), compression=False) as ws:
            assert ws.response_headers.get("Sec-WebSocket-Extensions") is None
            ws.send("plain " * 1000)
            assert ws.recv(timeout=TIMEOUT) == "plain " * 1000
    with running_server(wsloop.Echo(), compression=False) as server:
        with wsloop.connect(ws_url(server)) as ws:
            assert ws.response_headers.get("Sec-WebSocket-Extensions") is None
            ws.send("offered, declined " * 100)
            assert ws.recv(timeout=TIMEOUT) == "offered, declined " * 100


def test_subprotocol_chosen_by_the_server():
    with running_server(wsloop.Echo(), subprotocols=["b", "c"]) as server:
        with wsloop.connect(ws_url(server), subprotocols=["a", "b", "c"]) as ws:
            assert ws.subprotocol == "b"
        with wsloop.connect(ws_url(server), subprotocols=["a"]) as ws:
            assert ws.subprotocol is None


def test_path_query_headers_and_origin_reach_the_server():
    recorder = Recorder()
    with running_server(recorder) as server:
        url = ws_url(server, "/chat/room?name=a%20b&x=1")
        with wsloop.connect(url, headers=[("X-Token", "t0ken"), ("Authorization", "Bearer z")],
                            origin="https://app.example") as ws:
            assert recorder.connect_event.wait(TIMEOUT)
            conn = recorder.connected[0]
            assert conn.path == "/chat/room"
            assert conn.query_params == {"name": ["a b"], "x": ["1"]}
            assert conn.headers.get("X-Token") == "t0ken"
            assert conn.headers.get("Authorization") == "Bearer z"
            assert conn.headers.get("Origin") == "https://app.example"
            assert conn.headers.get("Host") == "127.0.0.1:%d" % server.port
            ws.send("ok")
            assert ws.recv(timeout=TIMEOUT) == "ok"


def test_origin_refused_by_the_servers_allow_list():
    with running_server(wsloop.Echo(), origins=["https://good.example"]) as server:
        with pytest.raises(wsloop.HandshakeError) as info:
            wsloop.connect(ws_url(server), origin="https://evil.example")
        assert info.value.status == 403
        with wsloop.connect(ws_url(server), origin="https://good.example") as ws:
            assert ws.state is wsloop.State.OPEN


def test_client_close_code_reaches_the_server():
    recorder = Recorder()
    with running_server(recorder) as server:
        ws = wsloop.connect(ws_url(server))
        ws.close(4000, "bye")
        assert ws.state is wsloop.State.CLOSED
        assert recorder.close_event.wait(TIMEOUT)
        assert recorder.closed[0][1:] == (4000, "bye")
        assert ws.close_code == 4000  # the server echoes the code (RFC 6455 5.5.1)
        with pytest.raises(wsloop.ConnectionClosed):
            ws.send("too late")
        with pytest.raises(wsloop.ConnectionClosed):
            ws.recv(timeout=TIMEOUT)
        ws.close()  # idempotent


def test_server_close_with_an_error_code_raises_from_iteration():
    with running_server(CloseOnRequest()) as server, wsloop.connect(ws_url(server)) as ws:
        ws.send("4001 x")
        with pytest.raises(wsloop.ConnectionClosed):
            for _ in ws:
                pass
        assert (ws.close_code, ws.close_reason) == (4001, "x")
        assert ws.state is wsloop.State.CLOSED


def test_server_normal_close_ends_iteration_after_the_messages_before_it():
    class SendThenClose(wsloop.Handler):
        def on_connect(self, conn):
            for text in ("one", "two", "three"):
                conn.send(text)
            conn.close(1000, "done")

    with running_server(SendThenClose()) as server, wsloop.connect(ws_url(server)) as ws:
        assert list(ws) == ["one", "two", "three"]
        assert (ws.close_code, ws.close_reason) == (1000, "done")


def test_server_going_away_also_ends_iteration():
    with running_server(CloseOnRequest()) as server, wsloop.connect(ws_url(server)) as ws:
        ws.send("1001 restarting")
        assert list(ws) == []
        assert ws.close_code == 1001


def test_a_close_frame_without_a_code_also_ends_iteration():
    def script(peer):
        peer.accept()
        peer.send(server_frame(TEXT, "bye soon"))
        peer.send(server_frame(CLOSE, b""))  # 1005: closed on purpose, no code
        peer.recv_frame_skipping_pings()  # the client's close reply

    with FakeServer(script) as server, wsloop.connect(server.url) as ws:
        assert list(ws) == ["bye soon"]
        assert ws.close_code == 1005


def test_tcp_dropped_without_a_close_frame_is_1006():
    def script(peer):
        peer.accept()
        peer.send(server_frame(TEXT, "last words"))

    with FakeServer(script) as server, wsloop.connect(server.url) as ws:
        assert ws.recv(timeout=TIMEOUT) == "last words"
        with pytest.raises(wsloop.ConnectionClosed):
            ws.recv(timeout=TIMEOUT)
        assert ws.close_code == 1006


def test_recv_timeout_raises_timeout_error_and_the_connection_stays_usable():
    with running_server(wsloop.Echo()) as server, wsloop.connect(ws_url(server)) as ws:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.2)
        assert 0.15 < time.monotonic() - start < 0.2 + TIMEOUT
        ws.send("still open")
        assert ws.recv(timeout=TIMEOUT) == "still open"


def test_context_manager_closes_normally():
    recorder = Recorder()
    with running_server(recorder) as server:
        with wsloop.connect(ws_url(server)) as ws:
            ws.send("hi")
            assert ws.recv(timeout=TIMEOUT) == "hi"
        assert ws.state is wsloop.State.CLOSED
        assert recorder.close_event.wait(TIMEOUT)
        assert recorder.closed[0][1] == 1000


def test_context_manager_closes_when_the_block_raises():
    recorder = Recorder()
    with running_server(recorder) as server:
        with pytest.raises(KeyError):
            with wsloop.connect(ws_url(server)) as ws:
                raise KeyError("application bug")
        assert ws.state is wsloop.State.CLOSED
        assert recorder.close_event.wait(TIMEOUT)


def test_send_from_four_threads_while_a_thread_receives():
    count, senders = 250, 4
    with running_server(wsloop.Echo()) as server, wsloop.connect(ws_url(server)) as ws:
        received = []
        start = threading.Barrier(senders + 1, timeout=TIMEOUT)

        def reader():
            start.wait()
            for _ in range(count * senders):
                received.append(ws.recv(timeout=TIMEOUT))

        def sender(number):
            start.wait()
            for index in range(count):
                ws.send("%d:%d" % (number, index))

        run_threads(reader, *[lambda number=number: sender(number) for number in range(senders)])
    assert len(received) == count * senders
    for number in range(senders):
        mine = [message for message in received if message.startswith("%d:" % number)]
        assert mine == ["%d:%d" % (number, index) for index in range(count)]


def test_keepalive_pings_are_answered_while_the_application_is_idle():
    recorder = Recorder()
    interval, timeout = 0.1 * TIMEOUT_SCALE, 0.25 * TIMEOUT_SCALE
    with running_server(recorder, ping_interval=interval, ping_timeout=timeout) as server:
        with wsloop.connect(ws_url(server), ping_interval=None) as ws:
            # Idle for three ping timeouts: only the client's own thread can
            # answer the server's pings; the server would close with 1011.
            assert not recorder.close_event.wait(3 * timeout), recorder.closed
            assert ws.state is wsloop.State.OPEN
            ws.send("still here")
            assert ws.recv(timeout=TIMEOUT) == "still here"


def test_keepalive_pings_are_answered_while_a_message_waits_unread():
    class GreetThenRecord(Recorder):
        def on_message(self, conn, message):
            if message == "greet me":
                conn.send("welcome")  # once the client has set its hold grace
            else:
                super().on_message(conn, message)

    recorder = GreetThenRecord()
    # The client holds what follows an unread message for its hold grace
    # (so a violation after it is acted on in order), then reads on: a
    # ping timeout longer than that is answered in time.
    grace = 0.1 * TIMEOUT_SCALE
    timeout = grace + 0.3 * TIMEOUT_SCALE
    with running_server(recorder, ping_interval=0.1 * TIMEOUT_SCALE, ping_timeout=timeout) as server:
        with wsloop.connect(ws_url(server), ping_interval=None) as ws:
            ws._hold_grace = grace  # private, per connection: the hold is what is tested
            ws.send("greet me")
            # The application is busy for two ping timeouts before it
            # reads the welcome: the client's thread still answers pings.
            # (The server's close would be reported only after its
            # close_timeout, so the round trip below is the real check.)
            assert not recorder.close_event.wait(2 * timeout), recorder.closed
            assert ws.recv(timeout=TIMEOUT) == "welcome"
            ws.send("still here")
            assert ws.recv(timeout=TIMEOUT) == "still here"
        assert recorder.close_event.wait(TIMEOUT)
    assert recorder.closed[0][1] == 1000, "the server closed: %r" % (recorder.closed[0][1:],)


def test_client_keepalive_survives_an_application_busy_with_a_message_unread():
    class Greet(wsloop.Echo):
        def on_message(self, conn, message):
            conn.send("welcome" if message == "greet me" else message)

    grace = 0.1 * TIMEOUT_SCALE  # see the test above
    timeout = grace + 0.3 * TIMEOUT_SCALE
    with running_server(Greet()) as server:
        with wsloop.connect(ws_url(server), ping_interval=0.1 * TIMEOUT_SCALE, ping_timeout=timeout) as ws:
            ws._hold_grace = grace
            ws.send("greet me")
            with ws._condition:  # private: wait until the welcome is held
                assert ws._condition.wait_for(lambda: ws._messages, TIMEOUT)
            threading.Event().wait(2 * timeout)  # busy elsewhere: the server's pongs must still count
            assert ws.recv(timeout=TIMEOUT) == "welcome"
            ws.send("still here")
            assert ws.recv(timeout=TIMEOUT) == "still here"


def test_client_keepalive_closes_with_1011_when_no_pong_comes():
    def script(peer):
        peer.accept()
        assert peer.recv_frame().opcode == PING  # never answered
        frame = peer.recv_frame_skipping_pings()
        assert close_code(frame) == 1011
        peer.send(server_frame(CLOSE, close_payload(1011)))

    with FakeServer(script) as server:
        ws = wsloop.connect(server.url, ping_interval=0.2, ping_timeout=0.3)
        with pytest.raises(wsloop.ConnectionClosed):
            ws.recv(timeout=TIMEOUT)
        assert ws._connection.close_sent == 1011  # private: what the client sent
        ws.close()


def test_refusal_from_on_handshake_raises_handshake_error():
    class Refuse(wsloop.Handler):
        def on_handshake(self, conn):
            return wsloop.Response(401, b"who are you?\n", [("WWW-Authenticate", 'Bearer realm="x"')])

    with running_server(Refuse()) as server:
        with pytest.raises(wsloop.HandshakeError) as info:
            wsloop.connect(ws_url(server))
    error = info.value
    assert error.status == 401
    assert error.body == b"who are you?\n"
    assert error.headers.get("WWW-Authenticate") == 'Bearer realm="x"'


def test_a_plain_http_server_is_a_refusal_not_a_hang():
    def script(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html>hello</html>")
        # then close: the body ends with the connection

    with FakeServer(script) as server:
        with pytest.raises(wsloop.HandshakeError) as info:
            wsloop.connect(server.url, open_timeout=TIMEOUT)
    assert (info.value.status, info.value.body) == (200, b"<html>hello</html>")


def test_an_unreachable_port_raises_connection_refused():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        wsloop.connect("ws://127.0.0.1:%d/" % port)


def test_open_timeout_against_a_server_that_never_answers():
    # The kernel completes the TCP handshake for a listening socket; nobody
    # ever accepts, reads or answers.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            wsloop.connect("ws://127.0.0.1:%d/" % listener.getsockname()[1], open_timeout=0.5)
        assert time.monotonic() - start < 0.5 + 2


def test_open_timeout_bounds_a_tls_handshake_that_never_comes(tls):
    _, client_context = tls
    with socket.create_server(("127.0.0.1", 0)) as listener:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            wsloop.connect("wss://127.0.0.1:%d/" % listener.getsockname()[1], open_timeout=0.5,
                           ssl_context=client_context)
        assert time.monotonic() - start < 0.5 + 2


def test_bad_urls_raise_value_error():
    for url in ("http://127.0.0.1/", "ws:///path", "ws://127.0.0.1:99999/", "ws://user:pw@127.0.0.1/"):
        with pytest.raises(ValueError):
            wsloop.connect(url)
    with pytest.raises(ValueError):
        wsloop.connect("ws://127.0.0.1:1/", ssl_context=ssl.create_default_context())


def test_parse_ws_url():
    parse = wsloop._parse_ws_url  # private, but its answers are the request line and Host
    assert parse("ws://example.com/chat?x=1") == (False, "example.com", 80, "example.com", "/chat?x=1")
    assert parse("wss://example.com") == (True, "example.com", 443, "example.com", "/")
    assert parse("wss://example.com:8443/") == (True, "example.com", 8443, "example.com:8443", "/")
    assert parse("WS://[::1]:9000/a") == (False, "::1", 9000, "[::1]:9000", "/a")
    assert parse("ws://[::1]/") == (False, "::1", 80, "[::1]", "/")


@pytest.fixture(scope="module")
def tls():
    """A server context with a certificate from a CA made for this run, and a
    client context that trusts that CA."""
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


def test_wss_with_a_trusted_certificate(tls):
    server_context, client_context = tls
    with running_server(wsloop.Echo(), ssl_context=server_context) as server:
        url = "wss://127.0.0.1:%d/secure" % server.port
        with wsloop.connect(url, ssl_context=client_context) as ws:
            ws.send("secret")
            assert ws.recv(timeout=TIMEOUT) == "secret"
            ws.send(b"\x00" * 300000)  # larger than one TLS record
            assert ws.recv(timeout=TIMEOUT) == b"\x00" * 300000


def test_wss_without_the_ca_fails_certificate_verification(tls):
    server_context, _ = tls
    with running_server(wsloop.Echo(), ssl_context=server_context) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            wsloop.connect("wss://127.0.0.1:%d/" % server.port)


def ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback on this machine")
def test_ipv6_literal_url():
    recorder = Recorder()
    with running_server(recorder, host="::1") as server:
        with wsloop.connect("ws://[::1]:%d/six" % server.port) as ws:
            ws.send("over v6")
            assert ws.recv(timeout=TIMEOUT) == "over v6"
            assert recorder.connected[0].headers.get("Host") == "[::1]:%d" % server.port
            assert recorder.connected[0].path == "/six"


def test_the_client_holds_one_message_while_the_application_does_not_read():
    count = 1000

    class Flood(wsloop.Handler):
        def on_connect(self, conn):
            for index in range(count):
                conn.send("message %04d" % index)

    with running_server(Flood()) as server, wsloop.connect(ws_url(server)) as ws:
        # ws._messages and ws._condition are private: the bound on that very
        # queue is what is tested.  The client's thread notifies the
        # condition on each message, so this waits for an overflow, or for
        # half the hold's grace (after it, up to _MAX_QUEUE may be read).
        with ws._condition:
            assert ws._condition.wait_for(lambda: ws._messages, TIMEOUT)
            overflowed = ws._condition.wait_for(lambda: len(ws._messages) > 1, wsloop._HOLD_GRACE / 2)
            queued = len(ws._messages)
        assert not overflowed, "%d messages queued while the application read none" % queued
        assert [ws.recv(timeout=TIMEOUT) for _ in range(count)] == ["message %04d" % i for i in range(count)]


def test_a_held_message_costs_no_cpu_while_more_wait_in_tcp():
    class Flood(wsloop.Handler):
        def on_connect(self, conn):
            for _ in range(300):
                conn.send(b"x" * 10000)  # 3 MB: most of it waits in TCP buffers

    with running_server(Flood()) as server, wsloop.connect(ws_url(server), compression=False) as ws:
        assert ws.recv(timeout=TIMEOUT) == b"x" * 10000
        ws.send(b"thanks")  # the application answered: the reader goes on at once
        with ws._condition:  # private, as above: wait until the next one is held
            assert ws._condition.wait_for(lambda: ws._messages, TIMEOUT)
        busy = ws._hold_grace / 2  # well inside the hold
        cpu = time.process_time()
        threading.Event().wait(busy)  # the application is busy elsewhere
        used = time.process_time() - cpu
        assert used < busy / 2, "%.2f s of CPU in %.2f s while nothing could be done" % (used, busy)
        assert [len(ws.recv(timeout=TIMEOUT)) for _ in range(299)] == [10000] * 299


def test_all_messages_arrive_after_the_application_stalls():
    count, size = 300, 10000  # large enough that TCP, not one read, holds most of them

    class Flood(wsloop.Handler):
        def on_connect(self, conn):
            for index in range(count):
                conn.send(b"%04d" % index + b"x" * size)

    with running_server(Flood()) as server:
        with wsloop.connect(ws_url(server), compression=False) as ws:
            with ws._condition:  # private, as above
                assert ws._condition.wait_for(lambda: ws._messages, TIMEOUT)
            got = [ws.recv(timeout=TIMEOUT)[:4] for _ in range(count)]
    assert got == [b"%04d" % index for index in range(count)]


def test_a_wake_up_during_the_loops_drain_is_not_lost():
    # The door between threads (private _EventLoop; the client's recv() and
    # send() go through it).  A call_soon_threadsafe() from another thread
    # that lands while the loop drains its wake-up pipe must leave either a
    # byte in the pipe or the "wake pending" flag cleared: a flag set with
    # an empty pipe suppresses every later wake-up, and the loop sleeps on
    # queued work (seen as recv() timing out in the four-threads test).
    loop = wsloop._EventLoop()
    reader = loop._wake_reader

    class ReaderWithAWakeUpInTheMiddle:
        def __init__(self):
            self.first = True

        def recv(self, size):
            if self.first:  # "another thread" wakes the loop just now
                self.first = False
                loop.call_soon_threadsafe(lambda: None)
            return reader.recv(size)

    try:
        loop.call_soon_threadsafe(lambda: None)
        loop._wake_reader = ReaderWithAWakeUpInTheMiddle()
        loop._handle_io(selectors.EVENT_READ)
        loop._wake_reader = reader
        byte_in_pipe = bool(select.select([reader], [], [], 0)[0])
        assert byte_in_pipe or not loop._wake_pending, "wake-up pending with nothing to wake the loop"
    finally:
        loop._wake_reader = reader
        loop.close()


# =============================================================================
# connect() against raw fake servers: fragments, compression bits, the close
# =============================================================================


def test_fragmented_messages_with_a_ping_between_the_fragments():
    def script(peer):
        peer.accept()
        peer.send(server_frame(TEXT, "hel", fin=False) + server_frame(PING, b"mid")
                  + server_frame(CONTINUATION, "lo \u2713"))
        pong = peer.recv_frame()
        assert (pong.opcode, pong.payload) == (PONG, b"mid")
        peer.send(server_frame(BINARY, b"\x00", fin=False) + server_frame(CONTINUATION, b"\x01", fin=False)
                  + server_frame(CONTINUATION, b"\x02"))
        peer.finish_close()

    with FakeServer(script) as server, wsloop.connect(server.url) as ws:
        assert ws.recv(timeout=TIMEOUT) == "hello \u2713"
        assert ws.recv(timeout=TIMEOUT) == b"\x00\x01\x02"


def test_compressed_frames_both_ways_on_the_wire():
    text = "compress me " * 100

    def script(peer):
        request = peer.accept(extra=[("Sec-WebSocket-Extensions", "permessage-deflate")])
        offer = request_fields(request)[1]["sec-websocket-extensions"]
        assert offer == "permessage-deflate; client_max_window_bits"
        peer.send(server_frame(TEXT, deflated(text.encode()), rsv=RSV1))
        frame = peer.recv_frame()
        assert (frame.rsv, frame.opcode) == (RSV1, TEXT), "the client compresses its messages"
        inflater = zlib.decompressobj(wbits=-15)
        assert inflater.decompress(frame.payload + b"\x00\x00\xff\xff") == text.encode()
        peer.finish_close()

    with FakeServer(script) as server, wsloop.connect(server.url) as ws:
        message = ws.recv(timeout=TIMEOUT)
        assert message == text
        ws.send(message)


def test_without_compression_nothing_is_offered_or_compressed():
    def script(peer):
        request = peer.accept()
        assert "sec-websocket-extensions" not in request_fields(request)[1]
        frame = peer.recv_frame()
        assert (frame.rsv, frame.payload) == (0, b"plain " * 100)
        peer.finish_close()

    with FakeServer(script) as server, wsloop.connect(server.url, compression=False) as ws:
        ws.send(b"plain " * 100)


def test_every_frame_on_the_wire_is_masked():
    def script(peer):
        peer.accept()
        peer.send(server_frame(PING, b"x"))
        peer.send(server_frame(TEXT, b"go"))
        frames = [peer.recv_frame() for _ in range(4)]  # parse_client_frame checks each mask
        assert sorted(frame.opcode for frame in frames) == [TEXT, TEXT, PING, PONG]
        assert len({frame.mask for frame in frames}) == 4
        peer.finish_close()

    with FakeServer(script) as server, wsloop.connect(server.url) as ws:
        # The ping came before "go": answered before the client closes.
        assert ws.recv(timeout=TIMEOUT) == "go"
        ws.send("same")
        ws.send("same")
        ws.ping(b"p")


def test_client_half_closes_and_waits_for_the_servers_tcp_close():
    close_returned = threading.Event()

    def script(peer):
        peer.accept()
        peer.finish_close()
        # The client ends its side of TCP after the close handshake...
        assert peer.read_until_eof() == b""
        # ...and keeps its end open until the server closes (RFC 6455 7.1.1).
        assert not close_returned.wait(0.3), "the client closed before the server did"
        # Returning closes the server's socket.

    with FakeServer(script) as server:
        ws = wsloop.connect(server.url, close_timeout=TIMEOUT)
        start = time.monotonic()
        ws.close()
        elapsed = time.monotonic() - start
        close_returned.set()
    assert elapsed < TIMEOUT, "close() waited for its timeout, not for the server's EOF"
    assert ws.state is wsloop.State.CLOSED
    assert ws.close_code == 1000


def test_close_returns_within_close_timeout_when_the_server_never_answers():
    test_over = threading.Event()

    def script(peer):
        peer.accept()
        assert peer.recv_frame().opcode == CLOSE
        test_over.wait(3 * TIMEOUT)  # never answer, never close

    close_timeout = 0.5
    with FakeServer(script) as server:
        ws = wsloop.connect(server.url, close_timeout=close_timeout)
        start = time.monotonic()
        ws.close()
        elapsed = time.monotonic() - start
        test_over.set()
    assert elapsed < close_timeout * 2 + 1
    assert ws.state is wsloop.State.CLOSED
    assert ws.close_code == 1006


def test_close_returns_within_close_timeout_when_the_server_never_closes_tcp():
    test_over = threading.Event()

    def script(peer):
        peer.accept()
        peer.finish_close()
        test_over.wait(3 * TIMEOUT)  # answered the close, but keeps TCP open

    close_timeout = 0.5
    with FakeServer(script) as server:
        ws = wsloop.connect(server.url, close_timeout=close_timeout)
        start = time.monotonic()
        ws.close()
        elapsed = time.monotonic() - start
        test_over.set()
    assert elapsed < close_timeout * 2 + 1
    assert ws.close_code == 1000


# =============================================================================
# Interop: connect() against the websockets package's server
# =============================================================================


@contextmanager
def websockets_server(handler, **options):
    """websockets' threaded server on a free loopback port; yields its URL."""
    from websockets.sync.server import serve

    server = serve(handler, "127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "ws://127.0.0.1:%d/" % server.socket.getsockname()[1]
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "websockets server did not stop"


def websockets_echo(websocket):
    for message in websocket:
        websocket.send(message)


@pytest.mark.parametrize("compression", ["deflate", None])
def test_websockets_server_echo(compression):
    with websockets_server(websockets_echo, compression=compression) as url, wsloop.connect(url) as ws:
        extensions = ws.response_headers.get("Sec-WebSocket-Extensions")
        assert (extensions or "").startswith("permessage-deflate") == (compression is not None), extensions
        for message in ("hello \u2713", b"\x00\xff", "compressible " * 5000, bytes(range(256)) * 100, ""):
            ws.send(message)
            assert ws.recv(timeout=TIMEOUT) == message


def test_websockets_server_subprotocol_and_close_codes():
    closes = []
    handler_done = threading.Event()

    def handler(websocket):
        from websockets.exceptions import ConnectionClosed

        try:
            for message in websocket:
                if message == "close please":
                    websocket.close(4002, "later")
                else:
                    websocket.send(message)
        except ConnectionClosed as exc:
            closes.append(exc.rcvd.code if exc.rcvd else None)
        finally:
            handler_done.set()

    with websockets_server(handler, subprotocols=["chat"]) as url:
        with wsloop.connect(url, subprotocols=["other", "chat"]) as ws:
            assert ws.subprotocol == "chat"
            ws.send("close please")
            with pytest.raises(wsloop.ConnectionClosed):
                ws.recv(timeout=TIMEOUT)
            assert (ws.close_code, ws.close_reason) == (4002, "later")
        assert handler_done.wait(TIMEOUT)
        handler_done.clear()
        ws = wsloop.connect(url, subprotocols=["chat"])
        ws.close(4000, "bye")
        assert handler_done.wait(TIMEOUT)
    assert closes == [4002, 4000]  # websockets' view: the code each close frame it got carried


def test_the_client_takes_a_short_server_message_in_one_step():
    """Protocol.whole_message() in the client role: unmasked frames only."""
    client = opened_client()
    assert client.whole_message(server_frame(TEXT, "hi ✓")) == (Event.TEXT, "hi ✓")
    assert client.whole_message(server_frame(BINARY, b"\x00\x01")) == (Event.BINARY, b"\x00\x01")
    masked = client_frame(TEXT, "masked")
    assert client.whole_message(masked) is None  # left to the full path, which fails it
    assert feed(client, masked) == []
    assert client.close_sent == 1002


def test_a_sender_faster_than_the_client_loop_is_held_at_the_high_water_mark():
    """Messages handed over but not yet taken by the client's loop count
    against the high-water mark: with the loop stalled, a sending thread
    stops after about 256 KiB instead of queuing all 12 MiB in memory."""
    received = []
    done = threading.Event()

    class Count(wsloop.Handler):
        def on_message(self, conn, message):
            received.append(len(message))
            if len(received) == 48:
                done.set()

    with running_server(Count(), max_size=2**20) as server:
        ws = wsloop.connect(ws_url(server), compression=False)
        stall = threading.Event()
        ws._loop.call_soon_threadsafe(stall.wait)  # the client's loop stops here
        sent = []

        def send_all():
            for _ in range(48):
                ws.send(b"x" * 2**18)
                sent.append(1)

        sender = Worker(send_all)
        sender.start()
        try:
            deadline = time.monotonic() + TIMEOUT
            while not ws._drain_waiters and sender.is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            assert ws._drain_waiters, "the sender never waited: %d of 48 sent" % len(sent)
            assert len(sent) == 1  # the first fills the 256 KiB; the second waits
        finally:
            stall.set()
        sender.join(TIMEOUT)
        assert not sender.is_alive()
        assert sender.exception is None
        assert done.wait(TIMEOUT), (len(received), len(sent), ws.close_code, ws.close_reason)
        assert received == [2**18] * 48
        ws.close()


def test_a_sender_held_by_flow_control_is_let_go_when_the_connection_ends():
    class ReadNothingThenDrop(wsloop.Handler):
        def on_connect(self, conn):
            conn.pause_reading()  # the client's output backs up
            conn.server.call_later(0.5, conn.abort)

    outcome = []

    def send_until_stopped(ws):
        try:
            for _ in range(200):  # 50 MiB: far past what the buffers hold
                ws.send(b"x" * 2**18)
        except wsloop.ConnectionClosed:
            outcome.append("closed")
        else:
            outcome.append("returned")

    with running_server(ReadNothingThenDrop(), max_size=2**20) as server:
        ws = wsloop.connect(ws_url(server), compression=False)
        sender = threading.Thread(target=send_until_stopped, args=(ws,), daemon=True)
        sender.start()
        sender.join(TIMEOUT)
        assert not sender.is_alive(), "send() stayed blocked after the connection ended"
        assert outcome == ["closed"]
        ws.close()


def test_past_the_hold_the_client_queues_at_most_max_queue_messages():
    class Flood(wsloop.Handler):
        def on_message(self, conn, message):  # once the client has set its hold grace
            for index in range(200):
                conn.send("m%03d" % index)

    with running_server(Flood()) as server, wsloop.connect(ws_url(server)) as ws:
        limit = wsloop._MAX_QUEUE
        grace = ws._hold_grace = 0.03 * TIMEOUT_SCALE  # private, per connection
        ws.send("flood me")
        # Private queue: its bound is what is tested.  Each hold lasts the
        # grace, so the queue fills one message a grace at most; wait for it
        # to fill, then for two graces past that: it must not grow.
        with ws._condition:
            filled = ws._condition.wait_for(lambda: len(ws._messages) >= limit, (limit + 2) * grace + TIMEOUT)
            assert filled, "the queue never reached its bound"
            grew = ws._condition.wait_for(lambda: len(ws._messages) > limit, 2 * grace)
        assert not grew, "%d messages queued past the bound" % len(ws._messages)
        assert [ws.recv(timeout=TIMEOUT) for _ in range(200)] == ["m%03d" % i for i in range(200)]


# =============================================================================
# ConnectionClosed says why, on both sides
# =============================================================================


def test_a_message_over_max_size_says_the_client_sent_1009_and_the_sizes():
    with running_server(wsloop.Echo(), max_size=4 * 2**20) as server:
        with wsloop.connect(ws_url(server), compression=False) as ws:
            ws.send(b"x" * 2**21)  # the server takes it, the client not its echo
            with pytest.raises(wsloop.ConnectionClosed) as info:
                ws.recv(timeout=TIMEOUT)
            error = info.value
            assert (error.sent_code, error.sent_reason) == (1009, "message over 1048576 bytes")
            assert (error.code, error.reason) == (1006, "")  # the server's echo came after the client stopped reading
            assert str(error) == ("sent 1009 (message too big): 2,097,152 bytes > max_size 1,048,576; "
                                  "no close frame received")
            assert (ws.close_sent, ws.close_sent_reason) == (1009, "message over 1048576 bytes")
            with pytest.raises(wsloop.ConnectionClosed) as again:
                for _ in ws:
                    pass
            assert again.value.sent_code == 1009, "iteration ended silently on the client's own 1009"


def test_a_keepalive_timeout_says_the_client_sent_1011():
    def script(peer):
        peer.accept()
        assert peer.recv_frame().opcode == PING  # never answered
        frame = peer.recv_frame_skipping_pings()
        peer.send(server_frame(CLOSE, frame.payload[:2]))

    with FakeServer(script) as server:
        ws = wsloop.connect(server.url, ping_interval=0.2, ping_timeout=0.3)
        with pytest.raises(wsloop.ConnectionClosed) as info:
            ws.recv(timeout=TIMEOUT)
        ws.close()
    error = info.value
    assert (error.sent_code, error.sent_reason, error.code) == (1011, "keepalive ping timeout", 1011)
    assert str(error) == "sent 1011 (internal error) 'keepalive ping timeout'; received 1011 (internal error)"


def test_a_servers_close_says_what_came_and_what_went_back():
    with running_server(CloseOnRequest()) as server, wsloop.connect(ws_url(server)) as ws:
        ws.send("4001 over \x1b[31mquota")
        with pytest.raises(wsloop.ConnectionClosed) as info:
            ws.recv(timeout=TIMEOUT)
    error = info.value
    assert (error.code, error.reason) == (4001, "over \x1b[31mquota")
    assert (error.sent_code, error.sent_reason) == (4001, "")  # the echo (RFC 6455 5.5.1)
    assert str(error) == r"received 4001 (private use) 'over \x1b[31mquota'; then sent 4001 (private use)"


def test_the_servers_connection_says_why_it_cannot_send():
    recorder = Recorder()
    with running_server(recorder) as server:
        with wsloop.connect(ws_url(server)) as ws:
            [conn] = connected(recorder, 1)
            ws.close(4000, "bye")
        assert recorder.close_event.wait(TIMEOUT)
        with pytest.raises(wsloop.ConnectionClosed) as info:
            conn.send("too late")  # from this thread: checked here
    error = info.value
    assert (error.code, error.reason, error.sent_code) == (4000, "bye", 4000)
    assert conn.close_sent_reason == ""
    assert str(error) == "received 4000 (private use) 'bye'; then sent 4000 (private use)"


def test_a_normal_close_by_the_client_ends_iteration_quietly():
    with running_server(wsloop.Echo()) as server, wsloop.connect(ws_url(server)) as ws:
        ws.close()
        assert list(ws) == []
        with pytest.raises(wsloop.ConnectionClosed) as info:
            ws.recv(timeout=TIMEOUT)
    assert str(info.value) == "sent 1000 (normal); received 1000 (normal)"


# =============================================================================
# Hostile answers to the handshake: the server's head limits, failing at once
# =============================================================================


@pytest.mark.parametrize(
    "answer, why",
    [
        (b"HTTP/1.1 101 " + b"S" * (wsloop.MAX_REQUEST_LINE + 1), "status line too long"),
        (b"HTTP/1.1 101 Switching Protocols\r\nX-Long: " + b"a" * wsloop.MAX_HEADER_LINE, "header line too long"),
        (b"HTTP/1.1 101 Switching Protocols\r\n" + b"X: y\r\n" * (wsloop.MAX_HEADERS + 1), "too many headers"),
    ],
)
def test_a_response_head_crossing_a_limit_fails_before_its_end(answer, why):
    client, _ = new_client()
    assert feed(client, answer) == []
    assert isinstance(client.handshake_error, wsloop.InvalidResponse), client.handshake_error
    assert (client.handshake_error.status, client.handshake_error.reason) == (None, why)
    assert client.state is wsloop.State.CLOSED


def test_a_101_must_be_http_1_1():
    client, request = new_client()
    feed(client, switching(request).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    assert isinstance(client.handshake_error, wsloop.InvalidUpgrade), client.handshake_error
    assert "HTTP/1.0" in client.handshake_error.reason
    assert client.state is wsloop.State.CLOSED
    assert not client.opened


def flood(peer, head, line, limit=256 * 2**20):
    """Answer the request with ``head`` then ``line`` over and over until the
    client closes TCP (or ``limit`` bytes); return how many bytes went."""
    peer.read_request()
    sent = 0
    try:
        peer.send(head)
        sent += len(head)
        chunk = line * max(1, 65536 // len(line))
        while sent < limit:
            peer.send(chunk)
            sent += len(chunk)
    except OSError:  # the client closed: what it did not read is reset
        pass
    return sent


@pytest.mark.parametrize(
    "head, line, status",
    [
        (b"HTTP/1.1 101 Switching Protocols\r\n", b"X-Filler: aaaaaaaaaaaaaaaa\r\n", None),  # endless header lines
        (b"HTTP/1.1 101 Switching Protocols\r\nX-Endless: ", b"a", None),  # one endless header line
        (b"HTTP/1.1 500 Oops\r\n\r\n", b"body ", 500),  # a refusal with an endless body
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 99999999999\r\n\r\n", b"body ", 403),
    ],
)
def test_an_endless_answer_fails_the_handshake_at_once(head, line, status):
    sent = []
    with FakeServer(lambda peer: sent.append(flood(peer, head, line))) as server:
        start = time.monotonic()
        with pytest.raises(wsloop.HandshakeError) as info:
            wsloop.connect(server.url, open_timeout=TIMEOUT)
        elapsed = time.monotonic() - start
    assert info.value.status == status
    assert isinstance(info.value, wsloop.InvalidResponse) == (status is None), info.value
    assert elapsed < TIMEOUT / 2, "the client read on until the open timeout"
    # What the kernel buffers on both sides, no more: not the 256 MiB offered.
    assert sent[0] < 32 * 2**20, "the client read %d bytes" % sent[0]
    if status:
        assert len(info.value.body) == wsloop.MAX_REQUEST_HEAD


def test_a_whole_refusal_on_a_connection_left_open_fails_at_once():
    answered = threading.Event()

    def script(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\nX-Why: origin\r\n\r\nno\n")
        answered.wait(TIMEOUT)  # TCP stays open, whatever the client does

    with FakeServer(script) as server:
        start = time.monotonic()
        try:
            with pytest.raises(wsloop.HandshakeError) as info:
                wsloop.connect(server.url, open_timeout=TIMEOUT)
            assert time.monotonic() - start < TIMEOUT / 2, "the client waited for the server to close"
        finally:
            answered.set()
    assert (info.value.status, info.value.body) == (403, b"no\n")


def test_a_refusal_without_length_on_a_connection_left_open_is_a_handshake_error():
    closed = threading.Event()

    def script(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 503 Busy\r\nRetry-After: 1\r\n\r\nback ")
        peer.send(b"soon\n")
        peer.read_until_eof()
        closed.set()

    with FakeServer(script) as server:
        with pytest.raises(wsloop.HandshakeError) as info:
            wsloop.connect(server.url, open_timeout=0.3)  # the body ends with the time allowed
        assert closed.wait(TIMEOUT)
    assert (info.value.status, info.value.body) == (503, b"back soon\n")


# -----------------------------------------------------------------------------
# A bad answer is a named HandshakeError over real sockets: InvalidResponse
# (not HTTP, or none) and InvalidUpgrade (a 101 that breaks RFC 6455 4.1)
# -----------------------------------------------------------------------------


def answers_garbage(peer):
    peer.read_request()
    peer.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


def closes_before_answering(peer):
    peer.read_request()  # then TCP closes, no answer


def answers_101_over_http_1_0(peer):
    request = peer.read_request()
    peer.send(switching(request).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    peer.read_until_eof()


def answers_101_with_a_wrong_accept(peer):
    request = peer.read_request()
    peer.send(switching(request, {"Sec-WebSocket-Accept": "d3Jvbmc="}))
    peer.read_until_eof()


@pytest.mark.parametrize("script, error, why", [
    (answers_garbage, wsloop.InvalidResponse, "not an HTTP/1.1 response"),
    (closes_before_answering, wsloop.InvalidResponse, "connection closed before the server answered"),
    (answers_101_over_http_1_0, wsloop.InvalidUpgrade, "a 101 over HTTP/1.0, not HTTP/1.1"),
    (answers_101_with_a_wrong_accept, wsloop.InvalidUpgrade, "Sec-WebSocket-Accept does not match the key sent"),
])
def test_connect_names_a_bad_answer_by_its_kind(script, error, why):
    """An answer that is not HTTP is an InvalidResponse; a 101 that breaks
    RFC 6455 4.1 an InvalidUpgrade; neither has an HTTP status."""
    with FakeServer(script) as server:
        with pytest.raises(wsloop.HandshakeError) as info:
            wsloop.connect(server.url, open_timeout=TIMEOUT)
    assert type(info.value) is error, repr(info.value)
    assert info.value.status is None
    assert info.value.reason == why
    assert str(info.value) == why


def test_a_refusal_is_a_handshake_error_of_neither_subclass():
    def script(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nno\n")

    with FakeServer(script) as server:
        with pytest.raises(wsloop.HandshakeError) as info:
            wsloop.connect(server.url, open_timeout=TIMEOUT)
    assert type(info.value) is wsloop.HandshakeError, type(info.value)
    assert info.value.status == 403


def test_reconnecting_retries_an_invalid_response_and_raises_an_invalid_upgrade():
    delays = []
    with FakeServer(answers_garbage, closes_before_answering, answers_101_over_http_1_0) as server:
        with pytest.raises(wsloop.InvalidUpgrade) as info:
            for _ in wsloop.reconnecting(server.url, sleep=delays.append, open_timeout=TIMEOUT):
                pytest.fail("a bad answer is not yielded")
    assert "HTTP/1.0" in info.value.reason
    assert len(delays) == 2, "each InvalidResponse is retried once, the InvalidUpgrade is not"


# =============================================================================
# reconnecting(): back-off on passing faults, an end on lasting ones
# =============================================================================


class Scripted(wsloop.Handler):
    """At the first message on the n-th connection, ends it as
    ``endings[n]`` says: a close code, "drop" (TCP dropped, 1006), or a str
    (sent, then a normal close)."""

    def __init__(self, endings):
        self.endings = list(endings)
        self.opened = 0

    def on_message(self, conn, message):
        ending = self.endings[self.opened]
        self.opened += 1
        if ending == "drop":
            conn.abort()
        elif isinstance(ending, int):
            conn.close(ending)
        else:
            conn.send(ending)
            conn.close(1000)


def check_backoff(delays, initial, maximum):
    """Each wait is within its documented bounds: half to all of
    min(maximum, initial * 2 ** n) for the n-th retry in a row."""
    for attempt, delay in enumerate(delays):
        cap = min(maximum, initial * 2 ** attempt)
        assert cap / 2 <= delay <= cap, "wait %d was %r, outside [%r, %r]" % (attempt, delay, cap / 2, cap)


def test_reconnecting_retries_passing_closes_and_ends_on_a_normal_one():
    handler = Scripted([1012, "drop", 1011, 1013, 1001, "last"])
    delays, received = [], []
    with running_server(handler) as server:
        for ws in wsloop.reconnecting(ws_url(server), initial_delay=0.1, sleep=delays.append):
            ws.send("go")
            for message in ws:  # ends quietly on the closes that are retried
                received.append(message)
            assert ws.state is wsloop.State.CLOSED
    assert received == ["last"]
    assert handler.opened == 6
    assert len(delays) == 5
    for delay in delays:  # each connection opened: the count started again
        check_backoff([delay], 0.1, 30.0)


def test_reconnecting_backs_off_exponentially_while_the_server_is_down():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = listener.getsockname()[1]
    delays = []
    with contextlib.ExitStack() as stack:
        stack.callback(listener.close)

        def sleep(delay):
            delays.append(delay)
            if len(delays) == 5:  # the server comes up
                stack.enter_context(running_server(Scripted(["up"]), sock=listener))

        messages = []
        for ws in wsloop.reconnecting("ws://127.0.0.1:%d/" % port, initial_delay=0.1, max_delay=0.5, sleep=sleep):
            ws.send("go")
            messages.extend(ws)
    assert messages == ["up"]
    assert len(delays) == 5
    check_backoff(delays, 0.1, 0.5)
    assert max(delays) <= 0.5


def test_reconnecting_retries_a_5xx_and_raises_a_4xx_refusal():
    class Refuse(wsloop.Handler):
        answers = [503, 502, 403]

        def on_handshake(self, conn):
            return wsloop.Response(self.answers.pop(0), "no")

    delays = []
    with running_server(Refuse()) as server:
        with pytest.raises(wsloop.HandshakeError) as info:
            for _ in wsloop.reconnecting(ws_url(server), sleep=delays.append):
                pytest.fail("refused connections are not yielded")
    assert info.value.status == 403
    assert len(delays) == 2


def test_reconnecting_raises_a_close_it_does_not_retry():
    delays = []
    with running_server(Scripted([4001, "never"])) as server:
        with pytest.raises(wsloop.ConnectionClosed) as info:
            for ws in wsloop.reconnecting(ws_url(server), sleep=delays.append):
                ws.send("go")
                for _ in ws:
                    pass
    assert info.value.code == 4001
    assert delays == []


def test_reconnecting_does_not_retry_the_clients_own_1009():
    class Big(wsloop.Handler):
        def on_connect(self, conn):
            conn.send(b"x" * 2000)

    delays = []
    with running_server(Big()) as server:
        with pytest.raises(wsloop.ConnectionClosed) as info:
            for ws in wsloop.reconnecting(ws_url(server), max_size=1000, sleep=delays.append):
                for _ in ws:
                    pass
    assert info.value.sent_code == 1009
    assert delays == []


def test_leaving_the_reconnecting_loop_closes_the_connection():
    recorder = Recorder()
    with running_server(recorder) as server:
        for ws in wsloop.reconnecting(ws_url(server)):
            ws.send("one")
            assert ws.recv(timeout=TIMEOUT) == "one"
            break
        assert recorder.close_event.wait(TIMEOUT)
    assert ws.state is wsloop.State.CLOSED
    assert recorder.closed[0][1] == 1000


def test_reconnecting_checks_its_arguments_at_once():
    with pytest.raises(ValueError):
        wsloop.reconnecting("http://127.0.0.1/")
    with pytest.raises(ValueError):
        wsloop.reconnecting("ws://127.0.0.1/", initial_delay=2, max_delay=1)


# =============================================================================
# The small ones: max_size=None
# =============================================================================


def test_max_size_none_is_no_limit_on_either_side():
    payload = b"x" * (2 * wsloop.DEFAULT_MAX_SIZE)
    with running_server(wsloop.Echo(), max_size=None) as server:
        with wsloop.connect(ws_url(server), max_size=None, compression=False) as ws:
            ws.send(payload)
            assert ws.recv(timeout=TIMEOUT) == payload
        with wsloop.connect(ws_url(server), max_size=None) as ws:  # inflated, too
            ws.send(payload)
            assert ws.recv(timeout=TIMEOUT) == payload
    with pytest.raises(ValueError):
        wsloop.connect("ws://127.0.0.1:1/", max_size=0)


def test_max_size_none_on_a_bare_protocol():
    client, request = new_client(max_size=None)
    feed(client, switching(request))
    payload = b"y" * (3 * wsloop.DEFAULT_MAX_SIZE)
    assert feed(client, server_frame(BINARY, payload)) == [(Event.BINARY, payload)]


def test_a_close_the_client_chooses_ends_the_reconnecting_loop():
    delays, opened = [], []
    with running_server(wsloop.Echo()) as server:
        for ws in wsloop.reconnecting(ws_url(server), sleep=delays.append):
            opened.append(ws)
            ws.close(1001, "leaving")  # going away: the client's own choice, not the server's
    assert len(opened) == 1
    assert delays == []


@pytest.mark.parametrize(
    "code, sent_code, sent_first, retried",
    [
        (1006, None, False, True),  # TCP lost
        (1012, 1012, False, True),  # the server restarts; the client answered
        (1013, 1013, False, True),
        (1011, 1011, True, True),  # the client's keepalive timeout, echoed
        (1006, 1011, True, True),  # ... or not
        (1006, 1009, True, False),  # the client's own 1009: the server broke a rule
        (1006, 1002, True, False),
        (1001, 1001, True, False),  # the client chose to leave
        (1000, 1000, False, False),  # normal: the loop ends
        (4001, 4001, False, False),  # the application's own close: raised
    ],
)
def test_which_closes_reconnecting_retries(code, sent_code, sent_first, retried):
    error = wsloop.ConnectionClosed(code=code, sent_code=sent_code, sent_first=sent_first)
    assert wsloop._worth_retrying(error) is retried  # private: the policy table itself
