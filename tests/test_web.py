"""Routing, request ids, errors and auth of the WSGI application."""

import json
import time
import urllib.request

import pytest

from mkiso import config as configuration
from mkiso.http import application
from mkiso.errors import UpstreamFailed


class FakeHealth:
    def __init__(self, status="ok"):
        self.status = status

    def report(self, detailed=True):
        return {"status": self.status, "version": "x", "checks": {}}


class FakeService:
    """Only what routing needs; the real service is exercised in test_health."""

    def __init__(self, status="ok"):
        self.health = FakeHealth(status)


def make_app(auth=None, status="ok"):
    raw = {"pacs": {"ae_title": "ABPACS", "host": "127.0.0.1", "port": 11112}}
    if auth:
        raw["auth"] = auth
    config = configuration.validate(raw)
    return application.Application(config, FakeService(status))


def test_unknown_path_is_json_404(wsgi_call):
    response = wsgi_call(make_app(), "/nope")
    assert response.status == 404
    assert response.header("Content-Type") == "application/json; charset=utf-8"
    body = response.json()
    assert set(body) == {"error", "code", "request_id"}
    assert body["code"] == "not_found" and "/nope" in body["error"]
    assert body["request_id"] == response.header("X-Request-ID")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_wrong_method_is_405_with_allow(wsgi_call, method):
    response = wsgi_call(make_app(), "/api/health", method=method)
    assert response.status == 405
    assert response.header("Allow") == "GET, HEAD"
    assert response.json()["code"] == "method_not_allowed"


def test_head_has_headers_but_no_body(wsgi_call):
    get = wsgi_call(make_app(), "/api/health")
    head = wsgi_call(make_app(), "/api/health", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.header("Content-Length") == get.header("Content-Length") != "0"


def test_request_id_is_echoed_when_sane(wsgi_call):
    response = wsgi_call(make_app(), "/api/health", headers={"X-Request-ID": "his-42.a_b:c"})
    assert response.header("X-Request-ID") == "his-42.a_b:c"


@pytest.mark.parametrize("given", ["", "has space", "x" * 200, "quote\"", "ünï"])
def test_insane_request_id_is_replaced(wsgi_call, given):
    response = wsgi_call(make_app(), "/nope", headers={"X-Request-ID": given})
    generated = response.header("X-Request-ID")
    assert generated != given and len(generated) == 32
    assert response.json()["request_id"] == generated


def test_generated_request_ids_differ(wsgi_call):
    ids = {wsgi_call(make_app(), "/api/health").header("X-Request-ID") for _ in range(5)}
    assert len(ids) == 5


def test_unexpected_error_is_500_without_traceback(wsgi_call, caplog):
    app = make_app()

    def broken(request):
        raise ValueError("secret internal detail")

    app.health = broken
    response = wsgi_call(app, "/api/health")
    assert response.status == 500
    body = response.json()
    assert body["code"] == "internal_error"
    assert "secret internal detail" not in response.body.decode()
    assert "Traceback" not in response.body.decode()
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and logged[0].fields["request_id"] == body["request_id"]
    assert "secret internal detail" in caplog.text


def test_service_error_keeps_its_status_and_code(wsgi_call):
    app = make_app()

    def failing(request):
        raise UpstreamFailed("The PACS refused.", code="pacs_failed")

    app.health = failing
    response = wsgi_call(app, "/api/health")
    assert response.status == 502
    assert response.json()["error"] == "The PACS refused." and response.json()["code"] == "pacs_failed"


def test_degraded_health_is_200_unless_strict(wsgi_call):
    app = make_app(status="degraded")
    assert wsgi_call(app, "/api/health").status == 200
    assert wsgi_call(app, "/api/health", query="strict=1").status == 503
    assert wsgi_call(app, "/api/health", query="strict=0").status == 200


def test_strict_must_be_0_or_1(wsgi_call):
    response = wsgi_call(make_app(), "/api/health", query="strict=maybe")
    assert response.status == 400 and "strict" in response.json()["error"]


def test_repeated_parameter_is_400(wsgi_call):
    response = wsgi_call(make_app(), "/api/health", query="strict=1&strict=0")
    assert response.status == 400 and "more than once" in response.json()["error"]


def test_health_stays_open_when_auth_is_on(wsgi_call):
    app = make_app(auth={"enabled": True, "api_key": "k3y"})
    assert wsgi_call(app, "/api/health").status == 200


def test_access_log_line(wsgi_call, caplog):
    caplog.set_level("INFO", logger="mkiso.access")
    response = wsgi_call(make_app(), "/api/health", headers={"X-Request-ID": "rid-1"})
    record = [r for r in caplog.records if r.name == "mkiso.access"][-1]
    assert record.fields["request_id"] == "rid-1"
    assert record.fields["status"] == 200 and record.fields["path"] == "/api/health"
    assert record.fields["bytes"] == int(response.header("Content-Length"))


def test_an_event_streams_access_line_has_the_bytes_it_sent_when_it_ends(make_service, live_server, caplog):
    """The stream's length is known only at its end: its line is written then, with the bytes sent (its
    line said bytes=None, written as the stream began)."""
    caplog.set_level("INFO", logger="mkiso.access")
    service = make_service()
    base = live_server(application.Application(service.config, service))
    request = urllib.request.Request(base + "/api/jobs", data=json.dumps({"accessions": ["ACC2001"]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        job = json.load(answer)
    with urllib.request.urlopen(base + job["links"]["events"], timeout=60) as stream:
        received = stream.read()
    assert received.rstrip().endswith(b"}") and b'"state": "ready"' in received
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not stream_lines(caplog):
        time.sleep(0.05)  # written when the server closes the stream, after its last byte
    [line] = stream_lines(caplog)
    assert (line["status"], line["bytes"]) == (200, len(received)) and "complete" not in line
    assert service.metrics.exposition().count(b'mkiso_phase_seconds_count{phase="send"}') == 0  # no disc was sent


def stream_lines(caplog):
    return [record.fields for record in caplog.records
            if record.name == "mkiso.access" and record.fields["path"].endswith("/events")]
