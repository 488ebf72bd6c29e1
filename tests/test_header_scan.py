"""The C header scan against its twin, pydicom: the same fields from every file.

The scan takes on Part 10 files in explicit and implicit VR little endian,
with sequences of any nesting before the tags it wants; everything else it
hands back (None) and pydicom reads.  Either way the result must be what
pydicom alone gives, and the scan must really take on the common files.
"""

import os
import subprocess

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from mkiso import demo, errors, fastcopy
from mkiso.dicom import received
from conftest import DCMTK_DIR

try:
    from mkiso import _fastcopy
except ImportError:
    _fastcopy = None


@pytest.fixture(autouse=True)
def extension():
    if _fastcopy is None:
        pytest.fail("the Cython extension mkiso._fastcopy is not built")


CONVERT = {ImplicitVRLittleEndian: "+ti", ExplicitVRLittleEndian: "+te", ExplicitVRBigEndian: "+tb"}


def save(ds, path, syntax):
    """Write ds, then have dcmtk's dcmconv re-encode it in ``syntax``."""
    ds.save_as(path)
    subprocess.run([os.path.join(DCMTK_DIR, "dcmconv"), CONVERT[syntax], path, path], check=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    return path


def image(folder, name="ACC1", patient="Müller^Jürgen", series=(2,)):
    study = demo.SampleStudy("PAT-1", patient, name, series=series)
    return demo.write_study(study, os.path.join(folder, name))


def with_sequences(ds):
    """Undefined-length sequences, nested two deep, before the patient's tags."""
    inner = Dataset()
    inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    inner.ReferencedSOPInstanceUID = "1.2.3.4"
    series = Dataset()
    series.SeriesInstanceUID = "1.2.3"
    series.ReferencedInstanceSequence = [inner, inner]
    ds.ReferencedSeriesSequence = [series]
    ds.ReferencedImageSequence = [inner]
    return ds


@pytest.fixture(scope="module")
def taken(tmp_path_factory):
    """Files the scan must take on itself."""
    folder = str(tmp_path_factory.mktemp("taken"))
    paths = image(folder) + image(folder, "ACC2", "DOE^JANE", series=(1, 1))
    missing = image(folder, "ACC3")[0]
    ds = pydicom.dcmread(missing)
    for keyword in ("StudyID", "SeriesNumber", "InstanceNumber", "StudyDescription", "StudyTime"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(missing)
    latin = image(folder, "ACC4", "Gómez^Iñés")[0]
    ds = pydicom.dcmread(latin)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDescription = "Thorax ärztlich"
    ds.save_as(latin)
    implicit = image(folder, "ACC5")[0]
    save(with_sequences(pydicom.dcmread(implicit)), implicit, ImplicitVRLittleEndian)
    explicit = image(folder, "ACC6")[0]
    save(with_sequences(pydicom.dcmread(explicit)), explicit, ExplicitVRLittleEndian)
    jpeg = image(folder, "ACC7")[0]
    subprocess.run([os.path.join(DCMTK_DIR, "dcmcjpeg"), jpeg, jpeg + ".jpg"], check=True)
    os.replace(jpeg + ".jpg", jpeg)
    return paths + [missing, latin, implicit, explicit, jpeg]


@pytest.fixture(scope="module")
def handed_over(tmp_path_factory):
    """Files left to pydicom: by the C scan (big endian, a header past 64 KB) or by the
    decoding of its values (a multi-valued field, shown as pydicom shows it)."""
    folder = str(tmp_path_factory.mktemp("handed"))
    big_endian = image(folder, "ACC1")[0]
    save(pydicom.dcmread(big_endian), big_endian, ExplicitVRBigEndian)
    long_header = image(folder, "ACC2")[0]
    ds = pydicom.dcmread(long_header)
    ds.add_new(0x00091001, "OB", b"\0" * 70000)  # a private blob before the patient's tags
    ds.save_as(long_header)
    two_ids = image(folder, "ACC3")[0]
    ds = pydicom.dcmread(two_ids)
    ds.OtherPatientIDs = None
    ds.PatientID = ["PAT-1", "PAT-2"]
    ds.save_as(two_ids)
    return {"scan": [big_endian, long_header], "decode": [two_ids]}


def test_the_scan_reads_the_tags_pydicom_names():
    assert list(_fastcopy.WANTED_TAGS) == [tag_for_keyword(k) for k in received.HEADER_TAGS]


def test_the_scan_takes_on_the_common_files_and_agrees_with_pydicom(taken):
    assert None not in _fastcopy.scan_headers(taken), "the scan left a common file to pydicom"
    assert received.read_all(taken) == [received.read_received(path) for path in taken]


def test_what_the_scan_hands_over_still_comes_out_as_pydicom_reads_it(handed_over):
    assert _fastcopy.scan_headers(handed_over["scan"]) == [None, None]
    paths = handed_over["scan"] + handed_over["decode"]
    assert received.read_all(paths) == [received.read_received(path) for path in paths]
    assert received.read_all(handed_over["decode"])[0].patient_id == str(pydicom.dcmread(paths[-1]).PatientID)


def test_names_and_texts_in_their_character_sets(taken):
    by_accession = {f.accession: f for f in received.read_all(taken)}
    assert by_accession["ACC1"].patient_name == "Müller^Jürgen"
    assert by_accession["ACC4"].patient_name == "Gómez^Iñés"
    assert by_accession["ACC4"].charset == ("ISO_IR 100",)
    assert by_accession["ACC4"].study_description == "Thorax ärztlich"
    assert by_accession["ACC7"].transfer_syntax == "1.2.840.10008.1.2.4.70"


def outcome(read, path):
    try:
        return read(path)
    except errors.UpstreamFailed as exc:
        return exc.message


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom on the truncated file
@pytest.mark.parametrize("damage", ["truncated", "no DICM", "empty", "garbage"])
def test_a_broken_file_comes_out_the_same_either_way(tmp_path, damage):
    """Whatever pydicom makes of it (an error, or what it could read), the scan does too."""
    path = image(str(tmp_path))[0]
    with open(path, "rb") as handle:
        data = handle.read()
    data = {"truncated": data[:400], "no DICM": data[:128] + b"DICX" + data[132:], "empty": b"",
            "garbage": data[:132] + os.urandom(2000)}[damage]
    with open(path, "wb") as handle:
        handle.write(data)
    assert _fastcopy.scan_headers([path]) == [None]
    assert outcome(lambda p: received.read_all([p])[0], path) == outcome(received.read_received, path)
    if damage in ("no DICM", "empty"):
        assert "could not be read as DICOM" in outcome(received.read_received, path)


def test_without_the_extension_pydicom_reads_everything(taken, monkeypatch):
    monkeypatch.setattr(fastcopy, "scan_headers", fastcopy.py_scan_headers)
    assert fastcopy.py_scan_headers(taken) == [None] * len(taken)
    assert received.read_all(taken) == [received.read_received(path) for path in taken]
