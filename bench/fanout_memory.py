"""What receivers that never read cost the server (stdlib only).

    python bench/fanout_memory.py                       # 100 receivers, 384 x 64 KiB
    python bench/fanout_memory.py --receivers 100 --size 65536 --messages 384
    python bench/fanout_memory.py --server-args="--max-pending-output 1G"

Starts `python wsloop.py --broadcast` (the chat: every message goes to every
client) as a subprocess, opens --receivers connections that never read, and
one sender that sends --messages binary messages of --size bytes, each after
its own copy of the one before has come back (so the server has handled
every message before the next).  Prints what was sent, the server's RSS
growth (VmRSS at the end, and VmHWM, its peak) against that.  With the default limits each receiver is closed once
--max-pending-output (4 MiB) backs up; with a larger limit every receiver
holds everything that was sent.
"""

import argparse
import os
import re
import resource
import shlex
import subprocess
import sys

from memory import handshake, status_kib, zero_mask_frame  # bench/memory.py, beside this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def receive_exactly(sock, count):
    got = 0
    while got < count:
        chunk = sock.recv(min(count - got, 1 << 20))
        if not chunk:
            raise SystemExit("the sender was closed by the server")
        got += len(chunk)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=100)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument("--messages", type=int, default=384)
    parser.add_argument("--server-args", default="", help="more wsloop.py options, one string")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "wsloop.py"), "--port", "0", "--broadcast",
                                "--ping-interval", "none", "--log-level", "info", "--max-size", "64M"]
                               + shlex.split(args.server_args), stderr=subprocess.PIPE, text=True)
    receivers = []
    try:
        line = process.stderr.readline().strip()
        found = re.search(r":(\d+)$", line)
        if found is None:
            raise SystemExit("the server did not start: %s" % line)
        port = int(found.group(1))
        process.stderr.close()  # no more logs needed (an unread pipe would stall the server)
        sender, _ = handshake(port)
        receivers = [handshake(port, receive_buffer=4096)[0] for _ in range(args.receivers)]
        base = status_kib(process.pid, "VmRSS")
        payload = os.urandom(args.size)  # random: nothing along the way shrinks it
        frame = zero_mask_frame(0x82, payload)  # FIN, binary
        echoed = len(frame) - 4  # the server's frame: the same header, no mask
        for _ in range(args.messages):
            sender.sendall(frame)
            receive_exactly(sender, echoed)
        rss = status_kib(process.pid, "VmRSS") - base
        peak = status_kib(process.pid, "VmHWM") - base
        sent_kib = args.messages * args.size / 1024
        print("%d receivers that never read, %d messages of %d bytes (server: %s)"
              % (args.receivers, args.messages, args.size, " ".join(["--broadcast"] + shlex.split(args.server_args))))
        print("sent           %9.1f MiB" % (sent_kib / 1024))
        print("RSS growth     %9.1f MiB  %.2fx what was sent" % (rss / 1024, rss / sent_kib))
        print("peak growth    %9.1f MiB  %.2fx what was sent" % (peak / 1024, peak / sent_kib))
        sender.close()
    finally:
        for sock in receivers:
            sock.close()
        process.kill()
        process.wait()


if __name__ == "__main__":
    main()
