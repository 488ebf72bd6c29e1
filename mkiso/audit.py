"""The audit trail (SPEC §11): who exported which patient's images, and when.

The ordinary log holds no patient identifiers; this file is where they
belong.  Every export (a download, a print), successful or not, appends one
JSON line to ``audit.path`` (0600); so does every lookup (``query``): it
shows patient names and IDs to whoever asks.  The file is reopened for
each line, so logrotate may move it away at any time (the service never rotates it).

An export whose line cannot be written does not happen: ``record`` and
``begin`` raise, and the caller gets 507 (disk full) or 500 instead of the
disc or the print.  Where the outcome is known only once the bytes or
images have gone (a synchronous download: the status answered, a 416 too,
the bytes sent, ``complete`` false when the client left early; a print:
what the publisher accepted), a first line comes before the first byte or
image leaves (``begin``: ``"stage": "begun"``, fsynced, with what is
known then) and the outcome after (``"stage": "ended"``).  So a full or
read-only audit disk stops the export before anything leaves, and a crash,
a SIGKILL or a SIGTERM in between leaves the first line standing: never an
export without its line.  Every other export, and every failure before
anything left, is one ``ended`` line.  Behind nginx (X-Accel-Redirect) mkiso
hands the disc over and nginx sends it: that line says ``"handed_to":
"nginx"`` and leaves ``complete`` null, as mkiso never sees what the client got.
With ``audit.syslog`` set, each outcome also goes to a central audit
repository as a DICOM audit message (``atna``); that copy is best effort,
the file is the record.

Run as ``python3 -m mkiso.audit`` it answers "who exported patient X
between two dates" from the file.
"""

import argparse
import contextlib
import dataclasses
import datetime
import errno
import gzip
import ipaddress
import json
import logging
import os
import stat
import sys
import threading
import time
from contextlib import contextmanager

from . import atna, errors

log = logging.getLogger(__name__)

DEFAULT_PATH = "/var/log/mkiso/audit.log"


@dataclasses.dataclass
class Export:
    """One export as it happens; the job adds what it found, the web layer the outcome."""

    action: str  # download | print | query
    request_id: str
    client: str
    caller: str = None
    accessions: list = dataclasses.field(default_factory=list)
    studies: list = dataclasses.field(default_factory=list)  # pacs.Study, once found
    images: int = 0
    bytes: int = 0
    destination: str = ""  # print: the publisher
    format: str = None  # a download's: iso | zip (SPEC §13); None for a print or a lookup
    verified: bool = None  # its disc passed the read-back, a print its check (SPEC §4.6); None: not checked
    media: str = "dvd"  # iso.media: which medium an ISO is for (the ATNA message's media type)
    complete: bool = True  # false: the client left before it had the whole answer
    # "nginx": behind X-Accel-Redirect the disc goes to nginx, which sends it (or answers 403 when its user
    # cannot read the work dir): mkiso cannot know what the client got, so its line's ``complete`` is null
    handed_to: str = None
    deferred: bool = False  # the outcome is written when the answer ends (web), not when the job is done
    begun: bool = False  # its "begun" line is written: what leaves from now on is on record
    recorded: bool = False  # its outcome line is written (or was tried)
    started: float = dataclasses.field(default_factory=time.monotonic)
    time: datetime.datetime = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))

    def entry(self, status, code, stage="ended"):
        """The line; a ``begun`` one has no outcome yet (status, code and complete null, no bytes sent);
        a lookup exported nothing (no images, no bytes: a HEAD's sized disc is not sent).  A disc handed
        to nginx says so (``handed_to``): its status is mkiso's answer to nginx, its bytes the size
        handed over, and whether the client got them is not mkiso's to say (``complete`` null)."""
        begun, exported = stage == "begun", self.action != "query"
        handed_to = self.handed_to if code is None and not begun else None  # a failure handed nothing over
        return {
            "time": self.time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": self.request_id,
            "client": self.client,
            "caller": self.caller,
            "action": self.action,
            "accessions": list(self.accessions),
            "study_uids": [study.study_uid for study in self.studies],
            "patient_ids": sorted({study.patient_id for study in self.studies}),
            "images": self.images if exported else 0,
            "bytes": self.bytes if exported and not begun else 0,
            "complete": None if begun or handed_to else self.complete,
            "status": status,
            "code": code,
            "duration_ms": int((time.monotonic() - self.started) * 1000),
            "stage": stage,
            "format": self.format,
            "verified": self.verified,
            "handed_to": handed_to,
        }


