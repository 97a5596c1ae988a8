"""Fan-out between processes through a real redis-server.

Servers run in this process, each on its own thread with its own
``RedisBroker`` (so its own Redis connections and node id): to Redis they
are as separate as two processes.  The CLI tests run ``python -m wsloop
--workers 2`` for real.  redis-py appears only as the administrator's tool
(PUBSUB NUMSUB, CLIENT KILL, CONFIG SET, ACL, INFO); everything wsloop says to
Redis goes through its own RESP code.

What is promised (and checked here): at most once between processes, in
order per publisher per topic, byte-exact with text kept text and binary
kept binary, no echo of a node's own messages, one Redis subscription per
topic per process (first subscriber in, last one out), local delivery
whatever Redis does, and after any reconnect the handler's
``on_broker_gap(server, topics)`` on the loop's thread.

Waits are on events (a message arriving, a callback running); where Redis's
own state has no event (PUBSUB NUMSUB, CLIENT LIST, the broker's stats) it is
polled with a deadline.  "Nothing else arrived" is shown with a marker sent
after it on the same ordered path, never by waiting for silence.
"""

import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import ExitStack, contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wsloop
from helpers import (
    TIMEOUT, Client, Worker, children_of, cli_env, clients_on_both_workers, in_loop, plain_get, running_server,
    wait_serving, workers_process,
)
from redis_fixture import bulk, free_port, push, wait_until

JOIN_TIMEOUT = TIMEOUT
RECOVERY_TIMEOUT = 15.0  # reconnect with backoff: generous, still bounded
FAST_FAILURE = dict(ping_interval=0.3, ping_timeout=0.5, reconnect_max=0.5)


# -- a handler and a cluster of servers -------------------------------------------


def topic_of(conn):
    """"/t" -> "t"; "/pub/t" -> "t" (a publisher that does not subscribe)."""
    return conn.path.rstrip("/").rsplit("/", 1)[-1]


class TopicRelay(wsloop.Handler):
    """Subscribes each client to its path's topic ("/t": topic "t", unless
    the path is "/pub/t": publish only) and publishes what it sends there;
    records on_broker_gap calls and the thread they ran on."""

    def __init__(self):
        self.gaps = []
        self.missed = []  # the counts each call gave, {} after a reconnect
        self.gap_threads = []
        self.gap_event = threading.Event()

    def on_connect(self, conn):
        if not conn.path.startswith("/pub/"):
            conn.subscribe(topic_of(conn))

    def on_message(self, conn, message):
        conn.server.publish(topic_of(conn), message)

    def on_broker_gap(self, server, topics, missed=None):
        self.gap_threads.append(threading.get_ident())
        self.missed.append(missed)
        self.gaps.append(list(topics))
        self.gap_event.set()

    def wait_gap(self, topic, timeout=RECOVERY_TIMEOUT):
        """Wait for an on_broker_gap call that names ``topic``."""
        deadline = time.monotonic() + timeout
        while True:
            self.gap_event.clear()
            if any(topic in topics for topics in self.gaps):
                return
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self.gap_event.wait(remaining), (
                "on_broker_gap never named %r (calls: %r)" % (topic, self.gaps)
            )


class Node:
    """One server with its broker and handler, serving on its own thread."""

    def __init__(self, server, handler):
        self.server = server
        self.handler = handler
        self.clients = []

    @property
    def broker(self):
        return self.server.broker

    def stats(self):
        return self.server.broker.stats()

    def client(self, path="/t", **kw):
        kw.setdefault("timeout", 10.0)
        client = Client(self.server.port, path=path, **kw)
        self.clients.append(client)
        return client

    def drop_clients(self):
        """Close the clients' sockets, so the server stops without waiting
        out close_timeout for each."""
        for client in self.clients:
            client.shutdown()

    def loop_thread(self):
        return in_loop(self.server, threading.get_ident)

    def wait_state(self, predicate, what, timeout=RECOVERY_TIMEOUT):
        last = []

        def check():
            last[:] = [self.stats()]
            return predicate(last[0]["state"])

        wait_until(check, timeout, message=lambda: "broker never %s; stats %r" % (what, last))

    def wait_links_down(self):
        """Until every link has noticed Redis is gone.  The broker's state
        changes with the first; a publish written to a publisher link that
        has not read its EOF yet is lost in flight (a gap for receivers),
        not buffered."""

        def down():
            return all(
                server["publisher"] != "ready" and server["subscriber"] != "ready"
                for server in self.stats()["servers"]
            )

        wait_until(down, RECOVERY_TIMEOUT, message=lambda: "links still up: %r" % (self.stats()["servers"],))


@contextmanager
def cluster(url_or_urls, count=2, prefix="wsloop", **broker_options):
    """``count`` servers on Redis, each with its own RedisBroker, all
    connected before the test goes on; stopped at the end."""
    urls = url_or_urls if isinstance(url_or_urls, list) else [url_or_urls] * count
    with ExitStack() as stack:
        nodes = []
        for url in urls:
            handler = TopicRelay()
            broker = wsloop.RedisBroker(url, prefix=prefix, **broker_options)
            server = stack.enter_context(
                running_server(handler, broker=broker, ping_interval=None, compression=False)
            )
            assert server.broker is broker
            nodes.append(Node(server, handler))
            stack.callback(nodes[-1].drop_clients)  # before the server stops
        for node in nodes:
            node.wait_state(lambda state: state == "connected", "connected")
        yield nodes


def read_until(client, last, allowed=()):
    """Read messages until ``last``; every one before it must be in
    ``allowed`` (in order, each at most once).  Returns those before it."""
    before = []
    while True:
        message = client.recv_message()
        if message == last:
            return before
        assert message in allowed, "unexpected message %r before %r" % (message[:80], last)
        before.append(message)
        assert before == [m for m in allowed if m in before], "out of order or repeated: %r" % (before,)


def flows(a, b, text):
    """``a`` (subscribed on one node) sends ``text``; it arrives at ``a``
    (local) and ``b`` (another node, through Redis)."""
    a.send_text(text)
    assert a.recv_message() == text
    assert b.recv_message() == text


# -- 1. across two servers, once ---------------------------------------------------


