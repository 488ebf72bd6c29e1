"""The ATNA copy of the audit trail on its own, without a service: the syslog frame, the DICOM
audit message of each event, and the sending over UDP and TCP to sockets the test holds on 127.0.0.1:
a repository that works gets every event in order, one that swallows connections costs the caller
nothing, and what could not go is counted and logged.

A central audit repository parses these messages by the standards (RFC 5424,
RFC 6587, DICOM PS3.15 A.5); a field out of place is an event it drops.
"""

import datetime
import logging
import os
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET

import pytest

from mkiso import atna, audit, config as configuration, demo
from mkiso.dicom import pacs

WHEN = datetime.datetime(2026, 3, 1, 8, 0, 0, 250000, tzinfo=datetime.timezone.utc)
STUDIES = [
    pacs.Study("ACC2", "1.2.3.2", "PAT-2", "ROE^JANE"),
    pacs.Study("ACC1", "1.2.3.1", "PAT-1", "MÜLLER^JÖRG"),
    pacs.Study("ACC3", "1.2.3.3", "PAT-1", "MÜLLER^JÖRG"),
]
DESTINATIONS = {"download": "", "print": "RIMAGE@10.0.0.5:104", "query": "ABPACS@10.0.0.9:104"}


def event(action="download", status=200, code=None, caller="his", studies=STUDIES, **medium):
    """(entry, export) of one audit event, as the audit trail hands them to the sender; ``medium``: a
    download's format and iso.media."""
    export = audit.Export(action, "req-7", "10.1.2.3", caller=caller, time=WHEN,
                          destination=DESTINATIONS[action], studies=list(studies), **medium)
    export.accessions = [study.accession for study in studies]
    return export.entry(status, code), export


def parse(entry, export):
    """The audit message's XML root, read back by a strict parser."""
    return ET.fromstring(atna.audit_message(entry, export, "CDRECORD"))


def participants(root, requestor):
    return [item for item in root.findall("ActiveParticipant") if item.get("UserIsRequestor") == requestor]


def role(item):
    return item.find("RoleIDCode").get("csd-code")


# -- the syslog message ----------------------------------------------------------


def test_the_header_is_rfc5424_with_pri_authpriv_notice():
    """<85>: facility authpriv (10) and severity notice (5); then version 1, the event's own time,
    this host, app name, process ID, the message ID of DICOM audit messages and no structured data."""
    message = atna.syslog_message(*event(), "CDRECORD")
    header = message.split(b" \xef\xbb\xbf", 1)[0].decode("ascii")
    assert header == "<85>1 2026-03-01T08:00:00.250Z %s mkiso %d DICOM+RFC3881 -" % (
        socket.gethostname(), os.getpid())


def test_the_body_is_the_audit_message_as_utf8_behind_a_bom():
    """RFC 5424 MSG-UTF8: a BOM says the body is UTF-8, and a patient's name keeps its letters."""
    entry, export = event()
    message = atna.syslog_message(entry, export, "CDRECORD")
    header, body = message.split(b" ", 7)[6:]
    assert header == b"-"
    assert body.startswith(b"\xef\xbb\xbf<AuditMessage>")
    assert body[3:].decode("utf-8") == atna.audit_message(entry, export, "CDRECORD")
    assert "MÜLLER^JÖRG".encode("utf-8") in body


# -- the DICOM audit message -----------------------------------------------------


@pytest.mark.parametrize("action, event_id, name, action_code, destination_role", [
    ("download", "110106", "Export", "R", "110154"),  # the images leave on a medium
    ("print", "110104", "DICOM Instances Transferred", "R", "110152"),  # to the publisher over DICOM
    ("query", "110112", "Query", "E", "110152"),  # the PACS was asked
])
def test_each_action_is_its_dicom_event(action, event_id, name, action_code, destination_role):
    root = parse(*event(action))
    identification = root.find("EventIdentification")
    assert identification.get("EventActionCode") == action_code
    assert identification.get("EventDateTime") == "2026-03-01T08:00:00.250Z"
    code = identification.find("EventID")
    assert (code.get("csd-code"), code.get("codeSystemName"), code.get("originalText")) == (event_id, "DCM", name)
    others = participants(root, "false")
    assert [role(item) for item in others] == ["110153", destination_role]
    assert others[0].get("UserID") == "CDRECORD"
    assert others[0].get("AlternativeUserID") == str(os.getpid())
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "CDRECORD"


