"""The command line, run for real in a subprocess."""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from helpers import Client, request_bytes

COMMAND = [sys.executable, "-m", "wsloop"]


def run_cli(*args, **kw):
    return subprocess.run(COMMAND + list(args), capture_output=True, text=True, timeout=30, **kw)


class CliServer:
    """``python -m wsloop`` on a free port; its stderr read line by line."""

    def __init__(self, *args, cwd=None):
        self.process = subprocess.Popen(
            COMMAND + ["--port", "0", *args],
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )
        self.lines = []
        line = self.wait_for("listening on")
        self.port = int(re.search(r":(\d+)$", line.strip()).group(1))

    def wait_for(self, text):
        """Read log lines until one contains ``text`` (the process is bounded by its own timeouts)."""
        for line in self.process.stderr:
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError("%r never logged; got:\n%s" % (text, "".join(self.lines)))

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.process.stderr.close()


@pytest.fixture
def cli_server():
    servers = []

    def start(*args, **kw):
        servers.append(CliServer(*args, **kw))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_help_and_version():
    result = run_cli("--help")
    assert result.returncode == 0 and "--broadcast" in result.stdout and "--max-size" in result.stdout
    result = run_cli("--version")
    assert result.returncode == 0 and re.match(r"wsloop \d+\.\d+\.\d+", result.stdout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--port", "http"], "--port"),
        (["--port", "70000"], "--port must be 0-65535"),
        (["--max-size", "lots"], "not a size"),
        (["--broadcast", "--app", "x:y"], "not allowed with"),
        (["--app", "no_such_module_here:handler"], "cannot load app"),
        (["--app", "nocolon"], "MODULE:ATTRIBUTE"),
        (["--host", "no.such.host.invalid"], "cannot listen on"),
        (["--compression-window-bits", "8"], "--compression-window-bits must be 9-15"),
    ],
)
def test_user_errors_get_one_line_and_status_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wsloop: error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "wsloop: error: cannot listen on 127.0.0.1 port %d: Address already in use" % port
    ]


def test_echo_logs_open_and_close(cli_server):
    server = cli_server()
    client = Client(server.port, path="/hello")
    assert "connection 1 open from 127.0.0.1:" in server.wait_for("open from")
    client.send_text("echo me")
    assert client.recv_message() == "echo me"
    client.close(1000)
    assert client.expect_close() == (1000, "")
    assert "closed: received 1000, sent 1000" in server.wait_for("closed")


def test_broadcast_flag(cli_server):
    server = cli_server("--broadcast")
    a, b = Client(server.port), Client(server.port)
    server.wait_for("connection 2 open")
    a.send_text("to everyone")
    assert a.recv_message() == "to everyone"
    assert b.recv_message() == "to everyone"


def test_app_flag_with_a_function_and_a_class(cli_server, tmp_path):
    (tmp_path / "myapp.py").write_text(textwrap.dedent('''
        def shout(conn, message):
            conn.send(message.upper())

        class Greeter:
            def on_connect(self, conn):
                conn.send("hi " + conn.path)
    '''))
    server = cli_server("--app", "myapp:shout", cwd=str(tmp_path))
    client = Client(server.port)
    client.send_text("quiet")
    assert client.recv_message() == "QUIET"
    server = cli_server("--app", "myapp:Greeter", cwd=str(tmp_path))
    assert Client(server.port, path="/you").recv_message() == "hi /you"


def test_no_compression_flag(cli_server):
    offer = {"Sec-WebSocket-Extensions": "permessage-deflate"}
    assert b"permessage-deflate" in Client(cli_server().port, headers=offer).response_head
    assert b"permessage-deflate" not in Client(cli_server("--no-compression").port, headers=offer).response_head


def test_max_size_flag(cli_server):
    server = cli_server("--max-size", "1K")
    client = Client(server.port)
    client.send_binary(bytes(1024))
    assert client.recv_message() == bytes(1024)
    client.send_binary(bytes(1025))
    assert client.expect_close()[0] == 1009


def test_sigint_closes_clients_with_1001_and_exits_0(cli_server):
    server = cli_server()
    client = Client(server.port)
    server.wait_for("open from")
    server.process.send_signal(signal.SIGINT)
    assert client.expect_close() == (1001, "server shutting down")
    client.close(1001)
    assert server.process.wait(10) == 0
    assert any("stopped" in line for line in server.process.stderr)


