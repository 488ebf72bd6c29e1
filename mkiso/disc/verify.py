"""mkiso-verify: a disc, a ZIP or a USB stick that proves itself (SPEC §4.6).

Every medium mkiso makes carries SHA256.TXT at its root: one line per other
file, ``<sha256 hex>  <path>`` as sha256sum writes it.  ``check(path)``
reads an ISO file, a ZIP file or a folder (a mounted disc or stick, an
extracted ZIP) and holds it against that list and against its DICOMDIR:

- every listed file present with that digest, and no file that is not listed
  (SHA256.TXT itself aside);
- every file the DICOMDIR references present (its file ID matched without
  regard to case: FAT and Joliet may show 8.3 names in either), readable as
  DICOM, and holding the SOP Instance UID its record names; no file under
  the File-set's folders (``DICOM/``) that the DICOMDIR leaves out.

It names each problem by its path only: never a patient's name or ID.

Built for speed (the read-back of a 10,000-image disc within 2 s, before a
job's disc is ``ready``): the ISO is never mounted and no tool runs per
file.  Its ISO 9660 directory is read here (the Rock Ridge names, else the
Joliet ones, so a viewer's long names come out as on the disc) and each
file's extent is read from the image with one ``pread``; a ZIP's stored
entries likewise by offset (a DEFLATEd one through zipfile); a folder by
os.walk.  Files are read in the image's order by a few threads: hashlib and
``pread`` release the GIL, so two cores hash at once.  pydicom would take
longer than the whole budget on the DICOMDIR (1 s for 10,000 records) and
the headers (0.2-0.3 ms a file), so both are read here where they are
plain explicit VR little endian (all that PS3.10 allows for a DICOMDIR,
nearly every image), and anything else is left to pydicom.

Run as ``mkiso-verify PATH`` (or ``python3 -m mkiso.disc.verify``): one line
per problem, a last line with the verdict and the counts; exit 0 when all
holds, 1 when a problem was found, 2 when PATH is neither an ISO file, a
ZIP file nor a folder.

The service begins the read-back of a disc sent from its staged folder (a
ZIP, a streamed download's ISO laid out over it) as soon as the images are
staged (``Ahead``, SPEC §8.1), on the core the DICOMDIR, SHA256.TXT and
the ISO's layout leave idle.  An image that was digested as it arrived
(``digests.keep``: the digest kept on the file with its size and time) is
taken from that digest and its first bytes (its SOP Instance UID), where
it still has that size and time and its status had not changed since
either when the service checked it after the last image (``received.Early``
drops the digest of one that had: read again); every other file is read
whole.  Reading each image a second time, a moment after it arrived, took
longer than the whole answer's margin (1.7 s of 1.3 GB at 10,000 images,
both cores busy) and proved nothing the file's identity does not.  When
the disc is complete, the whole check runs as always, each file taken from
that first look only where it is the same file, unchanged since: the same
inode, size, modification and status change times (a write, a rename over
it, a time set back: each moves the status change time, which no one can
set).  One change of the status change time is the service's own: the
received folder the staged files are linked from is removed meanwhile,
which lowers their link count; a file with fewer links and its inode, size
and modification time is taken as read.  What this leaves unseen: a
rewrite with its time set back in the moment between that check and the
staging, by a process with the service's own rights (which could as well
rewrite SHA256.TXT).  ``mkiso-verify PATH``, run by a person, reads every
byte.
"""

import argparse
import concurrent.futures
import dataclasses
import hashlib
import io
import os
import re
import struct
import sys
import threading
import time
import warnings
import zipfile

import pydicom

from .. import errors, process
from . import digests

