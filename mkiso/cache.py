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

Entries are hard links to the job's ISO (no copy); a job served from the
cache gets a hard link of its own, so eviction never pulls a file from
under a download.  Least recently used go first past ``cache.max_bytes``;
none outlives ``cache.ttl_s``.  The index lives in memory: a restart
starts empty (the folder is cleared with the other leftovers).
"""

import collections
import dataclasses
import hashlib
import json
import os
import threading
import time

from . import __version__


@dataclasses.dataclass
class Entry:
    path: str
    size: int
    stored: float


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

    @staticmethod
    def key(studies, manifests, **disc):
        """The key of a disc of ``studies`` (pacs.Study: what the PACS answered now) and their manifests
        (study UID -> SOP UIDs)."""
        content = {
            "studies": sorted([study.study_uid, sorted(manifests[study.study_uid]), study.identity]
                              for study in studies),
            "disc": disc,
            "version": __version__,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()

    def fetch(self, key, target):
        """Link the cached ISO for ``key`` to ``target``; its size, or None when not cached."""
        if not self.enabled:
            return None
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            os.link(entry.path, target)
            self._entries.move_to_end(key)
            return entry.size

    def store(self, key, iso_path):
        """Keep ``iso_path`` (a finished ISO) under ``key``; older entries go past max_bytes."""
        size = os.path.getsize(iso_path)
        if not self.enabled or size > self.max_bytes:
            return
        path = os.path.join(self.root, key + ".iso")
        with self._lock:
            self._drop(key)
            os.link(iso_path, path)
            os.chmod(path, self.mode)
            self._entries[key] = Entry(path, size, time.monotonic())
            while self._total() > self.max_bytes:
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
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass

    def _total(self):
        return sum(entry.size for entry in self._entries.values())
