"""A work dir the service cannot write, met by every endpoint that needs it: one clear 503.

The service runs as a real process under an unprivileged user (root would
write anyway), as the package runs it as ``mkiso``; then its spool goes
bad under it in the two ways it does on a gateway: its folder's modes
taken away (a chown or chmod by hand) or its file system read-only (ext4
remounts so on an error). Every request that would write there (a
download, a multi-download, a job, a desk lookup, a print) is the same 503
``work_dir_unwritable`` with its sentence, never a 500 with a traceback in
the log.
"""

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from mkiso import demo
from conftest import write_config

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNPRIVILEGED = "nobody"


def send(url, body=None):
    """(status, JSON body) of a GET, or of a POST of ``body`` as JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.fixture
def unprivileged_server(settings, silent_listener):
    """mkiso-server as a user that file modes bind (``nobody`` when the tests run as root), its spool,
    config and audit trail in a folder that user can reach (the tests' tmp_path is root's alone), a
    publisher configured (a port that never answers: a print must not get that far). Yields
    (base URL, work dir, the server's log so far as a function)."""
    root = tempfile.mkdtemp(prefix="mkiso-spool-")
    os.chmod(root, 0o755)
    work_dir, logs = os.path.join(root, "work"), os.path.join(root, "audit")
    os.mkdir(work_dir, 0o700)
    os.mkdir(logs, 0o700)
    run_as = []
    if os.geteuid() == 0:
        user = pwd.getpwnam(UNPRIVILEGED)
        for folder in (work_dir, logs):
            os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid, "--clear-groups"]
    port = demo.free_port()
    settings["server"] = {"port": port}
    settings["paths"]["work_dir"] = work_dir
    settings["audit"]["path"] = os.path.join(logs, "audit.log")
    settings["publisher"] = {"host": "127.0.0.1", "port": silent_listener.getsockname()[1]}
    config = write_config(os.path.join(root, "config.yaml"), settings)
    log_path = os.path.join(root, "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(run_as + [sys.executable, "-m", "mkiso", "--config", config], stdout=log,
                                stderr=subprocess.STDOUT, cwd=root, env=dict(os.environ, PYTHONPATH=HERE))

    def server_log():
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    try:
        if not demo.wait_for_port(port, timeout=20):
            pytest.fail("the server did not listen: %s" % server_log())
        yield "http://127.0.0.1:%d" % port, work_dir, server_log
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def modes_taken(work_dir):
    """Its jobs folder no longer writable by the service's user (as root: file modes bind the service)."""
    jobs = os.path.join(work_dir, "jobs")
    os.chmod(jobs, 0o555)
    return lambda: os.chmod(jobs, 0o700)


def read_only(work_dir):
    """Its file system read-only, as a bind mount of it remounted read-only."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    subprocess.run(["mount", "--bind", work_dir, work_dir], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", work_dir], check=True)
    return lambda: subprocess.run(["umount", work_dir], check=True)


def job_outcome(base, body):
    """A POSTed job's error once it ended (it was accepted: the work dir is the job's to find bad)."""
    status, job = send(base + "/api/jobs", body)
    assert status == 202, job
    deadline = time.monotonic() + 60
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = send(base + "/api/jobs/" + job["id"])[1]
    assert job["state"] == "failed", job
    return job["error"]["status"], job["error"]


@pytest.mark.parametrize("fault, cause", [(modes_taken, "Permission denied"), (read_only, "Read-only file system")])
def test_every_endpoint_that_needs_the_work_dir_says_it_is_not_writable(unprivileged_server, silent_listener,
                                                                         fault, cause):
    base, work_dir, server_log = unprivileged_server
    restore = fault(work_dir)
    try:
        answers = {
            "download": send(base + "/api/iso/download?accession_number=ACC2001"),
            "multi": send(base + "/api/iso/download-multiple?accession_numbers=ACC2001,ACC1002"),
            "studies lookup": send(base + "/api/studies?accession_numbers=ACC2001"),
            "print": send(base + "/api/iso/print?accession_number=ACC2001"),
            "job": job_outcome(base, {"accessions": ["ACC2001"]}),
            "print job": job_outcome(base, {"action": "print", "accessions": ["ACC2001"]}),
        }
    finally:
        restore()
    sentence = "The work dir %s is not writable (%s)" % (os.path.join(work_dir, "jobs"), cause)
    for endpoint, (status, body) in answers.items():
        assert (status, body["code"]) == (503, "work_dir_unwritable"), (endpoint, body)
        assert body["error"].startswith(sentence), (endpoint, body)
    with pytest.raises(BlockingIOError):
        silent_listener.accept()  # no print got as far as the publisher
    log = server_log()
    assert "Traceback" not in log and "PermissionError" not in log, log[-3000:]
    assert send(base + "/api/studies?accession_numbers=ACC2001")[0] == 200  # writable again: it works
