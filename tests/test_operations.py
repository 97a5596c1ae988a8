"""Running it in production: connection and message limits, clients behind
proxies, Unix sockets, systemd socket activation, metrics and stats, the
access log, and running out of file descriptors.

Everything runs for real: servers on loopback (and on Unix sockets in a
short temporary directory), the CLI and the EMFILE server in subprocesses
whose stderr a thread collects.  Every wait is bounded: on an event (a
response, a log line, a close) or, for a counter with no event to wait on,
polled with a deadline.  Clients from other addresses bind 127.0.0.2,
127.0.0.3 ... (all of 127/8 is loopback on Linux).

What a limit costs is measured by the benchmarks, not here.
"""

import logging
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import wsloop
from helpers import TIMEOUT, Client, Recorder, client_frame, connected, http_get, request_bytes, running_server
from helpers import free_port, wait_until

TEXT = 0x1
COMMAND = [sys.executable, "-m", "wsloop"]
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MiB = 2**20


# -- clients --------------------------------------------------------------------------


class SocketClient(Client):
    """A :class:`helpers.Client` on a socket connected elsewhere: from another
    loopback address, or over a Unix socket."""

    def __init__(self, sock, path="/", headers=None, handshake=True):
        self.sock = sock
        self.buffer = b""
        self.response_head = None
        if handshake:
            self.sock.sendall(request_bytes(path, headers))
            self.response_head = self.read_head()
            assert self.response_head.startswith(b"HTTP/1.1 101 "), self.response_head


def tcp_from(source, port, timeout=TIMEOUT):
    """A TCP socket to the server from loopback address ``source``."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def unix_socket(path, timeout=TIMEOUT):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def ws_from(port, source="127.0.0.1", **kw):
    """A WebSocket client from ``source``, handshake done (asserts the 101)."""
    return SocketClient(tcp_from(source, port), **kw)


def refusal(port, source="127.0.0.1", path="/", headers=None):
    """Send an upgrade request the server will refuse: (status, head, body).
    The request goes out at once, as a browser's would."""
    refused = SocketClient(tcp_from(source, port), handshake=False)
    refused.sock.sendall(request_bytes(path, headers))
    return refused.read_http_response()


def retry_after(head):
    match = re.search(r"(?im)^Retry-After: *(\d+) *\r?$", head)
    return int(match.group(1)) if match else None


def echoes(ws, text="still here"):
    ws.send_text(text)
    return ws.recv_message() == text


def close_cleanly(ws):
    """The closing handshake, then the server's end of TCP: by then the
    server has let go of the connection's file descriptor."""
    ws.close(1000)
    assert ws.expect_close() == (1000, "")
    ws.expect_eof()


def open_count(server, expected):
    """Wait for the server to count ``expected`` open connections (it ends a
    connection a moment after the client sees EOF)."""
    wait_until(
        lambda: server.stats()["connections_open"] == expected,
        message=lambda: "connections_open stayed %r" % server.stats()["connections_open"],
    )


# -- metrics ------------------------------------------------------------------------------


class Metrics:
    """One scrape, parsed by prometheus_client: sample values by name and
    labels, and each sample's family type."""

    def __init__(self, text):
        self.values = {}
        self.types = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
                self.types[sample.name] = family.type

    def value(self, name, **labels):
        """The sample's value, or None if the scrape has no such sample."""
        return self.values.get((name, tuple(sorted(labels.items()))))


def scrape(port, path="/metrics", source="127.0.0.1"):
    status, head, body = http_get(port, path, source)
    assert status == 200, (status, head, body)
    content_type = re.search(r"(?im)^Content-Type: *([^\r\n]*?) *\r?$", head)
    assert content_type, head
    assert content_type.group(1) == METRICS_CONTENT_TYPE, head
    return Metrics(body.decode("utf-8"))


# -- processes ------------------------------------------------------------------------------


class Process:
    """A subprocess whose stderr a thread collects line by line, so waiting
    for a line is bounded even if the line never comes."""

    def __init__(self, argv, env=None, pass_fds=(), stdout=subprocess.DEVNULL):
        self.process = subprocess.Popen(
            argv, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, pass_fds=pass_fds
        )
        self.lines = []  # (time.monotonic() when read, line)
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stderr:
            with self._changed:
                self.lines.append((time.monotonic(), line))
                self._changed.notify_all()
        with self._changed:
            self.lines.append((time.monotonic(), None))  # EOF
            self._changed.notify_all()

    def text(self):
        return "".join(line for _, line in self.lines if line)

    def matching(self, text):
        return [(when, line) for when, line in list(self.lines) if line and text in line]

    def wait_for(self, text, count=1, timeout=10.0):
        """The ``count``-th line containing ``text``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self.matching(text)
                if len(found) >= count:
                    return found[count - 1][1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1][1] is None):
                    raise AssertionError("%r not logged %d time(s); stderr:\n%s" % (text, count, self.text()))
                self._changed.wait(left)

    def stop(self, signum=signal.SIGTERM):
        """Signal it and wait for it to exit: its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(10)
        finally:
            self.kill()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(10)
        if self.process.stdout:
            self.process.stdout.close()


class CliServer(Process):
    """``python -m wsloop ARGS`` (on a free port unless the args say where)."""

    def __init__(self, *args, **kw):
        super().__init__(COMMAND + list(args), **kw)
        self.listening = self.wait_for("listening on")
        match = re.search(r":(\d+)\s*$", self.listening)
        self.port = int(match.group(1)) if match else None


@pytest.fixture
def processes():
    """A list to put Process objects in: each is killed when the test ends."""
    started = []
    yield started
    for process in started:
        process.kill()


@pytest.fixture
def cli(processes):
    def start(*args, **kw):
        processes.append(CliServer(*args, **kw))
        return processes[-1]

    return start


def run_cli(*args):
    return subprocess.run(COMMAND + list(args), capture_output=True, text=True, timeout=15)


def one_error_line(result):
    """A user error: exit status 2 and one line on stderr (returned)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wsloop: error: "), result.stderr
    return lines[0]


@pytest.fixture
def short_dir():
    """A directory for Unix sockets: their paths must fit in 108 bytes,
    which pytest's tmp_path does not promise."""
    with tempfile.TemporaryDirectory(prefix="wsl", dir="/tmp") as directory:
        yield directory


# =============================================================================
# max_connections: 503 past N connections, handshakes in progress included
# =============================================================================


def test_past_max_connections_a_new_client_gets_503_with_retry_after():
    with running_server(max_connections=2) as server:
        first = ws_from(server.port)
        in_handshake = tcp_from("127.0.0.1", server.port)  # counted, though silent
        _, head, _ = refusal(server.port)
        assert head.startswith("HTTP/1.1 503 Service Unavailable\r\n"), head
        assert retry_after(head) is not None, head
        # The refusal took nothing from the two admitted.
        assert echoes(first)
        late = SocketClient(in_handshake)
        assert echoes(late)
        assert server.stats()["connections_refused"] == {"max_connections": 1}


