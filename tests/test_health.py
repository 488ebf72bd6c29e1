"""The health report against a real dcmqrscp and a real receiver."""

import grp
import json
import os
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mkiso import config as configuration, demo, process
from mkiso.http import application, health
from mkiso.service import Service
from conftest import write_config
from test_atna import blackhole, wait_for  # noqa: F401 (a fixture)
from test_concurrency import fetch

CHECKS = ("tools", "work_dir", "receiver", "pacs", "publisher", "viewer", "nginx", "cache", "audit_syslog", "tls")


def test_all_ok_against_the_real_pacs(make_service, wsgi_call):
    service = make_service()
    response = wsgi_call(application.Application(service.config, service), "/api/health", query="strict=1")
    body = response.json()
    assert response.status == 200, body
    assert body["status"] == "ok"
    assert set(body["checks"]) == set(CHECKS)
    assert all(check["ok"] for check in body["checks"].values())
    assert "C-ECHO" in body["checks"]["pacs"]["detail"]
    assert body["checks"]["publisher"]["detail"] == "not configured"
    assert "listening on port %d" % service.config.receiver.port in body["checks"]["receiver"]["detail"]
    assert body["checks"]["audit_syslog"]["detail"] == "not configured"
    assert body["checks"]["nginx"]["detail"] == "not used (server.x_accel_prefix not set)"


def test_pacs_down_is_degraded_and_strict_503(make_service, settings, wsgi_call):
    settings["pacs"]["port"] = demo.free_port()  # nothing listens there
    service = make_service()
    app = application.Application(service.config, service)
    response = wsgi_call(app, "/api/health")
    body = response.json()
    assert response.status == 200 and body["status"] == "degraded"
    assert body["checks"]["pacs"]["ok"] is False
    assert "Connection refused" in body["checks"]["pacs"]["detail"]
    assert wsgi_call(app, "/api/health", query="strict=1").status == 503


def test_silent_pacs_fails_within_timeout(make_service, settings, silent_pacs, wsgi_call):
    settings["timeouts"]["find_s"] = 2
    service = make_service()
    body = wsgi_call(application.Application(service.config, service), "/api/health").json()
    assert body["checks"]["pacs"]["ok"] is False


def test_wrong_tool_path_is_degraded(make_service, settings, wsgi_call, tmp_path):
    settings["tools"]["genisoimage"] = str(tmp_path / "no-genisoimage")
    service = make_service()
    app = application.Application(service.config, service)
    body = wsgi_call(app, "/api/health").json()
    assert body["checks"]["tools"]["ok"] is False
    assert "no-genisoimage" in body["checks"]["tools"]["detail"]
    assert wsgi_call(app, "/api/health", query="strict=1").status == 503


def test_publisher_configured_but_down(make_service, wsgi_call):
    service = make_service(publisher={"host": "127.0.0.1", "port": demo.free_port()})
    body = wsgi_call(application.Application(service.config, service), "/api/health").json()
    assert body["checks"]["publisher"]["ok"] is False
    assert body["status"] == "degraded"


def test_viewer_missing_is_degraded(make_service, tmp_path, wsgi_call):
    service = make_service(iso={"viewer_dir": str(tmp_path / "no-viewer")})
    body = wsgi_call(application.Application(service.config, service), "/api/health").json()
    assert body["checks"]["viewer"] == {"ok": False, "detail": "viewer folder %s is missing" % (tmp_path / "no-viewer")}


def test_work_dir_below_free_space_limit(make_service, wsgi_call):
    service = make_service(limits={"min_free_bytes": 10 ** 18})
    body = wsgi_call(application.Application(service.config, service), "/api/health").json()
    assert body["checks"]["work_dir"]["ok"] is False
    assert "below limits.min_free_bytes" in body["checks"]["work_dir"]["detail"]


def test_receiver_port_taken_is_reported(settings, silent_listener, wsgi_call):
    settings["receiver"]["port"] = silent_listener.getsockname()[1]  # someone else holds it
    service = Service(configuration.load(write_config(settings["paths"]["work_dir"] + ".yaml", settings)))
    service.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "Address already in use" not in service.receiver.last_error:
            time.sleep(0.05)
        body = wsgi_call(application.Application(service.config, service), "/api/health").json()
    finally:
        service.stop()
    assert body["checks"]["receiver"]["ok"] is False
    assert "Address already in use" in body["checks"]["receiver"]["detail"]


