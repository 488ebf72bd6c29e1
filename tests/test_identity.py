"""Whose disc it is (SPEC §3.8, §3.10): two patients sharing a Patient ID, and a PACS that corrected a
patient in its database but still sends the old files, against a real dcmqrscp, receiver and publisher."""

import glob
import json
import os
import pathlib
import subprocess

import pydicom
import pytest

from mkiso import demo, errors
from mkiso.dicom import identity, pacs, received
from mkiso.disc import dicomdir, tree
from mkiso.http import application
from conftest import DCMTK_DIR
from discs import check_pdi, download
from hostile_pacs import HostilePacs
from test_every_kind import dcentvfy_findings, dciodvfy_findings


def study(accession, patient_id, name, **identity_values):
    return pacs.Study(accession, "1.2.3.%d" % len(accession), patient_id, name,
                      identity=dict(identity_values, PatientID=patient_id, PatientName=name))


# -- the rules -------------------------------------------------------------------------


@pytest.mark.parametrize("keyword, one, other", [
    ("PatientName", "DOE^JANE", "DOE^JANE^^^"),
    ("PatientName", "DOE^JANE ", "DOE^JANE"),
    ("PatientName", "Yamada^Tarou=山田^太郎=", "Yamada^Tarou=山田^太郎"),
    ("PatientName", "DOE^ JANE", "DOE^JANE"),
    ("PatientID", "PID-77 ", "PID-77"),
])
def test_insignificant_differences_are_the_same_value(keyword, one, other):
    assert identity.significant(keyword, one) == identity.significant(keyword, other)


@pytest.mark.parametrize("keyword, one, other", [
    ("PatientName", "DOE^JANE", "DOE^JANET"),
    ("PatientName", "DOE^JANE", "doe^jane"),
    ("PatientName", "DOE^^JANE", "DOE^JANE"),
    ("PatientID", "PID-77", "PID-077"),
])
def test_significant_differences_stay(keyword, one, other):
    assert identity.significant(keyword, one) != identity.significant(keyword, other)


def test_same_patient_id_other_issuer_is_another_patient():
    studies = [study("A1", "PID-77", "ALPHA^ANNA", IssuerOfPatientID="HOSP-A"),
               study("B1", "PID-77", "ALPHA^ANNA", IssuerOfPatientID="HOSP-B")]
    with pytest.raises(errors.Conflict, match="2 different patients.*share a Patient ID") as caught:
        identity.check_one_patient(studies, allowed=False)
    assert caught.value.status == 409
    identity.check_one_patient(studies, allowed=True)


def test_same_patient_id_other_name_or_birth_date_is_another_patient():
    for other in (study("B1", "PID-77", "BETA^BERT"),
                  study("B1", "PID-77", "ALPHA^ANNA", PatientBirthDate="19800202")):
        with pytest.raises(errors.Conflict):
            identity.check_one_patient([study("A1", "PID-77", "ALPHA^ANNA", PatientBirthDate="19700101"),
                                        other], allowed=False)


def test_one_patient_written_two_ways_is_one_patient():
    identity.check_one_patient([study("A1", "PID-1", "DOE^JANE", IssuerOfPatientID="H"),
                                study("A2", "PID-1", "DOE^JANE^^", IssuerOfPatientID="H ")], allowed=False)


def write_files(tmp_path, patient_id, name, folder, issuer=None, birth_date=None, charset=None):
    sample = demo.SampleStudy(patient_id, name, "ACC-" + folder, series=(2,))
    paths = demo.write_study(sample, str(tmp_path / folder))
    for path in paths:
        ds = pydicom.dcmread(path)
        if issuer is not None:
            ds.IssuerOfPatientID = issuer
        if birth_date is not None:
            ds.PatientBirthDate = birth_date
        if charset is not None and "\0" not in charset:
            ds.SpecificCharacterSet = charset
        ds.save_as(path)
        if charset is not None and "\0" in charset:  # as storescp keeps it: pydicom would not write it
            with open(path, "r+b") as handle:
                data = handle.read().replace(b"ISO_IR 192", charset.encode("ascii"), 1)
                handle.seek(0)
                handle.write(data)
    return sample, paths


