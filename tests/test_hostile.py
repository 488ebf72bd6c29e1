"""Careless and hostile clients (issue 20): floods, slow or vanished readers, odd bytes.

Each test is one finding of the issue, tried as the client did it, against a
real waitress server (``live_server``, wired as mkiso-server wires it) where
the server's own behaviour is what is tested.
"""

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import waitress.buffers

from mkiso.http import application
from conftest import job_leftovers

KEY = "k" * 32


@pytest.fixture
def server(make_service, live_server, caplog):
    caplog.set_level(logging.INFO, logger="mkiso.access")

    def start(**overrides):
        service = make_service(**overrides)
        return service, live_server(application.Application(service.config, service))

    return start


def fetch(url, timeout=120, method="GET", headers=None, data=None):
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def port_of(base):
    return int(base.rsplit(":", 1)[1])


def read_head(sock):
    """An answer's head and what came after it, read from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_answer(sock):
    """Status and body of one HTTP/1.1 answer with a Content-Length, read from ``sock``."""
    head, body = read_head(sock)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), body


# -- a health flood ------------------------------------------------------------


def timed_download(base, accession="ACC2001"):
    started = time.monotonic()
    status, _, _ = fetch(base + "/api/iso/download?accession_number=" + accession)
    assert status == 200
    return time.monotonic() - started


@pytest.mark.alone
def test_a_health_flood_does_not_hold_up_a_download(server):
    """200 concurrent health calls with a download alongside: the download within 2x of alone.

    The health checks have never run on this fresh service, so the flood
    starts with the costly round (every tool run, the C-ECHOs) that each
    health call waits for; the download must not queue behind them.
    """
    service, base = server()
    alone = min(timed_download(base) for _ in range(3))
    flood = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", port_of(base)), timeout=120)
            flood.append(sock)
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        flooded = timed_download(base)
        answers = []
        for sock in flood:  # waitress serves 100 connections at once: the rest wait for these to close
            answers.append(read_answer(sock)[0])
            sock.close()
    finally:
        for sock in flood:
            sock.close()
    assert answers == [200] * 200
    # Within 2x of alone, with a little room for a loaded test machine's noise.
    assert flooded <= 2 * alone + 0.5, "download took %.2fs alone, %.2fs in the flood" % (alone, flooded)


# -- bodies ----------------------------------------------------------------------


@pytest.fixture
def spooled(monkeypatch):
    """Every temp file waitress opens to spool a request body."""
    opened = []
    real = waitress.buffers.TempfileBasedBuffer.newfile

    def newfile(self):
        opened.append(self)
        return real(self)

    monkeypatch.setattr(waitress.buffers.TempfileBasedBuffer, "newfile", newfile)
    return opened


@pytest.mark.parametrize("key", [None, KEY])
def test_a_50_mb_body_is_413_before_it_is_read(server, spooled, key):
    service, base = server(auth={"enabled": True, "api_key": KEY})
    with socket.create_connection(("127.0.0.1", port_of(base)), timeout=30) as sock:
        head = "POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
               "Content-Length: %d\r\n" % (50 * 1024 * 1024)
        if key:
            head += "X-API-Key: %s\r\n" % key
        sock.sendall((head + "\r\n").encode("ascii"))
        sock.sendall(b"[" * 65536)  # the start of the body; the rest never goes
        status, body = read_answer(sock)
    assert status == 413
    assert json.loads(body)["code"] == "body_too_large"
    assert spooled == [], "the body was spooled to a temp file"


def test_a_chunked_body_over_64_kb_is_413(server, spooled):
    service, base = server()
    with socket.create_connection(("127.0.0.1", port_of(base)), timeout=30) as sock:
        sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            sock.sendall(b"8000\r\n" + b" " * 0x8000 + b"\r\n")
        status, body = read_answer(sock)
    assert status == 413
    assert spooled == []


def test_deeply_nested_json_is_400(make_service, wsgi_call):
    service = make_service()
    app = application.Application(service.config, service)
    for body in (b"[" * 20000 + b"]" * 20000, b'{"accessions": ' + b"[" * 40 + b"]" * 40 + b"}"):
        response = wsgi_call(app, "/api/jobs", method="POST", body=body,
                             headers={"Content-Type": "application/json"})
        assert response.status == 400, response.body[:200]
        assert "nests deeper" in response.json()["error"]
    assert service.jobs.recent() == []


# -- --check-config -------------------------------------------------------------

SECRET = "S3cretValue0123456789"


@pytest.mark.parametrize("auth", [
    {"keys": {"his": SECRET[:10]}},  # too short
    {"keys": {"his": SECRET, "desk": SECRET}},  # the same key twice
    {"keys": {SECRET + " x": "his"}},  # name and key swapped: the key where a name belongs
    {"keys": [SECRET]},  # a list, not a mapping
    {"keys": {"his": SECRET + "\x07"}},  # not printable
    {"api_key": 12345678901234567890},  # a number, not a string
    {"api_key": [SECRET]},
])
def test_check_config_never_prints_a_key(tmp_path, capsys, auth):
    from mkiso import server as mkiso_server
    config = {"pacs": {"ae_title": "ABPACS", "host": "127.0.0.1", "port": 11112}, "auth": auth}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    assert mkiso_server.main(["--check-config", "--config", str(path)]) == 2
    output = capsys.readouterr()
    message = output.out + output.err
    assert "auth." in message  # the key's name is given
    for secret in (SECRET, SECRET[:10], "12345678901234567890"):
        assert secret not in message, message


# -- audit ----------------------------------------------------------------------


def audit_lines(service):
    with open(service.config.audit.path, encoding="utf-8") as handle:
        return handle.read().splitlines()


@pytest.mark.parametrize("forwarded", ["::1%\u0085{\"fake\":1}", "::1%eth0", "10.1.2.3\x00", "not-an-address"])
def test_a_crafted_forwarded_for_is_recorded_as_the_proxy(make_service, wsgi_call, caplog, forwarded):
    service = make_service()
    app = application.Application(service.config, service)
    response = wsgi_call(app, "/api/iso/download", query="accession_number=NOSUCH1",
                         headers={"X-Forwarded-For": forwarded}, peer="127.0.0.1")
    assert response.status == 404
    [line] = audit_lines(service)  # one line, whatever a line-splitting reader counts as one
    assert len(line.encode("utf-8").split(b"\n")) == 1 and "\u0085" not in line
    assert json.loads(line)["client"] == "127.0.0.1"
    assert any("not an IP address" in record.getMessage() for record in caplog.records)


def test_a_forwarded_address_is_taken_from_a_trusted_proxy(make_service, wsgi_call):
    service = make_service()
    app = application.Application(service.config, service)
    wsgi_call(app, "/api/iso/download", query="accession_number=NOSUCH1",
              headers={"X-Forwarded-For": "10.1.2.3, 2001:DB8::1"}, peer="127.0.0.1")
    assert json.loads(audit_lines(service)[0])["client"] == "2001:db8::1"


def test_syslog_xml_of_a_name_with_control_characters_parses(make_service):
    import xml.etree.ElementTree as ET
    from mkiso import atna, audit
    from mkiso.dicom import pacs
    export = audit.Export("download", "rid", "127.0.0.1", caller="desk\x01", accessions=["ACC\x1b1"])
    export.studies = [pacs.Study("ACC\x1b1", "1.2.3", "PAT\x00-1", "EVIL\x01^NAME\x1b[2J\ud800")]
    entry = export.entry(200, None)
    message = atna.syslog_message(entry, export, "CDRECORD")
    root = ET.fromstring(message.decode("utf-8").split(" \ufeff", 1)[1])
    names = [element.text for element in root.iter("ParticipantObjectName")]
    assert names == ["EVIL\ufffd^NAME\ufffd[2J\ufffd"]


# -- shutdown ---------------------------------------------------------------------


@pytest.fixture
def mounted_work_dir(tmp_path):
    """The work dir as a file system of its own, which the test may make read-only (root only)."""
    import subprocess
    work = tmp_path / "ro-work"
    work.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(work)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield work
    subprocess.run(["umount", "-l", str(work)], capture_output=True)


@pytest.mark.parametrize("breakage", ["read-only", "vanished"])
def test_sigterm_with_a_broken_work_dir_exits_0_without_traceback(tmp_path, settings, mounted_work_dir, breakage):
    import shutil
    import signal
    import subprocess
    from mkiso import demo
    from conftest import write_config
    from test_server import association_children, gone, health, start_server
    settings["server"] = {"port": demo.free_port()}
    settings["receiver"]["port"] = demo.free_port()
    settings["paths"]["work_dir"] = str(mounted_work_dir)
    proc = start_server(write_config(tmp_path / "config.yaml", settings), settings["server"]["port"])
    try:
        base = "http://127.0.0.1:%d" % settings["server"]["port"]
        assert health(base)["checks"]["receiver"]["ok"]
        held, children = association_children(proc, settings["receiver"]["port"])
        assert children, "an association's storescp should be running"
        if breakage == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(mounted_work_dir)], check=True)
        else:
            for entry in mounted_work_dir.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    assert "stopped" in output
    assert gone(children), "a child outlived the server"
    held.close()


# -- a POST flood -------------------------------------------------------------------


@pytest.mark.alone
def test_a_post_flood_does_not_starve_synchronous_downloads(server):
    """6 clients posting unknown accessions while the HIS downloads: every download is 200."""
    service, base = server(limits={"max_jobs": 2}, jobs={"max_failed": 10, "max_per_minute": 30})
    stop = threading.Event()
    statuses = []

    def flood():
        while not stop.is_set():
            status, _, _ = fetch(base + "/api/jobs", method="POST", data=b'{"accessions": ["NOSUCH1"]}',
                                 headers={"Content-Type": "application/json"}, timeout=30)
            statuses.append(status)

    clients = [threading.Thread(target=flood) for _ in range(6)]
    for client in clients:
        client.start()
    try:
        time.sleep(1)
        downloads = []
        for _ in range(3):
            status, _, body = fetch(base + "/api/iso/download?accession_number=ACC2001")
            downloads.append((status, body[:200] if status != 200 else b""))
    finally:
        stop.set()
        for client in clients:
            client.join(60)
    assert downloads == [(200, b"")] * 3
    assert 429 in statuses and statuses.count(202) <= 30 + 10  # a minute's worth, and what refilled
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(job.state.value in ("queued", "running")
                                              for job in service.jobs.recent()):
        time.sleep(0.1)
    failed = [job for job in service.jobs.recent() if job.state.value == "failed"]
    assert 0 < len(failed) <= 10
    # each job's outcome, and each download's (written when its answer has closed: waited for)
    assert len(wait_for_audit(service, statuses.count(202) + 3)) == statuses.count(202) + 3



# -- event streams ------------------------------------------------------------------

def open_stream(base, job_id, clerk):
    """An event stream of ``job_id`` for the clerk at 10.0.0.<clerk> (nginx, trusted, says which)."""
    sock = socket.create_connection(("127.0.0.1", port_of(base)), timeout=30)
    sock.sendall(("GET /api/jobs/%s/events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: 10.0.0.%d\r\n\r\n"
                  % (job_id, clerk)).encode("ascii"))
    return sock, int(read_head(sock)[0].split()[1])


def test_closed_event_streams_free_their_places_and_each_caller_has_8(server, silent_pacs):
    """32 streams from 4 clerks (8 each), a 33rd 503; all closed, 32 again within 3 s: 200; a 9th of one
    clerk 503."""
    service, base = server(timeouts={"find_s": 60})
    status, _, body = fetch(base + "/api/jobs", method="POST", data=b'{"accessions": ["ACC2001"]}',
                            headers={"Content-Type": "application/json"})
    assert status == 202
    job_id = json.loads(body)["id"]  # stuck at a PACS that never answers: its stream stays open
    try:
        for attempt in range(2):
            streams = [open_stream(base, job_id, number % 4) for number in range(32)]
            assert [status for _, status in streams] == [200] * 32, "attempt %d" % attempt
            extra, status = open_stream(base, job_id, 4)
            extra.close()
            assert status == 503  # all 32 taken
            for sock, _ in streams:
                sock.close()
            time.sleep(2)  # a closed stream's place is free within 2 s
        ninth = [open_stream(base, job_id, 0) for _ in range(9)]
        assert [status for _, status in ninth] == [200] * 8 + [503]
        for sock, _ in ninth:
            sock.close()
    finally:
        fetch(base + "/api/jobs/" + job_id, method="DELETE")


def wait_for_audit(service, count=1, timeout=15):
    """The exports' outcome lines, once ``count`` are written (a download's, when its answer closed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(outcomes(service)) < count:
        time.sleep(0.05)
    return outcomes(service)


