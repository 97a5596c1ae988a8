"""--workers in production: socket activation, the watchdog, one metrics
endpoint for every worker, and a full worker leaving new clients to the
others.

Everything runs for real: ``python -m wsloop --workers 2`` in a subprocess
(under Debian's ``systemd-socket-activate`` where systemd would start it),
clients on loopback, the supervisor's and workers' stderr read on a thread.
Every wait is bounded: on a log line, a message, a close, or a condition
polled with a deadline.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import (
    children_of, cli_env, client_on_a_worker, clients_on_both_workers, close_on_a_worker, plain_get, wait_serving,
    workers_process,
)
from redis_fixture import free_port, wait_until

COMMAND = [sys.executable, "-m", "wsloop"]
ACTIVATE = "/usr/bin/systemd-socket-activate"


def close_all(clients):
    for client in clients:
        client.close()
        assert client.expect_close()[0] == 1000
        client.shutdown()


# =============================================================================
# Socket activation: systemd's sockets, handed down to every worker
# =============================================================================


@pytest.mark.skipif(not os.path.exists(ACTIVATE), reason="needs systemd-socket-activate (Debian's systemd)")
def test_socket_activation_with_two_workers_serves_on_the_passed_socket():
    """Guards: under systemd-socket-activate (LISTEN_FDS/LISTEN_PID, fd 3)
    ``--workers 2`` binds nothing itself (``--port 1`` would fail): the
    supervisor hands the passed socket to both workers, and clients on it
    are served by both."""
    port = free_port()
    argv = [ACTIVATE, "-l", "127.0.0.1:%d" % port] + COMMAND + ["--port", "1", "--workers", "2", "--close-timeout", "2"]
    with workers_process(argv) as (process, log):
        # It starts wsloop on the first connection, which waits in the backlog.
        wait_serving(port, process, log)
        log.wait_for(r"supervisor INFO 2 workers on 127\.0\.0\.1:%d" % port)
        log.wait_count(r"worker \d+.*listening on 127\.0\.0\.1:%d" % port, 2)
        clients, workers = clients_on_both_workers(port, log, least=4, most=60)
        for index, client in enumerate(clients):
            client.send_text("hello %d" % index)
            assert client.recv_message() == "hello %d" % index, "client %d (worker %s)" % (index, workers[index])
        close_all(clients)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log.text()
        log.wait_for(r"all workers stopped")


# =============================================================================
# The watchdog: a worker whose loop stops turning is killed and replaced
# =============================================================================

# An app whose handler never returns when told to "spin": its worker's loop
# stops turning (a CPU-bound bug, a blocking call, a deadlock).
SPIN_APP = '''
def on_message(conn, message):
    if message == "spin":
        while True:
            pass
    conn.send(message)
'''


@pytest.fixture
def spin_app(tmp_path):
    (tmp_path / "spinapp.py").write_text(SPIN_APP)
    return str(tmp_path)


def spinning_workers(spin_app, *args, env=None):
    port = free_port()
    argv = COMMAND + ["--port", str(port), "--workers", "2", "--app", "spinapp:on_message"] + list(args)
    return port, workers_process(argv, cwd=spin_app, env=env)


def echoes(client, text):
    client.send_text(text)
    return client.recv_message() == text


def clients_of_two_workers(port, process, log):
    """Once both workers listen: clients on both, the worker of the first
    (the one a test will make spin) and a client of the other worker."""
    wait_serving(port, process, log)
    log.wait_count(r"worker \d+.*listening on", 2)
    clients, workers = clients_on_both_workers(port, log, least=2)
    stuck = workers[0]
    other = next(client for client, worker in zip(clients, workers) if worker != stuck)
    return clients, stuck, other


def test_a_stuck_worker_is_killed_and_replaced_within_its_timeout(spin_app):
    """Guards: with --worker-timeout 1 a worker whose handler spins stops
    beating; the supervisor logs it with its stack (the handler's name),
    kills it with SIGKILL within about a second of the timeout, and starts
    another; the other worker serves all along; the stuck worker's clients
    see the TCP connection end with no close frame (1006 to a browser)."""
    timeout = 1.0
    port, running = spinning_workers(spin_app, "--worker-timeout", str(timeout), "--close-timeout", "2")
    with running as (process, log):
        clients, stuck, other = clients_of_two_workers(port, process, log)
        pids = children_of(process.pid)
        started = time.monotonic()
        clients[0].send_text("spin")
        assert echoes(other, "the other worker serves")  # while the first spins
        log.wait_for(r"worker %s \(pid \d+\): its loop has not turned for [\d.]+ s; killing it" % stuck, timeout=10)
        noticed = time.monotonic() - started
        log.wait_for(r"in on_message")  # its stack, from faulthandler
        log.wait_for(r"worker %s \(pid \d+\) died: signal SIGKILL; restarting" % stuck)
        assert timeout - 0.3 < noticed < timeout + 1.0, "noticed after %.2f s" % noticed
        clients[0].expect_eof()  # no close frame: it was killed
        assert echoes(other, "still serving")
        log.wait_count(r"worker %s .*listening on" % stuck, 2)  # the replacement
        replaced = wait_until(lambda: (lambda now: len(now) == 2 and now != pids and now)(children_of(process.pid)), 10,
                              message=lambda: "not replaced:\n" + log.text())
        assert len(replaced & pids) == 1
        more, _ = clients_on_both_workers(port, log, least=2)
        for client in more:
            assert echoes(client, "after the restart")
        close_all(more + [other])
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log.text()
        clients[0].shutdown()


def test_sigterm_ends_within_close_timeout_and_grace_with_a_stuck_worker(spin_app):
    """Guards: with the watchdog off, SIGTERM to the supervisor still ends
    in close_timeout plus the supervisor's grace (2 s, set shorter here
    through WSLOOP_STOP_GRACE): the healthy worker closes its clients with
    1001, the stuck one is killed with SIGKILL (logged, with its stack),
    and the exit status says not all was clean."""
    close_timeout, grace = 0.5, 0.3
    port, running = spinning_workers(spin_app, "--worker-timeout", "none", "--close-timeout", str(close_timeout),
                                     env={"WSLOOP_STOP_GRACE": str(grace)})
    with running as (process, log):
        clients, stuck, other = clients_of_two_workers(port, process, log)
        clients[0].send_text("spin")
        assert echoes(other, "before the signal")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert other.expect_close()[0] == 1001
        other.close(1001)
        code = process.wait(10)
        elapsed = time.monotonic() - started
        assert code == 1, log.text()
        assert elapsed < close_timeout + grace + 1.0, "took %.1f s" % elapsed
        killing = log.wait_for(r"still running ([\d.]+) s after SIGTERM; killing it")
        assert "worker %s (pid" % stuck in killing.string
        assert float(killing.group(1)) == round(close_timeout + grace, 1), killing.string
        log.wait_for(r"in on_message")
        clients[0].expect_eof()
        for client in clients:
            client.shutdown()


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_worker_timeout_is_one_line(value):
    result = subprocess.run(COMMAND + ["--workers", "2", "--worker-timeout", value],
                            capture_output=True, text=True, timeout=30, env=cli_env())
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wsloop: error: "), result.stderr
    assert "--worker-timeout" in lines[0], result.stderr


# =============================================================================
# One metrics endpoint for every worker
# =============================================================================

COUNTERS = ["wsloop_connections_accepted_total", "wsloop_messages_received_total", "wsloop_messages_sent_total",
            "wsloop_bytes_received_total", "wsloop_bytes_sent_total", "wsloop_handshakes_total"]


def scrape(port):
    """One scrape, parsed by prometheus_client: {(name, labels): value}."""
    status, body = plain_get(port, "/metrics")
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def split_by_worker(samples, name):
    """The samples of ``name``: ({other labels: total}, {worker: {other labels: value}})."""
    totals, workers = {}, {}
    for (found, labels), value in samples.items():
        if found != name:
            continue
        rest = tuple(item for item in labels if item[0] != "worker")
        worker = dict(labels).get("worker")
        if worker is None:
            totals[rest] = value
        else:
            workers.setdefault(worker, {})[rest] = value
    return totals, workers


def worker_pids(supervisor):
    """{worker index: pid} of the supervisor's children (from their environment)."""
    found = {}
    for pid in children_of(supervisor):
        try:
            with open("/proc/%d/environ" % pid, "rb") as environ:
                names = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"WSLOOP_WORKER" in names:
            found[names[b"WSLOOP_WORKER"].decode()] = pid
    return found


