"""Space in the work dir: the one number every guard against a full disk reads, giving it back, and
telling a full disk met while making a disc (507) from an internal error.

The receiver pauses below ``limits.min_free_bytes``, a job refuses to start
(507), a failed retrieval is told apart from a PACS failure, and health
reports it; all of them ask here.
"""

import errno
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from . import errors

_remover = ThreadPoolExecutor(1, thread_name_prefix="remover")


def free_bytes(path):
    """Bytes an unprivileged writer may still use on the file system of ``path``."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def remove_soon(path):
    """Remove the tree at ``path`` in the background, one tree after another.

    A staging tree holds the last links to a study's images: deleting 2,000
    of 512 KB takes about 0.35 s here, which a download waiting for its ISO
    need not wait for.  Whatever a crash leaves, the next start removes.
    """
    _remover.submit(shutil.rmtree, path, ignore_errors=True)


@contextmanager
def out_of_space_is_507():
    """ENOSPC met in the block is errors.InsufficientStorage (507): around a job's steps, and around the
    start of a streamed disc's build, which the keeper runs after them."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise errors.InsufficientStorage("The work dir ran out of space while making the disc.")
        raise