def test_a_message_crosses_once_and_is_not_echoed(redis_server):
    """Guards: a client on B subscribed to t gets exactly one copy of what a
    client on A publishes; A's own subscribers get exactly one copy (A
    delivers at once and drops its own message when Redis echoes it back).
    No gap is reported on a first connection."""
    with cluster(redis_server.url) as (A, B):
        a, b = A.client("/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 2)
        a.send_text("hello")
        assert a.recv_message() == "hello"
        assert b.recv_message() == "hello"
        # Markers on the same ordered paths: any echo or duplicate of
        # "hello" through Redis would arrive before them.
        b.send_text("marker")  # B publishes only after "hello" reached it
        assert b.recv_message() == "marker", "B got a second copy (or an echo)"
        assert a.recv_message() == "marker", "A's subscriber got its own message again through Redis"
        a.send_text("end")
        assert a.recv_message() == "end"
        assert b.recv_message() == "end", "B got a second copy of A's message"
        stats = A.stats()
        assert stats["state"] == "connected"
        assert stats["published"] >= 2 and stats["received"] >= 1 and stats["dropped"] == 0, stats
        assert stats["reconnects"] == 0 and stats["gaps"] == 0, stats
        assert A.handler.gaps == [] and B.handler.gaps == []


def test_text_stays_text_and_binary_stays_binary_across_processes(redis_server):
    """Guards: the kind of a message survives the trip through Redis."""
    with cluster(redis_server.url) as (A, B):
        a, b = A.client("/pub/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 1)
        a.send_text("text")
        a.send_binary(b"binary")
        a.send_text("")
        a.send_binary(b"")
        for expected in ["text", b"binary", "", b""]:
            got = b.recv_message()
            assert type(got) is type(expected) and got == expected, (got, expected)


# -- 2. many, in order -------------------------------------------------------------


def test_ten_thousand_messages_arrive_in_order(redis_server):
    """Guards: 10,000 numbered messages published on A arrive on B, none
    lost, none repeated, in order (Redis orders per channel; the bridge
    must not reorder or drop under a steady stream)."""
    count = 10000
    with cluster(redis_server.url) as (A, B):
        sender, b = A.client("/pub/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 1)
        sending = Worker(lambda: [sender.send_text("n%d" % n) for n in range(count)])
        sending.start()
        for n in range(count):
            got = b.recv_message()
            assert got == "n%d" % n, "message %d: got %r" % (n, got)
        sending.join(JOIN_TIMEOUT)
        assert sending.exception is None, repr(sending.exception)
        assert A.stats()["published"] >= count
        assert B.stats()["received"] >= count and B.stats()["dropped"] == 0


# -- 3. subscriptions in Redis -------------------------------------------------------


def test_numsub_follows_first_subscribe_and_last_unsubscribe(redis_server):
    """Guards: a process SUBSCRIBEs prefix:t on its first local subscriber
    and UNSUBSCRIBEs on its last, not on each one; conn.unsubscribe() counts
    like a close."""
    with cluster(redis_server.url, count=1, prefix="p1") as (A,):
        assert redis_server.numsub("p1:t") == 0
        first = A.client("/t")
        redis_server.wait_numsub("p1:t", 1)
        second = A.client("/t")
        first.close(1000)
        assert first.expect_close() == (1000, "")
        # Commands on the subscriber link are done in order: once a later
        # SUBSCRIBE shows, an UNSUBSCRIBE made before it would have too.
        sync1 = A.client("/sync1")
        redis_server.wait_numsub("p1:sync1", 1)
        assert redis_server.numsub("p1:t") == 1, "unsubscribed while a local subscriber was left"
        second.close(1000)
        assert second.expect_close() == (1000, "")
        redis_server.wait_numsub("p1:t", 0)
        # Again with conn.unsubscribe(), from another thread.
        third = A.client("/t")
        redis_server.wait_numsub("p1:t", 1)
        (conn,) = [c for c in A.server.connections if c.path == "/t"]
        conn.unsubscribe("t")
        redis_server.wait_numsub("p1:t", 0)
        sync1.shutdown()
        third.shutdown()
        assert redis_server.numsub("p1:t") == 0


def test_two_prefixes_on_one_redis_do_not_see_each_other(redis_server):
    """Guards: the channel is prefix:topic, so two applications sharing a
    Redis (prefixes p1 and p2) each hear only their own topic t."""
    with cluster(redis_server.url, prefix="p1") as (A1, A2), cluster(redis_server.url, prefix="p2") as (B1, B2):
        a1, a2, b1, b2 = A1.client(), A2.client(), B1.client(), B2.client()
        redis_server.wait_numsub("p1:t", 2)
        redis_server.wait_numsub("p2:t", 2)
        flows(a1, a2, "for p1")
        # "for p1" reached Redis before "for p2" was published: had it
        # leaked into p2, it would come first.
        flows(b2, b1, "for p2")
        flows(a1, a2, "p1 again")  # likewise for a leak of "for p2" into p1
        assert b"wsloop:t" not in redis_server.admin.pubsub_channels()


# -- 4. Redis restarts --------------------------------------------------------------


def test_redis_killed_and_restarted(redis_server):
    """Guards: with Redis gone, local delivery goes on and the broker says it
    is not connected; once Redis is back on the same port, the bridge
    reconnects, resubscribes, calls on_broker_gap on the loop thread naming
    the topic, and messages flow A -> B again."""
    with cluster(redis_server.url, **FAST_FAILURE) as (A, B):
        a1, a2, b = A.client("/t"), A.client("/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 2)
        a1.send_text("before")
        for client in (a1, a2, b):
            assert client.recv_message() == "before"

        redis_server.kill()
        for node in (A, B):
            node.wait_state(lambda state: state != "connected", "noticed Redis had gone")
        a1.send_text("while down")
        assert a1.recv_message() == "while down"
        assert a2.recv_message() == "while down"

        redis_server.restart()
        for node in (A, B):
            node.handler.wait_gap("t")
            node.wait_state(lambda state: state == "connected", "reconnected")
        redis_server.wait_numsub("wsloop:t", 2)
        assert set(A.handler.gap_threads) == {A.loop_thread()}, "on_broker_gap ran off the loop thread"
        a1.send_text("after")
        assert a1.recv_message() == "after"
        assert a2.recv_message() == "after"
        # "while down" may have waited in the bounded buffer and gone out
        # on reconnect; nothing else may come before "after".
        read_until(b, "after", allowed=["while down"])
        for node in (A, B):
            stats = node.stats()
            assert stats["reconnects"] >= 1 and stats["gaps"] >= 1, stats


def test_publishes_while_redis_is_down_are_bounded_and_counted(redis_server):
    """Guards: while Redis is down, publishes wait in a buffer of at most
    max_buffer bytes and the rest are dropped and counted; local subscribers
    get every one; after the reconnect only some of the waiting ones (in
    order, within the bound) may reach other nodes, then new ones flow."""
    chunk, count, max_buffer = 16 * 1024, 20, 64 * 1024
    with cluster(redis_server.url, max_buffer=max_buffer, **FAST_FAILURE) as (A, B):
        a, b = A.client("/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 2)
        flows(a, b, "before")
        redis_server.kill()
        A.wait_links_down()
        waiting = ["%02d" % n + "x" * (chunk - 2) for n in range(count)]
        for message in waiting:
            A.server.publish("t", message)
        for message in waiting:  # local delivery is not bounded by the broker
            assert a.recv_message() == message
        dropped = A.stats()["dropped"]
        assert dropped >= count - max_buffer // chunk, "only %d of %d dropped past a %d-byte buffer" % (dropped, count, max_buffer)
        redis_server.restart()
        for node in (A, B):
            node.handler.wait_gap("t")
        redis_server.wait_numsub("wsloop:t", 2)
        a.send_text("after")
        assert a.recv_message() == "after"
        arrived = read_until(b, "after", allowed=waiting)
        assert sum(len(message) for message in arrived) <= max_buffer, "more than max_buffer was kept"


# -- 5. the connection to Redis goes bad ---------------------------------------------


def test_subscriber_connection_killed_by_redis(redis_server):
    """Guards: CLIENT KILL TYPE pubsub (what an admin or a failover does) is
    noticed; the bridge reconnects, resubscribes, reports the gap, and
    messages flow again."""
    with cluster(redis_server.url, **FAST_FAILURE) as (A, B):
        a, b = A.client("/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 2)
        flows(a, b, "before")
        killed = redis_server.admin.client_kill_filter(_type="pubsub")
        assert killed >= 2, "CLIENT KILL found %r subscriber connections" % killed
        for node in (A, B):
            node.handler.wait_gap("t")
        redis_server.wait_numsub("wsloop:t", 2)
        flows(a, b, "after")
        assert A.stats()["reconnects"] >= 1 and B.stats()["reconnects"] >= 1


def test_subscriber_over_the_output_buffer_limit(redis_server):
    """Guards: a burst bigger than Redis's client-output-buffer-limit for
    pub/sub makes Redis drop the subscriber connection (and what was
    pending): the bridge notices, reconnects, reports the gap, and later
    messages flow."""
    admin = redis_server.admin
    with cluster(redis_server.url, **FAST_FAILURE) as (A, B):
        a, b = A.client("/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 2)
        flows(a, b, "before")
        admin.config_set("client-output-buffer-limit", "pubsub 65536 32768 1")
        burst = [bytes([n]) * (256 * 1024) for n in range(8)]  # each one alone is over the hard limit
        for payload in burst:
            A.server.publish("t", payload)
        for payload in burst:  # local delivery is not affected
            assert a.recv_message() == payload
        for node in (A, B):
            node.handler.wait_gap("t")
        # Redis logs each such disconnection (7.2 also counts them in INFO).
        assert "output buffer limits" in redis_server.log_tail(200), (
            "Redis never hit the output buffer limit: the test proved nothing"
        )
        redis_server.wait_numsub("wsloop:t", 2)
        a.send_text("after")
        assert a.recv_message() == "after"
        read_until(b, "after", allowed=burst)


def test_idle_publisher_closed_by_redis_timeout(redis_server):
    """Guards: Redis's `timeout` closes an idle publishing connection (pub/sub
    subscribers are exempt); the next publish still arrives, reconnecting
    if need be, rather than vanishing into a half-closed socket."""
    admin = redis_server.admin
    # Keepalive PINGs far apart, so the publisher really is idle.
    with cluster(redis_server.url, ping_interval=30, ping_timeout=5, reconnect_max=0.5) as (A, B):
        a, b = A.client("/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 2)
        flows(a, b, "before")
        idle = {client["id"] for client in redis_server.clients() if client.get("sub") == "0" and client.get("psub") == "0"}
        admin.config_set("timeout", 1)
        # Redis closes idle clients in its cron: wait until those are gone.
        wait_until(
            lambda: not idle & {client["id"] for client in redis_server.clients()},
            10,
            message="Redis never closed the idle publishing connections",
        )
        a.send_text("after idle")
        assert a.recv_message() == "after idle"
        assert b.recv_message() == "after idle"
        admin.config_set("timeout", 0)


def test_stalled_redis_is_detected_by_ping(redis_server):
    """Guards: a Redis that stops answering but keeps its sockets open
    (SIGSTOP) is noticed through unanswered PINGs (state leaves
    "connected"), local delivery goes on meanwhile, and after SIGCONT the
    bridge recovers: gap reported, resubscribed, messages flow."""
    with cluster(redis_server.url, **FAST_FAILURE) as (A, B):
        a, b = A.client("/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 2)
        flows(a, b, "before")
        redis_server.pause()
        try:
            for node in (A, B):
                node.wait_state(lambda state: state != "connected", "noticed the stalled Redis", timeout=5)
            a.send_text("while stalled")
            assert a.recv_message() == "while stalled"
        finally:
            redis_server.resume()
        for node in (A, B):
            node.handler.wait_gap("t")
            node.wait_state(lambda state: state == "connected", "reconnected")
        redis_server.wait_numsub("wsloop:t", 2)
        a.send_text("after")
        assert a.recv_message() == "after"
        read_until(b, "after", allowed=["while stalled"])


# -- 6. authentication ---------------------------------------------------------------


def test_requirepass(start_redis):
    """Guards: redis://:password@host:port authenticates (AUTH password)."""
    redis_server = start_redis(["--requirepass", "s3cret"], password="s3cret")
    with cluster(redis_server.url_with(password="s3cret")) as (A, B):
        a, b = A.client("/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 2)
        flows(a, b, "authenticated")


def test_acl_user_and_a_database_number(start_redis):
    """Guards: redis://user:password@host:port/db authenticates as that ACL
    user (AUTH user password); the database number does not split pub/sub."""
    redis_server = start_redis(["--requirepass", "adminpw"], password="adminpw")
    redis_server.admin.execute_command("ACL", "SETUSER", "alice", "on", ">pw", "~*", "&*", "+@all")
    urls = [redis_server.url_with("alice", "pw", db=3), redis_server.url_with("alice", "pw")]
    with cluster(urls) as (A, B):
        a, b = A.client("/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 2)
        flows(a, b, "as alice")
        users = [client["user"] for client in redis_server.clients()]
        assert users and set(users) == {"alice"}, "wsloop connected as %r" % users


def test_wrong_password_is_one_clear_error_and_no_busy_loop(start_redis, caplog):
    """Guards: a wrong password gives one ERROR log line that says
    authentication failed (and does not show the password), the bridge
    backs off instead of reconnecting in a loop, its state is not
    "connected", and local delivery keeps working."""
    redis_server = start_redis(["--requirepass", "right"], password="right")
    caplog.set_level(logging.INFO, logger="wsloop")

    def auth_errors():
        return [
            record for record in caplog.records
            if record.name.startswith("wsloop") and record.levelno >= logging.ERROR
            and "auth" in record.getMessage().lower()
        ]

    with cluster_unconnected(redis_server.url_with(password="wrong-pw-123")) as node:
        wait_until(auth_errors, 5, message="no ERROR log line about authentication")
        start = redis_server.connections_received()
        logged = len(caplog.records)
        time.sleep(3.0)  # a window to count in: a busy loop makes hundreds of attempts
        attempts = redis_server.connections_received() - start
        assert attempts <= 10, "%d connection attempts in 3 s: a busy reconnect loop" % attempts
        assert len(caplog.records) - logged < 20, "the log fills up:\n" + caplog.text[-2000:]
        assert len(auth_errors()) == 1, "not one clear error:\n" + caplog.text[-2000:]
        assert "wrong-pw-123" not in caplog.text, "the password is in the log"
        assert node.stats()["state"] != "connected"
        client = node.client("/t")
        client.send_text("local")
        assert client.recv_message() == "local"


@contextmanager
def cluster_unconnected(url, **broker_options):
    """One server whose broker may never connect (a bad password)."""
    handler = TopicRelay()
    broker = wsloop.RedisBroker(url, **broker_options)
    with running_server(handler, broker=broker, ping_interval=None) as server:
        node = Node(server, handler)
        try:
            yield node
        finally:
            node.drop_clients()


# -- 7. payloads and threads --------------------------------------------------------


PAYLOADS = [
    b"a\r\nb",
    "text with \r\n and \x00 inside",
    b"\x00",
    b"\r\n",
    "$-1\r\n*1\r\n+OK\r\n",  # looks like RESP
    b"*3\r\n$7\r\nmessage\r\n",
    b"",
    "",
    "\u00e9\u4e2d\U0001f600",
    bytes(range(256)) * 4096,  # 1 MiB, every byte value
    "\u00e9" * (512 * 1024),  # 1 MiB of UTF-8, multi-byte
]


def test_binary_and_large_payloads_arrive_byte_exact(redis_server):
    """Guards: the envelope is binary-safe: CR LF, NUL, RESP look-alikes,
    empty messages and 1 MiB payloads cross Redis byte for byte, in order,
    text as text and binary as binary."""
    with cluster(redis_server.url) as (A, B):
        b = B.client("/t")
        redis_server.wait_numsub("wsloop:t", 1)
        for payload in PAYLOADS:
            A.server.publish("t", payload)
        for index, expected in enumerate(PAYLOADS):
            got = b.recv_message()
            assert type(got) is type(expected), "payload %d: %s became %s" % (index, type(expected).__name__, type(got).__name__)
            assert got == expected, "payload %d (%d bytes) changed on the way" % (index, len(expected))
        assert B.stats()["dropped"] == 0


def test_eight_threads_publishing_at_once(redis_server):
    """Guards: eight threads publishing on A at once: every message reaches
    a subscriber on A and one on B exactly once, in order per thread."""
    threads, per_thread = 8, 250
    with cluster(redis_server.url) as (A, B):
        a, b = A.client("/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 2)
        count = threads * per_thread
        reading = [Worker(lambda client=client: [client.recv_message() for _ in range(count)]) for client in (a, b)]
        for worker in reading:
            worker.start()
        start = threading.Barrier(threads)

        def publisher(i):
            start.wait(JOIN_TIMEOUT)
            for seq in range(per_thread):
                A.server.publish("t", b"t%d-%d" % (i, seq) if seq % 2 else "t%d-%d" % (i, seq))

        publishing = [Worker(publisher, i) for i in range(threads)]
        for worker in publishing:
            worker.start()
        for worker in publishing + reading:
            worker.join(30)
            assert not worker.is_alive(), "a publisher or reader is stuck"
            assert worker.exception is None, repr(worker.exception)
        for name, worker in zip("AB", reading):
            got = {}
            for message in worker.result:
                text = message.decode() if isinstance(message, bytes) else message
                thread, seq = re.match(r"t(\d+)-(\d+)\Z", text).groups()
                assert isinstance(message, bytes) == bool(int(seq) % 2), "kind changed: %r" % (message,)
                got.setdefault(int(thread), []).append(int(seq))
            assert got == {i: list(range(per_thread)) for i in range(threads)}, "on %s: lost, repeated or out of order" % name
        # Nothing more: a marker from B comes next on both.
        b.send_text("marker")
        assert b.recv_message() == "marker" and a.recv_message() == "marker"


# -- 8. --workers ---------------------------------------------------------------------


COMMAND = [sys.executable, "-m", "wsloop"]


def test_workers_broadcast_needs_redis():
    """Guards: --workers 2 --broadcast without --redis would split the chat
    between processes: refused with one line on stderr and status 2."""
    result = subprocess.run(
        COMMAND + ["--port", str(free_port()), "--workers", "2", "--broadcast"],
        capture_output=True, text=True, timeout=30, env=cli_env(),
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wsloop: error: ") and "--redis" in lines[0]


def test_workers_share_one_port_and_one_chat(redis_server):
    """Guards: --workers 2 --broadcast --redis: two worker processes serve
    one port (SO_REUSEPORT), their log lines name them, a chat message from
    one client reaches every client on both workers, and SIGTERM to the
    parent closes every client with 1001 and exits 0 in bounded time."""
    port = free_port()
    close_timeout = 2
    args = ["--port", str(port), "--workers", "2", "--broadcast", "--close-timeout", str(close_timeout),
            "--redis", redis_server.url, "--redis-prefix", "chatprefix"]
    with workers_process(COMMAND + args) as (process, log):
        wait_serving(port, process, log)
        log.wait_count(r"worker \d+.*listening on", 2)  # both, before clients are spread
        clients, workers = clients_on_both_workers(port, log)
        redis_server.wait_numsub("chatprefix:chat", 2, timeout=10)
        clients[0].send_text("hello, all")
        for index, client in enumerate(clients):
            assert client.recv_message() == "hello, all", "client %d (worker %s)" % (index, workers[index])
        clients[-1].send_text("and back")
        for client in clients:
            assert client.recv_message() == "and back"

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        for client in clients:
            assert client.expect_close()[0] == 1001
            client.close(1001)
        process.wait(2 * close_timeout + 10)
        elapsed = time.monotonic() - started
        assert process.returncode == 0, log.text()
        assert elapsed < 2 * close_timeout + 5, "took %.1f s to stop" % elapsed
        for client in clients:
            client.shutdown()


@contextmanager
def two_workers_serving(redis_server, prefix):
    """``--workers 2 --broadcast --redis``, serving: (process, log, port,
    the workers' process ids)."""
    port = free_port()
    args = ["--port", str(port), "--workers", "2", "--broadcast", "--close-timeout", "2",
            "--redis", redis_server.url, "--redis-prefix", prefix]
    with workers_process(COMMAND + args) as (process, log):
        wait_serving(port, process, log)
        log.wait_count(r"worker \d+.*listening on", 2)
        workers = wait_until(lambda: len(children_of(process.pid)) == 2 and children_of(process.pid), 10,
                             message="the parent does not have two worker processes")
        yield process, log, port, workers


def test_a_dead_worker_is_restarted(redis_server):
    """Guards: the parent supervises: a worker killed with SIGKILL is
    replaced, the new one joins the chat in Redis, and clients keep being
    served on the port."""
    with two_workers_serving(redis_server, "restartprefix") as (process, log, port, workers):
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        replaced = wait_until(
            lambda: (lambda now: len(now) == 2 and victim not in now and now)(children_of(process.pid)),
            15,
            message=lambda: "the dead worker was not replaced:\n" + log.text(),
        )
        assert len(replaced - workers) == 1
        log.wait_count(r"worker \d+.*listening on", 3, timeout=15)  # the new worker serves too
        # Chat subscribes on a worker's first client: both must hold some.
        clients, _ = clients_on_both_workers(port, log, least=4)
        redis_server.wait_numsub("restartprefix:chat", 2, timeout=10)
        clients[0].send_text("after the restart")
        for client in clients:
            assert client.recv_message() == "after the restart"
        process.send_signal(signal.SIGTERM)
        for client in clients:
            assert client.expect_close()[0] == 1001
            client.close(1001)
        assert process.wait(15) == 0, log.text()


def test_workers_of_a_killed_supervisor_shut_down(redis_server):
    """Guards: a supervisor killed with SIGKILL cannot pass a signal on;
    its workers notice within about a second, close their clients with 1001
    and exit, instead of holding the port with nobody to restart them."""
    with two_workers_serving(redis_server, "orphanprefix") as (process, log, port, workers):
        clients, _ = clients_on_both_workers(port, log, least=2)
        process.kill()
        process.wait(10)
        for client in clients:
            assert client.expect_close()[0] == 1001
            client.close(1001)

        def all_gone():
            alive = []
            for pid in workers:
                try:
                    os.kill(pid, 0)
                    alive.append(pid)
                except ProcessLookupError:
                    pass
            return not alive

        wait_until(all_gone, 10, message=lambda: "workers still running:\n" + log.text())
        log.wait_count(r"supervisor \(pid %d\) gone" % process.pid, 2)


# -- the RESP reader's bounds, no Redis needed --------------------------------


def test_resp_reader_takes_replies_split_anywhere():
    data = b"+OK\r\n:42\r\n$5\r\nhe\r\nl\r\n*3\r\n$7\r\nmessage\r\n$1\r\nt\r\n$0\r\n\r\n-ERR x\r\n$-1\r\n"
    for split in range(len(data) + 1):
        parser = wsloop._RespParser(max_bulk=100)
        replies = []
        for piece in (data[:split], data[split:]):
            parser.feed(piece)
            replies.extend(parser.replies())
        assert replies[:4] == ["OK", 42, b"he\r\nl", [b"message", b"t", b""]]
        assert isinstance(replies[4], wsloop._RespError) and replies[5] is None


def test_resp_reader_refuses_a_bulk_string_over_its_limit_from_the_header():
    parser = wsloop._RespParser(max_bulk=1000)
    parser.feed(b"$1001\r\n")  # refused before any of its bytes arrive
    with pytest.raises(wsloop.ProtocolError):
        list(parser.replies())


def test_resp_reader_refuses_a_line_without_end_past_its_limit():
    parser = wsloop._RespParser(max_bulk=1000)
    parser.feed(b"+" + b"x" * (wsloop._RESP_MAX_LINE - 1))
    assert list(parser.replies()) == []  # not over the limit yet: waits
    parser.feed(b"xx")
    with pytest.raises(wsloop.ProtocolError):
        list(parser.replies())


# -- 8. a Redis that misbehaves: the bridge fails alone --------------------------------
#
# A fake Redis (redis_fixture.FakeRedis) gets the bridge connected, then sends
# what a real one never would.  Whatever it sends, the server goes on serving
# its clients, the bad link is dropped with one log line and comes back.

NODE = b"N" * 8  # a publishing node of the tests' own making


def envelope(sequence, text, node=NODE, kind=b"t"):
    """A message as another wsloop node publishes it: node id, sequence
    (8 bytes big-endian), kind, payload (built here, not by wsloop)."""
    return node + struct.pack("!Q", sequence) + kind + text


def still_serving(node, text="local"):
    """A new client on a topic of its own is served: the loop is alive."""
    probe = node.client("/probe")
    probe.send_text(text)
    assert probe.recv_message() == text


MALFORMED = {
    "arrays nested 100000 deep": b"*1\r\n" * 100000,
    "message with an integer channel": push(b"message", 5, envelope(1, b"x")),
    "message with nil data": b"*3\r\n" + b"$7\r\nmessage\r\n$8\r\nwsloop:t\r\n$-1\r\n",
    "message with nil channel": b"*3\r\n$7\r\nmessage\r\n$-1\r\n" + b"$3\r\nabc\r\n",
    "message with four items": push(b"message", b"wsloop:t", envelope(1, b"x"), b"more"),
    "unknown push kind": push(b"smessage", b"wsloop:t", envelope(1, b"x")),
    "channel outside the prefix": push(b"message", b"zzzzzz:t", envelope(1, b"foreign")),
    "a reply nobody asked for": b"+OK\r\n",
    "an array of a billion items": b"*1000000000\r\n" + b":1\r\n" * 1000,
    "100 bulk strings of 10 MiB": b"*100\r\n$10485760\r\n",
    "a bulk string over the limit": b"$1000000000000\r\n",
    "a bad number": b":12x\r\n",
    "a bulk string without its CRLF": b"*3\r\n$7\r\nmessageXY",
    "not RESP at all": b"HTTP/1.1 200 OK\r\n\r\n",
}


@pytest.mark.parametrize("reply", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_reply_drops_only_that_link(fake_redis, reply, caplog):
    """Guards: deep nesting (a RecursionError once ended the process), wrong
    types, nil, unknown push kinds, channels outside the prefix (once
    delivered to the subscribers of "t"), replies nobody asked for and
    headers announcing too much are each a protocol error on the link: one
    WARNING line, the link dropped and made again (resubscribed), nothing
    bogus delivered, and the server serves its clients throughout."""
    caplog.set_level(logging.WARNING, logger="wsloop")
    with cluster(fake_redis.url, count=1, **FAST_FAILURE) as (A,):
        a = A.client("/t")
        number, sock = fake_redis.subscriber()
        fake_redis.send(sock, reply)
        # A new subscriber connection: the bad one was dropped and made again.
        _, again = fake_redis.subscriber(after=number + 1)
        still_serving(A)
        fake_redis.send(again, push(b"message", b"wsloop:t", envelope(1, b"marker")))
        assert a.recv_message() == "marker", "something bogus was delivered before the marker"
        assert A.stats()["protocol_errors"] == 1, A.stats()
    errors = [r for r in caplog.records if "protocol error" in r.getMessage()]
    assert len(errors) == 1, caplog.text[-2000:]
    assert errors[0].levelno == logging.WARNING


def test_a_message_on_the_publishing_link_is_a_protocol_error(fake_redis):
    """Guards: the publishing connection never subscribes, so a pub/sub
    message there is a protocol error on it (it used to be delivered)."""
    with cluster(fake_redis.url, count=1, **FAST_FAILURE) as (A,):
        a = A.client("/t")
        A.server.publish("elsewhere", "find the publisher")
        (number,) = fake_redis.wait(lambda: next(((n,) for n, args in fake_redis.log if args[0] == b"PUBLISH"), None))
        fake_redis.send(fake_redis.connections[number], push(b"message", b"wsloop:t", envelope(1, b"bogus")))
        wait_until(lambda: A.stats()["protocol_errors"] == 1, 10, message="no protocol error")
        _, sock = fake_redis.subscriber()
        fake_redis.send(sock, push(b"message", b"wsloop:t", envelope(1, b"marker")))
        assert a.recv_message() == "marker", "the message on the publishing link was delivered"
        still_serving(A)


def test_a_flood_from_redis_is_read_in_slices(fake_redis):
    """Guards: a flood of valid messages used to be read until the socket
    was empty and delivered in one turn of the loop (seconds with no other
    client served).  Now a link reads a bounded slice a turn: with
    megabytes waiting at once, no turn delivers more than about two
    slices' worth, and every flooded message still arrives, in order."""
    count, size = 20000, 1000
    messages = [push(b"message", b"wsloop:t", envelope(n, b"x" * size)) for n in range(1, count + 1)]
    flood = b"".join(messages)
    per_turn = 2 * wsloop._REDIS_TURN_BUDGET // len(messages[0]) + 1
    handler = TopicRelay()
    # No PINGs meanwhile: the fake's PONG must not cut into the flood.
    broker = wsloop.RedisBroker(fake_redis.url, ping_interval=60, ping_timeout=60)
    # The flood's subscriber never reads: its server-side buffer holds it all.
    with running_server(handler, broker=broker, ping_interval=None, compression=False,
                        max_pending_output=128 * 2**20) as server:
        node = Node(server, handler)
        try:
            node.wait_state(lambda state: state == "connected", "connected")
            node.client("/t")
            _, sock = fake_redis.subscriber()
            # Hold the loop while the flood fills every buffer on the way,
            # so that megabytes are there to read at once.
            stalled, go = threading.Event(), threading.Event()
            server.call_soon_threadsafe(lambda: (stalled.set(), go.wait(10)))
            assert stalled.wait(JOIN_TIMEOUT)
            queued = 0
            try:
                while queued < len(flood):
                    queued += sock.send(flood[queued : queued + 65536], socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            assert queued > 4 * wsloop._REDIS_TURN_BUDGET, "only %d bytes could wait" % queued
            # Each turn of the loop notes how many messages had arrived.
            turns = [0]

            def tick():
                turns.append(broker._counts["received"])
                if turns[-1] < count and len(turns) < 10**6:
                    server._loop.call_soon(tick)

            server.call_soon_threadsafe(tick)
            sender = Worker(fake_redis.send, sock, flood[queued:])
            go.set()
            sender.start()
            wait_until(lambda: node.stats()["received"] == count, 30,
                       message=lambda: "only %d of %d arrived" % (node.stats()["received"], count))
            sender.join(30)
            most = max(later - earlier for earlier, later in zip(turns, turns[1:]))
            assert most <= per_turn, "one turn delivered %d messages (%d MB): the loop waited on Redis" % (
                most, most * len(messages[0]) // 2**20)
            assert node.stats()["missed"] == 0 and node.stats()["stale"] == 0
        finally:
            node.drop_clients()


RESP_PIECES = st.sampled_from([
    b"*1\r\n", b"*3\r\n", b"*2\r\n", b"*0\r\n", b"*-1\r\n", b"*-2\r\n", b"*99999\r\n",
    b"$7\r\nmessage\r\n", b"$9\r\nsubscribe\r\n", b"$4\r\npong\r\n", b"$0\r\n\r\n", b"$-1\r\n",
    b"$8\r\nwsloop:t\r\n", b"$8\r\nzzzzzz:t\r\n", b"$4\r\n\xff\xfe\xfd\xfc\r\n",
    b":1\r\n", b":-5\r\n", b":99999999999999999999999\r\n", b"+OK\r\n", b"+PONG\r\n", b"-ERR x\r\n",
    b"$100000000000\r\n", b"\r\n", b"$3\r\nab", bulk(envelope(7, b"hi")), bulk(envelope(3, b"\xff", kind=b"T")),
])


def test_arbitrary_bytes_from_redis_never_take_the_server_down(fake_redis):
    """Guards: whatever bytes Redis sends, split wherever, the server
    survives and serves its clients; the bridge comes back each time."""
    with cluster(fake_redis.url, count=1, ping_interval=0.3, ping_timeout=0.5, reconnect_max=0.05) as (A,):
        A.client("/t")
        state = {"after": 0}

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.one_of(RESP_PIECES, st.binary(max_size=40)), min_size=1, max_size=25))
        def feed(pieces):
            number, sock = fake_redis.subscriber(after=state["after"])
            state["after"] = number
            for piece in pieces:  # each piece its own write: splits anywhere
                fake_redis.send(sock, piece)
            still_serving(A, "after %d pieces" % len(pieces))

        feed()
        still_serving(A)
        A.wait_state(lambda state: state == "connected", "connected again")


def test_resp_reader_bounds_nesting_items_and_reply_size():
    """Guards: each bound of the reader is crossed here, and refused from a
    header, before what it announces has arrived."""
    depth = wsloop._RESP_MAX_DEPTH
    parser = wsloop._RespParser(max_bulk=100)
    parser.feed(b"*1\r\n" * depth + b":7\r\n")
    assert list(parser.replies()) == [_nested([7], depth - 1)]
    parser.feed(b"*1\r\n" * (depth + 1))
    with pytest.raises(wsloop.ProtocolError, match="nested"):
        list(parser.replies())

    items = wsloop._RESP_MAX_ITEMS
    parser = wsloop._RespParser(max_bulk=100)
    parser.feed(b"*%d\r\n" % items + b":1\r\n" * items)
    assert list(parser.replies()) == [[1] * items]
    parser.feed(b"*2\r\n*%d\r\n" % (items - 1))  # over the bound counting both levels
    with pytest.raises(wsloop.ProtocolError, match="items"):
        list(parser.replies())

    max_bulk = 40000  # a reply may carry max_bulk + _RESP_MAX_OVERHEAD bytes
    count = (max_bulk + wsloop._RESP_MAX_OVERHEAD) // max_bulk + 1
    parser = wsloop._RespParser(max_bulk=max_bulk)
    parser.feed(b"*%d\r\n" % count + (b"$%d\r\n" % max_bulk + b"x" * max_bulk + b"\r\n") * (count - 1))
    assert list(parser.replies()) == []  # so far within the bound: waits
    parser.feed(b"$%d\r\n" % max_bulk)  # this one's header crosses it
    with pytest.raises(wsloop.ProtocolError, match="reply over"):
        list(parser.replies())


def _nested(value, depth):
    for _ in range(depth):
        value = [value]
    return value


# -- 9. the loop never waits on Redis: names are resolved off the loop ------------------


def test_a_silent_dns_does_not_stop_the_loop(monkeypatch, caplog):
    """Guards: the Redis host name used to be resolved with a blocking
    getaddrinfo in the loop: with the DNS silent, no client was served.  Now
    a resolver thread asks (one per link at most, however often the link
    retries), clients are served meanwhile, and a WARNING names the host and
    the cause when the lookup outlasts ping_timeout."""
    caplog.set_level(logging.WARNING, logger="wsloop")
    silent_host = "redis.silent-dns.invalid"
    released = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == silent_host:  # a DNS that does not answer (for a while)
            released.wait(20)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        with cluster_unconnected("redis://%s:6379" % silent_host, ping_timeout=0.3, reconnect_max=0.1) as node:
            client = node.client("/t", timeout=5)
            client.send_text("served")
            assert client.recv_message() == "served"
            wait_until(lambda: any(silent_host in r.getMessage() and "resolving" in r.getMessage()
                                   for r in caplog.records), 10, message="no WARNING about the silent DNS")
            resolvers = [t for t in threading.enumerate() if t.name == "wsloop-redis-resolve"]
            assert len(resolvers) <= 2, "%d resolver threads: one per link at most" % len(resolvers)
            assert node.stats()["state"] == "disconnected"
    finally:
        released.set()


# -- 10. topic names are checked where they enter ----------------------------------------


class TopicChecker(wsloop.Handler):
    """Each message a client sends is a topic to subscribe it to (or, as
    "publish:" + topic, to publish to); the answer says what happened."""

    def on_message(self, conn, message):
        action, _, topic = message.rpartition(":")
        try:
            if action == "publish":
                conn.server.publish(topic, "x")
            else:
                conn.subscribe(topic)
        except (TypeError, ValueError) as exc:
            conn.send("%s: %s" % (type(exc).__name__, exc))
        else:
            conn.send("ok")


@pytest.mark.parametrize("topic", ["\ud800", "a\udfffb", "x" * (wsloop.MAX_TOPIC_BYTES + 1),
                                   "\u00e9" * (wsloop.MAX_TOPIC_BYTES // 2 + 1)])
def test_a_topic_redis_cannot_carry_is_refused_in_the_callers_thread(topic):
    """Guards: a lone surrogate (easy to get from JSON) used to be accepted,
    then broke resubscription after a Redis restart for every topic of the
    process; names over MAX_TOPIC_BYTES of UTF-8 were taken too.  Now
    subscribe() and publish() raise ValueError at once, in the caller's
    thread, and nothing reaches the loop."""
    with running_server(wsloop.Echo()) as server:
        with pytest.raises(ValueError):
            server.publish(topic, "x")
        client = Client(server.port, path="/")
        try:
            conn = wait_until(lambda: next(iter(server.connections), None), 5)
            with pytest.raises(ValueError):
                conn.subscribe(topic)
            with pytest.raises(ValueError):
                server.subscribe(conn, topic)
            assert server.topics_of(conn) == frozenset()
        finally:
            client.shutdown()


def test_the_longest_topic_is_taken():
    with running_server(wsloop.Echo()) as server:
        assert server.publish("\u00e9" * (wsloop.MAX_TOPIC_BYTES // 2), "x") == 0
        assert server.publish("x" * wsloop.MAX_TOPIC_BYTES, "x") == 0


def test_a_connection_holds_at_most_max_topics():
    """Guards: one client could subscribe to any number of topics (each
    costs memory here and a Redis subscription); now at most max_topics,
    the next is refused with ValueError, and a topic already held is fine."""
    with running_server(TopicChecker(), max_topics=3) as server:
        client = Client(server.port, path="/")
        try:
            for topic in ("a", "b", "c", "a"):
                client.send_text(topic)
                assert client.recv_message() == "ok"
            client.send_text("d")
            answer = client.recv_message()
            assert answer.startswith("ValueError") and "max_topics" in answer, answer
        finally:
            client.shutdown()
    with pytest.raises(ValueError):
        wsloop.Server(port=0, max_topics=0)


# -- 11. loss is reported where it happens, and order holds --------------------------------


def test_a_partition_of_the_publisher_is_reported_by_the_receiver_and_order_holds(redis_server, partition_proxy):
    """Guards, with the publishing server cut from Redis by a partition (a
    proxy the test controls) while the receiving one stays connected:
    - the receiver used to hear nothing of the loss (its gap counter read 0):
      now it sees A's sequence numbers jump and calls on_broker_gap with
      the topic and how many messages were missed from A's node;
    - the link A declared dead used to be closed normally, so the kernel
      kept retransmitting its queued PUBLISHes and Redis ran them after
      newer ones: now it is reset (SO_LINGER 0) and nothing held in the
      partition reaches Redis afterwards; order per publisher holds."""
    proxy = partition_proxy(redis_server.port)
    with cluster([proxy.url, redis_server.url], **FAST_FAILURE) as (A, B):
        a, b = A.client("/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 2)
        flows(a, b, "before")
        proxy.partition()
        lost = ["lost-%d" % n for n in range(1, 4)]
        for text in lost:  # queued on A's publisher link, which still looks up
            a.send_text(text)
            assert a.recv_message() == text
        A.wait_state(lambda state: state == "disconnected" or state == "connecting", "noticed the partition")
        wait_until(lambda: proxy.ended >= 2, 10, message="A never gave up its links")
        proxy.heal()
        A.wait_state(lambda state: state == "connected", "reconnected")
        flows(a, b, "new")
        # The partition's held bytes finally get through (retransmissions):
        # none of them may be a PUBLISH from the dead link.
        released = proxy.release()
        flows(a, b, "end")
        assert released == 0, "%d bytes of the dead link reached Redis after the partition" % released
        assert proxy.resets >= 2, "links declared dead were closed, not reset"
        B.handler.wait_gap("t")
        missed = [m for m in B.handler.missed if m]
        assert missed == [{"t": {A.broker.node_id.hex(): len(lost)}}], B.handler.missed
        assert B.stats()["missed"] == len(lost)
        assert B.stats()["reconnects"] == 0, "the receiver's own links never dropped"


def test_a_message_older_than_one_delivered_is_dropped_and_a_jump_is_counted(fake_redis):
    """Guards: a message from a node arriving after a newer one from the
    same node on the same topic used to be delivered (late, out of order);
    now it is dropped and counted as stale.  A jump in the sequence is
    reported once per turn with its count; the first message of a run
    (kind upper-case: the publisher forgot its counter) is no gap."""
    with cluster(fake_redis.url, count=1, **FAST_FAILURE) as (A,):
        a = A.client("/t")
        _, sock = fake_redis.subscriber()
        other = b"O" * 8
        replies = [
            (envelope(1, b"one"), "one"),
            (envelope(2, b"two"), "two"),
            (envelope(1, b"late"), None),  # older than "two": dropped
            (envelope(2, b"again"), None),  # a repeat: dropped
            (envelope(6, b"six"), "six"),  # 3, 4, 5 lost
            (envelope(1, b"other node", node=other), "other node"),  # its own numbering
            (envelope(100, b"new run", kind=b"T"), "new run"),  # no gap: a new run
            (envelope(101, b"next"), "next"),
        ]
        for data, _ in replies:
            fake_redis.send(sock, push(b"message", b"wsloop:t", data))
        for _, expected in replies:
            if expected is not None:
                assert a.recv_message() == expected
        A.handler.wait_gap("t")
        assert [m for m in A.handler.missed if m] == [{"t": {NODE.hex(): 3}}]
        stats = A.stats()
        assert stats["stale"] == 2 and stats["missed"] == 3, stats
        assert stats["protocol_errors"] == 0


def test_publishes_made_while_away_wait_until_this_process_has_resubscribed(fake_redis):
    """Guards: publishes buffered while Redis was away used to go out as
    soon as the publishing link was back, before this process had even
    resubscribed.  Now they wait until every SUBSCRIBE of the
    resubscription is confirmed: the fake Redis holds the confirmations,
    and the buffered PUBLISHes reach it only after it lets them go."""
    # ping_timeout: long, so a loaded machine does not drop the link while its
    # confirmations are held (it would resubscribe, held again for good).
    with cluster(fake_redis.url, count=1, ping_interval=0.3, ping_timeout=TIMEOUT, reconnect_max=0.1) as (A,):
        A.client("/t")
        number, _ = fake_redis.subscriber()
        fake_redis.hold_confirmations = True
        fake_redis.drop_all()
        A.wait_links_down()
        A.server.publish("t", "while away")
        fake_redis.subscriber(after=number + 1)  # resubscribing, unconfirmed
        A.wait_state(lambda state: state == "connected", "reconnected")
        A.server.publish("t", "after")  # behind "while away", in order
        in_loop(A.server, lambda: None)  # what the loop would send, it has sent
        fake_redis.release_confirmations()

        def published():
            return [args[2][len(envelope(0, b"")):] for _, args in fake_redis.log if args[0] == b"PUBLISH"]

        fake_redis.wait(lambda: published() == [b"while away", b"after"], message="the buffered publishes never came")
        released = [index for index, (_, args) in enumerate(fake_redis.log) if args == [b"RELEASED"]][0]
        first = [index for index, (_, args) in enumerate(fake_redis.log) if args[0] == b"PUBLISH"][0]
        assert first > released, "a buffered PUBLISH went out before this process had resubscribed"


# -- 12. several Redis servers ---------------------------------------------------------------


def topic_on(server, count, stem="topic"):
    """A topic that lives on Redis server number ``server`` of ``count``, by
    the documented rule (CRC-32 of its UTF-8, modulo count), computed here."""
    for n in range(1000):
        topic = "%s%d" % (stem, n)
        if zlib.crc32(topic.encode("utf-8")) % count == server:
            assert wsloop.redis_shard(topic, count) == server
            return topic
    raise AssertionError("no topic for server %d" % server)


def test_topics_spread_over_two_redis_servers_and_losing_one_touches_only_its_topics(start_redis):
    """Guards: --redis took one URL.  Now RedisBroker takes several; each
    topic lives on one server by redis_shard() (each server sees only its
    own topics' subscriptions), and with one server down the other's topics
    still cross processes, the lost server's topics are delivered locally
    and reported (only they) in on_broker_gap when it returns."""
    first, second = start_redis(), start_redis()
    urls = [first.url, second.url]
    one, two = topic_on(0, 2), topic_on(1, 2)
    with cluster([urls, urls], **FAST_FAILURE) as (A, B):
        a1, a2, b1, b2 = A.client("/" + one), A.client("/" + two), B.client("/" + one), B.client("/" + two)
        first.wait_numsub("wsloop:" + one, 2)
        second.wait_numsub("wsloop:" + two, 2)
        assert first.numsub("wsloop:" + two) == 0 and second.numsub("wsloop:" + one) == 0
        flows(a1, b1, "one")
        flows(a2, b2, "two")

        second.kill()
        for node in (A, B):
            wait_until(lambda: node.stats()["servers"][1]["subscriber"] != "ready", 10,
                       message="the loss of the second Redis went unnoticed")
        flows(a1, b1, "one, with the second Redis down")
        a2.send_text("two, locally")
        assert a2.recv_message() == "two, locally"

        second.restart()
        for node in (A, B):
            node.handler.wait_gap(two)
            assert all(one not in topics for topics in node.handler.gaps), node.handler.gaps
            node.wait_state(lambda state: state == "connected", "reconnected")
        second.wait_numsub("wsloop:" + two, 2)
        a2.send_text("two again")
        assert a2.recv_message() == "two again"
        read_until(b2, "two again", allowed=["two, locally"])
        flows(a1, b1, "one again")


def test_resubscription_is_paced_in_batches(fake_redis):
    """Guards: after a reconnect every topic was resubscribed at once, in
    the turn the link came back.  Now at most _RESUBSCRIBE_BATCH channels
    go in one SUBSCRIBE, one command a turn, starting at a random moment
    within resubscribe_jitter; every topic is resubscribed."""
    count, batch = 600, wsloop._RESUBSCRIBE_BATCH
    topics = ["t%d" % n for n in range(count)]
    with cluster(fake_redis.url, count=1, resubscribe_jitter=0.05, **FAST_FAILURE) as (A,):
        client = A.client("/t")
        conn = wait_until(lambda: next(iter(A.server.connections), None), 5)
        in_loop(A.server, lambda: [A.server.subscribe(conn, topic) for topic in topics])
        number, _ = fake_redis.subscriber()
        fake_redis.drop_all()
        _, sock = fake_redis.subscriber(after=number + 1)
        again = fake_redis.connections.index(sock)  # how the log names it

        def resubscribed():
            return [args[1:] for n, args in fake_redis.log if n == again and args[0] == b"SUBSCRIBE"]

        wanted = {("wsloop:" + topic).encode() for topic in ["t"] + topics}
        fake_redis.wait(lambda: {c for command in resubscribed() for c in command} == wanted,
                        message="not every topic was resubscribed")
        sizes = [len(command) for command in resubscribed()]
        assert max(sizes) <= batch and sum(sizes) == count + 1, sizes
        client.send_text("still served")
        assert client.recv_message() == "still served"


# -- 13. what the operator is told ------------------------------------------------------------


def test_an_unreachable_redis_at_start_is_a_warning_naming_host_and_cause(caplog):
    """Guards: a Redis that cannot be reached at start-up used to log
    nothing at the default level.  Now one WARNING names host, port and the
    cause, and retries are quiet."""
    caplog.set_level(logging.DEBUG, logger="wsloop")
    port = free_port()
    with cluster_unconnected("redis://127.0.0.1:%d" % port, reconnect_max=0.05):
        wait_until(lambda: sum("refused" in r.getMessage().lower() for r in caplog.records) >= 6, 10,
                   message="the links did not retry")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    reach = [m for m in warnings if "cannot reach Redis" in m]
    assert len(reach) == 2, warnings  # one per link, not one per attempt
    assert all("127.0.0.1:%d" % port in m and "refused" in m.lower() for m in reach), reach


def test_health_requires_broker_answers_503_while_no_redis_link_is_up(redis_server):
    """Guards: /healthz said 200 whatever Redis did.  With
    health_requires_broker it answers 503 while no link to Redis is up,
    200 once one is, and 503 again when Redis goes away."""
    broker = wsloop.RedisBroker(redis_server.url, **FAST_FAILURE)
    with running_server(broker=broker, health_path="/healthz", health_requires_broker=True) as server:
        wait_until(lambda: broker.state == "connected", 10)
        assert plain_get(server.port, "/healthz")[0] == 200
        redis_server.kill()
        wait_until(lambda: not broker.is_up(), 10)
        status, body = plain_get(server.port, "/healthz")
        assert status == 503 and b"Redis" in body, (status, body)
        redis_server.restart()
        wait_until(lambda: broker.is_up(), RECOVERY_TIMEOUT)
        assert plain_get(server.port, "/healthz")[0] == 200
    with pytest.raises(ValueError):
        wsloop.Server(port=0, health_requires_broker=True)


def test_a_message_over_max_message_stays_local(redis_server):
    """Guards: a message larger than max_message used to be published, and
    every other node's reader refused it and dropped its link.  Now it is
    delivered locally only, and counted as dropped."""
    with cluster(redis_server.url, max_message=1000) as (A, B):
        a, b = A.client("/t"), B.client("/t")
        redis_server.wait_numsub("wsloop:t", 2)
        big = "x" * 1001
        a.send_text(big)
        assert a.recv_message() == big
        flows(a, b, "x" * 1000)  # the bound itself crosses
        assert A.stats()["dropped"] == 1 and B.stats()["reconnects"] == 0


def test_cli_takes_several_redis_servers_and_health_requires_broker(start_redis):
    """Guards: --redis may be repeated (the chat topic lands on the server
    redis_shard names), and --health-requires-broker makes /healthz wait
    for Redis; without --redis it is refused with one line."""
    servers = [start_redis(), start_redis()]
    home = servers[wsloop.redis_shard("chat", 2)]
    port = free_port()
    with workers_process(COMMAND + ["--port", str(port), "--broadcast", "--redis", servers[0].url,
                                    "--redis", servers[1].url, "--health-requires-broker"]) as (process, log):
        wait_serving(port, process, log)
        client = Client(port, path="/")
        try:
            home.wait_numsub("wsloop:chat", 1)
            assert servers[1 - servers.index(home)].numsub("wsloop:chat") == 0
        finally:
            client.shutdown()
    result = subprocess.run(
        COMMAND + ["--port", str(free_port()), "--health-requires-broker"],
        capture_output=True, text=True, timeout=30, env=cli_env(),
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--redis" in lines[0], result.stderr


def test_a_publisher_that_forgets_a_topics_counter_starts_a_run_not_a_gap(redis_server, monkeypatch):
    """Guards the bound on the sequence counters a node keeps
    (_MAX_PUBLISHED_TOPICS, lowered here to 3): past it they are all
    forgotten, the next message of each topic starts a new run above every
    number used, and receivers take that as no loss."""
    monkeypatch.setattr(wsloop, "_MAX_PUBLISHED_TOPICS", 3)
    with cluster(redis_server.url) as (A, B):
        b = B.client("/t")
        redis_server.wait_numsub("wsloop:t", 1)
        A.server.publish("t", "first")
        assert b.recv_message() == "first"
        for topic in ("u", "v", "w"):  # the third new counter crosses the bound
            A.server.publish(topic, "elsewhere")
        A.server.publish("t", "second")  # its counter forgotten: a new run
        assert b.recv_message() == "second"
        assert B.stats()["missed"] == 0 and B.handler.gaps == [], B.handler.gaps


def test_a_receiver_tracks_a_bounded_number_of_nodes_per_topic(fake_redis, monkeypatch):
    """Guards the bound on publishing nodes tracked per topic
    (_MAX_NODES_PER_TOPIC, lowered here to 2): the node heard from longest
    ago is forgotten, and its next message is taken as a first one."""
    monkeypatch.setattr(wsloop, "_MAX_NODES_PER_TOPIC", 2)
    with cluster(fake_redis.url, count=1, **FAST_FAILURE) as (A,):
        a = A.client("/t")
        _, sock = fake_redis.subscriber()
        first, second, third = b"1" * 8, b"2" * 8, b"3" * 8
        sent = [(first, 5, b"a"), (second, 1, b"b"), (first, 6, b"c"),  # the second is now the quietest
                (third, 1, b"d"),  # the bound is crossed: the second node is forgotten
                (first, 6, b"e"),  # a repeat from a node still tracked: dropped
                (second, 1, b"f")]  # the forgotten node: taken as a first message
        for node, sequence, text in sent:
            fake_redis.send(sock, push(b"message", b"wsloop:t", envelope(sequence, text, node=node)))
        fake_redis.send(sock, push(b"message", b"wsloop:t", envelope(2, b"end", node=third)))
        assert read_until(a, "end", allowed=["a", "b", "c", "d", "f"]) == ["a", "b", "c", "d", "f"]
        assert A.stats()["stale"] == 1
