"""Running the external tools (dcmtk, genisoimage) as supervised children.

Every tool runs from an argument list (never a shell), in a process group of
its own so that a timeout or shutdown kills it together with anything it
forked, and with ``TCP_NODELAY=1``: dcmtk reads that variable, and without
it every image waits on Nagle's algorithm.  Live children are tracked so
that the server can kill them all when it stops; none outlives it.

Not even a SIGKILLed server: every child gets a parent-death signal
(``setpriv --pdeathsig KILL``, util-linux, which then execs the tool, so no
Python runs between fork and exec).  Linux sends that signal when the
*thread* that forked the child exits, so every child is forked by one
spawner thread that lives as long as the process, never by a request's
worker thread or a short-lived pool thread.

A tool started inside ``owned_by(job)`` belongs to that job: cancelling the
job kills its tools (``kill_owned``), and the job's thread then stops with
``errors.Cancelled`` at the next step (``check_cancelled``).
"""

import collections
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from . import errors

SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
TAIL_BYTES = 1 << 16
PIPE_GRACE_S = 5
TICK_S = 0.01

_live = set()
_live_lock = threading.Lock()
_spawner = ThreadPoolExecutor(1, thread_name_prefix="spawner")
_owner = threading.local()


class ToolTimeout(Exception):
    """The tool ran past its time limit and was killed."""

    def __init__(self, args, timeout):
        super().__init__("%s ran longer than %ss" % (os.path.basename(args[0]), timeout))
        self.timeout = timeout


class ToolMissing(Exception):
    """The tool's executable could not be started."""

    def __init__(self, args, reason):
        super().__init__("cannot run %s: %s" % (args[0], reason))


class Result:
    """What a finished tool said: its exit status and its merged output."""

    def __init__(self, returncode, output):
        self.returncode = returncode
        self.output = output

    def __repr__(self):
        return "Result(returncode=%r)" % self.returncode


def tool_environment():
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def start(args, **kwargs):
    """Popen ``args`` in its own process group and remember it until reaped.

    The child is killed by the kernel if this process dies (see above).
    """
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    executable = shutil.which(args[0])
    if executable is None:
        raise ToolMissing(args, "not an executable file" if os.path.exists(args[0]) else "no such file")
    command = [SETPRIV, "--pdeathsig", "KILL", "--", executable] + list(args[1:])
    try:
        proc = _spawner.submit(
            subprocess.Popen, command, env=tool_environment(), start_new_session=True, **kwargs).result()
    except OSError as exc:
        raise ToolMissing([SETPRIV], exc.strerror or exc)
    proc.owner = current_owner()
    with _live_lock:
        _live.add(proc)
    return proc


@contextmanager
def owned_by(owner):
    """Tools started by this thread in the block belong to ``owner`` (anything with ``cancelled``)."""
    _owner.value = owner
    try:
        yield
    finally:
        _owner.value = None


def current_owner():
    return getattr(_owner, "value", None)


def check_cancelled():
    """Stop the thread's job here if it was cancelled."""
    owner = current_owner()
    if owner is not None and owner.cancelled:
        raise errors.Cancelled("The job was cancelled.")


def kill_owned(owner):
    """Kill the process groups of the owner's running tools; their threads reap them."""
    with _live_lock:
        procs = [proc for proc in _live if proc.owner is owner]
    for proc in procs:
        _signal_group(proc)
    return len(procs)


def forget(proc):
    with _live_lock:
        _live.discard(proc)


def kill_group(proc):
    """SIGKILL the child's whole process group and reap the child."""
    _signal_group(proc)
    proc.wait()
    forget(proc)


