"""The read-back begun once the images are staged (SPEC §4.6, §8.1; ``verify.Ahead``).

A disc sent from its staged tree (a ZIP, a streamed download's laid-out
ISO) has its images read while the rest of the disc is made; the check at
the end takes a file from that read only where it is the same file,
unchanged: a file rewritten since, even with its time set back, is read
again, and a disc whose SHA256.TXT no longer fits it is refused.
"""

import hashlib
import json
import os
import threading
import time

import pytest

from mkiso import errors, process
from mkiso.dicom import received
from mkiso.disc import digests, verify
from test_arrival_digests import hold_up_the_move_end, outside_the_file_set, written
from test_audit import app_for, assert_cut_short_as_unverified
from test_jobs import JSON, wait_for


@pytest.fixture
def reads(monkeypatch):
    """The files a folder's check reads, by path on the medium."""
    seen = []
    real = verify.Folder._blocks

    def counted(self, entry):
        seen.append(entry.path)
        return real(self, entry)

    monkeypatch.setattr(verify.Folder, "_blocks", counted)
    return seen


def sealed_tree(tmp_path, count=4, sealed=True):
    tree = tmp_path / "tree"
    tree.mkdir()
    paths = [written(str(tree), "IMG%05d" % number, os.urandom(30000 + number)) for number in range(count)]
    if sealed:
        digests.seal(str(tree), keep=False)
    return tree, paths


def rewritten_with_its_time_set_back(path):
    """New bytes of the same size, the modification time as before: only the status change time says it."""
    before = os.stat(path)
    with open(path, "r+b") as handle:
        data = bytearray(handle.read())
        data[-1] ^= 0xFF
        handle.seek(0)
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_the_check_reads_only_what_the_read_ahead_did_not(tmp_path, reads):
    tree, paths = sealed_tree(tmp_path, sealed=False)
    read = verify.read_ahead(str(tree))  # once staged: then come the DICOMDIR, the web content, SHA256.TXT
    assert sorted(read) == sorted(os.path.basename(path) for path in paths)
    written(str(tree), "README.TXT", b"added after the read ahead\r\n")
    digests.seal(str(tree), keep=False)
    del reads[:]
    report = verify.check(str(tree), read=read)
    assert outside_the_file_set(report) == []
    assert sorted(reads) == ["README.TXT", digests.NAME, digests.NAME], "files read again though unchanged"


def test_an_image_digested_as_it_arrived_is_taken_from_that_digest(tmp_path, reads):
    """Its digest kept on it as it arrived (``digests.keep``) and still fitting its size and time: the
    read ahead reads its first bytes, not the whole; a digest that no longer fits is not taken."""
    tree, paths = sealed_tree(tmp_path, sealed=False)
    for path in paths[:3]:
        assert digests.keep(path)
    time.sleep(0.01)
    written(str(tree), os.path.basename(paths[2]), os.urandom(os.path.getsize(paths[2])))  # a later time
    read = verify.read_ahead(str(tree))
    assert sorted(reads) == sorted(os.path.basename(path) for path in paths[2:]), "kept digests not taken"
    for path in paths:
        assert read[os.path.basename(path)][1][0] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    digests.seal(str(tree), keep=False)
    del reads[:]
    assert outside_the_file_set(verify.check(str(tree), read=read)) == []
    assert reads == [digests.NAME, digests.NAME]


def test_a_file_rewritten_after_the_read_ahead_with_its_time_set_back_is_read_again_and_refused(tmp_path, reads):
    tree, paths = sealed_tree(tmp_path)
    read = verify.read_ahead(str(tree))
    rewritten_with_its_time_set_back(paths[1])
    del reads[:]
    report = verify.check(str(tree), read=read)
    assert outside_the_file_set(report) == [("changed", "IMG00001")]
    assert "IMG00001" in reads


