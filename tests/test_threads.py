"""The thread contract, over real loopback sockets.

The loop thread owns every connection and the server's tables; other threads
act only through one door (a queue that wakes the loop).  So every public
method of Connection and Server may be called from any thread, argument
errors are raised in the caller's thread (validated before crossing the
door), and a server that stops gives back every descriptor it opened.

Each test is bounded in time and waits on events, never on sleeps.  A call
that is expected to return is made on a worker thread and joined with a
timeout, so a hang is reported as a failure rather than stalling the run.
"""

import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import wsloop
from helpers import TIMEOUT, Client, Recorder, StrictReader, Worker, connected, running_server

TEXT = 1
RSV1 = 0x40
JOIN_TIMEOUT = TIMEOUT


# -- helpers ------------------------------------------------------------------


def call_in_thread(function, *args, **kwargs):
    """Call ``function`` on another thread; return the exception it raised, or None."""
    worker = Worker(function, *args, **kwargs)
    worker.start()
    worker.join(JOIN_TIMEOUT)
    assert not worker.is_alive(), "%s did not return within %s s" % (function, JOIN_TIMEOUT)
    return worker.exception


def open_fds():
    """How many descriptors this process holds now."""
    return len(os.listdir("/proc/self/fd"))


needs_proc_fd = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")


def echo_round_trip(client, text="still here"):
    client.send_text(text)
    assert client.recv_message() == text


# -- the tables: read from any thread ----------------------------------------


def test_connections_snapshot_while_clients_come_and_go():
    """Guards: server.connections is a list snapshot that other threads can
    iterate (and send to) while the loop opens and closes connections; no
    'dictionary changed size during iteration' in a reader."""
    errors = []
    ticks = []
    stop = threading.Event()

    def ticker(server):
        sent = passes = 0
        while not stop.is_set():
            try:
                snapshot = server.connections
                assert type(snapshot) is list, "connections is %s, not a list" % type(snapshot).__name__
                passes += 1
                if passes % 256:
                    continue  # mostly read the table: that is where the race bites
                for conn in snapshot:
                    try:
                        conn.send("tick")
                        sent += 1
                    except wsloop.ConnectionClosed:
                        pass  # closed since the snapshot: allowed
            except Exception as exc:
                errors.append(exc)
                return
        ticks.append(sent)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: make the race likely
    try:
        with running_server(wsloop.Echo(), compression=False, ping_interval=None) as server:
            # Connections that stay open make the table big enough that a
            # reader is often preempted halfway through it.
            steady = [Client(server.port) for _ in range(200)]
            tickers = [threading.Thread(target=ticker, args=(server,), daemon=True) for _ in range(2)]
            for thread in tickers:
                thread.start()
            try:
                for _ in range(60):  # 300 connections, 5 at a time
                    batch = [Client(server.port) for _ in range(5)]
                    for number, client in enumerate(batch):
                        if number % 2:
                            client.close(1000)  # a closing handshake...
                        client.shutdown()  # ...or just TCP going away
                    if errors:
                        break
            finally:
                stop.set()
                for thread in tickers:
                    thread.join(JOIN_TIMEOUT)
            for client in steady:
                client.shutdown()
            assert not any(thread.is_alive() for thread in tickers), "a ticker thread is stuck"
            assert not errors, "ticker raised: %r" % (errors[0],)
            assert sum(ticks) > 0, "no ticker ever saw a connection"
    finally:
        sys.setswitchinterval(old_interval)


