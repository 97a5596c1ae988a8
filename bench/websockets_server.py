"""The peer: a websockets server set up for a benchmark, as its docs advise
(no compression, no keepalive, no size or queue limits that could stall it).

    python bench/websockets_server.py PORT echo|broadcast
"""

import asyncio
import resource
import sys

from websockets.asyncio.server import broadcast, serve

CONNECTIONS = set()


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def chat(ws):
    CONNECTIONS.add(ws)
    try:
        async for message in ws:
            broadcast(CONNECTIONS, message)
    finally:
        CONNECTIONS.discard(ws)


async def main(port, mode):
    handler = echo if mode == "echo" else chat
    async with serve(handler, "127.0.0.1", port, compression=None, ping_interval=None,
                     max_size=None, max_queue=None, backlog=4096):
        print("listening", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
