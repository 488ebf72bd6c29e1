"""What arrived: the record of one received object, and reading it.

Everything after the retrieval (the checks of SPEC §3, the PDI layout, the
DICOMDIR, the media profile, the web content) reads a received file's
header fields from its ``ReceivedFile``, made once here: by the C scan of
``fastcopy`` where it can, else by pydicom, the two decoded alike.
"""

import array
import bisect
import dataclasses
import itertools
import os
import sys
import threading
from typing import Optional, Tuple

import pydicom
import pydicom.charset
from pydicom.valuerep import PersonName

from .. import errors, fastcopy
from . import identity

# What a disc needs from each image: the §3 checks, the PDI layout and the DICOMDIR records.
# In tag order: mkiso._fastcopy.WANTED_TAGS lists the same tags.
HEADER_TAGS = [
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "Modality", "StudyDescription", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
    "PatientSex", "StudyInstanceUID", "SeriesInstanceUID", "StudyID", "SeriesNumber", "InstanceNumber",
]


@dataclasses.dataclass(slots=True)
class ReceivedFile:
    """An image as received, with the header fields read once for everything after.

    Plain strings, not the pydicom dataset, in slots, and the values that
    files share (the patient's, the study's, the series', the classes) one
    string for all of them (``_received``): fifty thousand of these stay
    small (SPEC §8, flat memory).  The same for what a study's files have
    in common beyond single strings: the folder of ``path`` (a record keeps
    its file's name), and the patient's and study's values of ``SHARED``,
    one tuple for all the files that agree on them (``_shared``).
    """

    path: dataclasses.InitVar[str]
    patient_id: str
    study_uid: str
    series_uid: str
    series_number: Optional[int]
    instance_number: Optional[int]
    sop_uid: str
    sop_class_uid: str = ""
    transfer_syntax: str = ""
    charset: dataclasses.InitVar[Tuple[str, ...]] = ()
    patient_name: dataclasses.InitVar[str] = ""
    issuer: dataclasses.InitVar[str] = ""  # IssuerOfPatientID: with patient_id, the patient (``identity``)
    birth_date: dataclasses.InitVar[str] = ""
    sex: dataclasses.InitVar[str] = ""
    study_date: dataclasses.InitVar[str] = ""
    study_time: dataclasses.InitVar[str] = ""
    study_description: dataclasses.InitVar[str] = ""
    study_id: dataclasses.InitVar[str] = ""
    accession: dataclasses.InitVar[str] = ""
    modality: str = ""
    _folder: str = dataclasses.field(init=False, default="")
    _name: str = dataclasses.field(init=False, default="")
    _shared: tuple = dataclasses.field(init=False, default=())  # the values of SHARED, in that order

    def __post_init__(self, path, *shared):
        folder, self._name = os.path.split(path)
        self._folder = sys.intern(folder)
        if len(_SHARED) >= _SHARED_MAX:  # a long-running server meets many studies: start again
            _SHARED.clear()
        self._shared = _SHARED.setdefault(shared, shared)

    @property
    def patient(self):
        """Whose image this is (``identity.Patient``): what the disc's PATIENT records and a print's
        associations group by."""
        return identity.of_file(self)

    def moved_to(self, folder):
        """The record of the same file, moved with its folder to ``folder`` (the receiver's folder of a
        study becomes its retrieval's)."""
        self._folder = sys.intern(folder)
        return self


SHARED = ("charset", "patient_name", "issuer", "birth_date", "sex", "study_date", "study_time",
          "study_description", "study_id", "accession")
_SHARED, _SHARED_MAX = {}, 1024  # values of SHARED -> the one tuple of them the records hold
ReceivedFile.path = property(lambda self: os.path.join(self._folder, self._name),
                             doc="The file's path (given where the record is made, or to ``dataclasses.replace``).")
for _at, _keyword in enumerate(SHARED):
    setattr(ReceivedFile, _keyword, property(lambda self, at=_at: self._shared[at]))


