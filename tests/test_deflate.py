"""permessage-deflate (RFC 7692): negotiation, round trips, limits, RSV1 rules."""

import itertools
import os
import random
import re
import subprocess
import sys
import tracemalloc
import zlib

import pytest

import wsloop
from helpers import Client, client_frame, parse_server_frames, request_bytes, running_server

TEXT, BINARY, CLOSE, PING = 1, 2, 8, 9
E = wsloop.Event


def negotiate(*header_values, settings=None):
    """Run a handshake with these Sec-WebSocket-Extensions lines; return (status, extension header)."""
    protocol = wsloop.Protocol(compression=settings or wsloop.Deflate())
    head = request_bytes()[:-2]
    for value in header_values:
        head += b"Sec-WebSocket-Extensions: " + value.encode() + b"\r\n"
    protocol.receive_data(head + b"\r\n")
    events = list(protocol.events())
    if not events:
        return int(bytes(protocol.outgoing).split(b" ")[1]), None
    protocol.accept()
    response = protocol.data_to_send().decode()
    match = re.search(r"\r\nSec-WebSocket-Extensions: ([^\r]*)\r\n", response)
    return 101, match.group(1) if match else None


@pytest.mark.parametrize(
    "offers, expected",
    [
        (["permessage-deflate"], "permessage-deflate"),
        (["PerMessage-Deflate"], "permessage-deflate"),
        (["permessage-deflate; client_max_window_bits"], "permessage-deflate; client_max_window_bits=12"),
        (["permessage-deflate; client_max_window_bits=10"], "permessage-deflate; client_max_window_bits=10"),
        (['permessage-deflate; client_max_window_bits="15"'], "permessage-deflate; client_max_window_bits=12"),
        (["permessage-deflate; server_max_window_bits=10"], "permessage-deflate; server_max_window_bits=10"),
        (["permessage-deflate; server_max_window_bits=15"], "permessage-deflate; server_max_window_bits=12"),
        (["permessage-deflate; server_max_window_bits=8"], "permessage-deflate; server_max_window_bits=8"),
        (["permessage-deflate; server_no_context_takeover"], "permessage-deflate; server_no_context_takeover"),
        (["permessage-deflate; client_no_context_takeover"], "permessage-deflate; client_no_context_takeover"),
        (
            ["permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
             "server_max_window_bits=9; client_max_window_bits=9"],
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
            "server_max_window_bits=9; client_max_window_bits=9",
        ),
        # Declined offers fall through to the next one, or to none:
        (["permessage-deflate; server_max_window_bits=16, permessage-deflate"], "permessage-deflate"),
        (["permessage-deflate; server_max_window_bits=7"], None),
        (["permessage-deflate; server_max_window_bits"], None),
        (["permessage-deflate; client_max_window_bits=08"], None),
        (["permessage-deflate; unknown_param"], None),
        (["permessage-deflate; server_no_context_takeover; server_no_context_takeover"], None),
        (["permessage-deflate; server_no_context_takeover=1"], None),
        (["x-webkit-deflate-frame", "permessage-deflate; client_no_context_takeover"],
         "permessage-deflate; client_no_context_takeover"),
        (["foo, bar; baz=1"], None),
        ([], None),
    ],
)
def test_negotiation_table(offers, expected):
    assert negotiate(*offers) == (101, expected)


@pytest.mark.parametrize(
    "header",
    [
        "permessage-deflate; client_max_window_bits=\"10",
        "permessage-deflate; =10",
        "perm essage-deflate",
        "permessage-deflate; x=a b",
        "permessage-deflate; client_max_window_bits=\"1 0\"",
    ],
)
def test_malformed_extension_header_is_400(header):
    assert negotiate(header) == (400, None)


def test_server_settings_shape_the_answer():
    settings = wsloop.Deflate(no_context_takeover=True, client_no_context_takeover=True, client_window_bits=9)
    assert negotiate("permessage-deflate; client_max_window_bits", settings=settings) == (
        101,
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits=9",
    )
    with pytest.raises(ValueError):
        wsloop.Deflate(window_bits=8)


