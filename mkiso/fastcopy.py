"""The per-file hot path: the C extension or its pure-Python twin.

Placing files into a staging tree: both give the same result, a hard link
where source and target share a file system, otherwise a copy into a new
file (never over an existing one), and an OSError naming both paths when
that is impossible.  The extension does it with the GIL released and
in-kernel copies.

Scanning headers: the extension picks the few tags a disc needs out of each
file in C; its twin is pydicom itself (``mkiso.dicom.received.read_received``),
to which the extension hands every file it does not take on.

``MKISO_NO_CEXT=1`` forces the twins, which is what runs if the extension
was not built.
"""

import errno
import os
import shutil

LINKED = "link"
COPIED = "copy"

_COPY_INSTEAD = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP}


def py_link_or_copy(src, dst):
    try:
        os.link(src, dst)
        return LINKED
    except OSError as exc:
        if exc.errno not in _COPY_INSTEAD:
            raise
    try:
        with open(src, "rb") as source, open(dst, "xb") as target:
            try:
                shutil.copyfileobj(source, target, 1 << 20)
            except BaseException:
                os.unlink(dst)
                raise
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fsdecode(src), None, os.fsdecode(dst))
    return COPIED


def py_place_files(pairs):
    links = copies = 0
    for src, dst in pairs:
        if py_link_or_copy(src, dst) == LINKED:
            links += 1
        else:
            copies += 1
    return links, copies


def py_scan_headers(paths):
    """The twin of the C scan: no file is scanned here, pydicom reads them all."""
    return [None] * len(paths)


def _choose():
    if os.environ.get("MKISO_NO_CEXT") == "1":
        return None
    try:
        from mkiso import _fastcopy
    except ImportError:
        return None
    return _fastcopy


_extension = _choose()
IMPLEMENTATION = "cython" if _extension else "python"
link_or_copy = _extension.link_or_copy if _extension else py_link_or_copy
place_files = _extension.place_files if _extension else py_place_files
scan_headers = _extension.scan_headers if _extension else py_scan_headers
