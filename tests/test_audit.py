"""The audit trail (SPEC §11): a line before anything leaves and the outcome after, the right client and
caller, no export without it, whatever fails or kills the server in between."""

import gzip
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

import pytest

from mkiso import audit, demo, errors
from mkiso.disc import isoimage
from mkiso.http import application
from conftest import write_config
from test_hostile import fetch, port_of, read_head
from test_print import FakeRimage
from test_server import start_server

KEYS = {"his": "his-key-0123456789", "desk-1": "desk-key-0123456789"}
LINE_KEYS = {"time", "request_id", "client", "caller", "action", "accessions", "study_uids", "patient_ids",
             "images", "bytes", "complete", "status", "code", "duration_ms", "stage", "format", "verified",
             "handed_to"}


def audit_lines(service):
    path = service.config.audit.path
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def app_for(service):
    return application.Application(service.config, service)


def test_a_download_is_a_begun_line_then_its_outcome_naming_the_patient_the_caller_and_the_client(
        make_service, wsgi_call, archive, caplog):
    service = make_service(auth={"enabled": True, "keys": KEYS},
                           server={"trusted_proxies": ["127.0.0.1", "10.1.0.0/16"]})
    response = wsgi_call(app_for(service), "/mkiso_multiple.php", query="accession_numbers=MR.180505.026,ACC1002",
                         headers={"X-API-Key": KEYS["desk-1"], "X-Forwarded-For": "192.0.2.7, 10.1.2.3"},
                         peer="127.0.0.1")
    assert response.status == 200, response.body
    [begun, line] = audit_lines(service)
    assert set(begun) == set(line) == LINE_KEYS
    assert (begun["stage"], line["stage"]) == ("begun", "ended")
    assert (begun["status"], begun["code"], begun["complete"], begun["bytes"]) == (None, None, None, 0)
    for same in ("time", "request_id", "client", "caller", "accessions", "study_uids", "patient_ids", "images"):
        assert begun[same] == line[same], same
    studies = archive.by_accession("MR.180505.026") + archive.by_accession("ACC1002")
    assert line["time"].endswith("Z") and line["time"][:2] == "20"
    assert line["request_id"] == response.header("X-Request-ID")
    assert line["client"] == "192.0.2.7"  # past both trusted proxies
    assert line["caller"] == "desk-1"
    assert (line["action"], line["accessions"]) == ("download", ["MR.180505.026", "ACC1002"])
    assert sorted(line["study_uids"]) == sorted(study.study_uid for study in studies)
    assert line["patient_ids"] == ["PAT-1001"]
    assert line["images"] == len(archive.sop_uids("MR.180505.026", "ACC1002"))
    assert line["bytes"] == len(response.body)
    assert (line["status"], line["code"]) == (200, None) and line["duration_ms"] >= 0
    assert begun["format"] == line["format"] == "iso"
    # read back once written: before the begun line, or (streamed) after it and before the last bytes
    assert begun["verified"] in (None, True) and line["verified"] is True
    assert stat.S_IMODE(os.stat(service.config.audit.path).st_mode) == 0o600
    assert "PAT-1001" not in caplog.text and "Müller" not in caplog.text  # identifiers only in the trail


def test_forwarded_for_from_an_untrusted_peer_is_ignored(make_service, wsgi_call):
    service = make_service()
    response = wsgi_call(app_for(service), "/api/iso/download", query="accession_number=ACC2001",
                         headers={"X-Forwarded-For": "10.9.9.9"}, peer="192.0.2.50")
    assert response.status == 200
    [_, line] = audit_lines(service)
    assert line["client"] == "192.0.2.50" and line["caller"] is None


