"""Handing an ISO to the client (SPEC §2 ISO responses, §8).

The body is the server's ``wsgi.file_wrapper`` over the open ISO, so
waitress sends it from the file (never a Python generator reading it), and
the job's temp files are removed when the server closes that body: after
the last byte, or as soon as the client goes away.

A synchronous download does not wait for genisoimage to finish: its answer
starts once the first bytes are written and sends the file as it grows
(``Build``), never a byte before it is written, the last sector only once
the whole ISO is known good.  Sending 1 GB over loopback costs about as
much as writing it, so the two overlap.  Better still, the ISO is not
written at all where ``isoimage`` can lay it out: its head from
genisoimage, each file's bytes by sendfile from the staged tree, as a ZIP
is sent (below); the last sector waits for the tree's read-back.

A single ``Range: bytes=a-b`` (or ``a-``, ``-n``) is answered with 206 and
``Content-Range``, so an interrupted 4 GB download resumes (``curl -C -``);
an unsatisfiable one with 416.  Several ranges, or a malformed header, get
the whole file (RFC 7233 allows ignoring them).

A synchronous download's ISO stays on disk until its answer ends, slot or
no slot: ten slow readers kept ten ISOs.  ``Pending`` counts them against
``limits.max_pending_bytes``; beyond it the oldest reader is cut off (its
connection closed, its ISO removed), with a log line saying so.

A ZIP (SPEC §13) is answered the same way: its layout (``ziparchive``)
gives its length before the first byte, and its body (a
``ziparchive.Reader`` in the same ``RemovedOnClose``) is a sequence of
header pieces from memory and ranges of the staged files, which the
sendfile channel sends by ``extent``; Range, HEAD and the cleanup as for an
ISO.

Behind nginx, with ``server.x_accel_prefix``, the answer is only headers:
``X-Accel-Redirect`` names the ISO under the prefix, which nginx maps to
the work dir, and nginx sends the file (Range and all).  The ISO is made
readable for nginx's group and removed after ``server.x_accel_keep_s``.
nginx sends files, not layouts: a ZIP is written first (``ziparchive.write``,
the kernel copying each file's bytes), then handed over as an ISO is.
"""

import collections
import logging
import os
import re
import threading
import unicodedata
import wsgiref.util
from urllib.parse import quote

from ..disc import tree, ziparchive
from .. import errors, process
from .responses import Response

log = logging.getLogger(__name__)

ISO_TYPE = "application/x-iso9660-image"
TYPES = {"iso": ISO_TYPE, "zip": "application/zip"}
BLOCK = 1 << 20
UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\"\'`:*?<>|;,%]+')
SINGLE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
FIRST_BYTES = 1 << 16  # written before a streamed answer starts
HELD_BACK = tree.SECTOR  # of a streamed ISO, sent only once genisoimage succeeded and the size is right


# Characters of a patient's name that must not reach a file name.  Invisible ones are dropped: format
# characters (Cf: U+202E RIGHT-TO-LEFT OVERRIDE turns round what follows, so "Smith\u202egnp.iso" shows
# as "Smithosi.png"; the other bidi controls, zero-width spaces and joiners), private use, surrogates
# (which UTF-8 cannot even encode) and unassigned code points.  Controls and line or paragraph
# separators are a gap between words, like a space.
INVISIBLE = frozenset(("Cf", "Co", "Cs", "Cn"))
GAPS = frozenset(("Cc", "Zl", "Zp"))


def _shown(text):
    """The characters of ``text`` that a file manager shows as they are, a gap for a control or line break."""
    kinds = ((char, unicodedata.category(char)) for char in text)
    return "".join("_" if kind in GAPS else char for char, kind in kinds if kind not in INVISIBLE)


def clean_name(text):
    """A file name stem: no path separator, quote, control, invisible or bidirectional character."""
    text = UNSAFE.sub("_", _shown(text))
    text = re.sub(r"\s+", "_", text.strip())
    return re.sub(r"_+", "_", text).strip("._")[:100]


def ascii_name(text):
    """The ASCII form for ``filename=``: accents dropped, upper-cased (gaps where ``clean_name`` has them)."""
    folded = unicodedata.normalize("NFKD", clean_name(text)).encode("ascii", "ignore").decode("ascii")
    return clean_name(folded).upper()


