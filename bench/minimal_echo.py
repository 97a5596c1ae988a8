"""The floor for comparison: the least a pure-Python WebSocket echo can do.

    python bench/minimal_echo.py PORT

One selectors loop; the opening handshake, unmasking and framing, and
nothing else (no limits, no control frames beyond close, no fragments, no
compression, no timers).  bench/run.py runs it as the peer "minimal" so a
figure for wsloop can be read against what the language itself allows.
Never use it for anything but measuring.
"""

import base64
import hashlib
import selectors
import socket
import struct
import sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TABLES = [bytes(b ^ k for b in range(256)) for k in range(256)]


def unmask(key, data):
    if len(data) < 2048:
        n = len(data)
        repeated = (key * (n // 4 + 1))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")
    out = bytearray(len(data))
    for i in range(4):
        out[i::4] = data[i::4].translate(TABLES[key[i]])
    return bytes(out)


def header(opcode, n):
    if n < 126:
        return struct.pack("!BB", 0x80 | opcode, n)
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n)
    return struct.pack("!BBQ", 0x80 | opcode, 127, n)


class Peer:
    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()
        self.out = bytearray()
        self.open = False


def handshake(peer):
    end = peer.buffer.find(b"\r\n\r\n")
    if end < 0:
        return False
    key = b""
    for line in bytes(peer.buffer[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    peer.out += (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    del peer.buffer[: end + 4]
    peer.open = True
    return True


def frames(peer):
    """Echo every whole frame in the buffer; False once a close came."""
    buffer = peer.buffer
    offset = 0
    while len(buffer) - offset >= 6:
        first, second = buffer[offset], buffer[offset + 1]
        n = second & 0x7F
        start = offset + 2
        if n == 126:
            if len(buffer) - offset < 8:
                break
            n = struct.unpack_from("!H", buffer, start)[0]
            start += 2
        elif n == 127:
            if len(buffer) - offset < 14:
                break
            n = struct.unpack_from("!Q", buffer, start)[0]
            start += 8
        if len(buffer) < start + 4 + n:
            break
        key = bytes(buffer[start : start + 4])
        payload = unmask(key, bytes(buffer[start + 4 : start + 4 + n]))
        offset = start + 4 + n
        opcode = first & 0x0F
        if opcode == 8:
            peer.out += header(8, 0)
            del buffer[:offset]
            return False
        peer.out += header(opcode, len(payload)) + payload
    del buffer[:offset]
    return True


def main():
    port = int(sys.argv[1])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)

    def drop(peer):
        selector.unregister(peer.sock)
        peer.sock.close()

    while True:
        for key, mask in selector.select():
            peer = key.data
            if peer is None:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    continue
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                selector.register(sock, selectors.EVENT_READ, Peer(sock))
                continue
            if mask & selectors.EVENT_READ:
                try:
                    data = peer.sock.recv(1 << 18)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    drop(peer)
                    continue
                if data:
                    peer.buffer += data
                    if not peer.open and not handshake(peer):
                        continue
                    going = frames(peer)
                    if not going:
                        peer.sock.send(peer.out)
                        drop(peer)
                        continue
            if peer.out:
                try:
                    sent = peer.sock.send(peer.out)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    drop(peer)
                    continue
                del peer.out[:sent]
                wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.out else 0)
                if key.events != wanted:
                    selector.modify(peer.sock, wanted, peer)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
