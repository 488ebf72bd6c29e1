"""Talking to the PACS with dcmtk: C-ECHO, C-FIND, C-MOVE and C-GET.

dcmtk's exit codes do not tell success (findscu exits 0 when the peer
aborted; movescu exits 0 on a refused move), so each call decides from what
the tool reports: the final response status, the sub-operation counts, and,
for C-FIND, the answers it wrote to files.  Every failure leaves here as the
error of SPEC §2: 502 refused or failed, 504 timed out.

Besides the STUDY-level C-FIND, an IMAGE-level C-FIND lists a study's SOP
Instance UIDs before it is retrieved: the manifest the received files must
match (SPEC §3.6).  A PACS may refuse that query; then there is no manifest
and the retrieval falls back to the counts, which is said once in the log.

C-GET and compressed studies (SPEC §3.2).  getscu proposes one storage
context per SOP class, its transfer syntaxes the uncompressed ones with at
most one compressed syntax put first (``+xs``, ``+xy``, ...); there is no
option for more.  A PACS that cannot convert (dcmqrscp, many archives)
sends an image only in the syntax it is stored in, and fails the
sub-operation otherwise.  So the manifest also asks for each instance's
AvailableTransferSyntaxUID (0008,3002): a study stored in one compressed
syntax is got proposing it; and whatever fails is fetched again at IMAGE
level, series by series, proposing the compressed syntaxes the manifest
names for it, or, where the PACS did not say, each one getscu can propose,
until nothing is missing.  What still is missing fails the retrieval as
usual (incomplete_study), never a partial disc.

What the PACS says is checked here, where it enters, once (SPEC §3.10):
a UID names a receiver folder (``STUDY_<uid>``), a getscu file and a tool
argument, so one that is not a UID never gets past this module; a count is
an integer or absent; a character set is one pydicom knows; and more
studies for one accession than ``limits.max_studies_per_accession`` stop
the request before a manifest or a retrieval is asked for.  What fails is a
502 ``bad_pacs_answer`` (``too_many_studies``) naming the attribute, never
the value: it may be hostile, and the message is logged at WARNING.
"""

import logging
import os
import re
import socket
import struct
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from contextlib import contextmanager

import pydicom
import pydicom.datadict

from .. import errors, process
from . import identity, tls

log = logging.getLogger(__name__)

# What the PACS says now about the patient and the study: everything of it that reaches a disc's
# DICOMDIR records or its file name.  The disc cache's key holds all of it (SPEC §9), so that a
# name corrected or a patient merged under the same UIDs makes a new disc.
IDENTITY_KEYS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)
FIND_KEYS = ("StudyInstanceUID",) + IDENTITY_KEYS + (
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
    "SpecificCharacterSet",
)


# -- what the PACS says, checked where it enters (SPEC §3.10) ------------------

# PS3.5 9.1: components of digits separated by dots, 1 to 64 characters.  Not required: that a
# component has no leading zero ("1.2.04"): archives that write such UIDs exist and keep them for
# years, and a leading zero is still a digit, harmless in a folder name or an argument.  Required:
# nothing but digits and dots, no empty component (so no "..", no leading or trailing dot), at
# most 64 characters: no real PACS sends anything else, and anything else could be a path.
UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # used with fullmatch: ``$`` would take a trailing newline
UID_MAX = 64
COUNT = re.compile(r"[0-9]{1,12}")  # IS, non-negative, padded with spaces; 12 digits: IS is at most 12 characters


def bad_answer(what, attribute, rule, value=""):
    """The 502 for an answer that fails its check; the value goes to the debug log only."""
    log.debug("%s: %s refused: %r", what, attribute, value)
    return errors.UpstreamFailed(
        "%s: the PACS answered a %s that is not %s; the answer was refused." % (what, attribute, rule),
        code="bad_pacs_answer")


def checked_uid(value, what, attribute):
    """``value`` if it is a UID (see UID), else the 502."""
    if len(value) > UID_MAX or not UID.fullmatch(value):
        raise bad_answer(what, attribute, "a DICOM UID (1 to 64 digits and dots, PS3.5 9.1)", value)
    return value


def checked_count(value, what, attribute):
    """An integer count from ``value`` (IS text), None where the PACS gave none; else the 502."""
    text = value.strip(" \0")
    if not text:
        return None
    if not COUNT.fullmatch(text):
        raise bad_answer(what, attribute, "a count (a non-negative integer)", value)
    return int(text)


