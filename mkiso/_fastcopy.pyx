# cython: language_level=3
"""The hot path in C: placing received files into a disc's staging tree.

A study is thousands of files.  ``place_files`` takes the whole list in one
call and works through it with the GIL released, so other requests keep
running: a hard link where source and target share a file system, else an
in-kernel copy (copy_file_range, then sendfile, then read/write).

``mkiso.fastcopy`` holds the pure-Python twin with the same behaviour and
chooses between the two.
"""

from libc.stdlib cimport malloc, free
from libc.errno cimport errno, ENOMEM

cdef extern from "<errno.h>" nogil:
    int EXDEV
    int EPERM
    int EMLINK
    int EINTR
    int EINVAL
    int ENOSYS
    int EOPNOTSUPP
    int ENOTSUP

from posix.types cimport off_t

cdef extern from "<fcntl.h>" nogil:
    int O_RDONLY
    int O_WRONLY
    int O_CREAT
    int O_EXCL
    int O_CLOEXEC
    int c_open "open"(const char *path, int flags, int mode)

cdef extern from "<unistd.h>" nogil:
    int c_link "link"(const char *src, const char *dst)
    int c_close "close"(int fd)
    int c_unlink "unlink"(const char *path)
    ssize_t c_read "read"(int fd, void *buf, size_t count)
    ssize_t c_write "write"(int fd, const void *buf, size_t count)
    ssize_t copy_file_range(int fd_in, off_t *off_in, int fd_out, off_t *off_out,
                            size_t length, unsigned int flags)

cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t c_sendfile "sendfile"(int out_fd, int in_fd, off_t *offset, size_t count)

cdef enum:
    CHUNK = 1073741824  # bytes asked of the kernel per call
    BUFSIZE = 1048576   # buffer of the read/write fallback

# What a placement did, as returned by link_or_copy.
LINKED = "link"
COPIED = "copy"


cdef int _can_copy_instead(int err) nogil:
    """A link that failed for these reasons can still be a copy."""
    return err == EXDEV or err == EPERM or err == EMLINK or err == EOPNOTSUPP or err == ENOTSUP


cdef int _kernel_refused(int err) nogil:
    """copy_file_range/sendfile cannot do this pair of files; use the next way."""
    return err == EXDEV or err == EINVAL or err == ENOSYS or err == EOPNOTSUPP or err == ENOTSUP or err == EPERM


cdef int _write_all(int dst, char *buf, ssize_t n) nogil:
    cdef ssize_t written
    while n > 0:
        written = c_write(dst, buf, n)
        if written < 0:
            if errno == EINTR:
                continue
            return errno
        buf += written
        n -= written
    return 0


cdef int _copy_fds(int src, int dst) nogil:
    """Copy src to dst from their current offsets to EOF; 0 or an errno."""
    cdef int way = 0  # 0 copy_file_range, 1 sendfile, 2 read/write
    cdef ssize_t n
    cdef int err
    cdef char *buf = NULL
    while True:
        if way == 0:
            n = copy_file_range(src, NULL, dst, NULL, CHUNK, 0)
        elif way == 1:
            n = c_sendfile(dst, src, NULL, CHUNK)
        else:
            n = c_read(src, buf, BUFSIZE)
            if n > 0:
                err = _write_all(dst, buf, n)
                if err:
                    free(buf)
                    return err
        if n == 0:
            break
        if n < 0:
            err = errno
            if err == EINTR:
                continue
            if way < 2 and _kernel_refused(err):
                way += 1
                if way == 2:
                    buf = <char *>malloc(BUFSIZE)
                    if buf == NULL:
                        return ENOMEM
                continue
            free(buf)
            return err
    free(buf)
    return 0


cdef int _copy_file(const char *src, const char *dst) nogil:
    """Copy to a new file (never over an existing one); 0 or an errno."""
    cdef int in_fd, out_fd, err, close_err
    in_fd = c_open(src, O_RDONLY | O_CLOEXEC, 0)
    if in_fd < 0:
        return errno
    out_fd = c_open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o666)
    if out_fd < 0:
        err = errno
        c_close(in_fd)
        return err
    err = _copy_fds(in_fd, out_fd)
    close_err = c_close(out_fd)
    if close_err != 0 and err == 0:
        err = errno
    c_close(in_fd)
    if err:
        c_unlink(dst)
    return err


cdef int _place(const char *src, const char *dst, int *copied) nogil:
    """Link, or copy where a link is impossible; 0 or an errno."""
    if c_link(src, dst) == 0:
        copied[0] = 0
        return 0
    if not _can_copy_instead(errno):
        return errno
    copied[0] = 1
    return _copy_file(src, dst)


def link_or_copy(src, dst):
    """Place one file: returns "link" or "copy"; raises OSError naming the file."""
    cdef bytes bsrc = _fs(src)
    cdef bytes bdst = _fs(dst)
    cdef const char *csrc = bsrc
    cdef const char *cdst = bdst
    cdef int copied = 0
    cdef int err
    with nogil:
        err = _place(csrc, cdst, &copied)
    if err:
        raise _error(err, src, dst)
    return COPIED if copied else LINKED


