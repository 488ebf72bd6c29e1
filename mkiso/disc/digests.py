"""Every file on a medium read once: its size, CRC-32 and SHA-256 together (SPEC §4.6, §13).

SHA256.TXT needs each file's SHA-256, the ZIP each file's CRC-32 and size.
Both come from one read of the staged tree, right after it was staged (the
received files are then in the page cache): ``zlib.crc32`` and
``hashlib.sha256`` over the same chunks, which both release the GIL on
large buffers, so two threads keep two cores busy.  Each file is read in
chunks into one reused buffer (never whole); a record costs a few hundred
bytes (its path, two numbers, 32 bytes of digest).

The pass starts where the files arrive (SPEC §8.1): while a study is
still coming, ``follow`` digests each image the receiver (or getscu) has
finished writing, on the core the transfer leaves idle, and keeps the
result on the file itself (an extended attribute, with the size and
modification time it was made for).  The staged tree's files are hard
links to the received ones, so ``digest_file`` finds it there and reads
nothing; a file changed since (another size or time), copied rather than
linked, or on a file system without user attributes is read as before.
The disc's read-back takes that digest too, for an image unchanged since
(``verify.read_ahead``); a file whose bytes changed behind it with its
time set back is caught by its status change time at the check after the
last image, which drops the digest (``forget``), and after its staging by
the read-back's own look at each file.  Nothing is held per image
meanwhile but the inode numbers already done.

SHA256.TXT (``write_sha256``): one line per other file on the medium,
``<64 lower-case hex digits><two spaces><path>`` with the path as on the
medium (``/`` separators, relative to the root, no leading ``/``), sorted
by the path's bytes, ASCII (a viewer file with a non-ASCII name: its UTF-8
bytes), each line ending in CRLF (as README.TXT): the
format ``sha256sum -c`` reads (it takes the CR as part of the name unless
the lines are converted, as ``tr -d '\\r'`` does).  It lists neither itself
nor anything outside the files the medium holds.
"""

import array
import bisect
import concurrent.futures
import dataclasses
import errno
import hashlib
import heapq
import itertools
import logging
import os
import struct
import threading
import time
import zlib

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read per call; both digests release the GIL on buffers this large
THREADS = 2
TAKEN = 256  # pairs ``digest_files`` takes at a time
BATCH = 16  # files a thread reads at a time
NAME = "SHA256.TXT"
ATTRIBUTE = "user.mkiso.digest"
KEPT = struct.Struct("<QqI32s")  # size, modification time (ns), CRC-32, SHA-256: what the attribute holds
SETTLE_S = 0.1  # a file not modified for this long is taken as written (if not, its digest is not used)
FOLLOW_EVERY_S = 0.1  # between rounds over the folders, and 10 microseconds more per file they hold:
FOLLOW_PER_FILE_S = 1e-5  # a round over 50,000 names costs about 20 ms, a few per cent of a core
FOLLOW_CHUNK = 1 << 17  # bytes read at a time as the files arrive


@dataclasses.dataclass(frozen=True, slots=True)
class Digest:
    """One file on the medium: its path there (``/`` separators), size, CRC-32 (None where nothing needs
    it: a third of the pass's time) and SHA-256 (32 bytes)."""

    path: str
    size: int
    crc32: int
    sha256: bytes


def digest_file(source, path, crc32=True, kept=True):
    """The ``Digest`` of the file at ``source``, which the medium holds as ``path``; its CRC-32 only
    with ``crc32``.  One kept on the file as it arrived (``follow``) is taken without a read, unless
    not ``kept`` (a check of the bytes themselves)."""
    digest = _kept_digest(source, path, crc32) if kept else None
    if digest is not None:
        return digest
    with open(source, "rb", buffering=0) as handle:
        size, crc, sha = _read(handle, crc32)
    return Digest(path, size, crc, sha)


def _read(handle, crc32=True, buffer=None):
    """(size, CRC-32 or None, SHA-256) of the rest of the open file ``handle``, read in chunks (into
    ``buffer`` where given)."""
    crc, sha = 0 if crc32 else None, hashlib.sha256()
    size = 0
    buffer = bytearray(CHUNK) if buffer is None else buffer
    view = memoryview(buffer)
    while True:
        count = handle.readinto(buffer)
        if not count:
            break
        chunk = view[:count]
        if crc32:
            crc = zlib.crc32(chunk, crc)
        sha.update(chunk)
        size += count
    return size, crc, sha.digest()