@pytest.mark.parametrize("medium, media_type", [
    ({"format": "iso", "media": "dvd"}, ("110033", "DVD")),
    ({"format": "iso", "media": "cd"}, ("110032", "CD")),
    ({"format": "iso", "media": "bd"}, ("110033", "DVD")),  # CID 405 has no Blu-ray: DVD-formatted media
    ({"format": "zip", "media": "cd"}, ("110030", "USB Disk Emulation")),  # a ZIP is for a USB stick
])
def test_a_download_names_its_medium_and_a_transfer_its_destination(medium, media_type):
    """The media type from DICOM CID 405: what the download was made for."""
    destination = participants(parse(*event("download", **medium)), "false")[1]
    assert destination.get("UserID") == "req-7"
    found = destination.find("MediaIdentifier/MediaType")
    assert (found.get("csd-code"), found.get("originalText")) == media_type
    for action in ("print", "query"):
        destination = participants(parse(*event(action)), "false")[1]
        assert destination.get("UserID") == DESTINATIONS[action]
        assert destination.find("MediaIdentifier") is None


@pytest.mark.parametrize("status, code, indicator", [
    (200, None, "0"),  # success
    (404, "not_found", "4"),  # minor failure: the client's request
    (409, "multiple_patients", "4"),
    (502, "upstream_failed", "8"),  # serious failure: ours or the PACS's
    (507, "insufficient_storage", "8"),
])
def test_the_outcome_says_who_failed_and_why(status, code, indicator):
    identification = parse(*event(status=status, code=code)).find("EventIdentification")
    assert identification.get("EventOutcomeIndicator") == indicator
    assert identification.findtext("EventOutcomeDescription") == code  # None: no description at all


@pytest.mark.parametrize("caller, user_id", [("his", "his"), (None, "unknown")])
def test_the_requestor_is_the_caller_at_its_address(caller, user_id):
    [requestor] = participants(parse(*event(caller=caller)), "true")
    assert (requestor.get("UserID"), requestor.get("NetworkAccessPointID")) == (user_id, "10.1.2.3")
    assert requestor.get("NetworkAccessPointTypeCode") == "2"  # an IP address
    assert role(requestor) == "110150"


def test_every_study_and_each_patient_once_are_participant_objects():
    """The repository answers "who saw patient X" from these: each patient once, however many studies."""
    objects = parse(*event()).findall("ParticipantObjectIdentification")
    studies = [(item.get("ParticipantObjectID"), item.find("Accession").get("Number")) for item in objects
               if item.get("ParticipantObjectTypeCode") == "2"]
    assert studies == [("1.2.3.2", "ACC2"), ("1.2.3.1", "ACC1"), ("1.2.3.3", "ACC3")]
    patients = [(item.get("ParticipantObjectID"), item.findtext("ParticipantObjectName")) for item in objects
                if item.get("ParticipantObjectTypeCode") == "1"]
    assert patients == [("PAT-1", "MÜLLER^JÖRG"), ("PAT-2", "ROE^JANE")]


def test_a_lookup_that_found_nothing_names_no_patient():
    objects = parse(*event("query", status=404, code="not_found", studies=[])).findall(
        "ParticipantObjectIdentification")
    assert objects == []


HOSTILE = "A\x00B\x01C\x1b[2J\x7fD\ud800E\ufffeF"
MADE_VALID = "A\ufffdB\ufffdC\ufffd[2J\x7fD\ufffdE\ufffdF"  # DEL is allowed in XML 1.0


@pytest.mark.parametrize("where, read", [
    ("name", lambda root: root.findtext("ParticipantObjectIdentification[@ParticipantObjectTypeCode='1']/"
                                        "ParticipantObjectName")),
    ("patient_id", lambda root: root.find("ParticipantObjectIdentification[@ParticipantObjectTypeCode='1']").get(
        "ParticipantObjectID")),
    ("accession", lambda root: root.find("ParticipantObjectIdentification/Accession").get("Number")),
    ("caller", lambda root: participants(root, "true")[0].get("UserID")),
])
def test_characters_xml_cannot_hold_are_replaced_wherever_they_come(where, read):
    """A PACS may send anything in a name or ID; the message must still parse, not lose the event."""
    study = pacs.Study(HOSTILE if where == "accession" else "ACC1", "1.2.3",
                       HOSTILE if where == "patient_id" else "PAT-1", HOSTILE if where == "name" else "DOE^JOHN")
    entry, export = event(caller=HOSTILE if where == "caller" else "his", studies=[study])
    message = atna.syslog_message(entry, export, "CDRECORD")
    root = ET.fromstring(message.split(b" \xef\xbb\xbf", 1)[1])
    assert read(root) == MADE_VALID


