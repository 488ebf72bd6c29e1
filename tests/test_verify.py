"""mkiso-verify (SPEC §4.6): a disc, a ZIP or a stick folder checked against its SHA256.TXT and its DICOMDIR.

Each disc is the real service's (a real dcmqrscp PACS, the receiver,
genisoimage), opened with osirrox; SHA256.TXT is computed here with
hashlib, the tree damaged as a test needs, then made into an ISO with the
service's own genisoimage arguments, a ZIP with zipfile, and left as a
folder.  The command runs as it is installed, in a subprocess; every damage
must give its own clear line and a non-zero exit on all three.
"""

import os
import shutil
import subprocess
import sys
import zipfile

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from mkiso.disc import dicomdir, verify
from mkiso.http import application
from conftest import DCMTK_DIR
from discs import download
from media import MANIFEST, files_of, make_iso, make_zip, write_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "DICOM/PAT00001/STU00001/SER00001/IMG00001"
OTHER_IMAGE = "DICOM/PAT00001/STU00001/SER00001/IMG00002"
LONG_NAME = "VIEWER/lib/Long Named Library.dll"  # a viewer's long, mixed-case name: Rock Ridge and Joliet keep it
LONGER_NAME = "VIEWER/lib/" + "Longer" * 20 + ".dat"  # over Joliet's 103 characters: Rock Ridge alone keeps it
DEEP = "VIEWER/a/b/c/d/e/f/g/h/deep.txt"  # nine folders deep: ISO 9660 relocates it, Rock Ridge links it back


@pytest.fixture
def viewer(tmp_path):
    folder = tmp_path / "viewer"
    (folder / "VIEWER" / "lib").mkdir(parents=True)
    (folder / "AUTORUN.INF").write_text("[autorun]\r\nopen=VIEWER\\VIEWER.EXE\r\n")
    (folder / "VIEWER" / "VIEWER.EXE").write_bytes(b"MZ not really a viewer")
    (folder / LONG_NAME).write_bytes(b"not really a library" * 100)
    (folder / LONGER_NAME).write_bytes(b"data")
    (folder / DEEP).parent.mkdir(parents=True)
    (folder / DEEP).write_bytes(b"deep")
    return str(folder)


@pytest.fixture
def disc(make_service, viewer, wsgi_call, tmp_path):
    """The tree of a real disc of ACC2001 (four images), with SHA256.TXT, writable."""
    service = make_service(iso={"viewer_dir": viewer})
    app = application.Application(service.config, service)
    _, opened, _ = download(wsgi_call, app, "/api/iso/download", tmp_path, "accession_number=ACC2001")
    for folder, _, _ in os.walk(opened.root):  # Rock Ridge gave them the disc's read-only modes
        os.chmod(folder, 0o755)
    for path in opened.files:
        os.chmod(os.path.join(opened.root, path), 0o644)
    write_manifest(opened.root)
    return opened.root


