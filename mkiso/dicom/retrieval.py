"""Retrieving one study from the PACS, shared by every job that wants it.

Concurrent jobs for the same study must not each ask for a C-MOVE: the
images all land in the one receiver folder for that Study Instance UID.  So
the first job runs the retrieval and the others wait for it and share its
files; the folder goes when the last of them lets go.

Nothing leaves here unchecked (SPEC §3.4-3.6): before the C-MOVE an
IMAGE-level C-FIND lists the study's SOP Instance UIDs (the manifest);
afterwards the received images must be exactly those, each once, each with
the StudyInstanceUID and the patient of the C-FIND answer (``identity``), and the C-MOVE's
final status and sub-operation counts must agree.  An incomplete study, a
foreign image (the receiver's port is open to anyone) or a duplicate is an
error, never a disc.

The manifest may be asked for beside the retrieval, on its own association
(SPEC §3.9, a ``Lookup``): the check waits for it after the last file, so
its C-FIND (3.5 s of 18 at 10,000 images when it ran first) costs nothing
of the answer's time, and the check itself is the same.

With ``pacs.retrieve: get`` the study comes by C-GET over our own
association straight into the retrieval's folder: same checks, no receiver.
A retrieval that fails while the work dir is short of space (or the
receiver could not write) is a 507, not a 502.
"""

import array
import bisect
import hashlib
import logging
import os
import sys
import tempfile
import threading
import time
from .. import disk, errors, logs, process
from . import identity, pacs
from .received import Early, in_path_order, read_all

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5

def verify(study, result, paths, manifest, early=None):
    """Check a finished retrieval and its files (the iterable ``paths``, read as it goes) against the
    C-FIND answers; their records, sorted by path.

    ``manifest`` is the study's SOP Instance UIDs from the IMAGE-level
    C-FIND, or None where the PACS refused that query; then the C-MOVE's
    counts and NumberOfStudyRelatedInstances are all there is to go by.
    ``early`` (an ``Early``) holds the records of files read as they
    arrived; the rest are read here.
    """
    what = "accession %s (study %s)" % (study.accession, study.study_uid)
    if not result.succeeded:
        raise errors.UpstreamFailed(
            "The PACS did not deliver %s completely: %s; %s sent, %s failed."
            % (what, result.status_text, result.completed, result.failed), code="incomplete_study")
    files = early.take(paths) if early is not None else read_all(paths)
    in_path_order(files)
    if not files:
        raise errors.UpstreamFailed("The PACS sent no images for %s." % what, code="incomplete_study")
    for received in files:
        if received.study_uid != study.study_uid:
            raise errors.UpstreamFailed(
                "An image received for %s belongs to another study; the disc was not made." % what,
                code="wrong_study")
    # Sorted references, not a set or a Counter of 50,000 UIDs: a duplicate is next to its twin.
    arrived = sorted(received.sop_uid for received in files)
    twice = _repeated(arrived)
    if twice:
        raise errors.UpstreamFailed(
            "%d images of %s arrived more than once, with different contents possible; "
            "the disc was not made." % (twice, what), code="unexpected_image")
    if manifest is not None:
        check_manifest(what, manifest, arrived)
    # After the manifest: an image somebody else sent is told as that, whoever it names.
    answered = identity.of_study(study)
    for received in files:
        identity.check_file(answered, received, what)
    counted = result.completed is not None or result.warning is not None
    if counted and result.delivered != len(files):
        raise errors.UpstreamFailed(
            "The PACS reported %d images sent for %s but %d arrived." % (result.delivered, what, len(files)),
            code="incomplete_study")
    if study.instances is not None and study.instances != len(files):
        raise errors.UpstreamFailed(
            "The PACS lists %d images for %s but %d arrived." % (study.instances, what, len(files)),
            code="incomplete_study")
    return files


