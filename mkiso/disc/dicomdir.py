"""The DICOMDIR, written in process in linear time (PS3.10 §7.3, PS3.3 F.5).

dcmmkdir grows with the square of the file count (2,000 images 2.6 s,
8,000 about two minutes) and pydicom's FileSet is slower still.  Yet
everything a DICOMDIR holds was read already, once per image, for the
retrieval checks: so the records are made from those header fields, each
record is encoded once by pydicom, and the offsets are computed in one pass
and patched into the encoded records (they are fixed-size UL values, so
patching never moves a byte).

IMAGE records, nearly all of them, hold only ASCII values (UIDs, code
strings, a number) and are encoded directly, byte for byte as pydicom
encodes them (the tests hold the two equal); PATIENT, STUDY and SERIES
records, which carry names in their character sets, are pydicom's.

The records are those ``dcmmkdir +I`` writes for the general-purpose
profile: PATIENT (PatientName, PatientID), STUDY (StudyDate, StudyTime,
AccessionNumber, StudyDescription, StudyInstanceUID, StudyID), SERIES
(Modality, SeriesInstanceUID, SeriesNumber) and IMAGE (ReferencedFileID,
the referenced SOP class, instance and transfer syntax, InstanceNumber),
with SpecificCharacterSet on the records that carry text.  (dcmmkdir also
copies an image's ImageType into its IMAGE record, a key PS3.3 F.5 does not
have for these profiles: dciodvfy warns of it in dcmmkdir's own DICOMDIR.)
Objects that are not images (dose reports, key images, presentation
states, PDFs: a handful a study) get the record their SOP class calls for
(``mkiso.disc.records``), with keys read from the file by pydicom when the
DICOMDIR is written: the per-image cost stays where it is.  A missing
StudyID, SeriesNumber or InstanceNumber is invented (from the disc's own
numbering), never a reason to drop an image.  ``iso.dicomdir: dcmmkdir``
keeps the tool instead; the tests use it as the oracle.
"""

import struct

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .. import __version__, errors
from . import records as record_types

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1"  # pydicom's root, as pydicom itself uses
PREAMBLE = b"\0" * 128 + b"DICM"
ITEM = b"\xfe\xff\x00\xe0"
RECORD_SEQUENCE = b"\x04\x00\x20\x12SQ\0\0"
# In an explicit VR little endian record the three offsets come first (group 0004 sorts first):
# (0004,1400) UL next, (0004,1410) US in-use flag, (0004,1420) UL lower level; values at these bytes.
NEXT_AT, LOWER_AT = 8, 30
NEXT_TAG, LOWER_TAG = b"\x04\x00\x00\x14UL", b"\x04\x00\x20\x14UL"


def _encode(dataset):
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def _record(kind, charset=()):
    record = Dataset()
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = kind
    if charset:
        record.SpecificCharacterSet = list(charset) if len(charset) > 1 else charset[0]
    return record


def patient_record(image):
    record = _record("PATIENT", image.charset)
    record.PatientName = image.patient_name
    record.PatientID = image.patient_id
    return record


def study_record(image, number):
    record = _record("STUDY", image.charset)
    record.StudyDate = image.study_date
    record.StudyTime = image.study_time
    record.AccessionNumber = image.accession
    record.StudyDescription = image.study_description
    record.StudyInstanceUID = image.study_uid
    record.StudyID = image.study_id or "STU%05d" % number
    return record


def series_record(image, number):
    record = _record("SERIES")
    record.Modality = image.modality or "OT"
    record.SeriesInstanceUID = image.series_uid
    record.SeriesNumber = image.series_number if image.series_number is not None else number
    return record


def _referencing(kind, image, disc_path, charset=()):
    record = _record(kind, charset)
    record.ReferencedFileID = disc_path.split("/")
    record.ReferencedSOPClassUIDInFile = image.sop_class_uid
    record.ReferencedSOPInstanceUIDInFile = image.sop_uid
    record.ReferencedTransferSyntaxUIDInFile = image.transfer_syntax
    return record


def image_record(image, disc_path, number):
    record = _referencing("IMAGE", image, disc_path)
    record.InstanceNumber = image.instance_number if image.instance_number is not None else number
    return record