@pytest.mark.parametrize("scan", ["c", "pydicom"])
def test_files_of_two_issuers_get_two_patient_records(tmp_path, monkeypatch, scan):
    """The disc's PATIENT records group by the whole patient, not by the Patient ID alone."""
    if scan == "pydicom":
        monkeypatch.setattr(received.fastcopy, "scan_headers", received.fastcopy.py_scan_headers)
    _, first = write_files(tmp_path, "PID-77", "ALPHA^ANNA", "a", issuer="HOSP-A")
    _, second = write_files(tmp_path, "PID-77", "ALPHA^ANNA", "b", issuer="HOSP-B")
    files = received.read_all(first + second)
    assert {image.issuer for image in files} == {"HOSP-A", "HOSP-B"}
    placed = tree.pdi_paths(files)
    assert {path.split("/")[1] for _, path in placed} == {"PAT00001", "PAT00002"}
    assert sum(level == 0 for level, _ in dicomdir.records(list(placed))) == 2


@pytest.mark.parametrize("scan", ["c", "pydicom"])
@pytest.mark.parametrize("charset", ["\0SO_IR 192", "ISO_IR 999", "UTF-8"])
def test_a_file_whose_character_set_is_no_defined_term_is_refused(tmp_path, monkeypatch, scan, charset):
    if scan == "pydicom":
        monkeypatch.setattr(received.fastcopy, "scan_headers", received.fastcopy.py_scan_headers)
    _, paths = write_files(tmp_path, "PID-1", "DOE^JANE", "a", charset=charset)
    # pydicom may already stop at the NUL while reading: refused as unreadable then, as clearly
    with pytest.raises(errors.UpstreamFailed, match="SpecificCharacterSet|could not be read as DICOM") as caught:
        received.read_all(paths)
    assert (caught.value.status, caught.value.code) == (502, "bad_image")


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO-IR 100", "ISO_IR 192", ["", "ISO 2022 IR 87"]])
def test_defined_and_mended_character_sets_pass(tmp_path, charset):
    _, paths = write_files(tmp_path, "PID-1", "DOE^JANE", "a", charset=charset)
    assert len(received.read_all(paths)) == 2


# -- against a real PACS, receiver and publisher --------------------------------------


class IdentityPacs:
    """A dcmqrscp holding two patients under one Patient ID, and a study whose stored files the PACS's
    database no longer matches (the name corrected there, the files left as they were)."""

    def __init__(self, root, receiver_port):
        self.pacs = demo.Dcmqrscp(root, demo.free_port(), {"CDRECORD": receiver_port}, dcmtk_dir=DCMTK_DIR)
        self.alpha = demo.SampleStudy("PID-77", "ALPHA^ANNA", "IDA01", series=(2,))
        self.beta = demo.SampleStudy("PID-77", "BETA^BERT", "IDB01", series=(3,))
        self.corrected = demo.SampleStudy("PID-88", "GAMMA^GUSTAV", "IDC01", series=(2,))
        self.pacs.add_studies([self.alpha, self.beta, self.corrected])
        # The PACS now answers GAMMA^GUSTAV (its index); the files it sends still say GAMMA^GUS.
        for path in glob.glob(os.path.join(self.pacs.storage, self.corrected.study_uid, "*.dcm")):
            ds = pydicom.dcmread(path)
            ds.PatientName = "GAMMA^GUS"
            ds.save_as(path)
        self.pacs.start()


@pytest.fixture(scope="module")
def identity_pacs(tmp_path_factory, receiver_port):
    pacs_ = IdentityPacs(str(tmp_path_factory.mktemp("identity-pacs")), receiver_port)
    yield pacs_
    pacs_.pacs.stop()


@pytest.fixture
def identity_app(make_service, settings, identity_pacs):
    settings["pacs"]["port"] = identity_pacs.pacs.port

    def make(**overrides):
        service = make_service(**overrides)
        return application.Application(service.config, service)
    return make