def check_scrape(samples, previous):
    """Totals are the sums of the worker series, and nothing went down."""
    for name in COUNTERS:
        totals, workers = split_by_worker(samples, name)
        # (A worker that has no handshake yet has no handshakes_total sample.)
        assert set(workers) <= {"1", "2"}, (name, workers)
        assert totals, (name, workers)
        if name != "wsloop_handshakes_total":
            assert set(workers) == {"1", "2"}, (name, workers)
        for labels, total in totals.items():
            assert total == sum(series.get(labels, 0) for series in workers.values()), (name, labels, totals, workers)
    for key, value in previous.items():
        if key[0] in COUNTERS:
            assert samples.get(key, 0) >= value, "%s went down: %s -> %s" % (key, value, samples.get(key))
    open_totals, open_workers = split_by_worker(samples, "wsloop_connections_open")
    assert open_totals[()] == sum(series[()] for series in open_workers.values())


def test_any_worker_answers_a_scrape_for_every_worker():
    """Guards: with --workers 2 --metrics-path, whichever worker answers a
    scrape shows each worker's series (worker="1", worker="2") and the
    service's totals, which are their sums; across 10 scrapes, with clients
    on both workers sending between them, no counter goes down; the totals
    come to the messages sent; and a worker killed and restarted carries its
    counters over instead of starting again from zero."""
    port = free_port()
    argv = COMMAND + ["--port", str(port), "--workers", "2", "--metrics-path", "/metrics", "--close-timeout", "2"]
    with workers_process(argv) as (process, log):
        wait_serving(port, process, log)
        log.wait_count(r"worker \d+.*listening on", 2)
        clients, workers = clients_on_both_workers(port, log, least=4)
        previous = {}
        rounds = 0
        # At least 10 scrapes, and on until each worker has answered some.
        while rounds < 10 or len(set(re.findall(r'worker (\d+) wsloop.access .*"GET /metrics"', log.text()))) < 2:
            assert rounds < 40, "one worker answered every scrape:\n" + log.text()
            for client in clients:
                assert echoes(client, "round %d" % rounds)
            samples = scrape(port)
            check_scrape(samples, previous)
            previous = samples
            rounds += 1

        def sent_all():
            samples = scrape(port)
            check_scrape(samples, {})
            return samples[("wsloop_messages_received_total", ())] == rounds * len(clients) and samples

        samples = wait_until(sent_all, 5, message=lambda: "totals never reached %d messages" % (rounds * len(clients)))
        _, per_worker = split_by_worker(samples, "wsloop_messages_received_total")
        for index in ("1", "2"):
            assert per_worker[index][()] == rounds * workers.count(index), per_worker
        _, open_now = split_by_worker(samples, "wsloop_connections_open")
        assert {index: series[()] for index, series in open_now.items()} == {
            index: workers.count(index) for index in ("1", "2")}

        # Worker 1 dies (SIGKILL) and is restarted: its counters carry over.
        victim = worker_pids(process.pid)["1"]
        os.kill(victim, signal.SIGKILL)
        log.wait_for(r"worker 1 \(pid %d\) died" % victim)
        log.wait_count(r"worker 1 .*listening on", 2)
        after = scrape(port)
        check_scrape(after, samples)
        _, per_worker = split_by_worker(after, "wsloop_messages_received_total")
        assert per_worker["1"][()] == rounds * workers.count("1")
        _, open_now = split_by_worker(after, "wsloop_connections_open")
        assert open_now["1"][()] == 0  # its clients went with it
        close_all([client for client, index in zip(clients, workers) if index == "2"])
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log.text()
        for client in clients:
            client.shutdown()