def place_files(pairs):
    """Place every (src, dst) pair in one call, GIL released throughout.

    Returns (links, copies).  Stops at the first failure with an OSError
    naming the file; the files placed before it stay (the caller owns the
    tree and removes it on error).
    """
    cdef list srcs = []
    cdef list dsts = []
    for src, dst in pairs:
        srcs.append(_fs(src))
        dsts.append(_fs(dst))
    cdef Py_ssize_t count = len(srcs)
    cdef Py_ssize_t i, failed = -1
    cdef int err = 0
    cdef int copied = 0
    cdef long links = 0, copies = 0
    cdef const char **csrcs = <const char **>malloc(max(count, 1) * sizeof(char *))
    cdef const char **cdsts = <const char **>malloc(max(count, 1) * sizeof(char *))
    if csrcs == NULL or cdsts == NULL:
        free(csrcs)
        free(cdsts)
        raise MemoryError()
    try:
        for i in range(count):
            csrcs[i] = <bytes>srcs[i]
            cdsts[i] = <bytes>dsts[i]
        with nogil:
            for i in range(count):
                err = _place(csrcs[i], cdsts[i], &copied)
                if err:
                    failed = i
                    break
                if copied:
                    copies += 1
                else:
                    links += 1
    finally:
        free(csrcs)
        free(cdsts)
    if failed >= 0:
        raise _error(err, srcs[failed], dsts[failed])
    return links, copies


cdef bytes _fs(path):
    import os
    return os.fsencode(path)


def _error(int err, src, dst):
    import os
    return OSError(err, os.strerror(err), os.fsdecode(src), None, os.fsdecode(dst))


# -- the header scan --------------------------------------------------------
#
# A study is thousands of files, and each one's header is read for the
# retrieval checks and the DICOMDIR.  pydicom takes about 285 us a file;
# reading the first 64 KB takes about 13 us.  So the few tags a disc needs
# are picked out here, in C with the GIL released, from Part 10 files in
# explicit or implicit VR little endian (every transfer syntax mkiso meets
# but the retired big endian and deflate).  Anything else, a header that
# does not end within HEAD_BYTES, or anything malformed is handed back as
# None, and pydicom (the twin, and the cross-check in the tests) reads it.

from libc.string cimport memcmp

cdef enum:
    HEAD_BYTES = 65536
    MAX_DEPTH = 16
    NWANTED = 18

# The tags mkiso.dicom.received.HEADER_TAGS names, in this order, sorted.
WANTED_TAGS = (
    0x00080005, 0x00080016, 0x00080018, 0x00080020, 0x00080030, 0x00080050, 0x00080060, 0x00081030,
    0x00100010, 0x00100020, 0x00100021, 0x00100030, 0x00100040, 0x0020000D, 0x0020000E, 0x00200010,
    0x00200011, 0x00200013,
)
cdef unsigned int _wanted[NWANTED]
for _i, _tag in enumerate(WANTED_TAGS):
    _wanted[_i] = _tag
cdef unsigned int LAST_WANTED = 0x00200013


cdef inline unsigned int _u16(const unsigned char *p) nogil:
    return p[0] | (p[1] << 8)


cdef inline unsigned int _u32(const unsigned char *p) nogil:
    return p[0] | (p[1] << 8) | (p[2] << 16) | (<unsigned int>p[3] << 24)


cdef inline int _long_vr(const unsigned char *vr) nogil:
    """Explicit VRs with a reserved field and a 4-byte length."""
    cdef char a = vr[0], b = vr[1]
    return ((a == b'O' and (b == b'B' or b == b'D' or b == b'F' or b == b'L' or b == b'V' or b == b'W'))
            or (a == b'S' and (b == b'Q' or b == b'V')) or (a == b'U' and (b == b'C' or b == b'N' or b == b'R'
            or b == b'T' or b == b'V')))


cdef Py_ssize_t _element(const unsigned char *buf, Py_ssize_t size, Py_ssize_t pos, int implicit,
                         unsigned int *tag, unsigned int *length, int *is_sq) nogil:
    """Read one element header at pos; the position of its value, or -1."""
    if pos + 8 > size:
        return -1
    tag[0] = (_u16(buf + pos) << 16) | _u16(buf + pos + 2)
    if implicit or (tag[0] >> 16) == 0xFFFE:
        length[0] = _u32(buf + pos + 4)
        is_sq[0] = length[0] == 0xFFFFFFFFU
        return pos + 8
    is_sq[0] = buf[pos + 4] == b'S' and buf[pos + 5] == b'Q'
    if _long_vr(buf + pos + 4):
        if pos + 12 > size:
            return -1
        length[0] = _u32(buf + pos + 8)
        return pos + 12
    length[0] = _u16(buf + pos + 6)
    return pos + 8