def disposition(stem, fallback, extension="iso"):
    """Content-Disposition with an ASCII filename and an RFC 6266 filename*."""
    utf8 = clean_name(stem) or fallback
    plain = ascii_name(stem) or ascii_name(fallback) or "MKISO"
    return "attachment; filename=\"%s.%s\"; filename*=UTF-8''%s" % (plain, extension,
                                                                   quote(utf8 + "." + extension, safe=""))


def byte_range(header, size):
    """(first, last) byte of a single satisfiable range, or None for the whole file.

    Raises RangeNotSatisfiable for a range that starts past the end or asks
    for no bytes.
    """
    match = SINGLE_RANGE.match((header or "").replace(" ", ""))
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - suffix), size - 1
    first = int(first)
    if last != "" and int(last) < first:
        return None  # a-b with b before a is malformed: ignored
    if first >= size:
        raise RangeNotSatisfiable(size)
    return first, size - 1 if last == "" else min(int(last), size - 1)


class RangeNotSatisfiable(errors.MkisoError):
    status = 416
    code = "range_not_satisfiable"

    def __init__(self, size):
        super().__init__("The requested range is not within the %d bytes of the ISO." % size,
                         headers=[("Content-Range", "bytes */%d" % size)])


class RemovedOnClose:
    """The open ISO (or a ZIP's ``ziparchive.Reader``) from ``offset``, at most ``length`` bytes; closing
    it removes the job's files.

    The server closes it when the answer ends: after the last byte, or when
    the client went away.  The file position then tells how far sending
    got (every server path advances it by what went out), which
    ``on_close(sent)`` is told.

    ``build`` (a ``Build``) is set while genisoimage still writes the
    file: no byte is sent before it is written.  Any reader blocks in
    ``read`` until its bytes are there; the file's end, as the server asks
    for it, is the ISO's announced ``size``.

    The server's connection that sends it from the file descriptor
    (``waitress_adapter.SendfileChannel``) asks it by these names only:
    ``extent(position, count)``, ``sent_by(hang_up, wake)`` (how to end the connection sending it from
    another thread, and to wake its loop as the ISO grows), ``waiting(position)``,
    ``sendable(position, count)``, ``failed``, ``cut_off`` and ``end``.
    """

    def __init__(self, handle, cleanup, offset, length, size, build=None):
        self._handle = handle
        self._cleanup = cleanup
        self._offset = offset
        self._size = size
        self.end = offset + length  # the position after the answer's last byte
        self.build = build
        self.on_close = None
        self.size = size
        self.pending = None  # the Pending this answer counts in, if any
        self._hang_up = None  # ends the server's connection sending it (``sent_by``)
        self.cut_off = False
        handle.seek(offset)
        self.tell = handle.tell
        self.fileno = handle.fileno

    def seek(self, offset, whence=os.SEEK_SET):
        if whence == os.SEEK_END:  # waitress sizes the body this way: the whole ISO, written or not yet
            return self._handle.seek(self._size + offset)
        return self._handle.seek(offset, whence)

    def read(self, size=-1):
        """Never past the answer's end, whichever server reads it; never a byte not yet written."""
        if self.cut_off:  # a server reading it through Python: its connection ends with this error
            raise OSError("the answer was cut off: too many finished discs wait for their readers")
        remaining = max(0, self.end - self._handle.tell())  # from the position: waitress's own buffer
        size = remaining if size is None or size < 0 else min(size, remaining)  # reads ahead, then seeks back
        if self.build is not None:
            self.build.wait_for(self._handle.tell() + size)
            if self.build.error is not None:
                raise OSError("the ISO could not be written: %s" % self.build.error)
        return self._handle.read(size)

    def close(self):
        if self._cleanup is None:
            return
        try:
            sent = self._handle.tell() - self._offset
            self._handle.close()
        finally:
            cleanup, self._cleanup = self._cleanup, None
            cleanup()
            if self.pending is not None:
                self.pending.remove(self)
        if self.on_close is not None:
            self.on_close(sent)

    def extent(self, position, count):
        """What the sendfile channel sends next, at most ``count`` bytes from ``position``: (file
        descriptor, offset, count) of a file, or bytes (a ZIP's headers)."""
        extent = getattr(self._handle, "extent", None)  # a ZIP's Reader; an ISO is its one open file
        return (self._handle.fileno(), position, count) if extent is None else extent(position, count)

    def sent_by(self, hang_up, wake):
        """A connection sends this answer: ``hang_up()`` ends it from any thread (a ``cut``), ``wake()``
        wakes its loop as the ISO grows."""
        self._hang_up = hang_up
        if self.build is not None:
            self.build.wake = wake

    def waiting(self, position):
        """Whether the byte at ``position`` is not written yet: the connection waits to be woken."""
        build = self.build
        return build is not None and build.error is None and build.written <= position

    def sendable(self, position, count):
        """How many of ``count`` bytes from ``position`` are written, and may go now."""
        build = self.build
        return count if build is None else min(count, build.written - position)

    @property
    def failed(self):
        """The ISO could not be written: its answer ends short, never looking complete."""
        return self.build is not None and self.build.error is not None

    def cut(self):
        """End the answer now: its connection is shut down, and the server closes it (and this body)
        from its own loop.  Before the server started sending it, it is cut as soon as it does."""
        self.cut_off = True
        hang_up = self._hang_up
        if hang_up is not None:
            hang_up()


