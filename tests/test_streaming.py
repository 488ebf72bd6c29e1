"""A download sent while genisoimage writes it (SPEC §8): never a byte before it is written.

The ISO is written (``isoimage`` lays out none here: see test_isoimage.py
for those), and genisoimage is replaced by a script that runs the real one into a copy and
then writes that copy into the ISO slowly, a piece at a time, and for the
disc labelled BIG01 ends as the test says: well, failing after every byte,
failing half-way, writing more than it announced, or failing before the
first byte.  The other discs are the real genisoimage's.
"""

import errno
import gc
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
from waitress.buffers import ReadOnlyFileBasedBuffer

from mkiso import steps
from mkiso.dicom import received
from mkiso.disc import isoimage, tree
from mkiso.http import application, delivery, waitress_adapter
from mkiso.jobs import State
from discs import check_pdi, open_iso
from conftest import wait_until_clean
from test_concurrency import fetch, logged_access

WRITER = r'''#!%(python)s
import os, shutil, subprocess, sys, time
real, label, ending, record = %(real)r, %(label)r, %(ending)r, %(record)r
args = sys.argv[1:]
if "-print-size" in args or label not in args:
    os.execv(real, [real] + args)
out = args[args.index("-o") + 1]
if ending == "fail-at-start":
    sys.exit("genisoimage: Unable to open disc image file: the test says no")
subprocess.run([real] + [a if a != out else record for a in args], check=True)
with open(record, "rb") as source, open(out, "wb") as target:
    data = source.read()
    if ending == "fail-half-way":
        data = data[:len(data) // 2]
    if ending == "write-more":
        data += bytes(2048)
    for at in range(0, len(data), 65536):
        target.write(data[at:at + 65536])
        target.flush()
        time.sleep(%(pause)r)
sys.exit(1 if ending in ("fail-at-the-end", "fail-half-way") else 0)
'''


def slow_writer(root, ending="well", pause=0.01):
    """The genisoimage stand-in above; returns (its path, where the real ISO of BIG01 is kept)."""
    tool, record = root / "slow-writer", root / "big-real.iso"
    tool.write_text(WRITER % {"python": sys.executable, "real": "/usr/bin/genisoimage", "label": "BIG01",
                              "ending": ending, "record": str(record), "pause": pause})
    tool.chmod(0o755)
    return str(tool), record


@pytest.fixture
def serve(make_service, live_server, caplog, monkeypatch):
    """A server whose streamed ISOs genisoimage writes: as where ``isoimage`` cannot lay one out."""
    caplog.set_level(logging.INFO, logger="mkiso.access")

    def written(*args, **kwargs):
        raise isoimage.NotLaidOut("the test has genisoimage write it")

    monkeypatch.setattr(isoimage, "lay_out", written)

    def start(tool, **settings):
        service = make_service(tools={"genisoimage": tool}, **settings)
        return service, live_server(application.Application(service.config, service))
    return start


def test_the_answer_goes_out_while_genisoimage_writes_never_ahead_of_it(serve, tmp_path, archive, monkeypatch,
                                                                       caplog):
    tool, record = slow_writer(tmp_path)
    service, base = serve(tool)
    calls = []
    real_sendfile = os.sendfile

    def watched_sendfile(out_fd, in_fd, offset, count):
        on_disk = os.fstat(in_fd).st_size  # what genisoimage had written when the bytes were asked for
        done = real_sendfile(out_fd, in_fd, offset, count)
        calls.append((offset, done, on_disk))
        return done

    monkeypatch.setattr(waitress_adapter.os, "sendfile", watched_sendfile)
    status, headers, body = fetch(base + "/api/iso/download?accession_number=BIG01")
    assert status == 200 and len(body) == int(headers["Content-Length"])
    assert body == record.read_bytes()  # the real genisoimage's disc, byte for byte
    assert all(offset + done <= on_disk for offset, done, on_disk in calls), "a byte was sent before it was written"
    assert any(on_disk < len(body) for _, _, on_disk in calls), "nothing was sent before the ISO was complete"
    # The access line is written after the last sendfile returned: only then is ``calls`` whole (the
    # client may have read the last bytes before that call was recorded).
    assert logged_access(caplog, "BIG01")["complete"] == "true"
    assert sum(done for _, done, _ in calls) == len(body)
    assert wait_until_clean(service) == []
    [job] = service.jobs.recent()
    assert job.state.value == "done"
    iso = tmp_path / "got.iso"
    iso.write_bytes(body)
    check_pdi(open_iso(str(iso), str(tmp_path / "got")), archive.sop_uids("BIG01"))


