"""The built-in DICOMDIR against dcmtk's dcmmkdir (the oracle) and dciodvfy.

The same staged disc gets a DICOMDIR from each; the record trees, followed
by their offsets, must hold the same records with the same keys (values
that each invents for a missing StudyID or SeriesNumber are only required
to be there).  dciodvfy (dicom3tools) must report no error on ours.
"""

import dataclasses
import os
import subprocess

import pydicom
import pytest

from mkiso import demo, fastcopy
from mkiso.disc import dicomdir, tree
from mkiso.dicom.received import read_received
from conftest import DCMTK_DIR

OFFSETS = {"OffsetOfTheNextDirectoryRecord", "OffsetOfReferencedLowerLevelDirectoryEntity", "RecordInUseFlag"}


def sample_files(folder):
    """Several patients, studies and series; UTF-8 and Latin-1 names; missing numbers; JPEG lossless."""
    studies = [
        demo.SampleStudy("PAT-1001", "Müller^Jürgen", "ACC1", series=(3, 2)),
        demo.SampleStudy("PAT-1001", "Müller^Jürgen", "ACC2", series=(2,), modality="CT"),
        demo.SampleStudy("PAT-2001", "DOE^JANE", "ACC3", series=(2, 1)),
        demo.SampleStudy("PAT-3001", "SMITH^JOHN", "ACC4", series=(2, 2), study_id=None, series_numbers=False),
        demo.SampleStudy("PAT-4001", "Gómez^Iñés", "ACC5", series=(2,)),
        demo.SampleStudy("PAT-5001", "JPEG^LOSSLESS", "ACC6", series=(2,), image_bytes=4096),
    ]
    paths = {study.accession: demo.write_study(study, os.path.join(folder, study.accession)) for study in studies}
    for path in paths["ACC4"][:2]:  # no InstanceNumber either
        ds = pydicom.dcmread(path)
        del ds.InstanceNumber
        ds.save_as(path)
    for path in paths["ACC5"]:  # the same name in ISO 8859-1
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.save_as(path)
        with open(path, "rb") as handle:
            assert "Gómez".encode("latin-1") in handle.read()
    for path in paths["ACC6"]:
        subprocess.run([os.path.join(DCMTK_DIR, "dcmcjpeg"), path, path + ".jpg"], check=True)
        os.replace(path + ".jpg", path)
    return [path for accession in sorted(paths) for path in paths[accession]]


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """One disc staged twice: DICOMDIR from mkiso in one tree, from dcmmkdir in the other."""
    root = tmp_path_factory.mktemp("dicomdir")
    files = [read_received(path) for path in sample_files(str(root / "received"))]
    images = tree.pdi_paths(files)
    trees = {}
    for name in ("builtin", "dcmmkdir"):
        staging = str(root / name)
        for _, path in images:
            os.makedirs(os.path.join(staging, os.path.dirname(path)), exist_ok=True)
        fastcopy.place_files([(image.path, os.path.join(staging, path)) for image, path in images])
        tree.make_dicomdir(staging, images, name, os.path.join(DCMTK_DIR, "dcmmkdir"), 60, "DICOMDIR_TEST")
        trees[name] = os.path.join(staging, "DICOMDIR")
    return trees, images


def record_tree(path):
    """The records reached by following the offsets from the root: [(type, keys, children)].

    Fails if an offset points at no record, or a record is not reachable.
    """
    ds = pydicom.dcmread(path)
    by_offset = {record.seq_item_tell: record for record in ds.DirectoryRecordSequence}
    seen = []

    def walk(offset):
        level = []
        while offset:
            assert offset in by_offset, "offset %d points at no record" % offset
            record = by_offset[offset]
            seen.append(offset)
            keys = {element.keyword: element.value for element in record if element.keyword not in OFFSETS}
            keys = {k: (list(v) if isinstance(v, pydicom.multival.MultiValue) else v) for k, v in keys.items()}
            level.append((record.DirectoryRecordType, keys, walk(record.OffsetOfReferencedLowerLevelDirectoryEntity)))
            last = offset
            offset = record.OffsetOfTheNextDirectoryRecord
        return level, last if level else None

    def strip(tree):
        level, _ = tree
        return [(kind, keys, strip(children)) for kind, keys, children in level]

    top = walk(ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity)
    assert top[1] == ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity
    assert sorted(seen) == sorted(by_offset), "records that no offset reaches"
    return strip(top), ds


# Keys dcmmkdir's general-purpose profile copies into a record beyond PS3.3 F.5 (dciodvfy warns of them).
BEYOND_F5 = {"IMAGE": {"ImageType"}}


