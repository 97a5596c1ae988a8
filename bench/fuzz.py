"""Long-running fuzzing of wsloop's parsers: the HTTP handshake and the frame codec.

    python bench/fuzz.py --examples 200000                  # hypothesis, every target
    python bench/fuzz.py --target deflate --minutes 5       # one target, a time budget
    python bench/fuzz.py --engine atheris -- -max_total_time=600   # coverage-guided
    python bench/fuzz.py --replay HEX                       # rerun one reported case

(`pip install hypothesis`; `pip install atheris` for the second engine, where
it installs.)  The short property test over random splits lives in
tests/test_protocol.py (200 examples, valid streams only); this is the long
mode, over hostile bytes, outside the test suite.

A case is one wsloop.Protocol fed bytes in arbitrary pieces, with events()
drained after each piece and every answer it asks for given (accept() an
upgrade, respond() to a plain GET).  Targets:

- server:  a server protocol (permessage-deflate offered) fed raw bytes,
           request-like heads, or a valid request followed by frame-like bytes.
- client:  Protocol(client=True) after request_upgrade(): fed a response-like
           head, or a valid 101 (with or without permessage-deflate) and then
           server-frame-like bytes.
- deflate: a server with permessage-deflate negotiated, fed RSV1 frames with
           random payloads, and real deflate streams (bombs included) against
           a small max_size.

After every piece it checks that nothing raised, that each event is
well-typed and no message is over max_size, that what the protocol queued
(`outgoing`) and what it holds (`_buffer`, the message being assembled, the
inflate window) stay within fixed bounds, and at the end that a CLOSED
protocol wrote a well-formed HTTP response (refused) or a well-formed close
frame (opened), and nothing after it.

Every case has a byte encoding (the atheris input): a failure prints it in
hex, and --replay HEX runs it again with the traceback.
"""

import argparse
import os
import random
import re
import struct
import sys
import time
import traceback
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import wsloop  # noqa: E402

E = wsloop.Event
TARGETS = ("server", "client", "deflate")
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
MAX_SIZES = (125, 1000, 4096, 65536)
# What the protocol may hold between pieces once OPEN: a partial header with
# its mask (14 bytes) plus a partial control frame (125 bytes).
OPEN_BUFFER_BOUND = 14 + 125
OUTPUT_SLACK = 4096  # an HTTP answer, a close frame with its reason


class Violation(AssertionError):
    pass


def check(condition, what):
    if not condition:
        raise Violation(what)


# -- the byte encoding of a case (also what atheris mutates) ------------------
#
#   byte 0: target index; byte 1: max_size index; byte 2: flags (bit 0: the
#   client's 101 negotiates deflate; bit 1: the server refuses the upgrade);
#   then pieces, each a 2-byte big-endian length and that many bytes.


def encode_case(target, size_index, flags, pieces):
    out = bytearray([TARGETS.index(target), size_index, flags])
    for piece in pieces:
        out += struct.pack("!H", len(piece)) + piece
    return bytes(out)


def decode_case(data):
    if len(data) < 3:
        data = bytes(data) + b"\0" * (3 - len(data))
    target = TARGETS[data[0] % len(TARGETS)]
    size_index = data[1] % len(MAX_SIZES)
    flags = data[2]
    pieces, position = [], 3
    while position < len(data):
        length = int.from_bytes(data[position : position + 2], "big")
        position += 2
        pieces.append(bytes(data[position : position + length]))
        position += length
    return target, size_index, flags, pieces


# -- the harness ---------------------------------------------------------------


