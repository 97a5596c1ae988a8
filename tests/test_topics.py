"""Topics in one process, over real loopback sockets (no Redis).

``conn.subscribe(topic)`` / ``conn.unsubscribe(topic)`` (automatic on close),
``conn.topics`` (a frozenset) and ``server.publish(topic, message,
exclude=None)``, which frames the message once and sends it to every local
subscriber, returning how many took it (0 from a thread other than the
loop's: the message is queued through the loop's door).  Everything may be
called from any thread; a bad message raises in the caller's thread; a
subscriber that cannot keep up is closed with 1008 and the others go on.

Each test is bounded in time and waits on events (a callback run on the
loop's thread answers when earlier calls through the door have been done),
never on sleeps.
"""

import logging
import re
import socket
import threading
import time

import pytest

import wsloop
from helpers import TIMEOUT, Client, Recorder, StrictReader, Worker, connected, in_loop, running_server

TEXT, BINARY = 1, 2
RSV1 = 0x40
JOIN_TIMEOUT = TIMEOUT


# -- helpers ------------------------------------------------------------------


def wait_closed(recorder, conn):
    """Wait until ``conn``'s on_close has run; return (code, reason)."""
    deadline = time.monotonic() + JOIN_TIMEOUT
    while True:
        recorder.close_event.clear()
        for closed, code, reason in list(recorder.closed):
            if closed is conn:
                return code, reason
        remaining = deadline - time.monotonic()
        assert remaining > 0, "on_close never came"
        assert recorder.close_event.wait(remaining), "on_close never came"


def subscribed_clients(server, recorder, topics_per_client):
    """Open one client per entry of ``topics_per_client`` and subscribe its
    connection (from this thread) to those topics; return (clients, conns)."""
    clients = [Client(server.port) for _ in topics_per_client]
    conns = connected(recorder, len(clients))
    for conn, topics in zip(conns, topics_per_client):
        for topic in topics:
            conn.subscribe(topic)
    in_loop(server, lambda: None)  # the subscriptions have been made
    return clients, conns


# -- subscribe, unsubscribe, topics ----------------------------------------------


def test_subscribe_unsubscribe_and_topics():
    """Guards: conn.topics is a frozenset snapshot of what the connection is
    subscribed to, following subscribe() and unsubscribe() made from
    another thread; subscribing twice is one subscription."""
    recorder = Recorder()
    with running_server(recorder, ping_interval=None) as server:
        client = Client(server.port)
        try:
            (conn,) = connected(recorder, 1)
            assert conn.topics == frozenset()
            conn.subscribe("a")
            conn.subscribe("b")
            conn.subscribe("a")
            in_loop(server, lambda: None)
            topics = conn.topics
            assert type(topics) is frozenset, "topics is a %s, not a frozenset" % type(topics).__name__
            assert topics == {"a", "b"}
            assert in_loop(server, server.publish, "a", "once") == 1
            assert client.recv_message() == "once"
            conn.unsubscribe("a")
            in_loop(server, lambda: None)
            assert conn.topics == {"b"}
            assert topics == {"a", "b"}, "the earlier snapshot changed"
            assert in_loop(server, server.publish, "a", "nobody") == 0
            # From the loop's thread (a handler), it takes effect at once.
            assert in_loop(server, lambda: (conn.subscribe("c"), conn.topics)[1]) == {"b", "c"}
        finally:
            client.shutdown()


def test_publish_reaches_only_subscribers_and_exclude_works():
    """Guards: publish() sends to the topic's subscribers only, skips
    ``exclude``, returns how many connections took it (0 for a topic nobody
    holds), keeps text as text and binary as binary, and a subscriber of two
    topics gets each message once, in publish order."""
    recorder = Recorder()
    with running_server(recorder, ping_interval=None, compression=False) as server:
        clients, conns = subscribed_clients(server, recorder, [["a"], ["b"], ["a", "b"], []])
        try:
            def publish_all():
                return [
                    server.publish("a", "to a"),
                    server.publish("b", b"to b\x00\r\n"),
                    server.publish("a", "not c2", exclude=conns[2]),
                    server.publish("nobody", "lost"),
                    server.publish("a", "end a"),
                    server.publish("b", "end b"),
                ]

            assert in_loop(server, publish_all) == [2, 2, 1, 0, 2, 2]
            readers = [StrictReader(client) for client in clients[:3]]
            assert readers[0].messages(3) == ["to a", "not c2", "end a"]
            assert readers[1].messages(2) == [b"to b\x00\r\n", "end b"]
            assert readers[2].messages(4) == ["to a", b"to b\x00\r\n", "end a", "end b"]
            # The unsubscribed client got nothing: its first message is one sent to it alone.
            in_loop(server, conns[3].send, "direct")
            assert StrictReader(clients[3]).messages(1) == ["direct"]
        finally:
            for client in clients:
                client.shutdown()