def run(path):
    """mkiso-verify PATH as installed: (exit status, stdout lines, stderr)."""
    result = subprocess.run([sys.executable, "-m", "mkiso.disc.verify", str(path)], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    return result.returncode, result.stdout.splitlines(), result.stderr


def media(root, tmp_path):
    """The tree at ``root`` as the three media mkiso-verify reads: an ISO, a ZIP and the folder."""
    return {"iso": make_iso(root, str(tmp_path / "medium.iso")),
            "zip": make_zip(root, str(tmp_path / "medium.zip")),
            "folder": root}


def count(root):
    return sum(len(names) for _, _, names in os.walk(root))


def assert_found(root, tmp_path, *lines):
    """Every medium made of ``root`` fails with exactly ``lines`` and a FAILED verdict."""
    files = count(root)
    for kind, path in media(root, tmp_path).items():
        status, out, err = run(path)
        assert status == 1, (kind, out, err)
        assert out[:-1] == list(lines), kind
        assert out[-1] == "mkiso-verify: FAILED: %d problem%s in %d files" % (
            len(lines), "" if len(lines) == 1 else "s", files), kind


def flip(path, at):
    """One byte changed at ``at`` (negative: from the end)."""
    with open(path, "r+b") as handle:
        handle.seek(at, os.SEEK_END if at < 0 else os.SEEK_SET)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_good_disc_zip_and_folder_pass(disc, tmp_path):
    files = count(disc)
    assert os.path.exists(os.path.join(disc, LONGER_NAME)) and os.path.exists(os.path.join(disc, "INDEX.HTM"))
    deflated = make_zip(disc, str(tmp_path / "deflated.zip"), zipfile.ZIP_DEFLATED)  # PS3.3 Annex P allows it
    for kind, path in list(media(disc, tmp_path).items()) + [("deflated zip", deflated)]:
        status, out, err = run(path)
        assert (status, err) == (0, ""), (kind, out, err)
        assert out == ["mkiso-verify: OK: %d files, 4 DICOM objects, all as listed" % files], kind
        report = verify.check(path)  # what the service calls
        assert (report.ok, report.files, report.objects, report.problems) == (True, files, 4, [])


def test_the_service_iso_is_read_in_place_as_osirrox_extracts_it(disc, tmp_path):
    """The ISO as the service made it (Rock Ridge, Joliet, a relocated deep folder): the same paths and
    sizes as osirrox gives, and the same bytes as each file extracted."""
    iso = verify.Iso(str(tmp_path / "disc.iso"))  # as downloaded (its own SHA256.TXT; the test wrote the folder's)
    try:
        extracted = files_of(disc)
        assert sorted(iso.entries) == extracted and DEEP in extracted and MANIFEST in extracted
        for path, entry in iso.entries.items():
            if path != MANIFEST:
                with open(os.path.join(disc, path), "rb") as handle:
                    assert iso.read(entry) == handle.read(), path
    finally:
        iso.close()


def test_one_changed_byte_in_an_image(disc, tmp_path):
    flip(os.path.join(disc, IMAGE), -1)  # a pixel: the file still reads as DICOM
    assert_found(disc, tmp_path, "changed: %s (SHA-256 differs)" % IMAGE)


def test_one_changed_byte_in_the_dicomdir(disc, tmp_path):
    flip(os.path.join(disc, "DICOMDIR"), -1)  # the last record's instance number
    assert_found(disc, tmp_path, "changed: DICOMDIR (SHA-256 differs)")


def test_one_changed_byte_in_the_viewer(disc, tmp_path):
    flip(os.path.join(disc, LONG_NAME), 100)
    assert_found(disc, tmp_path, "changed: %s (SHA-256 differs)" % LONG_NAME)


def test_a_removed_image(disc, tmp_path):
    os.unlink(os.path.join(disc, OTHER_IMAGE))
    assert_found(disc, tmp_path, "missing: %s (listed in SHA256.TXT, not on the medium)" % OTHER_IMAGE,
                 "missing: %s (referenced by the DICOMDIR, not on the medium)" % OTHER_IMAGE)


def test_an_added_file(disc, tmp_path):
    with open(os.path.join(disc, "EXTRA.TXT"), "w") as handle:
        handle.write("put here after the disc was made\r\n")
    assert_found(disc, tmp_path, "not listed: EXTRA.TXT (on the medium but not in SHA256.TXT)")


def test_a_dicomdir_referencing_a_missing_file(disc, tmp_path):
    os.unlink(os.path.join(disc, OTHER_IMAGE))
    write_manifest(disc)  # the checksums agree with the files: only the DICOMDIR is wrong
    assert_found(disc, tmp_path, "missing: %s (referenced by the DICOMDIR, not on the medium)" % OTHER_IMAGE)


def test_a_dicom_file_the_dicomdir_does_not_reference(disc, tmp_path):
    added = "DICOM/PAT00001/STU00001/SER00001/IMG00099"
    shutil.copyfile(os.path.join(disc, IMAGE), os.path.join(disc, added))
    write_manifest(disc)
    assert_found(disc, tmp_path,
                 "not in the DICOMDIR: %s (a DICOM file its DICOMDIR does not reference)" % added)


def test_an_image_that_is_not_dicom_and_two_swapped(disc, tmp_path):
    third, fourth = IMAGE[:-1] + "3", IMAGE[:-1] + "4"
    with open(os.path.join(disc, IMAGE), "wb") as handle:
        handle.write(b"no longer an image")
    os.rename(os.path.join(disc, third), os.path.join(tmp_path, "swap"))
    os.rename(os.path.join(disc, fourth), os.path.join(disc, third))
    os.rename(os.path.join(tmp_path, "swap"), os.path.join(disc, fourth))
    write_manifest(disc)  # the checksums cannot vouch: each file is read as DICOM
    assert_found(disc, tmp_path, "unreadable: %s (not readable as DICOM)" % IMAGE,
                 "wrong object: %s (its SOP Instance UID is not the one its DICOMDIR record names)" % third,
                 "wrong object: %s (its SOP Instance UID is not the one its DICOMDIR record names)" % fourth)


def test_no_sha256_txt(disc, tmp_path):
    os.unlink(os.path.join(disc, "SHA256.TXT"))
    assert_found(disc, tmp_path, "missing: SHA256.TXT (the list of checksums: no file can be checked against it)")


def test_a_truncated_zip(disc, tmp_path):
    path = make_zip(disc, str(tmp_path / "stick.zip"))
    os.truncate(path, os.path.getsize(path) // 2)
    status, out, _ = run(path)
    assert status == 1
    assert out == ["unreadable: stick.zip (not a complete ZIP file: its central directory is missing or damaged, "
                   "the file is truncated?)", "mkiso-verify: FAILED: 1 problem in 0 files"]


def test_a_truncated_iso(disc, tmp_path):
    path = make_iso(disc, str(tmp_path / "disc.iso"))
    last = max(verify.Iso(path).entries.values(), key=lambda entry: entry.offset)
    os.truncate(path, last.offset + last.size - 1)  # its last byte lost (genisoimage pads the end)
    status, out, _ = run(path)
    assert (status, out[:-1]) == (1, ["unreadable: %s (its bytes lie beyond the end of the image: it is truncated)"
                                      % last.path])
    assert out[-1] == "mkiso-verify: FAILED: 1 problem in %d files" % count(disc)


@pytest.mark.parametrize("content", [b"", b"%PDF-1.4\n" + b"\0" * 40000, b"PK\x01\x02 not a zip"],
                         ids=["empty", "a PDF", "a ZIP's middle"])
def test_a_file_that_is_no_medium(tmp_path, content):
    path = tmp_path / "disc.iso"
    path.write_bytes(content)
    status, out, err = run(path)
    assert (status, out) == (2, [])
    assert err == "mkiso-verify: %s is neither an ISO 9660 disc image, a ZIP file nor a folder: " \
                  "there is nothing to check.\n" % path
    status, out, err = run(tmp_path / "absent.iso")
    assert (status, out) == (2, []) and "cannot be read: No such file or directory" in err


def test_joliet_and_plain_iso9660_names(disc, tmp_path):
    """A disc made by another tool: Joliet without Rock Ridge keeps names up to 103 characters; bare ISO
    9660 has only 8.3 names, which then are not the ones listed."""
    for path in (LONGER_NAME, DEEP):  # what only Rock Ridge holds (genisoimage leaves a deep folder out)
        os.unlink(os.path.join(disc, path))
    write_manifest(disc)
    joliet = str(tmp_path / "joliet.iso")
    subprocess.run(["genisoimage", "-quiet", "-J", "-joliet-long", "-o", joliet, disc], check=True)
    status, out, _ = run(joliet)
    assert status == 0, out
    plain = str(tmp_path / "plain.iso")
    subprocess.run(["genisoimage", "-quiet", "-o", plain, disc], check=True)
    status, out, _ = run(plain)
    assert status == 1
    assert "missing: %s (listed in SHA256.TXT, not on the medium)" % LONG_NAME in out


def test_a_stick_that_shows_lower_case_names(disc, tmp_path):
    """FAT may show 8.3 names in lower case: the DICOMDIR's file IDs and SHA256.TXT's paths still match."""
    stick = tmp_path / "stick"
    for folder, _, names in os.walk(disc):
        for name in names:
            source = os.path.join(folder, name)
            target = stick / os.path.relpath(source, disc).lower()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    status, out, _ = run(stick)
    assert (status, out) == (0, ["mkiso-verify: OK: %d files, 4 DICOM objects, all as listed" % count(disc)])


# -- the DICOMDIR and headers read directly: the same answers as pydicom's ------------


def test_direct_dicomdir_reader_agrees_with_pydicom(disc):
    with open(os.path.join(disc, "DICOMDIR"), "rb") as handle:
        data = handle.read()
    direct = verify.dicomdir_references(data)  # mkiso's own DICOMDIR: the fast path, never pydicom
    assert direct == verify._pydicom_references(data)
    assert [parts for parts, _ in direct] == [path.split("/") for path in sorted(
        os.path.relpath(os.path.join(folder, name), disc) for folder, _, names in os.walk(disc)
        for name in names if folder.startswith(os.path.join(disc, "DICOM")))]


def _dicomdir_with_nested_sequences(undefined, implicit=False):
    """A DICOMDIR whose records carry nested sequences and an icon (encapsulated pixel data), encoded by
    pydicom with (un)defined lengths, in explicit VR (or, as PS3.10 does not allow, implicit VR)."""
    def record(number):
        item = Dataset()
        item.OffsetOfTheNextDirectoryRecord = 0
        item.RecordInUseFlag = 0xFFFF
        item.OffsetOfReferencedLowerLevelDirectoryEntity = 0
        item.DirectoryRecordType = "SR DOCUMENT"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113701", "DCM", "X-Ray Radiation Dose Report"
        inner = Dataset()
        inner.ConceptNameCodeSequence = Sequence([code])
        item.ConceptNameCodeSequence = Sequence([code])
        item.ContentSequence = Sequence([inner, inner])
        icon = Dataset()
        icon.Rows = icon.Columns = 1
        icon.PixelData = encapsulate([b"\xff\xd8 a JPEG frame \xff\xd9"])
        icon["PixelData"].VR = "OB"
        icon["PixelData"].is_undefined_length = True
        item.IconImageSequence = Sequence([icon])
        item.ReferencedFileID = ["DICOM", "DOC%05d" % number]
        item.ReferencedSOPInstanceUIDInFile = "1.2.3.%d" % number
        return item

    ds = Dataset()
    ds.FileSetID = "TEST"
    ds.DirectoryRecordSequence = Sequence([record(1), record(2)])
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined
            for item in element.value:
                item.is_undefined_length_sequence_item = undefined
    ds.DirectoryRecordSequence.is_undefined_length = undefined
    for item in ds.DirectoryRecordSequence:
        item.is_undefined_length_sequence_item = undefined
    if not implicit:
        return dicomdir.PREAMBLE + dicomdir._file_meta() + dicomdir._encode(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dicomdir.MEDIA_STORAGE_DIRECTORY
    meta.MediaStorageSOPInstanceUID = "1.2.3"
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta)
    head = buffer.getvalue()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    return dicomdir.PREAMBLE + head + buffer.getvalue()


@pytest.mark.parametrize("undefined", [True, False])
def test_direct_dicomdir_reader_with_nested_sequences(undefined):
    data = _dicomdir_with_nested_sequences(undefined)
    delimiters = data.count(b"\xfe\xff\xdd\xe0")  # the two icons' pixel data's, and the sequences' (or not)
    assert delimiters > 2 if undefined else delimiters == 2
    assert verify.dicomdir_references(data) == verify._pydicom_references(data) == [
        (["DICOM", "DOC00001"], "1.2.3.1"), (["DICOM", "DOC00002"], "1.2.3.2")]


def test_a_dicomdir_only_pydicom_reads(tmp_path):
    """Implicit VR, which PS3.10 forbids in a DICOMDIR but pydicom reads: the direct reader leaves it to
    pydicom, and its references are checked all the same."""
    data = _dicomdir_with_nested_sequences(True, implicit=True)
    with pytest.raises(verify._Unusual):
        verify.dicomdir_references(data)
    (tmp_path / "stick").mkdir()
    (tmp_path / "stick" / "DICOMDIR").write_bytes(data)
    status, out, _ = run(tmp_path / "stick")
    assert (status, out) == (1, [
        "missing: DICOM/DOC00001 (referenced by the DICOMDIR, not on the medium)",
        "missing: DICOM/DOC00002 (referenced by the DICOMDIR, not on the medium)",
        "missing: SHA256.TXT (the list of checksums: no file can be checked against it)",
        "mkiso-verify: FAILED: 3 problems in 1 file"])


def test_direct_header_reader_agrees_with_pydicom(disc):
    for name in ("1", "2", "3", "4"):
        with open(os.path.join(disc, IMAGE[:-1] + name), "rb") as handle:
            data = handle.read()
        assert verify.sop_instance_uid(data) == pydicom.dcmread(os.path.join(disc, IMAGE[:-1] + name)).SOPInstanceUID
    implicit = os.path.join(disc, "IMPLICIT")
    subprocess.run([os.path.join(DCMTK_DIR, "dcmconv"), "+ti", os.path.join(disc, IMAGE), implicit], check=True)
    with open(implicit, "rb") as handle:
        data = handle.read()
    with pytest.raises(verify._Unusual):  # implicit VR: left to pydicom
        verify.sop_instance_uid(data)
