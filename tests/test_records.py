"""The record type of each SOP class (mkiso.disc.records), held against the standard's table as dcmtk has it,
and the classes with no record under a study, left off a disc and said so (SPEC §4.1).

dcmmkdir is the oracle for the classes it knows: an object of each class of the
table, all put through dcmmkdir at once, gets the record type mkiso's table
names wherever dcmmkdir files it (it leaves out, with an error, what it
does not know).
"""

import os
import subprocess

import pydicom
import pytest
from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mkiso import demo, errors
from mkiso.dicom.received import ReceivedFile
from mkiso.disc import records
from conftest import DCMTK_DIR

PROTOCOL = "1.2.840.10008.5.1.4.1.1.200.2"  # CT Performed Procedure Protocol
PRIVATE = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image

# One class of every record type the table has, with the type PS3.3 F.4 gives it.
EXAMPLES = {
    "1.2.840.10008.5.1.4.1.1.2": "IMAGE",  # CT Image
    "1.2.840.10008.5.1.4.1.1.4.1": "IMAGE",  # Enhanced MR Image (multi-frame)
    "1.2.840.10008.5.1.4.1.1.3.1": "IMAGE",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.66.4": "IMAGE",  # Segmentation: an image, not a SURFACE
    "1.2.840.10008.5.1.4.1.1.77.1.6": "IMAGE",  # VL Whole Slide Microscopy Image
    "1.2.840.10008.5.1.4.1.1.88.11": "SR DOCUMENT",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22": "SR DOCUMENT",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33": "SR DOCUMENT",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34": "SR DOCUMENT",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.67": "SR DOCUMENT",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.76": "SR DOCUMENT",  # Enhanced X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.40": "SR DOCUMENT",  # Procedure Log
    "1.2.840.10008.5.1.4.1.1.88.59": "KEY OBJECT DOC",
    "1.2.840.10008.5.1.4.1.1.11.1": "PRESENTATION",  # Grayscale Softcopy PS
    "1.2.840.10008.5.1.4.1.1.11.4": "PRESENTATION",  # Blending Softcopy PS
    "1.2.840.10008.5.1.4.1.1.131": "PRESENTATION",  # Basic Structured Display
    "1.2.840.10008.5.1.4.1.1.104.1": "ENCAP DOC",  # PDF
    "1.2.840.10008.5.1.4.1.1.104.2": "ENCAP DOC",  # CDA
    "1.2.840.10008.5.1.4.1.1.104.3": "ENCAP DOC",  # STL
    "1.2.840.10008.5.1.4.1.1.104.4": "ENCAP DOC",  # OBJ
    "1.2.840.10008.5.1.4.1.1.104.5": "ENCAP DOC",  # MTL
    "1.2.840.10008.5.1.4.1.1.9.1.1": "WAVEFORM",  # 12-lead ECG
    "1.2.840.10008.5.1.4.1.1.9.4.1": "WAVEFORM",  # Basic Voice Audio
    "1.2.840.10008.5.1.4.1.1.481.2": "RT DOSE",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT STRUCTURE SET",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT PLAN",
    "1.2.840.10008.5.1.4.1.1.481.8": "RT PLAN",  # RT Ion Plan
    "1.2.840.10008.5.1.4.1.1.481.4": "RT TREAT RECORD",  # RT Beams Treatment Record
    "1.2.840.10008.5.1.4.1.1.481.1": "IMAGE",  # RT Image
    "1.2.840.10008.5.1.4.1.1.66": "RAW DATA",
    "1.2.840.10008.5.1.4.1.1.4.2": "SPECTROSCOPY",  # MR Spectroscopy
    "1.2.840.10008.5.1.4.1.1.66.1": "REGISTRATION",  # Spatial Registration
    "1.2.840.10008.5.1.4.1.1.66.3": "REGISTRATION",  # Deformable Spatial Registration
    "1.2.840.10008.5.1.4.1.1.66.2": "FIDUCIAL",
    "1.2.840.10008.5.1.4.1.1.66.5": "SURFACE",  # Surface Segmentation
    "1.2.840.10008.5.1.4.1.1.67": "VALUE MAP",  # Real World Value Mapping
    "1.2.840.10008.5.1.4.1.1.77.1.5.3": "STEREOMETRIC",  # Stereometric Relationship
    "1.2.840.10008.5.1.4.1.1.78.1": "MEASUREMENT",  # Lensometry
    "1.2.840.10008.5.1.4.1.1.68.1": "SURFACE SCAN",  # Surface Scan Mesh
    "1.2.840.10008.5.1.4.1.1.66.6": "TRACT",  # Tractography Results
    "1.2.840.10008.5.1.4.1.1.90.1": "ASSESSMENT",  # Content Assessment Results
    "1.2.840.10008.5.1.4.1.1.481.10": "RADIOTHERAPY",  # RT Physician Intent
    "1.2.840.10008.5.1.4.1.1.91.1": "ANNOTATION",  # Microscopy Bulk Simple Annotations
    "1.2.840.10008.5.1.4.34.7": "PLAN",  # RT Beams Delivery Instruction
    "1.2.840.10008.5.1.4.1.1.9.100.1": "WF PRESENTATION",  # Waveform Presentation State
}


