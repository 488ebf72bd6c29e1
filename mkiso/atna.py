"""The audit trail's copy for a central audit repository (IHE ATNA).

Each export goes out as an RFC 5424 syslog message whose body is a DICOM
audit message (PS3.15 A.5): a download is an "Export" event (110106: the
images leave on a medium), a print a "DICOM Instances Transferred" event
(110104: the images go to the publisher over DICOM), a lookup of the desk
page a "Query" event (110112: the PACS was asked, patients were shown).
Over UDP one
datagram a message; over TCP octet-counted frames (RFC 6587); over TLS
the same frames (RFC 5425), the repository's certificate checked against
``audit.syslog_ca_file`` and its host name.

This copy is best effort: the audit file is the record, so a repository
that is down costs a warning in the log, not the export.  Nor may it cost
an answer's time: the audit line of a synchronous download is recorded
when its body closes, in the web server's loop thread, and a repository
that swallows TCP connections once held that thread (every answer of the
server) for the whole connect timeout.  So ``send`` only queues the message;
one thread of the sender's own delivers the queue in order.  What it could
not deliver (failed, or dropped because the queue was full or the service
stopping) is counted for health and ``/metrics`` and logged with the
event's request id, so that the file can fill the repository's gaps.
"""

import collections
import dataclasses
import logging
import os
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET

log = logging.getLogger(__name__)

FACILITY_AUTHPRIV, SEVERITY_NOTICE = 10, 5
PRI = "<%d>" % (FACILITY_AUTHPRIV * 8 + SEVERITY_NOTICE)
BOM = "\ufeff"
TIMEOUT_S = 5  # one event's connect and send
QUEUE_MAX = 1000  # events waiting for the sender (a few KB each); more are dropped, never waited for
FLUSH_S = 2  # what shutdown gives the sender to deliver what is queued

# Characters XML 1.0 cannot hold, not even as a character reference (control characters, lone surrogates).
NOT_XML = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

EVENTS = {  # action -> EventID (DCM)
    "download": ("110106", "Export"),
    "print": ("110104", "DICOM Instances Transferred"),
    "query": ("110112", "Query"),
}


# DICOM CID 405, Media Type: what a download was made for.
USB, CD, DVD = ("110030", "USB Disk Emulation"), ("110032", "CD"), ("110033", "DVD")


def media_type(export):
    """A ZIP is for a USB stick; an ISO for a CD with ``iso.media: cd``, else for a DVD (CID 405 has
    no Blu-ray: "DVD and other DVD formatted media" is the nearest)."""
    if export.format == "zip":
        return USB
    return CD if export.media == "cd" else DVD


def _code(parent, tag, code, system, text):
    return ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": text})


def audit_message(entry, export, source_id):
    """The DICOM audit message (XML) of one audit ``entry``."""
    code, name = EVENTS[entry["action"]]
    root = ET.Element("AuditMessage")
    outcome = "0" if entry["code"] is None else ("4" if entry["status"] < 500 else "8")
    event = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": "E" if entry["action"] == "query" else "R", "EventDateTime": entry["time"],
        "EventOutcomeIndicator": outcome})
    _code(event, "EventID", code, "DCM", name)
    if entry["code"] is not None:
        ET.SubElement(event, "EventOutcomeDescription").text = entry["code"]
    requestor = ET.SubElement(root, "ActiveParticipant", {
        "UserID": entry["caller"] or "unknown", "UserIsRequestor": "true",
        "NetworkAccessPointID": entry["client"], "NetworkAccessPointTypeCode": "2"})
    _code(requestor, "RoleIDCode", "110150", "DCM", "Application")
    source = ET.SubElement(root, "ActiveParticipant", {
        "UserID": source_id, "AlternativeUserID": str(os.getpid()), "UserIsRequestor": "false",
        "NetworkAccessPointID": socket.gethostname(), "NetworkAccessPointTypeCode": "1"})
    _code(source, "RoleIDCode", "110153", "DCM", "Source Role ID")
    if entry["action"] == "download":
        media = ET.SubElement(root, "ActiveParticipant", {
            "UserID": entry["request_id"], "UserIsRequestor": "false"})
        _code(media, "RoleIDCode", "110154", "DCM", "Destination Media")
        media_code, media_name = media_type(export)
        _code(ET.SubElement(media, "MediaIdentifier"), "MediaType", media_code, "DCM", media_name)
    else:
        destination = ET.SubElement(root, "ActiveParticipant", {
            "UserID": export.destination, "UserIsRequestor": "false"})
        _code(destination, "RoleIDCode", "110152", "DCM", "Destination Role ID")
    ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    for study in export.studies:
        item = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": study.study_uid, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        _code(item, "ParticipantObjectIDTypeCode", "110180", "DCM", "Study Instance UID")
        ET.SubElement(item, "Accession", {"Number": study.accession})
    for patient_id, patient_name in sorted({(s.patient_id, s.patient_name) for s in export.studies}):
        item = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": patient_id, "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1"})
        _code(item, "ParticipantObjectIDTypeCode", "2", "RFC-3881", "Patient Number")
        ET.SubElement(item, "ParticipantObjectName").text = patient_name
    _make_valid(root)
    return ET.tostring(root, encoding="unicode")


