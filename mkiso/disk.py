"""Free space in the work dir: the one number every guard against a full disk reads.

The receiver pauses below ``limits.min_free_bytes``, a job refuses to start
(507), a failed retrieval is told apart from a PACS failure, and health
reports it; all of them ask here.
"""

import os


def free_bytes(path):
    """Bytes an unprivileged writer may still use on the file system of ``path``."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize
