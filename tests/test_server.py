"""mkiso-server as a real process: it serves, and SIGTERM ends it cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from mkiso import demo
from conftest import write_config


def children_of(pid):
    result = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(line) for line in result.stdout.split()]


@pytest.fixture
def server_process(tmp_path, settings):
    settings["server"] = {"port": demo.free_port()}
    settings["receiver"]["port"] = demo.free_port()  # not the session's: only health is asked here
    path = write_config(tmp_path / "config.yaml", settings)
    proc = subprocess.Popen([sys.executable, "-m", "mkiso", "--config", path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if not demo.wait_for_port(settings["server"]["port"], timeout=20):
        proc.kill()
        pytest.fail("server did not listen: %s" % proc.communicate()[0].decode())
    yield proc, "http://127.0.0.1:%d" % settings["server"]["port"], settings
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serves_health_and_exits_0_on_sigterm(server_process):
    proc, base, settings = server_process
    with urllib.request.urlopen(base + "/api/health?strict=1", timeout=30) as answer:
        body = json.load(answer)
        assert answer.headers["X-Request-ID"]
    assert body["status"] == "ok", body
    receiver_pids = children_of(proc.pid)
    assert receiver_pids, "the receiver should run as a child"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output.decode()
    log = output.decode()
    assert "msg=stopping signal=SIGTERM" in log and "msg=stopped" in log
    time.sleep(0.2)
    for pid in receiver_pids:
        assert not os.path.exists("/proc/%d" % pid), "child %d outlived the server" % pid
    assert os.listdir(settings["paths"]["work_dir"]) == []


def test_sigint_also_stops_cleanly(server_process):
    proc, _, _ = server_process
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.returncode == 0
