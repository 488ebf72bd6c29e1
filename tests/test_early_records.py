"""The header checks' reading moved beside the transfer (SPEC §8.1, ``received.Early``).

Each image is read for its record as it is digested on arrival; the check
after the last one reads only what was not done by then.  A record is
taken only for the file it was read from, unchanged: a file rewritten
since is read again, and its new header is the one checked.
"""

import os
import threading
import time

from mkiso import demo
from mkiso.dicom import received, retrieval
from mkiso.disc import digests
from mkiso.http import application
from test_arrival_digests import hold_up_the_move_end


def arrived(tmp_path, count=6):
    """A study's files as the receiver leaves them, digested and read as they came; (Early, paths)."""
    folder = tmp_path / "arriving"
    paths = demo.write_large_study(demo.SampleStudy("EARLY-1", "EARLY^TEST", "EARLY01", series=(count,)),
                                   str(folder))
    early, done = received.Early(), threading.Event()
    time.sleep(digests.SETTLE_S)  # written a moment ago: then taken as written
    digests.follow([str(folder)], done, also=early.add)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(early._records) < count:
        time.sleep(0.02)
    done.set()
    assert len(early._records) == count, "not every file was read as it arrived"
    return early, sorted(paths)


def fields(record):
    return (record.path, record.patient_id, record.patient_name, record.study_uid, record.series_uid,
            record.sop_uid, record.instance_number, record.transfer_syntax, record.accession)


def counted_reads(monkeypatch):
    seen = []
    real = received.read_all

    def counting(paths):
        seen.extend(paths)
        return real(paths)

    monkeypatch.setattr(received, "read_all", counting)
    return seen


def test_the_check_takes_the_records_read_as_the_files_arrived(tmp_path, monkeypatch):
    early, paths = arrived(tmp_path)
    moved = tmp_path / "received"
    os.rename(tmp_path / "arriving", moved)  # as the receiver hands a study's folder over
    paths = sorted(str(moved / os.path.basename(path)) for path in paths)
    reads = counted_reads(monkeypatch)
    taken = early.take(iter(paths))
    assert reads == [], "files read again at the check"
    assert sorted(map(fields, taken)) == sorted(map(fields, received.read_all(paths)))


def test_a_file_rewritten_after_it_was_read_is_read_again(tmp_path, monkeypatch):
    """Another patient's header written over an image after its record was made: the check sees it."""
    early, paths = arrived(tmp_path)
    with open(paths[2], "rb") as handle:
        data = handle.read()
    time.sleep(0.01)
    with open(paths[2], "wb") as handle:  # same size, a later time
        handle.write(data.replace(b"EARLY-1", b"OTHER-9"))
    reads = counted_reads(monkeypatch)
    taken = {record.path: record.patient_id for record in early.take(reversed(paths))}  # any order
    assert reads == [paths[2]]
    assert taken == {path: "OTHER-9" if path == paths[2] else "EARLY-1" for path in paths}


def test_a_file_rewritten_with_its_time_set_back_is_read_again_and_its_digest_forgotten(tmp_path, monkeypatch):
    """Same size, the modification time set back: only the status change time says it.  Its record is
    made again, and the digest kept as it arrived goes (``forget``): the seal and the disc's read-back,
    which take that digest for an image unchanged since, read its bytes instead."""
    early, paths = arrived(tmp_path)
    early.forget = digests.forget
    assert digests.kept_on(paths[2]) is not None
    before = os.stat(paths[2])
    with open(paths[2], "rb") as handle:
        data = handle.read()
    with open(paths[2], "r+b") as handle:
        handle.write(data.replace(b"EARLY-1", b"OTHER-9"))
    os.utime(paths[2], ns=(before.st_atime_ns, before.st_mtime_ns))
    reads = counted_reads(monkeypatch)
    taken = {record.path: record.patient_id for record in early.take(paths)}
    assert reads == [paths[2]]
    assert taken[paths[2]] == "OTHER-9"
    assert digests.kept_on(paths[2]) is None
    assert digests.kept_on(paths[1]) is not None


def test_a_file_arriving_after_the_check_began_is_not_added(tmp_path):
    early, paths = arrived(tmp_path, count=2)
    early.take(paths)
    early.add(paths[0])
    assert early._records == []


def test_a_file_that_is_not_dicom_is_left_to_the_check(tmp_path):
    """No record, no error while the study arrives: the check reads it and says what is wrong."""
    junk = tmp_path / "junk"
    junk.write_bytes(b"not DICOM at all" * 100)
    early = received.Early()
    early.add(str(junk))
    assert early._records == []


def test_a_download_by_c_move_reads_its_headers_as_they_arrive(make_service, wsgi_call, archive, monkeypatch):
    """The C-MOVE's end is held up a moment after its last image, so the follower's last round comes
    before the check, however fast the images came: then the check reads none of them again."""
    service = make_service()
    hold_up_the_move_end(service, monkeypatch)
    late = []
    take = received.Early.take

    def watched(self, paths):
        reads = counted_reads(monkeypatch)
        try:
            return take(self, paths)
        finally:
            late.append(list(reads))

    monkeypatch.setattr(received.Early, "take", watched)
    monkeypatch.setattr(retrieval, "read_all", lambda paths: (_ for _ in ()).throw(
        AssertionError("the check read the files without the records made as they arrived")))
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=BIG01")
    assert response.status == 200, response.body[:300]
    assert late == [[]], "images read again at the check"
    [job] = service.jobs.recent()
    assert job.export.verified is True and job.export.images == len(archive.sop_uids("BIG01"))
