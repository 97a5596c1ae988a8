"""Test helpers: client-side frame building and a small blocking WebSocket client.

The client is written here, independently of wsloop's codec, so that tests
check the server against the RFC rather than against itself.
"""

import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import weakref
import zlib
from contextlib import contextmanager

import wsloop
from redis_fixture import free_port as free_port, wait_until  # free_port: tests import it from here

# The bound on any one wait for something that should happen soon.  Slow CI
# machines scale every such bound with WSLOOP_TEST_TIMEOUT_SCALE (say 3).
TIMEOUT_SCALE = float(os.environ.get("WSLOOP_TEST_TIMEOUT_SCALE", "1"))
TIMEOUT = 5.0 * TIMEOUT_SCALE

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's example key
TEXT, BINARY = 1, 2  # opcodes
RSV1 = 0x40  # "compressed"


def request_bytes(path="/", headers=None, method="GET", version="HTTP/1.1", omit=()):
    fields = {
        "Host": "localhost",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    for name in omit:
        fields.pop(name)
    fields.update(headers or {})
    lines = ["%s %s %s" % (method, path, version)]
    lines += ["%s: %s" % item for item in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def mask_bytes(data, mask):
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def client_frame(opcode, payload=b"", fin=True, rsv=0, mask=b"\x11\x22\x33\x44", masked=True, length=None):
    """A client-to-server frame, built byte by byte the slow, obvious way."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        header = bytes([first, mask_bit | n])
    elif n < 65536:
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", n)
    else:
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return header + payload
    return header + mask + mask_bytes(payload, mask)


def close_payload(code, reason=b""):
    return struct.pack("!H", code) + reason


def parse_server_frame(data):
    """Parse one unmasked server frame: ((fin, opcode, payload, rsv), size) or None."""
    if len(data) < 2:
        return None
    first, second = data[0], data[1]
    assert not second & 0x80, "server frames must not be masked"
    n = second & 0x7F
    head = 2
    if n == 126:
        if len(data) < 4:
            return None
        n = struct.unpack_from("!H", data, 2)[0]
        head = 4
    elif n == 127:
        if len(data) < 10:
            return None
        n = struct.unpack_from("!Q", data, 2)[0]
        head = 10
    if len(data) < head + n:
        return None
    return (bool(first & 0x80), first & 0x0F, bytes(data[head : head + n]), first & 0x70), head + n


def parse_server_frames(data):
    """Every whole server frame in ``data``: list of (fin, opcode, payload, rsv)."""
    frames = []
    while True:
        parsed = parse_server_frame(data)
        if parsed is None:
            return frames
        frames.append(parsed[0])
        data = data[parsed[1]:]


# Every Client opened, so that running_server() closes those a test left
# open before it stops the server (which would otherwise wait close_timeout
# for each of them to answer its close).  Weak: the list keeps none open.
_opened_clients = []


class Client:
    """A blocking WebSocket client on a real socket, for loopback tests."""

    def __new__(cls, *args, **kwargs):
        client = super().__new__(cls)
        _opened_clients.append(weakref.ref(client))  # subclasses and Client.__new__ too
        return client

    def __init__(self, port, path="/", headers=None, host="127.0.0.1", timeout=TIMEOUT, handshake=True, ssl_context=None):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            self.sock = ssl_context.wrap_socket(self.sock, server_hostname=host)
        self.buffer = b""
        self.response_head = None
        if handshake:
            self.sock.sendall(request_bytes(path, headers))
            self.response_head = self.read_head()
            assert self.response_head.startswith(b"HTTP/1.1 101 "), self.response_head

    def read_head(self):
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed before response head: %r" % self.buffer)
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head + b"\r\n"  # every header line ends with CRLF

    def read_http_response(self):
        """Read a whole HTTP error response (the server closes after it)."""
        head = self.read_head()
        body = self.buffer
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            body += chunk
        status = int(head.split(b" ")[1])
        return status, head.decode("latin-1"), body

    def send_frame(self, opcode, payload=b"", **kw):
        self.sock.sendall(client_frame(opcode, payload, **kw))

    def send_text(self, text):
        self.send_frame(0x1, text.encode("utf-8"))

    def send_binary(self, data):
        self.send_frame(0x2, data)

    def recv_frame(self):
        """Next frame as (fin, opcode, payload); raises EOFError on close."""
        while True:
            parsed = parse_server_frame(self.buffer)
            if parsed is not None:
                (fin, opcode, payload, _), size = parsed
                self.buffer = self.buffer[size:]
                return fin, opcode, payload
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("connection closed")
            self.buffer += chunk

    def recv_message(self):
        """Next text (str) or binary (bytes) message; skips pings (answering them)."""
        parts, kind = [], None
        while True:
            fin, opcode, payload = self.recv_frame()
            if opcode == 0x9:
                self.send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                raise AssertionError("got close frame %r while waiting for a message" % (payload,))
            if opcode in (1, 2):
                kind = opcode
            parts.append(payload)
            if fin:
                data = b"".join(parts)
                return data.decode("utf-8") if kind == 1 else data

    def expect_close(self):
        """Read until a close frame; return (code, reason). Skips data and pings."""
        while True:
            fin, opcode, payload = self.recv_frame()
            if opcode == 0x8:
                if not payload:
                    return 1005, ""
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8")

    def expect_eof(self):
        """The server closes TCP: recv returns b"" (after any leftover bytes).
        Fails, saying so, if the socket's timeout passes first."""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise AssertionError("the server did not close TCP within %s s" % self.sock.gettimeout()) from None
            if not chunk:
                return

    def close(self, code=1000, reason=b""):
        self.send_frame(0x8, close_payload(code, reason))

    def shutdown(self):
        sock = getattr(self, "sock", None)  # None if connecting failed
        if sock is not None:
            sock.close()  # never raises OSError (Python 3.8+)


@contextmanager
def running_server(handler=None, **options):
    """A wsloop.Server on a free loopback port, served on a thread."""
    options.setdefault("port", 0)
    # Test clients often stop reading: do not let shutdown wait 10 s for them.
    options.setdefault("close_timeout", 1.0)
    server = wsloop.Server(handler, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    first_client = len(_opened_clients)
    try:
        yield server
    finally:
        for opened in _opened_clients[first_client:]:
            client = opened()
            if client is not None:
                client.shutdown()  # what the test left open: gone before shutdown waits on it
        del _opened_clients[first_client:]
        server.shutdown()
        thread.join(30)
        assert not thread.is_alive(), "server did not stop"
        server.close()


@contextmanager
def answering_once(answer):
    """A loopback listener whose first connection gets ``answer`` (bytes)
    once its request head is in, then TCP closes: a hostile or broken
    server for a client to meet.  Yields the ws:// URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    errors = []

    def serve():
        try:
            sock, _ = listener.accept()
            with sock:
                sock.settimeout(TIMEOUT)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise EOFError("the client closed before its request ended")
                    head += chunk
                sock.sendall(answer)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield "ws://127.0.0.1:%d/" % listener.getsockname()[1]
    finally:
        thread.join(3 * TIMEOUT)
        listener.close()
    assert not thread.is_alive(), "the answering thread did not finish"
    if errors:
        raise errors[0]


def small_window_client(port, rcvbuf=4096, timeout=10.0):
    """A handshaken Client whose receive buffer is set small before connecting,
    so the kernel holds little of what the server sends it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    client = Client.__new__(Client)  # Client() connects itself; reuse its reading methods
    client.sock, client.buffer = sock, b""
    sock.sendall(request_bytes())
    client.response_head = client.read_head()
    assert client.response_head.startswith(b"HTTP/1.1 101 "), client.response_head
    return client


def in_loop(server, function, *args, timeout=None):
    """Run function(*args) on the server's loop thread (its one door) and return
    its result.  Calls made earlier from this thread went through the same
    door, in order, so they have been done when this returns."""
    outcome, done = [], threading.Event()

    def run():
        try:
            outcome.append((function(*args), None))
        except BaseException as exc:  # raised again in the caller's thread
            outcome.append((None, exc))
        done.set()

    server.call_soon_threadsafe(run)
    assert done.wait(2 * TIMEOUT if timeout is None else timeout), "the loop did not run the callback"
    result, exception = outcome[0]
    if exception is not None:
        raise exception
    return result


class Recorder(wsloop.Handler):
    """A handler that echoes and records what happens, with events to wait on."""

    def __init__(self):
        self.connected = []
        self.messages = []
        self.closed = []
        self.connect_event = threading.Event()
        self.close_event = threading.Event()

    def on_connect(self, conn):
        self.connected.append(conn)
        self.connect_event.set()

    def on_message(self, conn, message):
        self.messages.append(message)
        conn.send(message)

    def on_close(self, conn, code, reason):
        self.closed.append((conn, code, reason))
        self.close_event.set()


class Worker(threading.Thread):
    """Run ``function(*args)`` on its own thread; keep its result or exception."""

    def __init__(self, function, *args, **kwargs):
        super().__init__(daemon=True)
        self.function, self.args, self.kwargs = function, args, kwargs
        self.result = None
        self.exception = None

    def run(self):
        try:
            self.result = self.function(*self.args, **self.kwargs)
        except BaseException as exc:  # reported to the test, which decides
            self.exception = exc


def connected(recorder, count):
    """Wait until ``recorder`` has seen ``count`` connections; return them."""
    deadline = time.monotonic() + TIMEOUT
    while len(recorder.connected) < count:
        recorder.connect_event.clear()
        if len(recorder.connected) >= count:
            break
        assert recorder.connect_event.wait(max(0.0, deadline - time.monotonic())), "connections did not open"
    return recorder.connected[:count]


class StrictReader:
    """Reads server frames byte-exact and accepts only whole data messages.

    Every frame must be final (FIN), unmasked, text or binary, with RSV1
    only when ``compressed`` (then inflated with no context, as
    ``server_no_context_takeover`` promises), and text must be valid UTF-8.
    A fragment, continuation or control frame means frames were split or
    interleaved, and fails.
    """

    def __init__(self, client, compressed=False):
        self.client = client
        self.compressed = compressed
        self.buffer = bytearray(client.buffer)  # whatever followed the 101
        client.buffer = b""
        self.compressed_frames = 0

    def messages(self, count):
        """Read exactly ``count`` messages: str for text, bytes for binary."""
        received = []
        while len(received) < count:
            parsed = parse_server_frame(bytes(self.buffer))
            if parsed is None:
                chunk = self.client.sock.recv(1 << 16)
                if not chunk:
                    raise EOFError("closed after %d of %d messages" % (len(received), count))
                self.buffer += chunk
                continue
            (fin, opcode, payload, rsv), size = parsed
            del self.buffer[:size]
            assert fin, "fragmented frame: messages were split or interleaved"
            assert opcode in (TEXT, BINARY), "opcode %d where a data frame was due" % opcode
            if rsv:
                assert self.compressed, "unexpected RSV bits 0x%02x" % rsv
                assert rsv == RSV1, "unexpected RSV bits 0x%02x" % rsv
                payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
                self.compressed_frames += 1
            received.append(payload.decode("utf-8") if opcode == TEXT else payload)
        return received


# -- processes: the CLI, --workers ----------------------------------------------------


def cli_env():
    """The subprocess imports the same wsloop as this test run."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.abspath(wsloop.__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    return env


class LogReader:
    """Reads a process's stderr on a thread; tests wait for lines in it."""

    def __init__(self, stream):
        self.lines = []
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            with self.condition:
                self.lines.append(line)
                self.condition.notify_all()
        with self.condition:
            self.lines.append(None)  # EOF
            self.condition.notify_all()

    def wait_for(self, pattern, timeout=10.0, start=0):
        """The first match of ``pattern`` in a line from index ``start`` on."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.condition:
            index = start
            while True:
                while index < len(self.lines):
                    line = self.lines[index]
                    index += 1
                    if line is None:
                        raise AssertionError("stderr closed before %r:\n%s" % (pattern, self.text()))
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("%r never logged:\n%s" % (pattern, self.text()))
                self.condition.wait(remaining)

    def wait_count(self, pattern, count, timeout=10.0):
        """Wait until ``count`` lines match ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.condition:
            while sum(1 for line in self.lines if line is not None and regex.search(line)) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.lines and self.lines[-1] is None):
                    raise AssertionError("%r not logged %d times:\n%s" % (pattern, count, self.text()))
                self.condition.wait(remaining)

    def text(self):
        return "".join(line for line in self.lines if line is not None)


def http_get(port, path, source="127.0.0.1", headers=None):
    """A plain HTTP GET on its own TCP connection from loopback address
    ``source``: (status, head, body), read to the server's EOF."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0))
    plain = Client.__new__(Client)  # Client() handshakes itself; reuse its reading
    plain.sock, plain.buffer = sock, b""
    try:
        fields = dict({"Host": "localhost"}, **(headers or {}))
        lines = ["GET %s HTTP/1.1" % path] + ["%s: %s" % item for item in fields.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return plain.read_http_response()
    finally:
        sock.close()


def plain_get(port, path):
    """A plain GET asking the server to close after it: (status, body)."""
    status, _, body = http_get(port, path, headers={"Connection": "close"})
    return status, body


def children_of(pid):
    """The process ids of ``pid``'s children (Linux /proc)."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as children:
            return set(int(child) for child in children.read().split())
    except OSError:
        return set()


def descendants_of(pid):
    """``pid``'s children, their children, and so on."""
    found = set()
    todo = [pid]
    while todo:
        for child in children_of(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@contextmanager
def workers_process(argv, cwd=None, env=None):
    """Run ``argv`` (wsloop, or something that execs it) with its stderr read
    by a LogReader: yields (process, log); kills what is left at the end.
    ``env``: more environment variables for it."""
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=dict(cli_env(), **(env or {})), cwd=cwd)
    log = LogReader(process.stderr)
    try:
        yield process, log
    finally:
        if process.poll() is None:
            for child in descendants_of(process.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.kill()
        process.wait(10)
        log.thread.join(5)
        process.stderr.close()


def wait_serving(port, process, log, timeout=15.0):
    """Wait until the port answers /healthz."""
    def answers():
        assert process.poll() is None, "wsloop exited with %s:\n%s" % (process.returncode, log.text())
        try:
            return plain_get(port, "/healthz")[0] == 200
        except OSError:
            return False

    wait_until(answers, timeout, interval=0.05, message=lambda: "port %d never served:\n%s" % (port, log.text()))


def clients_on_both_workers(port, log, least=10, most=40):
    """Open clients until at least ``least`` are open and both workers hold
    some; return (clients, worker of each).  A worker is known by the log
    line that names it and the client's own port."""
    clients, workers = [], []
    while len(clients) < least or len(set(workers)) < 2:
        assert len(clients) < most, "%d clients all landed on worker(s) %s:\n%s" % (len(clients), set(workers), log.text())
        client, worker = client_on_a_worker(port, log)
        clients.append(client)
        workers.append(worker)
    return clients, workers


def client_on_a_worker(port, log):
    """A client of ``--workers`` (handshake done) and the worker that took
    it, from the log line that names them both."""
    client = Client(port, timeout=10.0)
    local_port = client.sock.getsockname()[1]
    line = log.wait_for(r"open from 127\.0\.0\.1:%d\b.*" % local_port).string
    worker = re.search(r"worker (\d+)", line)
    assert worker, "the log line does not name its worker: %r" % line
    return client, worker.group(1)


def close_on_a_worker(client, log):
    """Close ``client`` cleanly and wait until its worker logs the end."""
    local_port = client.sock.getsockname()[1]
    client.close()
    assert client.expect_close()[0] == 1000
    client.shutdown()
    log.wait_for(r"from 127\.0\.0\.1:%d closed" % local_port)


def make_gate(origins=None, health_path=None, pages=None, subprotocols=(), select_subprotocol=None,
              name=None, metrics=b"metrics\n", **limits):
    """A server's real admission gate, built without a server or a socket:
    the policy options a Server would give it, and ``limits`` (the gate's
    own keywords: max_connections, forwarded_allow_ips, ...)."""
    options = wsloop._Options.for_server(
        wsloop.Echo(), origins=origins, health_path=health_path, pages=pages, subprotocols=subprotocols,
        select_subprotocol=select_subprotocol, name=name, **limits,
    )
    return wsloop._Gate(options, wsloop._Stats(), lambda: metrics)