def test_what_xml_can_hold_is_kept():
    study = pacs.Study("ACC1", "1.2.3", "PAT-1", "DOE\tJOHN\n<&> \"'\U0001F600\uffe0")
    assert parse(*event(studies=[study])).findtext(".//ParticipantObjectName") == study.patient_name


# -- sending ---------------------------------------------------------------------


class Blackhole:
    """A TCP port on 127.0.0.1 that swallows connections, as a repository behind a dropping firewall or a
    hung one does: it listens with a full backlog and never accepts, so the kernel drops each new SYN
    and a connect waits for its whole timeout."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.fillers = []
        for _ in range(10):
            filler = socket.socket()
            filler.settimeout(0.5)
            try:
                filler.connect(self.listener.getsockname())
            except TimeoutError:
                filler.close()
                break
            self.fillers.append(filler)
        else:
            raise RuntimeError("the backlog never filled")
        self.url = "tcp://127.0.0.1:%d" % self.listener.getsockname()[1]

    def close(self):
        for sock in self.fillers + [self.listener]:
            sock.close()


@pytest.fixture
def blackhole():
    hole = Blackhole()
    yield hole
    hole.close()


@pytest.fixture
def sender():
    """A started Syslog for a URL (and queue size); stopped, with a flush, after the test."""
    started = []

    def start(url, **kwargs):
        syslog = atna.Syslog(url, "CDRECORD", **kwargs)
        syslog.start()
        started.append(syslog)
        return syslog

    yield start
    for syslog in started:
        syslog.stop()


def wait_for(condition, timeout=15):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_over_udp_one_datagram_is_one_message(sender):
    entry, export = event()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(10)
        sender("udp://127.0.0.1:%d" % receiver.getsockname()[1]).send(entry, export)
        datagram = receiver.recv(65536)
    assert datagram == atna.syslog_message(entry, export, "CDRECORD")


def tcp_repository(listener, count):
    """A repository reading ``count`` connections one after the other; returns what each carried."""
    received = []

    def accept():
        for _ in range(count):
            connection, _ = listener.accept()
            with connection:
                received.append(read_all(connection))

    thread = threading.Thread(target=accept)
    thread.start()
    return received, thread


def read_all(connection):
    return b"".join(iter(lambda: connection.recv(65536), b""))


def test_over_tcp_the_message_is_octet_counted(sender):
    """RFC 6587: the length in decimal, a space, then exactly that many octets (no newline)."""
    entry, export = event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        received, thread = tcp_repository(listener, 1)
        sender("tcp://127.0.0.1:%d" % listener.getsockname()[1]).send(entry, export)
        thread.join(10)
    message = atna.syslog_message(entry, export, "CDRECORD")
    assert received == [b"%d " % len(message) + message]


def test_events_reach_a_working_repository_all_and_in_order(sender):
    """The queue changes when a message leaves, never which leave or in what order."""
    events = []
    for number in range(30):
        entry, export = event(action=("download", "print", "query")[number % 3])
        entry["request_id"] = export.request_id = "req-%d" % number
        events.append((entry, export))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        received, thread = tcp_repository(listener, len(events))
        syslog = sender("tcp://127.0.0.1:%d" % listener.getsockname()[1])
        for entry, export in events:
            syslog.send(entry, export)
        thread.join(20)
        syslog.stop(flush_s=10)
    messages = [atna.syslog_message(entry, export, "CDRECORD") for entry, export in events]
    assert received == [b"%d " % len(message) + message for message in messages]
    state = syslog.state()
    assert (state.sent, state.failed, state.dropped, state.queued, state.lost_at) == (30, 0, 0, 0, None)


def test_a_blackholed_repository_costs_the_caller_nothing_and_what_is_lost_is_counted(sender, blackhole, caplog):
    """``send`` only queues: with the sender stuck connecting for TIMEOUT_S, events wait up to the
    queue's size, the others are dropped at once, each with a warning naming its request; shutdown gives
    the stuck sender FLUSH_S, not its timeout, and drops what is still queued."""
    syslog = sender(blackhole.url, max_queued=2)
    caplog.set_level(logging.WARNING, logger="mkiso.atna")
    entry, export = event()
    syslog.send(entry, export)
    assert wait_for(lambda: syslog.state().queued == 0)  # the sender took it and waits for the connection
    for number in range(1, 5):
        entry["request_id"] = "req-%d" % number
        syslog.send(entry, export)
    state = syslog.state()
    assert (state.sent, state.failed, state.dropped, state.queued, state.running) == (0, 0, 2, 2, True)
    assert state.lost_why == "dropped: the queue is full (2 waiting)"
    dropped = [record.fields["request_id"] for record in caplog.records]
    assert dropped == ["req-3", "req-4"]
    assert caplog.records[0].getMessage() == (
        "audit event not sent to %s (dropped): the queue is full (2 waiting)" % blackhole.url)

    started = time.monotonic()
    syslog.stop(flush_s=0.5)
    assert time.monotonic() - started < atna.TIMEOUT_S  # the stuck connection is not waited for
    assert syslog.state().dropped == 4
    assert [record.fields["request_id"] for record in caplog.records][2:] == ["req-1", "req-2"]
    assert wait_for(lambda: syslog.state().failed == 1)  # the stuck one: its connect timed out
    assert syslog.state().lost_why == "failed: timed out"
    syslog.send(entry, export)  # after stop: dropped, said why
    assert syslog.state().dropped == 5 and syslog.state().lost_why == "dropped: the service is stopping"


@pytest.mark.parametrize("url, tcp, address", [
    ("udp://127.0.0.1:514", False, ("127.0.0.1", 514)),
    ("tcp://audit.example.org:6514", True, ("audit.example.org", 6514)),
    ("tcp://[2001:db8::1]:6514", True, ("2001:db8::1", 6514)),
])
def test_the_url_gives_transport_and_address(url, tcp, address):
    sender = atna.Syslog(url, "CDRECORD")
    assert (sender.tcp, sender.address, sender.url) == (tcp, address, url)


def test_a_repository_that_is_down_costs_a_warning_not_an_exception(sender, caplog):
    """The audit file is the record; the export must not fail because the copy could not go out."""
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: the connection is refused
    with caplog.at_level(logging.WARNING, logger="mkiso.atna"):
        syslog = sender("tcp://127.0.0.1:%d" % port)
        syslog.send(*event())
        syslog.stop()
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "audit event not sent to tcp://127.0.0.1:%d (failed): Connection refused" % port
    assert record.fields == {"request_id": "req-7"}
    assert (syslog.state().failed, syslog.state().sent) == (1, 0)


# -- over TLS (RFC 5425) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return demo.Pki(str(tmp_path_factory.mktemp("pki")))


def tls_repository(pki, certificate, count=1):
    """A TLS syslog listener on 127.0.0.1 with ``certificate`` (certificate, key): (its port, what each
    connection carried, its thread, what its handshakes raised)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    received, refused = [], []

    def accept():
        with listener:
            for _ in range(count):
                connection, _ = listener.accept()
                try:
                    with context.wrap_socket(connection, server_side=True) as secure:
                        received.append(read_all(secure))
                except (ssl.SSLError, OSError) as exc:
                    refused.append(exc)

    thread = threading.Thread(target=accept)
    thread.start()
    return listener.getsockname()[1], received, thread, refused