def object_record(received, disc_path, number):
    """The record of an object that is not an image (SR DOCUMENT, PRESENTATION, ENCAP DOC, PRIVATE, ...).

    Its keys (``records.KEYS``) are read from the file itself by pydicom:
    a handful of files a study, and the SR's concept name and the
    presentation state's series references are sequences the header scan
    does not take on.  Values over 4 KB (a PDF, waveform or raw data, a
    dose grid's pixels) are not read, so memory stays flat.  A type 1 key
    without a value is an error naming it, as dcmmkdir refuses such a file;
    only InstanceNumber is invented.
    """
    kind = record_types.record_type(received.sop_class_uid)
    dataset = pydicom.dcmread(received.path, force=True, stop_before_pixels=True, defer_size=4096)
    charset = dataset.get("SpecificCharacterSet") or ()
    record = _referencing(kind, received, disc_path, (charset,) if isinstance(charset, str) else tuple(charset))
    if kind == record_types.PRIVATE:
        record.PrivateRecordUID = received.sop_class_uid  # PS3.3 F.5: the private record's kind is its class
    for keyword, required in record_types.KEYS[kind]:
        present = keyword in dataset
        if present and not dataset[keyword].is_empty:
            record[keyword] = dataset[keyword]
        elif keyword == "InstanceNumber" and required == 1:
            record.InstanceNumber = number
        elif required == 1:
            raise errors.UpstreamFailed(
                "An object of SOP class %s has no %s, which its %s record needs; the disc was not made."
                % (received.sop_class_uid, keyword, kind), code="bad_image")
        elif required == 2:
            setattr(record, keyword, [] if dictionary_VR(keyword) == "SQ" else None)
    if kind in ("SR DOCUMENT", "KEY OBJECT DOC"):
        _add_document_keys(record, dataset)
    if kind == "PRESENTATION" and dataset.get("BlendingSequence"):
        blending = []
        for item in dataset.BlendingSequence[:2]:
            copied = Dataset()
            for keyword in ("StudyInstanceUID", "ReferencedSeriesSequence"):
                if keyword in item:
                    copied[keyword] = item[keyword]
            blending.append(copied)
        record.BlendingSequence = blending
    return record


def _add_document_keys(record, dataset):
    """An SR's verification time (1C: when VERIFIED) and the items that modify its title (1C), as F.5 asks."""
    if record.get("VerificationFlag") == "VERIFIED":
        observers = dataset.get("VerifyingObserverSequence") or []
        if not observers or not observers[-1].get("VerificationDateTime"):
            raise errors.UpstreamFailed("A verified SR document has no VerificationDateTime; the disc was not made.",
                                        code="bad_image")
        record.VerificationDateTime = observers[-1].VerificationDateTime
    modifiers = [item for item in dataset.get("ContentSequence") or []
                 if item.get("RelationshipType") == "HAS CONCEPT MOD"]
    if modifiers:
        record.ContentSequence = modifiers


def _short_element(group, element, vr, value):
    """An explicit VR little endian element with a 2-byte length, padded as pydicom pads."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


IMAGE_RECORD_START = (struct.pack("<HH2sHI", 0x0004, 0x1400, b"UL", 4, 0)
                      + struct.pack("<HH2sHH", 0x0004, 0x1410, b"US", 2, 0xFFFF)
                      + struct.pack("<HH2sHI", 0x0004, 0x1420, b"UL", 4, 0)
                      + _short_element(0x0004, 0x1430, b"CS", b"IMAGE"))


def encode_image_record(image, disc_path, number):
    """The IMAGE record's bytes, as ``_encode(image_record(...))`` gives them, only faster."""
    try:
        instance = image.instance_number if image.instance_number is not None else number
        return b"".join((
            IMAGE_RECORD_START,
            _short_element(0x0004, 0x1500, b"CS", disc_path.replace("/", "\\").encode("ascii")),
            _short_element(0x0004, 0x1510, b"UI", image.sop_class_uid.encode("ascii")),
            _short_element(0x0004, 0x1511, b"UI", image.sop_uid.encode("ascii")),
            _short_element(0x0004, 0x1512, b"UI", image.transfer_syntax.encode("ascii")),
            _short_element(0x0020, 0x0013, b"IS", str(instance).encode("ascii")),
        ))
    except UnicodeEncodeError:  # not a valid UID: let pydicom encode what it can
        return _encode(image_record(image, disc_path, number))