@pytest.mark.parametrize("peer, forwarded, expected", [
    ("127.0.0.1", "", "127.0.0.1"),
    ("127.0.0.1", "192.0.2.1", "192.0.2.1"),
    ("127.0.0.1", "6.6.6.6, 192.0.2.1", "192.0.2.1"),  # the client wrote 6.6.6.6 itself: not believed
    ("127.0.0.1", "192.0.2.1, 10.0.0.5", "192.0.2.1"),  # through two trusted proxies
    ("127.0.0.1", "not-an-address", "127.0.0.1"),
    ("::1", "2001:db8::7", "2001:db8::7"),
    ("198.51.100.4", "192.0.2.1", "198.51.100.4"),  # not a trusted proxy
])
def test_client_address(peer, forwarded, expected):
    environ = {"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}
    assert audit.client_address(environ, ["127.0.0.1", "::1", "10.0.0.0/8"]) == expected


def test_failures_are_recorded_with_status_and_code(make_service, wsgi_call):
    service = make_service()
    response = wsgi_call(app_for(service), "/api/iso/download-multiple", query="accession_numbers=NOPE1,NOPE2")
    assert response.status == 404
    [line] = audit_lines(service)  # nothing left: no begun line
    assert (line["status"], line["code"], line["study_uids"], line["images"]) == (404, "study_not_found", [], 0)
    assert line["stage"] == "ended"
    assert line["accessions"] == ["NOPE1", "NOPE2"]


def test_refused_before_any_export_is_not_an_export(make_service, wsgi_call):
    """A bad parameter or a wrong key reach no patient data: no line."""
    service = make_service(auth={"enabled": True, "keys": KEYS})
    app = app_for(service)
    assert wsgi_call(app, "/api/iso/download", query="accession_number=A*",
                     headers={"X-API-Key": KEYS["his"]}).status == 400
    assert wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001",
                     headers={"X-API-Key": "wrong-key-0123456789"}).status == 401
    assert audit_lines(service) == []


def test_a_head_is_a_lookup_on_record(make_service, wsgi_call):
    """A HEAD builds no disc, but the PACS was asked and its answer shown (a multi-download's file name
    is the patient's): a query line, as /api/studies has (it had none)."""
    service = make_service()
    response = wsgi_call(app_for(service), "/api/iso/download-multiple", method="HEAD",
                         query="accession_numbers=ACC2001")
    assert response.status == 200 and "DOE_JANE" in response.header("Content-Disposition")
    [line] = audit_lines(service)
    assert (line["action"], line["stage"], line["status"], line["format"]) == ("query", "ended", 200, None)
    assert line["patient_ids"] == ["PAT-2001"] and line["bytes"] == 0


def test_each_fetch_of_a_jobs_disc_is_on_record(make_service, wsgi_call):
    """Whoever has a job's link gets its disc, as often as they like: each fetch has its lines, with
    its client and the bytes it got (the job's one line, written at ready, said neither)."""
    service = make_service()
    app = app_for(service)
    created = wsgi_call(app, "/api/jobs", method="POST", headers={"Content-Type": "application/json"},
                        body=json.dumps({"accessions": ["ACC2001"]}).encode())
    assert created.status == 202, created.body
    deadline = time.monotonic() + 60
    while (job := wsgi_call(app, created.header("Location")).json())["state"] != "ready":
        assert job["state"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.1)
    path, query = job["links"]["iso"].split("?")
    got = [wsgi_call(app, path, query=query, peer=peer, headers=headers)
           for peer, headers in (("10.66.0.1", {}), ("10.66.0.2", {"Range": "bytes=0-99"}))]
    assert [answer.status for answer in got] == [200, 206]
    fetches = [line for line in audit_lines(service) if line["request_id"] != job_request_id(service, job)]
    assert [(line["client"], line["stage"]) for line in fetches] == [
        ("10.66.0.1", "begun"), ("10.66.0.1", "ended"), ("10.66.0.2", "begun"), ("10.66.0.2", "ended")]
    assert [line["bytes"] for line in fetches if line["stage"] == "ended"] == [len(got[0].body), 100]
    assert all(line["patient_ids"] == ["PAT-2001"] and line["format"] == "iso" for line in fetches)


