"""Shared fixtures: a real dcmqrscp PACS seeded with synthetic studies, a
configuration pointing at it, a started Service, and a tiny WSGI client.

Everything listens on loopback ports chosen free at run time (``Ports``).
"""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from mkiso import config as configuration, demo, disk, server as mkiso_server
from mkiso.http import waitress_adapter
from mkiso.service import JOBS, RETRIEVALS, Service

DCMTK_DIR = os.path.dirname(shutil.which("findscu") or "/usr/bin/findscu")


class Ports:
    """Loopback ports for the tests' servers: below the kernel's ephemeral range, a block of its own
    for each pytest-xdist worker, none handed out twice by a process.

    ``demo.free_port`` asks the kernel for port 0, a pick from the ephemeral range: between its close
    and the server's bind (or between two tests, for the session's receiver port) another worker's
    pick, or an outgoing connection, could take it again; with four workers that once took a
    session's receiver port and failed every test after it.  No pick of the kernel's comes below
    the ephemeral range, and each process has its own block there (one outside xdist: the last).
    """

    FIRST, BLOCK = 10000, 2000

    def __init__(self, worker):
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            ephemeral = int(handle.read().split()[0])
        blocks = max(1, (ephemeral - self.FIRST) // self.BLOCK)
        index = int(worker[2:]) % blocks if worker else blocks - 1
        self.next = self.FIRST + index * self.BLOCK
        self.end = self.next + self.BLOCK

    def take(self):
        while self.next < self.end:
            port, self.next = self.next, self.next + 1
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:  # something listens there, or a connection of an earlier run lingers
                    continue
            return port
        raise RuntimeError("this test process used its %d ports" % self.BLOCK)


# For the tests and for the demo PACSes they start (Orthanc takes two of its own).
demo.free_port = Ports(os.environ.get("PYTEST_XDIST_WORKER")).take


def pytest_collection_modifyitems(items):
    """The long test first: spread over the cores (scripts/test), the others fill the rest beside it."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(scope="session")
def receiver_port():
    """The one port the PACS has on file for our AE title CDRECORD."""
    return demo.free_port()


@pytest.fixture(scope="session")
def archive(tmp_path_factory, receiver_port):
    """The studies the PACS holds, started as a real dcmqrscp for the session."""
    studies = demo.sample_studies() + [
        # large enough (about 10 MB) that a client can hang up in the middle of the ISO
        demo.SampleStudy("PAT-4001", "ROE^RICHARD", "BIG01", series=(20,), image_bytes=512 * 1024),
    ]
    pacs = demo.Dcmqrscp(str(tmp_path_factory.mktemp("pacs")), demo.free_port(), {"CDRECORD": receiver_port},
                         dcmtk_dir=DCMTK_DIR)
    pacs.add_studies(studies)
    pacs.start()
    yield Archive(pacs, studies)
    pacs.stop()


class Archive:
    def __init__(self, pacs, studies):
        self.pacs = pacs
        self.studies = studies

    def by_accession(self, accession):
        return [study for study in self.studies if study.accession == accession]

    def sop_uids(self, *accessions):
        return {uid for accession in accessions for study in self.by_accession(accession) for uid in study.sop_uids}


@pytest.fixture
def settings(tmp_path, archive, receiver_port):
    """A config dict for a service against the archive; tests adjust it before use."""
    os.makedirs(tmp_path / "work")
    return {
        "pacs": {"ae_title": "ABPACS", "host": "127.0.0.1", "port": archive.pacs.port},
        "receiver": {"ae_title": "CDRECORD", "port": receiver_port},
        "paths": {"work_dir": str(tmp_path / "work")},
        "audit": {"path": str(tmp_path / "audit.log")},
        "tools": {"dcmtk_dir": DCMTK_DIR, "genisoimage": shutil.which("genisoimage") or "/usr/bin/genisoimage"},
        "timeouts": {"find_s": 10, "move_s": 60, "iso_s": 60, "store_s": 60, "shutdown_s": 5},
        "limits": {"min_free_bytes": 1000000},
        "cache": {"max_bytes": 0},  # every download really retrieves; the cache's tests turn it on
    }


def write_config(path, settings):
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(settings, handle, allow_unicode=True)
    return str(path)


@pytest.fixture
def make_service(tmp_path, settings):
    """Start a Service from ``settings`` (after the test changed them)."""
    started = []

    def make(**overrides):
        merged = {section: dict(values) for section, values in settings.items()}
        for section, values in overrides.items():
            merged.setdefault(section, {}).update(values)
        config = configuration.load(write_config(tmp_path / "config.yaml", merged))
        service = Service(config)
        service.start()
        started.append(service)
        receiver = service.receiver
        if receiver is not None and not receiver.paused:
            assert receiver.wait_ready(), "the receiver did not start"
        return service

    yield make
    for service in started:
        leftovers = wait_until_clean(service)
        service.stop()
        assert leftovers == [], "job files left behind in the work dir"


def wait_until_clean(service, timeout=15):
    """What jobs left behind once the service's background removals had ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job_leftovers(service):
        time.sleep(0.05)
    return job_leftovers(service)


def job_leftovers(service):
    """What jobs and retrievals left in the service's work dir (a ready job's disc is not left over),
    once the trees handed to the background remover (``disk.remove_soon``) are gone."""
    disk._remover.submit(lambda: None).result()  # it removes one tree after another
    kept = {os.path.basename(iso.folder) for job in service.jobs.recent() if job.state.value == "ready"
            for iso in job.discs}
    return [name for folder in (JOBS, RETRIEVALS) for name in os.listdir(service.path(folder)) if name not in kept]


@pytest.fixture
def small_work_dir(settings, tmp_path):
    """Put the work dir on a tmpfs of the given size (root only; skipped, saying why, elsewhere)."""
    mounted = []

    def mount(size):
        point = tmp_path / "tmpfs"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % size, "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip("a tmpfs cannot be mounted here (needs root): %s" % result.stderr.strip())
        mounted.append(point)
        (point / "work").mkdir()
        settings["paths"]["work_dir"] = str(point / "work")
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=True)


