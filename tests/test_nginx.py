"""Behind a real nginx (Debian's): X-Accel-Redirect hands the ISO to nginx (SPEC §8)."""

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from mkiso import demo, web
from conftest import job_leftovers
from discs import check_pdi, open_iso

PREFIX = "/internal/mkiso/"

NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
error_log {root}/error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_buffering off;
        }}
        location {prefix} {{
            internal;
            alias {work_dir}/;
        }}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path):
    """Start nginx in front of ``upstream`` with the x-accel location for ``work_dir``; yields its URL."""
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed (scripts/setup installs it)")
    procs = []

    def start(upstream, work_dir):
        root = tmp_path / "nginx"
        root.mkdir()
        port = demo.free_port()
        conf = root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            user="user root;" if os.geteuid() == 0 else "", root=root, port=port, upstream=upstream,
            prefix=PREFIX, work_dir=work_dir))
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
    upstream = live_server(web.Application(service.config, service))
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
