"""Frames and messages fed as bytes to the socket-free protocol (RFC 6455 5-7)."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wsloop
from helpers import client_frame, close_payload, parse_server_frames, request_bytes

TEXT, BINARY, CLOSE, PING, PONG = 1, 2, 8, 9, 10
E = wsloop.Event


def open_protocol(**options):
    protocol = wsloop.Protocol(**options)
    protocol.receive_data(request_bytes())
    assert next(protocol.events())[0] is E.REQUEST
    protocol.accept()
    protocol.data_to_send()
    return protocol


def run(protocol, data):
    protocol.receive_data(data)
    return list(protocol.events())


def sent_frames(protocol):
    return [(opcode, payload) for _, opcode, payload, _ in parse_server_frames(protocol.data_to_send())]


def closed_with(protocol, code):
    frames = sent_frames(protocol)
    assert frames and frames[-1][0] == CLOSE, frames
    assert struct.unpack("!H", frames[-1][1][:2])[0] == code
    assert protocol.state is wsloop.State.CLOSED


# -- messages -----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200000])
def test_binary_lengths_7_16_and_64_bit(size):
    protocol = open_protocol()
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert run(protocol, client_frame(BINARY, payload)) == [(E.BINARY, payload)]


def test_text_is_str_binary_is_bytes():
    protocol = open_protocol()
    events = run(protocol, client_frame(TEXT, "héllo ✓") + client_frame(BINARY, b"\x00\xff"))
    assert events == [(E.TEXT, "héllo ✓"), (E.BINARY, b"\x00\xff")]


def test_fragmented_message_with_interleaved_ping():
    protocol = open_protocol()
    data = (
        client_frame(TEXT, "frag", fin=False)
        + client_frame(PING, b"are you there")
        + client_frame(0, "ment", fin=False)
        + client_frame(0, "ed", fin=True)
    )
    events = run(protocol, data)
    assert events == [(E.PING, b"are you there"), (E.TEXT, "fragmented")]
    assert sent_frames(protocol) == [(PONG, b"are you there")]


def test_unsolicited_pong_is_reported_and_not_answered():
    protocol = open_protocol()
    assert run(protocol, client_frame(PONG, b"x")) == [(E.PONG, b"x")]
    assert protocol.data_to_send() == b""


def test_payload_split_inside_a_frame_is_reassembled():
    protocol = open_protocol()
    frame = client_frame(TEXT, "ça marche " * 50)
    events = []
    for i in range(0, len(frame), 7):
        events += run(protocol, frame[i : i + 7])
    assert events == [(E.TEXT, "ça marche " * 50)]


# -- every split of a stream gives the same events ---------------------------

messages = st.lists(
    st.one_of(
        st.tuples(st.just(TEXT), st.text(max_size=300)),
        st.tuples(st.just(BINARY), st.binary(max_size=300)),
        st.tuples(st.just(PING), st.binary(max_size=125)),
    ),
    max_size=8,
)


def encode_stream(items, fragment_size):
    out = b""
    expected = []
    for opcode, value in items:
        payload = value.encode("utf-8") if isinstance(value, str) else value
        if opcode == PING:
            out += client_frame(PING, payload)
            expected.append((E.PING, payload))
            continue
        pieces = [payload[i : i + fragment_size] for i in range(0, len(payload), fragment_size)] or [b""]
        for index, piece in enumerate(pieces):
            out += client_frame(opcode if index == 0 else 0, piece, fin=index == len(pieces) - 1)
        expected.append((E.TEXT if opcode == TEXT else E.BINARY, value))
    return out, expected


@settings(max_examples=200, deadline=None)
@given(items=messages, fragment_size=st.integers(1, 400), cuts=st.lists(st.integers(0, 5000), max_size=12))
def test_any_split_yields_the_same_events(items, fragment_size, cuts):
    stream, expected = encode_stream(items, fragment_size)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    protocol = open_protocol()
    events = []
    start = 0
    for point in points + [len(stream)]:
        events += run(protocol, stream[start:point])
        start = point
    assert events == expected
    assert protocol.state is wsloop.State.OPEN


def test_every_byte_by_byte_split_of_a_mixed_stream():
    stream, expected = encode_stream([(TEXT, "añb" * 20), (PING, b"p"), (BINARY, bytes(300))], 50)
    protocol = open_protocol()
    events = []
    for i in range(len(stream)):
        events += run(protocol, stream[i : i + 1])
    assert events == expected
    for cut in range(len(stream) + 1):
        protocol = open_protocol()
        assert run(protocol, stream[:cut]) + run(protocol, stream[cut:]) == expected


# -- a message in pieces: small pieces gathered, large ones kept whole ------


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_pieces_either_side_of_the_whole_piece_size_join_in_order(opcode):
    """Pieces from wsloop._WHOLE_PIECE up are kept as they are and small ones
    gathered; any mix must join back in order (text split mid-character
    too)."""
    limit = wsloop._WHOLE_PIECE
    sizes = [10, limit, 3, limit - 1, limit + 1, 1, 2 * limit, 7]  # the rest is the last piece
    whole = ("ça✓" * 6000).encode("utf-8") if opcode == TEXT else bytes(range(256)) * 100
    cuts = [sum(sizes[:n]) for n in range(len(sizes) + 1)] + [len(whole)]
    pieces = [whole[a:b] for a, b in zip(cuts, cuts[1:])]
    frames = [client_frame(0 if n else opcode, piece, fin=n == len(pieces) - 1) for n, piece in enumerate(pieces)]
    protocol = open_protocol()
    events = []
    for frame in frames:
        events += run(protocol, frame)
    expected = whole.decode("utf-8") if opcode == TEXT else whole
    assert events == [(E.TEXT if opcode == TEXT else E.BINARY, expected)]


# -- whole_message(): the one-step shortcut for one short message -----------


def full_path(protocol, data):
    """What receive_data() and events() make of ``data``."""
    protocol.receive_data(data)
    return list(protocol.events())


@given(
    opcode=st.sampled_from([TEXT, BINARY]),
    payload=st.one_of(st.text(max_size=30), st.binary(max_size=125)),
    mask=st.binary(min_size=4, max_size=4),
)
@settings(max_examples=300, deadline=None)
def test_whole_message_gives_what_the_full_path_gives(opcode, payload, mask):
    data = client_frame(opcode, payload, mask=mask)
    event = open_protocol().whole_message(data)
    expected = full_path(open_protocol(), data)
    if event is None:
        # Only a text payload that is not valid UTF-8 is left to the full path.
        assert opcode == TEXT and expected == [] and not isinstance(payload, str)
    else:
        assert [event] == expected


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(client_frame(TEXT, "part", fin=False), id="not-final"),
        pytest.param(client_frame(PING, b"x"), id="control"),
        pytest.param(client_frame(TEXT, b"x", rsv=4), id="compressed-bit"),
        pytest.param(client_frame(BINARY, b"x" * 126), id="16-bit-length"),
        pytest.param(client_frame(TEXT, "a") + client_frame(TEXT, "b"), id="two-frames"),
        pytest.param(client_frame(TEXT, "abc")[:-1], id="incomplete"),
        pytest.param(client_frame(TEXT, b"\xff"), id="invalid-utf8"),
        pytest.param(client_frame(TEXT, "abc", masked=False), id="unmasked"),
    ],
)
def test_whole_message_takes_nothing_it_does_not_recognise(data):
    protocol, untouched = open_protocol(), open_protocol()
    assert protocol.whole_message(data) is None
    # Nothing was taken: the full path then sees every byte, as it does on
    # a protocol never asked.
    assert full_path(protocol, data) == full_path(untouched, data)
    assert protocol.data_to_send() == untouched.data_to_send()
    assert protocol.state is untouched.state


def test_whole_message_leaves_a_message_in_progress_to_the_full_path():
    protocol = open_protocol()
    assert run(protocol, client_frame(TEXT, "frag", fin=False)) == []
    data = client_frame(0, "ment")
    assert protocol.whole_message(data) is None
    assert run(protocol, data) == [(E.TEXT, "fragment")]


def test_whole_message_leaves_buffered_bytes_first():
    protocol = open_protocol()
    first = client_frame(TEXT, "first")
    assert run(protocol, first[:3]) == []  # a frame's start, kept
    assert protocol.whole_message(client_frame(TEXT, "second")) is None
    assert run(protocol, first[3:] + client_frame(TEXT, "second")) == [(E.TEXT, "first"), (E.TEXT, "second")]


def test_whole_message_holds_max_size():
    protocol = open_protocol(max_size=4)
    data = client_frame(BINARY, b"12345")
    assert protocol.whole_message(data) is None
    assert run(protocol, data) == []
    closed_with(protocol, 1009)


def test_whole_message_only_while_open():
    protocol = wsloop.Protocol()
    assert protocol.whole_message(client_frame(TEXT, "early")) is None  # still connecting
    protocol = open_protocol()
    protocol.close()
    assert protocol.whole_message(client_frame(TEXT, "late")) is None  # closing: nothing delivered


# -- protocol errors get the right close code --------------------------------


@pytest.mark.parametrize(
    "data, code",
    [
        (client_frame(TEXT, "x", masked=False), 1002),
        (client_frame(TEXT, "x", rsv=1), 1002),
        (client_frame(TEXT, "x", rsv=4), 1002),
        (client_frame(3, b"x"), 1002),
        (client_frame(11, b"x"), 1002),
        (client_frame(PING, b"x" * 126), 1002),
        (client_frame(PING, b"x", fin=False), 1002),
        (client_frame(0, b"x"), 1002),
        (client_frame(TEXT, "a", fin=False) + client_frame(TEXT, "b"), 1002),
        (client_frame(BINARY, b"", length=1 << 63)[:10], 1002),
        (client_frame(TEXT, b"\xff"), 1007),
        (client_frame(TEXT, b"\xce\xba\xe1\xbd\xb9\xed\xa0\x80"), 1007),  # a surrogate
        (client_frame(TEXT, "a", fin=False) + client_frame(0, b"\xc3", fin=True), 1007),  # cut short
        (client_frame(CLOSE, b"\x03"), 1002),
        (client_frame(CLOSE, close_payload(1005)), 1002),
        (client_frame(CLOSE, close_payload(999)), 1002),
        (client_frame(CLOSE, close_payload(1015)), 1002),
        (client_frame(CLOSE, close_payload(5000)), 1002),
        (client_frame(CLOSE, close_payload(1000, b"\xff")), 1007),
    ],
)
def test_violations_fail_with_the_right_code(data, code):
    protocol = open_protocol()
    assert run(protocol, data) == []  # no event: the bad frame is refused outright
    closed_with(protocol, code)
    # After failing, nothing more is delivered or sent.
    assert run(protocol, client_frame(TEXT, "late")) == []
    assert protocol.data_to_send() == b""


def test_invalid_utf8_fails_before_the_frame_is_complete():
    protocol = open_protocol()
    frame = client_frame(TEXT, b"valid start \xf4\x90\x80\x80 and more that has not arrived")
    run(protocol, frame[:20])
    closed_with(protocol, 1007)


def test_valid_message_before_a_bad_frame_is_delivered_first():
    protocol = open_protocol()
    protocol.receive_data(client_frame(TEXT, "ok") + client_frame(TEXT, "x", rsv=2))
    events = protocol.events()
    assert next(events) == (E.TEXT, "ok")
    protocol.send("ok")  # the application's reply, queued before the failure
    assert list(events) == []
    frames = sent_frames(protocol)
    assert frames[0] == (TEXT, b"ok")
    assert frames[1][0] == CLOSE and frames[1][1][:2] == b"\x03\xea"


# -- limits -------------------------------------------------------------------


def test_max_size_is_checked_from_the_header_alone():
    protocol = open_protocol(max_size=1000)
    assert run(protocol, client_frame(BINARY, bytes(1000))) == [(E.BINARY, bytes(1000))]
    header_only = client_frame(BINARY, bytes(1001))[:8]
    assert run(protocol, header_only) == []
    closed_with(protocol, 1009)


def test_max_size_counts_across_fragments():
    protocol = open_protocol(max_size=1000)
    run(protocol, client_frame(BINARY, bytes(600), fin=False))
    assert protocol.state is wsloop.State.OPEN
    run(protocol, client_frame(0, bytes(401), fin=True)[:8])
    closed_with(protocol, 1009)


def test_fragment_cap():
    protocol = open_protocol(max_fragments=10)
    ten = client_frame(TEXT, "a", fin=False) + client_frame(0, "b", fin=False) * 8 + client_frame(0, "c")
    assert run(protocol, ten) == [(E.TEXT, "a" + "b" * 8 + "c")]
    run(protocol, client_frame(TEXT, "a", fin=False) + client_frame(0, b"", fin=False) * 10)
    closed_with(protocol, 1009)


def test_default_fragment_cap_follows_max_size():
    assert wsloop.Protocol().max_fragments == 16384
    assert wsloop.Protocol(max_size=32 * 2**20).max_fragments == 2**19


# -- closing ------------------------------------------------------------------


def test_peer_close_is_echoed_and_closes():
    protocol = open_protocol()
    events = run(protocol, client_frame(CLOSE, close_payload(1001, b"bye")))
    assert events == [(E.CLOSE, (1001, "bye"))]
    assert sent_frames(protocol) == [(CLOSE, b"\x03\xe9")]
    assert protocol.state is wsloop.State.CLOSED
    assert (protocol.close_code, protocol.close_reason) == (1001, "bye")


def test_empty_close_is_answered_with_empty_close():
    protocol = open_protocol()
    assert run(protocol, client_frame(CLOSE)) == [(E.CLOSE, (1005, ""))]
    assert sent_frames(protocol) == [(CLOSE, b"")]


def test_our_close_waits_for_the_peer_and_delivers_nothing_meanwhile():
    protocol = open_protocol()
    protocol.close(1000, "done")
    assert sent_frames(protocol) == [(CLOSE, b"\x03\xe8done")]
    assert protocol.state is wsloop.State.CLOSING
    events = run(protocol, client_frame(TEXT, "late") + client_frame(PING, b"p") + client_frame(CLOSE, close_payload(1000)))
    assert events == [(E.PING, b"p"), (E.CLOSE, (1000, ""))]
    assert protocol.data_to_send() == b""  # no pong, no second close
    assert protocol.state is wsloop.State.CLOSED
    with pytest.raises(wsloop.ConnectionClosed):
        protocol.send("too late")


def test_close_arguments_are_checked():
    protocol = open_protocol()
    with pytest.raises(ValueError):
        protocol.close(1005)
    with pytest.raises(ValueError):
        protocol.close(1000, "x" * 124)
    protocol.close(4000, "x" * 123)
    assert protocol.state is wsloop.State.CLOSING


def test_control_and_close_limits_have_their_own_names():
    assert wsloop.MAX_CONTROL_PAYLOAD == 125  # RFC 6455 5.5
    assert wsloop.MAX_CLOSE_REASON == 123  # the 2-byte code takes the rest
    protocol = open_protocol()
    with pytest.raises(ValueError, match="ping payload over 125 bytes"):
        protocol.ping(b"p" * (wsloop.MAX_CONTROL_PAYLOAD + 1))
    protocol.ping(b"p" * wsloop.MAX_CONTROL_PAYLOAD)
    with pytest.raises(ValueError, match="close reason over 123 bytes"):
        protocol.close(1000, "r" * (wsloop.MAX_CLOSE_REASON + 1))
    assert run(protocol, client_frame(PING, b"x" * (wsloop.MAX_CONTROL_PAYLOAD + 1))) == []
    closed_with(protocol, 1002)


@pytest.mark.parametrize("size, header", [(125, 2), (126, 4), (65535, 4), (65536, 10)])
def test_each_length_field_holds_up_to_its_maximum(size, header):
    frame = wsloop.encode_frame(BINARY, bytes(size))
    assert len(frame) - size == header


def test_send_frames_every_message_here_and_checks_it_once():
    protocol = open_protocol()
    protocol.send("text")
    protocol.send(b"bytes")
    protocol.send(bytearray(b"array"))
    protocol.send(wsloop.PreparedMessage("prepared"))
    assert sent_frames(protocol) == [(TEXT, b"text"), (BINARY, b"bytes"), (BINARY, b"array"), (TEXT, b"prepared")]
    with pytest.raises(TypeError, match="message must be str or bytes, not int"):
        protocol.check_send(42)
    with pytest.raises(TypeError, match="not int"):
        protocol.send(42)
    assert protocol.data_to_send() == b""
    protocol.close()
    with pytest.raises(wsloop.ConnectionClosed):
        protocol.check_send("late")
    with pytest.raises(wsloop.ConnectionClosed):
        protocol.send(wsloop.PreparedMessage("late"))


@pytest.mark.parametrize("size", [16 * 2**10, 256 * 2**10])
def test_a_large_payload_is_handed_back_not_joined_to_its_header(size):
    protocol = open_protocol()
    payload = bytes(size)
    chunk = protocol.send(payload, reference_from=2**14)
    assert chunk is payload  # no copy: the caller queues it after the header
    assert parse_server_frames(protocol.data_to_send() + chunk) == [(True, BINARY, payload, 0)]
    assert protocol.send(b"small", reference_from=2**14) is None  # copied into outgoing
    assert protocol.send(payload) is None  # by default everything goes to outgoing
    assert sent_frames(protocol) == [(BINARY, b"small"), (BINARY, payload)]


def test_a_prepared_frame_is_built_once_and_shared():
    prepared = wsloop.PreparedMessage(b"x" * 100)
    first, second = open_protocol(), open_protocol()
    chunk = first.send(prepared, reference_from=0)  # a backed-up connection queues frames by reference
    assert second.send(prepared, reference_from=0) is chunk
    assert parse_server_frames(chunk) == [(True, BINARY, b"x" * 100, 0)]
    second.send(prepared)  # copied where nothing backs up
    assert sent_frames(second) == [(BINARY, b"x" * 100)]


def test_eof_without_close_is_abnormal():
    protocol = open_protocol()
    protocol.receive_eof()
    assert protocol.close_code == 1006
    assert protocol.state is wsloop.State.CLOSED


def test_frame_encoding_lengths():
    for size in (0, 125, 126, 65535, 65536):
        frame = wsloop.encode_message(bytes(size))
        ((fin, opcode, payload, rsv),) = parse_server_frames(frame)
        assert (fin, opcode, payload, rsv) == (True, BINARY, bytes(size), 0)
    with pytest.raises(TypeError):
        wsloop.encode_message(42)