def test_a_file_whose_received_name_went_after_the_read_ahead_is_not_read_again(tmp_path, reads):
    """The staged files are links to the received ones, whose folder is removed while the disc is read
    back: fewer links move the status change time, and that alone is no reason to read it again."""
    received = tmp_path / "received"
    received.mkdir()
    tree = tmp_path / "tree"
    tree.mkdir()
    for number in range(3):
        written(str(received), "IMG%05d" % number, os.urandom(20000))
        os.link(received / ("IMG%05d" % number), tree / ("IMG%05d" % number))
    read = verify.read_ahead(str(tree))
    digests.seal(str(tree), keep=False)
    before = os.stat(tree / "IMG00001").st_ctime_ns
    time.sleep(0.01)
    for name in os.listdir(received):
        os.unlink(received / name)
    assert os.stat(tree / "IMG00001").st_ctime_ns != before  # what the rule is for
    del reads[:]
    assert outside_the_file_set(verify.check(str(tree), read=read)) == []
    assert sorted(reads) == [digests.NAME, digests.NAME], "files read again after their other name went"


def test_a_file_replaced_by_another_of_the_same_size_and_times_is_read_again(tmp_path, reads):
    """Another inode under the name (renamed over it): never the first file's read."""
    tree, paths = sealed_tree(tmp_path)
    read = verify.read_ahead(str(tree))
    before = os.stat(paths[2])
    other = written(str(tmp_path), "other", os.urandom(before.st_size))
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(other, paths[2])
    del reads[:]
    assert outside_the_file_set(verify.check(str(tree), read=read)) == [("changed", "IMG00002")]
    assert "IMG00002" in reads


def ahead_children():
    with process._live_lock:
        return [proc for proc in process._live if "--after" in proc.args]


def wait_gone(timeout=10):
    deadline = time.monotonic() + timeout
    while ahead_children() and time.monotonic() < deadline:
        time.sleep(0.02)
    return ahead_children()


def test_an_ahead_read_back_reads_first_and_checks_when_told(tmp_path):
    tree, paths = sealed_tree(tmp_path)
    ahead = verify.Ahead(str(tree), str(tmp_path / "complete"), timeout=60)
    assert ahead.read.wait(30), "the child never said it had read ahead"
    rewritten_with_its_time_set_back(paths[0])
    verdict = ahead.finish()
    assert not verdict.ok and sorted(verdict.problems) == ["changed: IMG00000 (SHA-256 differs)",
                                                   "missing: DICOMDIR (no DICOM File-set on the medium)"]
    assert wait_gone() == []


@pytest.mark.parametrize("ending", ["abandoned", "tree removed", "cancelled"])
def test_an_ahead_read_back_never_told_to_check_leaves_no_process(tmp_path, ending):
    tree, _ = sealed_tree(tmp_path)

    class Owner:
        cancelled = False

    owner = Owner()
    with process.owned_by(owner):
        ahead = verify.Ahead(str(tree), str(tmp_path / "complete"), timeout=60)
    assert ahead.read.wait(30)
    assert len(ahead_children()) == 1, "the child does not wait"
    if ending == "abandoned":
        ahead.abandon()
    elif ending == "tree removed":
        for path in tree.iterdir():
            path.unlink()
        tree.rmdir()
    else:
        owner.cancelled = True
        assert process.kill_owned(owner) == 1
    assert wait_gone() == []
    with pytest.raises(errors.MkisoError):  # no verdict: never a pass
        ahead.finish()


def rewrite_a_staged_image_once_read_ahead(service, monkeypatch):
    """Have the service's read-back find an image rewritten (its time set back) after the read ahead
    read it: after SHA256.TXT was made from the digest kept at its arrival."""
    read_back = service.steps.read_back
    seen = []

    def rewritten_then_read_back(job):
        disc = job.discs[0]
        seen.append(disc.read_back is not None)
        assert disc.read_back.read.wait(30), "the read-back was not begun ahead"
        images = sorted(os.path.join(folder, name) for folder, _, names in os.walk(disc.tree)
                        for name in names if "/DICOM/" in folder + "/")
        rewritten_with_its_time_set_back(images[0])
        read_back(job)

    monkeypatch.setattr(service.steps, "read_back", rewritten_then_read_back)
    return seen


