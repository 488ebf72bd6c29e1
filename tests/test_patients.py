"""The patient API names the multi-study ISO, and never costs a download."""

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mkiso import patients
from mkiso.dicom import identity
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
def started():
    """``started(Server, *args)``: a test server, closed after the test."""
    servers = []

    def start(kind, *args):
        server = kind(*args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def api_server(started):
    return lambda *script: started(PatientApiServer, script)


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
    """The API answers the good name after 3 s; with timeout_s 0.5 the PACS' name is used (had mkiso
    waited, the name would be the API's) and the timeout is not retried."""
    server = api_server((200, GOOD[1], 3))
    response = multi_download(make_service, wsgi_call, server.url, timeout_s=0.5)
    assert response.header("Content-Disposition") == PACS_NAME
    assert len(server.requests) == 1


def test_api_down_falls_back(make_service, wsgi_call):
    from mkiso import demo
    response = multi_download(make_service, wsgi_call, "http://127.0.0.1:%d/p/{accession}" % demo.free_port())
    assert response.header("Content-Disposition") == PACS_NAME


def test_an_api_naming_another_person_is_not_believed(make_service, wsgi_call, api_server, caplog):
    """The file would be called after another patient than the disc's DICOMDIR: the PACS' name then."""
    server = api_server((200, json.dumps({"patient": {"name": "OTHER^OLGA"}}), 0))
    response = multi_download(make_service, wsgi_call, server.url)
    assert response.header("Content-Disposition") == PACS_NAME
    assert "names another person than the PACS" in caplog.text and "OLGA" not in caplog.text


@pytest.mark.parametrize("api_name, pacs_name, same", [
    ("Mueller-Lüdenscheid^Jürgen", "Müller^Jürgen", True),  # the HIS's fuller name, spelled out
    ("Müller, Jürgen", "MÜLLER^JÜRGEN", True),
    ("Jane Doe", "DOE^JANE", True),
    ("Doe^John", "DOE^JANE", False),  # another given name
    ("OTHER^OLGA", "DOE^JANE", False),
    ("DOE^JANE", "", False),  # nothing to compare with: not believed
])
def test_which_api_names_stand_for_the_pacs_name(api_name, pacs_name, same):
    assert identity.same_person_name(api_name, pacs_name) is same


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


class TricklingApi:
    """A raw HTTP server on 127.0.0.1 answering every request as ``how`` says: ``body`` (the headers at
    once, then the body a byte every ``pause_s``), ``headers`` (the status line, then the headers a byte at
    a time), ``garbage`` (a status line that is not HTTP) or ``huge`` (a valid JSON answer of 2 MiB).
    It stops trickling when closed."""

    BODY = json.dumps({"patient": {"name": "Trickle^Tom", "note": "x" * 40}}).encode()

    def __init__(self, how, pause_s=0.5):
        self.how, self.pause_s = how, pause_s
        self.connections = 0
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d/patients/{accession}" % self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.connections += 1
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection):
        with connection:
            try:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += connection.recv(4096) or b"\r\n\r\n"
                body = self.BODY if self.how != "huge" else json.dumps(
                    {"patient": {"name": "Big^Ben", "note": "x" * (2 << 20)}}).encode()
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                if self.how == "garbage":
                    connection.sendall(b"SPDY/9 banana\r\n\r\n")
                elif self.how in ("body", "headers"):
                    at = 17 if self.how == "headers" else len(head)  # 17: just the status line
                    connection.sendall(head[:at])
                    for byte in (head + body)[at:]:
                        if self.closed.wait(self.pause_s):
                            return
                        connection.sendall(bytes([byte]))
                else:
                    connection.sendall(head + body)
            except OSError:
                pass  # the client shut its end: its time was up

    def close(self):
        self.closed.set()
        self.listener.close()


@pytest.fixture
def trickling(started):
    return lambda how: started(TricklingApi, how)


def name_within(api, accession, bound_s):
    """api.name(accession) in a thread: (it ended within ``bound_s``, its answer)."""
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(name=api.name(accession)), daemon=True)
    thread.start()
    thread.join(bound_s)
    return not thread.is_alive(), answer.get("name")


def settings(url, timeout_s=1, retries=2):
    return type("Settings", (), {"url": url, "name_field": "patient.name", "timeout_s": timeout_s,
                                 "retries": retries})


@pytest.mark.parametrize("trickled", ["body", "headers"])
def test_an_api_trickling_its_answer_costs_one_timeout_in_all(trickling, caplog, trickled):
    """A byte every half second keeps every single read within a 1 s timeout; the whole answer would
    take a minute.  The attempt ends at 1 s, whatever it was reading, and is not retried."""
    server = trickling(trickled)
    caplog.set_level(logging.WARNING, logger="mkiso.patients")
    ended, name = name_within(PatientApi(settings(server.url)), "ACC1", 5)
    assert ended, "the patient API held the call past its timeout_s"
    assert name is None
    assert server.connections == 1
    said = [record.getMessage() for record in caplog.records]
    assert said == ["patient API: no answer within 1s; using the PACS name"]


def test_a_trickling_api_does_not_hold_the_download(make_service, wsgi_call, trickling):
    server = trickling("body")
    response = {}
    thread = threading.Thread(target=lambda: response.update(
        answer=multi_download(make_service, wsgi_call, server.url, timeout_s=1)), daemon=True)
    thread.start()
    thread.join(20)  # the download itself and one timeout; the trickle alone lasts over 40 s
    assert not thread.is_alive(), "the download waited for the trickling patient API"
    assert response["answer"].header("Content-Disposition") == PACS_NAME


@pytest.mark.parametrize("how, said", [
    ("garbage", "patient API: the answer is not HTTP: BadStatusLine; using the PACS name"),
    ("huge", "patient API: the answer is longer than %d bytes; using the PACS name" % patients.MAX_ANSWER),
])
def test_an_answer_that_is_not_a_name_is_said_so(trickling, caplog, how, said):
    server = trickling(how)
    caplog.set_level(logging.WARNING, logger="mkiso.patients")
    assert PatientApi(settings(server.url)).name("ACC1") is None
    assert [record.getMessage() for record in caplog.records] == [said]
    assert server.connections == 1
