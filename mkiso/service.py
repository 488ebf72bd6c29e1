"""The running service: the pieces a request needs, wired from the config.

The server builds one Service, starts it before listening and stops it on
the way out; the web application only ever talks to it.
"""

import logging
import os
import shutil
import threading

from . import audit, config as configuration, process
from .http import delivery, health
from .dicom import pacs, receiver
from .cache import DiscCache
from .jobs import Jobs
from .metrics import Metrics
from .patients import PatientApi
from .dicom.publisher import Publisher
from .steps import Steps

log = logging.getLogger(__name__)

# Folders of the work dir that belong to mkiso; only these are ever cleaned.
INBOX = "inbox"
JOBS = "jobs"
RETRIEVALS = "retrievals"
CACHE = "cache"
FOLDERS = (INBOX, JOBS, RETRIEVALS, CACHE)
RECEIVER_PID = "receiver.pid"
HOUSEKEEPING_EVERY_S = 5
JOBS_END_S = 5  # at shutdown, for jobs whose tools were killed to write their last lines


class Service:
    def __init__(self, config):
        self.config = config
        self.work_dir = config.paths.work_dir
        self.pacs = pacs.Pacs(config)
        self.receiver = None  # with pacs.retrieve: get nothing listens
        if config.pacs.retrieve == "move":
            self.receiver = receiver.Receiver(config, self.path(INBOX), self.path(RECEIVER_PID))
        self.publisher = None  # the CD/DVD publisher's relay (SPEC §5), when one is configured
        if config.publisher.host:
            self.publisher = Publisher(config, pacs.Peer(
                "Publisher", config.publisher.ae_title, config.publisher.host, config.publisher.port,
                config.publisher.tls))
        self.audit = audit.Audit(config)
        # Behind nginx the ISOs it sends (cached ones too) must be readable by its group.
        self.cache = DiscCache(self.path(CACHE), config.cache.max_bytes, config.cache.ttl_s,
                               mode=0o640 if config.server.x_accel_prefix else 0o600)
        self.health = health.Health(config, self.receiver, self.pacs,
                                    self.publisher.peer if self.publisher else None, self.cache, self.audit.syslog)
        self.metrics = Metrics()
        self.steps = Steps(
            config, self.pacs, self.receiver, self.path(JOBS), self.path(RETRIEVALS),
            publisher=self.publisher,
            patient_api=PatientApi(config.patient_api), cache=self.cache, metrics=self.metrics,
        )
        self.jobs = Jobs(config, self.steps, self.audit, self.metrics)
        self.pending = delivery.Pending(config.limits.max_pending_bytes)  # discs still going to their readers
        self.metrics.watch(self)
        self._stopping = threading.Event()
        self._housekeeper = None

    def path(self, *parts):
        return os.path.join(self.work_dir, *parts)

    def start(self):
        """Clear a crash's leftovers, then start the audit's syslog sender and the receiver.

        The work dir itself must exist (``config.check_system``); only
        mkiso's own folders are made inside it.
        """
        self.remove_leftovers()
        for folder in FOLDERS:
            os.mkdir(self.path(folder))
        if self.config.server.x_accel_prefix:  # nginx (in our group) reads finished ISOs under jobs/
            os.chmod(self.path(JOBS), 0o750)
        for name, setting in configuration.tls_settings(self.config):
            if not setting.verify_peer:
                log.warning("%s.verify_peer is false: the peer's certificate is not checked, anyone may pose "
                            "as it (for a test peer only)", name)
        if self.audit.syslog is not None:
            self.audit.syslog.start()
        if self.receiver is not None:
            self.receiver.start()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)
        self._housekeeper.start()

    def _housekeeping(self):
        """Finished jobs and cached discs go when their time is up, requests or not."""
        while not self._stopping.wait(HOUSEKEEPING_EVERY_S):
            self.jobs.reap()
            self.cache.expire()

    def stop(self):
        """Every step of the way out, each one even when another failed (a work dir gone read-only or
        removed under us must not leave children running): a failed step is one warning."""
        self._stopping.set()
        for step in (self._stop_housekeeping, self.jobs.discard_all, self._stop_receiver, self._kill_children,
                     self._let_jobs_end, self._stop_syslog, self.remove_leftovers, self._remove_tunnel_config):
            try:
                step()
            except Exception as exc:
                log.warning("shutdown: %s failed: %s", step.__name__.strip("_").replace("_", " "), exc)

    def _stop_housekeeping(self):
        if self._housekeeper is not None:
            self._housekeeper.join(5)

    def _stop_syslog(self):
        """After the jobs (their last audit events), with a short flush: the audit file has them all."""
        if self.audit.syslog is not None:
            self.audit.syslog.stop()

    def _remove_tunnel_config(self):
        if self.pacs.tunnel is not None:
            self.pacs.tunnel.remove_config()

    def _stop_receiver(self):
        if self.receiver is not None:
            self.receiver.stop()

    def _let_jobs_end(self):
        """Their tools killed, the jobs still running end within moments: let them write their audit
        outcome (a print or download stopped by the shutdown) before the process exits under them."""
        running = self.jobs.wait_ended(JOBS_END_S)
        if running:
            log.warning("%d jobs had not ended %d s after their tools were killed", running, JOBS_END_S)

    def _kill_children(self):
        killed = process.kill_all()
        if killed:
            log.warning("killed %d child processes still running at shutdown", killed)

    def remove_leftovers(self):
        for folder in FOLDERS:
            shutil.rmtree(self.path(folder), ignore_errors=True)