def read_all_it_gives(url):
    """The body as far as the server sends it, and the Content-Length it promised."""
    port = int(url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
        client.sendall(b"GET /" + url.split("/", 3)[3].encode()
                       + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            piece = client.recv(1 << 20)
            if not piece:
                break
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body, int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])


@pytest.mark.parametrize("ending, said", [
    ("fail-at-the-end", "genisoimage failed"),
    ("fail-half-way", "genisoimage failed"),
    ("write-more", "genisoimage wrote"),
])
def test_a_build_that_goes_wrong_under_way_ends_the_answer_short(serve, tmp_path, caplog, ending, said):
    """Even when every byte was written before genisoimage failed: the last ones never go out."""
    tool, record = slow_writer(tmp_path, ending)
    service, base = serve(tool, limits={"max_jobs": 1})
    body, promised = read_all_it_gives(base + "/api/iso/download?accession_number=BIG01")
    assert len(body) < promised, "a failed build looked like a complete download"
    assert body == record.read_bytes()[:len(body)]
    assert wait_until_clean(service) == []
    assert logged_access(caplog, "BIG01")["complete"] == "false"
    [job] = service.jobs.recent()
    assert job.state.value == "failed" and said in job.error["error"]
    assert any("could not be written" in r.getMessage() for r in caplog.records if r.name == "mkiso.jobs")
    status, _, _ = fetch(base + "/api/iso/download?accession_number=ACC2001")
    assert status == 200  # the one slot is free again


def test_genisoimage_failing_before_its_first_byte_is_an_error_answer(serve, tmp_path):
    tool, _ = slow_writer(tmp_path, "fail-at-start")
    service, base = serve(tool)
    status, headers, body = fetch(base + "/api/iso/download?accession_number=BIG01")
    assert status == 500 and b'"code": "iso_failed"' in body and b"the test says no" in body
    assert wait_until_clean(service) == []


def writers_running(tool):
    found = subprocess.run(["pgrep", "-f", tool], capture_output=True, text=True).stdout.split()
    return [pid for pid in found if int(pid) != os.getpid()]


