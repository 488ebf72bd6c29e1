"""systemd's notify protocol, spoken to a real datagram socket by a real mkiso-server."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mkiso import demo, systemd
from conftest import write_config


def listen(kind, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    else:
        name = "mkiso-test-%d-%d" % (os.getpid(), time.monotonic_ns())
        sock.bind("\0" + name)
        address = "@" + name
    sock.settimeout(0.2)
    return sock, address


def messages(sock, seconds, first_within=60):
    """(time, message) received for ``seconds`` from the first one, which may take ``first_within``
    seconds (the service's start-up, slow on a loaded machine, is no part of what is counted)."""
    got = []
    deadline = time.monotonic() + first_within
    while time.monotonic() < deadline:
        try:
            got.append((time.monotonic(), sock.recv(4096).decode()))
        except socket.timeout:
            continue
        if len(got) == 1:
            deadline = got[0][0] + seconds
    return got


@pytest.fixture
def start(tmp_path, settings):
    procs = []

    def run(address, watchdog_usec, receiver_port=None):
        settings["server"] = {"port": demo.free_port()}
        settings["receiver"]["port"] = receiver_port or demo.free_port()
        path = write_config(tmp_path / "config.yaml", settings)
        env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC=str(watchdog_usec))
        proc = subprocess.Popen([sys.executable, "-m", "mkiso", "--config", path], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_watchdog_and_stopping(start, tmp_path, kind):
    sock, address = listen(kind, tmp_path)
    with sock:
        proc = start(address, 1000000)
        got = messages(sock, 4)
        assert got and got[0][1].startswith("READY=1"), got
        pings = [at for at, message in got if message == "WATCHDOG=1"]
        assert len(pings) >= 4, "at half the 1 s interval, about 8 in 4 s: %s" % got
        assert all(later - earlier < 1.0 for earlier, later in zip(pings, pings[1:], strict=False)), pings
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        rest = [message for _, message in messages(sock, 0.5)]
        assert any(message.startswith("STOPPING=1") for message in rest), rest


def test_watchdog_stops_while_the_receiver_is_dead_for_good(start, silent_listener, tmp_path):
    """Someone else holds the receiver port: storescp can never listen, so systemd must restart us."""
    sock, address = listen("path", tmp_path)
    with sock:
        start(address, 1000000, receiver_port=silent_listener.getsockname()[1])
        got = messages(sock, 5)
    assert got and got[0][1].startswith("READY=1"), got
    ready_at = got[0][0]
    pings = [at - ready_at for at, message in got if message == "WATCHDOG=1"]
    assert all(at < 1.5 for at in pings), "pings went on with a dead receiver: %s" % pings


def test_a_watchdog_meant_for_another_process_is_ignored():
    notifier = systemd.Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_s == 0
    assert systemd.Notifier({}).address == "" and systemd.Notifier({}).watchdog_s == 0
