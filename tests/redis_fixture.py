"""A real redis-server for the tests, on a free loopback port.

The tests speak to Redis only through wsloop (its own RESP code is what they
check); redis-py is here only as the administrator's tool: PUBSUB NUMSUB,
CLIENT KILL, CONFIG SET, ACL SETUSER, INFO.  It must not be used to check
wsloop's RESP code against itself.

Every wait is bounded: a server that does not answer PING in time fails the
test that asked for it instead of hanging the run.
"""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import redis

START_TIMEOUT = 10.0


def free_port():
    """A loopback TCP port that nothing listens on now (a small race remains;
    start() retries on another port if the server cannot bind)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout=5.0, interval=0.02, message="condition never held"):
    """Poll ``predicate`` until it returns a true value (returned) or fail
    after ``timeout`` seconds.  For states with no event to wait on (what
    Redis reports, a counter in another object)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("%s (after %.1f s)" % (message() if callable(message) else message, timeout))
        time.sleep(interval)


class RedisServer:
    """One redis-server process, owned by a test.

    ``port`` and ``url`` (``redis://[:password@]127.0.0.1:port``) say where it
    is; ``admin`` is a redis-py client for the test's own checks.  ``kill()``
    (SIGKILL), ``restart()`` (same port, same arguments), ``pause()``
    (SIGSTOP) and ``resume()`` (SIGCONT) make the failures the tests need;
    ``close()`` stops it whatever state it is in.
    """

    def __init__(self, directory, extra_args=(), password=None):
        self.executable = shutil.which("redis-server")
        if self.executable is None:
            raise RuntimeError(
                "redis-server is not installed: the Redis tests need a real one "
                "(tests/run installs Debian's redis-server; or apt-get install redis-server)"
            )
        self.directory = str(directory)
        self.extra_args = list(extra_args)
        self.password = password
        self.process = None
        self.paused = False
        self.log_path = os.path.join(self.directory, "redis.log")
        self._admin = None
        for attempt in range(5):
            self.port = free_port()
            if self.start():
                return
        raise RuntimeError("redis-server would not start:\n" + self.log_tail())

    # -- where it is ----------------------------------------------------------

    @property
    def url(self):
        credentials = ":%s@" % self.password if self.password is not None else ""
        return "redis://%s127.0.0.1:%d" % (credentials, self.port)

    def url_with(self, user=None, password=None, db=None):
        """A URL with other credentials (or a database number)."""
        credentials = ""
        if password is not None:
            credentials = "%s:%s@" % (user or "", password)
        return "redis://%s127.0.0.1:%d%s" % (credentials, self.port, "" if db is None else "/%d" % db)

    @property
    def admin(self):
        """redis-py, as the administrator (timeouts set, so it cannot hang a test)."""
        if self._admin is None:
            self._admin = redis.Redis(
                host="127.0.0.1",
                port=self.port,
                password=self.password,
                socket_timeout=5,
                socket_connect_timeout=5,
                decode_responses=False,
            )
        return self._admin

    # -- life -----------------------------------------------------------------

    def start(self):
        """Start redis-server on self.port; True once it answers PING,
        False if it exited first (the port was taken)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        command = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--logfile", self.log_path,
        ] + self.extra_args
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.paused = False
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if self._answers_ping():
                return True
            time.sleep(0.02)
        self.close()
        raise RuntimeError("redis-server did not answer PING within %s s:\n%s" % (START_TIMEOUT, self.log_tail()))

    def _answers_ping(self):
        """PING with a raw socket (the admin client may hold a dead connection)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                if self.password is not None:
                    sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(self.password), self.password.encode()))
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                answer = b""
                while b"PONG" not in answer:
                    chunk = sock.recv(256)
                    if not chunk:
                        return False
                    answer += chunk
                return True
        except OSError:
            return False

    def kill(self):
        """SIGKILL: gone at once, every connection reset."""
        if self.process is not None and self.process.poll() is None:
            if self.paused:
                self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
        self.paused = False
        self._drop_admin()

    def restart(self):
        """Start again on the same port with the same arguments (empty: no data kept)."""
        self.kill()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.start():  # the port may linger a moment
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server would not restart on port %d:\n%s" % (self.port, self.log_tail()))
            time.sleep(0.1)

    def pause(self):
        """SIGSTOP: the sockets stay open and nothing answers (a stalled server)."""
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        """SIGCONT after pause()."""
        self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def close(self):
        self.kill()

    def _drop_admin(self):
        if self._admin is not None:
            try:
                self._admin.close()
            except Exception:  # a client of a dead server: nothing to release
                pass
            self._admin = None

    def log_tail(self, lines=20):
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except OSError:
            return "(no redis log)"

    # -- what the administrator sees ------------------------------------------

    def numsub(self, channel):
        """How many subscribers Redis counts on ``channel``."""
        return dict(self.admin.pubsub_numsub(channel))[channel.encode() if isinstance(channel, str) else channel]

    def wait_numsub(self, channel, count, timeout=5.0):
        """Poll PUBSUB NUMSUB until ``channel`` has ``count`` subscribers."""
        last = []

        def reached():
            last[:] = [self.numsub(channel)]
            return last[0] == count

        wait_until(reached, timeout, message=lambda: "PUBSUB NUMSUB %s stayed %s, not %d" % (channel, last, count))

    def clients(self):
        """CLIENT LIST as dicts, without the admin's own connection."""
        own = self.admin.client_id()
        return [client for client in self.admin.client_list() if int(client["id"]) != own]

    def connections_received(self):
        """INFO stats total_connections_received (every accept, the admin's too)."""
        return int(self.admin.info("stats")["total_connections_received"])


