"""The storage receiver: one supervised ``storescp`` on the port the PACS knows.

A PACS maps our AE title to one fixed host:port, so every C-MOVE of every
job lands here.  storescp sorts what it receives into one folder per Study
Instance UID (``-su``); a job asks for its study to be *expected* before its
C-MOVE and *collects* the folder (an atomic rename) afterwards.

The port is an open door: any host may send anything to it (SPEC §3.7).
So nothing here is trusted, and the receiver is kept from doing harm:
- ``+uf``: every received object gets a unique file name, so nothing that
  arrives can overwrite an image already received; a second copy of an
  image is a second file, which the job's manifest check refuses.
- Deliveries for studies that no job expects are removed within a second or
  two by the supervisor's sweep.
- While the work dir has less than ``limits.min_free_bytes`` free, storescp
  is stopped (health says why) and started again once space is back.
- A receiver left running by a crashed server (its process group is
  recorded in ``receiver.pid`` in the work dir) is killed before ours starts.

``--fork`` gives every association a fresh child.  In single-process mode
storescp remembers the last study folder it wrote to, and a second move of
the same study after that folder was collected fails with write errors.
``--fork`` has no limit of its own: 200 idle connections made 201
processes for 45 s.  So the supervisor keeps at most
``receiver.max_associations`` children: beyond that, each tick (half a
second) the children that have received nothing yet go first, then the
youngest, each killed (its connection closes).  A PACS opens one
association per C-MOVE, and its first bytes arrive within milliseconds.
"""

import logging
import os
import shutil
import signal
import subprocess
import threading
import time

from .. import disk, process

log = logging.getLogger(__name__)

PREFIX = "STUDY"
SUPERVISE_EVERY_S = 0.5
SWEEP_EVERY_S = 1.0
RESTART_DELAY_S = (0.5, 1, 2, 5, 10)
STABLE_AFTER_S = 30
LEFTOVER_WAIT_S = 5