cdef Py_ssize_t _skip_sequence(const unsigned char *buf, Py_ssize_t size, Py_ssize_t pos, int implicit,
                               int depth) nogil:
    """Skip the items of an undefined-length sequence; the position after its delimiter, or -1."""
    cdef unsigned int tag, length
    cdef int is_sq
    if depth > MAX_DEPTH:
        return -1
    while True:
        pos = _element(buf, size, pos, 1, &tag, &length, &is_sq)
        if pos < 0:
            return -1
        if tag == 0xFFFEE0DDU:
            return pos
        if tag != 0xFFFEE000U:
            return -1
        if length != 0xFFFFFFFFU:
            pos += length
            continue
        while True:  # an undefined-length item: elements up to its delimiter
            pos = _element(buf, size, pos, implicit, &tag, &length, &is_sq)
            if pos < 0:
                return -1
            if tag == 0xFFFEE00DU:
                break
            if length == 0xFFFFFFFFU:
                if not is_sq:
                    return -1
                pos = _skip_sequence(buf, size, pos, implicit, depth + 1)
                if pos < 0:
                    return -1
            else:
                pos += length


cdef int _scan(const unsigned char *buf, Py_ssize_t size, int whole, Py_ssize_t *offsets,
               Py_ssize_t *lengths) nogil:
    """Find the wanted tags (offsets[i], lengths[i]; -1 when absent) and the transfer
    syntax (index NWANTED).  1 on success, 0 to hand the file to pydicom."""
    cdef Py_ssize_t pos = 132, value
    cdef unsigned int tag, length
    cdef int is_sq, implicit, i, w = 0
    for i in range(NWANTED + 1):
        offsets[i] = -1
        lengths[i] = 0
    if size < 132 or memcmp(buf + 128, b"DICM", 4) != 0:
        return 0
    while pos + 8 <= size and _u16(buf + pos) == 0x0002:  # the meta header: explicit VR little endian
        value = _element(buf, size, pos, 0, &tag, &length, &is_sq)
        if value < 0 or length == 0xFFFFFFFFU or value + length > size:
            return 0
        if tag == 0x00020010:
            offsets[NWANTED] = value
            lengths[NWANTED] = length
        pos = value + length
    length = lengths[NWANTED]
    while length > 0 and (buf[offsets[NWANTED] + length - 1] == 0 or buf[offsets[NWANTED] + length - 1] == 32):
        length -= 1
    if offsets[NWANTED] < 0:
        return 0
    if length == 17 and memcmp(buf + offsets[NWANTED], b"1.2.840.10008.1.2", 17) == 0:
        implicit = 1
    elif ((length == 19 and memcmp(buf + offsets[NWANTED], b"1.2.840.10008.1.2.2", 19) == 0)
          or (length == 22 and memcmp(buf + offsets[NWANTED], b"1.2.840.10008.1.2.1.99", 22) == 0)):
        return 0  # big endian, deflated: pydicom's
    else:
        implicit = 0
    while True:
        if pos == size and whole:
            return 1  # the file ends before the last wanted tag
        value = _element(buf, size, pos, implicit, &tag, &length, &is_sq)
        if value < 0 or (tag >> 16) == 0xFFFE:
            return 0
        if tag > LAST_WANTED:
            return 1
        if length == 0xFFFFFFFFU:
            if not is_sq and not implicit:
                return 0
            pos = _skip_sequence(buf, size, value, implicit, 0)
            if pos < 0:
                return 0
            continue
        if value + length > size:
            return 0
        while w < NWANTED and _wanted[w] < tag:
            w += 1
        if w < NWANTED and _wanted[w] == tag:
            offsets[w] = value
            lengths[w] = length
        pos = value + length


def scan_headers(paths):
    """The raw values of WANTED_TAGS for each file, or None where pydicom must read it.

    Returns a list aligned with ``paths``: (transfer syntax, (value or None, ...))
    with each value the bytes as they stand in the file.
    """
    cdef unsigned char *buf = <unsigned char *>malloc(HEAD_BYTES)
    cdef Py_ssize_t offsets[NWANTED + 1]
    cdef Py_ssize_t lengths[NWANTED + 1]
    cdef Py_ssize_t size, n
    cdef int fd, ok, i
    cdef bytes path
    cdef const char *cpath
    if buf == NULL:
        raise MemoryError()
    results = []
    try:
        for name in paths:
            path = _fs(name)
            cpath = path
            with nogil:
                ok = 0
                size = 0
                n = 1
                fd = c_open(cpath, O_RDONLY | O_CLOEXEC, 0)
                if fd >= 0:
                    while size < HEAD_BYTES:
                        n = c_read(fd, buf + size, HEAD_BYTES - size)
                        if n < 0 and errno == EINTR:
                            continue
                        if n <= 0:
                            break
                        size += n
                    c_close(fd)
                    if n >= 0:  # n == 0: the whole file is in buf
                        ok = _scan(buf, size, n == 0 or size < HEAD_BYTES, offsets, lengths)
            if not ok:
                results.append(None)
                continue
            values = []
            for i in range(NWANTED):
                values.append(None if offsets[i] < 0 else (<char *>buf)[offsets[i]:offsets[i] + lengths[i]])
            syntax = (<char *>buf)[offsets[NWANTED]:offsets[NWANTED] + lengths[NWANTED]]
            results.append((syntax, tuple(values)))
    finally:
        free(buf)
    return results