MANIFEST = "SHA256.TXT"
DICOMDIR = "DICOMDIR"
BLOCK = 4 << 20  # bytes a read: a file larger than this is hashed in pieces
HEAD = 16 << 10  # bytes of an image read for its SOP Instance UID where its digest is the one it arrived with
BATCH = 256  # files a thread takes at a time, in the medium's order
THREADS = min(2, os.cpu_count() or 1)
MANIFEST_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
DIRECTORY_PIECE = 64 * 2048  # bytes of a directory read at a time (records never cross a sector)
MULTI_EXTENT = "a file of several extents (over 4 GiB), which mkiso's discs never hold"
COMPLETE = b"check\n"  # what ``Ahead.finish`` writes to its marker: the medium is complete, check it
READ_AHEAD = "mkiso-verify: read ahead: "  # the line the child prints once it waits for that marker
WAIT_S = 0.01  # between looks for that marker


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with the medium: what (``missing``, ``changed``, ...), which path, and why."""

    kind: str
    path: str
    why: str = ""

    def __str__(self):
        return "%s: %s%s" % (self.kind, self.path, " (%s)" % self.why if self.why else "")


@dataclasses.dataclass
class Report:
    """What ``check`` found: the problems, the files on the medium and the DICOM objects its DICOMDIR lists."""

    problems: list
    files: int
    objects: int

    @property
    def ok(self):
        return not self.problems

    def verdict(self):
        if self.ok:
            return "mkiso-verify: OK: %s, %s, all as listed" % (
                _counted(self.files, "file"), _counted(self.objects, "DICOM object"))
        return "mkiso-verify: FAILED: %s in %s" % (
            _counted(len(self.problems), "problem"), _counted(self.files, "file"))


def _counted(number, noun):
    return "%s %s%s" % (format(number, ","), noun, "" if number == 1 else "s")


@dataclasses.dataclass(slots=True)
class Entry:
    """A file on the medium: its path there ('/' separators) and where its bytes are.

    ``offset`` is into the ISO or ZIP file (None for a folder's file, which
    is opened by ``source``); ``member`` a ZIP entry zipfile must inflate;
    ``damage`` why its bytes cannot be read at all (found while listing)."""

    path: str
    size: int
    offset: int = None
    source: str = ""
    member: zipfile.ZipInfo = None
    damage: str = ""
    identity: tuple = None  # a folder's file: (inode, size, modification time, status change time, links)


def check(path, threads=THREADS, read=None):
    """Check the medium at ``path`` (an ISO file, a ZIP file or a folder): a ``Report``.

    ``read`` (from ``read_ahead``) holds a folder's files as read before:
    each is taken from it where it is the same file, unchanged.
    Raises MkisoError (``not_a_medium``) when ``path`` is none of the three.
    """
    medium = open_medium(path)
    if read is not None and isinstance(medium, Folder):
        medium.known = read
    try:
        return _check(medium, threads)
    finally:
        medium.close()


def read_ahead(path, threads=THREADS):
    """Every file now in the folder ``path`` as ``check`` reads it: {path on the medium: (identity, what
    ``Medium.read_all`` finds)}, for ``check`` to take where nothing changed since.  An image the
    service digested as it arrived is taken from that digest, kept on it (``digests.kept_on``: its size
    and time as then), and its first bytes; every other file is read whole."""
    medium = Folder(path)
    entries = list(medium.entries.values())
    found = {}
    for entry in entries:
        arrived = medium.as_arrived(entry)
        if arrived is not None:
            found[entry.path] = arrived
    found.update(medium.read_all([entry for entry in entries if entry.path not in found],
                                 {entry.path for entry in entries}, threads))
    return {entry.path: (entry.identity, found[entry.path]) for entry in entries
            if entry.identity is not None and not found[entry.path][2]}


@dataclasses.dataclass
class Verdict:
    """What a read-back in a child process said: its last line, and its first problem lines."""

    ok: bool
    verdict: str
    problems: list


def check_apart(path, timeout, problems_kept=20, after=None, has_read=None):
    """``check`` in a child process (``python3 -m mkiso.disc.verify PATH``): the service's read-back.

    Its records, about 1 KB a file on the medium, stay out of the server,
    whose memory must not grow with the disc (SPEC §8: a 20,000-image disc
    checked in the server grew its peak by 25 MB per 10,000 images); the
    child is gone with its verdict.  A child that gives none (killed, a
    medium it cannot read) is an error, never a pass.  With ``after`` (a
    marker file), the child reads the folder ``path`` at once and checks it
    once the marker says it is complete (``Ahead``); the event ``has_read``
    is set when it has read what was there.
    """
    problems = []

    def seen(line):
        if has_read is not None and line.startswith(READ_AHEAD):
            has_read.set()
        if len(problems) < problems_kept and not line.startswith("mkiso-verify: "):
            problems.append(line.rstrip("\n"))

    waits = ["--after", after] if after is not None else []
    result = process.run([sys.executable, "-m", __name__] + waits + [path], timeout, on_line=seen)
    lines = result.output.splitlines()
    verdict = lines[-1] if lines else ""
    if result.returncode not in (0, 1) or not verdict.startswith("mkiso-verify: "):
        raise errors.MkisoError("The disc could not be read back (%s)." % (verdict or "no verdict")[:200],
                                code="disc_check_failed")
    return Verdict(result.returncode == 0, verdict, problems)


class Ahead:
    """A disc's read-back begun as soon as its images are staged in ``path`` (a folder), finished when
    the disc is complete (``finish``): the images' bytes are read meanwhile (see the module's text).

    The child waits for the marker file ``marker`` (outside the medium);
    ``abandon`` tells it the disc is read back another way (its ISO, as
    written).  A child never told either ends when ``path`` is removed
    (the job failed: its folder goes), when the job is cancelled (it is the
    job's tool) or at ``timeout``.
    """

    def __init__(self, path, marker, timeout, problems_kept=20):
        self._marker = marker
        self._verdict = self._error = None
        self._done = threading.Event()
        self.read = threading.Event()  # set once the child has read the files staged so far
        owner = process.current_owner()
        threading.Thread(target=self._run, args=(path, timeout, problems_kept, owner), name="read-back",
                         daemon=True).start()

    def _run(self, path, timeout, problems_kept, owner):
        try:
            with process.owned_by(owner):  # a cancel of the job kills it
                self._verdict = check_apart(path, timeout, problems_kept, after=self._marker, has_read=self.read)
        except BaseException as exc:
            self._error = exc
        self._done.set()

    def _tell(self, word):
        """Put ``word`` in the marker whole: the child may look while it is written (renamed in)."""
        with open(self._marker + ".new", "wb") as handle:
            handle.write(word)
        os.replace(self._marker + ".new", self._marker)

    def finish(self):
        """The disc is complete: its ``Verdict`` (as ``check_apart``'s, and its errors)."""
        self._tell(COMPLETE)
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._verdict

    def abandon(self):
        self._tell(b"stop\n")


def _wait_for(marker, path):
    """Whether the marker says the medium at ``path`` is complete; False when told to stop or when the
    medium is gone."""
    while True:
        try:
            with open(marker, "rb") as handle:
                return handle.read() == COMPLETE
        except FileNotFoundError:
            if not os.path.isdir(path):
                return False
        time.sleep(WAIT_S)


def _check(medium, threads):
    problems = list(medium.problems)
    if medium.broken:  # nothing inside can be found: its files' own problems would only repeat it
        return Report(problems, 0, 0)
    entries = medium.entries
    index = _Index(entries)
    manifest = index.find(MANIFEST)
    listed = _read_manifest(medium, manifest, index, problems)
    references, fileset = _read_dicomdir(medium, index, problems)
    referenced = {entry.path for entry, _ in references}
    # The File-set's folders (DICOM/): every file in them must be referenced.
    loose = [entry for entry in entries.values()
             if entry.path.split("/")[0].upper() in fileset and entry.path not in referenced]
    dicom = referenced | {entry.path for entry in loose}
    read = medium.read_all(list(entries.values()), dicom, threads)
    for entry in entries.values():
        digest, _, damage = read[entry.path]
        if damage:
            problems.append(Problem("unreadable", entry.path, damage))
        expected = listed.get(entry.path) if listed is not None else None
        if listed is not None and expected is None and entry is not manifest:
            problems.append(Problem("not listed", entry.path, "on the medium but not in %s" % MANIFEST))
        elif expected is not None and digest is not None and digest != expected:
            problems.append(Problem("changed", entry.path, "SHA-256 differs"))
    for entry, sop_uid in references:
        _, scanned, damage = read[entry.path]
        if damage:
            continue
        found = _sop_instance_uid(medium, entry, scanned)
        if found is None:
            problems.append(Problem("unreadable", entry.path, "not readable as DICOM"))
        elif found != sop_uid:
            problems.append(Problem("wrong object", entry.path,
                                    "its SOP Instance UID is not the one its DICOMDIR record names"))
    for entry in loose:
        _, scanned, damage = read[entry.path]
        is_dicom = not damage and _sop_instance_uid(medium, entry, scanned) is not None
        problems.append(Problem("not in the DICOMDIR", entry.path,
                                "a DICOM file its DICOMDIR does not reference" if is_dicom
                                else "a file in the File-set's folders that is not a DICOM object either"))
    problems.sort(key=lambda problem: (problem.path, problem.kind))
    return Report(problems, len(entries), len(references))


class _Index:
    """The medium's files by path: exactly, else without regard to case where that names one file."""

    def __init__(self, entries):
        self.entries = entries
        self.folded = {}
        for path in entries:
            self.folded.setdefault(path.upper(), []).append(path)

    def find(self, path):
        entry = self.entries.get(path)
        if entry is None:
            matches = self.folded.get(path.upper(), ())
            entry = self.entries[matches[0]] if len(matches) == 1 else None
        return entry


def _read_manifest(medium, entry, index, problems):
    """{path on the medium: expected hex digest} from SHA256.TXT (``entry``); None when there is none."""
    if entry is None:
        problems.append(Problem("missing", MANIFEST, "the list of checksums: no file can be checked against it"))
        return None
    try:
        text = medium.read(entry).decode("ascii")
    except (OSError, UnicodeDecodeError, zipfile.BadZipFile, Damaged):
        problems.append(Problem("unreadable", MANIFEST, "not a readable ASCII list of checksums"))
        return None
    listed = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = MANIFEST_LINE.match(line)
        if not line:
            continue
        if match is None:
            problems.append(Problem("bad line", "%s line %d" % (MANIFEST, number),
                                    "not '<sha256>  <path>'"))
            continue
        digest, path = match.group(1).lower(), match.group(2)
        found = index.find(path)
        if found is None:
            problems.append(Problem("missing", path, "listed in %s, not on the medium" % MANIFEST))
        elif found.path in listed:
            problems.append(Problem("bad line", "%s line %d" % (MANIFEST, number), "%s listed twice" % path))
        else:
            listed[found.path] = digest
    return listed


def _read_dicomdir(medium, index, problems):
    """The DICOMDIR's references [(entry, SOP Instance UID)] and its File-set's top folders (upper case).

    A medium with no DICOMDIR file is one problem; so is a folder called
    DICOMDIR (``iso.layout: legacy``: the old scripts' discs have no
    File-set, only their checksums can be checked)."""
    entry = index.find(DICOMDIR)
    if entry is None:
        if not any(path.upper().startswith(DICOMDIR + "/") for path in index.entries):
            problems.append(Problem("missing", DICOMDIR, "no DICOM File-set on the medium"))
        return [], set()
    try:
        data = medium.read(entry)
    except (OSError, zipfile.BadZipFile, Damaged):
        return [], set()  # the file's own read reports it
    try:
        records = dicomdir_references(data)
    except (_Unusual, UnicodeDecodeError):
        try:
            records = _pydicom_references(data)
        except Exception:  # pydicom raises many kinds on a broken file
            problems.append(Problem("unreadable", entry.path, "not readable as a DICOMDIR"))
            return [], set()
    base = entry.path.rpartition("/")[0]
    references, seen, fileset = [], set(), set()
    for file_id, sop_uid in records:
        path = "/".join(([base] if base else []) + file_id)
        fileset.add(path.split("/")[0].upper())
        found = index.find(path)
        if found is None:
            problems.append(Problem("missing", path, "referenced by the DICOMDIR, not on the medium"))
        elif found.path in seen:
            problems.append(Problem("referenced twice", found.path, "by two records of the DICOMDIR"))
        else:
            seen.add(found.path)
            references.append((found, sop_uid))
    return references, fileset


def _sop_instance_uid(medium, entry, scanned):
    """The file's SOP Instance UID, or None when it is not readable as DICOM.

    ``scanned`` is what ``sop_instance_uid`` found in its first bytes as
    they were hashed; where it left the file to pydicom (None), pydicom
    reads it up to the pixel data, as a viewer would.  (pydicom reads no
    more than that: 2.3 and 3.0 alike read a header damaged after its first
    elements without a word, so a damaged byte is the checksum's to find.)"""
    if scanned is not None:
        return scanned
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(io.BytesIO(medium.read(entry)), stop_before_pixels=True)
        uid = dataset.get("SOPInstanceUID")
        return str(uid) if uid else None
    except Exception:  # pydicom raises many kinds on a broken file
        return None


# -- the media -------------------------------------------------------------------


class Damaged(Exception):
    """A file's bytes cannot be read (the medium is truncated or its structure is broken)."""


def open_medium(path):
    """The medium at ``path``: a folder, a ZIP file or an ISO 9660 image, told by content, not name."""
    if os.path.isdir(path):
        return Folder(path)
    try:
        with open(path, "rb") as handle:
            start = handle.read(4)
            handle.seek(16 * 2048 + 1)
            iso = handle.read(5) == b"CD001"
    except OSError as exc:
        raise errors.MkisoError("%s cannot be read: %s." % (path, exc.strerror), code="not_a_medium")
    if start in (b"PK\x03\x04", b"PK\x05\x06"):
        return Zip(path)
    if iso:
        return Iso(path)
    raise errors.MkisoError(
        "%s is neither an ISO 9660 disc image, a ZIP file nor a folder: there is nothing to check." % path,
        code="not_a_medium")


class Medium:
    """Files (``entries``, by path) in one container, and reading them."""

    def __init__(self, path):
        self.path = path
        self.entries = {}
        self.problems = []  # what listing the medium found wrong
        self.broken = False  # True when its files cannot be listed at all

    def close(self):
        pass

    def read(self, entry):
        """The whole file."""
        return b"".join(self._blocks(entry))

    def _blocks(self, entry):
        raise NotImplementedError

    def read_all(self, entries, dicom, threads):
        """{path: (hex SHA-256 or None, the SOP Instance UID its first bytes hold where the path is in
        ``dicom`` (``sop_instance_uid``; None where pydicom must read it), why it is unreadable)}."""
        ordered = sorted(entries, key=lambda entry: entry.offset or 0)
        batches = [ordered[at:at + BATCH] for at in range(0, len(ordered), BATCH)]
        results = {}

        def run(batch):
            return [(entry.path, self._digest(entry, entry.path in dicom)) for entry in batch]

        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
            for done in pool.map(run, batches):
                results.update(done)
        return results

    def _digest(self, entry, dicom):
        if entry.damage:
            return None, None, entry.damage
        digest = hashlib.sha256()
        scanned = None
        try:
            for number, block in enumerate(self._blocks(entry)):
                if dicom and number == 0:
                    scanned = _scanned(block)
                digest.update(block)
        except (OSError, zipfile.BadZipFile, Damaged, EOFError) as exc:
            return None, None, _reason(exc)
        return digest.hexdigest(), scanned, ""


def _scanned(data):
    """The SOP Instance UID in a file's first bytes ``data`` (``sop_instance_uid``), or None: then
    pydicom reads the file at the check (``_sop_instance_uid``)."""
    try:
        return sop_instance_uid(data)
    except (_Unusual, UnicodeDecodeError):
        return None


def _unchanged(before, now):
    """Whether a folder's file is the one read before (its ``Entry.identity`` then and now), unchanged
    since: the same inode, size and modification time, and the same status change time, unless a name
    of it went (fewer links: the service removes the received folder the staged tree was linked from
    while the disc is read back; a rewrite alone never lowers the count)."""
    if before is None or now is None or before[:3] != now[:3]:
        return False
    return before[3] == now[3] or now[4] < before[4]


def _reason(exc):
    if isinstance(exc, OSError):
        return "read error: %s" % (exc.strerror or exc)
    if isinstance(exc, Damaged):
        return str(exc)
    return "its bytes are damaged in the ZIP"


class _Container(Medium):
    """A medium in one file (ISO, ZIP): each file's bytes read by offset with ``pread``."""

    def __init__(self, path, length=None):
        super().__init__(path)
        self.fd = os.open(path, os.O_RDONLY)
        self.length = os.fstat(self.fd).st_size if length is None else length

    def close(self):
        os.close(self.fd)

    def pread(self, size, offset, what):
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise Damaged("%s ends before its bytes do: the image is truncated" % what)
        return data

    def _blocks(self, entry):
        for at in range(0, entry.size, BLOCK):
            yield self.pread(min(BLOCK, entry.size - at), entry.offset + at, os.path.basename(self.path))


class Folder(Medium):
    """A mounted disc or stick, or an extracted ZIP."""

    def __init__(self, path):
        super().__init__(path)
        self.known = {}  # files read before (``read_ahead``)
        for folder, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                source = os.path.join(folder, name)
                relative = os.path.relpath(source, path).replace(os.sep, "/")
                try:
                    found = os.stat(source)
                except OSError as exc:
                    self.entries[relative] = Entry(relative, 0, source=source, damage=_reason(exc))
                    continue
                self.entries[relative] = Entry(relative, found.st_size, source=source, identity=(
                    found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_nlink))

    def _digest(self, entry, dicom):
        known = self.known.get(entry.path)
        if known is not None and _unchanged(known[0], entry.identity):
            return known[1]
        return super()._digest(entry, dicom)

    def as_arrived(self, entry):
        """What ``_digest`` finds, from the digest the service kept on the file as it arrived, where that
        fits the file as listed, and its first HEAD bytes (its SOP Instance UID); else None."""
        if entry.identity is None:
            return None
        kept = digests.kept_on(entry.source, entry.identity[1:3])
        if kept is None:
            return None
        try:
            with open(entry.source, "rb", buffering=0) as handle:
                head = handle.read(HEAD)
        except OSError:
            return None
        return kept[2].hex(), _scanned(head), ""

    def _blocks(self, entry):
        with open(entry.source, "rb", buffering=0) as handle:
            yield from _blocks_of(handle)


class Zip(_Container):
    """A ZIP file (PS3.12 Annex V): stored entries read by offset, others inflated by zipfile."""

    LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length

    def __init__(self, path):
        super().__init__(path)
        try:
            self.archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError):
            self.archive = None
            self.broken = True
            self.problems.append(Problem(
                "unreadable", os.path.basename(path),
                "not a complete ZIP file: its central directory is missing or damaged, the file is truncated?"))
            return
        for member in self.archive.infolist():
            if member.is_dir():
                continue
            entry = Entry(member.filename, member.file_size, member=member)
            if member.flag_bits & 0x1:
                entry.damage = "encrypted, which a DICOM ZIP never is"
            elif member.compress_type == zipfile.ZIP_STORED:
                try:
                    signature, name, extra = self.LOCAL_HEADER.unpack(
                        self.pread(30, member.header_offset, os.path.basename(path)))
                    if signature != b"PK\x03\x04":
                        raise Damaged("its local header in the ZIP is damaged")
                except Damaged as exc:
                    entry.damage = str(exc)
                else:
                    entry.offset = member.header_offset + 30 + name + extra
                    entry.member = None
            self.entries[entry.path] = entry

    def close(self):
        if self.archive is not None:
            self.archive.close()
        super().close()

    def _blocks(self, entry):
        if entry.member is None:
            yield from super()._blocks(entry)
            return
        with self.archive.open(entry.member) as handle:  # checks the CRC-32 at the end
            yield from _blocks_of(handle)


def _blocks_of(handle):
    """The rest of an open file, BLOCK bytes at a time."""
    yield from iter(lambda: handle.read(BLOCK), b"")


class Iso(_Container):
    """An ISO 9660 image read in place: its directory tree, with Rock Ridge or Joliet names.

    mkiso's discs (genisoimage ``-J -joliet-long -r``) carry both; the
    primary tree's own names are 8.3 upper case and would not match a
    viewer's long ones.  Rock Ridge is preferred (any length, the case as
    staged), then Joliet (UCS-2, 103 characters), then the bare ISO 9660
    names."""

    SECTOR = 2048

    def __init__(self, path, length=None):
        """``length``: the image's, where the file at ``path`` holds only its first part, the directory
        (``isoimage``: genisoimage's output up to the first file's bytes)."""
        super().__init__(path, length)
        name = os.path.basename(path)
        primary = joliet = None
        for sector in range(16, self.length // self.SECTOR):  # the volume descriptors, up to the terminator
            descriptor = self.pread(self.SECTOR, sector * self.SECTOR, name)
            kind = descriptor[0]
            if kind == 255 or descriptor[1:6] != b"CD001":
                break
            if kind == 1 and primary is None:
                primary = descriptor
            elif kind == 2 and descriptor[88:91] in (b"%/@", b"%/C", b"%/E"):
                joliet = descriptor
        if primary is None:
            raise errors.MkisoError("%s has no ISO 9660 primary volume descriptor." % path, code="not_a_medium")
        self.block = struct.unpack_from("<H", primary, 128)[0]
        self.primary, self.joliet = primary, joliet
        try:
            self._list()
        except Damaged as exc:
            self.broken = True
            self.problems.append(Problem("unreadable", name, "its directory cannot be read: %s" % exc))

    def _list(self):
        for entry in self.files():
            self.entries[entry.path] = entry

    def files(self, joliet=False):
        """Every file of the image (``Entry``), one directory at a time: with Rock Ridge names, else the
        Joliet ones, else the bare ISO 9660 ones; with ``joliet``, the Joliet tree's.  A generator, so
        that a 50,000-file disc's directory is never held whole (``isoimage``).  Raises Damaged."""
        descriptor = self.joliet if joliet else self.primary
        root = descriptor[156:190]
        root_lba, root_size = struct.unpack_from("<I", root, 2)[0], struct.unpack_from("<I", root, 10)[0]
        skip = None if joliet else self._rock_ridge(self._records(root_lba, root_size))
        if skip is not None:
            yield from self._walk(root_lba, root_size, "", lambda record: self._rock_ridge_name(record, skip))
        elif self.joliet is not None and descriptor is self.primary:
            yield from self.files(joliet=True)
        else:
            yield from self._walk(root_lba, root_size, "", _joliet_name if joliet else _iso9660_name)

    def _records(self, lba, size):
        """The directory records of the directory at ``lba``, (flags, extent, length, name bytes, system
        use) each, read DIRECTORY_PIECE at a time: a directory of 10,000 files is a few MB of records,
        never held at once (``isoimage`` lays out 50,000-file discs in the server)."""
        for start in range(0, size, DIRECTORY_PIECE):
            data = self.pread(min(DIRECTORY_PIECE, size - start), lba * self.block + start, "the directory")
            at = 0
            while at < len(data):
                length = data[at]
                if length == 0:  # the rest of this sector is empty: records never cross a sector
                    at = (at // self.SECTOR + 1) * self.SECTOR
                    continue
                record = data[at:at + length]
                if length < 34 or 33 + record[32] > length:
                    raise Damaged("a directory record is damaged")
                name_length = record[32]
                system_use = 33 + name_length + (1 - name_length % 2)
                yield (record[25], struct.unpack_from("<I", record, 2)[0], struct.unpack_from("<I", record, 10)[0],
                       record[33:33 + name_length], record[system_use:])
                at += length

    def _rock_ridge(self, root_records):
        """The SUSP skip length when the root's '.' record holds an SP entry (Rock Ridge), else None."""
        first = next(root_records, None)
        if first is None:
            return None
        system_use = first[4]
        if system_use[:2] == b"SP" and system_use[4:6] == b"\xbe\xef":
            return system_use[6]
        return None

    def _walk(self, lba, size, prefix, name_of):
        for flags, extent, length, raw, system_use in self._records(lba, size):
            if raw in (b"\0", b"\1"):
                continue  # . and ..
            name, moved, child = name_of((raw, system_use))
            if moved:
                continue  # a relocated deep directory: reached through its CL entry
            path = prefix + name
            if child is not None:  # a Rock Ridge child link: the directory is elsewhere
                extent, length, flags = child, next(self._records(child, self.SECTOR))[2], 0x02
            if flags & 0x02:
                yield from self._walk(extent, length, path + "/", name_of)
                continue
            entry = Entry(path, length, offset=extent * self.block)
            if flags & 0x80:
                entry.damage = MULTI_EXTENT
            elif entry.offset + entry.size > self.length:
                entry.damage = "its bytes lie beyond the end of the image: it is truncated"
            yield entry

    def _rock_ridge_name(self, record, skip):
        """(name, relocated, child link extent) from a record's Rock Ridge entries (SUSP, with CE areas)."""
        raw, system_use = record
        name, moved, child = b"", False, None
        area = system_use[skip:]
        while area:
            continuation = None
            at = 0
            while at + 4 <= len(area):
                signature, length = area[at:at + 2], area[at + 2]
                if length < 4:
                    break
                body = area[at + 4:at + length]
                if signature == b"NM" and body and not body[0] & 0x06:
                    name += body[1:]
                elif signature == b"RE":
                    moved = True
                elif signature == b"CL":
                    child = struct.unpack_from("<I", body, 0)[0]
                elif signature == b"CE":
                    continuation = struct.unpack_from("<I4xI4xI", body, 0)  # block, offset, length
                elif signature == b"ST":
                    break
                at += length
            area = b""
            if continuation is not None:
                block, offset, size = continuation
                area = self.pread(size, block * self.block + offset, "a Rock Ridge continuation area")
        if not name:
            return _iso9660_name(record)
        return name.decode("utf-8", "surrogateescape"), moved, child


def _iso9660_name(record):
    name = record[0].decode("ascii", "replace").split(";")[0]
    return (name[:-1] if name.endswith(".") else name), False, None


def _joliet_name(record):
    name = record[0].decode("utf-16-be", "replace")
    return (name[:-2] if name.endswith(";1") else name), False, None


# -- DICOM, read directly where it is plain --------------------------------------


class _Unusual(Exception):
    """A DICOM structure the direct reader leaves to pydicom."""


UNDEFINED = 0xFFFFFFFF
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
BIG_ENDIAN, IMPLICIT_LITTLE, DEFLATED = b"1.2.840.10008.1.2.2", b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1.99"
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
SOP_INSTANCE_UID, RECORD_SEQUENCE = 0x00080018, 0x00041220
REFERENCED_FILE_ID, REFERENCED_SOP_INSTANCE = 0x00041500, 0x00041511


def _element(data, at):
    """(tag, VR, value offset, value length) of the explicit VR little endian element at ``at``."""
    if at + 8 > len(data):
        raise _Unusual
    group, number = struct.unpack_from("<HH", data, at)
    tag = group << 16 | number
    if group == 0xFFFE:  # item and delimiters: no VR
        return tag, b"", at + 8, struct.unpack_from("<I", data, at + 4)[0]
    vr = data[at + 4:at + 6]
    if vr in LONG_VRS:
        if at + 12 > len(data):
            raise _Unusual
        return tag, vr, at + 12, struct.unpack_from("<I", data, at + 8)[0]
    return tag, vr, at + 8, struct.unpack_from("<H", data, at + 6)[0]


def _after_meta(data):
    """Where the data set starts, after the preamble and the file meta group; _Unusual unless the data set
    is explicit VR little endian."""
    if data[128:132] != b"DICM":
        raise _Unusual
    at, syntax = 132, None
    while True:
        tag, _, value, length = _element(data, at)
        if tag >> 16 != 0x0002:
            break
        if length == UNDEFINED:
            raise _Unusual
        if tag == 0x00020010:
            syntax = data[value:value + length].rstrip(b"\0 ")
        at = value + length
    if syntax is None or syntax in (BIG_ENDIAN, IMPLICIT_LITTLE, DEFLATED):
        raise _Unusual
    return at


def sop_instance_uid(data):
    """The SOP Instance UID of a Part 10 file from its first bytes; _Unusual where pydicom must read it."""
    at = _after_meta(data)
    while True:
        tag, _, value, length = _element(data, at)
        if tag == SOP_INSTANCE_UID and value + length <= len(data):
            return data[value:value + length].rstrip(b"\0 ").decode("ascii")
        if tag > SOP_INSTANCE_UID or length == UNDEFINED:
            raise _Unusual
        at = value + length


def _skip(data, vr, value, length):
    """The offset after an element's value, undefined-length sequences (and an icon's encapsulated
    pixel data: items of fragments) walked through."""
    if length != UNDEFINED:
        end = value + length
        if end > len(data):
            raise _Unusual
        return end
    if vr not in (b"SQ", b"OB", b"OW"):
        raise _Unusual  # UN: a sequence in implicit VR inside
    at = value
    while True:
        tag, _, item, item_length = _element(data, at)
        if tag == SEQUENCE_END:
            return item
        if tag != ITEM:
            raise _Unusual
        at = _skip_item(data, item, item_length)


def _skip_item(data, at, length):
    if length != UNDEFINED:
        return _skip(data, b"", at, length)
    while True:
        tag, vr, value, value_length = _element(data, at)
        if tag == ITEM_END:
            return value
        at = _skip(data, vr, value, value_length)


def dicomdir_references(data):
    """[(file ID parts, referenced SOP Instance UID)] of the DICOMDIR's records that reference a file.

    Read directly (explicit VR little endian, as PS3.10 §7.3 requires of a
    DICOMDIR); _Unusual where anything is not as expected, for pydicom.
    """
    at = _after_meta(data)
    while True:
        tag, vr, value, length = _element(data, at)
        if tag == RECORD_SEQUENCE:
            break
        if tag > RECORD_SEQUENCE:
            raise _Unusual
        at = _skip(data, vr, value, length)
    end = None if length == UNDEFINED else value + length
    references, at = [], value
    while at != end:
        tag, _, item, item_length = _element(data, at)
        if tag == SEQUENCE_END and end is None:
            break
        if tag != ITEM:
            raise _Unusual
        item_end = None if item_length == UNDEFINED else item + item_length
        file_id = sop_uid = None
        at = item
        while at != item_end:
            tag, vr, element, element_length = _element(data, at)
            if tag == ITEM_END and item_end is None:
                at = element
                break
            if tag == REFERENCED_FILE_ID:
                file_id = data[element:element + element_length].decode("ascii").rstrip("\0 ").split("\\")
            elif tag == REFERENCED_SOP_INSTANCE:
                sop_uid = data[element:element + element_length].rstrip(b"\0 ").decode("ascii")
            at = _skip(data, vr, element, element_length)
            if item_end is not None and at > item_end:
                raise _Unusual
        if file_id is not None:
            references.append(([part.strip() for part in file_id], sop_uid))
        if end is not None and at > end:
            raise _Unusual
    return references


def _pydicom_references(data):
    """``dicomdir_references`` by pydicom: the same answer, slower, for what is not plain."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom 2.x: its DicomDir class
        dataset = pydicom.dcmread(io.BytesIO(data))
    references = []
    for record in dataset.DirectoryRecordSequence:
        file_id = record.get("ReferencedFileID")
        if file_id is not None:
            parts = [file_id] if isinstance(file_id, str) else list(file_id)
            sop_uid = record.get("ReferencedSOPInstanceUIDInFile")
            references.append(([str(part).strip() for part in parts], str(sop_uid) if sop_uid else None))
    return references


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="mkiso-verify",
        description="Check a patient disc or USB stick mkiso made, before it leaves: every file against "
                    "SHA256.TXT, and the DICOMDIR against the files.")
    parser.add_argument("path", help="an ISO file, a ZIP file, or the folder where the disc or stick is mounted")
    parser.add_argument("--after", metavar="MARKER",
                        help="(the service's) read the folder's files now, check once MARKER says it is complete")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(errors="backslashreplace")  # a file name in no encoding still gets its line
    try:
        read = None
        if args.after is not None:
            if not os.path.isdir(args.path):
                raise errors.MkisoError("%s is not a folder: --after reads a folder." % args.path,
                                        code="not_a_medium")
            read = read_ahead(args.path)
            print("%s%s" % (READ_AHEAD, _counted(len(read), "file")), flush=True)
            if not _wait_for(args.after, args.path):
                print("mkiso-verify: not checked: the disc was abandoned before it was complete", file=sys.stderr)
                return 2
        report = check(args.path, read=read)
    except errors.MkisoError as exc:
        print("mkiso-verify: %s" % exc.message, file=sys.stderr)
        return 2
    for problem in report.problems:
        print(problem)
    print(report.verdict())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
