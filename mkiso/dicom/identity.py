"""Whose images these are (SPEC §3.8, §3.10): the patient of a study and of a file, compared as DICOM means it.

A PatientID alone does not name a patient: two hospitals (or a hospital
and its clinic) hand out the same IDs, and IssuerOfPatientID says whose ID
it is.  A disc holding another patient's images harms a patient, so two
studies count as one patient only when all they say of the patient agrees:
PatientID, IssuerOfPatientID, name, birth date and sex.  The check before a
disc (one patient, or ``limits.allow_multi_patient``), the disc's PATIENT
records and the print's one association per patient all group by that
``Patient``.  The check runs on the C-FIND answers (before anything is
retrieved) and again on the received files: an answer that leaves an
attribute out compares nothing there, the files still tell.

A file must also say what the PACS says: a PACS that corrected a name in
its database may still send files with the old one, and a disc whose
DICOMDIR and images say one name while the file name and the desk say
another is the wrong disc.  Values are compared as text (each side decoded
with its own SpecificCharacterSet before it gets here), trailing spaces and
empty trailing name components ignored, as PS3.5 6.2 and 6.2.1 make them
insignificant.
"""

import dataclasses
import functools
import re
import unicodedata

import pydicom.charset

from .. import errors

# The patient's attributes a file must share with the C-FIND answer (SPEC §3.8), and the
# ``Patient`` field of each.
PATIENT_ATTRIBUTES = (
    ("PatientID", "patient_id"),
    ("IssuerOfPatientID", "issuer"),
    ("PatientName", "name"),
    ("PatientBirthDate", "birth_date"),
    ("PatientSex", "sex"),
)


@dataclasses.dataclass(frozen=True)
class Patient:
    """One patient, as significant text: equal Patients are the same patient, a dict key groups by it."""

    patient_id: str
    issuer: str = ""
    name: str = ""
    birth_date: str = ""
    sex: str = ""


def of_study(study):
    """The patient a STUDY-level C-FIND answer names (``pacs.Study``: its ID and name, the rest from
    its ``identity``)."""
    said = dict(study.identity, PatientID=study.patient_id, PatientName=study.patient_name)
    return _patient(*(said.get(keyword, "") for keyword, _ in PATIENT_ATTRIBUTES))


def of_file(received):
    """The patient a received file names (``received.ReceivedFile``)."""
    return _patient(received.patient_id, received.issuer, received.patient_name, received.birth_date,
                    received.sex)


@functools.lru_cache(maxsize=256)
def _patient(*values):
    """The ``Patient`` of the values of PATIENT_ATTRIBUTES, in that order.  Cached: the files of a study
    share their (interned) values, so fifty thousand files cost a handful."""
    return Patient(*(significant(keyword, value) for (keyword, _), value in zip(PATIENT_ATTRIBUTES, values,
                                                                               strict=True)))


def significant(keyword, value):
    """``value`` without what PS3.5 makes insignificant: surrounding spaces; for a name, the spaces
    around each component and empty trailing components and groups (``DOE^JOHN^^`` is ``DOE^JOHN``)."""
    value = (value or "").strip(" \0")
    if keyword != "PatientName":
        return value
    groups = [_trimmed([part.strip(" ") for part in group.split("^")], "^") for group in value.split("=")]
    return _trimmed(groups, "=")


def same_person_name(api_name, pacs_name):
    """Whether the patient API's name can stand for the PACS' ``pacs_name`` on a file name: it holds
    every word of the family name and, where there is one, a word of the given name, accents, case,
    order and separators aside (``Müller`` is ``MULLER`` and ``MUELLER``).  So the HIS's fuller
    "Mueller-Lüdenscheid, Jürgen" stands for ``MÜLLER^JÜRGEN``; another patient's name does not."""
    have = {variant for word in _words(api_name) for variant in word}
    components = (pacs_name or "").split("=")[0].split("^")
    family, given = _words(components[0]), _words(" ".join(components[1:2]))
    return (bool(family) and all(have & word for word in family)
            and (not given or any(have & word for word in given)))