# =============================================================================
# A full worker leaves new clients to the others
# =============================================================================


@pytest.mark.parametrize("how", ["reuseport", "activated"])
def test_a_full_worker_takes_no_new_connections_while_the_other_has_room(how):
    """Guards: a worker at its --max-connections stops taking connections
    from the port (it closes its SO_REUSEPORT socket, or stops accepting
    from the shared one systemd passed), so new clients reach the worker
    with room instead of a 503 from the full one; once a client leaves, it
    takes connections again."""
    if how == "activated" and not os.path.exists(ACTIVATE):
        pytest.skip("needs systemd-socket-activate (Debian's systemd)")
    limit = 2
    port = free_port()
    args = ["--workers", "2", "--max-connections", str(limit), "--close-timeout", "2"]
    if how == "reuseport":
        argv = COMMAND + ["--port", str(port)] + args
    else:
        argv = [ACTIVATE, "-E", "PYTHONPATH", "-l", "127.0.0.1:%d" % port] + COMMAND + args
    with workers_process(argv) as (process, log):
        wait_serving(port, process, log)
        log.wait_count(r"worker \d+.*listening on", 2)
        held = {"1": [], "2": []}
        while max(len(clients) for clients in held.values()) < limit:
            client, worker = client_on_a_worker(port, log)
            held[worker].append(client)
        full = next(worker for worker, clients in held.items() if len(clients) == limit)
        other = "2" if full == "1" else "1"
        log.wait_for(r"worker %s .*at max_connections \(%d\): taking no new connections" % (full, limit))
        for client in held[other]:
            close_on_a_worker(client, log)
        for attempt in range(10):  # each would have had an even chance of a 503
            client, worker = client_on_a_worker(port, log)
            assert worker == other, "attempt %d reached the full worker %s:\n%s" % (attempt, full, log.text())
            close_on_a_worker(client, log)
        close_on_a_worker(held[full].pop(), log)
        log.wait_for(r"worker %s .*below max_connections again" % full)
        for attempt in range(40):
            client, worker = client_on_a_worker(port, log)
            close_on_a_worker(client, log)
            if worker == full:
                break
        else:
            raise AssertionError("worker %s never took a connection again:\n%s" % (full, log.text()))
        for client in held[full]:
            close_on_a_worker(client, log)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log.text()