def job_request_id(service, job):
    return service.jobs.get(job["id"]).request_id


def test_a_line_the_full_disk_cut_short_is_taken_back(audit_mount):
    """A write the disk took only part of leaves no torn line: the next line, once there is room
    again, reads as JSON and mkiso-audit finds it (it was glued to the torn one)."""
    trail = audit.Audit(type("Config", (), {
        "audit": type("Audit", (), {"path": str(audit_mount / "audit.log"), "syslog": ""}),
        "receiver": type("Receiver", (), {"ae_title": "CDRECORD"})}))

    def export(number):
        return audit.Export("download", "req-%d" % number, "10.0.0.1", accessions=["ACC%d" % number])

    number = 100
    trail.record(export(number), 200)
    while os.path.getsize(audit_mount / "audit.log") % 4096 < 4096 - 250:  # the last page nearly full
        number += 1
        trail.record(export(number), 200)
    fill(audit_mount)
    with pytest.raises(errors.InsufficientStorage):
        trail.begin(export(2))
    os.unlink(audit_mount / "filler")  # IT makes room
    trail.record(export(3), 200)
    lines = (audit_mount / "audit.log").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["request_id"] for line in lines][-1] == "req-3"
    found = subprocess.run([sys.executable, "-m", "mkiso.audit", "--accession", "ACC3", str(audit_mount / "audit.log")],
                           capture_output=True, text=True, timeout=30)
    assert found.returncode == 0 and json.loads(found.stdout)["request_id"] == "req-3", found.stderr


def test_named_keys_and_the_unnamed_key(make_service, wsgi_call):
    service = make_service(auth={"enabled": True, "api_key": "the-old-single-key", "keys": KEYS})
    app = app_for(service)
    for key in ("the-old-single-key", KEYS["his"]):
        response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001", headers={"X-API-Key": key})
        assert response.status == 200
    assert [line["caller"] for line in audit_lines(service)] == [None, None, "his", "his"]


def test_a_print_is_a_begun_line_then_its_outcome(make_service, wsgi_call, archive, tmp_path):
    rimage = FakeRimage(str(tmp_path / "rimage"))
    try:
        service = make_service(publisher={"host": "127.0.0.1", "port": rimage.port})
        response = wsgi_call(app_for(service), "/send_rimage_multiple.php", query="accession_number=ACC2001")
    finally:
        rimage.stop()
    assert response.status == 200, response.body
    [begun, line] = audit_lines(service)
    assert (begun["stage"], begun["status"], begun["action"], begun["images"]) == ("begun", None, "print", 4)
    assert (line["action"], line["status"], line["patient_ids"]) == ("print", 200, ["PAT-2001"])
    assert line["format"] is None  # a print goes over DICOM, in no file format
    assert line["images"] == len(archive.sop_uids("ACC2001"))


@pytest.fixture
def audit_mount(tmp_path):
    """A tmpfs of its own for the trail, to fill or to remount read-only (root only)."""
    point = tmp_path / "trail"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(point)]).returncode:
        pytest.skip("a tmpfs cannot be mounted here (needs root)")
    yield point
    subprocess.run(["umount", str(point)], check=True)


def fill(point):
    subprocess.run(["dd", "if=/dev/zero", "of=%s" % (point / "filler"), "bs=4k"], capture_output=True)


@pytest.fixture
def full_audit_dir(audit_mount):
    """A folder on a tmpfs with no space left."""
    fill(audit_mount)
    return audit_mount


def test_no_disc_without_its_audit_line_disk_full(make_service, wsgi_call, full_audit_dir):
    service = make_service(audit={"path": str(full_audit_dir / "audit.log")})
    response = wsgi_call(app_for(service), "/api/iso/download", query="accession_number=ACC2001")
    assert response.status == 507, response.body[:200]
    assert response.json()["code"] == "audit_failed"
    assert "audit trail cannot be written" in response.json()["error"]
    # make_service checks that no job files are left behind


