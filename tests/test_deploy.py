"""deploy/: the systemd units parse and say what they must, and the nginx
config, run for real, proxies a WebSocket to wsloop started the way
wsloop.service starts it (socket activation), with the client's real address
reaching wsloop's access log.

nginx is Debian's package (tests/run installs it); a machine without it fails
here rather than skipping, so a deploy config nobody ran never passes.
"""

import configparser
import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import KEY, client_frame, free_port, parse_server_frame

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
WSLOOP_PY = os.path.join(ROOT, "wsloop.py")
CLIENT_ADDRESS = "127.0.0.2"  # loopback too, but not the proxy's 127.0.0.1


def read_unit(name):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    with open(os.path.join(DEPLOY, name)) as unit:
        parser.read_file(unit)
    return parser


def exec_start_argv():
    """wsloop.service's ExecStart as an argv (continuation lines joined)."""
    text = read_unit("wsloop.service")["Service"]["ExecStart"]
    return shlex.split(text.replace("\\\n", " ").replace("\n", " "))


def nginx_upstream():
    with open(os.path.join(DEPLOY, "nginx.conf")) as conf:
        text = conf.read()
    match = re.search(r"upstream\s+wsloop\s*{\s*server\s+([^;\s]+)\s*;", text)
    assert match, "deploy/nginx.conf has no upstream wsloop { server ...; }"
    return text, match.group(1)


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for " + what, pytrace=False)
        time.sleep(0.05)


# -- the systemd units ------------------------------------------------------------


def test_service_runs_wsloop_trusting_only_the_local_proxy():
    service = read_unit("wsloop.service")["Service"]
    argv = exec_start_argv()
    assert argv[0].endswith("python3") and argv[1] == "/opt/wsloop/wsloop.py", argv
    flags = argv[2:]
    assert flags[flags.index("--forwarded-allow-ips") + 1] == "127.0.0.1", flags
    # It serves on the socket systemd passes: no --port, --host or --uds of its own.
    assert not {"--port", "--host", "--uds"} & set(flags), flags
    assert service["Restart"] == "on-failure"
    assert service["DynamicUser"] == "yes" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert int(service["LimitNOFILE"]) >= 65536


def test_every_flag_in_exec_start_is_one_wsloop_has():
    helptext = subprocess.run([sys.executable, WSLOOP_PY, "--help"], capture_output=True, text=True,
                              check=True).stdout
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", helptext))
    used = [arg for arg in exec_start_argv()[2:] if arg.startswith("--")]
    assert used and not [flag for flag in used if flag not in known], (used, sorted(known))


def test_socket_listens_where_nginx_proxies_to():
    unit = read_unit("wsloop.socket")
    assert unit["Socket"].get("Accept", "no") == "no"  # one service for the socket
    assert unit["Install"]["WantedBy"] == "sockets.target"
    assert read_unit("wsloop.service")["Unit"]["Requires"] == "wsloop.socket"
    _, upstream = nginx_upstream()
    assert unit["Socket"]["ListenStream"] == upstream, (unit["Socket"]["ListenStream"], upstream)


def test_nginx_conf_has_the_websocket_essentials():
    text, _ = nginx_upstream()
    assert re.search(r"map\s+\$http_upgrade\s+\$connection_upgrade\s*{", text)
    for directive in (
        r"proxy_http_version\s+1\.1;",
        r"proxy_set_header\s+Upgrade\s+\$http_upgrade;",
        r"proxy_set_header\s+Connection\s+\$connection_upgrade;",
        r"proxy_set_header\s+X-Forwarded-For\s+\$\w+;",
        r"proxy_set_header\s+X-Forwarded-Proto\s+\$scheme;",
        r"proxy_buffering\s+off;",
    ):
        assert re.search(directive, text), directive
    read_timeout = int(re.search(r"proxy_read_timeout\s+(\d+)s;", text).group(1))
    assert read_timeout > 20 * 2, "proxy_read_timeout must outlast wsloop's ping interval (20 s)"