def test_compression_off_declines_everything():
    protocol = wsloop.Protocol(compression=None)
    protocol.receive_data(request_bytes(headers={"Sec-WebSocket-Extensions": "permessage-deflate"}))
    list(protocol.events())
    protocol.accept()
    assert b"Sec-WebSocket-Extensions" not in protocol.data_to_send()


# -- round trips ---------------------------------------------------------------


class DeflateClient:
    """The client's half of permessage-deflate, written from RFC 7692 with zlib."""

    def __init__(self, bits=15, no_context=False):
        self.bits, self.no_context = bits, no_context
        self.compressor = zlib.compressobj(wbits=-bits)

    def frames(self, opcode, data, fragment=None):
        if self.no_context:
            self.compressor = zlib.compressobj(wbits=-self.bits)
        body = self.compressor.compress(data) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
        assert body.endswith(b"\x00\x00\xff\xff")
        body = body[:-4]
        if not fragment:
            return client_frame(opcode, body, rsv=4)
        pieces = [body[i : i + fragment] for i in range(0, len(body), fragment)]
        return b"".join(
            client_frame(opcode if i == 0 else 0, piece, fin=i == len(pieces) - 1, rsv=4 if i == 0 else 0)
            for i, piece in enumerate(pieces)
        )


def open_deflate(offer, settings=None, max_size=2**20):
    protocol = wsloop.Protocol(max_size=max_size, compression=settings or wsloop.Deflate())
    protocol.receive_data(request_bytes(headers={"Sec-WebSocket-Extensions": offer}))
    list(protocol.events())
    protocol.accept()
    protocol.data_to_send()
    assert protocol.extension is not None
    return protocol


def inflate_server_messages(protocol, decompressor_factory, no_context):
    decompressor = decompressor_factory()
    out = []
    for fin, opcode, payload, rsv in parse_server_frames(protocol.data_to_send()):
        if rsv & 0x40:
            if no_context:
                decompressor = decompressor_factory()
            payload = decompressor.decompress(payload + b"\x00\x00\xff\xff")
        out.append((opcode, payload))
    return out


@pytest.mark.parametrize(
    "server_nct, client_nct, server_bits, client_bits",
    list(itertools.product([False, True], [False, True], [None, 9, 15], [None, 8, 15])),
)
def test_round_trip_for_every_parameter_combination(server_nct, client_nct, server_bits, client_bits):
    offer = ["permessage-deflate"]
    if server_nct:
        offer.append("server_no_context_takeover")
    if client_nct:
        offer.append("client_no_context_takeover")
    if server_bits:
        offer.append("server_max_window_bits=%d" % server_bits)
    if client_bits:
        offer.append("client_max_window_bits=%d" % client_bits)
    protocol = open_deflate("; ".join(offer))
    client = DeflateClient(bits=max(9, min(client_bits or 15, 12 if client_bits else 15)), no_context=client_nct)
    text = "Ünïcode and repetition " * 200
    blob = bytes(range(256)) * 40
    data = client.frames(TEXT, text.encode()) + client.frames(BINARY, blob, fragment=100)
    data += client.frames(TEXT, text.encode())  # a second time: context (or not) matters
    protocol.receive_data(data)
    assert list(protocol.events()) == [(E.TEXT, text), (E.BINARY, blob), (E.TEXT, text)]
    for message in (text, blob, text, "short"):
        protocol.send(message)
    server_window = min(server_bits or 15, 12)
    messages = inflate_server_messages(
        protocol, lambda: zlib.decompressobj(wbits=-max(server_window, 9)), server_nct
    )
    expected = [(TEXT, text.encode()), (BINARY, blob), (TEXT, text.encode()), (TEXT, b"short")]
    assert messages == expected


def test_small_messages_and_window_8_go_uncompressed():
    protocol = open_deflate("permessage-deflate")
    protocol.send("tiny")
    ((fin, opcode, payload, rsv),) = parse_server_frames(protocol.data_to_send())
    assert (rsv, payload) == (0, b"tiny")
    protocol = open_deflate("permessage-deflate; server_max_window_bits=8")
    protocol.send("x" * 1000)
    ((fin, opcode, payload, rsv),) = parse_server_frames(protocol.data_to_send())
    assert (rsv, payload) == (0, b"x" * 1000)


