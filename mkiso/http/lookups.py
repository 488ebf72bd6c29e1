"""Lookups for the desk page (GET /api/studies, SPEC §9): few at once, and behind the real work.

A lookup is a handful of C-FINDs per accession, a tool started for each;
forty clerks (or one script) asking at once ran hundreds of findscu and
took health and downloads from 0.15 s to 30 s.  So at most
``limits.max_jobs`` run at once (the others are told 503 ``busy`` at once,
rather than held in a queue that would hold the server's threads too),
and they run in threads of their own at a lower CPU priority: Linux keeps
a nice value per thread and every tool a thread starts inherits it, so
when the CPU is short the lookups wait, not the downloads.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from .. import errors

NICE = 10
RETRY_AFTER_S = 1  # a lookup takes a second or two


def _behind():
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except OSError:
        pass  # a priority is a courtesy, never a reason to fail a lookup


class Lookups:
    def __init__(self, slots):
        self.slots = slots
        self._free = threading.BoundedSemaphore(slots)
        self._pool = ThreadPoolExecutor(slots, thread_name_prefix="lookup", initializer=_behind)

    def run(self, function, *args):
        """``function(*args)`` in a lookup thread, waited for; 503 when every slot is taken."""
        if not self._free.acquire(blocking=False):
            raise errors.Unavailable("%d lookups are running; try again in a moment." % self.slots,
                                     code="busy", retry_after=RETRY_AFTER_S)
        try:
            return self._pool.submit(function, *args).result()
        finally:
            self._free.release()
