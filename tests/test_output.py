"""The server's output over real loopback sockets: a frame sent to many
receivers is held once however many do not read it, the output the whole
server holds is bounded (max_total_pending), and what is accepted is sent in
order or the connection is closed with a reason."""

import socket
import ssl
import struct
import tracemalloc

import pytest
import trustme

import wsloop
from helpers import Client, in_loop, request_bytes, running_server, small_window_client
from redis_fixture import wait_until

KiB, MiB = 2**10, 2**20
CLOSE = 8


def numbered(index, size):
    """A binary message that says which one it is, in every 4 KiB."""
    return (struct.pack("!I", index) + bytes(range(256)) * 16)[: 4 * KiB] * (size // (4 * KiB))


def open_count(server, count):
    wait_until(lambda: in_loop(server, lambda: len(server.connections)) == count,
               message="%d connections never opened" % count)


def held(server):
    """Bytes of output the server holds, each shared frame once."""
    return server.stats()["pending_output_held"]


def read_until_close(client):
    """Data messages (unfragmented) then the close code."""
    messages = []
    while True:
        fin, opcode, payload = client.recv_frame()
        if opcode == CLOSE:
            return messages, struct.unpack("!H", payload[:2])[0]
        assert fin and opcode == 2, "unexpected frame %r" % ((fin, opcode),)
        messages.append(payload)


def test_a_broadcast_frame_is_held_once_however_many_receivers_do_not_read():
    receivers, count, size = 20, 96, 64 * KiB
    # The kernel takes a few MiB per receiver; the rest waits in the server.
    absorbed = 3 * MiB
    with running_server(ping_interval=None, max_pending_output=64 * MiB) as server:
        clients = [small_window_client(server.port) for _ in range(receivers)]
        try:
            open_count(server, receivers)
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for index in range(count):
                    message = numbered(index, size)
                    assert in_loop(server, lambda: server.broadcast(message)) == receivers
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            sent = count * size
            # Nearly everything waits in the server: counted once per receiver...
            assert server.stats()["pending_output_total"] > receivers * (sent - absorbed)
            # ...but held once in memory (today: once per receiver, 20x).
            assert grown < 1.5 * sent, "%d bytes grown for %d sent" % (grown, sent)
            assert sent - absorbed < held(server) <= sent + count * 16
            # And each receiver still gets every message whole and in order.
            for client in clients[:2]:
                for index in range(count):
                    assert client.recv_message() == numbered(index, size), "message %d" % index
        finally:
            for client in clients:
                client.shutdown()
        wait_until(lambda: held(server) == 0, message=lambda: "still held: %d" % held(server))


def test_past_max_total_pending_the_slowest_receiver_is_closed_with_1008_and_its_backlog_freed():
    size, limit = 64 * KiB, 1 * MiB
    # close_timeout 10 s: the closed receiver reads its last frames after the close.
    with running_server(ping_interval=None, max_total_pending=limit, max_pending_output=64 * MiB,
                        close_timeout=10.0) as server:
        slowest = small_window_client(server.port)
        reader = Client(server.port, timeout=10.0)
        later = None
        try:
            open_count(server, 2)
            sent = 0

            def broadcast():
                nonlocal sent
                message = numbered(sent, size)
                in_loop(server, lambda: server.broadcast(message))
                assert reader.recv_message() == message  # the reader keeps up
                sent += 1

            for _ in range(4):
                broadcast()
            later = small_window_client(server.port)  # joins behind the slowest
            open_count(server, 3)
            first_for_later = sent
            while server.stats()["slow_consumer_closes"] == 0:
                assert sent < 64, "the total bound never closed anyone"
                assert held(server) <= limit + size  # bounded all along
                broadcast()
            assert held(server) <= limit  # what the slowest held is freed at once
            # What it was sent: a prefix, in order, then the reason.
            got, code = read_until_close(slowest)
            assert code == 1008
            assert 0 < len(got) < sent
            assert got == [numbered(index, size) for index in range(len(got))]
            # The others go on: the later receiver gets all since it joined.
            broadcast()
            for index in range(first_for_later, sent):
                assert later.recv_message() == numbered(index, size), "message %d" % index
            assert server.stats()["slow_consumer_closes"] == 1
        finally:
            for client in (slowest, reader, later):
                if client is not None:
                    client.shutdown()


SHED_SIZE = 256 * KiB


def _large_message_alone(connection):
    connection.send(numbered(1, SHED_SIZE))


def _shared_frame_after_a_small_one(connection):
    connection.send(b"small")
    connection.send(wsloop.PreparedMessage(numbered(2, SHED_SIZE)))


@pytest.mark.parametrize("send, expected", [
    (_large_message_alone, [numbered(1, SHED_SIZE)]),
    (_shared_frame_after_a_small_one, [b"small"]),
])
def test_shedding_at_once_keeps_a_split_frame_whole_and_frees_a_refused_shared_one(send, expected):
    # A large message is queued as its header, then its payload by reference:
    # shedding keeps the two together, not a header alone.  A whole shared
    # frame (a PreparedMessage) queued after a small one is freed: send()
    # refused it, so the peer must not get it.
    with running_server(ping_interval=None, max_total_pending=64 * KiB) as server:
        client = Client(server.port)
        try:
            open_count(server, 1)
            connection = server.connections[0]
            with pytest.raises(wsloop.ConnectionClosed, match="total output limit"):
                in_loop(server, lambda: send(connection))
            got, code = read_until_close(client)
            assert code == 1008
            assert got == expected, [len(message) for message in got]
        finally:
            client.shutdown()


def test_max_total_pending_must_be_positive():
    with pytest.raises(ValueError):
        wsloop.Server(port=0, max_total_pending=0)
    server = wsloop.Server(port=0)
    try:
        assert server.options.max_total_pending >= 2**20  # a quarter of this machine's memory
    finally:
        server.close()


def test_large_frames_queued_by_reference_cross_tls_in_order():
    """TLS sockets have no sendmsg(): queued frames go one send() each,
    partial writes resumed at the same byte."""
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    count, size = 24, 64 * KiB
    with running_server(ping_interval=None, ssl_context=server_context) as server:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(10.0)
        raw.connect(("127.0.0.1", server.port))
        client = Client.__new__(Client)
        client.sock = client_context.wrap_socket(raw, server_hostname="127.0.0.1")
        client.buffer = b""
        try:
            client.sock.sendall(request_bytes())
            assert client.read_head().startswith(b"HTTP/1.1 101 ")
            open_count(server, 1)
            for index in range(count):
                message = numbered(index, size)
                in_loop(server, lambda: server.broadcast(message))
            small = in_loop(server, lambda: server.broadcast("small, after the large ones"))
            assert small == 1
            for index in range(count):
                assert client.recv_message() == numbered(index, size), "message %d" % index
            assert client.recv_message() == "small, after the large ones"
        finally:
            client.shutdown()


def test_small_and_large_frames_and_pongs_keep_their_order_through_a_backlog():
    """Small frames are copied into the output buffer, large ones queued by
    reference, and once a peer is behind everything is queued after what
    waits: the peer gets every message in the order sent, and the pongs
    the server owed it after the messages sent before each ping."""
    sizes = [1 * KiB, 64 * KiB, 100, 20 * KiB, 16 * KiB - 1, 16 * KiB] * 40  # 4.7 MiB
    with running_server(ping_interval=None, max_pending_output=64 * MiB) as server:
        client = small_window_client(server.port)
        try:
            open_count(server, 1)
            for index, size in enumerate(sizes):
                message = numbered(index, 64 * KiB)[:size]
                in_loop(server, lambda: server.broadcast(message))
                if index % 12 == 11:
                    client.send_frame(9, b"ping %d" % index)  # answered after what is queued
            wait_until(lambda: server.stats()["pending_output_held"] > 0)
            got = []
            pongs = []
            while len(got) < len(sizes):
                fin, opcode, payload = client.recv_frame()
                if opcode == 10:
                    pongs.append((payload, len(got)))
                    continue
                assert fin and opcode == 2
                got.append(payload)
            for index, (size, payload) in enumerate(zip(sizes, got)):
                assert payload == numbered(index, 64 * KiB)[:size], "message %d" % index
            while len(pongs) < len(sizes) // 12:  # pings the server read once reading resumed
                fin, opcode, payload = client.recv_frame()
                assert opcode == 10, "a frame after the last message: %r" % ((fin, opcode),)
                pongs.append((payload, len(got)))
            assert [payload for payload, _ in pongs] == [b"ping %d" % i for i in range(11, len(sizes), 12)]
            for payload, seen_after in pongs:
                assert seen_after > int(payload.split()[1]), "a pong overtook the messages before its ping"
        finally:
            client.shutdown()
