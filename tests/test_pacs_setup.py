"""The PACS's side of the setup, as an admin gets it wrong on the first day, against real PACSes.

Debian's Orthanc set up as a hospital's is (C-ECHO open to anyone, C-FIND
and C-MOVE only for the modalities on file) and dcmqrscp with its host
table: mkiso's calling AE title unknown to the PACS, the C-MOVE destination
unknown, or on file with a port that is closed or never answers.  Each is
told by its cause, with its fix, in the download's error and in health.
"""

import json
import logging
import shutil
import socket
import urllib.request

import pytest

from mkiso import demo
from mkiso.config import DCMTK_TOOLS
from mkiso.http import application
from conftest import DCMTK_DIR

STUDY = demo.SampleStudy("PAT-7001", "SETUP^DAY", "DAY1", series=(2,))


def orthanc(tmp_path_factory, **settings):
    if not shutil.which("Orthanc"):
        pytest.skip("Debian's orthanc is not installed (scripts/setup installs it)")
    pacs = demo.Orthanc(str(tmp_path_factory.mktemp("orthanc")), {},
                        dict({"DicomScuTimeout": 2, "DicomAlwaysAllowStore": True}, **settings))
    pacs.start()
    source = tmp_path_factory.mktemp("source")
    demo.write_study(STUDY, str(source))
    pacs.load(str(source), STUDY.image_count)
    return pacs


@pytest.fixture(scope="module")
def hospital_orthanc(tmp_path_factory):
    """Orthanc as a hospital runs it: C-ECHO for anyone, C-FIND and C-MOVE for its modalities only."""
    pacs = orthanc(tmp_path_factory, DicomAlwaysAllowEcho=True, DicomAlwaysAllowFind=False,
                   DicomAlwaysAllowMove=False, DicomAlwaysAllowGet=False)
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def open_orthanc(tmp_path_factory):
    """Orthanc that answers any caller's C-FIND and C-MOVE: only the destination is looked up."""
    pacs = orthanc(tmp_path_factory)
    yield pacs
    pacs.stop()


def modality(pacs, port):
    """Put CDRECORD on file in Orthanc at 127.0.0.1:``port`` (None: take it off), as its admin would."""
    url = pacs.http + "/modalities/cdrecord"
    if port is None:
        request = urllib.request.Request(url, method="DELETE")
    else:
        body = json.dumps({"AET": "CDRECORD", "Host": "127.0.0.1", "Port": port}).encode()
        request = urllib.request.Request(url, data=body, method="PUT")
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError as exc:
        if not (port is None and exc.code == 404):
            raise


@pytest.fixture
def dcmqrscp(tmp_path):
    """A dcmqrscp holding STUDY, its host table given by the test (``start(destinations)``)."""
    started = []

    def start(destinations):
        pacs = demo.Dcmqrscp(str(tmp_path / "pacs"), demo.free_port(), destinations, dcmtk_dir=DCMTK_DIR)
        pacs.add_studies([STUDY])
        pacs.start()
        started.append(pacs)
        return pacs

    yield start
    for pacs in started:
        pacs.stop()


def against(settings, pacs):
    settings["pacs"] = {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}
    settings["timeouts"]["move_s"] = 30


def download(wsgi_call, service):
    return wsgi_call(application.Application(service.config, service), "/api/iso/download",
                     query="accession_number=DAY1")


def pacs_check(wsgi_call, service):
    app = application.Application(service.config, service)
    service.health._expensive = None  # not the report of 5 s ago
    response = wsgi_call(app, "/api/health", query="strict=1")
    return response.status, response.json()["checks"]["pacs"]


def test_a_calling_ae_the_pacs_does_not_know_shows_in_health_and_in_the_error(
        hospital_orthanc, settings, make_service, wsgi_call, caplog):
    """Orthanc answers C-ECHO from anyone: before, health said ok and every download was a 502 whose
    findscu dump was cut before its cause."""
    modality(hospital_orthanc, None)
    against(settings, hospital_orthanc)
    service = make_service()
    status, check = pacs_check(wsgi_call, service)
    assert status == 503 and check["ok"] is False, check
    peer = "PACS ORTHANC@127.0.0.1:%d" % hospital_orthanc.port
    assert check["detail"].startswith("C-ECHO to %s succeeded, but C-FIND to %s failed: the PACS turned away "
                                      "mkiso's calling AE title CDRECORD (" % (peer, peer)), check
    assert check["detail"].endswith("(0006:0317 Peer aborted Association (or never connected)): register AE title "
                                    "CDRECORD (this host, %s) in the PACS" % socket.gethostname()), check
    with caplog.at_level(logging.WARNING):
        response = download(wsgi_call, service)
    body = response.json()
    assert response.status == 502 and body["code"] == "pacs_unknown_ae", body
    assert "0006:0317 Peer aborted Association" in body["error"] and "register AE title CDRECORD" in body["error"]
    [logged] = [record for record in caplog.records if getattr(record, "fields", {}).get("tool_output")]
    whole = logged.fields["tool_output"]  # the tool's whole message: the query it dumped, and the cause after it
    assert "Find Failed, query keys:" in whole and "(0008,0050) SH [DAY1]" in whole
    assert whole.index("(0008,0050)") < whole.index("0006:0317 Peer aborted Association")