def request(extensions=True):
    lines = ["GET /chat HTTP/1.1", "Host: localhost", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: " + KEY, "Sec-WebSocket-Version: 13"]
    if extensions:
        lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def switching_response(key, deflate):
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Accept: " + wsloop.accept_key(key)]
    if deflate:
        lines.append("Sec-WebSocket-Extensions: permessage-deflate")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def new_protocol(target, size_index, flags):
    """The protocol under test, and the bytes that bring it to where the pieces go."""
    max_size = MAX_SIZES[size_index]
    compression = wsloop.Deflate()
    if target == "client":
        protocol = wsloop.Protocol(max_size, compression=compression, client=True)
        protocol.request_upgrade("localhost", "/")
        sent = bytes(protocol.outgoing)
        key = re.search(rb"Sec-WebSocket-Key: (\S+)", sent).group(1).decode()
        return protocol, key
    return wsloop.Protocol(max_size, compression=compression), None


def run_case(target, size_index, flags, pieces):
    """Feed the pieces; raise Violation (or whatever the protocol raised)."""
    protocol, key = new_protocol(target, size_index, flags)
    max_size = protocol.max_size
    written = bytearray(protocol.data_to_send())  # the client's request, if any
    prefix = []
    if target == "client" and flags & 4:
        prefix = [switching_response(key, bool(flags & 1))]
    elif target == "deflate":
        prefix = [request(extensions=True)]
    for piece in prefix + list(pieces):
        before = len(written)
        state_before = protocol.state
        protocol.receive_data(piece)
        for kind, value in protocol.events():
            check(isinstance(kind, E), "event kind %r" % (kind,))
            if kind is E.REQUEST:
                if flags & 2:
                    protocol.respond(403, body=b"no\n")
                else:
                    protocol.accept()
            elif kind is E.HTTP_REQUEST:
                protocol.respond(200, body=b"ok\n")
            elif kind is E.TEXT:
                check(type(value) is str, "TEXT value is %s" % type(value).__name__)
                check(len(value.encode("utf-8")) <= max_size, "text message over max_size")
            elif kind is E.BINARY:
                check(type(value) is bytes, "BINARY value is %s" % type(value).__name__)
                check(len(value) <= max_size, "binary message over max_size")
            elif kind in (E.PING, E.PONG):
                check(type(value) is bytes and len(value) <= 125, "control payload %r" % (value,))
            elif kind is E.CLOSE:
                code, reason = value
                check(isinstance(code, int) and isinstance(reason, str), "close value %r" % (value,))
            elif kind is E.RESPONSE:
                check(target == "client" and protocol.state is not wsloop.State.CONNECTING, "stray RESPONSE")
        written += protocol.data_to_send()
        produced = len(written) - before
        # Every answer is bounded by what came in: a pong per ping (a
        # client's pong is masked: 6 bytes for a 2-byte empty ping).
        check(produced <= 3 * len(piece) + OUTPUT_SLACK,
              "wrote %d bytes for a %d-byte piece" % (produced, len(piece)))
        check_bounds(protocol, len(piece))
        if state_before is wsloop.State.CLOSED:
            check(produced == 0, "wrote after CLOSED")
    check_ending(protocol, target, bytes(written))


def check_bounds(protocol, piece_length):
    state = protocol.state
    buffered = len(protocol._buffer)
    if state is wsloop.State.CONNECTING:
        # The head limit is checked while waiting for more: one piece may overshoot.
        check(buffered <= wsloop.MAX_REQUEST_HEAD + piece_length + 8,
              "%d bytes buffered in CONNECTING" % buffered)
    elif state is wsloop.State.CLOSED:
        check(buffered == 0, "%d bytes buffered once CLOSED" % buffered)
    else:
        check(buffered <= OPEN_BUFFER_BOUND, "%d bytes buffered while %s" % (buffered, state.value))
    check(protocol._unbuffered is None, "unbuffered bytes left after events()")
    message = protocol._message_data
    check(message is None or len(message) <= protocol.max_size, "message being assembled over max_size")
    check(protocol._message_inflated <= protocol.max_size, "inflated over max_size")
    extension = protocol.extension
    if extension is not None:
        window = extension._window
        check(window is None or len(window) <= 1 << extension.inflate_bits, "inflate window over its size")
        decompressor = extension._decompressor
        if decompressor is not None:
            check(len(decompressor.unconsumed_tail) == 0 or state is wsloop.State.CLOSED,
                  "compressed input left unconsumed")


def parse_http_response(data):
    head, sep, body = data.partition(b"\r\n\r\n")
    check(sep, "HTTP response without an end of head: %r" % data[:200])
    lines = head.split(b"\r\n")
    check(re.fullmatch(rb"HTTP/1\.1 [1-5]\d\d [\x20-\x7e]*", lines[0]) is not None, "status line %r" % lines[0])
    fields = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        check(colon and re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name) is not None, "header line %r" % line)
        check(re.fullmatch(rb"[\t\x20-\x7e\x80-\xff]*", value) is not None, "header value %r" % line)
        fields[name.lower()] = value.strip()
    return int(lines[0].split()[1]), fields, body