def outcomes(service):
    return [line for line in map(json.loads, audit_lines(service)) if line["stage"] == "ended"]


def test_the_audit_line_of_a_416_says_416(make_service, wsgi_call):
    service = make_service()
    app = application.Application(service.config, service)
    response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001",
                         headers={"Range": "bytes=999999999999-"})
    assert response.status == 416
    [line] = wait_for_audit(service)
    assert (line["status"], line["code"], line["bytes"]) == (416, "range_not_satisfiable", 0)


def test_the_audit_line_of_a_range_counts_the_range(make_service, wsgi_call):
    service = make_service()
    app = application.Application(service.config, service)
    response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001", headers={"Range": "bytes=0-99"})
    assert response.status == 206
    [line] = wait_for_audit(service)
    assert (line["status"], line["bytes"], line["complete"]) == (206, 100, True)


def test_the_audit_line_of_a_client_leaving_after_4_kb(server):
    service, base = server()
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.settimeout(60)
        client.connect(("127.0.0.1", port_of(base)))
        client.sendall(b"GET /api/iso/download?accession_number=BIG01 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, body = read_head(client)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < 4096:
            body += client.recv(4096 - len(body))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and job_leftovers(service):
        time.sleep(0.05)
    [line] = wait_for_audit(service)
    assert (line["status"], line["complete"]) == (200, False)
    assert 4096 <= line["bytes"] < length


def test_the_audit_line_of_a_whole_download(server):
    service, base = server()
    status, _, body = fetch(base + "/api/iso/download?accession_number=ACC2001")
    assert status == 200
    [line] = wait_for_audit(service)
    assert (line["status"], line["complete"], line["bytes"]) == (200, True, len(body))


# -- slow readers -----------------------------------------------------------------


def test_slow_readers_isos_count_against_a_byte_budget(server, caplog):
    """10 slow readers with max_jobs 4: only what fits in limits.max_pending_bytes stays; the oldest are cut."""
    import os
    budget = 25 * 1000 * 1000  # two of BIG01's ISOs (11 MB)
    service, base = server(limits={"max_jobs": 4, "max_pending_bytes": budget},
                           cache={"max_bytes": 100 * 1000 * 1000})  # the same disc each time: quick
    jobs_dir = service.path("jobs")
    readers, most = [], 0
    try:
        for _ in range(10):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.settimeout(60)
            sock.connect(("127.0.0.1", port_of(base)))
            sock.sendall(b"GET /api/iso/download?accession_number=BIG01 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head, body = read_head(sock)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            readers.append((sock, len(body)))
            time.sleep(0.3)  # an older reader's cut is done by the server's loop
            most = max(most, len(os.listdir(jobs_dir)))
        assert most <= 3, "%d ISOs at once for slow readers" % most
        received = []
        for sock, got in readers:  # the oldest 8 were cut off: their answers end early
            sock.settimeout(5)
            try:
                while got < length and (chunk := sock.recv(1 << 20)):
                    got += len(chunk)
            except (ConnectionResetError, socket.timeout):
                pass
            received.append(got)
        assert [got < length for got in received] == [True] * 8 + [False] * 2
    finally:
        for sock, _ in readers:
            sock.close()
    assert "a slow reader's download was cut off" in caplog.text
    deadline = time.monotonic() + 30  # the closes are the server loop's: a moment after the sockets'
    while time.monotonic() < deadline and (job_leftovers(service) or service.pending.held()):
        time.sleep(0.05)
    assert job_leftovers(service) == [] and service.pending.held() == 0


# -- the receiver --------------------------------------------------------------------


@pytest.mark.alone
def test_200_idle_receiver_connections_cost_no_process(make_service, wsgi_call, archive, receiver_port):
    """200 idle connections to the receiver's port get no storescp at all (each is a socket until the
    association timeout), and a download beside them gets its images: its association is one of 4."""
    from test_receiver import storescp_processes
    service = make_service(receiver={"max_associations": 4})
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", receiver_port), timeout=10))
        time.sleep(1)
        assert storescp_processes(service.receiver.inbox) == []
        app = application.Application(service.config, service)
        response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001")
        assert response.status == 200, response.body[:300]
        assert storescp_processes(service.receiver.inbox) == []
    finally:
        for sock in idle:
            sock.close()
    assert service.receiver.refused_associations == 0
