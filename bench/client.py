"""The load generator: picows (Cython) on uvloop, one process.

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


class Counter(WSListener):
    def __init__(self, state):
        self.state = state

    def on_ws_frame(self, transport, frame):
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            self.state["received"] += 1
            waiter = self.state.get("waiter")
            if waiter is not None and transport is self.state["sender"] and not waiter.done():
                waiter.set_result(None)


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


async def run_broadcast(args):
    state = {"received": 0}
    transports = await connect_all(lambda: Counter(state), args.url, args.connections)
    sender = state["sender"] = transports[0]
    loop = asyncio.get_running_loop()
    payload = b"b" * args.size
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + args.seconds
    sent = 0
    while time.perf_counter() < deadline:
        # One message in flight: the next goes once the sender has its own copy.
        state["waiter"] = loop.create_future()
        sender.send(WSMsgType.TEXT, payload)
        sent += 1
        await state["waiter"]
    # Let the last deliveries land, then count.
    await asyncio.sleep(0.2)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for transport in transports:
        transport.disconnect()
    return {"deliveries_per_s": state["received"] / elapsed, "messages_sent": sent, "client_cpu": cpu / elapsed}


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
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runner = {"echo": run_echo, "broadcast": run_broadcast, "idle": run_idle}[args.scenario]
    uvloop.install()
    print(json.dumps(asyncio.run(runner(args))), flush=True)


if __name__ == "__main__":
    main()
