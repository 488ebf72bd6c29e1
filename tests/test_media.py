"""Media (SPEC §10): a disc fits its medium, a request splits over several discs, the profile is stated.

A PACS of this module's own holds studies sized against a test-sized CD
(``iso.media: cd`` with ``iso.max_bytes`` as the override, no headroom):
three studies of one patient that need a disc each, a study of two series
that needs two, a series that needs two, and JPEG and JPEG-LS studies.
"""

import json
import os
import re
import shutil
import subprocess
import time

import pydicom
import pytest

from mkiso import demo
from mkiso.disc import media
from mkiso.http import application
from conftest import DCMTK_DIR
from discs import check_pdi, open_iso, volume_id

IMAGE = 200 * 1024
CD = media.BASE + 700000  # room for three 200 KB images (one study) but not six
SMALL_CD = {"media": "cd", "max_bytes": CD, "headroom_bytes": 0}


def study(accession, patient="PAT-7001", name="SPLIT^SUSAN", series=(3,), date="20240115", noise=False):
    return demo.SampleStudy(patient, name, accession, series=series, image_bytes=IMAGE, study_date=date, noise=noise)


def compressed_pacs(root, receiver_port, sample, tool, options, *tool_options):
    """A dcmqrscp holding ``sample`` compressed by dcmtk's ``tool``, sending it as stored (``options``).

    dcmqrscp proposes one compressed transfer syntax besides the uncompressed
    ones (-xs JPEG Lossless, -xt JPEG-LS), and then cannot send uncompressed
    files to a receiver that prefers it: one PACS per kind.
    """
    pacs = demo.Dcmqrscp(root, demo.free_port(), {"CDRECORD": receiver_port}, dcmtk_dir=DCMTK_DIR, options=options)
    folder = os.path.join(pacs.storage, sample.study_uid)
    paths = demo.write_study(sample, folder)
    for path in paths:
        subprocess.run([os.path.join(DCMTK_DIR, tool)] + list(tool_options) + [path, path + ".c"], check=True)
        os.replace(path + ".c", path)
    subprocess.run([os.path.join(DCMTK_DIR, "dcmqridx"), pacs.storage] + paths, check=True,
                   stdout=subprocess.DEVNULL)
    pacs.start()
    pacs.originals = paths
    pacs.study = sample
    return pacs


class MediaPacs:
    """The uncompressed studies of this module, sized against SMALL_CD, in a dcmqrscp of its own."""

    def __init__(self, root, receiver_port):
        self.pacs = demo.Dcmqrscp(root, demo.free_port(), {"CDRECORD": receiver_port}, dcmtk_dir=DCMTK_DIR)
        self.three = [study("OLD01", date="20220101"), study("NEW01", date="20240301"),
                      study("MID01", date="20230101")]
        self.two_series = study("SER01", patient="PAT-7002", name="TWO^SERIES", series=(3, 3))
        self.one_series = study("IMG01", patient="PAT-7003", name="ONE^SERIES", series=(5,))
        self.pacs.add_studies(self.three + [self.two_series, self.one_series])
        self.pacs.start()

    def stop(self):
        self.pacs.stop()


@pytest.fixture(scope="module")
def media_pacs(tmp_path_factory, receiver_port):
    pacs = MediaPacs(str(tmp_path_factory.mktemp("media-pacs")), receiver_port)
    yield pacs
    pacs.stop()


@pytest.fixture
def service_for(make_service, settings, media_pacs):
    settings["pacs"]["port"] = media_pacs.pacs.port
    return lambda **overrides: make_service(**overrides)


@pytest.fixture(scope="module")
def jpeg_pacs(tmp_path_factory, receiver_port):
    sample = demo.SampleStudy("PAT-7004", "JPEG^JOE", "JPG01", series=(2,), image_bytes=8192, noise=True)
    pacs = compressed_pacs(str(tmp_path_factory.mktemp("jpeg-pacs")), receiver_port, sample, "dcmcjpeg", ("-xs",),
                           "+e1")  # JPEG Lossless SV1
    yield pacs
    pacs.stop()


@pytest.fixture
def jpeg_service(make_service, settings, jpeg_pacs):
    settings["pacs"]["port"] = jpeg_pacs.port
    return lambda **overrides: make_service(**overrides)


def split_job(wsgi_call, app, accessions):
    body = json.dumps({"accessions": accessions, "split": True}).encode()
    job = wsgi_call(app, "/api/jobs", method="POST", body=body, headers={"Content-Type": "application/json"}).json()
    deadline = time.monotonic() + 60
    while job["state"] not in ("ready", "failed") and time.monotonic() < deadline:
        time.sleep(0.05)
        job = wsgi_call(app, "/api/jobs/" + job["id"]).json()
    assert job["state"] == "ready", job["error"]
    return job


def fetch_discs(wsgi_call, app, job, tmp_path):
    """Every disc of the job, opened: [(disc, iso path)]."""
    opened = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for entry in job["discs"]:
        path, query = entry["links"]["iso"].split("?", 1)
        response = wsgi_call(app, path, query=query)
        assert response.status == 200 and len(response.body) == entry["bytes"]
        iso_path = tmp_path / ("disc-%d.iso" % entry["number"])
        iso_path.write_bytes(response.body)
        opened.append((open_iso(str(iso_path), str(tmp_path / ("disc-%d" % entry["number"]))), str(iso_path)))
    return opened


