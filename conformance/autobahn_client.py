"""Drive the Autobahn TestSuite's fuzzing server with wsloop's client.

    python conformance/autobahn_client.py ws://127.0.0.1:9001 wsloop

What Autobahn's client drivers do: read the number of cases, run each one
by echoing every message back until the server closes, then ask for the
report.  conformance/run-autobahn --client runs it under the shared runner.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import wsloop  # noqa: E402  (the checkout's wsloop.py, not an installed one)

# Group 9 sends messages up to 16 MiB; the limit is raised as for the server.
MAX_SIZE = 2**25


def run_case(url):
    try:
        with wsloop.connect(url, max_size=MAX_SIZE, ping_interval=None) as ws:
            for message in ws:
                ws.send(message)
    except (wsloop.WebSocketError, OSError):
        pass  # a case that fails the connection is part of the test


def main(base, agent):
    with wsloop.connect(base + "/getCaseCount") as ws:
        count = int(ws.recv(timeout=60))
    for case in range(1, count + 1):
        run_case("%s/runCase?case=%d&agent=%s" % (base, case, agent))
    try:
        with wsloop.connect("%s/updateReports?agent=%s" % (base, agent)) as ws:
            for _ in ws:
                pass
    except wsloop.ConnectionClosed:
        pass  # the server closes this one as it likes: the report is written
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: autobahn_client.py BASE_URL AGENT")
    sys.exit(main(sys.argv[1], sys.argv[2]))