def test_a_zip_job_whose_image_changed_after_the_read_ahead_is_refused(make_service, wsgi_call, caplog,
                                                                        monkeypatch):
    service = make_service()
    seen = rewrite_a_staged_image_once_read_ahead(service, monkeypatch)
    app = app_for(service)
    body = json.dumps({"accessions": ["ACC2001"], "action": "download", "format": "zip"}).encode()
    created = wsgi_call(app, "/api/jobs", method="POST", body=body, headers=JSON)
    job = wait_for(wsgi_call, app, created.json()["id"], ("ready", "failed"))
    assert seen == [True]
    assert job["state"] == "failed" and job["error"]["code"] == "disc_check_failed", job
    assert "read-back of disc 1: changed: DICOM/" in caplog.text
    assert wait_gone() == []


def test_a_streamed_iso_whose_image_changed_after_the_read_ahead_is_cut_short(make_service, live_server,
                                                                              monkeypatch, caplog):
    service = make_service()
    seen = rewrite_a_staged_image_once_read_ahead(service, monkeypatch)
    assert_cut_short_as_unverified(service, live_server(app_for(service)), caplog)
    assert seen == [True]
    assert wait_gone() == []


def test_an_image_changed_behind_its_arrival_digest_leaves_on_a_disc_that_proves_itself(make_service, wsgi_call,
                                                                                      monkeypatch, tmp_path):
    """An image rewritten with its time set back after its digest and record were made as it arrived, before
    the check after the last image: the disc that leaves holds its bytes as they are, and its SHA256.TXT
    says so, read whole by mkiso-verify as a clerk would (the service's read-back takes an image's arrival
    digest where the image is unchanged since: a digest kept behind this change would have passed it)."""
    service = make_service()
    hold_up_the_move_end(service, monkeypatch)
    take, rewritten = received.Early.take, []

    def rewritten_first(early, paths):
        paths = sorted(paths)
        if not rewritten:
            assert digests.kept_on(paths[0]) is not None, "not digested as it arrived"
            rewritten_with_its_time_set_back(paths[0])
            rewritten.append(paths[0])
        return take(early, paths)

    monkeypatch.setattr(received.Early, "take", rewritten_first)
    response = wsgi_call(app_for(service), "/api/iso/download", query="accession_number=BIG01")
    assert response.status == 200, response.body[:300]
    assert rewritten
    iso = tmp_path / "disc.iso"
    iso.write_bytes(response.body)
    report = verify.check(str(iso))
    assert report.ok, [str(problem) for problem in report.problems]
    [job] = service.jobs.recent()
    assert job.export.verified is True


def test_a_job_read_back_from_its_written_iso_begins_nothing_ahead(make_service, wsgi_call, monkeypatch):
    """An ISO written whole before it leaves is read back from the ISO file: no read of its tree."""
    service = make_service()
    read_back = service.steps.read_back
    seen = []

    def observed(job):
        seen.append(job.discs[0].read_back)
        read_back(job)

    monkeypatch.setattr(service.steps, "read_back", observed)
    app = app_for(service)
    body = json.dumps({"accessions": ["ACC2001"], "action": "download", "format": "iso"}).encode()
    job = wait_for(wsgi_call, app, wsgi_call(app, "/api/jobs", method="POST", body=body,
                                             headers=JSON).json()["id"], ("ready", "failed"))
    assert job["state"] == "ready" and seen == [None]
    assert wait_gone() == []


def test_threads_end_with_their_children(tmp_path):
    """An Ahead's thread is gone once it finished: nothing waits on for a marker."""
    tree, _ = sealed_tree(tmp_path)
    before = threading.active_count()
    ahead = verify.Ahead(str(tree), str(tmp_path / "complete"), timeout=60)
    ahead.finish()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before
