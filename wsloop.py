"""wsloop: a single-file, dependency-free WebSocket server (RFC 6455, RFC 7692).

One thread multiplexes every socket with :mod:`selectors`.  Each connection is
a small state machine fed by incremental byte buffers, so frames may arrive
split at any byte, and nothing a client sends can make the server grow its
memory without bound or stall the other connections.

Two ways to use it
------------------
Run it::

    python wsloop.py --port 8765               # echo every message back
    python wsloop.py --port 8765 --broadcast   # chat: everyone gets everything
    python wsloop.py --port 8765 --app mymodule:handler

Or copy this file into a project and write a handler::

    import wsloop

    class Greeter(wsloop.Handler):
        def on_connect(self, conn):
            conn.send("hello " + conn.path)

        def on_message(self, conn, message):
            conn.send(message.upper() if isinstance(message, str) else message)

    wsloop.serve(Greeter(), port=8765)

Limits and their defaults (all configurable on :class:`Server` and the CLI)
---------------------------------------------------------------------------
- ``max_size`` 1 MiB: largest incoming message (close code 1009); ``None``
  for no limit, at your own risk: a peer may then make the process hold
  any amount of memory.
- ``max_fragments``: most frames in one message, ``max(1024, max_size // 64)``.
- ``open_timeout`` 10 s: to complete the opening handshake.
- ``close_timeout`` 10 s: to complete the closing handshake (it bounds the
  whole end of a connection, drained or not).
- ``ping_interval`` 20 s / ``ping_timeout`` 20 s: keepalive (close code 1011).
- ``write_high_water`` 256 KiB: stop reading a peer whose output backs up.
- ``max_pending_output`` 4 MiB: close (1008) a peer that cannot keep up
  with what the server pushes to it.
- ``max_total_pending`` a quarter of physical memory: the output held for
  all peers (a frame shared by many counted once); past it the peers with
  the most pending are closed (1008).
- ``compression``: permessage-deflate (RFC 7692) on, 12-bit windows
  (see :class:`Deflate`); inflated messages obey ``max_size`` too.
- Request head: lines of 8 KiB at most, 128 headers, 64 KiB in all.

Threads: the thread that runs the loop owns every connection and the
server's tables; other threads only go through its one door (a queue that
wakes the loop).  Every public method of :class:`Connection` and
:class:`Server` may be called from any thread: it checks its arguments in
the caller's thread, then acts at once in the loop's thread or queues the
work through the door.  Handlers are plain functions, run on the loop's
thread one at a time.

Unmasking client data is the one hot spot pure Python cannot make fast; an
optional C helper (``_wsloop_speedups``, built by ``pip install`` when a
compiler is there) is used when importable (``wsloop.ACCELERATED``).

Also: wss:// with an ``ssl.SSLContext`` (the TLS handshake runs in the loop),
a handshake hook (``Handler.on_handshake``), an Origin allow-list,
subprotocols, and plain HTTP answers on the same port (a health check, pages).

Beyond one process: topics (``conn.subscribe``, ``server.publish``),
``--workers N`` on one port, and a Redis pub/sub bridge (:class:`RedisBroker`)
spoken from the same loop.  And a client: :func:`connect`,
:func:`reconnecting` (connections again and again, with back-off), and
``python wsloop.py --connect URL``.

The file is layered top to bottom, the code of each section using only
those above it (a type annotation may name a class further down: the
handler's methods are given a Connection): constants, helpers (and
Headers), exceptions, the HTTP handshake, permessage-deflate, the frame
codec, the socket-free protocol (server and client roles), the selectors
loop, history, the Redis bridge, handlers and options, admission, the
connection, listening, the server, serving and signals, the client and the
CLI.  Each section's banner says what it owns.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import collections
import enum
import errno
import hashlib
import heapq
import importlib
import inspect
import ipaddress
import itertools
import json
import logging
import os
import random
import selectors
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
import typing
from typing import (
    Any, Callable, Deque, Dict, FrozenSet, Generator, Iterable, Iterator, List, NoReturn, Optional,
    Set, Tuple, Union,
)

__version__ = "0.1.0"
__all__ = [
    "ClientConnection",
    "CloseCode",
    "Connection",
    "ConnectionClosed",
    "Deflate",
    "Echo",
    "Chat",
    "Event",
    "Handler",
    "HandshakeError",
    "Headers",
    "InvalidResponse",
    "InvalidState",
    "InvalidUpgrade",
    "Opcode",
    "PreparedMessage",
    "Protocol",
    "ProtocolError",
    "RedisBroker",
    "Request",
    "Response",
    "Server",
    "State",
    "WebSocketError",
    "accept_key",
    "connect",
    "encode_frame",
    "encode_message",
    "reconnecting",
    "redis_shard",
    "serve",
]

logger = logging.getLogger("wsloop")
# One line per handshake answered, on a logger of its own so that it can be
# silenced alone: logging.getLogger("wsloop.access").setLevel(logging.WARNING).
access_logger = logging.getLogger("wsloop.access")


# =============================================================================
# Constants
# =============================================================================


class Opcode(enum.IntEnum):
    """Frame opcodes (RFC 6455 section 5.2)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    """Close status codes (RFC 6455 section 7.4 and the IANA registry)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never on the wire: "the close frame had no code"
    ABNORMAL = 1006  # never on the wire: "no close frame at all"
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


class State(enum.Enum):
    """Where a connection is in its life (RFC 6455 sections 4 and 7)."""

    CONNECTING = "connecting"  # waiting for (or deciding on) the HTTP request
    OPEN = "open"  # messages flow both ways
    CLOSING = "closing"  # we sent a close frame and wait for the peer's
    CLOSED = "closed"  # close handshake done, failed, or request rejected


class Event(enum.IntEnum):
    """Kinds of events :meth:`Protocol.events` yields as ``(kind, value)``."""

    REQUEST = 0  # value: Request, a valid upgrade: answer with accept() or respond()
    HTTP_REQUEST = 3  # value: Request, a plain HTTP GET: answer with respond()
    RESPONSE = 4  # client: value: Response, the server's valid 101; now OPEN
    TEXT = 1  # value: str
    BINARY = 2  # value: bytes
    PING = 9  # value: bytes (the pong is already queued)
    PONG = 10  # value: bytes
    CLOSE = 8  # value: (code, reason) from the peer's close frame


MASK_LENGTH = 4  # the masking key every client frame carries (RFC 6455 5.3)
# RFC 6455 5.5: a control frame's payload is at most 125 bytes, and a close
# frame's starts with its 2-byte code, which leaves 123 for the reason.
MAX_CONTROL_PAYLOAD = 125
MAX_CLOSE_REASON = MAX_CONTROL_PAYLOAD - 2

# RFC 6455 section 1.3: the fixed GUID mixed into Sec-WebSocket-Accept.
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

DEFAULT_MAX_SIZE = 2**20
# max_size=None: no limit, as a number that every size check can compare
# with, and that zlib's max_length (a C ssize_t) still takes plus one.
_UNLIMITED_SIZE = 2**62
DEFAULT_OPEN_TIMEOUT = 10.0
DEFAULT_CLOSE_TIMEOUT = 10.0
DEFAULT_PING_INTERVAL = 20.0
DEFAULT_PING_TIMEOUT = 20.0
DEFAULT_WRITE_HIGH_WATER = 256 * 2**10
DEFAULT_MAX_PENDING_OUTPUT = 4 * 2**20

MAX_REQUEST_LINE = 8 * 2**10
MAX_HEADER_LINE = 8 * 2**10
MAX_HEADERS = 128
MAX_REQUEST_HEAD = 64 * 2**10

# Bytes asked of the kernel per readable event: large enough to swallow many
# small frames at once, small enough that one busy peer cannot hog the loop.
RECV_SIZE = 256 * 2**10

# Close codes a peer may put on the wire (RFC 6455 section 7.4.1 and 7.4.2):
# the registered ones below 3000 except 1004-1006 and 1015, and 3000-4999.
_VALID_WIRE_CODES = frozenset(
    [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
)


def _is_valid_close_code(code: int) -> bool:
    return code in _VALID_WIRE_CODES or 3000 <= code <= 4999


def _default_max_total_pending() -> int:
    """A quarter of the machine's physical memory (1 GiB if unknown): past
    it the server closes its slowest consumers (Server's max_total_pending)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        memory = -1
    return memory // 4 if memory > 0 else 2**30


def _default_max_fragments(max_size: int) -> int:
    # Many tiny frames cost CPU, not memory; one frame per 64 bytes of the
    # size limit on average is generous for real clients yet bounds the work.
    return max(1024, max_size // 64)


# =============================================================================
# Helpers
# =============================================================================
#
# Small pure functions the later sections share: the accept key, escaping
# for logs, unmasking, an HTTP answer, the check of one option (a
# ValueError naming it), an address to show; and Headers, the one header
# container.


def accept_key(key: Union[str, bytes]) -> str:
    """Return the Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    if isinstance(key, str):
        key = key.encode("ascii")
    return base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest()).decode("ascii")


# Control characters (C0, DEL, C1) as escapes, so that what a peer sent
# cannot drive a terminal or forge a line when it is printed or logged.
_CONTROL_ESCAPES = {code: "\\x%02x" % code for code in list(range(0x20)) + list(range(0x7F, 0xA0))}
_CONTROL_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})


def _shown(text: str) -> str:
    """``text`` with its control characters escaped (ESC as ``\\x1b``), for
    the console, where a message is printed whole; log lines use
    :func:`_printable`, which also escapes quotes and separators."""
    return text.translate(_CONTROL_ESCAPES)


def _header_tokens(value: Optional[str]) -> List[str]:
    """Split a comma-separated header value into lower-case tokens."""
    if not value:
        return []
    return [token.strip().lower() for token in value.split(",") if token.strip()]


# XOR tables for _unmask_python, one per key byte, made on first use.
_XOR_TABLES: List[Optional[bytes]] = [None] * 256
_TRANSLATE_FROM = 2048  # below this many bytes the big integer is faster
# For a short payload (a 7-bit length, up to 125 bytes: most messages) the
# repeated key is made as an integer, the key's times 0x..0100000001 cut to
# the payload's length, rather than as bytes: no bytes(mask), repetition,
# slice and concatenation.  It took a third off a 64-byte unmask here
# (1.43 -> 0.95 us).  About 16 KB of integers for the two tables.
_SHORT_UNMASK = 126
_KEY_REPEATS = [((1 << (32 * ((length + 3) >> 2))) - 1) // 0xFFFFFFFF for length in range(_SHORT_UNMASK)]
_LENGTH_BITS_OF = [(1 << (8 * length)) - 1 for length in range(_SHORT_UNMASK)]


def _printable(text: str) -> str:
    """``text`` from a peer (a close reason, a request target, a header
    value, a subprotocol name), fit for one log line: every character that
    is not printable (C0 controls such as CR, LF, ESC and NUL, DEL, C1
    controls such as U+0085 and U+009B, the line and paragraph separators
    U+2028/U+2029, format characters) becomes a Python-style escape, and so
    do ``"`` and the backslash, so that a quoted field cannot be closed
    early and an escape cannot be forged.  No client byte starts a new line
    or moves a terminal's cursor."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text  # the common case, one C-speed scan
    out = []
    for char in text:
        if char == '"' or char == "\\":
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            point = ord(char)
            out.append("\\x%02x" % point if point < 0x100 else
                       "\\u%04x" % point if point < 0x10000 else "\\U%08x" % point)
    return "".join(out)


def _xor_table(key_byte: int) -> bytes:
    table = _XOR_TABLES[key_byte]
    if table is None:
        table = _XOR_TABLES[key_byte] = bytes(value ^ key_byte for value in range(256))
    return table


def _unmask_python(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (RFC 6455 section 5.3).

    No Python loop over the bytes: short payloads go through one big-integer
    XOR; longer ones through four strided bytes.translate() calls, one per
    key byte, with a 256-byte XOR table each (about twice the big integer's
    speed from a few KiB up, measured here).  The optional C helper below
    does gigabytes a second.
    """
    length = len(data)
    if length < _SHORT_UNMASK:
        key_bits = int.from_bytes(mask, "little") * _KEY_REPEATS[length] & _LENGTH_BITS_OF[length]
        return (int.from_bytes(data, "little") ^ key_bits).to_bytes(length, "little")
    if length < _TRANSLATE_FROM:
        key = bytes(mask) * (length >> 2) + mask[: length & 3]
        return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
            length, "little"
        )
    source = bytes(data)
    output = bytearray(source)
    for offset in range(MASK_LENGTH):
        output[offset::MASK_LENGTH] = source[offset::MASK_LENGTH].translate(_xor_table(mask[offset]))
    return bytes(output)


# The optional C helper (speedups/_wsloop_speedups.c), used when it was built
# and not refused with WSLOOP_NO_SPEEDUPS=1; wsloop never needs it.
try:
    if os.environ.get("WSLOOP_NO_SPEEDUPS"):
        raise ImportError("refused by WSLOOP_NO_SPEEDUPS")
    from _wsloop_speedups import unmask as _unmask  # type: ignore[import-not-found]

    ACCELERATED = True
except ImportError:
    _unmask = _unmask_python
    ACCELERATED = False


_HTTP_REASONS = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    414: "URI Too Long",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def _http_response(
    status: int, headers: Iterable[Tuple[str, str]] = (), body: bytes = b"", head_only: bool = False
) -> bytes:
    """Serialize an HTTP/1.1 response that ends the connection (``head_only``:
    the headers of that response, for a HEAD request)."""
    lines = ["HTTP/1.1 %d %s" % (status, _HTTP_REASONS.get(status, "Unknown"))]
    names = set()
    connection_tokens = []
    for name, value in headers:
        if name.lower() == "connection":
            connection_tokens.append(value)  # merged below: one Connection field
            continue
        names.add(name.lower())
        lines.append("%s: %s" % (name, value))
    if "content-type" not in names and body:
        lines.append("Content-Type: text/plain; charset=utf-8")
    lines.append("Content-Length: %d" % len(body))
    lines.append("Connection: %s" % ", ".join(connection_tokens + ["close"]))
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


class _OptionError(ValueError):
    """A bad value for an option: ``options`` names it first, then any
    other option the message names (the CLI puts their flags in their
    place)."""

    def __init__(self, message: str, *options: str):
        super().__init__(message)
        self.options = options


def _bad(option: str, expected: str, value: Any) -> _OptionError:
    return _OptionError("%s must be %s, not %r" % (option, expected, value), option)


def _timeout(name: str, value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("%s must be a number of seconds or None, not %r" % (name, value))
    if not value > 0:  # NaN too
        raise _bad(name, "a positive number of seconds, or None to disable it", value)
    return value


def _format_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return ("[%s]:%d" if ":" in host else "%s:%d") % (host, address[1])
    return str(address)


class Headers:
    """The request's header fields, in order, looked up without regard to case."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[Tuple[str, str]] = ()):
        self._items = list(items)

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The field's value; repeated fields are joined with ``", "``."""
        values = self.get_all(name)
        return ", ".join(values) if values else default

    def get_all(self, name: str) -> List[str]:
        name = name.lower()
        return [value for key, value in self._items if key.lower() == name]

    def items(self) -> List[Tuple[str, str]]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.get_all(name))

    def __iter__(self) -> Iterator[Tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return "Headers(%r)" % (self._items,)


# =============================================================================
# Exceptions
# =============================================================================
#
# One base, WebSocketError; a protocol error carries its close code and a
# handshake error its HTTP status, so one place turns each into its answer.


class WebSocketError(Exception):
    """Base class of every error wsloop raises."""


class ProtocolError(WebSocketError):
    """The peer broke RFC 6455; ``code`` is the close code to fail it with,
    ``reason`` what the close frame says, ``detail`` the facts kept local
    (for this side's :class:`ConnectionClosed`, not sent on the wire)."""

    def __init__(self, reason: str, code: int = CloseCode.PROTOCOL_ERROR, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.detail = detail or reason


class HandshakeError(WebSocketError):
    """The opening handshake cannot succeed; ``status`` is the HTTP refusal
    (the status a server answers with, or, for a client, the one the server
    refused with) and None when there was none: then it is one of the two
    subclasses below.  ``headers`` (a :class:`Headers`) and ``body`` are
    what a server's refusal said, for a client."""

    def __init__(
        self,
        status: Optional[int],
        reason: str,
        headers: Iterable[Tuple[str, str]] = (),
        body: bytes = b"",
    ):
        super().__init__("%d %s" % (status, reason) if status is not None else reason)
        self.status = status
        self.reason = reason
        self.headers = Headers(headers)
        self.body = body  # what a server's refusal said, for a client


class InvalidState(WebSocketError, RuntimeError):
    """A method called when the object's state does not allow it (accepting
    twice, running a server again, topics on a client).  A RuntimeError too,
    so that code catching that keeps working."""


class InvalidResponse(HandshakeError):
    """Client: the server's answer is not a valid HTTP response (or the
    connection closed before one came); ``status`` is None.  Perhaps not a
    WebSocket server, or one starting: :func:`reconnecting` tries again."""

    def __init__(self, reason: str):
        super().__init__(None, reason)


class InvalidUpgrade(HandshakeError):
    """Client: the server switched protocols (101) but its answer breaks
    RFC 6455 4.1 or RFC 7692 (a 101 over HTTP/1.0, a wrong
    Sec-WebSocket-Accept, an extension or subprotocol not offered);
    ``status`` is None and ``headers`` are the 101's.  A server bug:
    :func:`reconnecting` does not try again."""

    def __init__(self, reason: str, headers: Iterable[Tuple[str, str]] = ()):
        super().__init__(None, reason, headers)


class ConnectionClosed(WebSocketError):
    """The connection is closed (or closing): nothing more can be sent, or
    nothing more will be received.  It says why:

    - ``code`` and ``reason``: the peer's close frame (1005 if it had no
      code; 1006 and ``""`` if none came);
    - ``sent_code`` and ``sent_reason``: the close frame this side sent
      (None and ``""`` if it sent none);
    - ``detail``: when this side failed the connection, the facts behind
      its close code (kept local, never sent);
    - ``sent_first``: this side's close frame went first (it was not an
      answer to the peer's).

    Its message tells the same story, e.g. ``sent 1009 (message too big):
    2,097,152 bytes > max_size 1,048,576; no close frame received``.
    """

    def __init__(
        self,
        message: str = "",
        *,
        code: int = CloseCode.ABNORMAL,
        reason: str = "",
        sent_code: Optional[int] = None,
        sent_reason: str = "",
        detail: str = "",
        sent_first: bool = False,
    ):
        self.code = code
        self.reason = reason
        self.sent_code = sent_code
        self.sent_reason = sent_reason
        self.detail = detail
        self.sent_first = sent_first
        received = "no close frame received" if code == CloseCode.ABNORMAL else "received " + _close_text(code, reason)
        if sent_code is None:
            story = received
        else:
            sent = "sent " + _close_text(sent_code, sent_reason, detail)
            story = sent + "; " + received if sent_first or code == CloseCode.ABNORMAL else received + "; then " + sent
        super().__init__(message + ": " + story if message else story)


def _close_text(code: int, reason: str, detail: str = "") -> str:
    """``1009 (message too big)`` and the reason (escaped) or the detail."""
    try:
        name = CloseCode(code).name.lower().replace("_", " ")
    except ValueError:
        name = "private use" if code >= 4000 else "registered"
    text = "%d (%s)" % (code, name)
    if detail:
        return text + ": " + detail
    return text + " " + repr(reason) if reason else text


# =============================================================================
# HTTP handshake (RFC 6455 section 4.2, RFC 9112 for the HTTP/1.1 syntax)
# =============================================================================


class Request:
    """An HTTP request head: ``method``, ``target``, ``path``, ``query``, ``headers``.

    The header block is kept as the bytes that arrived (one object, not
    dozens of strings) and parsed on first access.  Once the handshake is
    over a connection keeps no Request at all, only its head as bytes
    (:func:`_request_head`), and builds a new one on each access.
    """

    __slots__ = ("method", "target", "version", "_header_block", "_headers")

    def __init__(self, method: str, target: str, version: Tuple[int, int], header_block: bytes):
        self.method = method
        self.target = target
        self.version = version
        self._header_block = header_block  # validated lines, CRLF-separated
        self._headers: Optional[Headers] = None  # parsed on first access

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    @property
    def query_params(self) -> Dict[str, List[str]]:
        """Each query parameter's name mapped to the list of its values,
        percent-decoded (``?a=1&a=2&b`` gives ``{"a": ["1", "2"], "b": [""]}``)."""
        return urllib.parse.parse_qs(self.query, keep_blank_values=True)

    @property
    def headers(self) -> Headers:
        headers = self._headers
        if headers is None:
            headers = self._headers = Headers(_split_header_block(self._header_block))
        return headers

    def __repr__(self) -> str:
        return "Request(%s %s)" % (self.method, self.target)


class Response:
    """An HTTP response a handler gives: to refuse a handshake (e.g. 401 or
    403), or, with status 101, to accept it with ``headers`` added."""

    __slots__ = ("status", "headers", "body", "log_reason")

    def __init__(self, status: int, body: Union[bytes, str] = b"", headers: Iterable[Tuple[str, str]] = ()):
        self.status = status
        self.body = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        self.headers = list(headers)
        # Why, for the server's access log; never sent.  A handler may set it
        # on a refusal (``response.log_reason = "token expired"``).
        self.log_reason: Optional[str] = None

    def __repr__(self) -> str:
        return "Response(%d)" % self.status


# RFC 9110 section 5.6.2: the characters of a token (method, header name).
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Visible ASCII and space: all a request line may hold.  Anything else in the
# first bytes (a TLS ClientHello starts with 0x16) is answered at once.
_REQUEST_LINE_CHARS = bytes(range(0x20, 0x7F))
_FIELD_VALUE_DELETE = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)) + b"\t"


def _is_token(data: bytes) -> bool:
    return bool(data) and not data.translate(None, _TOKEN_CHARS)


def _is_token_text(text: str) -> bool:
    try:
        return _is_token(text.encode("ascii"))
    except UnicodeEncodeError:
        return False


def _check_partial_head(buffer: Union[bytes, bytearray]) -> None:
    """Enforce the head limits on a request that has not ended yet.

    Checked only while waiting for more bytes, so each limit costs little and
    fails exactly when crossed (the way h11 does it).
    """
    first_end = buffer.find(b"\r\n")
    # Until its CRLF arrives, the first line may end in half of it.
    first_line = buffer.rstrip(b"\r") if first_end < 0 else buffer[:first_end]
    if first_line.translate(None, _REQUEST_LINE_CHARS):
        raise HandshakeError(400, "not an HTTP request")
    if len(first_line) > MAX_REQUEST_LINE:
        raise HandshakeError(414, "request line too long")
    if len(buffer) > MAX_REQUEST_HEAD:
        raise HandshakeError(431, "request head too large")
    if first_end >= 0:
        last_end = buffer.rfind(b"\r\n")
        if len(buffer) - last_end - 2 > MAX_HEADER_LINE:
            raise HandshakeError(431, "header line too long")
        if buffer.count(b"\r\n") > MAX_HEADERS + 1:
            raise HandshakeError(431, "too many headers")


def _parse_request_head(buffer: Union[bytes, bytearray]) -> Optional[Tuple[Request, int]]:
    """Parse a request head from the start of ``buffer``.

    Returns ``(request, head_length)``, ``None`` when more bytes are needed,
    or raises :class:`HandshakeError` with the status to answer.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        _check_partial_head(buffer)
        return None
    head_length = end + 4
    if head_length > MAX_REQUEST_HEAD:
        raise HandshakeError(431, "request head too large")
    lines = bytes(buffer[:end]).split(b"\r\n")
    request_line = lines[0]
    if len(request_line) > MAX_REQUEST_LINE:
        raise HandshakeError(414, "request line too long")
    if request_line.translate(None, _REQUEST_LINE_CHARS):
        raise HandshakeError(400, "not an HTTP request")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not _is_token(parts[0]) or not parts[1]:
        raise HandshakeError(400, "malformed request line")
    method, target, version_text = (part.decode("ascii") for part in parts)
    method = sys.intern(method)  # one "GET" for all connections
    version = _parse_http_version(version_text)
    _check_header_lines(lines[1:], 400, 431)
    if not target.startswith("/"):
        target = _origin_form(target)
    return Request(method, target, version, b"\r\n".join(lines[1:])), head_length


def _request_head(request: Request) -> bytes:
    """``request``'s head as bytes (its target in origin form), for
    :func:`_request_from_head` to build an equal Request from: what a
    connection keeps of its request once the handshake is over."""
    line = "%s %s HTTP/%d.%d\r\n" % (request.method, request.target, request.version[0], request.version[1])
    return line.encode("utf-8") + request._header_block


def _request_from_head(head: bytes) -> Request:
    """The Request that :func:`_request_head` gave ``head`` for."""
    line, _, header_block = head.partition(b"\r\n")
    method, _, rest = line.decode("utf-8").partition(" ")
    target, _, version = rest.rpartition(" ")
    return Request(sys.intern(method), target, _parse_http_version(version), header_block)


_ABSOLUTE_SCHEMES = ("http://", "https://", "ws://", "wss://")


def _origin_form(target: str) -> str:
    """The path and query of an absolute-form target (RFC 9112 3.2.2: a
    server MUST accept ``GET ws://host/path``); other targets unchanged."""
    lowered = target[:8].lower()
    for scheme in _ABSOLUTE_SCHEMES:
        if lowered.startswith(scheme):
            rest = target[len(scheme):]
            authority_end = len(rest)
            for separator in "/?#":
                index = rest.find(separator)
                if 0 <= index < authority_end:
                    authority_end = index
            if not authority_end:
                raise HandshakeError(400, "absolute request target without a host")
            path = rest[authority_end:].partition("#")[0]
            return path if path.startswith("/") else "/" + path
    return target


def _check_header_lines(lines: List[bytes], malformed: int, too_large: int) -> None:
    """Validate header lines (RFC 9112 5), raising HandshakeError with the
    given statuses."""
    if len(lines) > MAX_HEADERS:
        raise HandshakeError(too_large, "too many headers")
    for line in lines:
        if len(line) > MAX_HEADER_LINE:
            raise HandshakeError(too_large, "header line too long")
        name, colon, value = line.partition(b":")
        # No space before the colon, no obsolete line folding (RFC 9112 5.1-5.2).
        if not colon or not _is_token(name):
            raise HandshakeError(malformed, "malformed header line")
        if value.translate(None, _FIELD_VALUE_DELETE):
            raise HandshakeError(malformed, "control character in header value")


def _parse_response_head(buffer: Union[bytes, bytearray]) -> Optional[Tuple[Response, str, int]]:
    """Parse a server's response head from the start of ``buffer`` (the
    client's side of the handshake, under the same limits as requests).

    Returns ``(response, reason phrase, head_length)``, ``None`` when more
    bytes are needed, or raises :class:`InvalidResponse` (not a valid HTTP
    response) or :class:`InvalidUpgrade` (a 101 over HTTP/1.0).
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        _check_partial_response(buffer)
        return None
    if end + 4 > MAX_REQUEST_HEAD:
        raise InvalidResponse("response head too large")
    lines = bytes(buffer[:end]).split(b"\r\n")
    if len(lines[0]) > MAX_REQUEST_LINE:
        raise InvalidResponse("status line too long")
    parts = lines[0].split(b" ", 2)
    if (
        len(parts) < 2
        or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0")
        or len(parts[1]) != 3
        or not parts[1].isdigit()
    ):
        raise InvalidResponse("not an HTTP/1.1 response")
    if parts[1] == b"101" and parts[0] != b"HTTP/1.1":
        # RFC 6455 4.1: the handshake is HTTP/1.1 (1.0 has no Upgrade).
        raise InvalidUpgrade("a 101 over %s, not HTTP/1.1" % parts[0].decode("ascii"))
    try:
        _check_header_lines(lines[1:], 400, 431)  # the request's rules; no status to answer here
    except HandshakeError as exc:
        raise InvalidResponse(exc.reason) from None
    response = Response(int(parts[1]), b"", _split_header_block(b"\r\n".join(lines[1:])))
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    return response, reason, end + 4


def _check_partial_response(buffer: Union[bytes, bytearray]) -> None:
    """The request head's limits, on a response head that has not ended yet
    (:class:`InvalidResponse`): a server that sends endless lines fails the
    handshake as soon as it crosses one, as a client would on the server."""
    if len(buffer) > MAX_REQUEST_HEAD:
        raise InvalidResponse("response head too large")
    first_end = buffer.find(b"\r\n")
    if (len(buffer) if first_end < 0 else first_end) > MAX_REQUEST_LINE:
        raise InvalidResponse("status line too long")
    if first_end >= 0:
        if len(buffer) - buffer.rfind(b"\r\n") - 2 > MAX_HEADER_LINE:
            raise InvalidResponse("header line too long")
        if buffer.count(b"\r\n") > MAX_HEADERS + 1:
            raise InvalidResponse("too many headers")


def _header_line(name: str, value: str) -> str:
    """``name: value``, refusing what would split or forge a header."""
    if not _is_token_text(name) or any(char in value for char in "\r\n\0"):
        raise ValueError("invalid header %r: %r" % (name, value))
    return "%s: %s" % (name, value)


def _split_header_block(block: bytes) -> List[Tuple[str, str]]:
    """(name, value) pairs of a header block that _parse_request_head validated."""
    fields = []
    for line in block.split(b"\r\n") if block else ():
        name, _, value = line.partition(b":")
        fields.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    return fields


_HTTP_11 = (1, 1)


def _parse_http_version(text: str) -> Tuple[int, int]:
    if text == "HTTP/1.1":
        return _HTTP_11  # shared: every connection keeps its request
    if len(text) != 8 or not text.startswith("HTTP/") or text[6] != ".":
        raise HandshakeError(400, "malformed HTTP version")
    major, minor = text[5], text[7]
    if not (major.isdigit() and minor.isdigit()):
        raise HandshakeError(400, "malformed HTTP version")
    return int(major), int(minor)


_PLAIN_HTTP_BODY = b"This is a WebSocket server: connect to it with a WebSocket client.\n"


def _check_upgrade_request(request: Request) -> bool:
    """Validate a WebSocket opening handshake (RFC 6455 section 4.2.1).

    Returns False for a valid plain HTTP GET (no Upgrade header), which the
    application may answer; raises :class:`HandshakeError` carrying the
    status to answer with for anything else that is not a valid upgrade.
    """
    if request.method != "GET" and request.method != "HEAD":
        raise HandshakeError(405, "method not allowed", [("Allow", "GET, HEAD")])
    if request.version < (1, 1):
        raise HandshakeError(505, "HTTP/1.1 or later required")
    if not request.target.startswith("/"):
        raise HandshakeError(400, "request target must be a path or an absolute URI")
    headers = request.headers
    if len(headers.get_all("Host")) != 1:
        raise HandshakeError(400, "exactly one Host header required")
    # RFC 9112 6.3 frames a request by these headers: a body would be read
    # by us as frames but by an intermediary as part of the request.  A GET
    # (upgrade or not) has no business carrying one, so refuse rather than
    # guess where the request ends.
    if "Transfer-Encoding" in headers:
        raise HandshakeError(400, "a request with a body (Transfer-Encoding) is not allowed")
    for value in headers.get_all("Content-Length"):
        if any(item.strip() != "0" for item in value.split(",")):
            raise HandshakeError(400, "a request with a body (Content-Length) is not allowed")
    upgrade = headers.get("Upgrade")
    if upgrade is None:
        return False
    if request.method != "GET":
        raise HandshakeError(405, "an upgrade must be a GET", [("Allow", "GET")])
    if "websocket" not in _header_tokens(upgrade):
        raise HandshakeError(400, "Upgrade header must name websocket")
    if "upgrade" not in _header_tokens(headers.get("Connection")):
        raise HandshakeError(400, "Connection header must include upgrade")
    if headers.get("Sec-WebSocket-Version") != "13":
        raise HandshakeError(426, "unsupported WebSocket version", [("Sec-WebSocket-Version", "13")])
    key = headers.get("Sec-WebSocket-Key")
    try:
        if key is None or len(key) != 24 or len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64") from None
    return True


def _refusal(status: int, reason: str, headers: Iterable[Tuple[str, str]] = ()) -> Response:
    response = Response(status, reason + "\n", headers)
    response.log_reason = reason
    return response


def _offered_subprotocols(request: Request) -> List[str]:
    """The subprotocols the client offers, in its order of preference."""
    values = ",".join(request.headers.get_all("Sec-WebSocket-Protocol"))
    return [token.strip() for token in values.split(",") if token.strip()]


def _default_subprotocol(offered: List[str], supported: List[str]) -> Optional[str]:
    """The first subprotocol the client offers that the server speaks."""
    for name in offered:
        if name in supported:
            return name
    return None


_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


def _parse_networks(items: Iterable[str]) -> List[_Network]:
    """Addresses and networks ("10.0.0.1", "10.0.0.0/8", "::1"); ValueError
    names the bad one."""
    networks = []
    for item in items:
        for text in item.split(","):
            text = text.strip()
            if text:
                try:
                    networks.append(ipaddress.ip_network(text, strict=False))
                except ValueError:
                    raise ValueError("not an address or network: %r" % text) from None
    return networks


def _in_networks(address: str, networks: List[_Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 from a dual-stack listener
    return any(ip in network for network in networks)


def _hop_address(text: str) -> Optional[Tuple[str, int]]:
    """The IP and port (0 if none) of a Forwarded ``for=`` or X-Forwarded-For
    entry, or None for "unknown", an obfuscated name or junk."""
    text = text.strip().strip('"')
    port = ""
    if text.startswith("["):
        text, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        text, _, port = text.partition(":")  # IPv4 with a port
    if "%" in text:
        return None  # an IPv6 zone ("fe80::1%eth0") means nothing off its host, and is free text
    try:
        address = str(ipaddress.ip_address(text))
    except ValueError:
        return None
    return address, int(port) if port.isdigit() and int(port) < 65536 else 0


def _parse_proxies(items: Iterable[str]) -> Tuple[List[_Network], bool]:
    """--forwarded-allow-ips: addresses and networks, ``unix`` (the peer on
    a Unix socket: the proxy that can connect to it) and ``*`` (every peer,
    TCP or Unix); (networks, whether a Unix-socket peer is trusted)."""
    texts: List[str] = []
    unix = everyone = False
    for item in items:
        for text in item.split(","):
            text = text.strip()
            if text == "*":
                everyone = True
            elif text == "unix":
                unix = True
            elif text:
                texts.append(text)
    networks = _parse_networks(texts)
    if everyone:
        networks = _parse_networks(["0.0.0.0/0", "::/0"])
    return networks, unix or everyone


# The proxy header an operator may choose to believe (--forwarded-header),
# one at a time: reading both would let a client add the one its proxy
# does not overwrite.
_FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")
_UNKNOWN_CLIENT = ("unknown", 0)


def _forwarded_client(
    headers: Headers, header: str, trusted: List[_Network]
) -> Tuple[Optional[Tuple[str, int]], Optional[str]]:
    """The client's (address, port) and scheme as a trusted proxy reports them.

    Reads only ``header``: ``x-forwarded-for`` (with ``X-Forwarded-Proto``)
    or ``forwarded`` (RFC 7239, ``for=`` and ``proto=``), walking from the
    right: each hop was appended by the one after it, so the right-most hop
    that is not itself a trusted proxy is the client (anything left of it is
    whatever the client said).  A hop that is not an address ("unknown",
    an obfuscated name, junk) ends the walk as ``("unknown", 0)``, never as
    a trusted proxy's address.  The address is None when the proxy named no
    hop (the peer is then the client).  The caller has checked that the
    peer is trusted.
    """
    hops: List[str] = []
    protos: List[Optional[str]] = []
    if header == "forwarded":
        for element in ",".join(headers.get_all("Forwarded")).split(","):
            fields = {}
            for pair in element.split(";"):
                key, _, value = pair.strip().partition("=")
                fields[key.strip().lower()] = value.strip().strip('"')
            hops.append(fields.get("for", ""))
            protos.append(fields.get("proto"))
        if hops == [""] and protos == [None]:
            hops, protos = [], []  # no Forwarded header at all
    else:
        for value in headers.get_all("X-Forwarded-For"):
            hops.extend(value.split(","))
        proto_values = ",".join(headers.get_all("X-Forwarded-Proto")).split(",")
        protos = [value.strip() or None for value in proto_values]
    client: Optional[Tuple[str, int]] = None
    proto = None
    if not hops and protos:
        proto = protos[-1]  # a proxy that names only the scheme
    for index in range(len(hops) - 1, -1, -1):
        # X-Forwarded-Proto may be a list like the addresses, or one value.
        position = index - (len(hops) - len(protos))
        proto = protos[position] if 0 <= position < len(protos) else (protos[0] if protos else None)
        hop = _hop_address(hops[index])
        if hop is None:
            client = _UNKNOWN_CLIENT
            break
        client = hop
        if not _in_networks(hop[0], trusted):
            break
    if proto is not None:
        proto = proto.lower()
        proto = proto if proto in ("http", "https", "ws", "wss") else None
    return client, proto


def _address_key(address: str) -> str:
    """What a per-address limit counts by: an IPv4 address, or an IPv6
    address's /64 (one subscriber usually holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(address + "/64", strict=False))
    return address


# =============================================================================
# permessage-deflate (RFC 7692): negotiation and the per-connection codec
# =============================================================================


class Deflate:
    """Settings for permessage-deflate, the compression browsers offer.

    - ``window_bits`` (9-15, default 12): the server's compression window;
      a client's ``server_max_window_bits`` may lower it.
    - ``client_window_bits`` (8-15, default 12): asked of clients that
      support ``client_max_window_bits``; others use 15.  Inflating costs
      ``2**bits`` bytes per connection.
    - ``no_context_takeover`` (default False): compress each message on its
      own: no compressor is kept between messages (less memory, and one
      compressed frame can be shared by a broadcast), at some ratio.
    - ``client_no_context_takeover`` (default False): ask clients the same,
      so no decompressor is kept between their messages.
    - ``mem_level`` (1-9, default 5): zlib's memLevel for compressing.
    - ``threshold`` (default 128): messages shorter than this go uncompressed.

    A kept compressor costs about ``2**(window_bits + 2) + 2**(mem_level + 9)``
    bytes (32 KiB with the defaults) and a kept decompressor ``2**bits`` plus
    about 7 KiB; both are made only once a connection first needs them.
    """

    __slots__ = ("window_bits", "client_window_bits", "no_context_takeover",
                 "client_no_context_takeover", "mem_level", "threshold")

    def __init__(
        self,
        window_bits: int = 12,
        client_window_bits: int = 12,
        no_context_takeover: bool = False,
        client_no_context_takeover: bool = False,
        mem_level: int = 5,
        threshold: int = 128,
    ):
        if not 9 <= window_bits <= 15:
            raise ValueError("window_bits must be 9-15 (zlib cannot compress with 8)")
        if not 8 <= client_window_bits <= 15:
            raise ValueError("client_window_bits must be 8-15")
        if not 1 <= mem_level <= 9:
            raise ValueError("mem_level must be 1-9")
        if threshold < 0:
            raise ValueError("threshold must be at least 0")
        self.window_bits = window_bits
        self.client_window_bits = client_window_bits
        self.no_context_takeover = no_context_takeover
        self.client_no_context_takeover = client_no_context_takeover
        self.mem_level = mem_level
        self.threshold = threshold

    def __repr__(self) -> str:
        return "Deflate(%s)" % ", ".join("%s=%r" % (name, getattr(self, name)) for name in self.__slots__)


def _split_outside_quotes(text: str, separator: str) -> List[str]:
    """Split on ``separator`` except inside quoted strings (RFC 9110 5.6.4)."""
    parts, start, quoted, escaped = [], 0, False, False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:index])
            start = index + 1
    if quoted:
        raise HandshakeError(400, "unterminated quoted string in Sec-WebSocket-Extensions")
    parts.append(text[start:])
    return parts


def _parse_extensions(values: List[str]) -> List[Tuple[str, List[Tuple[str, Optional[str]]]]]:
    """Parse Sec-WebSocket-Extensions (RFC 6455 9.1) into (name, params) offers.

    Raises :class:`HandshakeError` 400 when the syntax is broken.
    """
    offers = []
    for value in values:
        for item in _split_outside_quotes(value, ","):
            if not item.strip():
                continue  # empty list elements are allowed (RFC 9110 5.6.1)
            name, *raw_params = _split_outside_quotes(item, ";")
            name = name.strip()
            if not _is_token_text(name):
                raise HandshakeError(400, "malformed Sec-WebSocket-Extensions")
            params: List[Tuple[str, Optional[str]]] = []
            for raw in raw_params:
                key, equals, text = raw.partition("=")
                key, text = key.strip(), text.strip()
                if not _is_token_text(key):
                    raise HandshakeError(400, "malformed Sec-WebSocket-Extensions")
                if not equals:
                    params.append((key.lower(), None))
                    continue
                if len(text) >= 2 and text[0] == text[-1] == '"':
                    text = text[1:-1].replace("\\", "")
                # A quoted value must still be a token once unquoted (RFC 6455 9.1).
                if not _is_token_text(text):
                    raise HandshakeError(400, "malformed Sec-WebSocket-Extensions")
                params.append((key.lower(), text))
            offers.append((name.lower(), params))
    return offers


def _window_bits(text: Optional[str], low: int) -> Optional[int]:
    if text is None or not text.isdigit() or text[0] == "0":
        return None
    value = int(text)
    return value if low <= value <= 15 else None


def _negotiate_deflate(
    offers: List[Tuple[str, List[Tuple[str, Optional[str]]]]], settings: Deflate
) -> Optional[Tuple[str, "_PerMessageDeflate"]]:
    """Pick the first acceptable permessage-deflate offer (RFC 7692 section 7).

    Returns ``(response header value, codec)``, or None to decline them all.
    An offer with an unknown, repeated or out-of-range parameter is declined,
    and the next one is tried.
    """
    for name, params in offers:
        if name != "permessage-deflate":
            continue
        seen = set()
        valid = True
        server_no_context = client_no_context = False
        server_bits: Optional[int] = None
        client_bits_offered = False
        client_bits: Optional[int] = None
        for key, value in params:
            if key in seen:
                valid = False
                break
            seen.add(key)
            if key == "server_no_context_takeover" and value is None:
                server_no_context = True
            elif key == "client_no_context_takeover" and value is None:
                client_no_context = True
            elif key == "server_max_window_bits":
                server_bits = _window_bits(value, 8)
                valid = server_bits is not None
            elif key == "client_max_window_bits":
                client_bits_offered = True
                if value is not None:
                    client_bits = _window_bits(value, 8)
                    valid = client_bits is not None
            else:
                valid = False
            if not valid:
                break
        if not valid:
            continue
        response = ["permessage-deflate"]
        if server_no_context or settings.no_context_takeover:
            server_no_context = True
            response.append("server_no_context_takeover")
        if client_no_context or settings.client_no_context_takeover:
            client_no_context = True
            response.append("client_no_context_takeover")
        compress_bits = settings.window_bits
        if server_bits is not None:
            compress_bits = min(server_bits, compress_bits)
            response.append("server_max_window_bits=%d" % compress_bits)
        inflate_bits = 15
        if client_bits_offered:
            inflate_bits = min(client_bits or 15, settings.client_window_bits)
            response.append("client_max_window_bits=%d" % inflate_bits)
        # The server compresses with its window and inflates the client's.
        codec = _PerMessageDeflate(
            compress_bits, inflate_bits, server_no_context, client_no_context, settings
        )
        return "; ".join(response), codec
    return None


def _deflate_offer(settings: Deflate) -> str:
    """A client's permessage-deflate offer (RFC 7692 section 7.1).

    From a client, ``settings.no_context_takeover`` offers to compress each
    message on its own and ``settings.client_no_context_takeover`` asks the
    server to; ``client_max_window_bits`` says any window the server names
    for our compressor will do.
    """
    offer = ["permessage-deflate", "client_max_window_bits"]
    if settings.no_context_takeover:
        offer.append("client_no_context_takeover")
    if settings.client_no_context_takeover:
        offer.append("server_no_context_takeover")
    return "; ".join(offer)


def _accept_deflate(values: List[str], settings: Deflate) -> _PerMessageDeflate:
    """Check a server's answer to :func:`_deflate_offer` (RFC 7692 7.1).

    Raises :class:`HandshakeError` for anything but one permessage-deflate
    with known, single, valid parameters.
    """
    def refuse(why: str) -> InvalidUpgrade:
        return InvalidUpgrade("bad Sec-WebSocket-Extensions: " + why)

    try:
        offers = _parse_extensions(values)
    except HandshakeError as exc:
        raise refuse(exc.reason) from None
    if len(offers) != 1 or offers[0][0] != "permessage-deflate":
        raise refuse("only one permessage-deflate was offered")
    seen = set()
    compress_no_context = settings.no_context_takeover
    inflate_no_context = False
    compress_bits = settings.window_bits
    inflate_bits = 15
    for key, value in offers[0][1]:
        if key in seen:
            raise refuse("%s repeated" % key)
        seen.add(key)
        if key == "server_no_context_takeover" and value is None:
            inflate_no_context = True
        elif key == "client_no_context_takeover" and value is None:
            compress_no_context = True
        elif key == "server_max_window_bits":
            bits = _window_bits(value, 8)
            if bits is None:
                raise refuse("server_max_window_bits=%s" % value)
            inflate_bits = bits
        elif key == "client_max_window_bits":
            bits = _window_bits(value, 8)
            if bits is None:
                raise refuse("client_max_window_bits=%s" % value)
            compress_bits = min(bits, compress_bits)
        else:
            raise refuse("unknown parameter %s" % key)
    if settings.client_no_context_takeover and not inflate_no_context:
        raise refuse("server_no_context_takeover was asked for")
    return _PerMessageDeflate(compress_bits, inflate_bits, compress_no_context, inflate_no_context, settings)


_DEFLATE_TAIL = b"\x00\x00\xff\xff"


class _PerMessageDeflate:
    """One connection's compressor and decompressor (RFC 7692 section 7.2).

    ``own_no_context``: our compressor starts afresh for each message;
    ``peer_no_context``: so does the peer's, so our inflater may too.  Both
    are made on first use, so idle connections hold no zlib state.
    """

    __slots__ = ("compress_bits", "inflate_bits", "own_no_context", "peer_no_context",
                 "mem_level", "threshold", "_compressor", "_decompressor", "_window",
                 "_stream_ended", "_final_seen")

    def __init__(self, compress_bits: int, inflate_bits: int, own_no_context: bool,
                 peer_no_context: bool, settings: Deflate):
        self.compress_bits = compress_bits
        # At least 9 bits: zlib-based clients cannot compress with 8 and
        # use 9 instead; a larger window inflates any smaller one.
        self.inflate_bits = max(inflate_bits, 9)
        self.own_no_context = own_no_context
        self.peer_no_context = peer_no_context
        self.mem_level = settings.mem_level
        # zlib cannot compress with a 256-byte window: a peer that asks for
        # one gets every message uncompressed, which RFC 7692 allows.
        self.threshold = settings.threshold if compress_bits >= 9 else None
        self._compressor: Any = None
        self._decompressor: Any = None
        # With context takeover, the last window of inflated data: a peer
        # may end a message's DEFLATE stream with a final block (RFC 7692
        # 7.2.3.4), after which zlib takes no more input, yet the next
        # message may refer back into that window (7.2.2).  The new inflater
        # is primed with it.  How a peer ends its messages is a trait of its
        # compressor, so its first compressed message decides: a final
        # block, and the window is kept from then on; a sync flush (what
        # browsers send), and it is dropped, since the inflater keeps its
        # own (2**bits bytes less per connection).  A peer that switches
        # to final blocks later is inflated from that message's output on:
        # a reference back past it fails with 1007, never with wrong data.
        # None when not kept, and when every message stands alone.
        self._window: Optional[bytes] = None if peer_no_context else b""
        self._stream_ended = False  # a final block came in this message
        self._final_seen = False  # this peer ends messages with final blocks

    @property
    def shared_key(self) -> Optional[Tuple[int, int]]:
        """Connections with equal keys can share one compressed frame (no context kept)."""
        if self.own_no_context:
            return (self.compress_bits, self.mem_level)
        return None

    def compress(self, payload: bytes) -> Optional[bytes]:
        """The payload deflated for one message, or None to send it plain."""
        if self.threshold is None or len(payload) < self.threshold:
            return None
        compressor = self._compressor
        if compressor is None:
            compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED,
                                          -self.compress_bits, self.mem_level)
            if not self.own_no_context:
                self._compressor = compressor
        data: bytes = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        # RFC 7692 7.2.1: remove the 4 bytes the sync flush ends with.
        return data[:-4] if data.endswith(_DEFLATE_TAIL) else data

    def _new_decompressor(self) -> Any:
        if self._window:
            return zlib.decompressobj(-self.inflate_bits, zdict=self._window)
        return zlib.decompressobj(-self.inflate_bits)

    def decompress(self, data: bytes, message_done: bool, limit: int) -> bytes:
        """Inflate the next piece of a message, never past ``limit`` bytes."""
        if self._stream_ended:
            # The stream ended earlier in this message: nothing may follow.
            if data:
                raise ProtocolError("data after the end of a compressed stream", CloseCode.INVALID_DATA)
            if message_done:
                self._end_message(True)
            return b""
        decompressor = self._decompressor
        if decompressor is None or decompressor.eof:
            decompressor = self._decompressor = self._new_decompressor()
        if message_done:
            data = bytes(data) + _DEFLATE_TAIL  # RFC 7692 7.2.2
        try:
            # limit + 1: one byte over says "too big" without inflating more.
            output: bytes = decompressor.decompress(data, limit + 1)
        except zlib.error:
            raise ProtocolError("invalid compressed data", CloseCode.INVALID_DATA) from None
        if len(output) > limit:
            raise ProtocolError(
                "message over the size limit once inflated", CloseCode.MESSAGE_TOO_BIG,
                "over max_size once inflated",
            )
        if decompressor.eof:
            # A final block: only the tail we appended may follow it.
            unused = decompressor.unused_data
            if unused and not (message_done and unused == _DEFLATE_TAIL):
                raise ProtocolError("data after the end of a compressed stream", CloseCode.INVALID_DATA)
            self._stream_ended = not message_done
            if self._window is None and not self.peer_no_context:
                self._window = b""  # a switch to final blocks (see __init__)
                self._final_seen = True
        window = self._window
        if window is not None and output:
            size = 1 << self.inflate_bits
            tail = output[-size:]
            self._window = tail if len(tail) == size else (window + tail)[-size:]
        if message_done:
            self._end_message(decompressor.eof)
        return output

    def _end_message(self, final: bool) -> None:
        """``final``: this message's stream ended with a final block."""
        self._stream_ended = False
        if self.peer_no_context:
            self._decompressor = None
        elif not self._final_seen:
            if final:
                self._final_seen = True
            else:
                self._window = None  # a sync-flushing peer: zlib's own window is enough


# =============================================================================
# Frame codec (RFC 6455 section 5)
# =============================================================================

_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack
_unpack_16 = struct.Struct("!H").unpack_from
_unpack_64 = struct.Struct("!Q").unpack_from

_FIN = 0x80
_RSV1 = 0x40  # "compressed", once permessage-deflate is negotiated
_RSV_BITS = 0x70
_MASK_BIT = 0x80
_LENGTH_BITS = 0x7F

# RFC 6455 5.2: a 7-bit length of 126 or 127 says a 16- or 64-bit one follows.
_LENGTH_16 = 126
_LENGTH_64 = 127
# The largest payload each length field holds.  That the 7-bit one's equals
# MAX_CONTROL_PAYLOAD is RFC 6455's design (a control frame never needs an
# extended length), but the two limits answer different questions.
_MAX_LENGTH_7 = _LENGTH_16 - 1
_MAX_LENGTH_16 = 2**16 - 1
# What a client frame's header takes: two bytes, the extended length if
# any, then the mask.
_HEADER_7 = 2 + MASK_LENGTH
_HEADER_16 = 2 + 2 + MASK_LENGTH
_HEADER_64 = 2 + 8 + MASK_LENGTH
# First bytes of a whole message in one frame: FIN, no RSV bit, text or
# binary.  Nearly every frame is one of these, so the parser tests for them
# first (its fast path).
_WHOLE_TEXT = _FIN | 0x1
_WHOLE_BINARY = _FIN | 0x2

# The header of each server text frame with a 7-bit length (Protocol.send).
_SHORT_TEXT_HEADERS = [bytes((_WHOLE_TEXT, length)) for length in range(_LENGTH_16)]

# Pieces of a message at least this large are kept whole until it ends.
_WHOLE_PIECE = 4096


def _frame_header(first_byte: int, length: int, mask_bit: int = 0) -> bytes:
    """The header of a frame whose payload is ``length`` bytes: the one
    place a frame's header is built.  ``mask_bit`` is _MASK_BIT for a
    client's frame, whose masking key goes right after this header."""
    if length < _LENGTH_16:
        return bytes((first_byte, mask_bit | length))
    if length <= _MAX_LENGTH_16:
        return _pack_16(first_byte, mask_bit | _LENGTH_16, length)
    return _pack_64(first_byte, mask_bit | _LENGTH_64, length)


def encode_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """Serialize one unmasked frame, as a server sends it."""
    return _frame_header((_FIN if fin else 0) | opcode, len(payload)) + payload


def _close_payload(code: Optional[int], reason: str = "") -> bytes:
    if code is None:
        return b""
    return struct.pack("!H", code) + reason.encode("utf-8")


def encode_message(message: Union[str, bytes]) -> bytes:
    """Serialize a whole message as one unmasked frame (text for ``str``),
    as a server without compression sends it (a thin helper: connections
    frame what they send with :meth:`Protocol.send`)."""
    if isinstance(message, str):
        return encode_frame(Opcode.TEXT, message.encode("utf-8"))
    if isinstance(message, (bytes, bytearray, memoryview)):
        return encode_frame(Opcode.BINARY, bytes(message))
    raise TypeError("message must be str or bytes, not %s" % type(message).__name__)


def _parse_close_payload(payload: bytes) -> Tuple[int, str]:
    """Return ``(code, reason)`` of a close frame (RFC 6455 section 5.5.1)."""
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not _is_valid_close_code(code):
        raise ProtocolError("invalid close code %d" % code)
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not UTF-8", CloseCode.INVALID_DATA) from None
    return code, reason


# From this size a frame is queued by reference (Connection._enqueue), not
# copied into the output buffer: a large frame broadcast to many is held
# once, and a large message goes out as its header and its payload, never
# joined (Protocol.send).  Below it, one append to a bytearray is cheaper
# than a queue entry.
_COPY_FREE_FROM = 16 * 2**10


def _checked_message(message: Any) -> Union[str, bytes]:
    """``message`` as ``str`` or ``bytes`` (a copy of other bytes-likes, which
    the caller may reuse), or TypeError."""
    if isinstance(message, (str, bytes)):
        return message
    if isinstance(message, (bytearray, memoryview)):
        return bytes(message)
    raise TypeError("message must be str or bytes, not %s" % type(message).__name__)


class PreparedMessage:
    """A message framed once to be sent to many connections.

    ``conn.send(prepared)`` takes it like a ``str`` or ``bytes``; its frame
    is built once for every connection without compression, and compressed
    once per group of connections that keep no compression context
    (``server_no_context_takeover``); a connection that keeps one
    compresses it itself.  :meth:`Server.broadcast` uses one.
    """

    __slots__ = ("message", "frames")

    def __init__(self, message: Union[str, bytes]):
        self.message = _checked_message(message)
        # The frames built so far, by compression settings (None: plain);
        # filled by Protocol.send.
        self.frames: Dict[Optional[Tuple[int, int]], bytes] = {}


# =============================================================================
# Protocol: the socket-free state machine of one server connection
# =============================================================================
#
# Theory of operation
# -------------------
# A Protocol never touches a socket.  The I/O layer hands it every byte it
# reads with receive_data(), iterates events() for the (Event, value) pairs
# those bytes complete, and writes what the protocol appended to `outgoing`
# (a bytearray the I/O layer drains from the front).  events() parses lazily,
# one event per step, so replies to a message are queued before whatever the
# next frame causes (even a close frame for a protocol error).
#
#   CONNECTING --accept()--> OPEN --close()--> CLOSING --peer's close--> CLOSED
#        |                    |                   |
#        +--respond()/error---+--peer's close-----+--protocol error----> CLOSED
#
# In CONNECTING the bytes go to the HTTP request parser; once a request head
# is complete, a REQUEST event (a valid upgrade: answer with accept() or
# respond()) or an HTTP_REQUEST event (a plain GET: answer with respond()) is
# yielded; anything else is answered with its error status right away.
# Bytes that came after the head stay buffered and are parsed as frames
# after accept().
#
# In OPEN and CLOSING the bytes go to the frame parser.  Data frame payloads
# are consumed as they arrive (unmasked, UTF-8-checked, appended to the
# message) rather than once the frame is whole, so invalid text fails at the
# first bad byte, and the buffer never holds more than a partial header or a
# partial control frame.  Control frames (<= MAX_CONTROL_PAYLOAD, 125 bytes)
# are handled whole.
#
# Any violation raises ProtocolError inside the parser; events() is the
# one place that turns it into a close frame with the error's code, after
# which the protocol is CLOSED and ignores further input.
#
# Every state change goes through _set_state(), receive_eof() included, and
# entering CLOSED decides how TCP must end once `outgoing` is written
# (`end_of_output`): CLOSE when both close frames have crossed or the peer
# is gone (the server closes first, RFC 6455 section 7.1.1); SHUT_WR when we
# failed the connection or refused the request while the peer may still be
# sending: closing at once could reset the connection and destroy our answer
# before it is read, so the I/O layer half-closes and reads until EOF.  The
# I/O layer only carries this out.

# What the I/O layer does with TCP once the protocol is CLOSED and its
# output is written (Protocol.end_of_output).
CLOSE = "close"
SHUT_WR = "shut_wr"

_TRANSITIONS = {
    State.CONNECTING: (State.OPEN, State.CLOSED),
    State.OPEN: (State.CLOSING, State.CLOSED),
    State.CLOSING: (State.CLOSED,),
    State.CLOSED: (),
}

_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_get_ident = threading.get_ident
_EVENT_READ = selectors.EVENT_READ
_EVENT_WRITE = selectors.EVENT_WRITE

# Hot-path aliases: enum attribute lookups are slow on older Pythons.
_OPEN = State.OPEN
_CLOSING = State.CLOSING
_CLOSED = State.CLOSED
_CONNECTING = State.CONNECTING
_EV_TEXT = Event.TEXT
_EV_BINARY = Event.BINARY
_OP_TEXT = int(Opcode.TEXT)
_OP_CONTINUATION = int(Opcode.CONTINUATION)


class _Incoming:
    """A data message arriving in pieces (fragments, or reads that split a
    frame), and the frame being read.  A Protocol holds one only while such
    a message is in progress."""

    __slots__ = (
        "opcode",
        "compressed",
        "size",
        "fragments",
        "inflated",
        "data",
        "parts",
        "utf8",
        "frame_fin",
        "frame_mask",
        "frame_offset",
        "frame_remaining",
        "in_payload",
    )

    def __init__(self, opcode: int, compressed: bool):
        self.opcode = opcode
        self.compressed = compressed  # RSV1 on the first frame (permessage-deflate)
        self.size = 0  # payload bytes announced so far (before inflating)
        self.fragments = 0
        self.inflated = 0
        # The pieces: large ones kept as they are (joined once at the end:
        # one copy), small ones gathered in a bytearray (so a peer that
        # trickles bytes cannot make a list of tiny objects).
        self.data: Optional[bytearray] = None
        self.parts: Optional[List[bytes]] = None
        self.utf8: Any = None  # an incremental UTF-8 decoder, for text in pieces
        # The frame whose payload is being read.
        self.frame_fin = True
        self.frame_mask: Optional[bytes] = None
        self.frame_offset = 0
        self.frame_remaining = 0
        self.in_payload = False


class _Handshake:
    """What a Protocol knows only for its opening handshake (RFC 6455
    section 4): kept while it runs, and after it by a client (its
    ``response``) or a connection that failed it (its error); dropped by a
    server's accept(), since an open server connection needs none of it."""

    __slots__ = ("compression", "opened", "is_upgrade", "error", "negotiated", "response", "key",
                 "offered_subprotocols", "refused_response")

    def __init__(self, compression: Optional[Deflate]) -> None:
        self.compression = compression  # the permessage-deflate settings to offer or accept
        self.opened = False  # client: a valid 101 came
        self.is_upgrade = False  # server: the request is a valid upgrade
        self.error: Optional[HandshakeError] = None
        # Server: the permessage-deflate answer and codec agreed, for accept().
        self.negotiated: Optional[Tuple[str, _PerMessageDeflate]] = None
        self.response: Optional[Response] = None  # client: the server's answer
        self.key = ""  # client: the Sec-WebSocket-Key sent
        self.offered_subprotocols: Iterable[str] = ()
        self.refused_response: Optional[Tuple[Response, str]] = None  # client: a non-101 being read


class Protocol:
    """One side of a WebSocket connection, without I/O (RFC 6455).

    Feed it bytes with :meth:`receive_data`, act on each event that
    :meth:`events` yields, and write out what it leaves in :attr:`outgoing`
    (removing what was written; :meth:`data_to_send` does both at once).
    A server's by default; ``client=True`` makes a client's, which starts
    with :meth:`request_upgrade`, masks what it sends and refuses masked
    frames.
    """

    __slots__ = (
        "state",
        "client",
        "outgoing",
        "_request",
        "_handshake",
        "subprotocol",
        "close_code",
        "close_reason",
        "close_sent",
        "close_sent_reason",
        "_close_detail",
        "_sent_first",
        "end_of_output",
        "max_size",
        "max_fragments",
        "extension",
        "_buffer",
        "_unbuffered",
        "_incoming",
        "_mask_length",
        "_mask_bit",
        "_frames",
    )

    def __init__(
        self,
        max_size: Optional[int] = DEFAULT_MAX_SIZE,
        max_fragments: Optional[int] = None,
        compression: Optional[Deflate] = None,
        *,
        client: bool = False,
    ):
        if max_size is None:
            max_size = _UNLIMITED_SIZE  # no limit: at the user's risk
        self.state = State.CONNECTING
        self.client = client
        # Client frames carry a mask, server frames none (RFC 6455 5.1).
        self._mask_length = 0 if client else MASK_LENGTH
        self._mask_bit = 0 if client else _MASK_BIT
        self.outgoing = bytearray()
        # The request (server side): parsed while the handshake runs, then
        # only its head as bytes (see the request property).
        self._request: Union[Request, bytes, None] = None
        self._handshake: Optional[_Handshake] = _Handshake(compression)  # None once a server accepted
        self.subprotocol: Optional[str] = None
        # The peer's close frame (NO_STATUS if it had no code); ABNORMAL when
        # the connection ended without one.
        self.close_code: Optional[int] = None
        self.close_reason = ""
        # The close frame we sent, if any.
        self.close_sent: Optional[int] = None
        self.close_sent_reason = ""
        self._close_detail = ""  # why we failed the connection, kept local
        self._sent_first = False  # our close frame went before the peer's
        self.end_of_output: Optional[str] = None  # CLOSE or SHUT_WR once CLOSED
        self.max_size = max_size
        self.max_fragments = (
            max_fragments if max_fragments is not None else _default_max_fragments(max_size)
        )
        # permessage-deflate: the codec in use once accepted.
        self.extension: Optional[_PerMessageDeflate] = None
        # Bytes received and kept for later: a bytearray while there are
        # some, the shared b"" when there are none (an idle connection then
        # holds no buffer of its own).
        self._buffer: Union[bytes, bytearray] = bytearray()
        # Bytes received but not copied (see receive_data).
        self._unbuffered: Optional[Union[bytes, bytearray, memoryview]] = None
        # The frame whose payload is being consumed.
        # The data message being received in pieces, and its frame being
        # read: only while there is one (an idle connection holds none).
        self._incoming: Optional[_Incoming] = None
        # Frames read by the general path (control frames, fragments, and
        # what the fast path leaves) since take_frames(): what a rate limit
        # charges besides whole messages.
        self._frames = 0

    def __repr__(self) -> str:
        return "<Protocol %s>" % self.state.value

    @property
    def request(self) -> Optional[Request]:
        """The client's request (server side), None until it has arrived.

        After :meth:`accept` the protocol keeps only the request's head as
        bytes, and each access builds a new, equal Request from it: an idle
        connection holds one bytes object rather than a Request and its
        strings, whatever the handler reads (from any thread, after the
        close too)."""
        request = self._request
        if isinstance(request, bytes):
            return _request_from_head(request)
        return request

    @property
    def opened(self) -> bool:
        """The opening handshake succeeded (the connection was open, or is)."""
        handshake = self._handshake
        return True if handshake is None else handshake.opened  # None: a server accepted

    @property
    def is_upgrade(self) -> bool:
        """Server: the request is a valid WebSocket upgrade (not plain HTTP)."""
        handshake = self._handshake
        return True if handshake is None else handshake.is_upgrade  # None: accepted

    @property
    def handshake_error(self) -> Optional[HandshakeError]:
        """Why the opening handshake failed, if it did."""
        handshake = self._handshake
        return None if handshake is None else handshake.error

    @property
    def response(self) -> Optional[Response]:
        """Client: the server's answer to the opening handshake."""
        handshake = self._handshake
        return None if handshake is None else handshake.response

    def _handshaking(self) -> _Handshake:
        """The handshake's state, for the methods that only run during it."""
        handshake = self._handshake
        if handshake is None:
            raise InvalidState("the opening handshake is over")
        return handshake

    # -- state ----------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        """The one place the state changes (see the theory of operation)."""
        if state not in _TRANSITIONS[self.state]:
            raise InvalidState("cannot go from %s to %s" % (self.state.name, state.name))
        self.state = state
        if state is _CLOSED:
            self._buffer = b""
            self._unbuffered = None
            self._incoming = None
            peer_done = self.close_code is not None  # its close frame came, or EOF
            if self.client:
                # A client leaves closing TCP to the server (RFC 6455 7.1.1): it
                # half-closes and waits for the server's EOF.  A handshake that
                # failed has no WebSocket to close: it drops TCP at once (4.1,
                # "_Fail the WebSocket Connection_") rather than read whatever
                # the server goes on sending.
                self.end_of_output = SHUT_WR if self.opened else CLOSE
            else:
                self.end_of_output = CLOSE if peer_done else SHUT_WR

    # -- input ----------------------------------------------------------------

    def receive_data(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Take bytes from the peer; :meth:`events` then returns what they complete.

        ``data`` is not copied when nothing is buffered: :meth:`events` parses
        it where it lies and keeps a copy of what is left over.  So a caller
        that reuses its buffer must run :meth:`events` before it does.
        """
        if self.state is _CLOSED:
            return
        if self._unbuffered is not None:
            # Two receives before events(): keep the first one's bytes.
            self._keep(self._unbuffered)
            self._unbuffered = None
        if self._buffer or self.state is _CONNECTING:
            self._keep(data)
        else:
            self._unbuffered = data

    def _keep(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Append ``data`` to the kept bytes (a bytearray of their own)."""
        if self._buffer:
            self._buffer += data
        else:
            self._buffer = bytearray(data)

    def whole_message(self, data: Union[bytes, bytearray, memoryview]) -> Optional[Tuple[Event, Any]]:
        """The common case in one step: if ``data`` is exactly one short,
        whole, uncompressed text or binary message and nothing else is
        pending, return its event (TEXT or BINARY) as :meth:`events` would.
        Otherwise return None and take nothing: pass ``data`` to
        :meth:`receive_data` as usual.  (A shortcut, no more: anything it
        does not recognise, such as invalid UTF-8, takes the full path.)
        """
        if self.state is not _OPEN or self._buffer or self._unbuffered is not None:
            return None
        header_length = 2 + self._mask_length
        length = len(data) - header_length
        # Only a 7-bit length: with 126 or 127 the bytes after the first two
        # are an extended length, not payload.
        if length < 0 or length > _MAX_LENGTH_7 or data[1] & _LENGTH_BITS != length:
            return None
        try:
            if not self._check_header(data[0], data[1], length):
                return None
            return self._whole_event(data[0], data, header_length, len(data))
        except ProtocolError:
            return None  # a bad header, or invalid UTF-8: the full path fails the connection

    def _whole_event(
        self, first: int, data: Union[bytes, bytearray, memoryview], start: int, end: int
    ) -> Tuple[Event, Any]:
        """The event of a whole, unfragmented, uncompressed message whose
        payload is ``data[start:end]`` (its masking key just before it when
        the peer masks); ProtocolError (1007) for text that is not UTF-8."""
        if self._mask_length:
            payload = _unmask(data[start:end], data[start - MASK_LENGTH : start])
        else:
            payload = bytes(data[start:end])
        if first == _WHOLE_BINARY:
            return (_EV_BINARY, payload)
        try:
            return (_EV_TEXT, payload.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError("invalid UTF-8 in text message", CloseCode.INVALID_DATA) from None

    def events(self) -> Generator[Tuple[Event, Any], None, None]:
        """Yield the events in the bytes received so far, one at a time.

        Events are parsed lazily, so what the caller does with one (a reply,
        a close) is queued before anything the next frame causes: if a valid
        message is followed by a bad frame, the reply goes out before the
        close frame, as the peer expects.
        """
        if self.state is _CONNECTING:
            if self.client:
                if self._receive_response():
                    yield (Event.RESPONSE, self.response)
            elif self._request is None:
                request = self._receive_request()
                if request is not None:
                    yield (Event.REQUEST if self.is_upgrade else Event.HTTP_REQUEST, request)
            if self.state is _CONNECTING:
                return  # not accepted (yet): keep the bytes for later
        buffer: Union[bytes, bytearray, memoryview]
        in_place = self._unbuffered is not None
        if self._unbuffered is not None:
            buffer = self._unbuffered
            self._unbuffered = None
        else:
            buffer = self._buffer
        end = len(buffer)
        position = 0
        mask_length = self._mask_length  # MASK_LENGTH from clients, 0 from servers
        try:
            while self.state is _OPEN or self.state is _CLOSING:
                incoming = self._incoming
                if incoming is not None and incoming.in_payload:
                    available = end - position
                    remaining = incoming.frame_remaining
                    if available < remaining:
                        if not available:
                            break
                        chunk = buffer[position:end]
                        position = end
                        incoming.frame_remaining = remaining - available
                        event = self._receive_payload(incoming, chunk, False)
                    else:
                        chunk = buffer[position : position + remaining]
                        position += remaining
                        incoming.frame_remaining = 0
                        incoming.in_payload = False
                        event = self._receive_payload(incoming, chunk, True)
                    if event is not None:
                        # Drop the pieces of the message delivered before
                        # the handler runs: holding them (256 KiB for a large
                        # message) cost a third of large-message throughput.
                        incoming = None
                        yield event
                    continue
                if end - position < 2:
                    break
                first = buffer[position]
                second = buffer[position + 1]
                length = second & _LENGTH_BITS
                header_length = _HEADER_7
                if length == _LENGTH_16:
                    header_length = _HEADER_16
                    if end - position < _HEADER_16 - MASK_LENGTH:
                        break
                    length = _unpack_16(buffer, position + 2)[0]
                elif length == _LENGTH_64:
                    header_length = _HEADER_64
                    if end - position < _HEADER_64 - MASK_LENGTH:
                        break
                    length = _unpack_64(buffer, position + 2)[0]
                if not mask_length:
                    header_length -= MASK_LENGTH  # a server's frame: no mask
                if self._check_header(first, second, length) and end - position >= header_length + length:
                    # Fast path, the common case: a whole unfragmented,
                    # uncompressed text or binary message, all received.
                    # It skips the per-frame state and unmasks the payload
                    # in one call straight out of the received bytes.
                    payload_start = position + header_length
                    position = payload_start + length
                    yield self._whole_event(first, buffer, payload_start, position)
                    continue
                opcode = first & 0x0F
                if end - position < header_length:
                    break
                mask = None
                if mask_length:
                    mask = bytes(buffer[position + header_length - MASK_LENGTH : position + header_length])
                if opcode >= 8:
                    # Control frames are short: handle them whole.
                    frame_end = position + header_length + length
                    if frame_end > end:
                        break
                    payload = buffer[position + header_length : frame_end]
                    payload = _unmask(payload, mask) if mask else bytes(payload)
                    position = frame_end
                    self._frames += 1
                    yield self._receive_control(opcode, payload)
                    continue
                position += header_length
                self._frames += 1
                incoming = self._start_data_frame(opcode, first, length)
                incoming.frame_mask = mask
                incoming.frame_offset = 0
                incoming.frame_remaining = length
                incoming.in_payload = True
        except ProtocolError as exc:
            # The one place where a violation becomes a close frame.
            self._fail(exc.code, exc.reason, exc.detail)
        finally:
            if self.state is _CLOSED:
                self._buffer = b""
            elif in_place:
                if position < end:
                    self._keep(buffer[position:end])  # the caller may reuse its buffer
            else:  # `buffer` is self._buffer here
                if position:
                    del self._buffer[:position]  # type: ignore[union-attr]  # a bytearray when not empty
                if not self._buffer:
                    self._buffer = b""

    def take_frames(self) -> int:
        """How many frames the general path has read since the last call:
        every control frame and fragment, but not a whole message that
        took the fast path (which the caller counts as its message)."""
        frames = self._frames
        self._frames = 0
        return frames

    def receive_eof(self) -> None:
        """The peer closed its side of TCP (or the connection dropped)."""
        handshake = self._handshake
        if handshake is not None:
            if handshake.refused_response is not None:
                try:
                    self._read_refused_body(handshake, eof=True)  # a refusal's body ends with the connection
                except HandshakeError as exc:
                    handshake.error = exc
            elif self.client and self.state is _CONNECTING and handshake.error is None:
                handshake.error = InvalidResponse("connection closed before the server answered")
        if self.close_code is None:
            self.close_code = CloseCode.ABNORMAL
        if self.state is not _CLOSED:
            self.outgoing.clear()  # nobody is left to read it
            self._set_state(_CLOSED)
        self.end_of_output = CLOSE

    def data_to_send(self) -> bytes:
        """Return and forget everything queued for the peer."""
        data = bytes(self.outgoing)
        self.outgoing.clear()
        return data

    # -- handshake: the client's side -----------------------------------------

    def request_upgrade(
        self,
        host: str,
        target: str = "/",
        headers: Iterable[Tuple[str, str]] = (),
        subprotocols: Iterable[str] = (),
        origin: Optional[str] = None,
    ) -> None:
        """Client: queue the opening handshake's request (RFC 6455 4.1).

        ``host`` is the Host header's value, ``target`` the path and query.
        The server's answer comes out of :meth:`events` as a RESPONSE (the
        connection is then OPEN) or, refused or invalid, leaves the protocol
        CLOSED with :attr:`handshake_error` set.  Raises ValueError for a
        header that would break the request.
        """
        handshake = self._handshake
        if not self.client or self.state is not _CONNECTING or handshake is None or handshake.key:
            raise InvalidState("only a new client protocol sends a request")
        if not target.startswith("/") or any(not " " < char < "\x7f" for char in target):
            raise ValueError("request target must be a path and query, got %r" % target)
        handshake.key = base64.b64encode(os.urandom(16)).decode("ascii")
        offered = handshake.offered_subprotocols = tuple(subprotocols)
        lines = [
            "GET %s HTTP/1.1" % target,
            _header_line("Host", host),
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: " + handshake.key,
            "Sec-WebSocket-Version: 13",
        ]
        if origin is not None:
            lines.append(_header_line("Origin", origin))
        if offered:
            lines.append(_header_line("Sec-WebSocket-Protocol", ", ".join(offered)))
        if handshake.compression is not None:
            lines.append("Sec-WebSocket-Extensions: " + _deflate_offer(handshake.compression))
        lines.extend(_header_line(name, value) for name, value in headers)
        self.outgoing += ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _receive_response(self) -> bool:
        """Client: read the server's answer; True once a valid 101 opened us."""
        handshake = self._handshaking()
        try:
            if handshake.refused_response is None:
                parsed = _parse_response_head(self._buffer)
                if parsed is None:
                    return False
                response, reason, head_length = parsed
                del self._buffer[:head_length]  # type: ignore[union-attr]  # a bytearray while connecting
                handshake.response = response
                if response.status == 101:
                    self._check_switch(handshake, Headers(response.headers))
                    handshake.opened = True
                    self._set_state(_OPEN)
                    return True
                handshake.refused_response = (response, reason)
            self._read_refused_body(handshake, eof=False)
        except HandshakeError as exc:
            handshake.error = exc
            self._set_state(_CLOSED)
        return False

    def _read_refused_body(self, handshake: _Handshake, eof: bool) -> None:
        """Keep a refusal's body (up to a limit) until it is whole, then fail."""
        if handshake.refused_response is None:
            return
        response, reason = handshake.refused_response
        length_text = Headers(response.headers).get("Content-Length")
        wanted = int(length_text) if length_text and length_text.isdigit() else None
        limit = MAX_REQUEST_HEAD if wanted is None else min(wanted, MAX_REQUEST_HEAD)
        if len(self._buffer) >= limit or eof:
            body = bytes(self._buffer[:limit])
            handshake.refused_response = None
            raise HandshakeError(response.status, reason, response.headers, body)

    def _check_switch(self, handshake: _Handshake, headers: Headers) -> None:
        """Validate a 101 (RFC 6455 4.1, the client's checks)."""
        def refuse(why: str) -> InvalidUpgrade:
            return InvalidUpgrade(why, headers.items())

        if "websocket" not in _header_tokens(headers.get("Upgrade")):
            raise refuse("Upgrade header must name websocket")
        if "upgrade" not in _header_tokens(headers.get("Connection")):
            raise refuse("Connection header must include upgrade")
        if headers.get("Sec-WebSocket-Accept") != accept_key(handshake.key):
            raise refuse("Sec-WebSocket-Accept does not match the key sent")
        extensions = headers.get_all("Sec-WebSocket-Extensions")
        if extensions:
            if handshake.compression is None:
                raise refuse("an extension was not offered")
            self.extension = _accept_deflate(extensions, handshake.compression)
        subprotocols = [token.strip() for token in ",".join(headers.get_all("Sec-WebSocket-Protocol")).split(",")]
        subprotocols = [token for token in subprotocols if token]
        if subprotocols:
            if len(subprotocols) != 1 or subprotocols[0] not in handshake.offered_subprotocols:
                raise refuse("subprotocol %s was not offered" % ", ".join(subprotocols))
            self.subprotocol = subprotocols[0]

    # -- handshake: the server's side -----------------------------------------

    def _receive_request(self) -> Optional[Request]:
        handshake = self._handshaking()
        try:
            parsed = _parse_request_head(self._buffer)
            if parsed is None:
                return None
            request, head_length = parsed
            del self._buffer[:head_length]  # type: ignore[union-attr]  # a bytearray while connecting
            self._request = request
            handshake.is_upgrade = _check_upgrade_request(request)
            if handshake.is_upgrade and handshake.compression is not None:
                offers = _parse_extensions(request.headers.get_all("Sec-WebSocket-Extensions"))
                handshake.negotiated = _negotiate_deflate(offers, handshake.compression)
        except HandshakeError as exc:
            handshake.error = exc
            # A server's HandshakeError always carries the status to answer.
            self.respond(exc.status or 400, exc.headers, exc.reason.encode() + b"\n")
            return None
        return request

    def accept(self, headers: Iterable[Tuple[str, str]] = (), subprotocol: Optional[str] = None) -> None:
        """Answer the upgrade request with 101 and open the connection.

        ``headers`` are added to the response, and ``subprotocol`` (one the
        client offered) as Sec-WebSocket-Protocol.  Frames that arrived
        along with the request come out of :meth:`events` next.
        """
        request = self._request
        handshake = self._handshake
        if (
            not isinstance(request, Request)
            or handshake is None
            or not handshake.is_upgrade
            or self.state is not _CONNECTING
        ):
            raise InvalidState("no upgrade request to accept")
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Accept: " + accept_key(request.headers.get("Sec-WebSocket-Key") or ""),
        ]
        if handshake.negotiated is not None:
            response, self.extension = handshake.negotiated
            lines.append("Sec-WebSocket-Extensions: " + response)
        if subprotocol is not None:
            self.subprotocol = subprotocol
            lines.append("Sec-WebSocket-Protocol: " + subprotocol)
        lines.extend("%s: %s" % item for item in headers)
        self.outgoing += ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # What an open connection keeps of its handshake: the request's head.
        self._request = _request_head(request)
        self._handshake = None  # so opened, and is_upgrade
        self._set_state(_OPEN)

    def respond(
        self, status: int, headers: Iterable[Tuple[str, str]] = (), body: bytes = b""
    ) -> None:
        """Answer the request (or what there is of it) with an HTTP response
        (an error, or a plain page) and close the connection."""
        if self.state is not _CONNECTING:
            raise InvalidState("cannot respond in state %s" % self.state.name)
        # RFC 9110 9.3.2: HEAD gets the headers GET would, and no body.
        request = self._request  # a Request, or None, while connecting
        head_only = isinstance(request, Request) and request.method == "HEAD"
        self.outgoing += _http_response(status, headers, body, head_only)
        self._set_state(_CLOSED)

    # -- frames ---------------------------------------------------------------

    def _check_header(self, first: int, second: int, length: int) -> bool:
        """Reject a bad frame from its header alone, before reading its
        payload: the one place frame headers are checked, for the fast paths
        (whole_message, events) and the general one alike.  True when the
        frame is a whole text or binary message that may take a fast path:
        unfragmented, uncompressed, within max_size, while open and no other
        message is arriving in pieces."""
        if (
            (first == _WHOLE_TEXT or first == _WHOLE_BINARY)
            and second & _MASK_BIT == self._mask_bit
            and length <= self.max_size
            and self._incoming is None
            and self.state is _OPEN
        ):
            return True  # every check below passes for such a frame
        opcode = first & 0x0F
        if first & _RSV_BITS:
            # RFC 7692 6.1: RSV1 only on the first frame of a data message,
            # and only once permessage-deflate was negotiated.
            if first & _RSV_BITS != _RSV1 or self.extension is None:
                raise ProtocolError("reserved bits set without an extension")
            if opcode == _OP_CONTINUATION or opcode >= 8:
                raise ProtocolError("RSV1 on a control or continuation frame")
        if second & _MASK_BIT != self._mask_bit:
            # RFC 6455 5.1: a server MUST close on an unmasked client frame,
            # and a client on a masked server frame.
            raise ProtocolError("server frame is masked" if self.client else "client frame is not masked")
        if opcode >= 8:
            if opcode > 0xA:
                raise ProtocolError("reserved opcode %d" % opcode)
            if length > MAX_CONTROL_PAYLOAD:
                raise ProtocolError("control frame payload over %d bytes" % MAX_CONTROL_PAYLOAD)
            if not first & _FIN:
                raise ProtocolError("fragmented control frame")
            return False
        if opcode > 2:
            raise ProtocolError("reserved opcode %d" % opcode)
        if length >> 63:
            raise ProtocolError("frame length with the most significant bit set")
        incoming = self._incoming
        if opcode == _OP_CONTINUATION:
            if incoming is None:
                raise ProtocolError("continuation frame with nothing to continue")
        elif incoming is not None:
            raise ProtocolError("new data frame inside a fragmented message")
        limit = self.max_size
        if first & _RSV1 or (incoming is not None and incoming.compressed):
            # Deflate may grow incompressible data a little; the inflated
            # size is held to max_size itself as it is produced.
            limit += (limit >> 6) + 1024
        if (0 if incoming is None else incoming.size) + length > limit:
            raise ProtocolError(
                "message over %d bytes" % self.max_size, CloseCode.MESSAGE_TOO_BIG,
                "{:,} bytes > max_size {:,}".format((0 if incoming is None else incoming.size) + length, self.max_size),
            )
        return False

    def _start_data_frame(self, opcode: int, first: int, length: int) -> _Incoming:
        incoming = self._incoming
        if incoming is None:  # not a continuation: _check_header made sure
            incoming = self._incoming = _Incoming(opcode, bool(first & _RSV1))
        incoming.fragments += 1
        if incoming.fragments > self.max_fragments:
            raise ProtocolError(
                "message in over %d fragments" % self.max_fragments, CloseCode.MESSAGE_TOO_BIG,
                "over max_fragments {:,} frames in one message".format(self.max_fragments),
            )
        incoming.size += length
        incoming.frame_fin = bool(first & _FIN)
        return incoming

    def _receive_payload(
        self, incoming: _Incoming, chunk: Union[bytes, bytearray, memoryview], frame_done: bool
    ) -> Optional[Tuple[Event, Any]]:
        """Take the next piece of a data frame's payload."""
        mask = incoming.frame_mask
        if mask is None:
            data = bytes(chunk)
        else:
            offset = incoming.frame_offset
            if offset & 3:  # offset % MASK_LENGTH: the mask continues mid-key
                mask = mask[offset & 3 :] + mask[: offset & 3]
            incoming.frame_offset = offset + len(chunk)
            data = _unmask(chunk, mask)
        message_done = frame_done and incoming.frame_fin
        if incoming.compressed:
            extension: Any = self.extension  # set whenever a message is compressed
            data = extension.decompress(data, message_done, self.max_size - incoming.inflated)
            incoming.inflated += len(data)
        tail = incoming.data
        if message_done and tail is None:
            # The whole message is in this one piece: the fast, common case.
            return self._message_event(incoming.opcode, data)
        if tail is None:
            tail = incoming.data = bytearray()
            if incoming.opcode == _OP_TEXT:
                incoming.utf8 = _utf8_decoder()
        if len(data) >= _WHOLE_PIECE and type(data) is bytes:
            parts = incoming.parts
            if parts is None:
                parts = incoming.parts = []
            if tail:
                parts.append(bytes(tail))
                tail.clear()
            parts.append(data)
        else:
            tail += data
        if incoming.utf8 is not None:
            # Check the text as it arrives, to fail at the first bad byte.
            try:
                incoming.utf8.decode(data, message_done)
            except UnicodeDecodeError:
                raise ProtocolError("invalid UTF-8 in text message", CloseCode.INVALID_DATA) from None
        if not message_done:
            return None
        parts = incoming.parts
        if parts is None:
            return self._message_event(incoming.opcode, tail)
        if tail:
            parts.append(bytes(tail))
        return self._message_event(incoming.opcode, b"".join(parts))  # bytes: _message_event copies it no more

    def _message_event(self, opcode: int, data: Union[bytes, bytearray]) -> Optional[Tuple[Event, Any]]:
        """The message is complete: hand it on (``data`` is all of it)."""
        self._incoming = None
        if self.state is not _OPEN:
            return None  # we sent a close: nothing more is delivered
        if opcode == _OP_TEXT:
            try:
                return (_EV_TEXT, data.decode("utf-8"))
            except UnicodeDecodeError:
                raise ProtocolError("invalid UTF-8 in text message", CloseCode.INVALID_DATA) from None
        return (_EV_BINARY, bytes(data))

    def _receive_control(self, opcode: int, payload: bytes) -> Tuple[Event, Any]:
        if opcode == Opcode.PING:
            if self.state is _OPEN:
                # RFC 6455 5.5.2: answer with a pong carrying the same data.
                self._write_frame(_FIN | Opcode.PONG, payload)
            return (Event.PING, payload)
        if opcode == Opcode.PONG:
            return (Event.PONG, payload)
        code, reason = _parse_close_payload(payload)
        self.close_code = code
        self.close_reason = reason
        if self.state is _OPEN:
            # RFC 6455 5.5.1: echo the status code in the reply.
            reply = None if code == CloseCode.NO_STATUS else code
            self._write_frame(_FIN | Opcode.CLOSE, _close_payload(reply))
            self.close_sent = reply if reply is not None else CloseCode.NO_STATUS
            self.close_sent_reason = ""
        self._set_state(_CLOSED)
        return (Event.CLOSE, (code, reason))

    def _fail(self, code: int, reason: str, detail: str = "") -> None:
        """Fail the connection (RFC 6455 7.1.7): send a close, then stop."""
        if self.state is _OPEN:
            self._write_frame(_FIN | Opcode.CLOSE, _close_payload(code, reason))
            self.close_sent = code
            self.close_sent_reason = reason
            self._close_detail = detail
            self._sent_first = self.close_code is None
        if self.state is not _CLOSED:
            self._set_state(_CLOSED)

    # -- output ---------------------------------------------------------------
    #
    # Every byte a Protocol sends is written here: messages by send(),
    # control frames by _write_frame(), both with headers from
    # _frame_header().  A caller that keeps its output as a queue of chunks
    # after `outgoing` (Connection) passes ``reference_from``: a payload or a
    # shared frame that large is then handed back for it to queue by
    # reference, not copied (a large message goes out as its header and its
    # payload in one sendmsg(), never joined; a broadcast frame is held once).

    def check_send(self, message: Any) -> Union[str, bytes, PreparedMessage]:
        """``message`` as :meth:`send` takes it, or the error send() would
        raise: :class:`ConnectionClosed` unless the connection is open,
        TypeError unless it is a ``str``, bytes-like (copied: the caller may
        reuse its buffer) or :class:`PreparedMessage`.  Also for a caller in
        another thread, which must get its errors in its own thread."""
        if self.state is not _OPEN:
            raise self.closed_error()
        if isinstance(message, PreparedMessage):
            return message
        return _checked_message(message)

    def send(
        self, message: Union[str, bytes, PreparedMessage], reference_from: int = _UNLIMITED_SIZE
    ) -> Optional[bytes]:
        """Queue a text (``str``) or binary (``bytes``) message, or a
        :class:`PreparedMessage`, as one frame (compressed if negotiated,
        masked from a client).

        Returns None when the frame is all in :attr:`outgoing`; with
        ``reference_from``, a payload or shared frame of at least that many
        bytes is returned instead, to be written right after ``outgoing``.
        """
        if type(message) is str and self.state is _OPEN and self.extension is None and not self.client:
            # The common case, first: plain text from a server.
            payload = message.encode("utf-8")
            length = len(payload)
            if length < _LENGTH_16 and length < reference_from:
                # Its header from a table, and two appends rather than a
                # header built and joined to the payload first.
                outgoing = self.outgoing
                outgoing += _SHORT_TEXT_HEADERS[length]
                outgoing += payload
                return None
            return self._write_frame(_WHOLE_TEXT, payload, reference_from)
        message = self.check_send(message)
        extension = self.extension
        if isinstance(message, PreparedMessage):
            key = None if extension is None else extension.shared_key
            if self.client or (extension is not None and key is None):
                message = message.message  # masked, or compressed with our own context: ours alone
            else:
                # Framed once for every connection with the same settings.
                frame = message.frames.get(key)
                if frame is None:
                    first, payload = self._message_payload(message.message)
                    frame = message.frames[key] = _frame_header(first, len(payload)) + payload
                if len(frame) >= reference_from:
                    return frame
                self.outgoing += frame
                return None
        first, payload = self._message_payload(message)
        return self._write_frame(first, payload, reference_from)

    def _message_payload(self, message: Union[str, bytes]) -> Tuple[int, bytes]:
        """The first header byte and the payload of ``message`` in one frame."""
        if isinstance(message, str):
            first, payload = _WHOLE_TEXT, message.encode("utf-8")
        else:
            first, payload = _WHOLE_BINARY, message
        extension = self.extension
        if extension is not None:
            compressed = extension.compress(payload)
            if compressed is not None:
                # RFC 7692 6.1: RSV1 marks the first (here: only) frame of a compressed message.
                return first | _RSV1, compressed
        return first, payload

    def _write_frame(self, first_byte: int, payload: bytes, reference_from: int = _UNLIMITED_SIZE) -> Optional[bytes]:
        """Write one frame into :attr:`outgoing`, or return what the caller
        queues after it (see :meth:`send`): a small frame whole, a large
        one's payload (its header is written)."""
        length = len(payload)
        if self.client:
            # RFC 6455 5.3: every client frame masked with a fresh random key.
            key = os.urandom(MASK_LENGTH)
            header = _frame_header(first_byte, length, _MASK_BIT) + key
            payload = _unmask(payload, key)  # XOR both ways
        else:
            header = _frame_header(first_byte, length)
        if length < reference_from:
            self.outgoing += header
            self.outgoing += payload
            return None
        if length < _COPY_FREE_FROM:
            return header + payload  # one chunk: cheaper than two when small
        self.outgoing += header
        return payload

    def closed_error(self, message: str = "") -> ConnectionClosed:
        """A :class:`ConnectionClosed` that says how this connection ended
        (or is ending): the close frames received and sent, and why."""
        return ConnectionClosed(
            message,
            code=CloseCode.ABNORMAL if self.close_code is None else self.close_code,
            reason=self.close_reason,
            sent_code=self.close_sent,
            sent_reason=self.close_sent_reason,
            detail=self._close_detail,
            sent_first=self._sent_first,
        )

    def ping(self, payload: bytes = b"") -> None:
        """Queue a ping (at most 125 bytes of payload)."""
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise ValueError("ping payload over %d bytes" % MAX_CONTROL_PAYLOAD)
        if self.state is not _OPEN:
            raise self.closed_error()
        self._write_frame(_FIN | Opcode.PING, bytes(payload))

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake; a no-op unless the connection is open."""
        if not _is_valid_close_code(code):
            raise ValueError("%r is not a close code one may send" % (code,))
        encoded_reason = reason.encode("utf-8")
        if len(encoded_reason) > MAX_CLOSE_REASON:
            raise ValueError("close reason over %d bytes" % MAX_CLOSE_REASON)
        if self.state is not _OPEN:
            return
        self._write_frame(_FIN | Opcode.CLOSE, _close_payload(code, reason))
        self.close_sent = code
        self.close_sent_reason = reason
        self._sent_first = True
        self._set_state(_CLOSING)


# =============================================================================
# The loop: one thread, one selector, a timer heap, one door for other threads
# =============================================================================
#
# The thread contract
# -------------------
# The loop's thread owns every connection, its protocol, its timers and the
# server's tables.  Other threads never touch them: they put a callback on
# the loop's ready queue (call_soon_threadsafe, "the door") and wake the
# loop.  Every public method of Connection and Server either runs in the
# loop's thread or, called from another thread, checks its arguments there
# (so the caller gets its own errors) and goes through the door.  Callbacks
# queued by one thread run in the order it queued them.


class _Timer:
    """A callback due at ``when`` on the loop's clock; cancel() is O(1)."""

    __slots__ = ("when", "callback", "args", "loop")

    def __init__(self, when: float, callback: Callable[..., Any], args: Tuple[Any, ...], loop: _EventLoop):
        self.when = when
        self.callback: Optional[Callable[..., Any]] = callback
        self.args = args
        self.loop = loop

    def __lt__(self, other: _Timer) -> bool:
        return self.when < other.when

    def cancel(self) -> None:
        """Stop the callback from running; safe from any thread."""
        # Left in the heap and skipped when due: cheaper than removing it;
        # the loop compacts the heap when most of it is cancelled.  (A
        # plain assignment, so another thread may do it too; only the count
        # that drives compaction is kept by the loop's thread.)
        if self.callback is not None:
            self.callback = None
            self.args = ()
            if self.loop.in_loop_thread:
                self.loop.cancelled_timers += 1


# What the loop drives, named by what it calls rather than by class: the
# loop knows nothing of connections, listeners or Redis links.


class _Watched(typing.Protocol):
    """Registered with the selector as its own ``key.data``."""

    def _handle_io(self, mask: int) -> None:
        """Act on readiness (``mask`` of ``selectors.EVENT_*``)."""

    def _io_failed(self) -> None:
        """``_handle_io`` raised (a bug, logged by the loop): end what
        cannot go on, so one socket never takes the process down."""


class _Flushing(_Watched, typing.Protocol):
    """Writes its pending output once per turn, when scheduled."""

    def _flush(self) -> None:
        """Write what is pending, as much as the socket takes."""


class _KeptAlive(typing.Protocol):
    """Checked for pings and ping timeouts by the loop's keepalive sweep."""

    def _keepalive_check(self, now: float) -> None:
        """Send a ping or time out, as due at ``now`` (the loop's clock)."""


class _EventLoop:
    """A minimal selectors loop: readiness callbacks, timers, the door.

    Objects registered with the selector carry themselves as ``key.data``
    (a :class:`_Watched`).
    """

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: List[_Timer] = []
        self.cancelled_timers = 0
        # How late a timer ran, at most, since someone last asked: the
        # loop's lag (a busy loop serves everything late).
        self.lag_max = 0.0
        # Keepalive: one sweep over the connections that want pings, rather
        # than a timer (and its heap entry and bound method) for each idle
        # connection.  It runs every quarter of the shortest ping interval
        # or timeout, so a ping or a timeout comes at most that late.
        self._keepalive: Dict[_KeptAlive, None] = {}
        self._keepalive_tick = 0.0
        self._keepalive_timer: Optional[_Timer] = None
        # The door: (callback, args) to run on the loop's thread.  deque
        # appends and pops are atomic, so other threads may append.
        self._ready: Deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = collections.deque()
        # Guards each connection's count of message bytes other threads have
        # put through the door and the loop has not queued yet.
        self.crossing_lock = threading.Lock()
        self._flush_queue: List[_Flushing] = []
        # One receive buffer for every connection: the loop reads one socket
        # at a time, and the protocol copies out what it keeps.  RECV_SIZE
        # and a frame's largest header: a message of RECV_SIZE bytes (a round
        # size, as 256 KiB is) then comes in one read and takes the fast
        # path, unmasked once, rather than in two reads and joined.
        self.receive_buffer = bytearray(RECV_SIZE + _HEADER_64)
        self.receive_view = memoryview(self.receive_buffer)
        self._stopping = False
        # The thread that runs (or last ran) the loop: its owner.
        self.thread_id: Optional[int] = None
        # True while a wake-up byte is in flight, so a burst of calls from
        # other threads costs one system call, not one each.
        self._wake_pending = False
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self.selector.register(self._wake_reader, selectors.EVENT_READ, self)

    @property
    def in_loop_thread(self) -> bool:
        return self.thread_id == _get_ident()

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> _Timer:
        """Run ``callback(*args)`` in ``delay`` seconds; from any thread."""
        timer = _Timer(time.monotonic() + delay, callback, args, self)
        if self.in_loop_thread:
            self._push_timer(timer)
        else:
            self.call_soon_threadsafe(self._push_timer, timer)
        return timer

    def _push_timer(self, timer: _Timer) -> None:
        if timer.callback is None:
            return  # cancelled before it crossed the door
        timers = self._timers
        if self.cancelled_timers > 64 and self.cancelled_timers * 2 > len(timers):
            # Most of the heap is dead weight (every handshake cancels its
            # open timeout): drop the cancelled timers rather than keep them
            # until their deadlines.
            timers[:] = [entry for entry in timers if entry.callback is not None]
            heapq.heapify(timers)
            self.cancelled_timers = 0
        heapq.heappush(timers, timer)

    def watch_keepalive(self, connection: _KeptAlive, period: float) -> None:
        """Have ``connection._keepalive_check(now)`` called about every
        ``period / 4`` seconds (loop thread only)."""
        self._keepalive[connection] = None
        tick = max(period / 4, 0.01)
        if self._keepalive_timer is None or tick < self._keepalive_tick:
            if self._keepalive_timer is not None:
                self._keepalive_timer.cancel()
            self._keepalive_tick = tick
            self._keepalive_timer = self.call_later(tick, self._sweep_keepalive)

    def unwatch_keepalive(self, connection: _KeptAlive) -> None:
        self._keepalive.pop(connection, None)

    def _sweep_keepalive(self) -> None:
        self._keepalive_timer = None
        if not self._keepalive:
            self._keepalive_tick = 0.0
            return  # started again by the next watch_keepalive()
        now = time.monotonic()
        for connection in list(self._keepalive):
            try:
                connection._keepalive_check(now)
            except Exception:
                logger.exception("error in keepalive of %r", connection)
        self._keepalive_timer = self.call_later(self._keepalive_tick, self._sweep_keepalive)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the next turn (loop thread only)."""
        self._ready.append((callback, args))

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """The door: run ``callback(*args)`` on the loop's thread, soon."""
        self._ready.append((callback, args))
        # Wake even from the loop's own thread: a signal handler runs there
        # while select() waits, and select() resumes after it.
        self._wake()

    def schedule_flush(self, connection: _Flushing) -> None:
        """Have ``connection`` write its output once, at the end of this turn."""
        self._flush_queue.append(connection)

    def _wake(self) -> None:
        # The flag is cleared by the loop before it runs the ready queue, so
        # a callback queued while it is set is run by that turn or the next.
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the pipe is full of wake-ups: the loop is awake
        except OSError:
            pass  # closed: the loop is gone

    def _handle_io(self, mask: int) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        # Cleared after draining, not before: a byte written in between
        # would be drained with the flag left set, and every later wake-up
        # skipped.  (What its writer queued runs in this turn anyway.)
        self._wake_pending = False

    def _io_failed(self) -> None:
        self._wake_pending = False  # the next wake-up writes again

    def stop(self) -> None:
        self._stopping = True
        self._wake()

    def run(self) -> None:
        self.thread_id = _get_ident()
        self._stopping = False
        select = self.selector.select
        timers = self._timers
        ready = self._ready
        while not self._stopping:
            timeout = None
            if ready or self._flush_queue:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0].when - time.monotonic())
            for key, mask in select(timeout):
                watched: _Watched = key.data
                try:
                    watched._handle_io(mask)
                except Exception:
                    self._watched_failed(watched)
            if timers:
                self._run_timers()
            # What is queued now; what these callbacks queue runs next turn,
            # so a connection that defers its work cannot hold the loop.
            for _ in range(len(ready)):
                callback, args = ready.popleft()
                self._run_callback(callback, args)
            self._run_flushes()

    def _watched_failed(self, watched: _Watched) -> None:
        logger.exception("error handling I/O of %r", watched)
        try:
            watched._io_failed()
        except Exception:
            logger.exception("error ending %r after an I/O error", watched)

    def _run_timers(self) -> None:
        timers = self._timers
        now = time.monotonic()
        while timers and timers[0].when <= now:
            timer = heapq.heappop(timers)
            callback = timer.callback
            if callback is None:
                if self.cancelled_timers:
                    self.cancelled_timers -= 1
            else:
                late = now - timer.when
                if late > self.lag_max:
                    self.lag_max = late
                timer.callback = None
                self._run_callback(callback, timer.args)

    def _run_callback(self, callback: Callable[..., Any], args: Tuple[Any, ...]) -> None:
        try:
            callback(*args)
        except Exception:
            logger.exception("error in callback %r", callback)

    def _run_flushes(self) -> None:
        queue = self._flush_queue
        while queue:
            self._flush_queue = []
            for connection in queue:
                try:
                    connection._flush()
                except Exception:
                    self._watched_failed(connection)
            queue = self._flush_queue

    def close(self) -> None:
        self.selector.close()
        self._wake_reader.close()
        self._wake_writer.close()


# =============================================================================
# History and recovery: positions, the last N messages of a topic, the seam
# =============================================================================
#
# With history on, every message published to a topic gets a position: an
# epoch (a random word, new whenever the topic's history starts afresh, for
# example after a Redis restart without persistence) and an offset that
# grows by one per message.  Offsets are contiguous, so a receiver tells a
# gap from the positions alone.  The position travels as the opaque string
# "epoch-offset".  Without a broker the history lives in the process
# (_History); with one it lives in Redis, where any process can read it
# (see the Redis section).
#
# A subscriber that comes back with the last position it saw is caught up
# by a _Catchup: it holds the live messages that arrive while history is
# being read (with Redis the read is a round trip, and the subscription is
# made before it), takes the history in pages, and hands back everything
# after the position in order, each offset once: history first, then the
# held live messages above the last offset history gave.  The same object
# repairs a topic when a receiver sees its offsets jump.

_POSITION_MAX = 128  # characters of a position (what a client may send back)
_EPOCH_MAX = 64
_HISTORY_PAGE_ITEMS = 48  # messages in one read of Redis history (its reply stays within the bridge's bounds)
_HISTORY_PAGE_BYTES = 32 * 2**10  # ... and their bytes, past the first
DEFAULT_HISTORY_TOPICS = 10000  # topics whose history a process keeps (then the least recent goes)


def _format_position(epoch: str, offset: int) -> str:
    return "%s-%d" % (epoch, offset)


def _parse_position(position: Any) -> Optional[Tuple[str, int]]:
    """(epoch, offset) of a position string, or None for anything else
    (it may come from a client: never an exception)."""
    if not isinstance(position, str) or len(position) > _POSITION_MAX:
        return None
    epoch, dash, digits = position.rpartition("-")
    if not dash or not 0 < len(epoch) <= _EPOCH_MAX or not (epoch.isascii() and epoch.isalnum()):
        return None
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
        return None
    return epoch, int(digits)


def _new_epoch() -> str:
    return os.urandom(8).hex()


class _HistoryPage:
    """One read of a topic's history: its epoch ("" when it has none), its
    top offset, and the messages from offset ``first`` on, contiguous.
    ``prepared`` is filled once by the server (formatted and framed), so a
    page shared by many readers is framed once."""

    __slots__ = ("epoch", "top", "first", "messages", "prepared", "entries")

    def __init__(self, epoch: str, top: int, first: int, messages: List[Union[str, bytes]]):
        self.epoch = epoch
        self.top = top
        self.first = first
        self.messages = messages
        self.prepared: Optional[List[Any]] = None
        self.entries: Optional[List[List[Any]]] = None  # in-process: where each frame is cached


class _TopicHistory:
    __slots__ = ("epoch", "top", "entries")

    def __init__(self) -> None:
        self.epoch = _new_epoch()
        self.top = 0
        self.entries: Deque[List[Any]] = collections.deque()  # [time, message, prepared or None]


class _History:
    """The last ``size`` messages of each topic (and only those younger
    than ``ttl`` seconds, if given), in the process; at most ``max_topics``
    topics, the one published to least recently forgotten first (a client
    coming back to it is told it cannot recover).  Socket-free; ``clock``
    is injectable."""

    def __init__(
        self, size: int, ttl: Optional[float] = None, max_topics: int = DEFAULT_HISTORY_TOPICS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if size < 1 or max_topics < 1:
            raise ValueError("history and history_topics must be at least 1")
        if ttl is not None and not ttl > 0:
            raise ValueError("history_ttl must be a positive number of seconds, or None")
        self.size = size
        self.ttl = ttl
        self.max_topics = max_topics
        self.clock = clock
        self._topics: Dict[str, _TopicHistory] = {}

    def __len__(self) -> int:
        return len(self._topics)

    def append(self, topic: str, message: Union[str, bytes]) -> Tuple[str, int, List[Any]]:
        """Keep ``message``; its (epoch, offset, entry): the entry's last
        item is where the caller caches the framed message."""
        topics = self._topics
        history = topics.pop(topic, None)  # and back at the end: most recent last
        if history is None:
            if len(topics) >= self.max_topics:
                del topics[next(iter(topics))]
            history = _TopicHistory()
        topics[topic] = history
        history.top += 1
        entries = history.entries
        entry = [self.clock(), message, None]
        entries.append(entry)
        if len(entries) > self.size:
            entries.popleft()
        return history.epoch, history.top, entry

    def read(self, topic: str, after: int) -> _HistoryPage:
        """Every message kept after offset ``after``."""
        history = self._topics.get(topic)
        if history is None:
            return _HistoryPage("", 0, 1, [])
        entries = history.entries
        if self.ttl is not None:
            oldest = self.clock() - self.ttl
            while entries and entries[0][0] < oldest:
                entries.popleft()
        first = history.top - len(entries) + 1
        start = max(after + 1, first)
        chosen = list(itertools.islice(entries, start - first, None))
        page = _HistoryPage(history.epoch, history.top, start, [entry[1] for entry in chosen])
        page.entries = chosen
        return page


class _Catchup:
    """Joins history to the live stream after offset ``after`` of epoch
    ``epoch``: live messages are held (:meth:`hold`) while history is read
    page by page (:meth:`page`); what comes out is every offset after
    ``after`` exactly once, in order.  ``whole``: recover all or nothing
    (a subscriber: if history does not reach back, it gets only what is
    live); otherwise deliver what history still has and count the rest
    as ``missed`` (the repair of a topic on the live path)."""

    __slots__ = ("epoch", "cursor", "whole", "held", "recovered", "missed", "finished")

    def __init__(self, epoch: str, after: int, whole: bool = True):
        self.epoch = epoch
        self.cursor = after  # the last offset handed out
        self.whole = whole
        self.held: List[Tuple[int, Any]] = []
        self.recovered: Optional[bool] = None
        self.missed = 0
        self.finished = False

    def hold(self, offset: int, item: Any) -> None:
        self.held.append((offset, item))

    def live(self, offset: int, item: Any, epoch: Optional[str] = None) -> List[Any]:
        """A live message: held while history is read; once it is done,
        what to deliver (nothing at or below the cursor of its epoch: the
        live stream may lag behind a read made on another connection)."""
        if not self.finished:
            self.held.append((offset, item))
            return []
        if offset <= self.cursor and (epoch is None or epoch == self.epoch):
            return []
        self.cursor = offset
        return [item]

    def page(self, epoch: str, top: int, first: int, items: List[Any]) -> Tuple[List[Any], bool]:
        """Take one page of history: (what to deliver now, in order; whether
        to read again after :attr:`cursor`).  When it says no more, the
        catch-up is over and live messages go straight through again."""
        out: List[Any] = []
        if not epoch or not self.epoch:
            # No history at all (or not a position to start from).
            self.recovered = False
            self._release(None, out)
            self.finished = True
            return out, False
        if epoch != self.epoch:
            # The history was lost and began again: nothing before is valid.
            self.recovered = False
            self.epoch = epoch
            if self.whole:
                self._release(None, out)
                self.finished = True
                return out, False
            self.cursor = 0
            return out, True  # read the new epoch from its start
        if top < self.cursor:  # a position this history never gave
            self.recovered = False
            self._release(None, out)
            self.finished = True
            return out, False
        if items and first > self.cursor + 1 or not items and top > self.cursor:
            # History no longer reaches back to the position.
            if self.whole:
                self.recovered = False
                self._release(None, out)
                self.finished = True
                return out, False
            reached = first - 1 if items else top
            self.missed += reached - self.cursor
            self.cursor = reached
        if self.recovered is None:
            self.recovered = True  # it reaches back: told before anything is sent
        for index, item in enumerate(items):
            offset = first + index
            if offset == self.cursor + 1:
                out.append(item)
                self.cursor = offset
        if self.cursor < top:
            return out, True
        more = not self._release(self.cursor, out)
        self.finished = not more
        return out, more

    def _release(self, cursor: Optional[int], out: List[Any]) -> bool:
        """Append the held live messages above ``cursor`` (all of them for
        None) to ``out``; False if one is missing between (read again)."""
        held, self.held = self.held, []
        for index, (offset, item) in enumerate(held):
            if cursor is not None:
                if offset <= cursor:
                    continue
                if offset != cursor + 1:
                    self.held = held[index:]  # a gap the read did not cover yet
                    return False
            out.append(item)
            cursor = offset
            self.cursor = offset
        return True


# =============================================================================
# Fan-out between processes: a Redis pub/sub bridge, spoken from the loop
# =============================================================================
#
# Redis pub/sub is at most once and ordered per channel, and replays nothing
# (see the README's promise).  The bridge keeps two connections to each Redis
# server, since in RESP2 a subscribed connection may do nothing but
# (un)subscribe and ping: one SUBSCRIBEs to prefix:topic for each topic that
# has a local subscriber (never PSUBSCRIBE: PUBLISH costs grow with patterns
# on the whole server), the other PUBLISHes.  With several Redis servers a
# topic lives on exactly one, chosen by redis_shard() (a stable hash of its
# name), so per-topic order holds and N servers carry N times the publishes.
#
# Each connection is a small state machine in the server's loop: resolving
# (getaddrinfo on a short-lived thread: the loop never waits on DNS),
# connecting (TLS, AUTH, SELECT), ready, and on any failure an abortive
# close and a reconnect with backoff and jitter.  A PING every
# ping_interval, answered within ping_timeout, tells a live Redis from a
# stalled one or a dead link that TCP still calls open.
#
# Redis is trusted no more than a client: every reply is parsed under bounds
# (_RespParser) and checked for shape before use (_RedisLink._on_reply);
# anything unexpected is a protocol error on that one link, which is logged,
# dropped and reconnected.  A link reads at most _REDIS_TURN_BUDGET bytes a
# turn of the loop, so a flood from Redis is taken in slices between the
# other sockets' turns.
#
# A message on the wire is an envelope: node id (8 bytes), sequence number
# (8 bytes, big-endian), kind, then the payload as it is.  The sequence
# counts per publishing node per topic; kind is b"t" text or b"b" binary,
# or b"T"/b"B" for the first message of a run (a topic the node has not
# published to lately: its sequence starts above every number it has used,
# so it still only grows).  A receiving node keeps the last sequence it
# delivered per topic per publishing node: a jump is a loss it reports
# through on_broker_gap with the count, an older number is a message that
# arrived late and is dropped, never delivered out of order.  A node drops
# its own messages when Redis echoes them: it has delivered them locally.

_RESP_MAX_LINE = 64 * 2**10
_RESP_MAX_DEPTH = 4  # pub/sub replies are flat arrays: a little room, no more
_RESP_MAX_ITEMS = 64  # elements of one reply, all levels together
_RESP_MAX_OVERHEAD = 64 * 2**10  # a reply's bytes beyond its bulk limit
_REDIS_TURN_BUDGET = 2 * RECV_SIZE  # bytes one link reads in a turn of the loop
_ENVELOPE = struct.Struct("!8sQc")
_FIRST_OF_RUN = {b"T": b"t", b"B": b"b"}
_MAX_PUBLISHED_TOPICS = 2**16  # sequence counters a node keeps (then new runs)
_MAX_NODES_PER_TOPIC = 1024  # publishing nodes a receiver tracks per topic
_RESUBSCRIBE_BATCH = 256  # channels per SUBSCRIBE command, one command a turn
MAX_TOPIC_BYTES = 1024  # a topic's UTF-8 length (see _check_topic)

# History in Redis (see "History and recovery" above): per topic a list of
# the last N envelopes (prefix:h:topic) and a hash with the epoch and the
# top offset (prefix:p:topic).  One script appends, trims, counts and
# publishes atomically, so positions are contiguous whoever publishes; the
# message goes out as "#epoch:offset:" + envelope.  A missing hash (a
# restart without persistence) starts a new epoch and an empty list.  An
# append sent again after its link died (ARGV[6] = "1": Redis may or may
# not have run it) is skipped if the list already holds its node id and
# sequence number, so a publish is neither lost nor doubled by a failover
# of the link.
# Measured against a Stream (XADD MAXLEN ~ N with the offset as its id):
# see the README's history figures.
_APPEND_SCRIPT = """\
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if epoch and ARGV[6] == '1' then
  local id = string.sub(ARGV[2], 1, 16)
  local items = redis.call('LRANGE', KEYS[1], 0, -1)
  for i = #items, 1, -1 do
    if string.sub(items[i], 1, 16) == id then return 0 end
  end
end
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
local top = redis.call('HINCRBY', KEYS[2], 'top', 1)
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
if ARGV[5] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
redis.call('PUBLISH', ARGV[1], '#' .. epoch .. ':' .. top .. ':' .. ARGV[2])
return top
"""
# Reads after offset ARGV[1]: {epoch, top, first, envelopes...}, at most
# ARGV[2] of them and ARGV[3] bytes past the first; {"", 0, 1} without history.
_READ_SCRIPT = """\
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'top')
if not meta[1] then return {'', 0, 1} end
local top = tonumber(meta[2])
local first = top - redis.call('LLEN', KEYS[1]) + 1
local start = tonumber(ARGV[1]) + 1
if start < first then start = first end
local out = {meta[1], top, start}
if start > top then return out end
local items = redis.call('LRANGE', KEYS[1], start - first, start - first + tonumber(ARGV[2]) - 1)
local bytes = 0
for i = 1, #items do
  if i > 1 and bytes + #items[i] > tonumber(ARGV[3]) then break end
  bytes = bytes + #items[i]
  out[#out + 1] = items[i]
end
return out
"""
_APPEND_SHA = hashlib.sha1(_APPEND_SCRIPT.encode("ascii")).hexdigest()
_READ_SHA = hashlib.sha1(_READ_SCRIPT.encode("ascii")).hexdigest()
DEFAULT_MAX_TOPICS = 1000  # topics one connection may hold (Server's max_topics)


def redis_shard(topic: str, count: int) -> int:
    """Which of ``count`` Redis servers carries ``topic``: the CRC-32 (as
    zlib and most languages compute it) of the topic's UTF-8 bytes, modulo
    ``count``.  Stable across processes and releases, so other programs can
    publish to the right server; servers are numbered in the order given."""
    return zlib.crc32(topic.encode("utf-8")) % count


def _takes_missed(method: Callable[..., Any]) -> bool:
    """Whether ``on_broker_gap`` takes the third argument, ``missed``."""
    try:
        inspect.signature(method).bind(None, None, None)
    except (TypeError, ValueError):
        return False
    return True


class _RespError(Exception):
    """An error reply from Redis (``-ERR ...``)."""


def _resp_int(text: bytes) -> int:
    # Stricter than int(): no spaces, no underscores, no "+", at most 19 digits.
    digits = text[1:] if text[:1] == b"-" else text
    if not digits.isdigit() or len(digits) > 19:
        raise ProtocolError("Redis sent a bad number %r" % text[:32])
    return int(text)


def _resp_command(*args: Union[str, bytes]) -> bytes:
    """A command as RESP2 sends it: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode("utf-8") if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


def _retried_append(command: bytes) -> bytes:
    """An append command (see _APPEND_SCRIPT) with its last argument, the
    retry flag, turned from "0" to "1"."""
    return command[:-3] + b"1\r\n"


class _RespParser:
    """Incremental RESP2 reader: feed bytes, take whole replies.

    Iterative (a stack of open arrays, no recursion) and bounded: lines of
    _RESP_MAX_LINE, bulk strings of ``max_bulk``, _RESP_MAX_DEPTH levels of
    arrays, _RESP_MAX_ITEMS elements and ``max_bulk`` + _RESP_MAX_OVERHEAD
    bytes in one reply; each bound is checked from a header, before the
    bytes it announces are waited for.  Breaking one raises ProtocolError.
    A reply that has not fully arrived is parsed again from its start when
    more comes (only its header lines: at most _RESP_MAX_ITEMS of them), so
    a large message split over many reads costs no quadratic copying.
    """

    def __init__(self, max_bulk: int):
        self._buffer = bytearray()
        self._max_bulk = max_bulk
        self._max_reply = max_bulk + _RESP_MAX_OVERHEAD

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def replies(self) -> Iterator[Any]:
        position = 0
        try:
            while position < len(self._buffer):
                reply, end = self._parse(position)
                if end < 0:
                    break
                position = end
                yield reply
        finally:
            del self._buffer[:position]

    def _parse(self, start: int) -> Tuple[Any, int]:
        """The whole reply at ``start`` and where it ends, or (None, -1)."""
        buffer = self._buffer
        position = start
        stack: List[List[Any]] = []  # [array being filled, items it still needs]
        items = 0
        while True:
            end = buffer.find(b"\r\n", position, position + _RESP_MAX_LINE + 2)
            if end < 0:
                if len(buffer) - position > _RESP_MAX_LINE:
                    raise ProtocolError("Redis sent a line over %d bytes" % _RESP_MAX_LINE)
                return None, -1
            kind = buffer[position]
            text = bytes(buffer[position + 1 : end])
            position = end + 2
            value: Any
            if kind == 0x2B:  # + simple string
                value = text.decode("utf-8", "replace")
            elif kind == 0x2D:  # - error
                value = _RespError(text.decode("utf-8", "replace"))
            elif kind == 0x3A:  # : integer
                value = _resp_int(text)
            elif kind == 0x24:  # $ bulk string, $-1 null
                length = _resp_int(text)
                if length == -1:
                    value = None
                elif length < 0 or length > self._max_bulk:
                    raise ProtocolError("Redis sent a bulk string of %d bytes" % length)
                elif position + length - start > self._max_reply:
                    raise ProtocolError("Redis sent a reply over %d bytes" % self._max_reply)
                elif len(buffer) < position + length + 2:
                    return None, -1
                elif buffer[position + length : position + length + 2] != b"\r\n":
                    raise ProtocolError("Redis sent a bulk string without its CRLF")
                else:
                    value = bytes(buffer[position : position + length])
                    position += length + 2
            elif kind == 0x2A:  # * array, *-1 null
                count = _resp_int(text)
                if count == -1:
                    value = None
                elif count < 0:
                    raise ProtocolError("Redis sent an array of %d items" % count)
                elif count == 0:
                    value = []
                else:
                    items += count
                    if items > _RESP_MAX_ITEMS:
                        raise ProtocolError("Redis sent a reply of over %d items" % _RESP_MAX_ITEMS)
                    if len(stack) >= _RESP_MAX_DEPTH:
                        raise ProtocolError("Redis sent arrays nested over %d deep" % _RESP_MAX_DEPTH)
                    stack.append([[], count])
                    continue
            else:
                raise ProtocolError("not a RESP2 reply (first byte %r)" % bytes((kind,)))
            # Put the value in the innermost open array; close what is full.
            while stack:
                top = stack[-1]
                top[0].append(value)
                top[1] -= 1
                if top[1]:
                    break
                stack.pop()
                value = top[0]
            else:
                return value, position


def _parse_redis_url(url: str) -> Tuple[str, int, Optional[str], Optional[str], int, bool]:
    """(host, port, user, password, db, tls) of redis:// or rediss:// URL."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise ValueError("not a redis:// or rediss:// URL: %r" % url)
    if not parts.hostname:
        raise ValueError("no host in %r" % url)
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("bad port in %r" % url) from None
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ValueError("the database in %r must be a number" % url)
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if password is None and user is not None:
        user, password = None, user  # redis://secret@host: a password alone
    return parts.hostname, port, user, password, int(db_text), scheme == "rediss"


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _RedisLink:
    """One connection to one Redis server, driven by the loop: resolve,
    connect, TLS, AUTH, SELECT, then commands; on any failure, close
    abortively and let the broker retry."""

    def __init__(self, shard: _RedisShard, name: str):
        self.shard = shard
        self.broker = shard.broker
        self.name = name  # "subscriber" or "publisher"
        self.state = "disconnected"  # then "connecting", "ready"
        self.sock: Optional[socket.socket] = None
        self.outgoing = bytearray()
        self.parser = _RespParser(self.broker.max_message + _ENVELOPE.size + _POSITION_MAX)
        self.expected: Deque[str] = collections.deque()  # replies we wait for, in order
        self.reads: Deque[Tuple[str, int]] = collections.deque()  # history reads sent, in order
        self.appends: Deque[bytes] = collections.deque()  # history appends not yet answered
        self.ping_sent: Optional[float] = None
        self.attempts = 0
        self.interest = 0
        self.resolving = False
        self._resolver: Optional[threading.Thread] = None
        self._tls_pending = False
        self._deadline: Optional[_Timer] = None
        self._reading_on = False  # a read is queued for the next turn

    def __repr__(self) -> str:
        return "<redis %s %s:%d %s>" % (self.name, self.shard.host, self.shard.port, self.state)

    def label(self) -> str:
        return "redis %s:%d %s" % (self.shard.host, self.shard.port, self.name)

    @property
    def loop(self) -> _EventLoop:
        """The loop of the broker: a link lives only while one is attached."""
        loop = self.broker.loop
        assert loop is not None
        return loop

    # -- connecting -----------------------------------------------------------

    def connect(self) -> None:
        loop = self.loop
        self.state = "connecting"
        self.parser = _RespParser(self.broker.max_message + _ENVELOPE.size + _POSITION_MAX)
        self.outgoing.clear()
        self.expected.clear()
        self.reads.clear()
        self.appends.clear()
        self.ping_sent = None
        # Resolving, connecting, TLS and AUTH must all be done within
        # ping_timeout: a stopped Redis still completes TCP handshakes from
        # its backlog, and a silent DNS answers nothing at all.
        self._deadline = loop.call_later(self.broker.ping_timeout, self._timed_out)
        host, port = self.shard.host, self.shard.port
        if _is_ip_address(host):  # nothing to look up: answered at once
            self._open(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST))
            return
        self.resolving = True
        if self._resolver is not None and self._resolver.is_alive():
            return  # the lookup under way will answer this attempt
        # getaddrinfo blocks for as long as the resolver likes (seconds with
        # a silent DNS): ask on a thread and take the answer through the door.
        self._resolver = threading.Thread(
            target=self._resolve, args=(host, port, loop), name="wsloop-redis-resolve", daemon=True
        )
        self._resolver.start()

    def _resolve(self, host: str, port: int, loop: _EventLoop) -> None:
        """On the resolver thread: look ``host`` up, hand the answer back."""
        answer: Union[List[Any], OSError]
        try:
            answer = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            answer = exc
        except UnicodeError as exc:  # a host name IDNA cannot encode
            answer = OSError(str(exc))
        loop.call_soon_threadsafe(self._resolved, answer)

    def _resolved(self, answer: Union[List[Any], OSError]) -> None:
        if self.state != "connecting" or not self.resolving:
            return  # this attempt already failed; the next one asks again
        self.resolving = False
        if isinstance(answer, OSError):
            self.fail("cannot resolve %s: %s" % (self.shard.host, answer.strerror or answer))
            return
        self._open(answer)

    def _timed_out(self) -> None:
        self._deadline = None
        if self.resolving:
            self.fail("resolving %s took over %s s" % (self.shard.host, self.broker.ping_timeout))
        else:
            self.fail("no answer while connecting")

    def _open(self, infos: List[Any]) -> None:
        loop = self.loop
        try:
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
        except (OSError, IndexError) as exc:
            self.fail("cannot connect: %s" % exc)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex(address)
        if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sock.close()
            self.fail("cannot connect: %s" % os.strerror(error))
            return
        self.sock = sock
        self._tls_pending = self.shard.tls
        self.interest = _EVENT_WRITE
        loop.selector.register(sock, _EVENT_WRITE, self)

    def _connected(self) -> None:
        """TCP (and TLS) is up: say who we are, then the role's first commands."""
        shard = self.shard
        if shard.password is not None:
            args = ["AUTH"] + ([shard.user] if shard.user else []) + [shard.password]
            self.command(*args, expect="auth")
        if shard.db:
            self.command("SELECT", str(shard.db), expect="select")
        if self.name == "publisher" and self.broker._history is not None:
            self.command("SCRIPT", "LOAD", _APPEND_SCRIPT, expect="script")
            self.command("SCRIPT", "LOAD", _READ_SCRIPT, expect="script")
        self.command("PING", expect="ready")

    def ready(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.state = "ready"
        self.attempts = 0
        self.shard.link_ready(self)

    # -- I/O ------------------------------------------------------------------

    def command(self, *args: Union[str, bytes], expect: Optional[str] = "ignore") -> None:
        """Queue a command; ``expect`` names its reply (None: it comes as a
        pub/sub array, as (UN)SUBSCRIBE's do)."""
        self.outgoing += _resp_command(*args)
        if expect is not None:
            self.expected.append(expect)
        self.flush()

    def flush(self) -> None:
        sock = self.sock
        if sock is None or self._tls_pending or self.state == "disconnected":
            return
        if self.outgoing and not self.interest & _EVENT_WRITE:
            try:
                sent = sock.send(self.outgoing)
                del self.outgoing[:sent]
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass
            except OSError as exc:
                self.fail("write failed: %s" % (exc.strerror or exc))
                return
        self._set_interest(_EVENT_READ | (_EVENT_WRITE if self.outgoing else 0))

    def _set_interest(self, interest: int) -> None:
        if self.sock is not None and interest != self.interest:
            self.interest = interest
            self.loop.selector.modify(self.sock, interest, self)

    def _io_failed(self) -> None:
        self.fail("internal error", logged=True)  # (_handle_io catches what it can)

    def _handle_io(self, mask: int) -> None:
        try:
            self._io(mask)
        except Exception as exc:
            # The last line of defence: whatever Redis sent, the bridge
            # fails alone and the server's other sockets go on.
            logger.error("%s: unexpected %s: %s", self.label(), type(exc).__name__, _printable(str(exc)), exc_info=True)
            if self.sock is not None:
                self.fail("internal error")

    def _io(self, mask: int) -> None:
        sock: Any = self.sock
        if sock is None:
            return
        if self.state == "connecting" and self.interest == _EVENT_WRITE and not self._tls_pending:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self.fail("cannot connect: %s" % os.strerror(error))
                return
            if self.shard.tls:
                self._tls_pending = True
                context: Any = self.shard.ssl_context
                try:
                    self.sock = sock = context.wrap_socket(
                        sock, server_hostname=self.shard.host, do_handshake_on_connect=False
                    )
                except (OSError, ssl.SSLError) as exc:
                    self.fail("TLS failed: %s" % exc)
                    return
                self.loop.selector.modify(sock, _EVENT_READ | _EVENT_WRITE, self)
                self.interest = _EVENT_READ | _EVENT_WRITE
            else:
                self._set_interest(_EVENT_READ)
                self._connected()
                return
        if self._tls_pending:
            try:
                sock.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLError, OSError) as exc:
                self.fail("TLS handshake failed: %s" % (getattr(exc, "reason", None) or exc))
                return
            self._tls_pending = False
            self.interest = 0
            self._set_interest(_EVENT_READ)
            self._connected()
            return
        if mask & _EVENT_READ:
            self._read()
        if self.sock is not None and mask & _EVENT_WRITE:
            self.interest &= ~_EVENT_WRITE
            self.flush()

    def _read(self) -> None:
        # Read until it would block, or this turn's budget is spent: Redis
        # disconnects a subscriber that falls behind, yet a flood must not
        # keep the other sockets waiting.  The selector reports a socket
        # with bytes left again next turn; TLS may hold decrypted bytes the
        # selector cannot see, so then the next turn's read is queued here.
        sock: Any = self.sock
        budget = _REDIS_TURN_BUDGET
        more = False
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as exc:
                self.fail("read failed: %s" % (exc.strerror or exc))
                return
            if not data:
                self.fail("Redis closed the connection")
                return
            self.parser.feed(data)
            budget -= len(data)
            tls_pending = self.shard.tls and sock.pending()
            if len(data) < RECV_SIZE and not tls_pending:
                break
            if budget <= 0:
                more = bool(tls_pending)
                break
        try:
            for reply in self.parser.replies():
                self._on_reply(reply)
                if self.sock is not None:
                    continue
                return
        except (ProtocolError, ValueError) as exc:
            self.protocol_error(str(exc))
            return
        if more and not self._reading_on:
            self._reading_on = True
            self.loop.call_soon(self._read_on)

    def _read_on(self) -> None:
        self._reading_on = False
        if self.sock is not None and self.state != "disconnected":
            self._handle_io(_EVENT_READ)

    def _on_reply(self, reply: Any) -> None:
        """Act on one reply, after checking it has the shape its place calls for."""
        if isinstance(reply, list) and not (self.expected and self.expected[0] == "read"):
            kind = reply[0].lower() if reply and isinstance(reply[0], bytes) else None
            if kind == b"message" and len(reply) == 3 and isinstance(reply[1], bytes) and isinstance(reply[2], bytes):
                self.broker._on_message(self, reply[1], reply[2])
                return
            if kind in (b"subscribe", b"unsubscribe") and len(reply) == 3 and isinstance(reply[2], int):
                if isinstance(reply[1], bytes) and self.name == "subscriber":
                    self.broker._check_channel(reply[1])
                    if kind == b"subscribe":
                        self.shard.confirmed()
                    return
            if kind == b"pong" and len(reply) == 2 and self.expected and self.expected[0] == "ping":
                self.expected.popleft()  # PING while subscribed
                self.ping_sent = None
                return
            raise ProtocolError("Redis sent an unexpected array %s" % _describe_reply(reply))
        if not self.expected:
            raise ProtocolError("Redis sent a reply nobody asked for: %s" % _describe_reply(reply))
        expect = self.expected.popleft()
        if isinstance(reply, _RespError):
            if expect == "auth" or str(reply).startswith(("NOAUTH", "WRONGPASS")):
                self.shard.auth_failed(self, str(reply))
                return
            if expect in ("select", "ready", "script") or str(reply).startswith("NOSCRIPT"):
                self.fail("Redis refused: %s" % reply)
                return
            logger.warning("%s: %s", self.label(), _escape_reply(str(reply)))
            if expect == "publish" and self.appends:
                self.appends.popleft()
            if expect == "read":
                self.broker._on_read(self.reads.popleft(), None)
            return
        if expect in ("auth", "select"):
            if reply != "OK":
                raise ProtocolError("Redis answered %s with %s" % (expect.upper(), _describe_reply(reply)))
        elif expect in ("ping", "ready"):
            if reply != "PONG":
                raise ProtocolError("Redis answered PING with %s" % _describe_reply(reply))
            self.ping_sent = None
            if expect == "ready":
                self.ready()
        elif expect == "publish":
            if not isinstance(reply, int) or isinstance(reply, bool):
                raise ProtocolError("Redis answered PUBLISH with %s" % _describe_reply(reply))
            if self.appends:
                self.appends.popleft()
        elif expect == "script":
            if reply not in (_APPEND_SHA.encode("ascii"), _READ_SHA.encode("ascii")):
                raise ProtocolError("Redis answered SCRIPT LOAD with %s" % _describe_reply(reply))
        elif expect == "read":
            if not (
                isinstance(reply, list) and 3 <= len(reply) <= 3 + _HISTORY_PAGE_ITEMS
                and isinstance(reply[0], bytes) and len(reply[0]) <= _EPOCH_MAX
                and (reply[0].isalnum() or not reply[0])
                and isinstance(reply[1], int) and isinstance(reply[2], int) and reply[1] >= 0 and reply[2] >= 1
                and all(isinstance(item, bytes) for item in reply[3:])
            ):
                raise ProtocolError("Redis answered a history read with %s" % _describe_reply(reply))
            self.broker._on_read(self.reads.popleft(), reply)

    # -- liveness and the end -------------------------------------------------

    def ping(self, now: float) -> None:
        """Send a PING, or give up on a link whose last one went unanswered."""
        if self.state != "ready":
            return
        if self.ping_sent is not None:
            if now - self.ping_sent > self.broker.ping_timeout:
                self.fail("no answer to PING within %s s" % self.broker.ping_timeout)
            return
        self.ping_sent = now
        self.command("PING", expect="ping")

    def protocol_error(self, why: str) -> None:
        self.broker._counts["protocol_errors"] += 1
        logger.warning("%s: protocol error, dropping the link: %s", self.label(), _escape_reply(why))
        self.fail("protocol error", logged=True)

    def fail(self, why: str, logged: bool = False) -> None:
        was_ready = self.state == "ready"
        self.close(abort=True)
        self.shard.link_failed(self, why, was_ready, logged)

    def close(self, abort: bool = False) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        sock = self.sock
        self.sock = None
        self.state = "disconnected"
        self.resolving = False
        self.interest = 0
        if sock is not None:
            try:
                self.loop.selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            if abort:
                # A link declared dead is reset, not closed: with a normal
                # close the kernel would keep retransmitting its queued
                # PUBLISHes, and Redis could run them long after newer ones.
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            sock.close()


def _escape_reply(text: str) -> str:
    return _printable(text[:200])


def _describe_reply(reply: Any) -> str:
    """A short, escaped picture of a reply for a log line."""
    return _escape_reply(repr(reply))


class _RedisShard:
    """One Redis server of the broker's: its address, its two links, the
    topics it carries, and the publishes waiting for it to come back."""

    def __init__(self, broker: RedisBroker, url: str, index: int, ssl_context: Optional[ssl.SSLContext]):
        self.broker = broker
        self.index = index
        self.url = url
        self.host, self.port, self.user, self.password, self.db, self.tls = _parse_redis_url(url)
        self.ssl_context = ssl_context or (ssl.create_default_context() if self.tls else None)
        self.topics: Dict[str, None] = {}  # subscribed here, in order
        self.subscriber = _RedisLink(self, "subscriber")
        self.publisher = _RedisLink(self, "publisher")
        self.waiting = bytearray()  # publishes made while it was away
        self.waiting_count = 0
        self.waiting_appends: List[bytes] = []  # with history: each of them
        self.ever_ready = False
        self.lost_subscriber = False
        self.unconfirmed = 0  # SUBSCRIBEs of a resubscription not yet confirmed
        self.resubscribe: List[str] = []  # topics still to resubscribe
        self.auth_error: Optional[str] = None

    def where(self) -> str:
        return "%s:%d" % (self.host, self.port)

    def resubscribed(self) -> bool:
        return self.subscriber.state == "ready" and not self.resubscribe and not self.unconfirmed

    def subscribe(self, topic: str) -> None:
        self.topics[topic] = None
        if self.subscriber.state == "ready":
            self.unconfirmed += 1
            self.subscriber.command("SUBSCRIBE", self.broker._channel(topic), expect=None)

    def unsubscribe(self, topic: str) -> None:
        self.topics.pop(topic, None)
        if self.subscriber.state == "ready":
            self.subscriber.command("UNSUBSCRIBE", self.broker._channel(topic), expect=None)

    def publish(self, command: bytes) -> None:
        broker = self.broker
        publisher = self.publisher
        # With history this process hears its own messages only through
        # its subscription: they wait until every SUBSCRIBE is confirmed.
        if publisher.state == "ready" and not self.waiting and (broker._history is None or self.resubscribed()):
            if len(publisher.outgoing) > broker.max_buffer:
                broker._counts["dropped"] += 1  # Redis is not keeping up
                return
            publisher.outgoing += command
            publisher.expected.append("publish")
            if broker._history is not None:
                publisher.appends.append(command)
            # Counted before the write: a reader that has seen the message
            # arrive elsewhere must also see it counted here.
            broker._counts["published"] += 1
            publisher.flush()
        elif len(self.waiting) + len(command) <= broker.max_buffer:
            self.waiting += command  # sent once this process has resubscribed
            self.waiting_count += 1
            if broker._history is not None:
                self.waiting_appends.append(command)
        else:
            broker._counts["dropped"] += 1

    # -- what its links tell it -----------------------------------------------

    def link_ready(self, link: _RedisLink) -> None:
        broker = self.broker
        if self.auth_error is not None:
            logger.info("redis %s: authenticated again", self.where())
            self.auth_error = None
        if link is self.subscriber:
            self.resubscribe = list(self.topics)
            self.unconfirmed = 0
            if self.lost_subscriber:
                self.lost_subscriber = False
                logger.warning(
                    "redis %s: subscriber back; messages on %d topic(s) may be lost", self.where(), len(self.topics)
                )
                if self.topics and broker._history is not None:
                    broker._catch_up(list(self.topics))  # from history, once resubscribed
                elif self.topics:
                    broker._report_gap(list(self.topics), None)
            elif not self.ever_ready:
                logger.info("redis: connected to %s", self.where())
            self.ever_ready = True
            # Paced: a restarted Redis is not hit by every channel of every
            # process in one burst.  A jittered start, then one batch a turn.
            assert broker.loop is not None
            broker.loop.call_later(broker._random.random() * broker.resubscribe_jitter, self._resubscribe_some, link)
        self.send_waiting()

    def _resubscribe_some(self, link: _RedisLink) -> None:
        if link.state != "ready" or link is not self.subscriber:
            return
        batch, self.resubscribe = self.resubscribe[:_RESUBSCRIBE_BATCH], self.resubscribe[_RESUBSCRIBE_BATCH:]
        batch = [topic for topic in batch if topic in self.topics]
        if batch:
            self.unconfirmed += len(batch)
            link.command("SUBSCRIBE", *[self.broker._channel(topic) for topic in batch], expect=None)
        if self.resubscribe:
            assert self.broker.loop is not None
            self.broker.loop.call_soon(self._resubscribe_some, link)
        else:
            self.send_waiting()

    def confirmed(self) -> None:
        if self.unconfirmed:
            self.unconfirmed -= 1
            if not self.unconfirmed:
                self.send_waiting()

    def send_waiting(self) -> None:
        """Publishes made while Redis was away go out once this process
        has resubscribed (its own subscribers would miss them otherwise);
        so do history reads (a read made before the subscription could miss
        what is published between the two)."""
        if self.publisher.state != "ready" or not self.resubscribed():
            return
        if self.waiting:
            publisher = self.publisher
            if self.broker._history is not None:
                publisher.appends.extend(self.waiting_appends)
                self.waiting_appends = []
            publisher.outgoing += self.waiting
            publisher.expected.extend(["publish"] * self.waiting_count)
            self.broker._counts["published"] += self.waiting_count
            self.waiting = bytearray()
            self.waiting_count = 0
            publisher.flush()
        if self.broker._reads:
            self.broker._send_reads(self)

    def link_failed(self, link: _RedisLink, why: str, was_ready: bool, logged: bool) -> None:
        broker = self.broker
        if broker._closed:
            return
        if link is self.subscriber:
            self.resubscribe = []
            self.unconfirmed = 0
            if was_ready or self.ever_ready:
                self.lost_subscriber = True
        else:
            for key in link.reads:  # asked again once it is back
                pending = broker._reads.get(key)
                if pending is not None:
                    pending.sent = False
            link.reads.clear()
            if link.appends:
                # Appends Redis may or may not have run: sent again first,
                # marked so that the script skips one it already holds.
                again = [_retried_append(command) for command in link.appends]
                link.appends.clear()
                self.waiting = bytearray(b"".join(again)) + self.waiting
                self.waiting_count += len(again)
                self.waiting_appends = again + self.waiting_appends
        if was_ready:
            broker._counts["reconnects"] += 1
            if not logged:
                logger.warning("%s: %s; reconnecting", link.label(), _escape_reply(why))
        elif not self.ever_ready and link.attempts == 0 and not logged:
            logger.warning("%s: cannot reach Redis: %s; retrying", link.label(), _escape_reply(why))
        elif not logged:
            logger.debug("%s: %s", link.label(), _escape_reply(why))
        link.attempts += 1
        if self.auth_error is not None:
            delay = broker.reconnect_max  # a wrong password will not fix itself soon
        else:
            delay = min(broker.reconnect_max, 0.05 * 2**link.attempts)
        delay *= 0.5 + broker._random.random() / 2  # jitter: not every node at once
        assert broker.loop is not None
        broker.loop.call_later(delay, self._reconnect, link)

    def _reconnect(self, link: _RedisLink) -> None:
        if not self.broker._closed and link.state == "disconnected":
            link.connect()

    def auth_failed(self, link: _RedisLink, reply: str) -> None:
        if self.auth_error != reply:
            logger.error(
                "redis %s: authentication failed (%s): check the user and password in the URL",
                self.where(), _escape_reply(reply),
            )
        self.auth_error = reply
        link.close(abort=True)
        self.link_failed(link, "authentication failed", False, True)


class _PendingRead:
    """A history read: who waits for it, and whether it was sent."""

    __slots__ = ("callbacks", "sent")

    def __init__(self, callback: Callable[[_HistoryPage], None]):
        self.callbacks = [callback]
        self.sent = False


class RedisBroker:
    """Fan-out between processes and machines through Redis (or Valkey)
    pub/sub: give one to :class:`Server` as ``broker=``.

    ``url`` is ``redis://[user:password@]host:port[/db]``, or ``rediss://``
    for TLS (the certificate is checked; ``ssl_context`` replaces the
    default), or a list of such URLs: topic ``t`` then lives on server
    ``redis_shard(t, len(urls))`` and losing one server affects only its
    topics.  Topic ``t`` is the Redis channel ``prefix:t``, so several
    applications can share one Redis.  ``ping_interval``/``ping_timeout``
    detect a dead or stalled Redis (and bound resolving and connecting);
    reconnecting backs off up to ``reconnect_max`` seconds and resubscribes
    in batches from a random moment within ``resubscribe_jitter`` seconds;
    while a server is away (until this process has resubscribed to it), up
    to ``max_buffer`` bytes of publishes per server wait and the rest are
    dropped (and counted).

    Promise: at most once between processes, in order per publisher per
    topic (a message older than one delivered is dropped, never delivered
    late), bounded memory, local delivery whatever Redis does, and loss
    reported on the process that lost it: the handler's
    ``on_broker_gap(server, topics)`` after a reconnect, and when a
    publisher's sequence numbers jump (with ``missed``, topic -> node id ->
    count, if the method takes a third argument).  Not promised: replay,
    global order, presence.
    """

    def __init__(
        self,
        url: Union[str, List[str]],
        prefix: str = "wsloop",
        *,
        ping_interval: float = 5.0,
        ping_timeout: float = 5.0,
        reconnect_max: float = 5.0,
        resubscribe_jitter: float = 0.25,
        max_buffer: int = 2**20,
        max_message: int = 64 * 2**20,
        ssl_context: Optional[ssl.SSLContext] = None,
    ):
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("no Redis URL")
        if not prefix or any(char in prefix for char in "*?[]"):
            raise ValueError("prefix must be non-empty, without glob characters")
        _timeout("ping_interval", ping_interval)
        _timeout("ping_timeout", ping_timeout)
        if resubscribe_jitter < 0:
            raise ValueError("resubscribe_jitter must not be negative")
        self.url = urls[0]
        self.urls = urls
        self.prefix = prefix
        self._prefix_bytes = prefix.encode("utf-8") + b":"
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.reconnect_max = reconnect_max
        self.resubscribe_jitter = resubscribe_jitter
        self.max_buffer = max_buffer
        self.max_message = max_message
        self.node_id = os.urandom(8)
        self._random = random.Random()  # jitter; its own, so no one else's seed decides it
        self.loop: Optional[_EventLoop] = None
        self._deliver_to_server: Optional[Callable[..., Any]] = None
        self._gap: Optional[Callable[[List[str], Optional[Dict[str, Dict[str, int]]]], None]] = None
        self._closed = False
        self._counts = {
            "published": 0, "received": 0, "dropped": 0, "reconnects": 0, "gaps": 0,
            "missed": 0, "stale": 0, "protocol_errors": 0, "repairs": 0, "history_reads": 0,
        }
        self._shards = [_RedisShard(self, one, index, ssl_context) for index, one in enumerate(urls)]
        first = self._shards[0]
        self.host, self.port, self.tls = first.host, first.port, first.tls
        self._topics: Dict[str, None] = {}  # subscribed here, in order
        # Sequence numbers this node publishes: per topic, and the highest
        # one used, where a new run starts (see the section's comment).
        self._sequences: Dict[str, int] = {}
        self._highest = 0
        # What this node has delivered: per topic, per publishing node, the
        # last sequence number; and losses seen, reported once a turn.
        self._seen: Dict[str, Dict[bytes, int]] = {}
        self._missed: Dict[str, Dict[str, int]] = {}
        self._ping_timer: Optional[_Timer] = None
        # History in Redis (set by a Server with history): its size and
        # ttl; per topic the last position delivered here and a repair
        # under way; history reads waiting or sent, merged by (topic, after).
        self._history: Optional[Tuple[int, Optional[float]]] = None
        self._epochs = 0
        self._positions: Dict[str, Tuple[str, int]] = {}
        self._repairs: Dict[str, _Catchup] = {}
        self._reads: Dict[Tuple[str, int], _PendingRead] = {}

    def __repr__(self) -> str:
        where = ",".join(shard.where() for shard in self._shards)
        return "<RedisBroker %s prefix %s %s>" % (where, self.prefix, self.state)

    @property
    def state(self) -> str:
        """"connected" (every link ready), "connecting" or "disconnected"."""
        links = [link.state for shard in self._shards for link in (shard.subscriber, shard.publisher)]
        if all(state == "ready" for state in links):
            return "connected"
        if "connecting" in links or "ready" in links:
            return "connecting"
        return "disconnected"

    def is_up(self) -> bool:
        """True while at least one link to Redis is ready (what
        ``--health-requires-broker`` asks)."""
        return any(
            link.state == "ready" for shard in self._shards for link in (shard.subscriber, shard.publisher)
        )

    def stats(self) -> Dict[str, Any]:
        """The bridge's state and counters: published, received, dropped
        (publishes not sent), reconnects, gaps (reports made), missed
        (messages from other nodes known lost), stale (arrived after a newer
        one, dropped), protocol_errors, and the topics subscribed."""
        figures: Dict[str, Any] = dict(self._counts)
        figures["state"] = self.state
        figures["topics"] = len(self._topics)
        figures["servers"] = [
            {"url": shard.where(), "subscriber": shard.subscriber.state, "publisher": shard.publisher.state}
            for shard in self._shards
        ]
        return figures

    # -- what the server calls (the loop's thread) ----------------------------

    def _attach(
        self,
        loop: _EventLoop,
        deliver: Callable[..., Any],
        gap: Callable[[List[str], Optional[Dict[str, Dict[str, int]]]], None],
    ) -> None:
        self.loop = loop
        self._deliver_to_server = deliver
        self._gap = gap
        for shard in self._shards:
            shard.subscriber.connect()
            shard.publisher.connect()
        self._ping_timer = loop.call_later(self.ping_interval, self._keepalive)

    def _close(self) -> None:
        self._closed = True
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        for shard in self._shards:
            shard.subscriber.close()
            shard.publisher.close()

    def _shard(self, topic: str) -> _RedisShard:
        shards = self._shards
        return shards[0] if len(shards) == 1 else shards[redis_shard(topic, len(shards))]

    def _subscribe(self, topic: str) -> None:
        self._topics[topic] = None
        self._shard(topic).subscribe(topic)

    def _unsubscribe(self, topic: str) -> None:
        self._topics.pop(topic, None)
        self._seen.pop(topic, None)
        self._positions.pop(topic, None)
        self._repairs.pop(topic, None)
        self._shard(topic).unsubscribe(topic)

    def _publish(self, topic: str, message: Union[str, bytes]) -> None:
        sequence = self._sequences.get(topic)
        if isinstance(message, str):
            kind, payload = b"t", message.encode("utf-8")
        else:
            kind, payload = b"b", message
        if len(payload) > self.max_message:
            # Every other node would refuse it (and drop its link): local only.
            self._counts["dropped"] += 1
            return
        if sequence is None:
            if len(self._sequences) >= _MAX_PUBLISHED_TOPICS:
                self._sequences.clear()  # every topic starts a new run
            sequence = self._highest
            kind = kind.upper()  # the first of a run: no gap before it
        sequence += 1
        self._sequences[topic] = sequence
        if sequence > self._highest:
            self._highest = sequence
        envelope = _ENVELOPE.pack(self.node_id, sequence, kind) + payload
        history = self._history
        if history is not None:
            self._epochs += 1  # a new epoch, used only if the topic has none
            ttl = "%d" % (history[1] * 1000) if history[1] else "0"
            self._shard(topic).publish(_resp_command(
                "EVALSHA", _APPEND_SHA, "2", self._key("h", topic), self._key("p", topic), self._channel(topic),
                envelope, "%d" % history[0], "%s%x" % (self.node_id.hex(), self._epochs), ttl, "0",
            ))
            return
        self._shard(topic).publish(_resp_command("PUBLISH", self._channel(topic), envelope))

    # -- what the links tell the broker ---------------------------------------

    def _channel(self, topic: str) -> str:
        return self.prefix + ":" + topic

    def _key(self, kind: str, topic: str) -> str:
        return "%s:%s:%s" % (self.prefix, kind, topic)

    def _check_channel(self, channel: bytes) -> str:
        """The topic of one of our channels, or a ProtocolError."""
        if not channel.startswith(self._prefix_bytes):
            raise ProtocolError("Redis sent channel %s, outside prefix %s" % (_describe_reply(channel), self.prefix))
        try:
            return channel[len(self._prefix_bytes) :].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("Redis sent channel %s, not UTF-8" % _describe_reply(channel)) from None

    def _on_message(self, link: _RedisLink, channel: bytes, data: bytes) -> None:
        if link.name != "subscriber":
            raise ProtocolError("Redis sent a message to the publishing connection")
        topic = self._check_channel(channel)
        if data[:1] == b"#" and self._history is not None:
            self._on_positioned(topic, data)
            return
        if len(data) < _ENVELOPE.size:
            return  # not one of ours: another program publishing there
        node, sequence, kind = _ENVELOPE.unpack_from(data)
        if node == self.node_id:
            return  # ours, delivered locally when published
        if topic not in self._topics:
            return  # sent before our UNSUBSCRIBE took effect
        first = kind in _FIRST_OF_RUN
        if first:
            kind = _FIRST_OF_RUN[kind]
        payload = data[_ENVELOPE.size :]
        message: Union[str, bytes]
        if kind == b"t":
            try:
                message = payload.decode("utf-8")
            except UnicodeDecodeError:
                return  # not one of ours
        elif kind == b"b":
            message = payload
        else:
            return  # not one of ours
        seen = self._seen.get(topic)
        if seen is None:
            seen = self._seen[topic] = {}
        last = seen.get(node)
        if last is not None:
            if sequence <= last:
                self._counts["stale"] += 1  # older than one delivered: never late
                return
            if sequence != last + 1 and not first:
                self._note_missed(topic, node, sequence - last - 1)
            if len(seen) > 1:
                del seen[node]  # to the end: the first is the one heard from longest ago
        elif len(seen) >= _MAX_NODES_PER_TOPIC:
            del seen[next(iter(seen))]  # the node heard from longest ago
        seen[node] = sequence
        self._counts["received"] += 1
        if self._deliver_to_server is not None:
            self._deliver_to_server(topic, message)

    # -- history in Redis ----------------------------------------------------

    def _use_history(self, size: int, ttl: Optional[float]) -> None:
        if self.loop is not None:
            raise ValueError("this broker already serves a server")
        self._history = (size, ttl)

    @staticmethod
    def _open_envelope(data: bytes) -> Optional[Union[str, bytes]]:
        """The message in an envelope, or None if it is not one of ours."""
        if len(data) < _ENVELOPE.size:
            return None
        kind = data[_ENVELOPE.size - 1 : _ENVELOPE.size]
        kind = _FIRST_OF_RUN.get(kind, kind)
        payload = data[_ENVELOPE.size :]
        if kind == b"b":
            return payload
        if kind != b"t":
            return None
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _on_positioned(self, topic: str, data: bytes) -> None:
        """A message published with history: "#epoch:offset:" + envelope."""
        colon = data.find(b":", 1, _EPOCH_MAX + 2)
        end = data.find(b":", colon + 1, colon + 21) if colon > 1 else -1
        epoch, digits = data[1:colon], data[colon + 1 : end]
        if end < 0 or not epoch.isalnum() or not digits.isdigit():
            raise ProtocolError("Redis sent a history message without a position: %s" % _describe_reply(data[:80]))
        message = self._open_envelope(data[end + 1 :])
        if message is None or topic not in self._topics:
            return  # not one of ours, or sent before our UNSUBSCRIBE took effect
        self._counts["received"] += 1
        self._positioned(topic, epoch.decode("ascii"), int(digits), message)

    def _positioned(self, topic: str, epoch: str, offset: int, message: Union[str, bytes]) -> None:
        """Deliver in position order: a jump is repaired from history first."""
        repair = self._repairs.get(topic)
        if repair is not None:
            repair.hold(offset, (epoch, offset, message))
            return
        last = self._positions.get(topic)
        if last is not None:
            if last[0] == epoch and offset <= last[1]:
                self._counts["stale"] += 1  # older than one delivered: never late
                return
            if last[0] != epoch or offset != last[1] + 1:
                self._repair(topic, last, (offset, (epoch, offset, message)))
                return
        self._positions[topic] = (epoch, offset)
        if self._deliver_to_server is not None:
            self._deliver_to_server(topic, message, None, epoch, offset)

    def _repair(self, topic: str, last: Tuple[str, int], held: Optional[Tuple[int, Any]]) -> None:
        repair = self._repairs[topic] = _Catchup(last[0], last[1], whole=False)
        if held is not None:
            repair.hold(*held)
        self._counts["repairs"] += 1
        self._read(topic, last[1], lambda page: self._repaired(topic, repair, page))

    def _repaired(self, topic: str, repair: _Catchup, page: _HistoryPage) -> None:
        if self._repairs.get(topic) is not repair:
            return  # unsubscribed meanwhile
        epoch = page.epoch
        items = [(epoch, page.first + index, message) for index, message in enumerate(page.messages)]
        out, more = repair.page(epoch, page.top, page.first, items)
        for epoch, offset, message in out:
            self._positions[topic] = (epoch, offset)
            if self._deliver_to_server is not None:
                self._deliver_to_server(topic, message, None, epoch, offset)
        if more:
            self._read(topic, repair.cursor, lambda page: self._repaired(topic, repair, page))
            return
        del self._repairs[topic]
        if repair.recovered is False:
            logger.warning("redis: the history of a topic was lost; messages on it may be missing")
            self._report_gap([topic], None)
        elif repair.missed:
            self._note_missed(topic, b"", repair.missed)

    def _catch_up(self, topics: List[str]) -> None:
        """After the subscriber came back: read each topic's history from
        the last position delivered (a topic with none may have lost
        messages: reported)."""
        unknown = []
        for topic in topics:
            last = self._positions.get(topic)
            if last is None:
                unknown.append(topic)
            elif topic not in self._repairs:
                self._repair(topic, last, None)
        if unknown:
            self._report_gap(unknown, None)

    def _read(self, topic: str, after: int, callback: Callable[[_HistoryPage], None]) -> None:
        """Read ``topic``'s history after ``after`` and call ``callback``
        with the page; reads of the same range at once share one (a
        reconnect storm asks Redis once)."""
        key = (topic, after)
        pending = self._reads.get(key)
        if pending is not None:
            pending.callbacks.append(callback)
            return
        self._reads[key] = _PendingRead(callback)
        self._shard(topic).send_waiting()

    def _send_reads(self, shard: _RedisShard) -> None:
        publisher = shard.publisher
        for key, pending in self._reads.items():
            if pending.sent or self._shard(key[0]) is not shard:
                continue
            pending.sent = True
            topic, after = key
            self._counts["history_reads"] += 1
            publisher.reads.append(key)
            publisher.outgoing += _resp_command(
                "EVALSHA", _READ_SHA, "2", self._key("h", topic), self._key("p", topic),
                "%d" % after, "%d" % _HISTORY_PAGE_ITEMS, "%d" % _HISTORY_PAGE_BYTES,
            )
            publisher.expected.append("read")
        publisher.flush()

    def _on_read(self, key: Tuple[str, int], reply: Optional[List[Any]]) -> None:
        """A history read answered (None: refused, as if there were none)."""
        pending = self._reads.pop(key, None)
        if pending is None:
            return
        page = _HistoryPage("", 0, 1, [])
        if reply is not None and reply[0]:
            messages: List[Union[str, bytes]] = []
            for item in reply[3:]:
                message = self._open_envelope(item)
                if message is None:
                    break
                messages.append(message)
            if len(messages) == len(reply) - 3:
                page = _HistoryPage(reply[0].decode("ascii"), reply[1], reply[2], messages)
            else:
                logger.warning("redis: the history of %s holds what wsloop did not write", _printable(key[0]))
        for callback in pending.callbacks:
            callback(page)

    def _note_missed(self, topic: str, node: bytes, count: int) -> None:
        self._counts["missed"] += count
        if not self._missed:
            assert self.loop is not None  # messages come only through an attached loop
            self.loop.call_soon(self._report_missed)
        per_node = self._missed.setdefault(topic, {})
        key = node.hex()
        per_node[key] = per_node.get(key, 0) + count

    def _report_missed(self) -> None:
        missed, self._missed = self._missed, {}
        if missed:
            logger.warning(
                "redis: %d message(s) from other nodes lost on %d topic(s)",
                sum(sum(counts.values()) for counts in missed.values()), len(missed),
            )
            self._report_gap(list(missed), missed)

    def _report_gap(self, topics: List[str], missed: Optional[Dict[str, Dict[str, int]]]) -> None:
        self._counts["gaps"] += 1
        if self._gap is not None:
            self._gap(topics, missed)

    def _keepalive(self) -> None:
        if self._closed:
            return
        now = time.monotonic()
        for shard in self._shards:
            shard.subscriber.ping(now)
            shard.publisher.ping(now)
        assert self.loop is not None
        self._ping_timer = self.loop.call_later(self.ping_interval, self._keepalive)


# =============================================================================
# Handlers and options: what a user writes, and every setting checked once
# =============================================================================
#
# A handler is what the server calls; _Options holds every setting of a server
# or a client, each checked where it is built (a ValueError naming it).


class Handler:
    """What a server calls; subclass it and override what you need.

    Any object with some of these methods works as a handler.  They run on
    the server's thread, one at a time, and are plain functions (not
    ``async def``): keep them short, and hand slow work to a thread of your
    own, which may call any :class:`Connection` or :class:`Server` method.
    """

    def on_handshake(self, conn: Connection) -> Optional[Response]:
        """A valid upgrade request arrived (``conn.request``, ``conn.path``,
        ``conn.headers``, ``conn.remote_address``, ``conn.subprotocol`` are
        set): return None to accept it, a :class:`Response` to refuse it
        (e.g. ``Response(401, "token required")``), or ``Response(101,
        headers=[...])`` to accept it with headers added (e.g. Set-Cookie)."""
        return None

    def on_connect(self, conn: Connection) -> None:
        """A client completed the opening handshake."""

    def on_message(self, conn: Connection, message: Union[str, bytes]) -> None:
        """A whole message arrived: ``str`` for text, ``bytes`` for binary."""

    def on_close(self, conn: Connection, code: int, reason: str) -> None:
        """The connection is gone; ``code`` 1006 means it ended without a close frame."""

    def on_broker_gap(self, server: Server, topics: List[str]) -> None:
        """Messages published in other processes on these topics may be
        lost (Redis pub/sub replays nothing): the broker reconnected, or a
        publisher's sequence numbers jumped.  A place to resynchronise
        clients.  A method that takes a third argument ``missed`` also gets
        the counts known: topic -> publishing node id (hex) -> messages."""

    def on_start(self, server: Server) -> None:
        """The server is serving (the first thing its loop does): a place to
        keep ``server`` and start what pushes to it (a thread that calls
        ``server.publish``).  If it raises, the server shuts down."""

    def on_stop(self, server: Server) -> None:
        """Shutdown has begun, or the server is closing: new connections are
        refused, and those open still are (a last message to them arrives
        before their 1001).  Called once, and only after :meth:`on_start`."""


class Echo(Handler):
    """Send every message back to its sender."""

    def on_message(self, conn: Connection, message: Union[str, bytes]) -> None:
        conn.send(message)


class Chat(Handler):
    """Everyone gets every message (the ``--broadcast`` app): each client
    joins the topic ``chat``, so with a broker the chat spans processes.

    On a server with history (``--history``), give it
    ``position_format=Chat.format``: each message then reaches clients as
    ``{"position": P, "message": M}`` (``"binary"``, base64, for bytes),
    and a client that connects with ``?since=P`` first gets
    ``{"recovered": true}`` and every message after P, or
    ``{"recovered": false}``, then the live ones."""

    topic = "chat"

    def on_connect(self, conn: Connection) -> None:
        server = conn.server
        since = conn.query_params.get("since") if server is not None and server.history is not None else None
        if since:

            def told(recovered: bool) -> None:
                conn.send(json.dumps({"recovered": recovered}))

            conn.subscribe(self.topic, since=since[0], on_recovery=told)
            return
        conn.subscribe(self.topic)

    @staticmethod
    def format(topic: str, position: str, message: Union[str, bytes]) -> str:
        if isinstance(message, bytes):
            return json.dumps({"position": position, "binary": base64.b64encode(message).decode("ascii")})
        return json.dumps({"position": position, "message": message})

    def on_message(self, conn: Connection, message: Union[str, bytes]) -> None:
        server = conn.server
        if server is not None:
            server.publish(self.topic, message)


_HANDLER_METHODS = ("on_handshake", "on_connect", "on_message", "on_close", "on_broker_gap", "on_start", "on_stop")


def _handler_methods(handler: Any) -> Dict[str, Optional[Callable[..., Any]]]:
    """The handler's methods by name, checked: raises TypeError for what
    cannot work (a class, an object with no handler method, async def)."""
    if isinstance(handler, type):
        raise TypeError("the handler must be an instance, not the class %s" % handler.__name__)
    methods = {name: getattr(handler, name, None) for name in _HANDLER_METHODS}
    if not any(methods.values()):
        if not callable(handler):
            raise TypeError(
                "the handler %r has none of %s, and is not an on_message function"
                % (handler, ", ".join(_HANDLER_METHODS))
            )
        methods["on_message"] = handler  # a plain function: on_message(conn, message)
    for name, method in methods.items():
        if method is None:
            continue
        if not callable(method):
            raise TypeError("the handler's %s is not callable" % name)
        if inspect.iscoroutinefunction(method) or inspect.iscoroutinefunction(
            getattr(method, "__call__", None)
        ):
            raise TypeError(
                "%s is a coroutine function (async def): wsloop's handlers are "
                "synchronous; use def, and hand slow work to a thread" % name
            )
    return methods


# The options _timeout checks: on the command line, their None is 'none'.
_TIMEOUT_OPTIONS = ("open_timeout", "close_timeout", "ping_interval", "ping_timeout")


def _count_option(name: str, value: Any, none_ok: bool = False) -> Any:
    """``value``, an int of at least 1 (or None, if ``none_ok``); TypeError
    for what is not an int at all."""
    if value is None and none_ok:
        return None
    expected = "a positive integer" + (" or None" if none_ok else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("%s must be %s, not %r" % (name, expected, value))
    if value < 1:
        raise _bad(name, expected, value)
    return value


def _rate_option(name: str, value: Any, low: float) -> Optional[float]:
    """``value`` as a float of at least ``low`` (above 0 when ``low`` is 0), or None."""
    if value is None:
        return None
    expected = "a number above 0" if low == 0 else "a number of at least %g" % low
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("%s must be %s, or None, not %r" % (name, expected, value))
    if not (value > 0 if low == 0 else value >= low) or value != value:
        raise _bad(name, expected + ", or None", value)
    return float(value)


def _path_option(name: str, value: Optional[str]) -> Optional[str]:
    if value is not None and not (isinstance(value, str) and value.startswith("/")):
        raise _bad(name, "a path starting with / or None", value)
    return value


class _Options:
    """Everything a server or a client connection is configured with: built
    once, by keyword (:meth:`for_server`, :meth:`for_client`), and checked
    here and nowhere else.  A bad value raises ValueError naming its option
    (``_OptionError``: "max_size must be a positive integer or None, not
    -1"); a value of the wrong type TypeError.  Every connection, the gate
    and the server read their settings here, as plain attributes (slots:
    the hot path reads some of them on every message).

    An option lives here (its slot, its keyword, its default and its check)
    and in its documentation: the keyword of Server or connect() with their
    docstrings, which hand it on unchanged, and the README.  A CLI flag is
    named after the option it sets (_flag_error relies on that).
    """

    __slots__ = (
        # handler methods
        "on_handshake", "on_connect", "on_message", "on_close", "on_broker_gap", "on_start", "on_stop",
        # every connection
        "max_size", "max_fragments", "open_timeout", "close_timeout", "ping_interval", "ping_timeout",
        "write_high_water", "max_pending_output", "compression",
        # a server's connections
        "max_total_pending", "max_messages_per_second", "message_burst", "ssl_context",
        # the handshake and the gate
        "origins", "subprotocols", "select_subprotocol", "response_headers", "health_path", "pages",
        "name", "max_connections", "max_connections_per_ip", "forwarded_allow", "forwarded_unix",
        "forwarded_header", "metrics_path", "metrics_allow",
        # fan-out and history
        "broker", "health_broker", "max_topics", "history", "history_ttl", "history_topics",
        "position_format",
    )

    def __init__(
        self,
        methods: Dict[str, Optional[Callable[..., Any]]],
        *,
        max_size: Optional[int] = DEFAULT_MAX_SIZE,
        max_fragments: Optional[int] = None,
        open_timeout: Optional[float] = DEFAULT_OPEN_TIMEOUT,
        close_timeout: Optional[float] = DEFAULT_CLOSE_TIMEOUT,
        ping_interval: Optional[float] = DEFAULT_PING_INTERVAL,
        ping_timeout: Optional[float] = DEFAULT_PING_TIMEOUT,
        write_high_water: int = DEFAULT_WRITE_HIGH_WATER,
        max_pending_output: Optional[int] = DEFAULT_MAX_PENDING_OUTPUT,
        max_total_pending: Optional[int] = None,
        compression: Union[bool, Deflate, None] = True,
        ssl_context: Optional[ssl.SSLContext] = None,
        origins: Optional[Iterable[Optional[str]]] = None,
        subprotocols: Iterable[str] = (),
        select_subprotocol: Optional[Callable[[Connection, List[str]], Optional[str]]] = None,
        response_headers: Iterable[Tuple[str, str]] = (),
        health_path: Optional[str] = None,
        pages: Optional[Dict[str, Tuple[str, bytes]]] = None,
        broker: Optional[RedisBroker] = None,
        health_requires_broker: bool = False,
        max_topics: int = DEFAULT_MAX_TOPICS,
        history: Optional[int] = None,
        history_ttl: Optional[float] = None,
        history_topics: int = DEFAULT_HISTORY_TOPICS,
        position_format: Optional[Callable[[str, str, Union[str, bytes]], Union[str, bytes]]] = None,
        max_connections: Optional[int] = None,
        max_connections_per_ip: Optional[int] = None,
        max_messages_per_second: Optional[float] = None,
        message_burst: Optional[float] = None,
        forwarded_allow_ips: Optional[Iterable[str]] = None,
        forwarded_header: str = "x-forwarded-for",
        metrics_path: Optional[str] = None,
        metrics_allow_ips: Optional[Iterable[str]] = None,
        name: Optional[str] = None,
    ):
        self.on_handshake = methods.get("on_handshake")
        self.on_connect = methods.get("on_connect")
        self.on_message = methods.get("on_message")
        self.on_close = methods.get("on_close")
        self.on_broker_gap = methods.get("on_broker_gap")
        self.on_start = methods.get("on_start")
        self.on_stop = methods.get("on_stop")

        # No limit is a number every size check can compare with: a peer
        # may then make this process hold any amount.
        self.max_size: int = _count_option("max_size", max_size, True) or _UNLIMITED_SIZE
        # Computed once: every connection shares this int, not one each.
        self.max_fragments: int = (
            _count_option("max_fragments", max_fragments, True) or _default_max_fragments(self.max_size)
        )
        self.open_timeout = _timeout("open_timeout", open_timeout)
        self.close_timeout = _timeout("close_timeout", close_timeout)
        self.ping_interval = _timeout("ping_interval", ping_interval)
        self.ping_timeout = _timeout("ping_timeout", ping_timeout)
        self.write_high_water: int = _count_option("write_high_water", write_high_water)
        self.max_pending_output: int = (
            _count_option("max_pending_output", max_pending_output, True) or _UNLIMITED_SIZE
        )
        self.max_total_pending: int = (
            _count_option("max_total_pending", max_total_pending, True) or _default_max_total_pending()
        )
        if compression is True:
            compression = Deflate()
        elif not (compression is None or compression is False or isinstance(compression, Deflate)):
            raise TypeError("compression must be True, False or a Deflate, not %r" % (compression,))
        self.compression: Optional[Deflate] = compression or None
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError("ssl_context must be an ssl.SSLContext or None, not %r" % (ssl_context,))
        self.ssl_context = ssl_context

        # The message-rate limit: a token bucket of message_burst tokens
        # (the rate itself by default), refilled at the rate.
        self.max_messages_per_second = _rate_option("max_messages_per_second", max_messages_per_second, 0)
        rate = self.max_messages_per_second
        if message_burst is not None and rate is None:
            raise _OptionError("message_burst goes with max_messages_per_second",
                               "message_burst", "max_messages_per_second")
        if message_burst is None and rate is not None and rate < 1:
            raise _OptionError("message_burst (by default max_messages_per_second) must be at least 1, not %r"
                               % rate, "message_burst", "max_messages_per_second")
        burst = _rate_option("message_burst", rate if message_burst is None else message_burst, 1)
        self.message_burst = burst or 0.0

        self.origins = None if origins is None else frozenset(origins)
        self.subprotocols = list(subprotocols)
        if select_subprotocol is not None and not callable(select_subprotocol):
            raise TypeError("select_subprotocol must be callable or None, not %r" % (select_subprotocol,))
        self.select_subprotocol = select_subprotocol
        self.response_headers = list(response_headers)
        self.health_path = _path_option("health_path", health_path)
        self.pages = dict(pages or {})
        self.name = name  # the server's name, on its health check
        self.max_connections: Optional[int] = _count_option("max_connections", max_connections, True)
        self.max_connections_per_ip: Optional[int] = _count_option(
            "max_connections_per_ip", max_connections_per_ip, True)
        try:
            self.forwarded_allow, self.forwarded_unix = _parse_proxies(forwarded_allow_ips or ())
        except ValueError as exc:
            raise _OptionError("forwarded_allow_ips: %s" % exc, "forwarded_allow_ips") from None
        header = forwarded_header.lower() if isinstance(forwarded_header, str) else forwarded_header
        if header not in _FORWARDED_HEADERS:
            raise _bad("forwarded_header", "one of %s" % ", ".join(_FORWARDED_HEADERS), forwarded_header)
        self.forwarded_header: str = header
        self.metrics_path = _path_option("metrics_path", metrics_path)
        try:
            self.metrics_allow = list(_LOOPBACK) if metrics_allow_ips is None else _parse_networks(metrics_allow_ips)
        except ValueError as exc:
            raise _OptionError("metrics_allow_ips: %s" % exc, "metrics_allow_ips") from None

        self.broker = broker
        if health_requires_broker and broker is None:
            raise _OptionError("health_requires_broker goes with broker", "health_requires_broker", "broker")
        self.health_broker = broker if health_requires_broker else None  # 503 while it is down
        self.max_topics: int = _count_option("max_topics", max_topics)
        self.history: Optional[int] = _count_option("history", history, True)
        self.history_ttl = _rate_option("history_ttl", history_ttl, 0)
        self.history_topics: int = _count_option("history_topics", history_topics)
        if history is None:
            for option, value in (("history_ttl", history_ttl), ("position_format", position_format)):
                if value is not None:
                    raise _OptionError("%s goes with history" % option, option, "history")
        self.position_format = position_format

    @classmethod
    def for_server(cls, handler: Any, **options: Any) -> _Options:
        """A server's options: ``handler`` (checked: TypeError for one that
        cannot serve) and Server's keywords."""
        return cls(_handler_methods(handler), **options)

    @classmethod
    def for_client(
        cls,
        on_message: Callable[[Connection, Union[str, bytes]], None],
        open_timeout: Optional[float] = DEFAULT_OPEN_TIMEOUT,
        **options: Any,
    ) -> _Options:
        """A client connection's options: connect()'s keywords, and the one
        handler method a client has, ``on_message``.  ``open_timeout`` is
        checked here but is connect()'s own deadline (TimeoutError), not
        the connection's open timer, which would end it as if the server
        had; and a client connection's pending output has no bound of its
        own (its senders wait at write_high_water instead), nor a share of
        a server's total (there is none: a client never sheds itself)."""
        _timeout("open_timeout", open_timeout)
        return cls(
            {"on_message": on_message}, open_timeout=None, max_pending_output=None,
            max_total_pending=_UNLIMITED_SIZE, **options,
        )


# =============================================================================
# Admission: the server's counts, and the gate at the edge
# =============================================================================
#
# Socket-free: given a parsed request and the transport's facts, the gate
# says who the client really is and whether it may come in (limits, proxies,
# origins, the health and metrics pages).  It owns the counts it checks.


class _HeldOutput:
    """The output a server's connections hold for peers that have not taken
    it yet, counted once per chunk however many connections queue it: a
    broadcast frame that a thousand slow receivers hold is one frame in
    memory.  Owned by the loop's thread; connections add and release what
    they queue (see Connection._enqueue), and those holding any are listed,
    so that the slowest can be found when ``held`` passes the server's
    ``max_total_pending``."""

    __slots__ = ("held", "_refs", "holders")

    def __init__(self) -> None:
        self.held = 0  # bytes of distinct chunks queued
        # id(chunk) -> queue entries that refer to it.  The id is a safe key:
        # a counted chunk stays alive in the queues that count it.
        self._refs: Dict[int, int] = {}
        self.holders: Dict[Any, None] = {}  # connections with a queue

    def hold(self, chunk: bytes) -> None:
        refs = self._refs
        key = id(chunk)
        count = refs.get(key)
        if count is None:
            refs[key] = 1
            self.held += len(chunk)
        else:
            refs[key] = count + 1

    def release(self, chunk: bytes) -> None:
        refs = self._refs
        key = id(chunk)
        count = refs[key]
        if count == 1:
            del refs[key]
            self.held -= len(chunk)
        else:
            refs[key] = count - 1


class _Stats:
    """A server's counters.  Connections add to them in the loop's thread;
    Server.stats() and the metrics endpoint read them."""

    __slots__ = ("accepted", "refused", "handshakes", "messages_in", "messages_out", "bytes_in",
                 "bytes_out", "close_sent", "close_received", "slow_consumer_closes",
                 "keepalive_timeouts", "output")

    def __init__(self) -> None:
        self.accepted = 0
        self.refused: Dict[str, int] = {}  # by reason
        self.handshakes: Dict[int, int] = {}  # answers by status
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.close_sent: Dict[int, int] = {}
        self.close_received: Dict[int, int] = {}
        self.slow_consumer_closes = 0
        self.keepalive_timeouts = 0
        self.output = _HeldOutput()

    def count(self, table: Dict[Any, int], key: Any) -> None:
        table[key] = table.get(key, 0) + 1


class _Admission:
    """The gate's decision on one request: who the client is (``address``,
    ``scheme``), and either the ``response`` to answer with and close (a
    refusal, the health check, metrics, a page) or, when that is None, the
    upgrade goes on with ``subprotocol``."""

    __slots__ = ("address", "scheme", "response", "subprotocol")

    def __init__(self, address: Any, scheme: str):
        self.address = address
        self.scheme = scheme
        self.response: Optional[Response] = None
        self.subprotocol: Optional[str] = None


class _Gate:
    """Who gets in: one per server, the only place admission is decided.

    Socket-free: it is told the transport facts (the peer, TLS or not) and
    the parsed request, and answers with an :class:`_Admission`.  It owns
    the counts its limits check, each with its release:

    - ``arrive(who)`` when a TCP connection is accepted, ``leave(who)`` when
      it ends: connections held against ``max_connections``, and those
      accepted past it, which wait for their request to be answered 503
      (or, for the health check and metrics, served);
    - ``opened(who, address)`` when an upgrade is accepted: the open
      connections per client address (``max_connections_per_ip``).

    The rules, in the order ``decide`` applies them: the client's address is
    the peer's, or, when the peer is a trusted proxy, the one its
    ``forwarded_header`` names (never another header); during shutdown
    everything gets 503; the health check and metrics (plain GETs of
    ``health_path`` and ``metrics_path``) are exempt from every limit;
    metrics are served only to ``metrics_allow`` (by the client's address);
    a connection past ``max_connections`` gets 503; an upgrade past
    ``max_connections_per_ip`` 429, from an Origin not allowed 403.
    """

    def __init__(self, options: _Options, stats: _Stats, metrics: Callable[[], bytes]):
        self._options = options
        self._stats = stats
        self._metrics = metrics
        # The gate's own options (checked by _Options), read on every request.
        self.max_connections = options.max_connections
        self.max_connections_per_ip = options.max_connections_per_ip
        self.forwarded_allow = options.forwarded_allow
        self.forwarded_unix = options.forwarded_unix
        self.forwarded_header = options.forwarded_header
        self.metrics_path = options.metrics_path
        self.metrics_allow = options.metrics_allow
        self.held = 0  # connections that arrived within max_connections (all, with no limit)
        # Accepted past max_connections, oldest first, until they end.
        self._waiting: Dict[Any, None] = {}
        self._per_address: Dict[str, int] = {}  # open connections by _address_key
        self._key_of: Dict[Any, str] = {}

    # -- the counts and their release -----------------------------------------

    def arrive(self, who: Any) -> Optional[Any]:
        """A TCP connection was accepted.  Past ``max_connections`` it waits
        for its request (to be answered 503, or served if it is the health
        check or metrics) at a cost of one small Connection; at most
        16 + max_connections / 4 wait, and past that the oldest waiter, which
        has sent nothing whole yet, is returned for the caller to close, so
        a flood of silent clients cannot keep the health check out."""
        limit = self.max_connections
        if limit is None or self.held < limit:
            self.held += 1
            return None
        waiting = self._waiting
        evict = next(iter(waiting)) if len(waiting) >= 16 + limit // 4 else None
        if evict is not None:  # it stays counted until it leaves
            self._stats.count(self._stats.refused, "max_connections")
        waiting[who] = None
        return evict

    def leave(self, who: Any) -> None:
        """A connection ended: release whatever it held."""
        if who in self._waiting:
            del self._waiting[who]
        else:
            self.held -= 1
        key = self._key_of.pop(who, None)
        if key is not None:
            left = self._per_address[key] - 1
            if left:
                self._per_address[key] = left
            else:
                del self._per_address[key]

    def opened(self, who: Any, address: Any) -> None:
        """An upgrade was accepted: count it against its client's address."""
        if self.max_connections_per_ip is not None and isinstance(address, tuple):
            key = _address_key(address[0])
            self._per_address[key] = self._per_address.get(key, 0) + 1
            self._key_of[who] = key

    def at_capacity(self) -> bool:
        """Whether the next connection would be past max_connections."""
        return self.max_connections is not None and self.held >= self.max_connections

    def waiting(self, who: Any) -> bool:
        """Whether ``who`` was accepted past max_connections."""
        return who in self._waiting

    # -- the decision -----------------------------------------------------------

    def trusts(self, peer: Any) -> bool:
        """Whether ``peer`` (an (address, port) tuple, or a Unix socket's
        name) is a proxy whose forwarded header is believed."""
        if isinstance(peer, tuple):
            return bool(self.forwarded_allow) and _in_networks(peer[0], self.forwarded_allow)
        return self.forwarded_unix

    def client(self, request: Request, peer: Any, tls: bool) -> Tuple[Any, str]:
        """The client's address and scheme ("http" or "https")."""
        scheme = "https" if tls else "http"
        if not self.trusts(peer):
            return peer, scheme
        address, proto = _forwarded_client(request.headers, self.forwarded_header, self.forwarded_allow)
        if proto is not None:
            scheme = "https" if proto in ("https", "wss") else "http"
        if address is None or (isinstance(peer, tuple) and address[0] == peer[0]):
            return peer, scheme  # the proxy named no one else: keep its port
        return address, scheme

    def decide(
        self, who: Any, request: Request, is_upgrade: bool, peer: Any, tls: bool, shutting_down: bool
    ) -> _Admission:
        """The answer to a whole, valid request from ``who`` (passed to the
        subprotocol chooser), which came from ``peer`` over TLS or not."""
        address, scheme = self.client(request, peer, tls)
        admission = _Admission(address, scheme)
        admission.response = self._refusal_for(who, request, is_upgrade, address, scheme, shutting_down)
        if admission.response is None:
            admission.subprotocol, admission.response = self._subprotocol(who, request)
        return admission

    def _refusal_for(
        self, who: Any, request: Request, is_upgrade: bool, address: Any, scheme: str, shutting_down: bool
    ) -> Optional[Response]:
        options = self._options
        if shutting_down:
            return _refusal(503, "server shutting down", [("Retry-After", "5")])
        path = request.path
        # The operator's own views: exempt from every limit below.
        health = not is_upgrade and path == options.health_path
        metrics = not is_upgrade and path == self.metrics_path
        if who in self._waiting and not (health or metrics):
            self._stats.count(self._stats.refused, "max_connections")
            return _refusal(503, "too many connections", [("Retry-After", "5")])
        if metrics:
            if not isinstance(address, tuple) or not _in_networks(address[0], self.metrics_allow):
                return _refusal(403, "metrics are not served to %s" % _format_address(address))
            return Response(200, self._metrics(), [("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                                                   ("Cache-Control", "no-store")])
        if health:
            broker = options.health_broker
            if broker is not None and not broker.is_up():
                return _refusal(503, "no link to Redis is up", [("Retry-After", "5")])
            name = options.name
            return Response(200, "ok %s\n" % name if name else "ok\n", [("Cache-Control", "no-store")])
        origins = options.origins
        if is_upgrade:
            limit = self.max_connections_per_ip
            if limit is not None and isinstance(address, tuple):
                key = _address_key(address[0])
                if self._per_address.get(key, 0) >= limit:
                    self._stats.count(self._stats.refused, "max_connections_per_ip")
                    # 429, not 503: this client holds too much; the server is fine.
                    return _refusal(429, "too many connections from %s" % key, [("Retry-After", "5")])
            origin = request.headers.get("Origin")
            if origins is not None and origin not in origins:
                # The defence against cross-site WebSocket hijacking: browsers
                # always send Origin, and a page elsewhere cannot forge it.
                return _refusal(403, "origin %s not allowed" % (origin or "(none)"))
            return None
        page = options.pages.get(path)
        if page is not None:
            own_origin = scheme + "://" + (request.headers.get("Host") or "")
            if origins is not None and own_origin not in origins:
                return _refusal(
                    403,
                    "this page's origin %s is not among the allowed origins (--origin), "
                    "so its WebSocket would be refused" % own_origin,
                )
            content_type, body = page
            return Response(200, body, [("Content-Type", content_type), ("Cache-Control", "no-store")])
        # RFC 9110 15.5.22: 426 names the protocol to upgrade to.
        response = Response(426, _PLAIN_HTTP_BODY, [("Upgrade", "websocket"), ("Connection", "Upgrade")])
        response.log_reason = "not a WebSocket request"
        return response

    def _subprotocol(self, who: Any, request: Request) -> Tuple[Optional[str], Optional[Response]]:
        """The subprotocol to answer with, or a 500 if the chooser failed."""
        offered = _offered_subprotocols(request)
        if not offered:
            return None, None
        select = self._options.select_subprotocol
        if select is None:
            return _default_subprotocol(offered, self._options.subprotocols), None
        try:
            chosen = select(who, offered)
        except Exception:
            logger.exception("connection %s: error in select_subprotocol", getattr(who, "id", "?"))
            return None, _refusal(500, "internal error")
        # RFC 6455 4.2.2: only a subprotocol the client offered may be named.
        return (chosen if chosen in offered else None), None


# =============================================================================
# Connection: one peer, driven by the loop
# =============================================================================
#
# A Connection owns its socket, its Protocol, its output queue and its
# timers: it reads into the protocol, writes what the protocol framed, and
# hands events to the handler.  Its public methods are the handler's API.


def _check_topic(topic: Any) -> None:
    """A topic is a non-empty str that encodes as UTF-8 in at most
    MAX_TOPIC_BYTES bytes: checked in the caller's thread, so a bad name
    never reaches the loop or Redis (where it would be a channel name)."""
    if not isinstance(topic, str) or not topic:
        raise TypeError("a topic is a non-empty str, not %r" % (topic,))
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("a topic must be encodable as UTF-8 (no lone surrogates): %r" % topic[:64]) from None
    if size > MAX_TOPIC_BYTES:
        raise ValueError("a topic is at most %d bytes of UTF-8, not %d" % (MAX_TOPIC_BYTES, size))


def _check_close(code: int, reason: str) -> None:
    if not isinstance(code, int) or not _is_valid_close_code(code):
        raise ValueError("%r is not a close code one may send" % (code,))
    if not isinstance(reason, str):
        raise TypeError("reason must be str, not %s" % type(reason).__name__)
    if len(reason.encode("utf-8")) > MAX_CLOSE_REASON:
        raise ValueError("close reason over %d bytes" % MAX_CLOSE_REASON)


def _check_ping(payload: Any) -> bytes:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError("ping payload must be bytes, not %s" % type(payload).__name__)
    data = bytes(payload)
    if len(data) > MAX_CONTROL_PAYLOAD:
        raise ValueError("ping payload over %d bytes" % MAX_CONTROL_PAYLOAD)
    return data


class _Continued(bytes):
    """Queued output whose last frame goes on in the next chunk (a large
    payload queued apart from its header): the two are kept or dropped
    together."""

    __slots__ = ()


# Queued chunks handed to one sendmsg() at most (IOV_MAX is 1024 on Linux),
# where there is one (not on Windows, nor on TLS sockets).
_BUFFERS_PER_WRITE = 64
_HAS_SENDMSG = hasattr(socket.socket, "sendmsg")


# Input a connection may handle in one turn of the loop before the others
# get theirs: message bytes delivered (after inflating), plus a fixed cost
# per message so that floods of tiny ones count too.  What is left waits in
# the protocol's buffer, and the socket is not read until it is handled.
_TURN_BUDGET = 2 * RECV_SIZE
_MESSAGE_COST = 64


# How many client host strings the server shares between connections before
# it starts afresh (see Server._add_connection).
_HOSTS_KEPT = 4096


class _Owner(typing.Protocol):
    """What a connection tells its owner (a Server, or a client's
    ClientConnection): that it opened, and that it closed."""

    def _connection_opened(self, connection: Connection) -> None:
        """The opening handshake is done: the connection is open."""

    def _connection_closed(self, connection: Connection) -> None:
        """The socket is closed: the owner forgets the connection."""


class _Admitting(_Owner, typing.Protocol):
    """A server's side of a connection: it decides who comes in."""

    def _admit(self, connection: Connection, request: Request, is_upgrade: bool, peer: Any, tls: bool) -> _Admission:
        """The gate's decision on the connection's request."""


class Connection:
    """One client connection, as handlers see it.

    Attributes: ``id`` (a number unique within the server), ``server``,
    ``remote_address``, ``request`` (the HTTP request, with ``path``,
    ``query``, ``query_params`` and ``headers`` also available here),
    ``state``; once closed ``close_code`` and ``close_reason`` (from the
    peer's close frame; 1006 if none came, as RFC 6455 7.1.5 defines) and
    ``close_sent`` (the code the server sent); and ``data``, free for the
    application's own use.

    Its methods may be called from any thread: in the server's thread they
    act at once; from another thread they check their arguments (raising
    there) and go through the loop's door, keeping each thread's order.
    """

    __slots__ = (
        "id",
        "remote_address",
        "data",
        "_sock",
        "_protocol",
        "_options",
        "_loop",
        "_interest",
        "_reading_paused",
        "_backlog",
        "_flush_scheduled",
        "_tls",
        "_tls_handshaking",
        "_write_wants_read",
        "_timer",
        "_ping_at",
        "_ping_payload",
        "_owner",
        "_reading_held",
        "_drain_callbacks",
        "_crossing",
        "peer_address",
        "scheme",
        "_stats",
        "_tokens",
        "_tokens_at",
        "_queue",
        "_queued",
        "_head_sent",
    )

    def __init__(
        self,
        owner: _Owner,
        sock: socket.socket,
        address: Any,
        connection_id: int,
        options: _Options,
        loop: _EventLoop,
        protocol: Optional[Protocol] = None,
        stats: Optional[_Stats] = None,
    ):
        self.id = connection_id
        # The owner (a Server, or a client's ClientConnection) hears
        # "opened" and "closed", answers what depends on its tables
        # (limits, metrics), and says whether it is shutting down.
        self._owner = owner
        # The TCP peer; remote_address becomes the client a trusted proxy
        # names, and scheme what it used ("https" behind TLS).
        self.peer_address = address
        self.remote_address = address
        self.scheme = "https" if options.ssl_context is not None else "http"
        self._stats = stats if stats is not None else _Stats()
        self._tokens = options.message_burst  # the message-rate bucket
        self._tokens_at = 0.0
        self.data: Any = None
        self._sock: Optional[socket.socket] = sock
        if protocol is None:
            protocol = Protocol(options.max_size, options.max_fragments, options.compression)
        self._protocol = protocol
        self._options = options
        self._loop = loop
        self._reading_paused = False  # backpressure: the peer is not reading
        self._reading_held = False  # pause_reading(): the application's choice
        self._backlog = False  # input left for the next turn (see _TURN_BUDGET)
        self._flush_scheduled = False
        self._drain_callbacks: Optional[List[Callable[[], None]]] = None
        self._crossing = 0  # sent from other threads, still in the door (under loop.crossing_lock)
        # Output by reference (see _enqueue): chunks the peer has not taken,
        # before whatever is in the protocol's `outgoing`; made on first use.
        self._queue: Optional[Deque[bytes]] = None
        self._queued = 0  # bytes in _queue not yet written
        self._head_sent = 0  # of _queue[0], bytes already written
        # The TLS handshake is driven by the loop (want-read/want-write) once
        # the client's hello arrives, never here.  (A client's socket comes
        # with its handshake done.)
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._tls_handshaking = self._tls and not protocol.client
        self._write_wants_read = False
        # Keepalive, checked by the loop's sweep: when the last ping went,
        # and its payload while its pong is awaited.
        self._ping_at = 0.0
        self._ping_payload: Optional[bytes] = None
        self._interest = _EVENT_READ
        loop.selector.register(sock, _EVENT_READ, self)
        # The open timeout (it covers the TLS handshake too), then the close
        # timeout: one at a time, so one field.
        self._timer: Optional[_Timer] = None
        if options.open_timeout is not None:
            self._timer = loop.call_later(options.open_timeout, self._on_open_timeout)

    def __repr__(self) -> str:
        return "<Connection %d %s %s>" % (self.id, _format_address(self.remote_address), self.state.value)

    # -- what handlers read ---------------------------------------------------

    @property
    def server(self) -> Optional[Server]:
        """The server this connection came to (None for a client's)."""
        # (A property, not a field: a slot fewer per connection.)
        return None if self._protocol.client else typing.cast("Server", self._owner)

    @property
    def state(self) -> State:
        return self._protocol.state

    @property
    def request(self) -> Optional[Request]:
        return self._protocol.request

    @property
    def path(self) -> str:
        request = self._protocol.request
        return request.path if request else ""

    @property
    def query(self) -> str:
        request = self._protocol.request
        return request.query if request else ""

    @property
    def query_params(self) -> Dict[str, List[str]]:
        """The query's parameters, decoded (see :attr:`Request.query_params`)."""
        request = self._protocol.request
        return request.query_params if request else {}

    @property
    def headers(self) -> Headers:
        request = self._protocol.request
        return request.headers if request else Headers()

    @property
    def subprotocol(self) -> Optional[str]:
        """The subprotocol agreed at the handshake, if any."""
        return self._protocol.subprotocol

    @property
    def close_code(self) -> Optional[int]:
        return self._protocol.close_code

    @property
    def close_reason(self) -> str:
        return self._protocol.close_reason

    @property
    def close_sent(self) -> Optional[int]:
        """The code of the close frame the server sent, if it sent one."""
        return self._protocol.close_sent

    @property
    def close_sent_reason(self) -> str:
        """The reason in the close frame the server sent."""
        return self._protocol.close_sent_reason

    @property
    def pending_output(self) -> int:
        """Bytes accepted for sending that the peer has not taken yet
        (messages from other threads count from the moment send() returns)."""
        return len(self._protocol.outgoing) + self._queued + self._crossing

    # -- what handlers do -----------------------------------------------------

    def send(self, message: Union[str, bytes, PreparedMessage]) -> None:
        """Send a text (``str``) or binary (``bytes``) message.

        Raises TypeError for anything else, and :class:`ConnectionClosed` if
        the connection is not open, in the calling thread.  A message taken
        from another thread is sent after those that thread sent before it,
        unless the connection closes first (its close is logged with the
        reason).  A peer that lets more than ``max_pending_output`` back up
        is closed with 1008.
        """
        protocol = self._protocol
        if self._loop.thread_id != _get_ident():
            message = protocol.check_send(message)  # the caller gets its own errors
            # Counted in pending_output from now on: a thread that sends
            # faster than the loop takes its messages sees them back up.
            size = len(message.message if isinstance(message, PreparedMessage) else message)
            with self._loop.crossing_lock:
                self._crossing += size
            self._loop.call_soon_threadsafe(self._send_from_thread, message, size)
            return
        if len(protocol.outgoing) + self._queued > self._options.max_pending_output:
            self._over_output_limit(message)
        # Backed up, every frame is queued by reference (a broadcast frame is
        # then held once); else only a large one (see Protocol.send).
        written = len(protocol.outgoing)
        chunk = protocol.send(message, _COPY_FREE_FROM if self._queue is None else 0)
        self._stats.messages_out += 1
        if chunk is not None:
            # The protocol wrote into outgoing as well only when it split a
            # frame: its header there, its payload handed back.
            self._enqueue(chunk, len(protocol.outgoing) != written)
            output = self._stats.output
            total = self._options.max_total_pending
            if total is not None and output.held > total:
                self._shed_slowest(output, total)
                if self._sock is None or protocol.state is not _OPEN:
                    raise protocol.closed_error("peer too slow: total output limit reached")
        if not self._flush_scheduled:  # the flag test saves a call per message
            self._schedule_flush()

    def ping(self, payload: bytes = b"") -> None:
        """Send a ping (at most 125 bytes); the pong reaches no handler."""
        payload = _check_ping(payload)
        if not self._loop.in_loop_thread:
            self._loop.call_soon_threadsafe(self._ping_now, payload)
            return
        self._ping_now(payload)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake; the TCP connection ends when it
        completes or after ``close_timeout``.  A handshake still in progress
        is refused with 503 instead.  A no-op once closing."""
        _check_close(code, reason)
        if not self._loop.in_loop_thread:
            self._loop.call_soon_threadsafe(self._close_now, code, reason)
            return
        self._close_now(code, reason)

    def subscribe(
        self, topic: str, since: Optional[str] = None, on_recovery: Optional[Callable[[bool], Any]] = None
    ) -> None:
        """Receive what :meth:`Server.publish` publishes on ``topic`` (until
        :meth:`unsubscribe` or the close); with history, everything after
        position ``since`` first (see :meth:`Server.subscribe`)."""
        self._topic_server().subscribe(self, topic, since, on_recovery)

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``."""
        self._topic_server().unsubscribe(self, topic)

    @property
    def topics(self) -> FrozenSet[str]:
        """The topics this connection is subscribed to (a snapshot)."""
        server = self.server
        return server.topics_of(self) if server is not None else frozenset()

    def _topic_server(self) -> Server:
        if self.server is None:
            raise InvalidState("topics belong to a server's connections")
        return self.server

    def pause_reading(self) -> None:
        """Stop reading from the peer until :meth:`resume_reading`: called in
        ``on_message``, no further event (message, ping, close) is handled
        until then; what the peer sends waits, and TCP slows it down."""
        if not self._loop.in_loop_thread:
            self._loop.call_soon_threadsafe(self.pause_reading)
            return
        if not self._reading_held:
            self._reading_held = True
            if self._sock is not None:
                self._update_interest()

    def resume_reading(self) -> None:
        """Read from the peer again after :meth:`pause_reading`."""
        if not self._loop.in_loop_thread:
            self._loop.call_soon_threadsafe(self.resume_reading)
            return
        if self._reading_held:
            self._reading_held = False
            if self._sock is not None and not self._backlog:
                # What was received but not handled comes first, next turn.
                self._backlog = True
                self._loop.call_soon(self._continue_backlog)

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` in the loop's thread once at most
        ``write_high_water`` bytes are pending (at once if so already), or
        once the connection is gone: flow control for a large sender."""
        if not self._loop.in_loop_thread:
            self._loop.call_soon_threadsafe(self.when_drained, callback)
            return
        if self._sock is None or len(self._protocol.outgoing) + self._queued <= self._options.write_high_water:
            callback()
            return
        if self._drain_callbacks is None:
            self._drain_callbacks = []
        self._drain_callbacks.append(callback)

    def abort(self) -> None:
        """End the TCP connection now, without a closing handshake."""
        if not self._loop.in_loop_thread:
            self._loop.call_soon_threadsafe(self._close_socket)
            return
        self._close_socket()

    # -- output ---------------------------------------------------------------

    def _ping_now(self, payload: bytes) -> None:
        try:
            self._protocol.ping(payload)
        except ConnectionClosed:
            return
        self._schedule_flush()

    def _close_now(self, code: int, reason: str) -> None:
        protocol = self._protocol
        if protocol.state is _OPEN:
            protocol.close(code, reason)
            self._after_protocol()
        elif protocol.state is _CONNECTING and self._sock is not None:
            self._respond(_refusal(503, reason or "closed before the handshake completed"))

    def _send_from_thread(self, message: Union[str, bytes, PreparedMessage], size: int) -> None:
        with self._loop.crossing_lock:
            self._crossing -= size
        try:
            self.send(message)
        except ConnectionClosed:
            # Closed after the caller's check: the close says why.
            logger.debug("connection %d: message from another thread dropped: closed", self.id)

    def _over_output_limit(self, message: Any) -> None:
        """Over ``max_pending_output`` before a send: close (1008) and
        raise unless a write makes room."""
        protocol = self._protocol
        protocol.check_send(message)  # closed already: say so, not "too slow"
        # Over the limit only counts once the kernel has refused to take more.
        self._flush()
        limit = self._options.max_pending_output
        if len(protocol.outgoing) + self._queued > limit:
            logger.warning(
                "connection %d from %s: closed: over %d bytes of output pending (peer too slow)",
                self.id,
                _format_address(self.remote_address),
                limit,
            )
            self._stats.slow_consumer_closes += 1
            self._close_now(CloseCode.POLICY_VIOLATION, "too slow to keep up")
            raise protocol.closed_error("peer too slow: output limit reached")

    def _enqueue(self, chunk: bytes, split: bool = False) -> None:
        """Queue ``chunk`` by reference after all that is pending.

        A frame sent to many connections (a broadcast, a PreparedMessage, the
        same bytes sent to each) is then held once, whatever the number of
        receivers that have not read it yet; the server counts it once in
        ``stats.output``.  What the protocol wrote into ``outgoing`` comes
        first, so it moves to the queue before ``chunk``; if ``split``,
        ``chunk`` is the payload of a frame whose header ends ``outgoing``,
        and the two are kept or dropped together.
        """
        queue = self._queue
        output = self._stats.output
        if queue is None:
            queue = self._queue = collections.deque()
            output.holders[self] = None
        outgoing = self._protocol.outgoing
        if outgoing:
            pending = _Continued(outgoing) if split else bytes(outgoing)
            outgoing.clear()
            queue.append(pending)
            output.hold(pending)
            self._queued += len(pending)
        if chunk:
            queue.append(chunk)
            output.hold(chunk)
            self._queued += len(chunk)

    def _drop_queue(self, keep_head: bool) -> None:
        """Forget what is queued (all but the first chunk if ``keep_head``:
        it may be a frame partly written, and TLS must retry a write with
        the same bytes; with the payload that continues it, if any),
        releasing it from the server's count."""
        queue = self._queue
        if queue is None:
            return
        output = self._stats.output
        kept: List[bytes] = []
        if keep_head:
            kept.append(queue.popleft())
            while type(kept[-1]) is _Continued and queue:
                kept.append(queue.popleft())  # a large frame's payload stays with its header
        for chunk in queue:
            output.release(chunk)
        queue.clear()
        if kept:
            queue.extend(kept)
            self._queued = sum(map(len, kept)) - self._head_sent
            return
        self._queue = None
        self._queued = 0
        self._head_sent = 0
        del output.holders[self]

    def _shed_slowest(self, output: _HeldOutput, total: int) -> None:
        """Over the server's ``max_total_pending``: close (1008) the
        connections with the most output pending until the chunks held fit
        again, freeing what they had not begun to receive (a frame they
        had begun is finished first, then the close frame follows)."""
        slowest = sorted(output.holders, key=lambda connection: connection._queued, reverse=True)
        for connection in slowest:
            if output.held <= total:
                break
            connection._shed(total)

    def _shed(self, total: int) -> None:
        self._protocol.outgoing.clear()  # whole frames only: a partial write is in the queue
        if self._protocol.state is not _OPEN:
            # Closing already, its close frame among what it holds: end it
            # (next turn: not inside another connection's send).
            self._drop_queue(keep_head=False)
            self._loop.call_soon(self._close_socket, True)
            return
        self._drop_queue(keep_head=True)
        self._stats.slow_consumer_closes += 1
        logger.warning(
            "connection %d from %s: closed: the server holds over %d bytes of output (max_total_pending)"
            " and this peer is among the slowest",
            self.id,
            _format_address(self.remote_address),
            total,
        )
        self._close_now(CloseCode.POLICY_VIOLATION, "too slow to keep up")

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.schedule_flush(self)

    def _flush(self) -> None:
        """Write what is pending once, then fix the selector interest."""
        self._flush_scheduled = False
        if self._sock is None:
            return
        protocol = self._protocol
        if (protocol.outgoing or self._queue is not None) and not self._interest & _EVENT_WRITE:
            # Not known to be blocked: try now rather than wait for a wake-up.
            if not self._write():
                return
            if (
                not protocol.outgoing
                and self._queue is None
                and self._interest == _EVENT_READ
                and protocol.state is _OPEN
                and self._drain_callbacks is None
            ):
                return  # all written, nothing to change: the common case
        self._update_interest()

    def _write(self) -> bool:
        """Send what the kernel takes; False if the connection is gone."""
        queue = self._queue
        if queue is not None:
            return self._write_queue(queue)
        outgoing = self._protocol.outgoing
        try:
            sent = self._sock.send(outgoing)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            sent = 0
        except ssl.SSLWantReadError:
            # TLS must read before it can write: retry after the next read.
            self._write_wants_read = True
            sent = 0
        except OSError as exc:
            self._drop("write failed: %s" % (exc.strerror or exc))
            return False
        del outgoing[:sent]
        self._stats.bytes_out += sent
        if outgoing:
            # The peer is behind: what it has not taken waits in the queue,
            # where what follows is added by reference, not copied.
            self._enqueue(b"")
        return True

    def _write_queue(self, queue: Deque[bytes]) -> bool:
        """_write when chunks are queued: as many as the kernel takes, with
        one sendmsg() for several (TLS sockets have none: one send each)."""
        if self._protocol.outgoing:
            self._enqueue(b"")  # what the protocol wrote since goes after
        sock = self._sock
        if sock is None:
            return False
        sent = 0
        try:
            while queue:
                head = queue[0]
                start = self._head_sent
                if self._tls or not _HAS_SENDMSG:
                    count = sock.send(memoryview(head)[start:] if start else head)
                    expected = len(head) - start
                else:
                    buffers: List[Any] = list(itertools.islice(queue, _BUFFERS_PER_WRITE))
                    if start:
                        buffers[0] = memoryview(head)[start:]
                    count = sock.sendmsg(buffers)
                    expected = sum(map(len, buffers))
                sent += count
                self._take_from_queue(queue, count)
                if count < expected:
                    break  # the kernel took what it could
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLWantReadError:
            self._write_wants_read = True
        except OSError as exc:
            self._drop("write failed: %s" % (exc.strerror or exc))
            return False
        self._stats.bytes_out += sent
        if not queue:
            self._queue = None
            self._head_sent = 0
            del self._stats.output.holders[self]
        return True

    def _take_from_queue(self, queue: Deque[bytes], count: int) -> None:
        """Forget the first ``count`` queued bytes: they were written."""
        self._queued -= count
        output = self._stats.output
        start = self._head_sent
        while count:
            head = queue[0]
            left = len(head) - start
            if count < left:
                self._head_sent = start + count
                return
            count -= left
            start = 0
            queue.popleft()
            output.release(head)
        self._head_sent = start

    def _update_interest(self) -> None:
        protocol = self._protocol
        unsent = len(protocol.outgoing) + self._queued
        if self._drain_callbacks is not None and unsent <= self._options.write_high_water:
            self._run_drain_callbacks()
        if not unsent and protocol.state is _CLOSED:
            self._end_tcp()
            if self._sock is None:
                return
        high_water = self._options.write_high_water
        if self._reading_paused:
            if unsent <= high_water // 4:
                self._reading_paused = False
                if self._tls and not self._backlog:
                    self._read_tls_pending()
        elif unsent > high_water:
            # Backpressure: stop reading a peer that is not reading our replies.
            self._reading_paused = True
        interest = 0 if self._reading_paused or self._backlog or self._reading_held else _EVENT_READ
        if unsent:
            # TLS may have to read before it can write.
            interest |= _EVENT_READ if self._write_wants_read else _EVENT_WRITE
        self._set_interest(interest)

    def _run_drain_callbacks(self) -> None:
        callbacks = self._drain_callbacks or []
        self._drain_callbacks = None
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("connection %d: error in a when_drained callback", self.id)

    def _end_tcp(self) -> None:
        """All is written after the protocol closed: end TCP as it says."""
        if self._protocol.end_of_output == SHUT_WR:
            try:
                self._sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
                # Now read (and ignore) until the peer's EOF or close_timeout.
                return
            except OSError:
                pass
        self._close_socket()

    # -- input ----------------------------------------------------------------

    def _io_failed(self) -> None:
        # A bug met while serving this peer: the other connections go on;
        # this one ends at once (its state is not to be trusted).
        if self._sock is not None:
            self._close_socket(reset=True)

    def _handle_io(self, mask: int) -> None:
        if self._tls_handshaking:
            self._continue_tls_handshake()
            return
        if mask & _EVENT_READ:
            self._on_readable()
        if mask & _EVENT_WRITE and self._sock is not None:
            if self._write():
                self._update_interest()

    def _continue_tls_handshake(self) -> None:
        """Drive the TLS handshake one step: it never blocks the loop."""
        sock: Any = self._sock
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_interest(_EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._set_interest(_EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            # Plain HTTP on the TLS port lands here too: one line, no traceback.
            logger.info(
                "connection %d from %s: TLS handshake failed: %s",
                self.id,
                _format_address(self.remote_address),
                getattr(exc, "reason", None) or exc,
            )
            self._close_socket()
            return
        self._tls_handshaking = False
        self._set_interest(_EVENT_READ)
        self._on_readable()  # the client's request may be buffered already

    def _set_interest(self, interest: int) -> None:
        """Watch the socket for ``interest`` (selector events); 0 takes it
        out of the selector, so a socket left unread (paused) cannot keep
        waking the loop."""
        old = self._interest
        if interest == old:
            return
        self._interest = interest
        selector = self._loop.selector
        if not interest:
            selector.unregister(self._sock)  # type: ignore[arg-type]
        elif not old:
            selector.register(self._sock, interest, self)  # type: ignore[arg-type]
        else:
            selector.modify(self._sock, interest, self)  # type: ignore[arg-type]

    def _receive_tls(self, view: memoryview) -> int:
        """Read into ``view``; 0 at EOF, -1 when nothing is ready."""
        sock: Any = self._sock
        try:
            count: int = sock.recv_into(view)
            # What TLS already decrypted does not wake the selector: take it now.
            while count and count < len(view) and sock.pending():
                count += sock.recv_into(view[count:])
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return -1
        except OSError as exc:
            self._drop("read failed: %s" % (exc.strerror or exc))
            return -1
        return count

    def _read_tls_pending(self) -> None:
        # Bytes TLS has decrypted but we did not take wake no selector.
        sock: Any = self._sock
        if sock is not None and sock.pending():
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        if self._sock is None or self._backlog or self._reading_held:
            return
        view = self._loop.receive_view
        if self._tls:
            count = self._receive_tls(view)
            if count < 0:
                return
        else:  # plain TCP, the hot path: the same without TLS's extra reads
            try:
                count = self._sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop("read failed: %s" % (exc.strerror or exc))
                return
        if not count:
            self._drop("peer closed TCP")
            return
        self._stats.bytes_in += count
        if self._write_wants_read:
            self._write_wants_read = False
            self._schedule_flush()
        protocol = self._protocol
        if protocol.state is _CLOSED:
            return  # waiting for the peer's EOF: ignore what it still sends
        data = view[:count]
        event = protocol.whole_message(data)  # one short message: the common case
        if event is not None:
            self._stats.messages_in += 1
            self._take_message(event[1])
            self._after_protocol()
            return
        protocol.receive_data(data)
        self._process(protocol.events())

    def _take_message(self, message: Union[str, bytes]) -> bool:
        """Hand a message to the handler; False when no more may follow now
        (the rate limit closed the connection, or the handler paused reading)."""
        rate = self._options.max_messages_per_second
        if rate is not None and not self._take_token(rate, self._protocol.take_frames() or 1):
            return False
        on_message = self._options.on_message
        if on_message is not None:
            try:
                on_message(self, message)
            except Exception:
                self._handler_failed("on_message")
            if self._reading_held:
                return False  # pause_reading(): not one more event until resume_reading()
        return True

    def _process(self, events: Generator[Tuple[Event, Any], None, None]) -> None:
        """Act on the events in what was received, within this turn's budget."""
        budget = _TURN_BUDGET
        received = 0
        for kind, value in events:
            if kind is _EV_TEXT or kind is _EV_BINARY:
                received += 1
                if not self._take_message(value):
                    events.close()
                    break
                budget -= len(value) + _MESSAGE_COST
                if budget < 0:
                    # Fairness: the rest waits for the next turn, and the
                    # socket is not read until it has been handled.
                    events.close()  # keeps what was not parsed in the buffer
                    self._backlog = True
                    self._loop.call_soon(self._continue_backlog)
                    break
            elif kind is Event.PING or kind is Event.PONG:
                # Control frames cost like messages, or a limited client
                # could spend a core on pings (and their pongs).
                rate = self._options.max_messages_per_second
                if rate is not None and not self._take_token(rate, self._protocol.take_frames()):
                    events.close()
                    break
                if kind is Event.PONG:
                    self._on_pong(value)
            elif kind is Event.REQUEST or kind is Event.HTTP_REQUEST:
                self._on_request(value)
            elif kind is Event.RESPONSE:
                self._cancel_open_timer()
                self._opened()
            elif kind is Event.CLOSE:
                self._log_peer_close()
        self._stats.messages_in += received
        self._after_protocol()

    def _take_token(self, rate: float, cost: int) -> bool:
        """The message-rate limit: a token bucket of ``message_burst``
        filled at ``rate`` a second, from which each frame takes one (a
        whole message one, a message in k fragments k, each ping or pong
        one); False (and a 1008) when it cannot pay ``cost``."""
        now = time.monotonic()
        burst = self._options.message_burst
        tokens = min(burst, self._tokens + (now - self._tokens_at) * rate) if self._tokens_at else burst
        self._tokens_at = now
        if tokens < cost:
            logger.info("connection %d from %s: over %g messages a second: closed",
                        self.id, _format_address(self.remote_address), rate)
            self._close_now(CloseCode.POLICY_VIOLATION, "message rate limit exceeded")
            return False
        self._tokens = tokens - cost
        return True

    def _continue_backlog(self) -> None:
        self._backlog = False
        if self._sock is None:
            return
        self._process(self._protocol.events())
        if not self._backlog:
            self._update_interest()  # read again
            if self._tls:
                self._read_tls_pending()

    def _after_protocol(self) -> None:
        """What the protocol's new state asks of the connection."""
        protocol = self._protocol
        state = protocol.state
        if state is _CLOSING or state is _CLOSED:
            self._stop_keepalive()
            self._start_close_timer()
        if (protocol.outgoing or state is _CLOSED or self._backlog) and not self._flush_scheduled:
            self._schedule_flush()  # (the flag test saves a call per message: the hot path)

    def _handler_failed(self, name: str) -> None:
        logger.exception("connection %d: error in %s", self.id, name)
        if self._protocol.state is _OPEN:
            self._close_now(CloseCode.INTERNAL_ERROR, "internal error")

    def _log_peer_close(self) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            protocol = self._protocol
            logger.debug("connection %d: close frame received: %s", self.id,
                         _describe_close(protocol.close_code or CloseCode.NO_STATUS, protocol.close_reason))

    # -- the opening handshake -------------------------------------------------

    def _on_request(self, request: Request) -> None:
        """A whole request arrived: answer it, or accept the upgrade."""
        protocol = self._protocol
        options = self._options
        self._cancel_open_timer()
        admission = typing.cast(_Admitting, self._owner)._admit(self, request, protocol.is_upgrade, self.peer_address, self._tls)
        self.remote_address = admission.address
        self.scheme = admission.scheme
        answer = admission.response
        headers = options.response_headers
        if answer is None and options.on_handshake is not None:
            try:
                response = options.on_handshake(self)
            except Exception:
                logger.exception("connection %d: error in on_handshake", self.id)
                response = _refusal(500, "internal error")
            if protocol.state is not _CONNECTING:
                return  # the hook closed the connection
            if response is not None:
                if response.status == 101:
                    headers = headers + response.headers
                else:
                    answer = response
                    if response.log_reason is None:
                        response.log_reason = "refused by on_handshake"
        if answer is not None:
            self._respond(answer)
            return
        protocol.accept(headers, admission.subprotocol)
        self._log_access(101)
        self._opened()

    def _log_access(self, status: int) -> None:
        self._stats.count(self._stats.handshakes, status)
        if access_logger.isEnabledFor(logging.INFO):
            request = self._protocol.request
            headers = request.headers if request is not None else Headers()
            extension = None if self._protocol.extension is None else "permessage-deflate"
            # Every field a client wrote goes through _printable: one line per
            # request, and a quoted field ends only at its closing quote.
            access_logger.info(
                '%s "%s %s" %d subprotocol=%s extension=%s "%s"',
                _format_address(self.remote_address),
                _printable(request.method) if request else "-",
                _printable(request.target) if request else "-",
                status,
                _printable(self._protocol.subprotocol or "-"),
                extension or "-",
                _printable(headers.get("User-Agent") or "-"),
            )

    def _respond(self, response: Response) -> None:
        protocol = self._protocol
        protocol.respond(response.status, response.headers, response.body)
        self._log_access(response.status)
        if response.status >= 400 and logger.isEnabledFor(logging.INFO):
            request = protocol.request
            logger.info(
                "connection %d from %s: %s %s answered %d: %s",
                self.id,
                _format_address(self.remote_address),
                _printable(request.method) if request else "-",
                _printable(request.path) if request else "-",
                response.status,
                _printable(response.log_reason or _HTTP_REASONS.get(response.status, "")),
            )
        self._after_protocol()

    def _opened(self) -> None:
        self._owner._connection_opened(self)
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "connection %d open %s %s%s",
                self.id,
                "to" if self._protocol.client else "from",
                _format_address(self.remote_address),
                "" if self._protocol.client else " path " + _printable(self.path),
            )
        self._start_keepalive()
        on_connect = self._options.on_connect
        if on_connect is not None:
            try:
                on_connect(self)
            except Exception:
                self._handler_failed("on_connect")

    # -- timers ---------------------------------------------------------------

    def _cancel_open_timer(self) -> None:
        timer = self._timer
        if timer is not None and timer.callback == self._on_open_timeout:
            timer.cancel()
            self._timer = None

    def _on_open_timeout(self) -> None:
        self._timer = None
        logger.info(
            "connection %d from %s: opening handshake timed out",
            self.id,
            _format_address(self.remote_address),
        )
        self._close_socket()

    def _start_close_timer(self) -> None:
        """Bound the whole end of the connection, drained or not."""
        if self._sock is None:
            return
        timeout = self._options.close_timeout
        if timeout is None:
            if self._protocol.state is not _CLOSED:
                return  # waiting for the peer's close frame, as configured
            # Closed: the peer owes us nothing more, so this is bounded anyway.
            timeout = DEFAULT_CLOSE_TIMEOUT
        timer = self._timer
        if timer is not None:
            # Started already, or the open timer of a request refused as it
            # arrived: whichever ends the connection sooner stays.
            if timer.callback == self._on_close_timeout or timer.when <= time.monotonic() + timeout:
                return
            self._cancel_open_timer()
        self._timer = self._loop.call_later(timeout, self._on_close_timeout)

    def _on_close_timeout(self) -> None:
        self._timer = None
        unsent = len(self._protocol.outgoing) + self._queued
        logger.info(
            "connection %d from %s: closing handshake timed out%s",
            self.id,
            _format_address(self.remote_address),
            " with %d bytes the peer did not take: reset" % unsent if unsent else "",
        )
        # A peer that will not take what is queued must not pin the kernel's
        # buffers either: reset rather than wait for them to drain.
        self._close_socket(reset=bool(unsent))

    def _start_keepalive(self) -> None:
        options = self._options
        interval = options.ping_interval
        if interval is not None:
            self._ping_at = time.monotonic()
            self._loop.watch_keepalive(self, min(interval, options.ping_timeout or interval))

    def _keepalive_check(self, now: float) -> None:
        """The loop's keepalive sweep: ping when due, fail a missing pong."""
        if self._protocol.state is not _OPEN:
            return
        options = self._options
        if self._ping_payload is not None:
            timeout = options.ping_timeout
            if timeout is not None and now - self._ping_at >= timeout:
                self._keepalive_timeout()
        elif now - self._ping_at >= options.ping_interval:  # type: ignore[operator]
            self._ping_payload = os.urandom(4)
            self._ping_at = now
            self._protocol.ping(self._ping_payload)
            self._schedule_flush()

    def _on_pong(self, payload: bytes) -> None:
        if payload == self._ping_payload:
            self._ping_payload = None  # the next ping is due ping_interval after this one

    def _keepalive_timeout(self) -> None:
        self._ping_payload = None
        self._stats.keepalive_timeouts += 1
        logger.warning(
            "connection %d from %s: keepalive ping timeout",
            self.id,
            _format_address(self.remote_address),
        )
        self._close_now(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")

    def _stop_keepalive(self) -> None:
        self._loop.unwatch_keepalive(self)

    # -- the end --------------------------------------------------------------

    def _drop(self, why: str) -> None:
        """The socket failed or the peer left: end the connection now."""
        if self._protocol.state is not _CLOSED:
            logger.debug("connection %d: %s", self.id, why)
        self._close_socket()

    def _close_socket(self, reset: bool = False) -> None:
        """Close TCP (``reset``: discard what the kernel still holds), then
        report the end to the handler and the server, once."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self._stop_keepalive()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self._loop.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        if reset:
            # SO_LINGER 0: close with RST, dropping unsent data, so a peer
            # that stopped reading cannot pin kernel buffers either.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        sock.close()
        self._drop_queue(keep_head=False)
        self._protocol.receive_eof()
        if self._drain_callbacks is not None:
            self._run_drain_callbacks()  # nothing more will drain: let waiters go
        self._report_closed()
        self._owner._connection_closed(self)

    def _report_closed(self) -> None:
        protocol = self._protocol
        address = _format_address(self.remote_address)
        if not protocol.opened:
            error = protocol.handshake_error
            if error is not None and not protocol.client and logger.isEnabledFor(logging.INFO):
                logger.info("connection %d from %s refused: %d %s", self.id, address,
                            error.status, _printable(error.reason))
            return
        code = protocol.close_code if protocol.close_code is not None else CloseCode.ABNORMAL
        stats = self._stats
        stats.count(stats.close_received, code)
        if protocol.close_sent is not None:
            stats.count(stats.close_sent, protocol.close_sent)
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "connection %d %s %s closed: received %s, sent %s",
                self.id,
                "to" if protocol.client else "from",
                address,
                _describe_close(code, protocol.close_reason),
                "nothing" if protocol.close_sent is None
                else _describe_close(protocol.close_sent, protocol.close_sent_reason),
            )
        on_close = self._options.on_close
        if on_close is not None:
            try:
                on_close(self, code, protocol.close_reason)
            except Exception:
                logger.exception("connection %d: error in on_close", self.id)


_LINGER_RESET = struct.pack("ii", 1, 0)


def _describe_close(code: int, reason: str) -> str:
    return "%d (%s)" % (code, _printable(reason)) if reason else str(code)


# =============================================================================
# Listening: the sockets clients arrive on, and a spare descriptor
# =============================================================================


_SPARE_READ = 65536
_OUT_OF_FDS_ANSWER = _http_response(503, [("Retry-After", "5")], b"server busy: out of file descriptors\n")


def _open_spare_fd() -> Optional[int]:
    try:
        return os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


class _Listener:
    """One listening socket, watched by a loop: when a client waits, it calls
    ``on_ready(listener)`` (the server's accept); if that raises (a bug),
    ``on_failed()`` (the server pauses accepting)."""

    __slots__ = ("loop", "on_ready", "on_failed", "sock", "path", "watched")

    def __init__(
        self,
        loop: _EventLoop,
        on_ready: Callable[[_Listener], None],
        on_failed: Callable[[], None],
        sock: socket.socket,
        path: Optional[str],
    ):
        self.loop = loop
        self.on_ready = on_ready
        self.on_failed = on_failed
        self.sock = sock
        self.path = path  # a Unix socket's file, removed on close
        self.watched = False
        self.watch()

    def watch(self) -> None:
        if not self.watched:
            self.loop.selector.register(self.sock, selectors.EVENT_READ, self)
            self.watched = True

    def unwatch(self) -> None:
        if self.watched:
            self.loop.selector.unregister(self.sock)
            self.watched = False

    def _handle_io(self, mask: int) -> None:
        self.on_ready(self)

    def _io_failed(self) -> None:
        self.on_failed()

    def close(self) -> None:
        try:
            self.unwatch()
        except (KeyError, ValueError, OSError):
            pass
        self.sock.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _listen_unix(path: str, backlog: int, mode: int) -> socket.socket:
    """Listen on a Unix socket at ``path`` with permissions ``mode``.

    A socket file left by a process that died is removed; one that something
    still listens on is "in use" (OSError), and anything else is not touched.
    """
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(errno.EEXIST, "%s exists and is not a socket" % path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nothing listens
        except OSError:
            pass
        else:
            raise OSError(errno.EADDRINUSE, "%s is in use: something listens on it" % path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The umask would widen the window before chmod: bind with the mode.
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _listen(host: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    """Bind a listening TCP socket; ``::`` listens on IPv4 too where it can;
    ``reuse_port``: share the port with other processes (SO_REUSEPORT)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    dualstack = family == socket.AF_INET6 and host in ("::", "") and socket.has_dualstack_ipv6()
    return socket.create_server(
        address[:2] if family == socket.AF_INET6 else address,
        family=family,
        backlog=backlog,
        dualstack_ipv6=dualstack,
        reuse_port=reuse_port,
    )


# =============================================================================
# Server: the listeners, the connection table, topics and shutdown
# =============================================================================
#
# The server owns its listeners, its loop (unless it was given one), the
# table of connections and the topics; other threads reach it only through
# the loop's door.


class Server:
    """A WebSocket server: one listening socket, one thread, many connections.

    ``handler`` is an object with any of the methods of :class:`Handler`
    (default: :class:`Echo`), or a function ``on_message(conn, message)``.
    The socket is bound when the server is created, so ``port=0`` picks a
    free port, readable as :attr:`port`.  Timeouts are in seconds, positive,
    or ``None`` to disable one.  Every option is checked before a socket is
    opened: a bad value raises ValueError naming the option and the value,
    one of the wrong type TypeError (see :class:`_Options`).  ``compression`` is ``True``
    (permessage-deflate with :class:`Deflate`'s defaults), a
    :class:`Deflate`, or ``False``.

    At the handshake: ``ssl_context`` serves wss:// (the TLS handshake runs
    in the loop, never blocking it); ``origins`` lists the Origin values
    allowed (``None`` in it admits requests without Origin; others get 403);
    ``subprotocols`` are those the server speaks: the first the client
    offers that is among them is chosen, unless
    ``select_subprotocol(conn, offered)`` decides; ``response_headers`` go on
    every 101; a handler's ``on_handshake(conn)`` may refuse with a
    :class:`Response`.  Plain HTTP GET and HEAD requests: ``health_path``
    (e.g. "/healthz") answers 200; ``pages`` maps paths to
    ``(content_type, body)`` (with ``origins`` set, a page is served only
    where its own origin is allowed, since its WebSocket would be refused
    anywhere else); anything else gets 426.  Once shutdown begins, every
    request gets 503.

    Who gets in is decided by one gate (see :class:`_Gate`): the client is
    the TCP or Unix-socket peer, or, when the peer is among
    ``forwarded_allow_ips`` (addresses, networks, ``"unix"``, ``"*"``), the
    one named by the single ``forwarded_header`` (``"x-forwarded-for"``, the
    default, or ``"forwarded"``); ``max_connections`` (503),
    ``max_connections_per_ip`` (429, upgrades only) and the origin check
    apply to it, while the health check and ``metrics_path`` (served to
    ``metrics_allow_ips``) are exempt from every limit.
    ``max_messages_per_second`` with ``message_burst`` is a token bucket
    from which every frame takes one (pings, pongs and fragments too).

    Output: a frame sent to many connections is held once, however many
    have not read it; ``max_total_pending`` bounds all the output the server
    holds (default: a quarter of physical memory): past it, the connections
    with the most pending are closed with 1008 and what they had not begun
    to receive is freed.

    Fan-out: ``broker`` (a :class:`RedisBroker`) carries :meth:`publish` to
    the subscribers of other processes; ``health_requires_broker`` makes
    the health check answer 503 while no link to Redis is up; one
    connection holds at most ``max_topics`` topics.  History: with
    ``history`` N, every message published to a topic gets a position and
    the last N of each topic are kept (those younger than ``history_ttl``
    seconds, if given; in this process for at most ``history_topics``
    topics, or in Redis with a broker), so ``conn.subscribe(topic,
    since=position)`` recovers what a client missed; ``position_format(topic,
    position, message)`` returns what subscribers receive instead of the
    message (run once per message per process).  Listening: ``sock`` is a socket to
    serve on instead of binding (an inherited or systemd-passed one);
    ``reuse_port`` binds with SO_REUSEPORT so several processes share the
    port; ``name`` (e.g. "worker 2") is what the health check answers.

    Threads: :meth:`serve_forever` makes its thread the loop's thread; every
    method may be called from any thread (see :class:`Connection`).  Use it
    as a context manager to release its sockets however the block ends::

        with Server(Echo(), port=0) as server:
            threading.Thread(target=server.serve_forever).start()
            ...
            server.shutdown(wait=True)
    """

    def __init__(
        self,
        handler: Any = None,
        host: str = "127.0.0.1",
        port: int = 8765,
        *,
        max_size: Optional[int] = DEFAULT_MAX_SIZE,
        max_fragments: Optional[int] = None,
        open_timeout: Optional[float] = DEFAULT_OPEN_TIMEOUT,
        close_timeout: Optional[float] = DEFAULT_CLOSE_TIMEOUT,
        ping_interval: Optional[float] = DEFAULT_PING_INTERVAL,
        ping_timeout: Optional[float] = DEFAULT_PING_TIMEOUT,
        write_high_water: int = DEFAULT_WRITE_HIGH_WATER,
        max_pending_output: int = DEFAULT_MAX_PENDING_OUTPUT,
        max_total_pending: Optional[int] = None,
        compression: Union[bool, Deflate, None] = True,
        ssl_context: Optional[ssl.SSLContext] = None,
        origins: Optional[Iterable[Optional[str]]] = None,
        subprotocols: Iterable[str] = (),
        select_subprotocol: Optional[Callable[[Connection, List[str]], Optional[str]]] = None,
        response_headers: Iterable[Tuple[str, str]] = (),
        health_path: Optional[str] = None,
        pages: Optional[Dict[str, Tuple[str, bytes]]] = None,
        broker: Optional[RedisBroker] = None,
        health_requires_broker: bool = False,
        max_topics: int = DEFAULT_MAX_TOPICS,
        history: Optional[int] = None,
        history_ttl: Optional[float] = None,
        history_topics: int = DEFAULT_HISTORY_TOPICS,
        position_format: Optional[Callable[[str, str, Union[str, bytes]], Union[str, bytes]]] = None,
        max_connections: Optional[int] = None,
        max_connections_per_ip: Optional[int] = None,
        max_messages_per_second: Optional[float] = None,
        message_burst: Optional[float] = None,
        forwarded_allow_ips: Optional[Iterable[str]] = None,
        forwarded_header: str = "x-forwarded-for",
        metrics_path: Optional[str] = None,
        metrics_allow_ips: Optional[Iterable[str]] = None,
        name: Optional[str] = None,
        sock: Union[socket.socket, List[socket.socket], None] = None,
        uds: Optional[str] = None,
        uds_mode: int = 0o660,
        reuse_port: bool = False,
        backlog: int = 1024,
    ):
        self.handler = handler if handler is not None else Echo()
        # Every keyword but the listening ones, checked once (see _Options).
        self.options = options = _Options.for_server(
            self.handler, max_size=max_size, max_fragments=max_fragments, open_timeout=open_timeout,
            close_timeout=close_timeout, ping_interval=ping_interval, ping_timeout=ping_timeout,
            write_high_water=write_high_water, max_pending_output=max_pending_output,
            max_total_pending=max_total_pending, compression=compression, ssl_context=ssl_context,
            origins=origins, subprotocols=subprotocols, select_subprotocol=select_subprotocol,
            response_headers=response_headers, health_path=health_path, pages=pages, broker=broker,
            health_requires_broker=health_requires_broker, max_topics=max_topics, history=history,
            history_ttl=history_ttl, history_topics=history_topics, position_format=position_format,
            max_connections=max_connections, max_connections_per_ip=max_connections_per_ip,
            max_messages_per_second=max_messages_per_second, message_burst=message_burst,
            forwarded_allow_ips=forwarded_allow_ips, forwarded_header=forwarded_header,
            metrics_path=metrics_path, metrics_allow_ips=metrics_allow_ips, name=name,
        )
        self.broker = options.broker
        self.max_topics = options.max_topics
        # History (see the section "History and recovery"): kept here
        # without a broker, in Redis with one.
        self.history = options.history
        self._history: Optional[_History] = None
        if options.history is not None and options.broker is None:
            self._history = _History(options.history, options.history_ttl, options.history_topics)
        self._position_format = options.position_format
        # Subscribers being caught up: (connection, topic) -> [catch-up,
        # on_recovery, announced].
        self._catchups: Dict[Tuple[Connection, str], List[Any]] = {}
        # Owned by the loop's thread: the table of connections (every one
        # with a socket, oldest first), each mapped to whether it is open
        # (what broadcast and `connections` see).  One table, not two: an
        # entry costs about 40 bytes a connection.
        self._connections: Dict[Connection, bool] = {}
        self._hosts: Dict[str, str] = {}  # each client host's string, shared
        # Topics: each one's subscribers in the order they joined, and each
        # subscriber's topics (so a close unsubscribes it everywhere).
        self._topics: Dict[str, Dict[Connection, None]] = {}
        self._subscriptions: Dict[Connection, Set[str]] = {}
        self._next_id = 1
        self._shutting_down = False
        self._accept_paused = False
        self._hooks = "new"  # on_start/on_stop: "new", "started", "stopped"
        # The server's life: "new", "running", then "done" (sockets released).
        self._phase = "new"
        self._phase_lock = threading.Lock()
        self._done = threading.Event()
        self._stats = _Stats()
        # Who gets in, and the counts that decides it by (see _Gate).
        self._gate = _Gate(options, self._stats, self._metrics_text)
        if options.history is not None and options.broker is not None:
            options.broker._use_history(options.history, options.history_ttl)
        self._loop = _EventLoop()  # after every check: a bad argument leaks no descriptor
        self._listeners: List[_Listener] = []
        try:
            if uds is not None:
                sockets = [_listen_unix(uds, backlog, uds_mode)]
            elif sock is None:
                sockets = [_listen(host, port, backlog, reuse_port)]
            else:
                sockets = sock if isinstance(sock, list) else [sock]
                for listener in sockets:
                    listener.listen(backlog)  # a no-op on one already listening
        except BaseException:
            self._loop.close()
            raise
        for listener in sockets:
            listener.setblocking(False)
            self._listeners.append(_Listener(self._loop, self._accept, self._accept_failed, listener, uds))
        address = sockets[0].getsockname()
        self._address = address[:2] if isinstance(address, tuple) else address
        # One descriptor held in reserve: out of descriptors, it is given
        # back to accept a client and answer it 503 (see _refuse_with_spare).
        self._spare_fd = _open_spare_fd()
        self._short_of: Optional[str] = None  # why accepting fails, during an episode
        self._refused_short = 0
        self._uds = uds

    # -- properties -----------------------------------------------------------

    @property
    def address(self) -> Tuple[str, int]:
        """The (host, port) the server listens on."""
        return self._address

    @property
    def port(self) -> int:
        """The port the server listens on (the one chosen, for ``port=0``;
        0 on a Unix socket)."""
        address = self.address
        return address[1] if isinstance(address, tuple) else 0

    @property
    def connections(self) -> List[Connection]:
        """The open connections: a snapshot, safe to iterate from any thread."""
        return [connection for connection in self._open_connections() if connection.state is _OPEN]

    def _open_connections(self) -> List[Connection]:
        """The connections whose handshake completed (some may be closing)."""
        # This runs in other threads too.  dict.copy() copies in one step
        # under the GIL, so the loop thread cannot change the table mid-copy;
        # list(table.items()) is not one step (it makes a tuple per entry,
        # which can start the garbage collector and let another thread in).
        table = self._connections.copy()
        return [connection for connection, is_open in table.items() if is_open]

    @property
    def shutting_down(self) -> bool:
        """True once :meth:`shutdown` has begun."""
        return self._shutting_down

    # -- running --------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run the loop in this thread until :meth:`shutdown` completes, then
        release every socket.  A server runs once."""
        with self._phase_lock:
            if self._phase != "new":
                raise InvalidState("this server has already run or been closed")
            self._phase = "running"
        if self.broker is not None:
            self._loop.call_soon(self._start_broker)
        self._loop.call_soon(self._on_start)
        try:
            self._loop.run()
        finally:
            self._on_stop()  # if the loop ended any other way
            self._release()

    def shutdown(self, wait: bool = False) -> None:
        """Stop gracefully; safe from any thread and from signal handlers.

        Stops accepting, answers handshakes in progress with 503, closes every
        open connection with 1001, and lets :meth:`serve_forever` return once
        each closing handshake is done or ``close_timeout`` has passed.  With
        ``wait=True`` (from another thread) it returns after that; on a
        server that is not running it returns at once, and a later
        :meth:`serve_forever` stops as soon as it starts.
        """
        self._loop.call_soon_threadsafe(self._begin_shutdown)
        if wait and self._phase == "running" and not self._loop.in_loop_thread:
            self._done.wait()

    def close(self) -> None:
        """Stop now and release every socket: connections end without a
        closing handshake (for a graceful end, :meth:`shutdown`).  Safe from
        any thread; if the loop runs in another thread, waits for it."""
        with self._phase_lock:
            phase = self._phase
            if phase == "new":
                self._phase = "closing"
        if phase == "new":
            self._release()
        elif phase == "running":
            self._loop.call_soon_threadsafe(self._stop_now)
            if not self._loop.in_loop_thread:
                self._done.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._phase == "running" and not self._loop.in_loop_thread:
            self.shutdown(wait=True)
        else:
            self.close()

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the server's thread, soon; from any thread."""
        self._loop.call_soon_threadsafe(callback, *args)

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> _Timer:
        """Run ``callback(*args)`` on the server's thread after ``delay``
        seconds; from any thread.  Returns a timer whose ``cancel()`` may
        also be called from any thread."""
        return self._loop.call_later(delay, callback, *args)

    def broadcast(
        self,
        message: Union[str, bytes, PreparedMessage],
        connections: Optional[Iterable[Connection]] = None,
    ) -> int:
        """Send ``message`` to every open connection (or to ``connections``).

        The frame is built once (see :class:`PreparedMessage`).  Returns how
        many connections took it; a connection that cannot keep up is closed
        with 1008 and does not count.  From another thread the message is
        checked there (TypeError), queued through the loop's door and 0 is
        returned.
        """
        prepared = message if isinstance(message, PreparedMessage) else PreparedMessage(message)
        if not self._loop.in_loop_thread:
            targets = None if connections is None else list(connections)
            self._loop.call_soon_threadsafe(self.broadcast, prepared, targets)
            return 0
        delivered = 0
        # No state check per receiver: send() raises for the few closing ones.
        for connection in self._open_connections() if connections is None else connections:
            try:
                connection.send(prepared)
                delivered += 1
            except ConnectionClosed:
                pass
        return delivered

    # -- what operators see ---------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """The server's figures (those of the metrics endpoint) as a dict;
        from any thread (a snapshot, read without locking)."""
        counters = self._stats
        pending = [connection.pending_output for connection in list(self._connections)]
        lag = self._loop.lag_max
        return {
            "connections_open": len(self._open_connections()),
            "connections_accepted": counters.accepted,
            "connections_refused": dict(counters.refused),
            "handshakes": dict(counters.handshakes),
            "messages_in": counters.messages_in,
            "messages_out": counters.messages_out,
            "bytes_in": counters.bytes_in,
            "bytes_out": counters.bytes_out,
            "close_codes_sent": dict(counters.close_sent),
            "close_codes_received": dict(counters.close_received),
            "pending_output_total": sum(pending),
            "pending_output_max": max(pending, default=0),
            "pending_output_held": counters.output.held,
            "slow_consumer_closes": counters.slow_consumer_closes,
            "keepalive_timeouts": counters.keepalive_timeouts,
            "loop_lag_max": lag,
            "broker": None if self.broker is None else self.broker.stats(),
        }

    def _metrics_rows(self) -> List[Tuple[str, Dict[str, Any]]]:
        """The figures the metrics endpoint shows, as (worker, stats()) rows:
        this process's alone here; a worker of ``--workers`` shows them all
        (see _WorkerServer).  The loop lag restarts."""
        figures = self.stats()
        self._loop.lag_max = 0.0
        return [("", figures)]

    def _metrics_text(self) -> bytes:
        """The figures in Prometheus' text format 0.0.4.  With several rows
        (workers), each sample comes once unlabelled, for the service, and
        once per worker with a ``worker`` label."""
        rows = self._metrics_rows()
        lines: List[str] = []
        Samples = Callable[[Dict[str, Any]], List[Tuple[str, Any]]]

        def metric(name: str, kind: str, text: str, samples: Samples, combine: Callable[..., Any] = sum) -> None:
            lines.append("# HELP wsloop_%s %s" % (name, text))
            lines.append("# TYPE wsloop_%s %s" % (name, kind))
            per_row = [(worker, samples(figures)) for worker, figures in rows]
            if len(rows) > 1:
                # The service's figure: sum (or max, min) over the workers.
                values: Dict[str, List[Any]] = {}
                for _, found in per_row:
                    for labels, value in found:
                        values.setdefault(labels, []).append(value)
                per_row.insert(0, ("", [(labels, combine(found)) for labels, found in sorted(values.items())]))
            for worker, found in per_row:
                for labels, value in found:
                    both = ",".join(filter(None, ['worker="%s"' % worker if worker else "", labels]))
                    shown = "%.6f" % value if isinstance(value, float) else value
                    lines.append("wsloop_%s%s %s" % (name, "{%s}" % both if both else "", shown))

        def one(key: str) -> Samples:
            return lambda figures: [("", figures[key])]

        def labelled(label: str, key: str) -> Samples:
            return lambda figures: [('%s="%s"' % (label, name), value) for name, value in sorted(figures[key].items())]

        def closes(figures: Dict[str, Any]) -> List[Tuple[str, Any]]:
            found = [('direction="sent",code="%s"' % code, count)
                     for code, count in sorted(figures["close_codes_sent"].items())]
            return found + [('direction="received",code="%s"' % code, count)
                            for code, count in sorted(figures["close_codes_received"].items())]

        metric("connections_open", "gauge", "Open WebSocket connections.", one("connections_open"))
        metric("connections_accepted_total", "counter", "TCP connections accepted.", one("connections_accepted"))
        metric("connections_refused_total", "counter", "Connections refused by a limit, by reason.",
               labelled("reason", "connections_refused"))
        metric("handshakes_total", "counter", "Handshake answers, by HTTP status.", labelled("status", "handshakes"))
        metric("messages_received_total", "counter", "Messages received.", one("messages_in"))
        metric("messages_sent_total", "counter", "Messages sent.", one("messages_out"))
        metric("bytes_received_total", "counter", "Bytes received.", one("bytes_in"))
        metric("bytes_sent_total", "counter", "Bytes sent.", one("bytes_out"))
        metric("close_codes_total", "counter", "Close codes, sent and received.", closes)
        metric("pending_output_bytes", "gauge", "Bytes accepted for sending, not yet taken by peers.",
               one("pending_output_total"))
        metric("pending_output_max_bytes", "gauge", "The largest output backlog of one connection.",
               one("pending_output_max"), max)
        metric("pending_output_held_bytes", "gauge",
               "Bytes of output held for peers, a frame shared by many counted once (max_total_pending bounds it).",
               one("pending_output_held"))
        metric("slow_consumer_closes_total", "counter", "Connections closed for not keeping up (1008).",
               one("slow_consumer_closes"))
        metric("keepalive_timeouts_total", "counter", "Connections closed for a missing pong.", one("keepalive_timeouts"))
        metric("loop_lag_seconds", "gauge", "How late a timer ran, at most, since the last scrape.",
               lambda figures: [("", float(figures["loop_lag_max"]))], max)
        if any(figures["broker"] is not None for _, figures in rows):

            def broker(key: str) -> Samples:
                return lambda figures: [] if figures["broker"] is None else [("", figures["broker"][key])]

            metric("broker_connected", "gauge", "1 when every link to every Redis server is up.",
                   lambda figures: [] if figures["broker"] is None else
                   [("", int(figures["broker"]["state"] == "connected"))], min)
            metric("broker_gaps_total", "counter", "Reconnects after which messages may be lost.", broker("gaps"))
            metric("broker_dropped_total", "counter", "Publishes dropped while Redis was away.", broker("dropped"))
            metric("broker_missed_total", "counter", "Messages from other nodes known lost (sequence gaps).",
                   broker("missed"))
            metric("broker_stale_total", "counter", "Messages dropped for arriving after a newer one.",
                   broker("stale"))
            metric("broker_published_total", "counter", "Messages published to Redis.", broker("published"))
            metric("broker_received_total", "counter", "Messages received from Redis.", broker("received"))
        return ("\n".join(lines) + "\n").encode("utf-8")

    def _admit(
        self, connection: Connection, request: Request, is_upgrade: bool, peer: Any, tls: bool
    ) -> _Admission:
        """The gate's decision on a connection's request."""
        return self._gate.decide(connection, request, is_upgrade, peer, tls, self._shutting_down)

    # -- topics ---------------------------------------------------------------

    def subscribe(
        self, connection: Connection, topic: str, since: Optional[str] = None,
        on_recovery: Optional[Callable[[bool], Any]] = None,
    ) -> None:
        """Add ``connection`` to ``topic`` (also ``conn.subscribe(topic)``);
        from any thread.  With a broker, the first local subscriber makes
        this process subscribe to the topic in Redis.

        With history, ``since`` (a position the connection was given) asks
        for every message after it first: ``on_recovery(True)`` is called
        on the loop's thread, then those messages are sent in order, then
        the live ones, none missing or repeated between the two.  If they
        cannot all be had (too old, another epoch, not a position) it is
        ``on_recovery(False)`` and the live messages only."""
        _check_topic(topic)
        if since is not None:
            if self.history is None:
                raise ValueError("since= needs a server with history")
            if not isinstance(since, str):
                raise TypeError("since must be a position string")
        held = self._subscriptions.get(connection, ())
        if len(held) >= self.max_topics and topic not in held:
            # Measured (tracemalloc): about 105 bytes per topic a connection
            # holds, about 390 more for a topic's first subscriber in the
            # process (which also costs one Redis subscription).
            raise ValueError("a connection holds at most %d topics (max_topics)" % self.max_topics)
        if not self._loop.in_loop_thread:
            self._loop.call_soon_threadsafe(self.subscribe, connection, topic, since, on_recovery)
            return
        if connection.state is not _OPEN and connection.state is not _CONNECTING:
            return  # closing: it would never be unsubscribed
        subscribers = self._topics.get(topic)
        if subscribers is None:
            subscribers = self._topics[topic] = {}
            if self.broker is not None:
                self.broker._subscribe(topic)
        subscribers[connection] = None
        self._subscriptions.setdefault(connection, set()).add(topic)
        if since is not None and (connection, topic) not in self._catchups:
            self._recover(connection, topic, since, on_recovery)

    def _recover(
        self, connection: Connection, topic: str, since: str, on_recovery: Optional[Callable[[bool], Any]]
    ) -> None:
        position = _parse_position(since)
        catchup = _Catchup(position[0] if position else "", position[1] if position else 0)
        key = (connection, topic)
        self._catchups[key] = [catchup, on_recovery, False]
        if position is None:  # not a position: nothing to recover
            self._history_page(key, _HistoryPage("", 0, 1, []))
        elif self._history is not None:
            self._history_page(key, self._history.read(topic, position[1]))
        else:
            self._read_history(key, position[1])

    def _read_history(self, key: Tuple[Connection, str], after: int) -> None:
        assert self.broker is not None
        self.broker._read(key[1], after, lambda page: self._history_page(key, page))

    def _history_page(self, key: Tuple[Connection, str], page: _HistoryPage) -> None:
        """A page of history for a subscriber being caught up: announce
        the outcome once, send what the seam lets through, read on or end."""
        state = self._catchups.get(key)
        if state is None:
            return  # unsubscribed, or closed, meanwhile
        catchup, on_recovery, announced = state
        connection, topic = key
        items, more = catchup.page(page.epoch, page.top, page.first, self._prepared(topic, page))
        if not more and not self._live_behind(topic, catchup):
            del self._catchups[key]
        if announced and not catchup.recovered:
            # History moved on between two pages: the subscriber was told
            # it recovered, and must not be left silently short.
            connection.close(CloseCode.TRY_AGAIN_LATER, "history moved on; reconnect")
            return
        if not announced and catchup.recovered is not None:
            state[2] = True
            if on_recovery is not None:
                try:
                    on_recovery(bool(catchup.recovered))
                except Exception:
                    logger.exception("error in on_recovery")
        try:
            for item in items:
                connection.send(item)
        except ConnectionClosed:
            self._catchups.pop(key, None)
            return
        if more:
            if self._history is not None:
                self._history_page(key, self._history.read(topic, catchup.cursor))
            else:
                self._read_history(key, catchup.cursor)

    def _live_behind(self, topic: str, catchup: _Catchup) -> bool:
        """Whether the live stream here may still bring messages the
        catch-up has sent (Redis answered the read on another connection
        than the one the live messages come on)."""
        if self.broker is None or catchup.recovered is False:
            return False
        last = self.broker._positions.get(topic)
        return last is None or last[0] != catchup.epoch or last[1] < catchup.cursor

    def _prepared(self, topic: str, page: _HistoryPage) -> List[Any]:
        """The page's messages formatted and framed, once per page (and,
        in the process, once per message kept)."""
        prepared = page.prepared
        if prepared is None:
            prepared = []
            entries = page.entries
            for index, message in enumerate(page.messages):
                if entries is not None:
                    one = entries[index][2]
                    if one is None:
                        one = entries[index][2] = self._prepare(topic, page.epoch, page.first + index, message)
                else:
                    one = self._prepare(topic, page.epoch, page.first + index, message)
                prepared.append(one)
            page.prepared = prepared
        return prepared

    def _prepare(self, topic: str, epoch: str, offset: int, message: Union[str, bytes]) -> PreparedMessage:
        position_format = self._position_format
        if position_format is not None:
            try:
                message = _checked_message(position_format(topic, _format_position(epoch, offset), message))
            except Exception:
                logger.exception("error in position_format; the message goes as it is")
        return PreparedMessage(message)

    def unsubscribe(self, connection: Connection, topic: str) -> None:
        """Remove ``connection`` from ``topic``; from any thread."""
        _check_topic(topic)
        if not self._loop.in_loop_thread:
            self._loop.call_soon_threadsafe(self.unsubscribe, connection, topic)
            return
        topics = self._subscriptions.get(connection)
        if topics is not None:
            topics.discard(topic)
            if not topics:
                del self._subscriptions[connection]
        if self._catchups:
            self._catchups.pop((connection, topic), None)
        subscribers = self._topics.get(topic)
        if subscribers is not None:
            subscribers.pop(connection, None)
            if not subscribers:
                del self._topics[topic]
                if self.broker is not None:
                    self.broker._unsubscribe(topic)

    def topics_of(self, connection: Connection) -> FrozenSet[str]:
        """The topics ``connection`` is subscribed to: a snapshot."""
        # frozenset() copies a set in one step under the GIL.
        return frozenset(self._subscriptions.get(connection, ()))

    def subscriber_count(self, topic: str) -> int:
        """How many connections of this process are subscribed to ``topic``
        (not those of other processes behind the broker); from any thread,
        a snapshot."""
        return len(self._topics.get(topic, ()))

    def publish(self, topic: str, message: Union[str, bytes], exclude: Optional[Connection] = None) -> int:
        """Send ``message`` to every subscriber of ``topic`` here (but
        ``exclude``), and through the broker to those of other processes.

        Framed once for all (see :class:`PreparedMessage`); a subscriber that
        cannot keep up is closed with 1008 and the others go on.  Returns how
        many local connections took it; from another thread the arguments
        are checked there, the message queued through the door, and 0
        returned.
        """
        _check_topic(topic)
        message = _checked_message(message)
        if self.broker is not None and self.history is not None:
            # With history a message is delivered, here too, only once Redis
            # has given it a position: one Redis cannot carry is refused
            # here, in the caller's thread, rather than lost.
            size = len(message) if isinstance(message, bytes) else len(message.encode("utf-8", "surrogatepass"))
            if size > self.broker.max_message:
                raise ValueError("a message of %d bytes is over the broker's max_message (%d): with history it "
                                 "could not be given a position" % (size, self.broker.max_message))
        if not self._loop.in_loop_thread:
            self._loop.call_soon_threadsafe(self.publish, topic, message, exclude)
            return 0
        if self.broker is not None:
            self.broker._publish(topic, message)
            if self.history is not None:
                return 0  # positions come from Redis: delivered here when it sends it back
        history = self._history
        if history is not None:
            epoch, offset, entry = history.append(topic, message)
            return self._deliver(topic, message, exclude, epoch, offset, entry)
        return self._deliver(topic, message, exclude)

    def _deliver(
        self, topic: str, message: Union[str, bytes], exclude: Optional[Connection] = None,
        epoch: Optional[str] = None, offset: int = 0, entry: Optional[List[Any]] = None,
    ) -> int:
        subscribers = self._topics.get(topic)
        if not subscribers:
            return 0
        if epoch is not None:
            return self._deliver_at(subscribers, topic, message, exclude, epoch, offset, entry)
        prepared = PreparedMessage(message)
        delivered = 0
        for connection in list(subscribers):
            if connection is exclude:
                continue
            try:
                connection.send(prepared)
                delivered += 1
            except ConnectionClosed:
                pass
        return delivered

    def _deliver_at(
        self, subscribers: Dict[Connection, None], topic: str, message: Union[str, bytes],
        exclude: Optional[Connection], epoch: str, offset: int, entry: Optional[List[Any]],
    ) -> int:
        """Deliver a message that has a position: formatted once, and held
        for the subscribers still being caught up."""
        prepared = self._prepare(topic, epoch, offset, message)
        if entry is not None:
            entry[2] = prepared
        catchups = self._catchups
        delivered = 0
        for connection in list(subscribers):
            if connection is exclude:
                continue
            if catchups:
                state = catchups.get((connection, topic))
                if state is not None:
                    catchup = state[0]
                    if not catchup.live(offset, prepared, epoch):
                        continue
                    del catchups[(connection, topic)]  # caught up: straight through from now
            try:
                connection.send(prepared)
                delivered += 1
            except ConnectionClosed:
                pass
        return delivered

    def _broker_gap(self, topics: List[str], missed: Optional[Dict[str, Dict[str, int]]] = None) -> None:
        on_gap = self.options.on_broker_gap
        if on_gap is not None:
            try:
                if _takes_missed(on_gap):
                    on_gap(self, topics, missed or {})
                else:
                    on_gap(self, topics)
            except Exception:
                logger.exception("error in on_broker_gap")

    def _start_broker(self) -> None:
        if self.broker is not None:
            self.broker._attach(self._loop, self._deliver, self._broker_gap)

    # -- what connections tell the server -------------------------------------

    def _connection_opened(self, connection: Connection) -> None:
        self._connections[connection] = True
        self._gate.opened(connection, connection.remote_address)

    def _connection_closed(self, connection: Connection) -> None:
        self._connections.pop(connection, None)
        self._gate.leave(connection)
        for topic in list(self._subscriptions.get(connection, ())):
            self.unsubscribe(connection, topic)
        if self._shutting_down and not self._connections:
            self._loop.stop()

    # -- accepting ------------------------------------------------------------

    def _accept(self, listener: _Listener) -> None:
        """A listening socket is readable: accept what is waiting."""
        for _ in range(64):  # bounded, so a connection storm cannot starve the loop
            try:
                sock, address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._short_of_resources(exc)
                    answered = self._refuse_with_spare(listener)
                    if answered is None:
                        return  # nobody else waiting
                    if answered:
                        continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Pause accepting briefly instead of spinning on a
                    # listener that stays readable.
                    self._short_of_resources(exc)
                    self._pause_accepting(0.5)
                    return
                logger.debug("accept failed: %s", exc)
                continue
            if self._short_of is not None:
                logger.warning("accepting connections again (after %d refused: %s)",
                               self._refused_short, self._short_of)
                self._short_of = None
            self._add_connection(sock, address or "unix:" + (listener.path or "?"))

    def _short_of_resources(self, exc: OSError) -> None:
        """One ERROR line per episode of running out, not one per try."""
        if self._short_of is None:
            self._short_of = exc.strerror or str(exc)
            self._refused_short = 0
            logger.error("cannot accept connections: %s; new clients get 503 until some close "
                         "(raise the open-file limit: ulimit -n, LimitNOFILE)", self._short_of)

    def _refuse_with_spare(self, listener: _Listener) -> Optional[bool]:
        """Out of descriptors: give back the one kept in reserve, accept the
        next client on it, answer 503 at once and close, and take the
        reserve again.  True if a client was answered, None if none was
        waiting, False if that could not be done (then the caller pauses)."""
        spare = self._spare_fd
        if spare is None:
            self._spare_fd = _open_spare_fd()  # a connection may have closed since
            return False
        self._spare_fd = None
        os.close(spare)
        try:
            sock, _ = listener.sock.accept()
        except (BlockingIOError, InterruptedError):
            self._spare_fd = _open_spare_fd()
            return None
        except OSError:
            self._spare_fd = _open_spare_fd()
            return False
        self._stats.count(self._stats.refused, "out_of_file_descriptors")
        self._refused_short += 1
        try:
            sock.setblocking(False)
            if self.options.ssl_context is None:  # over TLS there is no 503 to give without a handshake
                try:
                    sock.recv(_SPARE_READ)  # what the request sent so far: close then sends FIN, not RST
                except OSError:
                    pass
                sock.send(_OUT_OF_FDS_ANSWER)
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()
        self._spare_fd = _open_spare_fd()
        return True

    def _pause_accepting(self, delay: float) -> None:
        if self._accept_paused:
            return
        self._accept_paused = True
        for listener in self._listeners:
            listener.unwatch()
        self._loop.call_later(delay, self._resume_accepting)

    def _accept_failed(self) -> None:
        # Accepting raised (a bug, logged): pause rather than spin on it.
        self._pause_accepting(1.0)

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        if self._may_accept():
            for listener in self._listeners:
                listener.watch()

    def _may_accept(self) -> bool:
        """Whether the listeners may be watched again after a pause (a
        worker that stepped aside at max_connections says no)."""
        return True

    def _add_connection(self, sock: socket.socket, address: Any) -> None:
        options = self.options
        if type(address) is tuple:
            # One string per client host, not one per connection: thousands
            # of connections often come from a few addresses (a proxy, NAT).
            hosts = self._hosts
            if len(hosts) >= _HOSTS_KEPT:
                hosts.clear()  # bounded, whatever addresses arrive
            address = (hosts.setdefault(address[0], address[0]),) + address[1:]
        self._stats.accepted += 1
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # gone already (a reset before accept, on some systems)
            logger.debug("dropped a client as it was accepted: %s", exc)
            sock.close()
            return
        ssl_context = options.ssl_context
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        connection = Connection(self, sock, address, self._next_id, options, self._loop, None, self._stats)
        self._next_id += 1
        self._connections[connection] = False
        evict = self._gate.arrive(connection)
        if evict is not None:
            evict.abort()  # a silent client past the limit makes room for this one

    # -- stopping -------------------------------------------------------------

    def _on_start(self) -> None:
        if self._shutting_down:
            return  # shut down before it started: no hooks at all
        self._hooks = "started"
        on_start = self.options.on_start
        if on_start is not None:
            try:
                on_start(self)
            except Exception:
                logger.exception("error in on_start: shutting down")
                self._begin_shutdown()

    def _on_stop(self) -> None:
        if self._hooks != "started":
            return
        self._hooks = "stopped"
        on_stop = self.options.on_stop
        if on_stop is not None:
            try:
                on_stop(self)
            except Exception:
                logger.exception("error in on_stop")

    def _begin_shutdown(self) -> None:
        if self._shutting_down:
            return
        self._shutting_down = True
        self._on_stop()  # before the clients are closed: it may still talk to them
        logger.info("shutting down: closing %d connection(s)", len(self._open_connections()))
        self._close_listeners()
        for connection in list(self._connections):
            connection.close(CloseCode.GOING_AWAY, "server shutting down")
        if not self._connections:
            self._loop.stop()
        else:
            # Each close has its own close_timeout; this is the backstop.
            bound = self.options.close_timeout or DEFAULT_CLOSE_TIMEOUT
            self._loop.call_later(bound + 0.5, self._stop_now)

    def _stop_now(self) -> None:
        self._on_stop()
        for connection in list(self._connections):
            connection.abort()
        self._loop.stop()

    def _release(self) -> None:
        """Close every socket the server holds; it cannot run again."""
        # Whoever releases owns the loop now (it is stopped, or never ran).
        self._loop.thread_id = _get_ident()
        for connection in list(self._connections):
            connection.abort()
        if self.broker is not None and self.broker.loop is self._loop:
            self.broker._close()
        self._close_listeners()
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
        self._loop.close()
        with self._phase_lock:
            self._phase = "done"
        self._done.set()

    def _close_listeners(self) -> None:
        listeners = self._listeners
        self._listeners = []
        for listener in listeners:
            listener.close()


# =============================================================================
# Serving from the main thread, and signals
# =============================================================================
#
# serve() for the common case; SIGINT and SIGTERM start a graceful shutdown
# (every client closed with 1001 within close_timeout).


def serve(handler: Any = None, host: str = "127.0.0.1", port: int = 8765, **options: Any) -> None:
    """Run a :class:`Server` until SIGINT or SIGTERM, then shut down gracefully.

    A second signal exits at once; the signal handlers it replaced are put
    back when it returns.  Keyword ``options`` go to :class:`Server`.
    """
    _run_until_signalled(Server(handler, host, port, **options))


def _run_until_signalled(server: Server) -> None:
    previous = _install_signal_handlers(server)
    logger.info("listening on %s", _format_address(server.address))
    try:
        server.serve_forever()
    finally:
        server.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    logger.info("stopped")


def _install_signal_handlers(server: Server) -> Dict[int, Any]:
    """Shut down on SIGINT/SIGTERM; returns the handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    signals_seen: List[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        if signals_seen:
            os._exit(128 + signum)  # second signal: the user means now
        signals_seen.append(signum)
        server.shutdown()

    previous = {}
    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signum = getattr(signal, name)
            previous[signum] = signal.signal(signum, on_signal)
    return previous


# =============================================================================
# The client: connect() and a blocking connection on its own small loop
# =============================================================================
#
# A client connection is the server's Connection with a client Protocol,
# run by a private _EventLoop in one background thread.  So the same code
# masks nothing it should not, answers pings, bounds the closing handshake
# and speaks TLS; and the thread rule is the server's: the loop's thread owns
# the connection, the caller's threads go through the door.  Why a thread
# rather than reading only inside recv(): keepalive pings are answered, and
# a close is noticed, while the application is busy elsewhere or blocked in
# send(), which a recv()-driven reader cannot promise.
#
# But a message is handled in order with what follows it: once the reader
# has delivered a message, it handles nothing more (pause_reading) until the
# application has taken it and then sent something or asked for the next
# one, or _HOLD_GRACE has passed.  So a protocol violation after a message
# fails the connection only after the application has had that message and
# answered it, as a server handling it in on_message would (Autobahn's
# strict verdict).  After _HOLD_GRACE the reader goes on, answering pings
# and closes, and queues up to _MAX_QUEUE messages the application has not
# taken; then it stops, and TCP slows the server down.

_HOLD_GRACE = 1.0
_MAX_QUEUE = 16


# The ends that iteration takes as normal: a close frame with 1000, 1001, or
# no code at all (1005: the server closed on purpose, and said nothing more),
# when this side sent nothing else (a 1009 or 1011 of ours is an error).
_NORMAL_ENDS = (CloseCode.NORMAL, CloseCode.GOING_AWAY, CloseCode.NO_STATUS)


def _ended_normally(error: ConnectionClosed) -> bool:
    return error.code in _NORMAL_ENDS and (error.sent_code is None or error.sent_code in _NORMAL_ENDS)


class ClientConnection:
    """A WebSocket client connection, as :func:`connect` returns it.

    ``send()``, ``recv()``, ``ping()`` and ``close()`` may be called from any
    thread (one thread may wait in ``recv()`` while others send).  Iterating
    yields messages until the server closes normally (1000, 1001, or a
    close frame without a code) and the client sent no other code; another
    ending raises :class:`ConnectionClosed`, which says why.  Use it as a
    context manager to close it however the block ends.
    """

    # How long a delivered message holds the reader (see above); per object,
    # so a test may shorten it on the connection it holds.
    _hold_grace = _HOLD_GRACE

    def __init__(
        self,
        sock: socket.socket,
        address: Any,
        protocol: Protocol,
        options: _Options,
    ):
        self._loop = _EventLoop()
        self._high_water = options.write_high_water
        self._messages: Deque[Union[str, bytes]] = collections.deque()
        self._condition = threading.Condition()
        self._reading_held = False
        self._delivered = 0  # messages the reader has queued (under _condition)
        self._done = False  # the connection is gone (under _condition)
        self._drain_waiters: List[threading.Event] = []  # senders held by flow control
        self._opened = threading.Event()  # open, or failed before it opened
        self._quiet_ends: Tuple[int, ...] = ()  # more closes that end iteration (reconnecting)
        self._connection = Connection(self, sock, address, 0, options, self._loop, protocol)
        # Its one handler method, options.on_message (_received), finds
        # this object here: the application's slot, and the client is the
        # application of its connection.
        self._connection.data = self
        self._connection._schedule_flush()  # the request goes out on the first turn
        self._thread = threading.Thread(target=self._run, name="wsloop-client", daemon=True)
        self._thread.start()

    # -- what the connection tells its owner (the loop's thread) --------------

    shutting_down = False

    def _connection_opened(self, connection: Connection) -> None:
        self._opened.set()

    def _connection_closed(self, connection: Connection) -> None:
        with self._condition:
            self._done = True
            self._condition.notify_all()
            for waiter in self._drain_waiters:
                waiter.set()
        self._opened.set()
        self._loop.stop()

    @staticmethod
    def _received(connection: Connection, message: Union[str, bytes]) -> None:
        """The client's on_message (see _Options.for_client)."""
        client: ClientConnection = connection.data
        client._on_message(connection, message)

    def _on_message(self, connection: Connection, message: Union[str, bytes]) -> None:
        with self._condition:
            self._messages.append(message)
            self._delivered += 1
            self._reading_held = True
            connection.pause_reading()  # until the application has answered it
            self._condition.notify()
        self._loop.call_later(self._hold_grace, self._hold_expired, self._delivered)

    def _hold_expired(self, delivered: int) -> None:
        with self._condition:
            if self._reading_held and delivered == self._delivered and len(self._messages) < _MAX_QUEUE:
                self._reading_held = False
                self._connection.resume_reading()

    def _run(self) -> None:
        try:
            self._loop.run()
        finally:
            self._connection.abort()  # in case the loop failed: release the socket
            self._loop.close()

    def _wait_open(self, timeout: Optional[float]) -> None:
        protocol = self._connection._protocol
        if not self._opened.wait(timeout):
            self._connection.abort()
            self._thread.join()
            if protocol.response is not None and protocol.handshake_error is not None:
                # A refusal without Content-Length on a connection left open:
                # its body ended with the time allowed.
                raise protocol.handshake_error
            raise TimeoutError("the opening handshake timed out")
        if protocol.state is not _OPEN and not protocol.opened:
            self._thread.join()
            error = protocol.handshake_error
            if error is not None:
                raise error
            raise protocol.closed_error("the connection closed during the opening handshake")

    # -- what the application reads -------------------------------------------

    @property
    def state(self) -> State:
        return self._connection.state

    @property
    def subprotocol(self) -> Optional[str]:
        """The subprotocol the server chose, if any."""
        return self._connection.subprotocol

    @property
    def response(self) -> Response:
        """The server's 101 response (``status``, ``headers``)."""
        return self._connection._protocol.response  # type: ignore[return-value]

    @property
    def response_headers(self) -> Headers:
        """The headers of the server's 101 response."""
        return Headers(self.response.headers)

    @property
    def remote_address(self) -> Any:
        return self._connection.remote_address

    @property
    def close_code(self) -> Optional[int]:
        """The server's close code once closed (1006 if none came)."""
        return self._connection.close_code

    @property
    def close_reason(self) -> str:
        return self._connection.close_reason

    @property
    def close_sent(self) -> Optional[int]:
        """The code of the close frame the client sent, if it sent one
        (1009 for a message over ``max_size``, 1011 for a keepalive timeout)."""
        return self._connection.close_sent

    @property
    def close_sent_reason(self) -> str:
        """The reason in the close frame the client sent."""
        return self._connection.close_sent_reason

    # -- what the application does --------------------------------------------

    def send(self, message: Union[str, bytes]) -> None:
        """Send a text (``str``) or binary (``bytes``) message.

        Blocks while more than ``write_high_water`` bytes wait for the
        server to take them (flow control); raises :class:`ConnectionClosed`
        once the connection is closing.
        """
        connection = self._connection
        connection.send(message)  # checks it, then crosses the loop's door
        self._resume_if_taken()  # the last message is answered
        if connection.pending_output > self._high_water:
            drained = threading.Event()
            taken = []  # set in the loop's thread if the output drained while open

            def on_drained() -> None:
                # Also called when the connection is gone; only a drain
                # before the end means the message was taken (an answer
                # that closes the connection may come right after it).
                if connection.state is not State.CLOSED:
                    taken.append(True)
                drained.set()

            with self._condition:
                done = self._done
                if not done:
                    self._drain_waiters.append(drained)  # set at the end, too
            if not done:
                connection.when_drained(on_drained)  # queued behind the send
                drained.wait()
            if taken:
                return
            with self._condition:
                if self._done:
                    raise connection._protocol.closed_error("closed before the message was taken")

    def recv(self, timeout: Optional[float] = None) -> Union[str, bytes]:
        """The next message: ``str`` for text, ``bytes`` for binary.

        Raises TimeoutError after ``timeout`` seconds without one, and
        :class:`ConnectionClosed` once the connection has closed and every
        message that came before the close has been received.
        """
        self._resume_if_taken()  # done with the last one
        with self._condition:
            if not self._condition.wait_for(lambda: self._messages or self._done, timeout):
                raise TimeoutError("no message within %s s" % timeout)
            if not self._messages:
                raise self._connection._protocol.closed_error()
            return self._messages.popleft()

    def _resume_if_taken(self) -> None:
        with self._condition:
            if self._reading_held and not self._messages:
                self._reading_held = False
                self._connection.resume_reading()

    def __iter__(self) -> Iterator[Union[str, bytes]]:
        while True:
            try:
                yield self.recv()
            except ConnectionClosed as exc:
                if _ended_normally(exc) or (self._quiet_ends and _worth_retrying(exc)):
                    return
                raise

    def ping(self, payload: bytes = b"") -> None:
        """Send a ping (at most 125 bytes)."""
        self._connection.ping(payload)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection: the closing handshake, then TCP; returns
        once it is done or ``close_timeout`` has passed.  Idempotent."""
        self._connection.close(code, reason)
        self._resume_if_taken()  # read the server's answer to our close
        timeout = self._connection._options.close_timeout
        # The close timer bounds the handshake and then the wait for the
        # server's EOF; this is the backstop.
        self._thread.join(2 * (timeout or DEFAULT_CLOSE_TIMEOUT) + 1)
        if self._thread.is_alive():
            self._connection.abort()
            self._thread.join()

    def __enter__(self) -> ClientConnection:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<ClientConnection %s %s>" % (_format_address(self.remote_address), self.state.value)


def _parse_ws_url(url: str) -> Tuple[bool, str, int, str, str]:
    """(secure, host, port, Host header, target) of a ws:// or wss:// URL."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise ValueError("not a ws:// or wss:// URL: %r" % url)
    secure = scheme == "wss"
    host = parts.hostname
    if not host:
        raise ValueError("no host in %r" % url)
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError:
        raise ValueError("bad port in %r" % url) from None
    if parts.username is not None:
        raise ValueError("credentials in the URL are not supported: use headers")
    literal = "[%s]" % host if ":" in host else host
    host_header = literal if port == (443 if secure else 80) else "%s:%d" % (literal, port)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return secure, host, port, host_header, target


def connect(
    url: str,
    *,
    subprotocols: Optional[Iterable[str]] = None,
    origin: Optional[str] = None,
    headers: Optional[Iterable[Tuple[str, str]]] = None,
    compression: Union[bool, Deflate, None] = True,
    max_size: Optional[int] = DEFAULT_MAX_SIZE,
    max_fragments: Optional[int] = None,
    open_timeout: Optional[float] = DEFAULT_OPEN_TIMEOUT,
    close_timeout: Optional[float] = DEFAULT_CLOSE_TIMEOUT,
    ping_interval: Optional[float] = DEFAULT_PING_INTERVAL,
    ping_timeout: Optional[float] = DEFAULT_PING_TIMEOUT,
    write_high_water: int = DEFAULT_WRITE_HIGH_WATER,
    ssl_context: Optional[ssl.SSLContext] = None,
) -> ClientConnection:
    """Open a WebSocket connection to ``url`` (``ws://`` or ``wss://``).

    Offers permessage-deflate (``compression``), ``subprotocols`` and sends
    ``origin`` and ``headers`` with the request.  ``max_size`` bounds each
    message received (1009 beyond it); ``None`` is no limit, at your own
    risk (the server may then make this process hold any amount).  ``wss://`` verifies the
    server's certificate and host name (``ssl.create_default_context()``)
    unless ``ssl_context`` says otherwise.  ``open_timeout`` bounds the
    TCP connection, TLS and the HTTP handshake together.

    Raises ValueError for a bad URL, header or option value (naming the
    option; TypeError for a value of the wrong type), before connecting;
    OSError when the server cannot be reached (ssl.SSLError for TLS),
    TimeoutError, and
    :class:`HandshakeError` when the server refuses (with its ``status``,
    ``headers`` and ``body``), its subclass :class:`InvalidResponse` when
    the answer is not HTTP, and :class:`InvalidUpgrade` when a 101 breaks
    the protocol or answers what the client did not ask for.
    """
    secure, host, port, host_header, target = _parse_ws_url(url)
    if ssl_context is not None and not secure:
        raise ValueError("ssl_context given for a ws:// URL")
    options = _Options.for_client(
        ClientConnection._received, open_timeout, max_size=max_size, max_fragments=max_fragments,
        close_timeout=close_timeout, ping_interval=ping_interval, ping_timeout=ping_timeout,
        write_high_water=write_high_water, compression=compression,
    )
    protocol = Protocol(options.max_size, options.max_fragments, options.compression, client=True)
    protocol.request_upgrade(host_header, target, headers or (), subprotocols or (), origin)
    deadline = None if open_timeout is None else time.monotonic() + open_timeout
    try:
        sock = socket.create_connection((host, port), timeout=open_timeout)
    except socket.timeout:
        raise TimeoutError("timed out connecting to %s port %d" % (host, port)) from None
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if secure:
            context = ssl_context or ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host)  # blocks, within the timeout
        address = sock.getpeername()
        sock.setblocking(False)
    except socket.timeout:
        sock.close()
        raise TimeoutError("timed out in the TLS handshake with %s port %d" % (host, port)) from None
    except BaseException:
        sock.close()
        raise
    client = ClientConnection(sock, address, protocol, options)
    client._wait_open(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return client


# The closes worth trying again after: the server went away or restarts
# (1001, 1012), is overloaded (1013), failed (1011), or TCP broke (1006).
_RETRY_CLOSES = (
    CloseCode.GOING_AWAY, CloseCode.ABNORMAL, CloseCode.INTERNAL_ERROR,
    CloseCode.SERVICE_RESTART, CloseCode.TRY_AGAIN_LATER,
)


def _worth_retrying(error: ConnectionClosed) -> bool:
    """The close is one to retry after, and ours (if any) only answered it,
    or was the keepalive's 1011.  A close we chose is not a passing fault:
    a 1009 or 1002 says the server broke a rule, a 1001 that we leave."""
    if error.code not in _RETRY_CLOSES or error.sent_code is None:
        return error.code in _RETRY_CLOSES
    if error.sent_first:
        return error.sent_code == CloseCode.INTERNAL_ERROR
    return error.sent_code in _RETRY_CLOSES


def reconnecting(
    url: str,
    *,
    initial_delay: float = 0.5,
    max_delay: float = 30.0,
    sleep: Callable[[float], Any] = time.sleep,
    **connect_options: Any,
) -> Iterator[ClientConnection]:
    """Connections to ``url``, one after another, for as long as the server
    is worth trying again::

        for ws in wsloop.reconnecting(url):
            for message in ws:
                handle(message)

    Each connection is :func:`connect`'s (``connect_options`` go to it); the
    loop asks for the next one when its body ends, and the previous
    connection is closed first (with 1000 if it was still open).

    Tried again, after a wait: a network error (``OSError``, so refused,
    reset, unreachable, timed out; not a certificate that fails
    verification), an answer that is not HTTP (:class:`InvalidResponse`),
    a 5xx refusal, and a
    connection that ended with 1001, 1006, 1011, 1012 or 1013 (iterating
    such a connection ends quietly, as for 1000).  The n-th attempt in a
    row waits between half and all of ``min(max_delay, initial_delay * 2 **
    (n - 1))`` seconds (random jitter, so that clients a restart dropped
    do not all come back at once); a connection that opens starts the
    count again.  ``sleep`` does the waiting (``time.sleep``; pass
    ``threading.Event().wait`` to be able to cut it short).

    The end: a normal close (1000, or 1005) ends the loop; a 4xx or other
    refusal raises :class:`HandshakeError`, a 101 that breaks the protocol
    :class:`InvalidUpgrade`, and any other close raises
    :class:`ConnectionClosed`, from the ``for``.  A bad URL raises
    ValueError here.
    """
    _parse_ws_url(url)
    if not 0 < initial_delay <= max_delay:
        raise ValueError("need 0 < initial_delay <= max_delay")
    return _reconnect(url, initial_delay, max_delay, sleep, connect_options)


def _reconnect(
    url: str, initial_delay: float, max_delay: float, sleep: Callable[[float], Any], options: Dict[str, Any]
) -> Iterator[ClientConnection]:
    attempts = 0
    while True:
        why: Exception
        try:
            ws = connect(url, **options)
        except InvalidResponse as exc:
            why = exc  # not HTTP, or no answer: perhaps a server (re)starting
        except HandshakeError as exc:
            if exc.status is None or exc.status < 500:
                raise  # a refusal that will not change, or an InvalidUpgrade
            why = exc
        except ssl.SSLCertVerificationError:
            raise
        except OSError as exc:
            why = exc
        else:
            attempts = 0
            ws._quiet_ends = _RETRY_CLOSES
            try:
                yield ws
            finally:
                ws.close()  # also when the loop is left (break, an exception)
            error = ws._connection._protocol.closed_error()
            if not _worth_retrying(error):
                if _ended_normally(error):
                    return
                raise error
            why = error
        attempts += 1
        delay = min(max_delay, initial_delay * 2.0 ** (attempts - 1))
        delay *= 0.5 + random.random() / 2
        logger.info("reconnecting to %s in %.2f s: %s", url, delay, _printable(str(why)))
        sleep(delay)


# =============================================================================
# CLI
# =============================================================================


_DEMO_PAGE = """<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>wsloop {{MODE}}</title>
<style>
  body { font: 16px/1.4 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
  #log { border: 1px solid #ccc; min-height: 10rem; padding: .5rem; white-space: pre-wrap; }
  #log div.in::before { content: "< "; color: #080; }
  #log div.out::before { content: "> "; color: #00c; }
  form { display: flex; gap: .5rem; margin-top: .5rem; }
  #message { flex: 1; }
</style>
<h1>wsloop {{MODE}}</h1>
<p>Status: <span id="status">connecting</span></p>
<div id="log"></div>
<form id="form"><input id="message" autocomplete="off" placeholder="Type a message" autofocus>
<button id="send">Send</button></form>
<script>
  const log = document.getElementById("log");
  const status = document.getElementById("status");
  const input = document.getElementById("message");
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/";
  function show(text, kind) {
    const line = document.createElement("div");
    line.className = kind;
    line.textContent = text;
    log.appendChild(line);
  }
  // In chat mode the server sends your own message back with everyone
  // else's, so it is shown once, when it arrives.
  const chat = "{{MODE}}" === "chat";
  // With --history each message comes with its position: the page keeps
  // the last one and, after a drop, reconnects with ?since= to get what
  // it missed (or is told it cannot).
  const history = {{HISTORY}};
  let last = history ? sessionStorage.getItem("wsloop-position") : null;
  let ws = null, retry = 500;
  function open() {
    ws = new WebSocket(url + (last ? "?since=" + encodeURIComponent(last) : ""));
    ws.binaryType = "arraybuffer";
    ws.onopen = () => { status.textContent = "connected"; retry = 500; };
    ws.onclose = (event) => {
      status.textContent = "closed (" + event.code + (event.reason ? " " + event.reason : "") + ")";
      if (history) {
        status.textContent += "; reconnecting";
        setTimeout(open, retry);
        retry = Math.min(retry * 2, 10000);
      }
    };
    ws.onerror = () => { status.textContent = "error: the connection failed"; };
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") {
        show("[binary " + event.data.byteLength + " bytes]", "in");
        return;
      }
      if (!history) { show(event.data, "in"); return; }
      const data = JSON.parse(event.data);
      if ("recovered" in data) {
        show(data.recovered ? "(reconnected: nothing missed)" : "(reconnected: earlier messages may be missing)", "note");
        return;
      }
      last = data.position;
      sessionStorage.setItem("wsloop-position", last);
      show("message" in data ? data.message : "[binary]", "in");
    };
  }
  open();
  document.getElementById("form").onsubmit = (event) => {
    event.preventDefault();
    if (ws.readyState === WebSocket.OPEN && input.value) {
      ws.send(input.value);
      if (!chat) show(input.value, "out");
      input.value = "";
    }
  };
</script>
</html>
"""


class _UsageError(Exception):
    pass


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage dump
        raise _UsageError(message + " (see --help)")


# The flags parse text into values and check nothing more: the values are
# checked once, by _Options (or Deflate), whose ValueError _main prints
# with the flags in place of the option names (_flag_error).


def _size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    text = text.strip().lower().rstrip("ib")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a size: %r (try 1048576 or 1M)" % text) from None


def _seconds(text: str) -> Optional[float]:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of seconds: %r" % text) from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number: %r" % text) from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text) from None


def _octal(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError("not an octal mode: %r (try 660)" % text) from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError("%s: a mode is 000-777" % text)
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="wsloop",
        description="A WebSocket server: echo (default), chat (--broadcast) or your own app (--app); "
        "or, with --connect URL, a WebSocket client console.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; '::' or 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    apps = parser.add_mutually_exclusive_group()
    apps.add_argument("--broadcast", action="store_true", help="send every message to every client")
    apps.add_argument("--app", metavar="MODULE:ATTR", help="serve your handler (an object, class or on_message function)")
    parser.add_argument("--max-size", type=_size, default=DEFAULT_MAX_SIZE, help="largest incoming message in bytes (default 1M)")
    parser.add_argument("--max-fragments", type=_integer, default=None, help="most frames per message (default max(1024, max-size/64))")
    parser.add_argument("--open-timeout", type=_seconds, default=DEFAULT_OPEN_TIMEOUT, help="seconds to finish the handshake (default 10; 'none' disables)")
    parser.add_argument("--close-timeout", type=_seconds, default=DEFAULT_CLOSE_TIMEOUT, help="seconds to finish the closing handshake (default 10)")
    parser.add_argument("--ping-interval", type=_seconds, default=DEFAULT_PING_INTERVAL, help="seconds between keepalive pings (default 20; 'none' disables)")
    parser.add_argument("--ping-timeout", type=_seconds, default=DEFAULT_PING_TIMEOUT, help="seconds to wait for a pong (default 20)")
    parser.add_argument("--max-pending-output", type=_size, default=DEFAULT_MAX_PENDING_OUTPUT, help="output backlog that closes a slow client with 1008 (default 4M)")
    parser.add_argument("--max-total-pending", type=_size, default=None, help="output the server holds for all clients before the slowest are closed with 1008 (default: a quarter of RAM)")
    parser.add_argument("--certfile", help="serve wss:// with this certificate chain (PEM)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM), if not in --certfile")
    parser.add_argument("--origin", action="append", metavar="ORIGIN", help="allow browsers from this Origin only (repeatable; others get 403); with --connect: the Origin to send")
    parser.add_argument("--allow-no-origin", action="store_true", help="with --origin: also accept requests without an Origin header")
    parser.add_argument("--health-path", default="/healthz", help="plain HTTP health check path (default /healthz; 'none' disables)")
    parser.add_argument("--no-compression", action="store_true", help="decline permessage-deflate")
    parser.add_argument("--compression-window-bits", type=int, default=12, metavar="BITS", help="server compression window, 9-15 (default 12)")
    parser.add_argument("--compression-no-context-takeover", action="store_true", help="compress each message on its own (less memory per connection)")
    parser.add_argument("--compression-threshold", type=_integer, default=128, metavar="BYTES", help="send shorter messages uncompressed (default 128)")
    parser.add_argument("--log-level", default="info", type=str.lower, choices=["debug", "info", "warning", "error"], help="default info")
    parser.add_argument("--version", action="version", version="wsloop " + __version__)
    ops = parser.add_argument_group("operations")
    ops.add_argument("--max-connections", type=_integer, metavar="N", help="past N connections, new clients get 503 (default: no limit)")
    ops.add_argument("--max-connections-per-ip", type=_integer, metavar="N", help="past N open connections from one address (IPv6: its /64), 429")
    ops.add_argument("--max-messages-per-second", type=_number, metavar="R", help="close (1008) a client sending faster than R messages a second (default: no limit)")
    ops.add_argument("--message-burst", type=_number, metavar="B", help="messages a client may send at once within that rate (default R)")
    ops.add_argument("--forwarded-allow-ips", metavar="LIST", help="proxies (addresses, networks, 'unix' for a Unix-socket peer, '*' for any; comma-separated) whose --forwarded-header is believed")
    ops.add_argument("--forwarded-header", default="x-forwarded-for", type=str.lower, choices=list(_FORWARDED_HEADERS), help="the one header naming the client that a trusted proxy sets: x-forwarded-for (with X-Forwarded-Proto; default) or forwarded (RFC 7239); the other is ignored")
    ops.add_argument("--uds", metavar="PATH", help="listen on this Unix socket instead of TCP (for a proxy on the same host)")
    ops.add_argument("--uds-mode", type=_octal, default=0o660, metavar="MODE", help="the Unix socket's permissions (default 660)")
    ops.add_argument("--metrics-path", metavar="PATH", help="serve Prometheus metrics at this path (e.g. /metrics; default off)")
    ops.add_argument("--metrics-allow-ips", metavar="LIST", help="who may read the metrics (default 127.0.0.0/8,::1)")
    ops.add_argument("--no-access-log", action="store_true", help="no 'wsloop.access' line per handshake")
    scale = parser.add_argument_group("several processes")
    scale.add_argument("--workers", type=int, default=1, metavar="N", help="run N worker processes on the port (default 1)")
    scale.add_argument("--worker-timeout", type=_seconds, default=30.0, metavar="SECONDS", help="kill and restart a worker whose loop has not turned for this long (default 30; 'none' disables)")
    scale.add_argument("--redis", metavar="URL", action="append", help="fan out topics (and --broadcast) through Redis: redis://[user:password@]host:port[/db] or rediss://; repeat it to spread topics over several Redis servers")
    scale.add_argument("--redis-prefix", default="wsloop", metavar="PREFIX", help="Redis channel prefix (default wsloop)")
    scale.add_argument("--history", type=_integer, metavar="N", help="keep each topic's last N messages (in Redis with --redis) so clients recover what they missed: ?since=POSITION (default off)")
    scale.add_argument("--history-ttl", type=_number, metavar="SECONDS", help="with --history: keep only messages younger than this (in Redis: a topic's whole history expires this long after its last message)")
    scale.add_argument("--health-requires-broker", action="store_true", help="the health check answers 503 while no link to Redis is up (default: off)")
    client = parser.add_argument_group("client console")
    client.add_argument("--connect", metavar="URL", help="connect to ws:// or wss:// URL: send each line typed, print each message")
    client.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'", help="a request header (repeatable)")
    client.add_argument("--subprotocol", action="append", default=[], metavar="NAME", help="offer this subprotocol (repeatable)")
    client.add_argument("--cafile", help="trust this CA certificate (PEM) for wss://")
    return parser


def _load_app(spec: str) -> Any:
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise _UsageError("--app must be MODULE:ATTRIBUTE, got %r" % spec)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as exc:
        raise _UsageError("cannot load app %r: %s: %s" % (spec, type(exc).__name__, exc)) from None
    if isinstance(target, type):
        try:
            target = target()
        except Exception as exc:
            raise _UsageError("cannot create the app %s(): %s: %s" % (spec, type(exc).__name__, exc)) from None
    try:
        _handler_methods(target)
    except TypeError as exc:
        raise _UsageError("app %r cannot serve: %s" % (spec, exc)) from None
    return target


def _server_ssl_context(certfile: str, keyfile: Optional[str]) -> ssl.SSLContext:
    """A TLS server context, or _UsageError naming the file and the cause."""
    for flag, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        if path is not None and not os.path.isfile(path):
            why = "no such file" if not os.path.exists(path) else "not a file"
            raise _UsageError("cannot read %s %s: %s" % (flag, path, why))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:  # (an OSError too: caught first)
        reason = getattr(exc, "reason", None)
        if reason == "KEY_VALUES_MISMATCH":
            why = "the private key %s does not match the certificate %s" % (keyfile or certfile, certfile)
        elif keyfile is None and _pem_has_no_key(certfile):
            why = "%s holds no private key: give it with --keyfile" % certfile
        else:
            why = "%s%s is not a PEM certificate chain and private key (%s)" % (
                certfile, " with " + keyfile if keyfile else "", reason or exc)
        raise _UsageError("cannot load the TLS certificate: " + why) from None
    except OSError as exc:
        raise _UsageError("cannot read %s: %s" % (exc.filename or certfile, exc.strerror or exc)) from None
    return context


def _pem_has_no_key(path: str) -> bool:
    try:
        with open(path, "rb") as pem:
            return b"PRIVATE KEY-----" not in pem.read()
    except OSError:
        return False


def _systemd_listeners() -> Optional[List[socket.socket]]:
    """The sockets systemd passed (socket activation, sd_listen_fds(3)):
    LISTEN_FDS of them from descriptor 3, if LISTEN_PID names us."""
    count = os.environ.get("LISTEN_FDS", "")
    if not count.isdigit() or os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    try:
        return [socket.socket(fileno=3 + index) for index in range(int(count))] or None
    except OSError as exc:
        raise _UsageError("systemd passed LISTEN_FDS=%s but: %s" % (count, exc.strerror or exc)) from None


def _inherited_listeners() -> Optional[List[socket.socket]]:
    """The listening sockets a supervisor handed down (descriptor numbers,
    comma-separated), if any."""
    text = os.environ.get("WSLOOP_LISTEN_FD")
    return [socket.socket(fileno=int(fd)) for fd in text.split(",")] if text else None


def _bind_only(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT but not listening: it holds the port
    (and picks one for port 0) while taking no connection itself."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("::", "") and socket.has_dualstack_ipv6():
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


# How often a worker checks that its supervisor is still there (seconds).
_SUPERVISOR_CHECK = 1.0

# The watchdog: a worker's loop writes a byte to its supervisor's pipe this
# many times per --worker-timeout (and at least once a second), from a timer,
# so beats stop when the loop stops turning.
_BEATS_PER_TIMEOUT = 4
# How long a stuck worker has, after SIGUSR1, to write its stack to stderr
# before SIGKILL.
_STACK_GRACE = 0.2
# After SIGTERM, how long past close_timeout a worker may take to exit
# before the supervisor kills it.  WSLOOP_STOP_GRACE (seconds) overrides it
# for one supervisor: the tests set it short rather than wait it out.
_STOP_GRACE = 2.0


def _stop_grace() -> float:
    try:
        grace = float(os.environ.get("WSLOOP_STOP_GRACE", _STOP_GRACE))
    except ValueError:
        return _STOP_GRACE
    return grace if 0 <= grace < float("inf") else _STOP_GRACE


class _Worker:
    """One worker process of a supervisor, and what the supervisor knows of it."""

    __slots__ = ("index", "process", "heartbeat", "started", "last_beat", "backoff", "restart_at", "kill_at")

    def __init__(self, index: int):
        self.index = index
        self.process: Optional["subprocess.Popen[bytes]"] = None
        self.heartbeat: Optional[int] = None  # the read end of its heartbeat pipe
        self.started = 0.0
        self.last_beat = 0.0
        self.backoff = 0.25  # doubled at each quick death, up to 30 s
        self.restart_at: Optional[float] = None
        self.kill_at: Optional[float] = None  # SIGKILL due (stuck, or slow to stop)

    def heard_from(self) -> bool:
        """Drain the heartbeat pipe: True if the worker's loop turned."""
        heard = False
        while self.heartbeat is not None:
            try:
                data = os.read(self.heartbeat, 4096)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            heard = True
        return heard

    def ended(self) -> None:
        self.process = None
        self.kill_at = None
        if self.heartbeat is not None:
            os.close(self.heartbeat)
            self.heartbeat = None


def _supervise(args: argparse.Namespace, argv: List[str], passed: Optional[List[socket.socket]] = None) -> int:
    """--workers N: run N workers on one port, restart those that die or
    whose loop stops turning for --worker-timeout, pass SIGINT/SIGTERM on,
    and exit once they are all done (killing those still running
    close_timeout plus _STOP_GRACE after).  ``passed``: the sockets systemd
    passed (socket activation), handed down to every worker instead of a
    port of our own."""
    log = logging.getLogger("wsloop.supervisor")
    stop_grace = _stop_grace()
    reuse_port = hasattr(socket, "SO_REUSEPORT") and not passed
    if passed:
        # Socket activation: systemd listens; every worker accepts from the
        # same sockets, inherited (the kernel wakes one accepting worker).
        holders = passed
    else:
        try:
            # With SO_REUSEPORT each worker listens on its own socket and the
            # kernel spreads new connections evenly; elsewhere they all accept
            # from one listening socket, inherited.
            holders = [_bind_only(args.host, args.port) if reuse_port else _listen(args.host, args.port, 1024)]
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
            print("wsloop: error: cannot listen on %s port %d: %s" % (args.host, args.port, why), file=sys.stderr)
            return 2
    address = holders[0].getsockname()
    port = address[1] if isinstance(address, tuple) else args.port
    where = _format_address(address) if passed else "%s port %d" % (args.host, port)
    command = [sys.executable, os.path.abspath(__file__)] + argv + ["--port", str(port), "--workers", "1"]
    fds = () if reuse_port else tuple(holder.fileno() for holder in holders)
    inherited = {"WSLOOP_REUSEPORT": "1"} if reuse_port else {"WSLOOP_LISTEN_FD": ",".join(map(str, fds))}
    figures_dir: Optional[str] = None
    if args.metrics_path is not None:
        import tempfile

        # Where workers publish their figures for each other (mode 700).
        figures_dir = tempfile.mkdtemp(prefix="wsloop-metrics-")
        inherited["WSLOOP_METRICS_DIR"] = figures_dir
    timeout = args.worker_timeout
    workers = [_Worker(index) for index in range(1, args.workers + 1)]
    signals: List[int] = []

    def start(worker: _Worker) -> None:
        env = dict(os.environ, WSLOOP_WORKER=str(worker.index), WSLOOP_SUPERVISOR=str(os.getpid()), **inherited)
        pass_fds = fds
        writer = None
        if timeout is not None:
            reader, writer = os.pipe()
            os.set_blocking(reader, False)
            worker.heartbeat = reader
            env["WSLOOP_HEARTBEAT_FD"] = str(writer)
            pass_fds = fds + (writer,)
        try:
            # A session of its own: Ctrl-C reaches the supervisor alone, which
            # passes it on once (a worker takes a second signal as "now").
            worker.process = subprocess.Popen(command, env=env, pass_fds=pass_fds, start_new_session=True)
        finally:
            if writer is not None:
                os.close(writer)  # the worker's end: EOF here once it is gone
        worker.started = worker.last_beat = time.monotonic()
        worker.restart_at = None

    def on_signal(signum: int, frame: Any) -> None:
        signals.append(signum)
        for worker in workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    stop_by: Optional[float] = None
    try:
        for worker in workers:
            start(worker)
        log.info("%d workers on %s", args.workers, where)
        while any(worker.process is not None or (worker.restart_at is not None and not signals) for worker in workers):
            now = time.monotonic()
            if signals and stop_by is None and args.close_timeout is not None:
                stop_by = now + args.close_timeout + stop_grace
            for worker in workers:
                process = worker.process
                if process is None:
                    if worker.restart_at is not None and worker.restart_at <= now and not signals:
                        start(worker)
                    continue
                code = process.poll()
                if code is None:
                    if worker.heard_from():
                        worker.last_beat = now
                    if worker.kill_at is None:
                        if timeout is not None and now - worker.last_beat > timeout:
                            log.error("worker %d (pid %d): its loop has not turned for %.1f s; killing it"
                                      " (its stack follows)", worker.index, process.pid, now - worker.last_beat)
                            worker.kill_at = _dump_stack(process, now)
                        elif stop_by is not None and now >= stop_by:
                            log.error("worker %d (pid %d) still running %.1f s after SIGTERM; killing it"
                                      " (its stack follows)", worker.index, process.pid,
                                      args.close_timeout + stop_grace)
                            worker.kill_at = _dump_stack(process, now)
                    elif now >= worker.kill_at:
                        process.kill()
                    continue
                worker.ended()
                if figures_dir is not None:
                    _retire_figures(figures_dir, worker.index)
                if signals:
                    status = status or (0 if code == 0 else 1)
                    continue
                why = "exit status %d" % code if code >= 0 else "signal %s" % signal.Signals(-code).name
                # Back off while it keeps dying young; start afresh after a good run.
                worker.backoff = 0.5 if now - worker.started > 30 else min(2 * worker.backoff, 30.0)
                log.error("worker %d (pid %d) died: %s; restarting in %.1f s",
                          worker.index, process.pid, why, worker.backoff)
                worker.restart_at = now + worker.backoff
            time.sleep(0.05)  # a supervisor's watch: nothing here is latency-bound
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for worker in workers:
            worker.ended()
        for holder in holders:
            holder.close()
        if figures_dir is not None:
            import shutil

            shutil.rmtree(figures_dir, ignore_errors=True)
    log.info("all workers stopped")
    return status


def _dump_stack(process: "subprocess.Popen[bytes]", now: float) -> float:
    """Ask a worker to write its stack to stderr (SIGUSR1, which it hands to
    faulthandler: that works even while its loop is stuck in a handler);
    returns when to kill it."""
    usr1 = getattr(signal, "SIGUSR1", None)
    if usr1 is None:
        return now
    try:
        process.send_signal(usr1)
    except OSError:
        pass
    return now + _STACK_GRACE


# Metrics across workers.  Each worker writes its figures to
# worker-INDEX.json in a directory its supervisor made for them (private,
# removed at exit) about once a second, and again just before it answers a
# scrape; the worker that answers reads every file.  Counters carry over a
# restart: a new worker starts from its predecessor's last figures, so the
# service's totals and each worker="INDEX" series never go down (at most
# the dead worker's last second of counts is lost); gauges are the live
# worker's own (zero while it is down).
_METRICS_PERIOD = 1.0
_COUNTED = ("connections_accepted", "connections_refused", "handshakes", "messages_in", "messages_out",
            "bytes_in", "bytes_out", "close_codes_sent", "close_codes_received", "slow_consumer_closes",
            "keepalive_timeouts")
_COUNTED_TABLES = ("connections_refused", "handshakes", "close_codes_sent", "close_codes_received")
_BROKER_COUNTED = ("published", "received", "dropped", "reconnects", "gaps", "missed", "stale", "protocol_errors")


def _counted(figures: Dict[str, Any], base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``figures`` as JSON keeps them (table keys as strings), with the
    counters of ``base`` (a predecessor's) added and, without a base,
    the gauges zeroed: what a dead worker leaves to its successor."""
    live = base is not None
    carried: Dict[str, Any] = dict(figures) if live else {
        "connections_open": 0, "pending_output_total": 0, "pending_output_max": 0, "pending_output_held": 0,
        "loop_lag_max": 0.0}
    base = base or {}
    for key in _COUNTED:
        if key in _COUNTED_TABLES:
            table = {str(name): count for name, count in base.get(key, {}).items()}
            for name, count in figures.get(key, {}).items():
                table[str(name)] = table.get(str(name), 0) + count
            carried[key] = table
        else:
            carried[key] = base.get(key, 0) + figures.get(key, 0)
    broker = figures.get("broker")
    if broker is not None:
        was = base.get("broker") or {}
        carried["broker"] = dict(broker) if live else {"state": "stopped", "topics": 0}
        for key in _BROKER_COUNTED:
            carried["broker"][key] = was.get(key, 0) + broker.get(key, 0)
    else:
        carried["broker"] = None
    return carried


def _write_figures(path: str, figures: Dict[str, Any]) -> None:
    import json

    spare = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    with open(spare, "w") as out:
        json.dump(figures, out)
    os.replace(spare, path)  # readers see the old file or the new, whole


def _read_figures(path: str) -> Optional[Dict[str, Any]]:
    import json

    try:
        with open(path) as source:
            figures = json.load(source)
    except (OSError, ValueError):
        return None
    return figures if isinstance(figures, dict) else None


def _retire_figures(directory: str, index: int) -> None:
    """The supervisor's part, once a worker is dead: its counters stay for
    its successor, its gauges go to zero."""
    path = os.path.join(directory, "worker-%d.json" % index)
    figures = _read_figures(path)
    if figures is not None:
        _write_figures(path, _counted(figures))


# How often a worker that stopped taking connections at max_connections
# looks whether it has room again (seconds).
_FULL_CHECK = 0.25


class _WorkerServer(Server):
    """A worker of ``--workers``: its metrics show every worker, and at
    ``max_connections`` it stops taking connections from the shared port,
    so that the kernel hands them to the other workers."""

    _figures_path = ""
    _carried: Optional[Dict[str, Any]] = None
    _own_socket = False  # its own SO_REUSEPORT socket, not one it shares
    _full_timer: Optional[_Timer] = None  # set while it takes no connections

    def _accept(self, listener: _Listener) -> None:
        super()._accept(listener)
        if self._full_timer is None and self._at_capacity() and not self._shutting_down:
            self._stop_taking()

    def _at_capacity(self) -> bool:
        return self._gate.at_capacity()

    def _stop_taking(self) -> None:
        if self._own_socket:
            # The kernel gives a SO_REUSEPORT socket its share of new
            # connections for as long as it listens: close it.  What is
            # queued on it now is taken first (and answered 503); what
            # arrives in between is reset, unless the kernel moves it to
            # the others (sysctl net.ipv4.tcp_migrate_req=1).
            for listener in list(self._listeners):
                super()._accept(listener)
            self._close_listeners()
        else:
            # A shared socket: the others accept what this one leaves.
            for listener in self._listeners:
                listener.unwatch()
        logger.info("at max_connections (%d): taking no new connections", self._gate.max_connections or 0)
        self._full_timer = self.call_later(_FULL_CHECK, self._take_again)

    def _take_again(self) -> None:
        self._full_timer = None
        if self._shutting_down:
            return
        if self._at_capacity():
            self._full_timer = self.call_later(_FULL_CHECK, self._take_again)
            return
        if self._own_socket:
            host, port = self.address[:2]
            try:
                sock = _listen(host, port, 1024, reuse_port=True)  # 1024: Server's backlog, the CLI's
            except OSError as exc:
                logger.error("cannot listen again on %s: %s", _format_address(self.address), exc.strerror or exc)
                self._full_timer = self.call_later(_FULL_CHECK, self._take_again)
                return
            sock.setblocking(False)
            listener = _Listener(self._loop, self._accept, self._accept_failed, sock, None)
            self._listeners.append(listener)
            if self._accept_paused:
                listener.unwatch()  # out of descriptors: _resume_accepting watches it
        elif not self._accept_paused:
            for listener in self._listeners:
                listener.watch()
        logger.info("below max_connections again: taking new connections")

    def _may_accept(self) -> bool:
        return self._full_timer is None  # not while stepped aside at max_connections

    def _join(self, index: int, own_socket: bool, figures_dir: Optional[str]) -> None:
        """Worker ``index`` of the supervisor: ``own_socket`` if it listens on
        a SO_REUSEPORT socket of its own; ``figures_dir`` where the workers
        share their metrics, if they do."""
        self._own_socket = own_socket
        if figures_dir:
            self._figures_path = os.path.join(figures_dir, "worker-%d.json" % index)
            self._carried = _counted(_read_figures(self._figures_path) or {})
            self.call_later(0, self._publish_figures, True)

    def _publish_figures(self, again: bool = False) -> None:
        figures = self.stats()
        self._loop.lag_max = 0.0  # each publication has the lag since the last
        try:
            _write_figures(self._figures_path, _counted(figures, self._carried))
        except OSError as exc:
            logger.warning("cannot publish metrics to %s: %s", self._figures_path, exc.strerror or exc)
        if again:
            self.call_later(_METRICS_PERIOD, self._publish_figures, True)

    def _metrics_rows(self) -> List[Tuple[str, Dict[str, Any]]]:
        if not self._figures_path:
            return super()._metrics_rows()
        self._publish_figures()  # first, so no scrape sees less than the last
        directory = os.path.dirname(self._figures_path)
        rows = []
        for name in os.listdir(directory):
            index = name[len("worker-"):-len(".json")]
            if name.startswith("worker-") and name.endswith(".json") and index.isdigit():
                figures = _read_figures(os.path.join(directory, name))
                if figures is not None:
                    rows.append((int(index), figures))
        return [(str(index), figures) for index, figures in sorted(rows)]


def _beat_to_supervisor(server: Server, fd: int, period: float) -> None:
    """The worker's side of the watchdog: a byte to the supervisor every
    ``period`` seconds, from the loop's own timer, so the beats stop when
    the loop stops turning."""
    os.set_blocking(fd, False)

    def beat() -> None:
        try:
            os.write(fd, b".")
        except (BlockingIOError, InterruptedError):
            pass  # the pipe is full: the supervisor has beats enough to read
        except OSError:
            return  # the supervisor is gone (_watch_supervisor acts on that)
        server.call_later(period, beat)

    server.call_later(0, beat)


def _raise_fd_limit() -> None:
    """Allow as many connections as the hard limit allows (the soft one is often 1024)."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def _console(args: argparse.Namespace) -> int:
    """The --connect console: lines typed go out as text messages, messages
    received are printed (binary as its size and first bytes in hex)."""
    headers = []
    for text in args.header:
        name, colon, value = text.partition(":")
        if not colon or not _is_token_text(name.strip()):
            raise _UsageError("--header must be 'NAME: VALUE', got %r" % text)
        headers.append((name.strip(), value.strip()))
    if args.origin and len(args.origin) > 1:
        raise _UsageError("--connect sends one --origin")
    ssl_context = None
    if args.cafile:
        if not os.path.isfile(args.cafile):
            raise _UsageError("cannot read --cafile %s: no such file" % args.cafile)
        try:
            ssl_context = ssl.create_default_context(cafile=args.cafile)
        except (ssl.SSLError, OSError, ValueError) as exc:
            why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            raise _UsageError("cannot use --cafile %s: %s (not PEM certificates?)" % (args.cafile, why)) from None
    try:
        ws = connect(
            args.connect,
            subprotocols=args.subprotocol,
            origin=args.origin[0] if args.origin else None,
            headers=headers,
            compression=not args.no_compression,
            max_size=args.max_size,
            open_timeout=args.open_timeout,
            close_timeout=args.close_timeout,
            ping_interval=args.ping_interval,
            ping_timeout=args.ping_timeout,
            ssl_context=ssl_context,
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    except HandshakeError as exc:
        if exc.status is not None:
            said = exc.body.decode("utf-8", "replace").strip().splitlines()
            why = "%d %s%s" % (exc.status, exc.reason, ": " + said[0] if said else "")
            raise _UsageError("%s refused the connection: %s" % (args.connect, _shown(why))) from None
        raise _UsageError("%s: not a valid WebSocket answer: %s" % (args.connect, _shown(exc.reason))) from None
    except ssl.SSLError as exc:  # (an OSError too: caught first)
        raise _UsageError("TLS with %s failed: %s" % (args.connect, getattr(exc, "verify_message", None) or exc.reason or exc)) from None
    except (OSError, TimeoutError) as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise _UsageError("cannot connect to %s: %s" % (args.connect, why)) from None
    print("connected to %s%s (Ctrl-D closes, Ctrl-C exits)" % (
        args.connect, "; subprotocol " + _shown(ws.subprotocol) if ws.subprotocol else ""), file=sys.stderr)

    def send_lines() -> None:
        try:
            for line in sys.stdin:
                ws.send(line.rstrip("\r\n"))
        except ConnectionClosed:
            return
        ws.close()  # Ctrl-D: a normal close

    threading.Thread(target=send_lines, name="wsloop-console", daemon=True).start()
    try:
        while True:
            message = ws.recv()
            if isinstance(message, str):
                # Escaped: a server's ESC sequences must not drive the terminal.
                print(_shown(message), flush=True)
            else:
                print("[binary %d bytes] %s" % (len(message), message[:32].hex()), flush=True)
    except ConnectionClosed as exc:
        closed = exc
    except KeyboardInterrupt:
        return 130
    print("connection closed: %s" % _shown(str(closed)), file=sys.stderr)
    return 0 if _ended_normally(closed) else 1


# Options whose flag is not named after them.
_FLAGS = {"broker": "--redis", "origins": "--origin"}


def _flag_error(error: ValueError, prefix: str = "") -> _UsageError:
    """A bad option's ValueError as the CLI's one line: the flags in place
    of the option names it gives (Deflate's name none: the first word is
    one, under ``prefix``), and 'none' for a timeout's None (no other
    flag takes None)."""
    options = error.options if isinstance(error, _OptionError) else str(error).split(" ", 1)[:1]
    flags = {option: _FLAGS.get(option, "--" + prefix + option.replace("_", "-")) for option in options}
    text = str(error)
    if options[0] in _TIMEOUT_OPTIONS + ("worker_timeout",):
        text = text.replace("None", "'none'")
    else:  # no other flag takes None
        text = text.replace(", or None,", ",").replace(" or None,", ",")
    words = text.split(" ")
    for index, word in enumerate(words):
        # Whole words: "history" is not in "history_ttl".
        start = len(word) - len(word.lstrip("("))
        name = word[start:].rstrip("),.:;")
        if name in flags:
            words[index] = word[:start] + flags[name] + word[start + len(name):]
    return _UsageError(" ".join(words))


def _server_options(args: argparse.Namespace) -> Dict[str, Any]:
    """Server's keywords from the flags, as given: _Options checks them."""
    origins = None
    if args.origin:
        origins = list(args.origin) + ([None] if args.allow_no_origin else [])
    pages = {}
    if not args.app:
        page = _DEMO_PAGE.replace("{{MODE}}", "chat" if args.broadcast else "echo")
        page = page.replace("{{HISTORY}}", "true" if args.broadcast and args.history is not None else "false")
        pages["/"] = ("text/html; charset=utf-8", page.encode())
    compression: Union[bool, Deflate] = False
    if not args.no_compression:
        try:
            compression = Deflate(
                window_bits=args.compression_window_bits,
                no_context_takeover=args.compression_no_context_takeover,
                threshold=args.compression_threshold,
            )
        except ValueError as exc:
            raise _flag_error(exc, "compression-") from None
    broker = None
    if args.redis:
        try:
            broker = RedisBroker(args.redis, prefix=args.redis_prefix)
        except ValueError as exc:
            raise _UsageError("--redis: %s" % exc) from None
    return dict(
        max_size=args.max_size,
        max_fragments=args.max_fragments,
        open_timeout=args.open_timeout,
        close_timeout=args.close_timeout,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        max_pending_output=args.max_pending_output,
        max_total_pending=args.max_total_pending,
        compression=compression,
        origins=origins,
        health_path=None if args.health_path.lower() == "none" else args.health_path,
        pages=pages,
        broker=broker,
        health_requires_broker=args.health_requires_broker,
        history=args.history,
        history_ttl=args.history_ttl,
        position_format=Chat.format if args.history is not None and args.broadcast else None,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        max_messages_per_second=args.max_messages_per_second,
        message_burst=args.message_burst,
        forwarded_allow_ips=None if args.forwarded_allow_ips is None else [args.forwarded_allow_ips],
        forwarded_header=args.forwarded_header,
        metrics_path=args.metrics_path,
        metrics_allow_ips=None if args.metrics_allow_ips is None else [args.metrics_allow_ips],
    )


def _main(argv: Optional[List[str]] = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
        if args.connect:
            return _console(args)
        if not 0 <= args.port <= 65535:
            raise _UsageError("--port must be 0-65535")
        handler = Chat() if args.broadcast else (_load_app(args.app) if args.app else Echo())
        if args.keyfile and not args.certfile:
            raise _UsageError("--keyfile needs --certfile")
        if args.allow_no_origin and not args.origin:
            raise _UsageError("--allow-no-origin goes with --origin")
        if args.workers < 1:
            raise _UsageError("--workers must be at least 1")
        if args.workers > 1 and args.broadcast and not args.redis:
            # Each worker would hold its own chat: a message would reach only
            # the clients of the worker that took it.
            raise _UsageError("--workers with --broadcast needs --redis, or the chat splits into one per worker")
        if args.history is not None and not (args.broadcast or args.app):
            raise _UsageError("--history goes with --broadcast or --app")
        if args.uds and args.workers > 1:
            raise _UsageError("--workers shares a TCP port; with --uds run one process per socket")
        options = _server_options(args)
        try:
            _timeout("worker_timeout", args.worker_timeout)
            # Checked here, once for every worker: a supervisor must not
            # start workers that would all refuse the same value.
            _Options.for_server(handler, **options)
        except ValueError as exc:
            raise _flag_error(exc) from None
        ssl_context = None
        if args.certfile:
            ssl_context = _server_ssl_context(args.certfile, args.keyfile)
        listeners = _systemd_listeners()
    except _UsageError as exc:
        print("wsloop: error: %s" % exc, file=sys.stderr)
        return 2
    worker = os.environ.get("WSLOOP_WORKER")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s " + ("worker %s " % worker if worker else "") + "%(name)s %(levelname)s %(message)s",
    )
    if args.workers > 1:
        return _supervise(args, list(sys.argv[1:] if argv is None else argv), listeners)
    _raise_fd_limit()
    try:
        server = (_WorkerServer if worker and worker.isdigit() else Server)(
            handler,
            args.host,
            args.port,
            ssl_context=ssl_context,
            name="worker " + worker if worker else None,
            sock=listeners or _inherited_listeners(),
            uds=args.uds if not listeners else None,
            uds_mode=args.uds_mode,
            reuse_port=bool(os.environ.get("WSLOOP_REUSEPORT")),
            **options,
        )
    except OSError as exc:
        # gaierror (an unknown host) carries its message in strerror; its
        # errno is negative, which os.strerror() cannot name.
        why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
        where = args.uds if args.uds else "%s port %d" % (args.host, args.port)
        print("wsloop: error: cannot listen on %s: %s" % (where, why), file=sys.stderr)
        return 2
    if args.no_access_log:
        access_logger.setLevel(logging.WARNING)
    if isinstance(server, _WorkerServer) and worker:
        server._join(int(worker), bool(os.environ.get("WSLOOP_REUSEPORT")), os.environ.get("WSLOOP_METRICS_DIR"))
    supervisor = os.environ.get("WSLOOP_SUPERVISOR")
    if supervisor and supervisor.isdigit():
        _watch_supervisor(server, int(supervisor))
        if hasattr(signal, "SIGUSR1"):
            # What a stuck worker was doing, when its supervisor asks
            # (_dump_stack): faulthandler writes it even mid-handler.
            import faulthandler

            faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    heartbeat = os.environ.get("WSLOOP_HEARTBEAT_FD")
    if heartbeat and heartbeat.isdigit() and args.worker_timeout is not None:
        _beat_to_supervisor(server, int(heartbeat), min(1.0, args.worker_timeout / _BEATS_PER_TIMEOUT))
    _run_until_signalled(server)
    return 0


def _watch_supervisor(server: Server, supervisor: int) -> None:
    """A worker whose supervisor is gone (killed with SIGKILL, which it
    cannot pass on) shuts down gracefully rather than hold the port alone."""

    def check() -> None:
        if os.getppid() != supervisor:
            logging.getLogger("wsloop.supervisor").warning("supervisor (pid %d) gone: shutting down", supervisor)
            server.shutdown(wait=False)
        else:
            server.call_later(_SUPERVISOR_CHECK, check)

    server.call_later(_SUPERVISOR_CHECK, check)


if __name__ == "__main__":
    sys.exit(_main())
