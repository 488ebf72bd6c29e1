"""The patient API names the multi-study ISO, and never costs a download."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mkiso.http import application
from mkiso.patients import PatientApi

PACS_NAME = "attachment; filename=\"MULLER_JURGEN.iso\"; filename*=UTF-8''M%C3%BCller_J%C3%BCrgen.iso"
API_NAME = "attachment; filename=\"MUELLER-LUDENSCHEID_JURGEN.iso\"; " \
           "filename*=UTF-8''Mueller-L%C3%BCdenscheid_J%C3%BCrgen.iso"
QUERY = "accession_numbers=MR.180505.026,ACC1002"


class PatientApiServer:
    """A local HTTP JSON service answering from a script of (status, body, delay)."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                status, body, delay = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                time.sleep(delay)
                data = body.encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (the timeout case)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.block_on_close = False  # do not wait for the handler the client gave up on
        self.url = "http://127.0.0.1:%d/patients/{accession}" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


GOOD = (200, json.dumps({"patient": {"name": "Mueller-Lüdenscheid^Jürgen"}}), 0)


@pytest.fixture
def api_server():
    servers = []

    def start(*script):
        server = PatientApiServer(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def multi_download(make_service, wsgi_call, url, timeout_s=2):
    service = make_service(patient_api={"url": url, "name_field": "patient.name", "timeout_s": timeout_s,
                                        "retries": 2})
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download-multiple", query=QUERY)
    assert response.status == 200, response.body
    return response


def test_api_name_is_used(make_service, wsgi_call, api_server):
    server = api_server(GOOD)
    response = multi_download(make_service, wsgi_call, server.url)
    assert response.header("Content-Disposition") == API_NAME
    assert server.requests == ["/patients/MR.180505.026"]


def test_500_then_200_is_retried(make_service, wsgi_call, api_server):
    server = api_server((500, "{}", 0), GOOD)
    response = multi_download(make_service, wsgi_call, server.url)
    assert response.header("Content-Disposition") == API_NAME
    assert len(server.requests) == 2


@pytest.mark.parametrize("script, requests", [
    ([(500, "{}", 0)], 3),                                    # always 500: 1 + 2 retries, then the PACS name
    ([(404, "{}", 0)], 1),                                    # 4xx: not retried
    ([(200, "this is not json", 0)], 1),
    ([(200, json.dumps({"patient": {}}), 0)], 1),             # the field is missing
    ([(200, json.dumps({"patient": {"name": ""}}), 0)], 1),   # empty
    ([(200, json.dumps(["a", "list"]), 0)], 1),
    ([(200, json.dumps({"patient": {"name": 42}}), 0)], 1),
])
def test_bad_answers_fall_back_to_the_pacs_name(make_service, wsgi_call, api_server, caplog, script, requests):
    server = api_server(*script)
    response = multi_download(make_service, wsgi_call, server.url)
    assert response.header("Content-Disposition") == PACS_NAME
    assert len(server.requests) == requests
    warnings = [r for r in caplog.records if r.name == "mkiso.patients"]
    assert warnings and warnings[0].levelname == "WARNING"
    assert "Müller" not in caplog.text and "PAT-1001" not in caplog.text


def test_slow_api_falls_back_after_one_timeout(make_service, wsgi_call, api_server):
    server = api_server((200, GOOD[1], 3))
    started = time.monotonic()
    response = multi_download(make_service, wsgi_call, server.url, timeout_s=0.5)
    assert response.header("Content-Disposition") == PACS_NAME
    assert len(server.requests) == 1
    assert time.monotonic() - started < 3


def test_api_down_falls_back(make_service, wsgi_call):
    from mkiso import demo
    response = multi_download(make_service, wsgi_call, "http://127.0.0.1:%d/p/{accession}" % demo.free_port())
    assert response.header("Content-Disposition") == PACS_NAME


def test_api_off_uses_the_pacs_name(make_service, wsgi_call):
    response = multi_download(make_service, wsgi_call, "")
    assert response.header("Content-Disposition") == PACS_NAME


def test_single_download_keeps_the_accession_name(make_service, wsgi_call, api_server):
    server = api_server(GOOD)
    service = make_service(patient_api={"url": server.url, "name_field": "patient.name"})
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=ACC2001")
    assert 'filename="ACC2001.iso"' in response.header("Content-Disposition")
    assert server.requests == []


def test_accession_is_quoted_into_the_url(api_server):
    server = api_server(GOOD)
    settings = type("Settings", (), {"url": server.url, "name_field": "patient.name", "timeout_s": 2, "retries": 0})
    assert PatientApi(settings).name("A B/C") == "Mueller-Lüdenscheid^Jürgen"
    assert server.requests == ["/patients/A%20B%2FC"]