def parse_frames(data, masked):
    """Every frame in data (opcode, payload); a Violation if any is cut or malformed."""
    frames, position = [], 0
    while position < len(data):
        check(len(data) - position >= 2, "truncated frame header")
        first, second = data[position], data[position + 1]
        check(bool(second & 0x80) == masked, "mask bit %d from a %s" % (second >> 7, "client" if masked else "server"))
        check(first & 0x30 == 0, "RSV2/RSV3 set")
        length, position = second & 0x7F, position + 2
        if length == 126:
            length, position = struct.unpack_from("!H", data, position)[0], position + 2
        elif length == 127:
            length, position = struct.unpack_from("!Q", data, position)[0], position + 8
        mask = b""
        if masked:
            mask, position = data[position : position + 4], position + 4
        payload = data[position : position + length]
        check(len(payload) == length, "truncated frame payload")
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frames.append((first & 0x0F, payload))
        position += length
    return frames


def check_ending(protocol, target, written):
    client = target == "client"
    if client:
        written = written[written.index(b"\r\n\r\n") + 4 :]  # our request
    elif protocol.request is not None or protocol.state is wsloop.State.CLOSED:
        if not written:
            check(protocol.state is not wsloop.State.CLOSED or protocol.close_code is not None,
                  "server CLOSED in the handshake without an answer")
            return
        status, fields, body = parse_http_response(written)
        if status != 101:
            check(protocol.state is wsloop.State.CLOSED and not protocol.opened, "%d but not CLOSED" % status)
            if protocol.request is not None and protocol.request.method == "HEAD":
                check(body == b"", "a body in the answer to HEAD")  # RFC 9110 9.3.2
            else:
                check(fields.get(b"content-length") == str(len(body)).encode(), "Content-Length %r for %d bytes"
                      % (fields.get(b"content-length"), len(body)))
            return
        check(protocol.opened, "101 sent but not opened")
        written = written[written.index(b"\r\n\r\n") + 4 :]
    if not protocol.opened:
        check(written == b"", "frames written before the handshake: %r" % written[:100])
        return
    frames = parse_frames(written, masked=client)
    closes = [index for index, (opcode, _) in enumerate(frames) if opcode == 8]
    check(len(closes) <= 1, "%d close frames" % len(closes))
    for opcode, payload in frames:
        check(opcode in (8, 9, 10), "unexpected opcode %d written" % opcode)
        check(len(payload) <= 125, "control frame of %d bytes" % len(payload))
    if closes:
        check(closes[0] == len(frames) - 1, "frames after the close frame")
        payload = frames[-1][1]
        check(len(payload) != 1, "close payload of one byte")
        if payload:
            code = struct.unpack("!H", payload[:2])[0]
            check(wsloop._is_valid_close_code(code), "close code %d on the wire" % code)
            payload[2:].decode("utf-8")
        check(protocol.state in (wsloop.State.CLOSED, wsloop.State.CLOSING), "close sent but %s" % protocol.state)
    if protocol.state is wsloop.State.CLOSED and protocol.close_sent is not None:
        check(closes, "CLOSED with close_sent=%r but no close frame written" % protocol.close_sent)