# -- faults a real Redis will not produce ------------------------------------------


def _read_commands(buffer):
    """Whole RESP2 commands (arrays of bulk strings) at the front of
    ``buffer`` (a bytearray, consumed); what wsloop sends is well formed."""
    commands = []
    while True:
        position, args = 0, []
        end = buffer.find(b"\r\n")
        if end < 0 or buffer[:1] != b"*":
            return commands
        count = int(buffer[1:end])
        position = end + 2
        for _ in range(count):
            end = buffer.find(b"\r\n", position)
            if end < 0:
                return commands
            length = int(buffer[position + 1 : end])
            if len(buffer) < end + 2 + length + 2:
                return commands
            args.append(bytes(buffer[end + 2 : end + 2 + length]))
            position = end + 2 + length + 2
        del buffer[:position]
        commands.append(args)


def _close_listener(listener):
    """Close a listening socket and wake the thread blocked in accept()."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listener.close()


def bulk(data):
    return b"$%d\r\n%s\r\n" % (len(data), data)


def push(*items):
    """A RESP2 array of bulk strings (bytes) and integers."""
    parts = [b"*%d\r\n" % len(items)]
    for item in items:
        parts.append(b":%d\r\n" % item if isinstance(item, int) else bulk(item))
    return b"".join(parts)


class FakeRedis:
    """A RESP2 server on a free loopback port that answers what wsloop's
    bridge asks (AUTH, SELECT, PING, SUBSCRIBE, UNSUBSCRIBE, PUBLISH, SCRIPT
    LOAD, EVALSHA from ``eval_replies``) well
    enough to get it connected, and lets the test send a connection any
    bytes at all: malformed replies, floods.  For the faults a real Redis
    will not produce; everything else is tested against redis-server.

    ``subscribers`` lists, in order, the connections that sent SUBSCRIBE;
    ``log`` every command received, as (connection number, args);
    ``hold_confirmations`` keeps SUBSCRIBE's answers back until
    ``release_confirmations()``."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = "redis://127.0.0.1:%d" % self.port
        self.changed = threading.Condition()
        self.connections = []
        self.subscribers = []
        self.log = []
        self.hold_confirmations = False
        self.eval_replies = []  # answers to EVALSHA, in order (then ":1")
        self._held = []
        self._send_lock = threading.Lock()
        self._closed = False
        self._threads = []
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.changed:
                if self._closed:
                    sock.close()
                    return
                self.connections.append(sock)
                number = len(self.connections) - 1
                self.changed.notify_all()
            thread = threading.Thread(target=self._serve, args=(sock, number), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock, number):
        buffer = bytearray()
        subscribed = 0
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self.changed:
                    if sock in self.subscribers:
                        self.subscribers[self.subscribers.index(sock)] = None
                    self.changed.notify_all()
                return
            buffer += data
            for args in _read_commands(buffer):
                name = args[0].upper()
                answer = b""
                with self.changed:
                    self.log.append((number, args))
                    if name == b"SUBSCRIBE" and sock not in self.subscribers:
                        self.subscribers.append(sock)
                    self.changed.notify_all()
                if name in (b"AUTH", b"SELECT"):
                    answer = b"+OK\r\n"
                elif name == b"PING":
                    answer = push(b"pong", b"") if subscribed else b"+PONG\r\n"
                elif name in (b"SUBSCRIBE", b"UNSUBSCRIBE"):
                    for channel in args[1:]:
                        subscribed += 1 if name == b"SUBSCRIBE" else -1
                        reply = push(name.lower(), channel, max(subscribed, 0))
                        with self.changed:
                            if name == b"SUBSCRIBE" and self.hold_confirmations:
                                self._held.append((sock, reply))
                                continue
                        answer += reply
                elif name == b"PUBLISH":
                    answer = b":0\r\n"
                elif name == b"SCRIPT" and len(args) == 3:
                    answer = bulk(hashlib.sha1(args[2]).hexdigest().encode())
                elif name == b"EVALSHA":
                    with self.changed:
                        answer = self.eval_replies.pop(0) if self.eval_replies else b":1\r\n"
                self.send(sock, answer)

    def wait(self, predicate, timeout=10.0, message="the fake Redis never saw it"):
        """Wait (bounded) until ``predicate()``, called under the lock, is true; return it."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(message)
                self.changed.wait(remaining)

    def subscriber(self, after=0, timeout=10.0):
        """The first live subscribing connection numbered ``after`` or later,
        with its number: (number, socket)."""

        def found():
            for number in range(after, len(self.subscribers)):
                if self.subscribers[number] is not None:
                    return number, self.subscribers[number]
            return None

        return self.wait(found, timeout, "no new subscriber connection")

    def send(self, sock, data):
        """Send ``data`` on a connection; a connection wsloop dropped is fine.
        (The test's sends and the fake's answers may come from two threads:
        only one writes at a time.)"""
        with self._send_lock:
            try:
                sock.sendall(data)
            except OSError:
                pass

    def release_confirmations(self):
        with self.changed:
            self.hold_confirmations = False
            held, self._held = self._held, []
            self.log.append((None, [b"RELEASED"]))
        for sock, reply in held:
            self.send(sock, reply)

    def drop_all(self):
        """Close every connection (as a Redis restart would)."""
        with self.changed:
            connections = list(self.connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        with self.changed:
            self._closed = True
            connections = list(self.connections)
        _close_listener(self.listener)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(5)


class PartitionProxy:
    """A TCP proxy to ``port`` that the test can cut like a network.

    ``partition()``: from now on nothing crosses, either way, on the
    connections open now or made later; what is sent waits "in flight", as
    in a real partition where the sender's kernel keeps retransmitting it.
    A side that resets its connection (RST) loses what it had in flight, as
    TCP does; one that closes normally (FIN) has it delivered later.
    ``heal()``: new connections cross again.  ``release()``: the
    connections cut by the partition deliver what they held (their
    retransmissions finally getting through) and it returns how many bytes
    went on towards the server that way.
    """

    def __init__(self, port):
        self.target = port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = "redis://127.0.0.1:%d" % self.port
        self.lock = threading.Lock()
        self.partitioned = False
        self.resets = 0  # connections a client reset while cut
        self.ended = 0  # connections a client ended (reset or closed) while cut
        self._pipes = []
        self._closed = False
        self._threads = []
        self._start(self._accept)

    def _start(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self._closed:
                    client.close()
                    return
                pipe = {"client": client, "server": None, "cut": self.partitioned,
                        "to_server": bytearray(), "to_client": bytearray(),
                        "client_done": False, "reset": False}
                self._pipes.append(pipe)
            self._start(self._pump, pipe)

    def _pump(self, pipe):
        import selectors

        client = pipe["client"]
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, "client")
            while not self._closed:
                with self.lock:
                    if not pipe["cut"] and pipe["server"] is None:
                        try:
                            pipe["server"] = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                        except OSError:
                            break
                        selector.register(pipe["server"], selectors.EVENT_READ, "server")
                    if not pipe["cut"]:
                        self._forward(pipe)
                    if pipe["reset"] or (pipe["client_done"] and not pipe["cut"]):
                        break
                for key, _ in selector.select(0.02):
                    side = key.data
                    try:
                        data = key.fileobj.recv(65536)
                    except ConnectionResetError:
                        data = None
                    except OSError:
                        data = b""
                    with self.lock:
                        if side == "client":
                            if data is None:  # RST: what was in flight is gone
                                pipe["reset"] = True
                                pipe["to_server"].clear()
                                if pipe["cut"]:
                                    self.resets += 1
                                    self.ended += 1
                            elif not data:
                                pipe["client_done"] = True
                                selector.unregister(client)
                                if pipe["cut"]:
                                    self.ended += 1
                            else:
                                pipe["to_server"] += data
                        else:
                            if not data:
                                pipe["client_done"] = True
                            else:
                                pipe["to_client"] += data
        with self.lock:
            self._close_pipe(pipe)

    def _forward(self, pipe):
        """Under the lock: what waits goes on; returns bytes sent to the server."""
        sent = len(pipe["to_server"])
        for name, buffer in (("server", pipe["to_server"]), ("client", pipe["to_client"])):
            if buffer and pipe[name] is not None:
                try:
                    pipe[name].sendall(buffer)
                except OSError:
                    pass
                buffer.clear()
        return sent if pipe["server"] is not None else 0

    def _close_pipe(self, pipe):
        for name in ("client", "server"):
            if pipe[name] is not None:
                pipe[name].close()
                pipe[name] = None

    def partition(self):
        with self.lock:
            self.partitioned = True
            for pipe in self._pipes:
                pipe["cut"] = True

    def heal(self):
        with self.lock:
            self.partitioned = False

    def release(self):
        """The cut connections deliver what they held; bytes sent on to the server."""
        released = 0
        with self.lock:
            for pipe in self._pipes:
                if pipe["cut"] and not pipe["reset"]:
                    pipe["cut"] = False
                    if pipe["server"] is None and pipe["to_server"]:
                        try:
                            pipe["server"] = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                        except OSError:
                            continue
                    released += self._forward(pipe)
                    if pipe["client_done"] and pipe["server"] is not None:
                        try:
                            pipe["server"].shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
        return released

    def close(self):
        with self.lock:
            self._closed = True
        _close_listener(self.listener)
        for thread in self._threads:
            thread.join(5)
        with self.lock:
            for pipe in self._pipes:
                self._close_pipe(pipe)