class Listed:
    """A study's manifest as the check after its retrieval needs it: ``uid in listed``, ``len(listed)``.

    Sorted 64-bit keyed digests of its SOP Instance UIDs: 8 bytes an image,
    where the UIDs and their dict cost about 130, kept while the study's
    files arrive and are read (SPEC §8, flat memory).  Two UIDs of one study
    sharing a digest: about one chance in 10^10 at 50,000 images, and the
    key is random per process, so no sender can aim for it.
    """

    _KEY = os.urandom(16)

    def __init__(self, uids):
        ordered = sorted(self._digest(uid) for uid in uids)
        # A UID answered twice is one image, as in the Manifest (a dict) this was once made of.
        self._digests = array.array("Q", (digest for at, digest in enumerate(ordered)
                                          if not at or digest != ordered[at - 1]))

    @classmethod
    def _digest(cls, uid):
        digest = hashlib.blake2b(uid.encode("utf-8", "surrogateescape"), digest_size=8, key=cls._KEY).digest()
        return int.from_bytes(digest, "little")

    def __len__(self):
        return len(self._digests)

    def __contains__(self, uid):
        digest = self._digest(uid)
        at = bisect.bisect_left(self._digests, digest)
        return at < len(self._digests) and self._digests[at] == digest

    @property
    def fingerprint(self):
        """The manifest as one value, for the disc cache's key: the key is per process, as the cache's index."""
        return hashlib.sha256(self._digests.tobytes()).hexdigest()


class Spilled:
    """A C-GET's manifest while its study arrives: the check's ``Listed`` and the one stored syntax in
    memory, the rest (each instance's series and syntax, which only a retry needs) in a file.

    C-GET fetches again what did not come, series by series and in the
    syntax the manifest names (``Pacs.get_study``), so it cannot keep only
    the digests as a C-MOVE does; held whole, the manifest cost about 130
    bytes an image for the whole transfer and check (SPEC §8, flat memory).
    The file holds one line per instance, "<SOP UID> <series UID or -> <syntax
    or ->": every UID was checked as one where it entered (digits and dots).
    """

    def __init__(self, manifest, path):
        self.path = path
        self.listed = Listed(manifest)
        self.stored_syntax = manifest.stored_syntax
        with open(path, "x", encoding="ascii") as handle:
            for uid, series in manifest.items():
                handle.write("%s %s %s\n" % (uid, series or "-", manifest.syntaxes.get(uid, "-")))

    def __len__(self):
        return len(self.listed)

    def __contains__(self, uid):
        return uid in self.listed

    @property
    def fingerprint(self):
        return self.listed.fingerprint

    def load(self):
        """The whole ``pacs.Manifest``, read back."""
        manifest = pacs.Manifest()
        with open(self.path, encoding="ascii") as handle:
            for line in handle:
                uid, series, syntax = line.split()
                manifest[uid] = "" if series == "-" else sys.intern(series)
                if syntax != "-":
                    manifest.syntaxes[uid] = sys.intern(syntax)
        return manifest


def compact(manifest):
    """The manifest as the check after a C-MOVE needs it (``Listed``); None stays None (no manifest)."""
    return None if manifest is None else Listed(manifest)


class Lookup:
    """A study's manifest asked for on its own association while the study arrives (SPEC §3.9).

    ``ask`` runs in a thread of its own, as the job's (``process.owned_by``:
    cancelling the job kills its findscu too); ``result`` waits for it, at
    the check after the last file.  ``then``, if given, is called once the
    answer is in (the job's expected count).  A PACS may serve one
    association at a time, or hold its index locked while it sends
    (dcmqrscp answers no C-FIND during its C-MOVE): a lookup that failed or
    timed out beside the transfer is asked again after it, as it was before
    the transfer once, so such a PACS is no slower and no job fails of it.
    """

    def __init__(self, ask, then=None):
        self._ask, self._then = ask, then
        self._owner = process.current_owner()
        self._value = self._error = None
        self._answered = False  # the value is in (also for ``then``, which runs while the thread does)
        self._retried = False
        self._thread = threading.Thread(target=self._run, name="manifest", daemon=True)
        self._thread.start()

    def _run(self):
        with process.owned_by(self._owner):
            try:
                self._answer()
            except BaseException as exc:
                self._error = exc

    def _answer(self):
        self._value = self._ask()
        self._answered = True
        if self._then is not None:
            self._then()

    def result(self):
        """The manifest (``Listed`` or None), or the lookup's error; stops if the job is cancelled meanwhile."""
        while self._thread.is_alive():
            self._thread.join(0.5)
            process.check_cancelled()
        if self._may_retry():
            log.info("the manifest's C-FIND beside the transfer failed (%s); asked again after it",
                     self._error.message)
            self._retried, self._error = True, None
            try:
                self._answer()
            except BaseException as exc:
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._value

    def _may_retry(self):
        """The lookup failed as the PACS might beside a transfer (not for a value that failed its check)."""
        return (isinstance(self._error, (errors.UpstreamFailed, errors.UpstreamTimeout)) and not self._retried
                and self._error.code != "bad_pacs_answer")

    def peek(self):
        """The manifest if it is in; None while it is asked for, where it failed, or where there is none."""
        return self._value if self._answered else None

    def wait(self):
        """Until its findscu has ended, whatever the outcome: before the job's folder goes."""
        self._thread.join()