def read_received(path):
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except Exception as exc:  # pydicom raises many kinds on a broken file
        raise errors.UpstreamFailed(
            "A received image could not be read as DICOM (%s); the disc was not made." % exc,
            code="bad_image")
    charset = header.get("SpecificCharacterSet") or ()
    charset = (str(charset),) if isinstance(charset, str) else tuple(str(value) for value in charset)
    identity.check_charset(charset)  # before a name is decoded with it
    meta = getattr(header, "file_meta", None)
    return _received(
        path, {keyword: _text(header, keyword) for keyword in HEADER_TAGS},
        str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else "", charset)


def _received(path, text, transfer_syntax, charset):
    """A ReceivedFile from the header's values as text, by keyword (both readers end here).

    Every value but the file's own (path, SOP Instance UID, numbers) is
    interned: thousands of files share one string each.
    """
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID"):
        if "\ufffd" in text[keyword]:  # not text in its character set: two names could read as one
            raise errors.UpstreamFailed(
                "A received image's %s cannot be read in its SpecificCharacterSet; the disc was not made."
                % keyword, code="bad_image")
    shared = {keyword: sys.intern(value) for keyword, value in text.items() if keyword not in OWN}
    return ReceivedFile(
        path=path,
        patient_id=shared["PatientID"],
        study_uid=shared["StudyInstanceUID"],
        series_uid=shared["SeriesInstanceUID"],
        series_number=integer(text["SeriesNumber"]),
        instance_number=integer(text["InstanceNumber"]),
        sop_uid=text["SOPInstanceUID"],
        sop_class_uid=shared["SOPClassUID"],
        transfer_syntax=sys.intern(transfer_syntax),
        charset=_CHARSETS.setdefault(charset, charset),
        patient_name=shared["PatientName"],
        issuer=shared["IssuerOfPatientID"],
        birth_date=shared["PatientBirthDate"],
        sex=shared["PatientSex"],
        study_date=shared["StudyDate"],
        study_time=shared["StudyTime"],
        study_description=shared["StudyDescription"],
        study_id=shared["StudyID"],
        accession=shared["AccessionNumber"],
        modality=shared["Modality"],
    )


_CHARSETS = {}  # one tuple for each character set seen (a handful)
OWN = {"SOPInstanceUID", "SeriesNumber", "InstanceNumber"}  # each file's own: not interned


def _text(header, keyword):
    return str(header.get(keyword, "") or "")


# The VR of each HEADER_TAGS entry, for decoding what the C scan found.
PERSON, TEXT = "PN", "text"
TEXT_DELIMITERS = {0x0D, 0x0A, 0x09, 0x0C}  # pydicom's for text VRs
_KINDS = {"PatientName": PERSON, "AccessionNumber": TEXT, "StudyDescription": TEXT, "PatientID": TEXT,
          "IssuerOfPatientID": TEXT, "StudyID": TEXT}


def read_all(paths):
    """Every file's header fields (the files of the iterable ``paths``, in its order): from the C scan
    where it could, else from pydicom.

    The scan only finds the bytes; they are decoded here as pydicom decodes
    them (the tests hold the two paths equal), and anything unusual, such
    as a multi-valued field, is left to pydicom.  SCAN_CHUNK files at a
    time, taken from ``paths`` as they are read: the raw values of a whole
    study at once would cost more than the records made of them, and so
    would a list of all its paths (9 MB at 50,000 images, beside the records
    being made: SPEC §8); ``in_path_order`` sorts the records instead.
    """
    files, paths = [], iter(paths)
    while chunk := list(itertools.islice(paths, SCAN_CHUNK)):
        files += [_decode_scan(path, raw) or read_received(path)
                  for path, raw in zip(chunk, fastcopy.scan_headers(chunk), strict=True)]
    return files


def in_path_order(files):
    """Sort the records ``files`` by their paths' folder and name, which they hold: no path is made."""
    files.sort(key=lambda received: (received._folder, received._name))


SCAN_CHUNK = 1000


