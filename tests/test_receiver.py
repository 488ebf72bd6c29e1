"""The receiver's bound on concurrent associations (SPEC §3.3, §3.7), tried with real senders.

The port is an open door: anyone may open associations to it, as many as
they like and all at once.  At no moment may more than
``receiver.max_associations`` storescp processes serve them, however the
connections are timed; those beyond are refused with an A-ASSOCIATE-RJ
(transient, local limit exceeded), never accepted and cut off later.
"""

import os
import signal
import socket
import subprocess
import threading

import pytest

from mkiso.dicom import receiver
from mkiso.http import application
from conftest import DCMTK_DIR
from discs import check_pdi, download
from test_integrity import pacs_files, wait_for

# The first bytes of an A-ASSOCIATE-RQ (PDU type 1, then its length): the rest never comes.
RQ_START = bytes((0x01, 0, 0, 0, 0, 0xCD))
BOUND = 2
SENDERS = 10
REJECTED = "Reason: Local Limit Exceeded"


def begin_association(port):
    """A connection that sent the start of an A-ASSOCIATE-RQ: the receiver gives it a storescp, which
    waits for the rest (its association timeout, 30 s) unless the connection is closed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(RQ_START)
    return sock


def listening(port):
    """The fds' names (``socket:[inode]``) of the sockets listening on ``port``."""
    return {"socket:[%d]" % inode for inode in receiver.listening_sockets().get(port, ())}