def kept_on(source, now=None):
    """(size, CRC-32, SHA-256) kept on the file at ``source`` when it still has that size and time
    (``now``: its (size, modification time) as the caller found it, else looked up)."""
    try:
        size, modified, crc, sha = KEPT.unpack(os.getxattr(source, ATTRIBUTE))
        if now is None:
            found = os.stat(source)
            now = found.st_size, found.st_mtime_ns
    except (OSError, struct.error):
        return None
    return (size, crc, sha) if tuple(now) == (size, modified) else None


def forget(source):
    """Drop the digest kept on the file at ``source``: the file changed behind its back (``received.Early``
    saw its status change with its size and time as they were), so it is read again wherever needed."""
    try:
        os.removexattr(source, ATTRIBUTE)
    except OSError:
        pass  # none kept (or none can be): nothing to trust either


def keep(source, buffer=None):
    """Digest the file at ``source`` and keep the digest on it; False where the file system keeps none
    (the caller stops trying).  A file that changed while it was read is left without one."""
    with open(source, "rb", buffering=0) as handle:
        before = os.fstat(handle.fileno())
        size, crc, sha = _read(handle, buffer=buffer)
        after = os.fstat(handle.fileno())
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or size != after.st_size:
            return True
        try:
            os.setxattr(handle.fileno(), ATTRIBUTE, KEPT.pack(size, after.st_mtime_ns, crc, sha))
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
                return False
            raise
    return True


def follow(folders, done, also=None):
    """Digest the files arriving in ``folders`` as they are written (``keep``), in a thread of its own,
    until the event ``done`` is set: the per-file pass of the disc, moved beside the transfer.
    ``also(path)``, if given, is called for each file just digested (its header is read then, while
    its first bytes are in the page cache)."""
    threading.Thread(target=_follow, args=(folders, done, also), name="digests-follow", daemon=True).start()


class _Seen:
    """Inode numbers (a file moved from the receiver's folder to the retrieval's is the same one): a
    sorted array, 8 bytes a file, and a set of the latest few thousand, merged into it now and then.
    A set of 20,000 numbers alone is 1.6 MB, held while the study arrives (SPEC §8, flat memory)."""

    RECENT = 4096

    def __init__(self):
        self._sorted = array.array("Q")
        self._recent = set()

    def __len__(self):
        return len(self._sorted) + len(self._recent)

    def __contains__(self, inode):
        if inode in self._recent:
            return True
        at = bisect.bisect_left(self._sorted, inode)
        return at < len(self._sorted) and self._sorted[at] == inode

    def add(self, inode):
        self._recent.add(inode)
        if len(self._recent) >= self.RECENT:
            self._sorted = array.array("Q", heapq.merge(self._sorted, sorted(self._recent)))
            self._recent.clear()


def _follow(folders, done, also):
    """Never fails the job: what it leaves undone, the staged tree's pass reads.  One small buffer for
    every file: a MB a file, freed and taken again, stayed in the process's heap."""
    seen, buffer = _Seen(), bytearray(FOLLOW_CHUNK)
    try:
        while not done.wait(FOLLOW_EVERY_S + FOLLOW_PER_FILE_S * len(seen)):
            for folder in folders:
                if not _follow_folder(folder, seen, buffer, done, also):
                    return
    except OSError as exc:
        log.warning("digests are no longer made as the images arrive: %s", exc)


def _follow_folder(folder, seen, buffer, done, also):
    """One pass over ``folder``; False when digests cannot be kept here (or ``done``)."""
    settled = time.time() - SETTLE_S
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        return True
    with entries:
        for entry in entries:
            if done.is_set():
                return False
            try:
                if entry.inode() in seen or not entry.is_file() or entry.stat().st_mtime > settled:
                    continue
                seen.add(entry.inode())
                if not keep(entry.path, buffer):
                    return False
                if also is not None:
                    also(entry.path)
            except FileNotFoundError:
                continue  # moved meanwhile: found again in the other folder
    return True