def test_refused_clients_are_answered_at_once_and_freed_slots_are_reused():
    with running_server(max_connections=1) as server:
        holder = ws_from(server.port)
        # The listener keeps being read: each refusal comes back promptly
        # (the client's 5 s socket timeout bounds it) instead of waiting in
        # the backlog.
        for _ in range(5):
            assert refusal(server.port)[0] == 503
        close_cleanly(holder)
        open_count(server, 0)
        assert echoes(ws_from(server.port))
        assert server.stats()["connections_refused"] == {"max_connections": 5}


def test_silent_clients_past_the_limit_are_held_only_up_to_a_bound():
    """Each client past max_connections costs a Connection until its request
    comes and its 503 goes out; 16 + max_connections / 4 such at most.  Past
    that, the oldest silent one is closed to make room for the newcomer (so
    a flood of silent clients cannot keep a health check out), and the ones
    still held are answered 503 when they speak."""
    # close_timeout: the refused clients never close their end; do not wait 1 s for them.
    with running_server(max_connections=1, close_timeout=0.2) as server:
        holder = ws_from(server.port)
        silent = [tcp_from("127.0.0.1", server.port) for _ in range(16)]  # the bound for 1
        wait_until(lambda: server.stats()["connections_accepted"] == 17, 5, message="not all accepted")
        extra = tcp_from("127.0.0.1", server.port)
        assert silent[0].recv(1024) == b""  # the oldest waiter: closed without a word
        assert server.stats()["connections_refused"] == {"max_connections": 1}
        for sock in silent[1:] + [extra]:
            refused = SocketClient(sock, handshake=False)
            refused.sock.sendall(request_bytes())
            assert refused.read_http_response()[0] == 503
        silent[0].close()
        assert echoes(holder)
        assert server.stats()["connections_refused"] == {"max_connections": 17}


def test_health_and_metrics_are_answered_past_a_full_room_of_silent_clients():
    """max_connections held by silent clients, and as many silent clients
    waiting past the limit as may wait: the health check and metrics still
    get their answer (the oldest silent waiter makes room)."""
    with running_server(max_connections=2, health_path="/healthz", metrics_path="/metrics") as server:
        held = [tcp_from("127.0.0.1", server.port) for _ in range(2)]
        waiting = [tcp_from("127.0.0.1", server.port) for _ in range(16)]
        wait_until(lambda: server.stats()["connections_accepted"] == 18, 5, message="not all accepted")
        assert http_get(server.port, "/healthz")[0::2] == (200, b"ok\n")
        assert scrape(server.port).value("wsloop_connections_open") == 0
        for sock in held + waiting:
            sock.close()


def test_health_and_metrics_are_exempt_from_the_per_ip_limit():
    with running_server(max_connections_per_ip=1, health_path="/healthz", metrics_path="/metrics") as server:
        holder = ws_from(server.port)
        assert refusal(server.port)[0] == 429  # a second WebSocket is refused...
        assert http_get(server.port, "/healthz")[0::2] == (200, b"ok\n")  # ...the operator's views are not
        assert scrape(server.port).value("wsloop_connections_open") == 1
        assert echoes(holder)


def test_a_full_server_still_answers_its_health_check_and_metrics():
    with running_server(max_connections=1, health_path="/healthz", metrics_path="/metrics") as server:
        holder = ws_from(server.port)
        assert refusal(server.port)[0] == 503  # a WebSocket client is refused...
        status, _, body = http_get(server.port, "/healthz")
        assert (status, body) == (200, b"ok\n")  # ...the operator's views are not
        assert scrape(server.port).value("wsloop_connections_open") == 1
        assert echoes(holder)


def test_a_metrics_path_must_be_a_path():
    with pytest.raises(ValueError):
        wsloop.Server(port=0, metrics_path="metrics")


# =============================================================================
# max_connections_per_ip: 429 past N open connections from one address
# =============================================================================


def test_past_max_connections_per_ip_the_handshake_gets_429():
    with running_server(max_connections_per_ip=2) as server:
        a, b = ws_from(server.port), ws_from(server.port)
        _, head, _ = refusal(server.port)
        assert head.startswith("HTTP/1.1 429 Too Many Requests\r\n"), head
        assert retry_after(head) is not None, head
        assert echoes(a)
        assert echoes(b)
        assert server.stats()["connections_refused"] == {"max_connections_per_ip": 1}
        assert server.stats()["handshakes"].get(429) == 1


def test_per_ip_limit_counts_each_address_separately():
    with running_server(max_connections_per_ip=1) as server:
        held = ws_from(server.port, source="127.0.0.1")
        other = ws_from(server.port, source="127.0.0.2")
        assert echoes(other)
        assert refusal(server.port, source="127.0.0.2")[0] == 429
        assert echoes(held)


def test_per_ip_slot_is_freed_when_a_connection_ends():
    with running_server(max_connections_per_ip=1) as server:
        first = ws_from(server.port)
        assert refusal(server.port)[0] == 429
        close_cleanly(first)
        open_count(server, 0)
        assert echoes(ws_from(server.port))


# =============================================================================
# max_messages_per_second / message_burst: a token bucket per connection
# =============================================================================


def send_texts(ws, texts):
    """All in one write: they reach the server together, far faster than
    any refill in these tests."""
    ws.sock.sendall(b"".join(client_frame(TEXT, text) for text in texts))


def test_client_over_the_message_rate_is_closed_with_1008():
    # close_timeout: the client never answers the 1008; do not wait 1 s for it.
    with running_server(max_messages_per_second=1, message_burst=3, close_timeout=0.2) as server:
        ws = ws_from(server.port)
        send_texts(ws, ["m1", "m2", "m3", "m4"])
        assert [ws.recv_message() for _ in range(3)] == ["m1", "m2", "m3"]
        assert ws.expect_close() == (1008, "message rate limit exceeded")
        wait_until(lambda: server.stats()["close_codes_sent"] == {1008: 1})


def test_message_burst_defaults_to_the_rate():
    with running_server(max_messages_per_second=3) as server:
        ws = ws_from(server.port)
        send_texts(ws, ["m1", "m2", "m3", "m4"])
        assert [ws.recv_message() for _ in range(3)] == ["m1", "m2", "m3"]
        assert ws.expect_close() == (1008, "message rate limit exceeded")


def test_message_bucket_refills_at_the_rate():
    # 1 token per 0.05 s, at most 1 saved: waiting 0.15 s (three tokens'
    # time, as before at 10 a second) always earns the next message (a slow
    # machine only earns it more surely).
    with running_server(max_messages_per_second=20, message_burst=1) as server:
        ws = ws_from(server.port)
        for index in range(4):
            assert echoes(ws, "paced %d" % index)
            time.sleep(0.15)  # the passing of time is what is tested here


