"""Soak: hold 1,000 connections for ten minutes under a steady mix, and watch
the server's memory and descriptors (stdlib and wsloop.py only; Linux: /proc).

    python bench/soak.py                    # 10 minutes, 1,000 connections
    python bench/soak.py --minutes 3        # a shorter run

Starts `python wsloop.py --app soak_app:Soak` (an app written to a temporary
directory: echo, and messages starting "bc " published to every client) on a
free loopback port, opens the connections from this process (raw sockets on
one selectors loop, handshakes by hand, about a tenth of them negotiating
permessage-deflate), then each second, spread evenly:

- echo messages (some over the compression threshold, some sent compressed),
- broadcasts (each one a delivery to every connection),
- pings from clients, and pongs to the server's keepalive pings (every 5 s),
- churn: a few connections leave (a close handshake, or a reset) and as many
  new ones join, so the set is always --connections strong.

Once a minute it prints the server's VmRSS (/proc/PID/status) and its open
descriptors (/proc/PID/fd), with what the clients sent and got.  It exits
non-zero if, after the first minute, RSS grew more than --rss-tolerance (5%)
or descriptors more than --fd-tolerance (1%) over the first minute's figures,
or if the server died or closed a client that did not ask to leave.
"""

import argparse
import os
import random
import resource
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
DEFLATE_TAIL = b"\x00\x00\xff\xff"

APP = textwrap.dedent('''
    import wsloop

    class Soak(wsloop.Handler):
        """Echo, except that messages starting "bc " go to every client."""

        def on_connect(self, conn):
            conn.subscribe("all")

        def on_message(self, conn, message):
            if message[:3] in ("bc ", b"bc "):
                conn.server.publish("all", message)
            else:
                conn.send(message)
''')


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def client_frame(opcode, payload, rsv1=False):
    """A masked client frame with a zero mask (so the payload goes as is)."""
    first = 0x80 | (0x40 if rsv1 else 0) | opcode
    size = len(payload)
    if size < 126:
        header = bytes([first, 0x80 | size])
    elif size < 65536:
        header = bytes([first, 0x80 | 126]) + struct.pack("!H", size)
    else:
        header = bytes([first, 0x80 | 127]) + struct.pack("!Q", size)
    return header + b"\0\0\0\0" + payload


class Client:
    """One raw-socket WebSocket client: a frame parser and counters."""

    __slots__ = ("sock", "buffer", "deflate", "inflater", "leaving", "index")

    def __init__(self, sock, deflate, index):
        self.sock = sock
        self.buffer = bytearray()
        self.deflate = deflate
        self.inflater = zlib.decompressobj(-15) if deflate else None
        self.leaving = False
        self.index = index


