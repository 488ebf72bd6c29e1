"""A streamed download's ISO, sent from its staged tree without being written (SPEC §8.1).

genisoimage writes an image front to back: the volume descriptors, the path
tables and both directory trees (ISO 9660 with Rock Ridge, Joliet) first,
then each file's bytes from a sector boundary, then zeros to its end.  So
all of the image that is not a file's bytes lies before the first file's
(the head) or is zero.  ``lay_out`` takes the head from genisoimage's
output in a pipe and stops genisoimage there, before it reads a single
image; the head's directory, read as mkiso-verify reads an ISO, says where
each staged file's bytes go.  ``Image`` is that layout in the form
``ziparchive.Reader`` sends: the head from its file, each file's bytes by
sendfile from the staged tree, zeros between.  A 1 GB ISO is then never
written and read again: writing it whole cost 3.5 s at 10,000 images
before its last bytes could leave.

Only that layout is served, and it is checked before the first byte: every
directory, path table and Rock Ridge continuation within the head, every
file of the staged tree in it exactly once with its size, the Joliet tree
pointing at the same bytes, no two files overlapping, the image's size
its primary volume descriptor's volume space.  Anything else (a file of several extents, a
directory tree it cannot read within HEAD_LIMIT) is not laid out: the
caller lets genisoimage write the image as before.  tests/test_isoimage.py
holds the layout against genisoimage's own ISO of the same tree, byte for
byte but for the time the image was made, and by isoinfo's listings.

The layout keeps four numbers a file in arrays (28 bytes: 1.4 MB at 50,000
files); the paths wait in a file beside the head until their bytes are sent.
"""

import bisect
import dataclasses
import os
import struct
from array import array

from . import tree, verify

BLOCK = 1 << 20  # bytes of the head or of zeros a piece
PIPE_READ = 1 << 16  # of genisoimage's output at a time: what its pipe holds, never a MB more in memory
FIRST_READ = 1 << 16  # of the head, plus PER_FILE for each file of the tree, before the first try
PER_FILE = 512
HEAD_LIMIT = 256 << 20  # no directory of a disc mkiso makes comes near it
DESCRIPTOR_END = 17 * tree.SECTOR  # the primary volume descriptor is the first, at sector 16 (ECMA-119 8.4)


class NotLaidOut(Exception):
    """The image is not one whose layout ``Image`` serves; genisoimage writes it instead."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """A staged file, as ``ziparchive.Reader`` opens it: its path in the tree."""

    path: str


class Image:
    """The layout of one ISO image: ``size`` bytes, of which the first ``head_end`` are in the file
    ``head``, then each staged file's bytes at its extent, zeros elsewhere."""

    format = "iso"

    def __init__(self, head, head_end, size, starts, sizes, names, name_at, name_sizes):
        self.head = head
        self.head_end = head_end
        self.size = size
        self._starts = starts  # array: each file's first byte in the image, in the image's order
        self._sizes = sizes
        self._names = names  # the file of the files' paths
        self._name_at = name_at  # arrays: where each path starts in it, and its length
        self._name_sizes = name_sizes

    def __len__(self):
        return len(self._starts)

    def piece(self, position):
        """What starts at ``position`` (0 <= position < size): bytes (of the head, or zeros), or
        (a ``Piece``, offset in its file, bytes left of it)."""
        if position < self.head_end:
            return _pread(self.head, min(BLOCK, self.head_end - position), position)
        at = bisect.bisect_right(self._starts, position) - 1
        if at >= 0 and position < self._starts[at] + self._sizes[at]:
            into = position - self._starts[at]
            return Piece(self.path(at)), into, self._sizes[at] - into
        following = self._starts[at + 1] if at + 1 < len(self._starts) else self.size
        return bytes(min(BLOCK, following - position))

    def path(self, at):
        """The path of the file at place ``at`` in the image's order."""
        return _pread(self._names, self._name_sizes[at], self._name_at[at]).decode("utf-8", "surrogateescape")


def _pread(path, count, offset):
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(descriptor, count, offset)
    finally:
        os.close(descriptor)
    if len(data) != count:
        raise OSError("%s is shorter than when the image was laid out" % path)
    return data


class _Head(verify.Iso):
    """The head read as an ISO of ``length`` bytes, remembering how far into it each read reached;
    its files listed only when asked (``files``), never held."""

    def __init__(self, path, length):
        self.reach = 0
        super().__init__(path, length)

    def _list(self):
        pass

    def pread(self, size, offset, what):
        self.reach = max(self.reach, offset + size)
        return super().pread(size, offset, what)


def lay_out(genisoimage, staging, label, head, timeout, number=1, of=1):
    """The ``Image`` of the ISO genisoimage makes of ``staging`` (as ``tree.make_iso`` would write it),
    its head written to ``head``.  Its size is its primary volume descriptor's volume space, as
    genisoimage's -print-size says it (one run of genisoimage for both: 0.2 s at 10,000 images).
    Raises NotLaidOut for an image of another layout, MkisoError when genisoimage fails."""
    count = _files_in(staging)

    def read(stream):
        with open(head, "wb") as out:
            return _read_head(stream, out, head, staging, count)

    image = tree.read_iso(genisoimage, staging, label, read, timeout, number, of)
    if of > 1:
        tree.set_volume_sequence(head, number, of)
    return image


