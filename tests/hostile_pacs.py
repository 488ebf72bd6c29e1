"""A scripted PACS for tests: a DICOM SCP on loopback that answers whatever the test tells it to.

dcmqrscp answers from its own index: it counts NumberOfStudyRelatedInstances
itself, refuses a UID that is not one, keeps one name per patient.  A test of
what mkiso does with a PACS that says something else needs a PACS that says
what the test wants, byte for byte.  This one speaks the DICOM upper layer
itself (PS3.8: association, P-DATA, release, abort; PS3.7 command sets) with
pydicom reading the requests.  pynetdicom would do it too, but it is not in
Debian 12, and the suite also runs on Debian's python3 and libraries.

What it answers, as Study Root Query/Retrieve and Verification SCP:

- C-ECHO: success.
- C-FIND at any level: ``find(level, identifier)`` returns the answers, each
  a mapping {keyword: value}.  A value is written as given, not checked: a
  ``str`` (encoded in the answer's own SpecificCharacterSet where Python
  knows it, else Latin-1), ``bytes`` (exactly these bytes), an ``int`` or a
  list (values joined by a backslash).  By default ``find`` is ``answers``:
  what a real PACS would answer from the files it holds (``files``).
  ``alter(level, **values)`` changes some values of every answer at a level;
  for anything else, set ``find`` to a function of your own (it can call
  ``answers`` for what it leaves alone).
- C-MOVE: ``move(identifier)`` returns the files to send (by default
  ``matching``: those of the study, series or instances asked for); they go
  to the destination AE title's port in ``destinations`` (on 127.0.0.1) by
  dcmtk's storescu, and the final response counts what storescu reports
  stored.  ``hold``, when set to a ``threading.Event``, keeps a C-MOVE open
  after its first image until the event is set: a retrieval in progress
  while the test does something else; ``moving`` is set at that point.
- C-GET is not offered: its presentation context is refused.

Every request is kept in ``requests`` as (command, level, identifier as
{keyword: text}), so a test can say what the PACS was, or was not, asked.
"""

import os
import socket
import struct
import subprocess
import threading
from io import BytesIO

import pydicom
import pydicom.charset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue

IMPLICIT_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "2.25.293417406021184350172419302473711204417"
ECHO = "1.2.840.10008.1.1"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # Study Root Query/Retrieve - MOVE
OFFERED = (ECHO, FIND, MOVE)

C_FIND_RQ, C_MOVE_RQ, C_ECHO_RQ = 0x0020, 0x0021, 0x0030
RESPONSE = 0x8000  # added to a request's command field
NO_DATA_SET, DATA_SET = 0x0101, 0x0001
PENDING, SUCCESS, UNKNOWN_DESTINATION = 0xFF00, 0x0000, 0xA801

UNIQUE_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}
NOT_MATCHED = ("QueryRetrieveLevel", "SpecificCharacterSet")


def encode(values, codec="latin-1"):
    """``values`` ({keyword or tag: value}) as Implicit VR Little Endian data set bytes, in tag order."""
    out = b""
    for tag, value in sorted((tag_for_keyword(key) if isinstance(key, str) else key, value)
                             for key, value in values.items()):
        vr = dictionary_VR(tag)
        if vr in ("US", "UL"):
            data = struct.pack("<H" if vr == "US" else "<I", value)
        else:
            if isinstance(value, (list, tuple)):
                value = "\\".join(str(item) for item in value)
            data = value if isinstance(value, bytes) else str(value).encode(codec)
            if len(data) % 2:
                data += b"\0" if vr == "UI" else b" "
        out += struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(data)) + data
    return out


def codec_of(answer):
    """The Python codec for an answer's text: its first SpecificCharacterSet term where Python knows it."""
    charset = answer.get("SpecificCharacterSet") or ""
    if isinstance(charset, (list, tuple)):
        charset = charset[0] if charset else ""
    if isinstance(charset, bytes):
        charset = charset.decode("ascii", "replace")
    return pydicom.charset.python_encoding.get(str(charset).strip(), "latin-1")