def test_over_tls_the_message_is_octet_counted_and_the_listener_reads_it(sender, pki):
    entry, export = event()
    port, received, thread, _ = tls_repository(pki, pki.syslog)
    syslog = sender("tls://127.0.0.1:%d" % port, ca_file=pki.ca[0])
    syslog.send(entry, export)
    thread.join(10)
    message = atna.syslog_message(entry, export, "CDRECORD")
    assert received == [b"%d " % len(message) + message]
    assert wait_for(lambda: syslog.state().sent == 1)


def test_over_tls_a_repository_our_ca_did_not_issue_gets_nothing(sender, pki, caplog):
    """Its certificate from another CA: nothing is sent, the loss is counted and said (health shows it)."""
    entry, export = event()
    port, received, thread, refused = tls_repository(pki, pki.stranger)
    with caplog.at_level(logging.WARNING):
        syslog = sender("tls://127.0.0.1:%d" % port, ca_file=pki.ca[0])
        syslog.send(entry, export)
        thread.join(10)
        assert wait_for(lambda: syslog.state().failed == 1)
    assert received == [] and refused
    assert "TLS: CERTIFICATE_VERIFY_FAILED" in syslog.state().lost_why, syslog.state()


def test_tls_syslog_needs_its_ca_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("pacs: {ae_title: A, host: h, port: 1}\naudit: {syslog: 'tls://127.0.0.1:6514'}\n")
    with pytest.raises(configuration.ConfigError, match=r"audit\.syslog_ca_file must name the CA file"):
        configuration.load(str(path))
