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
"""

import logging
import os
import re
import tempfile
import xml.etree.ElementTree as ElementTree

import pydicom

from . import errors, process

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


class Peer:
    """A DICOM application entity we call: its AE title, host and port."""

    def __init__(self, name, ae_title, host, port):
        self.name = name
        self.ae_title = ae_title
        self.host = host
        self.port = port

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


SOP_INSTANCE_UID = "0008,0018"
SERIES_INSTANCE_UID = "0020,000e"  # as dcmtk's XML writes tags: lower-case hex


def association_args(calling_ae, peer, timeout):
    """The arguments every dcmtk SCU call shares: AE titles, timeouts, address."""
    seconds = str(max(1, int(timeout)))
    return ["-aet", calling_ae, "-aec", peer.ae_title, "-to", seconds, "-ta", seconds]


def address_args(peer):
    return [peer.host, str(peer.port)]


def echo(tool, calling_ae, peer, timeout):
    """C-ECHO the peer; returns (ok, detail) for the health report."""
    args = [tool] + association_args(calling_ae, peer, timeout) + ["-td", str(max(1, int(timeout)))]
    try:
        result = process.run(args + address_args(peer), timeout + 5)
    except process.ToolTimeout:
        return False, "no answer from %s within %ss" % (peer, timeout)
    except process.ToolMissing as exc:
        return False, str(exc)
    if result.returncode == 0:
        return True, "C-ECHO to %s succeeded" % peer
    return False, "C-ECHO to %s failed: %s" % (peer, process.failure_reason(result.output))


def raise_for_failure(output, peer, what, code="pacs_failed"):
    """Turn a failed dcmtk run into 504 (timeout) or 502 (anything else)."""
    reason = process.failure_reason(output)
    if "timeout" in reason.lower() or "timed out" in reason.lower():
        raise errors.UpstreamTimeout("%s: %s did not answer in time (%s)." % (what, peer, reason))
    raise errors.UpstreamFailed("%s: %s failed: %s." % (what, peer, reason), code=code)


class Pacs:
    """The configured PACS, seen through findscu, movescu and echoscu."""

    def __init__(self, config):
        self.peer = Peer("PACS", config.pacs.ae_title, config.pacs.host, config.pacs.port)
        self.our_ae = config.receiver.ae_title
        self.dcmtk_dir = config.tools.dcmtk_dir
        self.find_timeout = config.timeouts.find_s
        self.move_timeout = config.timeouts.move_s
        self._told_no_manifest = False

    def tool(self, name):
        return os.path.join(self.dcmtk_dir, name)

    def echo(self):
        return echo(self.tool("echoscu"), self.our_ae, self.peer, self.find_timeout)

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
        """C-FIND at STUDY level with the accession number as an exact key."""
        answers = self._find("C-FIND for accession %s" % accession, scratch_dir, "STUDY",
                             [("AccessionNumber", accession)], FIND_KEYS)
        return [self._study(accession, answer) for answer in answers]

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
                raise_for_failure(result.output, self.peer, what)
            return [pydicom.dcmread(os.path.join(out_dir, name), force=True) for name in sorted(os.listdir(out_dir))]

    def list_instances(self, study_uid, scratch_dir):
        """The study's images from an IMAGE-level C-FIND (the manifest): {SOP UID: series UID}.

        None when the PACS refuses IMAGE-level queries (a failure status in
        its final response); any other failure is an error as usual.
        """
        what = "IMAGE-level C-FIND of study %s" % study_uid
        with tempfile.TemporaryDirectory(prefix="manifest-", dir=scratch_dir) as out_dir:
            answers = os.path.join(out_dir, "answers.xml")
            # -od too: findscu insists on a writable output directory even for -Xs, and the
            # service's working directory (/ under systemd) is not one.
            args = self._find_args(["-Xs", answers, "-od", out_dir], "IMAGE", [("StudyInstanceUID", study_uid)],
                                   ("SeriesInstanceUID", "SOPInstanceUID"))
            result = self._run(args, self.find_timeout, what)
            final = _FINAL_FIND.search(result.output)
            if final is None:
                raise_for_failure(result.output, self.peer, what)
            if final.group("status") != "Success":
                if not self._told_no_manifest:
                    self._told_no_manifest = True
                    log.warning("the PACS refuses IMAGE-level C-FIND (%s); retrievals are checked against "
                                "its counts only", final.group("status"))
                return None
            return read_manifest(answers)

    def _study(self, accession, answer):
        study_uid = str(answer.get("StudyInstanceUID", "") or "")
        found = str(answer.get("AccessionNumber", "") or "")
        if not study_uid or found != accession:
            raise errors.UpstreamFailed(
                "C-FIND for accession %s: the PACS answered with a study that does not match it." % accession,
                code="pacs_failed",
            )
        instances = answer.get("NumberOfStudyRelatedInstances")
        return Study(
            accession=accession,
            study_uid=study_uid,
            patient_id=str(answer.get("PatientID", "") or ""),
            patient_name=str(answer.get("PatientName", "") or ""),
            study_date=str(answer.get("StudyDate", "") or ""),
            instances=int(instances) if instances not in (None, "") else None,
            description=str(answer.get("StudyDescription", "") or ""),
            modalities=_values(answer.get("ModalitiesInStudy")),
            identity={key: str(answer.get(key, "") or "") for key in IDENTITY_KEYS},
        )

    def move_study(self, study_uid):
        """C-MOVE one study by StudyInstanceUID alone to our own receiver."""
        return self._retrieve_study("C-MOVE", [self.tool("movescu"), "-d", "-S"], ["-aem", self.our_ae],
                                    parse_move_output, study_uid)

    def get_study(self, study_uid, out_dir):
        """C-GET one study into ``out_dir`` over our own association: no port listens."""
        return self._retrieve_study("C-GET", [self.tool("getscu"), "-v", "-S", "-od", out_dir], [],
                                    parse_get_output, study_uid)

    def _retrieve_study(self, service, command, extra, parse, study_uid):
        """Run a retrieve SCU for one study; its final response (status, counts) or the error."""
        args = command + association_args(self.our_ae, self.peer, self.find_timeout) + extra
        args += ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=" + study_uid]
        what = "%s of study %s" % (service, study_uid)
        result = self._run(args, self.move_timeout, what)
        final = parse(result.output)
        if final is None:
            raise_for_failure(result.output, self.peer, what)
        return final

    def _run(self, args, timeout, what):
        return process.run_step(args + address_args(self.peer), timeout, "%s: %s" % (what, self.peer))


def _values(value):
    """A possibly multi-valued text element as a list of strings."""
    if value in (None, ""):
        return []
    if isinstance(value, str):
        return [value]
    return [str(item) for item in value]


def read_manifest(path):
    """{SOP Instance UID: Series Instance UID} from findscu's single XML file of answers (-Xs)."""
    manifest = {}
    values = {}
    for _, element in ElementTree.iterparse(path):
        tag = (element.get("tag") or "").lower()
        if element.tag == "element" and tag in (SOP_INSTANCE_UID, SERIES_INSTANCE_UID):
            values[tag] = (element.text or "").strip()
        elif element.tag == "data-set":
            manifest[values.get(SOP_INSTANCE_UID, "")] = values.get(SERIES_INSTANCE_UID, "")
            values = {}
            element.clear()
    return manifest


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
