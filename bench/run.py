"""Benchmark wsloop against websockets, side by side in one run.

    python -m pip install -r bench/requirements.txt
    python bench/run.py                 # every scenario, 3 rounds
    python bench/run.py small large --rounds 5 --seconds 5

Each server runs as its own process pinned to CPU 0 (with taskset, where it
exists) and the load client (picows on uvloop) to CPU 1.  The servers take
turns, round by round (A, B, A, B, ...), so both see the same machine noise.
Per scenario it prints the median and the min-max of each server, the ratio
wsloop / websockets, and how much CPU the client used (it must have spare).
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = sys.executable
TASKSET = shutil.which("taskset")

def wsloop_command(port, mode):
    return [
        PYTHON, os.path.join(ROOT, "wsloop.py"), "--port", str(port), "--max-size", "64M",
        "--ping-interval", "none", "--no-compression", "--log-level", "warning",
        "--max-pending-output", "1G",
    ] + (["--broadcast"] if mode == "broadcast" else [])


def speedups_built():
    """Whether `python wsloop.py` finds the optional C helper (built in place with
    `python setup.py build_ext --inplace`)."""
    check = "import sys, wsloop; sys.exit(0 if wsloop.ACCELERATED else 1)"
    return subprocess.run([PYTHON, "-c", check], cwd=ROOT, env=dict(os.environ, WSLOOP_NO_SPEEDUPS="")).returncode == 0


# name: (command, extra environment); "wsloop" is always the pure-Python path.
SERVERS = {
    "wsloop": (wsloop_command, {"WSLOOP_NO_SPEEDUPS": "1"}),
    "websockets": (lambda port, mode: [PYTHON, os.path.join(HERE, "websockets_server.py"), str(port), mode], {}),
}

# name: (client scenario, server mode, client arguments, figure, unit)
SCENARIOS = {
    "small": ("echo", "echo", ["--size", "64", "--connections", "100", "--inflight", "1"], "messages_per_s", "msg/s"),
    "small4": ("echo", "echo", ["--size", "64", "--connections", "100", "--inflight", "4"], "messages_per_s", "msg/s"),
    "medium": ("echo", "echo", ["--size", "8192", "--connections", "100", "--binary"], "messages_per_s", "msg/s"),
    "large": ("echo", "echo", ["--size", "262144", "--connections", "4", "--binary"], "mb_per_s", "MB/s"),
    "broadcast": ("broadcast", "broadcast", ["--size", "64", "--connections", "1000"], "deliveries_per_s", "deliveries/s"),
    "idle": ("idle", "echo", ["--connections", "10000"], "rss_kib_per_connection", "KiB/conn"),
}
DESCRIPTIONS = {
    "small": "64 B text echo, 100 connections, 1 in flight",
    "small4": "64 B text echo, 100 connections, 4 in flight",
    "medium": "8 KiB binary echo, 100 connections",
    "large": "256 KiB binary echo, 4 connections",
    "broadcast": "64 B, 1 sender, 1,000 receivers",
    "idle": "10,000 idle connections: RSS per connection",
}


def pinned(cpu, command):
    return ([TASKSET, "-c", str(cpu)] if TASKSET else []) + command


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_server(name, mode):
    port = free_port()
    command, extra_env = SERVERS[name]
    env = dict(os.environ, WSLOOP_NO_SPEEDUPS="")
    env.update(extra_env)
    process = subprocess.Popen(pinned(0, command(port, mode)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 20
    while True:  # until it listens
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("%s did not start" % name)
            time.sleep(0.05)


def run_once(name, scenario, seconds):
    client_kind, mode, client_args, figure, _ = SCENARIOS[scenario]
    process, port = start_server(name, mode)
    try:
        command = pinned(1, [PYTHON, os.path.join(HERE, "client.py"), client_kind, "ws://127.0.0.1:%d/" % port,
                             "--seconds", str(seconds)] + client_args)
        if client_kind != "idle":
            output = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
            return json.loads(output.strip().splitlines()[-1])
        baseline = rss_kib(process.pid)
        client = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        opened = json.loads(client.stdout.readline())
        used = rss_kib(process.pid) - baseline
        client.stdin.write("go\n")
        client.stdin.flush()
        result = json.loads(client.stdout.readline())
        client.wait(60)
        result["rss_kib_per_connection"] = used / opened["opened"]
        result["client_cpu"] = float("nan")
        return result
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="some of: " + ", ".join(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--minimal", action="store_true",
                        help="also run bench/minimal_echo.py, what a bare pure-Python echo reaches (echo scenarios only)")
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error("unknown scenario(s): %s" % ", ".join(sorted(unknown)))
    args.scenarios = args.scenarios or list(SCENARIOS)
    if speedups_built():
        SERVERS["wsloop+C"] = (wsloop_command, {})
    if args.minimal:
        SERVERS["minimal"] = (lambda port, mode: [PYTHON, os.path.join(HERE, "minimal_echo.py"), str(port)], {})
    variants = [name for name in SERVERS if name.startswith("wsloop")]
    print("wsloop variants: %s (pure Python%s)" % (", ".join(variants), "; +C: the optional unmask helper" if len(variants) > 1 else "; build the C helper with `python setup.py build_ext --inplace` to add wsloop+C"))
    print("python %s, %d CPUs, taskset %s" % (sys.version.split()[0], os.cpu_count(), "yes" if TASKSET else "no"))
    rows = []
    for scenario in args.scenarios:
        figure, unit = SCENARIOS[scenario][3], SCENARIOS[scenario][4]
        # The bare echo cannot broadcast.
        servers = [name for name in SERVERS if not (name == "minimal" and SCENARIOS[scenario][1] != "echo")]
        results = {name: [] for name in servers}
        cpu = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name in servers:
                result = run_once(name, scenario, args.seconds)
                results[name].append(result[figure])
                cpu[name].append(result.get("client_cpu", float("nan")))
        medians = {name: statistics.median(values) for name, values in results.items()}
        print("\n%s: %s (%s)" % (scenario, DESCRIPTIONS[scenario], unit))
        for name in servers:
            values = results[name]
            print("  %-10s median %12.1f  min-max %.1f-%.1f  client CPU %s" % (
                name, medians[name], min(values), max(values),
                "%.0f%%" % (100 * max(cpu[name])) if cpu[name][0] == cpu[name][0] else "n/a"))
        note = " (lower is better)" if scenario == "idle" else ""
        for name in variants + (["minimal"] if "minimal" in servers else []):
            print("  ratio %s/websockets: %.2fx%s" % (name, medians[name] / medians["websockets"], note))
        if "minimal" in servers:
            print("  ratio wsloop/minimal: %.2fx%s" % (medians["wsloop"] / medians["minimal"], note))
        rows.append((scenario, unit, medians))
    ratios = variants + (["minimal"] if args.minimal else [])
    print("\n| scenario | websockets | %s | %s |" % (" | ".join(variants), " | ".join("%s / websockets" % name for name in ratios)))
    print("|---|---|%s" % ("---|" * (len(variants) + len(ratios))))
    for scenario, unit, medians in rows:
        print("| %s | %.1f %s | %s | %s |" % (
            DESCRIPTIONS[scenario], medians["websockets"], unit,
            " | ".join("%.1f %s" % (medians[name], unit) for name in variants),
            " | ".join("%.2fx" % (medians[name] / medians["websockets"]) if name in medians else "n/a" for name in ratios)))


if __name__ == "__main__":
    main()
