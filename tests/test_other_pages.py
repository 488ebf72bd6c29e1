"""Requests from other web pages (SPEC §9), sent as a browser would send them, through a real waitress.

A page on another site can make a clerk's browser POST a ``text/plain``
body without asking first, name itself in ``Origin``, or, by DNS
rebinding, reach the gateway under its own host name.  None of that may
start, cancel or read work.
"""

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from mkiso.http import application
from test_jobs import slow_genisoimage

EVIL = "http://evil.example"
BODY = json.dumps({"accessions": ["ACC2001"]}).encode()


def send(url, method="GET", body=None, headers=None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


@pytest.fixture
def served(make_service, live_server):
    def serve(**overrides):
        service = make_service(**overrides)
        return service, live_server(application.Application(service.config, service))
    return serve


def test_a_text_plain_post_is_415_and_starts_nothing(served):
    service, base = served()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        status, _, body = send(base + "/api/jobs", "POST", BODY, {"Content-Type": content_type} if content_type else {})
        assert status == 415 and json.loads(body)["code"] == "unsupported_media_type", (content_type, body)
    assert service.jobs.recent() == []


def test_a_foreign_origin_cannot_start_or_cancel_and_our_own_can(served, tmp_path):
    service, base = served(tools={"genisoimage": slow_genisoimage(tmp_path, "ACC2001", seconds=30)})
    own = {"Content-Type": "application/json", "Origin": base}
    status, _, body = send(base + "/api/jobs", "POST", BODY, dict(own, Origin=EVIL))
    assert status == 403 and json.loads(body)["code"] == "foreign_origin", body
    assert service.jobs.recent() == []
    status, headers, body = send(base + "/api/jobs", "POST", BODY, own)
    assert status == 202, body
    job = json.loads(body)
    status, _, body = send(base + headers["Location"], "DELETE", headers={"Origin": EVIL})
    assert status == 403 and json.loads(body)["code"] == "foreign_origin"
    assert service.jobs.get(job["id"]).state.value in ("queued", "running")
    for path in ("/api/jobs", "/api/jobs/" + job["id"], "/api/studies?accession_numbers=ACC2001"):
        assert send(base + path, headers={"Origin": EVIL})[0] == 403, path  # nor read it
    status, _, body = send(base + headers["Location"], "DELETE", headers={"Origin": base})
    assert status == 200 and json.loads(body)["state"] == "cancelled"


def test_an_image_on_another_site_cannot_start_a_download_but_a_link_may(served):
    """<img src=".../mkiso.php?..."> elsewhere: no Origin, but Sec-Fetch-Site: cross-site."""
    service, base = served()
    url = base + "/mkiso.php?accession_number=ACC2001"
    image = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
    status, _, body = send(url, headers=image)
    assert status == 403 and json.loads(body)["code"] == "foreign_origin"
    assert service.jobs.recent() == []
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert send(url, headers=link)[0] == 200  # the HIS's link to the legacy URL, clicked


def test_the_page_itself_may_be_fetched_from_anywhere(served):
    _, base = served()
    for path in ("/", "/desk.js"):
        assert send(base + path, headers={"Origin": EVIL})[0] == 200, path
    assert send(base + "/", "POST", b"{}", {"Origin": EVIL, "Content-Type": "application/json"})[0] == 403


def test_allowed_origins_are_ours_too(served):
    """The desk page opened under another name of the gateway (listed), with nginx's Host without its port."""
    service, base = served(server={"allowed_origins": ["https://pacs-gw.example.org:8443"]})
    headers = {"Content-Type": "application/json", "Origin": "https://pacs-gw.example.org:8443"}
    assert send(base + "/api/jobs", "POST", BODY, headers)[0] == 202
    behind_nginx = {"Content-Type": "application/json", "Origin": "https://127.0.0.1:8443", "Host": "127.0.0.1"}
    assert send(base + "/api/jobs", "POST", BODY, behind_nginx)[0] == 202
    assert send(base + "/api/jobs", "POST", BODY, dict(headers, Origin="https://pacs-gw.example.org.evil.example"))[
        0] == 403
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(job.state.value != "ready" for job in service.jobs.recent()):
        time.sleep(0.1)


def test_a_host_name_that_is_not_ours_is_refused(served):
    """DNS rebinding: evil.example resolves to the gateway; the browser sends Host: evil.example and,
    for that page, Origin: http://evil.example, which matches the Host. The Host itself is refused."""
    service, base = served()
    port = base.rsplit(":", 1)[1]
    rebound = {"Host": "evil.example:" + port, "Origin": "http://evil.example:" + port,
               "Content-Type": "application/json"}
    for method, path, body in (("GET", "/api/studies?accession_numbers=ACC2001", None), ("POST", "/api/jobs", BODY),
                               ("GET", "/", None), ("GET", "/api/health", None)):
        status, _, answer = send(base + path, method, body, rebound)
        assert status == 403 and json.loads(answer)["code"] == "foreign_host", (path, answer)
    assert service.jobs.recent() == []
    for host in ("localhost:" + port, "127.0.0.1:" + port, "[::1]:" + port):
        assert send(base + "/api/health", headers={"Host": host})[0] == 200, host


SCRIPT = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}  # fetch()
KINDS = {
    "plain-http": {},  # a page's fetch over plain HTTP to a host name (no Sec-Fetch-*), the HIS's server, curl
    "script": SCRIPT,  # a page's fetch to a secure origin
    "typed": {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},
    "link": {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},
}


@pytest.mark.parametrize("listed, host, status", [
    (["pacs-gw.example.org"], "PACS-GW.example.org.", 200),
    (["pacs-gw.example.org"], "evil.example", 403),
    (["pacs-gw.example.org"], "pacs-gw.example.org.evil.example", 403),
    (["*"], "evil.example", 200),  # the check given up (documented)
])
@pytest.mark.parametrize("kind", KINDS)
def test_listed_host_names_are_answered(served, listed, host, status, kind):
    _, base = served(server={"allowed_hosts": listed})
    assert send(base + "/api/health", headers=dict(KINDS[kind], Host=host))[0] == status


@pytest.mark.parametrize("kind", KINDS)
def test_a_name_not_ours_is_refused_whatever_the_request_says(served, kind):
    """DNS rebinding over plain HTTP: the browser marks the page's same-origin GET with nothing, so it
    looks like the HIS's server or a clerk's link; the Host alone decides. An alias of the gateway
    that the HIS uses must be listed (the README's upgrade note)."""
    service, base = served()
    for path in ("/api/studies?accession_numbers=ACC2001", "/api/jobs", "/mkiso.php?accession_number=ACC2001",
                 "/send_rimage_multiple.php?accession_number=ACC2001", "/api/health", "/"):
        status, _, answer = send(base + path, headers=dict(KINDS[kind], Host="pacs-gw.hospital.example"))
        error = json.loads(answer)
        assert status == 403 and error["code"] == "foreign_host", (path, answer)
        assert "pacs-gw.hospital.example" in error["error"] and "server.allowed_hosts" in error["error"]
    assert service.jobs.recent() == []


def test_the_machines_own_names_and_addresses_are_answered(served):
    _, base = served()
    own = socket.gethostname()
    for host in (own, own.split(".")[0].upper(), "localhost", "desk.localhost", "127.0.0.1", "[::1]", "10.1.2.3"):
        assert send(base + "/api/health", headers={"Host": host})[0] == 200, host


def test_a_request_without_a_host_header_is_answered(served):
    """HTTP/1.0 without Host: no browser sends one, so no rebinding page can (behind nginx, nginx sends
    its server_name instead, which must be ours)."""
    _, base = served()
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(b"GET /api/health HTTP/1.0\r\n\r\n")
        assert sock.makefile("rb").readline().split()[1] == b"200"


@pytest.mark.parametrize("dest", ["iframe", "frame", "embed", "object"])
def test_a_frame_on_another_site_cannot_print_or_download_but_a_link_may(served, dest):
    """A hidden iframe is a navigation too; a secure origin's browser marks it (Sec-Fetch-Dest)."""
    service, base = served()
    framed = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": dest}
    for path in ("/send_rimage_multiple.php?accession_number=ACC2001", "/mkiso.php?accession_number=ACC3001"):
        status, _, answer = send(base + path, headers=framed)
        assert status == 403 and json.loads(answer)["code"] == "foreign_origin", (path, answer)
        assert dest in json.loads(answer)["error"]
    assert service.jobs.recent() == []
    same_site = dict(framed, **{"Sec-Fetch-Site": "same-site"})  # the HIS in the gateway's own domain
    assert send(base + "/mkiso.php?accession_number=ACC3001", headers=same_site)[0] == 200


def test_every_answer_says_nosniff_and_no_referrer_and_the_page_allows_no_inline_code(served):
    _, base = served()
    for path in ("/", "/desk.js", "/api/health", "/api/desk", "/nope", "/api/studies?accession_numbers=ACC2001"):
        _, headers, _ = send(base + path)
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer", path
    status, headers, page = send(base + "/")
    policy = headers["Content-Security-Policy"]
    assert "unsafe-inline" not in policy and "script-src 'self'" in policy
    assert b'<script src="desk.js"></script>' in page and b"<script>" not in page  # relative: /mkiso/ works too
    status, headers, script = send(base + "/desk.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and b"function lookUp" in script


def test_a_body_over_64_kb_is_413_unread(served):
    service, base = served()
    status, _, body = send(base + "/api/jobs", "POST", b" " * (64 * 1024 + 1), {"Content-Type": "application/json"})
    assert status == 413 and json.loads(body)["code"] == "body_too_large"
    assert service.jobs.recent() == []