def replay(data):
    target, size_index, flags, pieces = decode_case(data)
    print("target %s, max_size %d, flags %d, %d pieces:" % (target, MAX_SIZES[size_index], flags, len(pieces)))
    for piece in pieces:
        print("  %r" % piece)
    run_case(target, size_index, flags, pieces)
    print("no violation")


# -- hypothesis strategies ------------------------------------------------------


def strategies():
    from hypothesis import strategies as st

    def frame(draw_masked):
        @st.composite
        def build(draw):
            # Mostly well-formed, so that parsing gets past the first frame.
            fin = draw(st.integers(0, 3)) != 0
            rsv = draw(st.sampled_from([0] * 12 + [4, 4, 2, 1, 7]))
            opcode = draw(st.sampled_from([0, 1, 2, 8, 9, 10] * 3 + [1, 2, 1, 2, 3, 11, 15]))
            payload = draw(st.one_of(
                st.binary(max_size=200),
                st.text(max_size=100).map(lambda text: text.encode("utf-8")),
                st.builds(lambda code, reason: struct.pack("!H", code) + reason,
                          st.integers(0, 65535), st.binary(max_size=10)),
            ))
            declared = len(payload) if draw(st.integers(0, 7)) else draw(st.integers(0, 2**64 - 1))
            masked = draw(st.booleans()) if draw(st.integers(0, 9)) == 0 else draw_masked
            encoding = draw(st.sampled_from(["short", "short", "16", "64"]))
            first = (0x80 if fin else 0) | rsv << 4 | opcode
            mask_bit = 0x80 if masked else 0
            if encoding == "short" and declared < 126:
                header = bytes([first, mask_bit | declared])
            elif encoding != "64" and declared < 65536:
                header = bytes([first, mask_bit | 126]) + struct.pack("!H", declared)
            else:
                header = bytes([first, mask_bit | 127]) + struct.pack("!Q", declared)
            if masked:
                mask = draw(st.binary(min_size=4, max_size=4))
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                header += mask
            return header + payload
        return build()

    header_names = st.sampled_from([
        "Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
        "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol", "Sec-WebSocket-Accept", "Origin",
        "Content-Length", "Transfer-Encoding", "X-Forwarded-For", "Forwarded", "", " Host", "Host ",
    ])
    header_values = st.one_of(
        st.sampled_from([
            "websocket", "Upgrade", "keep-alive, Upgrade", "13", "8", KEY, "x",
            "permessage-deflate", "permessage-deflate; client_max_window_bits",
            "permessage-deflate; server_max_window_bits=8", "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            'permessage-deflate; server_max_window_bits="10"', "permessage-deflate, x-webkit-deflate-frame",
            "chat, superchat", "101", "-1", "1" * 30,
        ]),
        st.text(max_size=40),
    )
    header = st.builds(lambda name, sep, value: (name + sep + value).encode("utf-8", "surrogatepass"),
                       header_names, st.sampled_from([": ", ":", " : ", ":\t"]), header_values)
    line_end = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""])

    @st.composite
    def head(draw, response):
        if response:
            first = draw(st.sampled_from([b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 403 Forbidden",
                                          b"HTTP/1.0 101 OK", b"HTTP/1.1 101", b"HTTP/1.1 1011 x", b"HTTP/2 101 x",
                                          b"HTTP/1.1 200 OK", b"HTTP/1.1 abc OK"]))
        else:
            first = draw(st.sampled_from([b"GET / HTTP/1.1", b"GET /chat?x=1 HTTP/1.1", b"HEAD / HTTP/1.1",
                                          b"POST / HTTP/1.1", b"GET / HTTP/1.0", b"GET  / HTTP/1.1",
                                          b"GET http://x/ HTTP/1.1", b"GET * HTTP/1.1", b"GET / HTTP/9.9",
                                          b"GET /healthz HTTP/1.1"]))
        lines = [first] + draw(st.lists(header, max_size=12))
        out = b""
        for line in lines:
            out += line + draw(line_end)
        out += draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b""]))
        return out + draw(st.binary(max_size=64))

    def with_noise(strategy):
        # Now and then flip a byte, cut, or splice random bytes in.
        @st.composite
        def build(draw):
            data = bytearray(draw(strategy))
            for _ in range(draw(st.integers(0, 2))):
                if not data:
                    break
                index = draw(st.integers(0, len(data) - 1))
                action = draw(st.integers(0, 2))
                if action == 0:
                    data[index] = draw(st.integers(0, 255))
                elif action == 1:
                    del data[index:]
                else:
                    data[index:index] = draw(st.binary(min_size=1, max_size=8))
            return bytes(data)
        return build()

    @st.composite
    def deflate_payloads(draw):
        """RSV1 data frames whose payloads are random bytes or real deflate streams."""
        kind = draw(st.integers(0, 3))
        if kind == 0:
            body = draw(st.binary(max_size=300))
        else:
            if kind == 1:
                plain = draw(st.binary(max_size=2000))
            elif kind == 2:  # a bomb: highly compressible, far over max_size
                plain = bytes([draw(st.integers(0, 255))]) * draw(st.integers(1000, 300000))
            else:
                plain = draw(st.text(max_size=500)).encode("utf-8") * draw(st.integers(1, 50))
            wbits = draw(st.sampled_from([-15, -9, -12, 15, 31]))  # zlib and gzip wrappers too
            compressor = zlib.compressobj(draw(st.integers(0, 9)), zlib.DEFLATED, wbits)
            flush = draw(st.sampled_from([zlib.Z_SYNC_FLUSH, zlib.Z_FULL_FLUSH, zlib.Z_FINISH]))
            body = compressor.compress(plain) + compressor.flush(flush)
            if draw(st.booleans()) and body.endswith(b"\x00\x00\xff\xff"):
                body = body[:-4]
        pieces = [body]
        cuts = draw(st.lists(st.integers(0, len(body)), max_size=3))
        if cuts:
            points = sorted(set(cuts))
            pieces = [body[a:b] for a, b in zip([0] + points, points + [len(body)])]
        opcode = draw(st.sampled_from([1, 2, 2, 0, 9]))
        frames = b""
        mask = draw(st.binary(min_size=4, max_size=4))
        for index, piece in enumerate(pieces):
            first = (0x80 if index == len(pieces) - 1 else 0) | (opcode if index == 0 else 0)
            if index == 0 or draw(st.integers(0, 9)) == 0:
                first |= 0x40  # RSV1 on the first frame (and, wrongly, on some others)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(piece))
            if len(piece) < 126:
                frames += bytes([first, 0x80 | len(piece)]) + mask + masked
            elif len(piece) < 65536:
                frames += bytes([first, 0xFE]) + struct.pack("!H", len(piece)) + mask + masked
            else:
                frames += bytes([first, 0xFF]) + struct.pack("!Q", len(piece)) + mask + masked
        return frames

    def split(stream):
        @st.composite
        def build(draw):
            data = draw(stream)
            cuts = draw(st.lists(st.integers(0, max(0, len(data))), max_size=16))
            points = sorted(set(cuts))
            return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
        return build()

    frames_server = st.lists(st.one_of(frame(True), frame(True), frame(True), st.binary(max_size=12)),
                             max_size=10).map(b"".join)
    frames_client = st.lists(st.one_of(frame(False), frame(False), frame(False), st.binary(max_size=12)),
                             max_size=10).map(b"".join)
    server_stream = st.one_of(
        st.binary(max_size=400),
        with_noise(head(False)),
        st.builds(lambda frames: request(extensions=True) + frames, with_noise(frames_server)),
        st.builds(lambda frames: request(extensions=False) + frames, frames_server),
    )
    client_stream = st.one_of(
        st.binary(max_size=400),
        with_noise(head(True)),
        with_noise(frames_client),  # after the valid 101 of flag 4
    )
    deflate_stream = st.lists(st.one_of(deflate_payloads(), deflate_payloads(), frame(True)), min_size=1,
                              max_size=6).map(b"".join)
    return {
        "server": split(server_stream),
        "client": split(client_stream),
        "deflate": split(deflate_stream),
    }


