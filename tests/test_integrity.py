"""No foreign image on a disc (SPEC §3.4-3.7), tried as an attacker and as faults.

Everything here runs against the real dcmqrscp and the real receiver: a
second DICOM sender plays the attacker on the hospital network, the PACS'
index is rebuilt to lose an image between the manifest and the C-MOVE, a
tmpfs plays the small, full disk.
"""

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pydicom
import pytest
from pydicom.uid import generate_uid

from mkiso.dicom import retrieval
from mkiso.http import application
from mkiso.dicom.receiver import listening_sockets
from conftest import DCMTK_DIR, job_leftovers
from discs import check_pdi, download, open_iso

VICTIM = "MR.180505.026"
FORGED_NAME = "EVIL^MALLORY"


@pytest.fixture
def service(make_service):
    return make_service()


@pytest.fixture
def app(service):
    return application.Application(service.config, service)


def pacs_files(archive, accession):
    """The Part 10 files the PACS holds for the accession."""
    return sorted(os.path.join(archive.pacs.storage, study.study_uid, name)
                  for study in archive.by_accession(accession)
                  for name in os.listdir(os.path.join(archive.pacs.storage, study.study_uid)))


def forge(sources, folder, new_sop_uids=False, study_uid=None):
    """Copies of ``sources`` with another patient's name inside (the same SOP UIDs unless asked)."""
    os.makedirs(folder, exist_ok=True)
    forged = []
    for source in sources:
        ds = pydicom.dcmread(source)
        ds.PatientName = FORGED_NAME
        if new_sop_uids:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if study_uid:
            ds.StudyInstanceUID = study_uid
        path = os.path.join(folder, "%d.dcm" % len(forged))
        ds.save_as(path)
        forged.append(path)
    return forged