class Audit:
    def __init__(self, config):
        self.path = config.audit.path
        self.syslog = atna.Syslog(config.audit.syslog, config.receiver.ae_title,
                                 ca_file=config.audit.syslog_ca_file) if config.audit.syslog else None
        self._lock = threading.Lock()

    def record(self, export, status, code=None):
        """Append the export's outcome line; an export without its line must not happen, so this raises."""
        export.recorded = True
        entry = self._write(export, export.entry(status, code))
        if self.syslog is not None:
            self.syslog.send(entry, export)

    def begin(self, export):
        """Append the export's ``begun`` line, fsynced, before its first byte or image leaves; raises
        as ``record`` does, and then nothing may leave."""
        self._write(export, export.entry(None, None, stage="begun"))
        export.begun = True

    def _write(self, export, entry):
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self._failing(export):
            with self._lock:
                self._append(data)
        return entry

    @contextlib.contextmanager
    def _failing(self, export):
        """An OSError of the trail as the export's failure: 507 when out of space, else 500."""
        try:
            yield
        except OSError as exc:
            log.error("cannot write the audit trail %s: %s", self.path, exc.strerror,
                      extra={"fields": {"request_id": export.request_id}})
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise errors.InsufficientStorage(
                    "The audit trail cannot be written (no space left); nothing is exported without it.",
                    code="audit_failed")
            raise errors.MkisoError(
                "The audit trail cannot be written; nothing is exported without it.", code="audit_failed")

    def _open(self):
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextmanager
    def recording(self, export):
        """The export's line once the block ends: 200, or the status of the error that ended it.

        When the block failed, a line that cannot be written is logged (by
        ``record``) and the caller hears the block's own error.
        """
        try:
            yield export
        except Exception as exc:
            failure = exc if isinstance(exc, errors.MkisoError) else errors.MkisoError("")
            try:
                self.record(export, failure.status, failure.code)
            except errors.MkisoError:
                pass
            raise
        self.record(export, 200)

    def _append(self, data):
        """One whole line, or none: a write the disk could take only part of is cut off again, else the
        next line would be glued to it and neither would read as JSON (nor be found by mkiso-audit)."""
        fd = self._open()
        try:
            status = os.fstat(fd)
            if stat.S_ISREG(status.st_mode) and status.st_mode & 0o077:
                os.fchmod(fd, 0o600)
            try:
                if os.write(fd, data) != len(data):  # a regular file writes all of it, or fails
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(fd)
            except OSError:
                if stat.S_ISREG(status.st_mode):
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, status.st_size)
                raise
        finally:
            os.close(fd)


def client_address(environ, trusted_proxies):
    """The client's address: the peer's, or behind a trusted proxy what it says in X-Forwarded-For.

    Walks X-Forwarded-For from the right (the entry the nearest proxy
    added) past every trusted proxy; a proxy not trusted cannot lie.  Only
    a plain IP address is taken (no IPv6 scope id, which may carry any
    text); anything else keeps the last address vouched for, with a warning.
    """
    trusted = [ipaddress.ip_network(entry, strict=False) for entry in trusted_proxies]
    address = environ.get("REMOTE_ADDR", "")
    hops = [hop.strip() for hop in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
    while _is_trusted(address, trusted) and hops:
        hop = _plain_address(hops.pop())
        if hop is None:
            log.warning("X-Forwarded-For from proxy %s holds something that is not an IP address; "
                        "the proxy's own address is recorded", address)
            break
        address = hop
    return address


def _plain_address(text):
    """``text`` as a plain IP address in its normal form, or None."""
    if "%" in text:  # a scope id: ip_address takes any text after it
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _is_trusted(address, networks):
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


# -- the query command ---------------------------------------------------------


def _date(text):
    return datetime.date.fromisoformat(text).isoformat()


def matches(entry, patient=None, accession=None, since=None, until=None):
    """Whether an audit line is about ``patient``/``accession`` within [since, until] (dates, inclusive)."""
    day = entry.get("time", "")[:10]
    return ((patient is None or patient in entry.get("patient_ids", []))
            and (accession is None or accession in entry.get("accessions", []))
            and (since is None or day >= since)
            and (until is None or day <= until))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="mkiso-audit",
        description="Print the audit lines (JSON) of exports of a patient or accession, e.g. "
                    "who exported patient P123 in March: --patient P123 --since 2026-03-01 --until 2026-03-31")
    parser.add_argument("--patient", help="a Patient ID")
    parser.add_argument("--accession", help="an accession number")
    parser.add_argument("--since", type=_date, help="first day, YYYY-MM-DD (UTC)")
    parser.add_argument("--until", type=_date, help="last day, YYYY-MM-DD (UTC)")
    parser.add_argument("files", nargs="*", default=[DEFAULT_PATH],
                        help="audit files, rotated (.gz) ones too (default %s)" % DEFAULT_PATH)
    args = parser.parse_args(argv)
    found = 0
    for path in args.files:
        try:
            handle = (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8")
        except OSError as exc:
            parser.exit(2, "%s: %s\n" % (path, exc.strerror))
        with handle:
            for number, line in enumerate(handle, 1):
                try:
                    entry = json.loads(line)
                except ValueError:
                    print("%s:%d: not an audit line" % (path, number), file=sys.stderr)
                    continue
                if matches(entry, args.patient, args.accession, args.since, args.until):
                    print(json.dumps(entry, ensure_ascii=False))
                    found += 1
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