def audit_lines(settings):
    with open(settings["audit"]["path"], encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_two_patients_sharing_a_patient_id_are_not_one_disc(identity_app, wsgi_call, settings):
    app = identity_app()
    response = wsgi_call(app, "/api/iso/download-multiple", query="accession_numbers=IDA01,IDB01")
    assert response.status == 409, response.body[:300]
    assert response.json()["code"] == "multiple_patients"
    assert "2 different patients" in response.json()["error"]


class Publisher:
    """A real storescp as the publisher, logging each association it accepts."""

    def __init__(self, folder):
        self.folder = folder
        self.port = demo.free_port()
        os.makedirs(folder)
        self.log = open(os.path.join(os.path.dirname(folder), "publisher.log"), "wb")
        self.proc = subprocess.Popen(
            [os.path.join(DCMTK_DIR, "storescp"), "-v", "-aet", "RIMAGE", "-od", folder, str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        assert demo.wait_for_port(self.port)

    def associations(self):
        """How many associations brought images (health's C-ECHOs aside)."""
        with open(self.log.name, encoding="utf-8", errors="replace") as handle:
            return sum("Received Store Request" in association
                       for association in handle.read().split("Association Received")[1:])

    def stop(self):
        demo.stop_group(self.proc)
        self.log.close()


@pytest.fixture
def publisher_scp(tmp_path):
    scp = Publisher(str(tmp_path / "publisher" / "in"))
    yield scp
    scp.stop()


def test_printing_two_patients_sharing_a_patient_id_is_refused_and_sends_nothing(
        identity_app, wsgi_call, publisher_scp):
    app = identity_app(publisher={"host": "127.0.0.1", "port": publisher_scp.port, "ae_title": "RIMAGE"})
    response = wsgi_call(app, "/api/iso/print", query="accession_number=IDA01,IDB01")
    assert response.status == 409, response.body[:300]
    assert os.listdir(publisher_scp.folder) == []


def test_allowed_two_patients_sharing_a_patient_id_stay_apart(identity_app, wsgi_call, identity_pacs,
                                                              publisher_scp, tmp_path):
    """With limits.allow_multi_patient: two PATIENT records, a file name of neither, two associations."""
    app = identity_app(limits={"allow_multi_patient": True},
                       publisher={"host": "127.0.0.1", "port": publisher_scp.port, "ae_title": "RIMAGE"})
    response, disc, iso_path = download(wsgi_call, app, "/api/iso/download-multiple", tmp_path,
                                        "accession_numbers=IDA01,IDB01")
    assert "ALPHA" not in response.header("Content-Disposition")
    assert "BETA" not in response.header("Content-Disposition")
    wanted = set(identity_pacs.alpha.sop_uids) | set(identity_pacs.beta.sop_uids)
    found = check_pdi(disc, wanted)
    patients = [record for record in found.DirectoryRecordSequence if record.DirectoryRecordType == "PATIENT"]
    assert sorted(str(record.PatientName) for record in patients) == ["ALPHA^ANNA", "BETA^BERT"]
    by_name = {patient.patient_name: patient for patient in (identity_pacs.alpha, identity_pacs.beta)}
    for folder in ("PAT00001", "PAT00002"):  # each folder one patient's images, all of them
        headers = [pydicom.dcmread(path, stop_before_pixels=True)
                   for path in glob.glob(os.path.join(disc.root, "DICOM", folder, "*", "*", "*"))]
        [name] = {str(header.PatientName) for header in headers}
        assert {str(header.SOPInstanceUID) for header in headers} == set(by_name.pop(name).sop_uids)
    assert dciodvfy_findings(os.path.join(disc.root, "DICOMDIR")) == []
    response = wsgi_call(app, "/api/iso/print", query="accession_number=IDA01,IDB01")
    assert response.status == 200, response.body[:300]
    assert publisher_scp.associations() == 2


def test_files_naming_the_patient_otherwise_than_the_pacs_are_502(identity_app, wsgi_call, settings):
    """The PACS corrected the name in its database; the files still carry the old one: no disc."""
    app = identity_app()
    response = wsgi_call(app, "/api/iso/download-multiple", query="accession_numbers=IDC01")
    assert response.status == 502, response.body[:300]
    body = response.json()
    assert body["code"] == "patient_mismatch"
    assert "PatientName (9 characters) is not the PACS' (12 characters)" in body["error"]
    assert "GAMMA" not in body["error"]
    assert not response.header("Content-Disposition")
    assert audit_lines(settings)[-1]["code"] == "patient_mismatch"


def test_a_consistent_disc_of_the_identity_pacs_passes_dcentvfy(identity_app, wsgi_call, identity_pacs, tmp_path):
    _, disc, _ = download(wsgi_call, identity_app(), "/api/iso/download", tmp_path, "accession_number=IDA01")
    check_pdi(disc, identity_pacs.alpha.sop_uids)
    paths = [os.path.join(disc.root, path) for path in disc.files if path.startswith("DICOM" + os.sep)]
    assert dcentvfy_findings(paths) == []


# -- a PACS that answers IssuerOfPatientID (dcmqrscp does not) ---------------------------


@pytest.fixture
def issuer_pacs(tmp_path, receiver_port, settings):
    """The scripted PACS answering from files of one Patient ID, name and birth date under two issuers
    (accessions ACC-ISS-A, ACC-ISS-B)."""
    made = [write_files(tmp_path, "PID-77", "ALPHA^ANNA", folder, issuer=issuer)[0]
            for folder, issuer in (("ISS-A", "HOSP-A"), ("ISS-B", "HOSP-B"))]
    scripted = HostilePacs(glob.glob(str(tmp_path / "ISS-*" / "*.dcm")), {"CDRECORD": receiver_port},
                           dcmtk_dir=DCMTK_DIR)
    scripted.start(demo.free_port())
    settings["pacs"]["port"] = scripted.port
    yield scripted, made
    scripted.stop()


def test_two_issuers_of_one_patient_id_are_two_patients_from_a_pacs_that_says_so(
        issuer_pacs, make_service, wsgi_call):
    scripted, _ = issuer_pacs
    service = make_service()
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download-multiple",
                         query="accession_numbers=ACC-ISS-A,ACC-ISS-B")
    assert response.status == 409, response.body[:300]
    assert "share a Patient ID" in response.json()["error"]
    assert not [request for request in scripted.requests if request[0] == "C-MOVE"]


def test_two_issuers_allowed_on_one_disc_get_a_patient_record_each(issuer_pacs, make_service, wsgi_call,
                                                                   tmp_path):
    _, made = issuer_pacs
    service = make_service(limits={"allow_multi_patient": True})
    _, disc, _ = download(wsgi_call, application.Application(service.config, service), "/api/iso/download-multiple",
                          tmp_path, "accession_numbers=ACC-ISS-A,ACC-ISS-B")
    found = check_pdi(disc, {uid for sample in made for uid in sample.sop_uids})
    patients = [record for record in found.DirectoryRecordSequence if record.DirectoryRecordType == "PATIENT"]
    assert len(patients) == 2  # one each: the images of HOSP-A's patient under one, HOSP-B's under the other
    issuers = [{str(pydicom.dcmread(path, stop_before_pixels=True).IssuerOfPatientID)
                for path in glob.glob(os.path.join(disc.root, "DICOM", folder, "*", "*", "*"))}
               for folder in ("PAT00001", "PAT00002")]
    assert sorted(sorted(found) for found in issuers) == [["HOSP-A"], ["HOSP-B"]]
    assert dciodvfy_findings(os.path.join(disc.root, "DICOMDIR")) == []


# -- what the C-FIND answers leave out, the files still tell ---------------------------------


def scripted_pacs(tmp_path, receiver_port, settings, folders):
    """The scripted PACS answering from the files written into ``folders`` of ``tmp_path``."""
    scripted = HostilePacs([path for folder in folders for path in glob.glob(str(tmp_path / folder / "*.dcm"))],
                           {"CDRECORD": receiver_port}, dcmtk_dir=DCMTK_DIR)
    scripted.start(demo.free_port())
    settings["pacs"]["port"] = scripted.port
    return scripted


@pytest.fixture
def blank_name_pacs(tmp_path, receiver_port, settings):
    """PID-77 as ALPHA^ANNA (ACC-A) and BETA^BERT (ACC-B), the STUDY-level answers without a name."""
    write_files(tmp_path, "PID-77", "ALPHA^ANNA", "A")
    write_files(tmp_path, "PID-77", "BETA^BERT", "B")
    scripted = scripted_pacs(tmp_path, receiver_port, settings, ("A", "B"))
    scripted.alter("STUDY", PatientName="")
    yield scripted
    scripted.stop()


def test_an_answer_without_the_name_still_keeps_two_patients_apart(blank_name_pacs, make_service, wsgi_call,
                                                                   publisher_scp):
    """The answers compared nothing on the name: the files' two patients made one disc, and one print
    of two associations, before the files were held to one patient too."""
    service = make_service(publisher={"host": "127.0.0.1", "port": publisher_scp.port, "ae_title": "RIMAGE"})
    app = application.Application(service.config, service)
    for path, query in (("/api/iso/download-multiple", "accession_numbers=ACC-A,ACC-B"),
                        ("/api/iso/print", "accession_number=ACC-A,ACC-B")):
        response = wsgi_call(app, path, query=query)
        assert response.status == 409, (path, response.body[:300])
        assert "2 different patients" in response.json()["error"]
    assert os.listdir(publisher_scp.folder) == []


@pytest.fixture
def issuers_dcmqrscp(tmp_path, receiver_port, settings):
    """A real dcmqrscp (its answers never carry IssuerOfPatientID) holding PID-77 ALPHA^ANNA twice, the
    files of one from HOSP-A, of the other from HOSP-B."""
    pacs_ = demo.Dcmqrscp(str(tmp_path / "pacs"), demo.free_port(), {"CDRECORD": receiver_port},
                          dcmtk_dir=DCMTK_DIR)
    studies = [demo.SampleStudy("PID-77", "ALPHA^ANNA", accession, series=(2,)) for accession in ("ISA01", "ISB01")]
    pacs_.add_studies(studies)
    for sample, issuer in zip(studies, ("HOSP-A", "HOSP-B"), strict=True):
        for path in glob.glob(os.path.join(pacs_.storage, sample.study_uid, "*.dcm")):
            ds = pydicom.dcmread(path)
            ds.IssuerOfPatientID = issuer
            ds.save_as(path)
    pacs_.start()
    settings["pacs"]["port"] = pacs_.port
    yield pacs_
    pacs_.stop()


def test_two_issuers_behind_a_pacs_that_never_answers_issuers_are_two_patients(issuers_dcmqrscp, make_service,
                                                                                 wsgi_call):
    service = make_service()
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download-multiple",
                         query="accession_numbers=ISA01,ISB01")
    assert response.status == 409, response.body[:300]


@pytest.fixture
def lossy_pacs(tmp_path, receiver_port, settings):
    """MÜLLER (ACC-A) and MÄLLER (ACC-B), PID-77, in Latin-1 bytes labelled UTF-8, in the files and in the
    answers: both decode to M\\ufffdLLER."""
    raw = {"ACC-A": b"M\xdcLLER^ANNA", "ACC-B": b"M\xc4LLER^ANNA"}
    for accession, name in raw.items():
        _, paths = write_files(tmp_path, "PID-77", "MXLLER^ANNA", accession[-1], charset="ISO_IR 192")
        for path in paths:
            data = pathlib.Path(path).read_bytes()
            pathlib.Path(path).write_bytes(data.replace(b"MXLLER^ANNA", name))
    scripted = scripted_pacs(tmp_path, receiver_port, settings, ("A", "B"))
    answers = scripted.answers

    def find(level, identifier):
        found = answers(level, identifier)
        for answer in found if level == "STUDY" else ():
            answer["PatientName"] = raw[answer["AccessionNumber"]]
        return found
    scripted.find = find
    yield scripted
    scripted.stop()


def test_names_that_are_no_text_in_their_character_set_are_refused(lossy_pacs, make_service, wsgi_call):
    """Read with replacement characters, the two names were one (a disc of both, one PATIENT record):
    a name that does not decode is refused where it enters, in the answer and in a file."""
    service = make_service()
    app = application.Application(service.config, service)
    response = wsgi_call(app, "/api/iso/download-multiple", query="accession_numbers=ACC-A,ACC-B")
    assert (response.status, response.json()["code"]) == (502, "bad_pacs_answer"), response.body[:300]
    assert "PatientName" in response.json()["error"]
    lossy_pacs.alter("STUDY", PatientName="")  # no name in the answer at all: the files are refused
    response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC-A")
    assert (response.status, response.json()["code"]) == (502, "bad_image"), response.body[:300]
