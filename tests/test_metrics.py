"""GET /metrics (SPEC §12): Prometheus' text format, moved by exactly what happened, no patient data."""

import os
import socket
import time

from prometheus_client.parser import text_string_to_metric_families

from mkiso import __version__, cache, metrics
from mkiso.http import application
from test_atna import blackhole, wait_for  # noqa: F401 (a fixture)
from test_print import FakeRimage

PHASES = ("find", "manifest", "retrieve", "transfer", "checks", "stage", "dicomdir", "digests", "size", "iso", "verify",
          "send")


def scrape(wsgi_call, app):
    """{(sample name, sorted labels): value} of one /metrics answer, and its text."""
    response = wsgi_call(app, "/metrics")
    assert response.status == 200, response.body
    assert response.header("Content-Type").startswith("text/plain; version=")  # 0.0.4, or 1.0.0 from newer libraries
    text = response.body.decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample[0], tuple(sorted(sample[1].items()))] = sample[2]
    return samples, text


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def moved(before, after):
    """The samples that changed, with how much (``_created`` timestamps aside)."""
    return {key: after[key] - before.get(key, 0) for key in after
            if not key[0].endswith("_created") and after[key] != before.get(key, 0)}


def settled(wsgi_call, app):
    """A scrape once no job runs (a streamed download's job ends just after its last byte)."""
    deadline = time.monotonic() + 10
    while True:
        samples, text = scrape(wsgi_call, app)
        if value(samples, "mkiso_jobs_running") == 0 or time.monotonic() > deadline:
            return samples, text
        time.sleep(0.05)


def cached_bytes(service):
    """What the disc cache holds, as it counts it: each entry's tree and ISO (not its digests list)."""
    root = service.path("cache")
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(root)
               for name in names if name != cache.DIGESTS)


def test_metrics_move_by_exactly_what_happened_and_name_no_patient(make_service, wsgi_call, archive, tmp_path):
    rimage = FakeRimage(str(tmp_path / "rimage"))
    try:
        service = make_service(publisher={"host": "127.0.0.1", "port": rimage.port, "ae_title": "RIMAGE"},
                               cache={"max_bytes": 10 ** 9})
        app = application.Application(service.config, service)
        before, _ = scrape(wsgi_call, app)

        download = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001")
        assert download.status == 200, download.body
        assert wsgi_call(app, "/api/iso/download", query="accession_number=NOSUCH9").status == 404
        printed = wsgi_call(app, "/api/iso/print", query="accession_number=ACC3001")
        assert printed.status == 200, printed.body
        again = wsgi_call(app, "/api/iso/download", query="accession_number=ACC2001")
        assert again.status == 200 and again.body == download.body  # from the cache
        after, text = settled(wsgi_call, app)
    finally:
        rimage.stop()

    iso_bytes = len(download.body)
    assert cached_bytes(service) >= iso_bytes * 0.9  # the disc's staged tree (and its ISO, once linked in)
    images = len(archive.sop_uids("ACC2001"))
    printed_images = len(archive.sop_uids("ACC3001"))
    phase_counts = {"find": 3, "manifest": 3, "retrieve": 2, "transfer": 2, "checks": 2, "stage": 1, "web": 1,
                    "dicomdir": 1, "digests": 2, "iso": 2, "verify": 2,
                    "send": 3}  # send: two ISOs to the client, one print; digests: the disc's, the print's;
    # iso: the first ISO laid out for its answer (which sized it: no size), then written from that layout for the cache
    changes = moved(before, after)
    elsewhere = ("mkiso_phase_seconds", "mkiso_sent_bytes_total", "mkiso_health_check_ok", "mkiso_receiver_")
    counted = {key: change for key, change in changes.items() if not key[0].startswith(elsewhere)}
    assert counted == {
        ("mkiso_jobs_total", (("action", "download"), ("state", "done"))): 2,
        ("mkiso_jobs_total", (("action", "download"), ("state", "failed"))): 1,
        ("mkiso_jobs_total", (("action", "print"), ("state", "done"))): 1,
        ("mkiso_failures_total", (("action", "download"), ("code", "study_not_found"))): 1,
        ("mkiso_images_retrieved_total", ()): images + printed_images,
        ("mkiso_cache_hits_total", ()): 1,
        ("mkiso_cache_misses_total", ()): 1,
        ("mkiso_cache_entries", ()): 1,
        ("mkiso_cache_bytes", ()): cached_bytes(service),
    }
    assert value(after, "mkiso_sent_bytes_total", to="client") == 2 * iso_bytes
    assert value(after, "mkiso_sent_bytes_total", to="publisher") > printed_images * 128
    for phase in PHASES:
        count = phase_counts.get(phase, 0)
        assert value(after, "mkiso_phase_seconds_count", phase=phase) == count, phase
        assert value(after, "mkiso_phase_seconds_bucket", phase=phase, le="+Inf") == count
        assert (value(after, "mkiso_phase_seconds_sum", phase=phase) > 0) == (count > 0), phase
    assert {key[0] for key in after if key[0].startswith("mkiso_phase_seconds_count")} == {
        "mkiso_phase_seconds_count"}
    assert set(phase_counts) == {dict(key[1])["phase"] for key in after if key[0] == "mkiso_phase_seconds_count"}

    # The states, read at the scrape.
    assert value(after, "mkiso_jobs_running") == 0 and value(after, "mkiso_jobs_queued") == 0
    assert value(after, "mkiso_cache_evictions_total") == 0
    assert value(after, "mkiso_receiver_up") == 1 and value(after, "mkiso_receiver_restarts_total") == 0
    checks = {dict(key[1])["check"]: value for key, value in after.items() if key[0] == "mkiso_health_check_ok"}
    assert set(checks) >= {"tools", "work_dir", "receiver", "pacs", "publisher", "viewer", "cache"}
    assert checks["pacs"] == 1 and checks["receiver"] == 1
    assert value(after, "mkiso_build_info", version=__version__) == 1

    # No accession number, patient name or ID, nor any UID of the studies anywhere in the text.
    for study in archive.studies:
        secrets = [study.accession, study.patient_id, study.study_uid] + study.sop_uids
        secrets += [part for part in study.patient_name.split("^") if part]
        for secret in secrets:
            assert secret not in text, secret
    assert "NOSUCH9" not in text


