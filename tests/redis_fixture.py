"""A real redis-server for the tests, on a free loopback port.

The tests speak to Redis only through wsloop (its own RESP code is what they
check); redis-py is here only as the administrator's tool: PUBSUB NUMSUB,
CLIENT KILL, CONFIG SET, ACL SETUSER, INFO.  It must not be used to check
wsloop's RESP code against itself.

Every wait is bounded: a server that does not answer PING in time fails the
test that asked for it instead of hanging the run.
"""

import os
import shutil
import signal
import socket
import subprocess
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