def _signal_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run(args, timeout, cwd=None, on_line=None, on_tick=None):
    """Run a tool to completion; its stdout and stderr come back merged.

    Only the last TAIL_BYTES of the output are kept (where dcmtk puts its
    final response and its errors): a C-MOVE of 10,000 images prints
    megabytes.  ``on_line``, if given, sees every line as it comes;
    ``on_tick`` is called every TICK_S while the tool runs.
    Raises ToolTimeout (after killing the group) when ``timeout`` passes.
    """
    proc = start(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = OutputTail(on_line)
    reader = threading.Thread(target=tail.read, args=(proc.stdout,), name="tool-output", daemon=True)
    reader.start()
    try:
        _wait(proc, timeout, on_tick)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        reader.join()
        raise ToolTimeout(args, timeout)
    except BaseException:
        kill_group(proc)
        reader.join()
        raise
    reader.join(PIPE_GRACE_S)
    if reader.is_alive():  # something the tool forked still holds the pipe
        kill_group(proc)
        reader.join()
    forget(proc)
    check_cancelled()  # killed for a cancel: not a tool failure to parse
    return Result(proc.returncode, tail.text())


def run_reading(args, timeout, read):
    """Run a tool whose standard output is data, which ``read(stream)`` takes as it comes, and stop it
    once ``read`` returns: (what ``read`` returned, the tool's ``Result``, its stderr as output).

    The tool is killed then, done or not: what it would go on writing is
    not wanted (genisoimage's image past its directory, ``isoimage``).  So
    its exit status says only whether it failed before ``read`` was done.
    Raises ToolTimeout (after killing the group) when ``timeout`` passes.
    """
    proc = start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tail = OutputTail()
    reader = threading.Thread(target=tail.read, args=(proc.stderr,), name="tool-output", daemon=True)
    reader.start()
    expired = threading.Event()

    def expire():
        expired.set()
        _signal_group(proc)

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        with proc.stdout:
            value = read(proc.stdout)
    except Exception:
        if not expired.is_set():
            raise
        value = None  # what ``read`` made of an output the timeout cut short: the timeout's
    finally:
        timer.cancel()
        kill_group(proc)
        reader.join()
    if expired.is_set():
        raise ToolTimeout(args, timeout)
    check_cancelled()
    return value, Result(proc.returncode, tail.text())


def _wait(proc, timeout, on_tick):
    if on_tick is None:
        proc.wait(timeout=timeout)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            proc.wait(timeout=max(0.0, min(TICK_S, deadline - time.monotonic())))
            return
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise
            on_tick()


class OutputTail:
    """A tool's output read line by line, keeping only its last TAIL_BYTES."""

    def __init__(self, on_line=None):
        self._lines = collections.deque()
        self._size = 0
        self._on_line = on_line

    def read(self, stream):
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace")
                if self._on_line is not None:
                    self._on_line(line)
                self._lines.append(line)
                self._size += len(line)
                while self._size > TAIL_BYTES and len(self._lines) > 1:
                    self._size -= len(self._lines.popleft())

    def text(self):
        return "".join(self._lines)


def run_step(args, timeout, what, cwd=None, timeout_code="timeout", on_line=None, on_tick=None):
    """``run`` for a job's step: past its time a 504, a missing tool a 500, both naming ``what``."""
    with step_errors(what, timeout, timeout_code):
        return run(args, timeout, cwd=cwd, on_line=on_line, on_tick=on_tick)


@contextmanager
def step_errors(what, timeout, timeout_code="timeout"):
    """A job's step running a tool (``run``, ``run_reading``): past its time a 504, a missing tool a
    500, both naming ``what``."""
    try:
        yield
    except ToolTimeout:
        raise errors.UpstreamTimeout("%s did not finish within %ss." % (what, timeout), code=timeout_code)
    except ToolMissing as exc:
        raise errors.MkisoError("%s: %s" % (what, exc), code="tool_missing")


# What a tool prints when a system call it needs is refused (EPERM), and which
# call that is.  Under systemd's SystemCallFilter a refused call leaves no
# trace in the journal or the kernel log: the tool's own words are all there is.
REFUSALS = (
    ("setpriv: activate capabilities: Operation not permitted", "setpriv", "capset"),
    ("Panic cannot set back effective uid", "genisoimage", "setreuid"),
)
NOT_PERMITTED = ("Operation not permitted", "Permission denied")


def refusal(output):
    """The sentence for a tool the system refused to let run, or "".

    Names the tool and, where known, the refused system call, so that a
    sandbox that is too tight (a drop-in, a hardened kernel) is seen at once
    in the error, the log and health instead of as a bare exit status.
    """
    for line in output.splitlines():
        for signature, tool, call in REFUSALS:
            if signature in line:
                return "%s was refused %s by the service's sandbox (%s)" % (tool, call, line.strip())
    for line in output.splitlines():
        if line.startswith("setpriv: ") and any(words in line for words in NOT_PERMITTED):
            return "setpriv was refused by the service's sandbox (%s)" % line.strip()
    return ""


def failure_reason(output):
    """What a failed tool said: a refusal by the sandbox (see ``refusal``), its
    error lines (dcmtk's F:/E:), else its last line.

    Without the data set dcmtk dumps among its error lines (findscu's "Find
    Failed, query keys:" and the query, line by line): 20 keys of it came
    before the cause ("0006:0317 Peer aborted Association") and the cut below
    left the cause out.
    """
    refused = refusal(output)
    if refused:
        return refused
    lines = [line[3:].strip() for line in output.splitlines()
             if line[:3] in ("F: ", "E: ") and not _dumped(line[3:])]
    for line in lines:
        if line.startswith("Reason:"):
            return "association rejected: " + line[len("Reason:"):].strip()
    if not lines:
        lines = [line[3:].strip() for line in output.splitlines() if line[:3] == "W: "]
    reason = " ".join(line for line in lines if line)[:300]
    return reason or (output.strip().splitlines() or ["no output"])[-1]


def _dumped(text):
    """Whether an error line's ``text`` is part of a data set dcmtk prints: "# Dicom-Data-Set", "(0008,0052) CS ..."."""
    text = text.strip()
    return text.startswith("#") or text.startswith("(")


def kill_all():
    """Kill every child still running; used on shutdown."""
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        kill_group(proc)
    return len(procs)
