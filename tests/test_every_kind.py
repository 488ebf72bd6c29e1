"""Every kind of object on a disc, as the standard says (SPEC §4.1-§4.3, §4.5).

A PACS of this module's own holds a CT study with every kind of object a
scanner or archive sends (demo.EveryKindStudy: images, a JPEG multi-frame
image, dose SR, Comprehensive SR, key images, a presentation state, a PDF;
all ISO 8859-1), one more with an object of a vendor's private SOP class,
one with a CT Performed Procedure Protocol (a standard class with no
directory record) and one with an object of a standard class mkiso does not know.
Each disc mkiso makes of them is held against dcmmkdir, run here on the
disc's own files (the records, their keys, their order within a series),
against dciodvfy (no error, no warning on the DICOMDIR) and against
dcentvfy (the patient's and the study's attributes agree across the files).

dcmqrscp sends each file on the first context accepted for its SOP class,
whatever the file's transfer syntax: so the PACS proposes the multi-frame
class in JPEG Lossless only and every other class uncompressed (an
association profile, ``-xf``).
"""

import os
import pathlib
import shutil
import subprocess

import pydicom
import pytest

from mkiso import demo
from mkiso.disc import media, webcontent
from mkiso.http import application
from conftest import DCMTK_DIR
from discs import volume_id
from test_dicomdir import BEYOND_F5, OFFSETS
from test_media import fetch_discs, split_job

PRIVATE_CLASS = demo.PRIVATE_CLASS
PROTOCOL_CLASS = demo.CT_PERFORMED_PROTOCOL
UNKNOWN_CLASS = "1.2.840.10008.5.1.4.1.1.999.1"  # made up: a class of a later edition than mkiso knows
# Verification; Patient and Study Root Query/Retrieve FIND and MOVE
QUERIES = ("1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.2",
           "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2")


def pacs_profile(path):
    """A dcmtk association profile: each class of the studies with the transfer syntax it is stored in."""
    contexts = []
    classes = dict(demo.SOP, private=PRIVATE_CLASS, protocol=PROTOCOL_CLASS, unknown=UNKNOWN_CLASS)
    for kind, uid in sorted(classes.items()):
        contexts.append("%s\\%s" % (uid, "JPEG" if kind == "multiframe" else "Uncompressed"))
    with open(path, "w", encoding="ascii") as handle:
        handle.write("[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = 1.2.840.10008.1.2.1\n"
                     "TransferSyntax2 = 1.2.840.10008.1.2\n[JPEG]\nTransferSyntax1 = %s\n"
                     "[[PresentationContexts]]\n[EveryKind]\n" % demo.JPEG_LOSSLESS_SV1)
        for number, context in enumerate(contexts, start=1):
            handle.write("PresentationContext%d = %s\n" % (number, context))
        handle.write("[Queries]\n")  # what mkiso asks of it: C-ECHO, C-FIND, C-MOVE
        for number, uid in enumerate(QUERIES, start=1):
            handle.write("PresentationContext%d = %s\\Uncompressed\n" % (number, uid))
        handle.write("[[Profiles]]\n[EveryKind]\nPresentationContexts = EveryKind\n"
                     "[Queries]\nPresentationContexts = Queries\n")
    return path


class EveryKindPacs:
    def __init__(self, root, receiver_port):
        os.makedirs(root, exist_ok=True)
        profile = pacs_profile(os.path.join(root, "profile.cfg"))
        self.pacs = demo.Dcmqrscp(root, demo.free_port(), {"CDRECORD": receiver_port}, dcmtk_dir=DCMTK_DIR,
                                  options=("-xf", profile, "Queries", "EveryKind"))
        self.every = demo.EveryKindStudy("PAT-9001", "Gómez^Iñés", "EVERY01", dcmtk_dir=DCMTK_DIR)
        self.private = demo.EveryKindStudy("PAT-9002", "Privé^Paul", "PRIV.01", extra_class=PRIVATE_CLASS,
                                           dcmtk_dir=DCMTK_DIR)
        self.unknown = demo.EveryKindStudy("PAT-9003", "NEW^NORA", "UNK01", extra_class=UNKNOWN_CLASS,
                                           dcmtk_dir=DCMTK_DIR)
        self.protocol = demo.EveryKindStudy("PAT-9005", "Proto^Petra", "PROTO01", extra_class=PROTOCOL_CLASS,
                                            dcmtk_dir=DCMTK_DIR)
        self.pacs.add_studies([self.every, self.private, self.unknown, self.protocol])
        self.only_private = self._only_extra(demo.EveryKindStudy("PAT-9004", "ONLY^OLGA", "PRIVONLY",
                                                                 extra_class=PRIVATE_CLASS, dcmtk_dir=DCMTK_DIR))
        self.pacs.start()

    def _only_extra(self, study):
        """A study of nothing but its extra object (a vendor's raw data sent alone)."""
        paths = demo.write_study(study, os.path.join(self.pacs.storage, study.study_uid))
        keep = [path for path in paths if study.kinds[os.path.basename(path)[:-4]] == "extra"]
        for path in set(paths) - set(keep):
            os.remove(path)
        study.sop_uids = [os.path.basename(path)[:-4] for path in keep]
        subprocess.run([os.path.join(DCMTK_DIR, "dcmqridx"), self.pacs.storage] + keep, check=True)
        return study