def _make_valid(root):
    """Every value XML 1.0 can hold, whatever the PACS sent: what it cannot is replaced by U+FFFD."""
    for element in root.iter():
        if element.text:
            element.text = NOT_XML.sub("\ufffd", element.text)
        for name, value in element.attrib.items():
            element.set(name, NOT_XML.sub("\ufffd", value))


def syslog_message(entry, export, source_id):
    """An RFC 5424 message: header, no structured data, the audit message as UTF-8 (with BOM)."""
    header = "%s1 %s %s mkiso %d DICOM+RFC3881 -" % (
        PRI, entry["time"], socket.gethostname()[:255] or "-", os.getpid())
    return (header + " " + BOM + audit_message(entry, export, source_id)).encode("utf-8")


@dataclasses.dataclass(frozen=True)
class SenderState:
    """What the sender did so far, for health and /metrics."""

    sent: int
    failed: int  # the repository could not be reached or refused the message
    dropped: int  # never tried: the queue was full, or the service stopped first
    queued: int
    running: bool  # the sender's thread is alive
    lost_at: float = None  # time.monotonic() of the last event failed or dropped
    lost_why: str = ""


class Syslog:
    """A sender to ``udp://host:port``, ``tcp://host:port`` or ``tls://host:port`` (config checked; with
    ``ca_file`` for tls://): a bounded queue and one thread that empties it, from ``start`` to ``stop``."""

    def __init__(self, url, source_id, max_queued=None, ca_file=""):
        scheme, rest = url.split("://", 1)
        host, port = rest.rsplit(":", 1)
        self.tcp = scheme in ("tcp", "tls")
        self.tls = ssl.create_default_context(cafile=ca_file) if scheme == "tls" else None
        self.address = (host.strip("[]"), int(port))
        self.url = url
        self.source_id = source_id
        self.max_queued = QUEUE_MAX if max_queued is None else max_queued
        self._queue = collections.deque()  # (request id, message), oldest first
        self._changed = threading.Condition()
        self._closing = False
        self._thread = None
        self._sent = self._failed = self._dropped = 0
        self._lost = (None, "")

    def start(self):
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def stop(self, flush_s=FLUSH_S):
        """Give the sender ``flush_s`` to deliver what is queued; what is left then is dropped (and logged)."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join(flush_s)
        with self._changed:
            left = [request_id for request_id, _ in self._queue]
            self._queue.clear()
        for request_id in left:
            self._lose("dropped", request_id, "the service stopped before it was sent")

    def send(self, entry, export):
        """Queue the event's message (built now, from the event as it is now); never waits."""
        message = syslog_message(entry, export, self.source_id)
        with self._changed:
            if self._closing:
                refused = "the service is stopping"
            elif len(self._queue) >= self.max_queued:
                refused = "the queue is full (%d waiting)" % len(self._queue)
            else:
                refused = None
                self._queue.append((entry["request_id"], message))
                self._changed.notify()
        if refused is not None:
            self._lose("dropped", entry["request_id"], refused)

    def state(self):
        with self._changed:
            return SenderState(self._sent, self._failed, self._dropped, len(self._queue),
                               self._thread is not None and self._thread.is_alive(), *self._lost)

    def _run(self):
        while True:
            with self._changed:
                while not self._queue and not self._closing:
                    self._changed.wait()
                if not self._queue:
                    return
                request_id, message = self._queue.popleft()
            try:
                self._transmit(message)
            except ssl.SSLError as exc:  # an OSError too, whose strerror is not the cause
                self._lose("failed", request_id, "TLS: %s" % (exc.reason or exc))
            except OSError as exc:
                self._lose("failed", request_id, exc.strerror or str(exc))
            else:
                with self._changed:
                    self._sent += 1

    def _transmit(self, message):
        """The one place that knows the transport: over TCP (and TLS) a connection for each message,
        octet-counted; over UDP a datagram."""
        if self.tcp:
            with socket.create_connection(self.address, timeout=TIMEOUT_S) as sock:
                if self.tls is not None:
                    sock = self.tls.wrap_socket(sock, server_hostname=self.address[0])
                sock.sendall(b"%d " % len(message) + message)
        else:
            family = socket.getaddrinfo(*self.address, type=socket.SOCK_DGRAM)[0][0]
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self.address)

    def _lose(self, how, request_id, why):
        with self._changed:
            if how == "failed":
                self._failed += 1
            else:
                self._dropped += 1
            self._lost = (time.monotonic(), "%s: %s" % (how, why))
        log.warning("audit event not sent to %s (%s): %s", self.url, how, why,
                    extra={"fields": {"request_id": request_id}})
