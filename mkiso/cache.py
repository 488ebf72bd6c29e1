"""The disc cache (SPEC §9): a finished ISO is kept for the same request again.

A second click, a HEAD before the GET, a resumed download or the same
patient's disc asked for twice would otherwise redo the C-MOVE and the
build (and two builds are not byte-identical, so a resume across them is
impossible).  The key is everything a disc's bytes and name depend on: the
sorted SOP Instance UIDs of every study on it (the manifest, SPEC §3.6),
what the PACS says now about the patient and each study (name, ID, birth
date, ... as ``pacs.IDENTITY_KEYS``; a correction or a merge keeps the UIDs
and changes these), the layout, the DICOMDIR writer, the volume label, the
viewer's content and mkiso's version.  A study that changed has another key.
A changed image under an unchanged SOP Instance UID is beyond any query:
``cache.ttl_s`` bounds how long such a disc could be handed out.

An entry is a folder named by the key holding the disc's staged tree (hard
links: no copy while the job's tree lives; its bytes then stay only for
the entry), the per-file pass's results (``digests``: size, CRC-32,
SHA-256 of each file, and the time stamp its ZIP uses) and its ISO once
one was built (a hard link to the job's).  So either format of the same
disc is served without a second retrieval (SPEC §13): a ZIP from the tree
and the digests; an ISO from the cached ISO, or, when the disc was first
made as a ZIP, built once from the cached tree and kept.  An entry counts
the bytes of its tree plus those of its ISO.  A job served from the cache
gets hard links of its own, so eviction never pulls a file from under a
download.  Least recently used go first past ``cache.max_bytes``; none
outlives ``cache.ttl_s``.  The index lives in memory: a restart starts
empty (the folder is cleared with the other leftovers).
"""

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from typing import Optional

from . import __version__, fastcopy
from .disc import digests as digests_module

TREE = "tree"
ISO = "disc.iso"
DIGESTS = "digests"


@dataclasses.dataclass
class Entry:
    folder: str
    size: int  # its tree's bytes, and its ISO's once it has one
    stored: float
    iso: bool = False


@dataclasses.dataclass
class Cached:
    """A cached disc as linked into a job's folder: its ISO, or its tree with what a ZIP needs."""

    iso: Optional[str]  # the ISO's path, when asked for and cached
    tree: Optional[str]  # the staged tree's path, when the ISO was not (asked for, or cached)
    digests: list  # digests.Digest of every file of the tree, sorted by path
    when: tuple  # the ZIP's (date, time)