@pytest.fixture(scope="module")
def every_pacs(tmp_path_factory, receiver_port):
    pacs = EveryKindPacs(str(tmp_path_factory.mktemp("every-pacs")), receiver_port)
    yield pacs
    pacs.pacs.stop()


@pytest.fixture
def every_service(make_service, settings, every_pacs):
    settings["pacs"]["port"] = every_pacs.pacs.port
    return lambda **overrides: make_service(**overrides)


def disc_job(service, wsgi_call, tmp_path, accession):
    app = application.Application(service.config, service)
    job = split_job(wsgi_call, app, [accession])
    return job, fetch_discs(wsgi_call, app, job, tmp_path)


# -- the checks every disc gets ----------------------------------------------------


def ordered_tree(path):
    """[(type, keys, children)] following the offsets; patients, studies and series sorted by their keys
    (dcmmkdir adds them in the order it finds the folders), the objects of a series in their order."""
    ds = pydicom.dcmread(path)
    by_offset = {record.seq_item_tell: record for record in ds.DirectoryRecordSequence}

    def keys(record):
        out = {}
        for element in record:
            skipped = OFFSETS | {"SpecificCharacterSet"} | BEYOND_F5.get(record.DirectoryRecordType, set())
            if element.keyword in skipped:
                continue
            out[element.keyword] = (str([pydicom.Dataset(item).to_json_dict() for item in element.value])
                                    if element.VR == "SQ" else str(element.value))
        return out

    def walk(offset, level):
        siblings = []
        while offset:
            record = by_offset[offset]
            siblings.append((record.DirectoryRecordType, keys(record),
                             walk(record.OffsetOfReferencedLowerLevelDirectoryEntity, level + 1)))
            offset = record.OffsetOfTheNextDirectoryRecord
        if level < 3:
            siblings.sort(key=lambda entry: sorted(entry[1].items()))
        return siblings

    return walk(ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity, 0)


def dcmmkdir_oracle(disc, folder, file_set_id):
    """dcmmkdir's DICOMDIR for the disc's own files (copied, as dcmmkdir writes next to them)."""
    shutil.copytree(os.path.join(disc.root, "DICOM"), os.path.join(folder, "DICOM"))
    subprocess.run([os.path.join(DCMTK_DIR, "dcmmkdir"), "+I", "-Nxc", "-Nec", "-Nrc", "+F", file_set_id, "-nb",
                    "+r", "+D", "DICOMDIR", "DICOM"], cwd=folder, check=True, capture_output=True)
    return os.path.join(folder, "DICOMDIR")


def dicom_files(disc):
    return [os.path.join(disc.root, path) for path in disc.files if path.startswith("DICOM" + os.sep)]


def record_types(dicomdir_path):
    """SOP Instance UID -> the type of the record that references it."""
    ds = pydicom.dcmread(dicomdir_path)
    return {str(r.ReferencedSOPInstanceUIDInFile): r.DirectoryRecordType
            for r in ds.DirectoryRecordSequence if "ReferencedSOPInstanceUIDInFile" in r}


def dciodvfy_findings(path):
    result = subprocess.run(["dciodvfy", path], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("Error", "Warning"))]


def dcentvfy_findings(paths):
    """dcentvfy's errors, and its warnings but for its own modelling of AccessionNumber's entity in SR and
    encapsulated documents (it places it in the series there), which says nothing about the files."""
    result = subprocess.run(["dcentvfy"] + paths, capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith(("Error", "Warning"))
            and "Different information entities for attribute - Element=<AccessionNumber>" not in line]