def digest_files(pairs, threads=THREADS, crc32=True, kept=True):
    """The ``Digest`` of each (source path, medium path) pair of the iterable ``pairs``, yielded in its order
    (their CRC-32 only with ``crc32``; see ``digest_file`` for ``kept``).

    TAKEN pairs at a time: a digest kept on its file is taken here (a
    look-up, cheaper than handing it to a thread: 10,000 of them took 0.2 s
    through threads, 0.08 s here), the others are read by ``threads``
    threads at once; nothing is held for more than those pairs (an
    executor's ``map`` over the whole medium would make a Future, about
    1.7 KB, per file up front: 34 MB for 20,000 files; SPEC §8, flat memory).
    """
    pairs = iter(pairs)
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="digest") as pool:
        while taken := list(itertools.islice(pairs, TAKEN)):
            found = [_kept_digest(source, path, crc32) if kept else None for source, path in taken]
            unread = [pair for pair, digest in zip(taken, found, strict=True) if digest is None]
            read = itertools.chain.from_iterable(pool.map(
                lambda batch: [digest_file(source, path, crc32, kept=False) for source, path in batch],
                [unread[at:at + BATCH] for at in range(0, len(unread), BATCH)]))
            for digest in found:
                yield digest if digest is not None else next(read)


def _kept_digest(source, path, crc32):
    """The ``Digest`` kept on the file at ``source`` (``kept_on``), or None."""
    kept = kept_on(source)
    if kept is None:
        return None
    size, crc, sha = kept
    return Digest(path, size, crc if crc32 else None, sha)


def sha256_of(paths):
    """{path: its SHA-256} of the files ``paths``: what a print's images are checked against later."""
    return {digest.path: digest.sha256 for digest in digest_files(((path, path) for path in paths), crc32=False)}


def changed(pairs, expected):
    """How many of the (file, key) pairs' files no longer have the SHA-256 ``expected[key]``: their bytes
    read again, never a digest kept on them."""
    return sum(1 for digest in digest_files(pairs, crc32=False, kept=False) if digest.sha256 != expected[digest.path])


def tree_paths(root, prefix=""):
    """The path on the medium of every file under ``root``, in sorted order, made as they are asked for.

    A folder's entries are sorted as their paths sort (a folder's name with
    its ``/``), so the walk yields the sorted list of every path without
    holding it: one folder's names at a time (SPEC §8, flat memory).
    """
    with os.scandir(root) as listing:
        entries = sorted((entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name)
                         for entry in listing)
    for name in entries:
        if name.endswith("/"):
            yield from tree_paths(os.path.join(root, name[:-1]), prefix + name)
        else:
            yield prefix + name


def digest_tree(root, crc32=True):
    """The ``Digest`` of every file under ``root`` (the staged medium) but its SHA256.TXT (being written
    from them), sorted by path, yielded as made."""
    return digest_files(((os.path.join(root, path), path) for path in tree_paths(root) if path != NAME),
                        crc32=crc32)


def write_sha256(root, digests, keep):
    """Write SHA256.TXT at ``root``, a line per ``Digest`` of ``digests`` (sorted by path, as
    ``digest_tree`` gives them) as it comes; returns the digests if ``keep``, and SHA256.TXT's own
    ``Digest`` (so the medium's list of files is complete without reading it again)."""
    crc, sha, size, kept = 0, hashlib.sha256(), 0, []
    with open(os.path.join(root, NAME), "xb") as handle:
        for digest in digests:
            line = b"%s  %s\r\n" % (digest.sha256.hex().encode("ascii"),
                                     digest.path.encode("utf-8", "surrogateescape"))
            handle.write(line)
            crc, size = zlib.crc32(line, crc), size + len(line)
            sha.update(line)
            if keep:
                kept.append(digest)
    return kept, Digest(NAME, size, crc, sha.digest())


def seal(root, keep=True):
    """The per-file pass over the staged medium at ``root``, written as its SHA256.TXT as it goes; returns
    every file's ``Digest`` (SHA256.TXT's own included) sorted by path if ``keep`` (a ZIP needs them,
    and the disc cache), else none: an ISO's SHA256.TXT holds all it needs, and their CRC-32 is not
    even made."""
    found, own = write_sha256(root, digest_tree(root, crc32=keep), keep)
    if keep:
        found.append(own)
        found.sort(key=lambda digest: digest.path)
    return found