def resolved(manifest):
    """The manifest itself: a ``Lookup``'s answer once it is in, anything else as it is."""
    return manifest.result() if isinstance(manifest, Lookup) else manifest


def expected_images(study, manifest):
    """How many images the study should have as far as known now: the manifest's count, once it is in, else
    the STUDY-level NumberOfStudyRelatedInstances (None where the PACS gave neither)."""
    known = manifest.peek() if isinstance(manifest, Lookup) else manifest
    return len(known) if known is not None else study.instances


def _repeated(ordered):
    """How many values occur more than once in the sorted list ``ordered``."""
    return sum(1 for at in range(1, len(ordered))
               if ordered[at] == ordered[at - 1] and (at == 1 or ordered[at - 2] != ordered[at]))


def check_manifest(what, listed, arrived):
    """The received SOP Instance UIDs (``arrived``, each once) must be exactly those the PACS listed.

    Counted by lookups in ``listed`` (the manifest): no set of either side is built.
    """
    unexpected = sum(1 for uid in arrived if uid not in listed)
    if unexpected:
        raise errors.UpstreamFailed(
            "%d images arrived for %s that the PACS does not list for it (the study changed, or "
            "something else sent to the receiver); the disc was not made." % (unexpected, what),
            code="unexpected_image")
    missing = len(listed) - len(arrived)
    if missing:
        raise errors.UpstreamFailed(
            "%d of the %d images the PACS lists for %s did not arrive; the disc was not made."
            % (missing, len(listed), what), code="incomplete_study")


class Retrieval:
    """One study's C-MOVE and verified files; shared while anyone uses it."""

    def __init__(self, study, folder, watched):
        self.study = study
        self.folder = folder
        self.watched = watched  # where its images land while it runs
        self.files = []
        self.error = None
        self.cancelled = False
        self.users = 0
        self.transferred = threading.Event()  # no more images come: what follows them may stop
        self.early = Early()  # the records of images read as they arrived
        self.done = threading.Event()
        self._arrived = (float("-inf"), 0, 0)

    def arrived(self):
        """(images, bytes) received so far, for progress; counted at most every PROGRESS_EVERY_S."""
        when, count, size = self._arrived
        if when is None:  # finished: the final count
            return count, size
        now = time.monotonic()
        if now - when >= PROGRESS_EVERY_S:
            count, size = self._count()
            self._arrived = (now, count, size)
        return count, size

    def freeze(self):
        """Count once more and keep that: the folders are about to go."""
        count, size = self._count()
        self._arrived = (None, count, size)

    def _count(self):
        """One pass over the folders, an entry at a time (a list of 50,000 entries would be a peak of its own)."""
        count = size = 0
        for folder in self.watched:
            try:
                entries = os.scandir(folder)
            except FileNotFoundError:
                continue
            with entries:
                for entry in entries:
                    try:
                        if entry.is_file():
                            size += entry.stat().st_size
                            count += 1
                    except FileNotFoundError:
                        pass  # moved on meanwhile
        return count, size


