"""The per-file pass moved beside the transfer (SPEC §8.1, ``digests.follow``).

Files arriving in a folder are digested as they are written, the digest
kept on each file; the staged tree's SHA256.TXT then reads none of them.
A file changed afterwards is read again; one changed behind the kept
digest's back (its time set back) still never makes a wrong disc: the
read-back digests every byte; a print's check reads the bytes themselves.
A real download by C-MOVE shows the pass done where the images arrived.
"""

import errno
import hashlib
import logging
import os
import threading
import time

import pytest

from mkiso.disc import digests, verify
from mkiso.http import application


def written(folder, name, data):
    path = os.path.join(folder, name)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def wait_kept(path, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if digests.kept_on(path) is not None:
            return True
        time.sleep(0.02)
    return False


def outside_the_file_set(report):
    """The read-back's problems but the DICOMDIR these trees of plain files have none of."""
    return [(problem.kind, problem.path) for problem in report.problems if problem.path != "DICOMDIR"]


@pytest.fixture
def reads(monkeypatch):
    """The files the pass reads (``digests._read``), by path."""
    seen = []
    real = digests._read

    def counted(handle, crc32=True, buffer=None):
        seen.append(handle.name)
        return real(handle, crc32, buffer)

    monkeypatch.setattr(digests, "_read", counted)
    return seen


def test_files_are_digested_as_they_arrive_and_the_seal_reads_none_of_them(tmp_path, reads):
    arriving, done = tmp_path / "arriving", threading.Event()
    arriving.mkdir()
    digests.follow([str(arriving)], done)
    paths = []
    try:
        for number in range(20):
            paths.append(written(str(arriving), "IMG%05d" % number, os.urandom(50000 + number)))
            time.sleep(0.01)
        assert all(wait_kept(path) for path in paths), "not every file got its digest as it arrived"
    finally:
        done.set()
    del reads[:]
    tree = tmp_path / "tree"
    tree.mkdir()
    for path in paths:
        os.link(path, tree / os.path.basename(path))  # staged as the tree stages: hard links
    found = digests.seal(str(tree), keep=True)
    assert reads == [], "the staged images were read again"
    for digest in found[:-1]:
        data = (tree / digest.path).read_bytes()
        assert digest.sha256 == hashlib.sha256(data).digest() and digest.size == len(data)
        assert digest.crc32 is not None
    assert outside_the_file_set(verify.check(str(tree))) == []


def test_a_file_changed_after_its_digest_was_kept_is_read_again(tmp_path, reads):
    path = written(str(tmp_path), "IMG00001", os.urandom(40000))
    assert digests.keep(path)
    time.sleep(0.02)
    written(str(tmp_path), "IMG00001", os.urandom(40000))  # same size, later time
    del reads[:]
    digest = digests.digest_file(path, "IMG00001")
    assert reads == [path]
    assert digest.sha256 == hashlib.sha256(open(path, "rb").read()).digest()


def test_a_digest_kept_behind_a_changed_file_never_makes_a_wrong_disc(tmp_path):
    """Bytes changed and the time set back: the kept digest goes into SHA256.TXT, and the read-back
    refuses the disc; a print's check, which reads the bytes, sees the change."""
    tree = tmp_path / "tree"
    tree.mkdir()
    path = written(str(tree), "IMG00001", os.urandom(40000))
    assert digests.keep(path)
    before = os.stat(path)
    written(str(tree), "IMG00001", os.urandom(40000))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    digests.seal(str(tree), keep=False)
    assert outside_the_file_set(verify.check(str(tree))) == [("changed", "IMG00001")]
    kept = {path: digests.digest_file(path, path).sha256}
    assert digests.changed([(path, path)], kept) == 1


def test_a_file_system_without_user_attributes_leaves_the_pass_to_the_seal(tmp_path, monkeypatch, reads):
    def refused(*args):
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(digests.os, "setxattr", refused)
    arriving, done = tmp_path / "arriving", threading.Event()
    arriving.mkdir()
    path = written(str(arriving), "IMG00001", os.urandom(30000))
    thread_count = threading.active_count()
    digests.follow([str(arriving)], done)
    deadline = time.monotonic() + 10
    while threading.active_count() > thread_count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == thread_count, "the follower goes on where nothing can be kept"
    done.set()
    del reads[:]
    digest = digests.digest_file(path, "IMG00001")
    assert reads == [path] and digest.sha256 == hashlib.sha256(open(path, "rb").read()).digest()


def hold_up_the_move_end(service, monkeypatch):
    """The service's C-MOVE ends a second after its last image: the follower's last round comes before
    the transfer ends, however fast the images came."""
    moved = service.pacs.move_study

    def slow_end(study_uid):
        result = moved(study_uid)
        time.sleep(1)
        return result

    monkeypatch.setattr(service.pacs, "move_study", slow_end)


def test_a_download_by_c_move_digests_its_images_where_they_arrive(make_service, wsgi_call, archive, monkeypatch,
                                                                   caplog):
    """The images of a real C-MOVE carry their digests before they are staged; the disc is checked.  The
    C-MOVE's end is held up a moment after its last image, so that the follower's last round comes
    before the transfer ends, however fast the images came."""
    caplog.set_level(logging.INFO)
    service = make_service()
    hold_up_the_move_end(service, monkeypatch)
    seal, sealed = digests.seal, {}

    def watched_seal(root, keep=True):
        images = [os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(root, "DICOM"))
                  for name in names]
        sealed["kept"] = sum(1 for image in images if digests.kept_on(image) is not None)
        sealed["images"] = len(images)
        return seal(root, keep)

    monkeypatch.setattr(digests, "seal", watched_seal)
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=BIG01")
    assert response.status == 200, response.body[:300]
    assert sealed["images"] == len(archive.sop_uids("BIG01"))
    assert sealed["kept"] == sealed["images"], "images were not digested as they arrived"
    [job] = service.jobs.recent()
    assert job.export.verified is True
