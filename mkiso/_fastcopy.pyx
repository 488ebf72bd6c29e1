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
