"""The README's example is real code that runs."""

import os
import signal
import socket
import subprocess
import sys

from helpers import Client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as file:
        return file.read()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_readme_shows_the_greeter_example_verbatim():
    assert "```python\n" + read("examples", "greeter.py") + "```" in read("README.md")


def test_readme_shows_the_token_auth_example_verbatim():
    assert "```python\n" + read("examples", "token_auth.py") + "```" in read("README.md")


def test_greeter_example_runs(tmp_path):
    port = free_port()
    source = read("examples", "greeter.py").replace("port=8765", "port=%d" % port)
    (tmp_path / "greeter.py").write_text(source)
    process = subprocess.Popen(
        [sys.executable, str(tmp_path / "greeter.py")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in process.stderr:  # wait for it to listen
            if "listening on" in line:
                break
        else:
            raise AssertionError("example exited with %s" % process.wait())
        client = Client(port, path="/?ann")
        assert client.recv_message() == "hello, ann"
        client.send_text("shout")
        assert client.recv_message() == "SHOUT"
        client.close(1000)
        assert client.expect_close() == (1000, "")
        assert process.stdout.readline().strip() == "connection 1 closed with 1000"
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