def test_publish_from_another_thread_returns_0_and_delivers():
    """Guards: publish() from a thread other than the loop's queues the
    message through the door, returns 0, and it still arrives."""
    recorder = Recorder()
    with running_server(recorder, ping_interval=None) as server:
        clients, conns = subscribed_clients(server, recorder, [["t"]])
        try:
            assert server.publish("t", "queued") == 0
            assert clients[0].recv_message() == "queued"
        finally:
            clients[0].shutdown()


def test_unsubscribe_and_close_leave_the_topic():
    """Guards: unsubscribe() stops delivery to that connection alone; a
    connection that closes (closing handshake, or TCP just going away) is
    unsubscribed from every topic without anyone asking."""
    recorder = Recorder()
    with running_server(recorder, ping_interval=None, close_timeout=1.0) as server:
        clients, conns = subscribed_clients(server, recorder, [["a"], ["a", "b"], ["a", "b"], ["a"]])
        try:
            assert in_loop(server, server.publish, "a", "all four") == 4
            conns[0].unsubscribe("a")
            assert in_loop(server, server.publish, "a", "three") == 3
            clients[1].close(1000)  # a closing handshake...
            assert clients[1].expect_close() == (1000, "")
            wait_closed(recorder, conns[1])
            clients[2].shutdown()  # ...or TCP going away
            wait_closed(recorder, conns[2])
            assert in_loop(server, server.publish, "a", "one left") == 1
            assert in_loop(server, server.publish, "b", "nobody") == 0
            assert conns[1].topics == frozenset()
            assert conns[2].topics == frozenset()
            assert StrictReader(clients[3]).messages(3) == ["all four", "three", "one left"]
            in_loop(server, conns[0].send, "direct")
            assert StrictReader(clients[0]).messages(2) == ["all four", "direct"]
            # Subscribing a closed connection must not bring it back.
            try:
                conns[1].subscribe("a")
            except wsloop.ConnectionClosed:
                pass  # refusing is fine too
            assert in_loop(server, server.publish, "a", "still one") == 1
        finally:
            for client in clients:
                client.shutdown()


# -- threads --------------------------------------------------------------------


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "deflate"])
def test_publish_from_eight_threads_at_once(compression):
    """Guards: eight threads publishing to one topic at once deliver whole
    frames, never interleaved or split, per publishing thread in order and
    none lost, to each subscriber (with and without permessage-deflate), and
    nothing to a connection that did not subscribe."""
    threads, per_thread = 8, 200
    padding = " " + "payload " * 20 if compression else ""  # past Deflate's threshold
    headers = {"Sec-WebSocket-Extensions": "permessage-deflate; server_no_context_takeover"} if compression else {}
    recorder = Recorder()
    with running_server(recorder, compression=compression, ping_interval=None) as server:
        clients = [Client(server.port, headers=headers) for _ in range(3)]
        try:
            conns = connected(recorder, 3)
            conns[0].subscribe("t")
            conns[1].subscribe("t")
            in_loop(server, lambda: None)
            readers = [StrictReader(client, compression) for client in clients]
            count = threads * per_thread
            reading = [Worker(reader.messages, count) for reader in readers[:2]]
            for worker in reading:
                worker.start()
            start = threading.Barrier(threads)

            def publisher(i):
                start.wait(JOIN_TIMEOUT)
                for seq in range(per_thread):
                    server.publish("t", "t%d-%d%s" % (i, seq, padding))

            publishing = [Worker(publisher, i) for i in range(threads)]
            for worker in publishing:
                worker.start()
            for worker in publishing + reading:
                worker.join(20)
                assert not worker.is_alive(), "a publisher or reader is stuck"
            for worker in publishing:
                assert worker.exception is None, "publish raised %r" % (worker.exception,)

            pattern = re.compile(r"(t\d+)-(\d+)%s\Z" % re.escape(padding))
            for index, worker in enumerate(reading):
                assert worker.exception is None, "client %d: %r" % (index, worker.exception)
                got = {}
                for message in worker.result:
                    match = pattern.match(message)
                    assert match, "client %d got a mangled message %r" % (index, message[:80])
                    got.setdefault(match.group(1), []).append(int(match.group(2)))
                assert sorted(got) == sorted("t%d" % i for i in range(threads))
                for name, seqs in got.items():
                    assert seqs == list(range(per_thread)), "client %d, %s: out of order or missing" % (index, name)
                if compression:
                    assert readers[index].compressed_frames > 0, "nothing was compressed"
            in_loop(server, conns[2].send, "direct")
            assert readers[2].messages(1) == ["direct"], "a connection that did not subscribe got a message"
        finally:
            for client in clients:
                client.shutdown()


BAD_MESSAGES = {"int": 42, "none": None, "dict": {"a": 1}, "list": ["x"]}