def checked_charsets(value, what):
    """The 502 unless each term of the SpecificCharacterSet ``value`` is a defined term (PS3.3 C.12.1.1.2).

    pydicom decodes the answer's names with it; an unknown term would be
    read as something else.  The same terms as a received file's
    (``identity.defined_charset``: the spellings pydicom mends too).
    """
    if not all(identity.defined_charset(term.strip(" \0")) for term in value.split("\\")):
        raise bad_answer(what, "SpecificCharacterSet", "a defined term of DICOM (PS3.3 C.12.1.1.2)", value)


def raw_text(answer, keyword):
    """The element ``keyword`` of a C-FIND answer as the PACS sent it (values joined by a backslash),
    trailing padding removed; "" where it is absent or empty.

    Read from the undecoded bytes: pydicom's own conversion of an IS or UI
    value ("abc", "2\\3", "1.5") raises, or guesses, on what a PACS may send.
    """
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag not in answer:
        return ""
    value = answer.get_item(tag).value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip(" \0")
    if not isinstance(value, str):  # converted already: a multi-valued element is a list of values
        return "\\".join(str(item) for item in value)
    return value.rstrip(" \0")


class Peer:
    """A DICOM application entity we call: its AE title, host and port, and how TLS is used with it
    (``tls``: the config's setting, None for none; ``certificate``: ours, a ``tls.CertificateFile``)."""

    def __init__(self, name, ae_title, host, port, tls_setting=None):
        self.name = name
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.tls = tls_setting if tls_setting is not None and tls_setting.enabled else None
        self.certificate = tls.CertificateFile(self.tls.certificate) if self.tls else None
        self.route = None  # (host, port) the tools connect to instead: a TLS tunnel's

    def through(self, port):
        """This peer as a tool reaches it through a tunnel on 127.0.0.1:``port``: in the clear there."""
        routed = Peer(self.name, self.ae_title, self.host, self.port)
        routed.route = ("127.0.0.1", port)
        return routed

    @property
    def address(self):
        return "%s@%s:%s" % (self.ae_title, self.host, self.port)

    def __str__(self):
        return "%s %s" % (self.name, self.address)


class Study:
    """One C-FIND answer: a study the PACS holds for an accession number."""

    def __init__(self, accession, study_uid, patient_id, patient_name, study_date="", instances=None,
                 description="", modalities=(), identity=None):
        self.accession = accession
        self.study_uid = study_uid
        self.patient_id = patient_id
        self.patient_name = patient_name
        self.study_date = study_date
        self.instances = instances
        self.description = description
        self.modalities = list(modalities)
        self.identity = dict(identity or {})  # IDENTITY_KEYS as the PACS answered them, as text

    def __repr__(self):
        return "Study(accession=%r, study_uid=%r)" % (self.accession, self.study_uid)


class Manifest(dict):
    """A study's images from the IMAGE-level C-FIND: {SOP Instance UID: Series Instance UID}.

    ``syntaxes`` holds {SOP Instance UID: transfer syntax UID} for the
    instances whose AvailableTransferSyntaxUID the PACS gave (often none).
    """

    def __init__(self, series=(), syntaxes=None):
        super().__init__(series)
        self.syntaxes = dict(syntaxes or {})

    @property
    def stored_syntax(self):
        """The one transfer syntax every instance is stored in, where the PACS said so for all; else None."""
        stored = set(self.syntaxes.values()) if self and len(self.syntaxes) == len(self) else set()
        return stored.pop() if len(stored) == 1 else None

    def load(self):
        """The whole manifest (``retrieval.Spilled`` reads it back from disk; this one is it)."""
        return self


class MoveResult:
    """The final C-MOVE response: status text and sub-operation counts."""

    def __init__(self, status, status_text, completed, failed, warning):
        self.status = status
        self.status_text = status_text
        self.completed = completed
        self.failed = failed
        self.warning = warning

    @property
    def delivered(self):
        return (self.completed or 0) + (self.warning or 0)

    @property
    def succeeded(self):
        """Success status and no failed sub-operation."""
        return self.status == 0x0000 and not self.failed


# The StudyInstanceUID of health's C-FIND: a UID under 2.25 (UUIDs, PS3.5 B.2) that no UUID gives.
NO_STUDY = "2.25.0"

TUNNEL_CONFIG = "tls-tunnel-pacs.conf"  # in the work dir: stunnel's configuration for the PACS (tls.Tunnel)

MOVE_DESTINATION_UNKNOWN = 0xA801  # C-MOVE status "Refused: Move Destination unknown" (PS3.4 C.4.2.1.5)

SOP_INSTANCE_UID = "0008,0018"
SERIES_INSTANCE_UID = "0020,000e"  # as dcmtk's XML writes tags: lower-case hex
TRANSFER_SYNTAX = "0008,3002"  # AvailableTransferSyntaxUID
MANIFEST_TAGS = (SOP_INSTANCE_UID, SERIES_INSTANCE_UID, TRANSFER_SYNTAX)