def run_hypothesis(targets, examples, minutes, seed, batch=2000):
    """Run each target in batches of fresh random examples (a new seed each),
    until --examples or its share of --minutes is spent."""
    from hypothesis import HealthCheck, Phase, given, settings, seed as hypothesis_seed
    from hypothesis import strategies as st

    pieces_for = strategies()
    found = []
    seeds = random.Random(seed)
    for target in targets:
        share = None if minutes is None else minutes * 60 / len(targets)
        started = time.monotonic()
        failure = {}

        @settings(max_examples=batch, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.generate, Phase.shrink], report_multiple_bugs=False)
        @given(size_index=st.integers(0, len(MAX_SIZES) - 1), flags=st.integers(0, 7),
               pieces=pieces_for[target], data=st.data())
        def case(size_index, flags, pieces, data):
            if target == "client" and data.draw(st.integers(0, 3)) != 0:
                flags |= 4  # mostly after a valid 101, so the frame parser is reached
            try:
                run_case(target, size_index, flags, pieces)
            except Exception:
                failure["blob"] = encode_case(target, size_index, flags, pieces)  # the last: the shrunk one
                raise

        print("%s: up to %d examples%s ..." % (target, examples, "" if share is None else ", %.1f min" % (share / 60)),
              flush=True)
        done = 0
        try:
            while done < examples and (share is None or time.monotonic() - started < share):
                hypothesis_seed(seeds.getrandbits(64))(case)()
                done += min(batch, examples - done)
            print("%s: %d examples in %.0f s, no violation" % (target, done, time.monotonic() - started), flush=True)
        except Exception:
            traceback.print_exc()
            print("%s: FAILED within %d examples; reproduce with:" % (target, done + batch))
            if "blob" in failure:
                print("  python bench/fuzz.py --replay %s" % failure["blob"].hex(), flush=True)
            found.append(target)
    return found