def _files_in(folder):
    """How many files the tree at ``folder`` holds, counted one name at a time: os.walk would hold a
    list of every name of a folder (3.5 MB for 50,000 images in one series, beside the job's records)."""
    count = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            count += _files_in(entry.path) if entry.is_dir(follow_symlinks=False) else 1
    return count


def _read_head(stream, out, path, staging, count):
    """Copy genisoimage's output from ``stream`` into ``out`` until the head is in, and lay it out:
    the ``Image``, or None when the output ended first (genisoimage failed)."""
    wanted, have, size = FIRST_READ + PER_FILE * count, 0, None
    while True:
        have = _copy(stream, out, wanted, have)
        if size is None and have >= DESCRIPTOR_END:
            size = _volume_size(path)
        if size is None or have < min(wanted, size):
            return None
        try:
            image = _laid_out(path, size, staging, count)
        except verify.Damaged:  # a directory beyond what came so far
            if have >= min(size, HEAD_LIMIT):
                raise NotLaidOut("its directory could not be read within %d bytes" % have)
            wanted = min(size, HEAD_LIMIT, 2 * have)
            continue
        if _copy(stream, out, image.head_end, have) < image.head_end:
            return None
        out.truncate(image.head_end)
        return image


def _volume_size(path):
    """The image's size in bytes: its primary volume descriptor's volume space (in the head ``path``)."""
    descriptor = _pread(path, tree.SECTOR, DESCRIPTOR_END - tree.SECTOR)
    if descriptor[:6] != b"\x01CD001":
        raise NotLaidOut("its first volume descriptor is not the primary one")
    return struct.unpack_from("<I", descriptor, 80)[0] * struct.unpack_from("<H", descriptor, 128)[0]


def _copy(stream, out, wanted, have):
    """Copy from ``stream`` to ``out`` until it holds ``wanted`` bytes (``have`` so far), or the end."""
    while have < wanted:
        data = stream.read(min(PIPE_READ, wanted - have))
        if not data:
            break
        out.write(data)
        have += len(data)
    out.flush()
    return have


def _laid_out(path, size, staging, count):
    """The layout of the image whose head (and maybe more) is in the file ``path``, of the ``count``
    files staged under ``staging``: checked as the module says, or NotLaidOut."""
    image = _Head(path, size)
    try:
        return _checked(image, path, size, staging, count)
    finally:
        image.close()


def _checked(image, path, size, staging, count):
    if image.joliet is None:
        raise NotLaidOut("it has no Joliet tree")
    block = image.block
    names = path + ".names"
    starts, lengths, name_at, name_sizes = array("Q"), array("Q"), array("Q"), array("I")
    seen = 0
    with open(names, "wb") as listed:
        for entry in image.files():
            if entry.damage == verify.MULTI_EXTENT:
                raise NotLaidOut("%s is a file of several extents" % entry.path)
            if _size(staging, entry.path) != entry.size:
                raise NotLaidOut("%s is not a file of the staged tree with its size" % entry.path)
            seen += 1
            if entry.size == 0:
                continue  # no bytes: nothing to send
            starts.append(entry.offset)
            lengths.append(entry.size)
            name = entry.path.encode("utf-8", "surrogateescape")
            name_at.append(listed.tell())
            name_sizes.append(len(name))
            listed.write(name)
    if seen != count:
        raise NotLaidOut("it holds %d files of the %d staged" % (seen, count))
    if any(starts[at - 1] > starts[at] for at in range(1, len(starts))):  # genisoimage's own order is the walk's
        order = sorted(range(len(starts)), key=starts.__getitem__)
        starts, lengths, name_at, name_sizes = (array(column.typecode, (column[at] for at in order))
                                                for column in (starts, lengths, name_at, name_sizes))
    head_end = starts[0] if starts else size
    for at in range(1, len(starts)):
        if starts[at - 1] + lengths[at - 1] > starts[at]:
            raise NotLaidOut("two files' bytes overlap")
    if starts and starts[-1] + lengths[-1] > size:
        raise NotLaidOut("a file's bytes lie beyond the image's end")
    joliet = 0
    for entry in image.files(joliet=True):  # the same bytes under the Joliet names
        at = bisect.bisect_left(starts, entry.offset)
        if entry.size and (at == len(starts) or starts[at] != entry.offset or lengths[at] != entry.size):
            raise NotLaidOut("the Joliet tree points at other bytes than the Rock Ridge one")
        joliet += 1
    if joliet != seen:
        raise NotLaidOut("its Joliet tree holds %d files, its Rock Ridge tree %d" % (joliet, seen))
    for descriptor in (image.primary, image.joliet):  # the path tables, both byte orders
        length = struct.unpack_from("<I", descriptor, 132)[0]
        for lba in (struct.unpack_from("<I", descriptor, 140)[0], struct.unpack_from(">I", descriptor, 148)[0]):
            image.reach = max(image.reach, lba * block + length)
    if image.reach > head_end:
        raise NotLaidOut("its directory reaches into the files' bytes")
    return Image(path, head_end, size, starts, lengths, names, name_at, name_sizes)


def _size(staging, path):
    try:
        return os.stat(os.path.join(staging, path)).st_size
    except OSError:
        return None