@pytest.mark.parametrize("uid, kind", sorted(EXAMPLES.items()))
def test_each_kind_of_class_has_its_record_type(uid, kind):
    assert records.record_type(uid) == kind


def test_every_record_type_of_the_table_is_one_mkiso_can_write():
    kinds = set(records.RECORD_TYPES.values())
    assert kinds - {records.IMAGE} == set(records.KEYS) - {records.PRIVATE}
    assert set(EXAMPLES.values()) == kinds  # every kind is tried above
    assert len(records.RECORD_TYPES) > 150


def test_a_standard_class_the_table_lacks_is_an_error_naming_it():
    unknown = "1.2.840.10008.5.1.4.1.1.999.1"  # made up: a class of a later edition than mkiso knows
    with pytest.raises(errors.MkisoError) as raised:
        records.record_type(unknown)
    assert raised.value.status == 500 and raised.value.code == "unknown_sop_class"
    assert unknown in raised.value.message
    assert not records.is_private(unknown)


@pytest.mark.parametrize("uid", [PROTOCOL, "1.2.840.10008.5.1.4.1.1.200.8",  # the performed protocols
                                 "1.2.840.10008.5.1.4.1.1.200.3", "1.2.840.10008.5.1.4.1.1.201.1",  # approval/inventory
                                 "1.2.840.10008.5.1.4.1.1.8", "1.2.840.10008.5.1.1.27",  # retired stand-alone
                                 "1.2.840.10008.5.1.4.38.1", "1.2.840.10008.5.1.4.39.1"])  # hanging protocol, palette
def test_classes_with_no_record_under_a_study_are_known_and_filed_nowhere(uid):
    assert records.record_type(uid) is None and not records.is_private(uid) and records.NO_RECORD[uid]


def storage_classes():
    """{UID: name} of every storage SOP class in pydicom's copy of PS3.6 (the DICOMDIR's own class and storage
    commitment are no objects of a study)."""
    return {uid: entry[0] for uid, entry in UID_dictionary.items()
            if entry[1] == "SOP Class" and "Storage" in entry[0] and "Commitment" not in entry[0]
            and "Directory" not in entry[0]}


def test_every_storage_class_of_the_standard_is_filed_or_left_off_by_name():
    """PS3.6 as pydicom has it: each storage class is in exactly one table; a later pydicom that knows a newer
    class fails here until someone decides where its objects go."""
    known = storage_classes()
    assert len(known) > 150
    assert not set(records.RECORD_TYPES) & set(records.NO_RECORD)
    assert sorted(set(known) - set(records.RECORD_TYPES) - set(records.NO_RECORD)) == []
    for uid, name in records.NO_RECORD.items():
        if uid in known:
            assert known[uid].replace(" Storage", "").replace(" SOP Class", "") == name.replace(" (retired)", "")


def received(sop_class_uid, number=1):
    return ReceivedFile(path="/nowhere/%d" % number, patient_id="P1", study_uid="1.2.3", series_uid="1.2.3.4",
                        series_number=1, instance_number=number, sop_uid="1.2.3.4.%d" % number,
                        sop_class_uid=sop_class_uid)


@pytest.mark.parametrize("private_objects", ["omit", "keep"])
def test_objects_of_a_class_with_no_record_are_left_off_whatever_private_objects_says(private_objects):
    files = [received("1.2.840.10008.5.1.4.1.1.2", 1), received(PROTOCOL, 2), received(PRIVATE, 3),
             received(PROTOCOL, 4)]
    kept, left_off = records.sort_out(files, private_objects)
    if private_objects == "omit":
        assert kept == files[:1] and left_off == [PROTOCOL, PRIVATE, PROTOCOL]
    else:
        assert kept == [files[0], files[2]] and left_off == [PROTOCOL, PROTOCOL]


def test_an_unknown_standard_class_is_refused_before_anything_is_left_off():
    with pytest.raises(errors.MkisoError) as raised:
        records.sort_out([received(PROTOCOL, 1), received("1.2.840.10008.5.1.4.1.1.999.1", 2)], "omit")
    assert raised.value.code == "unknown_sop_class"