class Soak:
    def __init__(self, args, port):
        self.args = args
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.clients = {}  # socket -> Client
        self.next_index = 0
        self.counts = dict.fromkeys(
            ["echo_sent", "echo_received", "broadcasts_sent", "broadcast_deliveries", "pings_sent",
             "pongs_received", "server_pings_answered", "joined", "left_closed", "left_reset",
             "unexpected_closes"], 0)
        self.random = random.Random(args.seed)

    # -- connections -----------------------------------------------------------

    def open_one(self):
        deflate = self.random.random() < self.args.deflate_share
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        extension = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if deflate else ""
        sock.sendall(("GET /soak HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n" % (KEY, extension)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("server closed during the handshake")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError("handshake refused: %r" % head[:80])
        negotiated = b"permessage-deflate" in head.lower()
        sock.setblocking(False)
        client = Client(sock, negotiated, self.next_index)
        self.next_index += 1
        client.buffer += rest
        self.clients[sock] = client
        self.selector.register(sock, selectors.EVENT_READ, client)
        self.counts["joined"] += 1
        return client

    def drop(self, client):
        self.selector.unregister(client.sock)
        del self.clients[client.sock]
        client.sock.close()

    def leave(self, client):
        """Churn: half leave with a close handshake, half with a reset."""
        if self.random.random() < 0.5:
            client.leaving = True
            self.send(client, client_frame(8, struct.pack("!H", 1000) + b"bye"))
            # The server answers with its close frame and closes TCP: read_ready drops it.
        else:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.counts["left_reset"] += 1
            self.drop(client)
        self.open_one()

    def send(self, client, data):
        sock = client.sock
        sock.settimeout(10)  # blocking for the few bytes: loopback, a peer that reads
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server closed it: read_ready sees the EOF
        finally:
            sock.setblocking(False)

    def pick(self):
        while True:
            client = self.random.choice(list(self.clients.values()))
            if not client.leaving:
                return client

    # -- input -------------------------------------------------------------------

    def read_ready(self, client):
        try:
            data = client.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if not client.leaving:
                self.counts["unexpected_closes"] += 1
            else:
                self.counts["left_closed"] += 1
            self.drop(client)
            if not client.leaving:
                self.open_one()
            return
        client.buffer += data
        self.parse(client)

    def parse(self, client):
        buffer = client.buffer
        position = 0
        while len(buffer) - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            length = second & 0x7F
            header = 2
            if length == 126:
                if len(buffer) - position < 4:
                    break
                length = struct.unpack_from("!H", buffer, position + 2)[0]
                header = 4
            elif length == 127:
                if len(buffer) - position < 10:
                    break
                length = struct.unpack_from("!Q", buffer, position + 2)[0]
                header = 10
            end = position + header + length
            if end > len(buffer):
                break
            payload = bytes(buffer[position + header : end])
            position = end
            opcode = first & 0x0F
            if opcode in (1, 2):
                if first & 0x40:
                    payload = client.inflater.decompress(payload + DEFLATE_TAIL)
                if payload.startswith(b"bc "):
                    self.counts["broadcast_deliveries"] += 1
                else:
                    self.counts["echo_received"] += 1
            elif opcode == 9:
                self.send(client, client_frame(10, payload))
                self.counts["server_pings_answered"] += 1
            elif opcode == 10:
                self.counts["pongs_received"] += 1
            elif opcode == 8:
                if not client.leaving:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    print("server closed client %d: %r %r" % (client.index, code, payload[2:]), flush=True)
                    self.counts["unexpected_closes"] += 1
                    client.leaving = True  # the EOF that follows is not counted again
                    self.open_one()
        del buffer[:position]

    # -- the run -----------------------------------------------------------------

    def action(self, kind):
        client = self.pick()
        if kind == "echo":
            size = self.random.choice([16, 64, 300, 2000])
            payload = (b"echo %d " % client.index) + b"x" * size
            if client.deflate and self.random.random() < 0.3:
                compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
                body = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
                self.send(client, client_frame(1, body[:-4], rsv1=True))
            else:
                self.send(client, client_frame(1, payload))
            self.counts["echo_sent"] += 1
        elif kind == "broadcast":
            self.send(client, client_frame(1, b"bc " + b"news " * 40))
            self.counts["broadcasts_sent"] += 1
        elif kind == "ping":
            self.send(client, client_frame(9, b"soak"))
            self.counts["pings_sent"] += 1
        elif kind == "churn":
            self.leave(client)

    def run(self, server):
        args = self.args
        for _ in range(args.connections):
            self.open_one()
        print("%d connections open (%d with permessage-deflate)" % (
            len(self.clients), sum(c.deflate for c in self.clients.values())), flush=True)
        rates = {"echo": args.echo_rate, "broadcast": args.broadcast_rate, "ping": args.ping_rate,
                 "churn": args.churn_rate}
        due = {kind: 0.0 for kind in rates}
        start = time.monotonic()
        samples = []
        next_sample = start + 60
        end = start + args.minutes * 60
        last = start
        while True:
            now = time.monotonic()
            if server.poll() is not None:
                print("the server exited with status %s" % server.returncode, flush=True)
                return samples, False
            for kind, rate in rates.items():
                due[kind] += rate * (now - last)
                while due[kind] >= 1:
                    due[kind] -= 1
                    self.action(kind)
            last = now
            if now >= next_sample or now >= end:
                minute = len(samples) + 1
                sample = (rss_kib(server.pid), fd_count(server.pid))
                samples.append(sample)
                c = self.counts
                print("minute %2d: server RSS %7d KiB, fds %5d | clients %d, joined %d, left %d+%d, "
                      "echo %d/%d, broadcasts %d -> %d deliveries, pings %d/%d, server pings answered %d, "
                      "unexpected closes %d" % (
                          minute, sample[0], sample[1], len(self.clients), c["joined"], c["left_closed"],
                          c["left_reset"], c["echo_received"], c["echo_sent"], c["broadcasts_sent"],
                          c["broadcast_deliveries"], c["pongs_received"], c["pings_sent"],
                          c["server_pings_answered"], c["unexpected_closes"]), flush=True)
                next_sample += 60
                if now >= end:
                    break
            for key, _ in self.selector.select(0.01):
                if key.fileobj in self.clients:
                    self.read_ready(key.data)
        return samples, True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--echo-rate", type=float, default=100.0, help="echo messages per second")
    parser.add_argument("--broadcast-rate", type=float, default=0.5, help="broadcasts per second")
    parser.add_argument("--ping-rate", type=float, default=20.0, help="client pings per second")
    parser.add_argument("--churn-rate", type=float, default=3.0, help="connections replaced per second")
    parser.add_argument("--deflate-share", type=float, default=0.1, help="share that negotiates deflate")
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    parser.add_argument("--fd-tolerance", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.minutes < 1:
        parser.error("--minutes must be at least 1 (the first minute is the baseline)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="wsloop-soak-") as tmp:
        with open(os.path.join(tmp, "soak_app.py"), "w") as module:
            module.write(APP)
        port = free_port()
        log_path = os.path.join(tmp, "server.log")
        command = [sys.executable, os.path.join(ROOT, "wsloop.py"), "--port", str(port), "--app",
                   "soak_app:Soak", "--ping-interval", "5", "--log-level", "warning"]
        print("server: %s (pid below); clients: %d, %.0f min" % (" ".join(command), args.connections, args.minutes))
        env = dict(os.environ, PYTHONPATH=tmp + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        print(open(log_path).read())
                        raise SystemExit("the server did not start")
                    time.sleep(0.05)
            print("server pid %d, %d KiB RSS before any connection" % (server.pid, rss_kib(server.pid)), flush=True)
            soak = Soak(args, port)
            samples, alive = soak.run(server)
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        with open(log_path) as log:
            warnings = log.read().splitlines()
    if warnings:
        print("server log (%d lines), the last ones:" % len(warnings))
        for line in warnings[-10:]:
            print("  " + line)
    failures = []
    if not alive:
        failures.append("the server died")
    if soak.counts["unexpected_closes"]:
        failures.append("%d connections closed by the server" % soak.counts["unexpected_closes"])
    if len(samples) >= 2:
        (rss0, fds0), (rss1, fds1) = samples[0], samples[-1]
        rss_peak = max(rss for rss, _ in samples[1:])
        fds_peak = max(fds for _, fds in samples[1:])
        print("after minute 1: RSS %d -> %d KiB (%+.1f%%, peak %+.1f%%), fds %d -> %d (%+.1f%%, peak %+.1f%%)" % (
            rss0, rss1, 100.0 * (rss1 - rss0) / rss0, 100.0 * (rss_peak - rss0) / rss0,
            fds0, fds1, 100.0 * (fds1 - fds0) / fds0, 100.0 * (fds_peak - fds0) / fds0))
        if rss1 > rss0 * (1 + args.rss_tolerance):
            failures.append("RSS grew more than %.0f%%" % (100 * args.rss_tolerance))
        if fds1 > fds0 * (1 + args.fd_tolerance):
            failures.append("descriptors grew more than %.0f%%" % (100 * args.fd_tolerance))
    print("FAIL: " + "; ".join(failures) if failures else "OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