# =============================================================================
# What clients see when a worker dies
# =============================================================================


def test_a_killed_workers_clients_see_1006_and_can_reconnect():
    """Guards the README's promise: a worker killed with SIGKILL sends no
    close frame, so its clients see the connection end abnormally (1006 in
    wsloop's client, as in a browser); reconnecting reaches a live worker."""
    import wsloop

    port = free_port()
    argv = COMMAND + ["--port", str(port), "--workers", "2", "--close-timeout", "2"]
    with workers_process(argv) as (process, log):
        wait_serving(port, process, log)
        log.wait_count(r"worker \d+.*listening on", 2)
        ws = wsloop.connect("ws://127.0.0.1:%d/" % port, compression=False, close_timeout=2)
        try:
            # The only WebSocket client so far: the one "open from" line.
            worker = re.search(r"worker (\d+)", log.wait_for(r"open from 127\.0\.0\.1:").string)
            ws.send("before")
            assert ws.recv(timeout=5) == "before"
            victim = worker_pids(process.pid)[worker.group(1)]
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(wsloop.ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.close_code == 1006
        finally:
            ws.close()
        # Once the supervisor has reaped it, the dead worker's listening
        # socket is gone (before that, a connection may still land in its
        # queue and be reset: the retry a client must make anyway).
        log.wait_for(r"worker %s \(pid %d\) died: signal SIGKILL" % (worker.group(1), victim))
        again = wsloop.connect("ws://127.0.0.1:%d/" % port, compression=False, close_timeout=2)
        with again:
            again.send("after")
            assert again.recv(timeout=5) == "after"
        log.wait_count(r"worker %s .*listening on" % worker.group(1), 2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log.text()
