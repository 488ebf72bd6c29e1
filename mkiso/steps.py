"""A job's steps: accession numbers in, a checked disc (or relayed images) out.

find every study (404 names the accession without one), refuse a mix of
patients (409), list each study's images (the manifest), answer from the
disc cache when the same disc was made before, else retrieve each study
once (shared with concurrent jobs), stage the disc, make and check the
DICOMDIR, size it (413/507), build the ISO and keep it in the cache.  A job
owns one folder under the work dir; it is removed on any failure, and on
success when the ISO is no longer needed.  ``jobs`` runs these steps as
jobs (slots, queue, state, cancel), and hands a streamed download's last
one, genisoimage, to its answer (``delivery.Build``).  What the steps find
out about a job they report through its methods (``jobs.Job``).
"""

import dataclasses
import errno
import functools
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager

from .disc import digests, isoimage, media, records, tree, verify, webcontent, ziparchive
from . import disk, errors, logs
from .disc.tree import Iso
from .dicom import identity
from .dicom import retrieval
from .dicom.retrieval import Retrievals

log = logging.getLogger(__name__)


PLAN_ATTEMPTS = 3
RESUME_WAIT_S = 5  # for the receiver to listen again once cached discs made room
MAX_PROBLEMS_LOGGED = 20  # of a disc failing its read-back: the first ones say enough


@dataclasses.dataclass
class Layout:
    """One disc staged and sized, not yet written."""

    staging: str
    images: int  # how many: the records are not kept past the staging (SPEC §8, flat memory)
    size: int
    number: int
    profile: str = ""  # the media profile's name (PS3.11), for the job's JSON
    volume: str = ""  # File-set ID and Volume Identifier
    digests: list = dataclasses.field(default_factory=list)  # every file's (digests.Digest), sorted by path
    when: tuple = (0, 0)  # its ZIP's time stamp (ziparchive.dos_time)
    archive: object = None  # its ZIP's layout (ziparchive.Archive), for a ZIP
    read_back: object = None  # its read-back, begun once its images were staged (verify.Ahead)