def test_context_takeover_makes_the_second_copy_cheaper():
    protocol = open_deflate("permessage-deflate")
    message = os.urandom(1000).hex()  # 2,000 characters: within the 4 KiB window
    protocol.send(message)
    protocol.send(message)
    first, second = parse_server_frames(protocol.data_to_send())
    assert len(second[2]) < len(first[2]) / 10


# -- limits and errors -------------------------------------------------------------


def test_inflated_size_is_capped_by_max_size():
    protocol = open_deflate("permessage-deflate", max_size=100000)
    client = DeflateClient()
    protocol.receive_data(client.frames(BINARY, bytes(100000)))
    assert list(protocol.events()) == [(E.BINARY, bytes(100000))]
    protocol.receive_data(client.frames(BINARY, bytes(100001)))
    assert list(protocol.events()) == []
    frames = parse_server_frames(protocol.data_to_send())
    assert frames[-1][1] == CLOSE and frames[-1][2][:2] == (1009).to_bytes(2, "big")


def test_incompressible_message_at_the_limit_still_fits():
    payload = os.urandom(100000)
    protocol = open_deflate("permessage-deflate", max_size=len(payload))
    protocol.receive_data(DeflateClient().frames(BINARY, payload))
    assert list(protocol.events()) == [(E.BINARY, payload)]


@pytest.mark.parametrize(
    "frames, code",
    [
        (client_frame(TEXT, b"a", fin=False) + client_frame(0, b"b", rsv=4), 1002),  # RSV1 on continuation
        (client_frame(PING, b"p", rsv=4), 1002),  # RSV1 on a control frame
        (client_frame(TEXT, b"x", rsv=2), 1002),  # RSV2 is never ours
        (client_frame(BINARY, b"\xff\xff\xff\xff", rsv=4), 1007),  # not deflate
    ],
)
def test_rsv1_misuse_and_bad_deflate(frames, code):
    protocol = open_deflate("permessage-deflate")
    protocol.receive_data(frames)
    list(protocol.events())
    last = parse_server_frames(protocol.data_to_send())[-1]
    assert last[1] == CLOSE and last[2][:2] == code.to_bytes(2, "big")


def test_rsv1_without_negotiation_is_1002():
    protocol = open_deflate("permessage-deflate")  # negotiated here...
    plain = wsloop.Protocol(compression=wsloop.Deflate())
    plain.receive_data(request_bytes())  # ...but not here: no offer
    list(plain.events())
    plain.accept()
    plain.data_to_send()
    plain.receive_data(DeflateClient().frames(TEXT, b"hello"))
    list(plain.events())
    last = parse_server_frames(plain.data_to_send())[-1]
    assert last[1] == CLOSE and last[2][:2] == (1002).to_bytes(2, "big")
    assert protocol.extension is not None and plain.extension is None


# -- over sockets ----------------------------------------------------------------


def test_a_prepared_message_is_compressed_once_for_connections_without_context():
    message = "broadcast me " * 100
    prepared = wsloop.PreparedMessage(message)
    shared = [open_deflate("permessage-deflate; server_no_context_takeover") for _ in range(2)]
    kept = open_deflate("permessage-deflate")
    plain = open_protocol_without_compression()
    # Queued by reference (what a backed-up connection does): the same bytes.
    first, second = (protocol.send(prepared, reference_from=0) for protocol in shared)
    assert first is second
    assert kept.send(prepared, reference_from=0) is not first  # it compresses with its own context
    assert plain.send(prepared, reference_from=0) is not first
    assert len(prepared.frames) == 2  # one compressed frame, one plain
    ((fin, opcode, payload, rsv),) = parse_server_frames(first)
    assert rsv == 0x40  # RSV1: compressed
    assert zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff") == message.encode()


def open_protocol_without_compression():
    protocol = wsloop.Protocol()
    protocol.receive_data(request_bytes())
    list(protocol.events())
    protocol.accept()
    protocol.data_to_send()
    return protocol