class Pending:
    """The ISOs of synchronous downloads still being sent, against a byte budget (oldest cut first)."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self._bodies = collections.OrderedDict()  # RemovedOnClose -> size, oldest first
        self._lock = threading.Lock()

    def add(self, body):
        with self._lock:
            self._bodies[body] = body.size
            body.pending = self
            over = sum(self._bodies.values()) - self.max_bytes
            cut = []
            for older, size in self._bodies.items():
                if over <= 0 or older is body:
                    break
                cut.append(older)
                over -= size
        for older in cut:
            log.warning("a slow reader's download was cut off: the finished discs waiting for their readers "
                        "exceed limits.max_pending_bytes %d; the oldest goes first" % self.max_bytes,
                        extra={"fields": {"bytes": older.size}})
            older.cut()

    def remove(self, body):
        with self._lock:
            self._bodies.pop(body, None)

    def held(self):
        with self._lock:
            return sum(self._bodies.values())


class Build:
    """A synchronous download's last step, genisoimage, run while the answer goes out (SPEC §8).

    The answer starts as soon as the disc is sized: Content-Length is
    genisoimage's -print-size, and its body sends only what the file holds
    so far (``written``; genisoimage writes front to back and never goes
    back).  This thread watches the file grow and wakes the server's loop
    (``wake``, set by the channel sending it) as it does.  The last
    HELD_BACK bytes go only once genisoimage exited 0, the file has the
    announced size and ``check`` (the disc read back as written, SPEC §4.6)
    passed: a build that fails, even after writing every byte, writes
    another size or does not pass its check, leaves ``error`` set and the
    answer ends short.  The client sees an incomplete download, never a
    complete-looking wrong disc.  The job holds its slot until ``when_ended``.
    """

    def __init__(self, iso, job, check=None):
        """Start ``iso.write(on_tick)``, the last step of ``job`` that writes ``iso`` (a ``tree.Iso``); it
        is ``iso.build`` from now on.  ``check``, when given, runs once the ISO is written, before its
        last bytes may leave; it raises when the disc must not.  An ISO laid out over its staged tree
        (``isoimage``) has nothing left to write: all but its last bytes may go at once, while
        ``write`` keeps the disc and ``check`` reads the tree back."""
        self.iso = iso
        self._check = check
        self.written = 0 if iso.archive is None else iso.size - HELD_BACK
        self.error = None
        self.wake = None
        self._job = job
        self._write, iso.write = iso.write, None
        self._ended = threading.Event()
        self._after = []
        self._lock = threading.Lock()
        iso.build = self
        try:
            threading.Thread(target=self._run, name="iso-" + job.id[:8], daemon=True).start()
        except BaseException:  # no build runs: the Iso is a plain one again, which cleanup removes at once
            iso.write, iso.build, self._write = self._write, None, None
            raise

    @property
    def ended(self):
        return self._ended.is_set()

    def _run(self):
        try:
            with process.owned_by(self._job):  # the job's tools: a cancel kills them
                self._write(on_tick=self._grown)
                if self._check is not None:
                    self._check()
        except BaseException as exc:
            self.error = exc
        self._write = None  # and with it the disc's image list: the job outlives the build
        with self._lock:
            if self.error is None:
                self.written = self.iso.size  # the last bytes: only now that the whole ISO is checked
            self._ended.set()
            after, self._after = self._after, []
        self._notify()
        for action in after:
            action()

    def _grown(self):
        try:
            size = os.stat(self.iso.path).st_size
        except FileNotFoundError:
            return
        size = min(size, self.iso.size - HELD_BACK)
        if size > self.written:
            self.written = size
            self._notify()

    def _notify(self):
        wake = self.wake
        if wake is not None:
            wake()

    def begun(self):
        """Wait for genisoimage's first bytes, so that a build failing at its start still gets an error
        answer (the same one as without streaming); later failures can only cut the answer short.

        The file is genisoimage's own from its start: made empty beforehand,
        ext4 would take genisoimage's O_TRUNC of it for a file being replaced
        and allocate every block at close (auto_da_alloc), which doubled
        genisoimage's time for a 1 GB disc here."""
        self.wait_for(min(self.iso.size, FIRST_BYTES))
        if self.ended and self.error is not None:
            raise self.error

    def wait_for(self, offset):
        """Block until the file holds ``offset`` bytes, or the build ended (for readers without sendfile)."""
        while self.written < offset and not self._ended.wait(process.TICK_S):
            pass

    def when_ended(self, action):
        """Run ``action`` once genisoimage is done (now, if it is)."""
        with self._lock:
            if not self._ended.is_set():
                self._after.append(action)
                return
        action()

    def give_up(self):
        """The answer closed before the ISO was written (the client went away): the job is cancelled."""
        with self._lock:
            if self._ended.is_set():
                return
            self._job.stop()
        process.kill_owned(self._job)


