"""Relaying images to the Rimage publisher with storescu (SPEC §5).

One association per patient: the patient's images are linked into a folder
of their own and sent with ``storescu +sd``.  storescu's exit code is no
proof, so every "Sending file" must be answered by a "Received Store
Response" with a success or warning status; anything less is a 502 that
says how many were accepted and how many not.
"""

import logging
import os
import re

from .. import errors, fastcopy, process
from . import pacs, tls

log = logging.getLogger(__name__)

_RESPONSE = re.compile(r"^I: Received Store Response \((?P<status>[^)]*)\)")
_SENDING = re.compile(r"^I: Sending file: ")


class StoreReport:
    """What storescu said about each image it sent, counted line by line as it runs."""

    def __init__(self):
        self.attempted = 0
        self.accepted = 0

    def feed(self, line):
        if _SENDING.match(line):
            self.attempted += 1
            return
        response = _RESPONSE.match(line)
        if response and response.group("status").startswith(("Success", "Warning")):
            self.accepted += 1


class Publisher:
    def __init__(self, config, peer):
        self.peer = peer
        self.our_ae = config.receiver.ae_title
        self.tool = os.path.join(config.tools.dcmtk_dir, "storescu")
        self.connect_timeout = config.timeouts.find_s
        self.store_timeout = config.timeouts.store_s

    def send(self, files, folder, check):
        """Send every file, one association per patient; raise unless all were accepted.

        ``check(pairs)`` is called with each association's (file as storescu
        will read it, received file's path) pairs before any of them is
        sent; it raises to send none of them (SPEC §4.6: a print's files are
        checked against their checksums before they are relayed).
        """
        by_patient = {}
        for received in files:
            by_patient.setdefault(received.patient, []).append(received)
        accepted = 0
        for number, images in enumerate(by_patient.values(), start=1):
            batch = os.path.join(folder, "publish-%d" % number)
            os.mkdir(batch)
            placed = [(image.path, os.path.join(batch, "IMG%06d" % i)) for i, image in enumerate(images)]
            fastcopy.place_files(placed)
            try:
                check([(link, source) for source, link in placed])
                report = self._store(batch)
            except errors.MkisoError as exc:
                exc.message = "%s %d of %d images had been accepted before." % (exc.message, accepted, len(files))
                raise
            accepted += report.accepted
            if report.accepted != len(images):
                raise errors.UpstreamFailed(
                    "%s accepted %d of %d images; %d were refused or not sent."
                    % (self.peer, accepted, len(files), len(files) - accepted), code="publisher_failed")
        return accepted

    def _store(self, batch):
        tls.check_certificate(self.peer.certificate)
        args = [self.tool, "-v", "-nh", "+sd", "+r"]
        args += pacs.association_args(self.our_ae, self.peer, self.connect_timeout)
        args += pacs.address_args(self.peer) + [batch]
        report = StoreReport()
        result = process.run_step(args, self.store_timeout, "Sending to the publisher %s" % self.peer,
                                  timeout_code="publisher_timeout", on_line=report.feed)
        if report.attempted == 0:
            pacs.raise_for_failure(result.output, self.peer, "Sending to the publisher", code="publisher_failed")
        return report
