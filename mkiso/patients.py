"""The optional patient API: a display name for an accession number (SPEC §6).

It only names the multi-study ISO, so it must never cost a download: when
it is off, down, slow or answers nonsense, the caller falls back to the name
in the PACS' C-FIND answer.  Retries (with backoff) are for connection
errors and 5xx only; a timeout is not retried, so a slow API costs at most
one timeout.  Warnings name the accession, never the patient.

``timeout_s`` bounds each attempt whole, on the wall clock: connecting, the
answer's headers and its body.  A socket timeout alone bounds each wait for
a byte, so an API trickling its answer a byte at a time held a download for
minutes; the attempt's ``Deadline`` shuts its connection when time is up,
and the read waiting on it ends at once.  The answer is read up to
MAX_ANSWER bytes: a name does not come in more.
"""

import http.client
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import quote

log = logging.getLogger(__name__)

BACKOFF_S = 0.2
MAX_ANSWER = 1 << 20  # bytes


class PatientApi:
    def __init__(self, settings):
        self.url = settings.url
        self.name_field = settings.name_field
        self.timeout = settings.timeout_s
        self.retries = settings.retries

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
            with Deadline(self.timeout) as deadline:
                # Direct connections: the API is on the hospital network, not behind a proxy.
                opener = urllib.request.build_opener(
                    urllib.request.ProxyHandler({}), _HttpHandler(deadline), _HttpsHandler(deadline))
                try:
                    with opener.open(url, timeout=self.timeout) as response:
                        answer = response.read(MAX_ANSWER + 1)
                    if deadline.expired:  # shut mid-answer: headers or body end where they were cut
                        raise TimeoutError
                except urllib.error.HTTPError as exc:
                    if exc.code < 500 or last:
                        raise PatientApiError("HTTP %d" % exc.code)
                except (OSError, http.client.HTTPException) as exc:
                    reason = getattr(exc, "reason", exc)
                    if deadline.expired or isinstance(reason, TimeoutError):
                        raise PatientApiError("no answer within %ss" % self.timeout)
                    if isinstance(exc, http.client.HTTPException):
                        raise PatientApiError("the answer is not HTTP: %s" % (exc.__class__.__name__))
                    if last:
                        raise PatientApiError("cannot connect: %s" % reason)
                else:
                    if len(answer) > MAX_ANSWER:
                        raise PatientApiError("the answer is longer than %d bytes" % MAX_ANSWER)
                    return answer
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


class Deadline:
    """One attempt's bound on the wall clock: when it passes, every connection the attempt opened is
    shut, whatever it waits for (headers, a body a byte at a time); a connect has the time left as its
    timeout."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc_info):
        self._timer.cancel()

    def remaining(self):
        return max(0.001, self.end - time.monotonic())

    def watch(self, sock):
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self):
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock):
    """End every wait on ``sock`` (from another thread): the reader sees the end of the stream."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, under TLS too
    except OSError:
        pass  # closed already


class _Watched:
    """An http.client connection whose socket its attempt's Deadline shuts."""

    def __init__(self, *args, deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self):
        self.timeout = self.deadline.remaining()
        super().connect()
        self.deadline.watch(self.sock)


class _HttpConnection(_Watched, http.client.HTTPConnection):
    pass


class _HttpsConnection(_Watched, http.client.HTTPSConnection):
    pass


WATCHED = {http.client.HTTPConnection: _HttpConnection, http.client.HTTPSConnection: _HttpsConnection}


class _DeadlineHandler:
    """urllib's handler opening its connections as ``_Watched`` ones of one Deadline (redirects too)."""

    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class, req, **http_conn_args):
        return super().do_open(WATCHED[http_class], req, deadline=self.deadline, **http_conn_args)


class _HttpHandler(_DeadlineHandler, urllib.request.HTTPHandler):
    pass


class _HttpsHandler(_DeadlineHandler, urllib.request.HTTPSHandler):
    pass