def test_message_bucket_is_per_connection():
    with running_server(max_messages_per_second=1, message_burst=2) as server:
        greedy, other = ws_from(server.port), ws_from(server.port)
        send_texts(greedy, ["a", "b", "c"])
        assert greedy.recv_message() == "a"
        assert greedy.recv_message() == "b"
        assert greedy.expect_close() == (1008, "message rate limit exceeded")
        assert echoes(other, "x")
        assert echoes(other, "y")


@pytest.mark.parametrize("opcode", [0x9, 0xA], ids=["pings", "pongs"])
def test_control_frames_cost_tokens_like_messages(opcode):
    """A client limited to 5 messages a second that sends 1,000 pings (or
    unsolicited pongs) in one write gets at most 5 answered, then 1008: it
    cannot make the server spend a core answering pings."""
    with running_server(max_messages_per_second=5) as server:
        ws = ws_from(server.port)
        ws.sock.sendall(b"".join(client_frame(opcode, b"p%d" % index) for index in range(1000)))
        pongs = 0
        while True:
            fin, kind, payload = ws.recv_frame()
            if kind == 0xA:
                pongs += 1
                continue
            assert kind == 0x8, kind
            assert struct.unpack("!H", payload[:2])[0] == 1008
            assert payload[2:] == b"message rate limit exceeded"
            break
        # The protocol answers a ping as it reads it, before the charge: at
        # most one pong beyond the burst.
        assert pongs <= (5 + 1 if opcode == 0x9 else 0), pongs


def test_each_fragment_costs_a_token():
    """A message in 40 fragments costs 40 tokens: with a burst of 30 it is
    refused with 1008, where one whole message would have been let through."""
    with running_server(max_messages_per_second=1, message_burst=30) as server:
        ws = ws_from(server.port)
        frames = [client_frame(TEXT if index == 0 else 0x0, b"f", fin=(index == 39)) for index in range(40)]
        ws.sock.sendall(b"".join(frames))
        assert ws.expect_close() == (1008, "message rate limit exceeded")
        ok = ws_from(server.port)
        frames = [client_frame(TEXT if index == 0 else 0x0, b"g", fin=(index == 9)) for index in range(10)]
        ok.sock.sendall(b"".join(frames))
        assert ok.recv_message() == "g" * 10  # 10 fragments within the burst: one message


def test_no_message_rate_limit_by_default():
    with running_server() as server:
        ws = ws_from(server.port)
        texts = ["n%d" % index for index in range(500)]
        send_texts(ws, texts)
        assert [ws.recv_message() for _ in texts] == texts


# =============================================================================
# forwarded_allow_ips: the client's address and scheme behind trusted proxies
# =============================================================================

SPOOFED = {
    "X-Forwarded-For": "198.51.100.66",
    "X-Forwarded-Proto": "https",
    "Forwarded": 'for="[2001:db8::66]:1";proto=https',
}


def connection_seen(headers, **options):
    """Connect with these request headers: (conn as the server sees it,
    the client socket's own address)."""
    handler = Recorder()
    with running_server(handler, **options) as server:
        ws = ws_from(server.port, headers=headers)
        assert handler.connect_event.wait(5)
        conn = handler.connected[0]
        return conn, ws.sock.getsockname()


@pytest.mark.parametrize(
    "trusted, headers, address, scheme",
    [
        pytest.param(None, SPOOFED, None, "http", id="no-trusted-proxy"),
        pytest.param(["10.0.0.0/8"], SPOOFED, None, "http", id="peer-not-trusted"),
        pytest.param(["127.0.0.1"], {"X-Forwarded-For": "203.0.113.7"}, ("203.0.113.7", 0), "http", id="xff"),
        pytest.param(
            ["127.0.0.1"], {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
            ("203.0.113.7", 0), "https", id="xff-proto",
        ),
        pytest.param(
            ["127.0.0.1", "10.0.0.0/8"], {"X-Forwarded-For": "198.51.100.66, 203.0.113.7, 10.0.0.5"},
            ("203.0.113.7", 0), "http", id="xff-chain-right-most-untrusted",
        ),
        pytest.param(["127.0.0.1"], {"X-Forwarded-Proto": "https"}, None, "https", id="xfp-without-xff"),
        pytest.param(
            ["127.0.0.1"], {"Forwarded": 'for="[2001:db8::1]:4711";proto=https'},
            ("2001:db8::1", 4711), "https", id="forwarded-ipv6-port",
        ),
        pytest.param(
            ["127.0.0.1", "10.0.0.0/8"],
            {"Forwarded": "for=198.51.100.66, for=203.0.113.7;proto=https, for=10.0.0.5;proto=https"},
            ("203.0.113.7", 0), "https", id="forwarded-chain",
        ),
        pytest.param(
            ["127.0.0.1"], {"Forwarded": "for=203.0.113.7", "X-Forwarded-For": "198.51.100.66"},
            ("203.0.113.7", 0), "http", id="forwarded-mode-ignores-xff",
        ),
        # The default believes X-Forwarded-For alone: a Forwarded the proxy
        # let through from the client is ignored, whatever it says.
        pytest.param(
            ["127.0.0.1"], {"Forwarded": "for=203.0.113.7;proto=https", "X-Forwarded-For": "198.51.100.66"},
            ("198.51.100.66", 0), "http", id="xff-mode-ignores-forwarded",
        ),
        pytest.param(
            ["127.0.0.1"], {"Forwarded": "for=203.0.113.7;proto=https"}, None, "http",
            id="xff-mode-ignores-forwarded-alone",
        ),
    ],
)
def test_client_address_and_scheme(trusted, headers, address, scheme, request):
    """``address`` None: the headers are ignored, the TCP peer is the client."""
    options = {} if trusted is None else {"forwarded_allow_ips": trusted}
    if request.node.callspec.id.startswith("forwarded"):
        options["forwarded_header"] = "forwarded"
    conn, own_address = connection_seen(headers, **options)
    assert conn.peer_address == own_address
    assert conn.remote_address == (own_address if address is None else address)
    assert conn.scheme == scheme


def test_each_connection_keeps_its_own_peer_address_past_the_shared_host_table(monkeypatch):
    """Connections from one host share its address string; the table of
    them is bounded and starts afresh when full (here at 2 hosts), and every
    connection still reports its own host and port.  Linux routes all of
    127.0.0.0/8 to loopback, so four source addresses are four hosts."""
    monkeypatch.setattr(wsloop, "_HOSTS_KEPT", 2)
    recorder = Recorder()
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.4", "127.0.0.1"]
    with running_server(recorder) as server:
        socks = []
        for host in hosts:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=(host, 0))
            sock.sendall(request_bytes())
            socks.append(sock)
        assert connected(recorder, len(hosts))
        seen = sorted(conn.peer_address for conn in recorder.connected)
        assert seen == sorted(sock.getsockname() for sock in socks)
        for sock in socks:
            sock.close()


