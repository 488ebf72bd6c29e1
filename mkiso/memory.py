"""glibc's malloc kept from growing the server job after job (SPEC §8: peak RSS under 80 MB).

A 50,000-image job makes and drops some 30 MB of objects (its records, its
disc plan, its laid-out ISO).  glibc's malloc keeps freed pages for the next
allocation of the same arena, and gives each thread that allocates while
another holds an arena an arena of its own, up to eight per core: the
service's request and job threads took fifteen.  What one job freed in one
arena was then not there for the next job's threads in another, and each
job left the server bigger: 78, 93, then 102 MB peak RSS over three
50,000-image downloads in one server (the benchmark).  So the server keeps
glibc to ARENAS arenas from its start (``limit_arenas``, what
``MALLOC_ARENA_MAX`` does for a process started with it) and, when the last
running job has ended, asks it to hand every free page back to the kernel
(``release``, ``malloc_trim``).  Elsewhere than glibc both do nothing.
"""

import ctypes

ARENAS = 2
M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)


def _libc():
    try:
        return ctypes.CDLL(None)  # the C library the interpreter runs on
    except OSError:
        return None


_LIBC = _libc()


def limit_arenas():
    """Keep glibc to ARENAS arenas for the threads started from now on; whether it could."""
    mallopt = getattr(_LIBC, "mallopt", None)
    return bool(mallopt is not None and mallopt(M_ARENA_MAX, ARENAS))


def release():
    """Hand the heap's free pages back to the kernel (a few milliseconds); whether it could."""
    malloc_trim = getattr(_LIBC, "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True