def iso_response(environ, iso, remove=True, pending=None):
    """200 (or 206 for a Range) with the ISO as a file-backed body.

    With ``remove`` (a synchronous download) ``iso.cleanup`` runs when the
    answer is closed, and until then the ISO counts in ``pending``; a job's
    ISO stays until the job expires.
    """
    cleanup = iso.cleanup if remove else _keep
    try:
        wanted = byte_range(environ.get("HTTP_RANGE"), iso.size)
    except RangeNotSatisfiable:
        cleanup()
        raise
    status, first, length = 200, 0, iso.size
    headers = [
        ("Content-Type", TYPES[iso.format]),
        ("Accept-Ranges", "bytes"),
        ("Content-Disposition", disposition(iso.stem, iso.fallback_stem, iso.format)),
    ]
    if wanted is not None:
        status, first, length = 206, wanted[0], wanted[1] - wanted[0] + 1
        headers.append(("Content-Range", "bytes %d-%d/%d" % (wanted[0], wanted[1], iso.size)))
    headers.append(("Content-Length", str(length)))
    if iso.path is None:  # a HEAD: sized, never built
        cleanup()
        return Response(status, headers, [], length)
    handle = open(iso.path, "rb") if iso.archive is None else ziparchive.Reader(iso.archive, iso.tree)
    body = RemovedOnClose(handle, cleanup, first, length, iso.size, iso.build)
    if remove and pending is not None:
        pending.add(body)
    wrapper = environ.get("wsgi.file_wrapper", wsgiref.util.FileWrapper)
    return Response(status, headers, wrapper(body, BLOCK), length, closer=body)


def _keep():
    """The cleanup of an ISO that outlives its answer (a job's)."""


def accel_response(iso, prefix, work_dir, keep_s):
    """200 with X-Accel-Redirect and no body: nginx sends the file; it goes after ``keep_s`` (None: a
    job's ISO, which goes when the job expires).  A ZIP is written to its file first (once: a job's
    second fetch finds it)."""
    if iso.archive is not None and not os.path.exists(iso.path):
        part = "%s.%d.part" % (iso.path, threading.get_ident())  # two fetches at once: each its own
        ziparchive.write(iso.archive, iso.tree, part)
        os.replace(part, iso.path)
    os.chmod(iso.folder, 0o750)
    os.chmod(iso.path, 0o640)
    if keep_s is not None:
        remover = threading.Timer(keep_s, iso.cleanup)
        remover.daemon = True
        remover.start()
    headers = [
        ("Content-Type", TYPES[iso.format]),
        ("Content-Disposition", disposition(iso.stem, iso.fallback_stem, iso.format)),
        ("X-Accel-Redirect", quote(prefix + os.path.relpath(iso.path, work_dir))),
        ("Content-Length", "0"),
    ]
    return Response(200, headers, [b""], 0)
