"""The storage receiver: one supervised ``storescp`` on the port the PACS knows.

A PACS maps our AE title to one fixed host:port, so every C-MOVE of every
job lands here.  storescp sorts what it receives into one folder per Study
Instance UID (``-su``); a job asks for its study to be *expected* before its
C-MOVE and *collects* the folder (an atomic rename) afterwards.  Folders
that nobody expects are swept away once they are old.

``--fork`` gives every association a fresh child.  In single-process mode
storescp remembers the last study folder it wrote to, and a second move of
the same study after that folder was collected fails with write errors.
"""

import logging
import os
import shutil
import subprocess
import threading
import time

from . import process

log = logging.getLogger(__name__)

PREFIX = "STUDY"
SWEEP_EVERY_S = 60
UNCLAIMED_MAX_AGE_S = 300
RESTART_DELAY_S = (0.5, 1, 2, 5, 10)
STABLE_AFTER_S = 30


class Receiver:
    def __init__(self, config, inbox_dir):
        self.ae_title = config.receiver.ae_title
        self.port = config.receiver.port
        self.tool = os.path.join(config.tools.dcmtk_dir, "storescp")
        self.inbox = inbox_dir
        self.restarts = 0
        self.last_error = ""
        self._proc = None
        self._spawned_at = 0.0
        self._expected = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor = None

    # -- life cycle -------------------------------------------------------

    def start(self):
        os.makedirs(self.inbox, exist_ok=True)
        self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, name="receiver-supervisor", daemon=True)
        self._supervisor.start()

    def stop(self):
        self._stopping.set()
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            process.kill_group(proc)
        if self._supervisor is not None:
            self._supervisor.join(5)

    @property
    def running(self):
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def pid(self):
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def listening(self):
        """storescp is alive and its port is in LISTEN state (no connection made to check)."""
        return self.running and self.port in listening_ports()

    def wait_ready(self, timeout=10):
        """Wait until storescp listens; False if it never did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.listening:
                return True
            time.sleep(0.05)
        return False

    def _command(self):
        return [
            self.tool, "--fork", "-aet", self.ae_title, "-od", self.inbox, "-su", PREFIX,
            "+xa", "-dhl", "-ta", "30", "-ts", "600", str(self.port),
        ]

    def _spawn(self):
        proc = process.start(self._command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._relay_output, args=(proc,), name="receiver-output", daemon=True).start()
        with self._lock:
            self._proc = proc
            self._spawned_at = time.monotonic()
        log.info("receiver started", extra={"fields": {"pid": proc.pid, "port": self.port, "ae": self.ae_title}})

    def _relay_output(self, proc):
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line[:2] in ("E:", "F:"):
                self.last_error = line[2:].strip()
                log.warning("receiver: %s", self.last_error)
            else:
                log.debug("receiver: %s", line)
        proc.stdout.close()

    def _supervise(self):
        failures = 0
        next_sweep = time.monotonic() + SWEEP_EVERY_S
        while not self._stopping.wait(0.5):
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                process.forget(proc)
                if time.monotonic() - self._spawned_at > STABLE_AFTER_S:
                    failures = 0
                delay = RESTART_DELAY_S[min(failures, len(RESTART_DELAY_S) - 1)]
                log.warning(
                    "receiver exited; restarting",
                    extra={"fields": {"returncode": proc.returncode, "delay_s": delay}},
                )
                failures += 1
                if self._stopping.wait(delay):
                    break
                self.restarts += 1
                self._spawn()
            if time.monotonic() >= next_sweep:
                self.sweep()
                next_sweep = time.monotonic() + SWEEP_EVERY_S

    # -- study folders ----------------------------------------------------

    def study_dir(self, study_uid):
        return os.path.join(self.inbox, "%s_%s" % (PREFIX, study_uid))

    def expect(self, study_uid):
        """Announce a C-MOVE for this study; stale files of it are dropped."""
        with self._lock:
            self._expected.add(study_uid)
        shutil.rmtree(self.study_dir(study_uid), ignore_errors=True)

    def collect(self, study_uid, target):
        """Move what arrived for the study to ``target`` (same file system)."""
        try:
            os.rename(self.study_dir(study_uid), target)
        except FileNotFoundError:
            os.mkdir(target)
        finally:
            with self._lock:
                self._expected.discard(study_uid)

    def forget(self, study_uid):
        """Give up on an expected study and drop whatever arrived for it."""
        with self._lock:
            self._expected.discard(study_uid)
        shutil.rmtree(self.study_dir(study_uid), ignore_errors=True)

    def sweep(self, max_age=UNCLAIMED_MAX_AGE_S):
        """Remove what arrived unasked and has lain here longer than max_age."""
        now = time.time()
        with self._lock:
            expected = {self.study_dir(uid) for uid in self._expected}
        removed = 0
        for entry in os.scandir(self.inbox):
            if entry.path in expected:
                continue
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime < max_age:
                    continue
            except FileNotFoundError:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed += 1
        if removed:
            log.warning("receiver: removed %d unrequested deliveries", removed)
        return removed


def listening_ports():
    """The local TCP ports in LISTEN state, from /proc/net/tcp and tcp6.

    Read rather than probed: a test connection would make storescp fork a
    child that logs an aborted association.
    """
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    if fields[3] == "0A":  # TCP_LISTEN
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports
