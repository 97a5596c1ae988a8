"""Memory per connection, with and without permessage-deflate (stdlib only).

    python bench/memory.py [--connections 1000]

Starts `python wsloop.py` as a subprocess, opens the connections from this
process, and prints the server's RSS growth per connection: idle, then after
one compressed message each way (which makes each connection's zlib state).
"""

import argparse
import os
import re
import resource
import socket
import subprocess
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1))


def handshake(port, offer):
    sock = socket.create_connection(("127.0.0.1", port))
    extra = "Sec-WebSocket-Extensions: %s\r\n" % offer if offer else ""
    sock.sendall(("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n" % (KEY, extra)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def compressed_frame(payload):
    compressor = zlib.compressobj(wbits=-15)
    body = (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    mask = b"\x00\x00\x00\x00"  # a zero mask keeps the payload as is
    assert len(body) < 126
    return bytes([0xC1, 0x80 | len(body)]) + mask + body


def measure(count, offer, label):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "wsloop.py"), "--port", "0",
                                "--ping-interval", "none", "--log-level", "info"] +
                               ([] if offer else ["--no-compression"]),
                               stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r":(\d+)$", process.stderr.readline().strip()).group(1))
        process.stderr.close()  # no more logs needed; the server keeps running
        warm = handshake(port, offer)
        base = rss_kib(process.pid)
        socks = [handshake(port, offer) for _ in range(count)]
        idle = (rss_kib(process.pid) - base) / count
        line = "%-34s idle %.2f KiB/conn" % (label, idle)
        if offer:
            message = b"a JSON-ish message that compresses: " + b'{"k": 1}, ' * 20
            frame = compressed_frame(message)
            for sock in socks:
                sock.sendall(frame)
            for sock in socks:
                got = b""
                while len(got) < 4:
                    got += sock.recv(65536)
            used = (rss_kib(process.pid) - base) / count
            line += ", after one compressed message each way %.1f KiB/conn" % used
        print(line, flush=True)
        for sock in socks + [warm]:
            sock.close()
    finally:
        process.kill()
        process.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print("%d connections each:" % args.connections)
    measure(args.connections, None, "no compression")
    measure(args.connections, "permessage-deflate", "deflate, context takeover")
    measure(args.connections, "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "deflate, no context takeover")


if __name__ == "__main__":
    main()
