"""The disc's tree and its ISO: the staging tree, README.TXT, the DICOMDIR's making, the ISO image (SPEC §4).

``pdi`` follows PS3.10/PS3.11/PS3.12 and IHE PDI: the images under
DICOM/PATnnnnn/STUnnnnn/SERnnnnn/IMGnnnnn (file IDs of at most 8 characters
of A-Z 0-9 _, no extension), one DICOMDIR at the root referencing every
image, README.TXT and the viewer's files.  ``legacy`` reproduces the old
scripts: the viewer at the root and the received files in a folder DICOMDIR/.

The DICOMDIR is written in process from the header fields already read
(``mkiso.dicomdir``, linear time), or with ``iso.dicomdir: dcmmkdir`` by
dcmmkdir ``+I`` (missing StudyID, SeriesNumber or InstanceNumber are
invented rather than the image dropped), whose result is then read back:
every staged image must be referenced and every reference staged.
"""

import array
import dataclasses
import datetime
import hashlib
import itertools
import logging
import os
import re
import shutil
import struct
import unicodedata
import warnings
from typing import Callable, Optional

import pydicom

from .. import __version__, errors, fastcopy, process
from . import dicomdir, digests, records

log = logging.getLogger(__name__)

FILE_ID = re.compile(r"^[A-Z0-9_]{1,8}$")
PDI_RESERVED = {"DICOMDIR", "DICOM", "README.TXT", "INDEX.HTM", "IHE_PDI", digests.NAME}  # web content, SHA256.TXT
LEGACY_FOLDER = "DICOMDIR"
SECTOR = 2048
PLACE_CHUNK = 2000


def number_order(value):
    """The sort key of a SeriesNumber or InstanceNumber (None: missing): by number, the missing last."""
    return (value is None, value if value is not None else 0)


PDI_PATH = "DICOM/PAT%05d/STU%05d/SER%05d/IMG%05d"


class Placement:
    """A disc's images in PDI order, iterated as (received file, path on the disc).

    Kept as the files in order and their four folder numbers in an array,
    about 24 bytes an image; each path is made when asked for.  A list of
    50,000 (file, path) pairs would cost 150 bytes an image (SPEC §8, flat
    memory).  A sequence: iterable as often as needed, sized, indexed.
    """

    def __init__(self):
        self._images = []
        self._numbers = array.array("I")  # patient, study, series, image: four per image

    def append(self, image, numbers):
        self._images.append(image)
        self._numbers.extend(numbers)

    def __len__(self):
        return len(self._images)

    def __getitem__(self, at):
        at = range(len(self._images))[at]  # negative indexes; IndexError past the end
        return self._images[at], PDI_PATH % tuple(self._numbers[4 * at:4 * at + 4])

    def __iter__(self):
        return (self[at] for at in range(len(self._images)))


def pdi_paths(files):
    """(received file, path on the disc) for every image, in PDI order: a ``Placement``."""
    patients = {}
    for received in files:
        studies = patients.setdefault(received.patient, {})
        series = studies.setdefault(received.study_uid, {})
        series.setdefault(received.series_uid, []).append(received)
    placed = Placement()
    for p, studies in enumerate(patients.values(), start=1):
        for s, series in enumerate(studies.values(), start=1):
            ordered = sorted(series.values(), key=lambda images: (number_order(images[0].series_number),
                                                                  images[0].series_uid))
            for r, images in enumerate(ordered, start=1):
                images = sorted(images, key=lambda image: (number_order(image.instance_number), image.sop_uid))
                for i, image in enumerate(images, start=1):
                    placed.append(image, (p, s, r, i))
    return placed


def legacy_paths(files):
    """(received file, path on the disc): DICOMDIR/<name as received>."""
    placed, taken = [], set()
    for received in files:
        name = os.path.basename(received.path)
        while name in taken:
            name += "_"
        taken.add(name)
        placed.append((received, LEGACY_FOLDER + "/" + name))
    return placed