def disc_uids(disc):
    return disc.sop_uids([path for path in disc.files if path.startswith("DICOM" + os.sep)])


def dciodvfy_errors(dicomdir_path):
    result = subprocess.run(["dciodvfy", dicomdir_path], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def volume_set(iso_path):
    info = subprocess.run(["isoinfo", "-d", "-i", iso_path], capture_output=True, text=True, check=True).stdout
    return (int(re.search(r"Volume set size is: (\d+)", info).group(1)),
            int(re.search(r"Volume set sequence number is: (\d+)", info).group(1)))


def check_split(discs, expected_uids, capacity):
    """Each disc complete and within capacity, together exactly the expected images, none twice."""
    seen = []
    for number, (disc, iso_path) in enumerate(discs, start=1):
        assert os.path.getsize(iso_path) <= capacity
        uids = disc_uids(disc)
        check_pdi(disc, uids)  # its DICOMDIR references exactly its own images
        assert dciodvfy_errors(os.path.join(disc.root, "DICOMDIR")) == []
        readme = open(os.path.join(disc.root, "README.TXT"), encoding="ascii").read()
        assert "This is disc %d of %d" % (number, len(discs)) in readme
        assert volume_id(iso_path).endswith("_%d" % number)
        assert pydicom.dcmread(os.path.join(disc.root, "DICOMDIR")).FileSetID == volume_id(iso_path)
        assert volume_set(iso_path) == (len(discs), number)
        seen += sorted(uids)
    assert len(seen) == len(set(seen)), "an image is on two discs"
    assert set(seen) == set(expected_uids)
    return [disc_uids(disc) for disc, _ in discs]


def test_three_studies_three_cds_newest_first(service_for, wsgi_call, media_pacs, tmp_path):
    service = service_for(iso=SMALL_CD)
    app = application.Application(service.config, service)
    job = split_job(wsgi_call, app, ["OLD01", "NEW01", "MID01"])
    assert [entry["number"] for entry in job["discs"]] == [1, 2, 3] and "iso" not in job["links"]
    per_disc = check_split(fetch_discs(wsgi_call, app, job, tmp_path),
                           {uid for s in media_pacs.three for uid in s.sop_uids}, CD)
    old, new, mid = media_pacs.three
    assert per_disc == [set(new.sop_uids), set(mid.sop_uids), set(old.sop_uids)]  # whole studies, newest first
    several = wsgi_call(app, "/api/jobs/%s/iso" % job["id"])
    assert several.status == 409 and several.json()["code"] == "several_discs"


def test_the_synchronous_download_says_how_many_discs(service_for, wsgi_call):
    service = service_for(iso=SMALL_CD)
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download-multiple",
                         query="accession_numbers=OLD01,NEW01,MID01")
    assert response.status == 413
    body = response.json()
    assert body["code"] == "needs_split" and body["discs"] == 3
    assert body["error"].startswith("These studies need 3 discs of CD (%d bytes usable)" % CD)


def test_a_study_bigger_than_a_disc_splits_at_series(service_for, wsgi_call, media_pacs, tmp_path):
    service = service_for(iso=SMALL_CD)
    app = application.Application(service.config, service)
    job = split_job(wsgi_call, app, ["SER01"])
    per_disc = check_split(fetch_discs(wsgi_call, app, job, tmp_path), media_pacs.two_series.sop_uids, CD)
    series = [set(media_pacs.two_series.sop_uids[:3]), set(media_pacs.two_series.sop_uids[3:])]
    assert per_disc == series  # each disc one whole series


def test_a_series_bigger_than_a_disc_splits_at_images(service_for, wsgi_call, media_pacs, tmp_path):
    service = service_for(iso=SMALL_CD)
    app = application.Application(service.config, service)
    job = split_job(wsgi_call, app, ["IMG01"])
    per_disc = check_split(fetch_discs(wsgi_call, app, job, tmp_path), media_pacs.one_series.sop_uids, CD)
    assert [len(uids) for uids in per_disc] == [3, 2]
    assert per_disc[0] == set(media_pacs.one_series.sop_uids[:3])  # in instance order


@pytest.mark.parametrize("medium, profile", [("cd", "STD-GEN-CD"), ("dvd", "STD-GEN-DVD")])
def test_what_fits_is_one_disc_with_its_profile(service_for, wsgi_call, media_pacs, tmp_path, medium, profile):
    service = service_for(iso={"media": medium})
    app = application.Application(service.config, service)
    job = split_job(wsgi_call, app, ["NEW01"])
    [(disc, iso_path)] = fetch_discs(wsgi_call, app, job, tmp_path)
    assert volume_id(iso_path) == "NEW01" and volume_set(iso_path) == (1, 1)
    assert pydicom.dcmread(os.path.join(disc.root, "DICOMDIR")).FileSetID == "NEW01"  # PS3.12 F.1.1
    assert job["discs"][0]["profile"] == profile and job["discs"][0]["volume"] == "NEW01"
    readme = open(os.path.join(disc.root, "README.TXT"), encoding="ascii").read()
    assert "DICOM media profile: %s" % profile in readme and "disc 1 of" not in readme
    assert dciodvfy_errors(os.path.join(disc.root, "DICOMDIR")) == []