@pytest.fixture
def silent_listener():
    """A loopback socket that listens and never answers (non-blocking: accept() shows any caller)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.setblocking(False)
    yield listener
    listener.close()


@pytest.fixture
def silent_pacs(settings, silent_listener):
    """A PACS address that never answers; any connection to it shows in accept()."""
    settings["pacs"]["port"] = silent_listener.getsockname()[1]
    return silent_listener


class WsgiResponse:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name):
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self):
        return json.loads(self.body.decode("utf-8"))


def call(app, path, method="GET", query="", headers=None, peer="127.0.0.1", body=b""):
    """Call a WSGI app in-process, as a server would for a client at ``peer``, and read the whole answer."""
    environ = {"REMOTE_ADDR": peer, "CONTENT_LENGTH": str(len(body)),
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "localhost",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr, "wsgi.url_scheme": "http", "wsgi.multithread": True,
        "wsgi.multiprocess": False, "wsgi.run_once": False, "wsgi.version": (1, 0),
    }
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        environ[key if key == "CONTENT_TYPE" else "HTTP_" + key] = value
    captured = {}

    def start_response(status, response_headers, exc_info=None):
        captured["status"] = int(status.split()[0])
        captured["headers"] = response_headers

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        if hasattr(body, "close"):
            body.close()
    return WsgiResponse(captured["status"], captured["headers"], data)


@pytest.fixture
def wsgi_call():
    return call


@pytest.fixture
def live_server():
    """Serve a WSGI app as mkiso-server does, in a thread on a free port; yields its base URL.

    The thread turns waitress's loop itself, as mkiso-server does, until the
    test is over; then the worker threads stop first and the loop thread
    closes the sockets (closed from the test's thread, one could go while
    the loop polls it). The teardown never writes to waitress's trigger:
    it met a closed one there (EBADF in trigger.py under waitress 2.1).
    """
    from waitress import wasyncore

    servers = []

    def serve(app):
        server, server_map = mkiso_server.listen(app, "127.0.0.1", 0, 8)  # as mkiso-server runs it
        stop = threading.Event()

        def run():
            while not stop.is_set():
                waitress_adapter.turn(server_map, 0.05)
            wasyncore.close_all(server_map, ignore_all=True)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        servers.append((server, stop, thread))
        return "http://127.0.0.1:%s" % server.effective_port

    yield serve
    for server, stop, thread in servers:
        server.task_dispatcher.shutdown()
        stop.set()
        thread.join(10)
