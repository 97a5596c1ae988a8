"""Fan-out through Redis: one publisher, 1,000 subscribers over two worker
processes, beside the same load on one process (stdlib only; needs
redis-server on PATH for the Redis row).

    python bench/fanout.py                      # 1,000 subscribers, 300 messages, 3 rounds
    python bench/fanout.py --window 8           # 8 messages in flight instead of 1
    python bench/fanout.py --subscribers 1000 --messages 300 --rounds 3 --size 64

Rows:
- one process: `python wsloop.py --broadcast` (no Redis);
- 2 workers + Redis: `python wsloop.py --workers 2 --broadcast --redis
  redis://127.0.0.1:PORT` against a redis-server this script starts on a
  free port with persistence off.

Each round opens the subscribers (raw sockets, handshakes by hand, on one
selectors loop that only counts bytes: every delivery is one server frame of
a known size), checks with one message that every subscriber gets it, then
the publisher (one more connection) sends --messages text messages as fast
as it may with --window of them in flight (it waits for its own copy of the
oldest; with --broadcast the sender is a receiver too).  The clock runs from
the first send until every subscriber has every message; deliveries/s counts
subscriber copies only.  Prints a table with the machine, and the client's
own CPU use (on a 2-core machine the client competes with the server for
the cores, which the figures include).
"""

import argparse
import os
import platform
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, process, what, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("%s did not start on port %d" % (what, port))
            time.sleep(0.05)