def test_second_signal_exits_at_once(cli_server):
    server = cli_server("--close-timeout", "60")
    client = Client(server.port)
    server.wait_for("open from")
    server.process.send_signal(signal.SIGTERM)
    assert client.expect_close()[0] == 1001  # and we never answer
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(5) == 128 + signal.SIGTERM


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "wsloop")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("wsloop ")


def test_missing_certificate_is_one_line(tmp_path):
    result = run_cli("--certfile", str(tmp_path / "nope.pem"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsloop: error: cannot read --certfile")


def test_unreadable_certificate_is_one_line(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    result = run_cli("--certfile", str(bad))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_wss_health_and_origin_flags(cli_server, tmp_path):
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    server = cli_server("--certfile", str(tmp_path / "cert.pem"), "--keyfile", str(tmp_path / "key.pem"),
                        "--origin", "https://ok.example")
    client = Client(server.port, ssl_context=client_context, headers={"Origin": "https://ok.example"})
    client.send_text("secure")
    assert client.recv_message() == "secure"
    refused = Client(server.port, ssl_context=client_context, handshake=False)
    refused.sock.sendall(request_bytes(headers={"Origin": "https://evil.example"}))
    assert refused.read_http_response()[0] == 403
    health = Client(server.port, ssl_context=client_context, handshake=False)
    health.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert health.read_http_response()[0::2] == (200, b"ok\n")


def test_demo_page_is_served_at_the_root(cli_server):
    server = cli_server()
    page = Client(server.port, handshake=False)
    page.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, head, body = page.read_http_response()
    assert status == 200 and "text/html" in head and b"new WebSocket(" in body


# -- refusals at start-up -----------------------------------------------------------


def run_refused(*args, cwd=None):
    """Run the CLI expecting it to refuse: (status, stderr lines).

    A server that starts instead fails the test as soon as it says "listening on"."""
    process = subprocess.Popen(
        COMMAND + ["--port", "0", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd
    )
    bound = threading.Timer(30, process.kill)  # a bound, should it neither exit nor listen
    bound.start()
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            if "listening on" in line:
                raise AssertionError("started instead of refusing %s:\n%s" % (args, "".join(lines)))
        status = process.wait(30)
    finally:
        bound.cancel()
        if process.poll() is None:
            process.kill()
        process.wait(10)
        process.stderr.close()
    return status, [line.rstrip("\n") for line in lines if line.strip()]


def assert_one_error_line(status, lines):
    assert status == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("wsloop: error: "), lines
    return lines[0]


BAD_APPS = textwrap.dedent('''
    class NeedsArguments:
        def __init__(self, greeting):
            self.greeting = greeting

        def on_message(self, conn, message):
            conn.send(self.greeting)

    class AsyncHandler:
        async def on_message(self, conn, message):
            conn.send(message)

    async_handler = AsyncHandler()

    async def async_function(conn, message):
        conn.send(message)

    number = 42
''')


@pytest.mark.parametrize(
    "attribute, message",
    [
        ("NeedsArguments", "NeedsArguments"),
        ("async_handler", "handlers are synchronous"),
        ("async_function", "handlers are synchronous"),
        ("number", "number"),
    ],
)
def test_app_that_is_not_a_usable_handler_is_one_line(tmp_path, attribute, message):
    (tmp_path / "badapps.py").write_text(BAD_APPS)
    line = assert_one_error_line(*run_refused("--app", "badapps:" + attribute, cwd=str(tmp_path)))
    assert message in line


def test_unresolvable_host_names_the_host_and_the_cause():
    line = assert_one_error_line(*run_refused("--host", "999.1.1.1"))
    assert "999.1.1.1" in line and "Unknown error" not in line
    assert line.rstrip().split(":")[-1].strip(), line  # a cause after the last colon


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A certificate and its key in separate PEM files."""
    import trustme

    directory = tmp_path_factory.mktemp("tls")
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    return directory / "cert.pem", directory / "key.pem"


def test_missing_key_file_is_named(certificate, tmp_path):
    cert, _ = certificate
    missing = str(tmp_path / "nonexistent" / "key.pem")
    line = assert_one_error_line(*run_refused("--certfile", str(cert), "--keyfile", missing))
    assert missing in line, line


def test_certificate_without_its_key_says_so(certificate):
    cert, _ = certificate
    line = assert_one_error_line(*run_refused("--certfile", str(cert)))
    assert "PEM lib" not in line
    assert "--keyfile" in line or "private key" in line.lower(), line


@pytest.mark.parametrize("flag", ["--close-timeout", "--open-timeout", "--ping-interval"])
def test_zero_seconds_is_refused_not_taken_as_none(flag):
    line = assert_one_error_line(*run_refused(flag, "0"))
    assert flag in line and "'none'" in line, line


@pytest.mark.parametrize("flag", ["--close-timeout", "--open-timeout", "--ping-interval", "--ping-timeout"])
def test_negative_seconds_are_refused(flag):
    assert flag in assert_one_error_line(*run_refused(flag, "-1"))


def test_negative_compression_threshold_is_refused():
    assert "--compression-threshold" in assert_one_error_line(*run_refused("--compression-threshold", "-5"))


@pytest.mark.parametrize("level", ["INFO", "Debug"])
def test_log_level_in_any_case(cli_server, level):
    server = cli_server("--log-level", level)
    assert Client(server.port).sock  # it serves


def test_log_lines_name_the_logger(cli_server):
    server = cli_server()
    assert "wsloop" in server.lines[-1]  # the "listening on" line


# -- the API refuses coroutine handlers too ---------------------------------------------


class AsyncOnMessage:
    async def on_message(self, conn, message):
        conn.send(message)


def test_server_refuses_an_async_handler():
    import wsloop

    with pytest.raises(TypeError, match="synchronous"):
        server = wsloop.Server(AsyncOnMessage(), port=0)
        server.close()


def test_serve_refuses_an_async_handler(monkeypatch):
    import wsloop

    def must_not_run(self):
        raise AssertionError("serve() started serving an async handler")

    monkeypatch.setattr(wsloop.Server, "serve_forever", must_not_run)
    saved = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGINT", "SIGTERM")}
    try:
        with pytest.raises(TypeError, match="synchronous"):
            wsloop.serve(AsyncOnMessage(), port=0)
    finally:
        for name, handler in saved.items():
            signal.signal(getattr(signal, name), handler)


# -- the demo page and --origin ------------------------------------------------------------


def get_root(port, host):
    page = Client(port, handshake=False)
    page.sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
    return page.read_http_response()


def test_demo_page_is_refused_when_its_origin_is_not_allowed(cli_server):
    server = cli_server("--origin", "https://other.example")
    status, head, body = get_root(server.port, "127.0.0.1:%d" % server.port)
    assert status == 403, head
    text = body.decode("utf-8")
    assert len(text.strip().splitlines()) == 1 and "--origin" in text, text


def test_demo_page_is_served_when_its_origin_is_allowed(cli_server):
    with socket.socket() as probe:  # the origin names the port, so choose it first
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = cli_server("--port", str(port), "--origin", "http://127.0.0.1:%d" % port)
    status, head, body = get_root(server.port, "127.0.0.1:%d" % port)
    assert status == 200 and b"new WebSocket(" in body


# -- option values: checked once, by the options object; one line with the flag --------


@pytest.mark.parametrize(
    "args, line",
    [
        (["--max-fragments", "0"], "--max-fragments must be a positive integer, not 0"),
        (["--max-size", "-1"], "--max-size must be a positive integer, not -1"),
        (["--open-timeout", "0"], "--open-timeout must be a positive number of seconds, or 'none' to disable it, not 0.0"),
        (["--health-path", "healthz"], "--health-path must be a path starting with /, not 'healthz'"),
        (["--max-messages-per-second", "0.5"],
         "--message-burst (by default --max-messages-per-second) must be at least 1, not 0.5"),
        (["--max-messages-per-second", "10", "--message-burst", "0"],
         "--message-burst must be a number of at least 1, not 0.0"),
        (["--broadcast", "--history-ttl", "5"], "--history-ttl goes with --history"),
        (["--health-requires-broker"], "--health-requires-broker goes with --redis"),
        (["--compression-threshold", "-5"], "--compression-threshold must be at least 0"),
        (["--worker-timeout", "0"], "--worker-timeout must be a positive number of seconds, or 'none' to disable it, not 0.0"),
        # A supervisor checks before it starts any worker, rather than
        # restarting workers that all refuse the same value.
        (["--workers", "2", "--max-messages-per-second", "0.5"],
         "--message-burst (by default --max-messages-per-second) must be at least 1, not 0.5"),
        (["--workers", "2", "--max-fragments", "0"], "--max-fragments must be a positive integer, not 0"),
    ],
)
def test_bad_option_values_are_the_options_error_in_one_line_with_the_flag(args, line):
    assert assert_one_error_line(*run_refused(*args)) == "wsloop: error: " + line