# -- sending from many threads at once ---------------------------------------


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "deflate"])
def test_send_and_broadcast_from_eight_threads(compression):
    """Guards: send() and broadcast() from 8 threads at once deliver whole
    frames, never interleaved, and per sending thread in order with none
    lost, to each client (with and without permessage-deflate)."""
    threads, per_thread = 8, 200
    # Long enough to pass Deflate's threshold, so compressed frames are used.
    padding = " " + "payload " * 20 if compression else ""
    headers = {"Sec-WebSocket-Extensions": "permessage-deflate; server_no_context_takeover"} if compression else {}
    recorder = Recorder()
    with running_server(recorder, compression=compression, ping_interval=None) as server:
        clients = [Client(server.port, headers=headers) for _ in range(2)]
        for client in clients:
            negotiated = b"permessage-deflate" in client.response_head.lower()
            assert negotiated == compression, client.response_head
        conns = connected(recorder, 2)
        readers = [StrictReader(client, compression) for client in clients]

        # Thread i sends its even sequence numbers to conns[i % 2] alone and
        # broadcasts its odd ones to both.
        expected = [{} for _ in clients]
        for i in range(threads):
            for target in range(len(clients)):
                expected[target]["t%d" % i] = [
                    seq for seq in range(per_thread) if seq % 2 or target == i % 2
                ]
        counts = [sum(len(seqs) for seqs in table.values()) for table in expected]

        reading = [Worker(reader.messages, count) for reader, count in zip(readers, counts)]
        for worker in reading:
            worker.start()
        start = threading.Barrier(threads)

        def sender(i):
            conn = conns[i % 2]
            start.wait(JOIN_TIMEOUT)
            for seq in range(per_thread):
                message = "t%d-%d%s" % (i, seq, padding)
                if seq % 2:
                    server.broadcast(message)
                else:
                    conn.send(message)

        sending = [Worker(sender, i) for i in range(threads)]
        for worker in sending:
            worker.start()
        for worker in sending + reading:
            worker.join(15)
            assert not worker.is_alive(), "a sender or reader is stuck"
        for worker in sending:
            assert worker.exception is None, "sender raised %r" % (worker.exception,)

        pattern = re.compile(r"(t\d+)-(\d+)%s\Z" % re.escape(padding))
        for index, (worker, reader) in enumerate(zip(reading, readers)):
            assert worker.exception is None, "client %d: %r" % (index, worker.exception)
            got = {}
            for message in worker.result:
                match = pattern.match(message)
                assert match, "client %d got a mangled message %r" % (index, message[:80])
                got.setdefault(match.group(1), []).append(int(match.group(2)))
            for name, seqs in expected[index].items():
                assert got.get(name) == seqs, "client %d, thread %s: out of order or missing" % (index, name)
            assert set(got) == set(expected[index])
            if compression:
                assert reader.compressed_frames > 0, "nothing was compressed: the deflate path went untested"
        for client in clients:
            client.shutdown()


# -- timers and callbacks from other threads ---------------------------------


def idle_server_running(server):
    """Return once the loop has run a callback: it is up and about to go idle."""
    ran = threading.Event()
    server.call_soon_threadsafe(ran.set)
    assert ran.wait(JOIN_TIMEOUT), "the loop never ran"


def test_call_later_from_another_thread_wakes_an_idle_loop():
    """Guards: call_later from a thread other than the loop's, on a server
    with no clients and no timers, fires on time (the loop is woken to
    recompute its timeout) rather than whenever something else wakes it."""
    fired = []
    done = threading.Event()

    def record():
        fired.append(time.monotonic())
        done.set()

    with running_server(ping_interval=None) as server:
        idle_server_running(server)
        started = time.monotonic()
        server.call_later(0.2, record)  # from this, the test's thread
        assert done.wait(2.0), "call_later from another thread never ran on an idle loop"
        assert fired[0] - started >= 0.15, "ran after %.3f s, before its delay" % (fired[0] - started)


def test_call_soon_threadsafe_runs_on_an_idle_loop():
    """Guards: call_soon_threadsafe from another thread wakes an idle loop
    and runs the callback on the loop's thread."""
    ran_on = []
    done = threading.Event()

    def record():
        ran_on.append(threading.get_ident())
        done.set()

    with running_server(ping_interval=None) as server:
        idle_server_running(server)
        caller = Worker(server.call_soon_threadsafe, record)
        caller.start()
        caller.join(JOIN_TIMEOUT)
        assert caller.exception is None
        assert done.wait(2.0), "call_soon_threadsafe never ran"
        assert ran_on[0] not in (threading.get_ident(), caller.ident)


