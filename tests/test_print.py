"""Print: every image relayed to a real storescp playing the Rimage publisher."""

import json
import os
import signal
import subprocess
import time

import pydicom
import pytest

from mkiso import demo
from mkiso.dicom import publisher
from mkiso.http import application
from conftest import DCMTK_DIR


class FakeRimage:
    """A real storescp with AE title RIMAGE on a free loopback port."""

    def __init__(self, folder, *options):
        self.folder = folder
        self.port = demo.free_port()
        os.makedirs(folder, exist_ok=True)
        self.proc = subprocess.Popen(
            [os.path.join(DCMTK_DIR, "storescp"), "-aet", "RIMAGE", "-od", folder] + list(options) + [str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, TCP_NODELAY="1"),
            start_new_session=True)
        assert demo.wait_for_port(self.port)

    def received_sop_uids(self):
        return {str(pydicom.dcmread(os.path.join(self.folder, name), stop_before_pixels=True).SOPInstanceUID)
                for name in os.listdir(self.folder)}

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def rimage(tmp_path):
    publisher_scp = FakeRimage(str(tmp_path / "rimage"))
    yield publisher_scp
    publisher_scp.stop()


def print_app(make_service, port, ae_title="RIMAGE", **overrides):
    service = make_service(publisher={"host": "127.0.0.1", "port": port, "ae_title": ae_title}, **overrides)
    return application.Application(service.config, service)


def test_print_one_accession(make_service, rimage, wsgi_call, archive):
    app = print_app(make_service, rimage.port)
    response = wsgi_call(app, "/api/iso/print", query="accession_number=ACC2001")
    assert response.status == 200, response.body
    assert response.json() == {"status": "sent", "accessions": ["ACC2001"], "studies": 1,
                               "instances": len(archive.sop_uids("ACC2001")), "discs": 1, "media": "dvd"}
    assert rimage.received_sop_uids() == archive.sop_uids("ACC2001")
    ended = [json.loads(text) for text in open(app.service.config.audit.path, encoding="utf-8")][-1]
    assert (ended["stage"], ended["verified"]) == ("ended", True), ended


def test_print_two_accessions_of_one_patient(make_service, rimage, wsgi_call, archive):
    response = wsgi_call(print_app(make_service, rimage.port), "/api/iso/print",
                         query="accession_number=MR.180505.026,ACC1002")
    assert response.status == 200, response.body
    body = response.json()
    assert body["accessions"] == ["MR.180505.026", "ACC1002"] and body["studies"] == 2
    assert rimage.received_sop_uids() == archive.sop_uids("MR.180505.026", "ACC1002")
    assert body["instances"] == len(rimage.received_sop_uids())


def test_legacy_send_rimage_multiple_behaves_the_same(make_service, rimage, wsgi_call, archive):
    response = wsgi_call(print_app(make_service, rimage.port), "/send_rimage_multiple.php",
                         query="accession_number=DUP01")
    assert response.status == 200 and response.json()["studies"] == 2
    assert rimage.received_sop_uids() == archive.sop_uids("DUP01")


def test_an_image_changed_after_its_checks_is_never_relayed(make_service, rimage, wsgi_call, archive):
    """The fault: one received image's pixel data changes on the gateway's disk between the checks of its
    arrival and the relay (a bad disk, a stray writer). The print checks every file against the SHA-256
    it had when it arrived: 500 image_check_failed, and the publisher gets none of the images."""
    app = print_app(make_service, rimage.port)
    real_send = app.service.publisher.send
    damaged = []

    def damage_then_send(files, folder, *check):
        with open(files[-1].path, "r+b") as handle:
            handle.seek(-10, os.SEEK_END)
            byte = handle.read(1)
            handle.seek(-10, os.SEEK_END)
            handle.write(bytes((byte[0] ^ 0xFF,)))
        damaged.append(files[-1].path)
        return real_send(files, folder, *check)

    app.service.publisher.send = damage_then_send
    response = wsgi_call(app, "/api/iso/print", query="accession_number=ACC2001")
    assert damaged
    assert response.status == 500, response.body
    body = response.json()
    assert body["code"] == "image_check_failed"
    count = len(archive.sop_uids("ACC2001"))
    assert body["error"] == ("1 of these %d images changed on the gateway's disk after they arrived and were "
                             "checked; none of them was sent. 0 of %d images had been accepted before."
                             % (count, count)), body
    assert os.listdir(rimage.folder) == []
    (line,) = [json.loads(text) for text in open(app.service.config.audit.path, encoding="utf-8")
               if json.loads(text)["stage"] == "ended"]
    assert (line["action"], line["status"], line["code"], line["verified"], line["images"]) == (
        "print", 500, "image_check_failed", False, count), line


