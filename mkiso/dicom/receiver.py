"""The storage receiver: the port the PACS knows, one ``storescp`` per association.

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
- While the work dir has less than ``limits.min_free_bytes`` free, the port
  is closed and running associations are killed (health says why); it opens
  again once space is back.
- At no moment do more than ``receiver.max_associations`` associations run.

The bound is exact because mkiso itself listens on the port and starts the
storescp of each association: ``storescp --inetd`` serves the one
association on its stdin and exits.  A connection gets its storescp once
its first bytes, an A-ASSOCIATE-RQ, have arrived and fewer than the bound
run; otherwise it is refused with an A-ASSOCIATE-RJ (transient, local limit
exceeded: the PACS may try again later) and never gets a process.  A
storescp counts until it has exited.  Idle connections cost a socket, not a
process: they are closed after the association timeout (``ACSE_TIMEOUT_S``)
or, beyond ``PENDING_MAX`` of them, the longest idle first; one whose first
byte is not an A-ASSOCIATE-RQ is closed at once.  ``storescp --fork`` did
this itself and has no limit of its own (200 idle connections made 201
processes for 45 s); killing the excess afterwards let it run in between.
One process per association, never one long-lived storescp: in
single-process mode storescp remembers the last study folder it wrote to,
and a second move of the same study after that folder was collected fails
with write errors.

``--inetd`` points storescp's stdout and stderr at /dev/null, so its
messages come through ``--log-config``: a file appender writing to a pipe
that every storescp shares and one thread reads (lines of up to PIPE_BUF
bytes are written whole).  ``TCP_NODELAY=1`` reaches storescp in its
environment (``process.start``), and dcmtk applies it to the socket it is
given as to one it accepts.

A receiver left running by a crashed server of an earlier version (a
``storescp --fork`` whose process group is recorded in ``receiver.pid`` in
the work dir) is killed before ours listens; today's children die with the
server (``process.start``'s parent-death signal) and never hold the port.
"""

import errno
import logging
import os
import selectors
import shutil
import signal
import socket
import threading
import time

from .. import disk, process
from . import tls

log = logging.getLogger(__name__)

PREFIX = "STUDY"
SUPERVISE_EVERY_S = 0.5
SWEEP_EVERY_S = 1.0
RESTART_DELAY_S = (0.5, 1, 2, 5, 10)
STABLE_AFTER_S = 30
LEFTOVER_WAIT_S = 5
ACSE_TIMEOUT_S = 30  # for the A-ASSOCIATE-RQ: idle before it, in storescp after its first bytes
PENDING_MAX = 256  # idle connections held (a socket each) before the longest idle is closed
REFUSED_LINGER_S = 2  # after the A-ASSOCIATE-RJ, for the peer to close first (PS3.8 9.2, ARTIM)
ACCEPT_TICK_S = 0.25  # how often the acceptor reaps, expires and looks at its stop event
LISTEN_BACKLOG = 128
PROBE_TIMEOUT_S = 10
LOG_CONFIG = "receiver-log.cfg"
# storescp's "cannot write" lines that mean the disk, not a folder removed under a stray association
SPACE_ERRORS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
A_ASSOCIATE_RQ = 0x01
TLS_HANDSHAKE = 0x16  # the first byte of a TLS ClientHello record
# A-ASSOCIATE-RJ (PS3.8 9.3.4): result 2 rejected-transient, source 3 service-provider (presentation),
# reason 2 local-limit-exceeded.
A_ASSOCIATE_RJ = bytes((0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2))
# ... result 1 rejected-permanent, source 1 service-user, reason 1 no-reason-given: a plain association to a
# TLS receiver (receiver.tls), which trying again will not mend.
A_ASSOCIATE_RJ_PLAIN = bytes((0x03, 0, 0, 0, 0, 4, 0, 1, 1, 1))
PENDING, REFUSED = "pending", "refused"


