"""A job: accession numbers in, a checked disc (or relayed images) out.

find every study (404 names the accession without one), refuse a mix of
patients (409), retrieve each study once (shared with concurrent jobs),
stage the disc, make and check the DICOMDIR, size it (413/507), build the
ISO.  A job owns one folder under the work dir; it is removed on any
failure, and on success when the ISO's response is closed.
"""

import errno
import logging
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager

from . import delivery, disc, disk, errors, logs
from .retrieval import Retrievals

log = logging.getLogger(__name__)

RETRY_AFTER_S = 30


class Iso:
    """A finished ISO waiting to be sent (``path`` None: sized, not built); ``cleanup`` removes the job folder."""

    def __init__(self, path, size, stem, fallback_stem, folder):
        self.path = path
        self.size = size
        self.stem = stem
        self.fallback_stem = fallback_stem
        self.folder = folder

    def cleanup(self):
        shutil.rmtree(self.folder, ignore_errors=True)


class Jobs:
    def __init__(self, config, pacs, receiver, jobs_dir, retrievals_dir, publisher, patient_api):
        self.config = config
        self.pacs = pacs
        self.publisher = publisher
        self.patient_api = patient_api
        self.jobs_dir = jobs_dir
        self.retrievals = Retrievals(pacs, receiver, retrievals_dir, config.limits.min_free_bytes)
        self._slots = threading.BoundedSemaphore(config.limits.max_jobs)

    @contextmanager
    def job(self, request_id):
        """A job slot and folder; 503 when all slots are taken.

        The folder is removed if the job fails; on success it holds the
        result and the caller removes it once the result is delivered.
        """
        if not self._slots.acquire(blocking=False):
            raise errors.Unavailable(
                "All %d job slots are busy; try again shortly." % self.config.limits.max_jobs,
                code="busy", retry_after=RETRY_AFTER_S)
        folder = None
        try:
            self.check_free_space()
            try:
                folder = tempfile.mkdtemp(prefix="job-%s-" % request_id[:32], dir=self.jobs_dir)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                raise errors.Unavailable(
                    "The work dir %s is not writable (%s); no disc can be made until it is."
                    % (self.jobs_dir, exc.strerror), code="work_dir_unwritable")
            yield folder
        except BaseException:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            self._slots.release()

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
        self.check_one_patient(studies)
        return studies

    def check_one_patient(self, studies):
        patients = {study.patient_id for study in studies}
        if len(patients) > 1 and not self.config.limits.allow_multi_patient:
            raise errors.Conflict(
                "The accession numbers %s belong to %d different patients; one disc holds one patient."
                % (", ".join(sorted({s.accession for s in studies})), len(patients)))

    @contextmanager
    def retrieved(self, studies):
        """Every study's verified files, released when the block ends."""
        held = []
        try:
            for study in studies:
                held.append(self.retrievals.get(study))
            yield [received for retrieval in held for received in retrieval.files]
        finally:
            for retrieval in held:
                self.retrievals.release(retrieval)

    def check_free_space(self, needed=0):
        free = disk.free_bytes(self.jobs_dir)
        wanted = needed + self.config.limits.min_free_bytes
        if free < wanted:
            raise errors.InsufficientStorage(
                "The work dir has %d bytes free; this needs %d (including limits.min_free_bytes)." % (free, wanted))

    # -- the download -----------------------------------------------------

    def make_iso(self, accessions, request_id, named_by_patient, export, build=True):
        """Build the disc for ``accessions``; the caller sends and cleans up the Iso.

        The file is named after the accession, or with ``named_by_patient``
        after the patient.  Without ``build`` (a HEAD) everything is done
        and checked up to the ISO's exact size, and no ISO is written.
        What was found goes on ``export`` (audit.Export) as it is known.
        """
        with self.job(request_id) as folder:
            try:
                return self._make_iso(accessions, folder, named_by_patient, build, export)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise errors.InsufficientStorage("The work dir ran out of space while making the disc.")
                raise

    def _make_iso(self, accessions, folder, named_by_patient, build, export):
        config = self.config
        watch = logs.Stopwatch()
        studies = export.studies = self.find(accessions, folder)
        watch.lap("find")
        staging = os.path.join(folder, "disc")
        os.mkdir(staging)
        with self.retrieved(studies) as files:
            watch.lap("retrieve")
            images = disc.stage(staging, files, studies, config.iso.layout, config.iso.viewer_dir)
            export.images = len(images)
        watch.lap("stage")
        if config.iso.layout == "pdi":
            dcmmkdir = os.path.join(config.tools.dcmtk_dir, "dcmmkdir")
            disc.make_dicomdir(staging, images, config.iso.dicomdir, dcmmkdir, config.timeouts.iso_s)
            watch.lap("dicomdir")
        label = disc.volume_label(config.iso.volume_label, accessions)
        size = disc.iso_size(config.tools.genisoimage, staging, label, config.timeouts.iso_s)
        watch.lap("size")
        if size > config.iso.max_bytes:
            raise errors.TooLarge("The disc would hold %d bytes, more than iso.max_bytes %d."
                                  % (size, config.iso.max_bytes))
        self.check_free_space(size)
        iso_path = None
        if build:
            iso_path = os.path.join(folder, "disc.iso")
            disc.make_iso(config.tools.genisoimage, staging, label, iso_path, config.timeouts.iso_s)
            watch.lap("iso")
        shutil.rmtree(staging)
        log.info("iso built", extra={"fields": dict({
            "accessions": ",".join(accessions), "studies": len(studies), "images": len(images),
            "bytes": size}, **watch.fields)})
        stem = delivery.patient_stem(self.patient_name(studies)) if named_by_patient else accessions[0]
        return Iso(iso_path, os.path.getsize(iso_path) if build else size, stem, accessions[0], folder)

    def patient_name(self, studies):
        """The name a multi-study disc is called by: the patient API's, else the PACS'."""
        return self.patient_api.name(studies[0].accession) or studies[0].patient_name

    # -- print ------------------------------------------------------------

    def print_studies(self, accessions, request_id, export):
        """Relay every image of the accessions to the publisher (SPEC §5); what went where goes on ``export``."""
        if self.publisher is None:
            raise errors.Unavailable("Printing is not configured (publisher.host is empty).",
                                     code="publisher_not_configured")
        with self.job(request_id) as folder:
            try:
                studies = export.studies = self.find(accessions, folder)
                peer = self.publisher.peer
                export.destination = "%s@%s:%s" % (peer.ae_title, peer.host, peer.port)
                with self.retrieved(studies) as files:
                    export.images = len(files)
                    sent = self.publisher.send(files, folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        log.info("sent to publisher", extra={"fields": {
            "accessions": ",".join(accessions), "studies": len(studies), "images": sent}})
        return {"status": "sent", "accessions": accessions, "studies": len(studies), "instances": sent}