def viewer_paths(viewer_dir, reserved):
    """(source, path on the disc) for the viewer's files, at the disc root."""
    placed = []
    if not viewer_dir:
        return placed
    for folder, _, names in os.walk(viewer_dir):
        relative = os.path.relpath(folder, viewer_dir)
        for name in sorted(names):
            path = name if relative == "." else os.path.join(relative, name)
            if path.split(os.sep)[0].upper() in reserved:
                log.warning("viewer file %s clashes with the disc's own and is left out", path)
                continue
            placed.append((os.path.join(folder, name), path))
    return placed


def viewer_digest(viewer_dir):
    """What the viewer's content is, for the disc cache's key: each file's path, size and mtime."""
    digest = hashlib.sha256()
    for folder, names in sorted((folder, sorted(names)) for folder, _, names in os.walk(viewer_dir or "")):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            digest.update(("%s\0%d\0%d\n" % (os.path.join(folder, name), stat.st_size, stat.st_mtime_ns)).encode(
                "utf-8", "surrogateescape"))
    return digest.hexdigest()


def sectors(size):
    """``size`` bytes rounded up to whole 2,048-byte sectors, as a file takes them on a disc."""
    return -(-size // SECTOR) * SECTOR


def viewer_bytes(viewer_dir):
    """What the viewer's files take on a disc, in whole sectors."""
    return sum(sectors(os.path.getsize(os.path.join(folder, name)))
               for folder, _, names in os.walk(viewer_dir or "") for name in names)


PRIVACY = ("This disc holds personal health information. Keep it safe, and give it only to the patient "
           "or to those who treat the patient.")


def ascii_text(text):
    """``text`` as plain ASCII for README.TXT: accents dropped (a -> a), anything else a question mark."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).encode("ascii", "replace").decode("ascii")


def autorun_program(viewer_dir):
    """The program the viewer's AUTORUN.INF starts (its ``open=``, without arguments, as written
    there, e.g. ``VIEWER\\START.EXE``), or None: README.TXT and the web content both name it."""
    for entry in os.scandir(viewer_dir):
        if entry.is_file() and entry.name.upper() == "AUTORUN.INF":
            with open(entry.path, encoding="latin-1") as handle:
                for line in handle:
                    key, _, value = line.partition("=")
                    if key.strip().lower() == "open" and value.strip():
                        return value.strip().split()[0].strip('"')
    return None


def _some(names, shown=3):
    """A few file names for a sentence: "A, B and C", or "A, B, C and 4 more"."""
    if len(names) <= shown:
        return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))
    return "%s and %d more" % (", ".join(names[:shown]), len(names) - shown)


def viewer_sentence(viewer_dir):
    """What README.TXT says of the viewer: which program starts it, or that there is none."""
    if not viewer_dir:
        return ("There is no DICOM viewer on this disc: open it with any DICOM viewer, which finds everything "
                "through the DICOMDIR file at the root.")
    names = sorted(entry.name for entry in os.scandir(viewer_dir) if entry.is_file())
    program = autorun_program(viewer_dir)
    programs = [program] if program else [name for name in names if name.upper().endswith(".EXE")]
    if not programs:  # a placeholder (the demo's), or a viewer of no kind we can name: claim none
        given = " (of the hospital's viewer folder it holds only %s)" % _some(names) if names else ""
        return ("No viewer program is on this disc%s: open it with any DICOM viewer, which finds everything "
                "through the DICOMDIR file at the root." % given)
    started = " or ".join(programs)
    if program:
        return ("A DICOM viewer is on this disc: on Windows it starts by itself when the disc is inserted; "
                "if it does not, start %s at the root of the disc." % started)
    return "A DICOM viewer is on this disc: on Windows, start %s at the root of the disc." % started


@dataclasses.dataclass
class Readme:
    """What README.TXT says of one disc (SPEC §4.3): never the patient's name or ID."""

    studies: int
    series: int
    objects: int
    profile: str  # the profile's sentence (media.Profile.text)
    syntaxes: list  # the transfer syntaxes on the disc, named
    viewer_dir: str = ""
    institution: str = ""
    contact: str = ""
    number: int = 1
    of: int = 1
    omitted: list = dataclasses.field(default_factory=list)  # SOP class UIDs of objects left off, one per object

    def text(self):
        lines = []
        if self.institution:
            lines.append("Institution: " + self.institution)
        if self.contact:
            lines.append("Contact: " + self.contact)
        lines.append("This disc holds %d DICOM stud%s with %d series and %d objects (images and documents); "
                     "the DICOMDIR file at the root lists every one." % (
                         self.studies, "y" if self.studies == 1 else "ies", self.series, self.objects))
        if self.of > 1:
            lines.append("This is disc %d of %d; each disc can be read on its own." % (self.number, self.of))
        lines.append("DICOM media profile: " + self.profile)
        lines.append("Transfer syntaxes: %s." % ", ".join(self.syntaxes))
        lines.extend(records.told(self.omitted))
        lines.append(viewer_sentence(self.viewer_dir))
        lines.append(PRIVACY)
        lines.append("Made by mkiso %s on %s UTC." % (
            __version__, datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")))
        return "".join(ascii_text(line) + "\r\n" for line in lines)


def stage(staging, files, layout, viewer_dir, readme=None):
    """Lay a disc out in ``staging`` (README.TXT from ``readme``, pdi only); returns (received file, disc path)
    of its images: a ``Placement`` for pdi."""
    if layout == "pdi":
        images, reserved = pdi_paths(files), PDI_RESERVED
    else:
        images, reserved = legacy_paths(files), {LEGACY_FOLDER, digests.NAME}
    viewer = viewer_paths(viewer_dir, reserved)
    folders = {os.path.dirname(path) for _, path in images} | {os.path.dirname(path) for _, path in viewer}
    for folder in sorted(folders - {""}):
        os.makedirs(os.path.join(staging, folder), exist_ok=True)
    # PLACE_CHUNK files a call: the whole tree's paths at once, twice over in the extension, would cost
    # more memory than the job's own records of 50,000 images (SPEC §8, flat memory).
    pairs = iter(images)
    while True:
        chunk = [(received.path, path) for received, path in itertools.islice(pairs, PLACE_CHUNK)]
        if not chunk:
            break
        _place(staging, chunk)
    _place(staging, viewer)
    if layout == "pdi":
        with open(os.path.join(staging, "README.TXT"), "w", encoding="ascii", newline="") as handle:
            handle.write(readme.text())
    return images


def _place(staging, pairs):
    """(source, path on the disc) pairs placed under ``staging``, in one call of the extension."""
    fastcopy.place_files([(source, os.path.join(staging, path)) for source, path in pairs])


def make_dicomdir(staging, images, how, dcmmkdir, timeout, file_set_id):
    """The DICOMDIR at the root of ``staging``: written here (``builtin``) or by dcmmkdir."""
    if how == "builtin":
        dicomdir.write(os.path.join(staging, "DICOMDIR"), images, file_set_id)
        return
    run_dcmmkdir(staging, dcmmkdir, timeout, file_set_id)
    check_dicomdir(staging, [path for _, path in images])


def run_dcmmkdir(staging, dcmmkdir, timeout, file_set_id):
    """Run dcmmkdir over DICOM/ in the staging tree."""
    args = [dcmmkdir, "+I", "-Nxc", "-Nec", "-Nrc", "+F", file_set_id, "-nb", "+r", "+D", "DICOMDIR", "DICOM"]
    result = process.run_step(args, timeout, "dcmmkdir", cwd=staging, timeout_code="tool_timeout")
    if result.returncode != 0 or not os.path.exists(os.path.join(staging, "DICOMDIR")):
        raise errors.MkisoError("dcmmkdir could not make the DICOMDIR: %s" % process.failure_reason(result.output),
                                code="dicomdir_failed")


def check_dicomdir(staging, image_paths):
    """Every image referenced once, every reference an image, IDs well-formed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pydicom 2.x: its DicomDir class
        dicomdir = pydicom.dcmread(os.path.join(staging, "DICOMDIR"))
    referenced = []
    for record in dicomdir.DirectoryRecordSequence:
        file_id = record.get("ReferencedFileID")
        if file_id is None:
            continue
        parts = [file_id] if isinstance(file_id, str) else list(file_id)
        if len(parts) > 8 or not all(FILE_ID.match(part) for part in parts):
            raise errors.MkisoError("The DICOMDIR has an invalid file ID %s." % "\\".join(parts),
                                    code="dicomdir_failed")
        referenced.append("/".join(parts))
    if len(referenced) != len(image_paths) or set(referenced) != set(image_paths):
        raise errors.MkisoError(
            "The DICOMDIR references %d files but the disc holds %d DICOM objects."
            % (len(referenced), len(image_paths)),
            code="dicomdir_failed")


FILE_SET_ID = 16  # characters: a CS value (PS3.3 F.3.2.1), and the ISO's Volume Identifier (PS3.12 F.1.1)


def volume_label(configured, accessions):
    """The set's File-set ID and Volume Identifier: 1-16 of A-Z 0-9 _ (MR.180505.026 -> MR_180505_026)."""
    label = configured or (accessions[0] if len(accessions) == 1 else "MKISO")
    label = re.sub(r"[^A-Z0-9_]", "_", label.upper())[:FILE_SET_ID]
    return label or "MKISO"


def disc_label(label, number, of):
    """Disc ``number`` of ``of``'s File-set ID and Volume Identifier: numbered when there are several."""
    if of == 1:
        return label
    suffix = "_%d" % number
    return label[:FILE_SET_ID - len(suffix)] + suffix


def genisoimage_args(genisoimage, staging, label, number=1, of=1):
    args = [genisoimage, "-quiet", "-J", "-joliet-long", "-r", "-input-charset", "utf-8",
            "-V", disc_label(label, number, of)]
    if of > 1:  # the set's name; its size and this disc's number: set_volume_sequence (genisoimage can't)
        args += ["-volset", label]
    return args + [staging]


def set_volume_sequence(iso_path, number, of):
    """Write the ISO 9660 volume set size and sequence number into every volume descriptor.

    genisoimage refuses -volset-size above 1 ("not yet supported"), so the
    fields (ECMA-119 8.4.16-17: 16-bit, both byte orders, at offsets 120 and
    124 of the primary and each supplementary descriptor) are set here.
    """
    with open(iso_path, "r+b") as handle:
        for sector in range(16, 64):
            handle.seek(sector * SECTOR)
            head = handle.read(6)
            if len(head) < 6 or head[1:6] != b"CD001" or head[0] == 255:
                return
            if head[0] in (1, 2):  # primary, supplementary (Joliet)
                handle.seek(sector * SECTOR + 120)
                handle.write(struct.pack("<H", of) + struct.pack(">H", of)
                             + struct.pack("<H", number) + struct.pack(">H", number))


def iso_size(genisoimage, staging, label, timeout, number=1, of=1):
    """The exact size the ISO will have, from genisoimage -print-size."""
    args = genisoimage_args(genisoimage, staging, label, number, of)
    result = process.run_step(args[:1] + ["-print-size"] + args[1:], timeout, "genisoimage",
                              timeout_code="tool_timeout")
    sectors = re.findall(r"^\s*(\d+)\s*$", result.output, re.M)
    if result.returncode != 0 or not sectors:
        raise errors.MkisoError("genisoimage could not size the disc: %s" % process.failure_reason(result.output),
                                code="iso_failed")
    return int(sectors[-1]) * SECTOR


def read_iso(genisoimage, staging, label, read, timeout, number=1, of=1):
    """What ``read(stream)`` makes of the ISO of ``staging`` as genisoimage writes it to a pipe; it
    takes only what it needs (``isoimage``: the part before the first file's bytes), and genisoimage
    is stopped then.  ``read`` returns None when the image ended before that: genisoimage failed."""
    args = genisoimage_args(genisoimage, staging, label, number, of)
    with process.step_errors("genisoimage", timeout, "tool_timeout"):
        value, result = process.run_reading(args, timeout, read)
    if value is None:
        raise errors.MkisoError("genisoimage failed: %s" % process.failure_reason(result.output), code="iso_failed")
    return value


def make_iso(genisoimage, staging, label, iso_path, timeout, number=1, of=1, on_tick=None):
    """Write the ISO of ``staging``: disc ``number`` of a set of ``of``.

    genisoimage writes its output front to back, never going back (it can
    write to a pipe), so what the file holds while it runs is final: a
    download may send it as it grows (``on_tick`` is called while it runs).
    """
    args = genisoimage_args(genisoimage, staging, label, number, of)
    result = process.run_step(args[:1] + ["-o", iso_path] + args[1:], timeout, "genisoimage",
                              timeout_code="tool_timeout", on_tick=on_tick)
    if result.returncode != 0 or not os.path.exists(iso_path):
        if "No space left" in result.output:
            raise errors.InsufficientStorage("The work dir ran out of space while writing the ISO.")
        raise errors.MkisoError("genisoimage failed: %s" % process.failure_reason(result.output), code="iso_failed")
    if of > 1:
        set_volume_sequence(iso_path, number, of)


def patient_stem(person_name):
    """The file name a disc is called by after its patient: 'Müller^Jürgen' -> 'Müller_Jürgen' (the
    alphabetic group, its components joined)."""
    alphabetic = person_name.split("=")[0]
    return "_".join(part.strip() for part in alphabetic.split("^") if part.strip())


@dataclasses.dataclass(eq=False)
class Iso:
    """One disc's ISO or ZIP, waiting to be sent (``path`` None: sized, not built); ``cleanup`` removes the
    job's folder.

    A ZIP (``archive``, a ``ziparchive.Archive``), or the ISO of a streamed
    download laid out by ``isoimage`` (an ``isoimage.Image``), is sent from
    its staged ``tree``; ``path`` is where its file goes if one is written
    (for nginx).

    ``size`` is genisoimage's -print-size, which the written file must
    match.  A job split over several discs has one Iso each (``number`` of
    ``of``), all in the one job folder, each named ``<stem>_disc<n>``.
    ``write`` is the last step, genisoimage, when it is left to run while
    the answer goes out (a synchronous download, SPEC §8); ``build`` (a
    ``delivery.Build``) is that step running.
    """

    path: Optional[str]
    size: int
    stem: str
    fallback_stem: str
    folder: str
    images: int = 0
    number: int = 1
    of: int = 1
    profile: Optional[str] = None  # the media profile's name and the volume (File-set ID): None from the cache
    volume: Optional[str] = None
    write: Optional[Callable] = dataclasses.field(default=None, repr=False)
    build: object = dataclasses.field(default=None, repr=False)
    archive: object = dataclasses.field(default=None, repr=False)
    tree: Optional[str] = None
    read_back: object = dataclasses.field(default=None, repr=False)  # begun when it was staged (verify.Ahead)

    @property
    def format(self):
        """The medium's format, as the job's JSON and the links say it: ``iso`` or ``zip``."""
        return "iso" if self.archive is None else self.archive.format

    def __post_init__(self):
        if self.of > 1:
            self.stem = "%s_disc%d" % (self.stem, self.number)
            self.fallback_stem = "%s_disc%d" % (self.fallback_stem, self.number)

    def cleanup(self):
        """Remove the job folder; an ISO still being written is given up first, and goes when it stopped."""
        if self.build is None:
            self._remove()
        else:
            self.build.give_up()
            self.build.when_ended(self._remove)

    def _remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)