# The compressed transfer syntaxes getscu can propose, each with its option, in the order a
# retry tries them when the PACS did not say what the study holds: images first, then video.
GET_PREFERENCES = (
    ("1.2.840.10008.1.2.4.70", "+xs"), ("1.2.840.10008.1.2.4.50", "+xy"), ("1.2.840.10008.1.2.4.51", "+xx"),
    ("1.2.840.10008.1.2.4.90", "+xv"), ("1.2.840.10008.1.2.4.91", "+xw"), ("1.2.840.10008.1.2.4.80", "+xt"),
    ("1.2.840.10008.1.2.4.81", "+xu"), ("1.2.840.10008.1.2.5", "+xr"), ("1.2.840.10008.1.2.4.100", "+xm"),
    ("1.2.840.10008.1.2.4.101", "+xh"), ("1.2.840.10008.1.2.4.102", "+xn"), ("1.2.840.10008.1.2.4.103", "+xl"),
    ("1.2.840.10008.1.2.4.104", "+x2"), ("1.2.840.10008.1.2.4.105", "+x3"), ("1.2.840.10008.1.2.4.106", "+xo"),
    ("1.2.840.10008.1.2.4.107", "+x4"), ("1.2.840.10008.1.2.4.108", "+x5"),
)
GET_OPTION = dict(GET_PREFERENCES)
# SOP Instance UIDs per IMAGE-level C-GET request: the list must fit a UI element (64 KB).
GET_BATCH = 500


def association_args(calling_ae, peer, timeout):
    """The arguments every dcmtk SCU call shares: AE titles, timeouts, TLS where the peer has it (through
    the tunnel: TLS's PDU size only, the tunnel speaks TLS)."""
    seconds = str(max(1, int(timeout)))
    secure = tls.PDU_ARGS if peer.route else tls.dcmtk_args(peer.tls)
    return ["-aet", calling_ae, "-aec", peer.ae_title, "-to", seconds, "-ta", seconds] + secure


def address_args(peer):
    host, port = peer.route or (peer.host, peer.port)
    return [host, str(port)]


def echo(tool, calling_ae, peer, timeout):
    """C-ECHO the peer (over TLS where it has TLS); returns (ok, detail) for the health report."""
    problem = peer.certificate.problem() if peer.certificate else ""
    if problem:
        return False, "no C-ECHO to %s: %s" % (peer, problem)
    args = [tool, "-v"] + association_args(calling_ae, peer, timeout) + ["-td", str(max(1, int(timeout)))]
    try:
        result = process.run(args + address_args(peer), timeout + 5)
    except process.ToolTimeout:
        return False, "no answer from %s within %ss" % (peer, timeout)
    except process.ToolMissing as exc:
        return False, str(exc)
    what = "C-ECHO over TLS" if peer.tls else "C-ECHO"
    if result.returncode == 0:
        return True, "%s to %s succeeded" % (what, peer)
    return False, "%s to %s failed: %s" % (what, peer, failure(result.output, peer, calling_ae))


# How a PACS turns away a calling AE title it does not know.  Most reject the association naming
# it; Orthanc accepts the association of anyone (C-ECHO is allowed to all by default) and aborts it
# at the first C-FIND or C-MOVE, before any response: dcmtk then says only "0006:0317 Peer aborted
# Association".  A PACS that aborts then for another reason is rare enough to be named with it.
CALLING_AE_UNKNOWN = "Calling AE Title Not Recognized"
PEER_ABORTED = "0006:0317"
_RESPONSE = re.compile(r"Received .*Response")


def refused_caller(output):
    """Whether a dcmtk SCU's ``output`` shows the PACS turning away our calling AE title (see above)."""
    if CALLING_AE_UNKNOWN in output:
        return True
    return "Association Accepted" in output and PEER_ABORTED in output and not _RESPONSE.search(output)


def failure(output, peer, calling_ae=None):
    """The cause of a failed dcmtk run (``process.failure_reason``), and when ``peer`` turned away
    ``calling_ae``, what to do about it."""
    reason = process.failure_reason(output)
    secure = tls_failure(output, peer)
    if secure:
        return secure
    if calling_ae and refused_caller(output):
        said = [line[3:].strip() for line in output.splitlines() if PEER_ABORTED in line and line[:3] in ("F: ", "E: ")]
        return ("the %s turned away mkiso's calling AE title %s (%s): register AE title %s (this host, %s) "
                "in the %s" % (peer.name, calling_ae, said[-1] if said else reason, calling_ae, socket.gethostname(),
                               peer.name))
    return reason


