"""What history costs: per published message, in memory (the process and
Redis), and when 1,000 clients recover at once (stdlib only; the Redis
rows need redis-server on PATH, started here on a free port, no
persistence).

    python bench/history.py                 # everything, a few seconds each
    python bench/history.py --only storm    # publish | memory | redis-memory | storm

publish: a Server on a thread of this process with one subscribed client
  (a raw socket read on another thread); the loop publishes --publishes
  messages of 64 B in one go; printed: loop time per publish, and time per
  message until the client has them all.  Rows: history off, history 100
  (no formatting hook), history 100 with the chat's JSON hook; then the
  same with a RedisBroker (off: PUBLISH; on: the append script, delivered
  when Redis sends it back).
memory: tracemalloc over 1,000 topics' histories in the process.
redis-memory: INFO used_memory after filling N messages of 64 B in T topics
  with wsloop's append script, and the same with a Stream per topic
  (HINCRBY + XADD MAXLEN ~ N with the offset as its id + PUBLISH in one
  script), with the time per append (pipelined, 20,000).
storm: `python wsloop.py --broadcast --history 100 [--redis]` in its own
  process, 100 messages published, then --clients raw sockets connect at
  once with ?since=<before the first>; the clock runs from the first
  connect until every client has {"recovered": true} and 100 messages.
"""

import argparse
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import wsloop  # noqa: E402

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
PAYLOAD = "m" * 64


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def handshake(port, path="/"):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, KEY)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    return sock, head.split(b"\r\n\r\n", 1)[1]


def frames(buffer):
    """Whole unmasked server frames at the start of ``buffer``: (payloads, rest)."""
    out, position = [], 0
    while len(buffer) - position >= 2:
        length = buffer[position + 1] & 0x7F
        start = position + 2
        if length == 126:
            if len(buffer) - position < 4:
                break
            length = int.from_bytes(buffer[position + 2 : position + 4], "big")
            start = position + 4
        elif length == 127:
            if len(buffer) - position < 10:
                break
            length = int.from_bytes(buffer[position + 2 : position + 10], "big")
            start = position + 10
        if len(buffer) < start + length:
            break
        out.append(bytes(buffer[start : start + length]))
        position = start + length
    return out, buffer[position:]


def masked_text(text):
    data = text.encode()
    return bytes([0x81, 0x80 | len(data)]) + b"\0\0\0\0" + data


class RedisServer:
    def __init__(self):
        self.directory = tempfile.mkdtemp()
        self.port = free_port()
        self.process = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.directory], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start")
                time.sleep(0.05)
        self.parser = wsloop._RespParser(2**30)
        self.url = "redis://127.0.0.1:%d" % self.port

    def call(self, *commands):
        """Send the commands pipelined; their replies."""
        self.sock.sendall(b"".join(wsloop._resp_command(*command) for command in commands))
        replies = []
        while len(replies) < len(commands):
            self.parser.feed(self.sock.recv(1 << 20))
            replies.extend(self.parser.replies())
        return replies

    def used_memory(self):
        info = self.call(("INFO", "memory"))[0].decode()
        return int(info.split("used_memory:", 1)[1].split("\r\n", 1)[0])

    def close(self):
        self.sock.close()
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


# -- publish --------------------------------------------------------------------------------


