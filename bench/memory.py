"""Memory per connection, with and without permessage-deflate (stdlib only).

    python bench/memory.py [--connections 1000] [--idle-only]

Starts `python wsloop.py` as a subprocess per row, opens the connections
from this process, and prints the server's RSS growth per connection as the
README's table: idle, idle after one short message each way, then after one
compressed message of JSON-like text each way (which makes each connection's
zlib state), the client compressing with the window the server allowed.
"""

import argparse
import os
import random
import re
import resource
import socket
import subprocess
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def status_kib(pid, field="VmRSS"):
    """A /proc/PID/status figure in KiB (VmRSS, VmHWM, ...)."""
    with open("/proc/%d/status" % pid) as status:
        return int(re.search(field + r":\s+(\d+) kB", status.read()).group(1))


def handshake(port, offer=None, receive_buffer=None):
    """An upgraded socket and the 101's head.  ``receive_buffer`` is set
    before connecting, so the window the server sees stays that small."""
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    extra = "Sec-WebSocket-Extensions: %s\r\n" % offer if offer else ""
    sock.sendall(("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n" % (KEY, extra)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: nothing after the head is taken
        if not chunk:
            raise SystemExit("closed in the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit("handshake refused: %r" % head[:100])
    return sock, head.decode("latin-1")


def zero_mask_frame(first_byte, payload):
    """A client frame masked with zeros (so the payload goes as is)."""
    length = len(payload)
    if length < 126:
        header = bytes([first_byte, 0x80 | length])
    elif length < 65536:
        header = bytes([first_byte, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([first_byte, 0x80 | 127]) + length.to_bytes(8, "big")
    return header + b"\x00\x00\x00\x00" + payload


def json_like(size, seed=7692):
    """JSON-ish text of ``size`` bytes that compresses as real messages do."""
    rng = random.Random(seed)
    parts, length = [], 0
    while length < size:
        part = '{"id": %d, "user": "user%d", "score": %.3f, "tags": ["%s"]}, ' % (
            rng.randrange(10**6), rng.randrange(5000), rng.random(), rng.choice(["a", "bb", "ccc", "new", "old"]))
        parts.append(part)
        length += len(part)
    return "".join(parts)[:size].encode()


def compressed_frame(payload, bits):
    compressor = zlib.compressobj(wbits=-bits)
    body = (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    return zero_mask_frame(0xC1, body)  # FIN, RSV1 (compressed), text


def read_frame(sock):
    """Read one whole server frame (unmasked), whatever its size."""
    data = b""
    while True:
        if len(data) >= 2:
            length, start = data[1] & 0x7F, 2
            if length == 126 and len(data) >= 4:
                length, start = int.from_bytes(data[2:4], "big"), 4
            elif length == 127 and len(data) >= 10:
                length, start = int.from_bytes(data[2:10], "big"), 10
            if length < 126 or start > 2:
                if len(data) >= start + length:
                    return
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("the server closed the connection")
        data += chunk


def client_bits(answer):
    """The window the server allowed this client to compress with."""
    found = re.search(r"client_max_window_bits=(\d+)", answer)
    return int(found.group(1)) if found else 15


def measure(count, offer, label, size=None):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "wsloop.py"), "--port", "0",
                                "--ping-interval", "none", "--log-level", "info"] +
                               ([] if offer else ["--no-compression"]),
                               stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r":(\d+)$", process.stderr.readline().strip()).group(1))
        process.stderr.close()  # no more logs needed; the server keeps running
        warm, answer = handshake(port, offer)
        if size:
            payload = json_like(size)
            frame = compressed_frame(payload, client_bits(answer)) if offer else zero_mask_frame(0x81, payload)
            warm.sendall(frame)  # what the first message makes once is not counted per connection
            read_frame(warm)
        base = status_kib(process.pid)
        socks = [handshake(port, offer)[0] for _ in range(count)]
        used = (status_kib(process.pid) - base) / count
        if size:
            for sock in socks:
                sock.sendall(frame)
                read_frame(sock)
            used = (status_kib(process.pid) - base) / count
        print("| %s | %.2f KiB |" % (label, used), flush=True)
        for sock in socks + [warm]:
            sock.close()
    finally:
        process.kill()
        process.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--idle-only", action="store_true", help="only the rows without zlib state (quick)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print("%d connections each, server RSS growth per connection:\n" % args.connections)
    print("| condition | per connection |\n|---|---|")
    measure(args.connections, None, "no compression, idle")
    measure(args.connections, None, "no compression, idle after one 64-byte message each way", 64)
    measure(args.connections, "permessage-deflate", "deflate negotiated, idle")
    if args.idle_only:
        return
    measure(args.connections, "permessage-deflate; client_max_window_bits",
            "client offers `client_max_window_bits` (browsers do): 12-bit windows both ways; 1 KiB message", 1024)
    measure(args.connections, "permessage-deflate; client_max_window_bits",
            "the same, 64 KiB message (zlib's buffers fully touched: the steady state)", 65536)
    measure(args.connections, "permessage-deflate",
            "client offers no `client_max_window_bits`: 15-bit inflate window; 64 KiB message", 65536)
    measure(args.connections, "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "`client_no_context_takeover; server_no_context_takeover`, 64 KiB message", 65536)


if __name__ == "__main__":
    main()
