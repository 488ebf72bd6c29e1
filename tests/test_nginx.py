"""Behind a real nginx (Debian's), configured by the shipped snippet (debian/nginx/).

The snippet is used as shipped but for the two things a test must change:
mkiso's port (127.0.0.1:8080) and the spool dir (/var/spool/mkiso/). Its
zones (mkiso-limits.conf) are included at http level from a conf.d folder,
as Debian's nginx.conf includes /etc/nginx/conf.d/*.conf.
"""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

import pytest

from mkiso import demo, server as mkiso_server
from mkiso.http import application
from conftest import job_leftovers
from discs import Disc, check_pdi, open_iso

PREFIX = "/internal/mkiso/"
SNIPPETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "debian", "nginx")

NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
error_log {root}/error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    sendfile on;
    proxy_max_temp_file_size 1m;  # BIG01's ISO (11 MB) is larger than nginx's temp-file limit here
    include {root}/conf.d/*.conf;
    server {{
        listen 127.0.0.1:{port};
        include snippets/mkiso.conf;
    }}
}}
"""


def install_snippets(root, upstream, work_dir, his_key=None, metrics_from=None):
    """The shipped snippets, pointed at this test's mkiso, work dir and HIS key file.

    The key file is empty, as the package creates it, unless ``his_key`` is
    given: then it holds the line an admin puts there. ``metrics_from``: the
    address the /metrics location allows instead of loopback (the admin's
    Prometheus host).
    """
    os.makedirs(os.path.join(root, "snippets"))
    os.makedirs(os.path.join(root, "conf.d"))
    shutil.copy(os.path.join(SNIPPETS, "mkiso-limits.conf"), os.path.join(root, "conf.d"))
    for name in ("mkiso.conf", "mkiso-proxy.conf"):
        with open(os.path.join(SNIPPETS, name)) as handle:
            text = handle.read()
        if name == "mkiso.conf":
            assert text.count("http://127.0.0.1:8080") == 8 and text.count("alias /var/spool/mkiso/;") == 1
            assert text.count("    allow 127.0.0.1;\n") == 1
            if metrics_from:
                text = text.replace("    allow 127.0.0.1;\n", "    allow %s;\n" % metrics_from)
            assert text.count("include /etc/nginx/mkiso-his-key.conf;") == 1
            text = text.replace("http://127.0.0.1:8080", "http://127.0.0.1:%d" % upstream)
            text = text.replace("alias /var/spool/mkiso/;", "alias %s/;" % work_dir)
            text = text.replace("/etc/nginx/mkiso-his-key.conf", os.path.join(root, "mkiso-his-key.conf"))
        with open(os.path.join(root, "snippets", name), "w") as handle:
            handle.write(text)
    with open(os.path.join(root, "mkiso-his-key.conf"), "w") as handle:
        if his_key:
            handle.write('proxy_set_header X-API-Key "%s";\n' % his_key)


@pytest.fixture
def nginx(tmp_path):
    """Start nginx with the shipped snippet in front of ``upstream`` and ``work_dir`` (and the HIS's
    key in its key file, if given), its workers as ``user`` (nginx's "user USER [GROUP]", when the
    tests run as root); returns its URL."""
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed (scripts/setup installs it)")
    procs = []

    def start(upstream, work_dir, his_key=None, user="root", metrics_from=None):
        root = tmp_path / "nginx"
        root.mkdir()
        port = demo.free_port()
        install_snippets(str(root), upstream, work_dir, his_key, metrics_from)
        conf = root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user="user %s;" % user if os.geteuid() == 0 else "", root=root, port=port))
        proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(root)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        assert demo.wait_for_port(port), (root / "error.log").read_text()
        return "http://127.0.0.1:%d" % port

    yield start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def wait_until_removed(service, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job_leftovers(service):
        time.sleep(0.1)
    return job_leftovers(service)


@pytest.fixture
def behind_nginx(make_service, live_server, nginx):
    """mkiso with x_accel_prefix (ISOs kept 2 s) behind nginx; every ISO must be gone after that."""
    service = make_service(server={"x_accel_prefix": PREFIX, "x_accel_keep_s": 2})
    upstream = live_server(application.Application(service.config, service))
    yield service, upstream, nginx(int(upstream.rsplit(":", 1)[1]), service.config.paths.work_dir)
    assert wait_until_removed(service) == [], "an ISO outlived x_accel_keep_s"


def test_mkiso_answers_with_a_redirect_into_the_work_dir(behind_nginx):
    service, upstream, _ = behind_nginx
    status, headers, body = get(upstream + "/api/iso/download?accession_number=ACC2001")
    assert status == 200 and body == b""
    target = headers["X-Accel-Redirect"]
    assert target.startswith(PREFIX + "jobs/") and target.endswith("/disc.iso")
    assert os.path.isfile(os.path.join(service.config.paths.work_dir, target[len(PREFIX):]))
    assert headers["Content-Disposition"].startswith('attachment; filename="ACC2001.iso"')


def test_nginx_sends_the_iso_and_it_is_removed_after_the_keep_time(behind_nginx, archive, tmp_path):
    service, _, front = behind_nginx
    status, headers, body = get(front + "/mkiso.php?accession_number=ACC2001")
    assert status == 200, body[:300]
    assert "X-Accel-Redirect" not in headers
    assert headers["Content-Type"] == "application/x-iso9660-image"
    assert headers["Content-Disposition"].startswith('attachment; filename="ACC2001.iso"')
    assert int(headers["Content-Length"]) == len(body)
    iso_path = tmp_path / "via-nginx.iso"
    iso_path.write_bytes(body)
    check_pdi(open_iso(str(iso_path), str(tmp_path / "via-nginx")), archive.sop_uids("ACC2001"))
    assert job_leftovers(service), "the ISO must stay for its keep time"
    assert wait_until_removed(service) == []


def test_nginx_sends_a_zip_written_with_the_same_layout(behind_nginx, archive, tmp_path):
    """nginx sends files, not layouts: the ZIP is written first, byte for byte the layout mkiso sends itself."""
    service, upstream, front = behind_nginx
    status, headers, _ = get(upstream + "/api/iso/download?accession_number=ACC2001&format=zip")
    assert status == 200 and headers["X-Accel-Redirect"].endswith("/disc.zip")
    assert headers["Content-Type"] == "application/zip"
    status, headers, body = get(front + "/api/iso/download?accession_number=ACC2001&format=zip")
    assert status == 200 and headers["Content-Type"] == "application/zip"
    assert headers["Content-Disposition"].startswith('attachment; filename="ACC2001.zip"')
    assert int(headers["Content-Length"]) == len(body)
    with zipfile.ZipFile(io.BytesIO(body)) as opened:
        assert opened.testzip() is None
        opened.extractall(tmp_path / "stick")
    check_pdi(Disc(str(tmp_path / "stick")), archive.sop_uids("ACC2001"))
    assert wait_until_removed(service) == []


def test_nginx_answers_ranges_of_the_redirected_iso(behind_nginx):
    _, _, front = behind_nginx
    status, headers, body = get(front + "/api/iso/download?accession_number=ACC2001", {"Range": "bytes=0-99"})
    assert status == 206 and len(body) == 100
    assert headers["Content-Range"].startswith("bytes 0-99/")


def test_the_internal_location_is_not_reachable_from_outside(behind_nginx):
    service, upstream, front = behind_nginx
    _, headers, _ = get(upstream + "/api/iso/download?accession_number=ACC2001")
    status, _, _ = get(front + headers["X-Accel-Redirect"])
    assert status == 404


@pytest.fixture
def shared_work_dir(settings):
    """A work dir nginx's workers could reach: under /tmp (the tests' tmp_path is root's alone), 0750 as
    the package makes /var/spool/mkiso, so only mkiso's group (here root's) may read it."""
    if os.geteuid() != 0:
        pytest.skip("nginx's workers run as another user than mkiso only when the tests run as root")
    work_dir = tempfile.mkdtemp(prefix="mkiso-spool-")
    os.chmod(work_dir, 0o750)
    settings["paths"]["work_dir"] = work_dir
    yield work_dir
    shutil.rmtree(work_dir)


@pytest.mark.parametrize("user, status", [
    ("nobody nogroup", 403),  # before "adduser www-data mkiso": nginx's user is not in mkiso's group
    ("nobody root", 200),  # after: nginx's workers have mkiso's group (root's here)
])
def test_the_audit_line_of_a_disc_handed_to_nginx_never_claims_the_client_got_it(
        shared_work_dir, make_service, live_server, nginx, user, status):
    """mkiso hands the disc over and never sees what nginx sent: nginx's 403 (its user cannot read the
    work dir) must not stand in the audit trail as a complete download."""
    service = make_service(server={"x_accel_prefix": PREFIX, "x_accel_keep_s": 2})
    upstream = live_server(application.Application(service.config, service))
    front = nginx(int(upstream.rsplit(":", 1)[1]), shared_work_dir, user=user)
    got, headers, body = get(front + "/api/iso/download?accession_number=ACC1002")
    assert got == status, body[:300]
    if status == 200:
        assert headers["Content-Type"] == "application/x-iso9660-image" and len(body) > 32768
    with open(service.config.audit.path, encoding="utf-8") as handle:
        [line] = [json.loads(text) for text in handle]
    assert (line["action"], line["stage"], line["status"], line["code"]) == ("download", "ended", 200, None)
    assert line["handed_to"] == "nginx" and line["complete"] is None, line
    assert line["bytes"] > 32768  # the disc handed over: its size
    assert wait_until_removed(service) == []


@pytest.fixture
def plain_behind_nginx(make_service, live_server, nginx):
    """mkiso without x-accel (it sends the ISO itself) behind the snippet."""
    service = make_service()
    upstream = live_server(application.Application(service.config, service))
    return service, nginx(int(upstream.rsplit(":", 1)[1]), service.config.paths.work_dir), upstream


@pytest.mark.parametrize("path, status, iso", [
    ("/mkiso.php?accession_number=ACC2001", 200, True),
    ("/mkiso2.php?accession_number=ACC2001", 200, True),
    ("/mkiso_multiple.php?accession_numbers=MR.180505.026,ACC1002", 200, True),
    ("/send_rimage_multiple.php?accession_number=ACC2001", 503, False),  # no publisher here: mkiso says so
    ("/api/iso/download?accession_number=ACC3001", 200, True),
    ("/api/health", 200, False),
    ("/api/nothing-here", 404, False),
])
def test_legacy_urls_and_the_api_through_the_snippet(plain_behind_nginx, path, status, iso):
    _, front, _ = plain_behind_nginx
    got, headers, body = get(front + path)
    assert got == status, body[:300]
    assert headers["X-Request-ID"], "the answer must come from mkiso"
    if iso:
        assert headers["Content-Type"] == "application/x-iso9660-image"
        assert int(headers["Content-Length"]) == len(body)
    else:
        assert headers["Content-Type"] == "application/json; charset=utf-8"


@pytest.mark.parametrize("metrics_from, status", [
    (None, 200),  # as shipped: a Prometheus on the gateway itself
    ("192.0.2.10", 403),  # the admin named the monitoring host: everyone else is refused by nginx
])
def test_metrics_are_scraped_through_nginx_from_the_allowed_host_only(make_service, live_server, nginx,
                                                                      metrics_from, status):
    """mkiso listens on loopback: the README's scrape goes through the snippet's /metrics location."""
    service = make_service()
    upstream = live_server(application.Application(service.config, service))
    front = nginx(int(upstream.rsplit(":", 1)[1]), service.config.paths.work_dir, metrics_from=metrics_from)
    got, headers, body = get(front + "/metrics")
    assert got == status, body[:300]
    if status == 200:
        assert b"mkiso_build_info{" in body and headers["X-Request-ID"]
    else:
        assert "X-Request-ID" not in headers  # nginx's own answer: mkiso never saw it


def open_files_under(folder):
    """Files under ``folder`` that some process holds open (nginx unlinks its temp files at once)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink("/proc/%s/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%s/fd" % pid)]
        except OSError:
            continue
        found += [link for link in links if link.startswith(folder + os.sep)]
    return found


def test_nginx_does_not_spool_the_iso_to_its_temp_dir(plain_behind_nginx, tmp_path):
    """A client that reads slowly: with buffering nginx would write the ISO to proxy_temp_path."""
    _, front, _ = plain_behind_nginx
    port = int(front.rsplit(":", 1)[1])
    temp = tmp_path / "nginx" / "proxy"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"GET /api/iso/download?accession_number=BIG01 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Connection: close\r\n\r\n")
        head = client.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        time.sleep(2)  # nginx would spool what the client does not take
        assert open_files_under(str(temp)) == [], "nginx spooled the ISO to its temp dir"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # now take the rest quickly
        received = len(head.split(b"\r\n\r\n", 1)[1])
        while True:
            chunk = client.recv(1 << 20)
            if not chunk:
                break
            received += len(chunk)
    assert received == length > 8 * 1024 * 1024


def slow_clients(port, count=150):
    """Connections that send a request line and a header, and then nothing more."""
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1\r\n")
        clients.append(client)
    return clients


def health_answers(base, timeout):
    try:
        with urllib.request.urlopen(base + "/api/health", timeout=timeout) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.mark.alone
def test_slow_clients_are_absorbed_by_nginx(plain_behind_nginx):
    """More half-open requests than waitress keeps connections (server.CONNECTIONS): straight at
    waitress they stop every answer, through nginx none."""
    _, front, upstream = plain_behind_nginx
    for base, stopped in ((front, False), (upstream, True)):
        clients = slow_clients(int(base.rsplit(":", 1)[1]), count=mkiso_server.CONNECTIONS + 10)
        try:
            started = time.monotonic()
            assert health_answers(base, timeout=3) is not stopped, base
            if not stopped:
                assert time.monotonic() - started < 3
        finally:
            for client in clients:
                client.close()
        time.sleep(0.5)  # let waitress see the closed connections


def test_the_desk_page_and_a_job_through_nginx(behind_nginx, archive, tmp_path):
    """/mkiso/ is the page; a job's events pass unbuffered; its ISO goes out by X-Accel-Redirect."""
    service, _, front = behind_nginx
    status, headers, page = get(front + "/mkiso/")
    assert status == 200 and b"Patient CD/DVD" in page and headers["Content-Security-Policy"]
    status, headers, script = get(front + "/mkiso/desk.js")  # the page's relative script, at /mkiso/ too
    assert status == 200 and b"function lookUp" in script and b'src="desk.js"' in page
    request = urllib.request.Request(front + "/api/jobs", data=json.dumps({"accessions": ["ACC2001"]}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        job = json.loads(answer.read())
    events = []
    with urllib.request.urlopen(front + job["links"]["events"], timeout=30) as stream:
        for line in stream:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["state"] == "ready" and len(events) >= 2
    status, headers, body = get(front + events[-1]["links"]["iso"])
    assert status == 200 and "X-Accel-Redirect" not in headers and len(body) == events[-1]["progress"]["disc_bytes"]
    (tmp_path / "job.iso").write_bytes(body)
    check_pdi(open_iso(str(tmp_path / "job.iso"), str(tmp_path / "job")), archive.sop_uids("ACC2001"))
    assert get(front + events[-1]["links"]["iso"])[2] == body  # a job's disc stays for a second fetch
    with open(service.config.audit.path, encoding="utf-8") as handle:
        fetches = [json.loads(line) for line in handle][1:]  # after the job's own line
    handed = [(line["handed_to"], line["complete"], line["bytes"]) for line in fetches]
    assert handed == [("nginx", None, len(body))] * 2


HIS_KEY = "his-0123456789abcdef-key"
DESK_KEY = "desk-0123456789abcdef-key"


@pytest.fixture
def keyed_behind_nginx(make_service, live_server, nginx):
    """mkiso with auth on and named keys, behind the snippet whose HIS key file holds the HIS's key."""
    service = make_service(auth={"enabled": True, "keys": {"his": HIS_KEY, "desk-1": DESK_KEY}})
    upstream = live_server(application.Application(service.config, service))
    return service, nginx(int(upstream.rsplit(":", 1)[1]), service.config.paths.work_dir, HIS_KEY)


def test_the_his_key_reaches_the_legacy_urls_only(keyed_behind_nginx):
    """nginx adds the HIS's key to the four legacy URLs, which the HIS calls without one;
    everything else needs the caller's own key and is audited under its name."""
    service, front = keyed_behind_nginx
    status, headers, body = get(front + "/mkiso.php?accession_number=ACC2001")
    assert status == 200 and headers["Content-Type"] == "application/x-iso9660-image", body[:300]
    # a client's own (wrong) key on a legacy URL is replaced by the HIS's, not passed on
    assert get(front + "/mkiso2.php?accession_number=ACC2001", {"X-API-Key": "wrong"})[0] == 200
    for path in ("/api/studies?accession_numbers=ACC2001", "/api/jobs",
                 "/api/iso/download?accession_number=ACC2001"):
        assert get(front + path)[0] == 401, path
        assert get(front + path, {"X-API-Key": "wrong"})[0] == 401, path
        assert get(front + path, {"X-API-Key": HIS_KEY + "x"})[0] == 401, path
    status, _, body = get(front + "/api/studies?accession_numbers=ACC2001", {"X-API-Key": DESK_KEY})
    assert status == 200 and json.loads(body)["studies"], body[:300]
    assert get(front + "/mkiso/")[0] == 200  # the page itself; it asks the clerk for the desk's key
    with open(service.config.audit.path, encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle]
    exports = [line for line in lines if line["action"] == "download" and line["stage"] == "ended"]
    assert [line["caller"] for line in exports] == ["his", "his"], lines


def test_health_lookups_and_job_creation_are_rate_limited_per_client(plain_behind_nginx):
    """A client flooding health, lookups or job creation gets 429 from nginx; a download still goes."""
    service, front, _ = plain_behind_nginx
    health = [get(front + "/api/health")[0] for _ in range(40)]
    assert health[:20] == [200] * 20 and 429 in health
    lookups = [get(front + "/api/studies?accession_numbers=NOSUCH1")[0] for _ in range(20)]
    assert lookups[0] == 404 and 429 in lookups
    posted = []
    for _ in range(20):
        request = urllib.request.Request(front + "/api/jobs", data=b'{"accessions": ["NOSUCH1"]}', method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                posted.append(answer.status)
        except urllib.error.HTTPError as error:
            posted.append(error.code)
    assert posted[:10] == [202] * 10 and 429 in posted
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(job.state.value in ("queued", "running")
                                              for job in service.jobs.recent()):
        time.sleep(0.1)
    assert get(front + "/api/jobs")[0] == 200  # listing jobs is not creating them
    status, _, body = get(front + "/mkiso.php?accession_number=ACC2001")
    assert status == 200, body[:200]


def test_connections_per_client_are_limited(nginx, silent_listener, tmp_path):
    """More than 16 requests of one address in progress at once: nginx answers the rest 429.

    The upstream here never answers (as a long C-MOVE would not, for a while), so every request
    nginx passed on stays in progress: with mkiso answering, the first ones could be over before
    the seventeenth arrived, and the limit would never be reached.
    """
    front = nginx(silent_listener.getsockname()[1], str(tmp_path))
    port = int(front.rsplit(":", 1)[1])
    request = b"GET /mkiso.php?accession_number=ACC2001 HTTP/1.1\r\nHost: x\r\n\r\n"
    held = []
    try:
        for _ in range(16):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(request)
            held.append(sock)
        time.sleep(1)  # nginx has taken them all on
        extra = socket.create_connection(("127.0.0.1", port), timeout=30)
        held.append(extra)
        extra.sendall(request)
        status = int(extra.recv(4096).split()[1])
        held[0].settimeout(0.5)
        with pytest.raises(socket.timeout):
            held[0].recv(4096)  # the first is still in progress, not refused
    finally:
        for sock in held:
            sock.close()
    assert status == 429
