"""The optional C unmask and the pure-Python one give the same bytes."""

import importlib.util
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

import wsloop


@given(data=st.binary(max_size=5000), mask=st.binary(min_size=4, max_size=4))
def test_active_unmask_matches_the_pure_python_one_and_the_definition(data, mask):
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert wsloop._unmask_python(data, mask) == expected
    assert wsloop._unmask(data, mask) == expected
    assert wsloop._unmask(bytearray(data), bytearray(mask)) == expected  # as the parser calls it


@pytest.mark.parametrize("length", [1, 3, 4, 2047, 2048, 2049, 2050, 2051, 65537])
def test_both_pure_python_ways_match_the_definition(length):
    # Short payloads take the big integer, long ones the XOR tables: both
    # sides of the switch, at every alignment of the last key byte.
    data = os.urandom(length)
    for mask in (b"\x00\x00\x00\x00", b"\xff\x01\x80\x7f", os.urandom(4)):
        expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        assert wsloop._unmask_python(data, mask) == expected
        assert wsloop._unmask_python(memoryview(bytearray(data)), bytearray(mask)) == expected


def test_the_accelerator_is_what_the_environment_says():
    # tox states the expectation: built (pip compiles it) in the usual envs,
    # refused with WSLOOP_NO_SPEEDUPS=1 in the "pure" env.  Elsewhere: used
    # exactly when it can be imported and is not refused.
    expected = os.environ.get("WSLOOP_EXPECT_SPEEDUPS")
    if expected is None:
        available = importlib.util.find_spec("_wsloop_speedups") is not None
        expected = "1" if available and not os.environ.get("WSLOOP_NO_SPEEDUPS") else "0"
    assert wsloop.ACCELERATED is (expected == "1")
    if wsloop.ACCELERATED:
        assert wsloop._unmask is not wsloop._unmask_python
