"""The server over real loopback sockets: echo, broadcast, closing, timeouts,
backpressure, handler errors, shutdown, many connections."""

import logging
import resource
import socket
import threading
import time

import pytest

import wsloop
from helpers import TIMEOUT, Client, Recorder, client_frame, request_bytes, running_server, wait_until

TEXT, BINARY, CLOSE, PING, PONG = 1, 2, 8, 9, 10


# -- echo ---------------------------------------------------------------------


def test_echo_text_and_binary():
    with running_server(wsloop.Echo()) as server:
        client = Client(server.port)
        client.send_text("hello ✓")
        assert client.recv_message() == "hello ✓"
        client.send_binary(b"\x00\x01\xfe\xff")
        assert client.recv_message() == b"\x00\x01\xfe\xff"
        client.close(1000)
        assert client.expect_close() == (1000, "")
        client.expect_eof()


def test_echo_large_message_with_64_bit_length():
    payload = bytes(range(256)) * 4000  # 1,024,000 bytes
    with running_server(wsloop.Echo()) as server:
        client = Client(server.port)
        client.send_binary(payload)
        assert client.recv_message() == payload


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_binary_echo_either_side_of_the_copy_free_size(offset):
    """From wsloop._COPY_FREE_FROM up a frame is queued by reference, not
    copied into the output buffer: the same bytes."""
    payload = bytes(range(256)) * (wsloop._COPY_FREE_FROM // 256)
    payload = payload[: wsloop._COPY_FREE_FROM + offset] if offset <= 0 else payload + b"\x7f" * offset
    with running_server(wsloop.Echo()) as server:
        client = Client(server.port)
        client.send_binary(payload)
        assert client.recv_message() == payload
        client.send_text("after")  # the frame boundary held
        assert client.recv_message() == "after"


def test_frames_dribbled_one_byte_per_segment():
    with running_server(wsloop.Echo()) as server:
        client = Client(server.port)
        for byte in client_frame(TEXT, "slow but whole"):
            client.sock.send(bytes([byte]))
        assert client.recv_message() == "slow but whole"


def test_handshake_and_first_frame_in_one_segment():
    with running_server(wsloop.Echo()) as server:
        client = Client(server.port, handshake=False)
        client.sock.sendall(request_bytes() + client_frame(TEXT, "eager"))
        assert client.read_head().startswith(b"HTTP/1.1 101")
        assert client.recv_message() == "eager"


def test_fragmented_message_with_ping_in_between():
    with running_server(wsloop.Echo()) as server:
        client = Client(server.port)
        client.send_frame(TEXT, "one ", fin=False)
        client.send_frame(PING, b"mid")
        client.send_frame(0, "two", fin=True)
        assert client.recv_frame() == (True, PONG, b"mid")
        assert client.recv_message() == "one two"


def test_connection_exposes_the_request():
    seen = {}

    class Inspect(wsloop.Handler):
        def on_connect(self, conn):
            seen.update(path=conn.path, query=conn.query, agent=conn.headers.get("user-agent"),
                        address=conn.remote_address, state=conn.state)
            conn.send("welcome")

    with running_server(Inspect()) as server:
        client = Client(server.port, path="/room/7?user=ann", headers={"User-Agent": "pytest"})
        assert client.recv_message() == "welcome"
        assert seen["path"] == "/room/7"
        assert seen["query"] == "user=ann"
        assert seen["agent"] == "pytest"
        assert seen["address"] == client.sock.getsockname()
        assert seen["state"] is wsloop.State.OPEN


def test_http_errors_over_the_wire():
    with running_server() as server:
        client = Client(server.port, handshake=False)
        client.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, head, body = client.read_http_response()
        assert status == 426
        assert b"WebSocket" in body
        client = Client(server.port, handshake=False)
        client.sock.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
        assert client.read_http_response()[0] == 400
        # The server is still fine.
        client = Client(server.port)
        client.send_text("still here")
        assert client.recv_message() == "still here"


# -- broadcast ----------------------------------------------------------------


def test_broadcast_chat_reaches_everyone():
    with running_server(wsloop.Chat()) as server:
        clients = [Client(server.port) for _ in range(3)]
        assert len(server.connections) == 3  # the 101 is sent after the server registers it
        clients[0].send_text("hi all")
        for client in clients:
            assert client.recv_message() == "hi all"
        prepared = wsloop.PreparedMessage("hi again")
        server.broadcast(prepared)
        for client in clients:
            assert client.recv_message() == "hi again"
        assert prepared.frames == {None: wsloop.encode_message("hi again")}  # one frame built, shared by all


def test_broadcast_to_chosen_connections_from_another_thread():
    with running_server(Recorder()) as server:
        a, b = Client(server.port), Client(server.port)
        assert len(server.connections) == 2  # the 101 is sent after the server registers it
        first = server.connections[0]
        server.broadcast(b"only you", connections=[first])
        assert a.recv_message() == b"only you"
        b.send_text("ping-check")
        assert b.recv_message() == "ping-check"  # b got nothing before its echo


# -- closing and close codes ---------------------------------------------------


def test_protocol_error_closes_with_1002_then_tcp():
    handler = Recorder()
    with running_server(handler, close_timeout=0.2) as server:  # we never answer its close: short
        client = Client(server.port)
        client.send_frame(TEXT, "x", masked=False)
        assert client.expect_close() == (1002, "client frame is not masked")
        client.expect_eof()
        assert handler.close_event.wait(5)
        conn, code, _ = handler.closed[0]
        assert (code, conn.close_sent) == (1006, 1002)  # no close frame came back


def test_invalid_utf8_closes_with_1007():
    with running_server() as server:
        client = Client(server.port)
        client.send_frame(TEXT, b"\xc3\x28")
        assert client.expect_close()[0] == 1007


def test_message_too_big_closes_with_1009():
    with running_server(max_size=1000) as server:
        client = Client(server.port)
        client.send_binary(bytes(1000))
        assert client.recv_message() == bytes(1000)
        client.sock.sendall(client_frame(BINARY, bytes(5000))[:8])  # the header alone
        assert client.expect_close()[0] == 1009


def test_server_close_waits_for_the_peer_then_ends_tcp():
    handler = Recorder()

    class Closer(Recorder):
        def on_message(self, conn, message):
            conn.close(4001, "as asked")

    handler = Closer()
    with running_server(handler) as server:
        client = Client(server.port)
        client.send_text("close please")
        assert client.expect_close() == (4001, "as asked")
        client.close(4001)
        client.expect_eof()
        assert handler.close_event.wait(5)
        assert handler.closed[0][1:] == (4001, "")


def test_close_timeout_when_the_peer_never_answers():
    class Closer(Recorder):
        def on_connect(self, conn):
            super().on_connect(conn)
            conn.close()

    handler = Closer()
    with running_server(handler, close_timeout=0.3) as server:
        client = Client(server.port)
        assert client.expect_close() == (1000, "")
        started = time.monotonic()
        client.expect_eof()  # we never answer: the server gives up
        assert time.monotonic() - started < 5
        assert handler.close_event.wait(5)
        conn, code, _ = handler.closed[0]
        assert (code, conn.close_sent) == (1006, 1000)  # we sent 1000; no answer came


def test_open_timeout_closes_a_silent_client():
    with running_server(open_timeout=0.3) as server:
        client = Client(server.port, handshake=False)
        client.sock.sendall(b"GET / HTTP/1.1\r\n")  # and then nothing
        client.expect_eof()
        other = Client(server.port)
        other.send_text("fine")
        assert other.recv_message() == "fine"


@pytest.mark.parametrize("open_timeout, close_timeout, ended_by", [
    (60, 0.3, "closing handshake timed out"),
    (0.3, 60, "opening handshake timed out"),
])
def test_a_request_refused_as_it_arrives_ends_at_the_sooner_of_the_two_timeouts(caplog, open_timeout, close_timeout, ended_by):
    """A bad request is answered 400 while the open timeout still runs, and
    the server then waits for the client's EOF: whichever timeout is due
    first ends it (one timer field holds either)."""
    with caplog.at_level(logging.INFO, logger="wsloop"):
        with running_server(open_timeout=open_timeout, close_timeout=close_timeout) as server:
            client = Client(server.port, handshake=False)
            client.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # then never closes
            assert client.read_head().startswith(b"HTTP/1.1 505 ")
            client.expect_eof()  # the server's half-close: it now waits for ours
            wait_until(lambda: ended_by in caplog.text, TIMEOUT, message=lambda: "not %r: %s" % (ended_by, caplog.text))


# -- keepalive ----------------------------------------------------------------


def test_keepalive_pings_and_survives_when_answered():
    with running_server(ping_interval=0.1, ping_timeout=0.5) as server:
        client = Client(server.port)
        for _ in range(3):
            fin, opcode, payload = client.recv_frame()
            assert opcode == PING
            assert len(payload) == 4
            client.send_frame(PONG, payload)
        client.send_text("alive")
        assert client.recv_message() == "alive"


def test_keepalive_timeout_closes_with_1011(caplog):
    with caplog.at_level(logging.WARNING, logger="wsloop"):
        with running_server(ping_interval=0.1, ping_timeout=0.2) as server:
            client = Client(server.port)
            assert client.recv_frame()[1] == PING  # and we never pong
            assert client.expect_close() == (1011, "keepalive ping timeout")
            client.close(1011)
            client.expect_eof()
    assert "keepalive ping timeout" in caplog.text


# -- backpressure and slow consumers -------------------------------------------


def test_echo_flood_from_a_non_reading_client_is_bounded_and_lossless():
    with running_server(write_high_water=64 * 1024) as server:
        client = Client(server.port)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        client.sock.settimeout(0.5)
        message = bytes(1000)
        frame = client_frame(BINARY, message)
        sent = 0
        try:
            while sent < 200000:  # far more than the socket buffers hold
                client.sock.sendall(frame)
                sent += 1
        except socket.timeout:
            pass  # the server stopped reading us: that is the point
        assert sent < 200000, "server kept reading a client that does not read"
        conn = server.connections[0]
        assert conn.pending_output <= 64 * 1024 + wsloop.RECV_SIZE + 2000
        client.sock.settimeout(10)
        # Every message accepted is echoed, in order, once we read.
        # (A partially sent frame may remain: finish it first.)
        for _ in range(sent):
            assert client.recv_message() == message


def test_slow_receiver_of_broadcasts_is_closed_with_1008_others_keep_going(caplog):
    count, chunk = 400, bytes(60000)  # 24 MB: more than the socket buffers hold
    # close_timeout: longer than the 400 broadcasts take on a loaded machine,
    # so the 1008 is not cut short by a reset; the slow one answers it.
    with running_server(wsloop.Chat(), max_pending_output=256 * 1024, close_timeout=TIMEOUT) as server:
        slow = Client(server.port)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        reader = Client(server.port)
        assert len(server.connections) == 2  # the 101 is sent after the server registers it
        with caplog.at_level(logging.WARNING, logger="wsloop"):
            # Paced by the reader: its backlog stays at one message, while the
            # slow client's grows until it crosses the limit.
            for _ in range(count):
                server.broadcast(chunk)  # from this thread: queued to the loop
                assert reader.recv_message() == chunk
            assert slow.expect_close() == (1008, "too slow to keep up")
            slow.close()  # the closing handshake's answer
        assert "peer too slow" in caplog.text
        assert len(server.connections) == 1  # the reader is still open
        reader.send_text("still open")
        assert reader.recv_message() == "still open"


class SendUntilRefused(wsloop.Handler):
    """On a message: send 60 KB frames until send() refuses, and keep the
    ConnectionClosed it raised."""

    def __init__(self):
        self.error = None
        self.done = threading.Event()

    def on_message(self, conn, message):
        try:
            for _ in range(1000):
                conn.send(bytes(60000))
        except wsloop.ConnectionClosed as exc:
            self.error = exc
        self.done.set()


def test_a_send_refused_for_a_slow_peer_says_which_close_the_server_sent():
    """The ConnectionClosed that send() raises at max_pending_output names
    the 1008 the server sent, as every other ConnectionClosed does."""
    handler = SendUntilRefused()
    with running_server(handler, max_pending_output=256 * 1024) as server:
        client = Client(server.port)
        client.send_text("go")
        assert handler.done.wait(TIMEOUT), "send() was never refused"
        error = handler.error
        assert error is not None, "60 MB were accepted for a peer that does not read"
        assert error.sent_code == 1008, str(error)
        assert error.sent_reason == "too slow to keep up", str(error)
        assert "peer too slow" in str(error)
        assert "sent 1008" in str(error)
        assert client.expect_close() == (1008, "too slow to keep up")


class SendThenWaitForDrain(wsloop.Handler):
    """On "go <n>": send n bytes, then, once when_drained says so, "drained
    <bytes still pending then>"."""

    def on_message(self, conn, message):
        if isinstance(message, str) and message.startswith("go "):
            conn.send(b"x" * int(message[3:]))
            conn.when_drained(lambda: conn.send("drained %d" % conn.pending_output))


def drained_with(message):
    """The bytes pending when the callback ran, from its "drained <n>"."""
    word, pending = message.split()
    assert word == "drained"
    return int(pending)


def test_when_drained_runs_at_once_when_little_is_pending():
    with running_server(SendThenWaitForDrain()) as server:
        client = Client(server.port)
        client.send_text("go 10")
        assert client.recv_message() == b"x" * 10
        assert drained_with(client.recv_message()) <= wsloop.DEFAULT_WRITE_HIGH_WATER


def test_when_drained_runs_after_output_past_high_water_is_taken_in_one_write():
    """Past the high-water mark the callback waits; a kernel that then takes
    everything in one write must still let it run (it once did not)."""
    with running_server(SendThenWaitForDrain(), write_high_water=1024) as server:
        client = Client(server.port)
        client.send_text("go 4000")  # a loopback socket takes 4 KB at once
        assert client.recv_message() == b"x" * 4000
        assert drained_with(client.recv_message()) <= 1024


def test_when_drained_waits_for_a_peer_that_is_not_reading():
    """The client reads nothing until the 8 MiB are sent, far more than the
    socket buffers hold: the callback must wait until what is pending is
    back under the high-water mark, not run at once."""
    with running_server(SendThenWaitForDrain(), max_pending_output=2**26, write_high_water=2**16) as server:
        client = Client(server.port)
        client.send_text("go %d" % 2**23)
        assert client.recv_message() == b"x" * 2**23
        assert drained_with(client.recv_message()) <= 2**16


# -- handler errors -------------------------------------------------------------


def test_handler_error_closes_only_that_connection(caplog):
    class Fragile(wsloop.Handler):
        def on_message(self, conn, message):
            if message == "boom":
                raise RuntimeError("handler bug")
            conn.send(message)

    with caplog.at_level(logging.ERROR, logger="wsloop"):
        with running_server(Fragile()) as server:
            bad, good = Client(server.port), Client(server.port)
            bad.send_text("boom")
            assert bad.expect_close() == (1011, "internal error")
            good.send_text("unaffected")
            assert good.recv_message() == "unaffected"
    assert caplog.text.count("RuntimeError: handler bug") == 1


def test_send_from_another_thread():
    handler = Recorder()
    with running_server(handler) as server:
        client = Client(server.port)
        assert handler.connect_event.wait(5)
        conn = handler.connected[0]
        threads = [threading.Thread(target=conn.send, args=("t%d" % i,)) for i in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(client.recv_message() for _ in range(5)) == ["t%d" % i for i in range(5)]


# -- shutdown -------------------------------------------------------------------


def test_shutdown_closes_with_1001_and_answers_pending_handshakes_with_503():
    handler = Recorder()
    server = wsloop.Server(handler, port=0)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        half = Client(server.port, handshake=False)
        half.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        # The backlog is FIFO: once these complete their handshakes, "half" was accepted.
        clients = [Client(server.port) for _ in range(3)]
        assert len(server.connections) == 3  # the 101 is sent after the server registers it
        server.shutdown()
        for client in clients:
            assert client.expect_close() == (1001, "server shutting down")
            client.close(1001)
            client.expect_eof()
        assert half.read_http_response()[0] == 503
        half.shutdown()  # as an HTTP client does after "Connection: close"
        thread.join(5)
        assert not thread.is_alive()
        assert sorted(code for _, code, _ in handler.closed) == [1001, 1001, 1001]
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).recv(1)
    finally:
        server.shutdown()
        thread.join(5)
        server.close()


def test_shutdown_is_bounded_when_clients_do_not_answer():
    server = wsloop.Server(port=0, close_timeout=0.3)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    client = Client(server.port)
    assert len(server.connections) == 1  # the 101 is sent after the server registers it
    started = time.monotonic()
    server.shutdown(wait=True)
    assert time.monotonic() - started < 3
    assert client.expect_close()[0] == 1001
    client.expect_eof()
    thread.join(5)
    server.close()


# -- many connections -------------------------------------------------------------


def test_more_than_1024_connections():
    count = 1100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * count + 200  # both ends live in this process
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    with running_server(ping_interval=None) as server:
        clients = []
        try:
            for _ in range(count):
                clients.append(Client(server.port))
            assert len(server.connections) == count  # the 101 is sent after the server registers it
            for client in (clients[0], clients[-1]):
                client.send_text("still served")
                assert client.recv_message() == "still served"
        finally:
            for client in clients:
                client.shutdown()


def test_dual_stack_host_serves_ipv6_and_ipv4():
    with running_server(host="::") as server:
        for host in ("::1", "127.0.0.1"):
            client = Client(server.port, host=host)
            client.send_text("via " + host)
            assert client.recv_message() == "via " + host


def test_cancelled_timers_do_not_pile_up_in_the_heap():
    loop = wsloop._EventLoop()
    loop.thread_id = threading.get_ident()  # this thread owns the loop, as run() would
    try:
        for _ in range(1000):
            loop.call_later(60, print).cancel()  # as every completed handshake does
        assert len(loop._timers) <= 2 * 64 + 2
        live = loop.call_later(60, print)
        assert live in loop._timers
        assert live.callback is print
    finally:
        loop.close()


def test_drain_after_a_failure_is_bounded_even_without_a_close_timeout(monkeypatch):
    # With close_timeout=None the drain falls back to the default bound; shortened here.
    monkeypatch.setattr(wsloop, "DEFAULT_CLOSE_TIMEOUT", 0.3)
    with running_server(close_timeout=None) as server:
        client = Client(server.port)
        client.send_frame(TEXT, "x", masked=False)
        assert client.expect_close()[0] == 1002
        started = time.monotonic()
        client.expect_eof()  # we keep our side open; the server gives up
        assert time.monotonic() - started < 5


def test_running_a_server_twice_raises_invalid_state_a_runtime_error_too():
    with running_server(Recorder()) as server:
        with pytest.raises(wsloop.InvalidState) as info:
            server.serve_forever()  # a second run while the first one serves
        client = Client(server.port)
        client.send_text("still served")
        assert client.recv_message() == "still served", "the first run goes on"
        client.shutdown()
    assert isinstance(info.value, RuntimeError), "existing `except RuntimeError` still catches it"
    assert isinstance(info.value, wsloop.WebSocketError)
    assert "already run" in str(info.value)


@pytest.mark.parametrize("where", ["_on_readable", "_flush"])
def test_a_bug_met_serving_one_peer_drops_it_and_the_server_goes_on(where, monkeypatch, caplog):
    """An exception escaping a connection's reading or writing (a bug,
    injected here for one connection) is logged and ends that connection
    alone: the loop and every other connection go on."""
    original = getattr(wsloop.Connection, where)

    def buggy(self, *args):
        if self.data == "bug":
            raise RuntimeError("injected bug")
        return original(self, *args)

    monkeypatch.setattr(wsloop.Connection, where, buggy)
    closed = []

    class Note(wsloop.Handler):
        def on_message(self, conn, message):
            if message == "boom":
                conn.data = "bug"  # from now on, this connection meets the bug
            conn.send(message)

        def on_close(self, conn, code, reason):
            closed.append(conn.path)

    with running_server(Note()) as server:
        healthy = Client(server.port, path="/ok")
        victim = Client(server.port, path="/bug")
        victim.send_text("boom")  # its echo meets the bug, or its next read
        if where == "_on_readable":
            assert victim.recv_message() == "boom"
            victim.send_text("again")
        try:
            victim.expect_eof()
        except ConnectionResetError:
            pass  # dropped with a reset: just as good
        healthy.send_text("still here")
        assert healthy.recv_message() == "still here"
        late = Client(server.port, path="/ok")
        late.send_text("and new ones come in")
        assert late.recv_message() == "and new ones come in"
        wait_until(lambda: "/bug" in closed)
        assert len(server.connections) == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "error handling I/O" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    assert "injected bug" in (errors[0].exc_text or "")