def test_no_disc_without_its_audit_line_unwritable(make_service, wsgi_call, tmp_path, caplog):
    service = make_service()
    os.mkdir(service.config.audit.path)  # the path turned into a folder: every write fails
    response = wsgi_call(app_for(service), "/api/iso/download", query="accession_number=ACC2001")
    assert (response.status, response.json()["code"]) == (500, "audit_failed")
    assert "cannot write the audit trail" in caplog.text


def test_no_disc_without_its_audit_line_behind_nginx(make_service, wsgi_call):
    """With X-Accel-Redirect the ISO would stay for nginx: it goes at once when the line fails."""
    service = make_service(server={"x_accel_prefix": "/internal/mkiso/"})
    os.mkdir(service.config.audit.path)
    response = wsgi_call(app_for(service), "/api/iso/download", query="accession_number=ACC2001")
    assert (response.status, response.json()["code"]) == (500, "audit_failed")
    assert response.header("X-Accel-Redirect") is None


def test_a_print_whose_trail_turned_read_only_relays_nothing(make_service, wsgi_call, audit_mount, tmp_path):
    """The print's begun line comes before its first image: a read-only trail stops it there (it relayed
    every image, then answered 500)."""
    rimage = FakeRimage(str(tmp_path / "rimage"))
    try:
        service = make_service(audit={"path": str(audit_mount / "audit.log")},
                               publisher={"host": "127.0.0.1", "port": rimage.port})
        subprocess.run(["mount", "-o", "remount,ro", str(audit_mount)], check=True)
        response = wsgi_call(app_for(service), "/api/iso/print", query="accession_number=ACC2001")
        sent = os.listdir(rimage.folder)
    finally:
        rimage.stop()
    assert (response.status, response.json()["code"]) == (500, "audit_failed"), response.body[:300]
    assert sent == []


def test_a_trail_filling_after_the_headers_keeps_the_begun_line(make_service, live_server, audit_mount, caplog):
    """The disk of the trail fills while the ISO goes out: its begun line is already on it (the whole ISO
    went out with no line)."""
    service = make_service(audit={"path": str(audit_mount / "audit.log")})
    base = live_server(app_for(service))
    with socket.create_connection(("127.0.0.1", port_of(base)), timeout=60) as client:
        client.sendall(b"GET /api/iso/download?accession_number=BIG01 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Connection: close\r\n\r\n")
        head, body = read_head(client)
        fill(audit_mount)
        while True:
            chunk = client.recv(1 << 16)
            if not chunk:
                break
            body += chunk
    assert b" 200 " in head.split(b"\r\n")[0]
    assert len(body) == int(header_of(head, b"content-length"))
    lines = audit_lines(service)
    assert lines and lines[0]["stage"] == "begun"
    assert lines[0]["request_id"] == header_of(head, b"x-request-id").decode()
    assert (lines[0]["accessions"], lines[0]["patient_ids"]) == (["BIG01"], ["PAT-4001"])


