"""ISO downloads end to end: real dcmqrscp, real receiver, real dcmmkdir and
genisoimage; every disc is opened and compared with what the PACS holds.

The disc tests run twice: retrieving by C-MOVE through the receiver, and by
C-GET (``pacs.retrieve: get``), when nothing may listen on the receiver port."""

import logging
import os
import subprocess
import time

import pydicom
import pytest

from mkiso import demo, logs
from mkiso.http import application
from discs import check_pdi, download, joliet_listing, volume_id


@pytest.fixture
def viewer(tmp_path):
    folder = tmp_path / "viewer"
    (folder / "VIEWER").mkdir(parents=True)
    (folder / "AUTORUN.INF").write_text("[autorun]\r\nopen=VIEWER\\VIEWER.EXE\r\n")
    (folder / "VIEWER" / "VIEWER.EXE").write_bytes(b"MZ not really a viewer")
    return str(folder)


@pytest.fixture(params=["move", "get"])
def service(request, make_service, viewer):
    return make_service(iso={"viewer_dir": viewer}, pacs={"retrieve": request.param})


@pytest.fixture
def app(service):
    return application.Application(service.config, service)


def test_single_download_is_a_complete_pdi_disc(wsgi_call, app, archive, tmp_path):
    response, disc, iso_path = download(wsgi_call, app, "/api/iso/download", tmp_path, "accession_number=ACC2001")
    dicomdir = check_pdi(disc, archive.sop_uids("ACC2001"))
    assert response.header("Content-Disposition") == (
        "attachment; filename=\"ACC2001.iso\"; filename*=UTF-8''ACC2001.iso")
    assert "AUTORUN.INF" in disc.files and os.path.join("VIEWER", "VIEWER.EXE") in disc.files
    assert [r.DirectoryRecordType for r in dicomdir.DirectoryRecordSequence].count("PATIENT") == 1
    assert volume_id(iso_path) == "ACC2001"
    assert "/DICOM/PAT00001/STU00001/SER00001/IMG00001" in joliet_listing(iso_path)
    with open(os.path.join(disc.root, "README.TXT")) as handle:
        readme = handle.read()
    assert "DOE" not in readme and "PAT-2001" not in readme and "mkiso" in readme


def test_images_are_the_received_part10_files(wsgi_call, app, archive, tmp_path):
    _, disc, _ = download(wsgi_call, app, "/api/iso/download", tmp_path, "accession_number=ACC2001")
    image = pydicom.dcmread(os.path.join(disc.root, "DICOM", "PAT00001", "STU00001", "SER00001", "IMG00001"))
    assert image.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert image.PatientID == "PAT-2001" and image.AccessionNumber == "ACC2001"


