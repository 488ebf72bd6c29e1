"""The disc as a ZIP (SPEC §13) and SHA256.TXT on every medium (SPEC §4.6).

Every ZIP here is read back by Python's ``zipfile`` and by ``unzip -t``,
extracted and checked as a disc is, and compared with the ISO of the same
request.  ZIP64 is made real: more than 65,535 entries (a synthetic tree of
tiny files) and an entry over 4 GiB (a sparse file).
"""

import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import zipfile

import pytest

from mkiso.disc import digests, ziparchive
from mkiso.http import application
from discs import Disc, check_pdi, open_iso
from test_concurrency import fetch, logged_access

CACHE_ON = {"max_bytes": 10 ** 9, "ttl_s": 3600}


@pytest.fixture
def app(make_service):
    service = make_service()
    return application.Application(service.config, service)


def unzip_checked(data, folder):
    """Read a ZIP back with zipfile and ``unzip -t``, extract it into ``folder``; the opened Disc."""
    path = str(folder) + ".zip"
    with open(path, "wb") as handle:
        handle.write(data)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert all(info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x9
                   for info in archive.infolist()), "stored, no encryption, no data descriptor"
    tested = subprocess.run(["unzip", "-t", path], capture_output=True, text=True)
    assert tested.returncode == 0 and "No errors detected" in tested.stdout, tested.stdout[-2000:]
    subprocess.run(["unzip", "-q", path, "-d", str(folder)], check=True)
    return Disc(str(folder))


def sha256_lines(disc):
    """SHA256.TXT of ``disc`` checked as a person would: its lines against sha256sum of every other file."""
    raw = open(os.path.join(disc.root, "SHA256.TXT"), "rb").read()
    assert raw.endswith(b"\r\n") and raw.count(b"\n") == raw.count(b"\r\n")
    others = [path for path in disc.files if path != "SHA256.TXT"]
    summed = subprocess.run(["sha256sum", "--"] + others, cwd=disc.root, capture_output=True, check=True).stdout
    assert raw.replace(b"\r\n", b"\n") == b"".join(sorted(summed.splitlines(keepends=True),
                                                          key=lambda line: line[66:]))
    return raw


