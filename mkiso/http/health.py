"""The health report of ``/api/health`` (SPEC §2).

Each check really exercises what it names: the tools are run, the work dir
is written to, the PACS and publisher get a C-ECHO, the PACS an empty C-FIND
too (``check_pacs``), nginx's user must be able to read the discs handed to
it (``check_nginx``).  The two echoes run at
the same time so a silent peer costs one timeout, not two.

The audit's syslog copy is checked by what its sender did: a repository
that lost events (failed, or dropped from a full queue) within RECENT_S
degrades health, so that a monitor polling now and then still sees it.

The costly checks (the tools and the C-ECHOs) are computed at most once per
EXPENSIVE_EVERY_S and shared by every caller meanwhile, so that a flood of
health calls costs one round of them.  The detail strings name paths, ports
and AE titles: with auth on, a caller without the key sees only ok/not ok.
"""

import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .. import __version__, config as configuration, disk, process
from ..dicom import pacs, tls

EXPENSIVE_EVERY_S = 5
RECENT_S = 900  # the audit syslog check stays degraded this long after an event was lost


class Check:
    def __init__(self, ok, detail, state=None):
        self.ok = ok
        self.detail = detail
        self.state = state  # where "not ok" has degrees (the TLS certificates): degraded or failed

    def as_dict(self):
        shown = {"ok": self.ok, "detail": self.detail}
        if self.state is not None:
            shown["state"] = self.state
        return shown


