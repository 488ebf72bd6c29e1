"""Requests from other web pages (SPEC §9), made by Debian's real chromium visiting an attacker's page.

Chromium resolves evil.example to 127.0.0.1 (``--host-resolver-rules``),
where a small web server of the test serves the attacker's page.  What the
browser then sends to the gateway is what a clerk's browser would send:
the tests assert on it as much as on mkiso's answers, because the rules
depend on it (over plain HTTP to a host name Chromium sends no
``Sec-Fetch-*`` at all).
"""

import http.client
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mkiso.http import application
from test_desk_page import By, chromium, wait
from test_print import FakeRimage

EVIL = "evil.example"
STEAL = """<!doctype html><title>Win a prize</title><pre id="out"></pre><script>
(async () => {
  const out = {};
  for (const path of ["/api/studies?accession_numbers=ACC2001", "/api/jobs"]) {
    const answer = await fetch(path);
    out[path] = [answer.status, await answer.text()];
  }
  document.getElementById("out").textContent = JSON.stringify(out);
})();
</script>"""
FRAMES = """<!doctype html><title>Win a prize</title>
<iframe hidden src="{gw}/send_rimage_multiple.php?accession_number=ACC2001"></iframe>
<iframe style="display:none" src="{gw}/mkiso.php?accession_number=ACC3001"></iframe>
<object data="{gw}/mkiso_multiple.php?accession_numbers=ACC2001" width="0" height="0"></object>
<embed src="{gw}/mkiso2.php?accession_number=ACC3001" width="0" height="0">"""


class AttackerSite:
    """evil.example's web server: its page at ``/``; with ``rebound_to`` (the gateway's port) every
    other path is answered by the gateway, the browser's request passed on as sent (Host:
    evil.example and all), as it reaches the gateway once evil.example's DNS points there."""

    def __init__(self, page, rebound_to=None):
        self.requests = []  # (path, headers) as the browser sent them
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                site.requests.append((self.path, dict(self.headers)))
                if self.path == "/" or rebound_to is None:
                    status, headers, body = 200, [("Content-Type", "text/html; charset=utf-8")], page.encode()
                else:
                    status, headers, body = _passed_on(rebound_to, self.path, self.headers)
                self.send_response(status)
                for name, value in headers + [("Content-Length", str(len(body))), ("Connection", "close")]:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://%s:%d/" % (EVIL, self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _passed_on(port, path, headers):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        answer = connection.getresponse()
        kept = [(name, value) for name, value in answer.getheaders()
                if name.lower() not in ("connection", "content-length", "transfer-encoding")]
        return answer.status, kept, answer.read()
    finally:
        connection.close()


@pytest.fixture
def browser(tmp_path):
    driver = chromium(tmp_path, "--host-resolver-rules=MAP %s 127.0.0.1" % EVIL)
    yield driver
    driver.quit()


@pytest.fixture
def attacker():
    sites = []

    def start(page, rebound_to=None):
        sites.append(AttackerSite(page, rebound_to))
        return sites[-1]

    yield start
    for site in sites:
        site.close()


def audited(service):
    """The actions in the audit trail (the file appears with its first entry)."""
    if not os.path.exists(service.config.audit.path):
        return []
    with open(service.config.audit.path, encoding="utf-8") as handle:
        return [json.loads(line)["action"] for line in handle if line.strip()]


def test_a_rebound_host_name_reads_no_patient_names(browser, attacker, make_service, live_server):
    """DNS rebinding over plain HTTP, auth off: the page's own fetches (same origin, as the browser sees it)
    carry neither Sec-Fetch-* nor Origin, only Host: evil.example; that alone is refused."""
    service = make_service()
    gateway = live_server(application.Application(service.config, service))
    site = attacker(STEAL, rebound_to=int(gateway.rsplit(":", 1)[1]))
    browser.get(site.url)
    wait(browser, lambda: browser.find_element(By.ID, "out").text)
    stolen = json.loads(browser.find_element(By.ID, "out").text)
    sent = [headers for path, headers in site.requests if path.startswith("/api/")]
    assert len(sent) == 2 and all(headers["Host"].startswith(EVIL + ":") for headers in sent), sent
    assert not [name for headers in sent for name in headers if name.lower().startswith("sec-fetch-")
                or name.lower() == "origin"], sent  # what the README says: nothing marks them
    for path, (status, body) in stolen.items():
        assert status == 403 and json.loads(body)["code"] == "foreign_host", (path, body)
        assert "server.allowed_hosts" in json.loads(body)["error"] and "DOE" not in body and "PAT-2001" not in body
    assert audited(service) == []  # no lookup ran (it is audited as a query)


def test_hidden_frames_on_another_site_neither_print_nor_download(browser, attacker, make_service, live_server,
                                                                tmp_path, caplog):
    """Auth off, the gateway reached as http://127.0.0.1 (a secure origin to chromium, so it marks the
    frames): hidden iframes, an object and an embed pointing at the legacy print and download URLs."""
    caplog.set_level(logging.INFO, logger="mkiso")
    rimage = FakeRimage(str(tmp_path / "rimage"))
    try:
        service = make_service(publisher={"host": "127.0.0.1", "port": rimage.port, "ae_title": "RIMAGE"})
        gateway = live_server(application.Application(service.config, service))
        browser.get(attacker(FRAMES.format(gw=gateway)).url)
        legacy = ("/send_rimage_multiple.php", "/mkiso.php", "/mkiso_multiple.php", "/mkiso2.php")

        def answered():
            return {record.fields["path"]: record.fields["status"] for record in caplog.records
                    if getattr(record, "fields", {}).get("path") in legacy}
        wait(browser, lambda: len(answered()) == len(legacy))
        assert answered() == dict.fromkeys(legacy, 403)
        assert rimage.received_sop_uids() == set()
    finally:
        rimage.stop()
    assert service.jobs.recent() == [] and audited(service) == []
    assert not [name for name in browser.downloads.iterdir()]