def test_a_flood_of_health_calls_runs_the_costly_checks_once(make_service, wsgi_call, monkeypatch):
    service = make_service()
    app = application.Application(service.config, service)
    counts = {"tools": 0, "pacs": 0}
    for name, method in (("tools", "check_tools"), ("pacs", "check_pacs")):
        real = getattr(service.health, method)

        def counted(real=real, name=name):
            counts[name] += 1
            return real()

        monkeypatch.setattr(service.health, method, counted)
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda _: wsgi_call(app, "/api/health"), range(200)))
    assert {answer.status for answer in answers} == {200}
    assert {answer.json()["status"] for answer in answers} == {"ok"}
    assert 1 <= counts["tools"] <= 2 and 1 <= counts["pacs"] <= 2, counts  # 2: a call straddling the 5 s mark


def test_with_auth_on_health_tells_a_stranger_only_ok_or_not(make_service, wsgi_call):
    service = make_service(auth={"enabled": True, "api_key": "s3cret"})
    app = application.Application(service.config, service)
    stranger = wsgi_call(app, "/api/health")
    assert stranger.status == 200
    assert stranger.json() == {"status": "ok", "checks": {name: {"ok": True} for name in CHECKS}}
    for secret in (service.config.paths.work_dir, str(service.config.receiver.port), "CDRECORD", "ABPACS"):
        assert secret.encode() not in stranger.body
    insider = wsgi_call(app, "/api/health", headers={"X-API-Key": "s3cret"}).json()
    assert insider["version"] and all(check["detail"] for check in insider["checks"].values())
    assert wsgi_call(app, "/api/health", headers={"X-API-Key": "wrong"}).json() == stranger.json()


REFUSED_SETPRIV = """#!/bin/sh
# util-linux's setpriv under SystemCallFilter=~@privileged: capset is refused (EPERM)
echo "setpriv: activate capabilities: Operation not permitted" >&2
exit 127
"""


def test_a_sandbox_that_refuses_setpriv_is_named_not_a_restart_loop(settings, tmp_path, monkeypatch, wsgi_call):
    """Every tool runs through setpriv; a sandbox refusing its capset stops them all. Health names
    the refused call for the tools and the receiver, the log says it, and the watchdog is not starved
    (a restart of the service would meet the same sandbox)."""
    fake = tmp_path / "setpriv"
    fake.write_text(REFUSED_SETPRIV)
    fake.chmod(0o755)
    monkeypatch.setattr(process, "SETPRIV", str(fake))
    config = configuration.load(write_config(tmp_path / "config.yaml", settings))
    service = Service(config)
    service.start()
    try:
        deadline = time.monotonic() + 10
        while not service.receiver.refused and time.monotonic() < deadline:
            time.sleep(0.1)
        body = wsgi_call(application.Application(config, service), "/api/health").json()
        sentence = "setpriv was refused capset by the service's sandbox"
        assert body["checks"]["receiver"]["ok"] is False
        assert body["checks"]["receiver"]["detail"].startswith("storescp cannot run: " + sentence)
        tools = body["checks"]["tools"]
        assert tools["ok"] is False and tools["detail"].count(sentence) == 1, tools
        assert "findscu, movescu" in tools["detail"] and "genisoimage" in tools["detail"]
        time.sleep(1.5)  # down for a while, yet not "down against its will": systemd would not help
        assert service.receiver.down_seconds() == 0
        answer = wsgi_call(application.Application(config, service), "/api/iso/download",
                           query="accession_number=ACC2001")
        assert answer.status >= 500 and sentence in answer.json()["error"], answer.body[:300]
    finally:
        service.stop()