def text(value):
    """A pydicom value as DICOM text: "" for none, values joined by a backslash."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(item) for item in value)
    return str(value)


def item(kind, value):
    return struct.pack(">BBH", kind, 0, len(value)) + value


def pdu(kind, body):
    return struct.pack(">BBI", kind, 0, len(body)) + body


def items_of(data):
    """The (type, value) items of an A-ASSOCIATE-RQ's variable part, or of an item's sub-items."""
    found, at = [], 0
    while at + 4 <= len(data):
        kind, length = data[at], struct.unpack(">H", data[at + 2:at + 4])[0]
        found.append((kind, data[at + 4:at + 4 + length]))
        at += 4 + length
    return found


def receive(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        data += chunk
    return data


class HostilePacs:
    """The scripted PACS (see the module's docstring); ``start`` it, ``stop`` it."""

    def __init__(self, files=(), destinations=None, ae_title="ABPACS", dcmtk_dir="/usr/bin"):
        self.ae_title = ae_title
        self.destinations = dict(destinations or {})  # AE title -> port on 127.0.0.1
        self.storescu = os.path.join(dcmtk_dir, "storescu")
        self.files = list(files)
        self.find = self.answers
        self.move = self.matching
        self.hold = None
        self.moving = threading.Event()
        self.requests = []
        self._listener = None
        self._threads = []

    # -- what it says ------------------------------------------------------------

    def headers(self):
        """(path, header) of every file it holds."""
        return [(path, pydicom.dcmread(path, stop_before_pixels=True)) for path in self.files]

    def matching(self, identifier):
        """The files whose values equal every non-empty key of ``identifier`` (a list of UIDs matches any)."""
        return [path for path, header in self.headers() if self._matches(header, identifier)]

    @staticmethod
    def _matches(header, identifier):
        for keyword, wanted in identifier.items():
            if wanted and keyword not in NOT_MATCHED and text(header.get(keyword)) not in wanted.split("\\"):
                return False
        return True

    def answers(self, level, identifier):
        """What a real PACS answers from its files: one answer per entity of ``level`` that matches,
        with the keys asked for (NumberOfStudyRelatedInstances, ModalitiesInStudy and
        AvailableTransferSyntaxUID as a PACS computes them)."""
        unique = UNIQUE_KEY[level]
        entities = {}
        for _, header in self.headers():
            if self._matches(header, identifier):
                entities.setdefault(text(header.get(unique)), []).append(header)
        found = []
        for headers in entities.values():
            first = headers[0]
            answer = {"QueryRetrieveLevel": level, "SpecificCharacterSet": text(first.get("SpecificCharacterSet"))}
            for keyword in identifier:
                if keyword == "NumberOfStudyRelatedInstances":
                    answer[keyword] = len(headers)
                elif keyword == "ModalitiesInStudy":
                    answer[keyword] = sorted({text(header.get("Modality")) for header in headers})
                elif keyword == "AvailableTransferSyntaxUID":  # the syntax the file is stored in
                    answer[keyword] = text(first.file_meta.get("TransferSyntaxUID"))
                elif keyword not in answer:
                    answer[keyword] = text(first.get(keyword))
            found.append(answer)
        return found

    def alter(self, level, **values):
        """From now on every answer at ``level`` has ``values`` instead of its own (or in addition)."""
        plain = self.answers

        def find(asked_level, identifier):
            answers = plain(asked_level, identifier)
            return [dict(answer, **values) for answer in answers] if asked_level == level else answers

        self.find = find

    # -- life cycle --------------------------------------------------------------

    def start(self, port):
        self.port = port
        self._listener = socket.create_server(("127.0.0.1", port))
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)
        self._accept_thread.start()
        return self

    def stop(self):
        if self.hold is not None:
            self.hold.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() that close() alone would not
        except OSError:
            pass
        self._listener.close()
        self._accept_thread.join(5)
        for thread in self._threads:
            thread.join(5)

    def _accept(self):
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    # -- the upper layer ---------------------------------------------------------

    def _serve(self, sock):
        with sock:
            try:
                self._association(sock)
            except (ConnectionError, OSError):
                pass  # the SCU hung up or aborted: nothing more to say

    def _association(self, sock):
        kind, body = self._read_pdu(sock)
        if kind != 0x01:
            return
        contexts, max_pdu = self._accept_association(sock, body)
        command, data = b"", b""
        while True:
            kind, body = self._read_pdu(sock)
            if kind == 0x05:  # A-RELEASE-RQ
                sock.sendall(pdu(0x06, bytes(4)))
                return
            if kind != 0x04:  # an A-ABORT, or anything else: the end
                return
            at = 0
            while at < len(body):
                length = struct.unpack(">I", body[at:at + 4])[0]
                context, control, fragment = body[at + 4], body[at + 5], body[at + 6:at + 4 + length]
                at += 4 + length
                if control & 1:
                    command += fragment
                else:
                    data += fragment
                if not control & 2:
                    continue
                request = read_dataset(BytesIO(command), True, True)
                if request.get("CommandDataSetType", NO_DATA_SET) != NO_DATA_SET and not data:
                    continue  # the command is complete, its data set is still to come
                self._answer(sock, contexts.get(context), context, request, data, max_pdu)
                command, data = b"", b""

    def _accept_association(self, sock, body):
        """Answer an A-ASSOCIATE-RQ: each offered SOP class with Implicit VR Little Endian."""
        called, calling, reserved = body[4:20], body[20:36], body[36:68]
        accepted, contexts, max_pdu = b"", {}, 16384
        for kind, value in items_of(body[68:]):
            if kind == 0x20:
                context, subitems = value[0], items_of(value[4:])
                abstract = next((sub.decode("ascii").rstrip("\0") for k, sub in subitems if k == 0x30), "")
                syntaxes = [sub.decode("ascii").rstrip("\0") for k, sub in subitems if k == 0x40]
                result = 0 if abstract in OFFERED and IMPLICIT_LE in syntaxes else (
                    3 if abstract not in OFFERED else 4)
                if result == 0:
                    contexts[context] = abstract
                accepted += item(0x21, bytes([context, 0, result, 0]) + item(0x40, IMPLICIT_LE.encode()))
            elif kind == 0x50:
                for sub_kind, sub in items_of(value):
                    if sub_kind == 0x51 and struct.unpack(">I", sub)[0]:
                        max_pdu = struct.unpack(">I", sub)[0]
        user = item(0x51, struct.pack(">I", 16384)) + item(0x52, IMPLEMENTATION_UID.encode())
        sock.sendall(pdu(0x02, struct.pack(">HH", 1, 0) + called + calling + reserved
                         + item(0x10, APPLICATION_CONTEXT.encode()) + accepted + item(0x50, user)))
        return contexts, max_pdu

    @staticmethod
    def _read_pdu(sock):
        head = receive(sock, 6)
        return head[0], receive(sock, struct.unpack(">I", head[2:6])[0])

    def _send(self, sock, context, max_pdu, command, data_set=None):
        """One DIMSE message: its command set, then its data set, each in PDVs that fit the peer's PDUs."""
        body = encode(command)
        parts = [(encode({0x00000000: len(body)}) + body, 1)] + ([(data_set, 0)] if data_set is not None else [])
        room = max_pdu - 12
        for payload, is_command in parts:
            for start in range(0, max(len(payload), 1), room):
                fragment = payload[start:start + room]
                control = is_command | (2 if start + room >= len(payload) else 0)
                pdv = struct.pack(">IBB", len(fragment) + 2, context, control) + fragment
                sock.sendall(pdu(0x04, pdv))

    # -- the services -------------------------------------------------------------

    def _answer(self, sock, abstract, context, request, data, max_pdu):
        field = request.CommandField
        identifier = {}
        if data:
            for element in read_dataset(BytesIO(data), True, True):
                identifier[keyword_for_tag(element.tag) or str(element.tag)] = text(element.value)
        level = identifier.get("QueryRetrieveLevel", "")
        self.requests.append(({C_FIND_RQ: "C-FIND", C_MOVE_RQ: "C-MOVE", C_ECHO_RQ: "C-ECHO"}.get(field, field),
                              level, identifier))

        def respond(status, data_set=None, **counts):
            command = {"AffectedSOPClassUID": abstract, "CommandField": field + RESPONSE,
                       "MessageIDBeingRespondedTo": request.MessageID,
                       "CommandDataSetType": DATA_SET if data_set is not None else NO_DATA_SET, "Status": status}
            self._send(sock, context, max_pdu, dict(command, **counts), data_set)

        if field == C_FIND_RQ:
            for answer in self.find(level, identifier):
                respond(PENDING, encode(answer, codec_of(answer)))
            respond(SUCCESS)
        elif field == C_MOVE_RQ:
            completed, failed = self._send_files(request.MoveDestination.strip(), self.move(identifier))
            if completed is None:
                respond(UNKNOWN_DESTINATION)
            else:
                respond(SUCCESS if not failed else 0xB000, NumberOfCompletedSuboperations=completed,
                        NumberOfFailedSuboperations=failed, NumberOfWarningSuboperations=0)
        else:
            respond(SUCCESS)

    def _send_files(self, destination, paths):
        """C-STORE ``paths`` to ``destination`` with storescu: (completed, failed), (None, None) if unknown."""
        if destination not in self.destinations:
            return None, None
        batches = [paths[:1], paths[1:]] if self.hold is not None else [paths]
        completed = 0
        for number, batch in enumerate(batches):
            if number and self.hold is not None:
                self.moving.set()
                self.hold.wait(60)
            if batch:
                run = subprocess.run([self.storescu, "-v", "-aet", self.ae_title, "-aec", destination, "127.0.0.1",
                                      str(self.destinations[destination])] + batch,
                                     capture_output=True, text=True, timeout=60)
                completed += run.stdout.count("Received Store Response (Success)") + run.stderr.count(
                    "Received Store Response (Success)")
        return completed, len(paths) - completed
