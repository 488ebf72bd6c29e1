"""Retrieving one study from the PACS, shared by every job that wants it.

Concurrent jobs for the same study must not each ask for a C-MOVE: the
images all land in the one receiver folder for that Study Instance UID.  So
the first job runs the retrieval and the others wait for it and share its
files; the folder goes when the last of them lets go.

Nothing leaves here unchecked: the C-MOVE's final status and sub-operation
counts, the number of files against what the PACS promised, and every
file's StudyInstanceUID and PatientID against the C-FIND answer.  An
incomplete or mixed-up study is an error, never a partial disc.
"""

import logging
import os
import shutil
import tempfile
import threading

import pydicom

from . import errors

log = logging.getLogger(__name__)

HEADER_TAGS = [
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "InstanceNumber", "SOPInstanceUID",
]


class ReceivedFile:
    """An image as received, with the header fields the disc layout needs."""

    def __init__(self, path, patient_id, study_uid, series_uid, series_number, instance_number, sop_uid):
        self.path = path
        self.patient_id = patient_id
        self.study_uid = study_uid
        self.series_uid = series_uid
        self.series_number = series_number
        self.instance_number = instance_number
        self.sop_uid = sop_uid


def read_received(path):
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except Exception as exc:  # pydicom raises many kinds on a broken file
        raise errors.UpstreamFailed(
            "A received image could not be read as DICOM (%s); the disc was not made." % exc,
            code="bad_image")
    return ReceivedFile(
        path=path,
        patient_id=str(header.get("PatientID", "") or ""),
        study_uid=str(header.get("StudyInstanceUID", "") or ""),
        series_uid=str(header.get("SeriesInstanceUID", "") or ""),
        series_number=_number(header.get("SeriesNumber")),
        instance_number=_number(header.get("InstanceNumber")),
        sop_uid=str(header.get("SOPInstanceUID", "") or ""),
    )


def _number(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def verify(study, move, paths):
    """Check a finished C-MOVE and its files against the C-FIND answer."""
    what = "accession %s (study %s)" % (study.accession, study.study_uid)
    if not move.succeeded:
        raise errors.UpstreamFailed(
            "The PACS did not deliver %s completely: %s; %s sent, %s failed."
            % (what, move.status_text, move.completed, move.failed), code="incomplete_study")
    if not paths:
        raise errors.UpstreamFailed("The PACS sent no images for %s." % what, code="incomplete_study")
    counted = move.completed is not None or move.warning is not None
    if counted and move.delivered != len(paths):
        raise errors.UpstreamFailed(
            "The PACS reported %d images sent for %s but %d arrived." % (move.delivered, what, len(paths)),
            code="incomplete_study")
    if study.instances is not None and study.instances != len(paths):
        raise errors.UpstreamFailed(
            "The PACS lists %d images for %s but %d arrived." % (study.instances, what, len(paths)),
            code="incomplete_study")
    files = [read_received(path) for path in paths]
    for received in files:
        if received.study_uid != study.study_uid:
            raise errors.UpstreamFailed(
                "An image received for %s belongs to another study; the disc was not made." % what,
                code="wrong_study")
        if received.patient_id != study.patient_id:
            raise errors.UpstreamFailed(
                "An image received for %s carries another Patient ID than the PACS' C-FIND answer; "
                "the disc was not made." % what, code="wrong_patient")
    return files


class Retrieval:
    """One study's C-MOVE and verified files; shared while anyone uses it."""

    def __init__(self, study, folder):
        self.study = study
        self.folder = folder
        self.files = []
        self.error = None
        self.users = 0
        self.done = threading.Event()


class Retrievals:
    def __init__(self, pacs, receiver, root):
        self.pacs = pacs
        self.receiver = receiver
        self.root = root
        self._running = {}
        self._lock = threading.Lock()

    def get(self, study):
        """The study's verified files: retrieved now, or by a job already at it.

        The caller must ``release`` what it got.
        """
        with self._lock:
            retrieval = self._running.get(study.study_uid)
            owner = retrieval is None
            if owner:
                retrieval = Retrieval(study, tempfile.mkdtemp(prefix="study-", dir=self.root))
                self._running[study.study_uid] = retrieval
            retrieval.users += 1
        if owner:
            try:
                self._retrieve(retrieval)
            except BaseException as exc:
                retrieval.error = exc
            finally:
                with self._lock:
                    del self._running[study.study_uid]
                retrieval.done.set()
        else:
            retrieval.done.wait()
        if retrieval.error is not None:
            self.release(retrieval)
            raise retrieval.error
        return retrieval

    def release(self, retrieval):
        with self._lock:
            retrieval.users -= 1
            last = retrieval.users == 0
        if last:
            shutil.rmtree(retrieval.folder, ignore_errors=True)

    def _retrieve(self, retrieval):
        study = retrieval.study
        received = os.path.join(retrieval.folder, "received")
        self.receiver.expect(study.study_uid)
        try:
            move = self.pacs.move_study(study.study_uid)
        except BaseException:
            self.receiver.forget(study.study_uid)
            raise
        self.receiver.collect(study.study_uid, received)
        paths = sorted(entry.path for entry in os.scandir(received) if entry.is_file())
        retrieval.files = verify(study, move, paths)
        log.info("study retrieved", extra={"fields": {
            "accession": study.accession, "study_uid": study.study_uid, "images": len(paths)}})