_SPELLED_OUT = str.maketrans({"Ä": "AE", "Ö": "OE", "Ü": "UE", "ß": "SS"})


def _words(text):
    """Each word of ``text`` as the set of its folded spellings: accents dropped, or spelled out."""
    words = []
    for word in re.findall(r"\w+", (text or "").upper()):
        plain = "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))
        words.append({plain, unicodedata.normalize("NFC", word).translate(_SPELLED_OUT)})
    return words


def _trimmed(parts, separator):
    while parts and not parts[-1]:
        parts.pop()
    return separator.join(parts)


def check_file(answered, received, what):
    """502 ``patient_mismatch`` unless the file names the patient as the C-FIND answer did (``answered``,
    where it answered a value).  The error names the attribute and both values' lengths, never the
    values: they are patient data, and the message reaches the log."""
    found = of_file(received)
    if answered == found:
        return
    for keyword, field in PATIENT_ATTRIBUTES:
        said, have = getattr(answered, field), getattr(found, field)
        if said and said != have:
            raise errors.UpstreamFailed(
                "An image received for %s names the patient otherwise than the PACS' C-FIND answer: its %s "
                "(%d characters) is not the PACS' (%d characters). The PACS may have corrected the patient "
                "in its database but not in its stored images; the disc was not made."
                % (what, keyword, len(have), len(said)), code="patient_mismatch")


def check_one_patient(studies, allowed):
    """409 when the studies belong to more than one patient (unless ``allowed``): a disc holds one."""
    _one_patient({of_study(study) for study in studies}, studies, allowed,
                 "The accession numbers %s belong to %d different patients%s; one disc holds one patient.")


def check_files_one_patient(files, studies, allowed):
    """409 when the received files name more than one patient (unless ``allowed``), whatever the C-FIND
    answers said: a PACS that left a value out of them (dcmqrscp never answers IssuerOfPatientID; a
    blank PatientName) compared nothing there, and two patients' files would share a disc, its PATIENT
    record or a print's association."""
    _one_patient({received.patient for received in files}, studies, allowed,
                 "The images of accession numbers %s name %d different patients%s (the PACS' answers did not "
                 "say so: they left the attribute that tells them apart out); one disc holds one patient.")


def _one_patient(patients, studies, allowed, sentence):
    """The 409 of both checks: ``sentence`` with the accessions, the count and which share an ID."""
    if len(patients) > 1 and not allowed:
        ids = {patient.patient_id for patient in patients}
        shared = " (%d of them share a Patient ID but differ in its issuer, name, birth date or sex)" % (
            len(patients) - len(ids) + 1) if len(ids) < len(patients) else ""
        raise errors.Conflict(sentence % (", ".join(sorted({study.accession for study in studies})),
                                          len(patients), shared))


# PS3.3 C.12.1.1.2's defined terms, as pydicom knows them ('' is the default repertoire).
_CHARSETS = frozenset(pydicom.charset.python_encoding)
# What pydicom mends with a warning (``ISO-IR 100``, ``ISO 2022-IR 6``), as scanners write them.
_MENDED = ((re.compile(r"^ISO[^_]IR"), "ISO_IR"), (re.compile(r"^ISO.2022.IR."), "ISO 2022 IR "))


def check_charset(terms):
    """502 ``bad_image`` unless every SpecificCharacterSet term is a defined term (SPEC §3.10): an
    unknown one would be read as something else later (a NUL for its first letter, kept by storescp,
    passed the header scan and failed the web content with a traceback)."""
    for term in terms:
        if not defined_charset(term):
            raise errors.UpstreamFailed(
                "A received image has a SpecificCharacterSet (0008,0005) that is not a DICOM defined term "
                "(%d characters); its names could not be read as written. The disc was not made."
                % len(term), code="bad_image")


def defined_charset(term):
    mended = term
    for pattern, prefix in _MENDED:
        mended = pattern.sub(prefix, mended, count=1)
    return term in _CHARSETS or mended in _CHARSETS