def send(paths, port, calling="MALLORY"):
    """C-STORE the files to the receiver as any host on the network could; storescu's output."""
    result = subprocess.run(
        [os.path.join(DCMTK_DIR, "storescu"), "-v", "-aet", calling, "-aec", "CDRECORD", "127.0.0.1", str(port)]
        + list(paths), capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def stop_a_writer(receiver, folder, stopped):
    """SIGSTOP a storescp of the receiver's that has a file open under ``folder`` (its pid into
    ``stopped``, for the SIGCONT); False while none has."""
    for proc in list(receiver._children):
        where = "/proc/%d/fd/" % proc.pid
        try:
            names = [os.readlink(where + fd) for fd in os.listdir(where)]
        except OSError:
            continue
        if any(name.startswith(folder) for name in names):
            os.kill(proc.pid, signal.SIGSTOP)
            stopped.append(proc.pid)
            return True
    return False


def stopped_writer(receiver, folder, stopped):
    """Wait (60 s) for a storescp of the receiver's to open a file under ``folder`` and SIGSTOP it: looked
    for every millisecond, as storescp writes a 64 MB image in tens of them (every 50, CI's load once let
    the whole write pass between two looks)."""
    return wait_for(lambda: stop_a_writer(receiver, folder, stopped), 60, every=0.001)


def disc_patient_names(disc):
    return {str(pydicom.dcmread(os.path.join(disc.root, path), stop_before_pixels=True).PatientName)
            for path in disc.files if path.startswith("DICOM" + os.sep)}


def wait_for(condition, timeout, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


# -- the attacker ------------------------------------------------------------

def test_same_sop_uid_injection_never_puts_a_foreign_image_on_a_disc(service, app, wsgi_call, archive, tmp_path):
    """The attack that used to succeed: copies with the victim's SOP UIDs and another name, in a loop."""
    forged = forge(pacs_files(archive, VICTIM), str(tmp_path / "forged"))
    port = service.config.receiver.port
    stop = threading.Event()
    sent = []

    def attacker():
        while not stop.is_set():
            sent.append("Received Store Response (Success)" in send(forged, port))

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    outcomes = []
    try:
        for attempt in range(12):
            time.sleep(0.011 * attempt)  # a different phase against the attacker's loop each time
            response = wsgi_call(app, "/api/iso/download", query="accession_number=" + VICTIM)
            if response.status != 200:
                assert response.status == 502, response.body[:300]
                outcomes.append(response.json()["code"])
                continue
            iso_path = str(tmp_path / ("%d.iso" % attempt))
            with open(iso_path, "wb") as handle:
                handle.write(response.body)
            disc = open_iso(iso_path, str(tmp_path / str(attempt)))
            check_pdi(disc, archive.sop_uids(VICTIM))
            assert disc_patient_names(disc) == {"Müller^Jürgen"}, "a foreign image is on the disc"
            outcomes.append("clean disc")
    finally:
        stop.set()
        thread.join(60)
    assert any(sent), "the attacker never got an image into the receiver"
    assert "unexpected_image" in outcomes, "the attack never hit a download: %s" % outcomes
    assert set(outcomes) <= {"unexpected_image", "clean disc"}, outcomes
    assert wait_for(lambda: os.listdir(service.receiver.inbox) == [], 5), "the attacker's images stayed"


def test_an_extra_image_sent_during_the_move_is_refused(service, app, wsgi_call, archive, tmp_path, monkeypatch):
    """Not a copy but one more image in the victim's study: not in the manifest, so 502."""
    extra = forge(pacs_files(archive, "ACC2001")[:1], str(tmp_path / "extra"), new_sop_uids=True)
    real_move = service.pacs.move_study

    def move_with_an_intruder(study_uid):
        assert "Received Store Response (Success)" in send(extra, service.config.receiver.port)
        return real_move(study_uid)

    monkeypatch.setattr(service.pacs, "move_study", move_with_an_intruder)
    response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001")
    assert response.status == 502
    assert response.json()["code"] == "unexpected_image"
    assert "1 images arrived" in response.json()["error"]
    assert job_leftovers(service) == []


def test_an_extra_image_is_refused_when_the_manifest_and_the_move_overlap(service, app, wsgi_call, archive, tmp_path,
                                                                          monkeypatch):
    """SPEC §3.9: the manifest's C-FIND runs on its own association while the C-MOVE runs.  Held so that
    every run overlaps both ways: the manifest is asked for only once the move has begun and an intruder's
    image is in the study's folder, and the move ends only once the manifest is in.  The intruder is still
    refused, with nothing left behind."""
    extra = forge(pacs_files(archive, "ACC2001")[:1], str(tmp_path / "extra"), new_sop_uids=True)
    real_move, real_list = service.pacs.move_study, service.pacs.list_instances
    moving, listed, overlapped = threading.Event(), threading.Event(), []

    def move_with_an_intruder(study_uid):
        moving.set()
        assert "Received Store Response (Success)" in send(extra, service.config.receiver.port)
        result = real_move(study_uid)
        overlapped.append(("manifest in before the move ended", listed.wait(10)))
        return result

    def list_during_the_move(study_uid, scratch_dir, **options):
        overlapped.append(("move begun before the manifest was asked for", moving.wait(10)))
        try:
            return real_list(study_uid, scratch_dir, **options)
        finally:
            listed.set()

    monkeypatch.setattr(service.pacs, "move_study", move_with_an_intruder)
    monkeypatch.setattr(service.pacs, "list_instances", list_during_the_move)
    response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001")
    assert sorted(overlapped) == [("manifest in before the move ended", True),
                                  ("move begun before the manifest was asked for", True)], overlapped
    assert response.status == 502, response.body[:300]
    assert response.json()["code"] == "unexpected_image"
    assert "1 images arrived" in response.json()["error"]
    assert job_leftovers(service) == []


def test_a_manifest_in_before_the_next_study_is_asked_for(service, app, wsgi_call, archive, tmp_path, monkeypatch):
    """Each study's manifest is asked for in a thread of its own (SPEC §3.9) and tells the job's expected
    count once it is in: the first may be in before the second study's lookup is even started.  Held so
    that it always is: still one disc of both studies, each checked against its own manifest."""
    real_init = retrieval.Lookup.__init__

    def answered_at_once(self, ask, then=None):
        real_init(self, ask, then)
        self.wait()

    monkeypatch.setattr(retrieval.Lookup, "__init__", answered_at_once)
    _, disc, _ = download(wsgi_call, app, "/api/iso/download-multiple", tmp_path,
                          "accession_numbers=MR.180505.026,ACC1002")
    check_pdi(disc, archive.sop_uids("MR.180505.026", "ACC1002"))


def test_an_image_caught_half_written_when_the_move_ends_is_refused(service, app, wsgi_call, archive, tmp_path,
                                                                   monkeypatch):
    """The race the injection loop above can hit: a foreign C-STORE's storescp is writing its file into
    the victim's study folder when the PACS's C-MOVE ends (held there by SIGSTOP, so every run hits it).
    The half-written file must be told as a foreign image, not read as a broken or duplicate one."""
    forged = forge(pacs_files(archive, "ACC2001")[:1], str(tmp_path / "forged"))
    ds = pydicom.dcmread(forged[0])
    ds.private_block(0x0009, "MALLORY", create=True).add_new(0x00, "OB", bytes(64 << 20))  # a long write
    ds.save_as(forged[0])
    real_move = service.pacs.move_study
    stopped = []

    def move_then_a_foreign_write(study_uid):
        result = real_move(study_uid)
        folder = service.receiver.study_dir(study_uid) + os.sep
        sender = threading.Thread(target=send, args=(forged, service.config.receiver.port), daemon=True)
        sender.start()

        assert stopped_writer(service.receiver, folder, stopped), \
            "the foreign storescp never opened a file in the study's folder"
        return result

    monkeypatch.setattr(service.pacs, "move_study", move_then_a_foreign_write)
    try:
        response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001")
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert response.status == 502, response.body[:300]
    assert response.json()["code"] == "unexpected_image"
    assert "1 images for study" in response.json()["error"] and "still arriving" in response.json()["error"]
    assert job_leftovers(service) == []


def test_a_folder_removed_under_a_stray_association_is_no_full_disk(service, archive, tmp_path):
    """The injection loop's other outcome: a retrieval collects (renames away) its study's folder while a
    stray association still sends into it, so that storescp cannot write its next file (no such file or
    directory).  That is no shortage of space: a retrieval failing meanwhile must not be told as a 507."""
    stray_uid = generate_uid()
    big, small = forge(pacs_files(archive, "ACC2001")[:2], str(tmp_path / "stray"), study_uid=stray_uid)
    ds = pydicom.dcmread(big)
    ds.private_block(0x0009, "MALLORY", create=True).add_new(0x00, "OB", bytes(64 << 20))  # a long write
    ds.save_as(big)
    receiver = service.receiver
    receiver.expect(stray_uid)  # as a retrieval of that study would: the sweep leaves its folder alone
    sender = threading.Thread(target=send, args=([big, small], service.config.receiver.port), daemon=True)
    sender.start()
    stopped = []
    try:
        assert stopped_writer(receiver, receiver.study_dir(stray_uid) + os.sep, stopped), \
            "the stray storescp never opened a file in its study's folder"
        assert receiver.collect(stray_uid, str(tmp_path / "collected")) == 1
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    sender.join(60)
    # storescp's error line reaches the receiver through the thread relaying its output: a moment later
    wait_for(lambda: "No such file or directory" in receiver.last_error, 10)
    assert "No such file or directory" in receiver.last_error, receiver.last_error
    assert receiver.write_failures == 0


def test_unsolicited_deliveries_are_removed_within_seconds(service, archive, tmp_path):
    stray = forge(pacs_files(archive, "ACC2001"), str(tmp_path / "stray"), study_uid=generate_uid())
    output = send(stray, service.config.receiver.port)
    assert output.count("Received Store Response (Success)") == len(stray), output
    started = time.monotonic()
    assert wait_for(lambda: os.listdir(service.receiver.inbox) == [], 5), os.listdir(service.receiver.inbox)
    assert time.monotonic() - started < 5


# -- the PACS changes under us -------------------------------------------------

def test_image_lost_between_the_manifest_and_the_move_is_502_with_the_number(
        service, app, wsgi_call, archive, monkeypatch):
    """dcmqrscp's index is rebuilt without one image after the IMAGE-level C-FIND.

    dcmqrscp reports no instance counts and its C-MOVE then succeeds with
    one image fewer: only the manifest can tell.
    """
    storage = archive.pacs.storage
    index = os.path.join(storage, "index.dat")
    lost = pacs_files(archive, "ACC2001")[0]
    real_move, real_list = service.pacs.move_study, service.pacs.list_instances
    listed = threading.Event()

    def list_instances(study_uid, scratch_dir, **options):
        try:
            return real_list(study_uid, scratch_dir, **options)
        finally:
            listed.set()

    def move_after_the_loss(study_uid):
        assert listed.wait(30)  # the manifest runs beside the move (SPEC §3.9): it lists all four
        shutil.copy(index, index + ".saved")
        os.unlink(index)
        everything = [os.path.join(folder, name) for folder, _, names in os.walk(storage)
                      for name in names if name.endswith(".dcm")]
        subprocess.run([os.path.join(DCMTK_DIR, "dcmqridx"), storage] + [p for p in everything if p != lost],
                       check=True, stdout=subprocess.DEVNULL)
        try:
            return real_move(study_uid)
        finally:
            os.replace(index + ".saved", index)

    monkeypatch.setattr(service.pacs, "list_instances", list_instances)
    monkeypatch.setattr(service.pacs, "move_study", move_after_the_loss)
    response = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001")
    assert response.status == 502, "a disc was made without the lost image (status %d)" % response.status
    body = response.json()
    assert body["code"] == "incomplete_study" and "1 of the 4 images the PACS lists" in body["error"], body
    assert job_leftovers(service) == []


@pytest.fixture
def refusing_tools(tmp_path):
    """dcmtk as installed, but findscu leaves SeriesInstanceUID out of IMAGE-level queries.

    dcmqrscp answers such a query with "Failed: UnableToProcess": a real
    refusal from the real PACS, the way a PACS without IMAGE-level C-FIND
    answers.
    """
    folder = tmp_path / "dcmtk"
    folder.mkdir()
    for name in os.listdir(DCMTK_DIR):
        if name.endswith("scu") or name.endswith("scp") or name.startswith("dcm"):
            os.symlink(os.path.join(DCMTK_DIR, name), folder / name)
    os.unlink(folder / "findscu")
    (folder / "findscu").write_text(
        "#!%s\nimport os, sys\nargs = sys.argv[1:]\n"
        "if 'QueryRetrieveLevel=IMAGE' in args:\n"
        "    at = args.index('SeriesInstanceUID')\n    del args[at - 1:at + 1]\n"
        "os.execv(%r, [%r] + args)\n" % (sys.executable, os.path.join(DCMTK_DIR, "findscu"), "findscu"))
    (folder / "findscu").chmod(0o755)
    return str(folder)


def test_pacs_refusing_image_level_queries_falls_back_to_the_counts(
        make_service, refusing_tools, wsgi_call, archive, tmp_path, caplog):
    service = make_service(tools={"dcmtk_dir": refusing_tools})
    app = application.Application(service.config, service)
    with caplog.at_level(logging.INFO, logger="mkiso"):
        for name in ("first", "second"):
            _, disc, _ = download(wsgi_call, app, "/api/iso/download", tmp_path, "accession_number=ACC2001", name)
            check_pdi(disc, archive.sop_uids("ACC2001"))
    refusals = [r for r in caplog.records if "refuses IMAGE-level C-FIND" in r.getMessage()]
    assert len(refusals) == 1 and "UnableToProcess" in refusals[0].getMessage()
    retrieved = [r for r in caplog.records if r.getMessage() == "study retrieved"]
    assert [r.fields["manifest"] for r in retrieved] == [False, False]


# -- the receiver's life -------------------------------------------------------

def test_receiver_down_shows_in_health(service, app, wsgi_call):
    service.receiver.stop()
    body = wsgi_call(app, "/api/health").json()
    assert body["status"] == "degraded" and body["checks"]["receiver"]["ok"] is False


def test_with_c_get_nothing_listens_and_health_says_not_used(make_service, wsgi_call, receiver_port):
    service = make_service(pacs={"retrieve": "get"})
    body = wsgi_call(application.Application(service.config, service), "/api/health").json()
    assert body["checks"]["receiver"] == {"ok": True, "detail": "not used (pacs.retrieve: get)"}
    assert receiver_port not in listening_sockets()


# -- a small, full disk ---------------------------------------------------------

def test_receiver_pauses_below_min_free_bytes_and_resumes(small_work_dir, make_service, wsgi_call, archive,
                                                         tmp_path):
    point = small_work_dir("64m")
    service = make_service(limits={"min_free_bytes": 16 * 2 ** 20})
    app = application.Application(service.config, service)
    port = service.config.receiver.port
    filler = point / "filler"
    with open(filler, "wb") as handle:
        handle.truncate(0)
        handle.write(b"\0" * (56 * 2 ** 20))
    assert wait_for(lambda: port not in listening_sockets(), 5), "the receiver kept listening on a full disk"
    check = wsgi_call(app, "/api/health").json()["checks"]["receiver"]
    assert check["ok"] is False and "below limits.min_free_bytes" in check["detail"], check
    filler.unlink()
    assert wait_for(lambda: port in listening_sockets(), 5), "the receiver did not come back"
    assert wsgi_call(app, "/api/health").json()["checks"]["receiver"]["ok"] is True
    _, disc, _ = download(wsgi_call, app, "/api/iso/download", tmp_path, "accession_number=ACC2001")
    check_pdi(disc, archive.sop_uids("ACC2001"))


@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_disk_full_during_the_retrieval_is_507_and_nothing_is_left(small_work_dir, make_service, wsgi_call,
                                                                  archive, retrieve):
    """BIG01 is about 10 MB; the work dir has 6 MB."""
    small_work_dir("6m")
    service = make_service(limits={"min_free_bytes": 512 * 1024}, pacs={"retrieve": retrieve})
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=BIG01")
    body = response.json()
    assert response.status == 507 and body["code"] == "insufficient_storage", body
    assert "ran out of space while receiving accession BIG01" in body["error"]
    assert job_leftovers(service) == []
    if service.receiver is not None:
        assert wait_for(lambda: os.listdir(service.receiver.inbox) == [], 5)