def test_a_blackholed_audit_repository_holds_no_answer_and_shows_in_health(
        make_service, live_server, blackhole, monkeypatch):  # noqa: F811
    """A synchronous download's audit event is recorded when its body closes, in the server's loop
    thread; the repository swallows the syslog connection. Every answer meanwhile comes at once (it
    was held for the connect timeout, about 5 s), and once the connect has timed out health says so."""
    monkeypatch.setattr(health, "EXPENSIVE_EVERY_S", 3600)  # the C-ECHOs once, before the clock matters
    service = make_service(audit={"syslog": blackhole.url})
    base = live_server(application.Application(service.config, service))
    assert fetch(base + "/api/health")[0] == 200
    status, _, body = fetch(base + "/api/iso/download?accession_number=ACC2001")
    assert status == 200, body[:300]
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # each answer within a second while the sender is stuck
        try:
            status, _, body = fetch(base + "/api/health", timeout=1)
        except socket.timeout:
            raise AssertionError("health did not answer within 1 s while the audit syslog was stuck")
        assert status == 200
    state = service.audit.syslog.state()
    assert (state.sent, state.failed, state.queued) == (0, 0, 0)  # the event is in the stuck connect
    assert wait_for(lambda: service.audit.syslog.state().failed == 1)
    report = json.loads(fetch(base + "/api/health")[2])
    assert report["status"] == "degraded"
    assert report["checks"]["audit_syslog"]["ok"] is False
    assert report["checks"]["audit_syslog"]["detail"].startswith(
        "%s: 0 sent, 1 failed, 0 dropped, 0 queued; last lost " % blackhole.url)
    assert report["checks"]["audit_syslog"]["detail"].endswith(" s ago (failed: timed out)")


def test_events_dropped_from_a_full_queue_show_in_health(make_service, wsgi_call, blackhole, monkeypatch):  # noqa: F811
    monkeypatch.setattr("mkiso.atna.QUEUE_MAX", 1)
    monkeypatch.setattr("mkiso.atna.TIMEOUT_S", 60)  # no failure while the test counts
    service = make_service(audit={"syslog": blackhole.url})
    app = application.Application(service.config, service)
    for _ in range(4):  # each lookup is a query event: one in the stuck connect, one queued, the rest dropped
        assert wsgi_call(app, "/api/studies", query="accession_numbers=ACC2001").status == 200
    check = wsgi_call(app, "/api/health").json()["checks"]["audit_syslog"]
    dropped = service.audit.syslog.state().dropped
    assert dropped in (2, 3)  # 3: the sender took the first only after the last was queued
    assert check["ok"] is False
    assert check["detail"].startswith("%s: 0 sent, 0 failed, %d dropped, 1 queued; last lost " % (
        blackhole.url, dropped))
    assert check["detail"].endswith(" s ago (dropped: the queue is full (1 waiting))")
    assert wsgi_call(app, "/api/health", query="strict=1").status == 503


@pytest.fixture
def open_folder():
    """A folder others may enter (not under pytest's 0700 ones), removed after the service has stopped."""
    base = tempfile.mkdtemp(prefix="mkiso-test-")
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the work dir's group is changed")
def test_health_says_when_nginx_cannot_read_the_discs(open_folder, make_service, wsgi_call, tmp_path, monkeypatch):
    """Behind nginx (X-Accel) before "adduser www-data mkiso" nginx answered 403 to every download while
    health said ok.  Now health names the missing membership and its fix, and is ok once it is mended."""
    conf = tmp_path / "nginx.conf"
    conf.write_text("user www-data;\n")
    monkeypatch.setattr(configuration, "NGINX_CONF", str(conf))
    work = os.path.join(open_folder, "work")
    os.mkdir(work, 0o750)
    service = make_service(paths={"work_dir": work}, server={"x_accel_prefix": "/internal/mkiso/"})
    app = application.Application(service.config, service)
    check = wsgi_call(app, "/api/health").json()["checks"]["nginx"]
    assert check == {"ok": False, "detail": (
        "nginx's user www-data is not in the group root, which alone may read the discs in %s: run "
        "\"adduser www-data root\", then \"systemctl restart nginx\"" % work)}
    os.chown(work, -1, grp.getgrnam("www-data").gr_gid)
    os.chmod(work, 0o2750)  # the discs get a group nginx is in
    response = wsgi_call(app, "/api/health", query="strict=1")
    assert response.status == 200, response.body
    assert response.json()["checks"]["nginx"] == {
        "ok": True, "detail": "nginx's user www-data can read the discs in %s" % work}