def run_atheris(targets, argv):
    import atheris

    def one_input(data):
        target, size_index, flags, pieces = decode_case(data)
        if target not in targets:
            target = targets[data[0] % len(targets)] if data else targets[0]
        try:
            run_case(target, size_index, flags, pieces)
        except Exception:
            sys.stderr.write("reproduce with: python bench/fuzz.py --replay %s\n" %
                             encode_case(target, size_index, flags, pieces).hex())
            raise

    atheris.instrument_all()  # wsloop is imported already: instrument what is loaded
    atheris.Setup([sys.argv[0]] + argv, one_input)
    atheris.Fuzz()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis")
    parser.add_argument("--target", choices=TARGETS + ("all",), default="all")
    parser.add_argument("--examples", type=int, default=200000, help="hypothesis examples per target")
    parser.add_argument("--minutes", type=float, help="time budget for all targets (hypothesis)")
    parser.add_argument("--seed", type=int, help="hypothesis seed, for a repeatable run")
    parser.add_argument("--replay", metavar="HEX", help="run one encoded case and show what it raises")
    parser.add_argument("engine_args", nargs="*", help="after --: arguments for libFuzzer (atheris)")
    args = parser.parse_args()
    if args.replay:
        replay(bytes.fromhex(args.replay))
        return 0
    targets = list(TARGETS) if args.target == "all" else [args.target]
    print("wsloop %s (C helper %s), Python %s" % (wsloop.__version__, "on" if wsloop.ACCELERATED else "off",
                                                   sys.version.split()[0]), flush=True)
    if args.engine == "atheris":
        run_atheris(targets, args.engine_args)
        return 0
    found = run_hypothesis(targets, args.examples, args.minutes, args.seed)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
