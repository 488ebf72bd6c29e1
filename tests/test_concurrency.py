"""Through a real waitress server: parallel jobs each get exactly their own
study, and a job's files go when the response closes, even mid-transfer."""

import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from mkiso.http import application
from discs import check_pdi, open_iso
from conftest import job_leftovers, wait_until_clean


@pytest.fixture
def server(make_service, live_server, caplog):
    caplog.set_level(logging.INFO, logger="mkiso.access")
    service = make_service(limits={"max_jobs": 8})
    return service, live_server(application.Application(service.config, service))


def fetch(url, timeout=120):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_parallel_downloads_each_hold_exactly_their_own_studies(server, archive, tmp_path):
    service, base = server
    wanted = [
        ("/api/iso/download?accession_number=ACC2001", ("ACC2001",)),
        ("/api/iso/download?accession_number=ACC2001", ("ACC2001",)),
        ("/mkiso.php?accession_number=MR.180505.026", ("MR.180505.026",)),
        ("/api/iso/download?accession_number=MR.180505.026", ("MR.180505.026",)),
        ("/api/iso/download?accession_number=ACC3001", ("ACC3001",)),
        ("/api/iso/download?accession_number=DUP01", ("DUP01",)),
        ("/api/iso/download-multiple?accession_numbers=MR.180505.026,ACC1002", ("MR.180505.026", "ACC1002")),
        ("/api/iso/download?accession_number=ACC3001", ("ACC3001",)),
    ]
    with ThreadPoolExecutor(len(wanted)) as pool:
        answers = list(pool.map(lambda item: fetch(base + item[0]), wanted))
    for index, ((path, accessions), (status, headers, body)) in enumerate(zip(wanted, answers, strict=True)):
        assert status == 200, (path, body[:300])
        assert int(headers["Content-Length"]) == len(body)
        iso_path = str(tmp_path / ("%d.iso" % index))
        with open(iso_path, "wb") as handle:
            handle.write(body)
        check_pdi(open_iso(iso_path, str(tmp_path / str(index))), archive.sop_uids(*accessions))
    assert wait_until_clean(service) == []


def test_head_sends_headers_only_and_cleans_up(server):
    service, base = server
    request = urllib.request.Request(base + "/api/iso/download?accession_number=ACC2001", method="HEAD")
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert answer.status == 200
        assert int(answer.headers["Content-Length"]) > 0
        assert answer.read() == b""
    assert wait_until_clean(service) == []


def access_lines(caplog, path_part):
    return [r.fields for r in caplog.records
            if r.name == "mkiso.access" and path_part in r.fields["path"] + "?" + r.fields.get("accessions", "")]


def logged_access(caplog, path_part, timeout=10):
    """The one access line of the answer, waited for: it is written just after the job's files go."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not access_lines(caplog, path_part):
        time.sleep(0.02)
    [line] = access_lines(caplog, path_part)
    return line


def test_client_hanging_up_mid_transfer_removes_the_job_files(server, caplog):
    service, base = server
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as client:
        # A small window: loopback's autotuned buffers could otherwise swallow the whole 11 MB ISO.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.settimeout(60)
        client.connect(("127.0.0.1", port))
        client.sendall(b"GET /api/iso/download?accession_number=BIG01 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = client.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        length = int(first.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert length > 8 * 1024 * 1024
        assert job_leftovers(service), "the ISO should still be there while it is being sent"
        assert access_lines(caplog, "BIG01") == [], "logged before the answer ended"
    assert wait_until_clean(service) == []
    line = logged_access(caplog, "BIG01")
    assert line["status"] == 200 and line["complete"] == "false"
    assert 0 <= line["bytes"] < length


def test_a_finished_download_is_logged_complete_with_its_bytes(server, caplog):
    service, base = server
    status, headers, body = fetch(base + "/api/iso/download?accession_number=ACC2001")
    assert status == 200
    assert wait_until_clean(service) == []
    line = logged_access(caplog, "ACC2001")
    assert line["complete"] == "true" and line["bytes"] == len(body) == int(headers["Content-Length"])


def test_busy_beyond_max_jobs_is_503_with_retry_after(make_service, wsgi_call, silent_pacs):
    """One slot, taken by a download stuck at a PACS that never answers: the next one is 503."""
    service = make_service(limits={"max_jobs": 1}, timeouts={"find_s": 3})
    app = application.Application(service.config, service)
    holder = threading.Thread(target=wsgi_call, args=(app, "/api/iso/download"),
                              kwargs={"query": "accession_number=ACC2001"})
    holder.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not [j for j in service.jobs.recent() if j.state.value == "running"]:
        time.sleep(0.01)
    response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001")
    holder.join()
    assert response.status == 503
    assert response.header("Retry-After") == "30"
    assert response.json()["code"] == "busy"


def test_client_hanging_up_before_the_iso_is_ready_removes_the_job_files(server):
    service, base = server
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
        client.sendall(b"GET /api/iso/download?accession_number=BIG01 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not job_leftovers(service):
            time.sleep(0.01)
        assert job_leftovers(service), "the job should have started"
    time.sleep(1)  # let the job finish building for a client that is gone
    assert wait_until_clean(service, timeout=30) == []
