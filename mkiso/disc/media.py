"""The medium (SPEC §10): what fits on a disc, how a request splits over several, which profile a disc has.

Capacity counts the whole disc in 2,048-byte sectors (ISO 9660 structures,
viewer, DICOMDIR, README.TXT) with ``iso.headroom_bytes`` kept free; a disc
is also never larger than ``iso.max_bytes``.  The plan here is made before
anything is written, from the files' sizes; every disc is then sized by
genisoimage itself, and a plan that was too hopeful is made again tighter.

Splitting keeps studies whole where it can (newest study first); a study
too big for one disc splits at series boundaries, a series too big at
images.  Each disc is complete: its own DICOMDIR, README.TXT, viewer.

The profile (PS3.11) follows the transfer syntaxes on the disc.  With
``iso.transcode: explicit-le`` compressed images are decompressed by dcmtk
first (dcmdjpeg, dcmdrle; dcmconv for other uncompressed encodings), so
that a CD is a conformant STD-GEN-CD; an image that cannot be decompressed
is an error naming its transfer syntax, never a silent copy.
"""

import dataclasses
import os

from .. import errors, process
from .tree import SECTOR, number_order, sectors

CAPACITY = {"cd": 700000000, "dvd": 4700000000, "dvd-dl": 8500000000, "bd": 25000000000, "none": None}
NAMES = {"cd": "CD", "dvd": "DVD", "dvd-dl": "dual-layer DVD", "bd": "Blu-ray disc", "none": "disc"}
# What one image costs beyond its own sectors: ISO 9660 + Rock Ridge + Joliet directory
# records and its DICOMDIR record (about 700 bytes measured; rounded up).
PER_IMAGE = 1024
# The ISO's own structures with an empty tree (genisoimage -J -r: 182 sectors), plus room for
# the DICOMDIR's patient/study/series records and README.TXT.
BASE = 190 * SECTOR + 64 * 1024

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
UNCOMPRESSED = {IMPLICIT_LE, EXPLICIT_LE, "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
JPEG = {"1.2.840.10008.1.2.4.%d" % n for n in (50, 51, 57, 70)}
JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
RLE = "1.2.840.10008.1.2.5"
NAMED = {EXPLICIT_LE: "Explicit VR Little Endian", IMPLICIT_LE: "Implicit VR Little Endian",
         "1.2.840.10008.1.2.2": "Explicit VR Big Endian", "1.2.840.10008.1.2.1.99": "Deflated Explicit VR LE",
         "1.2.840.10008.1.2.4.50": "JPEG Baseline", "1.2.840.10008.1.2.4.51": "JPEG Extended",
         "1.2.840.10008.1.2.4.57": "JPEG Lossless", "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
         "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless", "1.2.840.10008.1.2.4.81": "JPEG-LS Near-lossless",
         "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless", "1.2.840.10008.1.2.4.91": "JPEG 2000", RLE: "RLE Lossless"}


def syntax_name(uid):
    return "%s (%s)" % (NAMED[uid], uid) if uid in NAMED else uid


def capacity(iso):
    """The bytes one disc may hold under the ``iso`` config section."""
    medium = CAPACITY[iso.media]
    if medium is None:
        return iso.max_bytes
    return min(medium - iso.headroom_bytes, iso.max_bytes)


def describe(iso):
    """The medium in words, for errors: "CD (680000000 bytes usable)"."""
    return "%s (%d bytes usable)" % (NAMES[iso.media], capacity(iso))


# -- the plan --------------------------------------------------------------


def cost(received):
    return sectors(os.path.getsize(received.path)) + PER_IMAGE


class PerDisc:
    """What each disc holds besides the images for each study and each series on it (the web content).

    Counted once per disc: a study or series split over two discs costs on both.
    """

    def __init__(self, study_bytes=0, series_bytes=0):
        self.study_bytes = study_bytes
        self.series_bytes = series_bytes
        self.new_disc()

    def new_disc(self):
        self.studies, self.series = set(), set()

    def cost(self, group, alone=False):
        """The bytes ``group`` adds to the disc being filled (to an empty one with ``alone``)."""
        studies = {received.study_uid for received in group}
        series = {received.series_uid for received in group}
        if not alone:
            studies -= self.studies
            series -= self.series
        return len(studies) * self.study_bytes + len(series) * self.series_bytes

    def take(self, group):
        self.studies.update(received.study_uid for received in group)
        self.series.update(received.series_uid for received in group)


def plan(files, limit, fixed, per_disc=None):
    """Split ``files`` (ReceivedFile) into discs of at most ``limit`` bytes each.

    ``fixed`` is what every disc holds besides the images (ISO structures,
    viewer); ``per_disc`` (a PerDisc) what it holds for each of its studies
    and series.  Studies newest first; a study stays whole unless it alone
    is too big, then its series, then its images.  Returns a list of lists.

    Each file's size is asked as its group is weighed: one stat a file where
    its study fits on a disc, at most three where it is split.  Never a table
    of every file's cost: keyed by path it was 12 MB at 50,000 images, at
    the moment the job's peak RSS was measured (SPEC §8).
    """
    per_disc = per_disc or PerDisc()
    room = limit - fixed
    studies = {}
    for received in files:
        studies.setdefault(received.study_uid, []).append(received)
    ordered = sorted(studies.values(), key=lambda images: (images[0].study_date, images[0].study_time,
                                                          images[0].study_uid), reverse=True)
    discs, current, used = [], [], 0

    def new_disc():
        nonlocal current, used
        if current:
            discs.append(current)
        current, used = [], 0
        per_disc.new_disc()

    def place(group, size):
        nonlocal used
        more = per_disc.cost(group)
        if used + size + more > room:
            new_disc()
            more = per_disc.cost(group)
        current.extend(group)
        per_disc.take(group)
        used += size + more

    def fits(group, size):
        return size + per_disc.cost(group, alone=True) <= room

    for study in ordered:
        size = sum(cost(image) for image in study)
        if fits(study, size):
            place(study, size)
            continue
        series = {}
        for image in study:
            series.setdefault(image.series_uid, []).append(image)
        for images in sorted(series.values(), key=lambda group: (number_order(group[0].series_number),
                                                                 group[0].series_uid)):
            size = sum(cost(image) for image in images)
            if fits(images, size):
                place(images, size)
                continue
            for image in sorted(images, key=lambda item: (number_order(item.instance_number), item.sop_uid)):
                single = cost(image)
                if not fits([image], single):
                    raise errors.TooLarge(
                        "One image (%d bytes) does not fit on an empty disc of %d bytes." % (single, limit),
                        code="disc_too_large")
                place([image], single)
    new_disc()
    return discs


# -- the profile -------------------------------------------------------------


@dataclasses.dataclass
class Profile:
    name: str  # e.g. STD-GEN-CD: on a disc
    usb: str  # e.g. STD-GEN-USB: the same files as a ZIP, or on a USB stick (PS3.11, General Purpose USB)
    text: str  # README.TXT's line

    def of(self, format):
        """The profile's name for a disc made as ``format`` (iso or zip), for the job's JSON."""
        return self.usb if format == "zip" else self.name


def profile(transfer_syntaxes, media, private_classes=()):
    """The PS3.11 application profiles of a disc holding objects in ``transfer_syntaxes``: on a CD or
    DVD, and as a ZIP or on a USB stick.  README.TXT names both in one sentence: the ZIP holds the very
    bytes of the ISO (SPEC §13), README.TXT too, and a burned disc is often copied to a stick.

    Objects of private SOP classes kept on the disc (``iso.private_objects:
    keep``) fit no general-purpose profile: then the disc claims none.
    """
    syntaxes = set(transfer_syntaxes)
    optical = "CD" if media == "cd" else "DVD"
    if private_classes:
        return Profile("NONE", "NONE", "none: the disc holds objects of private SOP classes (%s), which no "
                       "general-purpose profile allows." % ", ".join(sorted(private_classes)))
    if syntaxes <= {EXPLICIT_LE}:
        return _general("STD-GEN-%s" % optical, "STD-GEN-USB", "uncompressed (Explicit VR Little Endian)")
    named = ", ".join(syntax_name(uid) for uid in sorted(syntaxes))
    if syntaxes <= JPEG:
        return _general("STD-GEN-DVD-JPEG", "STD-GEN-USB-JPEG", "with JPEG (%s)" % named)
    if syntaxes <= JPEG_2000:
        return _general("STD-GEN-DVD-J2K", "STD-GEN-USB-J2K", "with JPEG 2000 (%s)" % named)
    return Profile("NONE", "NONE", "none: the objects are in %s as received, which no single profile allows "
                   "(iso.transcode: explicit-le would make them uncompressed)." % named)


def _general(optical, usb, what):
    return Profile(optical, usb, "%s on a CD or DVD, %s on a USB stick or as a ZIP: General Purpose, %s."
                   % (optical, usb, what))


# -- transcoding ---------------------------------------------------------------


def transcode(files, folder, dcmtk_dir, timeout):
    """Every image as Explicit VR Little Endian: decompressed or re-encoded into ``folder`` by dcmtk.

    Returns the ReceivedFile list with paths and transfer syntax of the new files.
    """
    result = []
    for number, received in enumerate(files):
        uid = received.transfer_syntax
        if uid == EXPLICIT_LE:
            result.append(received)
            continue
        if uid in JPEG:
            tool = "dcmdjpeg"
        elif uid == RLE:
            tool = "dcmdrle"
        elif uid in UNCOMPRESSED:
            tool = "dcmconv"
        else:
            raise errors.MkisoError(
                "An image is in %s, which mkiso cannot decompress (iso.transcode: explicit-le handles JPEG "
                "and RLE); the disc was not made." % syntax_name(uid), code="cannot_transcode")
        target = os.path.join(folder, "%06d" % number)
        args = [os.path.join(dcmtk_dir, tool), "+te", received.path, target]
        outcome = process.run_step(args, timeout, tool, timeout_code="tool_timeout")
        if outcome.returncode != 0 or not os.path.exists(target):
            raise errors.MkisoError("%s could not decompress an image in %s: %s"
                                    % (tool, syntax_name(uid), process.failure_reason(outcome.output)),
                                    code="cannot_transcode")
        result.append(dataclasses.replace(received, path=target, transfer_syntax=EXPLICIT_LE))
    return result