def check_disc(disc, iso_path, study, tmp_path):
    """The disc's DICOMDIR as dcmmkdir makes it, valid, each object under its own record type."""
    dicomdir = os.path.join(disc.root, "DICOMDIR")
    volume = volume_id(iso_path)
    assert pydicom.dcmread(dicomdir).FileSetID == volume  # PS3.12 F.1.1
    oracle = dcmmkdir_oracle(disc, str(tmp_path / ("oracle-" + volume)), volume)
    assert ordered_tree(dicomdir) == ordered_tree(oracle)
    assert dciodvfy_findings(dicomdir) == []
    assert dcentvfy_findings(dicom_files(disc)) == []
    on_disc = record_types(dicomdir)
    assert on_disc == {uid: demo.RECORD_OF[study.kinds[uid]] for uid in on_disc}
    return on_disc


def readme(disc):
    with open(os.path.join(disc.root, "README.TXT"), "rb") as handle:
        raw = handle.read()
    text = raw.decode("ascii")  # plain ASCII, or this fails
    assert raw.count(b"\n") == raw.count(b"\r\n") and raw.endswith(b"\r\n")
    return text


# -- the tests ---------------------------------------------------------------------


def test_every_kind_of_object_is_filed_as_dcmmkdir_files_it(every_service, wsgi_call, every_pacs, tmp_path):
    service = every_service()
    job, [(disc, iso_path)] = disc_job(service, wsgi_call, tmp_path, "EVERY01")
    on_disc = check_disc(disc, iso_path, every_pacs.every, tmp_path)
    assert sorted(on_disc.values()) == sorted(["IMAGE"] * 4 + ["SR DOCUMENT"] * 2 + [
        "KEY OBJECT DOC", "PRESENTATION", "ENCAP DOC"])
    syntaxes = {str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for path in dicom_files(disc)}
    assert syntaxes == {media.EXPLICIT_LE, demo.JPEG_LOSSLESS_SV1}  # the multi-frame image as stored
    assert job["discs"][0]["volume"] == "EVERY01" and job["discs"][0]["profile"] == "NONE"
    text = readme(disc)
    assert "1 DICOM study with 7 series and 9 objects" in text
    assert "DICOM media profile: none" in text and "JPEG Lossless SV1 (1.2.840.10008.1.2.4.70)" in text
    assert job["omitted"] == {"objects": 0, "sop_classes": [], "classes": []}


def test_the_sr_records_carry_their_titles_and_verification(every_service, wsgi_call, every_pacs, tmp_path):
    service = every_service()
    _, [(disc, _)] = disc_job(service, wsgi_call, tmp_path, "EVERY01")
    ds = pydicom.dcmread(os.path.join(disc.root, "DICOMDIR"))
    by_type = {}
    for record in ds.DirectoryRecordSequence:
        by_type.setdefault(record.DirectoryRecordType, []).append(record)
    titles = {r.ConceptNameCodeSequence[0].CodeMeaning: r for r in by_type["SR DOCUMENT"]}
    assert set(titles) == {"X-Ray Radiation Dose Report", "Diagnostic Imaging Report"}
    dose = titles["X-Ray Radiation Dose Report"]
    assert dose.ContentSequence[0].RelationshipType == "HAS CONCEPT MOD"  # what modifies its title
    assert titles["Diagnostic Imaging Report"].VerificationDateTime == "20240115120000"
    [presentation] = by_type["PRESENTATION"]
    assert presentation.ContentLabel == "WINDOW" and len(presentation.ReferencedSeriesSequence) == 1
    [pdf] = by_type["ENCAP DOC"]
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf" and pdf.DocumentTitle == "Radiology report"
    [patient] = by_type["PATIENT"]
    assert str(patient.PatientName) == "Gómez^Iñés" and patient.SpecificCharacterSet == "ISO_IR 100"


def test_transcoded_every_kind_disc(every_service, wsgi_call, every_pacs, tmp_path):
    service = every_service(iso={"transcode": "explicit-le", "media": "cd"})
    job, [(disc, iso_path)] = disc_job(service, wsgi_call, tmp_path, "EVERY01")
    check_disc(disc, iso_path, every_pacs.every, tmp_path)
    assert job["discs"][0]["profile"] == "STD-GEN-CD"
    assert "DICOM media profile: STD-GEN-CD" in readme(disc)


