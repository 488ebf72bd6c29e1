"""The jobs of SPEC §9: ids, states, the queue, progress, events, cancel, expiry.

Every piece of work is a Job here.  A job started with POST /api/jobs waits
in ``queued`` for one of ``limits.max_jobs`` slots (at most
``jobs.max_queued`` wait; then 503) and runs in a thread of its own; a
synchronous request (the §2 endpoints, the legacy URLs) is a job run in the
request's thread that gets a slot at once or a 503, as before.

A flood of POSTs must not starve the HIS's synchronous downloads: POSTed
jobs run in at most ``limits.max_jobs`` - 1 slots (one slot is the
synchronous requests' alone, when there are two or more), each caller (its
key's name, else its address) starts at most ``jobs.max_per_minute`` (429
beyond), and at most ``jobs.max_failed`` failed or cancelled jobs are kept
(the oldest go first) however many a caller makes fail.

The steps themselves are in ``jobs``; this module runs them, keeps each
job's state and progress for the API and the events stream, writes its
audit line (one per job), cancels it (its tools killed, its files removed)
and forgets it ``jobs.keep_s`` after it ended.  Jobs live in memory: a
restart forgets them, and the work dir's leftovers go at start.
"""

import collections
import dataclasses
import logging
import secrets
import threading
import time
from datetime import datetime, timezone
from typing import Optional

from . import audit, errors, process

log = logging.getLogger(__name__)

RETRY_AFTER_S = 30
ENDED = ("ready", "done", "failed", "cancelled")
CANCEL_WAIT_S = 30


def _iso_time(epoch):
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclasses.dataclass(eq=False)
class Job:
    action: str  # download | print
    accessions: list
    export: audit.Export
    named_by_patient: bool = False
    split: bool = False  # a download too big for one disc makes several (else 413 needs_split)
    synchronous: bool = False
    stream: bool = False  # a synchronous download whose answer may start while its ISO is written
    id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(16))  # 128 random bits
    token: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(32))  # for the ISO link
    state: str = "queued"
    phase: str = "queued"
    error: Optional[dict] = None
    created: float = dataclasses.field(default_factory=time.time)
    updated: float = dataclasses.field(default_factory=time.time)
    ended: Optional[float] = None
    images_expected: Optional[int] = None
    disc_bytes: Optional[int] = None
    retrievals: list = dataclasses.field(default_factory=list)
    iso: object = None  # jobs.Iso once a download of one disc is ready
    discs: list = dataclasses.field(default_factory=list)  # every disc's jobs.Iso
    answer: Optional[dict] = None  # a print's answer
    omitted: Optional[dict] = None  # private objects left off the disc (SPEC §4.1); None from the cache
    cancelled: bool = False
    registry: object = dataclasses.field(default=None, repr=False)

    def step(self, phase):
        """The job moves on to ``phase``, unless it was cancelled meanwhile."""
        if self.cancelled:
            raise errors.Cancelled("The job was cancelled.")
        if self.registry is not None:
            self.registry.update(self, phase=phase)

    @property
    def request_id(self):
        return self.export.request_id

    def watch(self, retrieval):
        """A retrieval this job waits for: its arrivals count in the progress (a retried one replaces
        the first try)."""
        uid = retrieval.study.study_uid
        self.retrievals = [known for known in self.retrievals if known.study.study_uid != uid] + [retrieval]

    def progress(self):
        received = size = 0
        for retrieval in self.retrievals:
            count, nbytes = retrieval.arrived()
            received += count
            size += nbytes
        return {"phase": self.phase, "images_expected": self.images_expected, "images_received": received,
                "bytes_received": size, "disc_bytes": self.disc_bytes}

    @property
    def caller(self):
        """The name of the key that made the job (None: no named keys, or the unnamed one)."""
        return self.export.caller

    def as_dict(self, keep_s, token=True):
        """The job's JSON; without ``token`` its disc links carry no download token (for others than
        its caller)."""
        links = {"self": "/api/jobs/" + self.id, "events": "/api/jobs/%s/events" % self.id}
        ready = self.state == "ready"
        query = "?token=" + self.token if token else ""
        if ready and self.iso is not None:
            links["iso"] = "/api/jobs/%s/iso%s" % (self.id, query)
        discs = [{"number": iso.number, "bytes": iso.size, "images": iso.images,
                  "volume": iso.volume, "profile": iso.profile,
                  "links": {"iso": "/api/jobs/%s/discs/%d/iso%s" % (self.id, iso.number, query)}}
                 for iso in (self.discs if ready else [])]
        return {
            "id": self.id, "action": self.action, "accessions": list(self.accessions), "state": self.state,
            "progress": self.progress(), "error": self.error, "created": _iso_time(self.created),
            "updated": _iso_time(self.updated), "expires": _iso_time(self.ended + keep_s if self.ended else None),
            "links": links, "discs": discs, "result": self.answer, "omitted": self.omitted,
        }