@pytest.mark.parametrize("name", list(BAD_MESSAGES))
def test_publish_of_a_bad_message_raises_in_the_calling_thread(name):
    """Guards: publish() checks its message before crossing the door, so a
    non-str/bytes message raises TypeError in the caller's thread (the
    loop's thread is not involved), and the topic keeps working."""
    recorder = Recorder()
    with running_server(recorder, ping_interval=None) as server:
        clients, conns = subscribed_clients(server, recorder, [["t"]])
        try:
            worker = Worker(server.publish, "t", BAD_MESSAGES[name])
            worker.start()
            worker.join(JOIN_TIMEOUT)
            assert not worker.is_alive(), "publish did not return"
            assert isinstance(worker.exception, TypeError), "publish(%r) raised %r" % (BAD_MESSAGES[name], worker.exception)
            with pytest.raises(TypeError):
                in_loop(server, server.publish, "t", BAD_MESSAGES[name])  # and in the loop's thread
            assert in_loop(server, server.publish, "t", "fine") == 1
            assert clients[0].recv_message() == "fine"
            assert conns[0].state is wsloop.State.OPEN
        finally:
            clients[0].shutdown()


# -- a subscriber that cannot keep up --------------------------------------------


def test_slow_subscriber_is_closed_with_1008_others_keep_going(caplog):
    """Guards: a subscriber that never reads is closed with 1008 once its
    backlog passes max_pending_output, while a subscriber that reads gets
    every message, in order, and stays open."""
    count, chunk = 400, bytes(60000)  # 24 MB: more than the socket buffers hold
    recorder = Recorder()
    # close_timeout: longer than the 400 publishes take on a loaded machine,
    # so the 1008 is not cut short by a reset; the slow one answers it
    # below, so nothing waits it out.
    with running_server(recorder, max_pending_output=256 * 1024, ping_interval=None, close_timeout=TIMEOUT) as server:
        slow = Client(server.port)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        fast = Client(server.port)
        try:
            conns = connected(recorder, 2)
            for conn in conns:
                conn.subscribe("t")
            in_loop(server, lambda: None)
            with caplog.at_level(logging.WARNING, logger="wsloop"):
                # Paced by the fast reader: its backlog stays at one message,
                # while the slow one's grows until it crosses the limit.
                for number in range(count):
                    server.publish("t", chunk[:-4] + number.to_bytes(4, "big"))
                    assert fast.recv_message() == chunk[:-4] + number.to_bytes(4, "big")
                assert slow.expect_close() == (1008, "too slow to keep up")
                slow.close()  # the closing handshake's answer
            assert "too slow" in caplog.text
            assert wait_closed(recorder, conns[0])
            assert conns[1].state is wsloop.State.OPEN
            assert in_loop(server, server.publish, "t", "still here") == 1
            assert fast.recv_message() == "still here"
        finally:
            slow.shutdown()
            fast.shutdown()


# -- the chat app ---------------------------------------------------------------


def test_chat_handler_is_a_topic_everyone_joins():
    """Guards: wsloop.Chat (the --broadcast app) subscribes every client to
    the "chat" topic, and a message from one reaches everyone, the sender
    too; server.publish("chat", ...) reaches them as well."""
    with running_server(wsloop.Chat(), ping_interval=None) as server:
        clients = [Client(server.port) for _ in range(3)]
        try:
            # on_connect has run once the server counts the three as subscribers.
            assert in_loop(server, server.publish, "chat", "from the server") == 3
            for client in clients:
                assert client.recv_message() == "from the server"
            clients[1].send_text("hello everyone")
            for client in clients:
                assert client.recv_message() == "hello everyone"
            assert all(conn.topics == {"chat"} for conn in server.connections)
        finally:
            for client in clients:
                client.shutdown()


def test_subscriber_count_is_the_local_subscribers_of_a_topic():
    recorder = Recorder()
    with running_server(recorder) as server:
        clients = [Client(server.port) for _ in range(3)]
        try:
            a, b, c = connected(recorder, 3)
            assert server.subscriber_count("news") == 0
            a.subscribe("news")
            server.subscribe(b, "news")  # the server's own door, from this thread
            c.subscribe("sport")
            assert in_loop(server, server.subscriber_count, "news") == 2
            assert server.subscriber_count("sport") == 1  # from this thread: a snapshot
            assert server.topics_of(b) == frozenset(["news"])
            server.unsubscribe(a, "news")
            assert in_loop(server, server.subscriber_count, "news") == 1
            clients[1].close(1000)
            clients[1].expect_close()
            assert recorder.close_event.wait(JOIN_TIMEOUT)
            assert in_loop(server, server.subscriber_count, "news") == 0  # a close unsubscribes
        finally:
            for client in clients:
                client.shutdown()