def handshake(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(("GET / HTTP/1.1\r\nHost: fanout\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % KEY).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed in the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101") or not head.endswith(b"\r\n\r\n"):
        raise ConnectionError("unexpected handshake answer %r" % head[:200])
    return sock


def text_frame(payload):
    """A masked client text frame with a zero mask (the payload goes as is)."""
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def children_of(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def sockets_held(pid):
    count = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            count += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
        except OSError:
            pass
    return count


def one_round(port, args, server):
    """Open the subscribers, publish, count; returns the figures of one round."""
    frame_size = 2 + args.size  # a server frame: 2-byte header, no mask
    subscribers = [handshake(port) for _ in range(args.subscribers)]
    publisher = handshake(port)
    selector = selectors.DefaultSelector()
    got = {}
    for sock in subscribers:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        got[sock] = 0
    publisher.settimeout(30)
    buffer = bytearray(1 << 20)
    payload = b"m" * args.size

    def pump(target, timeout):
        """Read until each subscriber holds `target` frames' bytes; False on timeout."""
        deadline = time.monotonic() + timeout
        behind = sum(1 for sock in subscribers if got[sock] < target)
        while behind:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in selector.select(min(remaining, 0.5)):
                sock = key.fileobj
                before = got[sock]
                count = sock.recv_into(buffer)
                if not count:
                    raise ConnectionError("a subscriber was closed")
                got[sock] = before + count
                if before < target <= got[sock]:
                    behind -= 1
        return True

    # Warm-up: one message that every subscriber must get (subscriptions are live).
    publisher.sendall(text_frame(payload))
    own = 0
    while own < frame_size:
        own += publisher.recv_into(buffer)
    if not pump(frame_size, 30):
        raise SystemExit("warm-up message did not reach every subscriber")
    spread = [sockets_held(pid) for pid in server["workers"]()]

    sent = 0
    own_frames = 0
    own_bytes = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    frame = text_frame(payload)
    publisher.setblocking(False)
    selector.register(publisher, selectors.EVENT_READ)
    target = (1 + args.messages) * frame_size
    behind = len(subscribers)
    deadline = t0 + args.timeout
    while behind or own_frames < args.messages:
        while sent < args.messages and sent - own_frames < args.window:
            publisher.setblocking(True)
            publisher.sendall(frame)
            publisher.setblocking(False)
            sent += 1
        now = time.perf_counter()
        if now > deadline:
            break
        for key, _ in selector.select(0.5):
            sock = key.fileobj
            count = sock.recv_into(buffer)
            if not count:
                raise ConnectionError("closed during the run")
            if sock is publisher:
                own_bytes += count
                own_frames = own_bytes // frame_size
                continue
            before = got[sock]
            got[sock] = before + count
            if before < target <= got[sock]:
                behind -= 1
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    delivered = sum(min(count, target) // frame_size - 1 for count in got.values())
    for sock in subscribers + [publisher]:
        sock.close()
    selector.close()
    return {"deliveries_per_s": delivered / elapsed, "seconds": elapsed, "delivered": delivered,
            "expected": args.messages * len(subscribers), "client_cpu": cpu / elapsed, "spread": spread}


def run_mode(label, command, port, args, server):
    rounds = []
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server["process"] = process
    try:
        wait_for_port(port, process, label)
        time.sleep(0.5)  # the second worker too
        for index in range(args.rounds):
            result = one_round(port, args, server)
            rounds.append(result)
            print("  %s round %d: %.0f deliveries/s (%d/%d in %.2f s, client CPU %.0f%%, sockets per worker %s)" % (
                label, index + 1, result["deliveries_per_s"], result["delivered"], result["expected"],
                result["seconds"], 100 * result["client_cpu"], result["spread"]), flush=True)
            time.sleep(0.5)  # let the closes go through
    finally:
        process.terminate()
        try:
            _, errors = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            _, errors = process.communicate()
        if errors.strip():
            print("  %s server log (last lines):\n    %s" % (label, "\n    ".join(errors.strip().splitlines()[-5:])))
    return rounds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--window", type=int, default=1,
                        help="messages in flight: the next goes once the publisher has its copy of the one "
                             "--window back (1: as bench/run.py's broadcast row)")
    parser.add_argument("--size", type=int, default=64, help="message size in bytes (< 126)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=30.0, help="per round")
    args = parser.parse_args()
    if not 0 < args.size < 126:
        parser.error("--size must be 1-125")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not on PATH (Debian: apt-get install redis-server)")
    common = ["--ping-interval", "none", "--no-compression", "--log-level", "warning",
              "--max-pending-output", "64M"]
    wsloop_py = os.path.join(ROOT, "wsloop.py")
    results = []
    print("machine: %d CPUs (nproc), %s, Python %s" % (os.cpu_count(), platform.machine(),
                                                         platform.python_version()))
    print("load: 1 publisher, %d subscribers, %d messages of %d bytes, window %d, %d rounds" % (
        args.subscribers, args.messages, args.size, args.window, args.rounds), flush=True)

    # One process, no Redis.
    port = free_port()
    command = [sys.executable, wsloop_py, "--port", str(port), "--broadcast"] + common
    server = {"workers": lambda: [server["process"].pid]}
    results.append(("1 process", " ".join(command), run_mode("1 process", command, port, args, server)))

    # Two workers through Redis.
    with tempfile.TemporaryDirectory(prefix="wsloop-fanout-") as tmp:
        redis_port = free_port()
        redis = subprocess.Popen([redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", tmp, "--daemonize", "no"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(redis_port, redis, "redis-server")
            port = free_port()
            command = [sys.executable, wsloop_py, "--port", str(port), "--workers", "2", "--broadcast",
                       "--redis", "redis://127.0.0.1:%d" % redis_port] + common
            server = {"workers": lambda: children_of(server["process"].pid)}
            results.append(("2 workers + Redis", " ".join(command),
                            run_mode("2 workers + Redis", command, port, args, server)))
        finally:
            redis.terminate()
            redis.wait(10)

    print()
    print("| server | deliveries/s (median) | min-max | client CPU |")
    print("|---|---|---|---|")
    for label, _, rounds in results:
        figures = [r["deliveries_per_s"] for r in rounds]
        print("| %s | %s | %s-%s | %.0f%% |" % (
            label, format(round(statistics.median(figures)), ","), format(round(min(figures)), ","),
            format(round(max(figures)), ","), 100 * statistics.median(r["client_cpu"] for r in rounds)))
    print()
    for label, command, _ in results:
        print("%s: %s" % (label, command))
    print("this script: %s %s" % (os.path.relpath(sys.argv[0]), " ".join(sys.argv[1:])))
    if any(r["delivered"] != r["expected"] for _, _, rounds in results for r in rounds):
        print("FAIL: some deliveries were missing")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