def test_every_nginx_location_names_the_client_and_clears_what_the_client_sent():
    """proxy_set_header in a location replaces the server block's, so each
    location that proxies must set X-Forwarded-For itself (wsloop believes
    that header alone) and clear a client's own Forwarded and X-Real-IP."""
    text, _ = nginx_upstream()
    text = re.sub(r"#.*", "", text)
    locations = re.findall(r"location\s+[^{]*{([^}]*)}", text)
    proxying = [body for body in locations if "proxy_pass" in body]
    assert len(proxying) == 3, locations
    for body in proxying:
        assert re.search(r"proxy_set_header\s+X-Forwarded-For\s+\$remote_addr;", body), body
        assert re.search(r'proxy_set_header\s+Forwarded\s+"";', body), body
        assert re.search(r'proxy_set_header\s+X-Real-IP\s+"";', body), body


# -- nginx in front of a socket-activated wsloop, for real ------------------------

# Runs as systemd would: the listening socket moved to fd 3, LISTEN_PID set
# to this process (exec keeps the pid) and LISTEN_FDS=1, then exec.
ACTIVATOR = textwrap.dedent("""
    import os, sys
    fd = int(sys.argv[1])
    os.dup2(fd, 3)  # SD_LISTEN_FDS_START; dup2 leaves it inheritable
    os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = "1"
    os.execv(sys.argv[2], sys.argv[2:])
""")