class Retrievals:
    def __init__(self, pacs, receiver, root, min_free_bytes, metrics):
        self.pacs = pacs
        self.receiver = receiver  # None with pacs.retrieve: get
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.metrics = metrics
        self._running = {}
        self._lock = threading.Lock()

    def get(self, study, manifest, watch=None):
        """The study's verified files: retrieved now, or by a job already at it.

        ``manifest`` is the study's image list (``Pacs.list_instances``, or
        ``Listed``), or a ``Lookup`` still asking for it; ``watch``, if
        given, is told of the retrieval (for progress).  The caller must
        ``release`` what it got.  When the job that ran a shared retrieval
        was cancelled, the others run it again themselves.
        """
        while True:
            retrieval, owner = self._join(study)
            if watch is not None:
                watch(retrieval)
            if owner:
                self._run(retrieval, manifest)
            else:
                try:
                    while not retrieval.done.wait(0.5):
                        process.check_cancelled()
                except BaseException:
                    self.release(retrieval)
                    raise
            if retrieval.error is None:
                return retrieval
            self.release(retrieval)
            if not (retrieval.cancelled and not owner):
                raise retrieval.error

    def _join(self, study):
        with self._lock:
            retrieval = self._running.get(study.study_uid)
            owner = retrieval is None
            if owner:
                folder = tempfile.mkdtemp(prefix="study-", dir=self.root)
                watched = [os.path.join(folder, "received")]
                if self.receiver is not None:
                    watched.insert(0, self.receiver.study_dir(study.study_uid))
                retrieval = Retrieval(study, folder, watched)
                self._running[study.study_uid] = retrieval
            retrieval.users += 1
        return retrieval, owner

    def _run(self, retrieval, manifest):
        try:
            self._retrieve(retrieval, manifest)
        except BaseException as exc:
            retrieval.error = exc
            retrieval.cancelled = isinstance(exc, errors.Cancelled)
        finally:
            retrieval.freeze()
            with self._lock:
                del self._running[retrieval.study.study_uid]
            retrieval.transferred.set()
            retrieval.done.set()

    def release(self, retrieval):
        """The caller is done with the retrieval's files; the last one out removes them.

        The file list goes too: finished jobs keep their retrievals (for the
        progress they report until they expire), not 10,000 headers each.
        The folder goes in the background (``disk.remove_soon``): 10,000
        names took 1.5-3.5 s to remove here, which the disc made of their
        hard links need not wait for.
        """
        with self._lock:
            retrieval.users -= 1
            last = retrieval.users == 0
        if last:
            retrieval.files = []
            disk.remove_soon(retrieval.folder)

    def _retrieve(self, retrieval, manifest):
        study = retrieval.study
        received = os.path.join(retrieval.folder, "received")
        watch = logs.Stopwatch(self.metrics.phase)
        failures = self.receiver.write_failures if self.receiver else 0
        if self.receiver is None:  # C-GET chooses what to propose from the manifest
            manifest = resolved(manifest)
        try:
            result, reached = self._fetch(study.study_uid, received, manifest)
            retrieval.transferred.set()
        except errors.UpstreamFailed:
            self._raise_if_out_of_space(study, received, failures)
            raise
        if not result.succeeded:
            self._raise_if_out_of_space(study, received, failures)
        if self.receiver is not None:
            self.pacs.check_delivery(study.study_uid, result, reached)
        watch.lap("transfer")
        manifest = resolved(manifest)  # in "checks": what a lookup beside the transfer took longer than it
        with os.scandir(received) as entries:  # read as listed: never a list of every path (``read_all``)
            retrieval.files = verify(study, result, (entry.path for entry in entries if entry.is_file()), manifest,
                                     retrieval.early)
        watch.lap("checks")
        self.metrics.retrieved(len(retrieval.files))
        log.info("study retrieved", extra={"fields": dict({
            "accession": study.accession, "study_uid": study.study_uid, "images": len(retrieval.files),
            "manifest": manifest is not None}, **watch.fields)})

    def _fetch(self, study_uid, received, manifest):
        """The study's files into ``received``: by C-GET, or by C-MOVE through the receiver.

        Returns the final response and whether an association reached the
        receiver meanwhile (always true for C-GET): a C-MOVE that failed
        with none is the PACS not reaching us (``Pacs.check_delivery``).
        Another job's C-MOVE running at the same time can count here; then
        the failure is told as an incomplete study, as before.
        Whatever the receiver got is taken into ``received`` even when the
        C-MOVE failed, so that it goes with the retrieval's folder.  C-GET
        uses the manifest to fetch again what failed (compressed images).
        """
        if self.receiver is None:
            os.mkdir(received)
            return self.pacs.get_study(study_uid, received, manifest), True
        self.receiver.expect(study_uid)
        requested = self.receiver.requested
        try:
            result = self.pacs.move_study(study_uid)
        finally:
            writing = self.receiver.collect(study_uid, received)
        if writing:
            raise errors.UpstreamFailed(
                "%d images for study %s were still arriving after the PACS had sent all of its own "
                "(something else sent to the receiver); the disc was not made." % (writing, study_uid),
                code="unexpected_image")
        return result, self.receiver.requested > requested

    def _raise_if_out_of_space(self, study, received, failures_before):
        """A failed retrieval is a 507 when the disk, not the PACS, was the trouble.

        Asked before anything is removed: the receiver could not write, or
        was paused for want of space, or the work dir is below the limit now.
        """
        receiver = self.receiver
        short = disk.free_bytes(received) < self.min_free_bytes
        if receiver is not None:
            short = short or receiver.paused or receiver.write_failures > failures_before
        if short:
            raise errors.InsufficientStorage(
                "The work dir ran out of space while receiving accession %s; what had arrived was removed."
                % study.accession, code="insufficient_storage")