@pytest.mark.parametrize("classes, private_objects, code", [
    ([PRIVATE], "omit", "only_private_objects"), ([PROTOCOL], "keep", "nothing_to_file"),
    ([PROTOCOL, PRIVATE], "omit", "nothing_to_file")])
def test_nothing_left_for_a_disc_is_an_error_saying_why(classes, private_objects, code):
    with pytest.raises(errors.MkisoError) as raised:
        records.sort_out([received(uid, number) for number, uid in enumerate(classes)], private_objects)
    assert raised.value.status == 500 and raised.value.code == code
    assert all(uid in raised.value.message for uid in classes)
    assert ("iso.private_objects: keep" in raised.value.message) == (PRIVATE in classes)


def test_what_is_left_off_is_told_by_class_name_and_reason():
    assert records.told([]) == []
    [one] = records.told([PROTOCOL])
    assert one == ("Left off this disc: 1 object of CT Performed Procedure Protocol (%s), which has no place in a "
                   "DICOMDIR (PS3.3 gives it no directory record under a patient's study)." % PROTOCOL)
    unfiled, private = records.told([PROTOCOL, PRIVATE, "1.2.840.10008.5.1.4.1.1.200.3", PROTOCOL])
    assert unfiled.startswith("Left off this disc: 3 objects of CT Performed Procedure Protocol (%s), Protocol "
                              "Approval (1.2.840.10008.5.1.4.1.1.200.3), which have no place" % PROTOCOL)
    assert private.startswith("Left off this disc: 1 object of private SOP class %s (" % PRIVATE)
    assert records.left_off_report([PROTOCOL, PRIVATE, PROTOCOL]) == {
        "objects": 3, "sop_classes": [PROTOCOL, PRIVATE], "classes": [
            {"sop_class_uid": PROTOCOL, "name": "CT Performed Procedure Protocol", "objects": 2,
             "reason": "no_directory_record"},
            {"sop_class_uid": PRIVATE, "name": None, "objects": 1, "reason": "private"}]}


@pytest.mark.parametrize("uid", ["1.3.12.2.1107.5.9.1", "1.2.840.113619.4.27", "1.2.276.0.7230010.3.1.0.1"])
def test_other_roots_are_private_classes(uid):
    assert records.record_type(uid) == records.PRIVATE and records.is_private(uid)


def test_a_uid_that_merely_starts_like_the_standard_root_is_private():
    assert records.is_private("1.2.840.100081.1") and records.record_type("1.2.840.100081.1") == records.PRIVATE


VALUES = {"DA": "20240101", "TM": "101010", "DT": "20240101101010", "CS": "YES", "IS": "1", "US": 1, "LO": "X",
          "SH": "X", "PN": "X^Y", "LT": "x", "ST": "x", "UT": "x", "UI": "1.2.3", "DS": "1", "UL": 1, "FD": 1.0}


def minimal(uid, path):
    """An object of class ``uid`` with what dcmmkdir needs for its record: the keys mkiso would copy."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = uid, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "A^B", "P1", "20240101", "1010"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyID, ds.AccessionNumber = "1.2.3.4", "1.2.3.4.5", "1", "A"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "OT", 1, 1
    for keyword, _ in records.KEYS.get(records.RECORD_TYPES[uid], ()):
        vr = dictionary_VR(keyword)
        setattr(ds, keyword, [demo._code("1", "DCM", "x")] if vr == "SQ" else VALUES[vr])
    if records.RECORD_TYPES[uid] == "SR DOCUMENT":
        ds.VerificationFlag, ds.CompletionFlag = "UNVERIFIED", "COMPLETE"
    demo._save(ds, path)


def test_dcmmkdir_files_every_class_it_knows_as_the_table_does(tmp_path):
    """dcmtk's own table, run: one object of each class of mkiso's; dcmmkdir 3.6.7 leaves out what it
    does not know (newer classes, and OBJ/MTL in this profile), and files every other one as mkiso does."""
    folder = tmp_path / "DICOM"
    folder.mkdir()
    for number, uid in enumerate(sorted(records.RECORD_TYPES), start=1):
        minimal(uid, str(folder / ("F%05d" % number)))
    subprocess.run([os.path.join(DCMTK_DIR, "dcmmkdir"), "+I", "-Nxc", "-Nec", "-Nrc", "-nb", "+r", "+D",
                    "DICOMDIR", "DICOM"], cwd=str(tmp_path), capture_output=True)
    filed = {str(r.ReferencedSOPClassUIDInFile): r.DirectoryRecordType
             for r in pydicom.dcmread(str(tmp_path / "DICOMDIR")).DirectoryRecordSequence
             if "ReferencedSOPClassUIDInFile" in r}
    assert len(filed) > 150
    assert filed == {uid: records.RECORD_TYPES[uid] for uid in filed}