def test_spoofed_headers_from_an_untrusted_peer_do_not_dodge_the_per_ip_limit():
    with running_server(max_connections_per_ip=1) as server:
        held = ws_from(server.port, headers={"X-Forwarded-For": "198.51.100.1"})
        status, _, _ = refusal(server.port, headers={"X-Forwarded-For": "198.51.100.2",
                                                     "Forwarded": "for=198.51.100.3"})
        assert status == 429
        assert echoes(held)


def test_per_ip_limit_counts_forwarded_clients_separately():
    with running_server(max_connections_per_ip=1, forwarded_allow_ips=["127.0.0.1"]) as server:
        one = ws_from(server.port, headers={"X-Forwarded-For": "203.0.113.7"})
        two = ws_from(server.port, headers={"X-Forwarded-For": "203.0.113.8"})
        assert refusal(server.port, headers={"X-Forwarded-For": "203.0.113.7"})[0] == 429
        assert echoes(one)
        assert echoes(two)


def test_per_ip_limit_groups_ipv6_clients_by_their_64():
    def via_proxy(address):
        return {"Forwarded": 'for="[%s]"' % address}

    with running_server(max_connections_per_ip=1, forwarded_allow_ips=["127.0.0.1"],
                        forwarded_header="forwarded") as server:
        held = ws_from(server.port, headers=via_proxy("2001:db8::1"))
        assert refusal(server.port, headers=via_proxy("2001:db8::2"))[0] == 429  # same /64
        assert echoes(held)
        assert echoes(ws_from(server.port, headers=via_proxy("2001:db8:0:1::1")))  # another /64


def test_logs_name_the_forwarded_client(caplog):
    caplog.set_level(logging.INFO, logger="wsloop")
    with running_server(forwarded_allow_ips=["127.0.0.1"]) as server:
        ws = ws_from(server.port, path="/via-proxy", headers={"X-Forwarded-For": "203.0.113.7"})
        assert echoes(ws)  # the loop has logged the open by the time it echoes
    opens = [r.getMessage() for r in caplog.records if r.name == "wsloop" and "open from" in r.getMessage()]
    assert len(opens) == 1, opens
    assert "203.0.113.7" in opens[0], opens
    access = [r.getMessage() for r in caplog.records if r.name == "wsloop.access" and "/via-proxy" in r.getMessage()]
    assert len(access) == 1, access
    assert "203.0.113.7" in access[0], access


# Every kind of character a client could use to forge or hide a log line:
# CR, LF, ESC, NUL, DEL, C1 (NEL U+0085, CSI U+009B), the Unicode line and
# paragraph separators, a bidi override, and the quote and backslash that
# would end or fake a quoted field.
HOSTILE_REASON = 'bye\r\n2026-01-01 wsloop INFO forged\x1b[2J\x00\x7f\u0085\u009b\u2028\u2029\u202e"\\end'
# Header values (latin-1 on the wire): C0 controls other than tab are
# refused at the parser, so what reaches a log is tab, C1, DEL-free obs-text, quotes.
HOSTILE_AGENT = 'agent\t\x85\x9b[31m" injected="yes\\'
ACCESS_LINE = re.compile(
    r'^(\S+) "((?:[^"\\]|\\.)*) ((?:[^"\\]|\\.)*)" (\d{3}) subprotocol=(\S+) extension=(\S+) "((?:[^"\\]|\\.)*)"$'
)


def log_lines(caplog):
    return [(r.name, r.getMessage()) for r in caplog.records if r.name.startswith("wsloop")]


def assert_one_printable_line(message):
    bad = [char for char in message if not char.isprintable()]
    assert not bad, "unescaped %r in log line %r" % (bad, message)


def test_client_text_cannot_write_into_the_logs(caplog):
    """Through real sockets, every client-supplied string that reaches a log
    record (close reason, target, path, User-Agent, subprotocol, a refusal's
    reason) is escaped: one printable line, and the access line's quoted
    fields parse unambiguously back to what the client sent."""
    caplog.set_level(logging.DEBUG, logger="wsloop")
    recorder = Recorder()
    target = '/room"x\\y?q="1"'
    with running_server(recorder, select_subprotocol=lambda conn, offered: offered[0],
                        origins=["https://app.example"]) as server:
        ws = ws_from(server.port, path=target, headers={
            "Origin": "https://app.example", "User-Agent": HOSTILE_AGENT,
            "Sec-WebSocket-Protocol": 'p"\x85\x9bq'})
        ws.close(4000, HOSTILE_REASON.encode("utf-8"))
        assert ws.expect_close()[0] == 4000
        assert recorder.close_event.wait(5)
        refused = refusal(server.port, headers={"Origin": "https://e\x85vil\x9b\"x", "User-Agent": HOSTILE_AGENT})
        assert refused[0] == 403
    assert recorder.closed[0][2] == HOSTILE_REASON  # the handler gets the reason as sent
    lines = log_lines(caplog)
    for _, message in lines:
        assert_one_printable_line(message)
    access = [message for name, message in lines if name == "wsloop.access"]
    assert len(access) == 2, access
    fields = [ACCESS_LINE.match(line) for line in access]
    assert all(fields), access
    unescape = lambda text: text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    opened, forbidden = fields
    assert unescape(opened.group(3)) == target
    assert opened.group(4) == "101"
    assert unescape(opened.group(7)) == HOSTILE_AGENT
    assert unescape(opened.group(5)) == 'p"\x85\x9bq'
    assert forbidden.group(4) == "403"
    assert unescape(forbidden.group(7)) == HOSTILE_AGENT
    closes = [message for _, message in lines if "closed: received 4000" in message]
    assert len(closes) == 1, closes
    assert "forged\\x1b[2J\\x00\\x7f\\x85\\x9b\\u2028\\u2029\\u202e\\\"\\\\end" in closes[0], closes
    refusals = [message for _, message in lines if "answered 403" in message]
    assert len(refusals) == 1, refusals
    assert 'e\\x85vil\\x9b\\"x' in refusals[0], refusals