class Receiver:
    def __init__(self, config, inbox_dir, pid_file):
        self.ae_title = config.receiver.ae_title
        self.port = config.receiver.port
        self.tool = os.path.join(config.tools.dcmtk_dir, "storescp")
        self.min_free_bytes = config.limits.min_free_bytes
        self.max_associations = config.receiver.max_associations
        self.cut_associations = 0  # children killed for the limit, for health
        self.inbox = inbox_dir
        self.pid_file = pid_file
        self.restarts = 0
        self.last_error = ""
        self.write_failures = 0
        self.paused = ""  # why storescp is stopped for want of space; "" when it is not
        self.refused = ""  # why the system will not let storescp run (process.refusal); "" when it does
        self._down_since = None  # since when it has not been listening (paused or not)
        self._proc = None
        self._spawned_at = 0.0
        self._expected = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor = None

    # -- life cycle -------------------------------------------------------

    def start(self):
        os.makedirs(self.inbox, exist_ok=True)
        self._down_since = time.monotonic()  # until the supervisor sees it listen
        killed = stop_leftover(self.pid_file, self.inbox)
        if killed:
            log.warning("stopped a receiver left over from a crash", extra={"fields": {"processes": killed}})
        if self._check_space():
            self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, name="receiver-supervisor", daemon=True)
        self._supervisor.start()

    def stop(self):
        self._stopping.set()
        self._kill()
        if self._supervisor is not None:
            self._supervisor.join(5)
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass

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
        """Our storescp holds a socket listening on the port (not merely: someone does)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return False
        ours = listening_sockets().get(self.port, set()) & socket_inodes(proc.pid)
        return bool(ours)

    def down_seconds(self):
        """How long the receiver has been down against its will (0 while listening or paused).

        Kept by the supervisor; the systemd watchdog stops when this grows
        past its interval, so that systemd restarts the service.  Not while
        the system refuses to let storescp run (``refused``): a restart loop
        cannot mend a sandbox; health and the log say why instead.
        """
        since = self._down_since
        if since is None or self.paused or self.refused:
            return 0.0
        return time.monotonic() - since

    def wait_ready(self, timeout=10):
        """Wait until storescp listens; False if it did not, or exited (the supervisor restarts it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.listening:
                return True
            if not self.running:
                return False
            time.sleep(0.05)
        return False

    def _command(self):
        """storescp: +xa accepts every transfer syntax (a compressed study arrives as stored), -pm every
        SOP class, a vendor's private ones too: what goes on a disc is decided after the §3 checks."""
        return [
            self.tool, "--fork", "-aet", self.ae_title, "-od", self.inbox, "-su", PREFIX, "+uf",
            "+xa", "-pm", "-dhl", "-ta", "30", "-ts", "600", str(self.port),
        ]

    def _spawn(self):
        proc = process.start(self._command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._relay_output, args=(proc,), name="receiver-output", daemon=True).start()
        with self._lock:
            self._proc = proc
            self._spawned_at = time.monotonic()
        with open(self.pid_file, "w", encoding="ascii") as handle:
            handle.write("%d\n" % proc.pid)  # its process group: start() puts it in one of its own
        log.info("receiver started", extra={"fields": {"pid": proc.pid, "port": self.port, "ae": self.ae_title}})

    def _kill(self):
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            process.kill_group(proc)

    def _relay_output(self, proc):
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            refused = process.refusal(line)
            if refused:
                if refused != self.refused:
                    log.error("the receiver cannot run: %s", refused)
                self.refused = self.last_error = refused
            elif line[:2] in ("E:", "F:"):
                self.last_error = line[2:].strip()
                if "write" in self.last_error.lower():
                    self.write_failures += 1
                log.warning("receiver: %s", self.last_error)
            else:
                log.debug("receiver: %s", line)
        proc.stdout.close()

    def _check_space(self):
        """Pause storescp below limits.min_free_bytes, resume above; True if it may run."""
        free = disk.free_bytes(self.inbox)
        if free < self.min_free_bytes:
            if not self.paused:
                self.paused = ("stopped: the work dir has %d bytes free, below limits.min_free_bytes %d; "
                               "it starts again when space is back" % (free, self.min_free_bytes))
                log.warning("receiver stopped: the work dir is short of space",
                            extra={"fields": {"free_bytes": free, "min_free_bytes": self.min_free_bytes}})
                self._kill()
            return False
        if self.paused:
            self.paused = ""
            log.info("receiver resumes: free space is back", extra={"fields": {"free_bytes": free}})
            self._spawn()
        return True

    def _supervise(self):
        """Watch, sweep, pause for space and restart, every SUPERVISE_EVERY_S until stopped.

        A work dir gone read-only or removed under us is said once (while it
        lasts) and tried again: the supervisor itself never dies of it.
        """
        state = {"failures": 0, "next_sweep": time.monotonic() + SWEEP_EVERY_S}
        trouble = None
        while not self._stopping.wait(SUPERVISE_EVERY_S):
            try:
                self._supervise_once(state)
                trouble = None
            except OSError as exc:
                if str(exc) != trouble:
                    log.warning("receiver supervision failed: %s", exc)
                trouble = str(exc)

    def _supervise_once(self, state):
        if self.listening:
            self._down_since = None
        elif self._down_since is None:
            self._down_since = time.monotonic()
        if time.monotonic() >= state["next_sweep"]:
            state["next_sweep"] = time.monotonic() + SWEEP_EVERY_S
            self.sweep()
        self.limit_associations()
        if not self._check_space():
            return
        proc = self._proc
        if proc is not None and proc.poll() is not None:
            process.forget(proc)
            if time.monotonic() - self._spawned_at > STABLE_AFTER_S:
                state["failures"] = 0
            delay = RESTART_DELAY_S[min(state["failures"], len(RESTART_DELAY_S) - 1)]
            log.warning(
                "receiver exited; restarting",
                extra={"fields": {"returncode": proc.returncode, "delay_s": delay}},
            )
            state["failures"] += 1
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self._spawn()

    def limit_associations(self):
        """Kill the children beyond ``max_associations``: idle ones (nothing received) first, then the
        youngest; returns how many."""
        proc = self._proc
        if proc is None:
            return 0
        children = []
        for pid in group_members(proc.pid):
            fields = _stat_fields(pid)
            if pid != proc.pid and fields is not None:
                started = int(fields[19])
                # idle ones first, the longest idle first; then those receiving, the youngest first
                children.append(((1, -started) if _bytes_read(pid) else (0, started), pid))
        excess = sorted(children)[:max(0, len(children) - self.max_associations)]
        for _, pid in excess:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if excess:
            self.cut_associations += len(excess)
            log.warning("receiver: %d associations beyond receiver.max_associations %d closed (idle first)",
                        len(excess), self.max_associations)
        return len(excess)

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

    def sweep(self):
        """Remove everything in the inbox that no job expects; returns how many entries.

        Done under the lock that ``expect`` takes, so a study announced while
        the sweep runs is never swept away under its C-MOVE.
        """
        removed = 0
        with self._lock:
            expected = {self.study_dir(uid) for uid in self._expected}
            for entry in os.scandir(self.inbox):
                if entry.path in expected:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    try:
                        os.unlink(entry.path)
                    except FileNotFoundError:
                        continue
                removed += 1
        if removed:
            log.warning("receiver: removed %d unrequested deliveries", removed)
        return removed


def stop_leftover(pid_file, inbox):
    """Kill the receiver a crashed server left running; returns how many processes.

    Only processes of the recorded process group that are a storescp
    writing to this very inbox are ours: a recycled pid is left alone.
    """
    try:
        with open(pid_file, encoding="ascii") as handle:
            group = int(handle.read().strip())
    except (OSError, ValueError):
        return 0
    ours = [pid for pid in group_members(group) if _is_receiver(pid, inbox)]
    if ours:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + LEFTOVER_WAIT_S
        while time.monotonic() < deadline and any(_is_receiver(pid, inbox) for pid in ours):
            time.sleep(0.05)
    os.unlink(pid_file)
    return len(ours)


def group_members(group):
    """The live pids whose process group is ``group``, from /proc."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields and int(fields[2]) == group:
                members.append(int(name))
    return members


def _stat_fields(pid):
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...),
    or None for a process that is gone or a zombie."""
    try:
        with open("/proc/%d/stat" % pid, encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if fields and fields[0] != "Z" else None


def _bytes_read(pid):
    """What process ``pid`` has read since it was forked (rchar): 0 for a connection that sent nothing."""
    try:
        with open("/proc/%d/io" % pid, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _is_receiver(pid, inbox):
    """A live storescp writing to ``inbox``."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            argv = [os.fsdecode(arg) for arg in handle.read().split(b"\0")]
    except OSError:
        return False
    return _stat_fields(pid) is not None and os.path.basename(argv[0]) == "storescp" and inbox in argv


def listening_sockets():
    """{port: {socket inode}} of the local TCP sockets in LISTEN state, from /proc.

    Read rather than probed: a test connection would make storescp fork a
    child that logs an aborted association.
    """
    sockets = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):  # /proc/net is hidden by ProcSubset=pid
        try:
            with open(table, encoding="ascii") as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    if fields[3] == "0A":  # TCP_LISTEN
                        sockets.setdefault(int(fields[1].rsplit(":", 1)[1], 16), set()).add(int(fields[9]))
        except OSError:
            continue
    return sockets


def socket_inodes(pid):
    """The inodes of the sockets process ``pid`` has open."""
    inodes = set()
    try:
        names = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes
