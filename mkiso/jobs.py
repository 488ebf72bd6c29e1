"""The job and its keeping (SPEC §9): the record, its states, the queue, progress, cancel, expiry.

Every piece of work is a ``Job``, and ``Jobs`` keeps them.  A job started
with POST /api/jobs waits in ``queued`` for one of ``limits.max_jobs``
slots (at most ``jobs.max_queued`` wait; then 503) and runs in a thread of
its own; a synchronous request (the §2 endpoints, the legacy URLs) is a job
run in the request's thread that gets a slot at once or a 503, as before.

A flood of POSTs must not starve the HIS's synchronous downloads: POSTed
jobs run in at most ``limits.max_jobs`` - 1 slots (one slot is the
synchronous requests' alone, when there are two or more), each caller (its
key's name, else its address) starts at most ``jobs.max_per_minute`` (429
beyond), and at most ``jobs.max_failed`` failed or cancelled jobs are kept
(the oldest go first) however many a caller makes fail.

The steps themselves are in ``steps``; ``Jobs`` runs them, keeps each
job's state and progress for the API and the events stream, writes its
audit lines (SPEC §11: one per job, or a ``begun`` line before anything
leaves and the outcome after), cancels it (its tools killed, its files removed)
and forgets it ``jobs.keep_s`` after it ended.  A streamed download's last
step, genisoimage, runs while its answer goes out (``delivery.Build``):
the job's slot is handed over to it and freed when it ends.  Jobs live in
memory: a restart forgets them, and the work dir's leftovers go at start.

Only ``Jobs`` writes a job's fields: the steps, the retrievals and the
answer report through the job's methods, which hand the change to it.
"""

import collections
import ctypes
import dataclasses
import enum
import logging
import secrets
import threading
import time
from datetime import datetime, timezone
from typing import Optional

from . import audit, disk, errors, process
from .disc import records
from .http import delivery

log = logging.getLogger(__name__)

RETRY_AFTER_S = 30
CANCEL_WAIT_S = 30


class State(enum.Enum):
    """Where a job is; ``value`` is the word its JSON says."""

    QUEUED = "queued"
    RUNNING = "running"
    READY = "ready"  # its discs wait to be fetched
    DONE = "done"  # a print, or a synchronous download whose answer took its disc
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self):
        """Nothing more runs for it."""
        return self not in (State.QUEUED, State.RUNNING)

    @property
    def final(self):
        """Ended, and with no disc to fetch or cancel."""
        return self.ended and self is not State.READY


def _iso_time(epoch):
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclasses.dataclass(eq=False)
class Job:
    """One download or print: what was asked (set when it is made), and what its keeper has written since."""

    action: str  # download | print
    accessions: list
    export: audit.Export
    named_by_patient: bool = False
    split: bool = False  # a download too big for one disc makes several (else 413 needs_split)
    stream: bool = False  # a synchronous download whose answer may start while its ISO is written
    synchronous: bool = False
    format: str = "iso"  # a download's medium: iso, or zip (SPEC §13)
    id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(16))  # 128 random bits
    token: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(32))  # for the ISO link
    state: State = State.QUEUED
    phase: str = "queued"
    error: Optional[dict] = None
    created: float = dataclasses.field(default_factory=time.time)
    updated: float = dataclasses.field(default_factory=time.time)
    ended: Optional[float] = None
    images_expected: Optional[int] = None
    disc_bytes: Optional[int] = None
    retrievals: list = dataclasses.field(default_factory=list)
    discs: list = dataclasses.field(default_factory=list)  # every disc's tree.Iso, once made
    answer: Optional[dict] = None  # a print's answer
    omitted: Optional[dict] = None  # objects left off the disc (SPEC §4.1); None from the cache
    cancelled: bool = False
    keeper: "Jobs" = dataclasses.field(default=None, repr=False)

    @property
    def iso(self):
        """The disc of a download that made one (None for several, or none yet)."""
        return self.discs[0] if len(self.discs) == 1 else None

    @property
    def request_id(self):
        return self.export.request_id

    @property
    def caller(self):
        """The name of the key that made the job (None: no named keys, or the unnamed one)."""
        return self.export.caller

    # -- what the steps report ------------------------------------------------

    def step(self, phase):
        """The job moves on to ``phase``; raises errors.Cancelled if it was cancelled meanwhile."""
        if self.cancelled:
            raise errors.Cancelled("The job was cancelled.")
        self.keeper.update(self, phase=phase)

    def expect(self, images):
        """The PACS lists ``images`` objects for the job's studies."""
        self.keeper.report(self, images_expected=images)

    def sized(self, disc_bytes):
        """Its discs together hold ``disc_bytes``."""
        self.keeper.report(self, disc_bytes=disc_bytes)

    def left_off(self, sop_classes):
        """Objects of these SOP classes (one entry each) stay off the disc: private ones, or of a class with
        no directory record (SPEC §4.1)."""
        self.keeper.report(self, omitted=records.left_off_report(sop_classes))

    def exporting(self):
        """Images are about to leave (a print's first to the publisher): the export's ``begun`` audit
        line goes first (SPEC §11); raises, and nothing leaves, when it cannot be written."""
        self.keeper.audit.begin(self.export)

    def watch(self, retrieval):
        """A retrieval this job waits for: its arrivals count in the progress (a retried one replaces
        the first try)."""
        uid = retrieval.study.study_uid
        self.keeper.report(self, retrievals=[known for known in self.retrievals
                                             if known.study.study_uid != uid] + [retrieval])

    def stop(self):
        """Its steps stop at the next one (the answer waiting for its disc went away)."""
        self.keeper.report(self, cancelled=True)

    # -- what it tells ----------------------------------------------------------

    def progress(self):
        received = size = 0
        for retrieval in self.retrievals:
            count, nbytes = retrieval.arrived()
            received += count
            size += nbytes
        return {"phase": self.phase, "images_expected": self.images_expected, "images_received": received,
                "bytes_received": size, "disc_bytes": self.disc_bytes}

    def succeeded(self):
        """(state, phase) it ends in when its steps succeed: a POSTed download's discs wait to be fetched
        (ready); a print, or a synchronous download (its answer takes the disc), is done."""
        state = State.DONE if self.action == "print" or self.synchronous else State.READY
        return state, "ready" if self.action == "download" else "done"

    def as_dict(self, keep_s, token=True):
        """The job's JSON; without ``token`` its disc links carry no download token (for others than
        its caller)."""
        links = {"self": "/api/jobs/" + self.id, "events": "/api/jobs/%s/events" % self.id}
        ready = self.state is State.READY
        query = "?token=" + self.token if token else ""
        if ready and self.iso is not None:  # links.iso, or links.zip for a ZIP job
            links[self.format] = "/api/jobs/%s/%s%s" % (self.id, self.format, query)
        discs = [{"number": iso.number, "bytes": iso.size, "images": iso.images, "format": self.format,
                  "volume": iso.volume, "profile": iso.profile,
                  "links": {self.format: "/api/jobs/%s/discs/%d/%s%s" % (self.id, iso.number, self.format, query)}}
                 for iso in (self.discs if ready else [])]
        return {
            "id": self.id, "action": self.action, "format": self.format if self.action == "download" else None,
            "accessions": list(self.accessions),
            "state": self.state.value,
            "progress": self.progress(), "error": self.error, "created": _iso_time(self.created),
            "updated": _iso_time(self.updated), "expires": _iso_time(self.ended + keep_s if self.ended else None),
            "links": links, "discs": discs, "result": self.answer, "omitted": self.omitted,
        }