def nginx_config(tmp, nginx_port, wsloop_port):
    """deploy/nginx.conf with only addresses and paths changed, in a whole
    config that runs unprivileged out of `tmp`."""
    text, upstream = nginx_upstream()
    text = text.replace("server %s;" % upstream, "server 127.0.0.1:%d;" % wsloop_port)
    text = re.sub(r"listen\s+80;", "listen 127.0.0.1:%d;" % nginx_port, text)
    text = re.sub(r"listen\s+\[::\]:80;", "", text)
    text = re.sub(r"(access_log|error_log)\s+/var/log/nginx/([\w.]+)", lambda m: "%s %s/%s" % (
        m.group(1), tmp, m.group(2)), text)
    assert "/var/" not in re.sub(r"#.*", "", text), "a system path is left in the test's config"
    temp_paths = "".join("    %s_temp_path %s/%s;\n" % (kind, tmp, kind)
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (
        ("user root;\n" if os.geteuid() == 0 else "")  # workers must reach tmp
        + "worker_processes 1;\nevents { worker_connections 64; }\n"
        + "http {\n" + temp_paths + textwrap.indent(text, "    ") + "}\n"
    )


def handshake_via(port, source):
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(("GET /through-nginx HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                  "User-Agent: test_deploy\r\n\r\n" % KEY).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "nginx closed during the handshake: %r" % head
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, rest


@contextlib.contextmanager
def nginx_in_front(tmp, extra_flags=()):
    """deploy/nginx.conf run by a real nginx, in front of wsloop started as
    wsloop.service starts it (plus ``extra_flags``): (nginx's port, the path
    of wsloop's log)."""
    nginx = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(path, os.X_OK)), None)
    if nginx is None:
        pytest.fail("nginx is not installed: tests/run installs it (Debian's nginx package)", pytrace=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    wsloop_port = listener.getsockname()[1]
    nginx_port = free_port()

    # wsloop as wsloop.service runs it, with this checkout and this Python.
    argv = exec_start_argv()
    argv = [sys.executable, WSLOOP_PY] + argv[2:] + list(extra_flags)
    log_path = os.path.join(tmp, "wsloop.log")
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-c", ACTIVATOR, str(listener.fileno())] + argv,
                                  pass_fds=[listener.fileno()], stdout=log, stderr=subprocess.STDOUT)
    listener.close()
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as out:
        out.write(nginx_config(tmp, nginx_port, wsloop_port))
    proxy = None
    try:
        test = subprocess.run([nginx, "-t", "-e", "stderr", "-p", tmp, "-c", conf,
                               "-g", "pid %s/nginx.pid; error_log stderr;" % tmp],
                              capture_output=True, text=True)
        assert test.returncode == 0, test.stderr
        proxy = subprocess.Popen([nginx, "-e", "stderr", "-p", tmp, "-c", conf,
                                  "-g", "daemon off; pid %s/nginx.pid; error_log stderr;" % tmp],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def nginx_up():
            assert proxy.poll() is None, "nginx exited: %s" % proxy.stdout.read()
            try:
                socket.create_connection(("127.0.0.1", nginx_port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(nginx_up, 10, "nginx to listen")
        assert server.poll() is None, open(log_path).read()
        yield nginx_port, log_path
    finally:
        if proxy is not None:
            proxy.terminate()
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()
            proxy.stdout.close()
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_websocket_through_nginx_reaches_wsloop_with_the_client_address(tmp_path):
    tmp = str(tmp_path)
    with nginx_in_front(tmp) as (nginx_port, log_path):
        sock, rest = handshake_via(nginx_port, CLIENT_ADDRESS)
        sock.sendall(client_frame(1, "hello through nginx"))
        data = bytearray(rest)
        while parse_server_frame(bytes(data)) is None:
            chunk = sock.recv(4096)
            assert chunk, "closed before the echo"
            data += chunk
        (fin, opcode, payload, rsv), _ = parse_server_frame(bytes(data))
        assert (opcode, payload) == (1, b"hello through nginx")
        sock.sendall(client_frame(8, b"\x03\xe8"))
        sock.settimeout(10)
        while sock.recv(4096):
            pass  # the close frame, then EOF once wsloop ends it
        sock.close()

        def logged():
            with open(log_path) as log:
                return "closed" in log.read()

        wait_until(logged, 10, "wsloop to log the connection's end")
        with open(log_path) as log:
            text = log.read()
        access = [line for line in text.splitlines() if "wsloop.access" in line and "/through-nginx" in line]
        assert len(access) == 1, text
        assert CLIENT_ADDRESS in access[0] and " 101 " in access[0], access[0]
        assert "127.0.0.1" not in access[0], access[0]  # not the proxy's address
        with open(os.path.join(tmp, "wsloop.access.log")) as log:
            nginx_lines = [line for line in log if "/through-nginx" in line]
        assert nginx_lines and nginx_lines[0].startswith(CLIENT_ADDRESS + " ") and '" 101 ' in nginx_lines[0], \
            nginx_lines


def spoofing(address):
    """What a client adds to claim to be ``address``."""
    return {"Forwarded": "for=%s" % address, "X-Forwarded-For": address, "X-Real-IP": address}


def request_via(port, path, headers, upgrade=True):
    """A request from CLIENT_ADDRESS through nginx: (status, the socket)."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((CLIENT_ADDRESS, 0))
    sock.connect(("127.0.0.1", port))
    lines = ["GET %s HTTP/1.1" % path, "Host: example.com"]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: " + KEY,
                  "Sec-WebSocket-Version: 13"]
    lines += ["%s: %s" % item for item in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "nginx closed before answering: %r" % head
        head += chunk
    return int(head.split(b" ")[1]), sock


def test_through_nginx_a_client_cannot_choose_its_own_address(tmp_path):
    """Behind the shipped nginx config, a client sending its own Forwarded,
    X-Forwarded-For and X-Real-IP is still the address nginx saw: the
    per-address limit holds, the metrics allow-list holds, and the access
    log names the real address.  (The metrics path is moved off nginx's
    own `location = /metrics` so that the request reaches wsloop.)"""
    tmp = str(tmp_path)
    flags = ["--workers", "1", "--max-connections-per-ip", "2", "--metrics-path", "/stats",
             "--metrics-allow-ips", "127.0.0.1"]
    with nginx_in_front(tmp, flags) as (nginx_port, log_path):
        held = []
        for index in range(2):
            status, sock = request_via(nginx_port, "/spoof-%d" % index, spoofing("198.51.100.%d" % index))
            held.append(sock)
            assert status == 101
        status, sock = request_via(nginx_port, "/spoof-2", spoofing("198.51.100.2"))
        sock.close()
        assert status == 429  # the third from one address, whatever it claims
        status, sock = request_via(nginx_port, "/stats", spoofing("127.0.0.1"), upgrade=False)
        sock.close()
        assert status == 403  # not the proxy's (allowed) address
        for sock in held:
            sock.close()

        def logged():
            with open(log_path) as log:
                return log.read().count("wsloop.access") >= 4

        wait_until(logged, 10, "wsloop to log the four requests")
        with open(log_path) as log:
            access = [line for line in log.read().splitlines() if "wsloop.access" in line]
        assert len(access) == 4, access
        for line in access:
            assert line.split(" wsloop.access INFO ", 1)[1].startswith(CLIENT_ADDRESS + ":"), line
            assert "198.51.100." not in line, line
