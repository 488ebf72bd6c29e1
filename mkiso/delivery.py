"""Handing a finished ISO to the client (SPEC §2 ISO responses, §8).

The body is the server's ``wsgi.file_wrapper`` over the open ISO, so
waitress sends it from the file (never a Python generator reading it), and
the job's temp files are removed when the server closes that body: after
the last byte, or as soon as the client goes away.
"""

import re
import unicodedata
import wsgiref.util
from urllib.parse import quote

from .responses import Response

ISO_TYPE = "application/x-iso9660-image"
BLOCK = 1 << 20
UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\"\'`:*?<>|;,%]+')


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


class RemovedOnClose:
    """The open ISO; closing it (the server does, when done) removes the job's files."""

    def __init__(self, handle, cleanup):
        self._handle = handle
        self._cleanup = cleanup
        self.read = handle.read
        self.seek = handle.seek
        self.tell = handle.tell
        self.fileno = handle.fileno

    def close(self):
        try:
            self._handle.close()
        finally:
            cleanup, self._cleanup = self._cleanup, None
            if cleanup is not None:
                cleanup()


def iso_response(environ, iso):
    """200 with the ISO as a file-backed body; ``iso.cleanup`` runs on close."""
    handle = open(iso.path, "rb")
    body = RemovedOnClose(handle, iso.cleanup)
    wrapper = environ.get("wsgi.file_wrapper", wsgiref.util.FileWrapper)
    headers = [
        ("Content-Type", ISO_TYPE),
        ("Content-Length", str(iso.size)),
        ("Content-Disposition", disposition(iso.stem, iso.fallback_stem)),
    ]
    return Response(200, headers, wrapper(body, BLOCK), iso.size)