def header_of(head, name):
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
def test_a_server_killed_mid_download_leaves_its_begun_line(settings, tmp_path, signal_number):
    """SIGKILL or SIGTERM while the ISO goes out (6 MB had left with no line)."""
    settings["server"] = {"port": demo.free_port()}
    proc = start_server(write_config(tmp_path / "config.yaml", settings), settings["server"]["port"])
    try:
        with socket.create_connection(("127.0.0.1", settings["server"]["port"]), timeout=60) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            client.sendall(b"GET /api/iso/download?accession_number=BIG01 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head, body = read_head(client)
            while len(body) < 4096:
                body += client.recv(4096)
            proc.send_signal(signal_number)
            proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open(settings["audit"]["path"], encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle]
    assert lines and lines[0]["stage"] == "begun"
    assert lines[0]["request_id"] == header_of(head, b"x-request-id").decode()
    assert (lines[0]["action"], lines[0]["patient_ids"], lines[0]["images"]) == ("download", ["PAT-4001"], 20)


def test_a_server_stopped_mid_print_leaves_the_prints_lines(settings, tmp_path):
    """SIGTERM while a slow publisher takes the images (10 of 20 had gone with no line): the begun line,
    and the outcome once the shutdown stopped the print."""
    rimage = FakeRimage(str(tmp_path / "rimage"), "--sleep-during", "1")
    settings["server"] = {"port": demo.free_port()}
    settings["publisher"] = {"host": "127.0.0.1", "port": rimage.port}
    proc = start_server(write_config(tmp_path / "config.yaml", settings), settings["server"]["port"])
    answers = []
    try:
        url = "http://127.0.0.1:%d/api/iso/print?accession_number=BIG01" % settings["server"]["port"]
        printing = threading.Thread(target=lambda: answers.append(fetch(url)), daemon=True)
        printing.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not os.listdir(rimage.folder):
            time.sleep(0.05)
        assert os.listdir(rimage.folder), "the publisher got nothing"
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        printing.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rimage.stop()
    with open(settings["audit"]["path"], encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle]
    assert [(line["action"], line["stage"]) for line in lines] == [("print", "begun"), ("print", "ended")]
    assert lines[1]["status"] != 200 and lines[0]["request_id"] == lines[1]["request_id"]


def test_an_existing_trail_is_kept_private(make_service, wsgi_call):
    service = make_service()
    with open(service.config.audit.path, "w") as handle:
        handle.write("")
    os.chmod(service.config.audit.path, 0o644)
    assert wsgi_call(app_for(service), "/api/iso/download", query="accession_number=ACC2001").status == 200
    assert stat.S_IMODE(os.stat(service.config.audit.path).st_mode) == 0o600


# -- syslog --------------------------------------------------------------------


def parse_syslog(message, expected_event):
    """An RFC 5424 message with a DICOM audit message: check the frame, return the XML root."""
    text = message.decode("utf-8")
    header, body = text.split(" \ufeff", 1)
    pri_version, timestamp, hostname, app, procid, msgid, structured = header.split(" ")
    assert pri_version == "<85>1" and app == "mkiso" and msgid == "DICOM+RFC3881" and structured == "-"
    assert timestamp.endswith("Z") and procid == str(os.getpid())
    root = ET.fromstring(body)
    assert root.tag == "AuditMessage"
    event = root.find("EventIdentification/EventID")
    assert (event.get("csd-code"), event.get("codeSystemName")) == expected_event
    return root


def participants(root, type_code):
    return [item.get("ParticipantObjectID") for item in root.findall("ParticipantObjectIdentification")
            if item.get("ParticipantObjectTypeCode") == type_code]


def test_syslog_over_udp_carries_a_dicom_export_event(make_service, wsgi_call, archive):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)
        service = make_service(audit={"syslog": "udp://127.0.0.1:%d" % sock.getsockname()[1]},
                               auth={"keys": KEYS})
        response = wsgi_call(app_for(service), "/api/iso/download", query="accession_number=ACC2001",
                             headers={"X-API-Key": KEYS["his"]})
        assert response.status == 200
        root = parse_syslog(sock.recv(65536), ("110106", "DCM"))
    assert participants(root, "1") == ["PAT-2001"]
    assert participants(root, "2") == [study.study_uid for study in archive.by_accession("ACC2001")]
    requestor = [p for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert [(p.get("UserID"), p.get("NetworkAccessPointID")) for p in requestor] == [("his", "127.0.0.1")]
    roles = {p.find("RoleIDCode").get("csd-code") for p in root.findall("ActiveParticipant")}
    assert {"110153", "110154"} <= roles  # source and destination media
    assert root.find("EventIdentification").get("EventOutcomeIndicator") == "0"


def test_a_lookup_goes_to_syslog_as_a_query_event(make_service, wsgi_call):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)
        service = make_service(audit={"syslog": "udp://127.0.0.1:%d" % sock.getsockname()[1]})
        response = wsgi_call(app_for(service), "/api/studies", query="accession_numbers=ACC2001")
        assert response.status == 200
        root = parse_syslog(sock.recv(65536), ("110112", "DCM"))
    assert participants(root, "1") == ["PAT-2001"]
    pacs = "ABPACS@127.0.0.1:%d" % service.config.pacs.port
    assert pacs in [p.get("UserID") for p in root.findall("ActiveParticipant")]


