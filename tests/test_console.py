"""The --connect console, run for real in a subprocess against a server in
this process: what a server sends reaches the terminal escaped, and user
errors are one line."""

import os
import subprocess
import sys
import threading

import pytest
import trustme

import wsloop
from helpers import answering_once, running_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = [sys.executable, "-m", "wsloop"]
TIMEOUT = 30


def console(*args):
    """Run the console with its stdin held open (no Ctrl-D: the server ends
    the session): (returncode, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    process = subprocess.Popen(COMMAND + ["--connect", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = _wait(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdin.close()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _wait(process):
    """Read stdout and stderr to their ends while stdin stays open."""
    out, err = [], []
    readers = [threading.Thread(target=lambda: out.append(process.stdout.read()), daemon=True),
               threading.Thread(target=lambda: err.append(process.stderr.read()), daemon=True)]
    for reader in readers:
        reader.start()
    process.wait(TIMEOUT)
    for reader in readers:
        reader.join(TIMEOUT)
    process.stdout.close()
    process.stderr.close()
    return out[0], err[0]


def test_a_cafile_that_is_not_a_certificate_is_one_line_and_status_2(tmp_path):
    key = tmp_path / "key.pem"
    trustme.CA().private_key_pem.write_to_path(str(key))  # a real key, no certificate
    result = console("wss://127.0.0.1:1/", "--cafile", str(key))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wsloop: error: cannot use --cafile ")
    assert "Traceback" not in result.stderr


class Hostile(wsloop.Handler):
    """Sends terminal escapes in a message and in its close reason."""

    def on_connect(self, conn):
        conn.send("\x1b[2J\x1b]0;pwned\x07red\r\nline")
        conn.close(4000, "\x1b[31mbye")


def test_what_the_server_sends_is_printed_escaped():
    with running_server(Hostile()) as server:
        result = console("ws://127.0.0.1:%d/" % server.port)
    assert "\x1b" not in result.stdout + result.stderr, "a raw ESC reached the terminal"
    assert "\x07" not in result.stdout + result.stderr
    assert result.stdout.splitlines() == [r"\x1b[2J\x1b]0;pwned\x07red\r\nline"]
    assert r"received 4000 (private use) '\x1b[31mbye'" in result.stderr
    assert result.returncode == 1  # not a normal close


def test_a_refusals_body_is_printed_escaped():
    class Refuse(wsloop.Handler):
        def on_handshake(self, conn):
            return wsloop.Response(403, "\x1b[31mgo away\x1b[0m\n")

    with running_server(Refuse()) as server:
        result = console("ws://127.0.0.1:%d/" % server.port)
    assert result.returncode == 2
    assert "\x1b" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert r"403 Forbidden: \x1b[31mgo away\x1b[0m" in lines[0]


@pytest.mark.parametrize("answer, why", [
    # InvalidResponse (status None), told apart from a refusal by its type.
    (b"SSH-2.0-OpenSSH_9.6\x1b[2J\r\n\r\n", "not an HTTP/1.1 response"),
    # InvalidUpgrade: the server said 101, so this is no refusal either.
    (b"HTTP/1.0 101 Switching Protocols\r\n\r\n", "a 101 over HTTP/1.0, not HTTP/1.1"),
], ids=["not http", "101 over http/1.0"])
def test_a_bad_answer_is_one_line_not_a_refusal(answer, why):
    with answering_once(answer) as url:
        result = console(url)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == "wsloop: error: %s: not a valid WebSocket answer: %s" % (url, why)
