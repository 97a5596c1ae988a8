"""Handler.on_start and Handler.on_stop: the server's start and stop, for
the API, serve() and the CLI alike."""

import signal
import textwrap
import threading

import wsloop
from helpers import TIMEOUT, Client, Worker, running_server
from test_cli import CliServer


class Hooks(wsloop.Handler):
    """Records the hooks (and on which thread), says goodbye from on_stop."""

    def __init__(self):
        self.calls = []
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.server = None
        self.open_at_stop = None

    def on_start(self, server):
        self.calls.append(("start", threading.get_ident()))
        self.server = server
        self.started.set()

    def on_connect(self, conn):
        self.calls.append(("connect", threading.get_ident()))

    def on_stop(self, server):
        self.calls.append(("stop", threading.get_ident()))
        self.open_at_stop = [conn.state for conn in server.connections]
        server.broadcast("goodbye")
        self.stopped.set()


def test_on_start_and_on_stop_run_on_the_loops_thread_around_the_connections():
    hooks = Hooks()
    with running_server(hooks, close_timeout=TIMEOUT) as server:
        assert hooks.started.wait(TIMEOUT)
        assert hooks.server is server
        client = Client(server.port)
        try:
            server.shutdown()
            assert hooks.stopped.wait(TIMEOUT)
            assert client.recv_message() == "goodbye"  # sent from on_stop, before the 1001
            assert client.expect_close()[0] == 1001
            client.close(1001)
        finally:
            client.shutdown()
    assert [name for name, _ in hooks.calls] == ["start", "connect", "stop"]
    assert len({thread for _, thread in hooks.calls}) == 1, "hooks ran on more than one thread"
    assert hooks.open_at_stop == [wsloop.State.OPEN]


def test_on_stop_runs_once_when_the_server_is_closed_without_a_shutdown():
    hooks = Hooks()
    server = wsloop.Server(hooks, port=0)
    worker = Worker(server.serve_forever)
    worker.start()
    try:
        assert hooks.started.wait(TIMEOUT)
    finally:
        server.close()  # waits for the loop
        worker.join(TIMEOUT)
    assert not worker.is_alive()
    assert [name for name, _ in hooks.calls] == ["start", "stop"]


def test_no_hooks_for_a_server_shut_down_before_it_served():
    hooks = Hooks()
    server = wsloop.Server(hooks, port=0)
    server.shutdown()
    server.serve_forever()  # returns at once
    assert hooks.calls == []


def test_a_failing_on_start_shuts_the_server_down(caplog):
    class Broken(Hooks):
        def on_start(self, server):
            super().on_start(server)
            raise RuntimeError("no database")

    hooks = Broken()
    server = wsloop.Server(hooks, port=0)
    worker = Worker(server.serve_forever)
    worker.start()
    worker.join(TIMEOUT)
    try:
        assert not worker.is_alive(), "the server went on serving after on_start failed"
    finally:
        server.close()
    assert [name for name, _ in hooks.calls] == ["start", "stop"]
    assert "error in on_start" in caplog.text


def test_serve_hands_the_server_to_on_start():
    hooks = Hooks()
    worker = Worker(wsloop.serve, hooks, port=0)  # not the main thread: no signal handlers
    worker.start()
    try:
        assert hooks.started.wait(TIMEOUT)
        client = Client(hooks.server.port)
        hooks.server.shutdown()
        try:
            assert client.recv_message() == "goodbye"
            assert client.expect_close()[0] == 1001
        finally:
            client.shutdown()
    finally:
        if hooks.server is not None:
            hooks.server.shutdown()
        worker.join(3 * TIMEOUT)
    assert not worker.is_alive()
    assert worker.exception is None
    assert [name for name, _ in hooks.calls] == ["start", "connect", "stop"]


def test_the_cli_calls_on_start_and_on_stop(tmp_path):
    (tmp_path / "hooked.py").write_text(textwrap.dedent('''
        import sys

        class App:
            def on_start(self, server):
                print("started on port", server.port, file=sys.stderr, flush=True)

            def on_stop(self, server):
                print("stopping with", len(server.connections), "open", file=sys.stderr, flush=True)
                server.broadcast("goodbye")
    '''))
    server = CliServer("--app", "hooked:App", cwd=str(tmp_path))
    try:
        server.wait_for("started on port %d" % server.port)
        client = Client(server.port)
        try:
            server.wait_for("connection 1 open")
            server.process.send_signal(signal.SIGINT)
            server.wait_for("stopping with 1 open")
            assert client.recv_message() == "goodbye"
            assert client.expect_close()[0] == 1001
            client.close(1001)
        finally:
            client.shutdown()
        assert server.process.wait(TIMEOUT) == 0
    finally:
        server.stop()