def test_metrics_are_open_with_auth_on(make_service, wsgi_call):
    service = make_service(auth={"enabled": True, "api_key": "k" * 32})
    app = application.Application(service.config, service)
    assert wsgi_call(app, "/metrics").status == 200
    assert wsgi_call(app, "/api/jobs").status == 401


def test_metrics_can_be_turned_off(make_service, wsgi_call):
    service = make_service(metrics={"enabled": False})
    assert wsgi_call(application.Application(service.config, service), "/metrics").status == 404


def test_each_service_counts_on_its_own_registry():
    one, two = metrics.Metrics(), metrics.Metrics()  # the library's global registry would refuse the second
    one.job_ended("download", "failed", "study_not_found")
    assert b'mkiso_jobs_total{action="download",state="failed"} 1.0' in one.exposition()
    assert b"mkiso_jobs_total{" not in two.exposition()


def lookups(wsgi_call, app, count):
    """``count`` audit events: each lookup of the desk page is a query event."""
    for _ in range(count):
        assert wsgi_call(app, "/api/studies", query="accession_numbers=ACC2001").status == 200


def test_the_audit_syslog_counts_what_it_sent(make_service, wsgi_call):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as repository:
        repository.bind(("127.0.0.1", 0))
        service = make_service(audit={"syslog": "udp://127.0.0.1:%d" % repository.getsockname()[1]})
        app = application.Application(service.config, service)
        lookups(wsgi_call, app, 3)
        assert wait_for(lambda: service.audit.syslog.state().sent == 3)
        samples, _ = scrape(wsgi_call, app)
    assert {outcome: value(samples, "mkiso_audit_syslog_events_total", outcome=outcome)
            for outcome in ("sent", "failed", "dropped")} == {"sent": 3, "failed": 0, "dropped": 0}
    assert value(samples, "mkiso_audit_syslog_queued") == 0
    assert value(samples, "mkiso_health_check_ok", check="audit_syslog") == 1


def test_audit_events_a_stuck_syslog_dropped_are_counted(make_service, wsgi_call, blackhole, monkeypatch):  # noqa: F811
    """The repository swallows the connection: one event waits in it, one in the queue (of 1), the
    others are dropped; the counters say so, and the check is down."""
    monkeypatch.setattr("mkiso.atna.QUEUE_MAX", 1)
    monkeypatch.setattr("mkiso.atna.TIMEOUT_S", 60)  # no failure while the test counts
    service = make_service(audit={"syslog": blackhole.url})
    app = application.Application(service.config, service)
    lookups(wsgi_call, app, 4)
    samples, _ = scrape(wsgi_call, app)
    dropped = service.audit.syslog.state().dropped
    assert dropped in (2, 3)  # 3: the sender took the first only after the last was queued
    counted = {outcome: value(samples, "mkiso_audit_syslog_events_total", outcome=outcome)
               for outcome in ("sent", "failed", "dropped")}
    assert counted == {"sent": 0, "failed": 0, "dropped": dropped}
    assert value(samples, "mkiso_audit_syslog_queued") == 1
    assert value(samples, "mkiso_health_check_ok", check="audit_syslog") == 0


def test_without_audit_syslog_there_are_no_syslog_counters(make_service, wsgi_call):
    service = make_service()
    samples, _ = scrape(wsgi_call, application.Application(service.config, service))
    assert not [key for key in samples if key[0].startswith("mkiso_audit_syslog")]
    assert value(samples, "mkiso_health_check_ok", check="audit_syslog") == 1