class Health:
    def __init__(self, config, receiver, pacs_client, publisher_peer, cache, syslog=None):
        self.config = config
        self.syslog = syslog  # atna.Syslog, or None: audit.syslog not set
        self.cache = cache
        self.receiver = receiver
        self.pacs = pacs_client
        self.publisher_peer = publisher_peer  # None: no publisher configured
        # (setting's name, its certificate file, the setting) of each TLS setting that is on
        self.certificates = [(name, tls.CertificateFile(setting.certificate), setting)
                             for name, setting in configuration.tls_settings(config)]
        self._expensive = None  # (when, {name: Check})
        self._expensive_lock = threading.Lock()

    def report(self, detailed=True):
        """{"status": "ok"|"degraded", "version": ..., "checks": {...}}; without ``detailed``
        only the status and each check's ok."""
        expensive = self.expensive_checks()
        checks = {
            "tools": expensive["tools"],
            "work_dir": self.check_work_dir(),
            "receiver": self.check_receiver(),
            "pacs": expensive["pacs"],
            "publisher": expensive["publisher"],
            "viewer": self.check_viewer(),
            "nginx": self.check_nginx(),
            "cache": self.check_cache(),
            "audit_syslog": self.check_audit_syslog(),
            "tls": self.check_tls(),
        }
        status = "ok" if all(check.ok for check in checks.values()) else "degraded"
        if not detailed:
            return {"status": status, "checks": {name: {"ok": check.ok} for name, check in checks.items()}}
        return {
            "status": status,
            "version": __version__,
            "checks": {name: check.as_dict() for name, check in checks.items()},
        }

    def expensive_checks(self):
        """The tools and the C-ECHOs, at most once per EXPENSIVE_EVERY_S; concurrent callers wait and share."""
        with self._expensive_lock:
            if self._expensive is None or time.monotonic() - self._expensive[0] >= EXPENSIVE_EVERY_S:
                with ThreadPoolExecutor(2) as pool:
                    pacs_echo = pool.submit(self.check_pacs)
                    publisher_echo = pool.submit(self.check_publisher)
                    checks = {"tools": self.check_tools(), "pacs": pacs_echo.result(),
                              "publisher": publisher_echo.result()}
                self._expensive = (time.monotonic(), checks)
            return self._expensive[1]

    def check_tools(self):
        """Each tool run as jobs run it (through setpriv): a sandbox that refuses
        them is named once, with the tools it stops."""
        broken = []
        failing = {}  # why: [tool]
        paths = configuration.tool_paths(self.config)
        for path in paths:
            try:
                result = process.run([path, "--version"], timeout=10)
            except (process.ToolMissing, process.ToolTimeout) as exc:
                broken.append(str(exc))
                continue
            if result.returncode != 0:
                why = process.refusal(result.output) or "--version exited with %d" % result.returncode
                failing.setdefault(why, []).append(os.path.basename(path))
        broken += ["%s cannot run: %s" % (", ".join(tools), why) for why, tools in failing.items()]
        if broken:
            return Check(False, "; ".join(broken))
        return Check(True, "%d tools found and runnable" % len(paths))

    def check_work_dir(self):
        work_dir = self.config.paths.work_dir
        try:
            with tempfile.TemporaryFile(dir=work_dir):
                pass
            free = disk.free_bytes(work_dir)
        except OSError as exc:
            return Check(False, "%s is not writable: %s" % (work_dir, exc.strerror))
        minimum = self.config.limits.min_free_bytes
        if free < minimum:
            return Check(False, "%s has %d bytes free, below limits.min_free_bytes %d" % (work_dir, free, minimum))
        return Check(True, "%s writable, %d bytes free" % (work_dir, free))

    def check_receiver(self):
        receiver = self.receiver
        if receiver is None:
            return Check(True, "not used (pacs.retrieve: get)")
        if receiver.paused:
            return Check(False, "storescp " + receiver.paused)
        if receiver.refused and not receiver.listening:
            return Check(False, "storescp cannot run: " + receiver.refused)
        if receiver.listening:
            secure = (", TLS only (%d associations in the clear refused)" % receiver.plain_refused
                      if receiver.tls else "")
            return Check(
                True,
                "listening on port %d as %s%s, %d of %d associations running (restarts: %d)"
                % (receiver.port, receiver.ae_title, secure, receiver.associations, receiver.max_associations,
                   receiver.restarts),
            )
        detail = "not listening on port %d (restarts: %d)" % (receiver.port, receiver.restarts)
        if receiver.last_error:
            detail += "; last error: " + receiver.last_error
        return Check(False, detail)

    def check_pacs(self):
        """C-ECHO, then an empty C-FIND, then what the last C-MOVE could not deliver.

        Each shows what the one before cannot: a PACS may answer anyone's
        C-ECHO and turn away the C-FIND of an AE title it does not know
        (Orthanc does), and one that answers both may still not know, or
        not reach, our receiver; that shows only when a C-MOVE fails, and
        stays here until one succeeds (``Pacs.check_delivery``).
        """
        ok, echoed = self.pacs.echo()
        if not ok:
            return Check(False, echoed)
        ok, found = self.pacs.query()
        if not ok:
            return Check(False, "%s, but %s" % (echoed, found))
        fault = self.pacs.delivery_fault
        if fault is not None:
            return Check(False, "%s, %s, but the last C-MOVE (%d s ago) failed: %s" % (
                echoed, found, time.monotonic() - fault[0], fault[1]))
        return Check(True, "%s, %s" % (echoed, found))

    def check_publisher(self):
        if self.publisher_peer is None:
            return Check(True, "not configured")
        return Check(*pacs.echo(
            os.path.join(self.config.tools.dcmtk_dir, "echoscu"),
            self.config.receiver.ae_title, self.publisher_peer, self.config.timeouts.find_s,
        ))

    def certificate_days(self):
        """(setting's name, days its certificate has left: negative once expired) of each readable one."""
        days = []
        for name, certificate, _ in self.certificates:
            read, _ = certificate.current()
            if read is not None:
                days.append((name, read.days_left()))
        return days

    def check_tls(self):
        """Each TLS setting's certificate: failed when it cannot be read or used now (expired, not yet
        valid), degraded when it expires within tls.EXPIRY_WARNING_DAYS; and a verify_peer: false, which
        is for a test peer only, is said every time."""
        if not self.certificates:
            return Check(True, "not used")
        failed, degraded, fine = [], [], []
        for name, certificate, setting in self.certificates:
            read, unreadable = certificate.current()
            problem = unreadable or read.problem()
            if problem:
                failed.append("%s: %s" % (name, problem))
            else:
                said = "%s: %s expires in %d days (%s)" % (name, certificate.path, read.days_left(),
                                                          time.strftime("%Y-%m-%d", time.gmtime(read.not_after)))
                if read.days_left() < tls.EXPIRY_WARNING_DAYS:
                    degraded.append(said + ": renew it")
                else:
                    fine.append(said)
            if not setting.verify_peer:
                degraded.append("%s.verify_peer is false: the peer's certificate is not checked (for a test "
                                "peer only)" % name)
        detail = "; ".join(failed + degraded + fine)
        if failed:
            return Check(False, detail, "failed")
        if degraded:
            return Check(False, detail, "degraded")
        return Check(True, detail, "ok")

    def check_cache(self):
        if not self.cache.enabled:
            return Check(True, "off (cache.max_bytes: 0)")
        entries, size = self.cache.stats()
        return Check(True, "%d discs, %d bytes of %d" % (entries, size, self.cache.max_bytes))

    def check_audit_syslog(self):
        if self.syslog is None:
            return Check(True, "not configured")
        state = self.syslog.state()
        detail = "%s: %d sent, %d failed, %d dropped, %d queued" % (
            self.syslog.url, state.sent, state.failed, state.dropped, state.queued)
        if not state.running:
            return Check(False, detail + "; the sender is not running")
        if state.lost_at is not None and time.monotonic() - state.lost_at < RECENT_S:
            return Check(False, "%s; last lost %d s ago (%s)" % (
                detail, time.monotonic() - state.lost_at, state.lost_why))
        return Check(True, detail)

    def check_nginx(self):
        """Behind nginx (server.x_accel_prefix), whether nginx's user may read the discs handed to it:
        before "adduser www-data mkiso" nginx answered 403 to every download.  The same check as
        ``--check-config``'s, here as the service runs (its own group is the discs')."""
        if not self.config.server.x_accel_prefix:
            return Check(True, "not used (server.x_accel_prefix not set)")
        problem = configuration.nginx_cannot_read(self.config)
        if problem:
            return Check(False, problem)
        return Check(True, "nginx's user %s can read the discs in %s" % (
            configuration.nginx_user(), self.config.paths.work_dir))

    def check_viewer(self):
        viewer_dir = self.config.iso.viewer_dir
        if not viewer_dir:
            return Check(True, "not configured")
        if not os.path.isdir(viewer_dir):
            return Check(False, "viewer folder %s is missing" % viewer_dir)
        return Check(True, "%s present, %d entries" % (viewer_dir, len(os.listdir(viewer_dir))))
