"""Prometheus metrics (SPEC §12), served at GET /metrics.

Health says whether the service can work now; these say how it has been
working, so that a gateway's owners see a slow PACS (in ``transfer``) or a
failing publisher before the clerks call: jobs by outcome, each phase's
duration, failures by code, the disc cache, the receiver.

Two kinds of numbers.  Events are counted as they happen (a job ends, a
phase's lap, images retrieved, bytes sent); the phases are the laps of the
very stopwatch whose fields the log lines carry.  States are read when
scraped from what the service keeps anyway (jobs running and queued, the
cache, the receiver, the audit syslog's sender, the health checks), so a scrape costs what
/api/health costs and nothing more.  Every service has a registry of its
own, not the library's global one: two services in one process (the
tests) count apart.  No label carries an accession number, a patient name
or ID, or a UID: only fixed words (action, state, phase, error code,
check name).
"""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import __version__

CONTENT_TYPE = CONTENT_TYPE_LATEST
# From a C-FIND's fraction of a second to a DVD's C-MOVE.
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self._jobs = Counter("mkiso_jobs", "Jobs ended, by action and final state.", ["action", "state"],
                             registry=self.registry)
        self._failures = Counter(
            "mkiso_failures", "Failed jobs by action and error code (timeout, incomplete_study, "
            "publisher_failed, study_not_found, ...).", ["action", "code"], registry=self.registry)
        self._phases = Histogram(
            "mkiso_phase_seconds", "Duration of each phase of a job: find, manifest, retrieve (waiting for "
            "transfer and checks), transfer, checks, stage, web, dicomdir, digests, size, iso or zip, verify "
            "(the read-back), send (the ISO or ZIP to the client, or the images to the publisher).", ["phase"],
            buckets=PHASE_BUCKETS, registry=self.registry)
        self._sent = Counter("mkiso_sent_bytes", "Bytes sent: ISOs to clients, images to the publisher.", ["to"],
                             registry=self.registry)
        self._images = Counter("mkiso_images_retrieved", "Images retrieved from the PACS and checked.",
                               registry=self.registry)
        Info("mkiso_build", "The running mkiso.", registry=self.registry).info({"version": __version__})

    def watch(self, service):
        """Read the service's state at each scrape from now on."""
        self.registry.register(_State(service))

    def phase(self, name, seconds):
        """A stopwatch's lap (``logs.Stopwatch(on_lap=...)``)."""
        self._phases.labels(name).observe(seconds)

    def job_ended(self, action, state, code=None):
        self._jobs.labels(action, state).inc()
        if state == "failed":
            self._failures.labels(action, code or "internal_error").inc()

    def sent(self, to, nbytes):
        """``to``: client (an ISO answer's bytes really sent) or publisher."""
        self._sent.labels(to).inc(nbytes)

    def retrieved(self, images):
        self._images.inc(images)

    def exposition(self):
        """The text format, as bytes."""
        return generate_latest(self.registry)


class _State:
    """The collector of what the service keeps anyway, read at each scrape."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        service = self.service
        running, queued = service.jobs.counts()
        yield _gauge("mkiso_jobs_running", "Jobs running now.", running)
        yield _gauge("mkiso_jobs_queued", "Jobs waiting for a slot.", queued)
        cache = service.cache
        entries, held = cache.stats()
        yield _gauge("mkiso_cache_bytes", "Bytes of ISOs held by the disc cache.", held)
        yield _gauge("mkiso_cache_entries", "Discs held by the disc cache.", entries)
        yield CounterMetricFamily("mkiso_cache_hits", "Discs answered from the cache.", value=cache.hits)
        yield CounterMetricFamily("mkiso_cache_misses", "Cacheable discs not in the cache.", value=cache.misses)
        yield CounterMetricFamily("mkiso_cache_evictions", "Discs dropped from the cache (size, age, room).",
                                  value=cache.evictions)
        receiver = service.receiver
        if receiver is not None:  # with pacs.retrieve: get there is none
            yield _gauge("mkiso_receiver_up", "1 while the receiver (storescp) listens.", int(receiver.listening))
            yield CounterMetricFamily("mkiso_receiver_restarts", "Times the receiver was restarted.",
                                      value=receiver.restarts)
        syslog = service.audit.syslog
        if syslog is not None:  # audit.syslog set
            state = syslog.state()
            events = CounterMetricFamily(
                "mkiso_audit_syslog_events", "Audit events for audit.syslog by outcome: sent, failed (the "
                "repository could not be reached), dropped (the queue was full, or the service stopping).",
                labels=["outcome"])
            for outcome, count in (("sent", state.sent), ("failed", state.failed), ("dropped", state.dropped)):
                events.add_metric([outcome], count)
            yield events
            yield _gauge("mkiso_audit_syslog_queued", "Audit events waiting for the syslog sender.", state.queued)
        days = GaugeMetricFamily("mkiso_tls_certificate_days_left", "Days until each TLS setting's certificate "
                                 "expires (negative: expired), as health reads it.", labels=["setting"])
        for name, left in service.health.certificate_days():
            days.add_metric([name], round(left, 2))
        yield days
        checks = GaugeMetricFamily("mkiso_health_check_ok", "1 where the health check passes (as /api/health).",
                                   labels=["check"])
        for name, check in service.health.report(detailed=False)["checks"].items():
            checks.add_metric([name], int(check["ok"]))
        yield checks


def _gauge(name, documentation, value):
    return GaugeMetricFamily(name, documentation, value=value)
