"""The load generator, one process: raw sockets that count fixed-size
frames by bytes for echo and broadcast (far cheaper per message than a
WebSocket library, so the server is what gets measured), and picows
(Cython) on uvloop to open the 10,000 idle connections (`--picows` uses it
for echo too).

    python bench/client.py echo URL --size 64 --connections 100 --inflight 1 --seconds 3 [--binary]
    python bench/client.py broadcast URL --size 64 --connections 1000 --seconds 3
    python bench/client.py idle URL --connections 10000

Prints one JSON line with the figures and the client's own CPU use, so a run
can show that the client was not the bottleneck.
"""

import argparse
import asyncio
import json
import resource
import selectors
import socket
import struct
import sys
import time

import uvloop
from picows import WSListener, WSMsgType, ws_connect


class Echoer(WSListener):
    def __init__(self, state):
        self.state = state
        self.transport = None

    def on_ws_connected(self, transport):
        self.transport = transport

    def on_ws_frame(self, transport, frame):
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            state = self.state
            state["received"] += 1
            state["bytes"] += frame.payload_size
            if state["running"]:
                transport.send(state["type"], state["payload"])


async def connect_all(factory, url, count, batch=200):
    transports = []
    for start in range(0, count, batch):
        results = await asyncio.gather(*(ws_connect(factory, url) for _ in range(min(batch, count - start))))
        transports.extend(transport for transport, _ in results)
    return transports


async def run_echo(args):
    kind = WSMsgType.BINARY if args.binary else WSMsgType.TEXT
    state = {"received": 0, "bytes": 0, "running": True, "type": kind, "payload": b"x" * args.size}
    transports = await connect_all(lambda: Echoer(state), args.url, args.connections)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for transport in transports:
        for _ in range(args.inflight):
            transport.send(kind, state["payload"])
    await asyncio.sleep(args.seconds)
    received, nbytes = state["received"], state["bytes"]
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    state["running"] = False
    for transport in transports:
        transport.disconnect()
    return {"messages_per_s": received / elapsed, "mb_per_s": nbytes / elapsed / 1e6, "client_cpu": cpu / elapsed}


def raw_connect(url):
    """A WebSocket handshake on a plain blocking socket (receivers only count bytes)."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101") and head.endswith(b"\r\n\r\n"), head
    sock.setblocking(False)
    return sock


def client_frame(opcode, size):
    """A masked client frame with a zero mask (so the payload is sent as is)."""
    if size < 126:
        header = bytes([0x80 | opcode, 0x80 | size])
    elif size < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", size)
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", size)
    return header + b"\0\0\0\0" + b"x" * size


def server_frame_size(size):
    return (2 if size < 126 else 4 if size < 65536 else 10) + size


def run_echo_raw(args):
    """Echo load on raw sockets: every reply is one server frame of a known
    size, so counting bytes counts messages, and each wake-up answers all the
    replies it completed with one send.  Far cheaper per message than any
    WebSocket client library, so the server is what gets measured."""
    sockets = [raw_connect(args.url) for _ in range(args.connections)]
    frame = client_frame(2 if args.binary else 1, args.size)
    reply_size = server_frame_size(args.size)
    selector = selectors.DefaultSelector()
    partial = {}
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
        partial[sock] = 0
        sock.setblocking(True)
        sock.sendall(frame * args.inflight)
        sock.setblocking(False)
    buffer = bytearray(4 << 20)
    received = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + args.seconds
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        for key, _ in selector.select(deadline - now):
            sock = key.fileobj
            count = sock.recv_into(buffer)
            done, partial[sock] = divmod(partial[sock] + count, reply_size)
            if done:
                received += done
                sock.setblocking(True)
                sock.sendall(frame * done)  # keep the same number in flight
                sock.setblocking(False)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for sock in sockets:
        sock.close()
    return {"messages_per_s": received / elapsed, "mb_per_s": received * args.size / elapsed / 1e6,
            "client_cpu": cpu / elapsed}


def run_broadcast_raw(args):
    """Receivers are raw sockets with large receive buffers that nobody reads
    during the run: the kernel holds what the server sends, and they are
    drained and counted at the end (every delivery is one frame of the same
    size).  So the client costs almost nothing and the server is measured."""
    sockets = [raw_connect(args.url) for _ in range(args.connections)]
    for sock in sockets[1:]:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sender = sockets[0]
    frame_size = 2 + args.size  # server frames: 2-byte header (size < 126), no mask
    assert args.size < 126
    message = bytes([0x81, 0x80 | args.size]) + b"\0\0\0\0" + b"b" * args.size  # zero mask
    buffer = bytearray(1 << 20)
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + args.seconds
    sent = 0
    sender.setblocking(True)
    sender.settimeout(10)
    got = 0
    while time.perf_counter() < deadline:
        # One message in flight: the next goes once the sender has its copy.
        sender.sendall(message)
        sent += 1
        while got < sent * frame_size:
            got += sender.recv_into(buffer)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    received = got
    for sock in sockets[1:]:
        sock.setblocking(True)
        sock.settimeout(10)
        expected = sent * frame_size
        count = 0
        while count < expected:  # everything was sent before the sender got its copy back
            count += sock.recv_into(buffer)
        received += count
    for sock in sockets:
        sock.close()
    return {"deliveries_per_s": received / frame_size / elapsed, "messages_sent": sent, "client_cpu": cpu / elapsed}


async def run_idle(args):
    state = {"received": 0, "bytes": 0, "running": False, "type": WSMsgType.TEXT, "payload": b""}
    t0 = time.perf_counter()
    transports = await connect_all(lambda: Echoer(state), args.url, args.connections)
    opened = time.perf_counter() - t0
    print(json.dumps({"opened": len(transports), "open_seconds": opened}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # RSS is read now
    t1 = time.perf_counter()
    for transport in transports:
        transport.send(WSMsgType.TEXT, b"hi")
    while state["received"] < len(transports) and time.perf_counter() - t1 < 60:
        await asyncio.sleep(0.01)
    echoed = time.perf_counter() - t1
    for transport in transports:
        transport.disconnect()
    return {"open_seconds": opened, "echo_all_seconds": echoed, "echoed": state["received"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["echo", "broadcast", "idle"])
    parser.add_argument("url")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--binary", action="store_true")
    parser.add_argument("--picows", action="store_true", help="echo with picows instead of raw sockets")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.scenario == "broadcast":
        print(json.dumps(run_broadcast_raw(args)), flush=True)
        return
    if args.scenario == "echo" and not args.picows:
        print(json.dumps(run_echo_raw(args)), flush=True)
        return
    runner = {"echo": run_echo, "idle": run_idle}[args.scenario]
    uvloop.install()
    print(json.dumps(asyncio.run(runner(args))), flush=True)


if __name__ == "__main__":
    main()