class Registry:
    def __init__(self, config, steps, audit_trail, metrics):
        self.config = config
        self.steps = steps  # jobs.Jobs
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

    def run(self, job, build=True, audited=True):
        """Run ``job`` in this thread now (a synchronous request); 503 when every slot is taken.

        Without ``build`` (a HEAD) the disc is sized, not written; without
        ``audited`` nothing is exported, so no audit line is written.
        """
        with self._changed:
            if self._running >= self._slots:
                raise errors.Unavailable(
                    "All %d job slots are busy; try again shortly." % self._slots,
                    code="busy", retry_after=RETRY_AFTER_S)
            self._running += 1
            job.synchronous = True
            self._add(job)
        return self._execute(job, build, audited)

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
        job.registry = self
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
            self._execute(job, build=True, audited=True)
        except errors.MkisoError:
            pass  # the job's JSON holds the error
        except Exception:
            log.exception("job failed", extra={"fields": {"request_id": job.request_id}})

    def _execute(self, job, build, audited):
        """The job's steps, its audit line, its end state; frees the slot.

        A streamed ISO (``jobs.Build``) is still being written when this
        returns: the job ends, and frees its slot, when genisoimage does.
        """
        self.update(job, state="running", phase="find")
        building = None
        try:
            with process.owned_by(job):
                try:
                    if job.action == "print":
                        job.answer = self.steps.print_studies(job)
                    else:
                        job.discs = self.steps.make_iso(job, build)
                        job.iso = job.discs[0] if len(job.discs) == 1 else None
                    process.check_cancelled()
                except Exception as exc:
                    _drop_discs(job)  # made just before a cancel took: they go too
                    if not job.cancelled:
                        self._failed(job, exc, audited)
                        raise
                    cancelled = errors.Cancelled("The job was cancelled.")
                    self._failed(job, cancelled, audited)
                    raise cancelled from exc
            if audited:
                try:
                    if job.export.deferred:  # its answer writes the line: the trail must take it
                        self.audit.check(job.export)
                    else:
                        self.audit.record(job.export, 200)
                except errors.MkisoError as exc:
                    _drop_discs(job)
                    self._failed(job, exc, audited)
                    raise
            building = job.iso.build if job.iso is not None else None
            if building is not None:
                building.when_ended(lambda: self._built(job, building))
                return job.iso
            self.update(job, state="done" if job.action == "print" or job.synchronous else "ready",
                        phase="ready" if job.action == "download" else "done", ended=True)
            return job.iso if job.action == "download" else job.answer
        finally:
            if building is None:
                self._free_slot(job)

    def _built(self, job, build):
        """A streamed ISO is written, or failed while its answer went out (which was then cut short)."""
        try:
            if build.error is None:
                self.update(job, state="done", phase="ready", ended=True)
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
            self._changed.notify_all()

    def _failed(self, job, exc, audited):
        failure = exc if isinstance(exc, errors.MkisoError) else errors.MkisoError(
            "An internal error occurred; the server log has the details under this request id.")
        if audited and not job.export.recorded:
            try:
                self.audit.record(job.export, failure.status, failure.code)
            except errors.MkisoError:
                pass  # logged; the job's own error is what the caller hears
        state = "cancelled" if isinstance(failure, errors.Cancelled) else "failed"
        self.update(job, state=state, ended=True,
                    error={"error": failure.message, "code": failure.code, "status": failure.status,
                           "request_id": job.request_id})

    # -- looking and changing ------------------------------------------------

    def update(self, job, ended=False, **changes):
        with self._changed:
            for name, value in changes.items():
                setattr(job, name, value)
            job.updated = time.time()
            if ended and job.ended is None:  # a ready disc cancelled later ended once, as ready
                self.metrics.job_ended(job.action, job.state, (job.error or {}).get("code"))
            if ended:
                job.ended = job.updated
            self._changed.notify_all()

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
            if job.state in ("failed", "cancelled", "done"):
                return job
            job.cancelled = True
            self._changed.notify_all()
            if job.state == "queued":
                self.update(job, state="cancelled", phase="cancelled", ended=True)
                return job
        if job.state == "ready":
            self._discard(job)
            self.update(job, state="cancelled", phase="cancelled", ended=True)
            return job
        process.kill_owned(job)
        with self._changed:
            self._changed.wait_for(lambda: job.state in ENDED, CANCEL_WAIT_S)
        if job.state == "ready":  # finished just before the cancel took
            self._discard(job)
            self.update(job, state="cancelled", phase="cancelled", ended=True)
        return job

    # -- expiry ----------------------------------------------------------------

    def reap(self):
        with self._changed:
            self._reap()

    def _reap(self):
        now = time.time()
        expired = [job for job in self._jobs.values() if job.ended and now - job.ended >= self.keep_s]
        failed = sorted((job for job in self._jobs.values() if job.state in ("failed", "cancelled")),
                        key=lambda job: job.ended or 0)
        for job in expired + failed[:max(0, len(failed) - self.config.jobs.max_failed)]:
            if self._jobs.pop(job.id, None) is not None:
                self._discard(job)

    def _discard(self, job):
        """A ready job's discs go (a synchronous request's went with its answer)."""
        if job.synchronous:
            job.iso, job.discs = None, []
        else:
            _drop_discs(job)

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


def _drop_discs(job):
    """Remove the job's discs and forget them."""
    discs, job.iso, job.discs = job.discs, None, []
    for iso in discs:
        iso.cleanup()