def comparable(tree, invented):
    """Keys as text, values that either side invents replaced by whether they are there."""
    out = []
    for kind, keys, children in tree:
        keys = {k: str(v) for k, v in keys.items()
                if k != "SpecificCharacterSet" and k not in BEYOND_F5.get(kind, ())}
        for key in invented.get(kind, ()):
            if key in keys:
                keys[key] = bool(keys[key])
        out.append((kind, keys, comparable(children, invented)))
    return sorted(out, key=lambda entry: sorted(entry[1].items()))


def invented_keys(images):
    """Which keys each side may invent: those missing in some source image."""
    missing = {"STUDY": set(), "SERIES": set(), "IMAGE": set()}
    for image, _ in images:
        if not image.study_id:
            missing["STUDY"].add("StudyID")
        if image.series_number is None:
            missing["SERIES"].add("SeriesNumber")
        if image.instance_number is None:
            missing["IMAGE"].add("InstanceNumber")
    return missing


def test_same_records_and_keys_as_dcmmkdir(staged):
    trees, images = staged
    ours, _ = record_tree(trees["builtin"])
    theirs, _ = record_tree(trees["dcmmkdir"])
    invented = invented_keys(images)
    assert invented == {"STUDY": {"StudyID"}, "SERIES": {"SeriesNumber"}, "IMAGE": {"InstanceNumber"}}
    assert comparable(ours, invented) == comparable(theirs, invented)
    kinds = [kind for kind, _, _ in ours]
    assert kinds == ["PATIENT"] * 5


def test_every_image_referenced_once_with_its_uids_and_syntax(staged):
    trees, images = staged
    _, ds = record_tree(trees["builtin"])
    referenced = {"/".join(r.ReferencedFileID): r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r}
    assert sorted(referenced) == sorted(path for _, path in images)
    for image, path in images:
        record = referenced[path]
        assert record.ReferencedSOPInstanceUIDInFile == image.sop_uid
        assert record.ReferencedSOPClassUIDInFile == image.sop_class_uid
        assert record.ReferencedTransferSyntaxUIDInFile == image.transfer_syntax
    syntaxes = {r.ReferencedTransferSyntaxUIDInFile for r in referenced.values()}
    assert syntaxes == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70"}  # explicit LE and JPEG lossless


def test_names_keep_their_character_set(staged):
    trees, _ = staged
    _, ds = record_tree(trees["builtin"])
    patients = {str(r.PatientID): r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT"}
    assert str(patients["PAT-1001"].PatientName) == "Müller^Jürgen"
    assert patients["PAT-1001"].SpecificCharacterSet == "ISO_IR 192"
    assert str(patients["PAT-4001"].PatientName) == "Gómez^Iñés"
    assert patients["PAT-4001"].SpecificCharacterSet == "ISO_IR 100"
    with open(trees["builtin"], "rb") as handle:
        raw = handle.read()
    assert "Gómez".encode("latin-1") in raw and "Müller".encode("utf-8") in raw


def test_invented_numbers_follow_the_disc(staged):
    trees, _ = staged
    _, ds = record_tree(trees["builtin"])
    studies = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "STUDY"]
    assert all(str(r.StudyID) for r in studies)
    series = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "SERIES"]
    assert all(r.SeriesNumber is not None and str(r.SeriesNumber) != "" for r in series)
    images = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
    assert all(r.InstanceNumber is not None and str(r.InstanceNumber) != "" for r in images)


def test_dciodvfy_finds_no_error(staged):
    trees, _ = staged
    result = subprocess.run(["dciodvfy", trees["builtin"]], capture_output=True, text=True)
    report = result.stdout + result.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == [], report


def test_records_are_built_in_one_pass_over_the_images(staged):
    """Each image makes one IMAGE record; a parent record only where a key changes."""
    _, images = staged
    kinds = [level for level, _ in dicomdir.records(images)]
    assert kinds.count(3) == len(images)
    assert kinds.count(0) == len({image.patient_id for image, _ in images})
    assert kinds.count(1) == len({image.study_uid for image, _ in images})
    assert kinds.count(2) == len({image.series_uid for image, _ in images})


def test_image_records_are_encoded_byte_for_byte_as_pydicom_encodes_them(staged):
    """IMAGE records are written directly for speed; pydicom is the oracle."""
    _, images = staged
    assert any(image.instance_number is None for image, _ in images)  # the invented number too
    for number, (image, path) in enumerate(images, start=1):
        assert dicomdir.encode_image_record(image, path, number) == \
            dicomdir._encode(dicomdir.image_record(image, path, number)), path


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom, on the deliberately bad UID
def test_a_uid_that_is_not_ascii_is_left_to_pydicom(staged):
    _, images = staged
    image, path = images[0]
    odd = dataclasses.replace(image, path=image.path, sop_uid="1.2.3.ä")  # the path: the record's InitVar
    assert dicomdir.encode_image_record(odd, path, 1) == dicomdir._encode(dicomdir.image_record(odd, path, 1))
