"""Space in the work dir: the one number every guard against a full disk reads, and giving it back.

The receiver pauses below ``limits.min_free_bytes``, a job refuses to start
(507), a failed retrieval is told apart from a PACS failure, and health
reports it; all of them ask here.
"""

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

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