def records(placed):
    """(level, encoded record) in depth-first order for images laid out by ``tree.pdi_paths``.

    ``placed`` is [(received file, disc path)] grouped by patient, study and
    series in that order, so new records start at the first key that changes.
    Levels: 0 PATIENT, 1 STUDY, 2 SERIES, 3 the object's own (IMAGE, SR
    DOCUMENT, ...).  The numbers (for invented values) count within the
    parent, as the disc's folder names do.
    """
    makers = (lambda image, number: patient_record(image), study_record, series_record)
    last = None
    numbers = [0, 0, 0, 0]
    for image, disc_path in placed:
        keys = (image.patient, image.study_uid, image.series_uid)
        changed = 0 if last is None else next((level for level in range(3) if keys[level] != last[level]), 3)
        for level in range(changed, 3):
            numbers[level] += 1
            numbers[level + 1:] = [0] * (3 - level)
            yield level, _encode(makers[level](image, numbers[level]))
        last = keys
        numbers[3] += 1
        if record_types.RECORD_TYPES.get(image.sop_class_uid) == record_types.IMAGE:  # the fast path
            yield 3, encode_image_record(image, disc_path, numbers[3])
        else:
            yield 3, _encode(object_record(image, disc_path, numbers[3]))


def _file_set(first, last, file_set_id):
    file_set = Dataset()
    file_set.FileSetID = file_set_id  # the ISO's Volume Identifier (PS3.12 F.1.1; SPEC §4.2)
    file_set.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = first
    file_set.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = last
    file_set.FileSetConsistencyFlag = 0
    return _encode(file_set)


def _file_meta():
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MEDIA_STORAGE_DIRECTORY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = ("MKISO_" + __version__)[:16]
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_file_meta_info(buffer, meta)
    return buffer.getvalue()


def write(path, placed, file_set_id="MKISO"):
    """Write the DICOMDIR for ``placed`` ([(received file, disc path)] in PDI order) to ``path``.

    Streamed, so that memory stays flat at any image count: each record is
    written as soon as the next one is known.  A record's lower-level link
    points at the record right after it (its first child), and an IMAGE
    record's next-sibling link at the next record, so both are set before
    it is written; only the next-sibling links of PATIENT, STUDY and SERIES
    records (a few per disc) are patched in the file at the end, with the
    File-set's root offsets and the sequence's length.
    """
    meta = _file_meta()  # once: a new UID could change its length and every offset after it
    head = PREAMBLE + meta + _file_set(0, 0, file_set_id)  # fixed-size offsets: patched in place at the end
    start = position = len(head) + len(RECORD_SEQUENCE) + 4
    last_at_level = [None, None, None, None]  # file offsets of the last record at each level
    patches = []  # (file offset, value) of links to set at the end
    roots = []
    held = held_at = None  # the record before this one, written once this one's links are set
    with open(path, "wb") as handle:
        handle.write(head + RECORD_SEQUENCE + b"\0\0\0\0")
        for level, item in records(placed):
            if item[:6] != NEXT_TAG or item[22:28] != LOWER_TAG:
                raise AssertionError("a directory record does not start with its offsets")
            # A record links from its previous sibling, or, the first under its parent, from the parent.
            previous = last_at_level[level]
            if previous == held_at and previous is not None:
                struct.pack_into("<I", held, NEXT_AT, position)
            elif previous is not None:
                patches.append((previous + 8 + NEXT_AT, position))
            elif level > 0:
                if last_at_level[level - 1] != held_at:
                    raise AssertionError("a first directory record does not follow its parent")
                struct.pack_into("<I", held, LOWER_AT, position)
            if held is not None:
                handle.write(ITEM + struct.pack("<I", len(held)))
                handle.write(held)
            held, held_at = bytearray(item), position
            last_at_level[level] = position
            last_at_level[level + 1:] = [None] * (3 - level)
            if level == 0:
                roots.append(position)
            position += 8 + len(item)
        handle.write(ITEM + struct.pack("<I", len(held)))
        handle.write(held)
        for at, value in patches:
            handle.seek(at)
            handle.write(struct.pack("<I", value))
        handle.seek(len(PREAMBLE + meta))
        handle.write(_file_set(roots[0], roots[-1], file_set_id))
        handle.write(RECORD_SEQUENCE + struct.pack("<I", position - start))