def dciodvfy_errors(dicomdir):
    result = subprocess.run(["dciodvfy", dicomdir], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_the_zip_is_the_iso_s_disc_file_for_file(wsgi_call, app, archive, tmp_path):
    iso = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001")
    answer = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001&format=zip")
    assert answer.status == 200, answer.body[:300]
    assert answer.header("Content-Type") == "application/zip"
    assert int(answer.header("Content-Length")) == len(answer.body)
    assert answer.header("Content-Disposition") == \
        "attachment; filename=\"ACC2001.zip\"; filename*=UTF-8''ACC2001.zip"
    (tmp_path / "disc.iso").write_bytes(iso.body)
    on_disc = open_iso(str(tmp_path / "disc.iso"), str(tmp_path / "iso"))
    on_stick = unzip_checked(answer.body, tmp_path / "zip")
    check_pdi(on_stick, archive.sop_uids("ACC2001"))
    assert dciodvfy_errors(os.path.join(on_stick.root, "DICOMDIR")) == []
    assert on_stick.files == on_disc.files
    assert "SHA256.TXT" in on_stick.files and "INDEX.HTM" in on_stick.files
    for path in on_stick.files:
        if path not in ("README.TXT", "SHA256.TXT", "DICOMDIR"):  # made anew per build (time, the DICOMDIR's
            # own UID): the cache's test compares them too, for the ISO made from a ZIP's tree
            assert open(os.path.join(on_stick.root, path), "rb").read() == \
                open(os.path.join(on_disc.root, path), "rb").read(), path
    sha256_lines(on_stick)
    sha256_lines(on_disc)
    with zipfile.ZipFile(io.BytesIO(answer.body)) as opened:
        names = opened.namelist()
    assert names == sorted(names) and all(name == name.upper() for name in names)
    dicomdir_records = subprocess.run(["grep", "-c", "SHA256", os.path.join(on_stick.root, "DICOMDIR")],
                                      capture_output=True, text=True).stdout.strip()
    assert dicomdir_records == "0", "SHA256.TXT is outside the File-set"


def test_format_is_checked(wsgi_call, make_service):
    service = make_service()
    app = application.Application(service.config, service)
    for query in ("format=rar", "format=", "format=ZIP", "format=zip&format=zip"):
        answer = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001&" + query)
        assert answer.status == 400 and "format" in answer.json()["error"], (query, answer.body)
    legacy = wsgi_call(app, "/mkiso.php", query="accession_number=ACC2001&format=zip")
    assert legacy.status == 200 and legacy.header("Content-Type") == "application/x-iso9660-image"
    posted = wsgi_call(app, "/api/jobs", method="POST", body=b'{"accessions": ["ACC2001"], "format": 7}',
                       headers={"Content-Type": "application/json"})
    assert posted.status == 400 and posted.json()["code"] == "bad_format"
    service.config.zip.enabled = False  # as zip.enabled: false in the config file (read per request)
    refused = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001&format=zip")
    assert refused.status == 400 and refused.json()["code"] == "zip_disabled"
    assert "zip.enabled" in refused.json()["error"]


def ready_job(wsgi_call, app, body):
    """POST the job ``body`` and wait for it to be ready; its JSON."""
    made = wsgi_call(app, "/api/jobs", method="POST", body=body, headers={"Content-Type": "application/json"})
    assert made.status == 202, made.body
    job = made.json()
    deadline = time.monotonic() + 60
    while job["state"] not in ("ready", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = wsgi_call(app, "/api/jobs/" + job["id"]).json()
    assert job["state"] == "ready", job
    return job


def test_a_job_makes_a_zip_and_links_it(wsgi_call, app, archive, tmp_path):
    job = ready_job(wsgi_call, app, b'{"accessions": ["ACC2001"], "format": "zip"}')
    assert job["format"] == "zip"
    assert "iso" not in job["links"] and job["discs"][0]["format"] == "zip"
    path, query = job["links"]["zip"].split("?", 1)
    assert path == "/api/jobs/%s/zip" % job["id"]
    assert job["discs"][0]["links"]["zip"] == "/api/jobs/%s/discs/1/zip?%s" % (job["id"], query)
    answer = wsgi_call(app, path, query=query)
    assert answer.status == 200 and answer.header("Content-Type") == "application/zip"
    assert len(answer.body) == job["discs"][0]["bytes"] == job["progress"]["disc_bytes"]
    stick = unzip_checked(answer.body, tmp_path / "job")
    check_pdi(stick, archive.sop_uids("ACC2001"))
    # PS3.11's General Purpose USB profile for the ZIP; README.TXT names it beside the disc's, the same
    # file on either medium
    assert job["discs"][0]["profile"] == "STD-GEN-USB"
    with open(os.path.join(stick.root, "README.TXT"), encoding="ascii") as handle:
        assert "DICOM media profile: STD-GEN-DVD on a CD or DVD, STD-GEN-USB on a USB stick or as a ZIP" \
            in handle.read()
    again = wsgi_call(app, "/api/jobs/%s/discs/1/zip" % job["id"], query=query)
    assert again.body == answer.body
    wrong = wsgi_call(app, "/api/jobs/%s/iso" % job["id"], query=query)
    assert wrong.status == 404 and "/zip" in wrong.json()["error"]


def test_a_split_zip_job_only_where_zip_max_bytes_asks(wsgi_call, make_service, archive, tmp_path):
    """iso.media does not split a ZIP; zip.max_bytes does, and each ZIP is a complete File-set."""
    service = make_service(iso={"media": "none", "max_bytes": 3 * 1024 * 1024}, zip={"max_bytes": 6 * 1024 * 1024})
    app = application.Application(service.config, service)
    whole = wsgi_call(app, "/api/iso/download", query="accession_number=BIG01&format=zip")
    assert whole.status == 413 and whole.json()["code"] == "needs_split"
    assert "zip.max_bytes" in whole.json()["error"]
    job = ready_job(wsgi_call, app, b'{"accessions": ["BIG01"], "format": "zip", "split": true}')
    assert len(job["discs"]) == whole.json()["discs"] >= 2
    seen = set()
    for disc in job["discs"]:
        path, query = disc["links"]["zip"].split("?", 1)
        answer = wsgi_call(app, path, query=query)
        assert answer.status == 200 and len(answer.body) <= 6 * 1024 * 1024
        assert "_disc%d.zip" % disc["number"] in answer.header("Content-Disposition")
        opened = unzip_checked(answer.body, tmp_path / ("part%d" % disc["number"]))
        images = [path for path in opened.files if path.startswith("DICOM/")]
        seen |= opened.sop_uids(images)
        sha256_lines(opened)
    assert seen == archive.sop_uids("BIG01")


def test_either_format_comes_from_the_cache_without_a_second_retrieval(make_service, wsgi_call, caplog, archive,
                                                                       tmp_path):
    caplog.set_level(logging.INFO)
    service = make_service(cache=CACHE_ON)
    app = application.Application(service.config, service)
    first = wsgi_call(app, "/api/iso/download", query="accession_number=MR.180505.026&format=zip")
    assert first.status == 200
    iso = wsgi_call(app, "/api/iso/download", query="accession_number=MR.180505.026")  # built from the cached tree
    again = wsgi_call(app, "/api/iso/download", query="accession_number=MR.180505.026&format=zip")
    iso_again = wsgi_call(app, "/api/iso/download", query="accession_number=MR.180505.026")
    retrieved = [record for record in caplog.records if record.getMessage() == "study retrieved"]
    assert len(retrieved) == 1, "one retrieval for both formats"
    assert again.body == first.body, "the same disc, the same bytes: a resume across requests fits"
    assert iso_again.body == iso.body
    resumed = wsgi_call(app, "/api/iso/download", query="accession_number=MR.180505.026&format=zip",
                        headers={"Range": "bytes=5000-"})
    assert resumed.status == 206 and resumed.body == first.body[5000:]
    (tmp_path / "cached.iso").write_bytes(iso.body)
    on_disc = open_iso(str(tmp_path / "cached.iso"), str(tmp_path / "iso"))
    on_stick = unzip_checked(again.body, tmp_path / "zip")
    check_pdi(on_stick, archive.sop_uids("MR.180505.026"))
    assert on_stick.files == on_disc.files
    for path in on_stick.files:
        assert open(os.path.join(on_stick.root, path), "rb").read() == \
            open(os.path.join(on_disc.root, path), "rb").read(), path


# -- over a real socket: Range across entries, HEAD, a client that leaves ---------------------------------------


@pytest.fixture
def served(make_service, live_server, caplog):
    caplog.set_level(logging.INFO, logger="mkiso.access")
    service = make_service(cache=CACHE_ON)
    return service, live_server(application.Application(service.config, service))


def test_range_across_an_entry_boundary_and_head(served):
    service, base = served
    url = base + "/api/iso/download?accession_number=ACC2001&format=zip"
    status, headers, whole = fetch(url)
    assert status == 200 and headers["Accept-Ranges"] == "bytes"
    with zipfile.ZipFile(io.BytesIO(whole)) as opened:
        second = opened.infolist()[1].header_offset
    first, last = second - 100, second + 200  # the end of one file's bytes, the next local header, its bytes
    request = urllib.request.Request(url, headers={"Range": "bytes=%d-%d" % (first, last)})
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert answer.status == 206
        assert answer.headers["Content-Range"] == "bytes %d-%d/%d" % (first, last, len(whole))
        assert answer.read() == whole[first:last + 1]
    head = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(head, timeout=60) as answer:
        assert answer.headers["Content-Length"] == str(len(whole)) and answer.read() == b""
        assert answer.headers["Content-Type"] == "application/zip"
    past = urllib.request.Request(url, headers={"Range": "bytes=%d-" % len(whole)})
    try:
        urllib.request.urlopen(past, timeout=60)
        raise AssertionError("a range past the end must be 416")
    except urllib.error.HTTPError as error:
        assert error.code == 416 and error.headers["Content-Range"] == "bytes */%d" % len(whole)


def test_a_client_leaving_mid_zip_leaves_nothing_and_is_audited_incomplete(make_service, live_server, caplog,
                                                                           tmp_path):
    caplog.set_level(logging.INFO, logger="mkiso.access")
    service = make_service()
    base = live_server(application.Application(service.config, service))
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.connect(("127.0.0.1", port))
        client.sendall(b"GET /api/iso/download?accession_number=BIG01&format=zip HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        while len(received) < 200000:
            received += client.recv(65536)
        assert received.startswith(b"HTTP/1.1 200")
    line = logged_access(caplog, "BIG01")
    assert line["complete"] == "false"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        audited = [json.loads(text) for text in open(service.config.audit.path) if '"status"' in text]
        if audited:
            break
        time.sleep(0.05)
    assert audited[-1]["complete"] is False and 0 < audited[-1]["bytes"] < 10 * 1024 * 1024


# -- ZIP64, by entry count and by size: the layout over synthetic trees ----------------------------------------


def zip_of(root, target):
    found = digests.seal(str(root))
    archive = ziparchive.Archive(found, ziparchive.dos_time(time.time()))
    ziparchive.write(archive, str(root), str(target))
    assert os.path.getsize(target) == archive.size
    return archive, found


def read_back(target, expected_entries):
    with zipfile.ZipFile(target) as opened:
        assert len(opened.infolist()) == expected_entries
        assert opened.testzip() is None
    tested = subprocess.run(["unzip", "-tq", str(target)], capture_output=True, text=True)
    assert tested.returncode == 0 and "No errors detected" in tested.stdout, tested.stdout[-2000:] + tested.stderr


def test_zip64_by_entry_count(tmp_path):
    root = tmp_path / "tree"
    for folder in range(66):
        (root / "DICOM" / ("SER%05d" % folder)).mkdir(parents=True)
        for image in range(1000):
            (root / "DICOM" / ("SER%05d" % folder) / ("IMG%05d" % image)).write_bytes(b"%d" % image)
    archive, found = zip_of(root, tmp_path / "many.zip")
    assert len(found) == 66001 and archive.zip64  # with SHA256.TXT
    read_back(tmp_path / "many.zip", 66001)
    reader = ziparchive.Reader(archive, str(root))
    reader.seek(archive.central_start - 10)
    assert reader.read(100) == open(tmp_path / "many.zip", "rb").read()[archive.central_start - 10:][:100]


@pytest.mark.long  # four GiB read four times: about a minute here
def test_zip64_by_size(tmp_path):
    root = tmp_path / "tree"
    (root / "DICOM").mkdir(parents=True)
    with open(root / "DICOM" / "IMG00001", "wb") as handle:  # sparse: 4 GiB of nothing, then a byte
        handle.truncate(4 * 1024 ** 3)
        handle.seek(0, os.SEEK_END)
        handle.write(b"\x01")
    (root / "README.TXT").write_bytes(b"small\r\n")
    archive, found = zip_of(root, tmp_path / "big.zip")
    assert archive.size > 4 * 1024 ** 3 and archive.zip64
    read_back(tmp_path / "big.zip", 3)
    with zipfile.ZipFile(tmp_path / "big.zip") as opened:
        assert opened.getinfo("DICOM/IMG00001").file_size == 4 * 1024 ** 3 + 1
        assert opened.read("README.TXT") == b"small\r\n"
        listed = opened.read("SHA256.TXT")
    zeros = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(4096):
        zeros.update(block)
    zeros.update(b"\x01")
    assert listed.startswith(zeros.hexdigest().encode() + b"  DICOM/IMG00001\r\n")
