"""The optional patient API: a display name for an accession number (SPEC §6).

It only names the multi-study ISO, so it must never cost a download: when
it is off, down, slow or answers nonsense, the caller falls back to the name
in the PACS' C-FIND answer.  Retries (with backoff) are for connection
errors and 5xx only; a timeout is not retried, so a slow API costs at most
one timeout.  Warnings name the accession, never the patient.
"""

import json
import logging
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import quote

log = logging.getLogger(__name__)

BACKOFF_S = 0.2


class PatientApi:
    def __init__(self, settings):
        self.url = settings.url
        self.name_field = settings.name_field
        self.timeout = settings.timeout_s
        self.retries = settings.retries
        # Direct connections: the API is on the hospital network, not behind a proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def enabled(self):
        return bool(self.url)

    def name(self, accession):
        """The patient's name for ``accession``, or None (with a warning why)."""
        if not self.enabled:
            return None
        try:
            answer = self._fetch(self.url.replace("{accession}", quote(accession, safe="")))
            try:
                document = json.loads(answer.decode("utf-8"))
            except ValueError:
                raise PatientApiError("the answer is not JSON")
            return self._field(document)
        except PatientApiError as exc:
            log.warning("patient API: %s; using the PACS name", exc, extra={"fields": {"accession": accession}})
            return None

    def _fetch(self, url):
        attempt = 0
        while True:
            last = attempt == self.retries
            try:
                with self._opener.open(url, timeout=self.timeout) as response:
                    return response.read(1 << 20)
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or last:
                    raise PatientApiError("HTTP %d" % exc.code)
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    raise PatientApiError("no answer within %ss" % self.timeout)
                if last:
                    raise PatientApiError("cannot connect: %s" % reason)
            time.sleep(BACKOFF_S * 2 ** attempt)
            attempt += 1

    def _field(self, document):
        value = document
        for key in self.name_field.split("."):
            if not isinstance(value, dict) or key not in value:
                raise PatientApiError("the answer has no field %s" % self.name_field)
            value = value[key]
        if not isinstance(value, str) or not value.strip():
            raise PatientApiError("the field %s is not a non-empty string" % self.name_field)
        return value.strip()


class PatientApiError(Exception):
    """Why the patient API gave no name."""