class Receiver:
    def __init__(self, config, inbox_dir, pid_file):
        self.ae_title = config.receiver.ae_title
        self.port = config.receiver.port
        self.tool = os.path.join(config.tools.dcmtk_dir, "storescp")
        self.min_free_bytes = config.limits.min_free_bytes
        self.max_associations = config.receiver.max_associations
        self.tls = config.receiver.tls if config.receiver.tls.enabled else None
        self.plain_refused = 0  # plain associations refused by a TLS receiver
        self.refused_associations = 0  # refused with an A-ASSOCIATE-RJ: the bound was reached
        self.idle_closed = 0  # connections closed before they sent an A-ASSOCIATE-RQ
        self.requested = 0  # A-ASSOCIATE-RQs that arrived, admitted or refused: did the PACS reach us
        self.inbox = inbox_dir
        self.pid_file = pid_file  # an earlier version's storescp, see stop_leftover
        self.log_config = os.path.join(os.path.dirname(pid_file), LOG_CONFIG)
        self.restarts = 0
        self.last_error = ""
        self.write_failures = 0  # files storescp could not write for want of space (SPACE_ERRORS)
        self.paused = ""  # why the port is closed for want of space; "" when it is not
        self.refused = ""  # why the system will not let storescp run (process.refusal); "" when it does
        self._down_since = None  # since when it has not been listening (paused or not)
        self._children = []  # the running storescp, one per association: only the acceptor adds
        self._gate = None  # (listening socket, acceptor thread, its stop event) while listening
        self._opened_at = 0.0
        self._log_pipe = None
        self._reported = (0, 0, 0)  # refused_associations, idle_closed, plain_refused as last logged
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
        self._log_pipe = os.pipe()
        with open(self.log_config, "w", encoding="ascii") as handle:
            handle.write(log_config(self._log_pipe[1]))
        threading.Thread(target=self._relay_output, args=(os.fdopen(self._log_pipe[0], "rb"),),
                         name="receiver-output", daemon=True).start()
        if self._check_space():
            self._open()
        self._supervisor = threading.Thread(target=self._supervise, name="receiver-supervisor", daemon=True)
        self._supervisor.start()

    def stop(self):
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(PROBE_TIMEOUT_S + 5)  # first, so that it opens nothing after _close
        self._close()
        if self._log_pipe is not None:
            os.close(self._log_pipe[1])  # the relay reads to its end once no storescp holds it either
            self._log_pipe = None
        for path in (self.pid_file, self.log_config):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @property
    def listening(self):
        """Our acceptor runs and the kernel has its socket listening on the port (not merely: someone's)."""
        gate = self._gate
        if gate is None or not gate[1].is_alive():
            return False
        try:
            inode = os.fstat(gate[0].fileno()).st_ino
        except OSError:  # closed under us
            return False
        return inode in listening_sockets().get(self.port, set())

    @property
    def associations(self):
        """How many associations run now (storescp started and not yet seen to exit)."""
        return len(self._children)

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
        """Wait until the port is open; False if it is not by then, or at once if opening it failed (the
        supervisor tries again)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.listening:
                return True
            if self._gate is None:
                return False
            time.sleep(0.05)
        return False

    def _command(self):
        """storescp for one association on its stdin: +xa accepts every transfer syntax (a compressed study
        arrives as stored), -pm every SOP class, a vendor's private ones too: what goes on a disc is decided
        after the §3 checks."""
        return [
            self.tool, "--inetd", "--log-config", self.log_config, "-aet", self.ae_title, "-od", self.inbox,
            "-su", PREFIX, "+uf", "+xa", "-pm", "-dhl", "-ta", str(ACSE_TIMEOUT_S), "-ts", "600",
        ] + tls.dcmtk_args(self.tls)

    def _open(self):
        """Check that storescp can run here, then listen on the port; True if it does.

        The check (``storescp --version``, through setpriv as every
        association's storescp) finds a missing tool or a sandbox refusing
        it at once, not at the PACS' first association.
        """
        try:
            result = process.run([self.tool, "--version"], PROBE_TIMEOUT_S)
        except (process.ToolMissing, process.ToolTimeout) as exc:
            self.last_error = str(exc)
            log.error("the receiver cannot start: %s", exc)
            return False
        refused = process.refusal(result.output)
        if refused:
            if refused != self.refused:
                log.error("the receiver cannot run: %s", refused)
            self.refused = self.last_error = refused
            return False
        self.refused = ""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # as storescp: every IPv4 address
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("", self.port))
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            self.last_error = "cannot listen on port %d: %s" % (self.port, exc.strerror or exc)
            log.warning("receiver: %s", self.last_error)
            return False
        if self._stopping.is_set():  # stop() came while we checked
            listener.close()
            return False
        closing = threading.Event()
        acceptor = threading.Thread(target=self._accept_loop, args=(listener, closing),
                                    name="receiver-acceptor", daemon=True)
        self._gate = (listener, acceptor, closing)
        self._opened_at = time.monotonic()
        acceptor.start()
        log.info("receiver listening", extra={"fields": {
            "port": self.port, "ae": self.ae_title, "max_associations": self.max_associations}})
        return True

    def _close(self):
        """Close the port (the acceptor first, so that nothing starts), then kill the running associations."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate[2].set()
            gate[1].join()
        children, self._children = self._children, []
        for proc in children:
            process.kill_group(proc)

    # -- the acceptor -----------------------------------------------------

    def _accept_loop(self, listener, closing):
        """Accept, admit or refuse, until ``closing``; the port is closed when it ends, however it ends."""
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        try:
            while not closing.is_set():
                for key, _ in selector.select(ACCEPT_TICK_S):
                    if key.fileobj is listener:
                        self._accept(listener, selector)
                    else:
                        selector.unregister(key.fileobj)
                        if key.data[0] == PENDING:
                            self._admit(key.fileobj, selector)
                        else:
                            self._drain(key.fileobj, selector, key.data)
                self._reap()
                self._expire(selector)
        except Exception as exc:  # the supervisor opens the port again; it says why once
            self.last_error = "the receiver's acceptor failed: %s" % exc
            log.exception("receiver: the acceptor failed")
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()
            selector.close()

    def _accept(self, listener, selector):
        """Take every connection waiting; each waits (a socket, no process) for its first bytes."""
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: the others wait in the backlog
                self.last_error = "accept failed: %s" % (exc.strerror or exc)
                return
            idle = [key for key in selector.get_map().values() if key.data and key.data[0] == PENDING]
            if len(idle) >= PENDING_MAX:
                oldest = min(idle, key=lambda key: key.data[1])
                selector.unregister(oldest.fileobj)
                oldest.fileobj.close()
                self.idle_closed += 1
            selector.register(conn, selectors.EVENT_READ, (PENDING, time.monotonic()))

    def _admit(self, conn, selector):
        """The connection spoke: its own storescp if the bound allows, else an A-ASSOCIATE-RJ."""
        try:
            first = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            first = b""
        if self.tls and first == bytes((A_ASSOCIATE_RQ,)):  # in the clear to a TLS receiver
            self.requested += 1
            self.plain_refused += self._refuse(conn, selector, A_ASSOCIATE_RJ_PLAIN)
            return
        if first != bytes((TLS_HANDSHAKE if self.tls else A_ASSOCIATE_RQ,)):  # hung up, or not DICOM
            conn.close()
            return
        self.requested += 1
        self._reap()
        if len(self._children) >= self.max_associations:
            self.refused_associations += self._refuse(conn, selector, A_ASSOCIATE_RJ)
            return
        conn.setblocking(True)
        try:
            proc = process.start(self._command(), stdin=conn.fileno(), stdout=self._log_pipe[1],
                                 stderr=self._log_pipe[1], pass_fds=(self._log_pipe[1],))
        except process.ToolMissing as exc:
            self.last_error = str(exc)
            log.error("receiver: %s", exc)
            return
        finally:
            conn.close()  # storescp has its own copy
        self._children.append(proc)

    @staticmethod
    def _refuse(conn, selector, rejection):
        """Send ``rejection`` (an A-ASSOCIATE-RJ) and drain the peer; whether it could be sent."""
        try:
            conn.send(rejection, socket.MSG_DONTWAIT)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return False
        selector.register(conn, selectors.EVENT_READ, (REFUSED, time.monotonic()))
        return True

    @staticmethod
    def _drain(conn, selector, data):
        """Read what a refused peer still sends until it closes, then close: at most REFUSED_LINGER_S."""
        try:
            more = conn.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            more = b"?"
        except OSError:
            more = b""
        if more:
            selector.register(conn, selectors.EVENT_READ, data)
        else:
            conn.close()

    def _expire(self, selector):
        now = time.monotonic()
        for key in list(selector.get_map().values()):
            if key.data is None:
                continue
            kind, since = key.data
            if now - since > (ACSE_TIMEOUT_S if kind == PENDING else REFUSED_LINGER_S):
                selector.unregister(key.fileobj)
                key.fileobj.close()
                if kind == PENDING:
                    self.idle_closed += 1

    def _reap(self):
        """Forget the storescp that have exited: only then is their place free."""
        running = []
        for proc in self._children:
            if proc.poll() is None:
                running.append(proc)
            else:
                process.forget(proc)
        self._children = running

    # -- supervision ------------------------------------------------------

    def _relay_output(self, stream):
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip()
                refused = process.refusal(line)
                if refused:
                    if refused != self.refused:
                        log.error("the receiver cannot run: %s", refused)
                    self.refused = self.last_error = refused
                elif line[:2] in ("E:", "F:"):
                    self.last_error = line[2:].strip()
                    if any(cause in self.last_error for cause in SPACE_ERRORS):
                        self.write_failures += 1
                    log.warning("receiver: %s", self.last_error)
                else:
                    log.debug("receiver: %s", line)

    def _check_space(self):
        """Close the port below limits.min_free_bytes, open it above; True if it may be open."""
        free = disk.free_bytes(self.inbox)
        if free < self.min_free_bytes:
            if not self.paused:
                self.paused = ("stopped: the work dir has %d bytes free, below limits.min_free_bytes %d; "
                               "it starts again when space is back" % (free, self.min_free_bytes))
                log.warning("receiver stopped: the work dir is short of space",
                            extra={"fields": {"free_bytes": free, "min_free_bytes": self.min_free_bytes}})
                self._close()
            return False
        if self.paused:
            self.paused = ""
            log.info("receiver resumes: free space is back", extra={"fields": {"free_bytes": free}})
            self._open()
        return True

    def _supervise(self):
        """Watch, sweep, pause for space and reopen, every SUPERVISE_EVERY_S until stopped.

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
        self._report_refusals()
        if not self._check_space() or self.listening:
            return
        gate, self._gate = self._gate, None  # an acceptor that died: its port is closed already
        if gate is not None and time.monotonic() - self._opened_at > STABLE_AFTER_S:
            state["failures"] = 0
        delay = RESTART_DELAY_S[min(state["failures"], len(RESTART_DELAY_S) - 1)]
        log.warning("receiver not listening; trying again",
                    extra={"fields": {"reason": self.last_error, "delay_s": delay}})
        state["failures"] += 1
        if self._stopping.wait(delay):
            return
        self.restarts += 1
        self._open()

    def _report_refusals(self):
        """One line per tick for the connections refused or closed since the last: a flood is not a flood
        of log lines."""
        now = (self.refused_associations, self.idle_closed, self.plain_refused)
        refused, idle, plain = (count - reported for count, reported in zip(now, self._reported, strict=True))
        self._reported = now
        if refused:
            log.warning("receiver: %d associations refused (A-ASSOCIATE-RJ): receiver.max_associations %d "
                        "were running", refused, self.max_associations)
        if idle:
            log.warning("receiver: %d connections closed that sent no association request", idle)
        if plain:
            log.warning("receiver: %d associations in the clear refused (A-ASSOCIATE-RJ): receiver.tls is on, "
                        "the PACS must send over TLS", plain)

    # -- study folders ----------------------------------------------------

    def study_dir(self, study_uid):
        return os.path.join(self.inbox, "%s_%s" % (PREFIX, study_uid))

    def expect(self, study_uid):
        """Announce a C-MOVE for this study; stale files of it are dropped."""
        with self._lock:
            self._expected.add(study_uid)
        shutil.rmtree(self.study_dir(study_uid), ignore_errors=True)

    def collect(self, study_uid, target):
        """Move what arrived for the study to ``target`` (same file system); returns how many of its
        files a storescp was still writing then.

        A C-MOVE's final response comes after every image it sent was
        written and answered, so a file still open once the C-MOVE has ended
        is somebody else's, caught half written; the caller refuses the
        study.  No storescp can open a new file in ``target``: they write
        by the folder's old name.
        """
        try:
            os.rename(self.study_dir(study_uid), target)
        except FileNotFoundError:
            os.mkdir(target)
            return 0
        finally:
            with self._lock:
                self._expected.discard(study_uid)
        return self._writing(target)

    def _writing(self, folder):
        """How many files in ``folder`` our storescp processes have open, from /proc."""
        inside = folder.rstrip(os.sep) + os.sep
        writing = 0
        for proc in list(self._children):  # the acceptor replaces the list, never changes it in place
            fds = "/proc/%d/fd" % proc.pid
            try:
                names = os.listdir(fds)
            except OSError:  # exited
                continue
            for name in names:
                try:
                    writing += os.readlink(os.path.join(fds, name)).startswith(inside)
                except OSError:
                    continue
        return writing

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


def log_config(fd):
    """dcmtk's logger configuration for storescp --inetd: its warnings and errors as "E: text" lines, as
    it prints them on a console, to descriptor ``fd`` (the receiver's pipe, which each storescp inherits)."""
    return "".join("log4cplus.%s\n" % line for line in (
        "rootLogger = WARN, pipe",
        "appender.pipe = log4cplus::FileAppender",
        "appender.pipe.File = /proc/self/fd/%d" % fd,
        "appender.pipe.Append = true",
        "appender.pipe.ImmediateFlush = true",
        "appender.pipe.layout = log4cplus::PatternLayout",
        "appender.pipe.layout.ConversionPattern = %P: %m%n",
    ))


def stop_leftover(pid_file, inbox):
    """Kill the receiver a crashed server of an earlier version left running; returns how many processes.

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

    Read rather than probed: a test connection would be one more idle
    connection for the acceptor to hold and close.
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