def tls_failure(output, peer):
    """``tls.failure`` where ``peer`` has TLS, else ""."""
    return tls.failure(output, peer.tls, peer) if peer.tls else ""


def raise_for_failure(output, peer, what, code="pacs_failed", calling_ae=None):
    """Turn a failed dcmtk run into 504 (timeout) or 502 (anything else).

    The error has the cause; the log has every line the tool printed as an
    error or warning, the data set dcmtk dumps with them included, so that
    nothing of what it said is lost (the dump is the request's keys: an
    accession number or UIDs, never a patient's name).  A PACS that turned
    away ``calling_ae`` is a 502 ``pacs_unknown_ae`` saying to register it.
    """
    log.warning("%s: %s failed", what, peer, extra={"fields": {"tool_output": "\n".join(
        line for line in output.splitlines() if line[:3] in ("F: ", "E: ", "W: "))}})
    reason = process.failure_reason(output)
    secure = tls_failure(output, peer)
    if ("timeout" in reason.lower() or "timed out" in reason.lower()) and not secure:
        raise errors.UpstreamTimeout("%s: %s did not answer in time (%s)." % (what, peer, reason))
    if secure:
        code = "tls_failed"
    elif calling_ae and refused_caller(output):
        code = "pacs_unknown_ae"
    raise errors.UpstreamFailed("%s: %s failed: %s." % (what, peer, failure(output, peer, calling_ae)), code=code)


class Pacs:
    """The configured PACS, seen through findscu, movescu and echoscu."""

    def __init__(self, config):
        self.peer = Peer("PACS", config.pacs.ae_title, config.pacs.host, config.pacs.port, config.pacs.tls)
        self.tunnel = None  # the way to a TLS PACS for a retrieve tool without +tls (tls.Tunnel)
        if self.peer.tls:
            self.tunnel = tls.Tunnel(self.peer.host, self.peer.port, self.peer.tls, config.tools.stunnel,
                                     os.path.join(config.paths.work_dir, TUNNEL_CONFIG))
        self.our_ae = config.receiver.ae_title
        self.dcmtk_dir = config.tools.dcmtk_dir
        self.find_timeout = config.timeouts.find_s
        self.move_timeout = config.timeouts.move_s
        self.max_studies = config.limits.max_studies_per_accession
        self.receiver_port = config.receiver.port
        self.delivery_fault = None  # (monotonic time, sentence) of the last C-MOVE the PACS could not deliver
        self._told_no_manifest = False
        # The stored syntaxes are for C-GET's proposals only; a C-MOVE's manifest is only checked against.
        # Asked for, they tripled Orthanc's time on a 10,000-image manifest (2.5 -> 7.9 s), time it took
        # from the C-MOVE it sends beside it (SPEC §3.9).  Asked until the PACS refuses a query for them.
        self._asks_syntaxes = config.pacs.retrieve == "get"

    def tool(self, name):
        return os.path.join(self.dcmtk_dir, name)

    def echo(self):
        return echo(self.tool("echoscu"), self.our_ae, self.peer, self.find_timeout)

    def query(self):
        """An empty C-FIND for the health report: (ok, detail).

        STUDY level on a StudyInstanceUID no study has (NO_STUDY): it
        matches nothing and costs the PACS one index lookup.  It is what a
        C-ECHO cannot show: Orthanc answers anyone's C-ECHO and turns away
        the C-FIND of an AE title it does not know.
        """
        args = self._find_args([], "STUDY", [("StudyInstanceUID", NO_STUDY)], ())
        try:
            result = process.run(args + address_args(self.peer), self.find_timeout + 5)
        except process.ToolTimeout:
            return False, "no answer to a C-FIND from %s within %ss" % (self.peer, self.find_timeout)
        except process.ToolMissing as exc:
            return False, str(exc)
        if "Received Final Find Response (Success)" in result.output:
            return True, "C-FIND to %s answered" % self.peer
        return False, "C-FIND to %s failed: %s" % (self.peer, failure(result.output, self.peer, self.our_ae))

    def _find_args(self, extract, level, match, returned):
        """findscu at ``level`` (Study Root) with ``match`` keys and empty ``returned`` keys."""
        args = [self.tool("findscu"), "-v", "-S"] + extract
        args += association_args(self.our_ae, self.peer, self.find_timeout)
        args += ["-td", str(max(1, int(self.find_timeout)))]
        args += ["-k", "QueryRetrieveLevel=" + level]
        for key, value in match:
            args += ["-k", "%s=%s" % (key, value)]
        for key in returned:
            if key not in dict(match):  # a match key comes back anyway; given empty it would match all
                args += ["-k", key]
        return args

    def find_studies(self, accession, scratch_dir):
        """C-FIND at STUDY level with the accession number as an exact key; the studies, each checked.

        More studies than ``limits.max_studies_per_accession`` are a 502
        before anything else is asked of the PACS: each would cost an
        IMAGE-level C-FIND and a retrieval, and one accession is one order.
        """
        what = "C-FIND for accession %s" % accession
        answers = self._find(what, scratch_dir, "STUDY", [("AccessionNumber", accession)], FIND_KEYS)
        studies = [self._study(accession, answer, what) for answer in answers]
        count = len({study.study_uid for study in studies})
        if count > self.max_studies:
            raise errors.UpstreamFailed(
                "%s: the PACS answered %d studies, more than limits.max_studies_per_accession (%d); "
                "nothing was retrieved." % (what, count, self.max_studies), code="too_many_studies")
        return studies

    def series_modalities(self, study_uid, scratch_dir):
        """The study's modalities from a SERIES-level C-FIND: where the PACS leaves ModalitiesInStudy empty."""
        answers = self._find("SERIES-level C-FIND of study %s" % study_uid, scratch_dir, "SERIES",
                             [("StudyInstanceUID", study_uid)], ("Modality",))
        return sorted({str(answer.get("Modality", "") or "") for answer in answers} - {""})

    def _find(self, what, scratch_dir, level, match, returned):
        """Every answer of a C-FIND, as datasets; a failure is the error of SPEC §2."""
        with tempfile.TemporaryDirectory(prefix="find-", dir=scratch_dir) as out_dir:
            args = self._find_args(["-X", "-od", out_dir], level, match, returned)
            result = self._run(args, self.find_timeout, what)
            if "Received Final Find Response (Success)" not in result.output:
                raise_for_failure(result.output, self.peer, what, calling_ae=self.our_ae)
            return [pydicom.dcmread(os.path.join(out_dir, name), force=True) for name in sorted(os.listdir(out_dir))]

    def list_instances(self, study_uid, scratch_dir, make=None):
        """The study's images from an IMAGE-level C-FIND (the manifest, a ``Manifest``; with ``make``, what
        ``make`` makes of the iterable of their SOP Instance UIDs, read from the answers as it goes: the
        compact form of a manifest only checked against, made without the whole list at any moment).

        None when the PACS refuses IMAGE-level queries (a failure status in
        its final response); any other failure is an error as usual.  With
        ``pacs.retrieve: get``, each instance's AvailableTransferSyntaxUID is
        asked for too (dcmqrscp leaves it out of its answers); a PACS that
        refuses a query for it is asked again without, and from then on never
        for it.
        """
        what = "IMAGE-level C-FIND of study %s" % study_uid
        asks_syntaxes = self._asks_syntaxes
        manifest, status = self._find_instances(study_uid, scratch_dir, what, asks_syntaxes, make)
        if manifest is None and asks_syntaxes:
            self._asks_syntaxes = False
            manifest, status = self._find_instances(study_uid, scratch_dir, what, False, make)
            if manifest is not None:
                log.info("the PACS refuses AvailableTransferSyntaxUID in IMAGE-level C-FIND; C-GET finds "
                         "the transfer syntaxes of compressed studies by trying them")
        if manifest is None and not self._told_no_manifest:
            self._told_no_manifest = True
            log.warning("the PACS refuses IMAGE-level C-FIND (%s); retrievals are checked against "
                        "its counts only", status)
        return manifest

    def _find_instances(self, study_uid, scratch_dir, what, asks_syntaxes, make=None):
        """One IMAGE-level C-FIND: (its Manifest, or what ``make`` makes of its UIDs, or None when the PACS
        refused it; the final status)."""
        with tempfile.TemporaryDirectory(prefix="manifest-", dir=scratch_dir) as out_dir:
            answers = os.path.join(out_dir, "answers.xml")
            # -od too: findscu insists on a writable output directory even for -Xs, and the
            # service's working directory (/ under systemd) is not one.
            returned = ("SeriesInstanceUID", "SOPInstanceUID") + (("AvailableTransferSyntaxUID",)
                                                                  if asks_syntaxes else ())
            args = self._find_args(["-Xs", answers, "-od", out_dir], "IMAGE", [("StudyInstanceUID", study_uid)],
                                   returned)
            result = self._run(args, self.find_timeout, what)
            final = _FINAL_FIND.search(result.output)
            if final is None:
                raise_for_failure(result.output, self.peer, what, calling_ae=self.our_ae)
            status = final.group("status")
            if status != "Success":
                return None, status
            if make is not None:
                return make(uid for uid, _, _ in manifest_answers(answers, what)), status
            return read_manifest(answers, what), status

    def _study(self, accession, answer, what):
        """A Study from one STUDY-level answer, its UID, count and character set checked first."""
        checked_charsets(raw_text(answer, "SpecificCharacterSet"), what)
        study_uid = checked_uid(raw_text(answer, "StudyInstanceUID"), what, "StudyInstanceUID")
        instances = checked_count(raw_text(answer, "NumberOfStudyRelatedInstances"), what,
                                  "NumberOfStudyRelatedInstances")
        said = {key: str(answer.get(key, "") or "") for key in IDENTITY_KEYS}
        for key, _ in identity.PATIENT_ATTRIBUTES:  # decoded with replacement characters, two names could
            if "\ufffd" in said[key]:  # read as one
                raise bad_answer(what, key, "text in its SpecificCharacterSet", said[key])
        found = str(answer.get("AccessionNumber", "") or "")
        if found != accession:
            raise errors.UpstreamFailed(
                "C-FIND for accession %s: the PACS answered with a study that does not match it." % accession,
                code="pacs_failed",
            )
        return Study(
            accession=accession,
            study_uid=study_uid,
            patient_id=said["PatientID"],
            patient_name=said["PatientName"],
            study_date=str(answer.get("StudyDate", "") or ""),
            instances=instances,
            description=str(answer.get("StudyDescription", "") or ""),
            modalities=_values(answer.get("ModalitiesInStudy")),
            identity=said,
        )

    def move_study(self, study_uid):
        """C-MOVE one study by StudyInstanceUID alone to our own receiver."""
        return self._retrieve("C-MOVE of study %s" % study_uid, [self.tool("movescu"), "-d", "-S"],
                              ["-aem", self.our_ae], parse_move_output, study_keys(study_uid))

    def check_delivery(self, study_uid, result, reached):
        """Raise the error of a C-MOVE that delivered nothing because the PACS could not send to us.

        Told apart by cause, each with its fix: the PACS says it does not
        know the destination (0xA801, as dcmqrscp does); or it failed while
        no association of it reached the receiver (``reached`` false: the
        port closed, filtered or silent on its way, a wrong host or port on
        file; and Orthanc's answer for a destination it does not know, a
        bare "Unable to process").  Any other failure is the caller's to
        tell (an incomplete study).  The sentence is kept for health until
        a C-MOVE succeeds: the admin sees it there too.
        """
        if result.succeeded:
            self.delivery_fault = None
        if result.succeeded or result.delivered:
            return
        what = "C-MOVE of study %s" % study_uid
        destination = "%s at %s:%d" % (self.our_ae, socket.gethostname(), self.receiver_port)
        if result.status == MOVE_DESTINATION_UNKNOWN:
            error = errors.UpstreamFailed(
                "%s: %s does not know the destination %s (%s): register AE %s in the PACS."
                % (what, self.peer, self.our_ae, result.status_text, destination), code="move_destination_unknown")
        elif not reached:
            error = errors.UpstreamFailed(
                "%s: %s answered %s, and no association of it reached the receiver: the PACS could not reach "
                "port %d on this host: firewall, or the PACS's entry for %s (it must be AE %s)."
                % (what, self.peer, result.status_text, self.receiver_port, self.our_ae, destination),
                code="receiver_unreachable")
        else:
            return
        self.delivery_fault = (time.monotonic(), error.message)
        raise error

    def get_study(self, study_uid, out_dir, manifest=None):
        """C-GET one study into ``out_dir`` over our own association: no port listens.

        Every image as the PACS stores it, also compressed from a PACS that
        cannot convert (see the module's docstring): one C-GET of the study,
        proposing its one compressed syntax where the manifest says it has
        one, then IMAGE-level C-GETs of what failed, proposing the compressed
        syntaxes in turn.  Returns the counts of all of them together.
        """
        first = GET_OPTION.get(manifest.stored_syntax) if manifest else None
        results = [self._get(study_keys(study_uid), out_dir, first, "C-GET of study %s" % study_uid)]
        if not results[0].failed or not manifest:
            return results[0]
        manifest = manifest.load()  # every instance's series and syntax, for the retries only
        syntaxes = manifest.syntaxes
        for syntax, option in GET_PREFERENCES:
            missing = missing_instances(manifest, out_dir)
            if not missing:
                break
            wanted = {uid: series for uid, series in missing.items() if syntaxes.get(uid, syntax) == syntax}
            if wanted and option != first:
                results += self._get_instances(study_uid, wanted, out_dir, option)
        missing = missing_instances(manifest, out_dir)
        if missing:
            log.info("C-GET of study %s: %d images did not arrive in any transfer syntax getscu can propose",
                     study_uid, len(missing))
        return combine_results(results, len(missing))

    def _get_instances(self, study_uid, instances, out_dir, option):
        """IMAGE-level C-GETs of ``instances`` ({SOP UID: series UID}) proposing ``option``, series by series.

        One request per getscu run: getscu 3.6.7 fails after the last of
        several query files.  The keys go in a query file, not on the command
        line: a series' list of SOP Instance UIDs can be long.
        """
        by_series = {}
        for uid, series in sorted(instances.items()):
            by_series.setdefault(series, []).append(uid)
        results = []
        with tempfile.TemporaryDirectory(prefix="get-", dir=os.path.dirname(out_dir)) as scratch:
            for series, uids in sorted(by_series.items()):
                for start in range(0, len(uids), GET_BATCH):
                    query = os.path.join(scratch, "query-%d" % len(results))
                    write_query(query, [("0008,0052", "IMAGE"), ("0020,000D", study_uid), ("0020,000E", series),
                                        ("0008,0018", "\\".join(uids[start:start + GET_BATCH]))])
                    results.append(self._get([], out_dir, option, "C-GET of %d images of study %s (%s)"
                                             % (len(uids[start:start + GET_BATCH]), study_uid, option), query))
        return results

    def _get(self, keys, out_dir, option, what, query=None):
        command = [self.tool("getscu"), "-v", "-S", "-od", out_dir] + ([option] if option else [])
        return self._retrieve(what, command, [], parse_get_output, keys, [query] if query else [])

    def _retrieve(self, what, command, extra, parse, keys, files=()):
        """Run a retrieve SCU with ``keys`` (-k) or query ``files``; its final response or the error.

        Over TLS through the tunnel where the tool has no +tls: then what
        the tunnel said comes first in the output the failure is read from.
        """
        with self._route(command[0]) as (peer, tunnel):
            args = command + association_args(self.our_ae, peer, self.find_timeout) + extra
            for key, value in keys:
                args += ["-k", "%s=%s" % (key, value)]
            result = self._run(args, self.move_timeout, what, list(files), peer)
        final = parse(result.output)
        if final is None:
            said = tunnel.said() if tunnel else ""
            raise_for_failure(said + result.output, self.peer, what, calling_ae=self.our_ae)
        return final

    @contextmanager
    def _route(self, tool):
        """(the peer as ``tool`` reaches it, the tunnel's session or None) for the length of the block."""
        if not self.peer.tls or tls.native(tool):
            yield self.peer, None
            return
        with self.tunnel.open() as session:
            yield self.peer.through(session.port), session

    def _run(self, args, timeout, what, files=(), peer=None):
        """Run a tool's association to the PACS (``peer``: the PACS as the tool reaches it): not with a
        certificate of ours that cannot be used now."""
        tls.check_certificate(self.peer.certificate)
        return process.run_step(args + address_args(peer or self.peer) + list(files), timeout,
                                "%s: %s" % (what, self.peer))


