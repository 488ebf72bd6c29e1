"""The disc cache (SPEC §9): the same disc again without a C-MOVE; a changed study gets a new one."""

import json
import logging
import os
import stat
import subprocess
import time

import pydicom
import pytest
import shutil

from mkiso import demo, service as service_module
from mkiso.http import application
from mkiso.cache import DiscCache
from mkiso.disc import digests
from conftest import DCMTK_DIR
from discs import check_pdi, open_iso
from test_integrity import wait_for

ON = {"max_bytes": 10 ** 9, "ttl_s": 3600}


def retrievals(caplog):
    """How many studies were really retrieved from the PACS (one log line each)."""
    return sum(1 for record in caplog.records if record.getMessage() == "study retrieved")


def download(wsgi_call, app, accession):
    response = wsgi_call(app, "/api/iso/download", query="accession_number=" + accession)
    assert response.status == 200, response.body[:300]
    return response.body


def test_the_same_disc_again_is_served_from_the_cache(make_service, wsgi_call, caplog, archive, tmp_path):
    caplog.set_level(logging.INFO)
    service = make_service(cache=ON)
    app = application.Application(service.config, service)
    first = download(wsgi_call, app, "ACC2001")
    assert retrievals(caplog) == 1
    head = wsgi_call(app, "/api/iso/download", method="HEAD", query="accession_number=ACC2001")
    assert head.header("Content-Length") == str(len(first))
    resumed = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001", headers={"Range": "bytes=1000-"})
    assert resumed.status == 206 and resumed.body == first[1000:]  # a resume across requests: same bytes
    again = download(wsgi_call, app, "ACC2001")
    assert again == first
    assert retrievals(caplog) == 1, "the cached disc must not need a C-MOVE"
    assert "iso from the cache" in caplog.text
    iso_path = tmp_path / "again.iso"
    iso_path.write_bytes(again)
    check_pdi(open_iso(str(iso_path), str(tmp_path / "again")), archive.sop_uids("ACC2001"))
    [cached] = os.listdir(service.path("cache"))
    assert stat.S_IMODE(os.stat(service.path("cache", cached)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(service.path("cache", cached, "disc.iso")).st_mode) == 0o600
    tree_bytes = sum(os.path.getsize(os.path.join(folder, name))
                     for folder, _, names in os.walk(service.path("cache", cached, "tree")) for name in names)
    health = wsgi_call(app, "/api/health").json()["checks"]["cache"]  # the tree (for a ZIP) and the ISO
    assert health["ok"] and health["detail"].startswith("1 discs, %d bytes" % (len(first) + tree_bytes))
    job = wsgi_call(app, "/api/jobs", method="POST", body=b'{"accessions": ["ACC2001"]}',
                    headers={"Content-Type": "application/json"}).json()
    deadline = time.monotonic() + 30
    while job["state"] != "ready" and time.monotonic() < deadline:
        job = wsgi_call(app, "/api/jobs/" + job["id"]).json()
    path, query = job["links"]["iso"].split("?", 1)
    assert wsgi_call(app, path, query=query).body == first
    assert retrievals(caplog) == 1


def test_a_different_disc_is_not_taken_from_the_cache(make_service, wsgi_call, caplog):
    caplog.set_level(logging.INFO)
    service = make_service(cache=ON)
    app = application.Application(service.config, service)
    download(wsgi_call, app, "ACC2001")
    multiple = wsgi_call(app, "/api/iso/download-multiple", query="accession_numbers=ACC2001,DUP01")
    assert multiple.status == 200
    assert retrievals(caplog) == 1 + 3  # ACC2001 again (another disc: other label, more studies) and DUP01's two


def test_the_off_switch(make_service, wsgi_call, caplog):
    caplog.set_level(logging.INFO)
    service = make_service(cache={"max_bytes": 0})
    app = application.Application(service.config, service)
    download(wsgi_call, app, "ACC2001")
    download(wsgi_call, app, "ACC2001")
    assert retrievals(caplog) == 2
    assert os.listdir(service.path("cache")) == []
    assert wsgi_call(app, "/api/health").json()["checks"]["cache"]["detail"] == "off (cache.max_bytes: 0)"


@pytest.fixture
def own_pacs(tmp_path, receiver_port, settings):
    """A PACS of this test's own, whose study the test may change."""
    pacs = demo.Dcmqrscp(str(tmp_path / "own-pacs"), demo.free_port(), {"CDRECORD": receiver_port},
                         dcmtk_dir=DCMTK_DIR)
    study = demo.SampleStudy("PAT-5001", "GROWING^STUDY", "GROW01", series=(3,))
    pacs.add_studies([study])
    pacs.start()
    settings["pacs"]["port"] = pacs.port
    yield pacs, study
    pacs.stop()


def test_an_image_added_to_the_study_makes_a_new_disc(own_pacs, make_service, wsgi_call, caplog, tmp_path):
    caplog.set_level(logging.INFO)
    pacs, study = own_pacs
    service = make_service(cache=ON)
    app = application.Application(service.config, service)
    first = download(wsgi_call, app, "GROW01")
    added = demo.SampleStudy(study.patient_id, study.patient_name, study.accession, series=(1,))
    added.study_uid = study.study_uid
    pacs.add_studies([added])
    second = download(wsgi_call, app, "GROW01")
    assert retrievals(caplog) == 2 and second != first
    iso_path = tmp_path / "grown.iso"
    iso_path.write_bytes(second)
    check_pdi(open_iso(str(iso_path), str(tmp_path / "grown")), set(study.sop_uids) | set(added.sop_uids))
    assert download(wsgi_call, app, "GROW01") == second and retrievals(caplog) == 2


def correct_in_the_pacs(pacs, study, **changes):
    """The PACS corrects the study's patient (a rename, a merge): same UIDs, new values, re-indexed."""
    folder = os.path.join(pacs.storage, study.study_uid)
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    for path in paths:
        image = pydicom.dcmread(path)
        for keyword, value in changes.items():
            setattr(image, keyword, value)
        image.save_as(path)
    subprocess.run([os.path.join(DCMTK_DIR, "dcmqridx"), pacs.storage] + paths, check=True)


PATIENT = ("PatientName", "PatientID")


def patient_on_disc(iso, folder):
    """(name, ID) in the disc's DICOMDIR PATIENT record and in every image: one pair, or the test fails."""
    disc = open_iso(str(iso), str(folder))
    dicomdir = pydicom.dcmread(os.path.join(disc.root, "DICOMDIR"))
    found = {(str(record.PatientName), str(record.PatientID)) for record in dicomdir.DirectoryRecordSequence
             if record.DirectoryRecordType == "PATIENT"}
    found |= {(str(image.PatientName), str(image.PatientID)) for image in (
        pydicom.dcmread(os.path.join(disc.root, path), stop_before_pixels=True)
        for path in disc.files if path.startswith("DICOM" + os.sep))}
    [pair] = found
    return pair


@pytest.fixture
def correctable_pacs(tmp_path, receiver_port, settings):
    """A PACS of this test's own: a study to be corrected and one of another patient left as it is."""
    pacs = demo.Dcmqrscp(str(tmp_path / "own-pacs"), demo.free_port(), {"CDRECORD": receiver_port},
                         dcmtk_dir=DCMTK_DIR)
    fixed = demo.SampleStudy("PAT-6001", "Schmitt^Anna", "FIX01", series=(2, 1))
    kept = demo.SampleStudy("PAT-6002", "KEEP^KARL", "KEEP01", series=(2,))
    pacs.add_studies([fixed, kept])
    pacs.start()
    settings["pacs"]["port"] = pacs.port
    yield pacs, fixed
    pacs.stop()


@pytest.mark.parametrize("keyword, before, after", [
    ("PatientName", "Schmitt^Anna", "Schmidt^Anna"),
    ("PatientID", "PAT-6001", "PAT-6001-MERGED"),
])
def test_a_patient_corrected_in_the_pacs_gets_a_new_disc(correctable_pacs, make_service, wsgi_call, caplog,
                                                         tmp_path, keyword, before, after):
    """Same UIDs, another name (or ID): the next disc carries it; the other patient's disc is still cached."""
    caplog.set_level(logging.INFO)
    pacs, study = correctable_pacs
    service = make_service(cache=ON)
    app = application.Application(service.config, service)
    (tmp_path / "first.iso").write_bytes(download(wsgi_call, app, "FIX01"))
    kept = download(wsgi_call, app, "KEEP01")
    assert dict(zip(PATIENT, patient_on_disc(tmp_path / "first.iso", tmp_path / "first"), strict=True))[
        keyword] == before
    correct_in_the_pacs(pacs, study, **{keyword: after})
    (tmp_path / "second.iso").write_bytes(download(wsgi_call, app, "FIX01"))
    assert retrievals(caplog) == 3, "the corrected study must be retrieved again, not taken from the cache"
    second = dict(zip(PATIENT, patient_on_disc(tmp_path / "second.iso", tmp_path / "second"), strict=True))
    assert second[keyword] == after
    check_pdi(open_iso(str(tmp_path / "second.iso"), str(tmp_path / "checked")), study.sop_uids)
    assert len(os.listdir(service.path("cache"))) == 3  # a new entry beside the first two
    assert download(wsgi_call, app, "KEEP01") == kept and retrievals(caplog) == 3  # unchanged: the cache's
    with open(service.config.audit.path) as handle:
        outcomes = [line for line in map(json.loads, handle) if line["stage"] == "ended"]
    assert outcomes[2]["patient_ids"] == [second["PatientID"]]


IMAGE = 512 * 1024  # bytes of pixels per image: a study's size in MiB is half its image count


@pytest.fixture
def space_pacs(tmp_path, receiver_port, settings):
    """Three studies of 12 MiB to fill the cache, one of 28 MiB to need the room."""
    pacs = demo.Dcmqrscp(str(tmp_path / "space-pacs"), demo.free_port(), {"CDRECORD": receiver_port},
                         dcmtk_dir=DCMTK_DIR)
    pacs.add_studies([demo.SampleStudy("PAT-70%02d" % n, "FILL^NUMBER%d" % n, "FILL%d" % n, series=(24,),
                                       image_bytes=IMAGE) for n in (1, 2, 3)]
                     + [demo.SampleStudy("PAT-7099", "NEW^NORA", "ROOM01", series=(56,), image_bytes=IMAGE)])
    pacs.start()
    settings["pacs"]["port"] = pacs.port
    yield pacs
    pacs.stop()


def test_cached_discs_give_way_before_a_download_fails_for_space(space_pacs, small_work_dir, make_service,
                                                                 wsgi_call, caplog, tmp_path):
    """80 MiB work dir, 72 of it cached discs (each its 12 MiB tree and its 12 MiB ISO): a 28 MiB study (and
    its 28 MiB ISO) fits only once all go."""
    caplog.set_level(logging.INFO)
    small_work_dir("80m")
    service = make_service(cache=ON, limits={"min_free_bytes": 4 * 2 ** 20})
    app = application.Application(service.config, service)
    for n in (1, 2, 3):
        download(wsgi_call, app, "FILL%d" % n)
    assert service.cache.stats()[0] == 3
    response = wsgi_call(app, "/api/iso/download", query="accession_number=ROOM01")
    assert response.status == 200, response.body[:300]
    (tmp_path / "room.iso").write_bytes(response.body)
    assert patient_on_disc(tmp_path / "room.iso", tmp_path / "room") == ("NEW^NORA", "PAT-7099")
    cached = os.listdir(service.path("cache"))
    assert len(cached) == 1 and service.cache.stats()[0] == 1  # only the new disc
    assert "cached discs evicted to make room" in caplog.text
    assert wait_for(lambda: service.receiver.listening, 5)


def test_cached_discs_never_outlive_ttl(make_service, wsgi_call, monkeypatch):
    monkeypatch.setattr(service_module, "HOUSEKEEPING_EVERY_S", 0.2)
    service = make_service(cache={"max_bytes": 10 ** 9, "ttl_s": 1})
    download(wsgi_call, application.Application(service.config, service), "ACC2001")
    assert len(os.listdir(service.path("cache"))) == 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.listdir(service.path("cache")):
        time.sleep(0.1)
    assert os.listdir(service.path("cache")) == []  # with no request to trigger it


# -- the cache itself, on plain files ----------------------------------------------


def disc_tree(folder, name, size):
    """A staged disc of one file of ``size`` bytes: (its tree, its digests)."""
    root = os.path.join(folder, name)
    os.makedirs(root)
    with open(os.path.join(root, "IMG"), "wb") as handle:
        handle.write(os.urandom(size))
    return root, list(digests.digest_tree(root))


def store(cache, folder, name, size):
    tree, found = disc_tree(folder, name, size)
    cache.store(name, tree, found, (1, 2))
    return tree


def test_least_recently_used_go_first_past_max_bytes(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    cache = DiscCache(str(root), max_bytes=2500, ttl_s=3600)
    for name in "abc":
        store(cache, str(tmp_path), name, 1000)
        if name == "b":
            os.mkdir(tmp_path / "a-used")
            assert cache.fetch("a", str(tmp_path / "a-used")).tree  # a is used: b is now oldest
    assert sorted(os.listdir(root)) == ["a", "c"]
    assert cache.stats() == (2, 2000)
    assert cache.fetch("b", str(tmp_path)) is None
    store(cache, str(tmp_path), "huge", 3000)  # larger than the whole cache: not kept
    assert cache.stats() == (2, 2000)
    assert cache.free(1) == 1000 and sorted(os.listdir(root)) == ["c"]


def test_a_fetched_disc_survives_eviction(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    cache = DiscCache(str(root), max_bytes=1000, ttl_s=3600)
    original = store(cache, str(tmp_path), "a", 1000)
    shutil.rmtree(original)  # the job that made it is done
    os.mkdir(tmp_path / "sending")
    fetched = cache.fetch("a", str(tmp_path / "sending"))
    assert (fetched.digests[0].path, fetched.when) == ("IMG", (1, 2))
    store(cache, str(tmp_path), "b", 1000)  # evicts a
    assert os.listdir(root) == ["b"]
    assert os.path.getsize(os.path.join(fetched.tree, "IMG")) == 1000  # the download's own link still reads
