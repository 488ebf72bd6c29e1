"""The disc as a ZIP file (PS3.12 Annex V, PS3.3 Annex P), laid out before its first byte (SPEC §13).

The ZIP of a staged disc is known entirely from the staged tree and the
per-file pass (``digests``): each file's path, size and CRC-32.  So its
layout is computed, not written: each entry's local header, its bytes
(stored, as on the disc), then the central directory and the end records.
``Archive`` holds that layout (two offsets a file beyond its ``Digest``)
and tells, for any byte of the archive, what it is: a piece of a header
(made when asked, a few hundred bytes) or a range of one staged file.  The
answer sends the headers from memory and each file's bytes by sendfile
from the staged tree (``Reader``, ``http.delivery``), so a ZIP costs what
its ISO costs to send; behind nginx ``write`` puts the same bytes in a file
with the kernel's copy.

Entries are stored (method 0), never encrypted, with no data descriptor
(sizes and CRC are known) and no extra field but ZIP64's; names as on the
disc (upper case for the PDI tree), ``/`` separators, no directory
entries.  ZIP64 (APPNOTE 4.5.3) where needed: an entry of 4 GiB or more
carries its sizes in a ZIP64 extra field, a header past 4 GiB its offset,
and more than 65,534 entries, or a central directory past or beyond 4 GiB,
add the ZIP64 end record and locator.  Every entry has the one time stamp
given (the disc's), so the same disc is the same bytes, and a resumed
download of a cached disc fits.
"""

import bisect
import io
import os
import struct
import time
from array import array

LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, 30 bytes
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory header, 46 bytes
END = struct.Struct("<IHHHHIIH")  # end of central directory, 22 bytes
END64 = struct.Struct("<IQHHIIQQQQ")  # ZIP64 end of central directory record, 56 bytes
LOCATOR64 = struct.Struct("<IIQI")  # ZIP64 end of central directory locator, 20 bytes
LIMIT32 = 0xFFFFFFFF
LIMIT16 = 0xFFFF
VERSION = 20  # 2.0: stored entries in folders
VERSION64 = 45  # 4.5: ZIP64
MADE_BY = 3 << 8  # UNIX: the external attributes are a file mode
FILE_MODE = 0o100644 << 16
UTF8_NAME = 1 << 11
CENTRAL_BATCH = 1 << 16  # bytes of the central directory made at a time