def test_a_client_going_away_mid_build_stops_genisoimage_and_frees_the_slot(serve, tmp_path, caplog):
    tool, _ = slow_writer(tmp_path, pause=0.2)  # about 35 s for the whole disc
    service, base = serve(tool, limits={"max_jobs": 1})
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
        client.sendall(b"GET /api/iso/download?accession_number=BIG01 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
        assert writers_running(tool), "genisoimage should still be writing"
        status, _, body = fetch(base + "/api/iso/download?accession_number=ACC2001")
        assert status == 503 and b'"busy"' in body  # the slot is held until the ISO is written
    assert wait_until_clean(service) == []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and writers_running(tool):
        time.sleep(0.05)
    assert writers_running(tool) == []
    assert logged_access(caplog, "BIG01")["complete"] == "false"
    [job] = [job for job in service.jobs.recent() if job.accessions == ["BIG01"]]
    assert job.state.value == "cancelled"
    assert fetch(base + "/api/iso/download?accession_number=ACC2001")[0] == 200


def test_the_loop_thread_asks_nothing_of_a_file_a_task_thread_may_be_closing(tmp_path):
    """writable() runs in the loop thread without the outbuf lock, while a task thread may send and close
    the very buffer: so whether to wait is told from numbers only (a closed file would raise here)."""
    iso = tmp_path / "disc.iso"
    iso.write_bytes(bytes(10000))
    build = types.SimpleNamespace(written=4096, error=None, wake=None)
    body = delivery.RemovedOnClose(open(iso, "rb"), lambda: None, 1000, 5000, 10000, build)
    buffer = ReadOnlyFileBasedBuffer(body)
    assert buffer.prepare(5000) == 5000  # waitress's sizing: the answer's length, however far the file is
    loop = waitress_adapter.SendfileChannel.__new__(waitress_adapter.SendfileChannel)
    loop.server = types.SimpleNamespace(pull_trigger=lambda: None)
    assert not loop._waiting(buffer)  # at 1000 of 4096 written
    buffer.skip(3096, True)
    assert loop._waiting(buffer)  # at 4096: the next byte is not written yet
    assert build.wake is loop.server.pull_trigger
    body.close()  # as a task thread does once it sent the buffer
    assert loop._waiting(buffer)
    build.written = 10000
    assert not loop._waiting(buffer)


def test_finished_downloads_keep_no_image_headers(serve):
    """Jobs are kept for the API until they expire; the headers of their images are not (10,000 images
    are about 15 MB of them), or memory would grow with every download."""
    service, base = serve("/usr/bin/genisoimage")
    for accession in ("BIG01", "ACC2001", "BIG01"):
        assert fetch(base + "/api/iso/download?accession_number=" + accession)[0] == 200
    assert wait_until_clean(service) == []
    assert [job.state.value for job in service.jobs.recent()] == ["done"] * 3
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, received.ReceivedFile)] == []


# -- the hand-over of a streamed disc's last step from the steps to its build (jobs.Jobs._execute) ----------

def stream_one(make_service, wsgi_call):
    service = make_service()
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=ACC2001")
    return service, response


def test_a_full_disk_as_the_streamed_build_starts_is_507_and_leaves_nothing(make_service, wsgi_call, monkeypatch):
    """The build starts after the steps returned, outside their own ENOSPC handling: still a 507.  So
    does a full disk as its head is laid out (``isoimage``), within them."""
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tree, "make_iso", no_space)
    monkeypatch.setattr(tree, "read_iso", no_space)
    service, response = stream_one(make_service, wsgi_call)
    assert response.status == 507 and response.json()["code"] == "insufficient_storage", response.body[:300]
    assert wait_until_clean(service) == []
    [job] = service.jobs.recent()
    assert job.stream and job.state is State.FAILED and service.jobs.counts() == (0, 0)


def test_a_build_thread_that_cannot_start_is_an_error_and_leaves_nothing(make_service, wsgi_call, monkeypatch):
    start = threading.Thread.start

    def refused(thread):
        if thread.name.startswith("iso-"):
            raise RuntimeError("can't start new thread")
        return start(thread)

    monkeypatch.setattr(threading.Thread, "start", refused)
    service, response = stream_one(make_service, wsgi_call)
    monkeypatch.undo()
    assert response.status == 500 and response.json()["code"] == "internal_error", response.body[:300]
    assert wait_until_clean(service) == []
    [job] = service.jobs.recent()
    assert job.state is State.FAILED and service.jobs.counts() == (0, 0)


def test_a_cancel_between_the_steps_and_the_build_cancels_and_leaves_nothing(make_service, wsgi_call, monkeypatch):
    make_iso = steps.Steps.make_iso

    def then_cancelled(self, job, build=True):
        isos = make_iso(self, job, build)
        job.cancelled = True  # as Jobs.cancel sets it, just after the steps returned
        return isos

    monkeypatch.setattr(steps.Steps, "make_iso", then_cancelled)
    service, response = stream_one(make_service, wsgi_call)
    assert response.status == 409 and response.json()["code"] == "cancelled", response.body[:300]
    assert wait_until_clean(service) == []
    [job] = service.jobs.recent()
    assert job.state is State.CANCELLED and service.jobs.counts() == (0, 0)