def test_echo_and_broadcast_over_the_wire_compress_where_negotiated():
    offer_shared = "permessage-deflate; server_no_context_takeover"
    with running_server(wsloop.Chat()) as server:
        a = Client(server.port, headers={"Sec-WebSocket-Extensions": offer_shared})
        b = Client(server.port, headers={"Sec-WebSocket-Extensions": offer_shared})
        c = Client(server.port)  # no compression
        assert b"server_no_context_takeover" in a.response_head
        message = "broadcast me " * 100
        c.send_text(message)
        for client in (a, b):
            fin, opcode, payload = client.recv_frame()
            assert zlib.decompressobj(wbits=-12).decompress(payload + b"\x00\x00\xff\xff") == message.encode()
        assert c.recv_message() == message
        kept = Client(server.port, headers={"Sec-WebSocket-Extensions": "permessage-deflate"})
        prepared = wsloop.PreparedMessage(message)
        server.broadcast(prepared)  # queued from this thread; read the copies to know it ran
        frames = {client: client.recv_frame() for client in (a, b, kept)}
        assert frames[a] == frames[b]  # the one frame built for both
        assert c.recv_message() == message
        assert len(prepared.frames) == 2  # plain for c, compressed once for a and b


def json_like(size, seed=7692):
    """JSON-ish text of ``size`` bytes that compresses as real messages do."""
    rng = random.Random(seed)
    parts = []
    while sum(map(len, parts)) < size:
        parts.append('{"id": %d, "user": "user%d", "score": %.3f}, '
                     % (rng.randrange(10**6), rng.randrange(5000), rng.random()))
    return "".join(parts)[:size]


def test_a_15_bit_context_takeover_connection_costs_at_most_96_kib_after_64_kib_each_way():
    """What zlib and wsloop allocate per connection (tracemalloc sees zlib's
    state too): the copy of the last window kept for peers that end a
    message with a final block is not kept for those that sync-flush."""
    count = 16
    text = json_like(64 * 2**10)
    compressor = zlib.compressobj(wbits=-15)
    body = compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH)
    frame = client_frame(TEXT, body[:-4], rsv=4)
    with running_server(wsloop.Echo(), ping_interval=None) as server:
        clients = [Client(server.port, headers={"Sec-WebSocket-Extensions": "permessage-deflate"})
                   for _ in range(count)]
        try:
            assert b"client_max_window_bits" not in clients[0].response_head  # a 15-bit window
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for client in clients:
                    client.sock.sendall(frame)
                    fin, opcode, payload = client.recv_frame()
                    assert (fin, opcode) == (True, TEXT)
                    del payload
                per_connection = (tracemalloc.get_traced_memory()[0] - before) / count
            finally:
                tracemalloc.stop()
            assert per_connection <= 96 * 2**10, "%.1f KiB a connection" % (per_connection / 2**10)
        finally:
            for client in clients:
                client.shutdown()


def test_compression_bomb_is_closed_with_1009_and_memory_stays_flat():
    """A few hundred KiB that would inflate to 256 MiB, against a real server process."""
    process = subprocess.Popen(
        [sys.executable, "-m", "wsloop", "--port", "0", "--max-size", "1M", "--log-level", "info"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stderr.readline()
        port = int(re.search(r":(\d+)$", line.strip()).group(1))

        def peak_rss_kib():
            with open("/proc/%d/status" % process.pid) as status:
                return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1))

        client = Client(port, headers={"Sec-WebSocket-Extensions": "permessage-deflate"})
        # Warm up, so the baseline includes zlib's state and the buffers.
        client.sock.sendall(DeflateClient().frames(BINARY, b"warm up " * 100))
        fin, opcode, payload = client.recv_frame()
        assert zlib.decompressobj(wbits=-12).decompress(payload + b"\x00\x00\xff\xff") == b"warm up " * 100
        baseline = peak_rss_kib()
        compressor = zlib.compressobj(wbits=-15)
        bomb = b"".join(compressor.compress(bytes(1 << 20)) for _ in range(256))  # 256 MiB of zeros
        bomb += compressor.flush(zlib.Z_SYNC_FLUSH)[:-4]
        assert len(bomb) < 2 * 2**20
        client.sock.sendall(client_frame(BINARY, bomb, rsv=4))
        assert client.expect_close()[0] == 1009
        assert peak_rss_kib() - baseline < 8 * 1024  # far under the 256 MiB it would inflate to
        other = Client(port, headers={"Sec-WebSocket-Extensions": "permessage-deflate"})
        other.send_text("still serving")
        assert other.recv_message() == "still serving"
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