def test_syslog_over_tcp_is_octet_counted_and_a_print_is_a_transfer(make_service, wsgi_call, tmp_path):
    received = []
    listener = socket.create_server(("127.0.0.1", 0))

    def accept():
        connection, _ = listener.accept()
        with connection:
            data = b""
            while chunk := connection.recv(65536):
                data += chunk
        received.append(data)

    thread = threading.Thread(target=accept)
    thread.start()
    rimage = FakeRimage(str(tmp_path / "rimage"))
    try:
        service = make_service(audit={"syslog": "tcp://127.0.0.1:%d" % listener.getsockname()[1]},
                               publisher={"host": "127.0.0.1", "port": rimage.port})
        assert wsgi_call(app_for(service), "/api/iso/print", query="accession_number=ACC2001").status == 200
        thread.join(10)
    finally:
        rimage.stop()
        listener.close()
    [frame] = received
    length, message = frame.split(b" ", 1)
    assert int(length) == len(message)
    root = parse_syslog(message, ("110104", "DCM"))
    destination = [p.get("UserID") for p in root.findall("ActiveParticipant")
                   if p.find("RoleIDCode").get("csd-code") == "110152"]
    assert destination == ["RIMAGE@127.0.0.1:%d" % rimage.port]


def test_a_syslog_that_is_down_costs_a_warning_not_the_export(make_service, wsgi_call, caplog):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    service = make_service(audit={"syslog": "tcp://127.0.0.1:%d" % port})
    assert wsgi_call(app_for(service), "/api/iso/download", query="accession_number=ACC2001").status == 200
    assert [line["stage"] for line in audit_lines(service)] == ["begun", "ended"]
    service.audit.syslog.stop()  # its flush: the copy goes out from the sender's own thread
    assert "audit event not sent to tcp://127.0.0.1:%d" % port in caplog.text


# -- the query command ---------------------------------------------------------


def test_who_exported_patient_x_between_two_dates(tmp_path):
    lines = [
        {"time": "2026-03-01T08:00:00.000Z", "patient_ids": ["P1"], "accessions": ["A1"], "caller": "his"},
        {"time": "2026-03-15T09:00:00.000Z", "patient_ids": ["P2"], "accessions": ["A2"], "caller": "desk"},
        {"time": "2026-03-31T23:59:59.000Z", "patient_ids": ["P1"], "accessions": ["A3"], "caller": "desk"},
        {"time": "2026-04-01T00:00:00.000Z", "patient_ids": ["P1"], "accessions": ["A4"], "caller": "his"},
    ]
    path = tmp_path / "audit.log"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines[2:]) + "garbage\n")
    with gzip.open(tmp_path / "audit.log.2.gz", "wt") as rotated:  # as logrotate leaves it
        rotated.write("".join(json.dumps(line) + "\n" for line in lines[:2]))

    def query(*args):
        return subprocess.run([sys.executable, "-m", "mkiso.audit"] + list(args)
                              + [str(tmp_path / "audit.log.2.gz"), str(path)],
                              capture_output=True, text=True, timeout=30)

    result = query("--patient", "P1", "--since", "2026-03-01", "--until", "2026-03-31")
    assert result.returncode == 0
    assert [json.loads(line)["accessions"] for line in result.stdout.splitlines()] == [["A1"], ["A3"]]
    assert "not an audit line" in result.stderr
    assert [json.loads(line)["accessions"] for line in query("--accession", "A4").stdout.splitlines()] == [["A4"]]
    assert query("--patient", "P9").returncode == 1
    bad = query("--since", "March")
    assert bad.returncode == 2 and "--since" in bad.stderr