def test_once_the_pacs_knows_the_calling_ae_health_is_ok_and_the_disc_comes(
        hospital_orthanc, settings, make_service, wsgi_call, receiver_port):
    modality(hospital_orthanc, receiver_port)
    against(settings, hospital_orthanc)
    service = make_service()
    status, check = pacs_check(wsgi_call, service)
    assert status == 200 and check["ok"] is True, check
    assert "C-FIND to PACS ORTHANC@127.0.0.1:%d answered" % hospital_orthanc.port in check["detail"]
    response = download(wsgi_call, service)
    assert response.status == 200, response.body[:300]


def unreachable(port):
    return ("and no association of it reached the receiver: the PACS could not reach port %d on this host: "
            "firewall, or the PACS's entry for CDRECORD (it must be AE CDRECORD at %s:%d)."
            % (port, socket.gethostname(), port))


@pytest.mark.parametrize("where", ["not on file", "a closed port", "a port that never answers"])
def test_orthanc_that_cannot_send_to_the_receiver(open_orthanc, settings, make_service, wsgi_call,
                                                  silent_listener, receiver_port, where):
    """Orthanc answers all three with a bare "Failed: Unable to process", no counts: before, each was an
    incomplete_study; now the receiver's side tells that nothing of the PACS reached it, and health keeps it
    until a C-MOVE succeeds."""
    modality(open_orthanc, {"not on file": None, "a closed port": demo.free_port(),
                            "a port that never answers": silent_listener.getsockname()[1]}[where])
    against(settings, open_orthanc)
    service = make_service()
    response = download(wsgi_call, service)
    body = response.json()
    assert response.status == 502 and body["code"] == "receiver_unreachable", body
    assert "answered Failed: Unable to process, " + unreachable(receiver_port) in body["error"], body
    status, check = pacs_check(wsgi_call, service)
    assert status == 503 and "but the last C-MOVE (" in check["detail"], check
    assert unreachable(receiver_port) in check["detail"]
    modality(open_orthanc, receiver_port)  # the admin puts it right
    assert download(wsgi_call, service).status == 200
    status, check = pacs_check(wsgi_call, service)
    assert status == 200 and check["ok"] is True, check


def test_dcmqrscp_that_does_not_know_the_destination(dcmqrscp, settings, make_service, wsgi_call, receiver_port):
    """dcmqrscp says so itself (0xA801): before, that too was an incomplete_study."""
    against(settings, dcmqrscp({}))
    service = make_service()
    body = download(wsgi_call, service).json()
    assert body["code"] == "move_destination_unknown", body
    assert body["error"].endswith("does not know the destination CDRECORD (Refused: Move Destination unknown): "
                                  "register AE CDRECORD at %s:%d in the PACS." % (socket.gethostname(), receiver_port))
    status, check = pacs_check(wsgi_call, service)
    assert status == 503 and body["error"] in check["detail"]


def test_dcmqrscp_with_the_destination_at_a_closed_port(dcmqrscp, settings, make_service, wsgi_call, receiver_port):
    against(settings, dcmqrscp({"CDRECORD": demo.free_port()}))
    body = download(wsgi_call, make_service()).json()
    assert body["code"] == "receiver_unreachable", body
    assert "answered Refused: Out of resources - Unable to perform sub-operations, " + unreachable(receiver_port) \
        in body["error"], body


def test_a_failed_move_the_receiver_saw_is_still_an_incomplete_study(dcmqrscp, settings, make_service, wsgi_call,
                                                                     tmp_path):
    """The receiver's count tells the PACS reached it: a storescp that refuses every image (a receiver
    whose tool fails) leaves the move failed with associations seen, and that is no setup fault."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in DCMTK_TOOLS:
        if name != "storescp":
            (tools / name).symlink_to(shutil.which(name))
    (tools / "storescp").write_text('#!/bin/sh\nexec %s --refuse "$@"\n' % shutil.which("storescp"))
    (tools / "storescp").chmod(0o755)
    against(settings, dcmqrscp({"CDRECORD": settings["receiver"]["port"]}))
    settings["tools"]["dcmtk_dir"] = str(tools)
    service = make_service()
    body = download(wsgi_call, service).json()
    assert body["code"] == "incomplete_study", body
    assert service.receiver.requested >= 1