def test_print_two_patients_is_409_and_nothing_is_sent(make_service, rimage, wsgi_call):
    response = wsgi_call(print_app(make_service, rimage.port), "/api/iso/print",
                         query="accession_number=ACC2001,ACC3001")
    assert response.status == 409
    assert os.listdir(rimage.folder) == []


def test_print_bad_input_is_400(make_service, rimage, wsgi_call):
    app = print_app(make_service, rimage.port)
    for query in ("", "accession_number=*", "accession_number=A%0A", "accession_number=" + "9" * 17):
        assert wsgi_call(app, "/api/iso/print", query=query).status == 400


def test_publisher_not_configured_is_503(make_service, wsgi_call):
    service = make_service()
    response = wsgi_call(application.Application(service.config, service), "/api/iso/print",
                         query="accession_number=ACC2001")
    assert response.status == 503
    assert response.json()["code"] == "publisher_not_configured"
    assert "publisher.host" in response.json()["error"]


def test_publisher_down_is_502(make_service, wsgi_call):
    response = wsgi_call(print_app(make_service, demo.free_port()), "/api/iso/print", query="accession_number=ACC2001")
    assert response.status == 502
    body = response.json()
    assert body["code"] == "publisher_failed" and "Connection refused" in body["error"]
    assert "0 of %d images had been accepted" % 4 in body["error"]


def test_publisher_rejecting_our_called_ae_is_502(make_service, wsgi_call, archive):
    # the PACS' dcmqrscp knows only its own AE title and rejects RIMAGE
    response = wsgi_call(print_app(make_service, archive.pacs.port), "/api/iso/print",
                         query="accession_number=ACC2001")
    assert response.status == 502
    assert "association rejected: Called AE Title Not Recognized" in response.json()["error"]


def test_publisher_refusing_associations_is_502(make_service, tmp_path, wsgi_call):
    refusing = FakeRimage(str(tmp_path / "refusing"), "--refuse")
    try:
        response = wsgi_call(print_app(make_service, refusing.port), "/api/iso/print",
                             query="accession_number=ACC2001")
    finally:
        refusing.stop()
    assert response.status == 502 and response.json()["code"] == "publisher_failed"


def test_silent_publisher_is_504_within_the_timeout(make_service, settings, silent_listener, wsgi_call):
    settings["timeouts"]["find_s"] = 2
    app = print_app(make_service, silent_listener.getsockname()[1])
    started = time.monotonic()
    response = wsgi_call(app, "/api/iso/print", query="accession_number=ACC2001")
    assert response.status == 504, response.body
    assert time.monotonic() - started < 2 + 10


def test_store_report_counts_refused_images():
    output = (
        "I: Sending file: /a\nI: Received Store Response (Success)\n"
        "I: Sending file: /b\nI: Received Store Response (Warning: Coercion of Data Elements)\n"
        "I: Sending file: /c\nI: Received Store Response (Error: Out of Resources)\n"
        "I: Sending file: /d\n"
    )
    report = publisher.StoreReport()
    for line in output.splitlines():
        report.feed(line)
    assert (report.attempted, report.accepted) == (4, 2)


CT_ONLY_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[CTOnly]
PresentationContext1 = CTImageStorage\\Uncompressed

[[Profiles]]
[CTProfile]
PresentationContexts = CTOnly
"""


def test_publisher_accepting_only_some_images_is_502_naming_how_many(make_service, tmp_path, wsgi_call, archive):
    profile = tmp_path / "ct-only.cfg"
    profile.write_text(CT_ONLY_PROFILE)
    ct_only = FakeRimage(str(tmp_path / "ct-only"), "-xf", str(profile), "CTProfile")
    try:
        response = wsgi_call(print_app(make_service, ct_only.port), "/api/iso/print",
                             query="accession_number=ACC1002,MR.180505.026")
        received = ct_only.received_sop_uids()
    finally:
        ct_only.stop()
    assert response.status == 502, response.body
    assert received == archive.sop_uids("ACC1002")  # the CT study only
    expected = "Publisher RIMAGE@127.0.0.1:%d accepted 2 of 7 images; 5 were refused or not sent."
    assert response.json()["error"].startswith(expected % ct_only.port)
