"""Options: every bad value is refused where the options are built, by the
real Server(...) and connect(...), with a ValueError that names the option
(a TypeError for a value of the wrong type), before any socket is opened.
The CLI's one-line errors for the same values are in test_cli.py."""

import math
import os
import re
import socket

import pytest

import wsloop


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


# (option, bad value, other keywords it needs): each is checked on its own.
SERVER_BAD_VALUES = [
    ("max_size", 0, {}),
    ("max_size", -1, {}),
    ("max_fragments", 0, {}),
    ("open_timeout", 0, {}),
    ("open_timeout", -1.5, {}),
    ("open_timeout", math.nan, {}),
    ("close_timeout", 0, {}),
    ("ping_interval", -1, {}),
    ("ping_timeout", 0, {}),
    ("write_high_water", 0, {}),
    ("max_pending_output", 0, {}),
    ("max_total_pending", 0, {}),
    ("health_path", "healthz", {}),
    ("max_topics", 0, {}),
    ("history", 0, {}),
    ("history_ttl", 0, {"history": 10}),
    ("history_topics", 0, {"history": 10}),
    ("max_connections", 0, {}),
    ("max_connections_per_ip", -1, {}),
    ("max_messages_per_second", 0, {}),
    ("message_burst", 0.5, {"max_messages_per_second": 10}),
    ("forwarded_header", "x-real-ip", {}),
    ("metrics_path", "metrics", {}),
]


@pytest.mark.parametrize(
    "option, value, needs", SERVER_BAD_VALUES, ids=["%s=%r" % (option, value) for option, value, _ in SERVER_BAD_VALUES]
)
def test_server_refuses_a_bad_value_naming_the_option_and_the_value(option, value, needs):
    before = open_descriptors()
    with pytest.raises(ValueError) as caught:
        wsloop.Server(port=0, **dict(needs, **{option: value})).close()
    message = str(caught.value)
    assert message.startswith(option + " must be "), message
    assert message.endswith(", not %r" % (value,)), message
    assert open_descriptors() == before  # refused before any socket was opened


@pytest.mark.parametrize(
    "options, option",
    [
        ({"forwarded_allow_ips": ["10.0.0.0/33"]}, "forwarded_allow_ips"),
        ({"forwarded_allow_ips": ["unix, *, nowhere"]}, "forwarded_allow_ips"),
        ({"metrics_allow_ips": ["unix"]}, "metrics_allow_ips"),
        ({"history_ttl": 5}, "history_ttl"),
        ({"position_format": lambda topic, position, message: message}, "position_format"),
        ({"message_burst": 5}, "message_burst"),
        ({"max_messages_per_second": 0.5}, "message_burst"),  # the burst defaults to the rate
        ({"health_requires_broker": True}, "health_requires_broker"),
    ],
)
def test_server_refuses_a_bad_value_or_pair_naming_the_option_first(options, option):
    before = open_descriptors()
    with pytest.raises(ValueError) as caught:
        wsloop.Server(port=0, **options).close()
    assert re.match(r"%s\b[ :]" % option, str(caught.value)), str(caught.value)
    assert open_descriptors() == before


@pytest.mark.parametrize(
    "options, option",
    [
        ({"max_size": "1M"}, "max_size"),
        ({"max_size": 1.5}, "max_size"),
        ({"max_fragments": True}, "max_fragments"),
        ({"ping_interval": "20"}, "ping_interval"),
        ({"compression": "deflate"}, "compression"),
        ({"ssl_context": "cert.pem"}, "ssl_context"),
        ({"max_messages_per_second": "10"}, "max_messages_per_second"),
        ({"select_subprotocol": "chat"}, "select_subprotocol"),
    ],
)
def test_server_refuses_a_value_of_the_wrong_type_with_typeerror(options, option):
    with pytest.raises(TypeError) as caught:
        wsloop.Server(port=0, **options).close()
    assert str(caught.value).startswith(option + " must be "), str(caught.value)


@pytest.fixture
def refused_port():
    """A port with nothing listening on it: connect() would get an OSError
    there, so a ValueError can only come before it tries."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    return port


CLIENT_BAD_VALUES = [
    ("max_size", 0),
    ("max_fragments", -1),
    ("open_timeout", 0),
    ("close_timeout", -1),
    ("ping_interval", 0),
    ("ping_timeout", math.nan),
    ("write_high_water", 0),
]


@pytest.mark.parametrize(
    "option, value", CLIENT_BAD_VALUES, ids=["%s=%r" % (option, value) for option, value in CLIENT_BAD_VALUES]
)
def test_connect_refuses_a_bad_value_naming_it_before_connecting(refused_port, option, value):
    before = open_descriptors()
    with pytest.raises(ValueError) as caught:
        wsloop.connect("ws://127.0.0.1:%d/" % refused_port, **{option: value})
    message = str(caught.value)
    assert message.startswith(option + " must be "), message
    assert message.endswith(", not %r" % (value,)), message
    assert open_descriptors() == before


def test_connect_refuses_a_compression_of_the_wrong_type(refused_port):
    with pytest.raises(TypeError, match="^compression must be "):
        wsloop.connect("ws://127.0.0.1:%d/" % refused_port, compression="deflate")
