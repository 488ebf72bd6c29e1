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
from conftest import DCMTK_DIR, write_config
from test_receiver import begin_association


def children_of(pid):
    result = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(line) for line in result.stdout.split()]


def association_children(proc, port):
    """Begin an association on the receiver's port; (its connection, the server's children once the
    storescp serving it runs: exec'd, no longer the setpriv that sets its parent-death signal first; a
    server killed in between leaves the child without one, which is not what these tests look at)."""
    sock = begin_association(port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (children_of(proc.pid) and all(
            command_of(pid) not in ("", "setpriv") for pid in children_of(proc.pid))):
        time.sleep(0.05)
    return sock, children_of(proc.pid)


def command_of(pid):
    try:
        with open("/proc/%d/comm" % pid) as comm:
            return comm.read().strip()
    except FileNotFoundError:
        return ""


def start_server(path, port):
    """The server, once it answers: its loop turns only after its SIGTERM/SIGINT handlers are set
    (the port listens a moment earlier; a signal then, on a loaded machine, met the default action)."""
    proc = subprocess.Popen([sys.executable, "-m", "mkiso", "--config", path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if not demo.wait_for_port(port, timeout=20):
        proc.kill()
        pytest.fail("server did not listen: %s" % proc.communicate()[0].decode())
    with urllib.request.urlopen("http://127.0.0.1:%d/api/desk" % port, timeout=30) as answer:
        assert answer.status == 200
    return proc


def health(base):
    with urllib.request.urlopen(base + "/api/health", timeout=30) as answer:
        return json.load(answer)


def gone(pids, timeout=10):
    """Whether the processes ended within ``timeout``: a zombie has (killed, its parent dead, it waits for
    init to reap it, which under load can take a while)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)] == []


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def server_process(tmp_path, settings):
    settings["server"] = {"port": demo.free_port()}
    settings["receiver"]["port"] = demo.free_port()  # not the session's: only health is asked here
    path = write_config(tmp_path / "config.yaml", settings)
    procs = [start_server(path, settings["server"]["port"])]

    def restart():
        procs.append(start_server(path, settings["server"]["port"]))
        return procs[-1]

    yield procs[0], "http://127.0.0.1:%d" % settings["server"]["port"], settings, restart
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serves_health_and_exits_0_on_sigterm(server_process):
    proc, base, settings, _ = server_process
    with urllib.request.urlopen(base + "/api/health?strict=1", timeout=30) as answer:
        body = json.load(answer)
        assert answer.headers["X-Request-ID"]
    assert body["status"] == "ok", body
    held, receiver_pids = association_children(proc, settings["receiver"]["port"])
    assert receiver_pids, "an association's storescp should run as a child"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output.decode()
    log = output.decode()
    assert "msg=stopping signal=SIGTERM" in log and "msg=stopped" in log
    time.sleep(0.2)
    for pid in receiver_pids:
        assert not os.path.exists("/proc/%d" % pid), "child %d outlived the server" % pid
    held.close()
    assert os.listdir(settings["paths"]["work_dir"]) == []


def test_sigint_also_stops_cleanly(server_process):
    proc, _, _, _ = server_process
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.returncode == 0


def test_sigkill_leaves_no_child_and_a_restart_gets_the_receiver_port(server_process):
    proc, base, settings, restart = server_process
    assert health(base)["checks"]["receiver"]["ok"]
    held, children = association_children(proc, settings["receiver"]["port"])
    assert children, "an association's storescp should run as a child"
    proc.kill()
    proc.wait()
    assert gone(children), "a child outlived the SIGKILLed server (no parent-death signal)"
    held.close()
    restart()
    check = health(base)["checks"]["receiver"]
    assert check["ok"] is True, check
    assert "listening on port %d" % settings["receiver"]["port"] in check["detail"]


def test_a_receiver_left_by_a_crash_is_stopped_at_start(tmp_path, settings):
    """A storescp that outlived its server (as before the parent-death signal) holds the port."""
    port = demo.free_port()
    settings["server"] = {"port": port}
    settings["receiver"]["port"] = demo.free_port()
    work_dir = settings["paths"]["work_dir"]
    inbox = os.path.join(work_dir, "inbox")
    os.makedirs(inbox)
    orphan = subprocess.Popen(
        [os.path.join(DCMTK_DIR, "storescp"), "--fork", "-aet", "CDRECORD", "-od", inbox, "-su", "STUDY",
         str(settings["receiver"]["port"])], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert demo.wait_for_port(settings["receiver"]["port"])
        with open(os.path.join(work_dir, "receiver.pid"), "w") as handle:
            handle.write("%d\n" % orphan.pid)
        server = start_server(write_config(tmp_path / "config.yaml", settings), port)
        try:
            orphan.wait(timeout=10)  # killed by the new server
            check = health("http://127.0.0.1:%d" % port)["checks"]["receiver"]
            assert check["ok"] is True, check
        finally:
            server.send_signal(signal.SIGTERM)
            output = server.communicate(timeout=30)[0].decode()
        assert "stopped a receiver left over from a crash" in output
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_a_recorded_pid_that_is_not_our_receiver_is_left_alone(tmp_path, settings):
    """After a reboot the recorded pid may belong to anything: only our storescp is killed."""
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        settings["server"] = {"port": demo.free_port()}
        settings["receiver"]["port"] = demo.free_port()
        with open(os.path.join(settings["paths"]["work_dir"], "receiver.pid"), "w") as handle:
            handle.write("%d\n" % bystander.pid)
        server = start_server(write_config(tmp_path / "config.yaml", settings), settings["server"]["port"])
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
        assert bystander.poll() is None, "an unrelated process was killed"
    finally:
        bystander.kill()
        bystander.wait()