def test_timer_from_another_thread_can_be_cancelled_there():
    """Guards: a timer made by call_later from another thread can be
    cancelled from that thread and never fires, while a later timer made
    the same way still fires (so the silence means cancelled, not stalled)."""
    cancelled_fired = threading.Event()
    later_fired = threading.Event()
    with running_server(ping_interval=None) as server:
        idle_server_running(server)
        timer = server.call_later(0.2, cancelled_fired.set)
        timer.cancel()
        server.call_later(0.4, later_fired.set)
        assert later_fired.wait(2.0), "the uncancelled timer never fired"
        assert not cancelled_fired.is_set(), "a cancelled timer fired"


# -- errors land in the caller's thread --------------------------------------


BAD_CALLS = {
    "send-dict": (lambda conn, server: conn.send({"a": 1}), TypeError),
    "close-code-999": (lambda conn, server: conn.close(999), ValueError),
    "close-reason-200-bytes": (lambda conn, server: conn.close(1000, "x" * 200), ValueError),
    "ping-200-bytes": (lambda conn, server: conn.ping(b"x" * 200), ValueError),
    "broadcast-int": (lambda conn, server: server.broadcast(42), TypeError),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_raise_in_the_calling_thread(name):
    """Guards: arguments are validated before crossing to the loop, so a
    bad call from another thread raises there, and the connection is left
    open and working."""
    call, expected = BAD_CALLS[name]
    recorder = Recorder()
    with running_server(recorder, ping_interval=None) as server:
        client = Client(server.port)
        try:
            (conn,) = connected(recorder, 1)
            exception = call_in_thread(call, conn, server)
            assert isinstance(exception, expected), "%s raised %r, not %s" % (name, exception, expected.__name__)
            echo_round_trip(client)
            assert conn.state is wsloop.State.OPEN
            assert not recorder.closed
        finally:
            client.shutdown()


def test_send_after_close_raises_in_the_calling_thread():
    """Guards: send() from another thread on a closed connection raises
    ConnectionClosed there instead of dropping the message silently."""
    recorder = Recorder()
    with running_server(recorder, ping_interval=None) as server:
        client = Client(server.port)
        (conn,) = connected(recorder, 1)
        client.close(1000)
        assert client.expect_close() == (1000, "")
        assert recorder.close_event.wait(JOIN_TIMEOUT), "on_close never came"
        assert conn.state is wsloop.State.CLOSED
        exception = call_in_thread(conn.send, "x")
        assert isinstance(exception, wsloop.ConnectionClosed), "send after close raised %r" % (exception,)
        client.shutdown()


def test_messages_from_another_thread_count_as_pending_at_once():
    """Guards: what another thread sent counts in pending_output from the
    moment send() returns, before the loop has taken it (a thread that
    paces itself on pending_output would otherwise never wait); and no
    longer once the loop has queued it and the peer has read it."""
    recorder = Recorder()
    with running_server(recorder, ping_interval=None) as server:
        client = Client(server.port)
        (conn,) = connected(recorder, 1)
        stall, stalled = threading.Event(), threading.Event()
        server.call_soon_threadsafe(lambda: (stalled.set(), stall.wait(JOIN_TIMEOUT)))
        assert stalled.wait(JOIN_TIMEOUT)
        try:
            for n in range(3):
                conn.send(b"x" * 1000)
                assert conn.pending_output == 1000 * (n + 1)
        finally:
            stall.set()
        for _ in range(3):
            assert client.recv_message() == b"x" * 1000
        drained = threading.Event()
        conn.when_drained(drained.set)
        assert drained.wait(JOIN_TIMEOUT)
        assert conn.pending_output == 0
        client.shutdown()


# -- lifecycle ----------------------------------------------------------------


def test_shutdown_with_wait_on_a_server_that_never_ran():
    """Guards: shutdown(wait=True) on a server whose loop never ran returns
    promptly instead of waiting forever; serve_forever() afterwards returns
    promptly too."""
    server = wsloop.Server(port=0)
    try:
        stopping = Worker(server.shutdown, wait=True)
        stopping.start()
        stopping.join(JOIN_TIMEOUT)
        shutdown_returned = not stopping.is_alive()
        # Run the loop either way, so a stuck shutdown is released.
        serving = Worker(server.serve_forever)
        serving.start()
        serving.join(JOIN_TIMEOUT)
        assert shutdown_returned, "shutdown(wait=True) blocked on a server that never ran"
        assert stopping.exception is None, repr(stopping.exception)
        assert not serving.is_alive(), "serve_forever() after shutdown() did not return"
        assert serving.exception is None, repr(serving.exception)
    finally:
        server.close()


def test_shutdown_twice():
    """Guards: calling shutdown() more than once, then once more with
    wait=True, is harmless and the server stops."""
    server = wsloop.Server(port=0, close_timeout=1.0)
    serving = Worker(server.serve_forever)
    serving.start()
    try:
        server.shutdown()
        server.shutdown()
        assert call_in_thread(server.shutdown, wait=True) is None
        serving.join(JOIN_TIMEOUT)
        assert not serving.is_alive(), "server did not stop"
        assert serving.exception is None, repr(serving.exception)
    finally:
        server.close()


@needs_proc_fd
def test_serve_forever_releases_every_descriptor():
    """Guards: once serve_forever() returns after a shutdown from another
    thread (clients connected get 1001), every descriptor the server opened
    is closed: listener, connections, selector and wake-up pair, without a
    separate close()."""
    before = open_fds()
    server = wsloop.Server(wsloop.Echo(), port=0, close_timeout=1.0, ping_interval=None)
    serving = Worker(server.serve_forever)
    serving.start()
    try:
        clients = [Client(server.port) for _ in range(3)]
        for client in clients:
            echo_round_trip(client, "hello")
        server.shutdown()  # from this thread, not the loop's
        for client in clients:
            assert client.expect_close()[0] == 1001
            client.close(1001)
            client.expect_eof()
            client.shutdown()
        serving.join(JOIN_TIMEOUT)
        assert not serving.is_alive(), "serve_forever() did not return"
        assert serving.exception is None, repr(serving.exception)
        after = open_fds()
        assert after <= before, "%d descriptor(s) still open after serve_forever() returned" % (after - before)
    finally:
        server.close()


@needs_proc_fd
def test_with_block_releases_descriptors_without_running():
    """Guards: a server used as a context manager and never run gives back
    every descriptor when the block ends."""
    before = open_fds()
    with wsloop.Server(port=0) as server:
        assert server.port > 0
    assert open_fds() <= before


@needs_proc_fd
def test_with_block_releases_descriptors_after_running():
    """Guards: a server run on a thread inside a with block and stopped with
    shutdown(wait=True) gives back every descriptor when the block ends."""
    before = open_fds()
    with wsloop.Server(port=0, close_timeout=1.0) as server:
        serving = Worker(server.serve_forever)
        serving.start()
        client = Client(server.port)
        echo_round_trip(client, "hello")
        client.shutdown()
        assert call_in_thread(server.shutdown, wait=True) is None
        serving.join(JOIN_TIMEOUT)
        assert not serving.is_alive(), "serve_forever() did not return"
    assert open_fds() <= before


# -- signals ------------------------------------------------------------------


SIGNAL_SCRIPT = textwrap.dedent(
    """
    import os, signal, threading, time
    import wsloop

    def mine(signum, frame):
        pass

    signal.signal(signal.SIGINT, mine)
    term_before = signal.getsignal(signal.SIGTERM)

    def stop_when_installed():
        # serve() installs its handlers before it serves: wait for that,
        # then ask it to stop the way a service manager would.
        deadline = time.monotonic() + 10
        while signal.getsignal(signal.SIGINT) is mine and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_installed, daemon=True).start()
    wsloop.serve(port=0)
    print("SIGINT restored:", signal.getsignal(signal.SIGINT) is mine)
    print("SIGTERM restored:", signal.getsignal(signal.SIGTERM) == term_before)
    """
)


def test_serve_restores_signal_handlers(tmp_path):
    """Guards: wsloop.serve() in the main thread puts back the SIGINT and
    SIGTERM handlers it replaced once it returns."""
    env = dict(os.environ)
    # The subprocess must import the same wsloop as this test run.
    here = os.path.dirname(os.path.abspath(wsloop.__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    try:
        result = subprocess.run(
            [sys.executable, "-c", SIGNAL_SCRIPT],
            cwd=str(tmp_path),
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("serve() did not return after SIGTERM (the handler's shutdown never woke the loop?)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["SIGINT restored: True", "SIGTERM restored: True"], result.stdout