@pytest.mark.parametrize("laid_out", [True, False], ids=["laid-out", "written"])
def test_a_streamed_disc_that_fails_its_read_back_is_cut_short_and_said_so(make_service, live_server, monkeypatch,
                                                                           caplog, laid_out):
    """A byte of the disc changed before its read-back (a failing disk): in the ISO genisoimage wrote,
    or in a staged image a laid-out ISO is sent from (``isoimage``).  Its last bytes never leave (the
    answer ends short, or is the 500 when it was done before the answer began), never a
    complete-looking bad disc, and the line says it was not verified."""
    service = make_service()
    read_back = service.steps.read_back
    if not laid_out:
        def written(*args, **kwargs):
            raise isoimage.NotLaidOut("the test has genisoimage write it")
        monkeypatch.setattr(isoimage, "lay_out", written)

    def damaged_then_read_back(job):
        assert (job.iso.archive is not None) == laid_out
        path = job.iso.path if not laid_out else next(
            os.path.join(folder, names[0]) for folder, _, names in sorted(os.walk(job.iso.tree))
            if names and "/DICOM/" in folder + "/")
        with open(path, "r+b") as handle:
            at = handle.read().rindex(b"DICM") + 100
            handle.seek(at)
            byte = handle.read(1)
            handle.seek(at)
            handle.write(bytes([byte[0] ^ 0xFF]))
        read_back(job)

    monkeypatch.setattr(service.steps, "read_back", damaged_then_read_back)
    assert_cut_short_as_unverified(service, live_server(app_for(service)), caplog)


def assert_cut_short_as_unverified(service, base, caplog):
    """A streamed download of BIG01 whose read-back fails: the answer ends short (or is the 500 when the
    check was done before it began), and its audit line says the disc was not verified."""
    with socket.create_connection(("127.0.0.1", port_of(base)), timeout=60) as client:
        client.sendall(b"GET /api/iso/download?accession_number=BIG01 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Connection: close\r\n\r\n")
        head, body = read_head(client)
        while chunk := client.recv(1 << 16):
            body += chunk
    if b" 200 " in head.split(b"\r\n")[0]:
        assert len(body) < int(header_of(head, b"content-length"))
    else:
        assert b" 500 " in head.split(b"\r\n")[0] and b"disc_check_failed" in body
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not [line for line in audit_lines(service) if line["stage"] == "ended"]:
        time.sleep(0.05)
    line = audit_lines(service)[-1]
    assert (line["stage"], line["verified"]) == ("ended", False)
    assert line["status"] == 500 or line["complete"] is False  # the 500, or the 200 cut short
    assert "read-back of disc 1: changed: DICOM/" in caplog.text


def test_a_zip_download_says_so_on_record(make_service, wsgi_call):
    """The format in the line; the ATNA message calls the medium a USB stick (CID 405)."""
    service = make_service()
    response = wsgi_call(app_for(service), "/api/iso/download", query="accession_number=ACC2001&format=zip")
    assert response.status == 200 and response.header("Content-Type") == "application/zip"
    assert [(line["stage"], line["format"]) for line in audit_lines(service)] == [("begun", "zip"), ("ended", "zip")]


def test_a_download_behind_nginx_that_failed_handed_nothing_over(make_service, wsgi_call):
    """Only a disc mkiso handed to nginx is said to be nginx's to send; a failure is mkiso's own answer."""
    service = make_service(server={"x_accel_prefix": "/internal/mkiso/"})
    response = wsgi_call(app_for(service), "/api/iso/download", query="accession_number=NOSUCH1")
    assert response.status == 404
    [line] = audit_lines(service)
    assert (line["status"], line["code"], line["handed_to"]) == (404, "study_not_found", None)
