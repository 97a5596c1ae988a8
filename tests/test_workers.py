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
import shutil
import signal
import socket
import sys
import time

import pytest

from helpers import Client, clients_on_both_workers, children_of, wait_serving, workers_process
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
