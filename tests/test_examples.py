"""The README's example is real code that runs."""

import importlib.util
import os
import signal
import subprocess
import sys

import pytest

from helpers import Client, free_port, request_bytes, running_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as file:
        return file.read()


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


# -- token auth -----------------------------------------------------------------


@pytest.fixture
def token_auth(monkeypatch):
    """examples/token_auth.py imported afresh with WS_TOKEN=change-me (its serve() is behind __main__)."""
    monkeypatch.setenv("WS_TOKEN", "change-me")
    spec = importlib.util.spec_from_file_location("example_token_auth", os.path.join(ROOT, "examples", "token_auth.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def handshake_status(port, path):
    client = Client(port, handshake=False)
    try:
        client.sock.sendall(request_bytes(path))
        head = client.read_head()
        return int(head.split(b" ")[1]), head, client
    except BaseException:
        client.shutdown()
        raise


@pytest.mark.parametrize(
    "query, status",
    [
        ("token=change-me", 101),
        ("token=change-me&lang=en", 101),  # other parameters do not matter
        ("lang=en&token=change-me", 101),
        ("token=change%2Dme", 101),  # percent-decoded
        ("token=wrong", 401),
        ("", 401),
        ("token=", 401),
        ("mytoken=change-me", 401),  # not a substring match on the query
        ("token=x&token=change-me", 401),  # exactly one token
        ("token=change-me&token=change-me", 401),
        ("token=change-me+", 401),  # '+' is a space: "change-me "
        ("token=change-m", 401),
    ],
)
def test_token_auth_example_checks_the_token_parameter(token_auth, query, status):
    with running_server(token_auth.TokenAuth()) as server:
        got, head, client = handshake_status(server.port, "/?" + query if query else "/")
        try:
            assert got == status, head
            if status == 101:
                assert b"\r\nSet-Cookie: session=ok; HttpOnly; Secure\r\n" in head
                client.send_text("in")
                assert client.recv_message() == "in"
            else:
                assert b"\r\nWWW-Authenticate: Bearer\r\n" in head
        finally:
            client.shutdown()


def test_token_auth_example_compares_in_constant_time(token_auth, monkeypatch):
    compared = []
    real = token_auth.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(token_auth.hmac, "compare_digest", spy)
    with running_server(token_auth.TokenAuth()) as server:
        for query, status in (("token=change-me", 101), ("token=nope", 401)):
            got, head, client = handshake_status(server.port, "/?" + query)
            client.shutdown()
            assert got == status, head
    assert len(compared) == 2
    assert all(b"change-me" in pair for pair in compared)


@pytest.mark.parametrize("environment", ["unset", "empty"])
def test_token_auth_example_refuses_to_start_without_a_token(tmp_path, environment):
    env = dict(os.environ)
    env.pop("WS_TOKEN", None)
    if environment == "empty":
        env["WS_TOKEN"] = ""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "token_auth.py")],
        capture_output=True, text=True, timeout=30, env=env, cwd=str(tmp_path),
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "WS_TOKEN" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_readme_shows_the_client_example_verbatim():
    assert "```python\n" + read("examples", "client.py") + "```" in read("README.md")


def test_client_example_talks_to_a_server_until_it_closes():
    import wsloop

    class Room(wsloop.Handler):
        def on_message(self, conn, message):
            conn.send(message)  # the echo the example prints first
            conn.send("bye, " + conn.query)
            conn.close(1000)

    with running_server(Room(), subprotocols=["chat.v1"]) as server:
        url = "ws://127.0.0.1:%d/chat?room=1" % server.port
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "client.py"), url],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hello", "bye, room=1"]


def test_greeter_example_is_also_an_app_for_the_cli():
    """Imported by --app, the example serves on the CLI's port, not its own."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    process = subprocess.Popen(
        [sys.executable, "-m", "wsloop", "--port", "0", "--app", "examples.greeter:Greeter"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )
    try:
        for line in process.stderr:
            if "listening on" in line:
                break
        else:
            raise AssertionError("exited with %s" % process.wait())
        port = int(line.strip().rsplit(":", 1)[1])
        assert port != 8765, "importing the example started its own server"
        client = Client(port, path="/?cli")
        assert client.recv_message() == "hello, cli"
        client.shutdown()
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


def test_all_names_every_public_class_and_function():
    import inspect

    import wsloop

    public = {name for name, value in vars(wsloop).items()
              if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
              and value.__module__ == "wsloop"}
    assert public <= set(wsloop.__all__), sorted(public - set(wsloop.__all__))
    assert all(hasattr(wsloop, name) for name in wsloop.__all__)
