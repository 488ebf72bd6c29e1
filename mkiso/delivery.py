"""Handing a finished ISO to the client (SPEC §2 ISO responses, §8).

The body is the server's ``wsgi.file_wrapper`` over the open ISO, so
waitress sends it from the file (never a Python generator reading it), and
the job's temp files are removed when the server closes that body: after
the last byte, or as soon as the client goes away.

A single ``Range: bytes=a-b`` (or ``a-``, ``-n``) is answered with 206 and
``Content-Range``, so an interrupted 4 GB download resumes (``curl -C -``);
an unsatisfiable one with 416.  Several ranges, or a malformed header, get
the whole file (RFC 7233 allows ignoring them).

Behind nginx, with ``server.x_accel_prefix``, the answer is only headers:
``X-Accel-Redirect`` names the ISO under the prefix, which nginx maps to
the work dir, and nginx sends the file (Range and all).  The ISO is made
readable for nginx's group and removed after ``server.x_accel_keep_s``.
"""

import os
import re
import threading
import unicodedata
import wsgiref.util
from urllib.parse import quote

from . import errors
from .responses import Response

ISO_TYPE = "application/x-iso9660-image"
BLOCK = 1 << 20
UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\"\'`:*?<>|;,%]+')
SINGLE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def clean_name(text):
    """A file name stem: no path separator, quote or control character."""
    text = UNSAFE.sub("_", text)
    text = re.sub(r"\s+", "_", text.strip())
    return re.sub(r"_+", "_", text).strip("._")[:100]


def ascii_name(text):
    """The ASCII form for ``filename=``: accents dropped, upper-cased."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return clean_name(folded).upper()


def patient_stem(person_name):
    """'Müller^Jürgen' -> 'Müller_Jürgen' (alphabetic group, components joined)."""
    alphabetic = person_name.split("=")[0]
    return "_".join(part.strip() for part in alphabetic.split("^") if part.strip())


def disposition(stem, fallback):
    """Content-Disposition with an ASCII filename and an RFC 6266 filename*."""
    utf8 = clean_name(stem) or fallback
    plain = ascii_name(stem) or ascii_name(fallback) or "MKISO"
    return "attachment; filename=\"%s.iso\"; filename*=UTF-8''%s" % (plain, quote(utf8 + ".iso", safe=""))


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
    """The open ISO from ``offset``, at most ``length`` bytes; closing it removes the job's files.

    The server closes it when the answer ends: after the last byte, or when
    the client went away.  The file position then tells how far sending
    got (every server path advances it by what went out), which
    ``on_close(sent)`` is told.
    """

    def __init__(self, handle, cleanup, offset, length):
        self._handle = handle
        self._cleanup = cleanup
        self._offset = offset
        self._remaining = length
        self.on_close = None
        handle.seek(offset)
        self.seek = handle.seek
        self.tell = handle.tell
        self.fileno = handle.fileno

    def read(self, size=-1):
        """Never past the answer's end, whichever server reads it."""
        size = self._remaining if size is None or size < 0 else min(size, self._remaining)
        data = self._handle.read(size)
        self._remaining -= len(data)
        return data

    def close(self):
        if self._cleanup is None:
            return
        try:
            sent = self._handle.tell() - self._offset
            self._handle.close()
        finally:
            cleanup, self._cleanup = self._cleanup, None
            cleanup()
        if self.on_close is not None:
            self.on_close(sent)


def iso_response(environ, iso, remove=True):
    """200 (or 206 for a Range) with the ISO as a file-backed body.

    With ``remove`` (a synchronous download) ``iso.cleanup`` runs when the
    answer is closed; a job's ISO stays until the job expires.
    """
    cleanup = iso.cleanup if remove else _keep
    try:
        wanted = byte_range(environ.get("HTTP_RANGE"), iso.size)
    except RangeNotSatisfiable:
        cleanup()
        raise
    status, first, length = 200, 0, iso.size
    headers = [
        ("Content-Type", ISO_TYPE),
        ("Accept-Ranges", "bytes"),
        ("Content-Disposition", disposition(iso.stem, iso.fallback_stem)),
    ]
    if wanted is not None:
        status, first, length = 206, wanted[0], wanted[1] - wanted[0] + 1
        headers.append(("Content-Range", "bytes %d-%d/%d" % (wanted[0], wanted[1], iso.size)))
    headers.append(("Content-Length", str(length)))
    if iso.path is None:  # a HEAD: sized, never built
        cleanup()
        return Response(status, headers, [], length)
    body = RemovedOnClose(open(iso.path, "rb"), cleanup, first, length)
    wrapper = environ.get("wsgi.file_wrapper", wsgiref.util.FileWrapper)
    return Response(status, headers, wrapper(body, BLOCK), length, closer=body)


def _keep():
    """The cleanup of an ISO that outlives its answer (a job's)."""


def accel_response(iso, prefix, work_dir, keep_s):
    """200 with X-Accel-Redirect and no body: nginx sends the file; it goes after ``keep_s`` (None: a
    job's ISO, which goes when the job expires)."""
    os.chmod(iso.folder, 0o750)
    os.chmod(iso.path, 0o640)
    if keep_s is not None:
        remover = threading.Timer(keep_s, iso.cleanup)
        remover.daemon = True
        remover.start()
    headers = [
        ("Content-Type", ISO_TYPE),
        ("Content-Disposition", disposition(iso.stem, iso.fallback_stem)),
        ("X-Accel-Redirect", quote(prefix + os.path.relpath(iso.path, work_dir))),
        ("Content-Length", "0"),
    ]
    return Response(200, headers, [b""], 0)