class Jobs:
    """The jobs of this service: their slots, queue, rates, states, cancel and expiry."""

    def __init__(self, config, steps, audit_trail, metrics):
        self.config = config
        self.steps = steps  # steps.Steps
        self.audit = audit_trail
        self.metrics = metrics  # told of each job's end
        self.keep_s = config.jobs.keep_s
        self._slots = config.limits.max_jobs
        self._posted_slots = max(1, self._slots - 1)  # one slot kept for synchronous requests
        self._running = 0
        self._running_posted = 0
        self._rates = Rates(config.jobs.max_per_minute)
        self._jobs = collections.OrderedDict()  # id -> Job, oldest first
        self._queue = collections.deque()
        self._changed = threading.Condition()

    # -- starting ----------------------------------------------------------

    def run(self, job, build=True):
        """Run ``job`` in this thread now (a synchronous request); 503 when every slot is taken.

        Without ``build`` (a HEAD) the disc is sized, not written.
        """
        with self._changed:
            if self._running >= self._slots:
                raise errors.Unavailable(
                    "All %d job slots are busy; try again shortly." % self._slots,
                    code="busy", retry_after=RETRY_AFTER_S)
            self._running += 1
            job.synchronous = True
            self._add(job)
        return self._execute(job, build)

    def submit(self, job):
        """Queue ``job`` to run in a thread of its own; 429 for a caller over its rate, 503 when the queue
        is full."""
        with self._changed:
            self._rates.take(job.export.caller or job.export.client)
            if len(self._queue) >= self.config.jobs.max_queued:
                raise errors.Unavailable(
                    "%d jobs are already waiting; try again later." % len(self._queue),
                    code="busy", retry_after=RETRY_AFTER_S)
            self._add(job)
            self._queue.append(job)
        threading.Thread(target=self._wait_and_run, args=(job,), name="job-" + job.id[:8], daemon=True).start()
        return job

    def _add(self, job):
        self._reap()
        job.keeper = self
        self._jobs[job.id] = job

    def _wait_and_run(self, job):
        with self._changed:
            while not job.cancelled and (self._queue[0] is not job or self._running >= self._slots
                                         or self._running_posted >= self._posted_slots):
                self._changed.wait()
            self._queue.remove(job)
            if job.cancelled:
                self._changed.notify_all()
                return
            self._running += 1
            self._running_posted += 1
        try:
            self._execute(job, build=True)
        except errors.MkisoError:
            pass  # the job's JSON holds the error
        except Exception:
            log.exception("job failed", extra={"fields": {"request_id": job.request_id}})

    def _execute(self, job, build):
        """The job's steps, its audit line, its end state; frees the slot.

        A streamed ISO (``delivery.Build``) is still being written when this
        returns: the job ends, and frees its slot, when genisoimage does.
        """
        self.update(job, state=State.RUNNING, phase="find")
        building = None
        try:
            with process.owned_by(job):
                try:
                    if job.action == "print":
                        job.answer = self.steps.print_studies(job)
                    else:
                        self.report(job, discs=self.steps.make_iso(job, build))
                        if job.iso is not None and job.iso.write is not None:  # the answer goes out while
                            with disk.out_of_space_is_507():  # genisoimage writes it, read back at its end
                                delivery.Build(job.iso, job, check=lambda: self.steps.read_back(job)).begun()
                        elif build:  # written whole before it leaves: read back first (SPEC §4.6)
                            self.steps.read_back(job)
                    process.check_cancelled()
                except Exception as exc:
                    _drop_discs(job)  # made just before a cancel took: they go too
                    if not job.cancelled:
                        self._failed(job, exc, audited=True)
                        raise
                    cancelled = errors.Cancelled("The job was cancelled.")
                    self._failed(job, cancelled, audited=True)
                    raise cancelled from exc
            try:
                self._audit(job)
            except errors.MkisoError as exc:
                _drop_discs(job)
                self._failed(job, exc, audited=True)
                raise
            building = job.iso.build if job.iso is not None else None
            if building is not None:
                building.when_ended(lambda: self._built(job, building))
                return job.iso
            state, phase = job.succeeded()
            self.update(job, state=state, phase=phase, ended=True)
            return job.iso if job.action == "download" else job.answer
        finally:
            if building is None:
                self._free_slot(job)

    def _built(self, job, build):
        """A streamed ISO is written, or failed while its answer went out (which was then cut short)."""
        try:
            if build.error is None:
                state, phase = job.succeeded()
                self.update(job, state=state, phase=phase, ended=True)
                return
            if not isinstance(build.error, errors.Cancelled):
                log.warning("the ISO could not be written; its answer was cut short", exc_info=build.error,
                            extra={"fields": {"request_id": job.request_id}})
            self._failed(job, build.error, audited=False)  # the answer, cut short, writes the export's line
        finally:
            self._free_slot(job)

    def _free_slot(self, job):
        with self._changed:
            self._running -= 1
            if not job.synchronous:
                self._running_posted -= 1
            idle = self._running == 0
            self._changed.notify_all()
        if idle:  # what the jobs' records took goes back to the kernel, not kept for the next job
            release_heap()

    def _failed(self, job, exc, audited):
        failure = exc if isinstance(exc, errors.MkisoError) else errors.MkisoError(
            "An internal error occurred; the server log has the details under this request id.")
        if audited:
            self._audit(job, failure)
        state = State.CANCELLED if isinstance(failure, errors.Cancelled) else State.FAILED
        self.update(job, state=state, ended=True,
                    error={"error": failure.message, "code": failure.code, "status": failure.status,
                           "request_id": job.request_id})

    def _audit(self, job, failure=None):
        """The job's audit line (SPEC §11): its failure, or that it succeeded.

        A synchronous download's outcome is written by its answer when it
        ends (what was really sent); here, before its first byte, its
        ``begun`` line.  A failure's line is written once, and a trail that
        cannot take it is logged: the job's own error is what the caller hears.
        """
        export = job.export
        if failure is None:
            if export.deferred:
                self.audit.begin(export)
            else:
                self.audit.record(export, 200)
        elif not export.recorded:
            try:
                self.audit.record(export, failure.status, failure.code)
            except errors.MkisoError:
                pass  # logged by the audit trail

    # -- looking and changing ------------------------------------------------

    def update(self, job, ended=False, **changes):
        """Change ``job`` as the API shows it (its ``updated`` moves on; streams are woken); ``ended``:
        it reached its end state now."""
        with self._changed:
            for name, value in changes.items():
                setattr(job, name, value)
            job.updated = time.time()
            if ended and job.ended is None:  # a ready disc cancelled later ended once, as ready
                self.metrics.job_ended(job.action, job.state.value, (job.error or {}).get("code"))
            if ended:
                job.ended = job.updated
            self._changed.notify_all()

    def report(self, job, **changes):
        """What a step found out about ``job`` (its progress, its discs): recorded, no new event.

        No lock: each is one assignment, and nobody waits for it (a build
        giving up calls this under its own lock, which must not wait for ours).
        """
        for name, value in changes.items():
            setattr(job, name, value)

    def counts(self):
        """(running, queued) now."""
        with self._changed:
            return self._running, len(self._queue)

    def get(self, job_id):
        with self._changed:
            self._reap()
            job = self._jobs.get(job_id)
        if job is None:
            raise errors.NotFound("There is no job %s (finished jobs are kept %ss)." % (job_id, self.keep_s),
                                  code="job_not_found")
        return job

    def recent(self):
        with self._changed:
            self._reap()
            return list(reversed(self._jobs.values()))

    def wait_for_change(self, job, since, timeout):
        """Block until ``job`` changed after ``since`` (its ``updated``) or ``timeout`` passed."""
        with self._changed:
            self._changed.wait_for(lambda: job.updated != since, timeout)

    def cancel(self, job_id):
        """Stop the job: out of the queue, or its tools killed and its files removed."""
        job = self.get(job_id)
        with self._changed:
            if job.state.final:
                return job
            job.cancelled = True
            self._changed.notify_all()
            if job.state is State.QUEUED:
                self.update(job, state=State.CANCELLED, phase="cancelled", ended=True)
                return job
        if job.state is State.READY:
            self._discard(job)
            self.update(job, state=State.CANCELLED, phase="cancelled", ended=True)
            return job
        process.kill_owned(job)
        with self._changed:
            self._changed.wait_for(lambda: job.state.ended, CANCEL_WAIT_S)
        if job.state is State.READY:  # finished just before the cancel took
            self._discard(job)
            self.update(job, state=State.CANCELLED, phase="cancelled", ended=True)
        return job

    # -- expiry ----------------------------------------------------------------

    def reap(self):
        with self._changed:
            self._reap()

    def _reap(self):
        now = time.time()
        expired = [job for job in self._jobs.values() if job.ended and now - job.ended >= self.keep_s]
        failed = sorted((job for job in self._jobs.values() if job.state in (State.FAILED, State.CANCELLED)),
                        key=lambda job: job.ended or 0)
        for job in expired + failed[:max(0, len(failed) - self.config.jobs.max_failed)]:
            if self._jobs.pop(job.id, None) is not None:
                self._discard(job)

    def _discard(self, job):
        """A ready job's discs go (a synchronous request's went with its answer)."""
        if job.synchronous:
            job.discs = []
        else:
            _drop_discs(job)

    def wait_ended(self, timeout):
        """How many jobs still run after waiting up to ``timeout`` seconds for them to end."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._running and deadline > time.monotonic():
                self._changed.wait(deadline - time.monotonic())
            return self._running

    def discard_all(self):
        """At shutdown: every ready job's files go (they would be leftovers anyway)."""
        with self._changed:
            for job in self._jobs.values():
                self._discard(job)