def publish_row(count, redis=None, **options):
    # 20,000 publishes in one turn of the loop outrun Redis: a buffer big
    # enough for all of them (the default, 1 MiB, drops the excess, counted).
    broker = wsloop.RedisBroker(redis.url, max_buffer=64 * 2**20) if redis else None
    server = wsloop.Server(wsloop.Chat(), port=0, broker=broker, compression=False, ping_interval=None, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while broker is not None and broker.state != "connected":
            if time.monotonic() > deadline:
                raise SystemExit("no Redis link")
            time.sleep(0.02)
        sock, rest = handshake(server.port)
        while server.subscriber_count("chat") < 1:
            time.sleep(0.01)
        got = [0]
        done = threading.Event()

        def read(rest):
            buffer = bytearray(rest)
            while got[0] < count:
                data = sock.recv(1 << 20)
                if not data:
                    break
                buffer += data
                payloads, buffer = frames(buffer)
                got[0] += len(payloads)
            done.set()

        reader = threading.Thread(target=read, args=(rest,), daemon=True)
        timing = {}

        def publish_all():
            start = time.perf_counter()
            for _ in range(count):
                server.publish("chat", PAYLOAD)
            timing["loop"] = time.perf_counter() - start

        started = time.perf_counter()
        reader.start()
        server.call_soon_threadsafe(publish_all)
        if not done.wait(60):
            raise SystemExit("only %d of %d arrived" % (got[0], count))
        total = time.perf_counter() - started
        sock.close()
        return timing["loop"] / count * 1e6, total / count * 1e6
    finally:
        server.shutdown(wait=True)
        server.close()
        thread.join(10)


def bench_publish(args):
    print("\npublish %d messages of 64 B, one subscriber (us per message: in the loop, until received)" % args.publishes)
    rows = [
        ("one process, history off", None, {}),
        ("one process, history 100", None, {"history": 100}),
        ("one process, history 100 + chat JSON", None, {"history": 100, "position_format": wsloop.Chat.format}),
    ]
    redis = RedisServer() if shutil.which("redis-server") else None
    if redis:
        rows += [
            ("Redis, history off", redis, {}),
            ("Redis, history 100", redis, {"history": 100}),
            ("Redis, history 100 + chat JSON", redis, {"history": 100, "position_format": wsloop.Chat.format}),
        ]
    try:
        for name, server, options in rows:
            results = [publish_row(args.publishes, server, **options) for _ in range(args.rounds)]
            loop = sorted(r[0] for r in results)[len(results) // 2]
            total = sorted(r[1] for r in results)[len(results) // 2]
            print("  %-40s %6.2f us in the loop   %6.2f us end to end" % (name, loop, total))
    finally:
        if redis:
            redis.close()


# -- memory ---------------------------------------------------------------------------------


def bench_memory(args):
    print("\nmemory of history in the process (tracemalloc), 64 B text messages")
    for size in (100, 1000):
        topics = 1000 if size == 100 else 100
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        history = wsloop._History(size)
        for topic in range(topics):
            for _ in range(size):
                history.append("topic-%d" % topic, "%064d" % len(history))  # each its own string
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        print("  N=%-5d %d topics: %7.1f KiB per topic, %4.0f B per message" % (
            size, topics, used / topics / 1024, used / topics / size))
        del history


def bench_redis_memory(args):
    if not shutil.which("redis-server"):
        print("\nredis-memory: no redis-server")
        return
    stream_script = """\
local top = redis.call('HINCRBY', KEYS[2], 'top', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '0-' .. top, 'm', ARGV[2])
redis.call('PUBLISH', ARGV[1], '#e:' .. top .. ':' .. ARGV[2])
return top
"""
    redis = RedisServer()
    try:
        list_sha = redis.call(("SCRIPT", "LOAD", wsloop._APPEND_SCRIPT))[0].decode()
        stream_sha = redis.call(("SCRIPT", "LOAD", stream_script))[0].decode()
        envelope = b"\0" * 17 + PAYLOAD.encode()
        print("\nRedis memory (INFO used_memory growth) and append time, %d B per stored message" % len(envelope))
        for kind, sha in (("list + counter (wsloop)", list_sha), ("stream, offset as id", stream_sha)):
            for size, topics in ((100, 10), (100, 1000), (1000, 10), (1000, 100)):
                redis.call(("FLUSHALL",))
                before = redis.used_memory()
                commands = []
                for topic in range(topics):
                    for _ in range(size):
                        commands.append(("EVALSHA", sha, "2", "b:h:%d" % topic, "b:p:%d" % topic, "b:%d" % topic,
                                         envelope, str(size), "epoch1", "0"))
                start = time.perf_counter()
                for chunk in range(0, len(commands), 1000):
                    redis.call(*commands[chunk : chunk + 1000])
                elapsed = time.perf_counter() - start
                used = redis.used_memory() - before
                print("  %-24s N=%-5d %5d topics: %8.1f KiB per topic (%4.0f B per message), %5.1f us per append" % (
                    kind, size, topics, used / topics / 1024, used / topics / size, elapsed / len(commands) * 1e6))
    finally:
        redis.close()


# -- storm ----------------------------------------------------------------------------------


def storm(args, redis):
    port = free_port()
    command = [sys.executable, os.path.join(ROOT, "wsloop.py"), "--port", str(port), "--broadcast",
               "--history", str(args.messages), "--no-compression", "--log-level", "warning", "--no-access-log",
               "--ping-interval", "none"]
    if redis:
        command += ["--redis", redis.url]
    server = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                publisher, rest = handshake(port)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("wsloop did not start")
                time.sleep(0.05)
        buffer = bytearray(rest)
        seen = []
        for n in range(args.messages):
            publisher.sendall(masked_text("message %d" % n))
        while len(seen) < args.messages:
            buffer += publisher.recv(1 << 20)
            payloads, buffer = frames(buffer)
            seen.extend(payloads)
        epoch = wsloop._parse_position(json.loads(seen[0])["position"])[0]
        path = "/?since=%s-0" % epoch
        selector = selectors.DefaultSelector()
        want = args.messages + 1
        counts, buffers, socks = {}, {}, []
        request = ("GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, KEY)).encode()
        start = time.perf_counter()
        for _ in range(args.clients):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request)
            sock.setblocking(False)
            socks.append(sock)
            counts[sock] = -1  # the 101 first
            buffers[sock] = bytearray()
            selector.register(sock, selectors.EVENT_READ)
        done = 0
        first_ok = None
        while done < args.clients:
            for key, _ in selector.select(30):
                sock = key.fileobj
                data = sock.recv(1 << 20)
                if not data:
                    raise SystemExit("a client was closed")
                buffer = buffers[sock]
                buffer += data
                if counts[sock] < 0:
                    if b"\r\n\r\n" not in buffer:
                        continue
                    del buffer[: buffer.index(b"\r\n\r\n") + 4]
                    counts[sock] = 0
                payloads, rest = frames(buffer)
                buffers[sock] = rest
                if payloads and counts[sock] == 0:
                    if first_ok is None:
                        first_ok = payloads[0]
                    if json.loads(payloads[0]) != {"recovered": True}:
                        raise SystemExit("not recovered: %r" % payloads[0])
                counts[sock] += len(payloads)
                if counts[sock] >= want:
                    selector.unregister(sock)
                    done += 1
        elapsed = time.perf_counter() - start
        for sock in socks:
            sock.close()
        publisher.close()
        return elapsed
    finally:
        server.kill()
        server.wait()


def bench_storm(args):
    print("\nreconnect storm: %d clients each recovering %d messages at once" % (args.clients, args.messages))
    elapsed = storm(args, None)
    print("  one process:      %.2f s (%d messages sent, %.0f/s)" % (
        elapsed, args.clients * args.messages, args.clients * args.messages / elapsed))
    if shutil.which("redis-server"):
        redis = RedisServer()
        try:
            elapsed = storm(args, redis)
        finally:
            redis.close()
        print("  through Redis:    %.2f s (%d messages sent, %.0f/s)" % (
            elapsed, args.clients * args.messages, args.clients * args.messages / elapsed))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["publish", "memory", "redis-memory", "storm"])
    parser.add_argument("--publishes", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=100)
    args = parser.parse_args()
    for name, run in (("publish", bench_publish), ("memory", bench_memory), ("redis-memory", bench_redis_memory),
                      ("storm", bench_storm)):
        if args.only in (None, name):
            run(args)


if __name__ == "__main__":
    main()