def dos_time(epoch):
    """(date, time) in MS-DOS form (local time, as unzip shows it), for a time stamp ``epoch``."""
    t = time.localtime(epoch)
    year = min(max(t.tm_year, 1980), 2107)
    return ((year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday, (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)


def _name(digest):
    return digest.path.encode("utf-8", "surrogateescape")


def _flags(name):
    return UTF8_NAME if not name.isascii() else 0


def local_header(digest, when):
    """The local file header of ``digest`` (a ``digests.Digest``)."""
    name = _name(digest)
    big = digest.size >= LIMIT32
    extra = struct.pack("<HHQQ", 1, 16, digest.size, digest.size) if big else b""
    size = LIMIT32 if big else digest.size
    return LOCAL.pack(0x04034B50, VERSION64 if big else VERSION, _flags(name), 0, when[1], when[0],
                      digest.crc32, size, size, len(name), len(extra)) + name + extra


def local_size(digest):
    return LOCAL.size + len(_name(digest)) + (20 if digest.size >= LIMIT32 else 0)


def central_header(digest, offset, when):
    """The central directory header of ``digest``, whose local header is at ``offset``."""
    name = _name(digest)
    fields = []
    if digest.size >= LIMIT32:
        fields += [digest.size, digest.size]
    if offset >= LIMIT32:
        fields.append(offset)
    extra = struct.pack("<HH%dQ" % len(fields), 1, 8 * len(fields), *fields) if fields else b""
    size = LIMIT32 if digest.size >= LIMIT32 else digest.size
    version = VERSION64 if fields else VERSION
    return CENTRAL.pack(0x02014B50, MADE_BY | version, version, _flags(name), 0, when[1], when[0], digest.crc32,
                        size, size, len(name), len(extra), 0, 0, 0, FILE_MODE,
                        min(offset, LIMIT32)) + name + extra


def central_size(digest, offset):
    wide = (2 if digest.size >= LIMIT32 else 0) + (1 if offset >= LIMIT32 else 0)
    return CENTRAL.size + len(_name(digest)) + (4 + 8 * wide if wide else 0)


class Archive:
    """The layout of a ZIP of the files ``digests`` (``digests.Digest``, in the archive's order).

    ``size`` is the archive's length; ``piece(position)`` what its byte at
    ``position`` is.  ``when`` is every entry's (date, time) (``dos_time``).
    """

    format = "zip"

    def __init__(self, digests, when):
        self.entries = list(digests)
        self.when = when
        self._local = array("Q")  # where each entry's local header starts
        position = 0
        for digest in self.entries:
            self._local.append(position)
            position += local_size(digest) + digest.size
        self.central_start = position
        self._central = array("Q")  # where each entry's central directory header starts
        for digest, offset in zip(self.entries, self._local, strict=True):
            self._central.append(position)
            position += central_size(digest, offset)
        self.central_end = position
        self._end = self._end_records()
        self.size = self.central_end + len(self._end)

    @property
    def zip64(self):
        """Whether the archive needs the ZIP64 end records."""
        return len(self._end) > END.size

    def _end_records(self):
        count, start, length = len(self.entries), self.central_start, self.central_end - self.central_start
        end = END.pack(0x06054B50, 0, 0, min(count, LIMIT16), min(count, LIMIT16), min(length, LIMIT32),
                       min(start, LIMIT32), 0)
        if count < LIMIT16 and start < LIMIT32 and length < LIMIT32 and self.central_end < LIMIT32:
            return end
        record = END64.pack(0x06064B50, END64.size - 12, MADE_BY | VERSION64, VERSION64, 0, 0, count, count,
                            length, start)
        return record + LOCATOR64.pack(0x07064B50, 0, self.central_end, 1) + end

    def piece(self, position):
        """What starts at ``position`` (0 <= position < size): bytes (a header's, up to its end) or
        (the entry's ``Digest``, offset in its file, bytes left of it)."""
        if position < self.central_start:
            at = bisect.bisect_right(self._local, position) - 1
            digest = self.entries[at]
            into = position - self._local[at]
            header = local_size(digest)
            if into < header:
                return local_header(digest, self.when)[into:]
            return digest, into - header, digest.size - (into - header)
        if position < self.central_end:
            at = bisect.bisect_right(self._central, position) - 1
            into, made, batch = position - self._central[at], [], 0
            while at < len(self.entries) and batch < CENTRAL_BATCH:
                made.append(central_header(self.entries[at], self._local[at], self.when))
                batch += len(made[-1])
                at += 1
            return b"".join(made)[into:]
        return self._end[position - self.central_end:]


class Reader:
    """The archive (or an ``isoimage.Image``: any layout with ``size`` and ``piece``) as a read-only
    file over the staged tree at ``root`` (for the server's body).

    ``extent(position, count)`` is what the sendfile channel asks: bytes
    from memory, or (file descriptor, offset, count) of the staged file to
    send.  ``read`` is the same through Python, for a server without it.
    One staged file is open at a time.
    """

    def __init__(self, archive, root):
        self.archive = archive
        self.root = root
        self._position = 0
        self._open = None  # (path, file descriptor)

    def seekable(self):
        return True

    def seek(self, offset, whence=os.SEEK_SET):
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.archive.size}[whence]
        self._position = base + offset
        return self._position

    def tell(self):
        return self._position

    def fileno(self):
        raise io.UnsupportedOperation("a ZIP answer is made of several files")

    def extent(self, position, count):
        """At most ``count`` bytes from ``position``: bytes, or (file descriptor, offset, count)."""
        count = min(count, self.archive.size - position)
        piece = self.archive.piece(position)
        if isinstance(piece, bytes):
            return piece[:count]
        digest, offset, left = piece
        return self._descriptor(digest), offset, min(count, left)

    def read(self, size=-1):
        size = self.archive.size - self._position if size is None or size < 0 else size
        parts = []
        while size > 0 and self._position < self.archive.size:
            extent = self.extent(self._position, size)
            data = extent if isinstance(extent, bytes) else os.pread(extent[0], extent[2], extent[1])
            if not data:
                raise OSError("a staged file is shorter than when it was laid out")
            parts.append(data)
            self._position += len(data)
            size -= len(data)
        return b"".join(parts)

    def _descriptor(self, digest):
        path = os.path.join(self.root, digest.path)
        if self._open is None or self._open[0] != path:
            self.close()
            self._open = (path, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        return self._open[1]

    def close(self):
        if self._open is not None:
            os.close(self._open[1])
            self._open = None


def write(archive, root, target):
    """Write the archive (or a laid-out ISO) to the new file ``target`` (for nginx, or the disc cache):
    headers from memory, each staged file's bytes by the kernel's copy (``copy_file_range``, else
    ``sendfile``)."""
    reader = Reader(archive, root)
    try:
        with open(target, "xb") as out:
            position = 0
            while position < archive.size:
                extent = reader.extent(position, archive.size - position)
                if isinstance(extent, bytes):
                    out.write(extent)
                    position += len(extent)
                    continue
                out.flush()
                position += _copy(extent, out.fileno())
    finally:
        reader.close()


def _copy(extent, target):
    """Copy the file range ``extent`` (descriptor, offset, count) to the end of ``target``; its count."""
    source, offset, count = extent
    done = 0
    while done < count:
        try:
            copied = os.copy_file_range(source, target, count - done, offset + done)
        except OSError:  # another file system, or a kernel without it for these files
            copied = os.sendfile(target, source, offset + done, count - done)
        if copied <= 0:
            raise OSError("a staged file is shorter than when it was laid out")
        done += copied
    return done