def test_jpeg_is_kept_and_stated(jpeg_service, wsgi_call, jpeg_pacs, tmp_path):
    service = jpeg_service()
    app = application.Application(service.config, service)
    job = split_job(wsgi_call, app, ["JPG01"])
    [(disc, _)] = fetch_discs(wsgi_call, app, job, tmp_path)
    assert disc_uids(disc) == set(jpeg_pacs.study.sop_uids)
    assert job["discs"][0]["profile"] == "STD-GEN-DVD-JPEG"
    assert pydicom.dcmread(os.path.join(disc.root, "DICOMDIR")).FileSetID == "JPG01"
    readme = open(os.path.join(disc.root, "README.TXT"), encoding="ascii").read()
    assert "STD-GEN-DVD-JPEG" in readme and "1.2.840.10008.1.2.4.70" in readme
    assert dciodvfy_errors(os.path.join(disc.root, "DICOMDIR")) == []
    image = [path for path in disc.files if path.startswith("DICOM" + os.sep)][0]
    assert pydicom.dcmread(os.path.join(disc.root, image)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"


def test_transcoding_makes_a_conformant_cd_with_the_same_pixels(jpeg_service, wsgi_call, jpeg_pacs, tmp_path):
    service = jpeg_service(iso={"media": "cd", "transcode": "explicit-le"})
    app = application.Application(service.config, service)
    job = split_job(wsgi_call, app, ["JPG01"])
    [(disc, _)] = fetch_discs(wsgi_call, app, job, tmp_path)
    assert job["discs"][0]["profile"] == "STD-GEN-CD"
    assert "DICOM media profile: STD-GEN-CD" in open(os.path.join(disc.root, "README.TXT")).read()
    assert dciodvfy_errors(os.path.join(disc.root, "DICOMDIR")) == []
    expected = {}
    for original in jpeg_pacs.originals:  # decompressed by the test itself, with dcmdjpeg
        out = str(tmp_path / "reference.dcm")
        subprocess.run([os.path.join(DCMTK_DIR, "dcmdjpeg"), original, out], check=True)
        reference = pydicom.dcmread(out)
        expected[str(reference.SOPInstanceUID)] = reference.PixelData
    on_disc = {}
    for path in disc.files:
        if path.startswith("DICOM" + os.sep):
            image = pydicom.dcmread(os.path.join(disc.root, path))
            assert image.file_meta.TransferSyntaxUID == media.EXPLICIT_LE
            on_disc[str(image.SOPInstanceUID)] = image.PixelData
    assert on_disc == expected and len(on_disc) == 2
    assert all(len(pixels) == 2 * image.Rows * image.Columns for pixels in on_disc.values())
    assert os.listdir(service.path("jobs"))  # the job's disc; the transcoded copies are gone
    assert not any("transcoded" in names for _, names, _ in os.walk(service.path("jobs")))


def test_an_image_that_cannot_be_decompressed_is_an_error_naming_it(make_service, settings, wsgi_call, tmp_path,
                                                                     receiver_port):
    sample = demo.SampleStudy("PAT-7005", "LS^LISA", "JLS01", series=(1,), image_bytes=8192, noise=True)
    pacs = compressed_pacs(str(tmp_path / "jls-pacs"), receiver_port, sample, "dcmcjpls", ("-xt",))
    settings["pacs"]["port"] = pacs.port
    try:
        service = make_service(iso={"transcode": "explicit-le"})
        response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                             query="accession_number=JLS01")
    finally:
        pacs.stop()
    assert response.status == 500 and response.json()["code"] == "cannot_transcode"
    assert "JPEG-LS Lossless (1.2.840.10008.1.2.4.80)" in response.json()["error"]


def test_print_says_how_many_discs_the_publisher_needs(service_for, wsgi_call, tmp_path):
    from test_print import FakeRimage
    rimage = FakeRimage(str(tmp_path / "rimage"))
    try:
        service = service_for(iso=SMALL_CD, publisher={"host": "127.0.0.1", "port": rimage.port})
        response = wsgi_call(application.Application(service.config, service), "/api/iso/print",
                             query="accession_number=OLD01,NEW01,MID01")
    finally:
        rimage.stop()
    assert response.status == 200, response.body
    assert (response.json()["discs"], response.json()["media"], response.json()["instances"]) == (3, "cd", 9)


def test_plan_refuses_an_image_larger_than_any_disc(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"\0" * 50000)
    from mkiso.dicom.received import ReceivedFile
    image = ReceivedFile(str(path), "P", "S", "R", 1, 1, "I")
    with pytest.raises(Exception, match="does not fit on an empty disc"):
        media.plan([image], limit=media.BASE + 10000, fixed=media.BASE)
    assert shutil.which("genisoimage")