def test_multiple_download_holds_every_study_of_the_patient(wsgi_call, app, archive, tmp_path):
    query = "accession_numbers=MR.180505.026,ACC1002"
    response, disc, iso_path = download(wsgi_call, app, "/api/iso/download-multiple", tmp_path, query)
    dicomdir = check_pdi(disc, archive.sop_uids("MR.180505.026", "ACC1002"))
    types = [r.DirectoryRecordType for r in dicomdir.DirectoryRecordSequence]
    assert types.count("PATIENT") == 1 and types.count("STUDY") == 2 and types.count("SERIES") == 3
    patient = [r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT"][0]
    assert str(patient.PatientName) == "Müller^Jürgen"
    assert volume_id(iso_path) == "MKISO"


def test_non_ascii_patient_name_in_the_filename(wsgi_call, app, tmp_path):
    response, _, _ = download(wsgi_call, app, "/mkiso_multiple.php", tmp_path,
                              "accession_numbers=MR.180505.026,ACC1002")
    assert response.header("Content-Disposition") == (
        "attachment; filename=\"MULLER_JURGEN.iso\"; filename*=UTF-8''M%C3%BCller_J%C3%BCrgen.iso")


def test_accession_with_dots(wsgi_call, app, archive, tmp_path):
    response, disc, _ = download(wsgi_call, app, "/mkiso.php", tmp_path, "accession_number=MR.180505.026")
    check_pdi(disc, archive.sop_uids("MR.180505.026"))
    assert 'filename="MR.180505.026.iso"' in response.header("Content-Disposition")


def test_accession_matching_two_studies_gets_both(wsgi_call, app, archive, tmp_path):
    assert len(archive.by_accession("DUP01")) == 2
    _, disc, _ = download(wsgi_call, app, "/mkiso2.php", tmp_path, "accession_number=DUP01")
    dicomdir = check_pdi(disc, archive.sop_uids("DUP01"))
    assert [r.DirectoryRecordType for r in dicomdir.DirectoryRecordSequence].count("STUDY") == 2


def test_missing_study_id_and_series_number_keep_every_image(wsgi_call, app, archive, tmp_path):
    study = archive.by_accession("ACC3001")[0]
    assert study.study_id is None and not study.series_numbers
    _, disc, _ = download(wsgi_call, app, "/api/iso/download", tmp_path, "accession_number=ACC3001")
    dicomdir = check_pdi(disc, archive.sop_uids("ACC3001"))
    images = [r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
    assert len(images) == study.image_count == 5


def test_accession_list_on_accession_number_parameter(wsgi_call, app, archive, tmp_path):
    _, disc, _ = download(wsgi_call, app, "/api/iso/download-multiple", tmp_path,
                          "accession_number=ACC1002,%20MR.180505.026,ACC1002,")
    check_pdi(disc, archive.sop_uids("MR.180505.026", "ACC1002"))


def test_legacy_layout(make_service, viewer, wsgi_call, archive, tmp_path):
    service = make_service(iso={"layout": "legacy", "viewer_dir": viewer, "volume_label": "Patient CD"})
    app = application.Application(service.config, service)
    _, disc, iso_path = download(wsgi_call, app, "/mkiso.php", tmp_path, "accession_number=DUP01")
    received = [path for path in disc.files if path.startswith("DICOMDIR" + os.sep)]
    assert os.path.isdir(os.path.join(disc.root, "DICOMDIR"))
    assert disc.sop_uids(received) == archive.sop_uids("DUP01")
    assert "AUTORUN.INF" in disc.files
    assert volume_id(iso_path) == "PATIENT_CD"


def test_same_accession_twice_in_a_row(wsgi_call, app, archive, tmp_path):
    for attempt in ("first", "second"):
        _, disc, _ = download(wsgi_call, app, "/api/iso/download", tmp_path, "accession_number=ACC2001", attempt)
        check_pdi(disc, archive.sop_uids("ACC2001"))


def test_unknown_accession_is_404_naming_it(wsgi_call, app):
    response = wsgi_call(app, "/api/iso/download", query="accession_number=NOSUCH")
    assert response.status == 404
    assert response.json()["code"] == "study_not_found" and "NOSUCH" in response.json()["error"]


def test_one_unknown_among_several_is_404_naming_it(wsgi_call, app):
    response = wsgi_call(app, "/api/iso/download-multiple", query="accession_numbers=ACC2001,NOSUCH")
    assert response.status == 404 and "NOSUCH" in response.json()["error"]


def test_every_unknown_accession_is_named_in_the_404(wsgi_call, app):
    response = wsgi_call(app, "/api/iso/download-multiple", query="accession_numbers=NOSUCH1,ACC2001,NOSUCH2")
    assert response.status == 404
    assert response.json()["error"] == "The PACS has no study for accession numbers NOSUCH1, NOSUCH2."


def test_two_patients_is_409(wsgi_call, app):
    response = wsgi_call(app, "/api/iso/download-multiple", query="accession_numbers=ACC2001,ACC3001")
    assert response.status == 409
    assert response.json()["code"] == "multiple_patients"


def test_two_patients_allowed_when_configured(make_service, wsgi_call, archive, tmp_path):
    service = make_service(limits={"allow_multi_patient": True})
    app = application.Application(service.config, service)
    _, disc, _ = download(wsgi_call, app, "/api/iso/download-multiple", tmp_path, "accession_numbers=ACC2001,ACC3001")
    dicomdir = check_pdi(disc, archive.sop_uids("ACC2001", "ACC3001"))
    assert [r.DirectoryRecordType for r in dicomdir.DirectoryRecordSequence].count("PATIENT") == 2


def test_disc_over_max_bytes_is_413(make_service, wsgi_call):
    service = make_service(iso={"max_bytes": 100000})
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=ACC2001")
    assert response.status == 413 and response.json()["code"] == "disc_too_large"


def test_too_little_free_space_is_507_before_asking_the_pacs(make_service, silent_pacs, wsgi_call):
    service = make_service(limits={"min_free_bytes": 10 ** 18})
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=ACC2001")
    assert response.status == 507 and response.json()["code"] == "insufficient_storage"
    with pytest.raises(BlockingIOError):
        silent_pacs.accept()


BAD_INPUTS = [
    ("/api/iso/download", "", "missing_parameter"),
    ("/api/iso/download", "accession_number=", "missing_parameter"),
    ("/api/iso/download", "accession_number=%20%20", "missing_parameter"),
    ("/api/iso/download", "accession_number=*", "bad_accession"),
    ("/api/iso/download", "accession_number=ACC?", "bad_accession"),
    ("/api/iso/download", "accession_number=AC%5CC", "bad_accession"),
    ("/api/iso/download", "accession_number=" + "1" * 17, "bad_accession"),
    ("/api/iso/download", "accession_number=-k", "bad_accession"),
    ("/api/iso/download", "accession_number=ACC%0A1", "bad_accession"),
    ("/api/iso/download", "accession_number=ACC%001", "bad_accession"),
    ("/api/iso/download", "accession_number=ACC%091", "bad_accession"),
    ("/api/iso/download", "accession_number=A,B", "bad_accession"),
    ("/api/iso/download", "accession_number=A&accession_number=B", "bad_request"),
    ("/mkiso.php", "accession_number=*", "bad_accession"),
    ("/api/iso/download-multiple", "", "missing_parameter"),
    ("/api/iso/download-multiple", "accession_numbers=,%20,", "missing_parameter"),
    ("/api/iso/download-multiple", "accession_numbers=ACC1,*", "bad_accession"),
    ("/api/iso/download-multiple", "accession_numbers=ACC1,-x", "bad_accession"),
    ("/api/iso/download-multiple", "accession_numbers=" + ",".join("A%d" % i for i in range(21)),
     "too_many_accessions"),
    ("/mkiso_multiple.php", "accession_numbers=A%0D", "bad_accession"),
    # Anything but printable ASCII: C1 controls, U+2028, DEL, invalid UTF-8, look-alikes.
    ("/api/iso/download", "accession_number=ACC%C2%852001", "bad_accession"),
    ("/api/iso/download", "accession_number=ACC%C2%9B1", "bad_accession"),
    ("/api/iso/download", "accession_number=ACC%E2%80%A81", "bad_accession"),
    ("/api/iso/download", "accession_number=ACC%7F1", "bad_accession"),
    ("/api/iso/download", "accession_number=ACC%FF1", "bad_accession"),
    ("/api/iso/download", "accession_number=ACC%C3%281", "bad_accession"),
    ("/api/iso/download", "accession_number=ACC%EF%BC%8A", "bad_accession"),
    ("/api/iso/download", "accession_number=ACC%EF%BC%9F", "bad_accession"),
    ("/api/iso/download", "accession_number=A%EF%BC%BCB", "bad_accession"),
    ("/api/iso/download", "accession_number=M%C3%BCller", "bad_accession"),
    # Both spellings at once: which one was meant?
    ("/api/iso/download-multiple", "accession_numbers=ACC2001&accession_number=ACC1002", "bad_request"),
    ("/api/iso/print", "accession_number=ACC2001&accession_numbers=ACC1002", "bad_request"),
]


@pytest.mark.parametrize("path, query, code", BAD_INPUTS)
def test_bad_input_is_400_and_the_pacs_is_not_asked(make_service, silent_pacs, wsgi_call, path, query, code):
    service = make_service()
    response = wsgi_call(application.Application(service.config, service), path, query=query)
    assert response.status == 400, response.body
    body = response.json()
    assert body["code"] == code and body["error"].endswith(".")
    with pytest.raises(BlockingIOError):
        silent_pacs.accept()


def test_refused_values_are_shown_escaped_in_the_answer_and_the_log(make_service, silent_pacs, wsgi_call, caplog):
    service = make_service()
    app = application.Application(service.config, service)
    with caplog.at_level(logging.INFO):
        body = wsgi_call(app, "/api/iso/download\u0085", query="accession_number=ACC%C2%852001").json()
        answer = wsgi_call(app, "/api/iso/download", query="accession_number=ACC%C2%852001").json()
    assert answer["error"].startswith("Accession number 'ACC\\xc2\\x852001' contains a character")
    assert body["code"] == "not_found"
    lines = [logs.TextFormatter().format(record) for record in caplog.records]
    lines += [logs.JsonFormatter().format(record) for record in caplog.records]
    assert lines and all(line.isprintable() for line in lines), [line for line in lines if not line.isprintable()]


def test_bad_input_error_names_the_problem(make_service, silent_pacs, wsgi_call):
    service = make_service()
    app = application.Application(service.config, service)
    body = wsgi_call(app, "/api/iso/download", query="accession_number=ACC*").json()
    assert body["error"] == "Accession number 'ACC*' contains a wildcard (* or ?); only exact numbers are accepted."
    body = wsgi_call(app, "/api/iso/download", query="accession_number=" + "X" * 17).json()
    assert body["error"] == "Accession number '%s' is longer than 16 characters." % ("X" * 17)


def test_auth_required_when_enabled(make_service, wsgi_call, archive, tmp_path):
    service = make_service(auth={"enabled": True, "api_key": "k3y"})
    app = application.Application(service.config, service)
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": "k3y "}):
        response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001", headers=headers)
        assert response.status == 401 and response.json()["code"] == "unauthorized"
    response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001", headers={"X-API-Key": "k3y"})
    assert response.status == 200


def test_pacs_stopped_is_502(make_service, settings, wsgi_call):
    settings["pacs"]["port"] = demo.free_port()
    service = make_service()
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=ACC2001")
    assert response.status == 502
    body = response.json()
    assert body["code"] == "pacs_failed" and "Connection refused" in body["error"]


def test_pacs_that_never_answers_is_504_within_the_timeout(make_service, settings, silent_pacs, wsgi_call):
    settings["timeouts"]["find_s"] = 2
    service = make_service()
    started = time.monotonic()
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=ACC2001")
    elapsed = time.monotonic() - started
    assert response.status == 504, response.body
    assert response.json()["code"] == "timeout"
    assert elapsed < 2 + 10
    assert no_tool_left_for_port(silent_pacs.getsockname()[1])


def no_tool_left_for_port(port):
    """No dcmtk process still aims at that port: timed-out tools are killed, not orphaned."""
    found = subprocess.run(["pgrep", "-f", "127.0.0.1 %d" % port], capture_output=True, text=True)
    return found.stdout.split() == []


def test_pacs_refusing_our_ae_is_502(make_service, wsgi_call):
    service = make_service(pacs={"ae_title": "NOTTHEPACS"})
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=ACC2001")
    assert response.status == 502 and "association rejected" in response.json()["error"]


def test_an_unwritable_work_dir_is_503_with_a_sentence(make_service, wsgi_call, silent_pacs):
    """The work dir read-only (a bind mount: root ignores file modes): 503, and health says why."""
    service = make_service(timeouts={"find_s": 2})  # health's C-ECHO to the silent PACS
    app = application.Application(service.config, service)
    work_dir = service.config.paths.work_dir
    subprocess.run(["mount", "--bind", work_dir, work_dir], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", work_dir], check=True)
        response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001")
        with pytest.raises(BlockingIOError):
            silent_pacs.accept()  # refused before the PACS was asked
        health = wsgi_call(app, "/api/health").json()["checks"]["work_dir"]
    finally:
        subprocess.run(["umount", work_dir], check=True)
    body = response.json()
    assert response.status == 503 and body["code"] == "work_dir_unwritable", body
    assert "is not writable (Read-only file system)" in body["error"]
    assert health["ok"] is False and "not writable" in health["detail"]


def test_the_iso_line_carries_the_phase_split(make_service, wsgi_call, caplog):
    """The benchmark reads where the time went from this line: every phase, in milliseconds."""
    caplog.set_level(logging.INFO, logger="mkiso.steps")
    service = make_service()
    assert wsgi_call(application.Application(service.config, service), "/api/iso/download",
                     query="accession_number=ACC2001").status == 200
    [line] = [record for record in caplog.records if record.getMessage() == "iso built"]
    for phase in ("find", "manifest", "retrieve", "stage", "dicomdir", "iso"):
        assert isinstance(line.fields[phase + "_ms"], int) and line.fields[phase + "_ms"] >= 0, phase
    assert "size_ms" not in line.fields  # laid out over its tree: that one run of genisoimage sized it
    assert line.fields["discs"] == 1 and line.fields["images"] == 4