class DiscCache:
    def __init__(self, root, max_bytes, ttl_s, mode=0o600):
        self.root = root
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.mode = mode  # 0640 behind nginx (X-Accel-Redirect): nginx's group reads the ISOs
        self._entries = collections.OrderedDict()  # key -> Entry, least recently used first
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0  # for the metrics

    @property
    def enabled(self):
        return self.max_bytes > 0

    def takes(self, size):
        """Whether a disc of ``size`` bytes (its tree and its ISO) would be kept."""
        return self.enabled and size <= self.max_bytes

    @staticmethod
    def key(studies, fingerprints, **disc):
        """The key of a disc of ``studies`` (pacs.Study: what the PACS answered now) and their manifests
        (study UID -> ``retrieval.Listed.fingerprint``).

        It begins with the digest of the study UIDs alone (``_held``), so
        that ``may_hold`` can tell without any manifest whether an entry
        could be a disc of these studies at all.
        """
        content = {
            "studies": sorted([study.study_uid, fingerprints[study.study_uid], study.identity]
                              for study in studies),
            "disc": disc,
            "version": __version__,
        }
        return "%s-%s" % (_held([study.study_uid for study in studies]),
                          hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest())

    def may_hold(self, study_uids):
        """Whether an entry holds a disc of exactly these studies (whatever the rest of its key).

        Where none does, no manifest can make a hit, and the job asks for its
        manifests beside the retrieval (SPEC §3.9) instead of before it: that
        is the miss (``fetch`` counts it where one might hold it).
        """
        if not self.enabled:
            return False
        prefix = _held(study_uids) + "-"
        with self._lock:
            self._expire()
            held = any(key.startswith(prefix) for key in self._entries)
            self.misses += not held
        return held

    def fetch(self, key, folder, iso=True):
        """The cached disc for ``key`` linked into ``folder`` (a ``Cached``), or None when not cached.

        With ``iso`` its ISO is linked (``folder``/disc.iso) if it has one;
        otherwise (a ZIP, or an ISO still to be built) its tree (``folder``/tree).
        """
        if not self.enabled:
            return None
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            found, when = read_digests(os.path.join(entry.folder, DIGESTS))
            if iso and entry.iso:
                target = os.path.join(folder, ISO)
                os.link(os.path.join(entry.folder, ISO), target)
                return Cached(target, None, found, when)
            tree = os.path.join(folder, TREE)
            link_tree(os.path.join(entry.folder, TREE), tree, found)
            return Cached(None, tree, found, when)

    def store(self, key, tree, found, when, iso_path=None):
        """Keep the staged ``tree`` (its files' ``found`` digests, its ZIP's time stamp ``when``) and its
        ISO, if one was built, under ``key``; older entries go past max_bytes."""
        size = sum(digest.size for digest in found) + (os.path.getsize(iso_path) if iso_path else 0)
        if not self.takes(size):
            return
        folder = os.path.join(self.root, key)
        with self._lock:
            self._drop(key)
            os.mkdir(folder, 0o700 if self.mode == 0o600 else 0o750)
            link_tree(tree, os.path.join(folder, TREE), found)
            write_digests(os.path.join(folder, DIGESTS), found, when)
            entry = self._entries[key] = Entry(folder, size, time.monotonic())
            if iso_path:
                self._link_iso(entry, iso_path)
            self._trim()

    def add_iso(self, key, iso_path):
        """The ISO built from a cached tree joins its entry (if it is still there)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and not entry.iso:
                self._link_iso(entry, iso_path)
                entry.size += os.path.getsize(iso_path)
                self._trim()

    def _link_iso(self, entry, iso_path):
        path = os.path.join(entry.folder, ISO)
        os.link(iso_path, path)
        os.chmod(path, self.mode)
        entry.iso = True

    def _trim(self):
        while self._total() > self.max_bytes and self._entries:
            self._evict(next(iter(self._entries)))

    def free(self, wanted):
        """Evict least recently used entries until ``wanted`` bytes are freed (or none is left)."""
        freed = 0
        with self._lock:
            while freed < wanted and self._entries:
                key = next(iter(self._entries))
                freed += self._entries[key].size
                self._evict(key)
        return freed

    def expire(self):
        with self._lock:
            self._expire()

    def stats(self):
        with self._lock:
            return len(self._entries), self._total()

    def _expire(self):
        now = time.monotonic()
        for key in [key for key, entry in self._entries.items() if now - entry.stored >= self.ttl_s]:
            self._evict(key)

    def _evict(self, key):
        self.evictions += 1
        self._drop(key)

    def _drop(self, key):
        entry = self._entries.pop(key, None)
        if entry is not None:
            shutil.rmtree(entry.folder, ignore_errors=True)

    def _total(self):
        return sum(entry.size for entry in self._entries.values())


def _held(study_uids):
    """The first part of a disc's key: its studies' UIDs alone, in any order."""
    return hashlib.sha256("\\".join(sorted(study_uids)).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def link_tree(source, target, found):
    """Hard links (copies across file systems) of the files ``found`` under ``source`` into ``target``."""
    folders = {os.path.dirname(digest.path) for digest in found}
    for folder in sorted(folders):
        os.makedirs(os.path.join(target, folder), exist_ok=True)
    fastcopy.place_files([(os.path.join(source, digest.path), os.path.join(target, digest.path))
                          for digest in found])


def write_digests(path, found, when):
    """The per-file pass's results as lines: the time stamp, then size, CRC-32, SHA-256 and path each."""
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as handle:
        handle.write("%d %d\n" % when)
        for digest in found:
            handle.write("%d %08x %s %s\n" % (digest.size, digest.crc32, digest.sha256.hex(), digest.path))


def read_digests(path):
    """(digests, when) as ``write_digests`` wrote them."""
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        date, clock = (int(part) for part in handle.readline().split())
        found = []
        for line in handle:
            size, crc, sha, name = line.rstrip("\n").split(" ", 3)
            found.append(digests_module.Digest(name, int(size), int(crc, 16), bytes.fromhex(sha)))
    return found, (date, clock)