class Rates:
    """At most ``per_minute`` jobs started per caller: a bucket of that many, refilled over a minute."""

    FORGET_AFTER = 1024  # callers remembered before the full (idle) buckets are forgotten

    def __init__(self, per_minute):
        self.per_minute = per_minute
        self._buckets = {}  # caller -> (tokens, when)

    def take(self, caller):
        now = time.monotonic()
        if len(self._buckets) > self.FORGET_AFTER:
            self._buckets = {who: bucket for who, bucket in self._buckets.items()
                             if self._level(bucket, now) < self.per_minute}
        tokens = self._level(self._buckets.get(caller, (self.per_minute, now)), now)
        if tokens < 1:
            raise errors.TooManyRequests("More than %d jobs a minute from this caller; try again shortly."
                                         % self.per_minute, retry_after=int(60 / self.per_minute) + 1)
        self._buckets[caller] = (tokens - 1, now)

    def _level(self, bucket, now):
        tokens, when = bucket
        return min(self.per_minute, tokens + (now - when) * self.per_minute / 60)


# -- glibc's heap, job after job (SPEC §8: peak RSS under 80 MB) ----------------
#
# A 50,000-image job makes and drops some 30 MB of objects (its records, its disc plan, its laid-out ISO).
# glibc's malloc keeps freed pages for the next allocation of the same arena, and gives a thread that
# allocates while another holds an arena an arena of its own, up to eight per core: the server's request
# and job threads took fifteen.  What one job freed in one arena was then not there for the next job's
# threads in another, and each job left the server bigger: 78, 93, then 102 MB peak RSS over three
# 50,000-image downloads in one server (the benchmark).  So the server keeps glibc to ARENAS arenas from
# its start (``limit_arenas``, what MALLOC_ARENA_MAX does for a process started with it), and hands
# every free page back to the kernel when the last running job has ended (``release_heap``).  Elsewhere
# than glibc both do nothing.

ARENAS = 2
M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)


def _libc():
    try:
        return ctypes.CDLL(None)  # the C library the interpreter runs on
    except OSError:
        return None


_LIBC = _libc()


def limit_arenas():
    """Keep glibc to ARENAS arenas for the threads started from now on; whether it could."""
    mallopt = getattr(_LIBC, "mallopt", None)
    return bool(mallopt is not None and mallopt(M_ARENA_MAX, ARENAS))


def release_heap():
    """Hand the heap's free pages back to the kernel (``malloc_trim``, a few milliseconds); whether it could."""
    malloc_trim = getattr(_LIBC, "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


def _drop_discs(job):
    """Remove the job's discs and forget them."""
    discs, job.discs = job.discs, []
    for iso in discs:
        iso.cleanup()