def test_demo_page_origin_check_uses_the_forwarded_scheme():
    pages = {"/": ("text/html; charset=utf-8", b"<h1>demo</h1>")}
    https_proxy = {"Host": "chat.example", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    options = dict(pages=pages, origins=["https://chat.example"])
    with running_server(forwarded_allow_ips=["127.0.0.1"], **options) as server:
        assert http_get(server.port, "/", headers=https_proxy)[0] == 200
        plain_proxy = {"Host": "chat.example", "X-Forwarded-For": "203.0.113.7"}
        assert http_get(server.port, "/", headers=plain_proxy)[0] == 403
    with running_server(**options) as server:  # no trusted proxy: the header is ignored
        assert http_get(server.port, "/", headers=https_proxy)[0] == 403


# =============================================================================
# uds / uds_mode: listening on a Unix socket
# =============================================================================


@pytest.mark.parametrize("trusted", ["unix", "*"])
def test_behind_a_proxy_on_a_unix_socket_the_forwarded_client_is_the_client(short_dir, caplog, trusted):
    """--forwarded-allow-ips unix (or *): the per-address limit, the metrics
    allow-list and the logs see the client the proxy names, as over TCP."""
    caplog.set_level(logging.INFO, logger="wsloop")
    path = os.path.join(short_dir, "ws.sock")
    recorder = Recorder()
    with running_server(recorder, uds=path, forwarded_allow_ips=[trusted], max_connections_per_ip=1,
                        metrics_path="/metrics") as server:
        held = SocketClient(unix_socket(path), path="/via-uds", headers={"X-Forwarded-For": "203.0.113.7"})
        assert connected(recorder, 1)[0].remote_address == ("203.0.113.7", 0)
        second = SocketClient(unix_socket(path), handshake=False)
        second.sock.sendall(request_bytes(headers={"X-Forwarded-For": "203.0.113.7"}))
        assert second.read_http_response()[0] == 429
        assert echoes(SocketClient(unix_socket(path), headers={"X-Forwarded-For": "203.0.113.8"}))

        def metrics_for(address):
            plain = SocketClient(unix_socket(path), handshake=False)
            plain.sock.sendall(("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: %s\r\n\r\n"
                                % address).encode())
            return plain.read_http_response()[0]

        assert metrics_for("127.0.0.1") == 200
        assert metrics_for("203.0.113.7") == 403
        assert echoes(held)
    access = [r.getMessage() for r in caplog.records if r.name == "wsloop.access" and "/via-uds" in r.getMessage()]
    assert len(access) == 1, access
    assert access[0].startswith("203.0.113.7:"), access
    assert server.address == path


def test_echo_over_a_unix_socket(short_dir):
    path = os.path.join(short_dir, "ws.sock")
    with running_server(uds=path):
        ws = SocketClient(unix_socket(path))
        assert echoes(ws, "over AF_UNIX")
        close_cleanly(ws)


@pytest.mark.parametrize("options, mode", [({}, 0o660), ({"uds_mode": 0o600}, 0o600)])
def test_unix_socket_file_gets_its_mode(short_dir, options, mode):
    path = os.path.join(short_dir, "ws.sock")
    with running_server(uds=path, **options):
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_unix_socket_file_is_removed_on_shutdown(short_dir):
    path = os.path.join(short_dir, "ws.sock")
    with running_server(uds=path):
        assert os.path.exists(path)
    assert not os.path.exists(path)


def test_stale_unix_socket_file_is_replaced(short_dir):
    path = os.path.join(short_dir, "ws.sock")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(path)  # the file stays; nothing listens on it any more
    with running_server(uds=path):
        assert echoes(SocketClient(unix_socket(path)))


def test_unix_socket_in_use_is_an_oserror_and_is_left_alone(short_dir):
    path = os.path.join(short_dir, "ws.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        with pytest.raises(OSError, match="in use"):
            wsloop.Server(uds=path).close()
        assert os.path.exists(path)
        unix_socket(path).close()  # the owner still gets its connections


def test_a_file_that_is_not_a_socket_is_never_removed(short_dir):
    # Beyond the brief: only a stale *socket* may be removed.
    path = os.path.join(short_dir, "ws.sock")
    with open(path, "w") as precious:
        precious.write("keep me")
    with pytest.raises(OSError):
        wsloop.Server(uds=path).close()
    with open(path) as precious:
        assert precious.read() == "keep me"


# =============================================================================
# systemd socket activation: LISTEN_PID / LISTEN_FDS, fds from 3
# =============================================================================

# Runs as the process systemd would start: it moves the listening sockets it
# was given to fds 3, 4 ..., sets LISTEN_PID (its own pid, which exec keeps,
# unless told another) and LISTEN_FDS, then execs `python -m wsloop ARGS`.
ACTIVATOR = textwrap.dedent("""
    import fcntl, os, sys
    given = [int(fd) for fd in sys.argv[1].split(",")]
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in given]
    for fd in given:
        os.close(fd)
    for index, fd in enumerate(moved):
        os.dup2(fd, 3 + index)  # SD_LISTEN_FDS_START; dup2 makes it inheritable
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[2] == "self" else sys.argv[2]
    os.environ["LISTEN_FDS"] = str(len(given))
    os.execv(sys.executable, [sys.executable, "-m", "wsloop"] + sys.argv[3:])
""")


def listening_tcp():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def activated(listeners, *args, listen_pid="self"):
    fds = [sock.fileno() for sock in listeners]
    argv = [sys.executable, "-c", ACTIVATOR, ",".join(map(str, fds)), listen_pid, *args]
    return Process(argv, pass_fds=fds)


def test_socket_activation_serves_on_fd_3(processes):
    with listening_tcp() as listener:
        port = listener.getsockname()[1]
        # --port 1 would fail to bind (or bind the wrong port): it must be ignored.
        processes.append(activated([listener], "--port", "1"))
        # Already listening: the connection waits in the backlog until the
        # server takes it (the client's 5 s timeout bounds the wait).
        ws = Client(port)
        assert echoes(ws, "activated")
        close_cleanly(ws)
    assert processes[0].stop() == 0


def test_socket_activation_serves_every_fd_passed(processes):
    with listening_tcp() as first, listening_tcp() as second:
        processes.append(activated([first, second], "--port", "1"))
        for sock in (first, second):
            assert echoes(Client(sock.getsockname()[1]))


def test_listen_fds_for_another_pid_are_ignored(processes):
    with listening_tcp() as listener:
        process = activated([listener], "--port", "0", listen_pid="1")
        processes.append(process)
        line = process.wait_for("listening on")
        port = int(re.search(r":(\d+)\s*$", line).group(1))
        assert port != listener.getsockname()[1]
        assert echoes(Client(port))


# =============================================================================
# Metrics (Prometheus text format 0.0.4) and Server.stats()
# =============================================================================

COUNTERS = [
    "wsloop_connections_accepted_total",
    "wsloop_messages_received_total",
    "wsloop_messages_sent_total",
    "wsloop_bytes_received_total",
    "wsloop_bytes_sent_total",
    "wsloop_slow_consumer_closes_total",
    "wsloop_keepalive_timeouts_total",
]
GAUGES = [
    "wsloop_connections_open",
    "wsloop_pending_output_bytes",
    "wsloop_pending_output_max_bytes",
    "wsloop_pending_output_held_bytes",
    "wsloop_loop_lag_seconds",
]
BROKER_METRICS = ["wsloop_broker_connected", "wsloop_broker_gaps_total", "wsloop_broker_dropped_total"]
STATS_KEYS = {
    "connections_open", "connections_accepted", "connections_refused", "handshakes",
    "messages_in", "messages_out", "bytes_in", "bytes_out", "close_codes_sent",
    "close_codes_received", "pending_output_total", "pending_output_max", "pending_output_held",
    "slow_consumer_closes", "keepalive_timeouts", "loop_lag_max", "broker",
}


def echo_five_and_close(port):
    ws = ws_from(port)
    for index in range(5):
        assert echoes(ws, "hello")
    close_cleanly(ws)


def test_metrics_are_off_by_default():
    with running_server() as server:
        assert http_get(server.port, "/metrics")[0] == 426


def test_metrics_has_every_figure_with_its_type():
    with running_server(metrics_path="/metrics") as server:
        metrics = scrape(server.port)
    for name in COUNTERS:
        assert metrics.types.get(name) == "counter", name
        assert metrics.value(name) is not None, name
    for name in GAUGES:
        assert metrics.types.get(name) == "gauge", name
        assert metrics.value(name) is not None, name
    for name in BROKER_METRICS:  # no broker, no broker figures
        assert name not in metrics.types, name


def test_metrics_count_known_traffic():
    with running_server(metrics_path="/metrics") as server:
        echo_five_and_close(server.port)
        open_count(server, 0)
        metrics = scrape(server.port)
    assert metrics.value("wsloop_messages_received_total") == 5
    assert metrics.value("wsloop_messages_sent_total") == 5
    # Bytes on the wire or payload bytes, at least the 25 of payload.
    assert metrics.value("wsloop_bytes_received_total") >= 25
    assert metrics.value("wsloop_bytes_sent_total") >= 25
    assert metrics.value("wsloop_close_codes_total", direction="received", code="1000") == 1
    assert metrics.value("wsloop_close_codes_total", direction="sent", code="1000") == 1
    assert metrics.value("wsloop_handshakes_total", status="101") == 1
    assert metrics.value("wsloop_connections_accepted_total") >= 1
    assert metrics.value("wsloop_pending_output_bytes") == 0


def test_metrics_count_refused_handshakes_by_status():
    with running_server(metrics_path="/metrics", origins=["https://ok.example"]) as server:
        welcome = ws_from(server.port, headers={"Origin": "https://ok.example"})
        assert refusal(server.port, headers={"Origin": "https://evil.example"})[0] == 403
        assert echoes(welcome)
        metrics = scrape(server.port)
    assert metrics.value("wsloop_handshakes_total", status="101") == 1
    assert metrics.value("wsloop_handshakes_total", status="403") == 1


def test_metrics_count_refusals_by_reason():
    # Scrapes come from addresses of their own, and after a slot is freed:
    # a scrape is a connection too, under the same limits.
    with running_server(metrics_path="/metrics", max_connections=3, max_connections_per_ip=1) as server:
        held = ws_from(server.port, source="127.0.0.1")
        assert refusal(server.port, source="127.0.0.1")[0] == 429
        open_count(server, 1)
        second = ws_from(server.port, source="127.0.0.2")
        third = ws_from(server.port, source="127.0.0.3")
        assert refusal(server.port, source="127.0.0.4")[0] == 503
        close_cleanly(third)
        open_count(server, 2)
        assert echoes(held)
        assert echoes(second)
        metrics = scrape(server.port, source="127.0.0.5")
    assert metrics.value("wsloop_connections_refused_total", reason="max_connections") == 1
    assert metrics.value("wsloop_connections_refused_total", reason="max_connections_per_ip") == 1
    assert metrics.value("wsloop_handshakes_total", status="429") == 1


def test_metrics_from_an_address_not_allowed_get_403():
    with running_server(metrics_path="/metrics", metrics_allow_ips=["10.0.0.0/8"]) as server:
        status, _, body = http_get(server.port, "/metrics")
        assert status == 403
        assert b"wsloop_" not in body


def test_metrics_through_a_trusted_proxy_check_the_real_client():
    # Beyond the brief, which lists logs, per-IP limits and the demo page as
    # users of the forwarded address: checking the proxy's own (loopback)
    # address instead would open the metrics to everyone behind the proxy.
    with running_server(metrics_path="/metrics", forwarded_allow_ips=["127.0.0.1"]) as server:
        status, _, _ = http_get(server.port, "/metrics", headers={"X-Forwarded-For": "203.0.113.7"})
        assert status == 403


def test_stats_has_the_same_figures():
    with running_server() as server:
        echo_five_and_close(server.port)
        open_count(server, 0)
        stats = server.stats()
    assert set(stats) == STATS_KEYS
    assert stats["connections_accepted"] == 1
    assert stats["connections_refused"] == {}
    assert stats["handshakes"] == {101: 1}
    assert (stats["messages_in"], stats["messages_out"]) == (5, 5)
    assert stats["bytes_in"] >= 25
    assert stats["bytes_out"] >= 25
    assert stats["close_codes_sent"] == {1000: 1}
    assert stats["close_codes_received"] == {1000: 1}
    assert (stats["pending_output_total"], stats["pending_output_max"]) == (0, 0)
    assert (stats["slow_consumer_closes"], stats["keepalive_timeouts"]) == (0, 0)
    assert stats["loop_lag_max"] >= 0
    assert stats["broker"] is None


def test_pending_output_gauges_follow_the_backlog():
    class Push(wsloop.Handler):
        def on_message(self, conn, message):  # "N": send N bytes
            conn.send(bytes(int(message)))

    with running_server(Push(), metrics_path="/metrics", max_pending_output=64 * MiB) as server:
        big, small = ws_from(server.port), ws_from(server.port)
        for ws, size in ((big, 16 * MiB), (small, 8 * MiB)):
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            ws.send_text(str(size))
        # Socket buffers hold a few MiB at most; the rest waits in the server.
        def pending():
            stats = server.stats()
            return stats["pending_output_total"], stats["pending_output_max"]

        def both_backed_up():
            total, largest = pending()
            return total > largest >= 8 * MiB

        wait_until(both_backed_up, message=lambda: "pending: %r" % (pending(),))
        metrics = scrape(server.port)
        assert metrics.value("wsloop_pending_output_bytes") >= metrics.value("wsloop_pending_output_max_bytes") >= 8 * MiB
        assert len(big.recv_message()) == 16 * MiB
        assert len(small.recv_message()) == 8 * MiB
        wait_until(lambda: pending() == (0, 0), message=lambda: "pending: %r" % (pending(),))


def test_slow_consumer_close_is_counted():
    class Flood(wsloop.Handler):
        def on_message(self, conn, message):
            chunk = bytes(60000)
            for _ in range(400):  # 24 MB: more than socket buffers hold
                if conn.state is not wsloop.State.OPEN:
                    return
                try:
                    conn.send(chunk)
                except wsloop.ConnectionClosed:
                    return

    with running_server(Flood(), metrics_path="/metrics", max_pending_output=256 * 1024) as server:
        ws = ws_from(server.port)
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        ws.send_text("go")
        assert ws.expect_close()[0] == 1008
        wait_until(lambda: server.stats()["slow_consumer_closes"] == 1)
        assert scrape(server.port).value("wsloop_slow_consumer_closes_total") == 1


def test_keepalive_timeout_is_counted():
    with running_server(metrics_path="/metrics", ping_interval=0.1, ping_timeout=0.2) as server:
        silent = ws_from(server.port)
        assert silent.expect_close()[0] == 1011  # it never answers the pings
        wait_until(lambda: server.stats()["keepalive_timeouts"] == 1)
        assert scrape(server.port).value("wsloop_keepalive_timeouts_total") == 1


def test_loop_lag_is_the_largest_timer_lateness_since_the_last_scrape():
    class Stall(wsloop.Handler):
        def on_message(self, conn, message):
            time.sleep(0.5)  # blocks the loop: the keepalive timer comes due meanwhile
            conn.send(message)

    with running_server(Stall(), metrics_path="/metrics", ping_interval=0.05) as server:
        assert echoes(ws_from(server.port))
        assert scrape(server.port).value("wsloop_loop_lag_seconds") >= 0.3
        assert scrape(server.port).value("wsloop_loop_lag_seconds") < 0.3


def test_broker_figures_when_redis_is_down():
    broker = wsloop.RedisBroker("redis://127.0.0.1:%d" % free_port(), reconnect_max=0.5)
    with running_server(metrics_path="/metrics", broker=broker) as server:
        metrics = scrape(server.port)
        stats = server.stats()
    assert metrics.value("wsloop_broker_connected") == 0
    assert metrics.types["wsloop_broker_gaps_total"] == "counter"
    assert metrics.types["wsloop_broker_dropped_total"] == "counter"
    assert isinstance(stats["broker"], dict)
    assert "gaps" in stats["broker"]
    assert "dropped" in stats["broker"]


def test_broker_connected_when_redis_is_up(redis_server):
    broker = wsloop.RedisBroker(redis_server.url)
    with running_server(metrics_path="/metrics", broker=broker) as server:
        wait_until(lambda: broker.state == "connected")
        metrics = scrape(server.port)
    assert metrics.value("wsloop_broker_connected") == 1
    assert metrics.value("wsloop_broker_dropped_total") == 0


# =============================================================================
# The access log: one INFO line per handshake answered, on "wsloop.access"
# =============================================================================


def access_lines(caplog):
    return [r for r in caplog.records if r.name == "wsloop.access"]


def test_access_log_has_one_line_per_handshake(caplog):
    caplog.set_level(logging.INFO, logger="wsloop")
    with running_server(subprotocols=["chat"], origins=["https://ok.example", None]) as server:
        room = ws_from(server.port, path="/room", headers={
            "Sec-WebSocket-Protocol": "chat",
            "Sec-WebSocket-Extensions": "permessage-deflate",
            "User-Agent": "probe/1.0",
        })
        assert b"permessage-deflate" in room.response_head
        assert refusal(server.port, path="/evil", headers={"Origin": "https://evil.example"})[0] == 403
        assert echoes(ws_from(server.port, path="/barrier"))  # the loop is past both
    room = [r for r in access_lines(caplog) if "/room" in r.getMessage()]
    assert len(room) == 1
    assert room[0].levelno == logging.INFO
    for part in ("127.0.0.1", "101", "chat", "permessage-deflate", "probe/1.0"):
        assert part in room[0].getMessage(), (part, room[0].getMessage())
    evil = [r.getMessage() for r in access_lines(caplog) if "/evil" in r.getMessage()]
    assert len(evil) == 1
    assert "403" in evil[0]


def test_access_log_can_be_silenced_alone(caplog):
    access = logging.getLogger("wsloop.access")
    caplog.set_level(logging.INFO, logger="wsloop")
    access.setLevel(logging.WARNING)
    try:
        with running_server() as server:
            assert echoes(ws_from(server.port))
    finally:
        access.setLevel(logging.NOTSET)
    assert access_lines(caplog) == []
    assert any("open from" in r.getMessage() for r in caplog.records if r.name == "wsloop")


# =============================================================================
# EMFILE: a 503 from the descriptor in reserve, one error line per episode, keep serving
# =============================================================================

# The server, with RLIMIT_NOFILE lowered to leave it room for exactly
# SPARE more descriptors (holes below the limit are plugged with /dev/null).
# Prints its port, then serves.
EMFILE_SERVER = textwrap.dedent("""
    import errno, logging, os, resource, sys, wsloop
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    server = wsloop.Server(port=0, ping_interval=None, open_timeout=None, close_timeout=1)
    spare = int(sys.argv[1])
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + spare, hard))
    plugs = []
    try:
        while True:  # lowest numbers first: the holes, then the spare ones
            plugs.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE, exc
    for fd in plugs[:spare]:
        os.close(fd)
    print(server.port, flush=True)
    server.serve_forever()
""")
SPARE = 4


def test_out_of_file_descriptors_new_clients_get_503_and_one_log_line(processes):
    """With every descriptor in use, a new client is answered 503 at once
    (the server gives back the descriptor it keeps in reserve, accepts on
    it, answers and closes) instead of hanging in the backlog; the log says
    so once for the whole episode, not twice a second, and once when it is
    over; the connections it has go on."""
    server = Process([sys.executable, "-c", EMFILE_SERVER, str(SPARE)], stdout=subprocess.PIPE)
    processes.append(server)
    port = int(server.process.stdout.readline())
    admitted = [Client(port) for _ in range(SPARE)]  # every descriptor in use
    for _ in range(5):
        status, head, body = refusal(port)  # each within the client's 5 s timeout
        assert (status, retry_after(head)) == (503, 5), head
        assert body == b"server busy: out of file descriptors\n"
    assert echoes(admitted[0])
    # The line is read from the server's stderr by another thread: wait
    # for it, then count (the episode's later refusals add no line).
    assert " ERROR " in " %s " % server.wait_for("cannot accept"), server.text()
    assert len(server.matching("cannot accept")) == 1, server.text()
    # Freed descriptors: new clients are taken again, and the log says so once.
    for ws in admitted[:2]:
        close_cleanly(ws)
    late = Client(port)
    assert "after 5 refused" in server.wait_for("accepting connections again")
    assert echoes(late)
    assert echoes(admitted[2])
    assert len(server.matching("cannot accept")) == 1, server.text()
    assert "Traceback" not in server.text()
    for ws in admitted[2:] + [late]:
        ws.shutdown()


# =============================================================================
# The command line
# =============================================================================


def test_cli_max_connections(cli):
    server = cli("--port", "0", "--max-connections", "1")
    holder = Client(server.port)
    status, head, _ = refusal(server.port)
    assert status == 503
    assert retry_after(head) is not None
    assert echoes(holder)


def test_cli_max_connections_per_ip(cli):
    server = cli("--port", "0", "--max-connections-per-ip", "1")
    held = Client(server.port)
    assert refusal(server.port)[0] == 429
    assert echoes(ws_from(server.port, source="127.0.0.2"))
    assert echoes(held)


def test_cli_message_rate(cli):
    server = cli("--port", "0", "--max-messages-per-second", "1", "--message-burst", "2")
    ws = Client(server.port)
    send_texts(ws, ["m1", "m2", "m3"])
    assert [ws.recv_message() for _ in range(2)] == ["m1", "m2"]
    assert ws.expect_close() == (1008, "message rate limit exceeded")


def test_cli_forwarded_allow_ips(cli):
    server = cli("--port", "0", "--forwarded-allow-ips", "127.0.0.1,10.0.0.0/8")
    ws = Client(server.port, headers={"X-Forwarded-For": "203.0.113.7, 10.0.0.5"})
    assert "open from 203.0.113.7" in server.wait_for("open from")
    assert echoes(ws)


def test_cli_log_lines_cannot_be_forged_by_a_close_reason(cli):
    """The CLI's own log, at its default level: a close reason with CR/LF
    and an ESC sequence stays inside its one, escaped, line."""
    server = cli("--port", "0")
    ws = Client(server.port, path="/forge", headers={"User-Agent": "ua\x85\x9b[2J"})
    ws.close(4000, "x\r\nwsloop INFO forged\x1b[2J\u2028".encode("utf-8"))
    assert ws.expect_close()[0] == 4000
    closed = server.wait_for("closed: received 4000")
    assert "4000 (x\\x0d\\x0awsloop INFO forged\\x1b[2J\\u2028)" in closed, closed
    access = server.wait_for("/forge")
    assert access.rstrip("\n").endswith('"ua\\x85\\x9b[2J"'), access
    lines = server.text().splitlines()
    assert not [line for line in lines if line.startswith("wsloop INFO forged")], lines
    assert all(line.isprintable() for line in lines), [line for line in lines if not line.isprintable()]


@pytest.mark.parametrize("trusted", ["unix", "*"])
def test_cli_forwarded_header_forwarded_and_unix_peers(cli, short_dir, trusted):
    path = os.path.join(short_dir, "ws.sock")
    server = cli("--uds", path, "--forwarded-allow-ips", trusted, "--forwarded-header", "forwarded")
    ws = SocketClient(unix_socket(path), headers={"Forwarded": "for=203.0.113.9", "X-Forwarded-For": "198.51.100.1"})
    assert "open from 203.0.113.9" in server.wait_for("open from")
    assert echoes(ws)


def test_cli_unix_socket(cli, short_dir):
    path = os.path.join(short_dir, "ws.sock")
    server = cli("--uds", path, "--uds-mode", "600")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert echoes(SocketClient(unix_socket(path)), "over the CLI's Unix socket")
    assert server.stop() == 0
    assert not os.path.exists(path)


def test_cli_unix_socket_default_mode_is_660(cli, short_dir):
    path = os.path.join(short_dir, "ws.sock")
    cli("--uds", path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


def test_cli_unix_socket_in_use_is_one_line(short_dir):
    path = os.path.join(short_dir, "ws.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        line = one_error_line(run_cli("--uds", path))
        assert "in use" in line
        assert path in line
        assert os.path.exists(path)


def test_cli_metrics(cli):
    server = cli("--port", "0", "--metrics-path", "/metrics")
    assert echoes(Client(server.port))
    metrics = scrape(server.port)
    assert metrics.value("wsloop_messages_received_total") == 1


def test_cli_metrics_allow_ips(cli):
    server = cli("--port", "0", "--metrics-path", "/metrics", "--metrics-allow-ips", "10.0.0.0/8,::1")
    assert http_get(server.port, "/metrics")[0] == 403


@pytest.mark.parametrize("flags, logged", [((), True), (("--no-access-log",), False)])
def test_cli_access_log(cli, flags, logged):
    server = cli("--port", "0", *flags)
    ws = Client(server.port, path="/hello")
    assert echoes(ws)
    close_cleanly(ws)
    server.wait_for("closed")  # the access line comes before this one
    assert bool(server.matching("wsloop.access")) is logged, server.text()


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--max-connections", "lots"], "--max-connections"),
        (["--max-connections", "-1"], "--max-connections"),
        (["--max-connections-per-ip", "x"], "--max-connections-per-ip"),
        (["--max-messages-per-second", "fast"], "--max-messages-per-second"),
        (["--max-messages-per-second", "-5"], "--max-messages-per-second"),
        (["--max-messages-per-second", "10", "--message-burst", "x"], "--message-burst"),
        (["--forwarded-allow-ips", "not-an-ip"], "--forwarded-allow-ips"),
        (["--forwarded-allow-ips", "10.0.0.0/33"], "--forwarded-allow-ips"),
        (["--forwarded-allow-ips", "unix,nowhere"], "--forwarded-allow-ips"),
        (["--forwarded-header", "x-real-ip"], "--forwarded-header"),
        (["--metrics-allow-ips", "300.1.1.1"], "--metrics-allow-ips"),
        (["--uds", "/nonexistent/ws.sock", "--uds-mode", "999"], "--uds-mode"),
        (["--uds", "/nonexistent/ws.sock", "--uds-mode", "rw-rw----"], "--uds-mode"),
    ],
)
def test_cli_bad_values_get_one_line_and_status_2(args, flag):
    line = one_error_line(run_cli(*args))
    assert flag in line


@pytest.mark.parametrize(
    "options",
    [
        {"max_connections": -1},
        {"max_connections_per_ip": -1},
        {"max_messages_per_second": -1},
        {"max_messages_per_second": 10, "message_burst": -1},
        {"forwarded_allow_ips": ["not-an-ip"]},
        {"forwarded_allow_ips": ["unix, *, nowhere"]},
        {"forwarded_header": "x-real-ip"},
        {"metrics_allow_ips": ["10.0.0.0/33"]},
        {"metrics_allow_ips": ["unix"]},
    ],
)
def test_api_bad_values_are_valueerrors(options):
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError):
        wsloop.Server(port=0, **options).close()
    assert len(os.listdir("/proc/self/fd")) == before  # nothing left open by the refused server