def study_keys(study_uid):
    """The keys of a STUDY-level retrieve: the Study Instance UID alone."""
    return [("QueryRetrieveLevel", "STUDY"), ("StudyInstanceUID", study_uid)]


def missing_instances(manifest, out_dir):
    """{SOP UID: series UID} of the manifest's instances that getscu has not written to ``out_dir``.

    getscu names each file it receives <modality>.<SOP Instance UID>; the
    received files themselves are read and checked later (retrieval.verify).
    """
    arrived = {name.split(".", 1)[1] for name in os.listdir(out_dir) if "." in name}
    return {uid: series for uid, series in manifest.items() if uid not in arrived}


def combine_results(results, missing):
    """One result for several C-GETs of a study: their counts added, failed the instances still ``missing``."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    completed = sum(result.completed or 0 for result in results)
    warning = sum(result.warning or 0 for result in results)
    if missing:
        return MoveResult(first.status or 0xB000, "%s; %d images did not arrive in any transfer syntax proposed"
                          % (first.status_text, missing), completed, missing, warning)
    return MoveResult(0x0000, "Success, %d C-GETs" % len(results), completed, 0, warning)


def write_query(path, elements):
    """A query data set for getscu: ``elements`` (tag "gggg,eeee", text value) in tag order, Implicit VR LE.

    Four text elements need no library: each is its tag, its length and its
    value padded to even length (with NUL for UIDs, the only kind ending odd here).
    """
    with open(path, "wb") as handle:
        for tag, value in sorted(elements):
            group, element = (int(part, 16) for part in tag.split(","))
            data = value.encode("ascii")
            if len(data) % 2:
                data += b"\0"
            handle.write(struct.pack("<HHI", group, element, len(data)) + data)


def _values(value):
    """A possibly multi-valued text element as a list of strings."""
    if value in (None, ""):
        return []
    if isinstance(value, str):
        return [value]
    return [str(item) for item in value]


def read_manifest(path, what="IMAGE-level C-FIND"):
    """The Manifest in findscu's single XML file of answers (-Xs), every UID in it checked
    (``manifest_answers``)."""
    manifest = Manifest()
    for uid, series, syntax in manifest_answers(path, what):
        manifest[uid] = series
        if syntax:
            manifest.syntaxes[uid] = syntax
    return manifest


def manifest_answers(path, what="IMAGE-level C-FIND"):
    """(SOP Instance UID, Series Instance UID, transfer syntax) of each answer in findscu's single XML file
    of answers (-Xs), yielded as read, every UID in it checked.

    A SOP Instance UID names a getscu file and goes into C-GET requests,
    a Series Instance UID too: each must be a UID (``checked_uid``).  An
    answer without a SeriesInstanceUID or AvailableTransferSyntaxUID is
    taken as it was (the PACS did not say: ""); one without a SOPInstanceUID
    is refused: it lists nothing.  Of several AvailableTransferSyntaxUIDs the
    first is taken, as before; all are checked.
    """
    values = {}
    parents = []  # the elements open around the one that ends
    for event, element in ElementTree.iterparse(path, events=("start", "end")):
        if event == "start":
            parents.append(element)
            continue
        parents.pop()
        tag = (element.get("tag") or "").lower()
        if element.tag == "element" and tag in MANIFEST_TAGS:
            values[tag] = (element.text or "").strip(" \t\r\n\0")
        elif element.tag == "data-set":
            uid = checked_uid(values.get(SOP_INSTANCE_UID, ""), what, "SOPInstanceUID")
            series = values.get(SERIES_INSTANCE_UID, "")
            # one string for a series' images
            series = sys.intern(series and checked_uid(series, what, "SeriesInstanceUID"))
            syntax = ""
            if values.get(TRANSFER_SYNTAX):  # 1-n: the first is the one it is stored in
                syntaxes = [checked_uid(syntax, what, "AvailableTransferSyntaxUID")
                            for syntax in values[TRANSFER_SYNTAX].split("\\")]
                syntax = sys.intern(syntaxes[0])
            values = {}
            if parents:  # gone once read: 50,000 answers kept as a tree would outweigh the manifest
                parents[-1].remove(element)
            yield uid, series, syntax


_FINAL_FIND = re.compile(r"Received Final Find Response \((?P<status>[^)]*)\)")
_FINAL = re.compile(r"Received Final Move Response")
_COUNT = re.compile(r"(?P<kind>Completed|Failed|Warning) Suboperations\s*:\s*(?P<value>\d+|none)")
_STATUS = re.compile(r"DIMSE Status\s*:\s*0x(?P<code>[0-9a-fA-F]{4}):\s*(?P<text>.*)")


def parse_move_output(output):
    """The final C-MOVE response from ``movescu -d`` output, or None if none came."""
    final = None
    for match in _FINAL.finditer(output):
        final = match
    if final is None:
        return None
    counts = {"Completed": None, "Failed": None, "Warning": None}
    for match in _COUNT.finditer(output, final.end()):
        value = match.group("value")
        counts[match.group("kind")] = None if value == "none" else int(value)
    status = _STATUS.search(output, final.end())
    if status is None:
        return None
    return MoveResult(
        int(status.group("code"), 16), status.group("text").strip(),
        counts["Completed"], counts["Failed"], counts["Warning"],
    )


_GET_RESPONSE = re.compile(r"^I: Received C-GET Response \((?P<text>[^)]*)\)", re.M)
_GET_COUNT = re.compile(r"Number of (?P<kind>Completed|Failed|Warning) Suboperations\s*:\s*(?P<value>\d+)")
_GET_STATUS = {"Success": 0x0000, "Warning": 0xB000, "Cancel": 0xFE00}


def parse_get_output(output):
    """The final C-GET response from ``getscu -v`` output, or None if none came.

    getscu names the final status in words and then prints its counts in a
    "Final status report"; the status code is derived from the words
    (anything but Success, Warning or Cancel is taken as a failure).
    """
    final = None
    for match in _GET_RESPONSE.finditer(output):
        if match.group("text") != "Pending":
            final = match
    if final is None:
        return None
    text = final.group("text")
    counts = {"Completed": None, "Failed": None, "Warning": None}
    for match in _GET_COUNT.finditer(output, final.end()):
        counts[match.group("kind")] = int(match.group("value"))
    status = _GET_STATUS.get(text.split(":")[0].strip(), 0xC000)
    return MoveResult(status, text, counts["Completed"], counts["Failed"], counts["Warning"])