class Steps:
    """The steps of every job, with the PACS, the receiver, the publisher and the disc cache they use."""

    def __init__(self, config, pacs, receiver, jobs_dir, retrievals_dir, publisher, patient_api, cache, metrics):
        self.config = config
        self.pacs = pacs
        self.publisher = publisher
        self.patient_api = patient_api
        self.jobs_dir = jobs_dir
        self.cache = cache
        self.metrics = metrics
        self.retrievals = Retrievals(pacs, receiver, retrievals_dir, config.limits.min_free_bytes, metrics)
        self._followed = weakref.WeakSet()  # the retrievals whose arrivals are digested (``_watch``)
        self._lock = threading.Lock()

    @contextmanager
    def folder(self, job):
        """The job's folder, removed if the job fails; on success the caller removes it once delivered."""
        self.check_free_space()
        folder = self._scratch("job-%s-" % job.id)
        try:
            yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _scratch(self, prefix):
        """A new folder under the work dir's jobs/, for everything that needs one (a job, a lookup's
        C-FIND answers): a work dir the service cannot write is one clear 503 for all of them."""
        try:
            return tempfile.mkdtemp(prefix=prefix, dir=self.jobs_dir)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise errors.Unavailable(
                "The work dir %s is not writable (%s); nothing can be looked up, downloaded or printed until "
                "it is." % (self.jobs_dir, exc.strerror), code="work_dir_unwritable")

    # -- steps ------------------------------------------------------------

    def find(self, accessions, folder):
        studies, missing = [], []
        for accession in accessions:
            found = self.pacs.find_studies(accession, folder)
            if not found:
                missing.append(accession)
            studies += found
        if missing:
            raise errors.NotFound("The PACS has no study for accession number%s %s."
                                  % ("s" if len(missing) > 1 else "", ", ".join(missing)), code="study_not_found")
        unique = {}
        for study in studies:
            unique.setdefault(study.study_uid, study)
        studies = list(unique.values())
        identity.check_one_patient(studies, self.config.limits.allow_multi_patient)
        return studies

    def manifests(self, job, studies, folder, cached=False):
        """Each study's manifest, SPEC §3.6: its SOP Instance UIDs (None where the PACS refuses IMAGE-level
        queries), or a ``retrieval.Lookup`` asking for them beside the retrieval (§3.9).

        Beside, on its own association, unless something must know it before
        the retrieval starts: C-GET proposes the compressed syntax the
        manifest names (getscu can propose only one), and, for a download
        (``cached``), the disc cache where it may hold a disc of these
        studies: it finds it by the manifests, and a hit makes no C-MOVE.
        Meanwhile the expected count is the STUDY-level one, and the
        manifest's once it is in.

        After a C-MOVE a manifest is only checked against, so it is kept in
        the compact form that needs (``retrieval.Listed``): while 50,000
        images arrive and are read, a job keeps their records, not a second
        copy of every UID (SPEC §8, flat memory).  C-GET fetches again,
        series by series and in the syntax the manifest names, what did not
        come (``pacs.get_study``): its manifest waits in a file in the job's
        folder for that (``retrieval.Spilled``).
        """
        moved = self.retrievals.receiver is not None
        manifests = {}

        def expect():  # also from a Lookup's thread, maybe before the next study's Lookup is in
            job.expect(sum(retrieval.expected_images(study, manifests.get(study.study_uid)) or 0
                           for study in studies))

        if moved and not (cached and self.cache.may_hold(study.study_uid for study in studies)):
            for study in studies:
                ask = functools.partial(self._listed, study.study_uid, folder)
                manifests[study.study_uid] = retrieval.Lookup(ask, then=expect)
            expect()
            return manifests
        job.step("manifest")
        for study in studies:
            manifest = self.pacs.list_instances(study.study_uid, folder)
            if manifest is not None and not moved:
                manifest = retrieval.Spilled(manifest, os.path.join(folder, "manifest-%s.txt" % study.study_uid))
            manifests[study.study_uid] = retrieval.compact(manifest) if moved else manifest
        expect()
        return manifests

    def _listed(self, study_uid, folder):
        """A study's manifest as a C-MOVE's check needs it, made as the answers are read: never the whole
        list of 50,000 UIDs at once."""
        return self.pacs.list_instances(study_uid, folder, make=retrieval.Listed)

    def cache_key(self, studies, manifests, label, named):
        """The disc cache's key of this disc (``DiscCache.key``); None without every manifest (not cached)."""
        manifests = {uid: retrieval.resolved(manifest) for uid, manifest in manifests.items()}
        if not self.cache.enabled or None in manifests.values():
            return None
        config = self.config
        fingerprints = {uid: manifest.fingerprint for uid, manifest in manifests.items()}  # Listed or Spilled
        return self.cache.key(studies, fingerprints, layout=config.iso.layout, dicomdir=config.iso.dicomdir,
                              label=label, viewer=tree.viewer_digest(config.iso.viewer_dir), named=named,
                              media=config.iso.media, capacity=media.capacity(config.iso),
                              transcode=config.iso.transcode, private_objects=config.iso.private_objects,
                              web_content=config.iso.web_content, institution=config.iso.institution,
                              contact=config.iso.contact)

    @contextmanager
    def retrieved(self, job, studies, manifests):
        """Every study's verified files, released when the block ends.

        Manifests still asked for beside the retrieval are waited for when
        it ends however it ends: their findscu writes into the job's folder.
        """
        job.step("retrieve")
        held = []
        try:
            for study in studies:
                held.append(self._retrieve(job, study, manifests[study.study_uid]))
            files = [received for running in held for received in running.files]
            identity.check_files_one_patient(files, studies, self.config.limits.allow_multi_patient)
            yield files
        finally:
            for lookup in manifests.values():
                if isinstance(lookup, retrieval.Lookup):
                    lookup.wait()
            for held_retrieval in held:
                self.retrievals.release(held_retrieval)

    def _retrieve(self, job, study, manifest):
        """The study's verified files; a retrieval short of space makes cached discs give way and runs again.

        The PACS reports no sizes, so how much room a study needs is known
        only as it arrives: what came before the space ran out, scaled to
        the images expected, is what the least recently used cached discs
        give way for.  Every round evicts at least one, so this ends; with
        none left to evict, the 507 stands.
        """
        while True:
            try:
                return self.retrievals.get(study, manifest, watch=functools.partial(self._watch, job))
            except errors.InsufficientStorage:
                freed = self.cache.free(self._room_for(job, study, manifest))
                if not freed:
                    raise
            log.info("cached discs evicted to make room", extra={"fields": {
                "accession": study.accession, "bytes": freed, "request_id": job.request_id}})
            receiver = self.retrievals.receiver  # paused for want of space: it resumes within a moment
            deadline = time.monotonic() + RESUME_WAIT_S
            while receiver is not None and not receiver.listening and time.monotonic() < deadline:
                time.sleep(0.1)

    def _watch(self, job, retrieval):
        """A retrieval ``job`` takes part in: its arrivals count in the job's progress, and are digested
        and their headers read as they come (``digests.follow``, ``received.Early``; once for a
        retrieval that jobs share)."""
        job.watch(retrieval)
        with self._lock:
            followed = retrieval in self._followed
            self._followed.add(retrieval)
        if not followed:  # until the transfer ends: what it has not done by then, the check and the seal read
            retrieval.early.forget = digests.forget  # a digest made of a file changed since is not taken
            digests.follow(retrieval.watched, retrieval.transferred, also=retrieval.early.add)

    def _room_for(self, job, study, manifest):
        """Bytes to free for ``study``'s retrieval, estimated from what arrived of it (at least 1)."""
        count, size = next((running.arrived() for running in job.retrievals
                            if running.study.study_uid == study.study_uid), (0, 0))
        expected = retrieval.expected_images(study, manifest) or count
        estimate = size * expected // count if count else 0
        return max(1, estimate + self.config.limits.min_free_bytes - disk.free_bytes(self.jobs_dir))

    def check_free_space(self, needed=0):
        """507 unless ``needed`` bytes fit above limits.min_free_bytes, after evicting cached discs."""
        wanted = needed + self.config.limits.min_free_bytes
        free = disk.free_bytes(self.jobs_dir)
        if free < wanted and self.cache.free(wanted - free):
            free = disk.free_bytes(self.jobs_dir)
        if free < wanted:
            raise errors.InsufficientStorage(
                "The work dir has %d bytes free; this needs %d (including limits.min_free_bytes)." % (free, wanted))

    # -- the download -----------------------------------------------------

    def make_iso(self, job, build=True):
        """Build the disc for ``job.accessions``; the caller sends and cleans up the Iso.

        The file is named after the accession, or with ``job.named_by_patient``
        after the patient.  Without ``build`` (a HEAD) everything is done
        and checked up to the ISO's exact size, and no ISO is written.
        What was found goes on ``job.export`` (the audit record) as it is known.
        """
        with self.folder(job) as folder, disk.out_of_space_is_507():
            return self._make_iso(job, folder, build)

    def _make_iso(self, job, folder, build):
        config, accessions, export = self.config, job.accessions, job.export
        watch = logs.Stopwatch(self.metrics.phase)
        studies = export.studies = self.find(accessions, folder)
        watch.lap("find")
        manifests = self.manifests(job, studies, folder, cached=True)
        watch.lap("manifest")
        named = self.patient_name(studies) if job.named_by_patient else None
        stem = tree.patient_stem(named) if named is not None else accessions[0]
        label = tree.volume_label(config.iso.volume_label, accessions)
        beside = any(isinstance(manifest, retrieval.Lookup) for manifest in manifests.values())
        key = None if beside else self.cache_key(studies, manifests, label, named)
        if key is not None:
            cached = self._from_cache(job, key, folder, label, build, stem)
            if cached is not None:
                export.bytes = job.disc_bytes
                return [cached]
        with self.retrieved(job, studies, manifests) as files:
            watch.lap("retrieve")
            if beside:  # each lookup is in now: the retrieval's check waited for it
                key = self.cache_key(studies, manifests, label, named)
            files, omitted = self.sort_out(files)
            job.left_off(omitted)
            if config.iso.transcode == "explicit-le":
                job.step("transcode")
                transcoded = os.path.join(folder, "transcoded")
                os.mkdir(transcoded)
                files = media.transcode(files, transcoded, config.tools.dcmtk_dir, config.timeouts.iso_s)
                watch.lap("transcode")
            # A ZIP, and a streamed download's ISO, is sent from its staged tree (and read back from it).
            from_tree = build and (job.format == "zip" or job.stream)
            laid = self._lay_out(job, folder, files, omitted, label, watch, from_tree)
            del files  # the records (350 bytes an image) go before the disc is written or sent: SPEC §8
        export.images = sum(layout.images for layout in laid)
        job.sized(sum(layout.size for layout in laid))
        # A ZIP is sent from its tree; it is written (and needs the room) only for nginx.
        written = job.format == "iso" or bool(config.server.x_accel_prefix)
        self.check_free_space(job.disc_bytes if written else 0)
        export.bytes = job.disc_bytes
        isos = [self._disc(job, folder, layout, len(laid), stem, build) for layout in laid]
        rest = functools.partial(self._write_isos, job, laid, isos, label, key, watch, len(studies))
        if build and job.stream and len(isos) == 1 and job.format == "iso":
            isos[0].write = rest  # run while the answer goes out: jobs hands it to delivery.Build
        else:
            rest()
        return isos

    def _disc(self, job, folder, layout, of, stem, build):
        """The ``Iso`` of one laid-out disc: its ISO's path, or its layout over its staged tree (a ZIP's,
        a streamed download's ISO as genisoimage lays it out)."""
        return Iso(_disc_path(folder, layout.number, of, job.format) if build else None, layout.size, stem,
                   job.accessions[0], folder, layout.images, layout.number, of, layout.profile, layout.volume,
                   archive=layout.archive, tree=layout.staging if layout.archive is not None and build else None,
                   read_back=layout.read_back)

    def _write_isos(self, job, laid, isos, label, key, watch, studies, on_tick=None):
        """Write each disc's ISO (none for a HEAD, none for a ZIP: it is sent from its staged tree), exactly
        the size genisoimage announced; then cache the disc (its tree, and its ISO if one was built).

        An ISO laid out over its tree (``isoimage``) is written only for the
        cache, from its layout (the kernel copying each file's bytes): the
        same bytes as were sent, so a download resumed from the cache fits.
        """
        cached = key and len(isos) == 1 and isos[0].path is not None and self.cache.takes(
            sum(digest.size for digest in laid[0].digests) + (isos[0].size if isos[0].format == "iso" else 0))
        laid_out = isos[0].format == "iso" and isos[0].archive is not None  # its phase iso was its layout
        try:
            for layout, iso in zip(laid, isos, strict=True):
                if iso.path is None or iso.format == "zip" or (laid_out and not cached):
                    continue
                job.step("iso")
                if laid_out:
                    ziparchive.write(iso.archive, iso.tree, iso.path)
                    continue
                tree.make_iso(self.config.tools.genisoimage, layout.staging, label, iso.path,
                              self.config.timeouts.iso_s, layout.number, len(laid), on_tick=on_tick)
                size = os.path.getsize(iso.path)
                if size != iso.size:
                    raise errors.MkisoError("genisoimage wrote %d bytes where it announced %d."
                                            % (size, iso.size), code="iso_failed")
            if cached or not laid_out:
                watch.lap(job.format)
            if cached:
                self.cache.store(key, laid[0].staging, laid[0].digests, laid[0].when,
                                 isos[0].path if isos[0].format == "iso" else None)
        finally:
            for layout, iso in zip(laid, isos, strict=True):
                if iso.tree is None:  # a ZIP's tree stays until its answer or its job ends
                    disk.remove_soon(layout.staging)
            shutil.rmtree(os.path.join(isos[0].folder, "transcoded"), ignore_errors=True)
        log.info("%s built" % job.format, extra={"fields": dict({
            "accessions": ",".join(job.accessions), "studies": studies, "images": job.export.images,
            "omitted": (job.omitted or {}).get("objects", 0),
            "discs": len(isos), "bytes": job.disc_bytes, "request_id": job.request_id}, **watch.fields)})

    def sort_out(self, files):
        """(what goes on the disc, the SOP class of each object left off), SPEC §4.1: see records.sort_out.

        The legacy layout, which has no DICOMDIR, keeps everything.
        """
        if self.config.iso.layout != "pdi":
            return files, []
        return records.sort_out(files, self.config.iso.private_objects)

    def _lay_out(self, job, folder, files, omitted, label, watch, from_tree=False):
        """Plan, stage, index and size every disc; plan again, tighter, while genisoimage finds one too big.

        Without ``job.split`` more than one disc is a 413 saying how many:
        the same number a split job makes.  With ``from_tree``, a ZIP's discs,
        or the one disc of a streamed ISO, are sent from their staged trees
        (``_stage_disc``).
        """
        config = self.config
        if job.format == "zip":  # iso.media is a disc's; a ZIP is split only by zip.max_bytes
            limit = budget = config.zip.max_bytes or math.inf
            described = "ZIP files of at most %d bytes (zip.max_bytes)" % config.zip.max_bytes
        else:
            limit = budget = media.capacity(config.iso)
            described = "discs of " + media.describe(config.iso)
        for _ in range(PLAN_ATTEMPTS):
            groups = self.plan(files, budget)
            if len(groups) > 1 and not job.split:
                raise errors.TooLarge(
                    "These studies need %d %s; ask for a job with split, or fewer accession numbers."
                    % (len(groups), described), code="needs_split", details={"discs": len(groups)})
            sent = from_tree and (job.format == "zip" or len(groups) == 1)
            laid = [self._stage_disc(job, folder, number, len(groups), group, omitted, label, watch, sent)
                    for number, group in enumerate(groups, start=1)]
            over = max(layout.size for layout in laid) - limit
            if over <= 0:
                return laid
            for layout in laid:
                if layout.read_back is not None:
                    layout.read_back.abandon()
                shutil.rmtree(layout.staging)
            budget -= over + 8 * tree.SECTOR
        raise errors.TooLarge("The disc cannot be laid out as %s." % described, code="disc_too_large")

    def plan(self, files, budget):
        """``files`` split into discs of ``budget`` bytes, each also holding the viewer and the web content."""
        iso = self.config.iso
        fixed = media.BASE + tree.viewer_bytes(iso.viewer_dir)
        if self.web_content:
            return media.plan(files, budget, fixed + webcontent.DISC_BYTES,
                              media.PerDisc(webcontent.STUDY_BYTES, webcontent.SERIES_BYTES))
        return media.plan(files, budget, fixed)

    @property
    def web_content(self):
        """Whether discs carry the web content: asked for, and in the PDI layout it belongs to."""
        return self.config.iso.web_content and self.config.iso.layout == "pdi"

    def _stage_disc(self, job, folder, number, of, files, omitted, label, watch, from_tree=False):
        """Stage, index, seal and size one disc.  ``from_tree``: it is sent from its staged tree (a ZIP,
        a streamed download's one ISO, laid out here), which is read back from the moment it is staged."""
        config = self.config
        job.step("stage")
        staging = os.path.join(folder, "disc-%d" % number)
        os.mkdir(staging)
        syntaxes = {received.transfer_syntax for received in files}
        private = {received.sop_class_uid for received in files if records.is_private(received.sop_class_uid)}
        profile = media.profile(syntaxes, config.iso.media, private)
        readme = tree.Readme(
            studies=len({received.study_uid for received in files}),
            series=len({received.series_uid for received in files}), objects=len(files), profile=profile.text,
            syntaxes=[media.syntax_name(uid) for uid in sorted(syntaxes)], viewer_dir=config.iso.viewer_dir,
            institution=config.iso.institution, contact=config.iso.contact, number=number, of=of, omitted=omitted)
        images = tree.stage(staging, files, config.iso.layout, config.iso.viewer_dir, readme)
        watch.lap("stage")
        read_back = verify.Ahead(staging, staging + ".complete", config.timeouts.iso_s,
                                 MAX_PROBLEMS_LOGGED) if from_tree else None
        volume = tree.disc_label(label, number, of)
        if self.web_content:
            webcontent.write(staging, images, config.iso, os.path.join(config.tools.dcmtk_dir, "dcmj2pnm"),
                             config.timeouts.iso_s, number, of)
            watch.lap("web")
        if config.iso.layout == "pdi":
            job.step("dicomdir")
            dcmmkdir = os.path.join(config.tools.dcmtk_dir, "dcmmkdir")
            tree.make_dicomdir(staging, images, config.iso.dicomdir, dcmmkdir, config.timeouts.iso_s, volume)
            watch.lap("dicomdir")
        job.step("digests")
        # SHA256.TXT, before the ISO is sized: it is on the disc.  The digests are kept for a ZIP or the
        # cache only (an ISO's SHA256.TXT holds all it needs; SPEC §8, flat memory).
        found = digests.seal(staging, keep=job.format == "zip" or self.cache.enabled)
        watch.lap("digests")
        job.step("size")
        when, archive = ziparchive.dos_time(time.time()), None
        if job.format == "zip":
            archive = ziparchive.Archive(found, when)
        elif from_tree:
            archive = self._lay_out_iso(job, staging, _disc_path(folder, number, of, "iso"), label)
            if archive is None:  # the ISO is read back as written
                read_back.abandon()
                read_back = None
        if archive is not None:
            size = archive.size
        else:
            size = tree.iso_size(config.tools.genisoimage, staging, label, config.timeouts.iso_s, number, of)
        watch.lap("iso" if job.format == "iso" and archive is not None else "size")
        return Layout(staging, len(images), size, number, profile.of(job.format), volume, found, when, archive,
                      read_back)

    def _lay_out_iso(self, job, staging, path, label):
        """A streamed download's ISO, to be sent from its staged tree as genisoimage lays it out, never
        written (``isoimage``, SPEC §8.1): its ``isoimage.Image``, whose size is the disc's (one run of
        genisoimage for both).  None for an image of another layout, which genisoimage writes as before
        (and which is read back as written: its read-back begun ahead is abandoned)."""
        job.step("iso")
        try:
            return isoimage.lay_out(self.config.tools.genisoimage, staging, label, path + ".head",
                                    self.config.timeouts.iso_s)
        except isoimage.NotLaidOut as exc:
            log.info("the ISO is written first: %s" % exc, extra={"fields": {"request_id": job.request_id}})
            return None

    def _from_cache(self, job, key, folder, label, build, stem):
        """The cached disc as this job's ``Iso`` (its own hard links), or None when it is not cached.

        Either format comes from the one entry (SPEC §13): a ZIP from the
        cached tree and digests; an ISO from the cached ISO, or, for a disc
        first made as a ZIP, built now from the cached tree (no retrieval) and
        added to the entry.
        """
        found = self.cache.fetch(key, folder, iso=job.format == "iso")
        if found is None:
            return None
        config, path = self.config, os.path.join(folder, "disc." + job.format) if build else None
        archive = tree_path = None
        if job.format == "zip":
            archive, tree_path = ziparchive.Archive(found.digests, found.when), found.tree if build else None
            size = archive.size
        elif found.iso is not None:
            path, size = found.iso, os.path.getsize(found.iso)
        elif build:
            job.step("iso")
            tree.make_iso(config.tools.genisoimage, found.tree, label, path, config.timeouts.iso_s)
            self.cache.add_iso(key, path)
            size = os.path.getsize(path)
        else:
            size = tree.iso_size(config.tools.genisoimage, found.tree, label, config.timeouts.iso_s)
        if found.tree is not None and tree_path is None:
            disk.remove_soon(found.tree)
        job.export.images = job.images_expected
        job.sized(size)
        log.info("iso from the cache", extra={"fields": {
            "accessions": ",".join(job.accessions), "format": job.format, "bytes": size,
            "request_id": job.request_id}})
        return Iso(path, size, stem, job.accessions[0], folder, images=job.images_expected, archive=archive,
                   tree=tree_path)

    def read_back(self, job):
        """Every disc of a job read back as it will leave, before the job is ready (SPEC §4.6): the ISO
        as written, or the staged tree a ZIP's files are sent from, checked as mkiso-verify checks a
        disc (each file against SHA256.TXT, the DICOMDIR against the files).  Its time is the phase
        ``verify`` of a line of its own (the benchmark's read-back cost)."""
        job.step("verify")
        watch = logs.Stopwatch(self.metrics.phase)
        for disc in job.discs:
            try:
                if disc.read_back is not None:  # begun when its images were staged
                    report = disc.read_back.finish()
                else:
                    report = verify.check_apart(disc.tree if disc.archive is not None else disc.path,
                                                self.config.timeouts.iso_s, MAX_PROBLEMS_LOGGED)
            except errors.MkisoError:
                job.export.verified = False
                raise
            job.export.verified = report.ok  # the audit line says it (a streamed ISO's bytes have left)
            if not report.ok:
                for problem in report.problems:
                    log.error("read-back of disc %d: %s", disc.number, problem,
                              extra={"fields": {"request_id": job.request_id}})
                raise errors.MkisoError(
                    "Disc %d did not pass its read-back check (%s); it is not handed out."
                    % (disc.number, report.verdict.rsplit(": ", 1)[1]), code="disc_check_failed")
        watch.lap("verify")
        log.info("discs read back", extra={"fields": dict({
            "discs": len(job.discs), "format": job.format, "request_id": job.request_id}, **watch.fields)})

    def patient_name(self, studies):
        """The name a multi-study disc is called by: the patient API's, else the PACS'; None for a disc
        of several patients (``limits.allow_multi_patient``): no one patient's name fits it.

        The API's name only where it names the person the disc holds (accents, case and order aside):
        a file called after another patient than its DICOMDIR is the wrong disc in a clerk's hand.
        """
        if len({identity.of_study(study) for study in studies}) > 1:
            return None
        pacs_name = studies[0].patient_name
        api_name = self.patient_api.name(studies[0].accession)
        if api_name and not identity.same_person_name(api_name, pacs_name):
            log.warning("the patient API names another person than the PACS for accession %s (%d and %d "
                        "characters); the file is named after the PACS' name", studies[0].accession,
                        len(api_name), len(pacs_name))
            return pacs_name
        return api_name or pacs_name

    # -- print ------------------------------------------------------------

    def require_publisher(self):
        """503 when no publisher is configured: asked before a print job is queued, and when it runs."""
        if self.publisher is None:
            raise errors.Unavailable("Printing is not configured (publisher.host is empty).",
                                     code="publisher_not_configured")

    def print_studies(self, job):
        """Relay every image of the accessions to the publisher (SPEC §5); what went where goes on the export."""
        self.require_publisher()
        export = job.export
        watch = logs.Stopwatch(self.metrics.phase)
        with self.folder(job) as folder:
            try:
                studies = export.studies = self.find(job.accessions, folder)
                watch.lap("find")
                manifests = self.manifests(job, studies, folder)
                watch.lap("manifest")
                export.destination = self.publisher.peer.address
                with self.retrieved(job, studies, manifests) as files:
                    watch.lap("retrieve")
                    export.images = len(files)
                    sums = digests.sha256_of(received.path for received in files)  # as they arrived
                    watch.lap("digests")
                    job.step("send")
                    job.exporting()
                    sent = self.publisher.send(files, folder, functools.partial(check_unchanged, sums, export))
                    watch.lap("send")
                    discs = len(self.plan(files, media.capacity(self.config.iso)))
                    export.bytes = job.progress()["bytes_received"]
                    self.metrics.sent("publisher", export.bytes)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        log.info("sent to publisher", extra={"fields": dict({
            "accessions": ",".join(job.accessions), "studies": len(studies), "images": sent}, **watch.fields)})
        # The publisher composes its own discs; how many of iso.media it will need, as mkiso would split them.
        return {"status": "sent", "accessions": job.accessions, "studies": len(studies), "instances": sent,
                "discs": discs, "media": self.config.iso.media}

    # -- what the desk page shows ---------------------------------------------

    def describe(self, accessions, export):
        """What the PACS holds for the accessions (GET /api/studies): C-FINDs and manifests, no retrieval.

        The studies found go on ``export`` (the lookup's audit line).  A
        PACS that leaves ModalitiesInStudy empty (dcmqrscp does) is asked
        for its series' modalities instead: the clerk tells studies apart by them.
        """
        folder = self._scratch("studies-")
        try:
            export.destination = self.pacs.peer.address  # who was asked
            studies = export.studies = self.find(accessions, folder)
            described = []
            for study in studies:
                manifest = self.pacs.list_instances(study.study_uid, folder)
                described.append({
                    "accession": study.accession, "study_uid": study.study_uid,
                    "patient_name": study.patient_name, "patient_id": study.patient_id,
                    "date": study.study_date, "description": study.description,
                    "modalities": study.modalities or self.pacs.series_modalities(study.study_uid, folder),
                    "series": len(set(manifest.values())) if manifest is not None else None,
                    "images": len(manifest) if manifest is not None else study.instances,
                })
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return described


def _disc_path(folder, number, of, format):
    """Where a job's disc ``number`` of ``of`` is written (or, laid out over its tree, its head beside)."""
    return os.path.join(folder, "disc-%d.%s" % (number, format) if of > 1 else "disc." + format)


def check_unchanged(sums, export, pairs):
    """A print's check before each association (``publisher.send``): every file as storescu will read it
    has the SHA-256 its received file had when it arrived and passed the checks of SPEC §3 (``sums``).
    The audit line says whether it passed (``export.verified``)."""
    changed = digests.changed(pairs, sums)
    export.verified = not changed
    if changed:
        raise errors.MkisoError(
            "%d of these %d images changed on the gateway's disk after they arrived and were checked; "
            "none of them was sent." % (changed, len(pairs)), code="image_check_failed")