def test_split_every_kind_discs_each_complete(every_service, wsgi_call, every_pacs, tmp_path):
    files = [os.path.join(every_pacs.pacs.storage, every_pacs.every.study_uid, uid + ".dcm")
             for uid in every_pacs.every.sop_uids]
    half = sum(-(-os.path.getsize(path) // 2048) * 2048 + media.PER_IMAGE for path in files) // 2
    pages = webcontent.DISC_BYTES + webcontent.STUDY_BYTES + 7 * webcontent.SERIES_BYTES  # each disc its own
    service = every_service(iso={"media": "cd", "max_bytes": media.BASE + half + pages + 8192, "headroom_bytes": 0})
    job, discs = disc_job(service, wsgi_call, tmp_path, "EVERY01")
    assert len(discs) >= 2
    seen = {}
    for number, (disc, iso_path) in enumerate(discs, start=1):
        assert volume_id(iso_path) == "EVERY01_%d" % number == job["discs"][number - 1]["volume"]
        seen.update(check_disc(disc, iso_path, every_pacs.every, tmp_path))
        assert "This is disc %d of %d" % (number, len(discs)) in readme(disc)
    assert set(seen) == set(every_pacs.every.sop_uids)


def test_a_private_object_is_left_off_and_said_so(every_service, wsgi_call, every_pacs, tmp_path):
    service = every_service()
    job, [(disc, iso_path)] = disc_job(service, wsgi_call, tmp_path, "PRIV.01")
    on_disc = check_disc(disc, iso_path, every_pacs.private, tmp_path)
    [private_uid] = [uid for uid, kind in every_pacs.private.kinds.items() if kind == "extra"]
    assert private_uid not in on_disc and len(on_disc) == 9
    assert volume_id(iso_path) == "PRIV_01"
    assert job["omitted"] == {"objects": 1, "sop_classes": [PRIVATE_CLASS], "classes": [
        {"sop_class_uid": PRIVATE_CLASS, "name": None, "objects": 1, "reason": "private"}]}
    text = readme(disc)
    assert "Left off this disc: 1 object of private SOP class %s" % PRIVATE_CLASS in text
    assert "9 objects" in text


def test_a_private_object_kept_is_a_private_record_and_the_disc_claims_no_profile(
        every_service, wsgi_call, every_pacs, tmp_path):
    service = every_service(iso={"private_objects": "keep"})
    job, [(disc, iso_path)] = disc_job(service, wsgi_call, tmp_path, "PRIV.01")
    dicomdir = os.path.join(disc.root, "DICOMDIR")
    on_disc = record_types(dicomdir)
    assert on_disc == {uid: demo.RECORD_OF[kind] for uid, kind in every_pacs.private.kinds.items()}
    [private] = [r for r in pydicom.dcmread(dicomdir).DirectoryRecordSequence if r.DirectoryRecordType == "PRIVATE"]
    assert private.PrivateRecordUID == PRIVATE_CLASS == private.ReferencedSOPClassUIDInFile
    assert [line for line in dciodvfy_findings(dicomdir) if line.startswith("Error")] == []
    assert job["discs"][0]["profile"] == "NONE" and job["omitted"]["objects"] == 0
    text = readme(disc)
    assert "DICOM media profile: none: the disc holds objects of private SOP classes (%s)" % PRIVATE_CLASS in text
    assert "Left off" not in text and "10 objects" in text


@pytest.mark.parametrize("private_objects", ["omit", "keep"])
def test_a_protocol_object_is_left_off_and_said_so(every_service, wsgi_call, every_pacs, tmp_path, private_objects):
    """A CT study as recent scanners store it, with their Performed Procedure Protocol: received and checked
    against the PACS's list like every object, then left off the disc (PS3.3 gives it no record), and said so."""
    service = every_service(iso={"private_objects": private_objects})
    job, [(disc, iso_path)] = disc_job(service, wsgi_call, tmp_path, "PROTO01")
    [protocol_uid] = [uid for uid, kind in every_pacs.protocol.kinds.items() if kind == "extra"]
    assert job["progress"]["images_expected"] == job["progress"]["images_received"] == 10
    on_disc = check_disc(disc, iso_path, every_pacs.protocol, tmp_path)
    assert protocol_uid not in on_disc and len(on_disc) == 9
    staged = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in dicom_files(disc)}
    assert protocol_uid not in staged and len(staged) == 9  # not copied, not only unlisted
    pages = [path for path in disc.files if path.endswith(".HTM")]
    assert pages and not any("Performed protocol" in pathlib.Path(disc.root, path).read_text(encoding="utf-8")
                             for path in pages)  # nor in the web content
    assert job["discs"][0]["images"] == 9
    assert job["omitted"] == {"objects": 1, "sop_classes": [PROTOCOL_CLASS], "classes": [
        {"sop_class_uid": PROTOCOL_CLASS, "name": "CT Performed Procedure Protocol", "objects": 1,
         "reason": "no_directory_record"}]}
    text = readme(disc)
    assert ("Left off this disc: 1 object of CT Performed Procedure Protocol (%s), which has no place in a "
            "DICOMDIR" % PROTOCOL_CLASS) in text
    assert "private" not in text.lower() and "1 DICOM study with 7 series and 9 objects" in text


def test_readme_without_a_viewer_says_there_is_none(every_service, wsgi_call, every_pacs, tmp_path):
    service = every_service(iso={"institution": "Klinikum Süd, Radiologie", "contact": "Tel. +49 30 1234"})
    _, [(disc, _)] = disc_job(service, wsgi_call, tmp_path, "EVERY01")
    text = readme(disc)
    assert "Institution: Klinikum Sud, Radiologie\r\nContact: Tel. +49 30 1234\r\n" in text
    assert "There is no DICOM viewer on this disc" in text and "A DICOM viewer is on this disc" not in text
    assert "personal health information" in text and "mkiso" in text
    for private in ("Gomez", "Gómez", "PAT-9001", "Ines"):
        assert private not in text


def test_readme_names_the_viewer_that_is_on_the_disc(every_service, wsgi_call, every_pacs, tmp_path):
    viewer = tmp_path / "viewer"
    viewer.mkdir()
    (viewer / "AUTORUN.INF").write_text("[autorun]\r\nopen=VIEWER.EXE\r\nicon=VIEWER.EXE,0\r\n")
    (viewer / "VIEWER.EXE").write_bytes(b"MZ")
    service = every_service(iso={"viewer_dir": str(viewer)})
    _, [(disc, _)] = disc_job(service, wsgi_call, tmp_path, "EVERY01")
    text = readme(disc)
    assert "start VIEWER.EXE at the root of the disc" in text and "no DICOM viewer" not in text
    assert "VIEWER.EXE" in disc.files and "AUTORUN.INF" in disc.files


def test_the_volume_is_the_file_set_for_one_study_and_several(make_service, wsgi_call, tmp_path):
    """The conftest archive: a label with dots, and two accessions of one patient (MKISO)."""
    from discs import download
    service = make_service()
    app = application.Application(service.config, service)
    _, disc, iso_path = download(wsgi_call, app, "/api/iso/download", tmp_path,
                                 "accession_number=MR.180505.026", name="one")
    assert volume_id(iso_path) == "MR_180505_026" == pydicom.dcmread(os.path.join(disc.root, "DICOMDIR")).FileSetID
    _, disc, iso_path = download(wsgi_call, app, "/api/iso/download-multiple", tmp_path,
                                 "accession_numbers=MR.180505.026,ACC1002", name="multi")
    assert volume_id(iso_path) == "MKISO" == pydicom.dcmread(os.path.join(disc.root, "DICOMDIR")).FileSetID


def test_a_standard_class_mkiso_does_not_know_is_an_error_naming_it(every_service, wsgi_call):
    service = every_service(iso={"private_objects": "keep"})
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=UNK01")
    assert response.status == 500 and response.json()["code"] == "unknown_sop_class"
    assert UNKNOWN_CLASS in response.json()["error"]


def test_a_study_of_private_objects_only_makes_no_empty_disc(every_service, wsgi_call):
    service = every_service()
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=PRIVONLY")
    assert response.status == 500 and response.json()["code"] == "only_private_objects"
    assert PRIVATE_CLASS in response.json()["error"]


def test_a_study_of_private_objects_only_kept_is_a_disc_of_private_records(every_service, wsgi_call, tmp_path):
    service = every_service(iso={"private_objects": "keep"})
    _, [(disc, _)] = disc_job(service, wsgi_call, tmp_path, "PRIVONLY")
    assert list(record_types(os.path.join(disc.root, "DICOMDIR")).values()) == ["PRIVATE"]