def descendants(pid):
    """The pids below ``pid`` (its threads' children, theirs, ...), from /proc."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir("/proc/%d/task" % parent)
        except OSError:
            continue
        for task in tasks:
            try:
                with open("/proc/%d/task/%s/children" % (parent, task), encoding="ascii") as handle:
                    children = [int(child) for child in handle.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def storescp_processes(inbox):
    """Our storescp processes writing to ``inbox``."""
    return [pid for pid in descendants(os.getpid()) if receiver._is_receiver(pid, inbox)]


def serving(inbox, listeners):
    """Our storescp processes writing to ``inbox`` that hold a socket other than the listening ones: the
    associations running at this instant (whether storescp forks them or mkiso starts them)."""
    pids = []
    for pid in storescp_processes(inbox):
        try:
            fds = {os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%d/fd" % pid)}
        except OSError:
            continue
        if any(fd.startswith("socket:") for fd in fds - listeners):
            pids.append(pid)
    return pids


class Sampler:
    """Counts the associations running, as often as /proc can be read, until stopped; keeps the peak."""

    def __init__(self, inbox, port):
        self.inbox, self.port = inbox, port
        self.peak, self.samples = [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        listeners = listening(self.port)
        while not self._stop.is_set():
            pids = serving(self.inbox, listeners)
            self.samples += 1
            if len(pids) > len(self.peak):
                self.peak = pids

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


@pytest.mark.alone
def test_a_burst_of_associations_never_runs_more_than_the_bound(make_service, archive, tmp_path):
    """Ten storescu at once, each sending a 10 MB study three times, against a bound of 2: sampled all
    along, never more than 2 storescp serve; each sender either stores everything or is refused before
    it sends."""
    service = make_service(receiver={"max_associations": BOUND})
    port, inbox = service.config.receiver.port, service.receiver.inbox
    files = pacs_files(archive, "BIG01") * 3
    study_uid = archive.by_accession("BIG01")[0].study_uid
    service.receiver.expect(study_uid)  # as a job would: not swept while it arrives
    command = [os.path.join(DCMTK_DIR, "storescu"), "-v", "-aet", "BURST", "-aec", "CDRECORD", "127.0.0.1",
               str(port)] + files
    with Sampler(inbox, port) as sampler:
        senders = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for _ in range(SENDERS)]
        outputs = [sender.communicate(timeout=120)[0] for sender in senders]
    assert sampler.samples > 100 and sampler.peak, "%d samples, none with an association" % sampler.samples
    assert len(sampler.peak) <= BOUND, "%d associations ran at once (bound %d): storescp %s" % (
        len(sampler.peak), BOUND, sampler.peak)
    stored = [out for out in outputs if out.count("Received Store Response (Success)") == len(files)]
    refused = [out for out in outputs if REJECTED in out and "Received Store Response" not in out]
    assert len(stored) >= BOUND, "\n---\n".join(outputs)
    assert len(stored) + len(refused) == SENDERS, "a sender was cut off mid-way:\n" + "\n---\n".join(
        out for out in outputs if out not in stored and out not in refused)
    assert "Result: Rejected Transient" in refused[0], refused[0]
    assert service.receiver.refused_associations == len(refused)
    service.receiver.collect(study_uid, str(tmp_path / "received"))
    assert len(os.listdir(tmp_path / "received")) == len(stored) * len(files)


def test_beyond_the_idle_connections_held_the_longest_idle_are_closed(make_service):
    """More idle connections than the receiver holds (PENDING_MAX): the oldest are closed, the newest
    kept, and none ever got a process."""
    service = make_service()
    port = service.config.receiver.port
    extra = 20
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(receiver.PENDING_MAX + extra)]
    try:
        assert wait_for(lambda: service.receiver.idle_closed == extra, 10), service.receiver.idle_closed
        for sock in idle[:extra]:
            assert sock.recv(1) == b"", "an old idle connection is still open"
        idle[-1].setblocking(False)
        with pytest.raises(BlockingIOError):
            idle[-1].recv(1)  # still open, nothing said
        assert storescp_processes(service.receiver.inbox) == []
    finally:
        for sock in idle:
            sock.close()


def test_a_connection_that_does_not_speak_dicom_gets_no_process(make_service):
    """An HTTP request to the receiver's port is closed at once, without a storescp; a real association
    right after it is served."""
    service = make_service()
    port = service.config.receiver.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:  # closed with the request unread
            pass
    assert storescp_processes(service.receiver.inbox) == []
    result = subprocess.run([os.path.join(DCMTK_DIR, "echoscu"), "-aec", "CDRECORD", "127.0.0.1", str(port)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_storescp_killed_mid_association_costs_only_that_association(make_service, wsgi_call, archive,
                                                                       tmp_path):
    """The storescp of an association dies (killed): its place is free again and the next download is
    served; the receiver was never down."""
    service = make_service(receiver={"max_associations": 1})
    port = service.config.receiver.port
    with begin_association(port):
        assert wait_for(lambda: service.receiver.associations == 1, 10)
        (pid,) = serving(service.receiver.inbox, listening(port))
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: service.receiver.associations == 0, 5)
    app = application.Application(service.config, service)
    _, disc, _ = download(wsgi_call, app, "/api/iso/download", tmp_path, "accession_number=ACC2001")
    check_pdi(disc, archive.sop_uids("ACC2001"))
    assert service.receiver.restarts == 0


def test_an_acceptor_that_fails_is_started_again(make_service, wsgi_call, archive, tmp_path, monkeypatch):
    """A fault in the thread that accepts (here: injected once) closes the port; the supervisor opens it
    again, health counts the restart, and a download is served."""
    service = make_service()
    real = service.receiver._admit
    faults = []

    def failing_once(conn, selector):
        if not faults:
            faults.append(conn)
            conn.close()
            raise RuntimeError("injected fault")
        return real(conn, selector)

    monkeypatch.setattr(service.receiver, "_admit", failing_once)
    with begin_association(service.config.receiver.port):
        assert wait_for(lambda: faults, 5)
    assert wait_for(lambda: service.receiver.restarts == 1 and service.receiver.listening, 15)
    app = application.Application(service.config, service)
    check = wsgi_call(app, "/api/health").json()["checks"]["receiver"]
    assert check["ok"] and "restarts: 1" in check["detail"], check
    _, disc, _ = download(wsgi_call, app, "/api/iso/download", tmp_path, "accession_number=ACC2001")
    check_pdi(disc, archive.sop_uids("ACC2001"))