class Early:
    """The records of files read as they arrived (``add``), for the check after the last one (``take``).

    The reading that makes each file's digest (``digests.follow``) makes
    its record too, on the core the transfer leaves idle: the check then
    reads only what was not done by then.  A record is taken only for the
    file it was made from, unchanged: the same inode, size, modification
    and status change times.  A file whose status alone changed (rewritten
    with its time set back: no one but a process with the service's rights
    can) is read again, and ``forget(path)`` is told, where set: what else
    was made of it as it arrived (its kept digest, ``digests.forget``) is
    not to be trusted either; the disc's read-back takes that digest for
    an image unchanged since (``verify``).  Kept in arrays beside the
    records: 40 bytes a file more while the study arrives, no dictionary
    of 50,000 entries.
    """

    STATS = 4  # inode, size, modification and status change times (ns) of each record's file

    def __init__(self):
        self._lock = threading.Lock()
        self._records = []
        self._stats = array.array("q")  # STATS numbers per record
        self._closed = False
        self.forget = None  # set by whoever made more of the files as they arrived (steps: digests.forget)

    def add(self, path):
        """Read the header of the file at ``path`` (just digested), unless the check has begun."""
        try:
            found = os.stat(path)
            [record] = read_all([path])
        except (OSError, errors.MkisoError):
            return  # the check reads it, and says what is wrong with it
        with self._lock:
            if not self._closed:
                self._records.append(record)
                self._stats.extend((found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns))

    def take(self, paths):
        """The records of the files of the iterable ``paths`` (in its order, any order): made early where
        that still holds, else read now.  No record is added after this.

        Each path's early record is found by its name among them sorted
        (a sorted list of numbers, not a table of names: SPEC §8)."""
        with self._lock:
            self._closed = True
            records, stats, self._records, self._stats = self._records, self._stats, [], array.array("q")
        def name_of(at):
            return records[at]._name

        order = sorted(range(len(records)), key=name_of)
        taken, late = [], []
        for path in paths:
            folder, name = os.path.split(path)
            found = bisect.bisect_left(order, name, key=name_of)
            at = order[found] if found < len(order) else None
            if at is not None and records[at]._name == name:
                unchanged = _unchanged(path, stats[self.STATS * at:self.STATS * (at + 1)])
                if unchanged:
                    taken.append(records[at].moved_to(folder))
                    continue
                if unchanged is None and self.forget is not None:
                    self.forget(path)
            late.append(path)
        return taken + read_all(late)


def _unchanged(path, stat):
    """True when the file at ``path`` has the identity ``stat`` (``Early.STATS``); None when only its
    status change time differs (its bytes rewritten, the time set back); False otherwise."""
    try:
        found = os.stat(path)
    except OSError:
        return False
    if (found.st_ino, found.st_size, found.st_mtime_ns) != tuple(stat[:3]):
        return False
    return True if found.st_ctime_ns == stat[3] else None


def _decode_scan(path, raw):
    """A ReceivedFile from the scan's raw values, or None to leave the file to pydicom."""
    if raw is None:
        return None
    syntax, values = raw
    found = dict(zip(HEADER_TAGS, values, strict=True))
    try:
        charset = ()
        if found["SpecificCharacterSet"]:
            charset = tuple(part.decode("ascii").strip(" \0") for part in found["SpecificCharacterSet"].split(b"\\"))
            if not all(identity.defined_charset(term) for term in charset):
                return None  # pydicom reads it, and refuses it (read_received)
        encodings = pydicom.charset.convert_encodings(list(charset) or None)
        fields = {}
        for keyword, value in found.items():
            kind = _KINDS.get(keyword)
            if value is None:
                fields[keyword] = ""
            elif b"\\" in value and keyword != "SpecificCharacterSet":
                return None  # multi-valued: as pydicom shows it
            elif kind == PERSON:
                fields[keyword] = str(PersonName(value.rstrip(b" \0"), encodings))
            elif kind == TEXT:
                fields[keyword] = pydicom.charset.decode_bytes(value, encodings, TEXT_DELIMITERS).rstrip("\0 ")
            else:
                fields[keyword] = value.decode("ascii").strip("\0 ")
    except (UnicodeDecodeError, LookupError, ValueError):
        return None
    return _received(path, fields, syntax.decode("ascii", "replace").rstrip("\0 "), charset)


def integer(value):
    """A header value as an int; None where it is missing or not a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
